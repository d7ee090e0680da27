"""Attribution patching equals the first-order finite difference of the patched metric (tiny model),
and tracks activation patching on the real model (correlations measured and asserted)."""

import pytest
import torch

from analyses import activation_patching, attribution_patching, get_component
from analyses.metrics import LogitDiff
from hooks import HookedLlama
from tests.helpers import IOI_CLEAN, IOI_CORRUPT, tiny_hf

ALL = [
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "z",
    "result",
    "q",
    "k",
    "v",
    "pattern",
    "neurons",
]
METRIC = LogitDiff(torch.tensor([5, 6]), torch.tensor([7, 8]))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gqa", "qwen2", "qwen3"])
def setup(request):
    model = HookedLlama.from_hf(tiny_hf(request.param, initializer_range=0.1))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(3, 128, (2, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 4] = torch.randint(3, 128, (2,), generator=g)
    with torch.no_grad():
        _, cc = model.run_with_cache(clean, names_filter=lambda n: True)
        _, kc = model.run_with_cache(corrupted, names_filter=lambda n: True)
    res = attribution_patching(model, clean, corrupted, METRIC, components=ALL)
    return model, clean, corrupted, cc, kc, res


@pytest.mark.parametrize("component", ALL)
def test_attribution_equals_first_order_finite_difference(setup, component):
    """d/de metric(a_corr + e (a_clean - a_corr) on one cell) at e=0, by central differences (e = ±0.01)."""
    model, clean, corrupted, cc, kc, res = setup
    comp = get_component(component)
    r = res[component]
    eps, worst, scale = 1e-2, 0.0, float(r.effect.abs().max())
    for layer in range(model.n_layers):
        for p in (4, 6, 8):
            for u in (0, 1) if comp.unit else (None,):
                name = comp.hook_name(layer)

                def run(e, p=p, u=u, name=name):
                    def hook(t, hook):
                        t = t.clone()
                        idx = comp.region(t, p, u)
                        t[idx] = t[idx] + e * (cc[name][idx] - kc[name][idx])
                        return t

                    with torch.no_grad():
                        return float(METRIC(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])))

                fd = (run(eps) - run(-eps)) / (2 * eps)
                attr = float(r.effect[(layer, p, u) if u is not None else (layer, p)])
                worst = max(worst, abs(fd - attr))
    assert scale > 0.05  # non-trivial attributions
    assert worst <= 2e-3 * scale + 2e-5  # measured: ≤ 4e-4 × scale


def test_attribution_values_and_baselines(setup):
    model, clean, corrupted, cc, kc, res = setup
    r = res["z"]
    with torch.no_grad():
        assert r.corrupted_value == pytest.approx(float(METRIC(model(corrupted))), abs=1e-5)
        assert r.clean_value == pytest.approx(float(METRIC(model(clean))), abs=1e-5)
    assert torch.allclose(r.values, r.corrupted_value + r.effect)
    assert r.values.shape == (3, 9, 4) and res["k"].values.shape == (3, 9, 2)
    # summing over positions equals the all-positions attribution
    allpos = attribution_patching(model, clean, corrupted, METRIC, components="z", per_position=False)["z"]
    assert (allpos.effect - r.effect.sum(1)).abs().max() <= 1e-5


@pytest.mark.slow
def test_attribution_tracks_activation_patching_on_real_model(smol):
    """Pearson correlation of attribution and activation patching over every cell of the IOI sweep.
    Measured: resid_pre 0.854, attn_out 0.982, mlp_out 0.847, z per position 0.978, z all positions 0.980."""
    answers = (" Mary", " John")
    attr = attribution_patching(
        smol, IOI_CLEAN, IOI_CORRUPT, answers=answers, components=("resid_pre", "attn_out", "mlp_out", "z")
    )
    expected = {"resid_pre": 0.8, "attn_out": 0.95, "mlp_out": 0.8}
    for comp, floor in expected.items():
        act = activation_patching(smol, IOI_CLEAN, IOI_CORRUPT, answers=answers, component=comp)
        corr = torch.corrcoef(torch.stack([act.effect.flatten(), attr[comp].effect.flatten()]))[0, 1]
        assert float(corr) >= floor, (comp, float(corr))
    # heads, all positions at once (cheaper than per position): the same ordering of the strong heads
    act = activation_patching(smol, IOI_CLEAN, IOI_CORRUPT, answers=answers, component="z", per_position=False)
    attr_z = attribution_patching(smol, IOI_CLEAN, IOI_CORRUPT, answers=answers, components="z", per_position=False)[
        "z"
    ]
    corr = torch.corrcoef(torch.stack([act.effect.flatten(), attr_z.effect.flatten()]))[0, 1]
    assert float(corr) >= 0.9, float(corr)
