"""Where ``run_with_cache`` keeps activations: in memory, spilled to pinned CPU memory or to disk.

A store receives each activation as its hook point produces it (``put``; ``alias`` for the very tensor
cached at the point before) and hands the cache its mapping at the end (``finish``):

- ``KeepStore`` keeps the forward's own tensors (detached views, moved or cast only when asked): no copy.
  On a GPU the caching allocator reuses memory across calls by itself.
- ``HeldStore`` (the CPU default) is ``KeepStore`` that also holds the last cache's tensors until the next
  cache exists. glibc returns a freed block at the top of its heap to the operating system, and a cache
  dropped before the next call is exactly that, so every call faulted its whole cache in afresh (the
  kernel zeroing each page). Freed only after the next cache is made, the old tensors leave a hole
  below it that glibc keeps and the following call reuses: after two calls a cache costs the page
  faults of a plain forward, with no copy, in a loop or interleaved with other work. The price is the
  memory of one cache held after it is dropped, until the next call or ``release_buffers()``.
- ``PinnedStore`` (``device="cpu"`` from a GPU forward) copies each activation, without waiting, into a
  pinned CPU buffer from a pool reused across calls; ``finish`` waits once. The GPU holds one
  activation at a time.
- ``DiskStore`` (``device="disk"``) spills each layer's activations to a file as soon as the layer is done
  (through pinned buffers from a GPU), in a private directory removed when the cache is gone; reading
  ``cache[name]`` memory-maps the tensor (the page cache holds it, not the process). A cache larger than
  the GPU and the host's memory works.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import torch

from .errors import InputError

ALIGN = 64  # byte alignment of each tensor in a spill file (any dtype views it in place)


# --------------------------------------------------------------------------- reused buffers
class BufferPool:
    """Flat buffers by (device, dtype, size, pinned), reused once nothing else uses their memory.

    A buffer is free when its storage's only users are the pool's own reference (PyTorch's storage use
    count). Buffers left free through two whole calls are dropped, so the pool keeps about what the last
    calls needed beyond the caches still alive."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, list[list]] = {}  # key -> [[tensor, last call used], …]
        self._call = 0
        self._lock = threading.Lock()

    @staticmethod
    def _free(t: torch.Tensor) -> bool:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2  # the pool's tensor + this query

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, pinned: bool = False) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        key = (device, dtype, numel, pinned)
        with self._lock:
            slots = self._buffers.setdefault(key, [])
            for slot in slots:
                if slot[1] != self._call and self._free(slot[0]):
                    slot[1] = self._call
                    return slot[0].view(shape)
            buf = torch.empty(numel, dtype=dtype, device=device, pin_memory=pinned)
            slots.append([buf, self._call])
            return buf.view(shape)

    def next_call(self) -> None:
        """Start a call: buffers free and unused for two calls go back to the allocator."""
        with self._lock:
            self._call += 1
            for key, slots in list(self._buffers.items()):
                slots[:] = [s for s in slots if s[1] >= self._call - 2 or not self._free(s[0])]
                if not slots:
                    del self._buffers[key]

    def release(self) -> int:
        """Drop every free buffer; returns the bytes released."""
        freed = 0
        with self._lock:
            for key, slots in list(self._buffers.items()):
                keep = []
                for s in slots:
                    if self._free(s[0]):
                        freed += s[0].numel() * s[0].element_size()
                    else:
                        keep.append(s)
                slots[:] = keep
                if not slots:
                    del self._buffers[key]
        return freed

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s[0].numel() * s[0].element_size() for slots in self._buffers.values() for s in slots)


POOL = BufferPool()


def release_buffers() -> int:
    """Free the memory ``run_with_cache`` keeps for reuse that no cache uses now; returns the bytes freed
    from the pool (the last CPU cache's tensors held by ``HeldStore`` are let go too)."""
    _HELD.clear()
    return POOL.release()


# --------------------------------------------------------------------------- stores
class KeepStore:
    """The forward's own tensors (moved to ``device`` / cast to ``dtype`` when asked)."""

    def __init__(self, device=None, dtype: torch.dtype | None = None) -> None:
        self.device, self.dtype = device, dtype
        self.data: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}

    def put(self, name: str, t: torch.Tensor, layer: int | None = None) -> None:
        self.data[name] = (
            t if self.device is None and self.dtype is None else t.to(device=self.device, dtype=self.dtype)
        )

    def alias(self, name: str, of: str) -> None:
        """``name`` holds the very tensor ``of`` holds (stored once)."""
        self.aliases[name] = of

    def finish(self, output=None) -> Mapping[str, torch.Tensor]:
        for name, of in self.aliases.items():
            self.data[name] = self.data[of]
        return self.data


class HeldStore(KeepStore):
    """``KeepStore`` whose tensors stay alive until the next such cache has been made (``finish``): the
    memory a dropped cache frees is then below the new one in the heap, where glibc keeps it for the
    call after, instead of at its top, where it is returned to the operating system (and faulted in
    afresh by the next cache). No copy; the last cache's memory is held until ``release_buffers()``."""

    def finish(self, output=None) -> Mapping[str, torch.Tensor]:
        data = super().finish(output)
        _HELD[:] = [data]  # the previous cache's tensors are freed only now, after this one's exist
        return data


_HELD: list = []


class PinnedStore(KeepStore):
    """Copies from the GPU into reused pinned CPU buffers without waiting; ``finish`` waits once."""

    def __init__(self, dtype: torch.dtype | None = None, pool: BufferPool = POOL) -> None:
        super().__init__(torch.device("cpu"), dtype)
        self.pool = pool
        self.devices: set[torch.device] = set()
        pool.next_call()

    def put(self, name: str, t: torch.Tensor, layer: int | None = None) -> None:
        self.data[name] = self.copy(t)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            return t.to(device="cpu", dtype=self.dtype)
        src = t if self.dtype is None else t.to(self.dtype)
        buf = self.pool.take(src.shape, src.dtype, torch.device("cpu"), pinned=True)
        buf.copy_(src, non_blocking=True)
        self.devices.add(t.device)
        return buf

    def wait(self) -> None:
        for device in self.devices:
            torch.cuda.current_stream(device).synchronize()
        self.devices.clear()

    def finish(self, output=None) -> Mapping[str, torch.Tensor]:
        self.wait()
        return super().finish(output)


class DiskStore:
    """Per-layer spill files in a private directory; ``finish`` gives a memory-mapping ``DiskCache``."""

    def __init__(self, dtype: torch.dtype | None = None, spill_dir=None) -> None:
        parent = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
        if not parent.is_dir():
            raise InputError(f"spill_dir {parent} is not a directory; pass an existing directory", param="spill_dir")
        self.root = Path(tempfile.mkdtemp(prefix="scalpel-cache-", dir=parent))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.root), True)  # until a DiskCache owns it
        self.dtype = dtype
        self.index: dict[str, tuple[str, int, torch.dtype, tuple[int, ...]]] = {}
        self.pending: list[tuple[str, torch.Tensor | str]] = []  # the current layer's activations (CPU) or aliases
        self.layer: object = None
        self.files = 0
        self.pinned = PinnedStore(dtype)

    def put(self, name: str, t: torch.Tensor, layer: int | None = None) -> None:
        if layer != self.layer:
            self._flush()
            self.layer = layer
        self.pending.append((name, self.pinned.copy(t) if t.device.type == "cuda" else t.to(dtype=self.dtype)))

    def alias(self, name: str, of: str) -> None:
        self.pending.append((name, of))

    def _flush(self) -> None:
        if not self.pending:
            return
        self.pinned.wait()
        file = f"part_{self.files:05d}.bin"
        self.files += 1
        offset = 0
        with open(self.root / file, "wb") as f:
            for name, t in self.pending:
                if isinstance(t, str):
                    self.index[name] = self.index[t]
                    continue
                t = t.contiguous()
                size = t.numel() * t.element_size()
                if size:
                    f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
                pad = -size % ALIGN
                f.write(b"\0" * pad)
                self.index[name] = (file, offset, t.dtype, tuple(t.shape))
                offset += size + pad
        self.pending = []

    def finish(self, output=None) -> "DiskCache":
        self._flush()
        self._cleanup.detach()
        return DiskCache(self.root, self.index)


class DiskCache(Mapping):
    """name -> tensor memory-mapped from the spill files (copy-on-write: writes never reach the file).
    The directory is removed when this mapping is garbage-collected."""

    def __init__(self, root: Path, index: dict) -> None:
        self.root = root
        self.index = index
        self._maps: dict[str, torch.Tensor] = {}
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(root), True)

    def _file(self, file: str) -> torch.Tensor:
        if file not in self._maps:
            path = self.root / file
            self._maps[file] = torch.from_file(str(path), shared=False, size=os.path.getsize(path), dtype=torch.uint8)
        return self._maps[file]

    def __getitem__(self, name: str) -> torch.Tensor:
        file, offset, dtype, shape = self.index[name]
        numel = 1
        for d in shape:
            numel *= d
        raw = self._file(file)[offset : offset + numel * dtype.itemsize]
        return raw.view(dtype).view(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, name: object) -> bool:
        return name in self.index

    @property
    def disk_bytes(self) -> int:
        """Bytes the spill files take."""
        return sum(f.stat().st_size for f in self.root.iterdir())


def store_for(device, dtype: torch.dtype | None, model_device: torch.device, spill_dir=None):
    """The store ``run_with_cache(device=…, dtype=…, spill_dir=…)`` uses (see the module docstring)."""
    if spill_dir is not None and device != "disk":
        raise InputError("spill_dir is where device='disk' spills; pass device='disk' with it", param="spill_dir")
    if device == "disk":
        return DiskStore(dtype, spill_dir)
    target = torch.device(device) if device is not None else model_device
    if target.type == "cpu" and model_device.type == "cuda":
        return PinnedStore(dtype)
    if target.type == "cpu" and model_device.type == "cpu" and HOLD_LAST:
        return HeldStore(dtype=dtype)
    return KeepStore(device, dtype)


HOLD_LAST = True  # CPU caches: hold the last cache's tensors until the next one exists (False: as before)
