"""TransformerLens spellings on a tiny random Llama: every helper taking a layer accepts every valid
value, negative ones included, and equals a naive recomputation from the cache; out-of-range values
are one-line errors. Also permanent hooks, sampling, answer formats and the last-position metric."""

from __future__ import annotations

import pytest
import torch

from analyses import activation_patching
from analyses.metrics import LastPositionCallable, resolve_metric
from hooks import HookedLlama, InputError, act_name
from tests.helpers import build_tiny, tiny_hf

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
    # stack_head_results with remainder sums to the same stream (at layer 0, TransformerLens's whole-model case:
    # the last block's resid_post); heads equal z @ W_O per head
    heads, labels = cache.stack_head_results(layer, return_labels=True, incl_remainder=True)
    assert len(labels) == b * model.n_heads + 1 and labels[-1] == "remainder"
    assert (heads.sum(0) - (target if b else cache["resid_post", N - 1])).abs().max() <= 1e-5
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
            lambda m, c: m(torch.tensor([[5, 6]]), padding_side="middle"),
            "padding_side must be 'left' or 'right', got 'middle'",
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


# --------------------------------------------------------------------------- what TransformerLens code does to a model
@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    """A tiny GQA Llama with a byte-level BPE tokenizer (" Mary", " John" are single tokens)."""
    return HookedLlama.from_pretrained(str(build_tiny(tmp_path_factory.mktemp("tl") / "tiny")))


def test_remove_batch_dim_is_in_place(run):
    model, ids, logits, cache = run
    with torch.no_grad():
        _, one = model.run_with_cache(ids[:1])
    full = dict(one.store)
    assert one.remove_batch_dim() is one and not one.has_batch_dim  # in place, as TransformerLens
    assert all(torch.equal(one.store[k], v[0]) for k, v in full.items())
    with pytest.warns(UserWarning, match="no batch dimension any more"):
        assert one.remove_batch_dim() is one
    with pytest.raises(AssertionError) as err:  # TransformerLens's class too
        cache.remove_batch_dim()
    assert str(err.value) == (
        "remove_batch_dim needs batch size 1, hook_embed has 2; run one prompt, or pick one with "
        "apply_slice_to_batch_dim(i)"
    )
    assert cache.has_batch_dim
    picked = cache.apply_slice_to_batch_dim(1)
    assert not picked.has_batch_dim and torch.equal(picked["resid_post", 1], cache["resid_post", 1][1])


def test_weight_edits_write_through_to_the_model():
    """In-place edits of TransformerLens's weight views (per block, stacked, assigned) change the model
    exactly as the same edit of the transformers weights changes transformers' logits."""
    hf = tiny_hf("bias")
    ref = tiny_hf("bias")  # the same seed: the same weights, edited by hand below
    model = HookedLlama.from_hf(hf)
    H, D, M = model.n_heads, model.d_head, model.d_model
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    new_o = torch.randn(H, D, M, generator=torch.Generator().manual_seed(2)) * 0.1
    with torch.no_grad():
        model.blocks[1].attn.W_O[2] = 0
        model.W_Q.mul_(2)
        model.blocks[0].mlp.W_out[:, 5] = 0
        model.W_in[1, 3, 7] += 1.0
        model.blocks[2].attn.W_O = new_o
        model.blocks[0].attn.b_Q[1] += 0.5
        r = ref.model.layers
        r[1].self_attn.o_proj.weight[:, 2 * D : 3 * D] = 0
        for layer in r:
            layer.self_attn.q_proj.weight.mul_(2)
        r[0].mlp.down_proj.weight[5, :] = 0  # W_out is [d_mlp, d_model]: [:, 5] is residual direction 5
        r[1].mlp.up_proj.weight[7, 3] += 1.0
        r[2].self_attn.o_proj.weight.copy_(new_o.permute(2, 0, 1).reshape(M, H * D))
        r[0].self_attn.q_proj.bias[D : 2 * D] += 0.5
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-5
        assert torch.equal(model.W_O[2], new_o)


def test_edits_the_model_cannot_hold_are_refused():
    model = HookedLlama.from_hf(tiny_hf("gqa"))  # no biases
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.blocks[0].attn.b_O[:] = 0  # zeros are what it holds: fine
        with pytest.raises(InputError, match=r"^blocks\[1\] has no self_attn.o_proj bias, so b_O is always zero"):
            model.b_O[1] += 1.0
        with pytest.raises(InputError, match="^lm_head has no bias, so b_U is always zero"):
            model.b_U += 1.0
        with pytest.raises(InputError, match=r"^W_O has shape \[4, 16, 64\]; got a value of shape \[3\]"):
            model.blocks[0].attn.W_O = torch.zeros(3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_right_padding_when_asked(tok_model):
    model = tok_model
    prompts = ["When Mary", "When Mary and John went to the store"]
    with torch.no_grad():
        alone = [model(p)[0] for p in prompts]
        tokens = model.to_tokens(prompts, padding_side="right")
        mask = model.tokenize(prompts, padding_side="right")[1]
        assert bool(mask[0, 0]) and not bool(mask[0, -1])  # real tokens first
        right = model(prompts, padding_side="right")
        for i, a in enumerate(alone):
            assert (right[i, : a.shape[0]] - a).abs().max() <= 1e-5
        assert torch.equal(model.to_tokens(prompts)[0, -alone[0].shape[0] :], tokens[0, : alone[0].shape[0]])
        side = model.tokenizer.padding_side
        assert side == "left"  # the model set the tokenizer it took to its default
        try:  # TransformerLens code sets the tokenizer's side after loading: it gets what it asked for
            model.tokenizer.padding_side = "left" if side == "right" else "right"
            assert model.cfg.default_padding_side == model.tokenizer.padding_side
            assert torch.equal(
                model.to_tokens(prompts), model.to_tokens(prompts, padding_side=model.tokenizer.padding_side)
            )
            greedy = model.generate(prompts, max_new_tokens=3)  # generate pads on the left whatever the setting
        finally:
            model.tokenizer.padding_side = side
        assert greedy == [model.generate(p, max_new_tokens=3) for p in prompts]


def test_logit_attrs_takes_per_prompt_answers_and_refuses_a_normalised_stack(tok_model):
    model = tok_model
    prompts = ["When Mary and John went to the store, John gave a drink to"] * 2
    good, bad = [" Mary", " John"], [" John", " Mary"]
    ids_good = torch.tensor([model.to_single_token(t) for t in good])
    ids_bad = torch.tensor([model.to_single_token(t) for t in bad])
    with torch.no_grad():
        logits, cache = model.run_with_cache(prompts)
    stack = cache.decompose_resid(pos_slice=-1)  # [C, B, M]
    by_text = cache.logit_attrs(stack, tokens=good, incorrect_tokens=bad, pos_slice=-1)
    by_ids = cache.logit_attrs(stack, tokens=ids_good, incorrect_tokens=ids_bad, pos_slice=-1)
    assert torch.equal(by_text, by_ids)
    # independently: the components through the final norm (cached scale, weight) onto W_U rows sum to the logit diff
    W_U, w = model.lm_head.weight, model.model.norm.weight
    manual = (stack / cache["ln_final.hook_scale"][:, -1] * w * (W_U[ids_good] - W_U[ids_bad])).sum(-1)
    assert (by_text - manual).abs().max() <= 1e-5
    want = logits[torch.arange(2), -1, ids_good] - logits[torch.arange(2), -1, ids_bad]
    assert (by_text.sum(0) - want).abs().max() <= 1e-4
    # the double-normalisation trap: a normalised stack (or a view of one) is refused, has_ln=True reads it
    normed = cache.accumulated_resid(pos_slice=-1, apply_ln=True, recompute_ln=False)
    for wrong in (normed, normed[-1:]):
        with pytest.raises(InputError, match="^residual_stack is normalised already"):
            cache.logit_attrs(wrong, tokens=good, incorrect_tokens=bad, pos_slice=-1)
    raw = cache.accumulated_resid(pos_slice=-1)
    assert torch.allclose(
        cache.logit_attrs(normed, tokens=good, incorrect_tokens=bad, has_ln=True),
        cache.logit_attrs(raw, tokens=good, incorrect_tokens=bad, pos_slice=-1),
        atol=1e-5,
    )
    with pytest.raises(InputError) as err:
        cache.logit_attrs(stack, tokens=good * 2, pos_slice=-1)
    assert str(err.value) == "one answer per prompt needs 2 answers for this stack [7, 2, 64]; got answers of shape [4]"


def test_run_with_cache_pos_slice_and_incl_bwd(run):
    model, ids, logits, cache = run
    with torch.no_grad():
        _, last = model.run_with_cache(ids, pos_slice=-1)
    assert torch.equal(last["resid_post", 1], cache["resid_post", 1][:, -1:])  # an int keeps the dim
    assert torch.equal(last["pattern", 0], cache["pattern", 0][:, :, -1:])  # the query positions
    seen = {}
    loss = model.run_with_hooks(
        ids, return_type="loss", fwd_hooks=[("blocks.1.hook_resid_post", lambda t, hook: seen.update(t=t))]
    )
    want = torch.autograd.grad(loss, seen["t"])[0]
    loss2, grads = model.run_with_cache(ids, return_type="loss", incl_bwd=True, names_filter=lambda n: "resid" in n)
    assert torch.equal(loss2, loss.detach()) or (loss2 - loss).abs() <= 1e-6
    assert (grads["blocks.1.hook_resid_post_grad"] - want).abs().max() <= 1e-6
    assert (grads["blocks.1.hook_out_grad"] - want).abs().max() <= 1e-6  # TransformerLens's alias spelling
    assert all(not p.has_hooks() for p in model.hook_points())
    with pytest.raises(InputError, match="^incl_bwd=True calls backward"):
        model.run_with_cache(ids, incl_bwd=True)


def test_caching_hooks_and_hook_point_api(run):
    model, ids, logits, cache = run
    store, fwd, bwd = model.get_caching_hooks(lambda n: n.endswith("hook_out"))
    assert bwd == []
    with torch.no_grad(), model.hooks(fwd_hooks=fwd):
        model(ids)
    # keyed by the spelling asked for (SDPA here, eager attention in the cached run: equal within rounding)
    assert (store["blocks.1.hook_out"] - cache["resid_post", 1]).abs().max() <= 1e-5
    order = []
    point = model.hook_dict["blocks.0.hook_resid_pre"]
    point.add_hook(lambda t, hook: order.append("a"), dir="fwd")
    point.add_hook(lambda t, hook: order.append("b"), dir="fwd", prepend=True)
    model.add_perma_hook("blocks.0.hook_resid_pre", lambda t, hook: order.append("p"))
    assert point.has_hooks(dir="fwd") and not point.has_hooks(dir="bwd")
    with torch.no_grad():
        model(ids)
    assert order == ["b", "a", "p"]
    model.remove_all_hook_fns()
    assert point.has_hooks() and not point.has_hooks(including_permanent=False)
    model.reset_hooks(including_permanent=True)
    assert not point.has_hooks()
    # a backward hook returning (grad,) as TransformerLens's do
    x = model.hook_embed
    with model.hooks(bwd_hooks=[("hook_embed", lambda g, hook: (g * 0,))]):
        emb = {}
        out = model.run_with_hooks(ids, fwd_hooks=[("hook_embed", lambda t, hook: emb.update(t=t))])
        assert torch.equal(torch.autograd.grad(out.sum(), emb["t"])[0], torch.zeros_like(emb["t"]))
    assert not x.has_hooks()


def test_model_level_helpers(tok_model):
    model = HookedLlama.from_hf(tiny_hf("bias"))
    layers = model.model.layers
    want = layers[0].self_attn.o_proj.bias + layers[0].mlp.down_proj.bias + layers[1].self_attn.o_proj.bias
    assert (model.accumulated_bias(1, mlp_input=True) - want).abs().max() <= 1e-6
    assert torch.equal(model.accumulated_bias(0), torch.zeros(model.d_model))
    scores = model.all_composition_scores("Q")
    assert scores.shape == (N, model.n_heads, N, model.n_heads)
    assert torch.equal(scores[1, :, 0], torch.zeros_like(scores[1, :, 0]))  # only earlier -> later layers
    G = model.n_heads // model.n_kv_heads
    for l1, h1, l2, h2 in ((0, 1, 2, 3), (1, 0, 2, 2)):  # brute force: ||L R|| / (||L|| ||R||)
        left = model.W_V[l1, h1 // G] @ model.W_O[l1, h1]
        right = model.W_Q[l2, h2] @ model.W_K[l2, h2 // G].T
        ref = torch.linalg.norm(left @ right) / (torch.linalg.norm(left) * torch.linalg.norm(right))
        assert abs(scores[l1, h1, l2, h2] - ref) <= 1e-4 * ref
    assert model.all_head_labels[:2] == model.all_head_labels()[:2] == ["L0H0", "L0H1"]
    tok = tok_model
    resid, tokens, none, mask = tok.input_to_embed("When Mary and John")
    assert none is None and mask is None and torch.equal(resid, tok.W_E[tokens])
    assert torch.equal(tok(resid, start_at_layer=0), tok(tokens))
    john = tok.to_single_token(" John")
    text = "When Mary and John went, John gave"
    assert tok.get_token_position(" John", text) == tok.to_str_tokens(text).index(" John")
    assert tok.get_token_position(john, text, mode="last") == len(tok.to_str_tokens(text)) - 2
    with pytest.raises(AssertionError) as err:  # TransformerLens's class, and its message first
        tok.get_token_position(" John", "When Mary")
    assert str(err.value) == "The token does not occur in the prompt (token 293; check prepend_bos)"
    assert tok.to_str_tokens(tokens[0].numpy()) == tok.to_str_tokens(tokens)
    long = "When Mary and John went to the store. " * 40
    assert tok.to_tokens(long).shape[1] == tok.config.max_position_embeddings  # truncated to the context
    assert tok.to_tokens(long, truncate=False).shape[1] > tok.config.max_position_embeddings
    with pytest.warns(UserWarning, match="forward ignores the generation arguments max_new_tokens"):
        assert torch.equal(tok(tokens, max_new_tokens=3), tok(tokens))


def test_generate_takes_the_positions_the_mask_implies(tok_model):
    model = tok_model
    tokens, mask = model.tokenize(["When Mary", "When Mary and John went"])
    implied = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.generate(tokens, max_new_tokens=2, attention_mask=mask, position_ids=implied)
    assert torch.equal(out, model.generate(tokens, max_new_tokens=2, attention_mask=mask))
    with pytest.raises(InputError, match="^generate counts each row's positions from its first real token"):
        model.generate(tokens, max_new_tokens=2, attention_mask=mask, position_ids=implied + 1)
