"""Hook points: named places in the forward pass where a function can read or replace a tensor.

A ``HookPoint`` is an identity ``nn.Module`` (so nnsight and other module-tree tools reach it) whose
``__call__`` skips PyTorch's module-call machinery: a call with no hook attached is a few attribute
tests, so an unhooked forward costs what the plain maths costs. When a tool such as nnsight installs
its own ``forward`` on the instance, calls go through it. Hooks are plain functions
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
from torch import nn

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


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Full hook name from a short one: ``act_name("pattern", 5) == "blocks.5.attn.hook_pattern"``.

    Full names pass through unchanged. Per-layer names need ``layer``. TransformerLens's spellings work
    too (``get_act_name``): ``act_name("scale", 3, "ln1")``, ``act_name("normalized", 2, "ln2")``,
    ``act_name("k6")``, ``act_name("scale")`` (the final norm), aliases such as ``"query"``, ``"attn_logits"``.
    """
    if layer is None and layer_type is None and ("." in name or name.startswith("hook_")):
        return name
    if name not in _ACT_NAMES or layer_type is not None:
        return _tl_act_name(name, layer, layer_type)
    template = _ACT_NAMES[name]
    if "{}" in template:
        if layer is None:
            raise HookError(f"act_name({name!r}) needs a layer index, e.g. act_name({name!r}, 0)")
        return template.format(int(layer))
    return template


get_act_name = act_name  # TransformerLens's name for it

_TL_ALIASES = {
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
    "attention": "pattern",
}
_TL_LAYER_TYPES = {
    "a": "attn",
    "attention": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
    "ln1": "ln1",
    "ln2": "ln2",
    "attn": "attn",
    "mlp": "mlp",
    "": "",
}


def _tl_act_name(name: str, layer, layer_type) -> str:
    """TransformerLens's ``get_act_name`` rules, onto this model's hook names."""
    match = re.fullmatch(r"([a-z_]+?)(\d+)([a-z0-9]*)", name)
    if match and layer is None:
        name, layer, layer_type = match.group(1), int(match.group(2)), match.group(3) or layer_type
    name = _TL_ALIASES.get(name, name)
    if name in ("scale", "normalized"):
        if layer is None:
            return f"ln_final.hook_{name}"
        if layer_type not in ("ln1", "ln2"):
            raise HookError(
                f"act_name({name!r}, {layer}) needs layer_type 'ln1' or 'ln2', e.g. act_name({name!r}, {layer}, 'ln1')"
            )
        return f"blocks.{int(layer)}.{layer_type}.hook_{name}"
    if name in _ACT_NAMES and layer is not None and "{}" in _ACT_NAMES[name]:
        return _ACT_NAMES[name].format(int(layer))
    if name in _ACT_NAMES and "{}" not in _ACT_NAMES[name]:
        return _ACT_NAMES[name]
    close = difflib.get_close_matches(name, list(_ACT_NAMES) + ["scale", "normalized"], n=3)
    raise HookError(f"unknown activation name {name!r}; closest: {', '.join(close) or 'none'}")


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
    permanent: bool = False  # survives model.reset_hooks() unless including_permanent=True
    thread: int | None = None  # the thread whose scope owns the hook; None: the model's, runs on every thread
    context_level: int | None = None  # TransformerLens's tag: reset_hooks(level=…) removes only its level

    @property
    def is_permanent(self) -> bool:  # TransformerLens's LensHandle spelling
        return self.permanent

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        hooks = self.point.fwd_hooks if self.direction == "fwd" else self.point.bwd_hooks
        with contextlib.suppress(ValueError):  # another thread removed it first
            hooks.remove(self)

    def runs_here(self, thread: int) -> bool:
        return self.thread is None or self.thread == thread


class HookPoint(nn.Module):
    """A named tensor in the forward pass; call it on the tensor to run the hooks attached to it."""

    def __init__(self, local: str = "", ctx: RunContext | None = None) -> None:
        super().__init__()
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
        """A hook is attached, or a tool has instrumented this point (its value must be computed)."""
        return bool(self.fwd_hooks or self.bwd_hooks) or "forward" in self.__dict__

    def add_hook(
        self,
        fn: HookFn,
        direction: str = "fwd",
        *,
        dir: str | None = None,
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> HookHandle:
        """Attach ``fn(tensor, hook)``; ``dir=`` is TransformerLens's spelling of ``direction``. A permanent
        hook belongs to the model even when added inside a ``hooks()`` block; ``prepend`` runs it first."""
        direction = direction if dir is None else dir
        if direction not in ("fwd", "bwd"):
            raise HookError(f"hook direction must be 'fwd' or 'bwd', got {direction!r}")
        if not callable(fn):
            raise HookError(f"hook for {self.name} must be callable fn(tensor, hook), got {type(fn).__name__}")
        handle = HookHandle(self, fn, direction, permanent=bool(is_permanent), context_level=level)
        if not is_permanent:
            self.ctx.claim(handle)
        hooks = self.fwd_hooks if direction == "fwd" else self.bwd_hooks
        hooks.insert(0 if prepend else len(hooks), handle)
        return handle

    def _handles(self, dir: str, including_permanent: bool, level: int | None) -> list[HookHandle]:
        if dir not in ("fwd", "bwd", "both"):
            raise HookError(f"hook direction must be 'fwd', 'bwd' or 'both', got {dir!r}")
        handles = (self.fwd_hooks if dir != "bwd" else []) + (self.bwd_hooks if dir != "fwd" else [])
        return [
            h
            for h in handles
            if (including_permanent or not h.permanent) and (level is None or h.context_level == level)
        ]

    def has_hooks(self, dir: str = "both", including_permanent: bool = True, level: int | None = None) -> bool:
        """Whether hooks of direction ``dir`` ("fwd", "bwd", "both") are attached (TransformerLens's filters)."""
        return bool(self._handles(dir, including_permanent, level))

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False, level: int | None = None) -> None:
        """Remove the hooks of direction ``dir``; permanent ones only with ``including_permanent``."""
        for handle in self._handles(dir, including_permanent, level):
            handle.remove()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        instrumented = self.__dict__.get("forward")  # e.g. nnsight's controller
        if instrumented is not None:
            return instrumented(x)
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
            raise NonFiniteError(
                f"non-finite value (NaN or inf) at {self.name}{after}; check the input, the weights "
                "or the hook that produced it"
            )
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
            if isinstance(out, tuple) and len(out) == 1:  # TransformerLens's backward hooks return (grad,)
                out = out[0]
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
        raise HookError(
            f"{where} returned dtype {out.dtype} but the hook point has {x.dtype}; cast with .to({x.dtype})"
        )
    if out.device != x.device:
        raise HookError(
            f"{where} returned a tensor on {out.device} but the hook point is on {x.device}; move it with .to()"
        )
    return out


class HookRegistry:
    """Name → HookPoint map of one model, with name resolution and friendly errors."""

    def __init__(self, points: Iterable[HookPoint], n_layers: int) -> None:
        self.points: dict[str, HookPoint] = {p.name: p for p in points}
        self.n_layers = n_layers
        self.aliases: dict[str, str] = tl_aliases(n_layers)  # TransformerLens bridge name -> our name

    def names(self) -> list[str]:
        return list(self.points)

    def canonical(self, name: str) -> str:
        """Our name for an alias, and ``blocks.-1.…`` counted from the end (``blocks.{n-1}.…``)."""
        match = re.match(r"blocks\.(-\d+)\.", name)
        if match and -self.n_layers <= int(match.group(1)) < 0:
            name = f"blocks.{int(match.group(1)) + self.n_layers}." + name[match.end() :]
        return self.aliases.get(name, name)

    def resolve(self, name_or_filter: NameOrFilter | Iterable[str]) -> list[HookPoint]:
        """Hook points for a name, a list of names, or a predicate on names (a point is picked when the
        predicate accepts its name or one of its TransformerLens aliases, e.g. ``blocks.3.hook_out``)."""
        if callable(name_or_filter):
            return [p for n, p in self.points.items() if any(name_or_filter(a) for a in self.spellings(n))]
        if isinstance(name_or_filter, str):
            return [self.get(name_or_filter)]
        return [self.get(n) for n in name_or_filter]

    def spellings(self, name: str) -> list[str]:
        """A hook point's name, then its aliases."""
        if not hasattr(self, "_spellings"):
            found: dict[str, list[str]] = {}
            for alias, target in self.aliases.items():
                found.setdefault(target, []).append(alias)
            self._spellings = found
        return [name, *self._spellings.get(name, ())]

    def get(self, name: str) -> HookPoint:
        name = self.canonical(name)
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


# TransformerLens 4.3 bridge names that are the same tensor as one of ours (per block, then global).
_BLOCK_ALIASES = {
    "hook_in": "hook_resid_pre",
    "hook_out": "hook_resid_post",
    "ln1.hook_in": "hook_resid_pre",
    "ln2.hook_in": "hook_resid_mid",
    "attn.hook_out": "hook_attn_out",
    "attn.q.hook_out": "attn.hook_q",
    "attn.k.hook_out": "attn.hook_k",
    "attn.v.hook_out": "attn.hook_v",
    "mlp.hook_out": "hook_mlp_out",
    "mlp.gate.hook_out": "mlp.hook_pre",
    "mlp.in.hook_out": "mlp.hook_pre_linear",
    "mlp.out.hook_in": "mlp.hook_post",
}
_GLOBAL_ALIASES = {"embed.hook_out": "hook_embed", "hook_unembed": "hook_logits", "unembed.hook_out": "hook_logits"}


def tl_aliases(n_layers: int) -> dict[str, str]:
    """Alias name -> hook name: TransformerLens's ``hook_in`` / ``hook_out`` spellings of our hook points."""
    out = dict(_GLOBAL_ALIASES)
    if n_layers:
        out["ln_final.hook_in"] = f"blocks.{n_layers - 1}.hook_resid_post"
    for i in range(n_layers):
        out.update({f"blocks.{i}.{a}": f"blocks.{i}.{b}" for a, b in _BLOCK_ALIASES.items()})
    return out


class HookHandles:
    """Handles of one ``add_hook`` call (a predicate may attach at several points)."""

    def __init__(self, handles: list[HookHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
