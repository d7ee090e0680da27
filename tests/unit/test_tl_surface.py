"""TransformerLens spellings on a tiny random Llama: every helper taking a layer accepts every valid
value, negative ones included, and equals a naive recomputation from the cache; out-of-range values
are one-line errors. Also permanent hooks, sampling, answer formats and the last-position metric."""

from __future__ import annotations

import pytest
import torch

from analyses import activation_patching
from analyses.metrics import LastPositionCallable, resolve_metric
from hooks import HookedLlama, InputError, act_name
from tests.helpers import tiny_hf

N = 3  # layers of the tiny model


@pytest.fixture(scope="module")
def run():
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
    return model, ids, logits, cache


def boundary(layer):  # TransformerLens: None / -1 = the unembed (N); other negatives count back from it
    return N if layer is None else (layer + N + 1 if layer < 0 else layer)


def resid_into(cache, b):
    return cache["resid_post", N - 1] if b == N else cache["resid_pre", b]


def rms_norm(x, norm):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


LAYERS = [None] + list(range(-(N + 1), N + 1))


@pytest.mark.parametrize("layer", LAYERS)
def test_cache_helpers_every_layer(run, layer):
    model, ids, logits, cache = run
    b = boundary(layer)
    target = resid_into(cache, b)
    # decompose_resid sums to the residual stream entering the boundary; labels name each part
    stack, labels = cache.decompose_resid(layer, return_labels=True)
    assert labels == ["embed"] + [f"{i}_{k}" for i in range(b) for k in ("attn_out", "mlp_out")]
    assert (stack.sum(0) - target).abs().max() <= 1e-5
    # accumulated_resid: one entry per boundary 0..b
    acc, labels = cache.accumulated_resid(layer, return_labels=True)
    naive = [cache["resid_pre", i] for i in range(min(b + 1, N))] + ([cache["resid_post", N - 1]] if b == N else [])
    assert labels == [f"{i}_pre" for i in range(min(b + 1, N))] + (["final_post"] if b == N else [])
    assert torch.equal(acc, torch.stack(naive))
    # stack_head_results with remainder sums to the same stream; heads equal z @ W_O per head
    heads, labels = cache.stack_head_results(layer, return_labels=True, incl_remainder=True)
    assert len(labels) == b * model.n_heads + 1 and labels[-1] == "remainder"
    assert (heads.sum(0) - target).abs().max() <= 1e-5
    for i in range(b):
        z = cache["z", i]
        w = model.model.layers[i].self_attn.o_proj.weight
        for h in (0, model.n_heads - 1):
            per_head = z[:, :, h] @ w[:, h * model.d_head : (h + 1) * model.d_head].T
            assert (heads[i * model.n_heads + h] - per_head).abs().max() <= 1e-5
    # neurons
    neurons = cache.stack_neuron_results(layer, pos_slice=-1)
    assert neurons.shape[0] == b * model.d_mlp
    if b:
        assert (neurons.sum(0) - sum(cache["mlp_out", i][:, -1] for i in range(b))).abs().max() <= 1e-5
    # full decomposition sums to the stream too
    full = cache.get_full_resid_decomposition(layer, pos_slice=-1, expand_neurons=False)
    assert (full.sum(0) - target[:, -1]).abs().max() <= 1e-5
    # apply_ln_to_stack with the cached scale of that norm: the parts sum to the normalised stream
    norm = model.model.norm if b == N else model.model.layers[b].input_layernorm
    normed = cache.apply_ln_to_stack(stack, layer).sum(0)
    assert (normed - rms_norm(target, norm)).abs().max() <= 1e-4
    # stack_activation stops before the boundary
    stacked = cache.stack_activation("resid_pre", layer)
    assert stacked.shape == (b,) + tuple(cache["resid_pre", 0].shape)
    assert all(torch.equal(stacked[i], cache["resid_pre", i]) for i in range(b))


@pytest.mark.parametrize("layer", list(range(-N, N + 1)))
def test_stop_and_start_at_every_layer(run, layer):
    model, ids, logits, cache = run
    stop = layer + N if layer < 0 else layer  # a slice of the blocks
    with torch.no_grad():
        resid = model(ids, stop_at_layer=layer)
        assert (resid - resid_into(cache, stop)).abs().max() <= 1e-5  # SDPA here, eager in the cached run
        if stop < N:
            assert (model(resid, start_at_layer=layer) - logits).abs().max() <= 1e-5
    assert torch.equal(
        cache["resid_pre", layer] if layer < N else cache["resid_post", N - 1],
        cache[act_name("resid_pre", layer % N)] if layer < N else cache["resid_post", -1],
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.decompose_resid(N + 1),
        lambda c: c.accumulated_resid(-(N + 2)),
        lambda c: c.stack_head_results(N + 1),
        lambda c: c.apply_ln_to_stack(c["embed"][None], 7),
        lambda c: c.head_results(N),
    ],
)
def test_out_of_range_layers_are_one_line_errors(run, call):
    with pytest.raises(InputError, match=r"^layer=-?\d+ is out of range; ") as err:
        call(run[3])
    assert "\n" not in str(err.value)


def test_recompute_ln_is_tl_default_at_the_unembed(run):
    model, ids, logits, cache = run
    acc = cache.accumulated_resid(apply_ln=True)  # each component by its own RMS
    naive = torch.stack([rms_norm(x, model.model.norm) for x in cache.accumulated_resid()])
    assert (acc - naive).abs().max() <= 1e-5
    one_scale = cache.accumulated_resid(apply_ln=True, recompute_ln=False)
    scale = cache["ln_final.hook_scale"]
    assert (one_scale - cache.accumulated_resid() / scale * model.model.norm.weight).abs().max() <= 1e-5
    assert (one_scale[-1] @ model.W_U - logits).abs().max() <= 1e-4  # the final entry gives the logits


def test_decompose_resid_negative_layer_and_pos_slice(run):
    model, ids, logits, cache = run
    stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    assert len(labels) == 1 + 2 * N and stack.shape == (1 + 2 * N, 2, model.d_model)
    assert (stack.sum(0) - cache["resid_post", -1][:, -1]).abs().max() <= 1e-5
    ln = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1).sum(0)
    assert (ln @ model.W_U - logits[:, -1]).abs().max() <= 1e-4


def test_permanent_hooks_and_reset_hooks_end(run):
    model, ids, logits, cache = run
    model.add_hook("blocks.0.hook_resid_pre", lambda t, h: t * 0, is_permanent=True)
    model.add_hook("blocks.1.hook_resid_pre", lambda t, h: t * 0)
    model.reset_hooks()
    assert len(model.hook_dict["blocks.0.hook_resid_pre"].fwd_hooks) == 1
    assert not model.hook_dict["blocks.1.hook_resid_pre"].fwd_hooks
    model.reset_hooks(including_permanent=True)
    assert not any(p.fwd_hooks for p in model.hook_dict.values())
    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", lambda t, h: None)], reset_hooks_end=False):
        pass
    assert len(model.hook_dict["blocks.2.hook_resid_pre"].fwd_hooks) == 1
    model.reset_hooks()
    with pytest.raises(RuntimeError):
        with model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", lambda t, h: None)], reset_hooks_end=False):
            raise RuntimeError("body failed")
    assert not any(p.fwd_hooks for p in model.hook_dict.values())


def test_generate_samples_when_a_temperature_is_given(run):
    model, ids, logits, cache = run
    greedy = model.generate(ids[:1], 6, stop_at_eos=False)
    assert torch.equal(model.generate(ids[:1], 6, stop_at_eos=False, use_past_kv_cache=False), greedy)
    assert torch.equal(model.generate(ids[:1], 6, stop_at_eos=False, temperature=0), greedy)
    draws = {
        tuple(model.generate(ids[:1], 6, stop_at_eos=False, temperature=0.7, seed=s)[0].tolist()) for s in range(6)
    }
    assert len(draws) > 1  # random weights give a near-flat distribution: sampling differs across seeds
    # temperature scales the logits before sampling: the empirical first-token law matches softmax(l / T)
    T, n = 0.7, 4000
    probs = (logits[0, -1] / T).softmax(-1)
    gen = torch.Generator().manual_seed(0)
    from hooks.generation import sample_next

    draws = sample_next(logits[:1, -1].expand(n, -1), True, T, None, None, gen)
    freq = torch.bincount(draws, minlength=model.d_vocab).float() / n
    assert (freq - probs).abs().max() < 0.03


def test_tl_answer_formats_and_last_position_metric(run):
    model, ids, logits, cache = run
    clean, corrupted = ids, ids.flip(0)
    pairs = [(5, 9), (9, 5)]
    kw = dict(component="resid_pre", layers=[0, -1], positions=[-1])
    a = activation_patching(model, clean, corrupted, answers=pairs, **kw)
    b = activation_patching(model, clean, corrupted, answers=torch.tensor(pairs), **kw)
    c = activation_patching(model, clean, corrupted, answers=([5, 9], [9, 5]), **kw)
    assert torch.equal(a.values, b.values) and torch.equal(a.values, c.values)
    assert a.layers == [0, N - 1]

    def metric(lg):
        return (lg[:, -1, 5] - lg[:, -1, 9]).mean()

    fast = resolve_metric(model, metric, None, logits)
    assert isinstance(fast, LastPositionCallable)
    assert not isinstance(resolve_metric(model, lambda lg: lg[:, 0, 5].mean(), None, logits), LastPositionCallable)
    d = activation_patching(model, clean, corrupted, metric, **kw)
    e = activation_patching(model, clean, corrupted, lambda lg: metric(lg) + 0 * lg[:, 0, 0].mean(), **kw)
    assert (d.values - e.values).abs().max() <= 1e-5
    with pytest.raises(InputError, match="answers give 3 tokens for 2 prompts"):
        activation_patching(model, clean, corrupted, answers=[(5, 9)] * 3, **kw)


def test_cfg_reads_the_real_config():
    hf = tiny_hf("rope_llama3")
    cfg = HookedLlama.from_hf(hf).cfg
    assert cfg.rotary_base == hf.config.rope_parameters["rope_theta"] == 500000.0
    assert (
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_key_value_heads,
        cfg.d_head,
        cfg.d_mlp,
        cfg.d_vocab,
        cfg.n_ctx,
        cfg.act_fn,
    ) == (3, 64, 4, 4, 16, 96, 128, 64, "silu")
    assert (cfg.normalization_type, cfg.positional_embedding_type, cfg.default_prepend_bos) == ("RMS", "rotary", False)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, c: c.decompose_resid(layer=1, mode="heads"), "mode must be 'all', 'attn' or 'mlp', got 'heads'"),
        (
            lambda m, c: c.decompose_resid(mlp_input=True),
            "mlp_input=True needs a layer below n_layers (the unembed has no MLP)",
        ),
        (
            lambda m, c: m(torch.tensor([[5, 6]]), padding_side="right"),
            "padding_side='right': batches are always left-padded here; pass 'left' or None",
        ),
        (lambda m, c: m(), "no input: pass token ids, text or chat messages"),
        (lambda m, c: m.reset_hooks(direction="up"), "direction must be 'fwd', 'bwd' or 'both', got 'up'"),
        (
            lambda m, c: c["scale", 1],
            "act_name('scale', 1) needs layer_type 'ln1' or 'ln2', e.g. act_name('scale', 1, 'ln1')",
        ),
    ],
)
def test_tl_spelling_errors_are_one_line(run, call, message):
    model, ids, logits, cache = run
    with pytest.raises(Exception) as err:
        call(model, cache)
    assert str(err.value) == message


def test_analyses_take_negative_layers_and_refuse_out_of_range(run):
    from analyses import detect_heads, logit_lens
    from analyses.heads import head_ref

    model, ids, logits, cache = run
    assert head_ref(model, -1, 2).layer == N - 1
    with pytest.raises(InputError, match=r"^layer 3 is out of range"):
        head_ref(model, N, 0)
    assert detect_heads(model, layers=[-1], seq_len=4, n_seqs=2).layers == [N - 1]
    with pytest.raises(InputError, match=r"^layer 5 is out of range"):
        detect_heads(model, layers=[5], seq_len=4, n_seqs=2)
    with pytest.raises(InputError, match=r"^layer -4 is out of range"):
        logit_lens(model, ids[:1], layers=[-4])
