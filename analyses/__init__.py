"""llama-scalpel analyses: read caches, patch, attribute, plot.

Every analysis takes a ``hooks.HookedLlama`` and returns a result object with its tensors as
attributes, ``.rows()`` / ``.to_frame()``, ``.to_dict()`` (JSON-serialisable), ``.figure()`` (plotly)
and a notebook display.

>>> from hooks import HookedLlama
>>> from analyses import activation_patching, detect_heads, logit_lens
>>> model = HookedLlama.default()
>>> res = activation_patching(model, "When Mary and John went to the store, John gave a drink to",
...                           "When Mary and John went to the store, Mary gave a drink to",
...                           answers=(" Mary", " John"), component="resid_pre")
>>> res.values.shape
torch.Size([30, 14])

Findings leave this package as plain tensors (a steering vector, head indices, neuron indices) for
the ``surgery`` package to turn into weight edits; ``analyses`` never writes checkpoints.
"""

from .ablation import AblationResult, AblationSweepResult, Prompt, Scorer, ablation_sweep, measure_ablation
from .attribution import AttributionResults, attribution_patching
from .circuits import AttributionGraph, Circuit, EdgeScores, attribution_graph, edge_attribution
from .components import COMPONENTS, Component, get_component
from .dla import DLAResult, direct_logit_attribution
from .head_detection import HeadDetectionResult, detect_heads, repeated_random_tokens
from .heads import HeadRef, group_size, head_ref, head_table, kv_group, parse_heads, query_heads
from .logit_lens import LogitLensResult, logit_lens
from .massive import MassiveActivationWarning, massive_mask
from .metrics import KLDivergence, LogitDiff, Metric, TargetProb, kl_divergence, logit_diff, normalized, target_prob
from .neurons import NeuronTopActivations, load_corpus, top_activating
from .patching import PatchingResult, activation_patching
from .path_patching import path_patching
from .refusal import (
    REFUSAL_MARKERS,
    DirectionSelection,
    PromptKL,
    RefusalDirections,
    RefusalRate,
    is_refusal,
    load_prompts,
    prompt_kl,
    refusal_directions,
    refusal_rate,
    select_direction,
)
from .results import AnalysisResult
from .steering import Steering, SteeringDirection, steer, steering_direction
from .viewers import AttentionPatterns, HeadAttention, attends, attention_patterns

__all__ = [
    "ablation_sweep",
    "measure_ablation",
    "AblationResult",
    "Scorer",
    "Prompt",
    "AblationSweepResult",
    "activation_patching",
    "attribution_patching",
    "path_patching",
    "edge_attribution",
    "attribution_graph",
    "EdgeScores",
    "Circuit",
    "AttributionGraph",
    "direct_logit_attribution",
    "logit_lens",
    "detect_heads",
    "repeated_random_tokens",
    "top_activating",
    "load_corpus",
    "steering_direction",
    "steer",
    "PatchingResult",
    "AttributionResults",
    "DLAResult",
    "LogitLensResult",
    "HeadDetectionResult",
    "NeuronTopActivations",
    "SteeringDirection",
    "Steering",
    "AnalysisResult",
    "Metric",
    "LogitDiff",
    "TargetProb",
    "KLDivergence",
    "logit_diff",
    "target_prob",
    "kl_divergence",
    "normalized",
    "HeadRef",
    "head_ref",
    "kv_group",
    "query_heads",
    "group_size",
    "parse_heads",
    "head_table",
    "COMPONENTS",
    "Component",
    "get_component",
    "refusal_rate",
    "refusal_directions",
    "prompt_kl",
    "load_prompts",
    "is_refusal",
    "REFUSAL_MARKERS",
    "RefusalRate",
    "RefusalDirections",
    "PromptKL",
    "select_direction",
    "DirectionSelection",
    "MassiveActivationWarning",
    "massive_mask",
    "attention_patterns",
    "attends",
    "AttentionPatterns",
    "HeadAttention",
]
