"""Activation patching: run the corrupted prompt with one clean activation patched in, for every
(layer, position, head / neuron) of a component, and measure how much of the clean behaviour returns.

``activation_patching`` is the entry point; ``PatchingResult`` (shared with attribution and path
patching) holds the metric per cell plus the clean and corrupted baselines.

Example::

    from analyses import activation_patching
    res = activation_patching(model, "When Mary and John went to the store, John gave a drink to",
                              "When Mary and John went to the store, Mary gave a drink to",
                              answers=(" Mary", " John"), component="resid_pre")
    res.values.shape          # [30 layers, 14 positions]
    res.normalized            # (m - m_corrupted) / (m_clean - m_corrupted)
    res.figure().show()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from hooks import InputError
from hooks.indices import check_range
from hooks.model import takes_model

from .components import Component, get_component
from .engine import EngineStats, PairInputs, Variant, mark_variants, prepare_pair, run_setup, run_variants
from .heads import group_size
from .metrics import Metric, resolve_metric
from .metrics import normalized as _normalized
from .plotting import heatmap, position_labels
from .results import AnalysisResult, jsonable

if TYPE_CHECKING:
    from hooks.model import HookedLlama


@dataclass
class PatchingResult(AnalysisResult):
    """The metric after patching each cell of a component (activation, attribution or path patching).

    ``values`` is shaped by ``axes`` (e.g. ``("layer", "pos")``, ``("layer", "pos", "head")``,
    ``("layer", "head")``); ``layers`` / ``positions`` / ``units`` list the indices along each axis.
    ``effect = values - corrupted_value``; ``normalized`` is 0 at the corrupted run, 1 at the clean one.
    For attribution patching ``values`` holds the first-order estimate ``corrupted_value + attribution``.
    Heads: ``unit_kind`` is "head" (query head) or "kv_head" (key/value group); rows carry both.
    """

    component: str
    method: str  # "activation", "attribution" or "path"
    metric_name: str
    values: torch.Tensor
    axes: tuple[str, ...]
    layers: list[int]
    positions: list[int] | None
    units: list[int] | None
    unit_kind: str | None
    clean_value: float
    corrupted_value: float
    str_tokens: list[str] | None = None
    group_size: int = 1
    stats: EngineStats = field(default_factory=EngineStats)
    extra: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.method} patching of {self.component} ({self.metric_name})"

    @property
    def effect(self) -> torch.Tensor:
        """``values - corrupted_value``: the change the patch makes."""
        return self.values - self.corrupted_value

    @property
    def normalized(self) -> torch.Tensor:
        """``(values - corrupted) / (clean - corrupted)``."""
        return _normalized(self.values, self.clean_value, self.corrupted_value)

    def _index_lists(self) -> list[list[int]]:
        lists = {
            "layer": self.layers,
            "pos": self.positions,
            "head": self.units,
            "kv_head": self.units,
            "neuron": self.units,
        }
        return [lists[a] for a in self.axes]

    def rows(self) -> list[dict]:
        import itertools

        lists = self._index_lists()
        vals, eff, norm = self.values, self.effect, self.normalized
        out = []
        for idx in itertools.product(*(range(len(x)) for x in lists)):
            row = {}
            for axis, lst, i in zip(self.axes, lists, idx):
                row[axis] = lst[i]
                if axis == "pos" and self.str_tokens is not None:
                    row["token"] = self.str_tokens[lst[i]]
                if axis == "head":
                    row["kv_group"] = lst[i] // self.group_size
                if axis == "kv_head":
                    row["query_heads"] = list(range(lst[i] * self.group_size, (lst[i] + 1) * self.group_size))
            row.update(value=float(vals[idx]), effect=float(eff[idx]), normalized=float(norm[idx]))
            out.append(row)
        return out

    def top_rows(self, n: int = 10) -> list[dict]:
        """The ``n`` cells with the largest absolute effect."""
        return sorted(self.rows(), key=lambda r: -abs(r["effect"]))[:n]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "component": self.component,
                "method": self.method,
                "metric": self.metric_name,
                "axes": list(self.axes),
                "layers": self.layers,
                "positions": self.positions,
                "units": self.units,
                "unit_kind": self.unit_kind,
                "tokens": self.str_tokens,
                "values": self.values,
                "normalized": self.normalized,
                "clean_value": self.clean_value,
                "corrupted_value": self.corrupted_value,
                "stats": self.stats.to_dict(),
                **self.extra,
            }
        )

    def figure(self, normalize: bool = True, max_rows: int = 2000):
        """Heatmap: layers (× units) down, positions or units across; the normalised score by default."""
        use_norm = normalize and self.clean_value != self.corrupted_value
        z = self.normalized if use_norm else self.effect
        what = "normalised score" if use_norm else "effect on metric"
        unit_name = {"head": "H", "kv_head": "G", "neuron": "N"}.get(self.unit_kind or "", "")
        pos_labels = (
            position_labels(self.str_tokens, len(self.str_tokens or []), self.positions)
            if self.positions is not None
            else None
        )
        title = f"{self.title}: {what}"
        if self.axes == ("layer",):
            return heatmap(
                z[:, None],
                ["all positions"],
                [f"L{l}" for l in self.layers],
                title=title,
                y_title="layer",
                colorbar_title=what,
            )
        if self.axes == ("layer", "pos"):
            return heatmap(
                z,
                pos_labels,
                [f"L{l}" for l in self.layers],
                title=title,
                x_title="position",
                y_title="layer",
                colorbar_title=what,
            )
        if len(self.axes) == 2:  # layer × unit
            return heatmap(
                z,
                [f"{unit_name}{u}" for u in self.units],
                [f"L{l}" for l in self.layers],
                title=title,
                x_title=self.axes[1],
                y_title="layer",
                colorbar_title=what,
            )
        # layer × pos × unit: rows are (layer, unit), columns positions; keep the strongest rows
        flat = z.permute(0, 2, 1).reshape(-1, z.shape[1])  # [layer*unit, pos]
        labels = [f"L{l}{unit_name}{u}" for l in self.layers for u in self.units]
        if flat.shape[0] > max_rows:
            keep = flat.abs().nan_to_num(0).amax(1).topk(max_rows).indices.sort().values
            flat, labels = flat[keep], [labels[i] for i in keep.tolist()]
        return heatmap(
            flat, pos_labels, labels, title=title, x_title="position", y_title="layer, unit", colorbar_title=what
        )


def _check_indices(values, n: int, what: str) -> list[int]:
    """Indices 0..n-1 of ``what`` (negatives count from the end), through the one range check of each kind."""
    kind = {"kv head": "kv_group"}.get(what, what)
    param = {"layer": "layers", "position": "positions", "neuron": "neurons"}.get(what, "heads")
    return [check_range(kind, v, n, param=param, negative=True) for v in values]


def _units_for(model: HookedLlama, comp: Component, heads, neurons) -> list[int] | None:
    if comp.unit is None:
        return None
    n = comp.n_units(model)
    chosen = neurons if comp.unit == "neuron" else heads
    if chosen is None:
        return list(range(n))
    if isinstance(chosen, int):
        chosen = [chosen]
    return _check_indices(chosen, n, comp.unit.replace("_", " "))


def patch_axes(comp: Component, per_position: bool) -> tuple[str, ...]:
    """Result axes of a component sweep, e.g. ``("layer", "pos", "head")``."""
    axes = ("layer",) + (("pos",) if per_position else ())
    return axes + ((comp.unit,) if comp.unit is not None else ())


@takes_model
def activation_patching(
    model: HookedLlama,
    clean,
    corrupted,
    metric: Metric | str | None = None,
    *,
    answers=None,
    component: str | Component = "resid_pre",
    per_position: bool = True,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    attention_mask=None,
    max_batch: int | None = None,
    memory_budget_mb: float = 1024.0,
    reuse_prefix: bool = True,
    progress: bool = False,
) -> PatchingResult:
    """Patch clean activations into the corrupted run, one cell at a time, batched.

    Args:
        model: a ``HookedLlama``.
        clean, corrupted: prompts (str, list of str, chat messages) or token ids [B, P]; same shape.
        metric: a ``Metric`` (``analyses.metrics``), a callable ``logits [B, P, V] -> scalar`` (TransformerLens
            style), or ``"logit_diff"`` / ``"target_prob"`` / ``"kl"`` (KL to the clean run).
        answers: ``(correct, incorrect)`` single-token strings or ids for the named metrics.
        component: ``resid_pre|resid_mid|resid_post|attn_out|mlp_out|z|result|q|k|v|pattern|neurons``.
        per_position: patch each position separately (else every position at once).
        layers, positions, heads, neurons: restrict the sweep (default: all). ``heads`` are query heads
            for z/result/q/pattern and key/value groups for k/v.
        max_batch: most patched runs per forward; memory_budget_mb: estimated budget per forward.
        reuse_prefix: skip no-op patches and reuse the corrupted run before the first patched position
            (same numbers, faster); False recomputes every position.
        progress: show a progress bar over chunks.

    Returns:
        ``PatchingResult`` with ``values`` [layer, pos?, unit?].

    Example::

        res = activation_patching(model, clean, corrupted, answers=(" Mary", " John"), component="z")
        res.values.shape     # [30, 14, 9]
    """
    comp = get_component(component)
    inputs: PairInputs = prepare_pair(model, clean, corrupted, attention_mask)
    P = inputs.n_pos
    layers = list(range(model.n_layers)) if layers is None else _check_indices(layers, model.n_layers, "layer")
    if not layers:
        raise InputError("layers is empty; pass at least one layer")
    pos_list = (
        (list(range(P)) if positions is None else _check_indices(positions, P, "position")) if per_position else None
    )
    units = _units_for(model, comp, heads, neurons)
    setup = run_setup(model, comp, inputs, layers)
    metric = resolve_metric(model, metric, answers, setup.clean_logits)
    variants = [Variant(layer, p, u) for layer in layers for p in (pos_list or [None]) for u in (units or [None])]
    mark_variants(comp, setup, variants, metric, reuse_prefix)
    stats = EngineStats()
    values = run_variants(
        model,
        comp,
        setup,
        variants,
        metric,
        max_batch=max_batch,
        memory_budget_mb=memory_budget_mb,
        progress=progress,
        stats=stats,
    )
    shape = [len(layers)] + ([len(pos_list)] if per_position else []) + ([len(units)] if units is not None else [])
    clean_v, corr_v = _baselines(metric, setup.clean_logits, setup.corrupted_logits)
    return PatchingResult(
        component=comp.name,
        method="activation",
        metric_name=_metric_name(metric),
        values=values.reshape(shape),
        axes=patch_axes(comp, per_position),
        layers=layers,
        positions=pos_list,
        units=units,
        unit_kind=comp.unit,
        clean_value=clean_v,
        corrupted_value=corr_v,
        str_tokens=inputs.str_tokens,
        group_size=group_size(model),
        stats=stats,
    )


def _metric_name(metric) -> str:
    return metric.name if isinstance(metric, Metric) else getattr(metric, "__name__", "metric")


def _baselines(metric, clean_logits: torch.Tensor, corrupted_logits: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        return float(metric(clean_logits)), float(metric(corrupted_logits))
