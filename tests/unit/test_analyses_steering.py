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


def test_strength_is_a_fraction_of_the_residual_norm(model):
    """strength × the median residual norm at the hook point (the direction's, or the corpus's for a plain
    tensor); the default is DEFAULT_STRENGTH; scale and strength together are refused."""
    from analyses.massive import corpus_norm
    from analyses.steering import DEFAULT_STRENGTH

    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, 128, (3, 6), generator=g), torch.randint(3, 128, (3, 6), generator=g)
    d = steering_direction(model, a, b, layer=1)
    with torch.no_grad():
        _, ca = model.run_with_cache(a)
        _, cb = model.run_with_cache(b)
    norms = torch.cat([ca["resid_post", 1], cb["resid_post", 1]]).norm(dim=-1).flatten()
    assert d.resid_norm == pytest.approx(float(norms.median()), rel=1e-5)  # no massive position here
    assert steer(model, d, strength=0.3).scale == pytest.approx(0.3 * d.resid_norm)
    assert steer(model, d).scale == pytest.approx(DEFAULT_STRENGTH * d.resid_norm)
    assert d.add_steering_args(strength=0.3)["scale"] == pytest.approx(0.3 * d.resid_norm)
    raw = torch.randn(model.d_model, generator=g) * 5
    s = steer(model, raw, layer=2, strength=0.2)
    assert torch.allclose(s.vector, raw / raw.norm(), atol=1e-6)
    assert s.scale == pytest.approx(0.2 * corpus_norm(model, "blocks.2.hook_resid_post"), rel=1e-6)
    with pytest.raises(InputError, match="not both"):
        steer(model, d, scale=1.0, strength=0.1)
    with pytest.raises(InputError, match="finite"):
        steer(model, d, strength=float("nan"))


def test_positions_are_absolute_and_follow_generation(model):
    """positions count from each prompt's first real token (left padding skipped), so a padded row and the
    same row alone are steered alike, and KV-cache generation steers only the prompt's listed positions."""
    g = torch.Generator().manual_seed(4)
    long, short = torch.randint(3, 128, (1, 7), generator=g), torch.randint(3, 128, (1, 4), generator=g)
    v = torch.randn(model.d_model, generator=g)
    s = steer(model, v, layer=1, scale=2.0, positions=[1, 2])
    tokens = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    with torch.no_grad():
        _, base = model.run_with_cache(tokens, attention_mask=mask)
        _, st = model.run_with_cache(tokens, attention_mask=mask, fwd_hooks=s.fwd_hooks)
    delta = st["resid_post", 1] - base["resid_post", 1]
    assert torch.allclose(delta[0, [1, 2]], 2.0 * v.expand(2, -1), atol=1e-5)
    assert torch.allclose(delta[1, [4, 5]], 2.0 * v.expand(2, -1), atol=1e-5)  # row 1's tokens 1, 2
    assert delta[0, [0, 3, 4, 5, 6]].abs().max() == 0 and delta[1, [0, 1, 2, 3, 6]].abs().max() == 0
    # one vector per position (ActAdd): row i of the vector goes to positions[i]
    rows = torch.randn(2, model.d_model, generator=g)
    with torch.no_grad():
        _, per = model.run_with_cache(
            long, fwd_hooks=steer(model, rows, layer=1, scale=1.0, positions=[0, 3]).fwd_hooks
        )
        _, plain = model.run_with_cache(long)
    d2 = per["resid_post", 1] - plain["resid_post", 1]
    assert torch.allclose(d2[0, 0], rows[0], atol=1e-5) and torch.allclose(d2[0, 3], rows[1], atol=1e-5)
    # generation: the same tokens as a full forward steered at the same absolute positions
    with torch.no_grad(), s:
        out = model.generate(long, max_new_tokens=4, return_type="tokens")
    seq = out.clone()
    with torch.no_grad():
        for i in range(long.shape[1], seq.shape[1]):
            logits = model.run_with_hooks(seq[:, :i], fwd_hooks=s.fwd_hooks)
            assert int(logits[0, -1].argmax()) == int(seq[0, i])
    with pytest.raises(InputError, match="positions"):
        steer(model, v, layer=1, scale=1.0, positions=[-1])


def test_resid_pre_directions_bake_after_the_layer_before(model):
    """A direction read at resid_pre of layer L is resid_post of L − 1, so AddSteering goes after layer L − 1
    (the hook at resid_pre L and at resid_post L − 1 give the same logits); at resid_pre 0 or resid_mid the
    fix is named."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(3, 128, (2, 5), generator=g), torch.randint(3, 128, (2, 5), generator=g)
    d = steering_direction(model, a, b, layer=2, at="resid_pre")
    args = d.add_steering_args(1.5)
    assert args["layer"] == 1 and args["scale"] == 1.5
    x = torch.randint(3, 128, (1, 6), generator=g)
    with torch.no_grad():
        pre = model.run_with_hooks(x, fwd_hooks=steer(model, d, scale=1.5).fwd_hooks)
        post = model.run_with_hooks(x, fwd_hooks=steer(model, d.unit, layer=1, scale=1.5).fwd_hooks)
    torch.testing.assert_close(pre, post, rtol=0, atol=1e-5)
    assert steering_direction(model, a, b, layer=1, at="mlp_out").add_steering_args(1.0)["layer"] == 1
    for at, layer in (("resid_pre", 0), ("resid_mid", 1)):
        with pytest.raises(InputError, match="resid_post"):
            steering_direction(model, a, b, layer=layer, at=at).add_steering_args(1.0)
