"""``Abliterate``: refusal-direction removal with per-layer weights, as an exact weight edit.

For each edited matrix ``W`` [M, in] (``o_proj`` of the layers in ``attn_weights``, ``down_proj`` of
those in ``mlp_weights``) with weight ``w`` (times ``strength``) and unit direction ``r`` [M]:

- plain: ``W ← W − w·r (rᵀW)`` (and ``b ← b − w·r (r·b)`` for a bias) — ``w = 1`` is ``Orthogonalize``;
- ``norm_preserve=True``: every row of ``W`` is scaled to unit norm, the projection above applied,
  and each row rescaled to its original norm (the edit changes directions of rows, not their sizes).

The direction is one vector [M], or a stack [K, M] (e.g. ``refusal_directions(...).directions``) with
``direction_index``: a fractional row, linearly interpolated between its two neighbouring rows and
normalised; with a stack and no index, layer ``i`` uses row ``i`` (K must equal the layer count).
``embeddings=True`` also projects the direction out of the token embeddings, as ``Orthogonalize`` does
(weight 1; tied embeddings are untied first); the default leaves them, so tied embeddings stay tied.

``Abliterate.peaked(...)`` builds the per-layer weights from a peaked profile: ``max_weight`` at layer
``peak``, falling linearly to ``min_weight`` at distance ``width``, nothing further away; one profile
for attention and one for the MLP.

Hooks: without norm preservation the edit is linear in the output, so the hook form projects
``w·r`` out of ``blocks.{i}.hook_attn_out`` / ``hook_mlp_out``. Norm preservation changes rows
non-linearly, so there the hook form applies the same modified weights: it reads the matrix's input
(``attn.hook_z`` / ``mlp.hook_post``) and adds ``input @ (W' − W)ᵀ`` to the sublayer output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import _state
from ..errors import EditError
from .base import Edit, HookList, as_float, as_tensor, attn, check_layer, check_size, mlp, project_out
from .directions import project_embeddings

if TYPE_CHECKING:
    from hooks import HookedLlama


def peaked_weights(n_layers: int, max_weight: float, peak: float, min_weight: float, width: float) -> dict[int, float]:
    """``{layer: weight}``: ``max_weight`` at ``peak``, linear to ``min_weight`` at distance ``width``, 0 beyond.

    Example: ``peaked_weights(6, 1.0, 3, 0.5, 2) == {1: 0.5, 2: 0.75, 3: 1.0, 4: 0.75, 5: 0.5}``.
    """
    if not width > 0:
        raise EditError(f"Abliterate: width must be > 0, got {width}")
    out = {}
    for i in range(n_layers):
        dist = abs(i - peak)
        if dist <= width:
            out[i] = float(max_weight + (dist / width) * (min_weight - max_weight))
    return out


def project_rows(x: torch.Tensor, r: torch.Tensor, w: float, norm_preserve: bool) -> torch.Tensor:
    """``x`` [M, in] with ``w·r`` projected out of its columns (``r`` [M], unit); with ``norm_preserve`` the
    rows are projected at unit norm and given back their norms. Differentiable in ``r`` (``refine_direction``)."""
    if not norm_preserve:
        return x - w * r[:, None] * (r @ x)[None, :]
    tiny = torch.finfo(x.dtype).tiny
    norms = x.norm(dim=1, keepdim=True)
    xn = x / norms.clamp_min(tiny)
    xn = xn - w * r[:, None] * (r @ xn)[None, :]
    return xn / xn.norm(dim=1, keepdim=True).clamp_min(tiny) * norms


def _weights(value, what: str, who: str) -> dict[int, float]:
    if value is None:
        return {}
    if isinstance(value, (list, tuple)):  # a list of layers: weight 1 each
        value = {layer: 1.0 for layer in value}
    if not isinstance(value, dict):
        raise EditError(f"{who}: {what} must be a mapping {{layer: weight}} or a list of layers, got {value!r}")
    out = {}
    for k, v in value.items():
        try:
            layer = int(k)
        except (TypeError, ValueError):
            raise EditError(f"{who}: {what} has a key {k!r} that is not a layer index") from None
        if isinstance(k, float) and k != layer:
            raise EditError(f"{who}: {what} has a key {k!r} that is not a layer index")
        out[layer] = as_float(v, f"{what}[{layer}]", who)
    return dict(sorted(out.items()))


@dataclass(eq=False, repr=False)
class Abliterate(Edit):
    """Project a (refusal) direction out of ``o_proj`` / ``down_proj`` with per-layer weights (module docstring)."""

    direction: Any
    attn_weights: Any = None
    mlp_weights: Any = None
    direction_index: Any = None
    strength: float = 1.0
    norm_preserve: bool = False
    embeddings: bool = False

    magnitudes = ("strength", "attn_weights", "mlp_weights")

    def __post_init__(self) -> None:
        d = self.direction
        ndim = (
            d.dim()
            if isinstance(d, torch.Tensor)
            else (2 if isinstance(d, (list, tuple)) and d and isinstance(d[0], (list, tuple)) else 1)
        )
        self.direction = as_tensor(d, "direction", self.who, ndim)
        norms = self.direction.double().reshape(-1, self.direction.shape[-1]).norm(dim=-1)
        if bool((norms == 0).any()):
            raise EditError(f"{self.who}: direction has a zero vector; pass non-zero directions")
        self.attn_weights = _weights(self.attn_weights, "attn_weights", self.who)
        self.mlp_weights = _weights(self.mlp_weights, "mlp_weights", self.who)
        if not self.attn_weights and not self.mlp_weights and not self.embeddings:
            raise EditError(f"{self.who}: nothing to edit; give attn_weights and/or mlp_weights (or embeddings=True)")
        self.strength = as_float(self.strength, "strength", self.who)
        if self.direction_index is not None:
            self.direction_index = as_float(self.direction_index, "direction_index", self.who)
            if self.direction.dim() != 2:
                raise EditError(
                    f"{self.who}: direction_index needs a stack of directions [K, d_model]; "
                    "a single direction is used as given"
                )
            k = self.direction.shape[0]
            if not 0.0 <= self.direction_index <= k - 1:
                raise EditError(f"{self.who}: direction_index {self.direction_index} is out of range 0..{k - 1}")
        for flag in ("norm_preserve", "embeddings"):
            if not isinstance(getattr(self, flag), bool):
                raise EditError(f"{self.who}: {flag} must be true or false, got {getattr(self, flag)!r}")

    @classmethod
    def peaked(cls, direction, n_layers: int, *, attn: tuple | None, mlp: tuple | None, **kwargs) -> "Abliterate":
        """Weights from peaked profiles ``attn=(max_weight, peak, min_weight, width)`` and ``mlp=(…)``.

        Example: ``Abliterate.peaked(dirs.directions, 30, direction_index=20.4, attn=(1.0, 22, 0.3, 8),
        mlp=(1.2, 24, 0.5, 6), norm_preserve=True)``.
        """
        return cls(
            direction,
            attn_weights=peaked_weights(n_layers, *attn) if attn else {},
            mlp_weights=peaked_weights(n_layers, *mlp) if mlp else {},
            **kwargs,
        )

    # -- the direction per layer ------------------------------------------------------------
    def unit(self, layer: int | None = None) -> torch.Tensor:
        """The float64 unit direction used at ``layer`` (the global one when the edit has one)."""
        d = self.direction.double()
        if d.dim() == 2:
            if self.direction_index is not None:
                lo = int(math.floor(self.direction_index))
                hi = min(lo + 1, d.shape[0] - 1)
                frac = self.direction_index - lo
                d = d[lo] * (1 - frac) + d[hi] * frac
            else:
                d = d[0 if layer is None else layer]
        return d / d.norm()

    def _embedding_unit(self) -> torch.Tensor:
        """The float64 unit direction projected out of the embeddings (the float32 global direction, as
        ``Orthogonalize`` of it would use)."""
        d = self.unit(0).float().double()
        return d / d.norm()

    def validate(self, model: HookedLlama) -> None:
        check_size(self.direction, model.d_model, "direction", self.who, "d_model (hidden_size)")
        for layer in list(self.attn_weights) + list(self.mlp_weights):
            check_layer(model, layer, self.who)
        if self.direction.dim() == 2 and self.direction_index is None and self.direction.shape[0] != model.n_layers:
            raise EditError(
                f"{self.who}: {self.direction.shape[0]} directions for {model.n_layers} layers; pass one "
                "direction per layer, or direction_index to interpolate one"
            )

    def targets(self, model: HookedLlama):
        """``[(layer, linear, weight, hook_in, hook_out)]`` for every edited matrix."""
        out = []
        for weights, matrix, hook_in, hook_out in (
            (self.attn_weights, lambda i: attn(model, i).o_proj, "attn.hook_z", "hook_attn_out"),
            (self.mlp_weights, lambda i: mlp(model, i).down_proj, "mlp.hook_post", "hook_mlp_out"),
        ):
            for layer, w in weights.items():
                out.append(
                    (layer, matrix(layer), w * self.strength, f"blocks.{layer}.{hook_in}", f"blocks.{layer}.{hook_out}")
                )
        return out

    def _edited(self, lin, r: torch.Tensor, w: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') in float64 on the weight's device."""
        x = lin.weight.detach().double()
        new = project_rows(x, r.to(x.device), w, self.norm_preserve)
        b = None
        if lin.bias is not None:
            bb = lin.bias.detach().double()
            b = bb - w * r * (r @ bb)
        return new, b

    def _apply(self, model: HookedLlama) -> None:
        if self.embeddings:
            project_embeddings(model, self._embedding_unit())
        for layer, lin, w, _, _ in self.targets(model):
            new, b = self._edited(lin, self.unit(layer), w)
            wt = _state.writable(model, lin.weight)
            wt.copy_(new.to(wt.dtype))
            if b is not None:
                bt = _state.writable(model, lin.bias)
                bt.copy_(b.to(bt.dtype))

    def _hooks(self, model: HookedLlama) -> HookList:
        out = [("hook_embed", project_out(self._embedding_unit()))] if self.embeddings else []
        for layer, lin, w, hook_in, hook_out in self.targets(model):
            r = self.unit(layer)
            if not self.norm_preserve:
                out.append((hook_out, project_out(r, w)))
                continue
            new, b = self._edited(lin, r, w)
            # the delta of the weights as they will be stored (rounded to the parameter dtype)
            delta = new.to(lin.weight.dtype).double() - lin.weight.detach().double()
            db = None if b is None else b.to(lin.bias.dtype).double() - lin.bias.detach().double()
            out += _delta_hooks(hook_in, hook_out, delta, db)
        return out


def _delta_hooks(hook_in: str, hook_out: str, delta: torch.Tensor, db: torch.Tensor | None) -> HookList:
    stash: dict[str, torch.Tensor] = {}

    def read(x: torch.Tensor, hook) -> None:
        flat = x.reshape(*x.shape[:2], -1)  # hook_z [B, P, H, D] -> [B, P, H*D]; hook_post stays [B, P, F]
        stash["d"] = flat @ delta.to(device=x.device, dtype=x.dtype).T

    def write(out: torch.Tensor, hook) -> torch.Tensor:
        add = stash.pop("d")
        if db is not None:
            add = add + db.to(device=out.device, dtype=out.dtype)
        return out + add.to(out.dtype)

    return [(hook_in, read), (hook_out, write)]
