"""TransformerLens's demo idioms run unchanged on HookedLlama and on TransformerLens 4.3's
TransformerBridge booted from the same weights; every number (≤ 1e-4 relative) and every label list
must agree.

Each ``CELLS`` entry is one notebook cell's idiom (Main_Demo, the Exploratory demo's IOI section with
logit lens, direct logit attribution, head attribution and patching, and the induction-heads
walkthrough): ``fn(model, cache, data) -> result``, run once per model on that model's own cache.
Where the two libraries differ on purpose (documented in docs/hooks.md), ``adjust`` maps
TransformerLens's answer onto ours: TransformerLens's cached-scale ``apply_ln`` leaves the norm
weight out because it expects it folded into ``W_U``; nothing is folded here, so ours multiplies it in.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

pytestmark = [pytest.mark.interop, pytest.mark.slow]

tl = pytest.importorskip("transformer_lens")
patching = pytest.importorskip("transformer_lens.patching")
from transformer_lens import utilities as utils  # noqa: E402

IOI = [
    ("When John and Mary went to the shops, John gave the bag to", " Mary", " John"),
    ("When John and Mary went to the shops, Mary gave the bag to", " John", " Mary"),
    ("When Tom and James went to the park, James gave the ball to", " Tom", " James"),
    ("When Tom and James went to the park, Tom gave the ball to", " James", " Tom"),
]


@pytest.fixture(scope="module")
def bridge(smol):
    b = tl.TransformerBridge.boot_transformers(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        hf_model=smol.to_hf(),
        tokenizer=smol.tokenizer,
        dtype=torch.float32,
        device="cpu",
    )
    b.cfg.default_prepend_bos = False
    return b.eval()


@pytest.fixture(scope="module")
def data(smol):
    torch.manual_seed(0)
    prompts = [p for p, _, _ in IOI]
    tokens = smol.to_tokens(prompts)
    assert bool((tokens != smol.tokenizer.pad_token_id).all()), "IOI prompts must have one length"
    answers = torch.tensor([[smol.to_single_token(a), smol.to_single_token(b)] for _, a, b in IOI])
    seq = 12
    rand = torch.randint(100, 20000, (1, seq))
    rep = torch.cat([torch.tensor([[smol.tokenizer.bos_token_id]]), rand, rand], dim=1)
    corrupted = tokens[[1, 0, 3, 2]]
    return dict(
        prompts=prompts,
        tokens=tokens,
        answers=answers,
        rep=rep,
        seq=seq,
        corrupted=corrupted,
        text="The Eiffel Tower is in the city of",
    )


@pytest.fixture(scope="module")
def runs(smol, bridge, data):
    """(model, cache) per library: IOI batch caches plus the induction (repeated tokens) caches."""
    out = {}
    with torch.no_grad():
        for name, model in (("ours", smol), ("tl", bridge)):
            logits, cache = model.run_with_cache(data["tokens"])
            rep_logits, rep_cache = model.run_with_cache(data["rep"], remove_batch_dim=True)
            out[name] = dict(model=model, logits=logits, cache=cache, rep_logits=rep_logits, rep_cache=rep_cache)
    return out


def _w(smol):
    return smol.model.norm.weight.detach()


# ----------------------------------------------------------------------------- the cells
def logit_diff(logits, answers, per_prompt=False):
    final = logits[:, -1]
    picked = final.gather(-1, answers.to(final.device))
    diff = picked[:, 0] - picked[:, 1]
    return diff if per_prompt else diff.mean()


def dirs(model, answers):
    d = model.tokens_to_residual_directions(answers)  # [B, 2, M]
    return d[:, 0] - d[:, 1]


def resid_to_logit_diff(model, cache, stack, answers):
    scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
    return (scaled * dirs(model, answers)).sum(-1).mean(-1)


def printed(fn):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()


def induction_scores_by_hook(model, data):
    scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    seq = data["seq"]

    def hook(pattern, hook):
        stripe = pattern.diagonal(1 - seq, dim1=-2, dim2=-1)
        scores[hook.layer()] = stripe.mean((0, -1)).detach()

    model.run_with_hooks(data["rep"], return_type=None, fwd_hooks=[(lambda name: name.endswith("hook_pattern"), hook)])
    return scores


def ablate_head_v(model, data, layer=4, head=1):
    def hook(value, hook):
        value[:, :, head, :] = 0.0
        return value

    return model.run_with_hooks(
        data["tokens"][:2], return_type="loss", fwd_hooks=[(utils.get_act_name("v", layer), hook)]
    )


def patch_resid(model, data, clean_cache, layer=8, pos=3):
    def hook(resid, hook):
        resid[:, pos] = clean_cache[hook.name][:, pos]
        return resid

    logits = model.run_with_hooks(data["corrupted"], fwd_hooks=[(utils.get_act_name("resid_pre", layer), hook)])
    return logit_diff(logits, data["answers"])


def greedy(model, data, **kwargs):
    """TransformerLens 4.3's KV-cached ``generate`` drifts on this model (it repeats one token after a
    few steps where HF and ours continue the prompt), so the bridge decodes without its cache; ours
    must give the same tokens with its KV cache and without."""
    out = model.generate(
        data["tokens"][:1],
        max_new_tokens=4,
        do_sample=False,
        stop_at_eos=False,
        verbose=False,
        use_past_kv_cache=False,
        **kwargs,
    )
    if not hasattr(model, "hook_registry"):  # the bridge
        return out
    cached = model.generate(data["tokens"][:1], max_new_tokens=4, do_sample=False, stop_at_eos=False, **kwargs)
    assert torch.equal(cached, out)
    return out


def hooks_generate(model, data):
    def zero(x, hook):
        return torch.zeros_like(x)

    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", zero)]):
        return greedy(model, data)


def permanent_hooks(model, data):
    def scale(x, hook):
        return x * 0.5

    model.add_hook("blocks.2.hook_attn_out", scale, is_permanent=True)
    model.add_hook("blocks.3.hook_attn_out", scale)
    model.reset_hooks()  # removes only the non-permanent one
    one = model(data["tokens"][:1], return_type="loss")
    model.reset_hooks(including_permanent=True)
    return torch.stack([one, model(data["tokens"][:1], return_type="loss")])


def tl_patch(model, data, cache, act, setter, rows):
    import pandas as pd

    def metric(logits):
        return logit_diff(logits, data["answers"])

    df = pd.DataFrame(
        rows, columns=["layer", "pos"] if setter is patching.layer_pos_patch_setter else ["layer", "pos", "head_index"]
    )
    return patching.generic_activation_patch(model, data["corrupted"], cache, metric, setter, act, index_df=df)


CFG_KEYS = [
    "n_layers",
    "d_model",
    "n_heads",
    "n_key_value_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "n_ctx",
    "act_fn",
    "normalization_type",
    "positional_embedding_type",
    "device",
    "dtype",
    "final_rms",
    "gated_mlp",
]

# name -> (fn(model, cache, run, data), adjust(tl_result, smol) or None)
CELLS = {
    # ---- Main_Demo
    "cfg": (lambda m, c, r, d: {k: str(getattr(m.cfg, k)) for k in CFG_KEYS}, None),
    "logits": (lambda m, c, r, d: r["logits"], None),
    "loss": (lambda m, c, r, d: m(d["tokens"], return_type="loss"), None),
    "loss_per_token": (lambda m, c, r, d: m(d["tokens"], return_type="loss", loss_per_token=True), None),
    "loss_fn": (lambda m, c, r, d: m.loss_fn(r["logits"], d["tokens"], per_token=True), None),
    "to_str_tokens": (lambda m, c, r, d: m.to_str_tokens(d["text"]), None),
    "to_str_tokens_bos": (lambda m, c, r, d: m.to_str_tokens(d["text"], prepend_bos=True), None),
    "to_tokens": (lambda m, c, r, d: m.to_tokens(d["text"]), None),
    "to_tokens_bos": (lambda m, c, r, d: m.to_tokens(d["text"], prepend_bos=True), None),
    "to_string": (lambda m, c, r, d: m.to_string(d["tokens"][0]), None),
    "to_single_token": (lambda m, c, r, d: m.to_single_token(" Mary"), None),
    "pattern_by_name": (lambda m, c, r, d: c["blocks.0.attn.hook_pattern"], None),
    "pattern_short": (lambda m, c, r, d: c["pattern", 0, "attn"], None),
    "attn_alias": (lambda m, c, r, d: c["attn", 5], None),
    "scale_3part": (lambda m, c, r, d: c["scale", 3, "ln1"], None),
    "scale_final": (lambda m, c, r, d: c["scale"], None),
    "resid_post_neg": (lambda m, c, r, d: c["resid_post", -1], None),
    "get_act_name_k6": (lambda m, c, r, d: c[utils.get_act_name("k6")], None),
    "get_act_name_q": (lambda m, c, r, d: c[utils.get_act_name("q", 2, "a")], None),
    "hook_in_alias": (lambda m, c, r, d: c["blocks.4.hook_in"], None),
    "remove_batch_dim": (lambda m, c, r, d: r["rep_cache"]["pattern", 1], None),
    "ablate_head_v": (lambda m, c, r, d: ablate_head_v(m, d), None),
    "patch_resid_hook": (lambda m, c, r, d: patch_resid(m, d, c), None),
    "permanent_hooks": (lambda m, c, r, d: permanent_hooks(m, d), None),
    "stop_at_layer": (lambda m, c, r, d: m(d["tokens"], stop_at_layer=4), None),
    "stop_at_layer_neg": (lambda m, c, r, d: m(d["tokens"][:1], stop_at_layer=-1), None),
    "W_E": (lambda m, c, r, d: m.W_E, None),
    "W_U": (lambda m, c, r, d: m.W_U, None),
    "b_U": (lambda m, c, r, d: m.b_U, None),
    "W_Q": (lambda m, c, r, d: m.W_Q, None),
    "W_K": (lambda m, c, r, d: m.blocks[3].attn.W_K, None),
    "W_V": (lambda m, c, r, d: m.blocks[3].attn.W_V, None),
    "W_O": (lambda m, c, r, d: m.W_O, None),
    "W_in": (lambda m, c, r, d: m.blocks[2].mlp.W_in, None),
    "W_gate": (lambda m, c, r, d: m.blocks[2].mlp.W_gate, None),
    "W_out": (lambda m, c, r, d: m.W_out, None),
    "OV_head": (lambda m, c, r, d: m.OV[4, 1].AB, None),
    "QK_head": (lambda m, c, r, d: m.QK[4, 1].AB, None),
    "generate_greedy": (lambda m, c, r, d: greedy(m, d), None),
    "hooks_generate": (lambda m, c, r, d: hooks_generate(m, d), None),
    "test_prompt": (lambda m, c, r, d: printed(lambda: utils.test_prompt(d["text"], "Paris", m, top_k=5)), None),
    # ---- Exploratory_Analysis_Demo: IOI
    "ioi_logit_diff": (lambda m, c, r, d: logit_diff(r["logits"], d["answers"], per_prompt=True), None),
    "residual_directions": (lambda m, c, r, d: m.tokens_to_residual_directions(d["answers"]), None),
    "final_token_residual": (lambda m, c, r, d: c["resid_post", -1][:, -1], None),
    "apply_ln_final_token": (
        lambda m, c, r, d: c.apply_ln_to_stack(c["resid_post", -1][:, -1], layer=-1, pos_slice=-1),
        lambda t, s: t * _w(s),
    ),
    "accumulated_resid_labels": (
        lambda m, c, r, d: c.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True),
        None,
    ),
    "accumulated_resid_apply_ln": (
        lambda m, c, r, d: c.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, apply_ln=True),
        None,
    ),
    "accumulated_resid_layer": (
        lambda m, c, r, d: c.accumulated_resid(layer=7, mlp_input=True, return_labels=True),
        None,
    ),
    "logit_lens": (
        lambda m, c, r, d: resid_to_logit_diff(
            m, c, c.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1), d["answers"]
        ),
        "weighted_lens",
    ),
    "decompose_resid": (lambda m, c, r, d: c.decompose_resid(layer=-1, pos_slice=-1, return_labels=True), None),
    "decompose_resid_ln": (
        lambda m, c, r, d: c.decompose_resid(layer=-1, pos_slice=-1, apply_ln=True),
        lambda t, s: t * _w(s),
    ),
    "decompose_resid_mode": (
        lambda m, c, r, d: c.decompose_resid(layer=5, mode="attn", mlp_input=True, return_labels=True),
        None,
    ),
    "per_layer_logit_diff": (
        lambda m, c, r, d: resid_to_logit_diff(m, c, c.decompose_resid(layer=-1, pos_slice=-1), d["answers"]),
        "weighted_dla",
    ),
    "stack_head_results": (lambda m, c, r, d: c.stack_head_results(layer=-1, pos_slice=-1, return_labels=True), None),
    "stack_head_remainder": (
        lambda m, c, r, d: c.stack_head_results(layer=6, pos_slice=-1, incl_remainder=True, return_labels=True),
        None,
    ),
    "per_head_logit_diff": (
        lambda m, c, r, d: resid_to_logit_diff(m, c, c.stack_head_results(layer=-1, pos_slice=-1), d["answers"]),
        "weighted_heads",
    ),
    "logit_attrs": (
        lambda m, c, r, d: c.logit_attrs(
            c.decompose_resid(layer=-1, pos_slice=-1), d["answers"][:, 0], d["answers"][:, 1], pos_slice=-1
        ),
        "weighted_attrs",
    ),
    "top_head_pattern": (lambda m, c, r, d: c["pattern", 9][:, 2], None),
    "stack_activation": (lambda m, c, r, d: c.stack_activation("pattern", layer=3), None),
    "stack_neuron_results": (lambda m, c, r, d: c.stack_neuron_results(2, pos_slice=-1, return_labels=True), None),
    "full_resid_decomposition": (
        lambda m, c, r, d: c.get_full_resid_decomposition(
            layer=-1, pos_slice=-1, expand_neurons=False, return_labels=True
        ),
        None,
    ),
    "patch_resid_pre_cells": (
        lambda m, c, r, d: tl_patch(
            m, d, c, "resid_pre", patching.layer_pos_patch_setter, [[0, 3], [10, 3], [20, 11], [29, 13]]
        ),
        None,
    ),
    "patch_head_z_cells": (
        lambda m, c, r, d: tl_patch(
            m, d, c, "z", patching.layer_pos_head_vector_patch_setter, [[9, 13, 2], [12, 13, 0], [20, 13, 5]]
        ),
        None,
    ),
    # ---- induction heads
    "induction_pattern_stripe": (
        lambda m, c, r, d: torch.stack(
            [
                r["rep_cache"]["pattern", i].diagonal(1 - d["seq"], dim1=-2, dim2=-1).mean(-1)
                for i in range(m.cfg.n_layers)
            ]
        ),
        None,
    ),
    "induction_by_hook": (lambda m, c, r, d: induction_scores_by_hook(m, d), None),
    "induction_loss": (lambda m, c, r, d: m(d["rep"], return_type="loss", loss_per_token=True), None),
    "induction_logits": (lambda m, c, r, d: r["rep_logits"], None),
}


def _adjust(kind, tl_result, smol, tl_model, tl_cache, data):
    """TransformerLens's value in our convention (the final norm weight applied)."""
    if callable(kind):
        return kind(tl_result, smol)
    w = _w(smol)
    if kind == "weighted_lens":
        stack = tl_cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
        return resid_to_logit_diff(tl_model, tl_cache, stack * w, data["answers"])
    if kind == "weighted_dla":
        stack = tl_cache.decompose_resid(layer=-1, pos_slice=-1)
        return resid_to_logit_diff(tl_model, tl_cache, stack * w, data["answers"])
    if kind == "weighted_heads":
        stack = tl_cache.stack_head_results(layer=-1, pos_slice=-1)
        return resid_to_logit_diff(tl_model, tl_cache, stack * w, data["answers"])
    if kind == "weighted_attrs":
        stack = tl_cache.decompose_resid(layer=-1, pos_slice=-1)
        return tl_cache.logit_attrs(stack * w, data["answers"][:, 0], data["answers"][:, 1], pos_slice=-1)
    raise AssertionError(kind)


def assert_same(ours, theirs, where: str, rel: float = 1e-4) -> int:
    """Compare nested results; returns how many numbers/labels were compared."""
    if isinstance(theirs, tuple) and len(theirs) == 2 and isinstance(theirs[1], list):
        assert isinstance(ours, tuple), where
        assert ours[1] == theirs[1], f"{where}: labels differ"
        return assert_same(ours[0], theirs[0], where) + len(theirs[1])
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), where
        assert ours.shape == theirs.shape, f"{where}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
        if not theirs.is_floating_point():
            assert torch.equal(ours.cpu(), theirs.cpu()), f"{where}: {ours.tolist()} != {theirs.tolist()}"
            return theirs.numel()
        ours, theirs = ours.detach().float().cpu(), theirs.detach().float().cpu()
        scale = max(1.0, theirs.abs().max().item()) if theirs.numel() else 1.0
        err = (ours - theirs).abs().max().item() if theirs.numel() else 0.0
        assert err <= rel * scale, f"{where}: max |diff| {err:.3g} on values up to {scale:.3g}"
        return theirs.numel()
    assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"
    return 1


def test_at_least_forty_cells():
    assert len(CELLS) >= 40


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_matches_transformer_lens(name, smol, runs, data):
    fn, adjust = CELLS[name]
    results = {}
    with torch.no_grad():
        for lib in ("ours", "tl"):
            r = runs[lib]
            results[lib] = fn(r["model"], r["cache"], r, data)
    theirs = results["tl"]
    if adjust is not None:
        with torch.no_grad():
            theirs = _adjust(adjust, theirs, smol, runs["tl"]["model"], runs["tl"]["cache"], data)
    assert assert_same(results["ours"], theirs, name) > 0
