"""Direct logit attribution: heads, neurons and biases sum to their layers, layers and embeddings sum
to the model's own logit difference, per-head values equal the core cache's logit_attrs."""

import pytest
import torch

from analyses import direct_logit_attribution
from hooks import HookedLlama
from tests.helpers import FAMILY_VARIANTS, IOI_CLEAN, tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("variant", ["gqa", "bias", "tied"] + FAMILY_VARIANTS)
def test_contributions_sum_to_the_logit_difference(variant):
    model = HookedLlama.from_hf(tiny_hf(variant, initializer_range=0.1))
    tokens = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    answer, wrong = torch.tensor([5, 6, 7]), torch.tensor([9, 10, 11])
    res = direct_logit_attribution(model, tokens, answer, wrong)
    with torch.no_grad():
        logits = model(tokens)[:, -1]
    expected = float((logits[torch.arange(3), answer] - logits[torch.arange(3), wrong]).mean())
    assert res.total == pytest.approx(expected, abs=1e-5)
    assert res.direct_sum == pytest.approx(expected, abs=1e-4)
    assert (res.heads.sum(1) + res.attn_bias - res.attn).abs().max() <= 1e-5
    assert (res.neurons.sum(1) + res.mlp_bias - res.mlp).abs().max() <= 1e-5
    if variant == "bias":
        assert res.attn_bias.abs().max() > 0 and res.mlp_bias.abs().max() > 0
    if variant == "qwen3_window":  # o_proj bias
        assert res.attn_bias.abs().max() > 0
    # per-head values equal the core ActivationCache.logit_attrs on stacked head results
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    stack = cache.stack_head_results(pos_slice=-1)  # [L*H, B, M]
    ref = cache.logit_attrs(stack, answer, wrong, pos_slice=-1).mean(-1).reshape(model.n_layers, model.n_heads)
    assert (res.heads - ref).abs().max() <= 1e-5


def test_single_answer_without_wrong_token():
    model = HookedLlama.from_hf(tiny_hf("gqa", initializer_range=0.1))
    tokens = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    res = direct_logit_attribution(model, tokens, 42, pos=3, neurons=False)
    with torch.no_grad():
        expected = float(model(tokens)[0, 3, 42])
    assert res.neurons is None and res.direct_sum == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_real_model_ioi_direct_effects_sum(smol):
    res = direct_logit_attribution(smol, IOI_CLEAN, " Mary", " John")
    with torch.no_grad():
        logits = smol(IOI_CLEAN)[0, -1]
    expected = float(logits[smol.to_single_token(" Mary")] - logits[smol.to_single_token(" John")])
    assert res.total == pytest.approx(expected, abs=1e-5)
    assert res.direct_sum == pytest.approx(expected, abs=1e-4)  # measured 3.1e-6 (61 fp32 terms up to ~5)
    assert (res.neurons.sum(1) - res.mlp).abs().max() <= 1e-4
    assert (res.heads.sum(1) - res.attn).abs().max() <= 1e-4
    assert res.heads.shape == (30, 9) and res.neurons.shape == (30, 1536)
