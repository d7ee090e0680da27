"""The error classes ``hooks`` raises, re-exported from their one home, ``_core.errors``."""

from _core.errors import (
    HookError,
    InputError,
    LoadError,
    NonFiniteError,
    ScalpelError,
    UnsupportedArchitectureError,
)

__all__ = ["ScalpelError", "HookError", "InputError", "LoadError", "NonFiniteError", "UnsupportedArchitectureError"]
