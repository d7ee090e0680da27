"""Steering: the direction is the normalised difference of means (checked against a direct
computation, with left padding and chat prompts); steer() adds exactly scale·unit at resid_post."""

import pytest
import torch

from analyses import Steering, steer, steering_direction
from hooks import HookedLlama, InputError
from tests.helpers import tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gqa", "qwen2"])
def model(request):
    return HookedLlama.from_hf(tiny_hf(request.param, initializer_range=0.1))


def test_direction_is_normalised_difference_of_means(model):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 128, (4, 7), generator=g), torch.randint(3, 128, (3, 7), generator=g)
    d = steering_direction(model, a, b, layer=1, all_layers=True)
    with torch.no_grad():
        _, ca = model.run_with_cache(a)
        _, cb = model.run_with_cache(b)
    diff = ca["resid_post", 1][:, -1].mean(0) - cb["resid_post", 1][:, -1].mean(0)
    assert d.norm == pytest.approx(float(diff.norm()), rel=1e-5)
    assert torch.allclose(d.unit, diff / diff.norm(), atol=1e-6) and torch.allclose(d.vector, diff, atol=1e-5)
    assert d.separation.shape == (3,) and d.separation_layers == [0, 1, 2]
    pa, pb = ca["resid_post", 1][:, -1] @ d.unit, cb["resid_post", 1][:, -1] @ d.unit
    pooled = ((pa.var(unbiased=False) + pb.var(unbiased=False)) / 2).sqrt()
    assert float(d.separation[1]) == pytest.approx(float((pa.mean() - pb.mean()) / pooled), rel=1e-4)
    mid = steering_direction(model, a, b, layer=2, at="resid_mid", pos=3)
    diff = ca["resid_mid", 2][:, 3].mean(0) - cb["resid_mid", 2][:, 3].mean(0)
    assert torch.allclose(mid.unit, diff / diff.norm(), atol=1e-6)


def test_steer_adds_scale_times_unit_at_resid_post(model):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(3, 128, (2, 5), generator=g), torch.randint(3, 128, (2, 5), generator=g)
    d = steering_direction(model, a, b, layer=1)
    x = torch.randint(3, 128, (2, 6), generator=g)
    with torch.no_grad():
        base_logits, base = model.run_with_cache(x)
        with steer(model, d, scale=3.0):
            _, steered = model.run_with_cache(x)
        after = model(x)
    delta = steered["resid_post", 1] - base["resid_post", 1]
    assert torch.allclose(delta, (3.0 * d.unit).expand_as(delta), atol=1e-5)
    assert torch.equal(steered["resid_post", 0], base["resid_post", 0])
    assert torch.allclose(after, base_logits, atol=1e-5)  # the cached run takes the eager attention path
    assert not model.hook_dict["blocks.1.hook_resid_post"].active
    # the same as a fwd_hooks list, a raw tensor, and only some positions
    s = steer(model, d.unit * 2, layer=1, scale=1.5, positions=[0, 4])
    assert isinstance(s, Steering) and list(s) == s.fwd_hooks
    with torch.no_grad():
        _, part = model.run_with_cache(x, fwd_hooks=s.fwd_hooks)
    delta = part["resid_post", 1] - base["resid_post", 1]
    assert torch.allclose(delta[:, [0, 4]], (3.0 * d.unit).expand(2, 2, -1), atol=1e-5)
    assert delta[:, [1, 2, 3, 5]].abs().max() == 0


def test_hooks_removed_after_an_exception(model):
    d = torch.ones(model.d_model)
    with pytest.raises(RuntimeError):
        with steer(model, d, layer=0, scale=1.0):
            raise RuntimeError("boom")
    assert not model.hook_dict["blocks.0.hook_resid_post"].active


def test_surgery_arguments_and_errors(model):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(3, 128, (2, 4), generator=g), torch.randint(3, 128, (2, 4), generator=g)
    d = steering_direction(model, a, b, 2)
    args = d.add_steering_args(4.0)
    assert set(args) == {"layer", "vector", "scale"} and args["layer"] == 2 and args["scale"] == 4.0
    assert torch.equal(args["vector"], d.unit) and float(args["vector"].norm()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(d.orthogonalize_args()["direction"], d.unit)
    with pytest.raises(InputError, match="identical means"):
        same = torch.randint(3, 128, (2, 4), generator=g)
        steering_direction(model, same, same, 1)
    with pytest.raises(InputError, match="layer="):
        steer(model, torch.ones(model.d_model))
    with pytest.raises(InputError, match="d_model"):
        steer(model, torch.ones(3), layer=0)


@pytest.mark.slow
def test_real_model_chat_prompts_and_padding(smol):
    """Chat-message prompts of different lengths (left-padded): each row is read at its last token."""
    a = [[{"role": "user", "content": t}] for t in ["I love this, it is wonderful!", "What a great day."]]
    b = [[{"role": "user", "content": t}] for t in ["I hate this.", "What a terrible and sad day it was."]]
    d = steering_direction(smol, a, b, layer=12)
    with torch.no_grad():
        means = []
        for group in (a, b):
            rows = []
            for msgs in group:
                _, cache = smol.run_with_cache(msgs, names_filter=["blocks.12.hook_resid_post"], stop_at_layer=13)
                rows.append(cache["resid_post", 12][0, -1])
            means.append(torch.stack(rows).mean(0))
    diff = means[0] - means[1]
    assert torch.allclose(d.unit, diff / diff.norm(), atol=1e-4)
