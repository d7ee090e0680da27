"""The cache stores every tensor once: cached logits are the returned logits, the residual stream
passed from one layer to the next is one tensor, and ``nbytes`` counts each storage once."""

import torch

from hooks import HookedLlama
from tests.helpers import tiny_hf


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _model_and_ids():
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    return model, torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def test_cached_logits_share_the_returned_logits():
    model, ids = _model_and_ids()
    logits, cache = model.run_with_cache(ids)
    assert _ptr(cache["hook_logits"]) == _ptr(logits) and cache["hook_logits"].shape == logits.shape
    (logits2, _loss), cache2 = model.run_with_cache(ids, return_type="both")
    assert _ptr(cache2["hook_logits"]) == _ptr(logits2)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)


def test_returned_residual_is_the_cached_residual():
    model, ids = _model_and_ids()
    resid, cache = model.run_with_cache(ids, stop_at_layer=2)
    assert _ptr(cache["blocks.1.hook_resid_post"]) == _ptr(resid)
    assert "blocks.2.hook_resid_pre" not in cache


def test_residual_stream_is_stored_once_and_nbytes_counts_it_once():
    model, ids = _model_and_ids()
    _, cache = model.run_with_cache(ids)
    n = model.n_layers
    assert _ptr(cache["blocks.0.hook_resid_pre"]) == _ptr(cache["hook_embed"])
    for i in range(n - 1):
        assert _ptr(cache[f"blocks.{i + 1}.hook_resid_pre"]) == _ptr(cache[f"blocks.{i}.hook_resid_post"])
    # every resid_pre aliases the embedding or the previous resid_post; nothing else is shared
    naive = sum(t.numel() * t.element_size() for t in cache.values())
    resid_pre = sum(cache["resid_pre", i].numel() * 4 for i in range(n))
    assert cache.nbytes == naive - resid_pre
    # a cast copy is its own storage
    _, cast = model.run_with_cache(ids, dtype=torch.float64)
    assert _ptr(cast["hook_logits"]) != _ptr(cache["hook_logits"])
    assert cast.nbytes == 2 * cache.nbytes
