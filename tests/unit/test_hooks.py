"""Hook points: every documented name exists with its shape; hooks patch, compose and clean up."""

import pytest
import torch

import hooks.model as hm
from hooks import HookedLlama, HookError, InputError, act_name
from tests.helpers import FAMILY_VARIANTS, tiny_hf

B, P = 2, 7


@pytest.fixture
def ids():
    return torch.randint(3, 128, (B, P), generator=torch.Generator().manual_seed(0))


def expected_shapes(m: HookedLlama, i: int) -> dict[str, tuple]:
    H, G, D, M, F, V = m.n_heads, m.n_kv_heads, m.d_head, m.d_model, m.d_mlp, m.d_vocab
    per_layer = {
        "hook_resid_pre": (B, P, M),
        "hook_resid_mid": (B, P, M),
        "hook_resid_post": (B, P, M),
        "ln1.hook_scale": (B, P, 1),
        "ln1.hook_normalized": (B, P, M),
        "ln2.hook_scale": (B, P, 1),
        "ln2.hook_normalized": (B, P, M),
        "attn.hook_q": (B, P, H, D),
        "attn.hook_k": (B, P, G, D),
        "attn.hook_v": (B, P, G, D),
        "attn.hook_rot_q": (B, P, H, D),
        "attn.hook_rot_k": (B, P, G, D),
        "attn.hook_attn_scores": (B, H, P, P),
        "attn.hook_pattern": (B, H, P, P),
        "attn.hook_z": (B, P, H, D),
        "attn.hook_result": (B, P, H, M),
        "hook_attn_out": (B, P, M),
        "hook_mlp_out": (B, P, M),
        "mlp.hook_pre": (B, P, F),
        "mlp.hook_gate": (B, P, F),
        "mlp.hook_pre_linear": (B, P, F),
        "mlp.hook_post": (B, P, F),
    }
    if m.model.layers[i].self_attn.q_norm is not None:  # Qwen3's per-head q/k RMSNorm
        per_layer.update(
            {
                "attn.q_ln.hook_scale": (B, P, H, 1),
                "attn.q_ln.hook_normalized": (B, P, H, D),
                "attn.k_ln.hook_scale": (B, P, G, 1),
                "attn.k_ln.hook_normalized": (B, P, G, D),
            }
        )
    shapes = {f"blocks.{i}.{k}": v for k, v in per_layer.items()}
    shapes.update(
        {
            "hook_embed": (B, P, M),
            "ln_final.hook_scale": (B, P, 1),
            "ln_final.hook_normalized": (B, P, M),
            "hook_logits": (B, P, V),
        }
    )
    return shapes


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "head_dim"] + FAMILY_VARIANTS)
def test_every_documented_hook_exists_with_its_shape(variant, ids):
    m = HookedLlama.from_hf(tiny_hf(variant))
    _, cache = m.run_with_cache(ids, names_filter=lambda n: True)
    expected = {}
    for i in range(m.n_layers):
        expected.update(expected_shapes(m, i))
    assert set(m.hook_names()) == set(expected)
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name


@pytest.mark.parametrize("variant", ["gqa"] + FAMILY_VARIANTS)
def test_hook_values_equal_hf_hidden_states_and_attentions(variant, ids):
    hf = tiny_hf(variant)
    hf.config._attn_implementation = "eager"
    m = HookedLlama.from_hf(hf)
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True, output_attentions=True)
        _, cache = m.run_with_cache(ids)
    assert (cache["hook_embed"] - out.hidden_states[0]).abs().max() == 0
    for i in range(m.n_layers - 1):  # HF's last hidden state is after the final norm
        assert (cache["resid_post", i] - out.hidden_states[i + 1]).abs().max() <= 1e-6
    for i in range(m.n_layers):
        assert (cache["pattern", i] - out.attentions[i]).abs().max() <= 1e-6
        # the pattern shows the sliding window: query p sees keys p - window < k <= p only
        window = m.model.layers[i].self_attn.sliding_window or P
        q, k = torch.arange(P)[:, None], torch.arange(P)[None, :]
        assert (cache["pattern", i][..., (k > q) | (k <= q - window)] == 0).all()
        assert (cache["pattern", i][..., (k <= q) & (k > q - window)] > 0).all()
    assert (cache["ln_final_normalized"] * m.model.norm.weight - out.hidden_states[-1]).abs().max() <= 1e-5


def test_act_name():
    assert act_name("pattern", 5) == "blocks.5.attn.hook_pattern"
    assert act_name("resid_pre", 0) == "blocks.0.hook_resid_pre"
    assert act_name("post", 2) == "blocks.2.mlp.hook_post"
    assert act_name("embed") == "hook_embed"
    with pytest.raises(HookError, match="closest: pattern"):
        act_name("patern", 1)


def test_qk_norm_hooks_are_qwen3s_norms(ids):
    hf = tiny_hf("qwen3")
    m = HookedLlama.from_hf(hf)
    _, cache = m.run_with_cache(ids)
    for i, layer in enumerate(hf.model.layers):
        for name, norm in (("q", layer.self_attn.q_norm), ("k", layer.self_attn.k_norm)):
            x = cache[f"blocks.{i}.attn.hook_{name}"]  # the projection, [B, P, heads, D]
            scale = (x.pow(2).mean(-1, keepdim=True) + hf.config.rms_norm_eps).sqrt()
            assert torch.allclose(cache[f"blocks.{i}.attn.{name}_ln.hook_scale"], scale, atol=1e-6)
            normalized = cache[f"blocks.{i}.attn.{name}_ln.hook_normalized"]
            assert torch.allclose(normalized, x / scale, atol=1e-6)
            with torch.no_grad():
                assert (normalized * norm.weight - norm(x)).abs().max() <= 1e-6  # HF's own module
    # editing the normalised keys changes the output (the hook is live, not a copy)
    changed = m.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.k_ln.hook_normalized", lambda t, h: t * 0)])
    assert (changed - m(ids)).abs().max() > 1e-3


def test_rmsnorm_hooks_are_the_maths(tiny, ids):
    _, cache = tiny.run_with_cache(ids)
    x = cache["resid_pre", 1]
    scale = (x.pow(2).mean(-1, keepdim=True) + tiny.config.rms_norm_eps).sqrt()
    assert torch.allclose(cache["ln1_scale", 1], scale, atol=1e-6)
    assert torch.allclose(cache["ln1_normalized", 1], x / scale, atol=1e-6)


def test_rope_hooks_rotate_pairs_by_position(tiny, ids):
    _, cache = tiny.run_with_cache(ids)
    q, rq = cache["q", 0], cache["rot_q", 0]
    assert torch.allclose(q[:, 0], rq[:, 0], atol=1e-6)  # position 0: identity rotation
    assert torch.allclose(q.norm(dim=-1), rq.norm(dim=-1), atol=1e-5)  # rotations keep norms
    assert not torch.allclose(q[:, 1:], rq[:, 1:], atol=1e-3)


def test_zeroing_head_in_pattern_equals_zeroing_it_in_z(tiny, ids):
    def zero_pattern(t, hook):
        t[:, 1] = 0

    def zero_z(t, hook):
        t[:, :, 1] = 0

    a = tiny.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_pattern", zero_pattern)])
    b = tiny.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", zero_z)])
    base = tiny(ids)
    assert (a - b).abs().max() <= 1e-5
    assert (a - base).abs().max() > 1e-3


def test_zeroing_neuron_equals_zeroing_down_proj_column(tiny, ids):
    def zero(t, hook):
        t[..., 5] = 0

    hooked = tiny.run_with_hooks(ids, fwd_hooks=[("blocks.2.mlp.hook_post", zero)])
    with torch.no_grad():
        tiny.model.layers[2].mlp.down_proj.weight[:, 5] = 0
    assert (tiny(ids) - hooked).abs().max() <= 1e-5


def test_head_results_sum_to_attn_out():
    m = HookedLlama.from_hf(tiny_hf("bias"))
    ids = torch.randint(3, 128, (B, P))
    _, cache = m.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_result", "hook_attn_out", "hook_z")))
    for i in range(m.n_layers):
        total = cache["result", i].sum(2) + m.model.layers[i].self_attn.o_proj.bias
        assert (total - cache["attn_out", i]).abs().max() <= 1e-5
        assert (cache.head_results(i) - cache["result", i]).abs().max() <= 1e-5


def test_patching_works_at_every_hook_point(tiny, ids):
    base = tiny(ids)
    for name in tiny.hook_names():
        if name in ("hook_logits",):
            continue
        out = tiny.run_with_hooks(
            ids, fwd_hooks=[(name, lambda t, hook: t * 1.5 if "scale" not in hook.name else t * 2)]
        )
        assert (out - base).abs().max() > 1e-6, f"patching {name} had no effect"


def test_hook_sees_name_layer_and_positions(tiny, ids):
    seen = {}

    def spy(t, hook):
        seen["name"], seen["layer"], seen["positions"] = hook.name, hook.layer, hook.positions.clone()

    tiny.run_with_hooks(ids, fwd_hooks=[("blocks.2.attn.hook_z", spy)])
    assert seen["name"] == "blocks.2.attn.hook_z" and seen["layer"] == 2 and seen["layer"]() == 2
    assert seen["positions"].tolist() == [list(range(P))] * B


def test_predicate_and_list_filters(tiny, ids):
    _, cache = tiny.run_with_cache(ids, names_filter=["blocks.0.hook_resid_pre", "hook_logits"])
    assert set(cache) == {"blocks.0.hook_resid_pre", "hook_logits"}
    _, cache = tiny.run_with_cache(ids, names_filter=lambda n: n.endswith("resid_post"))
    assert len(cache) == tiny.n_layers


def test_cache_device_and_dtype(tiny, ids):
    _, cache = tiny.run_with_cache(ids, names_filter="blocks.0.hook_resid_pre", dtype=torch.float16, device="cpu")
    assert cache["resid_pre", 0].dtype == torch.float16


def test_backward_hooks_see_gradients(tiny, ids):
    grads = {}

    def save(g, hook):
        grads[hook.name] = g.clone()

    x = tiny.model.embed_tokens.weight
    with tiny.hooks(bwd_hooks=[("blocks.1.hook_resid_mid", save)]):
        loss = tiny(ids, return_type="loss")
        loss.backward()
    assert grads["blocks.1.hook_resid_mid"].shape == (B, P, tiny.d_model)
    assert grads["blocks.1.hook_resid_mid"].abs().sum() > 0
    # the gradient a bwd hook sees equals autograd's gradient w.r.t. that activation
    store = {}

    def keep(t, hook):
        t.retain_grad()
        store["t"] = t

    tiny.zero_grad()
    tiny.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_mid", keep)], return_type="loss").backward()
    assert torch.allclose(store["t"].grad, grads["blocks.1.hook_resid_mid"], atol=1e-7)
    assert x.grad is not None


# ---------------------------------------------------------------- errors and hygiene
def _n_hooks(m):
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in m.hook_dict.values())


def test_unknown_name_lists_closest(tiny):
    with pytest.raises(HookError, match="closest valid names: blocks.1.attn.hook_pattern"):
        tiny.add_hook("blocks.1.attn.hook_patern", lambda t, h: None)
    with pytest.raises(HookError, match="layer 9 does not exist"):
        tiny.add_hook("blocks.9.hook_resid_pre", lambda t, h: None)
    with pytest.raises(HookError, match="matched no hook point"):
        tiny.run_with_cache(torch.tensor([[5, 6]]), names_filter=lambda n: "nothing" in n)


def test_wrong_shape_or_dtype_names_hook_and_shapes(tiny, ids):
    with pytest.raises(
        HookError,
        match=r"blocks.0.attn.hook_z returned shape \(2, 7, 4\) but the hook point has "
        r"shape \(2, 7, 4, 16\)",
    ):
        tiny.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", lambda t, h: t[..., 0])])
    with pytest.raises(HookError, match="returned dtype torch.float16"):
        tiny.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, h: t.half())])
    assert _n_hooks(tiny) == 0


def test_hooks_removed_after_exception_in_hook(tiny, ids):
    def boom(t, hook):
        raise ValueError("bad hook")

    with pytest.raises(ValueError, match="bad hook") as info:
        tiny.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_pre", boom)])
    assert any("blocks.1.hook_resid_pre" in note for note in info.value.__notes__)
    assert _n_hooks(tiny) == 0


def test_hooks_removed_after_exception_in_with_body(tiny, ids):
    with pytest.raises(KeyboardInterrupt):
        with tiny.hooks(
            fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, h: t)],
            bwd_hooks=[("blocks.0.hook_resid_pre", lambda g, h: g)],
        ):
            assert _n_hooks(tiny) == 2
            raise KeyboardInterrupt
    assert _n_hooks(tiny) == 0


def test_cache_hooks_removed_after_failure(tiny, ids):
    with pytest.raises(InputError):
        tiny.run_with_cache(torch.tensor([[5, 999]]))
    assert _n_hooks(tiny) == 0


def test_add_hook_handle_and_reset(tiny, ids):
    base = tiny(ids)
    h = tiny.add_hook("blocks.0.hook_resid_pre", lambda t, hook: t * 0)
    assert (tiny(ids) - base).abs().max() > 0
    h.remove()
    assert (tiny(ids) - base).abs().max() == 0
    tiny.add_hook(lambda n: n.endswith("hook_z"), lambda t, hook: t * 0)
    assert _n_hooks(tiny) == tiny.n_layers
    tiny.reset_hooks()
    assert _n_hooks(tiny) == 0


def test_backward_hook_inert_after_context(tiny, ids):
    calls = []
    with tiny.hooks(bwd_hooks=[("blocks.0.hook_resid_pre", lambda g, h: calls.append(1))]):
        loss = tiny(ids, return_type="loss")
    loss.backward()  # the context ended before backward: the hook must not run
    assert calls == []


# ---------------------------------------------------------------- SDPA / eager selection
def test_residual_only_cache_never_materialises_a_pattern(tiny, ids, monkeypatch):
    calls = []
    real = hm.eager_attention
    monkeypatch.setattr(hm, "eager_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    tiny.run_with_cache(ids, names_filter=lambda n: "resid" in n)
    tiny(ids)
    assert calls == []
    tiny.run_with_cache(ids, names_filter="blocks.1.attn.hook_pattern")
    assert len(calls) == 1  # only the hooked layer takes the eager path


def test_result_computed_only_when_hooked(tiny, ids, monkeypatch):
    calls = []
    real = torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    tiny.run_with_cache(ids)  # everything but hook_result
    assert calls == []
    tiny.run_with_cache(ids, names_filter="blocks.0.attn.hook_result")
    assert len(calls) == 1


def test_check_finite_names_the_hook_point(tiny, ids):
    from hooks import NonFiniteError

    tiny.check_finite = True
    try:
        with pytest.raises(NonFiniteError, match=r"blocks.1.hook_attn_out \(after its hooks ran\)"):
            tiny.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_attn_out", lambda t, h: t * float("nan"))])
        with torch.no_grad():
            tiny.model.layers[2].mlp.up_proj.weight[0, 0] = float("inf")
        with pytest.raises(NonFiniteError, match="blocks.2.mlp.hook_pre_linear;"):
            tiny(ids)
    finally:
        tiny.check_finite = False


def test_start_and_stop_at_layer_split_the_forward(tiny, ids):
    _, cache = tiny.run_with_cache(ids, names_filter=lambda n: "resid" in n)  # SDPA path, like the plain forward
    mid = tiny(ids, stop_at_layer=2)
    assert torch.equal(mid, cache["resid_pre", 2])
    final = tiny(ids, stop_at_layer=tiny.n_layers)
    assert torch.equal(final, cache["resid_post", tiny.n_layers - 1])
    assert (tiny(mid, start_at_layer=2) - tiny(ids)).abs().max() <= 1e-6
    with pytest.raises(InputError, match="stop_at_layer=4 is out of range"):
        tiny(ids, stop_at_layer=4)
