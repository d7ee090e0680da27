"""Every edit is exact: weights-edited logits equal the ``as_hooks()`` run-time intervention's, on tiny
random Llamas (MHA, GQA, tied embeddings, pre-existing biases). Records round-trip; ``applied()``
restores the exact model; bad input is a one-line error before any weight changes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import surgery as S
from hooks import HookedLlama, ScalpelError
from hooks import config as hooks_config
from surgery.export import export_config, export_state
from tests.helpers import EDIT_NAMES, TOL, assert_same, make_edit, random_ids, snapshot, tiny_hf, write_adapter

VARIANTS = ["mha", "gqa", "tied", "bias", "mistral", "qwen2", "qwen3", "qwen3_window"]
# weight forms that need a bias the family's own class cannot carry (their hook forms still run)
NEEDS_BIAS = {"MeanAblateHeads": ("mistral", "qwen2"), "AddSteering": ("mistral", "qwen2", "qwen3", "qwen3_window")}


def model_for(variant: str) -> HookedLlama:
    return HookedLlama.from_hf(tiny_hf(variant))


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", EDIT_NAMES)
def test_weights_equal_hooks(name, variant, tmp_path):
    model = model_for(variant)
    edit = make_edit(name, model, tmp_path)
    x = random_ids()
    with torch.no_grad():
        base = model(x)
        hooked = model.run_with_hooks(x, fwd_hooks=edit.as_hooks(model))
        assert (hooked - base).abs().max() > 1e-3  # the edit really does something
        snap = snapshot(model)
        if variant in NEEDS_BIAS.get(name, ()):
            with pytest.raises(S.EditError, match="cannot carry.*as_hooks") as err:
                edit.apply(model)
            assert hooks_config.family_class_name(model.config) in str(err.value) and "\n" not in str(err.value)
            assert_same(model, snap)
            return
        with edit.applied(model):
            weights = model(x)
            # the edited weights are a valid checkpoint of the family's own class: strict load, same logits
            config = export_config(model)
            fresh = hooks_config.causal_lm_class(config)(config).eval()
            state = export_state(model, config)
            fresh.load_state_dict(state, strict=not config.tie_word_embeddings)
            assert (fresh(x).logits - weights).abs().max() <= TOL
        assert_same(model, snap)
    assert (weights - hooked).abs().max() <= TOL


@pytest.mark.parametrize("name", EDIT_NAMES)
def test_record_round_trip(name, tmp_path):
    model = model_for("gqa")
    edit = make_edit(name, model, tmp_path)
    edit.apply(model) if name == "MergeLora" else None  # fills adapter_sha256
    record = edit.to_dict()
    again = S.Edit.from_dict(json.loads(json.dumps(record)))
    assert again == edit and type(again) is type(edit)
    assert again.to_dict() == record
    assert type(edit).from_dict(record) == edit
    # a round-tripped edit gives bit-identical weights
    a, b = model_for("gqa"), model_for("gqa")
    edit.apply(a)
    again.apply(b)
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_snake_case_kinds_and_unknown_fields():
    assert S.Edit.from_dict({"edit": "zero_heads", "layer": 1, "heads": [2]}) == S.ZeroHeads(1, [2])
    with pytest.raises(S.EditError, match="unknown edit kind 'ZeroHead'.*closest: ZeroHeads"):
        S.Edit.from_dict({"edit": "ZeroHead", "layer": 1, "heads": [2]})
    with pytest.raises(S.EditError, match="unknown field.*head\\b"):
        S.Edit.from_dict({"edit": "ZeroHeads", "layer": 1, "head": [2]})
    with pytest.raises(S.EditError, match="missing field.*heads"):
        S.Edit.from_dict({"edit": "ZeroHeads", "layer": 1})


def test_float32_vectors_round_trip_bit_exactly():
    v = torch.randn(64) * 1e-3
    e = S.AddSteering(0, v, scale=1 / 3)
    again = S.Edit.from_dict(json.loads(json.dumps(e.to_dict())))
    assert torch.equal(again.vector, v) and again.scale == e.scale


# --------------------------------------------------------------------------- plans
def test_plan_weights_equal_hooks_with_renumbering(tmp_path):
    """Later edits address layers as RemoveLayers left them; plan hooks map them back."""
    model = model_for("gqa")
    g = torch.Generator().manual_seed(3)
    plan = S.EditPlan(
        [
            make_edit("ScaleNeurons", model, tmp_path),  # layer 2, neurons 3, 4
            S.ZeroHeads(1, [0]),
            make_edit("MeanAblateHeads", model, tmp_path),
            make_edit("MergeLora", model, tmp_path),
            S.RemoveLayers([0]),
            S.Orthogonalize(torch.randn(64, generator=g)),
            S.AddSteering(1, torch.randn(64, generator=g)),  # original layer 2
            S.RankOneEdit(1, torch.randn(96, generator=g), torch.randn(64, generator=g)),  # original layer 2
            S.ScaleHeads(0, [3], -1.0),  # original layer 1, after MeanAblate and MergeLora on it
            S.ZeroNeurons(1, [3]),  # original layer 2: acts on the rank-one update too
        ]
    )
    x = random_ids()
    with torch.no_grad():
        hooked = model.run_with_hooks(x, fwd_hooks=plan.as_hooks(model))
        snap = snapshot(model)
        with plan.applied(model):
            assert model.n_layers == 2 and model.hook_names()[1].startswith("blocks.0.")
            assert "blocks.2.hook_resid_pre" not in model.hook_names()
            weights = model(x)
        assert_same(model, snap)
    assert (weights - hooked).abs().max() <= TOL


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_plan_file_round_trip(tmp_path, suffix):
    model = model_for("gqa")
    plan = S.EditPlan(
        [make_edit(n, model, tmp_path) for n in EDIT_NAMES if n != "RemoveLayers"] + [S.RemoveLayers([0])]
    )
    path = S.save_plan(plan, tmp_path / f"plan{suffix}")
    again = S.load_plan(path)
    assert again == plan and len(again) == len(plan)
    a, b = model_for("gqa"), model_for("gqa")
    S.apply_plan(a, plan)
    S.apply_plan(b, path)
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert a.n_layers == 2 and a.config.num_hidden_layers == 2


def test_plan_file_relative_adapter_path(tmp_path):
    model = model_for("gqa")
    write_adapter(tmp_path / "plans" / "my_adapter", model)
    (tmp_path / "plans" / "p.yaml").write_text("edits:\n  - edit: merge_lora\n    adapter_dir: my_adapter\n")
    plan = S.load_plan(tmp_path / "plans" / "p.yaml")
    plan.apply(model)
    assert model.edit_history[0]["adapter_sha256"]


def test_plan_is_all_or_nothing():
    model = model_for("gqa")
    snap = snapshot(model)
    plan = S.EditPlan([S.RemoveLayers([0]), S.AddSteering(0, torch.ones(64)), S.ZeroHeads(2, [0])])
    with pytest.raises(S.EditError, match=r"^edit #3: ZeroHeads: layer 2 is out of range; the model has 2 layers"):
        plan.apply(model)
    assert_same(model, snap)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not valid JSON"),
        ('{"format": "something-else", "edits": []}', "not an edit plan"),
        ('{"edits": [{"edit": "ZeroHeads", "layer": 0}]}', "edit #1: ZeroHeads: missing field"),
        ('{"edits": [{"edit": "Nope"}]}', "unknown edit kind"),
    ],
)
def test_bad_plan_files(tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(S.PlanError, match=message) as info:
        S.load_plan(path)
    assert "\n" not in str(info.value)


def test_applied_restores_after_an_exception():
    model = model_for("tied")
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with S.EditPlan(
            [S.Orthogonalize(torch.ones(64)), S.MeanAblateHeads(0, [1], torch.ones(1, 16)), S.RemoveLayers([2])]
        ).applied(model):
            assert model.config.attention_bias and not model.config.tie_word_embeddings
            raise RuntimeError("boom")
    assert_same(model, snap)
    assert model.model.layers[0].self_attn.o_proj.bias is None


def test_apply_records_history_and_sets_config_flags():
    model = model_for("mha")
    S.MeanAblateHeads(0, [1], torch.ones(1, 16)).apply(model)
    S.AddSteering(2, torch.ones(64)).apply(model)
    S.RemoveLayers([1]).apply(model)
    c = model.config
    assert c.attention_bias and c.mlp_bias and c.num_hidden_layers == 2
    for layer in model.model.layers:  # every module a flag governs has a bias
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert getattr(layer.self_attn, m).bias is not None
        for m in ("gate_proj", "up_proj", "down_proj"):
            assert getattr(layer.mlp, m).bias is not None
    assert [h["edit"] for h in model.edit_history] == ["MeanAblateHeads", "AddSteering", "RemoveLayers"]
    assert model.hook_names()[-3].startswith("ln_final") and "blocks.1.hook_resid_post" in model.hook_names()


# --------------------------------------------------------------------------- maths of individual edits
def test_zero_kv_groups_covers_every_reading_head():
    model = model_for("gqa")  # 4 heads, 2 groups: group 1 is read by heads 2 and 3
    e = S.ZeroKVGroups(0, [1])
    assert e.heads(model) == [2, 3]
    x = random_ids()
    with torch.no_grad(), e.applied(model):
        a = model(x)
    with torch.no_grad(), S.ZeroHeads(0, [2, 3]).applied(model):
        b = model(x)
    assert (a - b).abs().max() <= TOL


def test_mean_activations_is_the_token_mean_of_hook_z():
    model = model_for("gqa")
    prompts = [random_ids(batch=1, seq=6, seed=1)[0], random_ids(batch=1, seq=9, seed=2)[0]]
    means = S.mean_activations(model, prompts, layers=[1])
    zs = [model.run_with_cache(p, names_filter=["blocks.1.attn.hook_z"])[1]["blocks.1.attn.hook_z"][0] for p in prompts]
    expected = torch.cat(zs).mean(0)
    assert set(means) == {1} and means[1].shape == (4, 16)
    assert (means[1] - expected).abs().max() <= 1e-6


def test_mean_ablation_outputs_the_mean():
    model = model_for("gqa")
    e = S.MeanAblateHeads(0, [1], torch.randn(1, 16))
    with torch.no_grad(), e.applied(model):
        _, cache = model.run_with_cache(random_ids(), names_filter=["blocks.0.hook_attn_out", "blocks.0.attn.hook_z"])
        o = model.model.layers[0].self_attn.o_proj
        z = cache["blocks.0.attn.hook_z"].clone()
        z[:, :, 1] = 0
        want = o(z.flatten(-2))
    assert (cache["blocks.0.hook_attn_out"] - want).abs().max() <= 1e-6


def test_rank_one_edit_maps_key_to_value():
    model = model_for("gqa")
    cov = S.key_covariance(model, 2, [random_ids(batch=1, seq=40, seed=s)[0] for s in range(4)])
    assert cov.shape == (96, 96) and torch.allclose(cov, cov.T)
    delta = torch.randn(64)
    edit = S.RankOneEdit.compute(
        model, 2, [random_ids(batch=1, seed=11)[0], random_ids(batch=1, seed=12)[0]], delta, covariance=cov
    )
    w0 = model.model.layers[2].mlp.down_proj.weight.detach().clone()
    assert torch.allclose(edit.value, w0 @ edit.key + delta, atol=1e-5)
    with torch.no_grad(), edit.applied(model):
        w = model.model.layers[2].mlp.down_proj.weight
        assert (w @ edit.key - edit.value).abs().max() <= 1e-5  # W' k* = v*
        update = (w - w0).double()
    s = torch.linalg.svdvals(update)
    assert s[1] <= 1e-4 * s[0]  # rank one
    identity = S.RankOneEdit(2, edit.key, edit.value)  # C = I: the minimum-norm update
    with torch.no_grad(), identity.applied(model):
        w = model.model.layers[2].mlp.down_proj.weight
        assert (w @ edit.key - edit.value).abs().max() <= 1e-5
        assert (w - w0).double().norm() <= update.norm() + 1e-6


def test_orthogonalize_removes_the_direction_from_the_residual_stream():
    model = model_for("tied")
    d = torch.randn(64)
    unit = d / d.norm()
    names = ["hook_embed"] + [f"blocks.{i}.hook_{k}_out" for i in range(3) for k in ("attn", "mlp")]
    with torch.no_grad(), S.Orthogonalize(d).applied(model):
        _, cache = model.run_with_cache(random_ids(), names_filter=names)
        post = model.run_with_cache(random_ids(), names_filter=["blocks.2.hook_resid_post"])[1][
            "blocks.2.hook_resid_post"
        ]
        assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied: lm_head unchanged
        assert not model.config.tie_word_embeddings
    for n in names:
        assert (cache[n] @ unit).abs().max() <= 1e-5, n
    assert (post @ unit).abs().max() <= 1e-4
    assert model.lm_head.weight is model.model.embed_tokens.weight  # re-tied on exit


def test_steering_adds_the_vector():
    model = model_for("gqa")
    v = torch.randn(64)
    with torch.no_grad():
        before = model.run_with_cache(random_ids(), names_filter=["blocks.1.hook_mlp_out"])[1]["blocks.1.hook_mlp_out"]
        with S.AddSteering(1, v, scale=3.0).applied(model):
            after = model.run_with_cache(random_ids(), names_filter=["blocks.1.hook_mlp_out"])[1][
                "blocks.1.hook_mlp_out"
            ]
    assert (after - before - 3.0 * v).abs().max() <= 1e-5


def test_remove_layers_hooks_make_identity_layers():
    model = model_for("gqa")
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    with torch.no_grad():
        _, cache = model.run_with_cache(random_ids(), names_filter=names, fwd_hooks=S.RemoveLayers([1]).as_hooks(model))
    assert torch.equal(cache[names[0]], cache[names[1]])


# --------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("rslora", [False, True])
def test_merge_lora_matches_peft_merge_and_unload(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    hf = tiny_hf("gqa", seed=2)
    lora_cfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        use_rslora=rslora,
    )
    peft_model = peft.get_peft_model(tiny_hf("gqa", seed=2), lora_cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = peft_model.merge_and_unload().eval()
    model = HookedLlama.from_hf(hf)
    edit = S.MergeLora(str(tmp_path / "adapter"))
    x = random_ids()
    with torch.no_grad():
        want = reference(x).logits
        hooked = model.run_with_hooks(x, fwd_hooks=edit.as_hooks(model))
        with edit.applied(model):
            got = model(x)
            for name, p in reference.state_dict().items():
                assert (model.state_dict()[name] - p).abs().max() <= 1e-6, name
    assert (got - want).abs().max() <= TOL
    assert (hooked - want).abs().max() <= TOL


def test_merge_lora_scale_and_lm_head(tmp_path):
    model = model_for("tied")
    path = write_adapter(tmp_path / "a", model, targets=("up_proj",), layers=[0])
    g = torch.Generator().manual_seed(1)
    from safetensors.torch import load_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, 64, generator=g)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.randn(128, 4, generator=g) * 0.1
    save_file(tensors, str(path / "adapter_model.safetensors"))
    edit = S.MergeLora(str(path), scale=0.5)
    x = random_ids()
    with torch.no_grad():
        hooked = model.run_with_hooks(x, fwd_hooks=edit.as_hooks(model))
        with edit.applied(model):
            got = model(x)
            assert model.lm_head.weight is not model.model.embed_tokens.weight
            a, b = tensors["base_model.model.lm_head.lora_A.weight"], tensors["base_model.model.lm_head.lora_B.weight"]
            emb = model.model.embed_tokens.weight
            assert (model.lm_head.weight - emb - 0.5 * 2.0 * b @ a).abs().max() <= 1e-6
    assert (got - hooked).abs().max() <= TOL


# --------------------------------------------------------------------------- bad input
BAD = {
    "layer out of range": (
        lambda m, p: S.ZeroHeads(3, [0]),
        "ZeroHeads: layer 3 is out of range; the model has 3 layers",
    ),
    "negative layer": (lambda m, p: S.ZeroNeurons(-1, [0]), "layer -1 is out of range"),
    "head out of range": (lambda m, p: S.ZeroHeads(0, [4]), "ZeroHeads: head 4 is out of range; the layer has 4 heads"),
    "kv group out of range": (lambda m, p: S.ZeroKVGroups(0, [2]), "group 2 is out of range"),
    "neuron out of range": (lambda m, p: S.ZeroNeurons(1, [96]), "neuron 96 is out of range; the layer has 96 neurons"),
    "scale neuron out of range": (lambda m, p: S.ScaleNeurons(1, [100], 2.0), "neuron 100 is out of range"),
    "direction of the wrong size": (
        lambda m, p: S.Orthogonalize(torch.ones(63)),
        "Orthogonalize: direction has size 63 but the model's d_model",
    ),
    "steering of the wrong size": (lambda m, p: S.AddSteering(0, torch.ones(65)), "vector has size 65"),
    "means of the wrong size": (lambda m, p: S.MeanAblateHeads(0, [1], torch.ones(1, 8)), "means has size 8"),
    "rank-one key of the wrong size": (
        lambda m, p: S.RankOneEdit(0, torch.ones(64), torch.ones(64)),
        "key has size 64",
    ),
    "orthogonalize layer out of range": (
        lambda m, p: S.Orthogonalize(torch.ones(64), layers=[5]),
        "layer 5 is out of range",
    ),
    "remove every layer": (lambda m, p: S.RemoveLayers([0, 1, 2]), "removing all 3 layers"),
    "adapter for another base (shapes)": (
        lambda m, p: S.MergeLora(
            str(write_adapter(p / "a", m, targets=("q_proj",), shape_override={"q_proj": (64, 32)}))
        ),
        "adapter for another base model: model.layers.0.self_attn.q_proj lora_B@lora_A is \\(64, 32\\) but the model's weight is \\(64, 64\\)",
    ),
    "adapter for another base (layers)": (
        lambda m, p: S.MergeLora(
            str(write_adapter(p / "a", HookedLlama.from_hf(tiny_hf("gqa", num_hidden_layers=5)), targets=("q_proj",)))
        ),
        "adapter for another base model: it targets model.layers.3.self_attn.q_proj but the model has 3 layers",
    ),
    "adapter for another base (name)": (
        lambda m, p: S.MergeLora(str(write_adapter(p / "a", m, base="meta-llama/Llama-3.2-1B"))),
        "the adapter was trained on 'meta-llama/Llama-3.2-1B' but the model is 'HuggingFaceTB/SmolLM2-135M'",
    ),
    "adapter rank mismatch": (
        lambda m, p: S.MergeLora(str(_set_config(write_adapter(p / "a", m), r=8))),
        "rank mismatch at model.layers.0.mlp.down_proj: lora_A \\(4, 96\\), lora_B \\(64, 4\\), but the adapter config says r=8",
    ),
    "adapter dir missing": (lambda m, p: S.MergeLora(str(p / "nope")), "adapter directory .* does not exist"),
    "DoRA adapter": (lambda m, p: S.MergeLora(str(_set_config(write_adapter(p / "a", m), use_dora=True))), "uses DoRA"),
}


def _set_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_one_line_error_and_changes_nothing(case, tmp_path):
    model = model_for("gqa")
    model.source = "HuggingFaceTB/SmolLM2-135M"
    snap = snapshot(model)
    make, message = BAD[case]
    with pytest.raises(ScalpelError, match=message) as info:
        make(model, tmp_path).apply(model)
    assert isinstance(info.value, S.EditError)
    assert "\n" not in str(info.value)
    with pytest.raises(ScalpelError):
        make(model, tmp_path / "again").as_hooks(model)
    assert_same(model, snap)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: S.AddSteering(0, [0.0] * 10 + [math.nan] + [0.0] * 53),
            "AddSteering: vector holds a non-finite value \\(nan\\) at index 10",
        ),
        (lambda: S.Orthogonalize([math.inf] * 64), "direction holds a non-finite value"),
        (lambda: S.Orthogonalize(torch.zeros(64)), "zero vector"),
        (lambda: S.ScaleHeads(0, [1], math.nan), "factor is nan"),
        (lambda: S.ZeroHeads(0, []), "heads is empty"),
        (lambda: S.ZeroHeads(0, [1, 1]), "lists \\[1\\] more than once"),
        (lambda: S.ZeroHeads(0.5, [1]), "layer must be an integer"),
        (lambda: S.ZeroHeads(True, [1]), "layer must be an integer"),
        (lambda: S.MeanAblateHeads(0, [1, 2], torch.ones(1, 16)), "means has 1 rows but 2 heads"),
        (lambda: S.RankOneEdit(0, torch.zeros(96), torch.ones(64)), "uᵀk\\* is zero"),
        (lambda: S.Orthogonalize(torch.ones(64), layers="some"), "layers must be 'all' or a list"),
    ],
)
def test_bad_values_are_refused_at_construction(make, message):
    with pytest.raises(S.EditError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_base_mismatch_override(tmp_path):
    model = model_for("gqa")
    model.source = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    same = write_adapter(tmp_path / "same", model, base="HuggingFaceTB/SmolLM2-135M-Instruct")
    S.MergeLora(str(same)).validate(model)  # same model name, different spelling: accepted
    other = write_adapter(tmp_path / "other", model, base="meta-llama/Llama-3.2-1B")
    with pytest.raises(S.AdapterError, match="allow_base_mismatch=True"):
        S.MergeLora(str(other)).validate(model)
    S.MergeLora(str(other), allow_base_mismatch=True).apply(model)


def test_changed_adapter_is_refused_on_replay(tmp_path):
    model = model_for("gqa")
    path = write_adapter(tmp_path / "a", model)
    edit = S.MergeLora(str(path))
    record = edit.apply(model) and edit.to_dict()
    write_adapter(path, model, seed=5)  # overwritten with other weights
    with pytest.raises(S.AdapterError, match="the adapter changed since the plan was written"):
        S.Edit.from_dict(record).apply(model_for("gqa"))


def test_layer_removal_keeps_the_model_in_eval_mode(tiny):
    """A layer list rebuilt by RemoveLayers (applied, restored) keeps the model's eval mode, so tools
    that refuse training mode anywhere (TransformerLens's patching) accept the model afterwards."""
    import surgery as S

    assert not any(m.training for m in tiny.modules())
    with S.RemoveLayers([1]).applied(tiny):
        assert not any(m.training for m in tiny.modules())
    assert not any(m.training for m in tiny.modules()) and tiny.n_layers == 3


# --------------------------------------------------------------------------- finite in, finite out
OVERFLOWS = {  # parameters whose weight form is not finite in float32; neither edit checks these itself
    "RankOneEdit": (
        lambda m: S.RankOneEdit(1, torch.full((96,), 1e-3), torch.full((64,), 3e38)),
        "value / key / c_inv_key",
    ),
    "Abliterate": (
        lambda m: S.Abliterate(torch.ones(64), attn_weights={0: 1e4}, strength=1e38),
        "strength / attn_weights / mlp_weights",
    ),
}


@pytest.mark.parametrize("name", list(OVERFLOWS))
def test_an_edit_that_would_write_inf_is_refused_and_changes_nothing(name, tmp_path):
    """The base class checks every tensor an edit wrote (apply, applied and as_hooks alike): a NaN or inf
    where the weights were finite restores the model bit-exactly and is one EditError naming the tensor."""
    model = model_for("mha")
    snap = snapshot(model)
    make, fields = OVERFLOWS[name]
    edit = make(model)
    for use in (edit.apply, edit.as_hooks, lambda m: edit.applied(m).__enter__()):
        with pytest.raises(
            S.EditError, match=rf"^{name}: the edit would write a non-finite value \((-?inf|nan)\) into "
        ) as info:
            use(model)
        assert f"use smaller {fields}; nothing was changed" in str(info.value) and "\n" not in str(info.value)
        assert info.value.param == edit.magnitudes[0]
        assert_same(model, snap)
    assert model.edit_journals == []


def test_the_finiteness_check_is_the_base_class_s():
    """An edit kind written without any check of its own gets the guarantee too (it is Edit.apply's)."""
    from dataclasses import dataclass

    from surgery import _state

    @dataclass(eq=False, repr=False)
    class _Blowup(S.Edit):
        layer: int = 0

        def _apply(self, model) -> None:
            _state.writable(model, model.model.layers[0].mlp.up_proj.weight)[0, 0] = 1.0  # finite
            _state.writable(model, model.model.layers[self.layer].mlp.down_proj.weight)[3, 2] = math.inf

        def _hooks(self, model):
            return []

    model = model_for("gqa")
    snap = snapshot(model)
    message = r"^_Blowup: the edit would write a non-finite value \(inf\) into model\.layers\.1\.mlp\.down_proj\.weight \(float32\); use smaller values"
    with pytest.raises(S.EditError, match=message):
        _Blowup(1).apply(model)
    assert_same(model, snap)
    with pytest.raises(S.EditError, match="^edit #2: " + message[1:]):
        S.EditPlan([S.ZeroHeads(0, [1]), _Blowup(1)]).apply(model)
    assert_same(model, snap)
    del S.edits.EDIT_KINDS["_Blowup"], S.edits.EDIT_KINDS["__blowup"]
