"""Logit lens: the last layer's resid_post decodes to the model's own prediction; every stage equals
an independent RMSNorm + unembedding computed by hand."""

import pytest
import torch

from analyses import logit_lens
from hooks import HookedLlama, InputError
from tests.helpers import FAMILY_VARIANTS, tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")


def by_hand(model, resid):
    """RMSNorm (eps from the config) and unembedding, without the model's modules."""
    x = resid.float()
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    return (x * model.model.norm.weight) @ model.lm_head.weight.T


@pytest.mark.parametrize("variant", ["gqa"] + FAMILY_VARIANTS)
def test_every_stage_equals_hand_decoding(variant):
    model = HookedLlama.from_hf(tiny_hf(variant, initializer_range=0.1))
    tokens = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    lens = logit_lens(model, tokens, targets=[5, 17], k=3)
    assert lens.stages[:4] == ["0_pre", "0_mid", "0_post", "1_pre"] and len(lens.stages) == 9
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    for s, stage in enumerate(lens.stages):
        layer, kind = stage.split("_")
        probs = by_hand(model, cache[f"resid_{kind}", int(layer)][0]).softmax(-1)
        top = probs.topk(3)
        # the lens's top tokens carry the top probabilities (a near-tie may order two tokens either way)
        assert (probs.gather(-1, lens.top_ids[s]) - top.values).abs().max() <= 1e-5
        clear = top.values[:, :-1] - top.values[:, 1:] > 1e-5  # rank k is clear of rank k+1
        assert torch.equal(lens.top_ids[s][:, 0][clear[:, 0]], top.indices[:, 0][clear[:, 0]])
        assert (lens.top_probs[s] - top.values).abs().max() <= 1e-5
        assert (lens.target_probs[s] - probs[:, [5, 17]]).abs().max() <= 1e-5
        target = probs[:, [5, 17], None]
        surely_above = (probs[:, None, :] > target + 1e-6).sum(-1)
        maybe_above = (probs[:, None, :] > target - 1e-6).sum(-1) - 1  # the target itself is not above
        assert ((lens.target_ranks[s] >= surely_above) & (lens.target_ranks[s] <= maybe_above)).all()


def test_last_stage_is_the_model_prediction():
    model = HookedLlama.from_hf(tiny_hf("tied", initializer_range=0.1))
    tokens = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    lens = logit_lens(model, tokens, stages="resid_post", layers=[0, 2], positions=[-1, 2], k=4)
    assert lens.stages == ["0_post", "2_post"] and lens.positions == [6, 2]
    with torch.no_grad():
        probs = model(tokens)[0, [6, 2]].softmax(-1)
    assert (lens.top_probs[-1] - probs.topk(4).values).abs().max() <= 1e-6
    assert torch.equal(lens.top_ids[-1], probs.topk(4).indices)
    with pytest.raises(InputError, match="one prompt"):
        logit_lens(model, torch.zeros((2, 3), dtype=torch.long))
    with pytest.raises(InputError, match="stage"):
        logit_lens(model, tokens, stages="resid_out")


@pytest.mark.slow
def test_real_model_last_layer_equals_next_token_prediction(smol):
    prompt = "The Eiffel Tower is in the city of"
    lens = logit_lens(smol, prompt, targets=[" Paris", " London"], k=5)
    with torch.no_grad():
        probs = smol(prompt)[0].softmax(-1)
    assert lens.stages[-1] == "29_post" and len(lens.stages) == 90
    assert torch.equal(lens.top_ids[-1], probs.topk(5).indices)
    assert (lens.top_probs[-1] - probs.topk(5).values).abs().max() <= 1e-5
    assert lens.top_tokens[-1][-1][0] == " Paris"
    assert lens.target_ranks[-1, -1, 0] == 0 and lens.target_probs[-1, -1, 0] > 0.5
    assert lens.str_tokens[-1] == " of"


def test_tokens_that_are_part_of_a_character_are_shown_as_their_bytes(smol):
    """A byte-level token holding part of a multi-byte character decodes to U+FFFD; tables show its bytes,
    whose concatenation with the other labels is the text's UTF-8."""
    from hooks.tokens import token_labels

    text = " 日本 🙂"
    ids = smol.tokenizer.encode(text, add_special_tokens=False)
    labels = token_labels(smol.tokenizer, ids)
    assert not any("\ufffd" in s for s in labels)
    assert any(s.startswith(" \\x") for s in labels)  # the leading space stays text
    raw = b"".join(
        s.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1") if "\\x" in s else s.encode()
        for s in labels
    )
    assert raw == text.encode()
    result = logit_lens(smol, text, k=1)
    assert result.str_tokens == labels
