"""Steering baked into the weights: ``AddSteering`` (a constant added to the residual stream)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import _state
from .base import Edit, HookList, add_constant, as_float, as_int, as_tensor, check_fits, check_layer, check_size, mlp

if TYPE_CHECKING:
    from hooks import HookedLlama


@dataclass(eq=False, repr=False)
class AddSteering(Edit):
    """Add ``scale * vector`` to the residual stream after layer ``layer``'s MLP, at every position.

    Baked into ``down_proj.bias`` of that layer (turning on ``mlp_bias``, zero gate/up/down biases
    elsewhere). Hooks: ``blocks.{layer}.hook_mlp_out += scale * vector``.
    """

    layer: int
    vector: Any
    scale: float = 1.0

    magnitudes = ("scale", "vector")

    def __post_init__(self) -> None:
        self.layer = as_int(self.layer, "layer", self.who)
        self.vector = as_tensor(self.vector, "vector", self.who, 1)
        self.scale = as_float(self.scale, "scale", self.who)

    def validate(self, model: HookedLlama) -> None:
        check_layer(model, self.layer, self.who)
        check_size(self.vector, model.d_model, "vector", self.who, "d_model (hidden_size)")
        bias = mlp(model, self.layer).down_proj.bias
        check_fits(
            self.who,
            "scale",
            self.scale,
            bias if bias is not None else torch.zeros(1, dtype=model.dtype),
            "the down_proj bias",
            add=self.vector,
        )

    def _check_weights(self, model: HookedLlama) -> None:
        _state.check_bias_slot(model, "mlp", "down_proj", self.who)

    def _apply(self, model: HookedLlama) -> None:
        _state.enable_biases(model, mlp=True)
        b = _state.writable(model, mlp(model, self.layer).down_proj.bias)
        b.copy_((b.double() + self.scale * self.vector.to(b.device, torch.float64)).to(b.dtype))

    def _hooks(self, model: HookedLlama) -> HookList:
        return [(f"blocks.{self.layer}.hook_mlp_out", add_constant(self.scale * self.vector.double()))]
