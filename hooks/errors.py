"""The error classes ``hooks`` raises, re-exported from their one home, ``_core.errors``."""

from _core.errors import (
    HookError,
    InputAssertionError,
    InputError,
    LoadError,
    NonFiniteError,
    RangeError,
    ScalpelError,
    UnsupportedArchitectureError,
)

__all__ = [
    "ScalpelError",
    "HookError",
    "InputError",
    "InputAssertionError",
    "LoadError",
    "NonFiniteError",
    "RangeError",
    "UnsupportedArchitectureError",
]
