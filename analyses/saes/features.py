"""Analyses by SAE feature: top-activating contexts, attribution to a metric, patching, steering.

- ``top_feature_contexts``: the corpus tokens on which chosen features fire most, streamed in batches
  (a text file is read a batch at a time; only documents holding a current top-k entry are kept).
- ``feature_attribution``: gradient × activation of every feature at every position to a metric, with
  the SAE spliced (error term on, detached as in SAELens), one forward and one backward for a batch.
  Its first-order estimate of ablating a feature is ``-attribution``.
- ``feature_patching``: the exact effect on the metric of ablating each chosen feature (all positions),
  one batch row per feature — the check of the attribution.
- ``FeatureSteering`` / ``FeatureAblation``: run-time edits as hooks (``with edit.applied(model):``);
  steering along a decoder row of an SAE writing a residual-stream point is an ``AddSteering`` weight
  edit (``to_edit()``), ablation is not linear in the weights and is refused for export.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from _core.autograd import differentiates
from hooks import InputError

from ..metrics import resolve_metric
from ..neurons import NeuronTopActivations, iter_corpus, stream_top_k
from ..results import AnalysisResult, jsonable
from .sae import SAE
from .splicing import _features, ablate_features, spliced

if TYPE_CHECKING:
    from hooks.model import HookedLlama


# --------------------------------------------------------------------------- top contexts
@dataclass
class FeatureTopActivations(NeuronTopActivations):
    """Top-k activations of SAE features; as ``NeuronTopActivations`` with ``features`` as the rows
    (``layer`` is the SAE's hook name here); figures label rows ``F348``, "feature"."""

    unit = "feature"

    @property
    def features(self) -> list[int]:
        return self.neurons

    @property
    def title(self) -> str:
        return f"top activations of SAE features at {self.layer}"

    def rows(self) -> list[dict]:
        return [
            {"feature" if key == "neuron" else key: v for key, v in row.items() if key != "layer"}
            for row in super().rows()
        ]


def top_feature_contexts(
    model: HookedLlama,
    sae: SAE,
    features: Sequence[int] | int | None = None,
    corpus=None,
    k: int = 10,
    *,
    batch_size: int = 16,
    max_tokens: int = 64,
    context: int = 6,
    skip_first: bool = True,
) -> FeatureTopActivations:
    """The ``k`` corpus tokens on which each feature is most active.

    ``corpus``: a list of strings, a path to a text file (one document a line, streamed), or None for
    the shipped corpus. Features default to all of them. ``skip_first``: each document's first token
    (an outlier activation SAEs are not trained on, see ``train_sae``) is not counted.

    Example: ``top_feature_contexts(model, sae, [123], k=5).rows()``.
    """
    feats = list(range(sae.d_sae)) if features is None else _features(features)
    bad = [f for f in feats if not 0 <= f < sae.d_sae]
    if bad:
        raise InputError(f"feature index {bad[0]} is out of range; the SAE has {sae.d_sae} features")
    if corpus is None or isinstance(corpus, (str, Path)):
        corpus = iter_corpus(corpus)
    idx = torch.tensor(feats)
    layer = _layer_of(sae.hook_name)
    stop = layer + 1 if layer is not None and layer + 1 < model.n_layers else None

    def read(tokens, mask):
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[sae.hook_name], stop_at_layer=stop)
        acts = sae.encode(cache[sae.hook_name])[..., idx.to(tokens.device)]
        if skip_first:
            first = mask.float().argmax(dim=1) if mask is not None else torch.zeros(len(tokens), dtype=torch.long)
            acts[torch.arange(len(tokens)), first] = float("-inf")
        return acts

    top = stream_top_k(model, corpus, read, len(feats), k, batch_size, max_tokens, context)
    return FeatureTopActivations(layer=sae.hook_name, neurons=feats, **top)


def _layer_of(hook_name: str) -> int | None:
    import re

    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- attribution
@dataclass
class FeatureAttribution(AnalysisResult):
    """``values`` [batch, pos, d_sae]: activation × ∂metric/∂activation of every feature; ``acts`` the
    activations; ``total`` [d_sae] summed over batch and positions; ``metric`` the metric's value."""

    hook_name: str
    values: torch.Tensor
    acts: torch.Tensor
    metric: float
    str_tokens: list[str] | None = None

    @property
    def total(self) -> torch.Tensor:
        return self.values.sum(dim=(0, 1))

    @property
    def title(self) -> str:
        return f"feature attribution at {self.hook_name}"

    def top(self, n: int = 10) -> list[int]:
        """The ``n`` features with the largest |total attribution|."""
        return self.total.abs().topk(min(n, self.total.numel())).indices.tolist()

    def rows(self) -> list[dict]:
        tot = self.total
        return [
            {"feature": f, "attribution": float(tot[f]), "max_act": float(self.acts[..., f].max())}
            for f in self.top(min(50, tot.numel()))
        ]

    def to_dict(self) -> dict:
        return jsonable({"hook_name": self.hook_name, "metric": self.metric, "total": self.total, "top": self.rows()})

    def figure(self, n: int = 20):
        """Bar chart of the ``n`` features with the largest |attribution|."""
        import plotly.graph_objects as go

        rows = self.rows()[:n]
        fig = go.Figure(go.Bar(x=[f"F{r['feature']}" for r in rows], y=[r["attribution"] for r in rows]))
        fig.update_layout(
            title=f"{self.title} (metric {self.metric:.3f})",
            xaxis_title="feature",
            yaxis_title="activation × gradient",
            template="plotly_white",
        )
        return fig


def _tokens(model: HookedLlama, prompts):
    if isinstance(prompts, torch.Tensor):
        t = prompts[None] if prompts.dim() == 1 else prompts
        return t.to(model.device), None
    tokens, mask = model.tokenize([prompts] if isinstance(prompts, str) else list(prompts))
    return tokens.to(model.device), mask.to(model.device)


@differentiates  # works under torch.no_grad() and torch.inference_mode()
def feature_attribution(model: HookedLlama, sae: SAE, prompts, metric=None, *, answers=None) -> FeatureAttribution:
    """Gradient × activation of every feature to ``metric`` (a ``Metric``, a callable on logits, or a
    name with ``answers``, as elsewhere), over a batch of prompts in one forward and backward.

    Example::

        attr = feature_attribution(model, sae, "When Mary and John went to the store, John gave a drink to",
                                   answers=(" Mary", " John"))
        attr.top(5)
    """
    from ..attribution import frozen_parameters

    tokens, mask = _tokens(model, prompts)
    metric_fn = resolve_metric(model, metric, answers, None)
    name = f"{sae.hook_name}.hook_sae_acts_post"
    store: dict[str, torch.Tensor] = {}

    def keep(acts, hook):
        leaf = acts.detach().requires_grad_(True)  # the gradient is read here, nothing upstream needs one
        store["acts"] = leaf
        return leaf

    with (
        frozen_parameters(model),
        frozen_parameters(sae),
        spliced(model, [sae], use_error_term=True),
        model.hooks([(name, keep)]),
        torch.enable_grad(),
    ):
        logits = model(tokens, attention_mask=mask)
        value = metric_fn(logits)
        value = value.sum() if value.dim() > 0 else value
        acts = store["acts"]
        if value.requires_grad:
            value.backward()
    grad = acts.grad if acts.grad is not None else torch.zeros_like(acts)
    strs = model.to_str_tokens(tokens[0]) if model.tokenizer is not None and tokens.shape[0] == 1 else None
    return FeatureAttribution(
        hook_name=sae.hook_name,
        values=(acts * grad).detach(),
        acts=acts.detach(),
        metric=float(value.detach()),
        str_tokens=strs,
    )


def feature_patching(
    model: HookedLlama,
    sae: SAE,
    prompt,
    features: Sequence[int],
    metric=None,
    *,
    answers=None,
    factor: float = 0.0,
    batch_size: int = 16,
) -> torch.Tensor:
    """Exact change of ``metric`` when each feature is multiplied by ``factor`` (0: ablated) at every
    position, the SAE spliced with its error term: a tensor [len(features)], ``batch_size`` features a
    forward. Attribution predicts ``(factor - 1) * attribution``, exactly so as ``factor`` → 1.

    Example: ``feature_patching(model, sae, prompt, attr.top(10), answers=(" Mary", " John"))``.
    """
    tokens, mask = _tokens(model, prompt)
    if tokens.shape[0] != 1:
        raise InputError("feature_patching takes one prompt")
    feats = _features(features)
    metric_fn = resolve_metric(model, metric, answers, None)
    name = f"{sae.hook_name}.hook_sae_acts_post"
    out = []
    with torch.no_grad(), spliced(model, [sae], use_error_term=True):
        base = metric_fn(model(tokens, attention_mask=mask)).reshape(-1)[0]
        for start in range(0, len(feats), batch_size):
            chunk = feats[start : start + batch_size]
            rows = torch.tensor(chunk)

            def ablate_row(acts, hook, rows=rows):
                acts = acts.clone()
                idx = torch.arange(len(rows))
                acts[idx, :, rows.to(acts.device)] = acts[idx, :, rows.to(acts.device)] * factor
                return acts

            batch = tokens.expand(len(chunk), -1)
            m = mask.expand(len(chunk), -1) if mask is not None else None
            with model.hooks([(name, ablate_row)]):
                vals = _per_row(metric_fn, model(batch, attention_mask=m))
            out.append(vals - base)
    return torch.cat(out).float().cpu()


def _per_row(metric_fn, logits: torch.Tensor) -> torch.Tensor:
    """The metric of each batch row [B] (a ``Metric`` scores rows at once; a callable row by row)."""
    if hasattr(metric_fn, "score") and hasattr(metric_fn, "pos"):
        return metric_fn.score(logits[:, metric_fn.pos]).float().reshape(-1)
    return torch.stack([metric_fn(logits[i : i + 1]).reshape(()) for i in range(logits.shape[0])]).float()


# --------------------------------------------------------------------------- steering and ablation
_EXPORTABLE = {"hook_resid_post": 0, "hook_mlp_out": 0, "hook_resid_pre": -1}


def feature_direction(sae: SAE, feature: int) -> torch.Tensor:
    """The decoder row of ``feature`` [d_out]: what one unit of the feature adds to the activation."""
    (f,) = _features(feature)
    if not 0 <= f < sae.d_sae:
        raise InputError(f"feature index {f} is out of range; the SAE has {sae.d_sae} features")
    return sae.W_dec[f].detach().clone()


@dataclass
class FeatureSteering:
    """Add ``scale * W_dec[feature]`` to the SAE's output hook point at every position (no SAE splice).

    ``with FeatureSteering(sae, 123, 8.0).applied(model): model.generate(...)``; ``to_edit()`` is the
    equivalent ``AddSteering`` record for ``surgery`` (the SAE must write the residual stream or an
    MLP output).
    """

    sae: SAE
    feature: int
    scale: float = 1.0

    @property
    def hook_name(self) -> str:
        return self.sae.hook_name_out or self.sae.hook_name

    def fwd_hooks(self) -> list:
        vec = feature_direction(self.sae, self.feature) * float(self.scale)

        def add_feature_direction(t, hook):
            return t + vec.to(t.device, t.dtype)

        return [(self.hook_name, add_feature_direction)]

    def applied(self, model: HookedLlama):
        return model.hooks(fwd_hooks=self.fwd_hooks())

    def to_edit(self) -> dict:
        """The ``surgery.AddSteering`` record that bakes this steering into the weights."""
        layer = _layer_of(self.hook_name)
        kind = self.hook_name.split(".")[-1]
        if layer is None or kind not in _EXPORTABLE or layer + _EXPORTABLE[kind] < 0:
            raise InputError(
                f"steering at {self.hook_name} has no weight edit; steer an SAE that writes "
                "blocks.L.hook_resid_post, hook_resid_pre (L > 0) or hook_mlp_out"
            )
        return {
            "edit": "AddSteering",
            "layer": layer + _EXPORTABLE[kind],
            "vector": feature_direction(self.sae, self.feature).double(),
            "scale": float(self.scale),
        }


@dataclass
class FeatureAblation:
    """Set features to 0 with the SAE spliced (error term kept): run-time only."""

    sae: SAE
    features: Sequence[int]
    use_error_term: bool = True

    @contextlib.contextmanager
    def applied(self, model: HookedLlama):
        with (
            spliced(model, [self.sae], use_error_term=self.use_error_term),
            model.hooks([(f"{self.sae.hook_name}.hook_sae_acts_post", ablate_features(list(self.features)))]),
        ):
            yield model

    def to_edit(self) -> dict:
        raise InputError(
            "ablating SAE features is not linear in the weights (the SAE's encoder is non-linear), "
            "so it cannot be exported; apply it at run time with FeatureAblation(...).applied(model)"
        )
