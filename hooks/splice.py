"""Splicing a module into the forward pass at a hook point.

``model.splice("blocks.3.hook_resid_post", module)`` replaces the tensor at that hook point by
``module(tensor)`` inside a ``with`` block. A module that owns hook points (``module.hook_points()``
returning ``HookPoint`` objects) gets them named ``<hook point>.<local name>`` in the model for the
duration, so they take hooks, appear in ``model.hook_names()`` and in ``run_with_cache`` — the names a
sparse autoencoder spliced by SAELens's ``HookedSAETransformer`` has
(``blocks.3.hook_resid_post.hook_sae_acts_post``). ``read=`` splices a module that reads one hook point
and writes another (a transcoder): it is called as ``module(x_read, x_write)`` at the write point, its
hook points named under the read point.

The module runs before any hook attached at the write point, so those hooks see its output. A splice
acts on the forward passes of the thread that opened the block only (as a ``hooks()`` block does).
Nothing here knows what the module computes; ``hooks`` stays free of sparse autoencoders.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Iterable

import torch

from .errors import HookError
from .hook_points import HookHandle, HookPoint, RunContext

if TYPE_CHECKING:
    from .model import HookedLlama


def _spliced_names(model: HookedLlama) -> set:
    registry = model.hook_registry
    if not hasattr(registry, "spliced"):
        registry.spliced = set()
    return registry.spliced


@contextlib.contextmanager
def splice(model: HookedLlama, hook_name: str, module, *, read: str | None = None):
    """Context manager: ``module`` replaces the tensor at ``hook_name`` (see the module docstring)."""
    with splice_all(model, [(hook_name, module, read)]):
        yield model


@contextlib.contextmanager
def splice_all(model: HookedLlama, entries: Iterable[tuple[str, object, str | None]]):
    """Several splices at once, all undone on exit (also after an exception)."""
    registry = model.hook_registry
    spliced = _spliced_names(model)
    added_points: list[HookPoint] = []
    handles: list[HookHandle] = []
    taken: list[str] = []
    try:
        for write, module, read in entries:
            if not callable(module):
                raise HookError(f"cannot splice {type(module).__name__} at {write}: it is not callable")
            point = registry.get(write)
            read_point = registry.get(read) if read is not None else None
            if write in spliced:
                raise HookError(f"{write} already has a module spliced in; splice one module per hook point")
            spliced.add(write)
            taken.append(write)
            prefix = read if read is not None else write
            for hp in getattr(module, "hook_points", lambda: [])():
                full = f"{prefix}.{hp.local}"
                if full in registry.points:
                    raise HookError(f"hook name {full} is already in use; splice the module at another hook point")
                hp.bind(full, model.ctx)
                registry.points[full] = hp
                added_points.append(hp)
            handles.extend(_attach(point, module, read_point))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for hp in added_points:
            registry.points.pop(hp.name, None)
            for h in hp.fwd_hooks + hp.bwd_hooks:  # hooks never outlive the splice
                h.remove()
            hp.bind(hp.local, RunContext())
        for name in taken:
            spliced.discard(name)


def _attach(point: HookPoint, module, read_point: HookPoint | None) -> list[HookHandle]:
    """The splice's hooks, owned by this thread: another thread's forward passes never run them."""
    thread = threading.get_ident()
    if read_point is None:

        def run_module(x: torch.Tensor, hook) -> torch.Tensor:
            return module(x)

        handle = HookHandle(point, run_module, "fwd", thread=thread)
        point.fwd_hooks.insert(0, handle)  # before any hook already there
        return [handle]

    seen: dict[str, torch.Tensor] = {}

    def remember(x: torch.Tensor, hook) -> None:
        seen["x"] = x

    def run_module_read(x: torch.Tensor, hook) -> torch.Tensor:
        if "x" not in seen:
            raise HookError(f"{read_point.name} did not run before {point.name}; the read point must come first")
        return module(seen.pop("x"), x)

    remember_handle = HookHandle(read_point, remember, "fwd", thread=thread)
    read_point.fwd_hooks.append(remember_handle)  # after the hooks there: reads what the model passes on
    handle = HookHandle(point, run_module_read, "fwd", thread=thread)
    point.fwd_hooks.insert(0, handle)
    return [remember_handle, handle]
