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

Rows are vector–Jacobian products of the linear replacement model, computed without autograd
(``LinearReplacement``): each target's input vector is carried down the residual stream in plain matrix
products (skip connections, then attention's output and value matrices with the frozen pattern), from
its own layer (a feature at layer ``L`` starts before layer ``L``'s attention, a logit above the last
layer) and over the positions up to its own (attention is causal); sources are read where they write, one
product per (layer, position) with its active features' outputs and its error node. Targets are grouped
by position and sorted by layer, ``batch_size`` rows per pass. The first positions go the other way: their
sources (with circuit-tracer's ``zero_first`` the first position holds only its token) are carried forwards up their positions, their values recorded at every layer; a row's gradient that attention
moves to those positions meets them through the values, and the targets there read them off directly. The
split position is the one with the least arithmetic (``_first_position``); every split gives the same rows.
circuit-tracer
computes the same rows with one autograd backward through the whole model per batch. With more active
features than ``max_feature_nodes``, features are visited by decreasing influence on the logits,
recomputed as rows come in (``4 × batch_size`` features at a time, as circuit-tracer's update interval).

The result, its pruning by influence, JSON and figure: ``attribution_result.py``.

Example::

    graph = attribution_graph(model, "The capital of France is", transcoders)
    graph.top_rows(10)                      # strongest edges into the top logit
    graph.save_json("france.json")          # circuit-tracer's graph file, for its frontend
    graph.figure()
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from hooks import InputError
from hooks.model import takes_model

from .attribution_result import AttributionGraph, normalized_abs
from .replacement import ReplacementModel, decoder_vectors, encoder_input, encoder_vectors

if TYPE_CHECKING:
    from hooks.model import HookedLlama


# --------------------------------------------------------------------------- building it
def _first_position(
    n_feat: torch.Tensor, live_err: torch.Tensor, t_layer: torch.Tensor, t_pos: torch.Tensor, per_pos: int, d_v: int
) -> int:
    """The first position carried backwards (before it, sources are carried forwards) with the least arithmetic:
    carrying a position through a layer costs ``per_pos`` per row (targets backwards, sources forwards), and a
    backward row meets the forward sources below each layer through their values (``d_v`` per position)."""
    L, P = n_feat.shape
    reach = (t_layer + 1).clamp(max=L)  # layers a target's row passes (its own attention, then every layer below)
    # sources per position below each layer: the token, then each layer's features and error node
    below = torch.cat([torch.ones(1, P, dtype=torch.long), 1 + torch.cumsum(n_feat + live_err, 0)])[:L]  # [L, P]
    best, best_cost = 0, None
    for m in range(0, min(P - 1, 16) + 1):
        back = t_pos >= m
        carried = ((t_pos[back] + 1 - m) * reach[back]).sum() * per_pos
        span = (m - torch.arange(m)).clamp(min=0)  # positions an early source spans
        forward = (below[:, :m] * span).sum() * per_pos
        meet = torch.cumsum((below[:, :m] * span).sum(1), 0)  # per layer, summed over the layers up to it
        reads = meet[reach[back] - 1].sum() * d_v if m else 0
        cost = int(carried + forward + reads)
        if best_cost is None or cost < best_cost:
            best, best_cost = m, cost
    return best


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
        batch_size: targets per reverse pass (rows carried together: memory ``batch_size × positions ×
            d_model`` floats, a few times over); with ``max_feature_nodes``, ``4 × batch_size`` features are
            visited between influence updates.
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
    if max_feature_nodes is not None and (
        isinstance(max_feature_nodes, bool) or not isinstance(max_feature_nodes, int) or max_feature_nodes < 0
    ):
        raise InputError(f"max_feature_nodes={max_feature_nodes!r}; pass an integer >= 0", param="max_feature_nodes")

    t0 = time.perf_counter()
    state = rm.prompt_state(tokens)
    lin = rm.linear(state)
    dt = lin.dtype
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
        dec_vecs.append(decoder_vectors(t, f).detach().to(dt) * a[pos, f, None].detach().to(dt))
        enc_vecs.append(encoder_vectors(t, f).detach())
    features = torch.cat(feats).cpu() if feats else torch.zeros(0, 3, dtype=torch.long)  # indices stay on the CPU
    activations = torch.cat(acts) if acts else torch.zeros(0)
    dev = state.embed.device
    encoders = torch.cat(enc_vecs) if enc_vecs else torch.zeros(0, M, device=dev)
    n_active = len(features)
    n_rows_feat = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    # logit targets
    last = state.logits[-1].float()
    probs = last.softmax(-1)
    top = torch.argsort(probs, descending=True)[:max_n_logits]
    cum = torch.cumsum(probs[top], 0)
    n_logits = min(int(torch.searchsorted(cum, torch.tensor(desired_logit_prob))) + 1, len(top))
    logit_ids = top[:n_logits]
    n_err = L * P
    n_cols = n_active + n_err + P + n_logits
    err_off, tok_off = n_active, n_active + n_err
    logit_off = tok_off + P
    # the sources of each (layer, position): its features' columns (contiguous) and outputs, then its error node
    sources: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    errs, embed = errors.to(dt), state.embed.to(dt)
    start = 0
    for layer, d in zip(rm.transcoders, dec_vecs):
        counts = torch.bincount(features[start : start + len(d), 1], minlength=P).tolist()
        sources[layer], c0 = [], start
        for p, c in enumerate(counts):
            sources[layer].append((c0, c0 + c, torch.cat([d[c0 - start : c0 - start + c], errs[layer, p, None]]).T))
            c0 += c
        start += len(d)
    for layer in range(L):  # without a transcoder the whole MLP output is the error node
        sources.setdefault(layer, [(0, 0, errs[layer, p, None].T) for p in range(P)])
    t_layer = torch.cat([features[:, 0], torch.full((n_logits,), L)])  # per node: where its input is read
    t_pos = torch.cat([features[:, 1], torch.full((n_logits,), P - 1)])

    def start_vectors(nodes: torch.Tensor) -> torch.Tensor:
        """Each target's gradient [n, M] where its input is read (ordered by node)."""
        vec = torch.empty(len(nodes), M, dtype=dt, device=dev)
        is_logit = nodes >= n_active
        if bool(is_logit.any()):
            vec[is_logit] = lin.logit_vectors(logit_ids[nodes[is_logit] - n_active])
        for layer in t_layer[nodes[~is_logit]].unique().tolist():
            sel = (~is_logit) & (t_layer[nodes] == layer)
            f = nodes[sel]
            vec[sel] = lin.input_vectors(layer, features[f, 1], encoders[f])
        return vec

    # Positions before ``first`` are computed forwards from their sources (each source's vector carried up its
    # positions, its values recorded at every layer), later ones backwards from the targets; a target's gradient
    # moved by attention to an earlier position meets the sources there through those values. With zero_first
    # the first position holds only its token. ``first`` is the split with the least arithmetic.
    n_feat = torch.zeros(L, P, dtype=torch.long)  # active features per (layer, position)
    n_feat.index_put_((features[:, 0], features[:, 1]), torch.ones(n_active, dtype=torch.long), accumulate=True)
    live_err = torch.ones(P, dtype=torch.long)  # error nodes that are sources (zero_first zeroes the first)
    if zero_first:
        live_err[0] = 0
    d_v = model.n_kv_heads * model.d_head
    per_pos = M * model.n_heads * model.d_head + d_v * M + M * M  # a position through a layer
    first = _first_position(n_feat, live_err, t_layer, t_pos, per_pos, d_v)
    cols_at: list[torch.Tensor] = []  # per early position: its sources' columns (token, then layer by layer)
    count_at: list[list[int]] = []  # per early position and layer: how many of its sources are below the layer
    U: list[torch.Tensor] = []  # per early position p: its sources' vectors over positions p … first − 1
    for p in range(first):
        cols, vecs, counts = [tok_off + p], [embed[p, None]], []
        for layer in range(L):
            counts.append(len(cols))
            c0, c1, mat = sources[layer][p]
            live = int(live_err[p])
            cols += list(range(c0, c1)) + [err_off + layer * P + p] * live
            vecs.append(mat.T[: c1 - c0 + live])
        u = torch.zeros(len(cols), first - p, M, dtype=dt, device=dev)
        u[:, 0] = torch.cat(vecs)
        cols_at.append(torch.tensor(cols, dtype=torch.long))
        count_at.append(counts)
        U.append(u)
    early = torch.nonzero(t_pos[:n_active] < first)[:, 0]  # feature targets before ``first``: rows read off forwards
    early_row = torch.full((n_active,), -1, dtype=torch.long)
    early_row[early] = torch.arange(len(early))
    early_cols = torch.cat(cols_at) if first else torch.zeros(0, dtype=torch.long)  # the only columns they have
    col_start = [0] + torch.cumsum(torch.tensor([len(c) for c in cols_at], dtype=torch.long), 0).tolist()
    early_rows = torch.zeros(len(early), len(early_cols))
    early_vec = start_vectors(early) if len(early) else torch.zeros(0, M, dtype=dt, device=dev)
    values: list[list[torch.Tensor]] = []  # per layer and early position: its sources' values [n, first − p, GD]
    with torch.no_grad():
        for layer in range(L):
            values.append([])
            at = early[t_layer[early] == layer]
            for p in range(first):
                u = U[p][: count_at[p][layer]]
                vals = lin.values(layer, u, p)
                values[layer].append(vals)
                lin.attn_forward(layer, u, vals, p)
                for q in t_pos[at].unique().tolist():  # targets of this layer at q >= p read the stream at q
                    if q >= p:
                        rows_q = at[t_pos[at] == q]
                        r = early_row[rows_q]
                        at_cols = torch.arange(col_start[p], col_start[p] + len(u))
                        early_rows[r[:, None], at_cols] = (early_vec[r] @ u[:, q - p].T).cpu()
                lin.skip_forward(layer, u, p)

    def sweep(nodes: torch.Tensor) -> torch.Tensor:
        """Rows [n, n_cols] of targets at one position, sorted by decreasing layer: one reverse pass through
        the linear replacement model over positions ``first … that position``, a target joining at its layer."""
        layers, q = t_layer[nodes], int(t_pos[nodes[0]])
        k = q + 1 - first
        grad = torch.zeros(len(nodes), k, M, dtype=dt, device=dev)
        grad[:, k - 1] = start_vectors(nodes)
        out = torch.zeros(len(nodes), n_cols, device=dev)
        for layer in range(min(int(layers[0]), L - 1), -1, -1):
            above = int((layers > layer).sum())  # rows whose gradient reaches this layer's output
            if above:
                g = grad[:above]
                for p in range(first, q + 1):
                    c0, c1, mat = sources[layer][p]
                    r = g[:, p - first] @ mat
                    out[:above, c0:c1] = r[:, :-1]
                    out[:above, err_off + layer * P + p] = r[:, -1]
                lin.skip_back(layer, g, first)
            joined = int((layers >= layer).sum())
            dv = lin.attn_back(layer, grad[:joined], first)
            for p in range(first):  # the early sources, through their values
                vals = values[layer][p]
                out[:joined, cols_at[p][: len(vals)]] += dv[:, p:].reshape(joined, -1) @ vals.reshape(len(vals), -1).T
        out[:, tok_off + first : tok_off + q + 1] = torch.einsum("nkm,km->nk", grad, embed[first : q + 1])
        return out.cpu()

    def compute(nodes: torch.Tensor, out: torch.Tensor) -> None:
        """The rows of ``nodes`` (features, or logits as ``n_active + j``) into ``out`` [len, n_cols], in that
        order: grouped by position, sorted by decreasing layer, ``batch_size`` rows per reverse pass."""
        is_early = t_pos[nodes] < first
        at = torch.nonzero(is_early)[:, 0]
        for b in range(0, len(at), batch_size):  # rows read off forwards, a batch at a time
            full = torch.zeros(len(at[b : b + batch_size]), n_cols)
            full[:, early_cols] = early_rows[early_row[nodes[at[b : b + batch_size]]]]
            out[at[b : b + batch_size]] = full
        order = torch.argsort(t_pos[nodes] * (L + 1) + (L - t_layer[nodes]), stable=True)
        order = order[~is_early[order]]
        groups = torch.unique_consecutive(t_pos[nodes[order]], return_counts=True)[1].tolist()
        c = 0
        for size in groups:
            for b in range(c, c + size, batch_size):
                idx = order[b : min(b + batch_size, c + size)]
                out[idx] = sweep(nodes[idx])
            c += size

    def node_of(nodes: torch.Tensor) -> torch.Tensor:
        return torch.where(nodes >= n_active, nodes - n_active + logit_off, nodes)

    visited = torch.zeros(n_active, dtype=torch.bool)
    with torch.no_grad():
        if n_rows_feat == n_active:  # every row, written where the adjacency holds it
            adjacency = torch.zeros(n_cols, n_cols)
            compute(torch.arange(n_active, n_active + n_logits), adjacency[n_cols - n_logits :])
            compute(torch.arange(n_active), adjacency[:n_active])
            visited[:] = True
        else:
            rows = torch.zeros(n_rows_feat + n_logits, n_cols)
            row_node = torch.zeros(n_rows_feat + n_logits, dtype=torch.long)  # node index of each row
            order = torch.arange(n_active, n_active + n_logits)
            compute(order, rows[:n_logits])
            row_node[:n_logits] = node_of(order)
            filled = n_logits
            w_logit = probs[logit_ids].float().cpu()
            while int(visited.sum()) < n_rows_feat:
                left = n_rows_feat - int(visited.sum())
                # circuit-tracer's order: by influence on the logits through the rows computed so far
                a = normalized_abs(rows[:filled])
                prod = torch.zeros(n_cols)
                prod[logit_off:] = w_logit
                partial = torch.zeros(n_cols)
                for _ in range(4 * (L + 2)):
                    prod = prod[row_node[:filled]] @ a
                    if not bool(prod.any()):
                        break
                    partial += prod
                order = torch.argsort(partial[:n_active], descending=True, stable=True)
                pending = order[~visited[order]][: min(4 * batch_size, left)]
                compute(pending, rows[filled : filled + len(pending)])
                row_node[filled : filled + len(pending)] = pending
                visited[pending] = True
                filled += len(pending)
    selected = torch.nonzero(visited)[:, 0]
    if n_rows_feat < n_active:  # the adjacency over the selected features, errors, tokens and logits
        keep_cols = torch.cat([selected, torch.arange(n_active, n_cols)])
        N = len(keep_cols)
        adjacency = torch.zeros(N, N)
        col_pos = torch.full((n_cols,), -1, dtype=torch.long)
        col_pos[keep_cols] = torch.arange(N)
        adjacency[col_pos[row_node[:filled]]] = rows[:filled, keep_cols]
    pre = torch.zeros(len(selected))  # each selected feature's encoder pre-activation, a layer at a time
    for layer, t in rm.transcoders.items():
        sel = torch.nonzero(features[selected, 0] == layer)[:, 0]
        i = selected[sel]
        x = encoder_input(t, state.tc_in[layer][features[i, 1]])
        pre[sel] = ((x * encoders[i]).sum(-1) + t.b_enc[features[i, 2]]).detach().float().cpu()
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
        stats={
            "seconds": time.perf_counter() - t0,
            "n_active_features": n_active,
            "batch_size": batch_size,
            "first_backward_position": first,  # positions before it were carried forwards
        },
    )
