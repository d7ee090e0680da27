"""Hook points: named places in the forward pass where a function can read or replace a tensor.

A ``HookPoint`` is a plain object, not an ``nn.Module``: a call with no hook attached is one
attribute test, so an unhooked forward costs what the plain maths costs. Hooks are plain functions
``fn(tensor, hook) -> tensor | None``; ``hook`` is the HookPoint (``hook.name``, ``hook.layer``,
``hook.positions``).
"""

from __future__ import annotations

import contextlib
import difflib
import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch

from .errors import HookError

HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]
NameOrFilter = Union[str, Callable[[str], bool]]

# Short names accepted by ``act_name``: short name -> (template, is_per_layer).
_ACT_NAMES = {
    "embed": "hook_embed",
    "logits": "hook_logits",
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "q": "blocks.{}.attn.hook_q",
    "k": "blocks.{}.attn.hook_k",
    "v": "blocks.{}.attn.hook_v",
    "rot_q": "blocks.{}.attn.hook_rot_q",
    "rot_k": "blocks.{}.attn.hook_rot_k",
    "attn_scores": "blocks.{}.attn.hook_attn_scores",
    "scores": "blocks.{}.attn.hook_attn_scores",
    "pattern": "blocks.{}.attn.hook_pattern",
    "attn": "blocks.{}.attn.hook_pattern",
    "z": "blocks.{}.attn.hook_z",
    "result": "blocks.{}.attn.hook_result",
    "pre": "blocks.{}.mlp.hook_pre",
    "gate": "blocks.{}.mlp.hook_gate",
    "pre_linear": "blocks.{}.mlp.hook_pre_linear",
    "post": "blocks.{}.mlp.hook_post",
    "ln1_scale": "blocks.{}.ln1.hook_scale",
    "ln1_normalized": "blocks.{}.ln1.hook_normalized",
    "ln2_scale": "blocks.{}.ln2.hook_scale",
    "ln2_normalized": "blocks.{}.ln2.hook_normalized",
    "ln_final_scale": "ln_final.hook_scale",
    "ln_final_normalized": "ln_final.hook_normalized",
}


def act_name(name: str, layer: int | None = None) -> str:
    """Full hook name from a short one: ``act_name("pattern", 5) == "blocks.5.attn.hook_pattern"``.

    Full names pass through unchanged. Per-layer names need ``layer``.
    """
    if name not in _ACT_NAMES:
        if "." in name or name.startswith("hook_"):
            return name
        close = difflib.get_close_matches(name, list(_ACT_NAMES), n=3)
        raise HookError(f"unknown activation name {name!r}; closest: {', '.join(close) or 'none'}")
    template = _ACT_NAMES[name]
    if "{}" in template:
        if layer is None:
            raise HookError(f"act_name({name!r}) needs a layer index, e.g. act_name({name!r}, 0)")
        return template.format(int(layer))
    return template


class _LayerIndex(int):
    """An int that can also be called, so TransformerLens code writing ``hook.layer()`` works."""

    def __call__(self) -> int:
        return int(self)


class RunContext:
    """State shared by every hook point of one model: the forward pass in flight and the open hook scopes.

    Positions and scopes are per thread. A *scope* is a ``hooks()`` block or a forward pass: every hook
    added while one is open in this thread (by ``add_hook``, by the block itself, or from inside a running
    hook) belongs to the innermost one, runs only on this thread's forward passes and is removed when that
    scope ends. Hooks added outside any scope are the model's and run on every thread until removed.
    """

    __slots__ = ("check_finite", "_local")

    def __init__(self) -> None:
        self.check_finite = False
        self._local = threading.local()

    @property
    def positions(self) -> torch.Tensor | None:
        """[batch, pos] absolute positions of this thread's forward pass in flight."""
        return getattr(self._local, "positions", None)

    @positions.setter
    def positions(self, value: torch.Tensor | None) -> None:
        self._local.positions = value

    def _scopes(self) -> list[list["HookHandle"]]:
        scopes = getattr(self._local, "scopes", None)
        if scopes is None:
            scopes = self._local.scopes = []
        return scopes

    def claim(self, handle: "HookHandle") -> None:
        """Give a new hook to the innermost open scope of this thread, if there is one."""
        scopes = getattr(self._local, "scopes", None)
        if scopes:
            handle.thread = threading.get_ident()
            scopes[-1].append(handle)

    @contextlib.contextmanager
    def scope(self):
        """Every hook added in this thread while the block runs is removed when it ends, however it ends."""
        scopes = self._scopes()
        handles: list[HookHandle] = []
        scopes.append(handles)
        try:
            yield handles
        finally:
            del scopes[next(i for i, open_ in enumerate(scopes) if open_ is handles)]  # by identity
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def running(self, positions: torch.Tensor | None):
        """One forward pass of this thread: its positions, and a scope for hooks added from inside hooks."""
        outer = self.positions
        self.positions = positions
        try:
            with self.scope():
                yield
        finally:
            self.positions = outer


@dataclass(eq=False)
class HookHandle:
    """Returned by ``add_hook``; ``remove()`` detaches the hook (idempotent)."""

    point: "HookPoint"
    fn: HookFn
    direction: str  # "fwd" or "bwd"
    removed: bool = False
    thread: int | None = None  # the thread whose scope owns the hook; None: the model's, runs on every thread

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        hooks = self.point.fwd_hooks if self.direction == "fwd" else self.point.bwd_hooks
        with contextlib.suppress(ValueError):  # another thread removed it first
            hooks.remove(self)

    def runs_here(self, thread: int) -> bool:
        return self.thread is None or self.thread == thread


class HookPoint:
    """A named tensor in the forward pass; call it on the tensor to run the hooks attached to it."""

    __slots__ = ("local", "name", "layer", "ctx", "fwd_hooks", "bwd_hooks")

    def __init__(self, local: str, ctx: RunContext | None = None) -> None:
        self.local = local  # name inside the owning module's prefix, e.g. "attn.hook_q"
        self.ctx = ctx if ctx is not None else RunContext()
        self.bind(local, self.ctx)
        self.fwd_hooks: list[HookHandle] = []
        self.bwd_hooks: list[HookHandle] = []

    def bind(self, name: str, ctx: RunContext) -> None:
        """Set the full name (``blocks.3.attn.hook_q``) and the model's run context."""
        self.name, self.ctx = name, ctx
        match = re.match(r"blocks\.(\d+)\.", name)
        self.layer = _LayerIndex(match.group(1)) if match else None

    @property
    def positions(self) -> torch.Tensor | None:
        """Absolute positions [batch, pos] of the tokens in the tensor being hooked."""
        return self.ctx.positions

    @property
    def active(self) -> bool:
        return bool(self.fwd_hooks or self.bwd_hooks)

    def add_hook(self, fn: HookFn, direction: str = "fwd") -> HookHandle:
        if direction not in ("fwd", "bwd"):
            raise HookError(f"hook direction must be 'fwd' or 'bwd', got {direction!r}")
        if not callable(fn):
            raise HookError(f"hook for {self.name} must be callable fn(tensor, hook), got {type(fn).__name__}")
        handle = HookHandle(self, fn, direction)
        self.ctx.claim(handle)
        (self.fwd_hooks if direction == "fwd" else self.bwd_hooks).append(handle)
        return handle

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fwd_hooks:
            thread = threading.get_ident()
            for handle in tuple(self.fwd_hooks):
                if handle.runs_here(thread) and not handle.removed:
                    x = self._run(handle, x)
        if self.bwd_hooks and x.requires_grad:
            thread = threading.get_ident()
            for handle in tuple(self.bwd_hooks):
                if handle.runs_here(thread):
                    x.register_hook(self._grad_hook(handle))
        if self.ctx.check_finite and x.is_floating_point() and not torch.isfinite(x).all():
            from .errors import NonFiniteError

            after = " (after its hooks ran)" if self.fwd_hooks else ""
            raise NonFiniteError(f"non-finite value (NaN or inf) at {self.name}{after}; check the input, the weights "
                                 "or the hook that produced it")
        return x

    def _run(self, handle: HookHandle, x: torch.Tensor) -> torch.Tensor:
        try:
            out = handle.fn(x, self)
        except Exception as exc:  # keep the type, add where it happened
            exc.add_note(f"raised by hook {_fn_name(handle.fn)} at {self.name}")
            raise
        if out is None:
            return x
        return check_replacement(self.name, handle.fn, x, out)

    def _grad_hook(self, handle: HookHandle):
        def grad_hook(grad: torch.Tensor):
            if handle.removed:  # the hook's context has ended: do nothing
                return None
            out = handle.fn(grad, self)
            return None if out is None else check_replacement(self.name, handle.fn, grad, out)

        return grad_hook

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, fwd={len(self.fwd_hooks)}, bwd={len(self.bwd_hooks)})"


def _fn_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def describe_filter(name_or_filter) -> str:
    """A filter as an error message shows it: names as written, a predicate by its name (no address)."""
    if callable(name_or_filter):
        return f"predicate {getattr(name_or_filter, '__name__', None) or type(name_or_filter).__name__}"
    return repr(name_or_filter)


def check_replacement(name: str, fn, x: torch.Tensor, out) -> torch.Tensor:
    """A hook's return value must be a tensor with the hook point's shape, dtype and device."""
    where = f"hook {_fn_name(fn)} at {name}"
    if not isinstance(out, torch.Tensor):
        raise HookError(f"{where} returned {type(out).__name__}; return a tensor of shape {tuple(x.shape)} or None")
    if out.shape != x.shape:
        raise HookError(
            f"{where} returned shape {tuple(out.shape)} but the hook point has shape {tuple(x.shape)}; "
            "return a tensor of the same shape"
        )
    if out.dtype != x.dtype:
        raise HookError(f"{where} returned dtype {out.dtype} but the hook point has {x.dtype}; cast with .to({x.dtype})")
    if out.device != x.device:
        raise HookError(f"{where} returned a tensor on {out.device} but the hook point is on {x.device}; move it with .to()")
    return out


class HookRegistry:
    """Name → HookPoint map of one model, with name resolution and friendly errors."""

    def __init__(self, points: Iterable[HookPoint], n_layers: int) -> None:
        self.points: dict[str, HookPoint] = {p.name: p for p in points}
        self.n_layers = n_layers

    def names(self) -> list[str]:
        return list(self.points)

    def resolve(self, name_or_filter: NameOrFilter | Iterable[str]) -> list[HookPoint]:
        """Hook points for a name, a list of names, or a predicate on names."""
        if callable(name_or_filter):
            return [p for n, p in self.points.items() if name_or_filter(n)]
        if isinstance(name_or_filter, str):
            return [self.get(name_or_filter)]
        return [self.get(n) for n in name_or_filter]

    def get(self, name: str) -> HookPoint:
        point = self.points.get(name)
        if point is not None:
            return point
        match = re.match(r"blocks\.(\d+)\.", name)
        if match and int(match.group(1)) >= self.n_layers:
            raise HookError(
                f"unknown hook name {name!r}: layer {match.group(1)} does not exist "
                f"(the model has {self.n_layers} layers, 0..{self.n_layers - 1})"
            )
        close = difflib.get_close_matches(name, list(self.points), n=3, cutoff=0.5)
        hint = ", ".join(close) if close else "see model.hook_names()"
        raise HookError(f"unknown hook name {name!r}; closest valid names: {hint}")
