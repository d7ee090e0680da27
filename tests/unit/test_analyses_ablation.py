"""analyses.Scorer, analyses.measure_ablation and analyses.ablation_sweep (the public API behind `scalpel
ablate` / `scalpel sweep`), checked against transformers with the unit ablated by hand in its weights."""

from __future__ import annotations

import json
import re

import pytest
import torch

from analyses import AblationResult, AblationSweepResult, Scorer, ablation_sweep, measure_ablation
from hooks import HookedLlama, InputError
from tests.helpers import IOI, build_tiny, hf_metric, skip_layer, zero_heads, zero_neurons


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    from transformers import AutoTokenizer, LlamaForCausalLM

    return (
        HookedLlama.from_pretrained(str(path)).eval(),
        LlamaForCausalLM.from_pretrained(path).eval(),
        AutoTokenizer.from_pretrained(path),
    )


def test_scorer_values_equal_transformers(tiny, one_thread):
    model, hf, tok = tiny
    for metric in ("loss", "logit-diff", "prob"):
        scorer = Scorer.build(model, metric, IOI)
        got = scorer.evaluate(model, batch_size=2)["values"]  # padded batches of two
        assert got.tolist() == pytest.approx([hf_metric(hf, tok, p, c, i, metric) for p, c, i in IOI], abs=1e-4)


@pytest.mark.parametrize("metric", ["loss", "logit-diff"])
def test_head_sweep_equals_one_head_zeroed_in_transformers(tiny, metric, one_thread):
    model, hf, tok = tiny
    scorer = Scorer.build(model, metric, [p for p, _, _ in IOI], answers=[" Mary", " John"])
    calls = []
    res = ablation_sweep(
        model,
        scorer,
        "heads",
        layers=[0, 2],
        batch_size=8,
        progress=lambda total: (calls.append(total), lambda n: calls.append(n))[1],
    )
    assert isinstance(res, AblationSweepResult) and res.effects.shape == (2 * model.n_heads, len(IOI))
    chunks = -(-len(IOI) // 8)  # prompts per pass: at most the 8 rows
    assert calls[0] == len(res.units) * chunks and sum(calls[1:]) == calls[0]
    base = [hf_metric(hf, tok, p, " Mary", " John", metric) for p, _, _ in IOI]
    for u, (layer, head) in enumerate(res.units):
        edited = zero_heads(hf, layer, [head])
        expect = [hf_metric(edited, tok, p, " Mary", " John", metric) - b for (p, _, _), b in zip(IOI, base)]
        assert res.effects[u].tolist() == pytest.approx(expect, abs=1e-4), res.label((layer, head))


def test_layer_sweep_result_object(tiny, one_thread):
    model, hf, tok = tiny
    scorer = Scorer.build(model, "prob", IOI)
    res = ablation_sweep(model, scorer, "layers")
    assert res.ablation == "remove" and [res.label(u) for u in res.units] == ["0", "1", "2"]
    base = [hf_metric(hf, tok, p, c, i, "prob") for p, c, i in IOI]
    for u, (layer, _) in enumerate(res.units):
        expect = [hf_metric(skip_layer(hf, layer), tok, p, c, i, "prob") - b for (p, c, i), b in zip(IOI, base)]
        assert res.effects[u].tolist() == pytest.approx(expect, abs=1e-5)
    rows = res.rows()
    assert [abs(r["mean_effect"]) for r in rows] == sorted((abs(r["mean_effect"]) for r in rows), reverse=True)
    assert rows[0]["mean_effect"] == pytest.approx(float(res.effects[res.ranking()[0]].double().mean()))
    doc = json.loads(json.dumps(res.to_dict()))
    assert doc["units"] == rows and doc["base"] == pytest.approx(base, abs=1e-5)
    assert res.figure().data[0].type == "bar"
    heads = ablation_sweep(model, scorer, "heads", layers=[1])
    assert heads.figure().data[0].type == "heatmap"


def test_sweep_input_errors(tiny):
    model, _, _ = tiny
    scorer = Scorer.build(model, "loss", [p for p, _, _ in IOI])
    with pytest.raises(InputError, match=r"^mean ablation applies to heads only$"):
        ablation_sweep(model, scorer, "neurons", layers=[0], means={0: torch.zeros(4, 16)})
    with pytest.raises(InputError, match=r"^layer 7 is out of range; the model has 3 layers \(0\.\.2\)$"):
        ablation_sweep(model, scorer, "heads", layers=[7])
    with pytest.raises(InputError, match=r"^means has no entry for layer 2; compute them for every swept layer$"):
        ablation_sweep(model, scorer, "heads", layers=[2], means={0: torch.zeros(4, 16)})
    with pytest.raises(InputError, match=r"^unknown component 'attention'; use heads, neurons or layers$"):
        ablation_sweep(model, scorer, "attention")
    with pytest.raises(InputError, match=r"^prompt #0: metric='prob' needs a correct answer for every prompt"):
        Scorer.build(model, "prob", ["no answers here"])


@pytest.mark.parametrize("metric", ["logit-diff", "prob", "loss"])
def test_measure_ablation_equals_transformers_with_the_units_zeroed_by_hand(tiny, metric, one_thread):
    import surgery

    model, hf, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = surgery.ablation_plan(model, heads="1.0,2.1", neurons=[(0, 5)])
    labels, seen = [], []

    def progress(label, n):
        labels.append((label, n))
        return lambda k: None

    res = measure_ablation(
        model, plan, IOI, metric, batch_size=2, progress=progress, while_applied=lambda m: seen.append(m.n_layers) or 7
    )
    by_hand = zero_neurons(zero_heads(zero_heads(hf, 1, [0]), 2, [1]), 0, [5])
    base = [hf_metric(hf, tok, p, c, i, metric) for p, c, i in IOI]
    edited = [hf_metric(by_hand, tok, p, c, i, metric) for p, c, i in IOI]
    assert isinstance(res, AblationResult) and res.metric == metric
    assert res.base["values"].tolist() == pytest.approx(base, abs=1e-4)
    assert res.edited["values"].tolist() == pytest.approx(edited, abs=1e-4)
    assert res.effects.tolist() == pytest.approx([e - b for e, b in zip(edited, base)], abs=1e-4)
    assert res.mean["effect"] == pytest.approx(sum(edited) / len(IOI) - sum(base) / len(IOI), abs=1e-4)
    assert labels == [("edited", 3), ("base", 3)]  # the edited state first, while the plan is applied once
    assert seen == [model.n_layers] and res.while_applied == 7
    assert [e["edit"] for e in res.to_dict()["edits"]["edits"]] == ["ZeroHeads", "ZeroHeads", "ZeroNeurons"]
    rows = res.rows()
    assert [r["prompt"] for r in rows] == [p for p, _, _ in IOI] and len(res.figure().data) == 2
    if metric == "logit-diff":
        assert rows[0]["edited"] == pytest.approx(rows[0]["edited_correct_logit"] - rows[0]["edited_incorrect_logit"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored exactly


def test_measure_ablation_applies_a_list_of_edits_and_refuses_before_measuring(tiny):
    import surgery

    model, hf, tok = tiny
    res = measure_ablation(model, [surgery.RemoveLayers([2])], IOI, "prob")
    expect = [hf_metric(skip_layer(hf, 2), tok, p, c, i, "prob") for p, c, i in IOI]
    assert res.edited["values"].tolist() == pytest.approx(expect, abs=1e-4)
    calls = []
    with pytest.raises(surgery.EditError, match="head 9 is out of range"):
        measure_ablation(model, [surgery.ZeroHeads(1, [9])], IOI, "prob", progress=lambda *a: calls.append(a))
    assert calls == []  # refused before any measurement
    with pytest.raises(InputError, match=r"^edits must be an edit plan, an edit or a list of edits"):
        measure_ablation(model, "19.2", IOI, "prob")
    with pytest.raises(InputError, match=r"^batch_size must be a positive integer, got 0$"):
        measure_ablation(model, [surgery.ZeroHeads(1, [0])], IOI, "prob", batch_size=0)


def test_ablation_plan_checks_every_unit_with_the_one_range_check(tiny):
    import surgery
    from hooks.errors import RangeError

    model, _, _ = tiny
    plan = surgery.ablation_plan(model, heads=["2.1", (1, 0), "L1H3"], neurons="0:5,0:7", layers=2)
    assert [e.to_dict() for e in plan] == [
        {"edit": "ZeroHeads", "layer": 1, "heads": [0, 3]},
        {"edit": "ZeroHeads", "layer": 2, "heads": [1]},
        {"edit": "ZeroNeurons", "layer": 0, "neurons": [5, 7]},
        {"edit": "RemoveLayers", "layers": [2]},
    ]
    for kwargs, message in [
        ({"heads": "1.9"}, "heads 1.9: head 9 is out of range; the layer has 4 heads (0..3)"),
        ({"heads": "7.0"}, "heads 7.0: layer 7 is out of range; the model has 3 layers (0..2)"),
        ({"neurons": "1:96"}, "neurons 1:96: neuron 96 is out of range; the layer has 96 neurons (0..95)"),
        ({"layers": "0,5"}, "layer 5 is out of range; the model has 3 layers (0..2)"),
    ]:
        with pytest.raises(RangeError, match=f"^{re.escape(message)}$") as err:
            surgery.ablation_plan(model, **kwargs)
        assert err.value.param == next(iter(kwargs))
        assert isinstance(err.value, InputError) and isinstance(err.value, surgery.EditError)
    with pytest.raises(InputError, match="nothing to ablate"):
        surgery.ablation_plan(model)
    with pytest.raises(InputError, match=r"^mean=True needs texts"):
        surgery.ablation_plan(model, heads="1.0", mean=True)
