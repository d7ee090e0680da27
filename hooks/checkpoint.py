"""The weights of a Hugging Face checkpoint directory, read tensor by tensor.

``Checkpoint.open(directory)`` reads only the safetensors headers (names, dtypes, shapes and byte
ranges, each checked against the file's size), so everything about a checkpoint is known and checked
before a weight is read. ``read(name)`` then maps that one tensor's bytes copy-on-write (as safetensors
and transformers do): no copy is made, the pages are the operating system's page cache until someone
writes to the tensor, and the map goes when the tensor does (one map per tensor, so a tensor cast or moved
to a GPU frees its pages at once; a whole-file map would hold every page read so far until it is closed).
As with any memory-mapped checkpoint, a file changed in place while a model uses it changes (or, truncated,
faults) the tensors it holds; the library's own writer never writes in place. Pickle
checkpoints (``pytorch_model*.bin``, only with ``allow_pickle=True``) are memory-mapped by
``torch.load(mmap=True, weights_only=True)``.

Example::

    ckpt = Checkpoint.open(Path("Llama-3.2-1B"))
    ckpt.entries["model.norm.weight"].shape        # (2048,)
    w = ckpt.read("model.norm.weight")            # a CPU tensor in the file's dtype
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from _core.readers import read_json_object

from .errors import LoadError

# safetensors dtype names -> torch dtypes (names not listed here are refused as not floating point)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
HEADER_LIMIT = 100 << 20  # safetensors' own ceiling on the JSON header
CORRUPT = "not a complete safetensors file; the file is corrupt or truncated, re-download or re-export it"
INDEX_FIX = "re-download or re-export the checkpoint"


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint: where it is and what it holds (``dtype`` None: not a torch dtype)."""

    name: str
    file: Path
    dtype: torch.dtype | None
    dtype_name: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in ``file``
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class Checkpoint:
    """The tensors of a checkpoint directory by HF name (``entries``), read one at a time (``read``)."""

    def __init__(self, directory: Path, entries: dict[str, Entry], pickled: dict[str, torch.Tensor] | None = None):
        self.directory = directory
        self.entries = entries
        self._pickled = pickled

    @property
    def safetensors(self) -> bool:
        """The weights are safetensors files (which accelerate's disk offload can read in place)."""
        return self._pickled is None

    @property
    def files(self) -> list[Path]:
        return sorted({e.file for e in self.entries.values()})

    def floating_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point tensor (what transformers' ``dtype="auto"`` falls back to)."""
        for entry in self.entries.values():
            if entry.dtype is not None and entry.dtype.is_floating_point:
                return entry.dtype
        return None

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, directory: Path, allow_pickle: bool = False) -> "Checkpoint":
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            weight_map = read_json_object(index, LoadError, "checkpoint index", fix=INDEX_FIX).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) and f and os.path.basename(f) == f and f not in (".", "..")
                for f in weight_map.values()
            ):
                raise LoadError(f"{index} is corrupt (no weight_map of shard file names); {INDEX_FIX}")
            names = sorted(set(weight_map.values()))
        elif single.is_file():
            names = [single.name]
        else:
            return cls._open_pickles(directory, allow_pickle)
        entries: dict[str, Entry] = {}
        for name in names:
            file = directory / name
            if not file.is_file():
                raise LoadError(f"shard {name} listed in the index is missing from {directory}; re-download it")
            entries.update(read_header(file))
        return cls(directory, entries)

    @classmethod
    def _open_pickles(cls, directory: Path, allow_pickle: bool) -> "Checkpoint":
        pickles = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
        if not pickles:
            raise LoadError(
                f"{directory} has no model.safetensors (or index) and no pytorch_model.bin; "
                "it is not a complete checkpoint"
            )
        if not allow_pickle:
            raise LoadError(
                f"{directory} has only pickle weights ({pickles[0]}), which can run code when loaded; "
                "convert it to safetensors, or pass allow_pickle=True if you trust the file",
                param="allow_pickle",
            )
        state: dict[str, torch.Tensor] = {}
        entries: dict[str, Entry] = {}
        for name in pickles:
            part = torch.load(directory / name, map_location="cpu", weights_only=True, mmap=True)
            for key, t in part.items():
                state[key] = t
                entries[key] = Entry(key, directory / name, t.dtype, str(t.dtype), tuple(t.shape), 0, 0)
        return cls(directory, entries, pickled=state)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "Checkpoint":
        """A state dict already in memory, read through the same interface."""
        entries = {k: Entry(k, Path(), t.dtype, str(t.dtype), tuple(t.shape), 0, 0) for k, t in state.items()}
        return cls(Path(), entries, pickled=dict(state))

    # ----------------------------------------------------------------- reading
    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``name`` on the CPU, in the file's dtype: a copy-on-write map of its bytes (writable;
        writes stay in the process), or its own memory where the bytes cannot be mapped in place.
        ``rows=(a, b)``: only rows ``a:b`` of its first dimension (a map of those bytes alone, so a large
        matrix can be used slice by slice without ever being resident whole)."""
        if self._pickled is not None:
            t = self._pickled[name]
            return t if rows is None else t[rows[0] : rows[1]]
        entry = self.entries[name]
        if entry.dtype is None:
            raise LoadError(
                f"{entry.file}: {name} is {entry.dtype_name}, which torch cannot hold; re-export it as bf16/f16/f32"
            )
        shape, start, end = entry.shape, entry.start, entry.end
        if rows is not None:
            a, b = rows
            if not (shape and 0 <= a <= b <= shape[0]):
                raise ValueError(f"rows {rows} out of range for {name} of shape {shape}")
            row_bytes = (entry.nbytes // shape[0]) if shape[0] else 0
            shape, start, end = (b - a, *shape[1:]), entry.start + a * row_bytes, entry.start + b * row_bytes
        if end > start and start % entry.dtype.itemsize == 0:
            first = start - start % mmap.ALLOCATIONGRANULARITY
            try:
                with open(entry.file, "rb") as f:
                    view = mmap.mmap(f.fileno(), end - first, access=mmap.ACCESS_COPY, offset=first)
            except (OSError, ValueError) as exc:
                raise _unreadable(entry.file, exc) from exc
            flat = torch.frombuffer(
                view, dtype=entry.dtype, count=(end - start) // entry.dtype.itemsize, offset=start - first
            )
            return flat.view(shape)
        return self._pread(entry.file, shape, entry.dtype, start, end)

    @staticmethod
    def _pread(file: Path, shape: tuple[int, ...], dtype: torch.dtype, start: int, end: int) -> torch.Tensor:
        """Bytes ``start:end`` of ``file`` into a tensor of its own (offsets a map cannot take)."""
        out = torch.empty(shape, dtype=dtype)
        if end > start:
            buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
            try:
                with open(file, "rb", buffering=0) as f:
                    done = 0
                    while done < end - start:
                        n = os.preadv(f.fileno(), [buffer[done:]], start + done)
                        if n <= 0:
                            raise LoadError(f"cannot read {file}: {CORRUPT}")
                        done += n
            except LoadError:
                raise
            except OSError as exc:
                raise _unreadable(file, exc) from exc
        return out

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor (a whole state dict in memory: for small checkpoints)."""
        return {name: self.read(name) for name in self.entries}


def _unreadable(file: Path, exc: Exception) -> LoadError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return LoadError(f"cannot read {file}: {reason}; check the file and its permissions")


def read_header(file: Path) -> dict[str, Entry]:
    """The entries of one safetensors file from its header alone, each byte range checked against the
    dtype, the shape and the file's size (a truncated or damaged file fails here, before any read)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LoadError(f"cannot read {file}: {CORRUPT}")
            (n,) = struct.unpack("<Q", head)
            if n > min(HEADER_LIMIT, size - 8):
                raise LoadError(f"cannot read {file}: {CORRUPT}")
            raw = f.read(n)
    except LoadError:
        raise
    except OSError as exc:  # the file system's reason (permission denied, I/O error …)
        raise LoadError(f"cannot read {file}: {exc.strerror or exc}; check the file and its permissions") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoadError(f"cannot read {file}: {CORRUPT}") from None
    if not isinstance(header, dict):
        raise LoadError(f"cannot read {file}: {CORRUPT}")
    base, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = (
                isinstance(dtype_name, str)
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(begin, int)
                and isinstance(end, int)
                and 0 <= begin <= end <= data_size
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise LoadError(f"cannot read {file}: {CORRUPT}")
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        numel = 1
        for d in shape:
            numel *= d
        if dtype is not None and numel * dtype.itemsize != end - begin:
            raise LoadError(f"cannot read {file}: {CORRUPT}")
        entries[name] = Entry(name, file, dtype, dtype_name, shape, base + begin, base + end)
    return entries
