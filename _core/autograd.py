"""Grad modes for public functions: every one works under ``torch.no_grad()`` and ``torch.inference_mode()``.

Most functions only run forward passes, which both modes allow. A function that differentiates (attribution
patching, feature attribution, direction refinement, training) is decorated with ``differentiates``: for the
call, autograd is switched on (under ``torch.no_grad()``) and inference mode off (under
``torch.inference_mode()``, where a tensor argument made in inference mode is first cloned into a normal
tensor, since autograd cannot save inference tensors). The caller's modes are back in force on return.

Example::

    @differentiates
    def attribution_patching(model, clean, corrupted, ...): ...

    with torch.inference_mode():
        attribution_patching(model, "a", "b")       # the same numbers as outside the block
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _normal(value: Any) -> Any:
    """``value`` with every inference tensor in it (inside lists, tuples and dicts too) cloned into a
    normal one; call in a block where inference mode is off."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, (list, tuple)):
        items = [_normal(v) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def differentiates(fn: F) -> F:
    """Decorate a public function that computes gradients (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                args, kwargs = _normal(args), _normal(kwargs)
                with torch.enable_grad():
                    return fn(*args, **kwargs)
        with torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
