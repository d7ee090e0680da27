"""Steering directions: the difference of means between two prompt sets at a layer, applied at run
time with a scale, and handed to weight surgery as plain tensors.

``steering_direction`` reads the residual stream (``blocks.{layer}.hook_resid_post`` by default) at one
position of every prompt (-1: each prompt's last token; batches are left-padded), and returns the unit
vector from the mean of set B to the mean of set A. ``steer`` adds ``scale * direction`` to
``blocks.{layer}.hook_resid_post`` at every position, as a ``with`` block or as a ``fwd_hooks`` list.

For the weights: ``direction.add_steering_args(scale)`` gives ``{"layer", "vector", "scale"}`` for the
surgery package's ``AddSteering``, ``direction.orthogonalize_args()`` gives ``{"direction"}`` for its
``Orthogonalize``; both hold plain tensors.

Example::

    d = steering_direction(model, ["I love this!", "What a joy."], ["I hate this.", "What a mess."], layer=12)
    with steer(model, d, scale=4.0):
        model.generate("The movie was", max_new_tokens=10)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from hooks import InputError, act_name
from hooks.model import takes_model

from .results import AnalysisResult, jsonable

_AT = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def _prompt_batch(model, prompts):
    if isinstance(prompts, torch.Tensor):
        t = prompts[None] if prompts.dim() == 1 else prompts
        return t.to(model.device), None
    if isinstance(prompts, str):
        prompts = [prompts]
    tokens, mask = model.tokenize(list(prompts))
    return tokens.to(model.device), mask.to(model.device)


def _read(model, prompts, names: list[str], pos: int, stop: int | None) -> dict[str, torch.Tensor]:
    tokens, mask = _prompt_batch(model, prompts)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names, stop_at_layer=stop)
    return {n: cache[n][:, pos].float() for n in names}  # [B, M]


@dataclass
class SteeringDirection(AnalysisResult):
    """A difference-of-means direction at ``blocks.{layer}.hook_{at}``.

    ``unit`` [M] (norm 1), ``norm`` = ‖mean_a − mean_b‖, ``mean_a`` / ``mean_b`` [M]; ``separation``
    [layers] (when computed for all layers): the distance of the two means along their own unit
    direction, divided by the pooled standard deviation of the projections (a d′-like score per layer).
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

    title = "steering direction"

    @property
    def vector(self) -> torch.Tensor:
        """``mean_a - mean_b`` (unit × norm)."""
        return self.unit * self.norm

    def add_steering_args(self, scale: float = 1.0) -> dict:
        """Arguments for surgery's ``AddSteering(layer, vector, scale)``: adds ``scale * unit`` at resid_post."""
        if self.at != "resid_post":
            raise InputError(f"AddSteering writes at resid_post; this direction was read at {self.at}")
        return {"layer": self.layer, "vector": self.unit.clone(), "scale": float(scale)}

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
    model, prompts_a, prompts_b, layer: int, at: str = "resid_post", pos: int = -1, *, all_layers: bool = False
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
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise InputError(f"layer must be an integer, got {layer!r}")
    if not -model.n_layers <= int(layer) < model.n_layers:  # negatives count from the end
        raise InputError(f"layer {layer} is out of range; the model has {model.n_layers} layers")
    layer = int(layer) % model.n_layers
    layers = list(range(model.n_layers)) if all_layers else [layer]
    names = [act_name(at, i) for i in layers]
    stop = max(layers) + 1
    stop = stop if stop < model.n_layers else None
    a = _read(model, prompts_a, names, pos, stop)
    b = _read(model, prompts_b, names, pos, stop)
    here = act_name(at, layer)
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
    )


class Steering:
    """Adds ``scale * vector`` at ``blocks.{layer}.hook_{at}`` (every position, or ``positions``).

    Use it as a context manager (``with steer(...):``), or pass ``.fwd_hooks`` (also what iterating
    gives) to ``run_with_hooks`` / ``hooks()``.
    """

    def __init__(
        self,
        model,
        vector: torch.Tensor,
        layer: int,
        scale: float,
        at: str = "resid_post",
        positions: Sequence[int] | None = None,
    ) -> None:
        self.model, self.layer, self.scale, self.at = model, int(layer), float(scale), at
        self.vector = vector.detach().reshape(-1)
        if self.vector.shape[0] != model.d_model:
            raise InputError(
                f"steering vector has {self.vector.shape[0]} entries; the model's d_model is {model.d_model}"
            )
        self.positions = None if positions is None else list(positions)
        self.name = act_name(at, self.layer)
        self._ctx = None

    def hook(self, t: torch.Tensor, hook) -> torch.Tensor:
        add = (self.scale * self.vector).to(t.device, t.dtype)
        if self.positions is None:
            return t + add
        t = t.clone()
        t[:, self.positions] += add
        return t

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
    model,
    direction: SteeringDirection | torch.Tensor,
    layer: int | None = None,
    scale: float = 1.0,
    *,
    at: str | None = None,
    positions: Sequence[int] | None = None,
) -> Steering:
    """Add ``scale * direction`` to ``blocks.{layer}.hook_resid_post`` (a context manager / fwd_hooks list).

    Args:
        model: a ``HookedLlama``.
        direction: a ``SteeringDirection`` (its ``unit`` is used, and its layer by default) or a tensor [M]
            used as given.
        layer: the layer (default: the direction's); scale: multiplier; at: hook kind (default resid_post,
            or the direction's); positions: only these positions (default: all, including generated ones).

    Example::

        with steer(model, d, scale=6.0):
            model.generate("I think that", max_new_tokens=12)
        logits = model.run_with_hooks(tokens, fwd_hooks=steer(model, d, scale=6.0).fwd_hooks)
    """
    if isinstance(direction, SteeringDirection):
        vector = direction.unit
        layer = direction.layer if layer is None else layer
        at = direction.at if at is None else at
    else:
        vector = torch.as_tensor(direction)
        if layer is None:
            raise InputError("steer needs layer= when the direction is a plain tensor")
    at = at or "resid_post"
    if at not in _AT:
        raise InputError(f"at={at!r} is not one of {', '.join(_AT)}")
    return Steering(model, vector, layer, scale, at, positions)
