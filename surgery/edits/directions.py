"""Edits along a residual direction: ``Orthogonalize`` (project it out of every writer to the residual
stream), and the projections that ``Abliterate`` (``abliteration.py``) shares with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import _state
from ..errors import EditError
from .base import Edit, HookList, as_ints, as_tensor, attn, check_layer, check_size, mlp, project_out

if TYPE_CHECKING:
    from hooks import HookedLlama


def project_embeddings(model: HookedLlama, d: torch.Tensor) -> None:
    """``E ← E − (E d) dᵀ`` for the token embeddings (``d`` a float64 unit vector [M]); tied embeddings are
    untied first, so ``lm_head`` keeps the original matrix."""
    if model.lm_head.weight is model.model.embed_tokens.weight or model.config.tie_word_embeddings:
        _state.untie_embeddings(model)
    e = _state.writable(model, model.model.embed_tokens.weight)  # [V, M]
    dd = d.to(e.device)
    for rows in torch.arange(e.shape[0], device=e.device).split(8192):  # bounded float64 scratch
        x = e[rows].double()
        e[rows] = (x - (x @ dd)[:, None] * dd[None, :]).to(e.dtype)


@dataclass(eq=False, repr=False)
class Orthogonalize(Edit):
    """Project a residual direction out of everything that writes to the residual stream.

    ``W ← W − d dᵀ W`` for ``o_proj`` and ``down_proj`` (weights and biases) of ``layers`` ("all"
    or a list), and ``E ← E − (E d) dᵀ`` for the token embeddings when ``embeddings`` is true
    (refusal-direction "abliteration"). With tied embeddings, ``lm_head`` keeps the original matrix
    (the export unties it: ``tie_word_embeddings`` becomes false), since only writers are edited.
    Hooks: project ``d`` out of ``hook_embed`` and each chosen layer's ``hook_attn_out`` /
    ``hook_mlp_out``.
    """

    direction: Any
    layers: Any = "all"
    embeddings: bool = True

    def __post_init__(self) -> None:
        self.direction = as_tensor(self.direction, "direction", self.who, 1)
        if float(self.direction.double().norm()) == 0.0:
            raise EditError(f"{self.who}: direction is the zero vector; pass a non-zero direction", param="direction")
        if self.layers != "all":
            if isinstance(self.layers, str):
                raise EditError(
                    f"{self.who}: layers must be 'all' or a list of layer indices, got {self.layers!r}", param="layers"
                )
            self.layers = as_ints(self.layers, "layers", self.who, allow_empty=True)
        if not isinstance(self.embeddings, bool):
            raise EditError(
                f"{self.who}: embeddings must be true or false, got {self.embeddings!r}", param="embeddings"
            )

    def unit(self) -> torch.Tensor:
        d = self.direction.double()
        return d / d.norm()  # float64

    def layer_list(self, model: HookedLlama) -> list[int]:
        return list(range(model.n_layers)) if self.layers == "all" else list(self.layers)

    def validate(self, model: HookedLlama) -> None:
        check_size(self.direction, model.d_model, "direction", self.who, "d_model (hidden_size)")
        for i in self.layer_list(model):
            check_layer(model, i, self.who)

    def _apply(self, model: HookedLlama) -> None:
        d = self.unit()
        if self.embeddings:
            project_embeddings(model, d)
        for i in self.layer_list(model):
            for lin in (attn(model, i).o_proj, mlp(model, i).down_proj):
                w = _state.writable(model, lin.weight)  # [M, in]
                dd = d.to(w.device)
                x = w.double()
                w.copy_((x - dd[:, None] * (dd @ x)[None, :]).to(w.dtype))
                if lin.bias is not None:
                    b = _state.writable(model, lin.bias)
                    x = b.double()
                    b.copy_((x - dd * (dd @ x)).to(b.dtype))

    def _hooks(self, model: HookedLlama) -> HookList:
        fn = project_out(self.unit())
        out = [("hook_embed", fn)] if self.embeddings else []
        for i in self.layer_list(model):
            out += [(f"blocks.{i}.hook_attn_out", fn), (f"blocks.{i}.hook_mlp_out", fn)]
        return out
