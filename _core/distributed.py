"""Data parallelism under ``torchrun``: whether this process is one of several, and the few collectives the
heavy loops need to split their work over the ranks and gather it.

A loop is distributed when ``torch.distributed`` is initialised with more than one process, or when the
launch environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) says so — then the first
heavy loop initialises the process group itself: NCCL for CUDA tensors and gloo for CPU tensors
(``"cpu:gloo,cuda:nccl"`` on a machine with GPUs, ``"gloo"`` without), and each process takes the GPU of
its ``LOCAL_RANK``. Without either, every function here is the one-process identity.

Work is split in contiguous blocks of the loop's own units (``shard``), so a rank computes exactly what
the one-process loop computes for those units, and ``gather`` puts the blocks back in order: the result
equals a one-process run's. Inside ``local()`` nothing is distributed (for work one rank does alone, e.g.
under ``if rank() == 0:`` — a collective there would wait for ranks that never come).

This module imports torch and nothing of ours.
"""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_LOCAL: ContextVar[bool] = ContextVar("scalpel_local", default=False)


def launched() -> bool:
    """Whether the launch environment of ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) is present."""
    return all(k in os.environ for k in LAUNCH_ENV)


def backend() -> str:
    """The process-group backend this machine uses: NCCL for CUDA tensors, gloo for CPU tensors."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init() -> bool:
    """Initialise the process group when launched by torchrun and nobody has yet; True when the work is
    split over more than one process (False inside ``local()``)."""
    if _LOCAL.get() or not dist.is_available():
        return False
    if not dist.is_initialized():
        if not launched() or int(os.environ["WORLD_SIZE"]) < 2:
            return False
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend())
    return dist.get_world_size() > 1


def enabled() -> bool:
    """Whether the heavy loops split their work now (initialises the process group if needed)."""
    return init()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    """How many processes share the work (1 when not distributed)."""
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (always, when not distributed): the one that writes files."""
    return rank() == 0


def device() -> torch.device:
    """The device this process should put its model on: ``cuda:LOCAL_RANK`` with GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside, nothing is distributed: each process runs what it is asked alone (no collectives)."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def shard(n: int) -> range:
    """This rank's contiguous block of ``range(n)`` (blocks differ in size by at most one, in rank order)."""
    w, r = world_size(), rank()
    return range(r * n // w, (r + 1) * n // w)


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when not distributed)."""
    if not enabled():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_blocks(block: Sequence[T]) -> list[T]:
    """The ranks' ``shard`` blocks of a result concatenated in order: the whole list, on every rank."""
    return [x for part in gather(list(block)) for x in part]


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` reduced over the ranks in place (``op``: sum, max or min) and returned."""
    if enabled():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def all_reduce_many(tensors: Sequence[torch.Tensor], op: str = "sum") -> None:
    """Reduce several tensors of one dtype and device with one collective (e.g. all gradients of a step)."""
    if not enabled() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce(flat, op)
    at = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[at : at + n].view_as(t))
        at += n


def barrier() -> None:
    """Wait until every rank gets here."""
    if enabled():
        dist.barrier()
