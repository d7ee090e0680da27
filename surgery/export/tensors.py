"""What an export writes, read one tensor at a time from wherever the weights live.

- ``read_tensor(model, name)``: a parameter or buffer as a CPU tensor, with no copy when it is already on
  the CPU, one tensor's copy from a GPU, and, for a parameter that accelerate's offload hooks keep off the
  module (on the meta device, its values in the hook's ``weights_map``: CPU or disk offload), read from
  that map. Nothing else ever holds more than one tensor.
- ``export_config(model)``: the config as it must be saved (layer count, bias flags, tying from the weights).
- ``export_entries(model, config)``: the checkpoint's tensors as ``TensorEntry`` records (name, shape,
  dtype, where the values come from), without reading any: zero biases the family's class needs are filled
  in, a tied ``lm_head`` is left out (as transformers saves it).
- ``export_state(model, config)``: the same as a mapping of CPU tensors, read on access.
- ``state_sha256(model)``: one sha256 over the state dict in name order (name, dtype, shape, bytes of
  each tensor), streamed tensor by tensor.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from _core.writer import tensor_sha256
from hooks import config as hooks_config
from hooks.loading import plain_config

from .. import _state
from ..errors import ExportError

if TYPE_CHECKING:
    from hooks import HookedLlama


# --------------------------------------------------------------------------- the tensor source
def _offload_hook(module: torch.nn.Module):
    """The accelerate hook that keeps ``module``'s weights off it (offload with a ``weights_map``), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        if h is not None and getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def read_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` of ``model`` as a detached CPU tensor (module docstring)."""
    try:
        t = model.get_parameter(name)
    except AttributeError:
        t = model.get_buffer(name)
    if not t.is_meta:
        return t.detach().to("cpu")
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        hook = _offload_hook(model.get_submodule(".".join(parts[:k])))
        if hook is not None:
            key = ".".join(parts[k:])
            try:
                return hook.weights_map[key].detach().to("cpu")
            except KeyError:
                break
    raise ExportError(
        f"{name} is on the meta device and no accelerate offload hook holds its values; load the model's "
        "weights (or load it with a device_map that offloads them) before exporting",
        param="model",
    )


# --------------------------------------------------------------------------- what is written
def export_config(model: HookedLlama):
    """The model's config as it must be saved: layer count, bias flags and tying from the weights;
    every other field kept (loader-only fields such as a GGUF quantization_config dropped)."""
    config = plain_config(model.config)
    layers = list(model.model.layers)
    config.num_hidden_layers = len(layers)
    for part, owner, names in (
        ("attention", "self_attn", _state.ATTENTION_BIAS_MODULES),
        ("mlp", "mlp", _state.MLP_BIAS_MODULES),
    ):
        flag = hooks_config.bias_flag(config, part)  # None: the family's class fixes its biases
        if flag is not None:
            setattr(config, flag, any(getattr(getattr(l, owner), n).bias is not None for l in layers for n in names))
    config.tie_word_embeddings = model.lm_head.weight is model.model.embed_tokens.weight
    config.architectures = [hooks_config.family_class_name(config)]
    config.dtype = model.dtype
    return config


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the checkpoint: its ``name`` there, ``shape``, ``dtype``, and ``source``: the model's
    parameter or buffer it is read from (None: a zero bias the family's class needs)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str | None

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    def read(self, model: torch.nn.Module) -> torch.Tensor:
        if self.source is None:
            return torch.zeros(self.shape, dtype=self.dtype)
        return read_tensor(model, self.source)


_BIAS_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.bias$")


def export_entries(model: HookedLlama, config) -> list[TensorEntry]:
    """The checkpoint's tensors in state-dict order, none read (module docstring). A bias the config's class
    cannot carry is an ``ExportError`` (edits refuse to create one)."""
    state = model.state_dict(keep_vars=True)
    entries = {name: TensorEntry(name, tuple(t.shape), t.dtype, name) for name, t in state.items()}
    expected = {
        **hooks_config.attention_biases(config),
        **dict.fromkeys(_state.MLP_BIAS_MODULES, hooks_config.mlp_bias(config)),
    }
    for i in range(len(model.model.layers)):
        for part, names in (("self_attn", _state.ATTENTION_BIAS_MODULES), ("mlp", _state.MLP_BIAS_MODULES)):
            for n in names:
                key = f"model.layers.{i}.{part}.{n}.bias"
                if key not in entries and expected[n]:
                    w = entries[f"model.layers.{i}.{part}.{n}.weight"]
                    entries[key] = TensorEntry(key, (w.shape[0],), w.dtype, None)
                elif key in entries and not expected[n]:
                    raise ExportError(
                        f"{key} cannot be saved: {hooks_config.family_class_name(config)} has no "
                        f"{n} bias; undo the edit that added it"
                    )
    if config.tie_word_embeddings:
        entries.pop("lm_head.weight", None)
    return list(entries.values())


class LazyState(Mapping):
    """``{name: CPU tensor}`` over ``entries``, each read from the model when it is looked up."""

    def __init__(self, model: torch.nn.Module, entries: list[TensorEntry]) -> None:
        self.model, self.entries = model, {e.name: e for e in entries}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.entries[name].read(self.model)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def export_state(model: HookedLlama, config) -> LazyState:
    """The checkpoint's tensors as a mapping of CPU tensors under HF names, read on access (module docstring)."""
    return LazyState(model, export_entries(model, config))


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict in name order: name, dtype, shape and raw bytes of each tensor (the format
    of ``_core.writer.tensors_sha256``), read one tensor at a time (``read_tensor``)."""
    h = hashlib.sha256()
    state = model.state_dict(keep_vars=True)
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|".encode())
        tensor_sha256(read_tensor(model, name), h)
    return h.hexdigest()
