"""Edits of the layer list: ``RemoveLayers``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from hooks.indices import check_indices

from .. import _state
from ..errors import EditError
from .base import Edit, HookList, as_ints, zero

if TYPE_CHECKING:
    from hooks import HookedLlama


@dataclass(eq=False, repr=False)
class RemoveLayers(Edit):
    """Delete decoder layers; the exported config has the reduced ``num_hidden_layers``.

    Layers after a removed one are renumbered (``blocks.0..N-1``); later edits of a plan use the new
    numbers. Hooks: the removed layers' ``hook_attn_out`` and ``hook_mlp_out`` are zero, so the layer
    is the identity (``resid_post == resid_pre``).
    """

    layers: Sequence[int]

    def __post_init__(self) -> None:
        self.layers = tuple(sorted(as_ints(self.layers, "layers", self.who)))

    def validate(self, model: HookedLlama) -> None:
        n = model.n_layers
        check_indices(model, "layer", self.layers, param="layers", who=self.who)
        if len(self.layers) >= n:
            raise EditError(f"{self.who}: removing all {n} layers leaves no model; keep at least one", param="layers")

    def kept(self, n_layers: int) -> list[int]:
        return [i for i in range(n_layers) if i not in self.layers]

    def _apply(self, model: HookedLlama) -> None:
        _state.remove_layers(model, list(self.layers))

    def _hooks(self, model: HookedLlama) -> HookList:
        return [(f"blocks.{i}.{name}", zero) for i in self.layers for name in ("hook_attn_out", "hook_mlp_out")]
