"""Edits of MLP neurons: ``ZeroNeurons``, ``ScaleNeurons``. Neuron ``n`` of a layer is column ``n`` of its
``down_proj`` (``mlp.hook_post[..., n]``, the input of down_proj)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .. import _state
from .base import Edit, HookList, as_float, as_int, as_ints, check_fits, check_layer, check_units, mlp, set_slice

if TYPE_CHECKING:
    from hooks import HookedLlama


@dataclass(eq=False, repr=False)
class ZeroNeurons(Edit):
    """Silence MLP neurons: zero their columns of ``down_proj``. Hooks: ``mlp.hook_post[..., n] = 0``."""

    layer: int
    neurons: Sequence[int]

    def __post_init__(self) -> None:
        self.layer = as_int(self.layer, "layer", self.who)
        self.neurons = as_ints(self.neurons, "neurons", self.who)

    def validate(self, model: HookedLlama) -> None:
        check_layer(model, self.layer, self.who)
        check_units(self.neurons, model.d_mlp, "neuron", self.who)

    def _apply(self, model: HookedLlama) -> None:
        w = _state.writable(model, mlp(model, self.layer).down_proj.weight)  # [M, F]
        w[:, torch.tensor(self.neurons, device=w.device)] = 0

    def _hooks(self, model: HookedLlama) -> HookList:
        return [(f"blocks.{self.layer}.mlp.hook_post", set_slice((..., list(self.neurons)), torch.zeros_like))]


@dataclass(eq=False, repr=False)
class ScaleNeurons(Edit):
    """Multiply MLP neurons' activations by ``factor``: scale their ``down_proj`` columns."""

    layer: int
    neurons: Sequence[int]
    factor: float

    magnitudes = ("factor",)

    def __post_init__(self) -> None:
        self.layer = as_int(self.layer, "layer", self.who)
        self.neurons = as_ints(self.neurons, "neurons", self.who)
        self.factor = as_float(self.factor, "factor", self.who)

    def validate(self, model: HookedLlama) -> None:
        check_layer(model, self.layer, self.who)
        check_units(self.neurons, model.d_mlp, "neuron", self.who)
        w = mlp(model, self.layer).down_proj.weight
        check_fits(
            self.who,
            "factor",
            self.factor,
            w[:, torch.tensor(self.neurons, device=w.device)],
            f"the down_proj columns of neurons {list(self.neurons)}",
        )

    def _apply(self, model: HookedLlama) -> None:
        w = _state.writable(model, mlp(model, self.layer).down_proj.weight)
        cols = torch.tensor(self.neurons, device=w.device)
        w[:, cols] = w[:, cols] * self.factor

    def _hooks(self, model: HookedLlama) -> HookList:
        f = self.factor
        return [(f"blocks.{self.layer}.mlp.hook_post", set_slice((..., list(self.neurons)), lambda x: x * f))]
