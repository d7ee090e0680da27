"""llama-scalpel core: a hookable, Hugging Face-exact Llama.

>>> from hooks import HookedLlama, act_name
>>> model = HookedLlama.default()
>>> logits, cache = model.run_with_cache("The Eiffel Tower is in the city of")
"""

from .allocator import keep_freed_memory
from .cache import ActivationCache
from .errors import (
    HookError,
    InputError,
    LoadError,
    NonFiniteError,
    RangeError,
    ScalpelError,
    UnsupportedArchitectureError,
)
from .generation import KVCache
from .hook_points import HookPoint, act_name, get_act_name
from .model import HookedLlama

__all__ = [
    "HookedLlama",
    "ActivationCache",
    "HookPoint",
    "KVCache",
    "act_name",
    "get_act_name",
    "ScalpelError",
    "HookError",
    "InputError",
    "LoadError",
    "NonFiniteError",
    "RangeError",
    "UnsupportedArchitectureError",
    "keep_freed_memory",
]
