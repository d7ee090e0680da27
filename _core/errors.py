"""Errors raised by llama-scalpel: one home for every error class (a leaf: imports nothing of ours).

Every error is one line that says what is wrong and how to fix it. ``ScalpelError`` is the common base,
so callers (the CLI among them) can tell bad input from a bug. ``param`` names the argument the error
concerns (a keyword of the function that raised it, e.g. ``"heads"`` or ``"overwrite"``), so a front end
can name its own spelling of that argument (the CLI's flag) without reading the message.

A message that tells the user to pass an argument spells it with ``arg()``: ``overwrite=True`` when the
caller is Python, ``--overwrite`` when the caller is the command line (the CLI installs its spelling with
``spelled()`` while a command runs; nothing ever rewrites message text afterwards)::

    raise ExportError(f"{out} exists; pass {arg('overwrite', True)} to replace it", param="overwrite")
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

_MISSING = object()
Spelling = Callable[[str, object], str]  # (parameter name, value or _MISSING) -> how the caller writes it
_SPELLING: ContextVar[Spelling | None] = ContextVar("scalpel_spelling", default=None)


def arg(name: str, value: object = _MISSING) -> str:
    """How the caller writes the argument ``name`` (set to ``value``): ``name=value`` from Python, or what
    the front end in charge says (``--flag value`` on the command line)."""
    spelling = _SPELLING.get()
    if spelling is not None:
        return spelling(name, value)
    return name if value is _MISSING else f"{name}={value!r}"


@contextlib.contextmanager
def spelled(spelling: Spelling) -> Iterator[None]:
    """Inside, ``arg()`` spells arguments with ``spelling`` (called with the name and the value, or
    ``MISSING`` when the message names the argument alone)."""
    token = _SPELLING.set(spelling)
    try:
        yield
    finally:
        _SPELLING.reset(token)


MISSING = _MISSING  # the value ``arg(name)`` passes to a spelling when no value is named


class ScalpelError(Exception):
    """Base class of llama-scalpel's own errors: bad input, with a message naming the fix."""

    param: str | None = None  # the argument the error concerns, when there is one

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        if param is not None:
            self.param = param


# --------------------------------------------------------------------------- models, hooks, inputs
class HookError(ScalpelError, ValueError):
    """A hook name, hook function or hook return value is wrong."""


class InputError(ScalpelError, ValueError):
    """A prompt, token tensor, attention mask or argument cannot be used."""


class InputAssertionError(InputError, AssertionError):
    """An ``InputError`` where TransformerLens raises ``AssertionError`` (a token missing from the prompt, a
    string that is not one token, a batch of several where one is needed), so code written for it catches it."""


class LoadError(ScalpelError, OSError):
    """A checkpoint (or another input file) cannot be found or read."""


class UnsupportedArchitectureError(LoadError):
    """The checkpoint is not a Llama-family causal LM."""


class NonFiniteError(ScalpelError, FloatingPointError):
    """An activation or weight held NaN or inf where a finite value is needed."""


# --------------------------------------------------------------------------- edits and plans
class EditError(ScalpelError, ValueError):
    """An edit does not fit the model (layer/head/neuron out of range, wrong size, NaN …)."""


class RangeError(InputError, EditError):
    """An index (layer, head, key/value group, neuron, position) is out of range for the model; raised by the
    one range check of each kind (``hooks.indices``), whoever calls it (an ``InputError`` and an ``EditError``)."""


class PlanError(EditError):
    """An edit plan file cannot be read (bad JSON/YAML, unknown edit kind, missing field)."""


class AdapterError(EditError):
    """A LoRA adapter cannot be merged into this model (another base, rank or shape mismatch)."""


# --------------------------------------------------------------------------- writing and verifying
class ExportError(ScalpelError, RuntimeError):
    """An export (or any other write) was refused or failed; nothing was left at the target."""


class OutputError(InputError, ExportError):
    """An output may not be written where asked: it exists and is not llama-scalpel's to replace (or was
    changed since), it clashes with another output or an input, or its place is not writable; raised
    before any work, so nothing was written."""


class ExportWriteError(ExportError, OSError):
    """The filesystem refused the write (read-only directory, disk full …); nothing was left at the target.

    ``errno`` is the operating system's error number when one is known (``errno.ENOSPC`` …).
    """


class IntegrityError(ExportError):
    """A file of an exported checkpoint does not match the sha256 its manifest records."""


class ParityError(ExportError):
    """A reloaded checkpoint does not give the logits of the in-memory model."""
