"""Write a Llama-family model (Hugging Face state dict + config + tokenizer) as a GGUF file.

The file follows the layout llama.cpp's own converter produces for the ``llama`` architecture
(metadata keys, tensor names, the Q/K row permutation, token types) -- Mistral is written as
``llama`` too -- and for ``qwen2`` (q/k/v biases, no permutation: llama.cpp runs Qwen's RoPE in
HF's rotate-half layout) and ``qwen3`` (plus ``attn_q_norm`` / ``attn_k_norm``). It round-trips through
transformers' GGUF loader (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)``). It is
tested against that loader, not against llama.cpp itself.

Only what both readers can read back is written. Anything else -- bias tensors (but Qwen2's q/k/v
biases), rope scaling, sliding windows shorter than the context, non-SiLU activations, tensors of
unknown name -- raises ``ValueError`` instead of being dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import transformers

__all__ = ["write_gguf"]

# dtype string -> (numpy dtype of the 2-D weights, torch dtype, GGUF general.file_type)
# file types are llama.cpp's LlamaFileType values: 0 = ALL_F32, 1 = MOSTLY_F16.
_DTYPES: dict[str, tuple[type, torch.dtype, int]] = {
    "f32": (np.float32, torch.float32, 0),
    "f16": (np.float16, torch.float16, 1),
}

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Per-layer Hugging Face suffix -> (GGUF suffix, kind). "norm" stays f32; "q"/"k" get the rotary permutation.
_LAYER_TENSORS: dict[str, tuple[str, str]] = {
    "input_layernorm.weight": ("attn_norm.weight", "norm"),
    "post_attention_layernorm.weight": ("ffn_norm.weight", "norm"),
    "self_attn.q_proj.weight": ("attn_q.weight", "q"),
    "self_attn.k_proj.weight": ("attn_k.weight", "k"),
    "self_attn.v_proj.weight": ("attn_v.weight", "matrix"),
    "self_attn.o_proj.weight": ("attn_output.weight", "matrix"),
    "mlp.gate_proj.weight": ("ffn_gate.weight", "matrix"),
    "mlp.up_proj.weight": ("ffn_up.weight", "matrix"),
    "mlp.down_proj.weight": ("ffn_down.weight", "matrix"),
}
# What the qwen2 / qwen3 architectures add (transformers' GGUF loader maps these names back).
_QKV_BIASES: dict[str, tuple[str, str]] = {
    "self_attn.q_proj.bias": ("attn_q.bias", "vector"),
    "self_attn.k_proj.bias": ("attn_k.bias", "vector"),
    "self_attn.v_proj.bias": ("attn_v.bias", "vector"),
}
_QK_NORMS: dict[str, tuple[str, str]] = {
    "self_attn.q_norm.weight": ("attn_q_norm.weight", "norm"),
    "self_attn.k_norm.weight": ("attn_k_norm.weight", "norm"),
}
# model_type -> GGUF general.architecture
_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# transformers' GGUF loader reads no head_dim for qwen3 and keeps Qwen3Config's default
_QWEN3_HEAD_DIM = 128
_EMBED, _FINAL_NORM, _LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers derived from the config; older transformers versions put them in the state dict.
_DERIVED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _cannot(what: str) -> ValueError:
    return ValueError(f"GGUF export cannot represent {what}; export as a Hugging Face checkpoint instead")


# --------------------------------------------------------------------------------------------
# hyperparameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hparams:
    arch: str  # GGUF general.architecture
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float
    tied: bool

    def layer_tensors(self) -> dict[str, tuple[str, str]]:
        """Per-layer HF suffix -> (GGUF suffix, kind) for this architecture."""
        if self.arch == "qwen2":
            return {**_LAYER_TENSORS, **_QKV_BIASES}
        if self.arch == "qwen3":
            return {**_LAYER_TENSORS, **_QK_NORMS}
        return _LAYER_TENSORS

    @property
    def permutes_qk(self) -> bool:
        """Only llama stores Q/K rows interleaved; qwen2/qwen3 keep HF's rotate-half order."""
        return self.arch == "llama"


def _hparams(config: Any) -> _Hparams:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"GGUF export supports Llama, Mistral, Qwen2 and Qwen3 configs, got model_type={model_type!r}")
    arch = _ARCHITECTURES[model_type]

    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _cannot(f"hidden_act={act!r} (llama GGUF implies SiLU)")

    # transformers >= 5 keeps theta and scaling in `rope_parameters`; older versions in
    # `rope_theta` / `rope_scaling`.
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, Mapping) or any(isinstance(v, Mapping) for v in rope.values()):
        raise _cannot(f"per-layer-type rope parameters {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type != "default":
        # transformers' GGUF loader reads no rope.scaling.* key for llama, so it would load as plain rope.
        raise _cannot(f"rope scaling of type {rope_type!r}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _cannot(f"partial_rotary_factor={rope['partial_rotary_factor']}")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    theta = 10000.0 if theta is None else float(theta)

    hidden = int(config.hidden_size)
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_heads)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    if arch == "qwen2" and head_dim != hidden // n_heads:
        raise _cannot(f"a qwen2 head_dim={head_dim} other than hidden_size / heads (transformers' loader derives it)")
    if arch == "qwen3" and head_dim != _QWEN3_HEAD_DIM:
        raise _cannot(
            f"a qwen3 head_dim={head_dim} (transformers' GGUF loader reads none and assumes {_QWEN3_HEAD_DIM})"
        )
    context = int(config.max_position_embeddings)
    from hooks import config as hooks_config  # the family switches: which layers are windowed

    windows = [hooks_config.sliding_window(config, i) for i in range(int(config.num_hidden_layers))]
    short = [(i, w) for i, w in enumerate(windows) if w is not None and w < context]
    if short:
        raise _cannot(
            f"a sliding window of {short[0][1]} tokens (layer {short[0][0]}, context {context}); "
            f"GGUF {arch} attends to the whole context"
        )

    return _Hparams(
        arch=arch,
        n_layers=int(config.num_hidden_layers),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        context_length=int(config.max_position_embeddings),
        rms_eps=float(config.rms_norm_eps),
        rope_theta=theta,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorPlan:
    gguf_name: str
    hf_name: str
    kind: str  # "norm" | "matrix" | "q" | "k" | "vector" (a bias, kept f32 like norms)
    shape: tuple[int, ...]


def _expected_shapes(hp: _Hparams) -> dict[str, tuple[int, ...]]:
    q_out, kv_out = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
    return {
        "self_attn.q_proj.bias": (q_out,),
        "self_attn.k_proj.bias": (kv_out,),
        "self_attn.v_proj.bias": (kv_out,),
        "self_attn.q_norm.weight": (hp.head_dim,),
        "self_attn.k_norm.weight": (hp.head_dim,),
        "input_layernorm.weight": (hp.hidden,),
        "post_attention_layernorm.weight": (hp.hidden,),
        "self_attn.q_proj.weight": (q_out, hp.hidden),
        "self_attn.k_proj.weight": (kv_out, hp.hidden),
        "self_attn.v_proj.weight": (kv_out, hp.hidden),
        "self_attn.o_proj.weight": (hp.hidden, q_out),
        "mlp.gate_proj.weight": (hp.ffn, hp.hidden),
        "mlp.up_proj.weight": (hp.ffn, hp.hidden),
        "mlp.down_proj.weight": (hp.hidden, hp.ffn),
    }


def _summarize(names: list[str]) -> str:
    names = sorted(names)
    return names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more)"


def _plan_tensors(state_dict: Mapping[str, torch.Tensor], hp: _Hparams) -> list[_TensorPlan]:
    """Map every state-dict entry to its GGUF tensor, or raise for one the loaders cannot read back."""
    keys = [k for k in state_dict if not _DERIVED.search(k)]
    layer_tensors = hp.layer_tensors()

    # transformers' GGUF loader builds the model from the file's metadata, which has no
    # attention_bias / mlp_bias flag: the model it builds has only its class's fixed biases (Qwen2's
    # q/k/v) and any other bias tensor in the file is skipped without a word. So no other bias can
    # be exported.
    biases = [k for k in keys if k.endswith(".bias") and _LAYER_KEY.sub(r"\2", k) not in layer_tensors]
    if biases:
        raise _cannot(f"bias tensors such as {_summarize(biases)}")

    unknown = []
    for key in keys:
        if key in (_EMBED, _FINAL_NORM, _LM_HEAD):
            continue
        m = _LAYER_KEY.fullmatch(key)
        if not (m and m.group(2) in layer_tensors and int(m.group(1)) < hp.n_layers):
            unknown.append(key)
    if unknown:
        raise _cannot(f"tensor {_summarize(unknown)}")

    embed_shape = (hp.vocab_size, hp.hidden)
    plan = [_TensorPlan("token_embd.weight", _EMBED, "matrix", embed_shape)]
    shapes = _expected_shapes(hp)
    for i in range(hp.n_layers):
        for suffix, (gguf_suffix, kind) in layer_tensors.items():
            plan.append(_TensorPlan(f"blk.{i}.{gguf_suffix}", f"model.layers.{i}.{suffix}", kind, shapes[suffix]))
    plan.append(_TensorPlan("output_norm.weight", _FINAL_NORM, "norm", (hp.hidden,)))

    if hp.tied:
        # llama.cpp and transformers both read a file without output.weight as tied.
        if _LM_HEAD in state_dict and _EMBED in state_dict:
            head, embed = state_dict[_LM_HEAD], state_dict[_EMBED]
            if head is not embed and not torch.equal(head.detach().cpu(), embed.detach().cpu()):
                raise _cannot("an lm_head.weight that differs from the tied model.embed_tokens.weight")
    else:
        plan.append(_TensorPlan("output.weight", _LM_HEAD, "matrix", embed_shape))

    missing = [p.hf_name for p in plan if p.hf_name not in state_dict]
    if missing:
        raise ValueError(f"state_dict is missing {_summarize(missing)}")
    for p in plan:
        actual = tuple(state_dict[p.hf_name].shape)
        if actual != p.shape:
            raise ValueError(f"{p.hf_name} has shape {actual}, but the config implies {p.shape}")
    return plan


def _permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K output rows from Hugging Face's rotate-half layout to GGUF's interleaved one.

    Within each head, HF pairs row ``j`` with row ``j + head_dim/2``; llama.cpp pairs rows ``2j``
    and ``2j+1``. Row ``h*head_dim + 2j + s`` of the result is row ``h*head_dim + s*head_dim/2 + j``
    of the input.
    """
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _convert(tensor: torch.Tensor, plan: _TensorPlan, hp: _Hparams, dtype: torch.dtype, name: str) -> np.ndarray:
    t = tensor.detach()
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device and has no data to export")
    t = t.to(device="cpu", dtype=torch.float32)
    if plan.kind == "q" and hp.permutes_qk:
        t = _permute_rotary(t, hp.n_heads)
    elif plan.kind == "k" and hp.permutes_qk:
        t = _permute_rotary(t, hp.n_kv_heads)
    if plan.kind not in ("norm", "vector") and dtype != torch.float32:
        converted = t.to(dtype)
        if not torch.isfinite(converted).all() and torch.isfinite(t).all():
            raise ValueError(f"{name} has values outside the float16 range; export with dtype='f32'")
        t = converted
    return t.contiguous().numpy()


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


@dataclass
class _Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece-style BPE)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / unk / pad
    add_bos: bool | None
    add_eos: bool | None
    add_space_prefix: bool | None
    chat_template: str | list[dict[str, str]] | None


def _mentions(node: Any, needle: str) -> bool:
    return node is not None and needle in json.dumps(node, ensure_ascii=False)


def _pre_tokenizer_name(pre: Mapping[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a byte-level pre-tokenizer."""
    steps = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        name = _known_split_names().get(pattern)
        if name is not None:
            return name
    warnings.warn(
        "GGUF export: unrecognised pre-tokenizer; writing tokenizer.ggml.pre='default', so llama.cpp "
        "and transformers may split text differently from the original tokenizer",
        stacklevel=3,
    )
    return "default"


def _known_split_names() -> dict[str, str]:
    """Split regex -> pre-tokenizer name, from the table transformers' GGUF loader reads them back with."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except Exception:  # older/newer transformers without that table
        return {}
    # llama.cpp's converter names the Llama-3 regex "llama-bpe"; both read it under every alias.
    preferred = {"llama3": "llama-bpe", "llama-v3": "llama-bpe"}
    names: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        names.setdefault(regex, preferred.get(name, name))
    return names


def _special_token_flags(tokenizer: Any, bos: int | None, eos: int | None) -> tuple[bool | None, bool | None]:
    """Whether encoding adds BOS / EOS, found by encoding a probe with and without special tokens."""
    try:
        with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    except Exception:
        add_bos, add_eos = getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)
        return (None if add_bos is None else bool(add_bos)), (None if add_eos is None else bool(add_eos))
    extra = len(with_special) - len(plain)
    starts = bos is not None and extra >= 1 and with_special[0] == bos and with_special[1:][: len(plain)] == plain
    ends = eos is not None and extra >= 1 and with_special[-1] == eos and with_special[:-1][-len(plain) :] == plain
    if extra == 1 and starts and ends:  # bos == eos: one token added, decide by position
        ends = with_special[:-1] == plain
        starts = not ends
    return bool(starts), bool(ends)


def _vocab(tokenizer: Any, vocab_size: int) -> _Vocab:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise _cannot(f"a {model.get('type')!r} tokenizer model (only BPE)")

    surface = [spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")]
    if model.get("byte_fallback") or any(_mentions(node, "Metaspace") or _mentions(node, "\u2581") for node in surface):
        kind = "llama"
    elif any(_mentions(node, "ByteLevel") for node in surface[1:]):
        kind = "gpt2"
    else:
        raise _cannot("a BPE tokenizer that is neither byte-level nor sentencepiece-style")

    by_id: dict[int, str] = {}
    for token, index in backend.get_vocab(with_added_tokens=True).items():
        by_id[int(index)] = token
    n_tokens = max(by_id) + 1 if by_id else 0
    if n_tokens > vocab_size:
        raise ValueError(f"tokenizer has {n_tokens} token ids but config.vocab_size is {vocab_size}")

    special_ids: dict[str, int] = {}
    for name in ("bos", "eos", "unk", "pad"):
        index = getattr(tokenizer, f"{name}_token_id", None)
        if index is not None and 0 <= int(index) < vocab_size:
            special_ids[name] = int(index)

    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:  # a hole in the tokenizer, or rows the embedding has beyond it
            tokens.append(f"[PAD{index}]")
            types.append(_UNUSED)
            continue
        tokens.append(token)
        if kind == "llama" and index == special_ids.get("unk"):
            types.append(_UNKNOWN)
        elif index in added:
            types.append(_CONTROL if getattr(added[index], "special", True) else _USER_DEFINED)
        elif kind == "llama" and _BYTE_TOKEN.fullmatch(token):
            types.append(_BYTE)
        else:
            types.append(_NORMAL)

    merges = []
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if " " in left or " " in right:
            raise _cannot(f"a merge of tokens containing spaces ({left!r}, {right!r})")
        merges.append(f"{left} {right}")

    scores = None
    if kind == "llama":
        # llama.cpp's sentencepiece tokenizer merges the highest-scoring pair first. BPE vocabularies
        # are numbered in merge order, so a score falling with the id reproduces the merge ranks.
        scores = [-float(i) if t == _NORMAL else 0.0 for i, t in enumerate(types)]

    add_space_prefix = None
    if kind == "llama":
        pre, norm = spec.get("pre_tokenizer"), spec.get("normalizer")
        scheme = _find_first(pre, "prepend_scheme")
        if scheme is not None:
            add_space_prefix = scheme != "never"
        elif _find_first(pre, "add_prefix_space") is not None:
            add_space_prefix = bool(_find_first(pre, "add_prefix_space"))
        else:
            add_space_prefix = _mentions(norm, "Prepend")
    else:
        add_space_prefix = False

    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = [{"name": name, "template": text} for name, text in template.items()]

    add_bos, add_eos = _special_token_flags(tokenizer, special_ids.get("bos"), special_ids.get("eos"))
    return _Vocab(
        model=kind,
        pre=_pre_tokenizer_name(spec.get("pre_tokenizer")) if kind == "gpt2" else "default",
        tokens=tokens,
        types=types,
        scores=scores,
        merges=merges,
        special_ids=special_ids,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix,
        chat_template=template or None,
    )


def _find_first(node: Any, key: str) -> Any:
    """The first value stored under ``key`` anywhere in a nested JSON structure."""
    if isinstance(node, Mapping):
        if key in node:
            return node[key]
        children: Iterable[Any] = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_first(child, key)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _write_metadata(writer: Any, hp: _Hparams, vocab: _Vocab, file_type: int, name: str) -> None:
    from _core.writer import GGUF_MARK, GGUF_MARK_VALUE

    writer.add_name(name)
    writer.add_string(GGUF_MARK, GGUF_MARK_VALUE)  # what lets an overwrite replace this file later
    writer.add_file_type(file_type)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.ffn)
    writer.add_head_count(hp.n_heads)
    writer.add_head_count_kv(hp.n_kv_heads)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.vocab_size)
    if hp.head_dim != hp.hidden // hp.n_heads:
        # llama.cpp assumes hidden/heads unless told; transformers reads rope.dimension_count.
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    setters: dict[str, Callable[[int], None]] = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, index in vocab.special_ids.items():
        setters[key](index)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def write_gguf(
    state_dict: Mapping[str, torch.Tensor],
    config: transformers.LlamaConfig,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    dtype: str = "f32",
    digests: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Llama-family model as a GGUF file (architecture ``llama`` for Llama and Mistral,
    ``qwen2``, ``qwen3``).

    Args:
        state_dict: tensors under ``LlamaForCausalLM`` names (``model.embed_tokens.weight``,
            ``model.layers.{i}.self_attn.q_proj.weight``, ..., ``model.norm.weight``,
            ``lm_head.weight``). ``lm_head.weight`` may be absent when the embeddings are tied.
        config: the model's ``transformers.LlamaConfig``.
        tokenizer: a fast Hugging Face tokenizer: byte-level BPE (``gpt2`` in GGUF) or
            sentencepiece-style BPE with byte fallback (``llama`` in GGUF).
        path: the file to write, through ``_core.writer.write_file``: staged beside it and moved into
            place, so a failed export leaves no partial file behind; an existing file is replaced only
            with ``overwrite=True`` and only when it is a GGUF file this toolkit wrote.
        dtype: ``"f32"`` or ``"f16"`` for the 2-D weights; norms are always f32.
        digests: when given, filled with ``{gguf tensor name: sha256 of the bytes written}`` (each tensor
            is read from ``state_dict`` once, converted and hashed as it is written).
        overwrite: replace an existing GGUF file written by this toolkit.

    Returns the path written.

    Raises:
        ValueError: for an unsupported ``dtype``, or for anything the file could not carry so that
            transformers' GGUF loader reads it back: bias tensors, rope scaling, tensors of unknown
            name, an untied ``lm_head`` under a tied config, shapes that disagree with the config.
    """
    from _core.writer import write_file

    if dtype not in _DTYPES:
        raise ValueError(f"unsupported GGUF export dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return write_file(
        path,
        lambda staged: write_gguf_file(state_dict, config, tokenizer, staged, dtype=dtype, digests=digests),
        kind="gguf",
        overwrite=overwrite,
    )


def write_gguf_file(
    state_dict: Mapping[str, torch.Tensor],
    config: transformers.LlamaConfig,
    tokenizer: Any,
    path: Path,
    *,
    dtype: str = "f32",
    digests: dict[str, str] | None = None,
) -> None:
    """``write_gguf``'s body: the GGUF file written straight to ``path``, a file the caller stages (the
    writer's ``write_file`` removes it when this raises)."""
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported GGUF export dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    np_dtype, torch_dtype, file_type = _DTYPES[dtype]

    import gguf  # imported late: only exporting needs it

    hp = _hparams(config)
    plan = _plan_tensors(state_dict, hp)
    vocab = _vocab(tokenizer, hp.vocab_size)

    name = Path(str(getattr(config, "name_or_path", "") or "")).name or Path(path).stem
    if name == "mistral":  # transformers' loader would read a llama file named exactly this as Mistral and fail
        name = "Mistral"

    writer = gguf.GGUFWriter(path, arch=hp.arch)
    try:
        _write_metadata(writer, hp, vocab, file_type, name)
        for p in plan:
            out_dtype = np.dtype(np.float32 if p.kind in ("norm", "vector") else np_dtype)
            nbytes = int(np.prod(p.shape)) * out_dtype.itemsize
            writer.add_tensor_info(p.gguf_name, p.shape, out_dtype, nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # one tensor read, converted and written at a time: host memory holds one tensor beyond the source
        for p in plan:
            data = _convert(state_dict[p.hf_name], p, hp, torch_dtype, p.hf_name)
            if digests is not None:
                digests[p.gguf_name] = hashlib.sha256(memoryview(np.ascontiguousarray(data)).cast("B")).hexdigest()
            writer.write_tensor_data(data)
            del data
        writer.flush()
    finally:
        writer.close()
