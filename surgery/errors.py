"""Errors raised by ``surgery``: one line each, all subclasses of ``hooks.ScalpelError``."""

from __future__ import annotations

from hooks.errors import ScalpelError


class EditError(ScalpelError, ValueError):
    """An edit does not fit the model (layer/head/neuron out of range, wrong size, NaN …)."""


class PlanError(EditError):
    """An edit plan file cannot be read (bad JSON/YAML, unknown edit kind, missing field)."""


class AdapterError(EditError):
    """A LoRA adapter cannot be merged into this model (another base, rank or shape mismatch)."""


class ExportError(ScalpelError, RuntimeError):
    """An export was refused or failed; nothing was left at the target."""


class ExportWriteError(ExportError, OSError):
    """The filesystem refused the export (read-only directory, disk full …); nothing was left at the target.

    ``errno`` is the operating system's error number when one is known (``errno.ENOSPC`` …).
    """


class IntegrityError(ExportError):
    """A file of an exported checkpoint does not match the sha256 its manifest records."""


class ParityError(ExportError):
    """A reloaded checkpoint does not give the logits of the in-memory model."""
