"""Generation with a KV cache: token-identical to HF greedy decoding, hooks active at every step."""

import pytest
import torch

from hooks import HookedLlama, InputError, KVCache
from tests.helpers import FAMILY_VARIANTS, tiny_hf


# prompts of 6 tokens + 12 new ones run well past the families' 4-token sliding windows
@pytest.mark.parametrize("variant", ["gqa", "mqa", "bias", "rope_llama3"] + FAMILY_VARIANTS)
def test_greedy_matches_hf_generate(variant):
    hf = tiny_hf(variant)
    model = HookedLlama.from_hf(hf)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    ours = model.generate(prompt, max_new_tokens=12, stop_at_eos=False)
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == ref.tolist()


@pytest.mark.parametrize("variant", ["gqa"] + FAMILY_VARIANTS)
def test_kv_cache_logits_equal_full_forward(variant):
    tiny = HookedLlama.from_hf(tiny_hf(variant))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    full = tiny(ids)
    cache = KVCache(tiny.n_layers)
    first = tiny(ids[:, :5], kv_cache=cache)
    cache.commit(5)
    steps = [first]
    for p in range(5, 9):
        steps.append(tiny(ids[:, p : p + 1], kv_cache=cache))
        cache.commit(1)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_hooks_see_only_new_positions_with_absolute_positions(tiny):
    seen = []

    def spy(t, hook):
        seen.append((t.shape[1], hook.positions[0].tolist()))

    prompt = torch.randint(3, 128, (1, 4))
    with tiny.hooks(fwd_hooks=[("blocks.0.attn.hook_z", spy)]):
        tiny.generate(prompt, max_new_tokens=3, stop_at_eos=False)
    assert seen == [(4, [0, 1, 2, 3]), (1, [4]), (1, [5])]


def test_hook_changes_generation_and_is_removed_after(tiny):
    prompt = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    base = tiny.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    with tiny.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda t, h: t + 5 * tiny.lm_head.weight[7])]):
        steered = tiny.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    assert steered[0, 4:].tolist().count(7) > base[0, 4:].tolist().count(7)
    assert tiny.generate(prompt, max_new_tokens=8, stop_at_eos=False).tolist() == base.tolist()


def test_left_padded_batch_generates_like_single_prompts(tiny):
    a = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    b = torch.randint(3, 128, (1, 3), generator=torch.Generator().manual_seed(7))
    singles = [tiny.generate(x, max_new_tokens=5, stop_at_eos=False)[0, -5:].tolist() for x in (a, b)]
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = tiny.generate(batch, max_new_tokens=5, attention_mask=mask, stop_at_eos=False)
    assert out[:, -5:].tolist() == singles


@pytest.mark.parametrize("variant", ["gqa"] + FAMILY_VARIANTS)
def test_left_padded_batch_matches_hf_generate(variant):
    hf = tiny_hf(variant)
    model = HookedLlama.from_hf(hf)
    batch = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    batch[1, :3] = 0
    ours = model.generate(batch, max_new_tokens=8, attention_mask=mask, stop_at_eos=False)
    ref = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == ref.tolist()


def test_sampling_is_seeded_and_respects_top_k(tiny):
    prompt = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(8))
    a = tiny.generate(prompt, max_new_tokens=6, do_sample=True, top_k=3, seed=11, stop_at_eos=False)
    b = tiny.generate(prompt, max_new_tokens=6, do_sample=True, top_k=3, seed=11, stop_at_eos=False)
    assert a.tolist() == b.tolist()
    # every sampled token is among the top 3 of its step
    logits = tiny(a)
    for p in range(4, 10):
        assert a[0, p].item() in logits[0, p - 1].topk(3).indices.tolist()


def test_top_p_keeps_the_smallest_prefix():
    from hooks.generation import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sample_next(logits, True, 1.0, None, 0.7, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert draws == {0, 1}


def test_generation_past_the_context_is_refused_up_front(tiny, monkeypatch):
    """Issue 12 (6): generating past max_position_embeddings ran to the limit and then threw the work away."""
    limit = tiny.config.max_position_embeddings  # 64
    prompt = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    calls = []
    real = type(tiny).forward
    monkeypatch.setattr(type(tiny), "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with pytest.raises(InputError) as info:
        tiny.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    assert str(info.value) == (
        "the prompt (60 tokens) plus max_new_tokens=6 needs 65 positions but the model supports "
        "64 (max_position_embeddings); lower max_new_tokens to at most 5 or shorten the prompt"
    )
    assert calls == []  # refused before any forward pass
    out = tiny.generate(prompt, max_new_tokens=limit - 60 + 1, stop_at_eos=False)  # the most that fits
    assert out.shape == (1, limit + 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0, "do_sample": True}, "temperature must be a finite number > 0, got 0.0"),
        ({"temperature": float("nan"), "do_sample": True}, "temperature must be a finite number > 0, got nan"),
        ({"top_p": 1.5, "do_sample": True}, "top_p must be a number in (0, 1], got 1.5"),
        ({"top_p": 0, "do_sample": True}, "top_p must be a number in (0, 1], got 0"),
        ({"top_k": -1, "do_sample": True}, "top_k must be an integer >= 1 (or 0/None for no top-k filtering), got -1"),
        (
            {"top_k": 2.5, "do_sample": True},
            "top_k must be an integer >= 1 (or 0/None for no top-k filtering), got 2.5",
        ),
        ({"max_new_tokens": "5"}, "max_new_tokens must be an integer >= 0, got '5'"),
    ],
)
def test_sampling_parameters_outside_their_domain_are_refused(tiny, kwargs, message):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(InputError) as info:
        tiny.generate(torch.tensor([[3, 4, 5]]), **kwargs)
    assert str(info.value).startswith(message)
    with pytest.raises(InputError, match="generate takes a prompt string, .* got int"):
        tiny.generate(123)
