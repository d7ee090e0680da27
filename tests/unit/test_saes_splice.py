"""Splicing SAEs into the model: exactness with the error term, hook names as SAELens's
HookedSAETransformer has them, caching, feature edits against hand-computed activations, cleanup."""

from __future__ import annotations

import pytest
import torch

from analyses.saes import ablate_features, clamp_features, scale_features, spliced
from hooks import HookError
from tests.helpers import random_sae

HOOK = "blocks.1.hook_resid_post"
SAE_NAMES = [
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
]


@pytest.fixture
def ids():
    return torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "topk"])
def test_error_term_keeps_logits(tiny, ids, arch, one_thread):
    sae = random_sae(arch, k=9 if arch == "topk" else None)
    with torch.no_grad():
        base = tiny(ids)
        with spliced(tiny, [sae]):
            logits, cache = tiny.run_with_cache(ids)
            assert [n for n in tiny.hook_names() if ".hook_sae_" in n] == [f"{HOOK}.{n}" for n in SAE_NAMES]
        assert not [n for n in tiny.hook_names() if ".hook_sae_" in n]  # gone after the block
    assert (logits - base).abs().max() <= 1e-5
    x = cache[f"{HOOK}.hook_sae_input"]
    torch.testing.assert_close(x, cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"])
    with torch.no_grad():
        acts = sae.encode(x)
        torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], acts)
        torch.testing.assert_close(cache[f"{HOOK}.hook_sae_error"], x - sae.reconstruct(x))
    assert (acts > 0).any() and (acts == 0).any()
    # without the error term the model runs on the reconstruction
    with torch.no_grad():
        with spliced(tiny, [sae], use_error_term=False):
            no_err = tiny(ids)
        ref = tiny.run_with_hooks(ids, fwd_hooks=[(HOOK, lambda t, hook: sae.reconstruct(t))])
    assert sae.use_error_term  # restored
    torch.testing.assert_close(no_err, ref, atol=1e-5, rtol=1e-5)
    assert (no_err - base).abs().max() > 1e-3


def _edited_input(sae, x, feats, new):
    """x + (decode(acts with feats set to new) - decode(acts)): the spliced output with the error term."""
    acts = sae.encode(x)
    edited = acts.clone()
    edited[..., feats] = new(acts[..., feats])
    return x + (edited - acts) @ sae.W_dec


@pytest.mark.parametrize("edit", ["ablate", "clamp", "scale"])
def test_feature_edits_match_hand_computation(tiny, ids, edit, one_thread):
    sae = random_sae("standard")
    with torch.no_grad():
        _, cache = tiny.run_with_cache(ids, names_filter=HOOK)
        x = cache[HOOK]
        active = (sae.encode(x) > 0).float().sum((0, 1)).topk(3).indices.tolist()
    hook, new = {
        "ablate": (ablate_features(active), lambda a: torch.zeros_like(a)),
        "clamp": (clamp_features(active, 2.5), lambda a: torch.full_like(a, 2.5)),
        "scale": (scale_features(active, -1.5), lambda a: a * -1.5),
    }[edit]
    with torch.no_grad():
        with spliced(tiny, [sae]), tiny.hooks([(f"{HOOK}.hook_sae_acts_post", hook)]):
            got = tiny(ids)
        want = tiny.run_with_hooks(ids, fwd_hooks=[(HOOK, lambda t, h: _edited_input(sae, t, active, new))])
        base = tiny(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3


def test_splice_cleanup_and_refusals(tiny, ids):
    sae = random_sae("standard")
    with pytest.raises(RuntimeError, match="boom"):
        with spliced(tiny, [sae]):
            tiny.add_hook(f"{HOOK}.hook_sae_acts_post", lambda t, h: None)  # a hook left behind …
            raise RuntimeError("boom")
    assert not sae.hook_sae_acts_post.fwd_hooks  # … is removed with the splice
    assert all(not p.fwd_hooks for p in tiny.hook_dict.values())
    with pytest.raises(HookError) as err:
        with spliced(tiny, [sae, random_sae("standard", seed=1)]):
            pass
    assert str(err.value) == f"{HOOK} already has a module spliced in; splice one module per hook point"
    assert all(not p.fwd_hooks for p in tiny.hook_dict.values())


def test_generation_with_spliced_sae(tiny):
    sae = random_sae("topk", k=9)
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    plain = tiny.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    with spliced(tiny, [sae]):
        same = tiny.generate(prompt, max_new_tokens=6, stop_at_eos=False)
        with tiny.hooks([(f"{HOOK}.hook_sae_acts_post", scale_features(list(range(192)), 0.0))]):
            _, cache = tiny.run_with_cache(prompt, names_filter=f"{HOOK}.hook_sae_acts_post")
    assert torch.equal(plain, same)
    assert cache[f"{HOOK}.hook_sae_acts_post"].abs().max() == 0


def test_generic_splice_of_any_module(tiny, ids):
    """hooks.splice knows nothing of SAEs: any callable module, its hook points named under the point."""

    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2

    with torch.no_grad():
        with tiny.splice("blocks.0.hook_resid_post", Double()):
            got = tiny(ids)
        want = tiny.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", lambda t, h: t * 2)])
    assert torch.equal(got, want)
