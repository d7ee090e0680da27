"""Attribution graphs (Ameisen et al. 2025, circuit-tracer): the direct effects between transcoder
features, error nodes, token embeddings and output logits of one prompt, in its local replacement model
(``replacement.py``).

Nodes, in circuit-tracer's order: the active features (layer, position, feature) with their
activations, an error node per (layer, position), a token node per position, and the logit nodes (the
most likely next tokens until their probabilities add up to ``desired_logit_prob``, at most
``max_n_logits``). ``adjacency[target, source]`` is the direct effect of the source on the target: how
much the source's output (activation × decoder row, the error vector, the embedding) changes the
target's input along linear paths of the replacement model (attention with frozen patterns, the residual
stream, skip connections) that pass through no other node. A feature's input is its encoder
pre-activation; a logit node's is its logit minus the mean logit (circuit-tracer's demeaned unembedding).
With no biases in the model, a feature's pre-activation is the sum of its row plus ``b_enc``.

Rows are computed as in circuit-tracer: one forward of the linearised model with one row per target of
a batch, then one backward per batch that starts from each target's input vector in its own row and
reads every source's gradient. With more active features than ``max_feature_nodes``, features are
visited by decreasing influence on the logits, recomputed as rows come in.

Pruning by influence: with ``Â`` the adjacency with rows normalised to absolute sums of one, a node's
influence on the logits is ``w (Â + Â² + …)`` (``w``: the logit probabilities); nodes up to
``node_threshold`` of the cumulative influence are kept, then edges up to ``edge_threshold`` of the
edge influence (circuit-tracer's ``prune_graph``).

Example::

    graph = attribution_graph(model, "The capital of France is", transcoders)
    graph.top_rows(10)                      # strongest edges into the top logit
    graph.save_json("france.json")          # circuit-tracer's graph file, for its frontend
    graph.figure()
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from _core.autograd import differentiates
from hooks import InputError
from hooks.model import takes_model

from ..results import AnalysisResult, jsonable
from .replacement import ReplacementModel, decoder_vectors, encoder_input, encoder_vectors

if TYPE_CHECKING:
    from hooks.model import HookedLlama


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


# --------------------------------------------------------------------------- building it
def _tokens(model: HookedLlama, prompt) -> torch.Tensor:
    if isinstance(prompt, str):
        ids = model.to_tokens(prompt)
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise InputError(
                f"an attribution graph is of one prompt; got a batch of {ids.shape[0]}, pass one row", param="prompt"
            )
        ids = ids[0]
    if ids.dim() != 1 or len(ids) == 0:
        raise InputError("pass one non-empty prompt (text or token ids)", param="prompt")
    return ids.to(model.device)


@takes_model
@differentiates  # works under torch.no_grad() and torch.inference_mode()
def attribution_graph(
    model: HookedLlama,
    prompt,
    transcoders,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    zero_first: bool = True,
) -> AttributionGraph:
    """The attribution graph of ``prompt`` through ``transcoders`` (see the module docstring).

    Args:
        model: a ``HookedLlama``.
        prompt: one text or token ids [P].
        transcoders: per-layer transcoders (``analyses.saes.SAE``; ``train_sae(..., hook_name_out=…)`` trains them).
        max_n_logits, desired_logit_prob: the logit nodes (most likely tokens until this probability).
        max_feature_nodes: most feature rows (features visited by influence); default all active features.
        batch_size: targets per backward pass (rows of the linearised forward).
        zero_first: as circuit-tracer, the first position (the BOS token's attention sink) has no feature
            nodes and a zero error node: its MLP outputs are constants of the replacement model, so rows
            do not add up to their targets there. ``False`` keeps them.
    """
    for name, v, lo in (("max_n_logits", max_n_logits, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(f"{name}={v!r}; pass an integer >= {lo}", param=name)
    if not isinstance(desired_logit_prob, (int, float)) or not 0 < desired_logit_prob <= 1:
        raise InputError(
            f"desired_logit_prob={desired_logit_prob!r}; pass a probability in (0, 1]", param="desired_logit_prob"
        )
    rm = ReplacementModel(model, transcoders)
    tokens = _tokens(model, prompt)
    from ..attribution import frozen_parameters

    t0 = time.perf_counter()
    state = rm.prompt_state(tokens)
    L, P, M = model.n_layers, len(tokens), model.d_model
    # active features, layer-major then position then feature (circuit-tracer's sparse order)
    feats, acts, dec_vecs, enc_vecs = [], [], [], []
    errors = state.errors.clone()
    if zero_first:
        errors[:, 0] = 0
    for layer, t in rm.transcoders.items():
        a = state.acts[layer]
        if zero_first:
            a = a.clone()
            a[0] = 0
        pos, f = torch.nonzero(a, as_tuple=True)
        feats.append(torch.stack([torch.full_like(pos, layer), pos, f], 1))
        acts.append(a[pos, f].detach())
        dec_vecs.append((decoder_vectors(t, f) * a[pos, f, None]).detach())
        enc_vecs.append(encoder_vectors(t, f).detach())
    features = torch.cat(feats) if feats else torch.zeros(0, 3, dtype=torch.long)
    activations = torch.cat(acts) if acts else torch.zeros(0)
    decoders = torch.cat(dec_vecs).to(model.dtype) if dec_vecs else torch.zeros(0, M)
    encoders = torch.cat(enc_vecs) if enc_vecs else torch.zeros(0, M)
    n_active = len(features)
    if max_feature_nodes is not None and (
        isinstance(max_feature_nodes, bool) or not isinstance(max_feature_nodes, int) or max_feature_nodes < 0
    ):
        raise InputError(f"max_feature_nodes={max_feature_nodes!r}; pass an integer >= 0", param="max_feature_nodes")
    n_rows_feat = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    # logit targets
    last = state.logits[-1].float()
    probs = last.softmax(-1)
    top = torch.argsort(probs, descending=True)[:max_n_logits]
    cum = torch.cumsum(probs[top], 0)
    n_logits = min(int(torch.searchsorted(cum, torch.tensor(desired_logit_prob))) + 1, len(top))
    logit_ids = top[:n_logits]
    V = last.shape[0]
    n_err = L * P
    n_cols = n_active + n_err + P + n_logits
    err_off, tok_off = n_active, n_active + n_err
    rows = torch.zeros(n_rows_feat + n_logits, n_cols)
    row_node = torch.zeros(n_rows_feat + n_logits, dtype=torch.long)  # node index of each row
    # where each active feature's output sits: per layer the (pos) of its sources
    by_layer = {layer: torch.nonzero(features[:, 0] == layer)[:, 0] for layer in rm.transcoders}

    def compute(fwd, batch_targets: list[tuple[str, int]]) -> torch.Tensor:
        """Rows [len, n_cols] for targets ("logit", j) or ("feature", i), one per row of the forward."""
        embed, leaves, inputs, logits = fwd
        k = logits.shape[0]
        outs, grads_out = [], []
        inj: dict[int, torch.Tensor] = {}
        logit_grad = torch.zeros(k, V, dtype=logits.dtype, device=logits.device)
        for row, (kind, i) in enumerate(batch_targets):
            if kind == "logit":
                logit_grad[row] = -1.0 / V
                logit_grad[row, int(logit_ids[i])] += 1.0
            else:
                layer, pos, _ = features[i].tolist()
                g = inj.setdefault(layer, torch.zeros_like(inputs[layer]))
                t = rm.transcoders[layer]
                vec = encoders[i] if t.input_scale is None else encoders[i] * t.input_scale
                g[row, pos] = vec.to(g.dtype)
        if any(kind == "logit" for kind, _ in batch_targets):
            outs.append(logits)
            grads_out.append(logit_grad)
        for layer, g in inj.items():
            outs.append(inputs[layer])
            grads_out.append(g)
        srcs = [embed] + [leaves[layer] for layer in range(L)]
        got = torch.autograd.grad(outs, srcs, grads_out, allow_unused=True, retain_graph=True)
        n = len(batch_targets)
        out = torch.zeros(n, n_cols)
        if got[0] is not None:
            out[:, tok_off : tok_off + P] = (got[0][:n].float() * state.embed.float()[None]).sum(-1).cpu()
        for layer in range(L):
            g = got[1 + layer]
            if g is None:
                continue
            g = g[:n].float()
            out[:, err_off + layer * P : err_off + (layer + 1) * P] = (g * errors[layer].float()[None]).sum(-1).cpu()
            idx = by_layer.get(layer)
            if idx is not None and len(idx):
                out[:, idx] = torch.einsum("knm,nm->kn", g[:, features[idx, 1]], decoders[idx].float()).cpu()
        return out

    visited = torch.zeros(n_active, dtype=torch.bool)
    filled = 0
    with frozen_parameters(model):
        fwd = rm.forward(state, min(batch_size, max(n_logits, n_rows_feat, 1)))
        for c in range(0, n_logits, batch_size):
            part = [("logit", j) for j in range(c, min(c + batch_size, n_logits))]
            rows[filled : filled + len(part)] = compute(fwd, part)
            row_node[filled : filled + len(part)] = torch.arange(c, c + len(part)) + tok_off + P
            filled += len(part)
        w_logit = probs[logit_ids].float().cpu()
        while int(visited.sum()) < n_rows_feat:
            left = n_rows_feat - int(visited.sum())
            if n_rows_feat == n_active:
                pending = torch.nonzero(~visited)[:, 0]
            else:  # circuit-tracer's order: by influence on the logits through the rows computed so far
                a = normalized_abs(rows[:filled])
                prod = torch.zeros(n_cols)
                prod[tok_off + P :] = w_logit
                partial = torch.zeros(n_cols)
                for _ in range(4 * (L + 2)):
                    prod = prod[row_node[:filled]] @ a
                    if not bool(prod.any()):
                        break
                    partial += prod
                order = torch.argsort(partial[:n_active], descending=True, stable=True)
                pending = order[~visited[order]][: min(4 * batch_size, left)]
            for c in range(0, len(pending), batch_size):
                idx = pending[c : c + batch_size]
                rows[filled : filled + len(idx)] = compute(fwd, [("feature", int(i)) for i in idx])
                row_node[filled : filled + len(idx)] = idx
                visited[idx] = True
                filled += len(idx)
    selected = torch.nonzero(visited)[:, 0]
    # the adjacency over the selected features, errors, tokens and logits
    keep_cols = torch.cat([selected, torch.arange(n_active, n_cols)])
    N = len(keep_cols)
    adjacency = torch.zeros(N, N)
    col_pos = {int(c): j for j, c in enumerate(keep_cols.tolist())}
    for r in range(filled):
        node = int(row_node[r])
        target = col_pos[node] if node < n_active else (N - n_logits + (node - (tok_off + P)))
        adjacency[target] = rows[r, keep_cols]
    pre = (
        torch.stack(
            [
                encoder_input(
                    rm.transcoders[int(features[i, 0])], state.tc_in[int(features[i, 0])][int(features[i, 1])]
                )
                @ encoders[i]
                + rm.transcoders[int(features[i, 0])].b_enc[int(features[i, 2])]
                for i in selected.tolist()
            ]
        )
        if len(selected)
        else torch.zeros(0)
    )
    target_values = last[logit_ids] - last.mean()
    tok = model.tokenizer
    str_tokens = [tok.decode([int(t)]) for t in tokens.tolist()] if tok is not None else [str(int(t)) for t in tokens]
    logit_strings = [tok.decode([int(t)]) if tok is not None else str(int(t)) for t in logit_ids.tolist()]
    return AttributionGraph(
        prompt=prompt if isinstance(prompt, str) else "".join(str_tokens),
        tokens=tokens.cpu(),
        str_tokens=str_tokens,
        features=features[selected].cpu(),
        activations=activations[selected].detach().float().cpu(),
        adjacency=adjacency,
        logit_tokens=[int(t) for t in logit_ids.tolist()],
        logit_strings=logit_strings,
        logit_probabilities=probs[logit_ids].detach().float().cpu(),
        n_layers=L,
        n_active=n_active,
        pre_activations=pre.detach().float().cpu(),
        target_values=target_values.detach().float().cpu(),
        stats={"seconds": time.perf_counter() - t0, "n_active_features": n_active, "batch_size": batch_size},
    )
