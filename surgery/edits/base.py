"""The base of every edit: ``Edit`` (its contract, the registry of kinds, records), the checks edits share,
the public accessors of a layer's attention and MLP, and the hook builders the edit families use.

An edit is a small dataclass with

- ``apply(model)``: validate, then change the weights in place, all or nothing (returns the model);
- ``as_hooks(model)``: ``[(hook_name, fn), …]``, the run-time intervention with the same effect,
  for ``model.run_with_hooks(x, fwd_hooks=edit.as_hooks(model))`` on the *unedited* model;
- ``applied(model)``: a context manager that applies the edit and restores the exact original
  tensors, config, layer list, hook names and history on exit (even after an exception);
- ``to_dict()`` / ``Edit.from_dict(d)``: a JSON/YAML-ready record (vectors as lists of floats, which
  round-trip float32 values bit-exactly).

A subclass defines ``validate`` (one-line ``EditError`` before any work), ``_apply`` (the weight change,
writing through ``surgery._state.writable``) and ``_hooks``; it registers itself by being defined
(``__init_subclass__``) under its class name and its snake_case (``zero_heads``).

**Finite in, finite out**, by construction: ``apply`` runs ``_apply`` inside a transaction and checks every
tensor it wrote or created; a NaN or inf where the weights were finite restores the model exactly and
raises one ``EditError`` naming the tensor and the edit's magnitude fields (``magnitudes``). ``as_hooks``
runs the same check on a throw-away application first (the model is restored), so a hook form is never
handed out for parameters whose weight form would not be finite.

This module imports nothing of the edit families (they import it). Shapes in comments: H query heads,
G key/value heads, D head_dim, M d_model, F d_mlp, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import numbers
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from hooks.indices import check_index, check_range
from hooks.model import check_model

from .. import _state
from ..errors import EditError

if TYPE_CHECKING:
    from hooks import HookedLlama

HookFn = Callable[..., Any]
HookList = list  # list[tuple[str, HookFn]]

EDIT_KINDS: dict[str, type["Edit"]] = {}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# --------------------------------------------------------------------------- the base class
@dataclass(eq=False)
class Edit:
    """Base class of every edit (module docstring). Subclasses define ``validate``, ``_apply`` and ``_hooks``."""

    kind: ClassVar[str] = "Edit"
    # the fields whose size decides how large the written weights get (named when they would overflow)
    magnitudes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind = cls.__name__
        EDIT_KINDS[cls.__name__] = cls
        EDIT_KINDS[_snake(cls.__name__)] = cls

    @property
    def who(self) -> str:
        return self.kind

    # -- public API -------------------------------------------------------------
    def validate(self, model: HookedLlama) -> None:
        """Raise a one-line ``EditError`` if this edit does not fit ``model``; change nothing."""

    def apply(self, model: HookedLlama) -> HookedLlama:
        """Validate, then edit ``model``'s weights in place, all or nothing (a failure, a non-finite weight
        included, leaves the model exactly as it was). Appends the record to ``model.edit_history``."""
        check_model(model, f"{self.who}.apply")
        self.validate(model)
        self._check_weights(model)
        self._apply_checked(model, _state.transaction)
        _state.record(model, self.to_dict())
        return model

    def as_hooks(self, model: HookedLlama) -> HookList:
        """``[(hook_name, fn)]`` with the same effect at run time on the unedited ``model``."""
        check_model(model, f"{self.who}.as_hooks")
        self.validate(model)
        if self._weight_form_fits(model):
            self._apply_checked(model, _state.journal)  # the same finiteness check; the model is restored
        return self._hooks(model)

    @contextlib.contextmanager
    def applied(self, model: HookedLlama) -> Iterator[HookedLlama]:
        """``with edit.applied(model):`` – edited inside, exactly restored on exit."""
        with _state.journal(model):
            self.apply(model)
            yield model

    def _check_weights(self, model: HookedLlama) -> None:
        """Raise a one-line ``EditError`` if the weight form cannot live in the model's family class
        (the hook form still runs)."""

    def _weight_form_fits(self, model: HookedLlama) -> bool:
        try:
            self._check_weights(model)
        except EditError:
            return False
        return True

    def _apply_checked(self, model: HookedLlama, scope) -> None:
        """``_apply`` inside ``scope`` (a transaction: kept when it succeeds; a journal: always undone), then
        the finiteness check of everything it wrote (restored by ``scope`` when it fails). Offloaded layers
        are brought in for it and keep what it changed (``model.onloaded``)."""
        with model.onloaded(writes=True), scope(model) as journal, torch.no_grad():
            self._apply(model)
            _state.check_finite_writes(model, journal, self.who, self.magnitudes)

    # -- records ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"edit": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):  # JSON keys are strings: {layer: weight} records as {"layer": weight}
                value = {str(k): v for k, v in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Edit:
        """An edit from its ``to_dict()`` record (``Edit.from_dict`` dispatches on ``"edit"``)."""
        if not isinstance(data, dict):
            raise EditError(f"an edit record must be a mapping, got {type(data).__name__}")
        data = dict(data)
        name = data.pop("edit", None) or data.pop("kind", None) or data.pop("type", None)
        target = cls
        if cls is Edit:
            if name is None:
                raise EditError(f"edit record has no 'edit' key naming its kind; kinds: {', '.join(sorted(kinds()))}")
            if name not in EDIT_KINDS:
                close = difflib.get_close_matches(str(name), list(EDIT_KINDS), n=2)
                raise EditError(
                    f"unknown edit kind {name!r}; closest: {', '.join(close) or 'none'}; "
                    f"kinds: {', '.join(sorted(kinds()))}"
                )
            target = EDIT_KINDS[name]
        elif name is not None and EDIT_KINDS.get(name) is not cls:
            raise EditError(f"{cls.kind}.from_dict got a record of kind {name!r}")
        names = {f.name for f in dataclasses.fields(target)}
        required = {
            f.name
            for f in dataclasses.fields(target)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        unknown = sorted(set(data) - names)
        if unknown:
            raise EditError(f"{target.kind}: unknown field(s) {', '.join(unknown)}; fields: {', '.join(sorted(names))}")
        missing = sorted(required - set(data))
        if missing:
            raise EditError(f"{target.kind}: missing field(s) {', '.join(missing)}")
        return target(**data)

    def __eq__(self, other) -> bool:
        return isinstance(other, Edit) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            parts.append(f"{f.name}={short(v) if isinstance(v, torch.Tensor) else repr(v)}")
        return f"{self.kind}({', '.join(parts)})"

    # -- subclass hooks ------------------------------------------------------------
    def _apply(self, model: HookedLlama) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hooks(self, model: HookedLlama) -> HookList:  # pragma: no cover - abstract
        raise NotImplementedError


def kinds() -> list[str]:
    """The class names of every registered edit kind, sorted."""
    return sorted(k.kind for k in set(EDIT_KINDS.values()))


# --------------------------------------------------------------------------- public accessors
def attn(model: HookedLlama, layer: int) -> nn.Module:
    """Layer ``layer``'s attention module (``q_proj`` … ``o_proj``, HF names)."""
    return model.model.layers[layer].self_attn


def mlp(model: HookedLlama, layer: int) -> nn.Module:
    """Layer ``layer``'s MLP module (``gate_proj``, ``up_proj``, ``down_proj``)."""
    return model.model.layers[layer].mlp


def head_cols(heads: Sequence[int], d: int) -> torch.Tensor:
    """The columns of ``o_proj`` (rows of ``q_proj``) that belong to ``heads``, for head size ``d``."""
    return torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])


# --------------------------------------------------------------------------- shared checks
# Each failure is a one-line ``EditError`` naming the edit (``who``), the field and the valid range, raised
# before any weight changes; index ranges go through the one range check of each kind (``hooks.indices``).
def as_int(value, what: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value)
        raise EditError(f"{who}: {what} must be an integer, got {value!r}", param=what)
    return int(value)


def as_ints(values, what: str, who: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if isinstance(values, (int, numbers.Integral)) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        try:
            values = list(values)
        except TypeError:
            raise EditError(f"{who}: {what} must be a list of integers, got {values!r}", param=what) from None
    out = tuple(as_int(v, what, who) for v in values)
    if not out and not allow_empty:
        raise EditError(f"{who}: {what} is empty; name at least one", param=what)
    if len(set(out)) != len(out):
        dup = sorted({v for v in out if out.count(v) > 1})
        raise EditError(f"{who}: {what} lists {dup} more than once", param=what)
    return out


def as_float(value, what: str, who: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EditError(f"{who}: {what} must be a number, got {value!r}", param=what)
    value = float(value)
    if not math.isfinite(value):
        raise EditError(f"{who}: {what} is {value}; it must be finite", param=what)
    return value


def as_tensor(value, what: str, who: str, ndim: int) -> torch.Tensor:
    """A float32 CPU tensor of ``ndim`` dims with finite values (lists, numpy arrays and tensors accepted)."""
    try:
        t = torch.as_tensor(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EditError(f"{who}: {what} is not a numeric array ({str(exc).splitlines()[0]})", param=what) from None
    if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)):
        raise EditError(f"{who}: {what} must hold numbers, got dtype {t.dtype}", param=what)
    t = t.to(torch.float32).clone()
    if t.dim() != ndim:
        raise EditError(f"{who}: {what} must have {ndim} dimension(s), got shape {tuple(t.shape)}", param=what)
    if t.numel() == 0:
        raise EditError(f"{who}: {what} is empty", param=what)
    bad = (~torch.isfinite(t)).nonzero()
    if len(bad):
        idx = tuple(bad[0].tolist())
        where = idx[0] if len(idx) == 1 else idx
        raise EditError(
            f"{who}: {what} holds a non-finite value ({t[idx].item()}) at index {where}; every entry must be finite",
            param=what,
        )
    return t


def check_layer(model: HookedLlama, layer: int, who: str) -> None:
    check_index(model, "layer", layer, param="layer", who=who)  # the one layer range check (hooks.indices)


def check_units(values, size: int, what: str, who: str) -> None:
    """Every index of ``values`` is a ``what`` ("head", "group", "neuron") of a layer of ``size`` of them."""
    kind = "kv_group" if what == "group" else what
    for v in values:
        check_range(kind, v, size, param=f"{what}s", who=who)


def check_size(t: torch.Tensor, size: int, what: str, who: str, expected: str) -> None:
    if t.shape[-1] != size:
        raise EditError(f"{who}: {what} has size {t.shape[-1]} but the model's {expected} is {size}", param=what)


def check_fits(who: str, what: str, value: float, weights: torch.Tensor, where: str, *, add=None) -> None:
    """``value * weights`` (plus ``add``) must stay finite in the weights' dtype; else a one-line EditError
    naming ``what`` and the peak it would reach (the base class's finiteness check is the backstop)."""
    limit = torch.finfo(weights.dtype).max
    kind = str(weights.dtype).replace("torch.", "")
    if not abs(value) <= limit:
        raise EditError(
            f"{who}: {what} {value:g} overflows {kind} (the largest {kind} is {limit:.3g}); use a smaller {what}",
            param=what,
        )
    peak = abs(value) * weights.detach().abs().max().double().item()
    if add is not None:
        peak = abs(value) * add.detach().abs().max().double().item() + weights.detach().abs().max().double().item()
    if not peak <= limit:
        raise EditError(
            f"{who}: {what} {value:g} overflows {kind}: {where} would reach {peak:.3g}, past the "
            f"largest {kind} {limit:.3g}; use a smaller {what}",
            param=what,
        )


def short(t: torch.Tensor) -> str:
    return f"<{'x'.join(map(str, t.shape))} floats>"


# --------------------------------------------------------------------------- hook builders
def set_slice(index, value_fn) -> HookFn:
    """A hook writing ``value_fn(t[index])`` into ``t[index]`` of a copy of ``t``."""

    def hook(t: torch.Tensor, hook) -> torch.Tensor:
        t = t.clone()
        t[index] = value_fn(t[index]).to(t.dtype)
        return t

    return hook


def project_out(d: torch.Tensor, weight: float = 1.0) -> HookFn:
    """A hook removing ``weight`` times the component along the unit vector ``d`` (float64 maths)."""

    def hook(t: torch.Tensor, hook) -> torch.Tensor:
        dd = d.to(device=t.device, dtype=torch.float64)
        x = t.double()
        return (x - weight * (x @ dd)[..., None] * dd).to(t.dtype)  # weight 1.0: exactly x - (x·d) d

    return hook


def add_constant(vec: torch.Tensor) -> HookFn:
    """A hook adding ``vec`` at every position."""

    def hook(t: torch.Tensor, hook) -> torch.Tensor:
        return t + vec.to(device=t.device, dtype=t.dtype)

    return hook


def zero(t: torch.Tensor, hook) -> torch.Tensor:
    """A hook replacing its input by zeros."""
    return torch.zeros_like(t)
