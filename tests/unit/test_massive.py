"""Massive activations: a position is massive when its norm exceeds RATIO × the typical norm of the other
positions (no position hard-coded); reading one warns once, naming the fix (steering directions, SAE
metrics), and reading ordinary positions stays silent."""

import warnings

import pytest
import torch

from analyses import MassiveActivationWarning, massive_mask, steering_direction
from analyses.massive import RATIO, corpus_norm, reference_norm
from analyses.saes import sae_metrics
from hooks import HookedLlama
from tests.helpers import random_sae, tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")
BIG = 500.0


@pytest.fixture(scope="module")
def model():
    return HookedLlama.from_hf(tiny_hf("gqa", initializer_range=0.1))


def plant(position: int, layer: int = 0):
    """A hook making ``position`` massive from resid_post of ``layer`` on (as a real model's first token)."""

    def hook(t, hook):
        at = (hook.positions == position)[..., None].to(t.dtype)  # counted from each row's first real token
        return t + at * BIG

    return [(f"blocks.{layer}.hook_resid_post", hook)]


def test_mask_is_relative_to_the_other_positions():
    norms = torch.tensor([[858.0, 90, 95, 88, 92], [40, 850, 91, 93, 89.0]])
    assert massive_mask(norms).tolist() == [[True, False, False, False, False], [False, True, False, False, False]]
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # padding is never massive nor counted
    assert massive_mask(norms, mask)[1].tolist() == [False] * 5
    assert not massive_mask(norms * 0 + 5).any()
    assert massive_mask(torch.tensor([[3.9, 1, 1, 1]]), ratio=RATIO).sum() == 0


def test_steering_direction_warns_on_a_massive_read_position(model):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 128, (3, 6), generator=g), torch.randint(3, 128, (3, 6), generator=g)
    with model.hooks(fwd_hooks=plant(0)):
        with pytest.warns(MassiveActivationWarning, match=r"read 6 of 6 positions at blocks\.1\.hook_resid_post.*pos="):
            d0 = steering_direction(model, a, b, layer=1, pos=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MassiveActivationWarning)
            d = steering_direction(model, a, b, layer=1)  # the last token: silent
    # resid_norm leaves the massive positions out: the median of the others
    with torch.no_grad(), model.hooks(fwd_hooks=plant(0)):
        _, ca = model.run_with_cache(a)
        _, cb = model.run_with_cache(b)
    rest = torch.cat([ca["resid_post", 1][:, 1:], cb["resid_post", 1][:, 1:]]).norm(dim=-1)
    assert d.resid_norm == pytest.approx(float(rest.median()), rel=1e-5) and d0.resid_norm == d.resid_norm


def test_one_token_prompts_are_judged_against_the_corpus(model):
    """With nothing else in the prompts to compare with, the typical norm comes from the corpus."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(3, 128, (2, 1), generator=g), torch.randint(3, 128, (2, 1), generator=g)
    ref = corpus_norm(model, "blocks.1.hook_resid_post")
    norms = torch.rand(4, 1) + 1
    assert reference_norm(model, "blocks.1.hook_resid_post", norms, torch.zeros(4, 1, dtype=torch.bool)) == ref
    with model.hooks(fwd_hooks=plant(0)), pytest.warns(MassiveActivationWarning, match="read 4 of 4"):
        steering_direction(model, a, b, layer=1)


def test_sae_metrics_warns_when_a_measured_token_is_massive(model):
    sae = random_sae("standard", d_in=model.d_model, d_sae=32)
    g = torch.Generator().manual_seed(2)
    texts = [torch.randint(3, 128, (12,), generator=g).tolist() for _ in range(4)]
    with model.hooks(fwd_hooks=plant(0)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", MassiveActivationWarning)
            sae_metrics(model, sae, texts)  # skip_first leaves the planted first tokens out
        with pytest.warns(MassiveActivationWarning, match="skip_first=True"):
            sae_metrics(model, sae, texts, skip_first=False)
    with model.hooks(fwd_hooks=plant(5)):
        with pytest.warns(MassiveActivationWarning, match="outlier_ratio"):
            sae_metrics(model, sae, texts)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MassiveActivationWarning)
            sae_metrics(model, sae, texts, outlier_ratio=RATIO)
