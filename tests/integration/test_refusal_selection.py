"""Choosing the refusal direction's layer by what ablating it does (Arditi et al.), on the default model:
the best-separated layer (29) changes nothing, layer 16 removes most refusals within the KL guard, and the
selection's numbers equal an independent recomputation with the direction projected out of the weights
(surgery.Orthogonalize) instead of the residual stream."""

from __future__ import annotations

import pytest
import torch

import surgery
from analyses.divergence import kl_rows
from analyses.refusal import chat_tokens, load_prompts, refusal_directions, refusal_rate, select_direction

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def selection(smol):
    torch.set_num_threads(2)
    dirs = refusal_directions(smol, load_prompts("harmful:train"), load_prompts("harmless:train"))
    harmful, harmless = load_prompts("harmful:eval")[:16], load_prompts("harmless:eval")[:16]
    return dirs, select_direction(smol, dirs, harmful, harmless, layers=[16, 29]), harmful, harmless


def test_separation_is_not_efficacy(selection):
    dirs, sel, _, _ = selection
    assert dirs.best_layer() == 29
    rows = {r["layer"]: r for r in sel.rows()}
    assert sel.baseline >= 10 and rows[29]["refusals"] >= sel.baseline - 1  # the best-separated layer: nothing
    assert rows[16]["refusals"] <= 4 and rows[16]["kl"] <= sel.kl_max and sel.chosen == 16
    assert torch.equal(sel.direction, dirs.directions[16]) and sel.figure().data


def test_selection_numbers_equal_the_weight_edit(smol, selection):
    """The hooks' ablation and the same direction projected out of the weights give the same counts and KL."""
    dirs, sel, harmful, harmless = selection
    edit = surgery.Orthogonalize(dirs.directions[16])
    tokens, mask = chat_tokens(smol, harmless)
    with torch.no_grad():
        base = smol(tokens, attention_mask=mask)[:, -1]
        with edit.applied(smol):
            edited = smol(tokens, attention_mask=mask)[:, -1]
            count = refusal_rate(smol, harmful, max_new_tokens=sel.proxy_tokens).count
    assert count == sel.refusals[sel.layers.index(16)]
    assert float(kl_rows(base, edited).mean()) == pytest.approx(sel.kl[sel.layers.index(16)], abs=1e-4)
