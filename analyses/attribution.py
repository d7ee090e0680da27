"""Attribution patching: the first-order (gradient × activation difference) estimate of activation
patching, for every component and cell at once.

For a cell (layer, position, unit) of a component with clean activation ``a_clean`` and corrupted
activation ``a_corr``, patching changes the metric by approximately

    attribution = Σ (a_clean - a_corr) · ∂metric/∂a   (gradient taken on the corrupted run)

summed over the cell's slice (and over prompts, since the metric is their mean). One clean forward,
one corrupted forward (run together as one batch) and one backward give every component.

Example::

    res = attribution_patching(model, clean, corrupted, answers=(" Mary", " John"),
                               components=("resid_pre", "attn_out", "mlp_out", "z"))
    res["z"].effect          # [layer, pos, head] estimated change of the logit difference
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from _core.autograd import differentiates
from hooks import InputError
from hooks.model import takes_model

from .components import Component, get_component
from .engine import FINAL, EngineStats, PairInputs, _capture, _Captured, prepare_pair, unembed_normalized
from .heads import group_size
from .metrics import Metric, resolve_metric
from .patching import PatchingResult, _check_indices, _metric_name, patch_axes
from .results import AnalysisResult, jsonable

if TYPE_CHECKING:
    from hooks.model import HookedLlama


@contextlib.contextmanager
def frozen_parameters(model: HookedLlama):
    """Parameters stop requiring gradients inside the block (activations still get them), restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _reduce(comp: Component, prod: torch.Tensor, per_position: bool) -> torch.Tensor:
    """Sum a [B, ...] product over everything but position (if per_position) and unit: [P?, U?]."""
    keep = ([comp.pos_axis] if per_position else []) + ([comp.unit_axis] if comp.unit_axis is not None else [])
    out = prod
    for axis in sorted((a for a in range(prod.dim()) if a not in keep), reverse=True):
        out = out.sum(dim=axis)
    if per_position and comp.unit_axis is not None and comp.unit_axis < comp.pos_axis:
        out = out.T  # pattern: [head, query] -> [query, head]
    return out


def clean_and_corrupted_gradients(model: HookedLlama, inputs: PairInputs, names: list[str], metric):
    """One forward of the clean and corrupted prompts together and one backward of the corrupted metric.

    Returns ``(clean_value, corrupted_value, clean_acts, corrupted_acts, corrupted_grads)``, the dicts
    keyed by hook name. Built-in metrics unembed only their position (the forward ends at the final
    norm); other callables get the full corrupted logits [B, P, V].
    """
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    B = inputs.batch

    def save_act(t, hook):
        acts[hook.name] = t.detach()

    def save_grad(g, hook):
        grads[hook.name] = g.detach()

    def leaf(t, hook):  # the residual stream becomes a leaf that needs gradients
        return t.detach().requires_grad_(True)

    tokens = torch.cat([inputs.clean, inputs.corrupted])
    mask = inputs.mask.repeat(2, 1) if inputs.mask is not None else None
    fwd = [("hook_embed", leaf)] + [(n, save_act) for n in names]
    if isinstance(metric, Metric):
        fwd.append((FINAL, _capture))
    with frozen_parameters(model), torch.enable_grad():
        with model.hooks(fwd_hooks=fwd, bwd_hooks=[(n, save_grad) for n in names]):
            if isinstance(metric, Metric):
                try:
                    model(tokens, attention_mask=mask)
                except _Captured as cap:
                    normalized = cap.tensor[:, [metric.pos % inputs.n_pos]]
                logits_at = unembed_normalized(model, normalized)[:, 0]  # [2B, V]
                clean_value = metric.score(logits_at[:B]).float().mean()
                value = metric.score(logits_at[B:]).float().mean()
            else:
                logits = model(tokens, attention_mask=mask)
                clean_value = torch.as_tensor(metric(logits[:B]))
                value = torch.as_tensor(metric(logits[B:]))
            if value.dim() != 0:
                raise InputError(f"the metric must return a scalar, got shape {tuple(value.shape)}")
            value.backward()
    clean_acts = {n: t[:B] for n, t in acts.items()}
    corr_acts = {n: t[B:] for n, t in acts.items()}
    corr_grads = {n: (grads[n][B:] if n in grads else torch.zeros_like(corr_acts[n])) for n in names}
    return float(clean_value.detach()), float(value.detach()), clean_acts, corr_acts, corr_grads


def _clean_logits(model: HookedLlama, inputs: PairInputs) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs.clean, attention_mask=inputs.mask)


@dataclass
class AttributionResults(AnalysisResult):
    """Attribution patching of several components: ``res["z"]`` is a ``PatchingResult`` (method "attribution")."""

    results: dict[str, PatchingResult]

    title = "attribution patching"

    def __getitem__(self, name: str) -> PatchingResult:
        return self.results[get_component(name).name]

    def __iter__(self):
        return iter(self.results)

    def rows(self) -> list[dict]:
        return [{"component": name, **row} for name, res in self.results.items() for row in res.rows()]

    def top_rows(self, n: int = 10) -> list[dict]:
        return sorted(self.rows(), key=lambda r: -abs(r["effect"]))[:n]

    def to_dict(self) -> dict:
        return jsonable({name: res.to_dict() for name, res in self.results.items()})

    def figure(self, component: str | None = None, **kwargs):
        """The heatmap of one component (default: the first)."""
        name = get_component(component).name if component else next(iter(self.results))
        return self.results[name].figure(**kwargs)


@takes_model
@differentiates  # works under torch.no_grad() and torch.inference_mode()
def attribution_patching(
    model: HookedLlama,
    clean,
    corrupted,
    metric: Metric | str | None = None,
    *,
    answers=None,
    components: str | Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z"),
    per_position: bool = True,
    layers: Sequence[int] | None = None,
    attention_mask=None,
) -> AttributionResults:
    """Gradient × (clean − corrupted) estimates of activation patching for every cell of ``components``.

    Args:
        model, clean, corrupted, metric, answers: as in ``activation_patching``.
        components: one name or several (``resid_pre``, ``z``, ``pattern``, ``neurons`` …).
        per_position: one value per position (else summed over positions: every position patched at once).
        layers: restrict to these layers (default: all).

    Returns:
        ``AttributionResults``; ``res[name]`` is a ``PatchingResult`` whose ``effect`` is the attribution and
        whose ``values`` are ``corrupted_value + attribution`` (comparable with activation patching).

    Example::

        res = attribution_patching(model, clean, corrupted, answers=(" Mary", " John"))
        res["resid_pre"].effect.shape     # [30, 14]
    """
    comps = [get_component(c) for c in ([components] if isinstance(components, str) else components)]
    if not comps:
        raise InputError("components is empty; name at least one (e.g. 'resid_pre')")
    inputs = prepare_pair(model, clean, corrupted, attention_mask)
    layers = list(range(model.n_layers)) if layers is None else _check_indices(layers, model.n_layers, "layer")
    names = sorted({c.hook_name(layer) for c in comps for layer in layers})
    metric = resolve_metric(model, metric, answers, None if metric != "kl" else _clean_logits(model, inputs))
    clean_value, corr_value, clean_acts, acts, grads = clean_and_corrupted_gradients(model, inputs, names, metric)
    results = {}
    for comp in comps:
        per_layer = []
        for layer in layers:
            name = comp.hook_name(layer)
            delta = clean_acts[name].float() - acts[name].float()
            per_layer.append(_reduce(comp, delta * grads[name].float(), per_position))
        attr = torch.stack(per_layer)  # [layer, P?, U?]
        positions = list(range(inputs.n_pos)) if per_position else None
        units = list(range(comp.n_units(model))) if comp.unit else None
        results[comp.name] = PatchingResult(
            component=comp.name,
            method="attribution",
            metric_name=_metric_name(metric),
            values=(corr_value + attr).cpu(),
            axes=patch_axes(comp, per_position),
            layers=layers,
            positions=positions,
            units=units,
            unit_kind=comp.unit,
            clean_value=clean_value,
            corrupted_value=corr_value,
            str_tokens=inputs.str_tokens,
            group_size=group_size(model),
            stats=EngineStats(n_forward_calls=2),
        )
    return AttributionResults(results)
