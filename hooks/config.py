"""Facts derived from a ``transformers.LlamaConfig`` (taken as is: no parallel config class)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .errors import UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")


def head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def n_kv_groups(config: LlamaConfig) -> int:
    """Query heads per key/value head (1 for MHA, n_heads for MQA)."""
    return config.num_attention_heads // config.num_key_value_heads


def rope_parameters(config: LlamaConfig) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params:
        return params
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def rope_type(config: LlamaConfig) -> str:
    return rope_parameters(config).get("rope_type", "default")


def rope_init(config: LlamaConfig, device=None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, from transformers' own RoPE functions."""
    kind = rope_type(config)
    if kind == "default":
        dim = head_dim(config)
        base = rope_parameters(config)["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0
    if kind not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedArchitectureError(
            f"unsupported rope_type {kind!r}; supported: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}"
        )
    kwargs = {"seq_len": seq_len} if seq_len is not None else {}
    return ROPE_INIT_FUNCTIONS[kind](config, device, **kwargs)


def check_supported(config) -> None:
    """Raise a one-line error for a config llama-scalpel cannot run exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}: llama-scalpel runs LlamaForCausalLM checkpoints "
            "(model_type 'llama', e.g. Llama 2/3, SmolLM2, TinyLlama)"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise UnsupportedArchitectureError(
            f"num_attention_heads={config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={config.num_key_value_heads}"
        )
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedArchitectureError("pretraining_tp > 1 is not supported; set it to 1 in config.json")
