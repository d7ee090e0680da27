"""The model fixture of the adapted TransformerLens tests: the only thing changed in them.

TransformerLens's tests load GPT-2-family checkpoints from the hub (``HookedTransformer.from_pretrained
("gpt2")``, ``TransformerBridge.boot_transformers("distilgpt2")``) or build a model from a
``HookedTransformerConfig``. Here each of those builds a tiny random Llama instead (``tests/helpers.py``'s
``tiny_hf``, SmolLM2's tokenizer and vocabulary, seeded by the name, so the same name always gives the same
weights), and hands it to the model under test:

- ``SCALPEL_INTEROP_TARGET=scalpel`` (the default): a ``HookedLlama`` on those weights;
- ``SCALPEL_INTEROP_TARGET=reference``: TransformerLens 4.3's own ``TransformerBridge`` booted from the same
  ``LlamaForCausalLM`` (compatibility mode, with the weight processing the test asked for, as TransformerLens's
  ``from_pretrained`` does), the count every adapted test is compared with.

The copied test files import ``HookedTransformer``, ``HookedTransformerConfig``, ``HookPoint`` and ``utils``
from here instead of from ``transformer_lens`` (TransformerLens 4.x removed the first and the last; its
``utilities`` module is ``utils`` under its new name). Nothing else in them is changed.
"""

from __future__ import annotations

import os
import zlib

import torch
from transformer_lens import utilities as utils  # noqa: F401 - re-exported for the copied tests

from tests.helpers import smol_tokenizer, tiny_hf

TARGET = os.environ.get("SCALPEL_INTEROP_TARGET", "scalpel")
if TARGET not in ("scalpel", "reference"):
    raise RuntimeError(f"SCALPEL_INTEROP_TARGET must be 'scalpel' or 'reference', got {TARGET!r}")

# blocks and heads of the checkpoint a test names (the tiny stand-in keeps both, so layer and head indices hold)
_SHAPES = {
    "solu-1l": (1, 8),
    "gelu-1l": (1, 8),
    "attn-only-1l": (1, 8),
    "solu-2l": (2, 8),
    "gelu-2l": (2, 8),
    "attn-only-2l": (2, 8),
    "redwood_attn_2l": (2, 8),
    "solu-4l-pile": (4, 8),
    "distilgpt2": (6, 12),
    "pythia-14m": (6, 4),
    "tiny-stories-1M": (8, 16),
    "gpt2": (12, 12),
    "gpt2-small": (12, 12),
    "facebook/opt-125m": (12, 12),
}
N_CTX = 1024  # GPT-2's context, which the tests' truncation checks assume


def tokenizer():
    """SmolLM2's tokenizer, a fresh copy for each model (models and tests may change its settings)."""
    return smol_tokenizer()


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 2**31


def hf_model(name: str = "gpt2", **overrides):
    """The tiny random ``LlamaForCausalLM`` standing for checkpoint ``name`` (SmolLM2's vocabulary)."""
    tok = tokenizer()
    layers, heads = _SHAPES.get(name, (2, 4))
    fields = dict(
        attention_bias=True,  # GPT-2-family checkpoints have biases; a Llama may too (Qwen2, attention_bias)
        mlp_bias=True,
        vocab_size=len(tok),
        num_hidden_layers=layers,
        hidden_size=16 * heads,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=16,
        max_position_embeddings=N_CTX,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    fields.update(overrides)
    return tiny_hf("mha", _seed(name), **fields)


# ----------------------------------------------------------------------------------- the two targets
def _scalpel(hf, tok, default_prepend_bos=None, default_padding_side=None):
    from hooks import HookedLlama

    model = HookedLlama.from_hf(hf, tok)
    if tok is not None:
        model.cfg.default_prepend_bos = True if default_prepend_bos is None else default_prepend_bos
    if default_padding_side is not None:
        model.cfg.default_padding_side = default_padding_side
    return model


def _bridge(name, hf, tok, *, compat=True, processing=None, default_prepend_bos=None, default_padding_side=None):
    from transformer_lens.model_bridge.bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        f"tiny-llama-{name}", hf_model=hf, tokenizer=tok, dtype=torch.float32, device="cpu"
    )
    if compat:
        processing = processing or {}
        bridge.enable_compatibility_mode(disable_warnings=True, **processing)
    if default_prepend_bos is not None:
        bridge.cfg.default_prepend_bos = default_prepend_bos
    if default_padding_side is not None:
        bridge.cfg.default_padding_side = default_padding_side
        if bridge.tokenizer is not None:
            bridge.tokenizer.padding_side = default_padding_side
    return bridge.eval()


_PROCESSING = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


def load(name: str, *, processed: bool = True, compat: bool = True, **kwargs):
    """The model under test standing for checkpoint ``name`` (see the module docstring).

    ``processed``: the reference gets TransformerLens's default weight processing (``from_pretrained``);
    a ``HookedLlama`` is never processed (nothing is folded, by design)."""
    hf = hf_model(name)
    tok = tokenizer()
    prepend = kwargs.get("default_prepend_bos")
    padding = kwargs.get("default_padding_side")
    if TARGET == "scalpel":
        return _scalpel(hf, tok, prepend, padding)
    processing = {k: kwargs[k] for k in _PROCESSING if k in kwargs}
    processing.pop("refactor_factored_attn_matrices", None)  # impossible under RoPE (TransformerLens refuses it)
    if not processed:
        processing = {"no_processing": True}
    return _bridge(
        name, hf, tok, compat=compat, processing=processing, default_prepend_bos=prepend, default_padding_side=padding
    )


def reference(name: str, *, processed: bool = False):
    """TransformerLens's own model on the same weights, for tests that compare two models
    (``reference_ht``): unprocessed against a ``HookedLlama``, as named against the reference target."""
    hf = hf_model(name)
    processing = {} if (processed and TARGET == "reference") else {"no_processing": True}
    return _bridge(name, hf, tokenizer(), processing=processing)


# ----------------------------------------------------------------------------------- TransformerLens's names
class HookedTransformerConfig:
    """The fields of TransformerLens's config a test sets; the rest take TransformerLens's defaults."""

    def __init__(self, n_layers, d_model, n_ctx, d_head, n_heads=-1, d_mlp=None, d_vocab=-1, **kwargs):
        self.n_layers, self.d_model, self.n_ctx, self.d_head = n_layers, d_model, n_ctx, d_head
        self.n_heads = n_heads if n_heads != -1 else d_model // d_head
        self.d_mlp = d_mlp if d_mlp is not None else 4 * d_model
        self.d_vocab = d_vocab
        self.n_key_value_heads = kwargs.pop("n_key_value_heads", None) or self.n_heads
        self.tokenizer_name = kwargs.pop("tokenizer_name", None)
        self.seed = kwargs.pop("seed", None)
        self.default_prepend_bos = kwargs.pop("default_prepend_bos", True)
        self.extra = kwargs  # act_fn, normalization_type, attn_only …: a Llama has SwiGLU, RMSNorm and MLPs


def _from_config(cfg: HookedTransformerConfig, tok=None):
    if cfg.tokenizer_name is not None and tok is None:
        tok = tokenizer()
    d_vocab = cfg.d_vocab if cfg.d_vocab != -1 else (len(tok) if tok is not None else 50257)
    d_head = cfg.d_head + cfg.d_head % 2  # RoPE rotates pairs: a Llama's head size is even
    name = f"config-{_seed(repr(sorted(vars(cfg).items())))}"
    hf = hf_model(
        name,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_key_value_heads,
        head_dim=d_head,
        intermediate_size=cfg.d_mlp,
        vocab_size=d_vocab,
        max_position_embeddings=cfg.n_ctx,
        bos_token_id=tok.bos_token_id if tok is not None else 1,
        eos_token_id=tok.eos_token_id if tok is not None else 2,
        pad_token_id=tok.pad_token_id if tok is not None else 0,
    )
    if TARGET == "scalpel":
        return _scalpel(hf, tok, cfg.default_prepend_bos)
    # the bridge fetches a tokenizer from the hub when given none: give it one, then take it away again
    bridge = _bridge(
        name, hf, tok or tokenizer(), processing={"no_processing": True}, default_prepend_bos=cfg.default_prepend_bos
    )
    if tok is None:
        bridge.tokenizer = None
    return bridge


class HookedTransformer:
    """``HookedTransformer(cfg)``, ``HookedTransformer.from_pretrained(name)`` and
    ``from_pretrained_no_processing(name)``, building the model under test (see the module docstring)."""

    def __new__(cls, cfg, tokenizer=None, move_to_device=True, default_padding_side=None):
        return _from_config(cfg, tokenizer)

    @staticmethod
    def from_pretrained(model_name, *args, **kwargs):
        return load(model_name, **kwargs)

    @staticmethod
    def from_pretrained_no_processing(model_name, *args, **kwargs):
        return load(model_name, processed=False, **kwargs)


if TARGET == "scalpel":
    from hooks import HookPoint
else:
    from transformer_lens.hook_points import HookPoint  # noqa: F401
