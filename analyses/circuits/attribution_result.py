"""The result of ``attribution_graph`` (``attribution_graph.py``): ``AttributionGraph`` — its nodes and
adjacency, influence on the logits and pruning (circuit-tracer's ``prune_graph``), a table, circuit-tracer's
graph JSON for its frontend, and a plotly view.

Pruning by influence: with ``Â`` the adjacency with rows normalised to absolute sums of one, a node's
influence on the logits is ``w (Â + Â² + …)`` (``w``: the logit probabilities); nodes up to
``node_threshold`` of the cumulative influence are kept, then edges up to ``edge_threshold`` of the
edge influence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from hooks import InputError

from ..results import AnalysisResult, jsonable


# --------------------------------------------------------------------------- influence
def normalized_abs(matrix: torch.Tensor) -> torch.Tensor:
    a = matrix.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(matrix: torch.Tensor, weights: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """``weights (Â + Â² + …)`` for a nilpotent (acyclic) row-normalised ``Â``."""
    a = normalized_abs(matrix)
    cur = weights @ a
    total = cur.clone()
    for _ in range(max_iter):
        if not bool(cur.any()):
            return total
        cur = cur @ a
        total += cur
    raise RuntimeError("influence did not converge: the adjacency has a cycle")


def _threshold(scores: torch.Tensor, keep: float) -> float:
    s = torch.sort(scores.flatten(), descending=True).values
    cum = torch.cumsum(s, 0) / s.sum().clamp(min=1e-30)
    i = min(int(torch.searchsorted(cum, torch.tensor(keep, dtype=cum.dtype))), len(s) - 1)
    return float(s[i])


# --------------------------------------------------------------------------- the result
@dataclass
class AttributionGraph(AnalysisResult):
    """An attribution graph (see the module docstring). ``adjacency`` [N, N] is indexed
    [target, source] over the nodes: ``n_features`` selected features, ``n_layers × n_pos`` error nodes
    (layer-major), ``n_pos`` tokens, ``len(logit_tokens)`` logits."""

    prompt: str
    tokens: torch.Tensor
    str_tokens: list[str]
    features: torch.Tensor  # [F, 3] (layer, pos, feature) of the selected features
    activations: torch.Tensor  # [F]
    adjacency: torch.Tensor
    logit_tokens: list[int]
    logit_strings: list[str]
    logit_probabilities: torch.Tensor
    n_layers: int
    n_active: int  # active features before selection
    pre_activations: torch.Tensor  # [F] each selected feature's encoder pre-activation (completeness checks)
    target_values: torch.Tensor  # [n_logits] logit − mean logit of each logit node
    scan: str = "llama-scalpel"
    stats: dict = field(default_factory=dict)

    title = "attribution graph"

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    def node_kind(self, i: int) -> str:
        f, e = self.n_features, self.n_features + self.n_layers * self.n_pos
        return "feature" if i < f else "error" if i < e else "token" if i < e + self.n_pos else "logit"

    def node_label(self, i: int) -> str:
        f, e = self.n_features, self.n_features + self.n_layers * self.n_pos
        if i < f:
            layer, pos, feat = self.features[i].tolist()
            return f"L{layer}F{feat}@{pos}"
        if i < e:
            layer, pos = divmod(i - f, self.n_pos)
            return f"err L{layer}@{pos}"
        if i < e + self.n_pos:
            pos = i - e
            return f"tok {self.str_tokens[pos]!r}@{pos}"
        j = i - e - self.n_pos
        return f"logit {self.logit_strings[j]!r}"

    def logit_weights(self) -> torch.Tensor:
        w = torch.zeros(self.n_nodes)
        w[-self.n_logits :] = self.logit_probabilities.float()
        return w

    def node_influence(self) -> torch.Tensor:
        return influence(self.adjacency.float(), self.logit_weights())

    def prune(
        self, node_threshold: float = 0.8, edge_threshold: float = 0.98
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(node mask [N], edge mask [N, N], cumulative influence [N]) as circuit-tracer's ``prune_graph``."""
        for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise InputError(f"{name}={v!r}; pass a fraction in [0, 1]", param=name)
        A, w = self.adjacency.float(), self.logit_weights()
        n_keep_always = self.n_logits + self.n_pos
        node_inf = influence(A, w)
        nodes = node_inf >= _threshold(node_inf, node_threshold)
        nodes[-n_keep_always:] = True
        pruned = A.clone()
        pruned[~nodes] = 0
        pruned[:, ~nodes] = 0
        a = normalized_abs(pruned)
        edge_inf = a * (influence(pruned, w) + w)[:, None]
        edges = edge_inf >= _threshold(edge_inf, edge_threshold)
        f_end = self.n_nodes - n_keep_always
        old = nodes.clone()
        while True:
            nodes[:f_end] &= edges[:, :f_end].any(0)  # features and errors need an outgoing edge
            nodes[: self.n_features] &= edges[: self.n_features].any(1)  # features need an incoming edge
            if torch.equal(nodes, old):
                break
            old = nodes.clone()
            edges[~nodes] = False
            edges[:, ~nodes] = False
        order = torch.argsort(node_inf, descending=True)
        cum = torch.zeros_like(node_inf)
        cum[order] = torch.cumsum(node_inf[order], 0) / node_inf.sum().clamp(min=1e-30)
        return nodes, edges, cum

    # ------------------------------------------------------------------ tables and files
    def rows(self) -> list[dict]:
        idx = torch.nonzero(self.adjacency)
        return [
            {
                "target": self.node_label(int(t)),
                "source": self.node_label(int(s)),
                "weight": float(self.adjacency[t, s]),
            }
            for t, s in idx.tolist()
        ]

    def top_rows(self, n: int = 10) -> list[dict]:
        """The strongest direct effects on the top logit."""
        row = self.adjacency[self.n_nodes - self.n_logits]
        order = torch.argsort(row.abs(), descending=True)[:n]
        top = self.n_nodes - self.n_logits
        return [
            {"target": self.node_label(top), "source": self.node_label(int(s)), "weight": float(row[s])} for s in order
        ]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "prompt": self.prompt,
                "tokens": self.tokens,
                "features": self.features,
                "activations": self.activations,
                "logit_tokens": self.logit_tokens,
                "logit_probabilities": self.logit_probabilities,
                "adjacency": self.adjacency,
                "n_layers": self.n_layers,
                "stats": self.stats,
            }
        )

    def to_circuit_tracer(self, slug: str = "graph", node_threshold: float = 0.8, edge_threshold: float = 0.98) -> dict:
        """circuit-tracer's graph file (``metadata``, ``qParams``, ``nodes``, ``links``) of the pruned graph,
        as its ``create_graph_files`` writes it for its frontend."""
        nodes, edges, cum = self.prune(node_threshold, edge_threshold)
        f, e = self.n_features, self.n_features + self.n_layers * self.n_pos
        made: dict[int, dict] = {}
        for i in torch.nonzero(nodes)[:, 0].tolist():
            infl = float(cum[i])
            if i < f:
                layer, pos, feat = self.features[i].tolist()
                made[i] = {
                    "node_id": f"{layer}_{feat}_{pos}",
                    "feature": (layer + feat) * (layer + feat + 1) // 2 + feat,
                    "layer": str(layer),
                    "ctx_idx": pos,
                    "feature_type": "cross layer transcoder",
                    "jsNodeId": f"{layer}_{feat}-0",
                    "influence": infl,
                    "activation": float(self.activations[i]),
                }
            elif i < e:
                layer, pos = divmod(i - f, self.n_pos)
                made[i] = {
                    "node_id": f"0_{layer}_{pos}",
                    "feature": -1,
                    "layer": str(layer),
                    "ctx_idx": pos,
                    "feature_type": "mlp reconstruction error",
                    "jsNodeId": f"{layer}_{pos}-0",
                    "influence": infl,
                }
            elif i < e + self.n_pos:
                pos = i - e
                tok = int(self.tokens[pos])
                made[i] = {
                    "node_id": f"E_{tok}_{pos}",
                    "feature": pos,
                    "layer": "E",
                    "ctx_idx": pos,
                    "feature_type": "embedding",
                    "jsNodeId": f"E_{tok}-{pos}",
                    "influence": infl,
                }
            else:
                j = i - e - self.n_pos
                tok, p = self.logit_tokens[j], float(self.logit_probabilities[j])
                layer = str(self.n_layers + 1)
                made[i] = {
                    "node_id": f"{layer}_{tok}_{self.n_pos - 1}",
                    "feature": tok,
                    "layer": layer,
                    "ctx_idx": self.n_pos - 1,
                    "feature_type": "logit",
                    "token_prob": p,
                    "is_target_logit": j == 0,
                    "jsNodeId": f"L_{tok}-{self.n_pos - 1}",
                    "clerp": f'Output "{self.logit_strings[j]}" (p={p:.3f})',
                }
        for node in made.values():
            node.setdefault("token_prob", 0.0)
            node.setdefault("is_target_logit", False)
            node.setdefault("run_idx", 0)
            node.setdefault("reverse_ctx_idx", 0)
            node.setdefault("clerp", "")
            node.setdefault("influence", None)
            node.setdefault("activation", None)
        links = []
        dsts, srcs = torch.nonzero(edges, as_tuple=True)
        for d, s in zip(dsts.tolist(), srcs.tolist()):
            if s in made and d in made:
                links.append(
                    {"source": made[s]["node_id"], "target": made[d]["node_id"], "weight": float(self.adjacency[d, s])}
                )
        connected = {x for link in links for x in (link["source"], link["target"])}
        used = [n for n in made.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
        return {
            "metadata": {
                "slug": slug,
                "scan": self.scan,
                "transcoder_list": [],
                "prompt_tokens": list(self.str_tokens),
                "prompt": self.prompt,
                "node_threshold": node_threshold,
                "schema_version": 1,
            },
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": used,
            "links": links,
        }

    def save_json(
        self,
        path,
        *,
        slug: str | None = None,
        node_threshold: float = 0.8,
        edge_threshold: float = 0.98,
        overwrite: bool = False,
    ):
        """Write circuit-tracer's graph file (through the staged writer); returns the path."""
        from _core.writer import write_file

        data = self.to_circuit_tracer(slug or _slug(path), node_threshold, edge_threshold)
        return write_file(path, json.dumps(data, indent=1), kind="json", overwrite=overwrite)

    def figure(self, node_threshold: float = 0.8, edge_threshold: float = 0.98):
        """The pruned graph: nodes by position (x) and layer (y), edges coloured by sign."""
        import plotly.graph_objects as go

        nodes, edges, _ = self.prune(node_threshold, edge_threshold)
        f, e = self.n_features, self.n_features + self.n_layers * self.n_pos

        def xy(i: int) -> tuple[float, float]:
            if i < f:
                layer, pos, feat = self.features[i].tolist()
                return pos + 0.1 * ((feat % 7) - 3) / 3, layer + 0.5
            if i < e:
                layer, pos = divmod(i - f, self.n_pos)
                return pos + 0.3, layer + 0.5
            if i < e + self.n_pos:
                return float(i - e), -0.5
            j = i - e - self.n_pos
            return self.n_pos - 1 + 0.25 * j, self.n_layers + 1.0

        A = self.adjacency
        dsts, srcs = torch.nonzero(edges, as_tuple=True)
        top = float(A[dsts, srcs].abs().max()) if len(dsts) else 1.0
        traces = []
        for d, s in zip(dsts.tolist(), srcs.tolist()):
            (x0, y0), (x1, y1) = xy(s), xy(d)
            w = float(A[d, s])
            traces.append(
                go.Scatter(
                    x=[x0, x1],
                    y=[y0, y1],
                    mode="lines",
                    showlegend=False,
                    hoverinfo="text",
                    text=f"{self.node_label(s)} → {self.node_label(d)}: {w:.4g}",
                    opacity=0.5,
                    line=dict(width=0.5 + 4 * abs(w) / (top or 1.0), color="#c0392b" if w < 0 else "#2471a3"),
                )
            )
        colours = {"feature": "#1f77b4", "error": "#999999", "token": "#2ca02c", "logit": "#d62728"}
        for kind, colour in colours.items():
            idx = [i for i in torch.nonzero(nodes)[:, 0].tolist() if self.node_kind(i) == kind]
            pts = [xy(i) for i in idx]
            traces.append(
                go.Scatter(
                    x=[p[0] for p in pts],
                    y=[p[1] for p in pts],
                    mode="markers",
                    name=kind,
                    marker=dict(
                        size=8 if kind != "logit" else 12,
                        color=colour,
                        symbol="square" if kind == "error" else "circle",
                    ),
                    text=[self.node_label(i) for i in idx],
                    hoverinfo="text",
                )
            )
        fig = go.Figure(traces)
        fig.update_layout(
            title=f"attribution graph: {int(nodes.sum())} of {self.n_nodes} nodes, {len(dsts)} edges",
            xaxis=dict(
                title="position",
                tickvals=list(range(self.n_pos)),
                ticktext=[f"{p}: {t!r}" for p, t in enumerate(self.str_tokens)],
            ),
            yaxis=dict(title="layer (tokens below, logits above)"),
            height=max(450, 22 * (self.n_layers + 3)),
        )
        return fig


def _slug(path) -> str:
    from pathlib import Path

    return Path(str(path)).stem
