"""Shared fixtures: tiny random configs covering every supported variant and family (Llama, Mistral,
Qwen2, Qwen3), and the real default model (SmolLM2-135M-Instruct), loaded once per session."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hooks import HookedLlama
from hooks import config as hooks_config

# name -> config overrides on top of TINY; "family" picks the transformers class (default llama)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=128, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
VARIANTS = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    "mqa": {"num_key_value_heads": 1},
    "tied": {"tie_word_embeddings": True, "num_key_value_heads": 2},
    "bias": {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 2},
    "head_dim": {"head_dim": 24, "num_key_value_heads": 2},
    "rope_linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    "rope_dynamic": {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                     "max_position_embeddings": 8},
    "rope_llama3": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                        "rope_theta": 500000.0}},
    "rope_yarn": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                      "rope_theta": 10000.0}},
    # other families: the sliding windows (4 keys) are shorter than every test prompt
    "mistral": {"family": "mistral", "num_key_value_heads": 2, "sliding_window": 4},
    "qwen2": {"family": "qwen2", "num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 4,
              "max_window_layers": 1},  # layer 0 full, layers 1-2 windowed; q/k/v biases, no o bias
    "qwen2_tied": {"family": "qwen2", "num_key_value_heads": 1, "tie_word_embeddings": True,
                   "use_sliding_window": True, "sliding_window": 4,
                   "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "qwen3": {"family": "qwen3", "num_key_value_heads": 2, "head_dim": 24},  # q/k norms, head_dim != 64 / 4
    "qwen3_window": {"family": "qwen3", "head_dim": 8, "attention_bias": True, "use_sliding_window": True,
                     "sliding_window": 4, "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
}
FAMILY_VARIANTS = [v for v in VARIANTS if "family" in VARIANTS[v]]


def tiny_config(variant: str = "gqa", **overrides) -> LlamaConfig:
    """The variant's config, of its family's own config class (``LlamaConfig``, ``Qwen2Config`` …)."""
    fields = {**TINY, **VARIANTS[variant], **overrides}
    return hooks_config.config_class(fields.pop("family", "llama"))(**fields)


def tiny_hf(variant: str = "gqa", seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random HF model of the variant's own class whose biases and norm weights are non-trivial
    (so they are really tested)."""
    torch.manual_seed(seed)
    config = tiny_config(variant, **overrides)
    model = hooks_config.causal_lm_class(config)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: batched patching of tiny models is faster without OpenMP
    hand-offs, and timings stay steady when other processes share the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture
def tiny() -> HookedLlama:
    """A tiny GQA HookedLlama with random weights (no tokenizer)."""
    return HookedLlama.from_hf(tiny_hf("gqa"))


@pytest.fixture(scope="session")
def smol() -> HookedLlama:
    """The real default model, SmolLM2-135M-Instruct, fp32 on CPU."""
    return HookedLlama.default()


@pytest.fixture(scope="session")
def smol_hf():
    """HF's own LlamaForCausalLM loaded from the same GGUF (the independent reference)."""
    from hooks.loading import default_gguf_path
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
