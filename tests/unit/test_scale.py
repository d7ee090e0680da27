"""Scale: the checkpoint's dtype by default, device maps computed and dispatched by accelerate (CPU and
disk offload, checked before a byte is read), hooks / caches / patching / edits / generation on
offloaded layers, ``from_hf`` of a dispatched transformers model, memory plans (a 70B config on the meta
device), streaming activations to disk, torch.compile."""

import json
import resource

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import surgery as S
from analyses import activation_patching
from hooks import HookedLlama, InputError, LoadError
from hooks import checkpoint as ckpt_module
from hooks.plan import hook_shape
from hooks.streaming import cache_to_disk, load_from_disk
from tests.helpers import VARIANTS, build_tiny, run_json, tiny_config, tiny_hf

# layer 0 and the embeddings in memory, layers 1-2 and lm_head offloaded to disk (read from the checkpoint)
CPU_AND_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(HF model, its checkpoint directory) of the tiny GQA Llama, float32."""
    hf = tiny_hf("gqa").eval()
    path = tmp_path_factory.mktemp("scale") / "ckpt"
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture
def ids():
    return torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- dtype
def test_default_dtype_is_the_checkpoints_as_in_transformers(tmp_path, ids):
    hf = tiny_hf("tied").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    ours = HookedLlama.from_pretrained(str(tmp_path / "bf16"))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()  # transformers 5: the checkpoint's
    assert ours.dtype == theirs.dtype == torch.bfloat16
    with torch.no_grad():
        assert (ours(ids).float() - theirs(ids).logits.float()).abs().max() <= 1e-2
    # asked for: straight into float32, as transformers does it
    ours32 = HookedLlama.from_pretrained(str(tmp_path / "bf16"), dtype="float32")
    theirs32 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours32(ids) - theirs32(ids).logits).abs().max() <= 1e-5
    # no dtype in config.json: the weights' own (transformers' "auto" falls back the same way)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    assert HookedLlama.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16


def test_default_model_stays_float32(smol):
    assert smol.dtype == torch.float32


# --------------------------------------------------------------------------- offload
def test_cpu_and_disk_offload_run_hooks_caches_patching_and_generation(saved, ids):
    hf, path = saved
    plain = HookedLlama.from_pretrained(str(path))
    model = HookedLlama.from_pretrained(str(path), device_map=CPU_AND_DISK)
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # offloaded: nothing in memory
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "cpu"
    assert {k: model.hf_device_map[k] for k in CPU_AND_DISK} == CPU_AND_DISK
    with torch.no_grad():
        want = hf(ids).logits
        assert (model(ids) - want).abs().max() <= 1e-5
        assert torch.equal(model(ids), plain(ids))
    logits, cache = model.run_with_cache(ids)
    _, ref_cache = plain.run_with_cache(ids)
    assert set(cache) == set(ref_cache)
    for name in cache:
        assert torch.equal(cache[name], ref_cache[name]), name
    # a hook on an offloaded layer sees and changes its values
    seen = []

    def zero_head(z, hook):
        seen.append(z.clone())
        z[:, :, 1] = 0

    hooked = model.run_with_hooks(ids, fwd_hooks=[("blocks.2.attn.hook_z", zero_head)])
    expected = plain.run_with_hooks(ids, fwd_hooks=[("blocks.2.attn.hook_z", zero_head)])
    assert torch.equal(seen[0], seen[1]) and torch.equal(hooked, expected)
    assert not torch.equal(hooked, logits)
    # patching: the same numbers as on the model in memory
    clean, corrupted = ids[:1], ids[1:]
    got = activation_patching(model, clean, corrupted, "kl", component="resid_pre", layers=[1, 2])
    ref = activation_patching(plain, clean, corrupted, "kl", component="resid_pre", layers=[1, 2])
    torch.testing.assert_close(got.values, ref.values, rtol=1e-5, atol=1e-7)  # batched: float rounding only
    # generation with the KV cache: token-identical to transformers
    out = model.generate(ids, max_new_tokens=5)
    assert torch.equal(out, hf.generate(ids, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids)))


def test_edits_on_offloaded_layers_are_kept_and_undone(saved, ids):
    _, path = saved
    edit = S.ZeroHeads(layer=1, heads=[0, 2])
    plain = HookedLlama.from_pretrained(str(path))
    with torch.no_grad():
        before = plain(ids)
        with edit.applied(plain):
            want = plain(ids)
        assert not torch.equal(want, before)
        model = HookedLlama.from_pretrained(str(path), device_map=CPU_AND_DISK)
        with edit.applied(model):
            assert torch.equal(model(ids), want)
            assert model.model.layers[1].self_attn.o_proj.weight.device.type == "meta"  # still offloaded
        assert torch.equal(model(ids), before)  # undone: the checkpoint's values again
        edit.apply(model)
        assert torch.equal(model(ids), want)
        assert torch.equal(model(ids), want)  # kept across forwards
    with model.onloaded("model.layers.1"):  # the weights, brought in to be read
        w = model.model.layers[1].self_attn.o_proj.weight
        assert w.device.type == "cpu" and w.view(64, 4, 16)[:, [0, 2]].abs().max() == 0


def test_weights_over_max_memory_run_with_disk_offload(saved, ids):
    hf, path = saved
    layer_bytes = sum(p.numel() * 4 for p in hf.model.layers[0].parameters())
    model = HookedLlama.from_pretrained(str(path), device_map="auto", max_memory={"cpu": 2 * layer_bytes})
    total = sum(p.numel() * 4 for p in hf.parameters())
    assert total > 2 * layer_bytes
    assert "disk" in model.hf_device_map.values()  # accelerate's map: what does not fit goes to disk
    in_memory = sum(p.numel() * 4 for p in model.parameters() if p.device.type != "meta")
    assert in_memory <= 2 * layer_bytes
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-5
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states
    for i in range(2):  # HF's hidden_states[i + 1] is the residual stream after layer i (the last is normed)
        assert (cache["resid_post", i] - hidden[i + 1]).abs().max() <= 1e-5


def test_from_hf_of_a_dispatched_transformers_model_shares_its_offload(saved, ids, tmp_path):
    hf_plain, path = saved
    hf = AutoModelForCausalLM.from_pretrained(
        path, device_map=CPU_AND_DISK, offload_folder=str(tmp_path / "offload"), dtype=torch.float32
    ).eval()
    model = HookedLlama.from_hf(hf)
    assert model.model.layers[0].mlp.up_proj.weight is hf.model.layers[0].mlp.up_proj.weight  # shared, no copy
    assert model.model.layers[2].mlp.up_proj.weight.device.type == "meta"
    ours_store = model.model.layers[2]._hf_hook.weights_map.dataset
    theirs = next(m._hf_hook for m in hf.modules() if getattr(getattr(m, "_hf_hook", None), "weights_map", None))
    assert ours_store.index is theirs.weights_map.dataset.index  # the same offload storage
    with torch.no_grad():
        assert (model(ids) - hf_plain(ids).logits).abs().max() <= 1e-5
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "case, kwargs, param, message",
    [
        (
            "unknown module",
            {"device_map": {"model.layer.0": "cpu", "": "cpu"}},
            "device_map",
            "device_map names 'model.layer.0', which is not a module of this model (closest: model.layers.0,",
        ),
        (
            "uncovered module",
            {"device_map": {"model.embed_tokens": "cpu", "model.layers.0": "cpu"}},
            "device_map",
            "device_map gives no device to model.layers.1, model.layers.2, model.norm and 1 more; map every "
            "module (or '' for the rest) or use device_map='auto'",
        ),
        (
            "bad device",
            {"device_map": {"": "cpu", "lm_head": "gpu"}},
            "device_map",
            "device_map names device 'gpu' for 'lm_head'; use a GPU index (0, 'cuda:1'), 'cpu' or 'disk'",
        ),
        (
            "missing gpu",
            {"device_map": {"": "cpu", "model.layers.2": "cuda:7"}},
            "device_map",
            "device_map puts weights on cuda:7 (model.layers.2) but this machine has",
        ),
        (
            "bad strategy",
            {"device_map": "fastest"},
            "device_map",
            "device_map must be 'auto', 'balanced', 'balanced_low_0', 'sequential', a device ('cuda:0', 'cpu') "
            "or a dict of module name -> device, got 'fastest'",
        ),
        (
            "bad size",
            {"device_map": "auto", "max_memory": {"cpu": "lots"}},
            "max_memory",
            "max_memory['cpu'] = 'lots' is not a size; write bytes or a string such as '20GiB' or '500MB'",
        ),
        (
            "max_memory alone",
            {"max_memory": {"cpu": "1GiB"}},
            "max_memory",
            "max_memory bounds the map accelerate computes: pass it with device_map='auto', 'balanced', "
            "'balanced_low_0' or 'sequential'",
        ),
        (
            "device and map",
            {"device": "cpu", "device_map": "auto"},
            "device",
            "pass device or device_map, not both (device_map='cuda:0' puts everything there)",
        ),
    ],
)
def test_bad_device_maps_fail_before_a_weight_is_read(saved, monkeypatch, case, kwargs, param, message):
    _, path = saved

    def no_read(self, name):
        raise AssertionError(f"{name} was read before the map was checked")

    monkeypatch.setattr(ckpt_module.Checkpoint, "read", no_read)
    with pytest.raises(InputError) as info:
        HookedLlama.from_pretrained(str(path), **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert info.value.param == param


def test_tied_weights_on_two_devices_are_refused(tmp_path):
    tiny_hf("tied").save_pretrained(tmp_path / "tied")
    with pytest.raises(InputError, match="tied embeddings on 'cpu' and lm_head on 'disk'.*one device"):
        HookedLlama.from_pretrained(str(tmp_path / "tied"), device_map={"": "cpu", "lm_head": "disk"})


def test_finiteness_check_names_the_tensor_and_can_be_skipped(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][5, 7] = float("nan")
    state["model.layers.0.mlp.down_proj.weight"][:] = 3e38  # finite, but their sum overflows: not an error
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError) as info:
        HookedLlama.from_pretrained(str(bad))
    assert str(info.value) == (
        f"{bad}: model.layers.1.mlp.up_proj.weight holds a non-finite value (nan) at index (5, 7); the "
        "checkpoint is corrupt, re-download or re-export it"
    )
    with pytest.raises(LoadError, match="up_proj.weight holds a non-finite value"):  # also where it stays on disk
        HookedLlama.from_pretrained(str(bad), device_map=CPU_AND_DISK)
    model = HookedLlama.from_pretrained(str(bad), check_weights=False)
    assert torch.isnan(model.model.layers[1].mlp.up_proj.weight[5, 7])


# --------------------------------------------------------------------------- plans
LLAMA_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    dtype="bfloat16",
)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_plan_of_a_70b_config_on_the_meta_device():
    config = LlamaConfig(**LLAMA_70B)
    GiB = 1 << 30
    before = _rss_mb()
    plan = HookedLlama.plan(
        config,
        max_memory={0: "40GiB", 1: "40GiB", "cpu": "30GiB"},
        device_map="sequential",
        batch=1,
        positions=8192,
        names=lambda n: n.endswith("hook_resid_post"),
    )
    assert _rss_mb() - before < 500  # nothing of 141 GB was allocated
    M, F, V, L, G, D = 8192, 28672, 128256, 80, 8, 128
    layer = 2 * M * M + 2 * M * G * D + 3 * M * F + 2 * M
    params = 2 * V * M + L * layer + M
    assert params == 70_553_706_496
    assert plan.total_weights == 2 * params and plan.dtype == torch.bfloat16
    assert plan.weights[0] <= 40 * GiB and plan.weights[1] <= 40 * GiB and plan.weights["cpu"] <= 30 * GiB
    assert plan.weights["disk"] > 0  # 131 GiB do not fit in 110 GiB
    # sequential: every layer on the first device with room, in order
    order = {0: 0, 1: 1, "cpu": 2, "disk": 3}
    devices = [plan.device_of(f"model.layers.{i}") for i in range(L)]
    assert [order[d] for d in devices] == sorted(order[d] for d in devices)
    # the KV cache of 8192 positions and the cached residual stream, on the devices the layers run on
    assert sum(plan.kv_cache.values()) == L * 2 * 8192 * G * D * 2
    assert sum(plan.cache.values()) == L * 8192 * M * 2
    text = str(plan)
    assert "model.layers.0-" in text and "disk" in text and "KV cache b1×s8192" in text
    assert plan.to_dict()["total_weight_bytes"] == 2 * params


@pytest.mark.parametrize("variant", ["gqa", "tied", "qwen3", "mistral"])
def test_plan_shapes_and_cache_bytes_are_what_run_with_cache_keeps(variant):
    config = tiny_config(variant)
    model = HookedLlama.from_hf(tiny_hf(variant))
    tokens = torch.randint(3, 128, (2, 5))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: True)
    for name in model.hook_names():
        shape, fp32 = hook_shape(config, name, 2, 5)
        assert tuple(cache[name].shape) == shape, name
        assert (cache[name].dtype == torch.float32) == (fp32 or model.dtype == torch.float32), name
    for names in (None, lambda n: "resid" in n, ["blocks.1.attn.hook_pattern", "hook_logits"]):
        _, cache = model.run_with_cache(tokens, names_filter=names)
        plan = HookedLlama.plan(config, device_map="cpu", batch=2, positions=5, names=names)
        assert plan.cache == {"cpu": cache.nbytes}
        assert plan.weights == {"cpu": sum(p.numel() * 4 for p in model.parameters())}


def test_info_plan_reads_no_weights(tmp_path, capsys, monkeypatch):
    path = build_tiny(tmp_path / "tiny")

    def no_read(self, name):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(ckpt_module.Checkpoint, "read", no_read)
    data = run_json(["info", "--model", path, "--plan", "--max-memory", "cpu=300KB", "--shape", "2x16"], capsys)
    plan = data["plan"]
    assert plan["batch"] == 2 and plan["positions"] == 16
    assert {d["device"] for d in plan["devices"]} == {"cpu", "disk"}
    expected = HookedLlama.plan(str(path), max_memory={"cpu": "300KB"}, batch=2, positions=16).to_dict()
    assert plan == json.loads(json.dumps(expected))


# --------------------------------------------------------------------------- activations on disk, compile
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_split_across_cpu_and_gpu(saved, ids):
    hf, path = saved
    model = HookedLlama.from_pretrained(str(path), device_map={"": 0, "model.layers.1": "cpu", "model.layers.2": "cpu"})
    assert model.device.type == "cuda"
    logits, cache = model.run_with_cache(ids)
    assert cache["resid_post", 2].device.type == "cuda"  # offloaded to the CPU, run on the GPU
    with torch.no_grad():
        assert (logits.cpu() - hf(ids).logits).abs().max() <= 1e-4
    _, spilled = model.run_with_cache(ids, device="cpu")
    assert spilled["resid_post", 2].is_pinned() and torch.equal(spilled["resid_post", 2], cache["resid_post", 2].cpu())


def test_no_hook_forward_compiles_without_graph_breaks(tiny):
    ids = torch.randint(3, 128, (2, 8))
    explanation = torch._dynamo.explain(tiny)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(tiny, backend="aot_eager")
    with torch.no_grad():
        assert (compiled(ids) - tiny(ids)).abs().max() <= 1e-6


def test_every_variant_loads_through_the_streaming_loader(tmp_path, ids):
    for variant in VARIANTS:
        hf = tiny_hf(variant).eval()
        hf.save_pretrained(tmp_path / variant)
        model = HookedLlama.from_pretrained(str(tmp_path / variant))
        with torch.no_grad():
            assert (model(ids) - hf(ids).logits).abs().max() <= 1e-5, variant
