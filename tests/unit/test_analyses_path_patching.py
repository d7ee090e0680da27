"""Path patching equals a naive two-pass loop (sender patched with other heads frozen, then receivers'
inputs replaced), for logits and q / k / v receivers, with and without frozen MLPs."""

import pytest
import torch

from analyses import kv_group, parse_heads, path_patching
from analyses.metrics import LogitDiff
from hooks import HookedLlama, InputError
from tests.helpers import IOI_CLEAN, IOI_CORRUPT, tiny_hf

METRIC = LogitDiff(torch.tensor([5, 6]), torch.tensor([7, 8]))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gqa", "mistral", "qwen3"])
def setup(request):
    model = HookedLlama.from_hf(tiny_hf(request.param, num_hidden_layers=4, initializer_range=0.1))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(3, 128, (2, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 4] = torch.randint(3, 128, (2,), generator=g)
    with torch.no_grad():
        _, cc = model.run_with_cache(clean)
        _, kc = model.run_with_cache(corrupted)
    return model, clean, corrupted, cc, kc


def naive(model, corrupted, cc, kc, sender, receivers, kinds, freeze_mlps):
    Ls, hs = sender
    n = model.n_layers

    def set_sender(z, hook):
        z = z.clone()
        z[:, :, hs] = cc[hook.name][:, :, hs]
        return z

    def frozen(t, hook):
        return kc[hook.name].clone()

    hooks = [(f"blocks.{Ls}.attn.hook_z", set_sender)]
    hooks += [(f"blocks.{l}.attn.hook_z", frozen) for l in range(Ls + 1, n)]
    if freeze_mlps:
        hooks += [(f"blocks.{l}.hook_mlp_out", frozen) for l in range(Ls, n)]
    with torch.no_grad():
        logits, rec = model.run_with_cache(corrupted, fwd_hooks=hooks)
    if not receivers:
        return float(METRIC(logits))
    hooks2 = []
    for layer, h in receivers:
        for k in kinds:
            idx = h if k == "q" else kv_group(model, h)

            def put(t, hook, idx=idx):
                t = t.clone()
                t[:, :, idx] = rec[hook.name][:, :, idx]
                return t

            hooks2.append((f"blocks.{layer}.attn.hook_{k}", put))
    with torch.no_grad():
        return float(METRIC(model.run_with_hooks(corrupted, fwd_hooks=hooks2)))


@pytest.mark.parametrize(
    "receivers,kinds,freeze",
    [
        (None, "qkv", False),
        (None, "qkv", True),
        (["L2H1", (3, 3)], "q", False),
        ([(2, 1), (3, 3)], "kv", False),
        (["L3H0"], "qkv", True),
    ],
)
def test_path_patching_equals_naive_two_pass_loop(setup, receivers, kinds, freeze):
    model, clean, corrupted, cc, kc = setup
    res = path_patching(
        model, clean, corrupted, METRIC, receivers=receivers, receiver_input=kinds, freeze_mlps=freeze, max_batch=3
    )
    recv = parse_heads(model, receivers) if receivers else []
    first = min((l for l, _ in recv), default=4)
    assert res.layers == list(range(first)) and res.values.shape == (first, 4)
    worst = 0.0
    for li, layer in enumerate(res.layers):
        for h in range(4):
            ref = naive(model, corrupted, cc, kc, (layer, h), recv, kinds, freeze)
            worst = max(worst, abs(ref - float(res.values[li, h])))
    assert worst <= 1e-4
    assert res.effect.abs().max() > 2e-3  # well above the tolerance


def test_sender_subset_and_errors(setup):
    model, clean, corrupted, cc, kc = setup
    res = path_patching(model, clean, corrupted, METRIC, receivers=["L3H2"], senders=["L1H0", "L1H3"])
    assert res.layers == [1] and torch.isnan(res.values[0, [1, 2]]).all()
    assert torch.isfinite(res.values[0, [0, 3]]).all()
    with pytest.raises(InputError, match="not before"):
        path_patching(model, clean, corrupted, METRIC, receivers=["L2H0"], senders=["L2H1"])
    with pytest.raises(InputError, match="receiver_input"):
        path_patching(model, clean, corrupted, METRIC, receivers=["L2H0"], receiver_input="x")


@pytest.mark.slow
def test_ioi_name_movers_read_through_queries(smol):
    """Real model: heads of layers 18-22 → the queries of L23H3 (the head with the largest all-position
    patching effect on the IOI pair); finite, non-trivial, receivers reported with their kv group."""
    res = path_patching(
        smol,
        IOI_CLEAN,
        IOI_CORRUPT,
        answers=(" Mary", " John"),
        receivers=["L23H3"],
        receiver_input="q",
        senders=[(l, h) for l in range(18, 23) for h in range(9)],
    )
    assert res.values.shape == (5, 9) and torch.isfinite(res.values).all()
    assert res.effect.abs().max() > 0.1
    assert res.to_dict()["receivers"] == [{"layer": 23, "head": 3, "kv_group": 1}]
