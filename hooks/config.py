"""Facts derived from a transformers config (taken as is: no parallel config class).

One model file runs four Llama-shaped families; what differs between them is read here, as a few
switches: which projections carry a bias, which layers attend through a sliding window, and whether
queries and keys pass a per-head RMSNorm (Qwen3) before RoPE.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from _core.readers import Fields

from .errors import LoadError, UnsupportedArchitectureError

# model_type -> the family's own transformers class (the reference for every check)
FAMILY_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_CLASSES)
SUPPORTED_CLASSES = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM"
SUPPORTED_TEXT = f"{SUPPORTED_CLASSES} checkpoints (model_type 'llama', 'mistral', 'qwen2' or 'qwen3')"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")


def family(config) -> str:
    """The config's model_type ('llama', 'mistral', 'qwen2' or 'qwen3')."""
    return getattr(config, "model_type", None) or "llama"


def family_class_name(config) -> str:
    return FAMILY_CLASSES[family(config)]


def config_class(model_type: str):
    """The transformers config class of a supported model_type."""
    import transformers

    return getattr(transformers, FAMILY_CLASSES[model_type].replace("ForCausalLM", "Config"))


def causal_lm_class(config):
    """The family's own transformers class (``Qwen2ForCausalLM`` for a Qwen2 config …)."""
    import transformers

    return getattr(transformers, family_class_name(config))


def attention_biases(config) -> dict[str, bool]:
    """Which of q/k/v/o_proj carry a bias: one flag for all four (Llama, Qwen3), none (Mistral), or
    q/k/v always and o never (Qwen2, fixed by its class)."""
    kind = family(config)
    if kind == "qwen2":
        return {"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": False}
    on = kind != "mistral" and bool(getattr(config, "attention_bias", False))
    return dict.fromkeys(ATTENTION_PROJECTIONS, on)


def mlp_bias(config) -> bool:
    """Only Llama has an ``mlp_bias`` flag; the other families' MLPs never carry biases."""
    return family(config) == "llama" and bool(getattr(config, "mlp_bias", False))


def bias_flag(config, part: str) -> str | None:
    """The config flag that gives every ``part`` ("attention" or "mlp") projection a bias, or None
    when the family's class cannot carry one there."""
    kind = family(config)
    if part == "attention":
        return "attention_bias" if kind in ("llama", "qwen3") else None
    return "mlp_bias" if kind == "llama" else None


def qk_norm(config) -> bool:
    """Qwen3: per-head RMSNorm on queries and keys, before RoPE."""
    return family(config) == "qwen3"


def sliding_window(config, layer_idx: int) -> int | None:
    """The number of keys (the query's own included) layer ``layer_idx`` sees, or None (all).

    Mistral windows every layer when ``sliding_window`` is set; Qwen2/Qwen3 window the layers that
    ``layer_types`` marks ``sliding_attention`` (derived by transformers from ``use_sliding_window``
    and ``max_window_layers``); Llama never windows.
    """
    kind = family(config)
    window = getattr(config, "sliding_window", None)
    if kind == "mistral":
        return window
    if kind in ("qwen2", "qwen3"):
        types = getattr(config, "layer_types", None) or []
        return window if layer_idx < len(types) and types[layer_idx] == "sliding_attention" else None
    return None


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
        inv_freq = 1.0 / (
            base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim)
        )
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
            f"unsupported architecture {model_type!r}: llama-scalpel runs {SUPPORTED_TEXT}"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise UnsupportedArchitectureError(
            f"num_attention_heads={config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={config.num_key_value_heads}"
        )
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedArchitectureError("pretraining_tp > 1 is not supported; set it to 1 in config.json")


# config.json fields the model is built from, with the type each must have (absent or null: the default).
_POSITIVE_INTS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
)
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_OPTIONAL = ("num_key_value_heads", "head_dim", "rope_theta", "attention_bias", "mlp_bias", "tie_word_embeddings")


def check_config_fields(raw: dict, file) -> None:
    """A wrongly typed or out-of-domain value in config.json, as one line naming the field (before any work)."""

    def bad(key: str, must: str) -> LoadError:
        value = raw[key]
        return LoadError(
            f"{file}: {key!r} is {value!r} ({type(value).__name__}) but must be {must}; fix it in config.json"
        )

    for key in _POSITIVE_INTS + _POSITIVE_FLOATS + _BOOLS:
        if key not in raw or (raw[key] is None and key in _OPTIONAL):
            continue
        value = raw[key]
        if key in _BOOLS:
            if not isinstance(value, bool):
                raise bad(key, "true or false")
        elif isinstance(value, bool) or not isinstance(value, int if key in _POSITIVE_INTS else (int, float)):
            raise bad(key, "an integer >= 1" if key in _POSITIVE_INTS else "a positive number")
        elif not value > 0 or value != value or value in (float("inf"),):
            raise bad(key, "an integer >= 1" if key in _POSITIVE_INTS else "a positive number")
    fields = Fields(raw, str(file), LoadError, "fix it in config.json")
    fields.int("sliding_window", None, minimum=1)  # a window of 0 or -5 keys would silently mask everything
    fields.int("max_window_layers", None, minimum=0)
    fields.bool("use_sliding_window", None)
    fields.str("hidden_act", None, choices=SUPPORTED_ACTIVATIONS)
    for key in ("rope_parameters", "rope_scaling"):
        rope = fields.mapping(key)
        rope.str("rope_type", None)
        rope.str("type", None)
        rope.number("rope_theta", None, positive=True)
        if rope.number("factor", None, positive=True) not in (None,) and rope.data["factor"] < 1:
            raise rope.bad("factor", "a number >= 1")
        for name in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale"):
            rope.number(name, None)
        rope.int("original_max_position_embeddings", None, minimum=1)
