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


def test_caches_keep_no_autograd_graph_unless_gradients_are_asked():
    model, ids = _model_and_ids()
    logits, cache = model.run_with_cache(ids)
    assert logits.grad_fn is None and not any(t.requires_grad for t in cache.values())
    with torch.no_grad():
        assert (logits - model(ids)).abs().max() <= 1e-5  # eager attention in cached layers: rounding
    loss, grads = model.run_with_cache(
        ids, return_type="loss", incl_bwd=True, names_filter="blocks.1.hook_resid_post"
    )  # asked for: the graph is kept and each gradient cached
    assert loss.grad_fn is not None and grads["blocks.1.hook_resid_post_grad"].abs().sum() > 0


def test_cpu_cache_memory_is_held_until_the_next_cache_exists(monkeypatch):
    import gc
    import weakref

    from hooks import cache_storage

    model, ids = _model_and_ids()
    other = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(cache_storage, "HOLD_LAST", False)
    _, plain = model.run_with_cache(other)  # the forward's own tensors, held by nobody else
    monkeypatch.setattr(cache_storage, "HOLD_LAST", True)
    _, a = model.run_with_cache(ids)
    held = weakref.ref(a["blocks.1.mlp.hook_post"])
    del a
    gc.collect()
    assert held() is not None  # dropped by the user, kept until the next cache exists
    _, b = model.run_with_cache(other)
    gc.collect()
    assert held() is None  # freed once b was made: its memory is a hole below b that the next call reuses
    assert set(b) == set(plain) and all(torch.equal(b[k], plain[k]) for k in plain)  # no copy, same values
    kept = weakref.ref(b["blocks.1.mlp.hook_post"])
    del b
    cache_storage.release_buffers()
    gc.collect()
    assert kept() is None


def test_disk_spill_is_per_layer_memory_mapped_and_removed(tmp_path):
    model, ids = _model_and_ids()
    _, mem = model.run_with_cache(ids)
    _, disk = model.run_with_cache(ids, device="disk", spill_dir=tmp_path)
    (root,) = tmp_path.iterdir()
    files = sorted(p.name for p in root.iterdir())
    assert len(files) == model.n_layers + 2  # the embedding, one file per layer (written when it is done), the end
    assert set(disk) == set(mem)
    for name in mem:
        assert torch.equal(disk[name], mem[name]), name
    torch.testing.assert_close(disk.accumulated_resid(apply_ln=True), mem.accumulated_resid(apply_ln=True))
    assert disk.store.disk_bytes >= mem.nbytes - mem["hook_logits"].numel() * 4
    del disk
    import gc

    gc.collect()
    assert not root.exists()  # the spill directory goes with the cache


def test_spill_dir_goes_with_disk():
    import pytest

    from hooks import InputError

    model, ids = _model_and_ids()
    with pytest.raises(InputError, match="spill_dir is where device='disk' spills") as info:
        model.run_with_cache(ids, spill_dir=".")
    assert info.value.param == "spill_dir"
