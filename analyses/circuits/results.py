"""Result objects of edge analyses: ``EdgeScores`` (a score per edge), ``Circuit`` (a set of edges, with
the model run as the circuit) and ``FaithfulnessCurve``.

Example::

    scores = edge_attribution(model, clean, corrupted, answers=(" Mary", " John"), method="eap-ig")
    circuit = scores.circuit(top_n=300)
    circuit.figure()                        # the circuit as a graph, layer by layer
    with circuit.applied(model, ablation="mean", reference=prompts):
        model.generate("When Mary and John went to the store, John gave a drink to")
    curve = scores.faithfulness(model)      # MIB's sizes, CPR and CMD
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hooks import InputError

from ..results import AnalysisResult, jsonable
from .graph import EdgeGraph
from .patching import (
    CircuitSetup,
    EdgeHooks,
    circuit_setup,
    mean_source_outputs,
    run_masks,
    source_names,
    source_outputs,
)
from .selection import MIB_FRACTIONS, above, areas, circuit_sizes, greedy, prune_dangling, top_n

if TYPE_CHECKING:
    from hooks.model import HookedLlama

CIRCUIT_FORMAT = "llama-scalpel-circuit"


def _setup_from(model: HookedLlama, setup: CircuitSetup | None, kw: dict) -> CircuitSetup:
    if kw.get("clean") is not None:
        return circuit_setup(model, **kw)
    if setup is None:
        raise InputError("pass the prompts (clean=, corrupted= …) to evaluate on", param="clean")
    return setup


# --------------------------------------------------------------------------- edge scores
@dataclass
class EdgeScores(AnalysisResult):
    """A score per edge of ``graph`` (``scores`` [E], in ``graph.edges`` order) and how it was obtained.

    ``clean_value`` is the metric of the clean run, ``ablated_value`` with every edge patched.
    ``.circuit(top_n=… | threshold=… | greedy=…)`` selects a ``Circuit``; ``.faithfulness(model)`` the
    curve over MIB's circuit sizes, on the prompts the scores came from.
    """

    graph: EdgeGraph
    scores: torch.Tensor
    method: str
    metric_name: str
    clean_value: float
    ablated_value: float
    ablation: str
    params: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    setup: CircuitSetup | None = field(default=None, repr=False)

    @property
    def title(self) -> str:
        return f"{self.method} edge scores ({self.metric_name})"

    def matrix(self) -> torch.Tensor:
        """[n_sources, n_receivers] scores (NaN off the valid edges)."""
        out = torch.full(tuple(self.graph.valid.shape), float("nan"))
        out[self.graph.edges[:, 0], self.graph.edges[:, 1]] = self.scores.float()
        return out

    def rows(self) -> list[dict]:
        names = self.graph.edge_names()
        return [{"edge": n, "score": float(s)} for n, s in zip(names, self.scores.tolist())]

    def top_rows(self, n: int = 10) -> list[dict]:
        order = torch.argsort(self.scores.float().nan_to_num(0).abs(), descending=True)[:n]
        return [{"edge": self.graph.edge_name(int(i)), "score": float(self.scores[i])} for i in order]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "method": self.method,
                "metric": self.metric_name,
                "ablation": self.ablation,
                "clean_value": self.clean_value,
                "ablated_value": self.ablated_value,
                "params": self.params,
                "graph": self.graph.to_dict(),
                "edges": self.graph.edge_names(),
                "scores": self.scores,
                "stats": self.stats,
            }
        )

    def figure(self, n: int = 30):
        """The ``n`` edges of largest |score| as horizontal bars."""
        import plotly.graph_objects as go

        rows = self.top_rows(n)[::-1]
        fig = go.Figure(
            go.Bar(
                x=[r["score"] for r in rows],
                y=[r["edge"] for r in rows],
                orientation="h",
                marker_color=["#c0392b" if r["score"] < 0 else "#2471a3" for r in rows],
            )
        )
        fig.update_layout(
            title=f"{self.title}: top {len(rows)} of {self.graph.n_edges} edges",
            xaxis_title="estimated change of the metric when the edge is patched",
            height=max(300, 18 * len(rows) + 120),
        )
        return fig

    def circuit(
        self,
        *,
        top_n: int | None = None,
        threshold: float | None = None,
        greedy: int | None = None,
        absolute: bool = True,
        prune: bool = False,
    ) -> "Circuit":
        """The circuit of the ``top_n`` edges, the edges scoring at least ``threshold``, or ``greedy`` edges
        grown from the logits (exactly one of them); by |score| unless ``absolute=False``. ``prune=True``:
        then without its dangling edges (``selection.prune_dangling``, as MIB counts a circuit's edges)."""
        given = [k for k, v in (("top_n", top_n), ("threshold", threshold), ("greedy", greedy)) if v is not None]
        if len(given) != 1:
            raise InputError("pass exactly one of top_n=, threshold= or greedy= to select a circuit", param="top_n")
        if top_n is not None:
            keep = top_n_fn(self.scores, top_n, absolute)
        elif threshold is not None:
            keep = above(self.scores, threshold, absolute)
        else:
            keep = greedy_fn(self.graph, self.scores, greedy, absolute)
        if prune:
            keep = prune_dangling(self.graph, keep)
        return Circuit(
            self.graph,
            keep,
            scores=self.scores,
            selection={
                "by": given[0],
                "value": top_n if top_n is not None else threshold if threshold is not None else greedy,
                "absolute": absolute,
                "pruned": bool(prune),
                "method": self.method,
                "metric": self.metric_name,
            },
            setup=self.setup,
        )

    def faithfulness(
        self, model: HookedLlama, fractions=MIB_FRACTIONS, *, selection: str = "top_n", absolute: bool = True, **kw
    ):
        """``faithfulness_curve`` of these scores on the prompts they came from (or on ``clean=`` … given)."""
        return faithfulness_curve(
            model, self, fractions, selection=selection, absolute=absolute, setup=self.setup, **kw
        )


top_n_fn, greedy_fn = top_n, greedy


# --------------------------------------------------------------------------- circuits
@dataclass
class Circuit(AnalysisResult):
    """A set of edges (``edges`` [E] bool over ``graph.edges``) kept while every other edge is patched.

    ``nodes()`` lists the heads and MLPs with an edge in the circuit; ``to_dict()`` / ``Circuit.from_dict``
    round-trip it through JSON; ``applied(model, …)`` runs the model as the circuit; ``evaluate`` reads
    the metric on prompts. ``surgery.circuit_edits`` turns a node-level circuit into weight edits.
    """

    graph: EdgeGraph
    edges: torch.Tensor
    scores: torch.Tensor | None = None
    selection: dict = field(default_factory=dict)
    setup: CircuitSetup | None = field(default=None, repr=False)

    title = "circuit"

    def __post_init__(self) -> None:
        self.edges = torch.as_tensor(self.edges).bool()
        if self.edges.shape != (self.graph.n_edges,):
            raise InputError(
                f"a circuit of this graph has {self.graph.n_edges} edge flags, got {tuple(self.edges.shape)}"
            )

    @classmethod
    def from_edges(cls, graph: EdgeGraph, edges) -> "Circuit":
        """A circuit from edge names (``"a3.h2->logits"``) or indices."""
        keep = torch.zeros(graph.n_edges, dtype=torch.bool)
        keep[graph.edge_indices(edges)] = True
        return cls(graph, keep, selection={"by": "edges"})

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    @property
    def mask(self) -> torch.Tensor:
        """[E] patch mask: 1 on every edge outside the circuit."""
        return (~self.edges).float()

    def edge_names(self) -> list[str]:
        return [self.graph.edge_name(int(i)) for i in torch.nonzero(self.edges)[:, 0]]

    def nodes(self) -> list[str]:
        """Heads, MLPs (and ``input``) with at least one outgoing edge in the circuit, in forward order."""
        used = sorted(set(self.graph.edges[self.edges, 0].tolist()))
        return [self.graph.sources[i].name for i in used]

    def node_level(self) -> "Circuit":
        """The node-level circuit of the same nodes: every edge leaving a node of ``nodes()`` (and the
        embeddings) kept, every other edge patched; the form ``surgery.circuit_edits`` bakes into weights."""
        live = set(self.graph.edges[self.edges, 0].tolist()) | {0}
        keep = torch.tensor([int(s) in live for s in self.graph.edges[:, 0].tolist()])
        return Circuit(
            self.graph, keep, scores=self.scores, selection={**self.selection, "node_level": True}, setup=self.setup
        )

    def rows(self) -> list[dict]:
        idx = torch.nonzero(self.edges)[:, 0].tolist()
        rows = []
        for i in idx:
            s, r = self.graph.edges[i].tolist()
            row = {
                "edge": self.graph.edge_name(i),
                "source": self.graph.sources[s].name,
                "receiver": self.graph.receivers[r].name,
            }
            if self.scores is not None:
                row["score"] = float(self.scores[i])
            rows.append(row)
        return rows

    def top_rows(self, n: int = 10) -> list[dict]:
        rows = self.rows()
        if self.scores is not None:
            rows.sort(key=lambda r: -abs(r["score"]))
        return rows[:n]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "format": CIRCUIT_FORMAT,
                "graph": {k: v for k, v in self.graph.to_dict().items() if k in ("n_layers", "n_heads", "n_kv_heads")},
                "edges": self.edge_names(),
                "scores": None
                if self.scores is None
                else [float(self.scores[i]) for i in torch.nonzero(self.edges)[:, 0]],
                "nodes": self.nodes(),
                "selection": self.selection,
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "Circuit":
        if not isinstance(data, dict) or data.get("format") != CIRCUIT_FORMAT:
            raise InputError(f"not a circuit record (its format must be {CIRCUIT_FORMAT!r})", param="circuit")
        g = data["graph"]
        graph = EdgeGraph(int(g["n_layers"]), int(g["n_heads"]), int(g["n_kv_heads"]))
        circuit = cls.from_edges(graph, data["edges"])
        if data.get("scores") is not None:
            scores = torch.full((graph.n_edges,), float("nan"))
            scores[graph.edge_indices(data["edges"])] = torch.tensor(
                [float("nan") if v is None else v for v in data["scores"]]
            )
            circuit.scores = scores
        circuit.selection = dict(data.get("selection") or {})
        return circuit

    def check_model(self, model: HookedLlama) -> None:
        shape = (model.n_layers, model.n_heads, model.n_kv_heads)
        if shape != (self.graph.n_layers, self.graph.n_heads, self.graph.n_kv_heads):
            raise InputError(
                f"the circuit is of a model with {self.graph.n_layers} layers, {self.graph.n_heads} heads and "
                f"{self.graph.n_kv_heads} kv groups, not {shape[0]} / {shape[1]} / {shape[2]}; use it on that model",
                param="model",
            )

    # ------------------------------------------------------------------ running the model as the circuit
    def evaluate(self, model: HookedLlama, **kw) -> float:
        """The metric with every edge outside the circuit patched, on the prompts the scores came from or
        on ``clean=``, ``corrupted=``, ``answers=`` / ``metric=``, ``ablation=`` given as for ``edge_attribution``."""
        self.check_model(model)
        setup = _setup_from(model, self.setup, kw)
        return float(run_masks(model, setup, self.mask[None])[0])

    @contextlib.contextmanager
    def applied(self, model: HookedLlama, *, ablation: str = "mean", reference=None, corrupted=None):
        """Inside, every forward of ``model`` runs as the circuit: each edge outside it carries its source's
        patch value instead of its output. ``ablation="mean"`` (each source's mean output over the
        ``reference`` prompts, default: the scores' clean prompts) or ``"zero"`` work for any input,
        generation included; ``"patching"`` takes the values from ``corrupted`` prompts (texts, token ids, or
        ``(ids, attention_mask)``), and the inputs run inside must then have their shape."""
        self.check_model(model)
        if ablation == "mean":
            if reference is None:
                if self.setup is None:
                    raise InputError(
                        "ablation='mean' needs reference= prompts to take the means over", param="reference"
                    )
                patch = mean_source_outputs(model, self.setup.inputs.clean, self.setup.inputs.mask)
            else:
                patch = mean_source_outputs(model, reference)
        elif ablation == "zero":
            patch = torch.zeros(self.graph.n_sources, 1, 1, model.d_model, dtype=model.dtype, device=model.device)
        elif ablation == "patching":
            if corrupted is None:
                raise InputError("ablation='patching' needs corrupted= prompts", param="corrupted")
            if isinstance(corrupted, tuple):
                tokens, mask = corrupted
            elif isinstance(corrupted, torch.Tensor):
                tokens, mask = corrupted, None
            else:  # texts: tokenised (left-padded) as the clean prompts inside must be
                tokens, mask = model.tokenize(corrupted)
            with torch.no_grad():
                _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=source_names(model))
            patch = source_outputs(model, cache)
        else:
            raise InputError(f"ablation={ablation!r}; use 'mean', 'zero' or 'patching'", param="ablation")
        matrix = self.graph.mask_matrix(self.mask.to(model.dtype))[None].to(model.device)
        hooks = EdgeHooks(model, self.graph, matrix, patch.to(model.device))
        with model.hooks(fwd_hooks=hooks.hooks()):
            yield model

    # ------------------------------------------------------------------ the figure
    def figure(self, max_edges: int = 400):
        """The circuit as a graph: sources and receivers by layer (rows) and head (columns); edges coloured
        by the sign of their score and as wide as its magnitude."""
        import plotly.graph_objects as go

        g = self.graph
        H = g.n_heads
        idx = torch.nonzero(self.edges)[:, 0]
        if self.scores is not None and len(idx) > max_edges:
            idx = idx[torch.argsort(self.scores[idx].abs(), descending=True)[:max_edges]]

        def pos(kind: str, layer: int, index: int | None, receiver: bool) -> tuple[float, float]:
            if kind == "input":
                return H / 2, -1.0
            if kind == "logits":
                return H / 2, float(g.n_layers)
            if kind in ("head", "q"):
                return float(index), layer + (0.0 if not receiver else -0.25)
            if kind in ("k", "v"):
                rep = H // g.n_kv_heads
                return index * rep + (rep - 1) / 2 + (0.15 if kind == "v" else -0.15), layer - 0.25
            return H + 0.5, layer + 0.5 + (-0.2 if receiver else 0.0)  # mlp

        top = float(self.scores[idx].abs().max()) if self.scores is not None and len(idx) else 1.0
        traces = []
        for i in idx.tolist():
            s, r = g.edges[i].tolist()
            src, rec = g.sources[s], g.receivers[r]
            x0, y0 = pos(src.kind, src.layer, src.index, False)
            x1, y1 = pos(rec.kind, rec.layer, rec.index, True)
            score = float(self.scores[i]) if self.scores is not None else 1.0
            traces.append(
                go.Scatter(
                    x=[x0, x1],
                    y=[y0, y1],
                    mode="lines",
                    line=dict(width=0.5 + 4 * abs(score) / (top or 1.0), color="#c0392b" if score < 0 else "#2471a3"),
                    opacity=0.6,
                    hoverinfo="text",
                    text=f"{src.name}->{rec.name}: {score:.4g}",
                    showlegend=False,
                )
            )
        names = sorted({g.sources[s].name for s in g.edges[idx, 0].tolist()} | {"logits"})
        xs, ys = [], []
        for n in names:
            if n == "logits":
                x, y = pos("logits", g.n_layers, None, False)
            else:
                src = g.sources[g._src_index[n]]
                x, y = pos(src.kind, src.layer, src.index, False)
            xs.append(x)
            ys.append(y)
        traces.append(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers+text",
                text=names,
                textposition="top center",
                marker=dict(size=9, color="#222"),
                showlegend=False,
                hoverinfo="text",
            )
        )
        fig = go.Figure(traces)
        fig.update_layout(
            title=f"circuit: {self.n_edges} of {g.n_edges} edges ({len(names) - 1} nodes)",
            xaxis=dict(
                title="head (MLP on the right)",
                tickvals=list(range(H)) + [H + 0.5],
                ticktext=[f"H{h}" for h in range(H)] + ["MLP"],
            ),
            yaxis=dict(title="layer", autorange=True),
            height=max(400, 28 * (g.n_layers + 2)),
        )
        return fig


# --------------------------------------------------------------------------- faithfulness
@dataclass
class FaithfulnessCurve(AnalysisResult):
    """The normalised metric of circuits of growing size (MIB's faithfulness) and its areas.

    ``faithfulness[i] = (m(circuit_i) − m(∅)) / (m(model) − m(∅))`` with ``m(∅)`` every edge patched;
    ``cpr`` is the area under the curve over the fraction of edges kept and ``cmd`` the area between the
    curve and 1 (MIB's CPR, higher is better, and CMD, lower is better).
    """

    fractions: list[float]
    n_edges: list[int]
    values: list[float]
    faithfulness: list[float]
    clean_value: float
    ablated_value: float
    cpr: float
    cmd: float
    method: str = ""
    selection: str = "top_n"

    title = "faithfulness"

    def rows(self) -> list[dict]:
        return [
            {"fraction": f, "edges": n, "metric": v, "faithfulness": fa}
            for f, n, v, fa in zip(self.fractions, self.n_edges, self.values, self.faithfulness)
        ]

    def to_dict(self) -> dict:
        return jsonable(
            {
                **{
                    k: getattr(self, k)
                    for k in (
                        "fractions",
                        "n_edges",
                        "values",
                        "faithfulness",
                        "clean_value",
                        "ablated_value",
                        "cpr",
                        "cmd",
                        "method",
                        "selection",
                    )
                }
            }
        )

    def figure(self):
        import plotly.graph_objects as go

        fig = go.Figure(
            go.Scatter(
                x=self.fractions,
                y=self.faithfulness,
                mode="lines+markers",
                text=[f"{n} edges" for n in self.n_edges],
                name=self.method or "circuit",
            )
        )
        fig.add_hline(y=1.0, line_dash="dot", line_color="#888")
        fig.update_layout(
            title=f"faithfulness ({self.method}, {self.selection}): CPR {self.cpr:.3f}, CMD {self.cmd:.3f}",
            xaxis=dict(title="fraction of edges kept", type="log"),
            yaxis_title="(m(circuit) − m(∅)) / (m(model) − m(∅))",
        )
        return fig


def faithfulness_curve(
    model: HookedLlama,
    scores: EdgeScores,
    fractions=MIB_FRACTIONS,
    *,
    selection: str = "top_n",
    absolute: bool = True,
    log_x: bool = False,
    setup: CircuitSetup | None = None,
    max_batch: int | None = None,
    memory_budget_mb: float = 1024.0,
    **prompts: Any,
) -> FaithfulnessCurve:
    """Faithfulness of the circuits the scores select at each size (MIB's sizes by default), batched.

    ``selection``: "top_n" or "greedy"; ``prompts``: ``clean=``, ``corrupted=``, ``answers=`` … to evaluate on
    other prompts than the scores'.
    """
    if selection not in ("top_n", "greedy"):
        raise InputError(f"selection={selection!r}; use 'top_n' or 'greedy'", param="selection")
    setup = _setup_from(model, setup, prompts)
    graph = setup.graph
    sizes = circuit_sizes(graph.n_edges, fractions)
    pick = (
        (lambda n: top_n(scores.scores, n, absolute))
        if selection == "top_n"
        else (lambda n: greedy(graph, scores.scores, n, absolute))
    )
    masks = torch.stack([(~pick(n)).float() for n in sizes] + [torch.ones(graph.n_edges)])
    values = run_masks(model, setup, masks, max_batch=max_batch, memory_budget_mb=memory_budget_mb).tolist()
    empty = values.pop()
    clean = setup.clean_value
    denom = clean - empty
    faith = [float("nan") if denom == 0 else (v - empty) / denom for v in values]
    cpr, cmd = areas(list(fractions), faith, log_x)
    return FaithfulnessCurve(list(fractions), sizes, values, faith, clean, empty, cpr, cmd, scores.method, selection)
