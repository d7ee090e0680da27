"""Entry points of edge-level circuit discovery: ``edge_attribution`` (EAP, EAP-IG, exact) and ``acdc``.

Convention (auto-circuit's and EAP-IG's): the base run is the *clean* prompt; a patched edge carries its
source's value from the *corrupted* prompt (``ablation="patching"``), its mean over reference prompts
(``"mean"``) or zero (``"zero"``). Scores estimate how the metric moves when an edge is patched, so an
edge that carries the behaviour has a score of the sign opposite to ``clean − ablated``.

Example::

    from analyses.circuits import edge_attribution
    scores = edge_attribution(model, clean, corrupted, answers=(" Mary", " John"), method="eap-ig", steps=10)
    scores.top_rows(5)
    circuit = scores.circuit(top_n=200)
    circuit.evaluate(model)               # the logit difference with every other edge patched
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from _core.autograd import differentiates
from hooks import InputError
from hooks.model import takes_model

from ..metrics import Metric
from .patching import ablated_value, circuit_setup
from .results import Circuit, EdgeScores
from .scores import METHODS, check_ig, eap_ig_scores, eap_scores, exact_scores
from .scores import acdc as _acdc

if TYPE_CHECKING:
    from hooks.model import HookedLlama


def _metric_name(metric) -> str:
    return metric.name if isinstance(metric, Metric) else getattr(metric, "__name__", "metric")


@takes_model
@differentiates  # works under torch.no_grad() and torch.inference_mode()
def edge_attribution(
    model: HookedLlama,
    clean,
    corrupted=None,
    metric=None,
    *,
    answers=None,
    method: str = "eap",
    steps: int = 30,
    path: str = "inputs",
    ablation: str = "patching",
    reference=None,
    edges=None,
    attention_mask=None,
    max_batch: int | None = None,
    memory_budget_mb: float = 1024.0,
) -> EdgeScores:
    """A score for every edge of the model's edge graph (``analyses.circuits.graph``).

    Args:
        model: a ``HookedLlama``.
        clean, corrupted: prompts (str, list of str) or token ids [B, P] of the same shape.
        metric, answers: as ``activation_patching`` takes them (a ``Metric``, a callable on logits,
            "logit_diff", "target_prob", "kl"; ``answers=(correct, incorrect)``).
        method: "eap", "eap-ig" or "exact" (each edge patched alone, batched).
        steps, path: EAP-IG's integration steps and path ("inputs": interpolated embeddings, as EAP-IG
            and MIB; "edges": every edge's mask interpolated, as auto-circuit's mask gradients).
        ablation: "patching" (from ``corrupted``), "mean" (over ``reference`` prompts, default the clean
            ones) or "zero".
        edges: for method="exact", the edges to patch (names or indices; default all); others are NaN.
        max_batch, memory_budget_mb: most masks per forward and the memory estimate per forward (exact).

    Returns:
        ``EdgeScores``.
    """
    if method not in METHODS:
        raise InputError(f"method={method!r}; use one of {', '.join(METHODS)}", param="method")
    if method == "eap-ig":
        check_ig(steps, path, ablation)
    setup = circuit_setup(
        model,
        clean,
        corrupted,
        metric=metric,
        answers=answers,
        ablation=ablation,
        reference=reference,
        attention_mask=attention_mask,
    )
    chosen = setup.graph.edge_indices(edges) if edges is not None else None
    if chosen is not None and method != "exact":
        raise InputError("edges= picks the edges of method='exact'; the other methods score every edge", param="edges")
    t0 = time.perf_counter()
    params: dict = {}
    if method == "eap":
        scores = eap_scores(model, setup)
    elif method == "eap-ig":
        scores = eap_ig_scores(model, setup, steps=steps, path=path)
        params = {"steps": steps, "path": path}
    else:
        scores = exact_scores(model, setup, chosen, max_batch=max_batch, memory_budget_mb=memory_budget_mb)
    seconds = time.perf_counter() - t0
    ablated = ablated_value(model, setup, memory_budget_mb=memory_budget_mb)
    return EdgeScores(
        graph=setup.graph,
        scores=scores.detach().float().cpu(),
        method=method,
        metric_name=_metric_name(setup.metric),
        clean_value=setup.clean_value,
        ablated_value=ablated,
        ablation=ablation,
        params=params,
        stats={
            "seconds": seconds,
            "n_prompts": setup.inputs.batch,
            "n_positions": setup.inputs.n_pos,
            "forward_calls": setup.stats["forward_calls"],
        },
        setup=setup,
    )


@takes_model
def acdc(
    model: HookedLlama,
    clean,
    corrupted=None,
    metric=None,
    *,
    threshold: float,
    answers=None,
    ablation: str = "patching",
    reference=None,
    attention_mask=None,
    max_batch: int = 64,
    memory_budget_mb: float = 1024.0,
) -> Circuit:
    """ACDC-style greedy pruning: the circuit left after patching, receiver by receiver from the logits
    back, every edge whose patching damages the metric by less than ``threshold`` (in the metric's units;
    for KL, its increase). ``circuit.scores`` holds each edge's damage when it was tried.

    Exact (each decision is a real forward), batched speculatively: see ``scores.acdc``.
    """
    setup = circuit_setup(
        model,
        clean,
        corrupted,
        metric=metric,
        answers=answers,
        ablation=ablation,
        reference=reference,
        attention_mask=attention_mask,
    )
    kept, damage = _acdc(model, setup, threshold, max_batch=max_batch, memory_budget_mb=memory_budget_mb)
    return Circuit(
        setup.graph,
        kept,
        scores=damage,
        selection={"by": "acdc", "value": threshold, "metric": _metric_name(setup.metric)},
        setup=setup,
    )
