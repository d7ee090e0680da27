"""Edits of attention heads: ``ZeroHeads``, ``ScaleHeads``, ``ZeroKVGroups``, ``MeanAblateHeads``.

A query head ``h`` owns columns ``h·D … (h+1)·D`` of ``o_proj`` (its slice of ``hook_z``); GQA query head
``h`` reads key/value group ``h // (H / G)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .. import _state
from ..errors import EditError
from .base import (
    Edit,
    HookList,
    as_float,
    as_int,
    as_ints,
    as_tensor,
    attn,
    check_fits,
    check_layer,
    check_size,
    check_units,
    head_cols,
    set_slice,
)
from .stats import mean_activations

if TYPE_CHECKING:
    from hooks import HookedLlama


@dataclass(eq=False, repr=False)
class ZeroHeads(Edit):
    """Silence query heads: zero their columns of ``o_proj`` (the heads' slice of the o_proj input).

    Hooks: ``blocks.{layer}.attn.hook_z[:, :, heads] = 0``.
    """

    layer: int
    heads: Sequence[int]

    def __post_init__(self) -> None:
        self.layer = as_int(self.layer, "layer", self.who)
        self.heads = as_ints(self.heads, "heads", self.who)

    def validate(self, model: HookedLlama) -> None:
        check_layer(model, self.layer, self.who)
        check_units(self.heads, model.n_heads, "head", self.who)

    def _apply(self, model: HookedLlama) -> None:
        o = attn(model, self.layer).o_proj
        w = _state.writable(model, o.weight)  # [M, H*D]
        w[:, head_cols(self.heads, model.d_head).to(w.device)] = 0

    def _hooks(self, model: HookedLlama) -> HookList:
        heads = list(self.heads)
        return [(f"blocks.{self.layer}.attn.hook_z", set_slice((slice(None), slice(None), heads), torch.zeros_like))]


@dataclass(eq=False, repr=False)
class ScaleHeads(Edit):
    """Multiply query heads' outputs by ``factor``: scale their ``o_proj`` columns.

    Hooks: ``hook_z[:, :, heads] *= factor``.
    """

    layer: int
    heads: Sequence[int]
    factor: float

    magnitudes = ("factor",)

    def __post_init__(self) -> None:
        self.layer = as_int(self.layer, "layer", self.who)
        self.heads = as_ints(self.heads, "heads", self.who)
        self.factor = as_float(self.factor, "factor", self.who)

    def validate(self, model: HookedLlama) -> None:
        check_layer(model, self.layer, self.who)
        check_units(self.heads, model.n_heads, "head", self.who)
        w = attn(model, self.layer).o_proj.weight
        check_fits(
            self.who,
            "factor",
            self.factor,
            w[:, head_cols(self.heads, model.d_head).to(w.device)],
            f"the o_proj columns of heads {list(self.heads)}",
        )

    def _apply(self, model: HookedLlama) -> None:
        o = attn(model, self.layer).o_proj
        w = _state.writable(model, o.weight)
        cols = head_cols(self.heads, model.d_head).to(w.device)
        w[:, cols] = w[:, cols] * self.factor

    def _hooks(self, model: HookedLlama) -> HookList:
        f = self.factor
        return [
            (
                f"blocks.{self.layer}.attn.hook_z",
                set_slice((slice(None), slice(None), list(self.heads)), lambda x: x * f),
            )
        ]


@dataclass(eq=False, repr=False)
class ZeroKVGroups(Edit):
    """GQA-aware: silence key/value groups and every query head that reads them.

    Zeroes the groups' rows of ``k_proj``/``v_proj`` (and biases), the reading heads' rows of
    ``q_proj`` and their columns of ``o_proj``. Query head ``h`` reads group ``h // (H / G)``.
    Hooks: zero ``hook_q`` (heads), ``hook_k`` / ``hook_v`` (groups) and ``hook_z`` (heads).
    """

    layer: int
    groups: Sequence[int]

    def __post_init__(self) -> None:
        self.layer = as_int(self.layer, "layer", self.who)
        self.groups = as_ints(self.groups, "groups", self.who)

    def validate(self, model: HookedLlama) -> None:
        check_layer(model, self.layer, self.who)
        check_units(self.groups, model.n_kv_heads, "group", self.who)

    def heads(self, model: HookedLlama) -> list[int]:
        rep = model.n_heads // model.n_kv_heads
        return [g * rep + i for g in self.groups for i in range(rep)]

    def _apply(self, model: HookedLlama) -> None:
        a, d = attn(model, self.layer), model.d_head
        heads = self.heads(model)
        head_rows, group_rows = head_cols(heads, d), head_cols(self.groups, d)
        for proj, rows in ((a.q_proj, head_rows), (a.k_proj, group_rows), (a.v_proj, group_rows)):
            _state.writable(model, proj.weight)[rows.to(proj.weight.device)] = 0
            if proj.bias is not None:
                _state.writable(model, proj.bias)[rows.to(proj.bias.device)] = 0
        _state.writable(model, a.o_proj.weight)[:, head_rows.to(a.o_proj.weight.device)] = 0

    def _hooks(self, model: HookedLlama) -> HookList:
        heads, groups, i = self.heads(model), list(self.groups), self.layer

        def sel(idx):
            return set_slice((slice(None), slice(None), idx), torch.zeros_like)

        return [
            (f"blocks.{i}.attn.hook_q", sel(heads)),
            (f"blocks.{i}.attn.hook_k", sel(groups)),
            (f"blocks.{i}.attn.hook_v", sel(groups)),
            (f"blocks.{i}.attn.hook_z", sel(heads)),
        ]


@dataclass(eq=False, repr=False)
class MeanAblateHeads(Edit):
    """Replace query heads' outputs by reference means: ``hook_z[:, :, h] = means[i]``.

    Exact in weights: the heads' ``o_proj`` columns become zero and ``o_proj.bias`` gains
    ``W_O[:, h] @ means[i]`` (turning on ``attention_bias``, zero q/k/v/o biases elsewhere).
    ``means`` is ``[len(heads), head_dim]``, row ``i`` for ``heads[i]``; get it with
    ``MeanAblateHeads.compute(model, layer, heads, prompts)`` or ``from_means`` on the output of
    ``surgery.mean_activations`` (``{layer: [n_heads, head_dim]}``).
    """

    layer: int
    heads: Sequence[int]
    means: Any

    magnitudes = ("means",)

    def __post_init__(self) -> None:
        self.layer = as_int(self.layer, "layer", self.who)
        self.heads = as_ints(self.heads, "heads", self.who)
        self.means = as_tensor(self.means, "means", self.who, 2)
        if self.means.shape[0] != len(self.heads):
            raise EditError(
                f"{self.who}: means has {self.means.shape[0]} rows but {len(self.heads)} heads are named; "
                "pass one mean vector per head (use MeanAblateHeads.from_means for a [n_heads, d_head] table)",
                param="means",
            )

    @classmethod
    def from_means(cls, layer: int, heads: Sequence[int], means) -> MeanAblateHeads:
        """From a per-layer table ``[n_heads, d_head]`` or the ``{layer: table}`` of ``mean_activations``."""
        if isinstance(means, dict):
            if layer not in means:
                raise EditError(f"MeanAblateHeads: no means for layer {layer}; computed for {sorted(means)}")
            means = means[layer]
        table = as_tensor(means, "means", "MeanAblateHeads", 2)
        heads = as_ints(heads, "heads", "MeanAblateHeads")
        check_units(heads, table.shape[0], "head", "MeanAblateHeads")
        return cls(layer, heads, table[list(heads)])

    @classmethod
    def compute(cls, model: HookedLlama, layer: int, heads: Sequence[int], prompts) -> MeanAblateHeads:
        """Means of ``hook_z`` over every token of ``prompts`` (see ``surgery.mean_activations``)."""
        return cls.from_means(layer, heads, mean_activations(model, prompts, layers=[layer]))

    def validate(self, model: HookedLlama) -> None:
        check_layer(model, self.layer, self.who)
        check_units(self.heads, model.n_heads, "head", self.who)
        check_size(self.means, model.d_head, "means", self.who, "head_dim")

    def _check_weights(self, model: HookedLlama) -> None:
        _state.check_bias_slot(model, "attention", "o_proj", self.who)

    def _apply(self, model: HookedLlama) -> None:
        _state.enable_biases(model, attention=True)
        o, d = attn(model, self.layer).o_proj, model.d_head
        w = _state.writable(model, o.weight)  # [M, H*D]
        b = _state.writable(model, o.bias)  # [M]
        means = self.means.to(device=w.device, dtype=torch.float64)
        add = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        for i, h in enumerate(self.heads):
            add += w[:, h * d : (h + 1) * d].double() @ means[i]
        cols = head_cols(self.heads, d).to(w.device)
        w[:, cols] = 0
        b.copy_((b.double() + add).to(b.dtype))

    def _hooks(self, model: HookedLlama) -> HookList:
        heads, means = list(self.heads), self.means.clone()

        def hook(z: torch.Tensor, hook) -> torch.Tensor:
            z = z.clone()
            z[:, :, heads] = means.to(device=z.device, dtype=z.dtype)
            return z

        return [(f"blocks.{self.layer}.attn.hook_z", hook)]
