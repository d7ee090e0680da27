"""The batched patching engine: many patched runs per forward, starting where the patch is.

For one component (``analyses.components``) and a list of patches ("variants": a layer, a position or
every position, a unit or none), the engine computes the metric of the corrupted run with the clean
activation written into that slice, for every variant, and it does so cheaply:

1. **Start at the patched layer.** Layers before L are the same as in the corrupted run, so a variant
   at layer L starts from the corrupted run's cached residual ``blocks.L.hook_resid_pre``
   (``model(resid, start_at_layer=L)``).
2. **Many variants per forward.** Variants are stacked along the batch axis (variant-major: rows
   ``j*B .. j*B+B-1`` hold variant j on the B prompts), and one hook writes, for each row block, the
   clean value at that variant's (position, unit). Variants are processed layer by layer: the rows of
   variants patched at layer L join the batch when the run reaches layer L.
3. **Causality.** Attention is causal, so positions before the first patched position are unchanged
   in every later layer: they are not recomputed, their keys/values come from the corrupted cache
   (a prefix KV cache), and patches whose clean and corrupted values are equal (e.g. where the two
   prompts still agree) change nothing and are answered by the corrupted run itself.
4. **Logits only where the metric reads.** The final norm and unembedding are applied at the
   metric's position only (full logits for TransformerLens-style callables).
5. **Chunked** to ``max_batch`` variants and an estimated ``memory_budget_mb``; under torchrun each
   rank runs a contiguous block of the chunks and every rank gets all the values (``_core.distributed``).

The numbers equal a naive loop of one ``run_with_hooks`` per patch (tests check ≤ 1e-4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from _core import distributed as dist
from hooks import InputError, KVCache
from hooks.hook_points import act_name
from hooks.tokens import token_labels

from .components import Component
from .metrics import Metric

if TYPE_CHECKING:
    from hooks.model import HookedLlama


# --------------------------------------------------------------------------- inputs
@dataclass
class PairInputs:
    """A clean/corrupted prompt pair (or batch of pairs) as token ids of one shape."""

    clean: torch.Tensor  # [B, P]
    corrupted: torch.Tensor  # [B, P]
    mask: torch.Tensor | None  # [B, P] 1 = real token (left padding); None when nothing is padded
    str_tokens: list[str] | None  # token strings of the first clean prompt, for labels

    @property
    def batch(self) -> int:
        return self.clean.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean.shape[1]


def _tokens(model: HookedLlama, x, mask):
    if isinstance(x, torch.Tensor):
        t = x[None] if x.dim() == 1 else x
        return t.to(model.device, torch.long), mask
    tokens, m = model.tokenize(x)
    return tokens.to(model.device), (m if mask is None else mask)


def prepare_pair(model: HookedLlama, clean, corrupted, attention_mask=None) -> PairInputs:
    """Tokenise a clean and a corrupted input (strings, lists of strings, chat messages or ids).

    Both must give the same shape (and the same padding); an error says so otherwise.
    """
    c, cm = _tokens(model, clean, attention_mask)
    k, km = _tokens(model, corrupted, attention_mask)
    if c.shape != k.shape:
        raise InputError(
            f"clean and corrupted inputs must have the same shape, got {tuple(c.shape)} and "
            f"{tuple(k.shape)}; pick corruptions that tokenize to the same length"
        )
    mask = None
    if cm is not None or km is not None:
        cm = torch.ones_like(c) if cm is None else torch.as_tensor(cm).to(c.device)
        km = torch.ones_like(k) if km is None else torch.as_tensor(km).to(k.device)
        if not torch.equal(cm.bool(), km.bool()):
            raise InputError("clean and corrupted prompts are padded differently; pair prompts of equal token length")
        mask = None if bool(cm.bool().all()) else cm.long()
    str_tokens = None
    if model.tokenizer is not None:
        str_tokens = token_labels(model.tokenizer, c[0].tolist())
    return PairInputs(c, k, mask, str_tokens)


# --------------------------------------------------------------------------- the corrupted run's prefix
class PrefixKV(KVCache):
    """Keys/values of positions ``[0, length)`` of the corrupted run, shared by every patched row.

    ``keys[layer]`` / ``values[layer]`` are [B, G, length, D] for the B prompts; ``update`` repeats
    them for the rows of the batch (variant-major) and prepends them to the new positions.
    """

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], length: int) -> None:
        super().__init__(0)
        self.prefix_keys, self.prefix_values = keys, values
        self.length = length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.prefix_keys[layer], self.prefix_values[layer]
        reps = k.shape[0] // pk.shape[0]
        return (
            torch.cat([pk.repeat(reps, 1, 1, 1).to(k.dtype), k], dim=2),
            torch.cat([pv.repeat(reps, 1, 1, 1).to(v.dtype), v], dim=2),
        )


class _Captured(Exception):
    """Raised by a hook to end a forward early with the tensor it saw."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__("captured")
        self.tensor = tensor


def _capture(t: torch.Tensor, hook) -> None:
    raise _Captured(t)


FINAL = "ln_final.hook_normalized"  # where a forward is ended early: x / scale, before the norm's weight


def unembed_normalized(model: HookedLlama, normalized: torch.Tensor) -> torch.Tensor:
    """Logits from ``ln_final.hook_normalized`` values, as the model computes them: lm_head(weight * x)."""
    return model.lm_head(model.model.norm.weight * normalized)


# --------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One patch: ``layer``, ``pos`` (None = every position), ``unit`` (None = the whole vector)."""

    layer: int
    pos: int | None
    unit: int | None
    start: int = 0  # first position this patch can change
    noop: bool = False  # clean == corrupted on the patched slice: the corrupted run answers it


@dataclass
class EngineStats:
    """What a sweep cost: patches asked for, computed, skipped as no-ops; chunks; forward calls; seconds."""

    n_patches: int = 0
    n_computed: int = 0
    n_skipped: int = 0
    n_chunks: int = 0
    n_forward_calls: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            k: getattr(self, k)
            for k in ("n_patches", "n_computed", "n_skipped", "n_chunks", "n_forward_calls", "seconds")
        }


@dataclass
class PatchSetup:
    """Everything the engine reads from the clean and corrupted runs of one component."""

    inputs: PairInputs
    clean_acts: dict[int, torch.Tensor]  # layer -> clean activation of the component
    corrupted_acts: dict[int, torch.Tensor]
    resid_pre: dict[int, torch.Tensor]  # layer -> corrupted blocks.L.hook_resid_pre
    prefix_k: dict[int, torch.Tensor]  # layer -> corrupted rotated keys [B, G, P, D]
    prefix_v: dict[int, torch.Tensor]
    clean_logits: torch.Tensor
    corrupted_logits: torch.Tensor


def run_setup(model: HookedLlama, comp: Component, inputs: PairInputs, layers: list[int]) -> PatchSetup:
    """The clean and the corrupted forward, caching only what the engine needs."""
    names = [comp.hook_name(layer) for layer in layers]
    lo = min(layers)
    corr_names = set(names) | {act_name("resid_pre", layer) for layer in layers}
    corr_names |= {act_name(n, layer) for layer in range(lo, model.n_layers) for n in ("rot_k", "v")}
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(inputs.clean, attention_mask=inputs.mask, names_filter=names)
        corr_logits, corr = model.run_with_cache(
            inputs.corrupted, attention_mask=inputs.mask, names_filter=sorted(corr_names)
        )
    return PatchSetup(
        inputs=inputs,
        clean_acts={layer: clean[comp.hook_name(layer)] for layer in layers},
        corrupted_acts={layer: corr[comp.hook_name(layer)] for layer in layers},
        resid_pre={layer: corr["resid_pre", layer] for layer in layers},
        prefix_k={layer: corr["rot_k", layer].transpose(1, 2) for layer in range(lo, model.n_layers)},
        prefix_v={layer: corr["v", layer].transpose(1, 2) for layer in range(lo, model.n_layers)},
        clean_logits=clean_logits,
        corrupted_logits=corr_logits,
    )


def replacement_setup(
    model: HookedLlama,
    comp: Component,
    inputs: PairInputs,
    layers: list[int],
    replace: Callable[[int, torch.Tensor, dict], torch.Tensor],
) -> PatchSetup:
    """An ablation as a patch: one forward on ``inputs.corrupted`` (the prompts), and for each layer
    the value ``replace(layer, activation, cache)`` to write in place of the component's activation (zeros,
    a mean, or another hook point's value) where a patch from a clean run would write it."""
    names = [comp.hook_name(layer) for layer in layers]
    lo = min(layers)
    need = set(names) | {act_name("resid_pre", layer) for layer in layers}
    need |= {act_name(n, layer) for layer in range(lo, model.n_layers) for n in ("rot_k", "v")}
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs.corrupted, attention_mask=inputs.mask, names_filter=sorted(need))
    acts = {layer: cache[comp.hook_name(layer)] for layer in layers}
    return PatchSetup(
        inputs=inputs,
        clean_acts={
            layer: replace(layer, acts[layer], cache).to(acts[layer].dtype).expand_as(acts[layer]) for layer in layers
        },
        corrupted_acts=acts,
        resid_pre={layer: cache["resid_pre", layer] for layer in layers},
        prefix_k={layer: cache["rot_k", layer].transpose(1, 2) for layer in range(lo, model.n_layers)},
        prefix_v={layer: cache["v", layer].transpose(1, 2) for layer in range(lo, model.n_layers)},
        clean_logits=logits,
        corrupted_logits=logits,
    )


def mark_variants(comp: Component, setup: PatchSetup, variants: list[Variant], metric, reuse_prefix: bool) -> None:
    """Set each variant's first changed position and whether it is a no-op (in place)."""
    P = setup.inputs.n_pos
    limit = (metric.pos % P) if isinstance(metric, Metric) else 0
    diffs = {layer: comp.differs(setup.clean_acts[layer], setup.corrupted_acts[layer]) for layer in setup.clean_acts}
    for v in variants:
        if not reuse_prefix:
            v.start, v.noop = 0, False
            continue
        d = diffs[v.layer]  # [P, U]
        col = d[:, v.unit] if v.unit is not None else d[:, 0]
        if v.pos is not None:
            v.noop = not bool(col[v.pos])
            first = v.pos
        else:
            idx = torch.nonzero(col)
            v.noop = idx.numel() == 0
            first = int(idx[0]) if idx.numel() else 0
        v.start = min(first, limit)


# --------------------------------------------------------------------------- running
def _row_bytes(model: HookedLlama, T: int, P: int, n_logit_pos: int) -> int:
    M, F, H, G, D, V = model.d_model, model.d_mlp, model.n_heads, model.n_kv_heads, model.d_head, model.d_vocab
    el = torch.finfo(model.dtype).bits // 8
    per_token = el * (12 * M + 6 * F + 4 * (H + 2 * G) * D + 3 * H * P)
    return T * per_token + el * 4 * G * P * D + 4 * 3 * n_logit_pos * V


def chunk_variants(
    model: HookedLlama,
    variants: list[Variant],
    B: int,
    P: int,
    full_logits: bool,
    max_batch: int | None,
    memory_budget_mb: float,
) -> list[tuple[int, list[Variant]]]:
    """Group computed variants by first changed position, sorted by layer, in chunks fitting the budget."""
    groups: dict[int, list[Variant]] = {}
    for v in variants:
        if not v.noop:
            groups.setdefault(v.start, []).append(v)
    chunks = []
    for start in sorted(groups):
        vs = sorted(groups[start], key=lambda v: v.layer)
        T = P - start
        per_variant = B * _row_bytes(model, T, P, P if full_logits else 1)
        size = max(1, int(memory_budget_mb * 2**20 // per_variant))
        if max_batch is not None:
            size = max(1, min(size, int(max_batch)))
        chunks += [(start, vs[i : i + size]) for i in range(0, len(vs), size)]
    return chunks


def _mask_for(
    comp: Component, act_shape: tuple, n_rows: int, first: int, joining: list[Variant], start: int
) -> torch.Tensor:
    """Bool [A, 1, *act_shape[1:] (1 where not indexed)] that is True on the slices the joining rows patch."""
    per_pos = joining[0].pos is not None
    shape = [n_rows, 1] + [1] * (len(act_shape) - 1)
    if per_pos:
        shape[comp.pos_axis + 1] = act_shape[comp.pos_axis]
    if comp.unit_axis is not None:
        shape[comp.unit_axis + 1] = act_shape[comp.unit_axis]
    mask = torch.zeros(shape, dtype=torch.bool)
    rows = torch.arange(first, first + len(joining))
    index: list = [rows, torch.zeros_like(rows)]
    for axis in range(1, len(act_shape)):
        if per_pos and axis == comp.pos_axis:
            index.append(torch.tensor([v.pos - start for v in joining]))
        elif comp.unit_axis is not None and axis == comp.unit_axis:
            index.append(torch.tensor([v.unit for v in joining]))
        else:
            index.append(torch.zeros_like(rows))
    mask[tuple(index)] = True
    return mask


def _patch_hook(mask: torch.Tensor, clean: torch.Tensor, B: int):
    def patch(t: torch.Tensor, hook) -> torch.Tensor:
        rows = t.reshape(mask.shape[0], B, *t.shape[1:])
        return torch.where(mask.to(t.device), clean.to(t.device, t.dtype)[None], rows).reshape(t.shape)

    return patch


def run_chunk(
    model: HookedLlama,
    comp: Component,
    setup: PatchSetup,
    start: int,
    chunk: list[Variant],
    logit_positions: list[int] | None,
    stats: EngineStats,
) -> torch.Tensor:
    """Final-norm logits of every variant of one chunk: [len(chunk), B, n_positions, V] (chunk order).

    ``logit_positions`` are absolute positions (None: all positions, then ``start`` must be 0).
    """
    n, B = model.n_layers, setup.inputs.batch
    by_layer: dict[int, list[Variant]] = {}
    for v in chunk:
        by_layer.setdefault(v.layer, []).append(v)
    join = sorted(by_layer)
    x = None
    n_rows = 0
    for i, layer in enumerate(join):
        joining = by_layer[layer]
        x_new = setup.resid_pre[layer][:, start:].repeat(len(joining), 1, 1)
        x = x_new if x is None else torch.cat([x, x_new])
        first, n_rows = n_rows, n_rows + len(joining)
        clean = comp.suffix(setup.clean_acts[layer], start)
        mask = _mask_for(comp, tuple(clean.shape), n_rows, first, joining, start)
        end = join[i + 1] if i + 1 < len(join) else n
        hooks = [(comp.hook_name(layer), _patch_hook(mask, clean, B))]
        if end == n:
            hooks.append((FINAL, _capture))
        kv = (
            PrefixKV(
                {k: t[:, :, :start] for k, t in setup.prefix_k.items()},
                {k: t[:, :, :start] for k, t in setup.prefix_v.items()},
                start,
            )
            if start > 0
            else None
        )
        am = setup.inputs.mask.repeat(n_rows, 1) if setup.inputs.mask is not None else None
        stats.n_forward_calls += 1
        with model.hooks(fwd_hooks=hooks):
            if end < n:
                x = model(x, attention_mask=am, start_at_layer=layer, stop_at_layer=end, kv_cache=kv)
            else:
                try:
                    model(x, attention_mask=am, start_at_layer=layer, kv_cache=kv)
                except _Captured as cap:
                    x = cap.tensor
                else:  # pragma: no cover - the capture hook always fires
                    raise RuntimeError("the final residual stream was not captured")
    if logit_positions is not None:
        x = x[:, [p - start for p in logit_positions]]
    logits = unembed_normalized(model, x)  # [A*B, n_pos, V]
    return logits.reshape(len(chunk), B, *logits.shape[1:])


def score_logits(metric, logits: torch.Tensor, per_prompt: bool = False) -> torch.Tensor:
    """Metric per variant from logits [A, B, n_pos, V]: a ``Metric`` reads its single position; a plain
    callable gets each variant's full logits [B, P, V] and must return a scalar. ``per_prompt``: one
    value per prompt instead, [A, B] (a callable then returns [B])."""
    if isinstance(metric, Metric):
        values = metric.score(logits[:, :, 0]).float()
        return values if per_prompt else values.mean(-1)
    shape = (logits.shape[1],) if per_prompt else ()
    return torch.stack([torch.as_tensor(metric(logits[a])).float().reshape(shape) for a in range(logits.shape[0])])


def run_variants(
    model: HookedLlama,
    comp: Component,
    setup: PatchSetup,
    variants: list[Variant],
    metric: Metric | Callable,
    *,
    max_batch: int | None = None,
    memory_budget_mb: float = 1024.0,
    progress: bool = False,
    stats: EngineStats | None = None,
    per_prompt: bool = False,
) -> torch.Tensor:
    """The metric after each patch, [len(variants)] (no-op variants get the corrupted run's value);
    ``per_prompt``: [len(variants), B]."""
    stats = stats if stats is not None else EngineStats()
    t0 = time.perf_counter()
    P, B = setup.inputs.n_pos, setup.inputs.batch
    full = not isinstance(metric, Metric)
    corrupted_value = score_logits(
        metric, setup.corrupted_logits[None] if full else setup.corrupted_logits[None, :, [metric.pos]], per_prompt
    )[0]
    out = torch.full((len(variants),) + ((B,) if per_prompt else ()), float("nan"))
    index = {id(v): i for i, v in enumerate(variants)}
    chunks = chunk_variants(model, variants, B, P, full, max_batch, memory_budget_mb)
    mine = dist.shard(len(chunks))  # under torchrun: this rank's chunks, gathered below
    it = [chunks[i] for i in mine]
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"patching {comp.name}", disable=not dist.is_main())
    done: list[torch.Tensor] = []
    with torch.no_grad():
        for start, chunk in it:
            positions = None if full else [metric.pos % P]
            logits = run_chunk(model, comp, setup, start, chunk, positions, stats)
            done.append(score_logits(metric, logits, per_prompt).cpu())
            stats.n_chunks += 1
    for (_, chunk), values in zip(chunks, dist.gather_blocks(done)):
        for v, val in zip(chunk, values):
            out[index[id(v)]] = val
    for i, v in enumerate(variants):
        if v.noop:
            out[i] = corrupted_value
    stats.n_patches += len(variants)
    stats.n_skipped += sum(v.noop for v in variants)
    stats.n_computed += sum(not v.noop for v in variants)
    stats.seconds += time.perf_counter() - t0
    return out
