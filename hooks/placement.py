"""Placing layers on several devices: the forward moves activations to each layer's device."""

from __future__ import annotations

import torch

from .errors import InputError


def place(model, device_map) -> None:
    """Move modules to devices. ``device_map``: ``{"model.layers.0": "cuda:0", …}`` (HF module names,
    the form accelerate produces) or ``"auto"`` (layers spread evenly over the visible GPUs)."""
    if device_map == "auto":
        device_map = auto_device_map(model)
    if not isinstance(device_map, dict):
        raise InputError(f"device_map must be 'auto' or a dict of module name -> device, got {device_map!r}")
    for name, device in device_map.items():
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:
            raise InputError(
                f"device_map names {name!r}, which is not a module of this model "
                "(use HF names such as 'model.layers.3', 'model.embed_tokens', 'lm_head')"
            ) from None
        module.to(device)
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.to(model.device)


def auto_device_map(model) -> dict[str, str]:
    n_gpu = torch.cuda.device_count()
    if n_gpu == 0:
        return {"": "cpu"}
    n = model.n_layers
    mapping = {"model.embed_tokens": "cuda:0", "model.rotary_emb": "cuda:0"}
    for i in range(n):
        mapping[f"model.layers.{i}"] = f"cuda:{i * n_gpu // n}"
    mapping["model.norm"] = mapping["lm_head"] = f"cuda:{n_gpu - 1}"
    if model.config.tie_word_embeddings:
        mapping["lm_head"] = "cuda:0"
    return mapping
