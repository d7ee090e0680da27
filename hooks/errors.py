"""Errors raised by llama-scalpel.

Every error is one line that says what is wrong and how to fix it. ``ScalpelError`` is the common
base, so callers (the CLI among them) can tell bad input from a bug.
"""

from __future__ import annotations


class ScalpelError(Exception):
    """Base class of llama-scalpel's own errors: bad input, with a message naming the fix."""


class HookError(ScalpelError, ValueError):
    """A hook name, hook function or hook return value is wrong."""


class InputError(ScalpelError, ValueError):
    """A prompt, token tensor or attention mask cannot be run."""


class LoadError(ScalpelError, OSError):
    """A checkpoint cannot be found or read."""


class UnsupportedArchitectureError(LoadError):
    """The checkpoint is not a Llama-family causal LM."""


class NonFiniteError(ScalpelError, FloatingPointError):
    """An activation held NaN or inf while ``model.check_finite`` was on."""


def check_model(model, who: str) -> None:
    """A public entry point's model argument must be a ``HookedLlama`` (one line, before any work)."""
    from .model import HookedLlama

    if not isinstance(model, HookedLlama):
        hint = (" (wrap a transformers model with HookedLlama.from_hf)" if isinstance(model, __import__("torch").nn.Module)
                else "")
        raise InputError(f"{who} takes a HookedLlama as its model, got {type(model).__name__}{hint}")


def takes_model(fn):
    """Decorator: the first argument of ``fn`` is checked with ``check_model``."""
    import functools

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        check_model(model, fn.__name__)
        return fn(model, *args, **kwargs)

    return wrapper
