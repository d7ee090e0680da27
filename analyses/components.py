"""Patchable components: where each lives (hook point), which axes index it, and how to patch it.

A ``Component`` is a small strategy object (the setters of TransformerLens's ``patching.py``, but
described by data): the hook point name per layer, the axis that holds positions and the axis that
holds the unit being patched (a query head, a key/value group, or an MLP neuron). The engine in
``analyses.engine`` needs nothing else to patch it, one variant per batch row.

| component | hook point | activation | unit |
|---|---|---|---|
| resid_pre / resid_mid / resid_post | ``blocks.L.hook_resid_*`` | [B, P, M] | – |
| attn_out / mlp_out | ``blocks.L.hook_attn_out`` / ``hook_mlp_out`` | [B, P, M] | – |
| z / result / q | ``blocks.L.attn.hook_z`` / ``hook_result`` / ``hook_q`` | [B, P, H, D or M] | query head |
| k / v | ``blocks.L.attn.hook_k`` / ``hook_v`` | [B, P, G, D] | key/value group |
| pattern | ``blocks.L.attn.hook_pattern`` | [B, H, Q, K] (position = query) | query head |
| neurons | ``blocks.L.mlp.hook_post`` | [B, P, F] | neuron |
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hooks import InputError, act_name

if TYPE_CHECKING:
    from hooks.model import HookedLlama


@dataclass(frozen=True)
class Component:
    """How to find and index one kind of activation (see the module table).

    ``pos_axis`` / ``unit_axis`` index the activation including its batch axis (0).
    Example: ``COMPONENTS["z"].hook_name(3) == "blocks.3.attn.hook_z"``.
    """

    name: str
    act: str  # short activation name for ``act_name``
    unit: str | None  # None, "head" (query head), "kv_head" (key/value group) or "neuron"
    pos_axis: int = 1
    unit_axis: int | None = None

    def hook_name(self, layer: int) -> str:
        return act_name(self.act, layer)

    def n_units(self, model: HookedLlama) -> int:
        """Number of units per layer (1 for whole-vector components)."""
        return {None: 1, "head": model.n_heads, "kv_head": model.n_kv_heads, "neuron": model.d_mlp}[self.unit]

    @property
    def unit_axis_name(self) -> str | None:
        """Name of the unit axis in results: "head", "kv_head", "neuron" or None."""
        return self.unit

    def differs(self, clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
        """[P, U] bool: where the clean and corrupted activations differ at all (any prompt, any other axis).

        A patch that writes only equal values changes nothing, and positions before the first
        difference are the same in both runs.
        """
        d = clean != corrupted
        keep = [self.pos_axis] + ([self.unit_axis] if self.unit_axis is not None else [])
        for axis in sorted((a for a in range(d.dim()) if a not in keep), reverse=True):
            d = d.any(dim=axis)
        if self.unit_axis is None:
            return d[:, None]
        return d if self.pos_axis < self.unit_axis else d.T

    def suffix(self, act: torch.Tensor, start: int) -> torch.Tensor:
        """The activation from position ``start`` on (query positions for the pattern)."""
        return act.narrow(self.pos_axis, start, act.shape[self.pos_axis] - start)

    def region(self, act: torch.Tensor, pos: int | None, unit: int | None, start: int = 0) -> tuple:
        """Index of the slice one patch writes (``pos`` None = every position; ``unit`` None = all)."""
        index: list = [slice(None)] * act.dim()
        if pos is not None:
            index[self.pos_axis] = pos - start
        if unit is not None and self.unit_axis is not None:
            index[self.unit_axis] = unit
        return tuple(index)


COMPONENTS: dict[str, Component] = {
    "resid_pre": Component("resid_pre", "resid_pre", None),
    "resid_mid": Component("resid_mid", "resid_mid", None),
    "resid_post": Component("resid_post", "resid_post", None),
    "attn_out": Component("attn_out", "attn_out", None),
    "mlp_out": Component("mlp_out", "mlp_out", None),
    "z": Component("z", "z", "head", 1, 2),
    "result": Component("result", "result", "head", 1, 2),
    "q": Component("q", "q", "head", 1, 2),
    "k": Component("k", "k", "kv_head", 1, 2),
    "v": Component("v", "v", "kv_head", 1, 2),
    "pattern": Component("pattern", "pattern", "head", 2, 1),
    "neurons": Component("neurons", "post", "neuron", 1, 2),
}
_ALIASES = {"post": "neurons", "mlp_post": "neurons", "neuron": "neurons", "head": "z", "heads": "z", "attn": "pattern"}


def get_component(name: str | Component) -> Component:
    """The ``Component`` for a name (``"resid_pre"``, ``"z"``, ``"neurons"`` …); an error lists the close ones."""
    if isinstance(name, Component):
        return name
    key = _ALIASES.get(name, name)
    if key not in COMPONENTS:
        close = difflib.get_close_matches(str(name), list(COMPONENTS) + list(_ALIASES), n=3)
        raise InputError(
            f"unknown component {name!r}; closest: {', '.join(close) or 'none'} (all: {', '.join(COMPONENTS)})"
        )
    return COMPONENTS[key]
