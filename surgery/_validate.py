"""Argument checks shared by the edits: each failure is a one-line ``EditError`` naming the edit,
the argument and the valid range, raised before any weight changes."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from .errors import EditError


def _int(value, what: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value)
        raise EditError(f"{who}: {what} must be an integer, got {value!r}")
    return int(value)


def _ints(values, what: str, who: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if isinstance(values, (int, numbers.Integral)) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        try:
            values = list(values)
        except TypeError:
            raise EditError(f"{who}: {what} must be a list of integers, got {values!r}") from None
    out = tuple(_int(v, what, who) for v in values)
    if not out and not allow_empty:
        raise EditError(f"{who}: {what} is empty; name at least one")
    if len(set(out)) != len(out):
        dup = sorted({v for v in out if out.count(v) > 1})
        raise EditError(f"{who}: {what} lists {dup} more than once")
    return out


def _float(value, what: str, who: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EditError(f"{who}: {what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise EditError(f"{who}: {what} is {value}; it must be finite")
    return value


def _tensor(value, what: str, who: str, ndim: int) -> torch.Tensor:
    """A float32 CPU tensor of ``ndim`` dims with finite values (lists, numpy arrays and tensors accepted)."""
    try:
        t = torch.as_tensor(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EditError(f"{who}: {what} is not a numeric array ({str(exc).splitlines()[0]})") from None
    if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)):
        raise EditError(f"{who}: {what} must hold numbers, got dtype {t.dtype}")
    t = t.to(torch.float32).clone()
    if t.dim() != ndim:
        raise EditError(f"{who}: {what} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise EditError(f"{who}: {what} is empty")
    bad = (~torch.isfinite(t)).nonzero()
    if len(bad):
        idx = tuple(bad[0].tolist())
        where = idx[0] if len(idx) == 1 else idx
        raise EditError(
            f"{who}: {what} holds a non-finite value ({t[idx].item()}) at index {where}; every entry must be finite"
        )
    return t


def _check_layer(model, layer: int, who: str) -> None:
    n = model.n_layers
    if not 0 <= layer < n:
        raise EditError(f"{who}: layer {layer} is out of range; the model has {n} layers (0..{n - 1})")


def _check_range(values, size: int, what: str, who: str) -> None:
    bad = [v for v in values if not 0 <= v < size]
    if bad:
        raise EditError(f"{who}: {what} {bad[0]} is out of range; the layer has {size} {what}s (0..{size - 1})")


def _check_size(t: torch.Tensor, size: int, what: str, who: str, expected: str) -> None:
    if t.shape[-1] != size:
        raise EditError(f"{who}: {what} has size {t.shape[-1]} but the model's {expected} is {size}")


def _check_fits(who: str, what: str, value: float, weights: torch.Tensor, where: str, *, add=None) -> None:
    """``value * weights`` (plus ``add``) must stay finite in the weights' dtype; else a one-line EditError."""
    limit = torch.finfo(weights.dtype).max
    kind = str(weights.dtype).replace("torch.", "")
    if not abs(value) <= limit:
        raise EditError(
            f"{who}: {what} {value:g} overflows {kind} (the largest {kind} is {limit:.3g}); use a smaller {what}"
        )
    peak = abs(value) * weights.detach().abs().max().double().item()
    if add is not None:
        peak = abs(value) * add.detach().abs().max().double().item() + weights.detach().abs().max().double().item()
    if not peak <= limit:
        raise EditError(
            f"{who}: {what} {value:g} overflows {kind}: {where} would reach {peak:.3g}, past the "
            f"largest {kind} {limit:.3g}; use a smaller {what}"
        )


def _vec_list(t: torch.Tensor) -> list:
    return t.tolist()


def _short(t: torch.Tensor) -> str:
    return f"<{'x'.join(map(str, t.shape))} floats>"
