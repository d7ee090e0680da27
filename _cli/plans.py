"""The edit plan behind ``scalpel ablate``: heads and neurons zeroed (or heads mean-ablated) and layers
removed, as ``surgery`` edits. The measurements are ``analyses.Scorer`` and ``analyses.ablation_sweep``.

Example::

    plan = build_plan(model, [(19, 2)], [], [], mean=False)   # EditPlan([ZeroHeads(19, [2])])
"""

from __future__ import annotations


def build_plan(model, heads, neurons, layers, *, mean: bool = False, texts: list[str] | None = None):
    """An ``EditPlan`` zeroing (or mean-ablating) ``heads``, zeroing ``neurons`` and removing ``layers``.

    Heads and neurons come first and layer removal last, so every layer number refers to the
    unedited model. ``mean=True`` replaces the heads' outputs by their mean over ``texts``.
    """
    import surgery

    edits = []
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads or []:
        by_layer.setdefault(layer, []).append(head)
    for layer, hs in sorted(by_layer.items()):
        edits.append(surgery.MeanAblateHeads.compute(model, layer, hs, texts) if mean else surgery.ZeroHeads(layer, hs))
    by_layer = {}
    for layer, n in neurons or []:
        by_layer.setdefault(layer, []).append(n)
    for layer, ns in sorted(by_layer.items()):
        edits.append(surgery.ZeroNeurons(layer, ns))
    if layers:
        edits.append(surgery.RemoveLayers(sorted(layers)))
    return surgery.EditPlan(edits)
