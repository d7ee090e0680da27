"""Running a model with edges patched: every receiver gets its own residual-stream input.

Patching the edge ``s -> r`` gives the receiver ``r`` the residual stream it reads with ``s``'s
contribution replaced by ``s``'s patch value (its output in the corrupted run, its mean, or zero)::

    x_r = x + Σ_s mask[s, r] · (patch_s − out_s)

where ``x`` is the residual stream the receiver would read and ``out_s`` is what ``s`` wrote in *this*
run (upstream patches change it), as auto-circuit and EAP-IG define it. A mask of ones on every edge
is the fully ablated model; a circuit is the mask that is zero on its edges.

``EdgeHooks`` are forward hooks of a ``HookedLlama`` doing this for many masks at once: the batch rows
are variant-major (rows ``a*B .. a*B+B-1`` are mask ``a`` on the B prompts) and the differences
``patch_s − out_s`` of every source so far live in one buffer [A, S, B, P, M]. A receiver's input is
recomputed only where some mask patches one of its edges: the query/key/value projections of the
heads concerned (from their own normalised input, so a q receiver and a k receiver of the same layer
read different residual streams), the MLP's normalised input (``ln2.hook_normalized``) and the final
normalised stream (``ln_final.hook_normalized``).

``run_masks`` evaluates a metric for a batch of masks with the patching engine's economies
(``analyses.engine``): runs start at the first layer any mask of the chunk patches, from the clean
run's cached residual stream; positions before the first token where clean and patch values differ are
the same in every variant, so they are not recomputed (their keys/values come from the clean run through
``engine.PrefixKV``); the unembedding reads only the metric's position; chunks fit ``memory_budget_mb``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hooks import InputError, act_name

from ..engine import PairInputs, PrefixKV, _Captured, prepare_pair, score_logits, unembed_normalized
from ..metrics import Metric, resolve_metric
from .graph import EdgeGraph

if TYPE_CHECKING:
    from hooks.model import HookedLlama

ABLATIONS = ("patching", "mean", "zero")


def rms_normalized(x: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps)`` in fp32, cast to ``dtype``: what ``hook_normalized`` holds (the model's
    ``RMSNorm`` before its weight)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def head_results(model: HookedLlama, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Per-head contributions [..., H, M] of ``hook_z`` [..., H, D] through ``o_proj`` (no bias)."""
    w = model.model.layers[layer].self_attn.o_proj.weight.view(model.d_model, model.n_heads, model.d_head)
    return torch.einsum("...hd,mhd->...hm", z.to(w.dtype), w)


class SourceValues:
    """Every source's output as the model computed it, kept compact: the embeddings [B, P, M], each layer's
    ``hook_z`` [B, P, H, D] and ``hook_mlp_out`` [B, P, M] (per layer 2 rows of d_model where the dense
    [S, B, P, M] has H + 1: a fifth on SmolLM2); the heads' shares of ``o_proj`` are formed when read (and
    kept while the dense tensor would take at most ``keep_mb``).

    Reads like the dense tensor: ``values[i]`` [B, P, M], ``values[a:b]`` [n, B, P, M], ``values.shape``;
    ``values.positions(p0, p1)`` the same sources over positions ``p0:p1``.
    """

    def __init__(self, model: HookedLlama, embed: torch.Tensor, z: list, mlp: list, keep_mb: float = 256.0) -> None:
        self.model, self.embed, self.z, self.mlp = model, embed, list(z), list(mlp)
        self.n_heads = model.n_heads
        B, P, M = embed.shape
        self.shape = torch.Size((1 + (self.n_heads + 1) * len(self.z), B, P, M))
        self._keep = self.shape.numel() * embed.element_size() <= keep_mb * 2**20
        self._heads: dict[int, torch.Tensor] = {}
        self._parent: tuple[SourceValues, slice] | None = None

    @classmethod
    def from_cache(cls, model: HookedLlama, cache) -> "SourceValues":
        """From a cache holding hook_embed, hook_z and hook_mlp_out."""
        n = model.n_layers
        return cls(
            model,
            cache["hook_embed"],
            [cache[act_name("z", layer)] for layer in range(n)],
            [cache[act_name("mlp_out", layer)] for layer in range(n)],
        )

    def positions(self, p0: int, p1: int | None = None) -> "SourceValues":
        """The same sources over positions ``p0:p1``."""
        cut = slice(p0, p1)
        out = SourceValues(self.model, self.embed[:, cut], [z[:, cut] for z in self.z], [m[:, cut] for m in self.mlp])
        out._keep, out._parent = False, (self, cut) if self._keep else None
        return out

    def layer_heads(self, layer: int) -> torch.Tensor:
        """The heads of ``layer``: [H, B, P, M]."""
        if self._parent is not None:  # a window on values that keep their heads
            parent, cut = self._parent
            return parent.layer_heads(layer)[:, :, cut]
        heads = self._heads.get(layer)
        if heads is None:
            heads = head_results(self.model, layer, self.z[layer]).permute(2, 0, 1, 3)
            if self._keep:
                self._heads[layer] = heads
        return heads

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, int):
            return self[key : key + 1][0]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("SourceValues takes a source index or a slice of sources")
        start, stop, _ = key.indices(self.shape[0])
        per = self.n_heads + 1
        parts = []
        if start == 0 and stop > 0:
            parts.append(self.embed[None])
        for layer in range(max(0, (start - 1) // per), len(self.z)):
            base = 1 + per * layer
            if base >= stop:
                break
            lo, hi = max(start, base) - base, min(stop, base + per) - base  # within the layer: heads 0..H-1, MLP H
            if lo < min(hi, self.n_heads):
                parts.append(self.layer_heads(layer)[lo : min(hi, self.n_heads)])
            if hi > self.n_heads:
                parts.append(self.mlp[layer][None])
        if not parts:
            return self.embed.new_zeros((0, *self.shape[1:]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def dense(self) -> torch.Tensor:
        """Every source at once: [S, B, P, M] (the memory the compact form saves)."""
        return self[:]


def source_positions(values, p0: int, p1: int | None = None):
    """``values`` (``SourceValues`` or a dense [S, B or 1, P or 1, M] tensor) over positions ``p0:p1``
    (a tensor with one position, a mean or zero ablation, is the same everywhere)."""
    if isinstance(values, SourceValues):
        return values.positions(p0, p1)
    return values[:, :, p0:p1] if values.shape[2] > 1 else values


# --------------------------------------------------------------------------- the hooks
class EdgeHooks:
    """Forward hooks that run ``A`` edge masks at once (see the module docstring).

    Args:
        model, graph: the model and its ``EdgeGraph``.
        mask: [A, S, R] in the model's dtype, 1 where the edge is patched (values in between interpolate).
        patch: the patch value of every source, [S, B or 1, P or 1, M] (P: the positions this run computes),
            a tensor or ``SourceValues`` (read one layer's sources at a time).
        base: differences of the sources before ``start_layer`` (they wrote their clean values, so
            ``patch − clean``), [A or 1, n, B, P, M], when the run reads the residual stream entering
            ``start_layer``; None when every forward starts from the tokens (the embeddings' difference
            is then taken at ``hook_embed``, anew at each forward, so generation with a KV cache works).
        capture_pos: end the forward at the final norm and keep only this position (relative to the run's
            first position); None: run to the logits.
        keep_inputs: keep every recomputed receiver input (``inputs``: receiver slice start -> [rows, P, r, M])
            with its gradient retained (for integrated gradients along the edges).
        every_receiver: recompute every receiver's input, patched or not.
    """

    def __init__(
        self,
        model: HookedLlama,
        graph: EdgeGraph,
        mask: torch.Tensor,
        patch: torch.Tensor,
        *,
        base: torch.Tensor | None = None,
        start_layer: int = 0,
        capture_pos: int | None = None,
        keep_inputs: bool = False,
        every_receiver: bool = False,
    ) -> None:
        self.model, self.graph = model, graph
        self.mask, self.patch, self.base = mask, patch, base
        self.start_layer, self.capture_pos = start_layer, capture_pos
        self.A = mask.shape[0]
        self.diff: torch.Tensor | None = None  # [A, S, B, P, M]
        self.resid: dict[str, torch.Tensor] = {}
        self.keep_inputs = keep_inputs
        self.inputs: dict[int, torch.Tensor] = {}  # receiver slice start -> recomputed inputs [rows, P, r, M]
        self.eps = model.config.rms_norm_eps
        # which receivers any mask touches: [R] bool
        self.touched = mask.ne(0).any(0).any(0) | every_receiver

    # ------------------------------------------------------------------ the difference buffer
    def _buffer(self, t: torch.Tensor) -> torch.Tensor:
        if self.diff is None:
            rows, P, M = t.shape[0], t.shape[1], t.shape[-1]
            if rows % self.A:
                raise InputError(f"the batch ({rows} rows) is not a multiple of the {self.A} masks")
            B = rows // self.A
            self.diff = torch.zeros(self.A, self.graph.n_sources, B, P, M, dtype=t.dtype, device=t.device)
            if self.base is not None:
                self.diff[:, : self.base.shape[1]] = self.base.to(t.device, t.dtype)
        return self.diff

    def _write(self, sources: slice, out: torch.Tensor) -> None:
        """out: [rows, P, n, M] (or [rows, P, M] for one source) -> diff[:, sources] = patch − out."""
        d = self._buffer(out)
        A, B = self.A, d.shape[2]
        cur = out if out.dim() == 4 else out[:, :, None]
        cur = cur.reshape(A, B, *cur.shape[1:]).permute(0, 3, 1, 2, 4)  # [A, n, B, P, M]
        d[:, sources] = self.patch[sources].to(d.device, d.dtype)[None] - cur

    def _delta(self, recv: slice) -> torch.Tensor | None:
        """Σ_s mask[s, r] (patch_s − out_s) for the receivers of ``recv``: [rows, P, r, M], or None when no
        mask patches any of their edges."""
        if not bool(self.touched[recv].any()):
            return None
        d = self.diff
        n = int(self.graph.n_src_before[recv.start])
        A, S, B, P, M = d.shape
        m = self.mask[:, :n, recv].to(d.dtype)  # [A, n, r]
        delta = torch.bmm(m.transpose(1, 2), d[:, :n].reshape(A, n, B * P * M))  # [A, r, BPM]
        return delta.view(A, -1, B, P, M).permute(0, 2, 3, 1, 4).reshape(A * B, P, -1, M)

    def _keep(self, recv: slice, x: torch.Tensor) -> torch.Tensor:
        if self.keep_inputs:
            if x.requires_grad:
                x.retain_grad()
            else:  # nothing upstream needs a gradient (the first layer): a leaf
                x = x.detach().requires_grad_(True)
            self.inputs[recv.start] = x
        return x

    # ------------------------------------------------------------------ hook functions
    def _embed(self, t, hook):  # a forward from the tokens: a fresh buffer for this call
        self.diff = None
        self._write(slice(0, 1), t)

    def _resid(self, t, hook):
        self._buffer(t)
        self.resid[hook.name.rsplit(".", 1)[-1] + hook.name.split(".")[1]] = t

    def _result(self, t, hook):
        layer = hook.layer
        self._write(self.graph.head_sources(layer), t)

    def _mlp_out(self, t, hook):
        layer = hook.layer
        i = self.graph.source_index("mlp", layer)
        self._write(slice(i, i + 1), t)

    def _proj(self, kind: str):
        def hook(t, hook):
            layer = hook.layer
            recv = self.graph.receiver_slice(layer, kind)
            delta = self._delta(recv)
            if delta is None:
                return None
            attn = self.model.model.layers[layer].self_attn
            norm = self.model.model.layers[layer].input_layernorm
            x = self._keep(recv, self.resid[f"hook_resid_pre{layer}"][:, :, None] + delta)  # [rows, P, r, M]
            y = norm.weight * rms_normalized(x, self.eps, t.dtype)
            proj = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}[kind]
            n_units, D = t.shape[2], t.shape[3]
            w = proj.weight.view(n_units, D, -1)
            new = torch.einsum("bprm,rdm->bprd", y, w)
            if proj.bias is not None:
                new = new + proj.bias.view(n_units, D)
            changed = self.touched[recv].to(t.device)[None, None, :, None]
            return torch.where(changed, new.to(t.dtype), t)

        return hook

    def _mlp_in(self, t, hook):
        layer = hook.layer
        recv = self.graph.receiver_slice(layer, "mlp")
        delta = self._delta(recv)
        if delta is None:
            return None
        x = self._keep(recv, self.resid[f"hook_resid_mid{layer}"] + delta[:, :, 0])
        return rms_normalized(x, self.eps, t.dtype)

    def _final(self, t, hook):
        recv = self.graph.receiver_slice(self.graph.n_layers, "logits")
        delta = self._delta(recv) if self.diff is not None else None
        if delta is not None:
            last = self.resid[f"hook_resid_post{self.graph.n_layers - 1}"]
            t = rms_normalized(self._keep(recv, last + delta[:, :, 0]), self.eps, t.dtype)
        if self.capture_pos is not None:
            raise _Captured(t[:, [self.capture_pos]])
        return t

    def hooks(self) -> list[tuple]:
        n = self.graph.n_layers
        out: list[tuple] = [] if self.base is not None else [("hook_embed", self._embed)]
        for layer in range(self.start_layer, n):
            out += [
                (act_name("resid_pre", layer), self._resid),
                (act_name("q", layer), self._proj("q")),
                (act_name("k", layer), self._proj("k")),
                (act_name("v", layer), self._proj("v")),
                (act_name("result", layer), self._result),
                (act_name("resid_mid", layer), self._resid),
                (f"blocks.{layer}.ln2.hook_normalized", self._mlp_in),
                (act_name("mlp_out", layer), self._mlp_out),
            ]
        out += [(act_name("resid_post", n - 1), self._resid), ("ln_final.hook_normalized", self._final)]
        return out


# --------------------------------------------------------------------------- the clean run and the patch values
@dataclass
class CircuitSetup:
    """The clean prompts, the value every source is patched to, and what runs starting late need.

    ``clean_src`` / ``patch_src``: the source outputs of the clean run and their patch values, read as
    [S, B, P, M] (``SourceValues``, kept compact: per layer ``hook_z`` and ``hook_mlp_out``); ``patch_src``
    is a dense [S, 1, 1, M] tensor for a mean or zero ablation. ``start``: the first position where some
    source's clean and patch values differ (earlier positions are the same in every patched run).
    """

    graph: EdgeGraph
    inputs: PairInputs
    ablation: str
    clean_src: SourceValues
    patch_src: SourceValues | torch.Tensor
    resid_pre: dict[int, torch.Tensor]
    prefix_k: dict[int, torch.Tensor]
    prefix_v: dict[int, torch.Tensor]
    clean_logits: torch.Tensor
    start: int
    metric: object = None
    clean_value: float = float("nan")
    ablated_value: float = float("nan")  # every edge patched
    stats: dict = field(default_factory=lambda: {"forward_calls": 0, "masks": 0, "seconds": 0.0})

    def differences(self, sources: slice, p0: int = 0, p1: int | None = None) -> torch.Tensor:
        """``patch − clean`` of the ``sources`` over positions ``p0:p1``: [n, B, p, M] in the model's dtype."""
        clean = self.clean_src if (p0, p1) == (0, None) else self.clean_src.positions(p0, p1)
        return source_positions(self.patch_src, p0, p1)[sources] - clean[sources]

    def source_blocks(self) -> list[slice]:
        """The sources in forward order, one slice per layer (the embeddings first)."""
        g = self.graph
        return [slice(0, 1)] + [
            slice(g.head_sources(layer).start, g.source_index("mlp", layer) + 1) for layer in range(g.n_layers)
        ]


def source_outputs(model: HookedLlama, cache) -> torch.Tensor:
    """Every source's output [S, B, P, M] from a cache holding hook_embed, hook_z and hook_mlp_out."""
    return SourceValues.from_cache(model, cache).dense()


def source_names(model: HookedLlama) -> list[str]:
    return ["hook_embed"] + [act_name(k, layer) for layer in range(model.n_layers) for k in ("z", "mlp_out")]


@torch.no_grad()
def token_means(model: HookedLlama, prompts, names, attention_mask=None) -> dict[str, torch.Tensor]:
    """The mean of each hook point in ``names`` over every real token of ``prompts`` (texts or ids), fp64."""
    if isinstance(prompts, torch.Tensor):
        tokens, mask = (prompts[None] if prompts.dim() == 1 else prompts), attention_mask
    else:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise InputError("no reference prompts given; pass at least one text", param="reference")
        tokens, mask = model.tokenize(list(prompts))
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=sorted(set(names)))
    keep = None if mask is None else torch.as_tensor(mask).bool()
    out = {}
    for name in names:
        t = cache[name].double()  # [B, P, ...]
        if keep is None:
            out[name] = t.mean(dim=(0, 1))
        else:
            k = keep.to(t.device).view(*keep.shape, *([1] * (t.dim() - 2)))
            out[name] = (t * k).sum(dim=(0, 1)) / k.sum()
    return out


def mean_source_outputs(model: HookedLlama, reference, attention_mask=None) -> torch.Tensor:
    """The mean output of every source over every real token of ``reference`` prompts: [S, 1, 1, M]."""
    means = token_means(model, reference, source_names(model), attention_mask)
    parts = [means["hook_embed"][None]]
    for layer in range(model.n_layers):
        parts.append(head_results(model, layer, means[act_name("z", layer)].to(model.dtype)).double())
        parts.append(means[act_name("mlp_out", layer)][None])
    return torch.cat(parts)[:, None, None].to(model.dtype)


def circuit_setup(
    model: HookedLlama,
    clean,
    corrupted=None,
    *,
    metric=None,
    answers=None,
    ablation: str = "patching",
    reference=None,
    attention_mask=None,
    graph: EdgeGraph | None = None,
) -> CircuitSetup:
    """Everything the edge analyses read from the clean (and corrupted) runs; checks the inputs first.

    ``ablation``: "patching" (sources take their values from ``corrupted``), "mean" (their mean over the
    ``reference`` prompts, default: the clean prompts) or "zero".
    """
    if ablation not in ABLATIONS:
        raise InputError(f"ablation={ablation!r}; use one of {', '.join(ABLATIONS)}", param="ablation")
    if ablation == "patching" and corrupted is None:
        raise InputError(
            "ablation='patching' needs corrupted prompts; pass corrupted= or ablation='mean' / 'zero'",
            param="corrupted",
        )
    graph = graph or EdgeGraph.from_model(model)
    inputs = prepare_pair(model, clean, corrupted if corrupted is not None else clean, attention_mask)
    n = model.n_layers
    names = source_names(model) + [act_name(k, layer) for layer in range(n) for k in ("resid_pre", "rot_k", "v")]
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(inputs.clean, attention_mask=inputs.mask, names_filter=names)
        clean_src = SourceValues.from_cache(model, cache)
        patch_src: SourceValues | torch.Tensor
        if ablation == "patching":
            corr_logits, corr = model.run_with_cache(
                inputs.corrupted, attention_mask=inputs.mask, names_filter=source_names(model)
            )
            patch_src = SourceValues.from_cache(model, corr)
        elif ablation == "mean":
            patch_src = (
                mean_source_outputs(model, reference)
                if reference is not None
                else mean_source_outputs(model, inputs.clean, inputs.mask)
            )
        else:
            patch_src = torch.zeros(graph.n_sources, 1, 1, model.d_model, dtype=clean_src.embed.dtype)
    setup = CircuitSetup(
        graph=graph,
        inputs=inputs,
        ablation=ablation,
        clean_src=clean_src,
        patch_src=patch_src,
        resid_pre={layer: cache["resid_pre", layer] for layer in range(n)},
        prefix_k={layer: cache["rot_k", layer].transpose(1, 2) for layer in range(n)},
        prefix_v={layer: cache["v", layer].transpose(1, 2) for layer in range(n)},
        clean_logits=clean_logits,
        start=inputs.n_pos - 1,
    )
    differs = torch.zeros(inputs.n_pos, dtype=torch.bool)  # [P]: some source's clean and patch values differ
    with torch.no_grad():
        for block in setup.source_blocks():
            differs |= (patch_src[block] != clean_src[block]).any(-1).any(0).any(0).cpu()
    first = torch.nonzero(differs)
    if first.numel():
        setup.start = int(first[0])
    setup.metric = resolve_metric(model, metric, answers, clean_logits)
    if not isinstance(setup.metric, Metric):
        setup.start = 0  # a callable reads every position's logits
    else:
        setup.start = min(setup.start, setup.metric.pos % inputs.n_pos)
    with torch.no_grad():
        setup.clean_value = float(score_logits(setup.metric, _read(setup, clean_logits)[None])[0])
        if ablation == "patching":  # every edge patched is the corrupted run
            setup.ablated_value = float(score_logits(setup.metric, _read(setup, corr_logits)[None])[0])
    return setup


def _read(setup: CircuitSetup, logits: torch.Tensor) -> torch.Tensor:
    """Logits [B, P, V] as the metric reads them: [B, 1, V] at its position, or all positions."""
    if isinstance(setup.metric, Metric):
        return logits[:, [setup.metric.pos % logits.shape[1]]]
    return logits


# --------------------------------------------------------------------------- evaluating masks
def _bytes_per_mask(model: HookedLlama, graph: EdgeGraph, B: int, T: int) -> int:
    el = torch.finfo(model.dtype).bits // 8
    M, F = model.d_model, model.d_mlp
    per_token = el * (graph.n_sources * M + (model.n_heads + 2 * model.n_kv_heads) * M * 3 + 12 * M + 6 * F)
    return B * T * per_token + el * graph.n_sources * graph.n_receivers


def run_masks(
    model: HookedLlama,
    setup: CircuitSetup,
    masks: torch.Tensor,
    *,
    max_batch: int | None = None,
    memory_budget_mb: float = 1024.0,
    per_prompt: bool = False,
) -> torch.Tensor:
    """The metric with each edge mask applied: masks [A, E] (1 = patched) -> [A] (``per_prompt``: [A, B]).

    A mask of zeros is the clean run and is answered from it.
    """
    graph, inputs = setup.graph, setup.inputs
    if masks.dim() != 2 or masks.shape[1] != graph.n_edges:
        raise InputError(f"masks must be [n_masks, {graph.n_edges}], got {tuple(masks.shape)}", param="masks")
    t0 = time.perf_counter()
    B, P = inputs.batch, inputs.n_pos
    start = setup.start
    T = P - start
    size = max(1, int(memory_budget_mb * 2**20 // _bytes_per_mask(model, graph, B, T)))
    if max_batch is not None:
        size = max(1, min(size, int(max_batch)))
    out = torch.empty((masks.shape[0],) + ((B,) if per_prompt else ()))
    nonzero = masks.ne(0).any(1)
    clean = score_logits(setup.metric, _read(setup, setup.clean_logits)[None], per_prompt)[0]
    out[~nonzero] = clean
    todo = torch.nonzero(nonzero)[:, 0]
    # masks whose first patched receiver sits in the same layer share a start: sort by it
    first_layer = (
        torch.tensor([_first_layer(graph, masks[i]) for i in todo.tolist()], dtype=torch.long)
        if len(todo)
        else torch.empty(0, dtype=torch.long)
    )
    order = todo[torch.argsort(first_layer, stable=True)] if len(todo) else todo
    with torch.no_grad():
        for c in range(0, len(order), size):
            idx = order[c : c + size]
            values = _run_chunk(model, setup, masks[idx], per_prompt)
            out[idx] = values.cpu()
    setup.stats["masks"] += int(masks.shape[0])
    setup.stats["seconds"] += time.perf_counter() - t0
    return out


def _first_layer(graph: EdgeGraph, mask_row: torch.Tensor) -> int:
    patched = graph.edges[mask_row.ne(0)]
    if not len(patched):
        return graph.n_layers
    return min(graph.receivers[int(r)].layer for r in patched[:, 1].unique().tolist())


def _run_chunk(model: HookedLlama, setup: CircuitSetup, masks: torch.Tensor, per_prompt: bool) -> torch.Tensor:
    graph, inputs = setup.graph, setup.inputs
    A, B, start = masks.shape[0], inputs.batch, setup.start
    layer0 = min(min(_first_layer(graph, m) for m in masks), graph.n_layers - 1)
    matrix = graph.mask_matrix(masks.to(model.dtype)).to(model.device)  # [A, S, R]
    patch = source_positions(setup.patch_src, start)
    n_pre = graph.source_index("head", layer0, 0)  # sources before the first computed layer wrote clean values
    base = setup.differences(slice(0, n_pre), start)[None]
    capture = None if not isinstance(setup.metric, Metric) else (setup.metric.pos % inputs.n_pos) - start
    eh = EdgeHooks(model, graph, matrix, patch, base=base, start_layer=layer0, capture_pos=capture)
    am = inputs.mask.repeat(A, 1) if inputs.mask is not None else None
    kv = None
    if start > 0:
        kv = PrefixKV(
            {k: t[:, :, :start] for k, t in setup.prefix_k.items()},
            {k: t[:, :, :start] for k, t in setup.prefix_v.items()},
            start,
        )
    setup.stats["forward_calls"] += 1
    x = setup.resid_pre[layer0][:, start:].repeat(A, 1, 1)
    with model.hooks(fwd_hooks=eh.hooks()):
        try:
            logits = model(x, attention_mask=am, start_at_layer=layer0, kv_cache=kv)
        except _Captured as cap:
            logits = unembed_normalized(model, cap.tensor)
    return score_logits(setup.metric, logits.reshape(A, B, *logits.shape[1:]), per_prompt)


def ablated_value(model: HookedLlama, setup: CircuitSetup, **kw) -> float:
    """The metric with every edge patched (for ``"patching"``, the corrupted run's, known from the setup)."""
    if setup.ablated_value == setup.ablated_value:  # not NaN
        return setup.ablated_value
    setup.ablated_value = float(run_masks(model, setup, torch.ones(1, setup.graph.n_edges), **kw)[0])
    return setup.ablated_value
