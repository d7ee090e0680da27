"""Neuron top activations equal a naive per-document scan (padding never counted), on a token-id
corpus with a tiny model and on the shipped text corpus with the real model."""

import pytest
import torch

from analyses import load_corpus, top_activating
from hooks import HookedLlama, InputError
from tests.helpers import tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_top(model, docs, layer, neurons, k):
    """Every (activation, doc, pos) by running each document alone; the k largest per neuron."""
    found = {n: [] for n in neurons}
    for d, doc in enumerate(docs):
        ids = doc if isinstance(doc, torch.Tensor) else model.to_tokens(doc)[0]
        with torch.no_grad():
            _, cache = model.run_with_cache(
                ids[None],
                names_filter=[f"blocks.{layer}.mlp.hook_post"],
                stop_at_layer=layer + 1 if layer + 1 < model.n_layers else None,
            )
        acts = cache["post", layer][0]
        for n in neurons:
            found[n] += [(float(acts[p, n]), d, p) for p in range(acts.shape[0])]
    return {n: sorted(v, key=lambda x: -x[0])[:k] for n, v in found.items()}


def test_top_activations_equal_naive_scan_on_padded_batches():
    model = HookedLlama.from_hf(tiny_hf("gqa", initializer_range=0.1))
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 128, (int(n),), generator=g) for n in torch.randint(2, 12, (11,), generator=g)]
    neurons = [0, 7, 95]
    res = top_activating(model, 1, neurons, corpus=docs, k=6, batch_size=4)  # 3 batches, ragged lengths
    ref = naive_top(model, docs, 1, neurons, 6)
    for i, n in enumerate(neurons):
        assert [(d, p) for _, d, p in ref[n]] == list(zip(res.doc[i].tolist(), res.pos[i].tolist()))
        assert torch.allclose(res.values[i], torch.tensor([v for v, _, _ in ref[n]]), atol=1e-5)
    assert res.n_tokens == sum(len(d) for d in docs) and res.n_docs == 11
    rows = res.rows()
    assert len(rows) == 18 and rows[0]["neuron"] == 0 and rows[0]["rank"] == 0
    # the last layer runs to the end of the model
    last = top_activating(model, 2, [3], corpus=docs, k=2)
    assert torch.allclose(
        last.values[0], torch.tensor([v for v, _, _ in naive_top(model, docs, 2, [3], 2)[3]]), atol=1e-5
    )
    with pytest.raises(InputError, match="out of range"):
        top_activating(model, 1, [96], corpus=docs)


def test_shipped_corpus():
    corpus = load_corpus()
    assert len(corpus) == 100 and len(set(corpus)) == 100
    assert all(10 < len(line) < 200 for line in corpus)


@pytest.mark.slow
def test_real_model_shipped_corpus_equals_naive_scan(smol):
    neurons = [5, 100, 777]
    res = top_activating(smol, 3, neurons, k=4)
    ref = naive_top(smol, load_corpus(), 3, neurons, 4)
    for i, n in enumerate(neurons):
        assert [(d, p) for _, d, p in ref[n]] == list(zip(res.doc[i].tolist(), res.pos[i].tolist()))
        assert torch.allclose(res.values[i], torch.tensor([v for v, _, _ in ref[n]]), atol=1e-4)
    row = res.rows()[0]
    assert row["token"] in row["context"] and "[[" in row["context"]
    assert res.n_docs == 100
