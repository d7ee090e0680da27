"""Choosing a circuit from edge scores: the top n, a threshold, or EAP-IG's greedy growth from the logits,
and the faithfulness curve with the areas MIB reports.

- ``top_n(scores, n)`` / ``above(scores, t)``: the ``n`` edges of largest |score| / every edge with
  |score| ≥ t (``absolute=False``: the signed score, largest first).
- ``greedy(graph, scores, n)``: start from the logits; repeatedly add the best-scoring edge whose
  receiver belongs to a node already in the circuit (the logits, or a head / MLP one of whose inputs is
  reached), so the circuit stays connected to the output (EAP-IG's ``apply_greedy``).
- ``prune_dangling(graph, keep)``: the circuit without edges whose source is not reached from the
  embeddings, or whose receiver's node does not reach the logits, through the circuit's own edges (MIB
  removes them before counting edges).
- Faithfulness of a circuit ``C`` (MIB): ``(m(C) − m(∅)) / (m(model) − m(∅))`` where ``m(∅)`` patches every
  edge. Over circuit sizes of 0.1 %, 0.2 %, 0.5 %, 1 %, 2 %, 5 %, 10 %, 20 %, 50 % and 100 % of the
  edges, the area under the curve (CPR, higher is better) and the area between the curve and 1 (CMD,
  lower is better) by the trapezoid rule over the fraction of edges kept (``log_x=True``: over its log).
"""

from __future__ import annotations

import heapq
import math

import torch

from hooks import InputError

from .graph import EdgeGraph

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _key(scores: torch.Tensor, absolute: bool) -> torch.Tensor:
    s = scores.float().nan_to_num(float("-inf") if not absolute else 0.0)
    return s.abs() if absolute else s


def top_n(scores: torch.Tensor, n: int, absolute: bool = True) -> torch.Tensor:
    """[E] bool: the ``n`` edges with the largest (absolute) scores (ties broken by edge order)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"top_n={n!r}; pass a number of edges >= 0", param="top_n")
    keep = torch.zeros(len(scores), dtype=torch.bool)
    n = min(n, len(scores))
    if n:
        order = torch.argsort(_key(scores, absolute), descending=True, stable=True)
        keep[order[:n]] = True
    return keep


def above(scores: torch.Tensor, threshold: float, absolute: bool = True) -> torch.Tensor:
    """[E] bool: the edges whose (absolute) score is at least ``threshold``."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold):
        raise InputError(f"threshold={threshold!r}; pass a number", param="threshold")
    return _key(scores, absolute) >= threshold


def node_receivers(graph: EdgeGraph, source: int) -> list[int]:
    """The receivers through which a source node reads the residual stream (none for the embeddings)."""
    s = graph.sources[source]
    if s.kind == "head":
        g = s.index // (graph.n_heads // graph.n_kv_heads)
        return [
            graph.receiver_slice(s.layer, "q").start + s.index,
            graph.receiver_slice(s.layer, "k").start + g,
            graph.receiver_slice(s.layer, "v").start + g,
        ]
    if s.kind == "mlp":
        return [graph.receiver_slice(s.layer, "mlp").start]
    return []


def greedy(graph: EdgeGraph, scores: torch.Tensor, n: int, absolute: bool = True) -> torch.Tensor:
    """[E] bool: ``n`` edges grown from the logits, each the best edge into the circuit so far."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"greedy={n!r}; pass a number of edges >= 0", param="greedy")
    key = _key(scores, absolute).tolist()
    by_receiver: dict[int, list[int]] = {}
    for e, r in enumerate(graph.edges[:, 1].tolist()):
        by_receiver.setdefault(r, []).append(e)
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    heap: list[tuple[float, int]] = []
    reached: set[int] = set()

    def open_receiver(r: int) -> None:
        if r not in reached:
            reached.add(r)
            for e in by_receiver.get(r, []):
                heapq.heappush(heap, (-key[e], e))

    open_receiver(graph.n_receivers - 1)
    added = 0
    while heap and added < n:
        _, e = heapq.heappop(heap)
        if keep[e]:
            continue
        keep[e] = True
        added += 1
        for r in node_receivers(graph, int(graph.edges[e, 0])):
            open_receiver(r)
    return keep


def prune_dangling(graph: EdgeGraph, keep: torch.Tensor) -> torch.Tensor:
    """[E] bool: ``keep`` without its dangling edges, as MIB removes them before counting a circuit's edges.

    An edge ``s -> r`` stays when its source is reached from the embeddings and the node ``r`` belongs to
    (a head through its q or its group's k/v, an MLP, the logits) reaches the logits, both through edges of
    the circuit. A dropped edge whose node does not reach the logits changes nothing; one whose source is
    not reached carries that source's output on fully patched inputs, which under ``"patching"`` is its
    patch value (nothing changes) and under a mean or zero ablation is close to it.
    """
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != (graph.n_edges,):
        raise InputError(f"pass the circuit as an [{graph.n_edges}] bool edge mask", param="keep")
    S, R = graph.n_sources, graph.n_receivers
    kept = graph.mask_matrix(keep)  # [S, R] bool
    reads = [node_receivers(graph, s) for s in range(S)]  # each node's receivers
    owners: list[list[int]] = [[] for _ in range(R)]  # each receiver's nodes (a k/v group feeds several heads)
    for s, rs in enumerate(reads):
        for r in rs:
            owners[r].append(s)
    # reached from the embeddings: sources in forward order (every edge goes from an earlier source)
    reached = torch.zeros(S, dtype=torch.bool)
    reached[0] = True
    for s in range(1, S):
        reached[s] = bool(kept[:, reads[s]][reached].any())
    # reaching the logits: receivers from the last back (a node's edges lead to later receivers only)
    feeds = torch.zeros(R, dtype=torch.bool)
    feeds[R - 1] = True
    alive = torch.zeros(S, dtype=torch.bool)
    for s in range(S - 1, -1, -1):
        alive[s] = bool((kept[s] & feeds).any())
        for r in reads[s]:
            if alive[s]:
                feeds[r] = True
    return keep & graph.edge_vector((reached[:, None] & feeds[None, :]))


def circuit_sizes(n_edges: int, fractions=MIB_FRACTIONS) -> list[int]:
    """Edge counts of MIB's circuit sizes (``int(fraction × edges)``, as MIB counts them)."""
    fr = list(fractions)
    if not fr or any(not 0 <= f <= 1 for f in fr) or fr != sorted(fr):
        raise InputError(f"fractions={fractions!r}; pass increasing fractions of edges in [0, 1]", param="fractions")
    return [int(f * n_edges) for f in fr]


def areas(fractions, faithfulness, log_x: bool = False) -> tuple[float, float]:
    """(CPR, CMD): trapezoid areas under the faithfulness curve and between it and 1."""
    under = from_one = 0.0
    xs = [math.log(f) if log_x else f for f in fractions]
    for i in range(len(xs) - 1):
        w = xs[i + 1] - xs[i]
        under += w * (faithfulness[i] + faithfulness[i + 1]) / 2
        from_one += w * (abs(1 - faithfulness[i]) + abs(1 - faithfulness[i + 1])) / 2
    return under, from_one
