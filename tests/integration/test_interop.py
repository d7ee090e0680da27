"""Cached activations equal TransformerLens's and nnsight's on the real model (the interop extra)."""

import pytest
import torch

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PROMPT = "When Mary and John went to the store, John gave a drink to"
SHARED = [
    "hook_embed",
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
]


@pytest.fixture(scope="module")
def tl_bridge(smol):
    tl = pytest.importorskip("transformer_lens")
    bridge = tl.TransformerBridge.boot_transformers(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        hf_model=smol.to_hf(),
        tokenizer=smol.tokenizer,
        dtype=torch.float32,
        device="cpu",
    )
    bridge.cfg.default_prepend_bos = False
    return bridge.eval()


def test_cache_equals_transformer_lens(smol, tl_bridge):
    ids = smol.to_tokens(PROMPT)
    with torch.no_grad():
        tl_logits, tl_cache = tl_bridge.run_with_cache(ids)
        logits, cache = smol.run_with_cache(ids)
    assert (logits - tl_logits).abs().max() <= 1e-4
    compared = 0
    for i in (0, 7, 15, 29):
        for short in SHARED:
            name = short if short == "hook_embed" else f"blocks.{i}.{short}"
            ours, theirs = cache[name], tl_cache[name]
            assert ours.shape == theirs.shape, name
            if short == "attn.hook_attn_scores":  # masked: -inf here, finfo.min there; compare the allowed entries
                keep = torch.ones(ours.shape[-2:], dtype=torch.bool).tril()
                ours, theirs = ours[..., keep], theirs[..., keep]
            assert _close(ours, theirs), name
            compared += 1
    assert compared == 4 * len(SHARED)


def test_cache_equals_nnsight(smol):
    nnsight = pytest.importorskip("nnsight")
    import copy

    lm = nnsight.TransformersModel(smol.to_hf(), tokenizer=copy.deepcopy(smol.tokenizer))
    ids = smol.to_tokens(PROMPT)
    saved = {}
    with torch.no_grad(), lm.trace(ids):
        for i in (0, 12, 29):
            saved[f"z{i}"] = lm.model.layers[i].self_attn.o_proj.input.save()
            saved[f"post{i}"] = lm.model.layers[i].mlp.down_proj.input.save()
            saved[f"resid{i}"] = lm.model.layers[i].output.save()
        saved["logits"] = lm.output.logits.save()
    with torch.no_grad():
        logits, cache = smol.run_with_cache(ids)
    assert (logits - saved["logits"]).abs().max() <= 1e-4
    for i in (0, 12, 29):
        assert _close(cache["z", i].flatten(-2), saved[f"z{i}"])
        assert _close(cache["post", i], saved[f"post{i}"])
        assert _close(cache["resid_post", i], saved[f"resid{i}"])


def _close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-5) -> bool:
    """fp32 rounding: 1e-5 of the activation's scale (residual entries reach hundreds)."""
    return (ours - theirs).abs().max().item() <= rel * max(1.0, theirs.abs().max().item())
