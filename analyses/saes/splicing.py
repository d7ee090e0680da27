"""Splicing SAEs into a model, and feature edits as hooks.

``spliced(model, saes)`` is ``model.saes(saes)`` with the SAEs checked against the model first and
``use_error_term`` set for the duration. Feature edits are ordinary hook functions for the
``<hook>.hook_sae_acts_post`` point::

    with spliced(model, [sae]), model.hooks([(f"{sae.hook_name}.hook_sae_acts_post", ablate_features([12]))]):
        model("The cat sat")
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Sequence

import torch

from hooks import InputError

from .formats import check_fits
from .sae import SAE

if TYPE_CHECKING:
    from hooks.model import HookedLlama


@contextlib.contextmanager
def spliced(model: HookedLlama, saes: Sequence[SAE], *, use_error_term: bool | None = None):
    """Context manager: each SAE runs at its hook point (see ``hooks.splice``); ``use_error_term``
    (True/False) overrides each SAE's own setting inside the block."""
    saes = list(saes)
    for sae in saes:
        if not isinstance(sae, SAE):
            raise InputError(f"spliced() takes SAE objects (from load_sae or train_sae), got {type(sae).__name__}")
        check_fits(sae, model)
    old = [sae.use_error_term for sae in saes]
    try:
        if use_error_term is not None:
            for sae in saes:
                sae.use_error_term = bool(use_error_term)
        with model.saes(saes):
            yield model
    finally:
        for sae, flag in zip(saes, old):
            sae.use_error_term = flag


def _features(features) -> list[int]:
    feats = [int(f) for f in ([features] if isinstance(features, int) else features)]
    if not feats:
        raise InputError("name at least one feature index")
    return feats


def _checked(acts: torch.Tensor, feats: list[int]) -> None:
    bad = [f for f in feats if not -acts.shape[-1] <= f < acts.shape[-1]]
    if bad:
        raise InputError(f"feature index {bad[0]} is out of range; the SAE has {acts.shape[-1]} features")


def scale_features(features, factor: float, positions=None):
    """Hook for ``hook_sae_acts_post``: multiply the features by ``factor`` (at ``positions`` only,
    if given: indices of the sequence axis)."""
    feats = _features(features)

    def scale_features_hook(acts: torch.Tensor, hook) -> torch.Tensor:
        _checked(acts, feats)
        out = acts.clone()
        where = slice(None) if positions is None else positions
        out[:, where, feats] = out[:, where, feats] * factor
        return out

    return scale_features_hook


def ablate_features(features, positions=None):
    """Hook for ``hook_sae_acts_post``: set the features to 0."""
    return clamp_features(features, 0.0, positions)


def clamp_features(features, value: float, positions=None):
    """Hook for ``hook_sae_acts_post``: set the features to ``value``."""
    feats = _features(features)

    def clamp_features_hook(acts: torch.Tensor, hook) -> torch.Tensor:
        _checked(acts, feats)
        out = acts.clone()
        where = slice(None) if positions is None else positions
        out[:, where, feats] = value
        return out

    return clamp_features_hook
