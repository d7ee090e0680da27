"""Sparse autoencoders and transcoders: load the public formats, splice them into the model, analyse,
steer and train by feature.

>>> from analyses.saes import load_sae, spliced
>>> sae = load_sae("saes/blocks.6.hook_resid_post", model)
>>> with spliced(model, [sae]):          # or: with model.saes([sae]):
...     logits, cache = model.run_with_cache("The cat sat on the mat")
>>> cache["blocks.6.hook_resid_post.hook_sae_acts_post"].shape   # [batch, pos, d_sae]
"""

from .dashboard import FeatureCard, FeatureDashboard, feature_dashboard, logit_effects
from .features import (
    FeatureAblation,
    FeatureAttribution,
    FeatureSteering,
    FeatureTopActivations,
    feature_attribution,
    feature_direction,
    feature_patching,
    top_feature_contexts,
)
from .formats import check_fits, load_sae, save_sae
from .metrics import SAEMetrics, sae_metrics
from .sae import ARCHITECTURES, SAE, SAEConfig
from .splicing import ablate_features, clamp_features, scale_features, spliced
from .train import TrainResult, train_sae, train_saes, transcoder_hooks

__all__ = [
    "SAE",
    "SAEConfig",
    "ARCHITECTURES",
    "load_sae",
    "save_sae",
    "check_fits",
    "spliced",
    "ablate_features",
    "clamp_features",
    "scale_features",
    "train_sae",
    "train_saes",
    "transcoder_hooks",
    "TrainResult",
    "sae_metrics",
    "SAEMetrics",
    "top_feature_contexts",
    "FeatureTopActivations",
    "feature_attribution",
    "FeatureAttribution",
    "feature_patching",
    "feature_direction",
    "FeatureSteering",
    "FeatureAblation",
    "feature_dashboard",
    "FeatureDashboard",
    "FeatureCard",
    "logit_effects",
]
