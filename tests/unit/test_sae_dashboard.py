"""SAE feature dashboards, recomputed independently: the top contexts are top_feature_contexts', each
window's per-token values are the SAE's encoding of that document, the histogram counts every non-zero
activation of the counted tokens, the logit effects are (W_dec[f] ⊙ w_norm) @ W_U; the page and
Neuronpedia's JSON carry them, labelled "feature"."""

import json

import pytest
import torch

from analyses.saes import top_feature_contexts
from analyses.saes.dashboard import feature_dashboard, logit_effects
from hooks import HookedLlama, InputError
from tests.helpers import NAMES, build_tiny, random_sae

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = HookedLlama.from_pretrained(build_tiny(tmp_path_factory.mktemp("tiny") / "m"))
    sae = random_sae("standard", d_in=model.d_model, d_sae=16)
    texts = [f"When {a} and {b} went to the store, {b} gave a drink to {a}." for a in NAMES for b in NAMES if a != b]
    return model, sae, texts


def test_dashboard_numbers(setup):
    model, sae, texts = setup
    dash = feature_dashboard(model, sae, [3, 7], texts, k=4, context=5, context_after=2, max_tokens=32)
    top = top_feature_contexts(model, sae, [3, 7], texts, k=4, max_tokens=32)
    acts_all = []
    with torch.no_grad():
        for text in texts:
            ids = model.to_tokens(text)[:, :32]
            _, cache = model.run_with_cache(ids, names_filter=HOOK)
            acts = sae.encode(cache[HOOK][0])  # [P, d_sae]
            acts_all.append(acts[1:])  # first tokens are not counted
    acts_all = torch.cat(acts_all)
    for j, f in enumerate([3, 7]):
        card = dash.card(f)
        vals = acts_all[:, f]
        assert card.frac_nonzero == pytest.approx(float((vals > 0).double().mean()), abs=1e-12)
        assert sum(card.hist_heights) == int((vals > 0).sum())
        assert card.max_act == pytest.approx(float(vals.max()), rel=1e-5)
        assert [c["values"][c["max_index"]] for c in card.contexts] == pytest.approx(top.values[j].tolist(), rel=1e-5)
        for c in card.contexts:  # each window: the document's own encoding at those tokens
            ids = model.to_tokens(texts[c["doc"]])[:, :32]
            with torch.no_grad():
                _, cache = model.run_with_cache(ids, names_filter=HOOK)
            own = sae.encode(cache[HOOK][0])[:, f]
            lo = c["pos"] - c["max_index"]
            assert c["values"] == pytest.approx(own[lo : lo + len(c["values"])].tolist(), abs=1e-5)
            assert "".join(c["tokens"]) == model.tokenizer.decode(ids[0, lo : lo + len(c["tokens"])])
            assert c["max_index"] <= 5 and len(c["values"]) - c["max_index"] - 1 <= 2
        eff = (sae.W_dec[f].detach() * model.model.norm.weight.detach()) @ model.lm_head.weight.detach().T
        assert card.pos_values == pytest.approx(eff.topk(10).values.tolist(), abs=1e-5)
        assert card.neg_values == pytest.approx((-(-eff).topk(10).values).tolist(), abs=1e-5)
        assert card.pos_tokens[0] == model.tokenizer.decode([int(eff.argmax())])
    torch.testing.assert_close(logit_effects(model, sae, [7])[0], (sae.W_dec[7] * model.model.norm.weight) @ model.W_U)


def test_page_and_neuronpedia_layout(setup, tmp_path):
    model, sae, texts = setup
    dash = feature_dashboard(model, sae, [5], texts, k=3)
    page = dash.to_html()
    assert "feature 5" in page and "neuron" not in page.lower() and "<script" not in page and "http" not in page
    doc = dash.to_neuronpedia(model_id="tiny", sae_set="res")
    assert doc["model_id"] == "tiny" and doc["layer"] == 1 and doc["sae_set"] == "res"
    feat = doc["features"][0]
    for key in (
        "feature_index",
        "pos_str",
        "pos_values",
        "neg_str",
        "neg_values",
        "frac_nonzero",
        "freq_hist_data_bar_values",
        "freq_hist_data_bar_heights",
        "logits_hist_data_bar_values",
        "logits_hist_data_bar_heights",
        "n_prompts_total",
        "n_tokens_in_prompt",
        "dataset",
        "activations",
    ):
        assert key in feat, key
    act = feat["activations"][0]
    assert act["bin_min"] == -1 and act["bin_contains"] == -1 and len(act["tokens"]) == len(act["values"])
    assert feat["n_prompts_total"] == len(texts)
    assert dash.save(tmp_path / "f.html").read_text().startswith("<!DOCTYPE html>")
    assert json.loads(dash.save(tmp_path / "f.json", model_id="tiny").read_text())["features"][0]["feature_index"] == 5
    with pytest.raises(InputError, match=r"\.html .*\.json"):
        dash.save(tmp_path / "f.txt")
    fig = top_feature_contexts(model, sae, [5], texts, k=2).figure()
    assert fig.layout.yaxis.title.text == "feature" and list(fig.data[0].y) == ["F5"]
    with pytest.raises(InputError, match="out of range"):
        feature_dashboard(model, sae, [16], texts)
