"""The model fixture of the adapted nnsight tests: the only thing changed in them.

nnsight's ``tests/test_lm.py`` and ``tests/test_0516_features.py`` trace GPT-2 (the ``gpt2`` fixture, and
``nnsight.LanguageModel("openai-community/gpt2")``). Here every such model is one random Llama of GPT-2
small's shape (the tests hard-code its sizes) with the default model's tokenizer (SmolLM2's), wrapped as
the target under test:

- ``SCALPEL_INTEROP_TARGET=scalpel`` (the default): a ``HookedLlama``;
- ``SCALPEL_INTEROP_TARGET=reference``: a plain transformers ``LlamaForCausalLM`` on the same weight tensors,
  the count every adapted test is compared with.

GPT-2's module names (``transformer.h[i].mlp``, ``transformer.wte`` …) reach the Llama's modules through
nnsight's own ``rename=`` aliases (``GPT2_NAMES``), so the tests' paths are unchanged; a test's own ``rename``
is added to them. While a test of this folder runs, ``nnsight.LanguageModel`` is ``LanguageModel`` below
(conftest.py), which builds the target when a test names a hub checkpoint and passes anything else through.
"""

from __future__ import annotations

import functools
import os

import nnsight

from tests.helpers import smol_tokenizer, tiny_hf

TARGET = os.environ.get("SCALPEL_INTEROP_TARGET", "scalpel")
if TARGET not in ("scalpel", "reference"):
    raise RuntimeError(f"SCALPEL_INTEROP_TARGET must be 'scalpel' or 'reference', got {TARGET!r}")

# GPT-2's names for the Llama modules that do the same job (nnsight ``rename=``: native path -> alias)
GPT2_NAMES = {
    "model": "transformer",
    "layers": "h",
    "embed_tokens": "wte",
    "norm": "ln_f",
    "self_attn": "attn",
    "input_layernorm": "ln_1",
    "post_attention_layernorm": "ln_2",
    "self_attn.o_proj": "self_attn.c_proj",
    "mlp.down_proj": "mlp.c_proj",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.act_fn": "mlp.act",
}

_LanguageModel = nnsight.LanguageModel


# GPT-2 small's shape where the tests hard-code it (12 blocks, 12 heads, d_model 768, tied embeddings) as a
# random Llama; its MLP is kept at 768 wide (no test reads it) to keep the suite fast
GPT2_SHAPE = dict(
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    hidden_size=768,
    head_dim=64,
    intermediate_size=768,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


@functools.lru_cache(maxsize=1)
def _base():
    """The weights every target model shares: a random Llama of GPT-2 small's shape with SmolLM2's
    tokenizer and vocabulary (float32, CPU), built once."""
    from hooks import HookedLlama

    tok = smol_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return HookedLlama.from_hf(tiny_hf("mha", 0, vocab_size=len(tok), **GPT2_SHAPE, **ids), tok)


def tokenizer():
    """SmolLM2's tokenizer, a fresh copy per model (nnsight sets its padding side)."""
    return smol_tokenizer()


def torch_model():
    """A new module of the target class sharing the default model's weight tensors (nnsight instruments
    the modules it wraps for good, so each wrapper gets its own)."""
    from hooks import HookedLlama

    hf = _base().to_hf()
    return HookedLlama.from_hf(hf, tokenizer()) if TARGET == "scalpel" else hf


class LanguageModel(_LanguageModel):
    """``nnsight.LanguageModel`` for the copied tests: a hub id builds the target (see the module docstring);
    GPT-2's module names are added to ``rename``."""

    def __init__(self, model, *args, rename=None, **kwargs):
        if isinstance(model, str):
            kwargs.pop("device_map", None)
            kwargs.pop("dispatch", None)
            kwargs.setdefault("tokenizer", tokenizer())
            model = torch_model()
        super().__init__(model, *args, rename={**GPT2_NAMES, **(rename or {})}, **kwargs)


def language_model(**kwargs):
    """nnsight's own ``LanguageModel`` class on the target, with GPT-2's module names (the ``gpt2`` fixture)."""
    return _LanguageModel(torch_model(), tokenizer=tokenizer(), rename=dict(GPT2_NAMES), **kwargs)
