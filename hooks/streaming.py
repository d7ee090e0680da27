"""Streaming activations over many prompts to disk, with bounded memory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import InputError


def cache_to_disk(
    model,
    dataset: Sequence | Iterable,
    names,
    path: str | os.PathLike,
    *,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    stop_at_layer: int | None = None,
) -> Path:
    """Run ``model`` over ``dataset`` (texts, chat messages or token tensors) in batches and write the
    activations ``names`` selects to safetensors shards, one shard per batch, never holding more than one
    batch in memory.

    Layout of ``path``: ``shard_00000.safetensors`` … with tensors named like the hook points
    (``blocks.3.hook_resid_post`` [batch, pos, d]) plus ``attention_mask`` (text rows are left-padded),
    and ``index.json`` (names, shard list, rows per shard). The directory appears only when complete.
    ``stop_at_layer`` stops each forward there (when the names are all in earlier layers).

    Example::

        cache_to_disk(model, texts, lambda n: n.endswith("resid_post"), "acts/")
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    target = Path(path)
    if target.exists():
        if not overwrite:
            raise InputError(f"{target} exists; pass overwrite=True or choose another path")
        shutil.rmtree(target)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    items = list(dataset)
    if not items:
        raise InputError("the dataset is empty; pass at least one prompt")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".scalpel-tmp-", dir=target.parent))
    shards, rows, cached_names = [], [], None
    show = progress if progress is not None else None
    try:
        batches = range(0, len(items), batch_size)
        for n, start in enumerate(tqdm(batches, desc="cache_to_disk", disable=show is False, leave=False)):
            chunk = items[start : start + batch_size]
            if isinstance(chunk[0], torch.Tensor):
                tokens = torch.nn.utils.rnn.pad_sequence(
                    [t.reshape(-1) for t in chunk], batch_first=True, padding_side="left"
                )
                lengths = torch.tensor([t.numel() for t in chunk])
                mask = (torch.arange(tokens.shape[1])[None] >= tokens.shape[1] - lengths[:, None]).long()
            else:
                tokens, mask = model.tokenize(chunk)
            with torch.no_grad():
                _, cache = model.run_with_cache(
                    tokens,
                    attention_mask=mask,
                    names_filter=names,
                    device="cpu",
                    dtype=dtype,
                    stop_at_layer=stop_at_layer,
                )
            tensors = {k: v.contiguous() for k, v in cache.items()}
            tensors["attention_mask"] = mask.cpu()
            cached_names = sorted(cache.keys())
            shard = f"shard_{n:05d}.safetensors"
            save_file(tensors, str(tmp / shard))
            shards.append(shard)
            rows.append(len(chunk))
            del cache, tensors
        (tmp / "index.json").write_text(json.dumps({"names": cached_names, "shards": shards, "rows": rows}, indent=1))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_from_disk(path: str | os.PathLike, name: str) -> list[torch.Tensor]:
    """The activation ``name`` from every shard written by ``cache_to_disk`` (a list, one per shard)."""
    from safetensors import safe_open

    root = Path(path)
    index = json.loads((root / "index.json").read_text())
    if name not in index["names"] and name != "attention_mask":
        raise InputError(f"{name!r} is not in {root}; it holds {', '.join(index['names'][:5])}…")
    out = []
    for shard in index["shards"]:
        with safe_open(str(root / shard), "pt") as f:
            out.append(f.get_tensor(name))
    return out
