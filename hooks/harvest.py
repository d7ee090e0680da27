"""Harvesting activations over a corpus: documents packed into full rows, one forward per batch of rows.

Packing (as sparsify's ``chunk_and_tokenize`` and SAELens's token stream do): each document is tokenized
as ``model.tokenize`` would (the tokenizer's special tokens, ``cfg.default_prepend_bos``), followed by a
separator (the tokenizer's EOS token), and the documents are concatenated and cut into rows of exactly
``row_len`` tokens; only the corpus's very last row may be shorter. No row is padded, so every position a
forward computes is a real token (``PackStats`` counts them), and rows of one length run with SDPA's own
causal mask. A row's tokens attend to the earlier documents in that row, as in those libraries.

``harvest`` runs the model over batches of rows, stopped after the last layer the names need, and yields
the activations of the kept positions as ``[n, d]`` tensors (row-major; with ``skip_first`` each row's
first position is left out: it carries the attention-sink outlier of the row's start).

    rows = pack_rows(model, texts, 128)
    for acts in harvest(model, ["blocks.6.hook_resid_post"], rows, batch_rows=16):
        acts["blocks.6.hook_resid_post"]   # [n_kept, d_model]

``harvest_to_disk`` writes the same stream once to a keyed cache (``PackedCache`` reads it back).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from .errors import InputError, LoadError

if TYPE_CHECKING:
    from .model import HookedLlama

TEXT_KEYS = ("text", "content", "prompt")


@dataclass
class PackStats:
    """What packing and harvesting did: documents read, rows made, positions the forwards computed,
    real tokens among them (equal: nothing is padded) and positions kept (stored)."""

    docs: int = 0
    rows: int = 0
    positions: int = 0
    tokens: int = 0
    kept: int = 0

    @property
    def padding(self) -> int:
        """Positions computed that are not real tokens (0 when packed)."""
        return self.positions - self.tokens


def _doc_ids(model: HookedLlama, items: list) -> list[list[int]]:
    """Token ids of a chunk of documents: strings (tokenized together), ``{"text": …}`` /
    ``{"input_ids": …}`` mappings (a ``datasets`` row), or token id sequences / 1-D tensors."""
    out: list[list[int] | None] = [None] * len(items)
    texts, where = [], []
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            if "input_ids" in item:
                item = item["input_ids"]
            else:
                key = next((k for k in TEXT_KEYS if isinstance(item.get(k), str)), None)
                if key is None:
                    raise InputError(
                        f"a corpus record has none of the keys {', '.join(TEXT_KEYS)} or input_ids "
                        f"(it has {', '.join(map(str, list(item)[:5]))}); put the text under 'text'",
                        param="texts",
                    )
                item = item[key]
        if isinstance(item, str):
            if item.strip():
                texts.append(item)
                where.append(i)
            else:
                out[i] = []
        elif isinstance(item, torch.Tensor) and item.dim() <= 1 and not item.is_floating_point():
            out[i] = item.reshape(-1).tolist()
        elif isinstance(item, Sequence) and all(isinstance(t, int) for t in item):
            out[i] = list(item)
        else:
            raise InputError(
                f"cannot read a corpus item of type {type(item).__name__}; pass strings, "
                "{'text': ...} records or token id lists",
                param="texts",
            )
    if texts:
        tok = model._require_tokenizer()
        ids = tok(texts, add_special_tokens=True)["input_ids"]
        bos = tok.bos_token_id
        if getattr(model.cfg, "default_prepend_bos", None) and bos is not None:
            ids = [r if r[:1] == [bos] else [bos] + r for r in ids]
        for i, r in zip(where, ids):
            out[i] = list(r)
    return [r or [] for r in out]


def separator_id(model: HookedLlama) -> int | None:
    """The token put between packed documents: the tokenizer's EOS (None without a tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    return None if tok is None else tok.eos_token_id


def pack_rows(
    model: HookedLlama, docs: Iterable, row_len: int, *, stats: PackStats | None = None, chunk: int = 64
) -> Iterator[torch.Tensor]:
    """Rows (1-D int64 tensors) of exactly ``row_len`` tokens cut from the documents joined by
    ``separator_id(model)``; the last row holds what is left (never padded)."""
    if not isinstance(row_len, int) or row_len < 2:
        raise InputError(f"rows need at least 2 tokens, got {row_len!r}", param="max_tokens")
    sep = separator_id(model)
    stats = stats if stats is not None else PackStats()
    pending: list[int] = []
    it = iter(docs)
    while True:
        items = [x for _, x in zip(range(chunk), it)]
        if not items:
            break
        for ids in _doc_ids(model, items):
            if not ids:
                continue
            stats.docs += 1
            pending.extend(ids)
            if sep is not None:
                pending.append(sep)
            while len(pending) >= row_len:
                row, pending = pending[:row_len], pending[row_len:]
                stats.rows += 1
                yield torch.tensor(row, dtype=torch.long)
    if pending:
        stats.rows += 1
        yield torch.tensor(pending, dtype=torch.long)


def stop_layer(model: HookedLlama, names: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still computes every hook point in ``names`` (None: the whole model)."""
    layers = []
    for name in names:
        point = model.hook_registry.get(name)
        if point.layer is not None:
            layers.append(int(point.layer) + 1)
        elif point.name == "hook_embed":
            layers.append(0)
        else:
            return None
    return max(layers)


def capture(model: HookedLlama, tokens: torch.Tensor, names: Sequence[str], stop: int | None, dtype=None) -> dict:
    """One forward of ``tokens`` [B, P] (no padding), stopped at ``stop``; the named activations [B, P, d]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens.to(model.device),
            names_filter=list(names),
            stop_at_layer=stop,
            dtype=dtype,
            return_cache_object=False,
        )
    return cache


def harvest(
    model: HookedLlama,
    names: Sequence[str],
    rows: Iterable[torch.Tensor],
    *,
    batch_rows: int = 16,
    skip_first: bool = True,
    dtype: torch.dtype | None = None,
    stats: PackStats | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """For each forward over up to ``batch_rows`` rows of one length: ``{name: [n_kept, d]}``, the rows'
    kept positions in order (each row's first position left out with ``skip_first``), on the model's
    device, in ``dtype`` (default: the model's)."""
    if batch_rows < 1:
        raise InputError(f"batch_rows must be >= 1, got {batch_rows}", param="text_batch")
    names = list(names)
    stop = stop_layer(model, names)
    stats = stats if stats is not None else PackStats()
    group: list[torch.Tensor] = []

    def run(group: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = torch.stack(group)
        B, P = tokens.shape
        stats.positions += B * P
        stats.tokens += B * P
        cache = capture(model, tokens, names, stop, dtype)
        start = 1 if skip_first else 0
        stats.kept += B * (P - start)
        return {n: cache[n][:, start:].reshape(B * (P - start), -1) for n in names}

    for row in rows:
        if group and (len(group) == batch_rows or row.numel() != group[0].numel()):
            yield run(group)
            group = []
        group.append(row)
    if group:
        yield run(group)


# --------------------------------------------------------------------------- the optional disk cache
CACHE_FORMAT = "packed-activations-1"


class PackedCache:
    """Harvested activations on disk (``harvest_to_disk``): the kept tokens of the packed stream, in order,
    in safetensors shards of whole rows; ``total`` tokens; ``read(a, b)`` gives tokens ``[a, b)``."""

    def __init__(self, path: str | os.PathLike) -> None:
        from _core.writer import our_manifest

        self.path = Path(path)
        manifest = our_manifest(self.path)
        if manifest is None or manifest.get("cache_format") != CACHE_FORMAT:
            raise LoadError(f"{self.path} is not an activation cache of harvest_to_disk; harvest it again")
        self.key: str = manifest["key"]
        self.names: list[str] = list(manifest["names"])
        self.shards: list[tuple[str, int]] = [(str(f), int(n)) for f, n in manifest["shards"]]
        self.starts = [0]
        for _, n in self.shards:
            self.starts.append(self.starts[-1] + n)
        self.total = self.starts[-1]
        self.stats = PackStats(**manifest["stats"])

    def read(self, a: int, b: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Tokens ``[a, b)`` of the stream: ``{name: [b - a, d]}``."""
        from safetensors import safe_open

        names = list(names or self.names)
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for (file, n), start in zip(self.shards, self.starts):
            lo, hi = max(a - start, 0), min(b - start, n)
            if lo >= hi:
                continue
            with safe_open(str(self.path / file), "pt") as f:
                for name in names:
                    parts[name].append(f.get_slice(name)[lo:hi])
        return {n: torch.cat(p) for n, p in parts.items()}


def _stream_digest(model: HookedLlama, docs: Callable[[], Iterable], row_len: int) -> tuple[str, list[int]]:
    """(sha256 of the packed rows' token ids, each row's length): the texts' identity, by tokenizing only."""
    h = hashlib.sha256()
    lengths = []
    for row in pack_rows(model, docs(), row_len):
        h.update(row.numpy().tobytes())
        h.update(b"|")
        lengths.append(row.numel())
    return h.hexdigest(), lengths


def harvest_to_disk(
    model: HookedLlama,
    names: Sequence[str],
    docs: Callable[[], Iterable] | Sequence,
    path: str | os.PathLike,
    *,
    max_tokens: int = 128,
    skip_first: bool = True,
    text_batch: int = 16,
    rows_per_shard: int = 256,
    overwrite: bool = True,
    progress: bool = False,
) -> PackedCache:
    """The kept activations of ``names`` over the packed ``docs`` (a list, or a function returning a fresh
    iterable: they are read twice) written to ``path``, keyed by what made them: the model's weights, the
    names, the texts' token ids and the settings (``_core.writer.cache_key``). A cache with that key is
    reused as it is; any other is never read (``overwrite=True``, the default, replaces one this toolkit
    wrote; a directory of the user's is refused). Under torchrun each rank harvests its block of the shards
    and rank 0 seals the directory: the files equal a one-process run's."""
    from tqdm.auto import tqdm

    from _core import distributed as dist
    from _core.writer import Output, cache_key, cached, check_outputs, write_dir

    from .streaming import weights_sha256

    check_outputs([Output(path, kind="activations", overwrite=overwrite, param="cache_to_disk")])
    source = docs if callable(docs) else (lambda: docs)
    names = sorted(set(names))
    skip = int(skip_first)
    digest, lengths = _stream_digest(model, source, max_tokens)
    key = cache_key(
        kind=CACHE_FORMAT,
        model=weights_sha256(model),
        names=names,
        tokens=digest,
        max_tokens=max_tokens,
        skip_first=skip_first,
        text_batch=text_batch,
        rows_per_shard=rows_per_shard,
        dtype=str(model.dtype),
    )
    if cached(path, key):
        return PackedCache(path)
    n_shards = -(-len(lengths) // rows_per_shard)
    kept = [
        sum(max(n - skip, 0) for n in lengths[j * rows_per_shard : (j + 1) * rows_per_shard]) for j in range(n_shards)
    ]
    files = [f"shard_{j:05d}.safetensors" for j in range(n_shards)]
    mine = dist.shard(n_shards)
    stats = PackStats()
    ctx = write_dir(path, kind="activations", overwrite=overwrite, param="cache_to_disk") if dist.is_main() else None
    stage = ctx.__enter__() if ctx is not None else None
    try:
        where = Path(dist.broadcast(str(stage.path) if stage is not None else None))
        rows = pack_rows(model, source(), max_tokens, stats=stats)
        bar = tqdm(total=len(mine), desc="harvest_to_disk", disable=not progress or not dist.is_main(), leave=False)
        for j in range(n_shards):
            block = [r for _, r in zip(range(rows_per_shard), rows)]
            if j not in mine:
                continue
            parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
            for acts in harvest(model, names, block, batch_rows=text_batch, skip_first=skip_first, stats=stats):
                for n in names:
                    parts[n].append(acts[n].cpu())
            from safetensors.torch import save_file

            save_file({n: torch.cat(p).contiguous() for n, p in parts.items()}, str(where / files[j]))
            bar.update(1)
        bar.close()
        dist.barrier()
        total = dist.gather(vars(stats))  # every rank packed every row; each harvested its own
        if stage is not None:
            stage.meta.update(
                cache_format=CACHE_FORMAT,
                key=key,
                names=names,
                shards=[[f, n] for f, n in zip(files, kept)],
                stats={k: (total[0][k] if k in ("docs", "rows") else sum(s[k] for s in total)) for k in total[0]},
            )
    except BaseException as exc:
        if ctx is not None:
            ctx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if ctx is not None:
        ctx.__exit__(None, None, None)
    dist.barrier()
    return PackedCache(path)
