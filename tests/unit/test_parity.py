"""HookedLlama gives the logits of each family's own HF class (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM), for every supported config variant."""

import pytest
import torch

from hooks import HookedLlama
from tests.helpers import FAMILY_VARIANTS, VARIANTS, tiny_hf


def _inputs(vocab: int, seq: int = 12, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_match_hf(variant, attn):
    hf = tiny_hf(variant)
    hf.config._attn_implementation = attn
    model = HookedLlama.from_hf(hf)
    seq = 20 if variant in ("rope_dynamic", "rope_yarn", "rope_llama3") else 12  # beyond the original length
    ids = _inputs(hf.config.vocab_size, seq)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
        # the eager path (scores/pattern hooked) gives the same logits
        eager = model.run_with_hooks(ids, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda t, h: None)])
    assert (ours - ref).abs().max() <= 1e-5
    assert (eager - ref).abs().max() <= 1e-5


def test_left_padding_matches_hf_with_same_positions(variant):
    hf = tiny_hf(variant)
    model = HookedLlama.from_hf(hf)
    ids = _inputs(hf.config.vocab_size, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0 left-padded by 4
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask)
        alone = model(ids[0:1, 4:])
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= 1e-5
    # a padded row gives the logits of the row alone (dynamic RoPE rescales by the batch's longest
    # row, as HF does, so there the padded row differs by design)
    if variant != "rope_dynamic":
        assert (ours[0, 4:] - alone[0]).abs().max() <= 1e-5
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("variant", ["gqa"] + FAMILY_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_rounding(dtype, variant):
    hf = tiny_hf(variant).to(dtype)
    model = HookedLlama.from_hf(hf)
    ids = _inputs(hf.config.vocab_size, 12)
    with torch.no_grad():
        ref = hf(ids).logits.float()
        ours = model(ids).float()
        exact = tiny_hf(variant)(ids).logits
    # within two units of rounding of the logits' magnitude, and no further from fp32 than HF is
    ulp = torch.finfo(dtype).eps * ref.abs().max()
    assert (ours - ref).abs().max() <= 2 * ulp
    assert (ours - exact).abs().max() <= (ref - exact).abs().max() + ulp
    assert model.dtype == dtype


def test_state_dict_is_hf_state_dict(variant):
    hf = tiny_hf(variant)
    model = HookedLlama.from_hf(hf)
    ours, theirs = model.state_dict(), hf.state_dict()
    assert list(ours) == [k for k in theirs]
    for k in theirs:
        assert ours[k].shape == theirs[k].shape
        assert ours[k].data_ptr() == theirs[k].data_ptr()  # shared, not copied


@pytest.mark.parametrize("variant", ["bias"] + FAMILY_VARIANTS)
def test_state_dict_loads_into_fresh_hf_model(variant):
    hf = tiny_hf(variant)
    model = HookedLlama.from_config(hf.config, seed=3)
    fresh = type(hf)(hf.config).eval()  # the family's own class
    fresh.load_state_dict(model.state_dict())
    ids = _inputs(hf.config.vocab_size)
    with torch.no_grad():
        assert (fresh(ids).logits - model(ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["tied"] + FAMILY_VARIANTS)
def test_to_hf_shares_weights_and_matches(variant):
    model = HookedLlama.from_config(tiny_hf(variant).config, seed=4)
    hf = model.to_hf()
    assert type(hf).__name__ == type(tiny_hf(variant)).__name__
    assert hf.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == model.config.tie_word_embeddings
    ids = _inputs(model.d_vocab)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-5


def test_all_variants_listed():
    assert {
        "mha",
        "gqa",
        "mqa",
        "tied",
        "bias",
        "head_dim",
        "rope_linear",
        "rope_dynamic",
        "rope_llama3",
        "rope_yarn",
        "mistral",
        "qwen2",
        "qwen2_tied",
        "qwen3",
        "qwen3_window",
    } <= set(VARIANTS)
    kinds = {VARIANTS[v].get("family", "llama") for v in VARIANTS}
    assert kinds == {"llama", "mistral", "qwen2", "qwen3"}


def test_float64_padded_eager_path_is_finite_and_exact():
    hf = tiny_hf("gqa").double()
    model = HookedLlama.from_hf(hf)
    ids = _inputs(hf.config.vocab_size, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        eager = model.run_with_hooks(
            ids, attention_mask=mask, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda t, h: None)]
        )
        sdpa = model(ids, attention_mask=mask)
        alone = model(ids[1:, 3:])
    assert torch.isfinite(eager).all()
    assert (eager[1, 3:] - alone[0]).abs().max() <= 1e-10
    assert (eager - sdpa)[mask.bool()].abs().max() <= 1e-6
