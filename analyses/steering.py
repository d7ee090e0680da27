"""Steering directions: the difference of means between two prompt sets at a layer, applied at run
time with a scale, and handed to weight surgery as plain tensors.

``steering_direction`` reads the residual stream (``blocks.{layer}.hook_resid_post`` by default) at one
position of every prompt (-1: each prompt's last token; batches are left-padded), and returns the unit
vector from the mean of set B to the mean of set A, with ``resid_norm``, the typical residual norm at
that hook point. ``steer`` adds a multiple of the unit direction to ``blocks.{layer}.hook_{at}`` at every
position (or at ``positions``), as a ``with`` block or as a ``fwd_hooks`` list. The size of the push is
``strength`` × the residual norm at the layer (default ``DEFAULT_STRENGTH``), or ``scale`` in residual
units.

For the weights: ``direction.add_steering_args(scale | strength=)`` gives ``{"layer", "vector",
"scale"}`` for the surgery package's ``AddSteering``, ``direction.orthogonalize_args()`` gives
``{"direction"}`` for its ``Orthogonalize``; both hold plain tensors.

Example::

    d = steering_direction(model, ["I love this!", "What a joy."], ["I hate this.", "What a mess."], layer=12)
    with steer(model, d, strength=0.1):            # a tenth of the residual norm at layer 12
        model.generate("The movie was", max_new_tokens=10)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from hooks import InputError, act_name
from hooks.indices import check_index
from hooks.model import takes_model

from .massive import corpus_norm, massive_mask, reference_norm, warn_if_massive
from .results import AnalysisResult, jsonable

if TYPE_CHECKING:
    from hooks.model import HookedLlama

_AT = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
# The default push: this fraction of the typical residual norm at the hook point (see docs/analyses.md,
# "Steering", for the measurement on the default model).
DEFAULT_STRENGTH = 0.1


def _prompt_batch(model: HookedLlama, prompts):
    if isinstance(prompts, torch.Tensor):
        t = prompts[None] if prompts.dim() == 1 else prompts
        return t.to(model.device), torch.ones_like(t)
    if isinstance(prompts, str):
        prompts = [prompts]
    tokens, mask = model.tokenize(list(prompts))
    return tokens.to(model.device), mask.to(model.device)


def _read(model: HookedLlama, prompts, names: list[str], pos: int, stop: int | None, here: str):
    """({name: activations [B, M] at ``pos``}, norms [B, P] at ``here``, real-token mask [B, P],
    read mask [B, P])."""
    tokens, mask = _prompt_batch(model, prompts)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names, stop_at_layer=stop)
    read = torch.zeros(tokens.shape, dtype=torch.bool)
    read[:, pos] = True
    norms = cache[here].float().norm(dim=-1).cpu()
    return {n: cache[n][:, pos].float() for n in names}, norms, mask.bool().cpu(), read


@dataclass
class SteeringDirection(AnalysisResult):
    """A difference-of-means direction at ``blocks.{layer}.hook_{at}``.

    ``unit`` [M] (norm 1), ``norm`` = ‖mean_a − mean_b‖, ``mean_a`` / ``mean_b`` [M]; ``resid_norm``:
    the typical norm of the activations at that hook point (median over the prompts' real positions,
    massive activations left out; see ``analyses.massive``), the unit of ``strength``; ``separation``
    [layers] (when computed for all layers): the distance of the two means along their own unit
    direction, divided by the pooled standard deviation of the projections (a d′-like score per layer).
    Separation says how well the direction tells the prompt sets apart, not how much adding or removing
    it changes what the model does.
    """

    layer: int
    at: str
    unit: torch.Tensor
    norm: float
    mean_a: torch.Tensor
    mean_b: torch.Tensor
    pos: int
    separation: torch.Tensor | None = None
    separation_layers: list[int] = field(default_factory=list)
    resid_norm: float | None = None

    title = "steering direction"

    @property
    def vector(self) -> torch.Tensor:
        """``mean_a - mean_b`` (unit × norm)."""
        return self.unit * self.norm

    def scale_for(self, scale: float | None = None, strength: float | None = None) -> float:
        """The multiplier of ``unit``: ``scale`` as given, or ``strength`` × ``resid_norm`` (default
        ``DEFAULT_STRENGTH``)."""
        return _scale(scale, strength, self.resid_norm)

    def add_steering_args(self, scale: float | None = None, *, strength: float | None = None) -> dict:
        """Arguments for surgery's ``AddSteering(layer, vector, scale)``: adds ``scale * unit`` after a
        layer's MLP (``scale``, or ``strength`` × ``resid_norm``; default ``DEFAULT_STRENGTH``).

        ``AddSteering`` writes at ``resid_post``; a direction read at ``resid_pre`` of layer L > 0 is
        written after layer L − 1 (``resid_pre`` of L is ``resid_post`` of L − 1), one read at
        ``mlp_out`` after layer L (adding to the MLP's output is adding to ``resid_post``)."""
        layer = self.layer
        if self.at == "resid_pre" and layer > 0:
            layer -= 1
        elif self.at not in ("resid_post", "mlp_out"):
            raise InputError(
                f"AddSteering writes at resid_post; a direction read at {self.at} of layer {self.layer} has no "
                "weight form there; read it with at='resid_post' (or at='resid_pre' of a layer > 0)",
                param="at",
            )
        return {"layer": layer, "vector": self.unit.clone(), "scale": self.scale_for(scale, strength)}

    def orthogonalize_args(self) -> dict:
        """Arguments for surgery's ``Orthogonalize(direction)``: the unit direction to project out."""
        return {"direction": self.unit.clone()}

    def rows(self) -> list[dict]:
        if self.separation is None:
            return [{"layer": self.layer, "at": self.at, "norm": self.norm}]
        return [
            {"layer": layer, "at": self.at, "separation": float(s)}
            for layer, s in zip(self.separation_layers, self.separation)
        ]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "layer": self.layer,
                "at": self.at,
                "pos": self.pos,
                "norm": self.norm,
                "resid_norm": self.resid_norm,
                "unit": self.unit,
                "separation": self.separation,
                "separation_layers": self.separation_layers,
            }
        )

    def figure(self):
        """Separation per layer (when computed), else the sorted components of the unit vector."""
        import plotly.graph_objects as go

        if self.separation is not None:
            fig = go.Figure(
                go.Scatter(x=self.separation_layers, y=self.separation.double().tolist(), mode="lines+markers")
            )
            fig.update_layout(
                title=dict(text=f"steering: separation of the two prompt sets per layer ({self.at})"),
                xaxis=dict(title=dict(text="layer")),
                yaxis=dict(title=dict(text="separation (d′)")),
            )
            return fig
        vals = self.unit.sort(descending=True).values.double().tolist()
        fig = go.Figure(go.Bar(y=vals))
        fig.update_layout(
            title=dict(text=f"steering direction at layer {self.layer} {self.at} (norm {self.norm:.3f})"),
            xaxis=dict(title=dict(text="component (sorted)")),
        )
        return fig


@takes_model
def steering_direction(
    model: HookedLlama,
    prompts_a,
    prompts_b,
    layer: int,
    at: str = "resid_post",
    pos: int = -1,
    *,
    all_layers: bool = False,
) -> SteeringDirection:
    """Unit difference of means (set A minus set B) of ``blocks.{layer}.hook_{at}`` at ``pos``.

    Args:
        model: a ``HookedLlama``.
        prompts_a, prompts_b: lists of strings or of chat-message lists (or token ids [B, P]).
        layer: the layer read; at: ``resid_pre|resid_mid|resid_post|attn_out|mlp_out``.
        pos: position read in each prompt (-1: the last token).
        all_layers: also compute the per-layer separation (a d′-like score) over every layer.

    Returns:
        ``SteeringDirection`` with ``unit``, ``norm``, the two means, and ``separation`` if asked.

    Example::

        d = steering_direction(model, happy, sad, layer=10)
        d.add_steering_args(4.0)    # {"layer": 10, "vector": tensor[576], "scale": 4.0}
    """
    if at not in _AT:
        raise InputError(f"at={at!r} is not one of {', '.join(_AT)}")
    for name, prompts in (("prompts_a", prompts_a), ("prompts_b", prompts_b)):
        if not isinstance(prompts, (list, tuple, torch.Tensor)):
            raise InputError(
                f"{name} must be a list of prompts (strings or chat messages) or token ids "
                f"[batch, pos], got {type(prompts).__name__}"
            )
    layer = check_index(model, "layer", layer, param="layer", negative=True)  # negatives count from the end
    layers = list(range(model.n_layers)) if all_layers else [layer]
    names = [act_name(at, i) for i in layers]
    stop = max(layers) + 1
    stop = stop if stop < model.n_layers else None
    here = act_name(at, layer)
    a, norms_a, mask_a, read_a = _read(model, prompts_a, names, pos, stop, here)
    b, norms_b, mask_b, read_b = _read(model, prompts_b, names, pos, stop, here)
    norms, real, read = _cat_rows(norms_a, norms_b), _cat_rows(mask_a, mask_b), _cat_rows(read_a, read_b)
    typical = reference_norm(model, here, norms, real & ~read)
    warn_if_massive(
        "steering_direction",
        here,
        norms[read & real],
        typical,
        "the difference of means is dominated by those tokens; read a position where the prompts differ "
        "(pos=-1 of prompts longer than one token) or another layer",
    )
    diff = a[here].mean(0) - b[here].mean(0)
    norm = float(diff.norm())
    if norm == 0.0:
        raise InputError("the two prompt sets have identical means at this layer; pick prompts that differ")
    separation = None
    if all_layers:
        seps = []
        for n in names:
            d = a[n].mean(0) - b[n].mean(0)
            u = d / d.norm().clamp_min(1e-12)
            pa, pb = a[n] @ u, b[n] @ u
            pooled = torch.sqrt((pa.var(unbiased=False) + pb.var(unbiased=False)) / 2).clamp_min(1e-12)
            seps.append((pa.mean() - pb.mean()) / pooled)
        separation = torch.stack(seps).cpu()
    return SteeringDirection(
        layer=layer,
        at=at,
        unit=(diff / norm).cpu(),
        norm=norm,
        mean_a=a[here].mean(0).cpu(),
        mean_b=b[here].mean(0).cpu(),
        pos=pos,
        separation=separation,
        separation_layers=layers if all_layers else [],
        resid_norm=float(norms[real & ~massive_mask(norms, real, reference=typical)].median()),
    )


def _cat_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Two [B, P] tensors of different widths stacked by rows, left-padded with zeros (False)."""
    width = max(x.shape[1], y.shape[1])
    pad = [torch.nn.functional.pad(t, (width - t.shape[1], 0)) for t in (x, y)]
    return torch.cat(pad, 0)


def _scale(scale: float | None, strength: float | None, resid_norm: float | None) -> float:
    if scale is not None and strength is not None:
        raise InputError("pass scale= (residual units) or strength= (× the residual norm), not both", param="strength")
    for name, v in (("scale", scale), ("strength", strength)):
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf")
        ):
            raise InputError(f"{name} must be a finite number, got {v!r}", param=name)
    if scale is not None:
        return float(scale)
    return float(DEFAULT_STRENGTH if strength is None else strength) * float(resid_norm)


class Steering:
    """Adds ``scale * vector`` at ``blocks.{layer}.hook_{at}`` (every position, or ``positions``).

    ``positions`` are absolute token positions, counted from each prompt's first real token (left
    padding is not counted; ``hook.positions``), so they stay put during KV-cache generation: position 3
    is steered when the forward pass holds it, generated positions are not. With ``positions``,
    ``vector`` may hold one row per position ([len(positions), M]: ActAdd's per-position difference).

    Use it as a context manager (``with steer(...):``), or pass ``.fwd_hooks`` (also what iterating
    gives) to ``run_with_hooks`` / ``hooks()``.
    """

    def __init__(
        self,
        model: HookedLlama,
        vector: torch.Tensor,
        layer: int,
        scale: float,
        at: str = "resid_post",
        positions: Sequence[int] | None = None,
    ) -> None:
        self.model, self.layer, self.scale, self.at = model, int(layer), float(scale), at
        self.positions = None if positions is None else [int(p) for p in positions]
        vector = vector.detach()
        rows = 1 if self.positions is None else len(self.positions)
        if vector.dim() == 2 and self.positions is not None and vector.shape[0] == rows:
            self.vector = vector
        else:
            self.vector = vector.reshape(-1)
            if vector.dim() > 1 and vector.shape[0] != 1:
                raise InputError(
                    f"steering vector has shape {tuple(vector.shape)}; pass one vector [d_model], or one row "
                    f"per position with positions= ([{rows}, d_model])",
                    param="direction",
                )
        if self.vector.shape[-1] != model.d_model:
            raise InputError(
                f"steering vector has {self.vector.shape[-1]} entries; the model's d_model is {model.d_model}",
                param="direction",
            )
        if self.positions is not None and (not self.positions or min(self.positions) < 0):
            raise InputError(
                f"positions must be non-empty and count from each prompt's first token (0, 1, …), got "
                f"{self.positions}; for the last tokens of a known prompt use its length minus k",
                param="positions",
            )
        self.name = act_name(at, self.layer)
        self._ctx = None

    def hook(self, t: torch.Tensor, hook) -> torch.Tensor:
        add = (self.scale * self.vector).to(t.device, t.dtype)
        if self.positions is None:
            return t + add
        pos = getattr(hook, "positions", None)
        if pos is None or pos.shape[-1] != t.shape[1]:
            pos = torch.arange(t.shape[1], device=t.device).expand(t.shape[0], -1)
        pos = pos.to(t.device)
        out = t
        for i, p in enumerate(self.positions):
            row = add if add.dim() == 1 else add[i]
            out = out + (pos == p)[..., None].to(t.dtype) * row
        return out

    @property
    def fwd_hooks(self) -> list:
        return [(self.name, self.hook)]

    def __iter__(self):
        return iter(self.fwd_hooks)

    def __enter__(self):
        self._ctx = self.model.hooks(fwd_hooks=self.fwd_hooks)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        ctx, self._ctx = self._ctx, None
        return ctx.__exit__(*exc)


@takes_model
def steer(
    model: HookedLlama,
    direction: SteeringDirection | torch.Tensor,
    layer: int | None = None,
    scale: float | None = None,
    *,
    strength: float | None = None,
    at: str | None = None,
    positions: Sequence[int] | None = None,
) -> Steering:
    """Add a multiple of ``direction`` to ``blocks.{layer}.hook_{at}`` (a context manager / fwd_hooks list).

    The size of the push is ``strength`` × the typical residual norm at that hook point (default
    ``DEFAULT_STRENGTH``; the norm is the direction's ``resid_norm``, or for a plain tensor the median
    norm over the shipped corpus, ``analyses.massive.corpus_norm``), or ``scale`` in residual units.

    Args:
        model: a ``HookedLlama``.
        direction: a ``SteeringDirection`` (its ``unit`` is used, and its layer and hook by default) or a
            tensor [M] (with ``scale``: used as given; with ``strength``: normalised first), or
            [len(positions), M] with ``positions``: one vector per position (ActAdd).
        layer: the layer (default: the direction's); at: hook kind (default the direction's, else resid_post).
        scale: multiplier in residual units; strength: multiplier of the residual norm (not both).
        positions: only these absolute positions (0 = each prompt's first token; default: all positions,
            including generated ones).

    Example::

        with steer(model, d, strength=0.1):                    # + 0.1 × ‖resid‖ · unit at d's layer
            model.generate("I think that", max_new_tokens=12)
        logits = model.run_with_hooks(tokens, fwd_hooks=steer(model, d, scale=6.0).fwd_hooks)
    """
    if isinstance(direction, SteeringDirection):
        vector = direction.unit
        layer = direction.layer if layer is None else layer
        at = direction.at if at is None else at
        same_place = layer % model.n_layers == direction.layer and at == direction.at
        resid_norm = direction.resid_norm if same_place else None
    else:
        vector = torch.as_tensor(direction).float()
        if layer is None:
            raise InputError("steer needs layer= when the direction is a plain tensor", param="layer")
        resid_norm = None
    at = at or "resid_post"
    if at not in _AT:
        raise InputError(f"at={at!r} is not one of {', '.join(_AT)}", param="at")
    layer = check_index(model, "layer", layer, param="layer", negative=True)
    if vector.shape[-1] != model.d_model:
        raise InputError(
            f"steering vector has {vector.shape[-1]} entries; the model's d_model is {model.d_model}",
            param="direction",
        )
    if scale is None:
        if not isinstance(direction, SteeringDirection):
            norms = vector.norm(dim=-1, keepdim=True)
            if bool((norms == 0).any()):
                raise InputError("the steering vector is zero; pass a direction that is not", param="direction")
            vector = vector / norms
        if resid_norm is None:
            _scale(None, strength, 1.0)  # checks strength before the corpus forward
            resid_norm = corpus_norm(model, act_name(at, layer))
    return Steering(model, vector, layer, _scale(scale, strength, resid_norm), at, positions)
