"""analyses.Scorer and analyses.ablation_sweep (the public API behind `scalpel ablate` / `scalpel sweep`),
checked against transformers with the unit ablated by hand in its weights."""

from __future__ import annotations

import json

import pytest
import torch

from analyses import AblationSweepResult, Scorer, ablation_sweep
from hooks import HookedLlama, InputError
from tests.helpers import IOI, build_tiny, hf_metric, skip_layer, zero_heads


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
    with pytest.raises(InputError, match=r"^prompt #0: --metric prob needs a correct answer for every prompt"):
        Scorer.build(model, "prob", ["no answers here"])
