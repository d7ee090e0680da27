"""Activation patching: the batched engine equals a naive one-forward-per-patch loop, for every
component, and the IOI resid_pre sweep on the real model equals TransformerLens's."""

import itertools

import pytest
import torch

from analyses import activation_patching, get_component, kl_divergence, logit_diff
from analyses.metrics import LogitDiff, TargetProb
from hooks import HookedLlama, InputError
from tests.helpers import FAMILY_VARIANTS, IOI_CLEAN, IOI_CORRUPT, tiny_hf

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


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    # larger weights than the default init, so that every component visibly moves the metric
    return HookedLlama.from_hf(tiny_hf("gqa", initializer_range=0.1))


def pair(seed=1, batch=2, seq=9, at=4):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 128, (batch, seq), generator=g)
    corrupted = clean.clone()
    corrupted[:, at] = torch.randint(3, 128, (batch,), generator=g)
    return clean, corrupted


METRIC = LogitDiff(torch.tensor([5, 6]), torch.tensor([7, 8]))


def naive(model, clean, corrupted, comp_name, metric, per_position=True, units=None, mask=None, layers=None):
    """One run_with_hooks per patch, writing the clean slice into the corrupted run."""
    comp = get_component(comp_name)
    layers = range(model.n_layers) if layers is None else layers
    with torch.no_grad():
        _, cc = model.run_with_cache(
            clean, attention_mask=mask, names_filter=[comp.hook_name(l) for l in range(model.n_layers)]
        )
    units = (list(range(comp.n_units(model))) if comp.unit else [None]) if units is None else units
    positions = range(clean.shape[1]) if per_position else [None]
    out = torch.zeros(len(layers), len(positions), len(units))
    for (i, layer), (j, p), (k, u) in itertools.product(enumerate(layers), enumerate(positions), enumerate(units)):

        def hook(t, hook, p=p, u=u):
            t = t.clone()
            idx = comp.region(t, p, u)
            t[idx] = cc[hook.name][idx]
            return t

        with torch.no_grad():
            logits = model.run_with_hooks(corrupted, attention_mask=mask, fwd_hooks=[(comp.hook_name(layer), hook)])
        out[i, j, k] = float(metric(logits))
    if not per_position:
        out = out[:, 0]
    return out if comp.unit else out[..., 0]


@pytest.mark.parametrize("per_position", [True, False])
@pytest.mark.parametrize("component", ALL)
def test_batched_equals_naive_loop(model, component, per_position):
    clean, corrupted = pair()
    neurons = [0, 17, 95] if component == "neurons" else None
    res = activation_patching(
        model, clean, corrupted, METRIC, component=component, per_position=per_position, neurons=neurons
    )
    ref = naive(model, clean, corrupted, component, METRIC, per_position, units=neurons)
    assert res.values.shape == ref.shape
    assert (res.values - ref).abs().max() <= 1e-4
    assert res.effect.abs().max() > 1e-3  # the patches really change the metric
    assert res.stats.n_patches == ref.numel()


@pytest.mark.parametrize("component", ["resid_pre", "z", "k", "pattern"])
def test_chunking_and_prefix_reuse_do_not_change_numbers(model, component):
    clean, corrupted = pair(seed=2)
    base = activation_patching(model, clean, corrupted, METRIC, component=component)
    for kwargs in ({"max_batch": 1}, {"max_batch": 5}, {"memory_budget_mb": 0.01}, {"reuse_prefix": False}):
        other = activation_patching(model, clean, corrupted, METRIC, component=component, **kwargs)
        assert (other.values - base.values).abs().max() <= 1e-5, kwargs
    assert activation_patching(model, clean, corrupted, METRIC, component=component, max_batch=1).stats.n_chunks > 1
    # patches before the corrupted position change nothing and are answered by the corrupted run
    assert base.stats.n_skipped > 0 and other.stats.n_skipped == 0


@pytest.mark.parametrize("variant", ["mha", "mqa", "bias", "head_dim"] + FAMILY_VARIANTS)
def test_head_components_on_other_attention_layouts(variant):
    m = HookedLlama.from_hf(tiny_hf(variant, initializer_range=0.1))
    clean, corrupted = pair(seed=3)
    for component in ("z", "v"):
        res = activation_patching(m, clean, corrupted, METRIC, component=component)
        ref = naive(m, clean, corrupted, component, METRIC)
        assert (res.values - ref).abs().max() <= 1e-4
        assert res.values.shape[-1] == (m.n_heads if component == "z" else m.n_kv_heads)


@pytest.mark.parametrize("variant", ["gqa"] + FAMILY_VARIANTS)
def test_left_padded_batch_equals_naive_loop(model, variant):
    if variant != "gqa":
        model = HookedLlama.from_hf(tiny_hf(variant, initializer_range=0.1))
    clean, corrupted = pair(seed=4, seq=8, at=5)
    mask = torch.ones_like(clean)
    mask[0, :3] = 0  # row 0 is a shorter prompt, left-padded
    res = activation_patching(model, clean, corrupted, METRIC, component="resid_mid", attention_mask=mask)
    ref = naive(model, clean, corrupted, "resid_mid", METRIC, mask=mask)
    assert (res.values - ref).abs().max() <= 1e-4


def test_callable_metric_sees_full_logits(model):
    clean, corrupted = pair(seed=5)

    def tl_style(logits):  # TransformerLens-style: logits [B, P, V] -> scalar, reading two positions
        return logits[:, -1, 5].mean() - logits[:, 3, 9].mean()

    res = activation_patching(model, clean, corrupted, tl_style, component="attn_out")
    ref = naive(model, clean, corrupted, "attn_out", tl_style)
    assert (res.values - ref).abs().max() <= 1e-4


def test_metrics_and_normalisation(model):
    clean, corrupted = pair(seed=6)
    with torch.no_grad():
        clean_logits = model(clean)
    for metric in (TargetProb(torch.tensor([5, 9])), kl_divergence(clean_logits), METRIC):
        res = activation_patching(model, clean, corrupted, metric, component="resid_pre", per_position=False)
        ref = naive(model, clean, corrupted, "resid_pre", metric, per_position=False)
        assert (res.values - ref).abs().max() <= 1e-5
        # patching every position of resid_pre at layer 0 is the clean run: normalised score 1
        assert res.normalized[0] == pytest.approx(1.0, abs=1e-4)
        assert res.values[0] == pytest.approx(res.clean_value, abs=1e-5)
    res = activation_patching(model, clean, corrupted, "kl", component="resid_pre", per_position=False)
    assert res.clean_value == pytest.approx(0.0, abs=1e-6) and res.corrupted_value > 0


def test_restricting_layers_positions_heads(model):
    clean, corrupted = pair(seed=7)
    full = activation_patching(model, clean, corrupted, METRIC, component="z")
    part = activation_patching(
        model, clean, corrupted, METRIC, component="z", layers=[2, 0], positions=[-1, 4], heads=[3]
    )
    assert part.values.shape == (2, 2, 1) and part.layers == [2, 0] and part.positions == [8, 4]
    assert (part.values - full.values[[2, 0]][:, [8, 4]][:, :, [3]]).abs().max() <= 1e-5


def test_errors_name_the_fix(model):
    clean, corrupted = pair()
    with pytest.raises(InputError, match="same shape"):
        activation_patching(model, clean, corrupted[:, :-1], METRIC)
    with pytest.raises(InputError, match="unknown component"):
        activation_patching(model, clean, corrupted, METRIC, component="resid_prex")
    with pytest.raises(InputError, match="out of range"):
        activation_patching(model, clean, corrupted, METRIC, layers=[7])
    with pytest.raises(InputError, match="answers"):
        activation_patching(model, clean, corrupted)


# --------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def ioi_sweep(smol):
    return activation_patching(smol, IOI_CLEAN, IOI_CORRUPT, answers=(" Mary", " John"), component="resid_pre")


@pytest.mark.slow
def test_ioi_resid_pre_sweep_shape_and_anchors(smol, ioi_sweep):
    res = ioi_sweep
    assert res.values.shape == (30, 14)
    # layer 0, position 9 (the only token that differs) is the whole clean run
    assert res.values[0, 9] == pytest.approx(res.clean_value, abs=1e-4)
    assert res.clean_value > 5 and res.corrupted_value < -5
    # positions before the name token are the same in both prompts: no effect anywhere
    assert (res.values[:, :9] == res.corrupted_value).all()
    ids = smol.to_tokens(IOI_CLEAN)
    metric = logit_diff(smol, " Mary", " John")
    # a naive run_with_hooks patch at a few (layer, position) cells
    with torch.no_grad():
        _, cc = smol.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
        for layer, p in [(12, 9), (22, 13), (5, 10)]:

            def hook(t, hook, p=p):
                t = t.clone()
                t[:, p] = cc[hook.name][:, p]
                return t

            logits = smol.run_with_hooks(
                smol.to_tokens(IOI_CORRUPT), fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)]
            )
            assert float(metric(logits)) == pytest.approx(float(res.values[layer, p]), abs=1e-4)


@pytest.mark.slow
@pytest.mark.interop
def test_ioi_resid_pre_sweep_equals_transformer_lens(smol, ioi_sweep):
    """TransformerLens 4.3 get_act_patch_resid_pre on layers 0, 10, 20, 29 × positions 0, 8 and 9..13 (28 of
    the 420 patches: positions 1..7 behave as 0 and 8, before the name token where the prompts agree; the
    full TL sweep takes ~90 s and is compared in benchmarks/bench_patching.py)."""
    tl = pytest.importorskip("transformer_lens")
    pd = pytest.importorskip("pandas")
    import transformer_lens.patching as tl_patching

    bridge = tl.TransformerBridge.boot_transformers(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        hf_model=smol.to_hf(),
        tokenizer=smol.tokenizer,
        dtype=torch.float32,
        device="cpu",
    )
    bridge.cfg.default_prepend_bos = False
    bridge.eval()
    clean_ids, corrupt_ids = smol.to_tokens(IOI_CLEAN), smol.to_tokens(IOI_CORRUPT)
    assert clean_ids.shape == (1, 14)
    mary, john = smol.to_single_token(" Mary"), smol.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    layers, positions = [0, 10, 20, 29], [0, 8, 9, 10, 11, 12, 13]
    index_df = pd.DataFrame(list(itertools.product(layers, positions)), columns=["layer", "pos"])
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean_ids)
        ref = tl_patching.get_act_patch_resid_pre(
            bridge, corrupt_ids, clean_cache, metric, index_axis_names=None, index_df=index_df
        )
    ours = ioi_sweep.values[layers][:, positions].reshape(-1)
    assert (ours - ref.cpu()).abs().max() <= 1e-4
