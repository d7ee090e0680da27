"""Scale features: streaming activations to disk, explicit device placement, torch.compile."""

import pytest
import torch

from hooks import HookedLlama, InputError
from hooks.placement import place
from hooks.streaming import cache_to_disk, load_from_disk
from tests.helpers import tiny_hf


def test_cache_to_disk_equals_run_with_cache(tiny, tmp_path):
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 7, 3, 6, 4)]
    names = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]
    out = cache_to_disk(tiny, prompts, names, tmp_path / "acts", batch_size=2, progress=False)
    shards = load_from_disk(out, "blocks.1.hook_resid_post")
    masks = load_from_disk(out, "attention_mask")
    assert [s.shape[0] for s in shards] == [2, 2, 1]
    row = 0
    for shard, mask in zip(shards, masks):
        for r in range(shard.shape[0]):
            _, cache = tiny.run_with_cache(prompts[row], names_filter=names)
            real = shard[r][mask[r].bool()]
            assert (real - cache["resid_post", 1][0]).abs().max() <= 1e-5
            row += 1
    assert not list(tmp_path.glob(".scalpel-tmp-*"))  # no temporary litter
    with pytest.raises(InputError, match="exists; pass overwrite=True"):
        cache_to_disk(tiny, prompts, names, tmp_path / "acts")


def test_explicit_device_map_keeps_logits():
    hf = tiny_hf("tied")
    model = HookedLlama.from_hf(hf)
    ids = torch.randint(3, 128, (2, 6))
    ref = model(ids)
    place(
        model,
        {
            "model.embed_tokens": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "cpu",
            "model.layers.2": "cpu",
            "model.norm": "cpu",
            "lm_head": "cpu",
        },
    )
    assert (model(ids) - ref).abs().max() == 0
    with pytest.raises(InputError, match="not a module of this model"):
        place(model, {"model.layer.0": "cpu"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_split_across_cpu_and_gpu():
    hf = tiny_hf("gqa")
    model = HookedLlama.from_hf(hf)
    ids = torch.randint(3, 128, (2, 6))
    ref = model(ids)
    place(model, {"model.layers.1": "cuda:0", "model.layers.2": "cuda:0"})
    logits, cache = model.run_with_cache(ids)
    assert cache["resid_post", 2].device.type == "cuda" and cache["resid_post", 0].device.type == "cpu"
    assert (logits.cpu() - ref).abs().max() <= 1e-4


def test_no_hook_forward_compiles_without_graph_breaks(tiny):
    ids = torch.randint(3, 128, (2, 8))
    explanation = torch._dynamo.explain(tiny)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(tiny, backend="aot_eager")
    with torch.no_grad():
        assert (compiled(ids) - tiny(ids)).abs().max() <= 1e-6
