"""Every result object: JSON-serialisable to_dict, rows / to_frame, a plotly figure that serialises to
self-contained HTML, and a notebook display."""

import json

import pytest
import torch

import analyses
from analyses.metrics import LogitDiff
from analyses.plotting import unique_labels
from analyses.results import jsonable
from hooks import HookedLlama
from tests.helpers import IOI_CLEAN, IOI_CORRUPT, tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def results():
    model = HookedLlama.from_hf(tiny_hf("gqa", initializer_range=0.1))
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 128, (2, 8), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(3, 128, (2,), generator=g)
    metric = LogitDiff(torch.tensor([5, 6]), torch.tensor([7, 8]))
    out = {
        "resid": analyses.activation_patching(model, clean, corrupted, metric),
        "heads_pos": analyses.activation_patching(model, clean, corrupted, metric, component="z"),
        "kv": analyses.activation_patching(model, clean, corrupted, metric, component="v", per_position=False),
        "layer_only": analyses.activation_patching(
            model, clean, corrupted, metric, component="mlp_out", per_position=False
        ),
        "attribution": analyses.attribution_patching(model, clean, corrupted, metric),
        "path": analyses.path_patching(model, clean, corrupted, metric, receivers=["L2H1"]),
        "dla": analyses.direct_logit_attribution(model, clean, torch.tensor([5, 6]), torch.tensor([7, 8])),
        "lens": analyses.logit_lens(model, clean[:1], targets=[5]),
        "detect": analyses.detect_heads(model, seq_len=5, n_seqs=2),
        "neurons": analyses.top_activating(model, 1, [0, 1], corpus=list(clean), k=3),
        "steer": analyses.steering_direction(model, clean, corrupted, 1, all_layers=True),
        "steer_single": analyses.steering_direction(model, clean, corrupted, 1),
    }
    return out


@pytest.mark.parametrize(
    "name",
    [
        "resid",
        "heads_pos",
        "kv",
        "layer_only",
        "attribution",
        "path",
        "dla",
        "lens",
        "detect",
        "neurons",
        "steer",
        "steer_single",
    ],
)
def test_result_surface(results, name):
    res = results[name]
    d = res.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON: no NaN / inf
    assert len(text) > 50
    rows = res.rows()
    assert isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)
    json.dumps(jsonable(rows), allow_nan=False)
    frame = res.to_frame()
    assert len(frame) == len(rows)
    fig = res.figure()
    html = fig.to_html(include_plotlyjs=True)
    assert "<html>" in html and "plotly" in html.lower() and len(html) > 1_000_000  # plotly.js inlined
    assert "<table>" in res._repr_html_()


def test_rows_carry_gqa_addressing(results):
    rows = results["heads_pos"].rows()
    assert {"layer", "pos", "head", "kv_group", "value", "effect", "normalized"} <= set(rows[0])
    assert all(r["kv_group"] == r["head"] // 2 for r in rows)
    kv_rows = results["kv"].rows()
    assert kv_rows[1]["kv_head"] == 1 and kv_rows[1]["query_heads"] == [2, 3]
    top = results["heads_pos"].top_rows(3)
    assert abs(top[0]["effect"]) >= abs(top[-1]["effect"])


def test_figure_axes_are_labelled(results):
    fig = results["heads_pos"].figure()
    assert fig.layout.xaxis.title.text == "position" and len(fig.data[0].y) == 3 * 4
    fig = results["resid"].figure(normalize=False)
    assert list(fig.data[0].y) == ["L0", "L1", "L2"] and "effect" in fig.layout.title.text
    assert unique_labels(["a", "a", "b"])[0] != unique_labels(["a", "a", "b"])[1]


@pytest.mark.slow
def test_real_model_position_labels_show_tokens(smol):
    res = analyses.activation_patching(
        smol, IOI_CLEAN, IOI_CORRUPT, answers=(" Mary", " John"), component="attn_out", layers=[20, 21]
    )
    fig = res.figure()
    assert "9: ' John'" in list(fig.data[0].x)
    assert res.rows()[9]["token"] == " John"
