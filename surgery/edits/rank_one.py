"""ROME-style knowledge edits: ``RankOneEdit`` (a closed-form rank-one update of ``down_proj``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import _state
from ..errors import EditError
from .base import Edit, HookList, as_int, as_tensor, check_layer, check_size, mlp
from .stats import key_covariance, last_token_mean

if TYPE_CHECKING:
    from hooks import HookedLlama


@dataclass(eq=False, repr=False)
class RankOneEdit(Edit):
    """ROME-style closed-form rank-one update of layer ``layer``'s ``down_proj``.

    ``W ← W + (v* − W k*) uᵀ / (uᵀ k*)`` with ``u = C⁻¹ k*`` (``c_inv_key``; ``None`` means
    ``C = I``, i.e. ``u = k*``), so that afterwards ``W k* = v*`` while keys uncorrelated with
    ``k*`` under ``C`` are barely moved. ``key`` lives in the down_proj input space [d_mlp]
    (``mlp.hook_post``), ``value`` in its output space [d_model]. Build one from prompts with
    ``RankOneEdit.compute`` and a covariance from ``surgery.key_covariance``.
    Hooks: ``hook_mlp_out += (post · u) / (uᵀ k*) · (v* − W k*)``.
    """

    layer: int
    key: Any
    value: Any
    c_inv_key: Any = None

    magnitudes = ("value", "key", "c_inv_key")

    def __post_init__(self) -> None:
        self.layer = as_int(self.layer, "layer", self.who)
        self.key = as_tensor(self.key, "key", self.who, 1)
        self.value = as_tensor(self.value, "value", self.who, 1)
        if self.c_inv_key is not None:
            self.c_inv_key = as_tensor(self.c_inv_key, "c_inv_key", self.who, 1)
            if self.c_inv_key.shape != self.key.shape:
                raise EditError(
                    f"{self.who}: c_inv_key has size {self.c_inv_key.shape[0]} but key has {self.key.shape[0]}",
                    param="c_inv_key",
                )
        if float(self.u.double() @ self.key.double()) == 0.0:
            raise EditError(
                f"{self.who}: uᵀk* is zero (key is zero or orthogonal to C⁻¹k*); the update is undefined", param="key"
            )

    @property
    def u(self) -> torch.Tensor:
        return self.key if self.c_inv_key is None else self.c_inv_key

    @classmethod
    def compute(
        cls,
        model: HookedLlama,
        layer: int,
        prompts,
        delta,
        *,
        covariance: torch.Tensor | None = None,
        cov_texts=None,
        ridge: float = 1e-2,
    ) -> RankOneEdit:
        """k* = mean ``hook_post`` at the last token of each prompt (end each prompt on the subject's
        last token); v* = W k* + ``delta`` (the wanted change of down_proj's output, [d_model]);
        u = (C + ridge·mean(diag C)·I)⁻¹ k* with C from ``covariance`` or ``key_covariance(cov_texts)``
        (neither: C = I)."""
        layer = as_int(layer, "layer", "RankOneEdit")
        check_layer(model, layer, "RankOneEdit")
        key = last_token_mean(model, prompts, f"blocks.{layer}.mlp.hook_post")
        delta = as_tensor(delta, "delta", "RankOneEdit", 1)
        check_size(delta, model.d_model, "delta", "RankOneEdit", "d_model (hidden_size)")
        w = mlp(model, layer).down_proj.weight.detach().float().cpu()
        value = w @ key + delta
        if covariance is None and cov_texts is not None:
            covariance = key_covariance(model, layer, cov_texts)
        u = None
        if covariance is not None:
            c = covariance.detach().double().cpu()
            if c.shape != (key.shape[0], key.shape[0]):
                raise EditError(
                    f"RankOneEdit: covariance has shape {tuple(c.shape)}, expected {(key.shape[0],) * 2}",
                    param="covariance",
                )
            c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
            u = torch.linalg.solve(c, key.double()).float()
        return cls(layer, key, value, u)

    def validate(self, model: HookedLlama) -> None:
        check_layer(model, self.layer, self.who)
        check_size(self.key, model.d_mlp, "key", self.who, "d_mlp (intermediate_size)")
        check_size(self.value, model.d_model, "value", self.who, "d_model (hidden_size)")

    def _residual(self, model: HookedLlama) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, u/(uᵀk)) with r = v* − W k*: the update is ΔW = r (u/(uᵀk))ᵀ; float64 maths."""
        w = mlp(model, self.layer).down_proj.weight.detach().double().cpu()
        k, v, u = self.key.double(), self.value.double(), self.u.double()
        return v - w @ k, u / (u @ k)

    def _apply(self, model: HookedLlama) -> None:
        r, u = self._residual(model)
        w = _state.writable(model, mlp(model, self.layer).down_proj.weight)
        w.copy_((w.double() + torch.outer(r, u).to(w.device)).to(w.dtype))

    def _hooks(self, model: HookedLlama) -> HookList:
        r, u = self._residual(model)  # float64; cast to the activations' dtype at use
        stash: dict[str, torch.Tensor] = {}

        def read(post: torch.Tensor, hook) -> None:
            stash["s"] = post @ u.to(device=post.device, dtype=post.dtype)  # [B, P]

        def write(out: torch.Tensor, hook) -> torch.Tensor:
            return out + stash.pop("s")[..., None] * r.to(device=out.device, dtype=out.dtype)

        return [(f"blocks.{self.layer}.mlp.hook_post", read), (f"blocks.{self.layer}.hook_mlp_out", write)]
