"""The error classes ``surgery`` raises, re-exported from their one home, ``_core.errors``."""

from _core.errors import (
    AdapterError,
    EditError,
    ExportError,
    ExportWriteError,
    IntegrityError,
    ParityError,
    PlanError,
)

__all__ = ["EditError", "PlanError", "AdapterError", "ExportError", "ExportWriteError", "IntegrityError", "ParityError"]
