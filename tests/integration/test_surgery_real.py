"""Surgery on the real default model (SmolLM2-135M-Instruct, GQA 9/3 heads, tied embeddings):
every edit's weights equal its hooks, the shared model is restored exactly, and a plan of several
edits exports to a checkpoint that plain transformers (and transformers' GGUF loader) reload with
the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import surgery as S
from tests.helpers import assert_same, snapshot, write_adapter

pytestmark = pytest.mark.slow

TEXTS = [
    "The Eiffel Tower is in the city of",
    "When Mary and John went to the store, John gave a drink to",
    "def add(a, b):\n    return a + b",
    "The quick brown fox jumps over the lazy dog.",
]
REAL_EDITS = [
    "ZeroHeads",
    "ScaleHeads",
    "ZeroKVGroups",
    "MeanAblateHeads",
    "ZeroNeurons",
    "ScaleNeurons",
    "RemoveLayers",
    "Orthogonalize",
    "AddSteering",
    "RankOneEdit",
    "MergeLora",
    "Abliterate",
    "AbliterateNormPreserving",
]


def real_edit(name: str, model, tmp_path) -> S.Edit:
    g = torch.Generator().manual_seed(0)
    d = model.d_model
    if name == "ZeroHeads":
        return S.ZeroHeads(5, [0, 4, 8])
    if name == "ScaleHeads":
        return S.ScaleHeads(12, [3], 2.0)
    if name == "ZeroKVGroups":
        return S.ZeroKVGroups(7, [1])
    if name == "MeanAblateHeads":
        return S.MeanAblateHeads.compute(model, 9, [2, 6], TEXTS)
    if name == "ZeroNeurons":
        return S.ZeroNeurons(3, list(range(0, 1536, 7)))
    if name == "ScaleNeurons":
        return S.ScaleNeurons(20, [10, 11, 12], -1.0)
    if name == "RemoveLayers":
        return S.RemoveLayers([4, 17])
    if name == "Orthogonalize":
        return S.Orthogonalize(torch.randn(d, generator=g))
    if name == "AddSteering":
        return S.AddSteering(10, torch.randn(d, generator=g), scale=2.0)
    if name == "RankOneEdit":
        cov = S.key_covariance(model, 8, TEXTS)
        return S.RankOneEdit.compute(model, 8, ["The Eiffel Tower"], torch.randn(d, generator=g), covariance=cov)
    if name == "MergeLora":
        return S.MergeLora(
            str(
                write_adapter(
                    tmp_path / "lora",
                    model,
                    r=8,
                    alpha=16,
                    layers=[0, 14, 29],
                    targets=("q_proj", "k_proj", "o_proj", "up_proj", "down_proj"),
                )
            )
        )
    if name == "Abliterate":
        return S.Abliterate(
            torch.randn(model.n_layers, d, generator=g),
            direction_index=18.4,
            attn_weights=S.peaked_weights(30, 1.2, 24, 0.3, 6),
            mlp_weights={10: 0.7, 20: 1.5},
        )
    if name == "AbliterateNormPreserving":
        return S.Abliterate.peaked(
            torch.randn(d, generator=g), 30, attn=(1.0, 20, 0.5, 8), mlp=(1.3, 25, 0.2, 5), norm_preserve=True
        )
    raise KeyError(name)


EAGER = [(lambda name: name.endswith("hook_pattern"), lambda t, hook: None)]  # forces the eager attention path
FP32_NOISE = 5e-4


@pytest.fixture(scope="module")
def smol64():
    """SmolLM2 in float64. The algebra of an edit is checked here: in float32, one ulp of change in a
    single layer's output already moves SmolLM2's logits by ~4e-5 (the model's own float32-vs-float64
    error is ~4.5e-5), so float32 weights-vs-hooks diffs sit at that noise floor. Attention runs
    eager: CPU SDPA's float64 kernel is itself only ~1e-5 accurate."""
    from hooks import HookedLlama

    return HookedLlama.default(dtype=torch.float64)


def _pair(model, edit, x, mask, extra=()):
    with torch.no_grad():
        hooked = model.run_with_hooks(x, attention_mask=mask, fwd_hooks=edit.as_hooks(model) + list(extra))
        with edit.applied(model):
            weights = model.run_with_hooks(x, attention_mask=mask, fwd_hooks=list(extra))
    return weights, hooked


@pytest.mark.parametrize("name", REAL_EDITS)
def test_real_weights_equal_hooks(smol, smol64, name, tmp_path):
    # float64: the maths, to 1e-5 (measured: 0 for every edit). One prompt, unpadded: the eager float64
    # path gives NaN at left-padded positions (a float32 softmax of finfo(float64).min rows).
    edit = real_edit(name, smol64, tmp_path / "64")
    snap = snapshot(smol64)
    x64 = smol64.to_tokens(TEXTS[0])  # (RankOneEdit is local: it moves this Eiffel Tower prompt)
    weights, hooked = _pair(smol64, edit, x64, None, EAGER)
    assert (weights - hooked).abs().max() <= 1e-5
    with torch.no_grad():
        assert (weights - smol64(x64)).abs().max() > 1e-3
    assert_same(smol64, snap)
    # float32, the shared session model (default SDPA path): within float32's noise floor, and restored exactly
    x, mask = smol.tokenize(TEXTS[:2])
    real = mask.bool()
    edit = real_edit(name, smol, tmp_path / "32")
    snap = snapshot(smol)
    weights, hooked = _pair(smol, edit, x, mask)
    assert_same(smol, snap)
    assert (weights[real] - hooked[real]).abs().max() <= FP32_NOISE


def test_real_plan_export_and_verify(smol, tmp_path):
    plan = S.EditPlan(
        [
            real_edit(n, smol, tmp_path)
            for n in ("ZeroHeads", "MeanAblateHeads", "Orthogonalize", "AddSteering", "RankOneEdit", "RemoveLayers")
        ]
    )
    snap = snapshot(smol)
    out = tmp_path / "smol-edited"
    result = S.export(smol, out, edits=plan, max_shard_size="200MB")
    assert_same(smol, snap)
    assert result.max_abs_logit_diff <= 1e-4 and result.kl_to_base > 0
    m = result.manifest
    assert m["base"]["sha256"] == smol.source_sha256 and m["base"]["sha256_of"] == "source file"
    assert m["config_changes"]["num_hidden_layers"] == [30, 28] and m["layer_map"][4] == 5
    assert m["config_changes"]["tie_word_embeddings"] == [True, False]
    assert all(p["text"] and p["top5"][0]["token"] for p in m["probes"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 28 and config["attention_bias"] and config["mlp_bias"]
    assert (out / "tokenizer.json").is_file() and len(list(out.glob("model-*.safetensors"))) >= 3
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = smol.to_tokens(TEXTS[0])
    with torch.no_grad(), plan.applied(smol):
        want = smol(x)
    with torch.no_grad():
        assert (hf(x).logits - want).abs().max() <= 1e-4
    assert S.verify(out)["ok"]


def test_real_plan_weights_equal_hooks(smol64, tmp_path):
    order = [n for n in REAL_EDITS if n != "RemoveLayers"] + ["RemoveLayers"]  # MergeLora names layer 29
    plan = S.EditPlan([real_edit(n, smol64, tmp_path) for n in order])
    x = smol64.to_tokens(TEXTS[1])
    with torch.no_grad():
        hooked = smol64.run_with_hooks(x, fwd_hooks=plan.as_hooks(smol64) + EAGER)
        with plan.applied(smol64):
            weights = smol64.run_with_hooks(x, fwd_hooks=EAGER)
    assert (weights - hooked).abs().max() <= 1e-5


def test_real_gguf_round_trip_f16(smol, tmp_path):
    plan = S.EditPlan([S.ZeroHeads(5, [0, 4]), S.RemoveLayers([29])])
    result = S.export_gguf(smol, tmp_path / "smol.gguf", edits=plan, dtype="f16")
    assert result.max_abs_logit_diff <= 1e-4  # vs the in-memory model with the file's f16 rounding
    assert result.max_abs_logit_diff_unrounded < 0.2
    assert [p["top5"][0]["id"] for p in result.probes]
