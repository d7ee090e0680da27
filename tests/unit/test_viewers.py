"""Attention viewers: the patterns a view holds are the cached ``hook_pattern`` of the heads asked for (across
layers, labelled L1H2), ``attends`` reads a row (from) or a column (to) of them, and the self-contained
widget carries exactly those numbers."""

import json
import re

import pytest
import torch

from analyses.viewers import AttentionPatterns, attends, attention_patterns
from hooks import HookedLlama, InputError
from tests.helpers import tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return HookedLlama.from_hf(tiny_hf("gqa", initializer_range=0.3))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))


def test_view_holds_the_cached_patterns(model, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    view = attention_patterns(model, tokens, layer=1)
    assert view.labels == ["L1H0", "L1H1", "L1H2", "L1H3"] and view.tokens == [str(i) for i in tokens[0].tolist()]
    torch.testing.assert_close(view.patterns, cache["pattern", 1][0].float(), rtol=0, atol=1e-5)
    mixed = attention_patterns(model, tokens, heads=["L2H3", (0, 1)])
    assert mixed.labels == ["L2H3", "L0H1"]
    torch.testing.assert_close(mixed.patterns[0], cache["pattern", 2][0, 3].float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed.patterns[1], cache["pattern", 0][0, 1].float(), rtol=0, atol=1e-5)
    reused = attention_patterns(model, tokens, layer=1, heads=[2], cache=cache)
    torch.testing.assert_close(reused.patterns[0], cache["pattern", 1][0, 2].float(), rtol=0, atol=0)


def test_attends_from_and_to(model, tokens):
    view = attention_patterns(model, tokens, layer=2)
    pat = view.patterns[3]
    frm = view.attends("L2H3", from_pos=-1, k=3)
    top = pat[-1].topk(3)
    assert frm.positions == top.indices.tolist() and frm.weights == pytest.approx(top.values.tolist(), abs=1e-7)
    assert frm.tokens == [view.tokens[i] for i in frm.positions] and frm.pos == 8
    to = attends(model, tokens, "L2H3", to_pos=4, k=2)
    col = pat[4:, 4].topk(2)
    assert to.positions == (col.indices + 4).tolist() and to.weights == pytest.approx(col.values.tolist(), abs=1e-7)
    assert to.rows()[0] == {"pos": to.positions[0], "token": view.tokens[to.positions[0]], "weight": to.weights[0]}
    assert frm.figure().data and view.figure().data and len(view.figure().data) == 4
    with pytest.raises(InputError, match="exactly one"):
        view.attends(0)
    with pytest.raises(InputError, match="not in this view"):
        view.attends("L1H0", from_pos=0)
    with pytest.raises(InputError, match="out of range"):
        view.attends(0, from_pos=9)
    with pytest.raises(InputError, match="layer= .*heads="):
        attention_patterns(model, tokens)


def test_widget_is_self_contained_and_carries_the_patterns(model, tokens):
    view = attention_patterns(model, tokens, layer=0, heads=[0, 2])
    html = view.to_html()
    assert "<script" in html and "src=" not in html and "http" not in html  # nothing from the network
    data = json.loads(re.search(r"const D=(\{.*?\}), root", html, re.S).group(1))
    assert data["labels"] == ["L0H0", "L0H2"] and data["tokens"] == view.tokens
    torch.testing.assert_close(torch.tensor(data["patterns"]), view.patterns, rtol=0, atol=6e-5)
    assert view._repr_html_() != html  # a fresh element id per rendering, so two views coexist on a page
    assert isinstance(view, AttentionPatterns) and view.top_rows(3)


def test_circuitsvis_view_when_installed(model, tokens):
    pytest.importorskip("circuitsvis")
    view = attention_patterns(model, tokens, heads=["L1H2"])
    rendered = view.circuitsvis()
    assert "L1H2" in rendered.local_src and "AttentionHeads" in rendered.local_src
