"""Edit plans that ablate units: heads and neurons zeroed (or heads mean-ablated) and layers removed — what
``scalpel ablate`` builds from ``--heads``/``--neurons``/``--layers``, for notebooks too.

Example::

    plan = ablation_plan(model, heads="19.2,20.0", neurons=[(12, 405)], layers=[29])
    # EditPlan([ZeroHeads(19, [2]), ZeroHeads(20, [0]), ZeroNeurons(12, [405]), RemoveLayers([29])])
    analyses.measure_ablation(model, plan, prompts, "logit-diff")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from _core.errors import InputError, arg
from hooks.indices import check_indices, check_pairs, parse_heads, parse_layers, parse_neurons

from .edits import MeanAblateHeads, RemoveLayers, ZeroHeads, ZeroNeurons
from .plan import EditPlan

if TYPE_CHECKING:
    from hooks import HookedLlama


def ablation_plan(
    model: HookedLlama,
    heads: Any = (),
    neurons: Any = (),
    layers: Any = (),
    *,
    mean: bool = False,
    texts: Sequence[str] | None = None,
) -> EditPlan:
    """An ``EditPlan`` zeroing ``heads`` (``"19.2,20.0"``, ``[(19, 2)]`` …), zeroing ``neurons``
    (``"12:405"`` or pairs) and removing ``layers`` (``"3,10-12"``, ints); every index is checked against
    ``model`` first. Heads and neurons come first and layer removal last, so every layer number refers to
    the unedited model. ``mean=True`` replaces the heads' outputs by their mean over ``texts`` instead."""
    heads = check_pairs(model, "head", parse_heads(heads), param="heads") if _given(heads) else []
    neurons = check_pairs(model, "neuron", parse_neurons(neurons), param="neurons") if _given(neurons) else []
    layers = check_indices(model, "layer", parse_layers(layers), param="layers") if _given(layers) else []
    if not (heads or neurons or layers):
        raise InputError(
            f"nothing to ablate: name {arg('heads')}, {arg('neurons')} and/or {arg('layers')}", param="heads"
        )
    if mean and not heads:
        raise InputError(f"{arg('mean', True)} applies to heads; name {arg('heads')} or leave it out", param="mean")
    if mean and not texts:
        raise InputError(f"{arg('mean', True)} needs {arg('texts')} to average the heads' outputs over", param="texts")
    edits: list[Any] = []
    for layer, hs in _by_layer(heads):
        edits.append(MeanAblateHeads.compute(model, layer, hs, list(texts or [])) if mean else ZeroHeads(layer, hs))
    for layer, ns in _by_layer(neurons):
        edits.append(ZeroNeurons(layer, ns))
    if layers:
        edits.append(RemoveLayers(sorted(layers)))
    return EditPlan(edits)


def _given(spec: Any) -> bool:
    return spec is not None and not (isinstance(spec, (list, tuple, str)) and not spec)


def _by_layer(pairs: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    grouped: dict[int, list[int]] = {}
    for layer, index in pairs:
        grouped.setdefault(layer, []).append(index)
    return sorted(grouped.items())
