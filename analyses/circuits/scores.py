"""Edge scores: edge attribution patching (EAP), EAP with integrated gradients (EAP-IG), exact edge
patching, and ACDC-style greedy pruning.

For an edge ``s -> r`` with difference ``d_s = patch_s − clean_s`` (the source's patch value minus its
clean output, at every prompt and position) and ``g_r = ∂metric/∂x_r`` (the gradient of the metric, the
mean over prompts, with respect to the receiver's input):

- **EAP** (Syed et al. 2023): ``score = Σ_{b,p} d_s · g_r`` with the gradient taken on the clean run:
  the first-order estimate of patching that edge alone. One clean forward and one backward.
- **EAP-IG** (Hanna et al. 2024): the gradient averaged along a path from the patched to the clean run.
  ``path="inputs"`` (EAP-IG's and MIB's default): the token embeddings interpolated,
  ``e = e_patch + α (e_clean − e_patch)`` with ``α = k/steps``, ``k = 0 … steps−1``, ``d_s`` from the
  original runs. ``path="edges"`` (auto-circuit's mask gradients): every edge interpolated at once,
  ``x_r = x + α Σ_s d_s(α)`` with ``α = k/(steps−1)``, ``k = 0 … steps−1`` (both ends; one step is EAP),
  scoring ``d_s(α) · g_r(α)`` averaged over the steps; the scores then add up to the change of patching
  every edge as the steps grow (integrated gradients' completeness).
- **exact**: the metric with the edge patched alone minus the clean metric, batched many edges per forward.
- **ACDC-style greedy pruning**: from the full graph, visit receivers from the logits back and their
  incoming edges, patch each edge for good when doing so damages the metric by less than ``threshold``.

Scores are signed: the estimated change of the metric when the edge is patched (the clean run's value
moves towards the patched run's), so a negative score on a logit difference marks an edge that carries
the behaviour. Selection ranks by absolute value unless asked otherwise.

Gradients with respect to each receiver's own input come from one ordinary backward pass: the q, k and v
projections and the MLP and final norms are linear maps of their normalised inputs, so the gradient at
``hook_q`` (or ``ln2.hook_normalized`` …) is carried back through the projection and the RMSNorm by hand
(``rms_backward``); no per-receiver copy of the residual stream is built.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from hooks import InputError, act_name

from ..engine import _Captured, unembed_normalized
from ..metrics import Metric
from .graph import EdgeGraph
from .patching import CircuitSetup, ablated_value, head_results, rms_normalized, run_masks, source_positions

if TYPE_CHECKING:
    from hooks.model import HookedLlama

METHODS = ("eap", "eap-ig", "exact")
PATHS = ("inputs", "edges")


def rms_backward(x: torch.Tensor, g_y: torch.Tensor, eps: float) -> torch.Tensor:
    """The gradient with respect to ``x`` of ``y = x / sqrt(mean(x²) + eps)`` given ``g_y`` (fp32)."""
    x = x.float()
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = x * r
    return r * (g_y - y * (g_y * y).mean(-1, keepdim=True))


def _metric_value(
    setup: CircuitSetup, model: HookedLlama, normalized_or_logits: torch.Tensor, full: bool, B: int
) -> torch.Tensor:
    """Mean metric over the B prompts of each block of rows (summed over blocks, for one backward)."""
    if full:
        logits = normalized_or_logits
    else:
        logits = unembed_normalized(model, normalized_or_logits)
    values = [torch.as_tensor(setup.metric(block)).float().reshape(()) for block in logits.split(B)]
    return torch.stack(values).sum()


def _patch_sums(model: HookedLlama, setup: CircuitSetup) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """What each receiver reads with every edge patched, fp32: Σ of the patch values of the sources before
    it plus the o_proj biases in between (the residual stream they would have written): per layer before
    the attention, before the MLP, and at the end ([B or 1, P or 1, M] each)."""
    graph, patch = setup.graph, setup.patch_src
    run = patch[0].float().clone()
    before_attn, before_mlp = [], []
    for layer in range(model.n_layers):
        before_attn.append(run.clone())
        run = run + patch[graph.head_sources(layer)].float().sum(0)
        bias = model.model.layers[layer].self_attn.o_proj.bias
        if bias is not None:
            run = run + bias.float()
        before_mlp.append(run.clone())
        run = run + patch[graph.source_index("mlp", layer)].float()
    return before_attn, before_mlp, run


PRODUCT_CHUNK_MB = 256.0  # the differences held at once while the products are formed (long prompts: by positions)


def gradient_products(
    model: HookedLlama,
    setup: CircuitSetup,
    embed: torch.Tensor | None = None,
    alphas: list[float] | None = None,
    chunk_positions: int | None = None,
) -> torch.Tensor:
    """Σ over prompts and positions of ``d_s · ∂metric/∂x_r`` for every (source, receiver): [S, R] (fp64).

    ``d_s`` is the setup's ``patch − clean``; ``embed`` [k·B, P, M] replaces the token embeddings (k
    interpolation points; the metric is the mean over each block of B prompts and the products are summed
    over the blocks); default: the clean run. ``alphas`` (k values, instead of ``embed``): the clean
    prompts with every edge's mask at ``alphas[j]`` in block j, each receiver reading
    ``x_r = x + α Σ_s (patch_s − out_s)`` = ``(1 − α) x + α`` (the patch values' sum), and the products
    taken with that block's own differences ``patch_s − out_s(α)`` (EAP-IG along the edges).

    Memory: the forward keeps the residual stream entering each layer's attention and MLP and the backward
    the gradients at the q/k/v projections and norms (per layer [rows, P, M]-sized). The receivers' input
    gradients are then formed one layer at a time (the q/k/v projections and norms carried back by hand,
    ``rms_backward``) and multiplied with the differences, which are built from the compact source values
    one block of ``chunk_positions`` positions at a time (default: as many as ``PRODUCT_CHUNK_MB`` holds;
    a short prompt is one block), so no [S, rows, P, M] tensor of the whole prompt is ever held.
    """
    graph, inputs = setup.graph, setup.inputs
    B, n, eps = inputs.batch, model.n_layers, model.config.rms_norm_eps
    k = len(alphas) if alphas is not None else (1 if embed is None else embed.shape[0] // B)
    tokens = inputs.clean if k == 1 else inputs.clean.repeat(k, 1)
    am = None if inputs.mask is None else inputs.mask.repeat(k, 1)
    values: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    full = not isinstance(setup.metric, Metric)
    mixing = alphas is not None

    def leaf(t, hook):
        src = t if embed is None else embed.to(t.device, t.dtype)
        if mixing:
            values["embed"] = src.detach()
        return src.detach().requires_grad_(True)

    def keep(t, hook):
        values[hook.name] = t if mixing else t.detach()

    def grad(g, hook):
        grads[hook.name] = g.detach()

    if mixing:  # the receivers' inputs: (1 − α) x + α × the patch values' sum
        a = torch.tensor(alphas, dtype=torch.float32).repeat_interleave(B).view(-1, 1, 1).to(model.device)
        before_attn, before_mlp, at_end = _patch_sums(model, setup)

        def rows(c: torch.Tensor) -> torch.Tensor:
            c = c.to(model.device)
            return c.repeat(k, 1, 1) if c.shape[0] == B and k > 1 else c

        def mixed(x: torch.Tensor, c: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
            x = (1 - a) * x.float() + a * rows(c)
            values[name] = x.detach()
            return rms_normalized(x, eps, dtype)

        def read_attn(t, hook):
            layer = hook.layer
            return mixed(values.pop(act_name("resid_pre", layer)), before_attn[layer], f"x_attn{layer}", t.dtype)

        def read_mlp(t, hook):
            layer = hook.layer
            return mixed(values.pop(act_name("resid_mid", layer)), before_mlp[layer], f"x_mlp{layer}", t.dtype)

    def capture(t, hook):
        if mixing:
            t = mixed(values.pop(act_name("resid_post", n - 1)), at_end, "x_final", t.dtype)
        t.retain_grad()
        values["final"] = t
        raise _Captured(t)

    recv_in = [act_name(kind, layer) for layer in range(n) for kind in ("q", "k", "v")]
    recv_in += [f"blocks.{layer}.ln2.hook_normalized" for layer in range(n)]
    fwd = [("hook_embed", leaf)]
    fwd += [(act_name(kind, layer), keep) for layer in range(n) for kind in ("resid_pre", "resid_mid")]
    fwd += [(act_name("resid_post", n - 1), keep)]
    if mixing:
        fwd += [(f"blocks.{layer}.ln1.hook_normalized", read_attn) for layer in range(n)]
        fwd += [(f"blocks.{layer}.ln2.hook_normalized", read_mlp) for layer in range(n)]
        fwd += [(act_name(kind, layer), keep) for layer in range(n) for kind in ("z", "mlp_out")]
    fwd += [("ln_final.hook_normalized", capture)]
    from ..attribution import frozen_parameters

    with (
        frozen_parameters(model),
        torch.enable_grad(),
        model.hooks(fwd_hooks=fwd, bwd_hooks=[(h, grad) for h in recv_in]),
    ):
        try:
            model(tokens, attention_mask=am)
        except _Captured:
            pass
        final = values.pop("final")
        read = final if full else final[:, [setup.metric.pos % inputs.n_pos]]
        _metric_value(setup, model, read if not full else unembed_normalized(model, final), full, B).backward()
        g_final = final.grad if final.grad is not None else torch.zeros_like(final)
        del final, read
    with torch.no_grad():  # the products: no graph
        values = {name: v.detach() for name, v in values.items()}
        rows_, P, M = g_final.shape
        S = graph.n_sources
        per_position = S * (rows_ if mixing else B) * M * 4
        chunk = chunk_positions or max(1, int(PRODUCT_CHUNK_MB * 2**20 // per_position))
        total = torch.zeros(S, graph.n_receivers, dtype=torch.float64)
        for p0 in range(0, P, chunk):
            _products(model, setup, values, grads, g_final, total, p0, min(P, p0 + chunk), k, mixing)
    return total


def _products(
    model: HookedLlama,
    setup: CircuitSetup,
    values: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    g_final: torch.Tensor,
    total: torch.Tensor,
    p0: int,
    p1: int,
    k: int,
    mixing: bool,
) -> None:
    """``total += d · g`` over positions ``p0:p1`` (see ``gradient_products``)."""
    graph, B, n, eps = setup.graph, setup.inputs.batch, model.n_layers, model.config.rms_norm_eps
    cut = slice(p0, p1)
    P, M, S = p1 - p0, g_final.shape[-1], graph.n_sources
    if mixing:  # each block's own differences patch_s − out_s(α), filled in source order as the layers need them
        d = torch.empty(S, k * B * P * M)
        patch = source_positions(setup.patch_src, p0, p1)

        def put(sl: slice, out: torch.Tensor) -> None:  # out [k·B, P, n, M]
            p = patch[sl].expand(-1, B, P, M).repeat(1, k, 1, 1).float()  # [n, k·B, P, M]
            d[sl] = (p - out.permute(2, 0, 1, 3).float()).reshape(-1, k * B * P * M)

        put(slice(0, 1), values["embed"][:, cut, None])
    else:  # patch − clean, one layer's sources at a time
        d = torch.empty(S, B * P * M)
        for block in setup.source_blocks():
            diff = setup.differences(block, p0, p1)
            d[block] = diff.expand(block.stop - block.start, B, P, M).reshape(-1, B * P * M).float()

    def add(sl: slice, g_x: torch.Tensor) -> None:  # g_x [rows, P, r, M]
        if mixing:  # products per block
            g_sum = g_x.permute(2, 0, 1, 3).reshape(-1, k * B * P * M)
        else:  # the same differences in every block: sum the gradients first
            g_sum = g_x.reshape(k, B, P, -1, M).sum(0).permute(2, 0, 1, 3).reshape(-1, B * P * M)  # [r, BPM]
        n_src = int(graph.n_src_before[sl.start])
        total[:n_src, sl] += (d[:n_src] @ g_sum.T).double().cpu()

    for layer in range(n):
        layer_mod = model.model.layers[layer]
        x = values[f"x_attn{layer}" if mixing else act_name("resid_pre", layer)][:, cut]
        w_ln = layer_mod.input_layernorm.weight.float()
        attn = layer_mod.self_attn
        for kind, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)):
            g = grads.get(act_name(kind, layer))
            if g is None:
                continue
            units = g.shape[2]
            w = proj.weight.float().view(units, -1, M)  # [r, D, M]
            g_y = torch.einsum("bprd,rdm->bprm", g[:, cut].float(), w) * w_ln
            add(graph.receiver_slice(layer, kind), rms_backward(x[:, :, None], g_y, eps))
        if mixing:
            put(graph.head_sources(layer), head_results(model, layer, values[act_name("z", layer)][:, cut]))
        g_mlp = grads.get(f"blocks.{layer}.ln2.hook_normalized")
        if g_mlp is not None:
            x_mid = values[f"x_mlp{layer}" if mixing else act_name("resid_mid", layer)][:, cut]
            g_x = rms_backward(x_mid, g_mlp[:, cut].float(), eps)
            add(graph.receiver_slice(layer, "mlp"), g_x[:, :, None])
        if mixing:
            i = graph.source_index("mlp", layer)
            put(slice(i, i + 1), values[act_name("mlp_out", layer)][:, cut, None])
    x_end = values["x_final" if mixing else act_name("resid_post", n - 1)][:, cut]
    g_x = rms_backward(x_end, g_final[:, cut].float(), eps)
    add(graph.receiver_slice(n, "logits"), g_x[:, :, None])


def eap_scores(model: HookedLlama, setup: CircuitSetup) -> torch.Tensor:
    """EAP: [E] first-order estimates of the metric's change when each edge alone is patched."""
    return setup.graph.edge_vector(gradient_products(model, setup)).float()


TOKENS_PER_PASS = 2048  # EAP-IG's interpolation points per forward: rows × positions, at most (and 32 rows)
# along the edges each point multiplies its own differences, so batching points saves no products: smaller passes
EDGE_PATH_TOKENS_PER_PASS = 1024


def _points_per_pass(setup: CircuitSetup, max_rows: int | None, tokens: int = TOKENS_PER_PASS) -> int:
    """How many interpolation points (blocks of B prompts) one forward and backward takes: ``max_rows`` rows,
    by default 32 rows and at most ``tokens`` tokens, so memory stays bounded for long prompts."""
    rows = max_rows or min(32, max(1, tokens // setup.inputs.n_pos))
    return max(1, rows // setup.inputs.batch)


def check_ig(steps, path, ablation: str) -> None:
    """Refuse EAP-IG's arguments that cannot work (before any forward)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"steps={steps!r}; pass a positive number of integration steps", param="steps")
    if path not in PATHS:
        raise InputError(f"path={path!r}; use 'inputs' (interpolated embeddings) or 'edges'", param="path")
    if path == "inputs" and ablation in ("mean", "zero"):
        raise InputError(
            "path='inputs' interpolates towards the corrupted prompts' embeddings; with a mean or zero "
            "ablation pass path='edges'",
            param="path",
        )


def eap_ig_scores(
    model: HookedLlama, setup: CircuitSetup, steps: int = 30, path: str = "inputs", max_rows: int | None = None
) -> torch.Tensor:
    """EAP-IG: [E] scores with gradients averaged over ``steps`` points of ``path`` (see the module docstring)."""
    check_ig(steps, path, setup.ablation)
    if path == "edges":
        return _edge_path_ig(model, setup, steps, max_rows)
    inputs = setup.inputs
    with torch.no_grad():
        e_clean = model.model.embed_tokens(inputs.clean)
        e_corr = model.model.embed_tokens(inputs.corrupted)
    alphas = [k / steps for k in range(steps)]
    per = _points_per_pass(setup, max_rows)
    total = torch.zeros(setup.graph.n_sources, setup.graph.n_receivers, dtype=torch.float64)
    for c in range(0, steps, per):
        emb = torch.cat([e_corr + a * (e_clean - e_corr) for a in alphas[c : c + per]])
        total += gradient_products(model, setup, embed=emb)
    return setup.graph.edge_vector(total / steps).float()


def _edge_path_ig(model: HookedLlama, setup: CircuitSetup, steps: int, max_rows: int | None = None) -> torch.Tensor:
    """Integrated gradients over every edge's mask at once (auto-circuit's mask gradients, averaged): the mask
    values are batched (``_points_per_pass``), each batch one forward and one backward."""
    alphas = [0.0] if steps == 1 else [k / (steps - 1) for k in range(steps)]
    per = _points_per_pass(setup, max_rows, EDGE_PATH_TOKENS_PER_PASS)
    total = torch.zeros(setup.graph.n_sources, setup.graph.n_receivers, dtype=torch.float64)
    for c in range(0, len(alphas), per):
        total += gradient_products(model, setup, alphas=alphas[c : c + per])
    return setup.graph.edge_vector(total / len(alphas)).float()


def exact_scores(model: HookedLlama, setup: CircuitSetup, edges: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """Exact edge patching: [E] metric change with each edge (of ``edges``, default all) patched alone;
    edges not computed are NaN."""
    graph = setup.graph
    idx = torch.arange(graph.n_edges) if edges is None else edges
    out = torch.full((graph.n_edges,), float("nan"))
    masks = torch.zeros(len(idx), graph.n_edges)
    masks[torch.arange(len(idx)), idx] = 1.0
    out[idx] = run_masks(model, setup, masks, **kw) - setup.clean_value
    return out


def _better(setup: CircuitSetup, ablated: float) -> float:
    """+1 when the metric is higher on the clean run than fully ablated (a logit difference), -1 otherwise (KL)."""
    return 1.0 if setup.clean_value >= ablated else -1.0


def acdc_order(graph: EdgeGraph) -> torch.Tensor:
    """ACDC's visiting order: receivers from the logits back, each one's sources from the latest back."""
    s, r = graph.edges[:, 0], graph.edges[:, 1]
    key = r * graph.n_sources + s
    return torch.argsort(key, descending=True)


def acdc(
    model: HookedLlama,
    setup: CircuitSetup,
    threshold: float,
    *,
    order: torch.Tensor | None = None,
    max_batch: int = 64,
    memory_budget_mb: float = 1024.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ACDC-style greedy pruning: (kept [E] bool, damage [E]: the metric's damage when each visited edge
    was tried, in the state it was tried in).

    Visits edges in ACDC's order and patches an edge for good when the damage (the metric's move away
    from the clean value) is below ``threshold``. Runs speculatively: a batch of masks removes 1, 2, … of
    the next candidates cumulatively, and the walk stops at the first candidate kept (the rest are
    re-evaluated from the new state); the decisions equal a one-edge-at-a-time run.
    """
    graph = setup.graph
    if not isinstance(threshold, (int, float)) or threshold < 0:
        raise InputError(f"threshold={threshold!r}; pass a damage threshold >= 0", param="threshold")
    order = acdc_order(graph) if order is None else order
    ablated = ablated_value(model, setup, memory_budget_mb=memory_budget_mb)
    better = _better(setup, ablated)
    state = torch.zeros(graph.n_edges)  # 1 = patched (removed)
    current = setup.clean_value
    damage = torch.full((graph.n_edges,), float("nan"))
    i, k = 0, 8
    t0 = time.perf_counter()
    while i < len(order):
        cand = order[i : i + k]
        masks = state.repeat(len(cand), 1)
        for j in range(len(cand)):
            masks[j:, cand[j]] = 1.0
        vals = run_masks(model, setup, masks, max_batch=max_batch, memory_budget_mb=memory_budget_mb)
        prev = current
        stopped = False
        for j, e in enumerate(cand.tolist()):
            dmg = better * (prev - float(vals[j]))
            damage[e] = dmg
            i += 1
            if dmg < threshold:
                state[e] = 1.0
                prev = float(vals[j])
            else:
                stopped = True
                break
        current = prev
        k = max(1, k // 2) if stopped else min(max_batch, k * 2)
    setup.stats["seconds_acdc"] = time.perf_counter() - t0
    return state == 0, damage
