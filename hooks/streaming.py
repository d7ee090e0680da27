"""Streaming activations over many prompts to disk, with bounded memory.

``cache_to_disk`` writes through the staged writer (``_core.writer.write_dir``): every argument is checked
and the output validated before the first forward pass; the directory appears only when complete, with a
``scalpel_manifest.json`` holding every shard's sha256 and the cache's ``key``
(``activation_cache_key``: the model's weights, the hook names, the inputs and the settings). A cache is
reused only when that key matches (``_core.writer.cached``); ``overwrite=True`` replaces only a cache (or
another output) of llama-scalpel that is unchanged since, never a directory of the user's.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from _core.readers import read_json_object, register_loader
from _core.writer import cache_key, tensors_sha256, write_dir

from .errors import InputError, LoadError

if TYPE_CHECKING:
    from .model import HookedLlama

_MODEL_SHA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (tensor versions, sha256)


def weights_sha256(model: HookedLlama) -> str:
    """sha256 of the model's weights (names, dtypes, shapes, bytes); recomputed only after a weight
    changed (PyTorch's in-place version counters) or was replaced."""
    state = model.state_dict()
    versions = tuple((n, t.data_ptr(), t._version) for n, t in state.items())
    memo = _MODEL_SHA.get(model)
    if memo is not None and memo[0] == versions:
        return memo[1]
    sha = tensors_sha256(state)
    _MODEL_SHA[model] = (versions, sha)
    return sha


def _names(model: HookedLlama, names) -> list[str]:
    return sorted(p.name for p in model._cache_points(names))


def activation_cache_key(
    model: HookedLlama,
    dataset: Sequence,
    names,
    *,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    stop_at_layer: int | None = None,
) -> str:
    """The key ``cache_to_disk`` records for these arguments: a cache whose manifest holds another key was
    made from another model, other inputs or other settings (``_core.writer.cached(path, key)``)."""
    return cache_key(
        kind="activations",
        model=weights_sha256(model),
        names=_names(model, names),
        dataset=list(dataset),
        batch_size=int(batch_size),
        dtype=str(dtype),
        stop_at_layer=stop_at_layer,
    )


def cache_to_disk(
    model: HookedLlama,
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
    ``index.json`` (names, shard list, rows per shard) and ``scalpel_manifest.json`` (sha256 of every file,
    and ``key``: ``activation_cache_key`` of the call). The directory appears only when complete.
    ``stop_at_layer`` stops each forward there (when the names are all in earlier layers).
    ``overwrite=True`` replaces only an unchanged output of llama-scalpel (or an empty directory).
    ``progress=True`` shows a bar on stderr (off by default, as every library function's).

    Example::

        cache_to_disk(model, texts, lambda n: n.endswith("resid_post"), "acts/")
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}", param="batch_size")
    if isinstance(dataset, (str, bytes)):
        raise InputError("dataset is a list of prompts (or token tensors), not one string; wrap it in a list")
    items = list(dataset)
    if not items:
        raise InputError("the dataset is empty; pass at least one prompt", param="dataset")
    names_list = _names(model, names)  # unknown names: one line, before any work
    key = activation_cache_key(
        model, items, names_list, batch_size=batch_size, dtype=dtype, stop_at_layer=stop_at_layer
    )
    shards, rows, cached_names = [], [], None
    with write_dir(path, kind="activations", overwrite=overwrite, param="path") as stage:
        batches = range(0, len(items), batch_size)
        for n, start in enumerate(tqdm(batches, desc="cache_to_disk", disable=not progress, leave=False)):
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
                    names_filter=names_list,
                    device="cpu",
                    dtype=dtype,
                    stop_at_layer=stop_at_layer,
                )
            tensors = dict(cache.items())
            tensors["attention_mask"] = mask.cpu()
            cached_names = sorted(cache.keys())
            shard = f"shard_{n:05d}.safetensors"
            stage.save_tensors(shard, tensors)
            shards.append(shard)
            rows.append(len(chunk))
            del cache, tensors
        stage.write_json("index.json", {"names": cached_names, "shards": shards, "rows": rows})
        stage.meta["key"] = key
    return Path(path)


def load_from_disk(path: str | os.PathLike, name: str) -> list[torch.Tensor]:
    """The activation ``name`` from every shard written by ``cache_to_disk`` (a list, one per shard)."""
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    if not root.is_dir():
        raise LoadError(f"{root} is not a directory written by cache_to_disk", param="path")
    fix = "it was not written by cache_to_disk, or was changed since; write the cache again"
    index = read_json_object(root / "index.json", LoadError, "activation cache index", fix=fix, param="path")
    names, shards = index.get("names"), index.get("shards")
    if not (
        isinstance(names, list)
        and all(isinstance(n, str) for n in names)
        and isinstance(shards, list)
        and all(isinstance(s, str) and s and "/" not in s and "\\" not in s and s not in (".", "..") for s in shards)
    ):
        raise LoadError(f"{root / 'index.json'} does not list names and shards; {fix}", param="path")
    if name not in names and name != "attention_mask":
        raise InputError(f"{name!r} is not in {root}; it holds {', '.join(names[:5])}…", param="name")
    out = []
    for shard in shards:
        try:
            with safe_open(str(root / shard), "pt") as f:
                out.append(f.get_tensor(name))
        except (SafetensorError, OSError) as exc:
            raise LoadError(f"cannot read {root / shard} ({type(exc).__name__}); {fix}", param="path") from None
    return out


def _sample_cache() -> dict[str, bytes]:
    """A valid one-shard activation cache (for the loader registry's fuzz test)."""
    from safetensors.torch import save

    index = b'{"names": ["blocks.0.hook_resid_post"], "shards": ["shard_00000.safetensors"], "rows": [1]}'
    shard = save({"blocks.0.hook_resid_post": torch.zeros(1, 2, 4), "attention_mask": torch.ones(1, 2)})
    return {"index.json": index, "shard_00000.safetensors": shard}


register_loader(
    "activation cache",
    lambda path: load_from_disk(path, "attention_mask"),
    kind="dir",
    files=("index.json",),
    sample=_sample_cache,
)
