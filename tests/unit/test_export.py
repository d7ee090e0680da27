"""Verified export: round trips through plain transformers (HF directory and GGUF), atomicity under
exceptions and SIGKILL, integrity checks, and refusal of bad input before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import surgery as S
from _core import writer as W
from hooks import HookedLlama
from hooks import config as hooks_config
from tests.helpers import (
    API_EXPORT,
    EDIT_NAMES,
    FAMILY_VARIANTS,
    assert_same,
    interrupt_mid_write,
    make_edit,
    random_ids,
    snapshot,
    tiny_hf,
)

REPO = Path(__file__).resolve().parents[2]
E = sys.modules["surgery.export"]  # the package (``surgery.export`` is the function)


def litter(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((E.TMP_PREFIX, E.OLD_PREFIX)))


def hf_logits(path, x, **kw) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return hf(x).logits


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "name, variant",
    [(n, "gqa") for n in EDIT_NAMES]
    + [(n, "tied") for n in ("ZeroHeads", "RemoveLayers", "Orthogonalize", "MergeLora")]
    # other families reload in their own class (RemoveLayers keeps each layer's window)
    + [("RemoveLayers", v) for v in FAMILY_VARIANTS]
    + [("MeanAblateHeads", "qwen3"), ("Orthogonalize", "qwen2_tied"), ("MergeLora", "qwen2")],
)
def test_export_round_trip_per_edit(name, variant, tmp_path):
    model = HookedLlama.from_hf(tiny_hf(variant))
    edit = make_edit(name, model, tmp_path)
    snap = snapshot(model)
    out = tmp_path / "out"
    result = S.export(model, out, edits=[edit])
    assert_same(model, snap)  # export applies the edits for the export only
    assert result.max_abs_logit_diff <= 1e-4 and result.kl_to_base > 0
    x = random_ids()
    with torch.no_grad(), edit.applied(model):
        want = model(x)
    assert (hf_logits(out, x) - want).abs().max() <= 1e-4  # plain transformers, independently of export's check
    assert (HookedLlama.from_pretrained(str(out))(x) - want).abs().max() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    base = model.config.to_dict()
    family = hooks_config.family(model.config)
    assert config["architectures"] == [type(tiny_hf(variant)).__name__]
    assert config["model_type"] == family
    if family in ("llama", "qwen3"):
        assert config["attention_bias"] == (name == "MeanAblateHeads" or base["attention_bias"])
    else:  # Mistral / Qwen2: biases fixed by the class, no flag written
        assert "attention_bias" not in config and "mlp_bias" not in config
    if family == "llama":
        assert config["mlp_bias"] == (name == "AddSteering")
    assert config["num_hidden_layers"] == (2 if name == "RemoveLayers" else 3)
    if "layer_types" in base:
        assert config["layer_types"] == [
            t for i, t in enumerate(base["layer_types"]) if name != "RemoveLayers" or i != 1
        ]
    assert config["tie_word_embeddings"] == (base["tie_word_embeddings"] and name != "Orthogonalize")
    for key in (
        "rms_norm_eps",
        "rope_parameters",
        "num_key_value_heads",
        "bos_token_id",
        "initializer_range",
        "sliding_window",
        "head_dim",
    ):
        assert config.get(key) == base.get(key)
    manifest = json.loads((out / E.MANIFEST).read_text())
    assert manifest["edits"] == [edit.to_dict()]
    assert manifest["base"]["sha256"] and manifest["base"]["sha256_of"] == "state dict tensors"
    assert (out / "generation_config.json").is_file()
    assert S.verify(out)["ok"]
    assert litter(tmp_path) == []


def test_plan_export_sharded_with_manifest(tmp_path):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    plan = S.EditPlan(
        [
            make_edit(n, model, tmp_path)
            for n in ("ZeroHeads", "MeanAblateHeads", "AddSteering", "Orthogonalize", "MergeLora")
        ]
        + [S.RemoveLayers([0])]
    )
    out = tmp_path / "edited"
    result = S.export(model, out, edits=plan, max_shard_size="40KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all((out / s).stat().st_size <= 40_000 or len(load_file(str(out / s))) == 1 for s in shards)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert hf.config.num_hidden_layers == 2 and len(hf.model.layers) == 2
    assert hf.config.attention_bias and hf.config.mlp_bias
    x = random_ids()
    with torch.no_grad(), plan.applied(model):
        want = model(x)
    with torch.no_grad():
        assert (hf(x).logits - want).abs().max() <= 1e-4
    m = result.manifest
    assert [e["edit"] for e in m["edits"]] == [e.kind for e in plan]
    assert m["layer_map"] == [1, 2]
    assert m["config_changes"]["num_hidden_layers"] == [3, 2]
    assert m["config_changes"]["attention_bias"] == [False, True]
    assert set(m["files"]) == {p.name for p in out.iterdir()} - {E.MANIFEST}
    assert {"torch", "transformers", "llama-scalpel"} <= set(m["libraries"])
    assert len(m["probes"]) == 3 and all(len(p["top5"]) == 5 for p in m["probes"])
    assert m["kl_to_base"] > 0 and all(p["kl_to_base"] is not None for p in m["probes"])
    assert m["verification"]["max_abs_logit_diff"] <= 1e-4
    assert all(oct(p.stat().st_mode & 0o777) == oct(W.new_file_mode()) for p in out.iterdir())


def test_export_records_edits_applied_by_the_caller(tmp_path):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    base = E.probe_logits(model, E.probe_inputs(model))
    S.apply_plan(model, [S.ZeroHeads(0, [1])])
    result = S.export(model, tmp_path / "a", edits=[S.ZeroNeurons(1, [2])])
    assert [e["edit"] for e in result.manifest["edits"]] == ["ZeroHeads", "ZeroNeurons"]
    assert result.manifest["edits_applied_before_export"] == 1
    assert result.kl_to_base is None and result.manifest["base"]["sha256"] is None
    result = S.export(model, tmp_path / "b", base_logits=base, base_sha256="ab" * 32)
    assert result.kl_to_base > 0 and result.manifest["base"]["sha256"] == "ab" * 32


def test_export_of_unedited_model_has_zero_kl(tmp_path):
    model = HookedLlama.from_hf(tiny_hf("mha"))
    result = S.export(model, tmp_path / "plain")
    assert result.kl_to_base == 0.0 and result.manifest["edits"] == []


# --------------------------------------------------------------------------- refusals
def test_existing_dir_is_refused_and_overwrite_replaces(tmp_path):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(S.ExportError, match="already exists; pass overwrite=True"):
        S.export(model, tmp_path)
    S.export(model, out, overwrite=True)  # an empty directory may be replaced
    S.export(model, out, edits=[S.RemoveLayers([2])], overwrite=True)  # and a previous export
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert S.verify(out)["ok"] and litter(tmp_path) == []


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_overwrite_never_replaces_what_is_not_an_export_of_ours(tmp_path, monkeypatch):
    """Issue 12 (1): ``overwrite=True`` on a directory holding a user's files deleted them."""
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.txt").write_text("years of work")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("1,2\n")
    before = tree(tmp_path)
    with pytest.raises(S.ExportError) as info:
        S.export(model, ".", overwrite=True)
    assert str(info.value) == (
        ". is not an export of llama-scalpel (it holds 'data' and no valid "
        "scalpel_manifest.json); overwriting replaces only a previous export or an empty "
        "directory, pick another out_dir"
    )
    assert tree(tmp_path) == before
    # a previous export with a file added by hand: refused too (overwriting would delete the file)
    S.export(model, "prev")
    (tmp_path / "prev" / "notes.md").write_text("mine")
    with pytest.raises(S.ExportError, match="prev holds 'notes.md', which its scalpel_manifest.json does not list"):
        S.export(model, "prev", overwrite=True)
    assert (tmp_path / "prev" / "notes.md").read_text() == "mine"
    # a manifest that is not ours, and a file
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "scalpel_manifest.json").write_text('{"format": "something-else", "files": {}}')
    with pytest.raises(S.ExportError, match="other is not an export of llama-scalpel"):
        S.export(model, "other", overwrite=True)
    with pytest.raises(S.ExportError, match="thesis.txt exists and is not a directory"):
        S.export(model, "thesis.txt", overwrite=True)
    with pytest.raises(S.ExportError, match="out_dir is empty; name the file or directory to write"):
        S.export(model, "", overwrite=True)
    with pytest.raises(S.ExportError, match="out_dir must be a path .str or pathlib.Path., got int"):
        S.export(model, 3)
    assert (tmp_path / "thesis.txt").read_text() == "years of work" and litter(tmp_path) == []


@pytest.mark.parametrize("how", ["renameat2", "fallback"])
def test_a_concurrent_export_to_the_same_out_is_never_replaced(tmp_path, monkeypatch, how):
    """Issue 12 (2): two exports to one ``out``: the one that finishes second fails and leaves nothing
    (deterministic: the other export runs to completion inside the first one's reload)."""
    A = W  # the writer: exclusive moves
    if how == "fallback":
        monkeypatch.setattr(A, "_renameat2", lambda: None)
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    out = tmp_path / "out"
    from surgery.export import hf as H

    real = H.reload_logits
    calls = []

    def racing(tmp, dtype, probes):
        calls.append(tmp)
        if len(calls) == 1:
            S.export(HookedLlama.from_hf(tiny_hf("gqa", seed=1)), out)  # the other export wins the race
        return real(tmp, dtype, probes)

    monkeypatch.setattr(H, "reload_logits", racing)
    monkeypatch.setattr(sys.modules["surgery.export.verify"], "reload_logits", racing)
    with pytest.raises(S.ExportError) as info:
        S.export(model, out, edits=[S.ZeroHeads(0, [1])])
    assert str(info.value) == (
        f"{out} appeared while this export ran (another export to the same place?); it was "
        "left as it is and nothing was written; pick another path"
    )
    manifest = json.loads((out / "scalpel_manifest.json").read_text())
    assert manifest["edits"] == [] and S.verify(out)["ok"]  # the other export, intact
    assert litter(tmp_path) == [] and len(calls) == 3  # the two exports' reloads and verify's


def test_move_exclusive_never_replaces_files_or_directories(tmp_path, monkeypatch):
    A = W  # the writer: exclusive moves
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(A, "_renameat2", lambda: None)
        src, dst = tmp_path / f"a{fallback}", tmp_path / f"b{fallback}"
        src.write_text("new")
        dst.write_text("old")
        with pytest.raises(FileExistsError):
            A.move_exclusive(src, dst)
        assert dst.read_text() == "old" and src.read_text() == "new"
        dst.unlink()
        A.move_exclusive(src, dst)
        assert dst.read_text() == "new" and not src.exists()
        d1, d2 = tmp_path / f"d1{fallback}", tmp_path / f"d2{fallback}"
        d1.mkdir()
        (d1 / "f").write_text("1")
        d2.mkdir()
        (d2 / "g").write_text("2")
        with pytest.raises(FileExistsError):
            A.move_exclusive(d1, d2)
        assert sorted(p.name for p in d2.iterdir()) == ["g"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (S.ZeroHeads(7, [0]), "layer 7 is out of range"),
        (S.ZeroHeads(0, [9]), "head 9 is out of range"),
        (S.ZeroNeurons(0, [500]), "neuron 500 is out of range"),
        (S.Orthogonalize(torch.ones(10)), "direction has size 10"),
        (S.AddSteering(0, torch.ones(3)), "vector has size 3"),
    ],
)
def test_bad_edit_fails_before_anything_is_written(tmp_path, edit, message):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    snap = snapshot(model)
    out = tmp_path / "deep" / "out"
    with pytest.raises(S.EditError, match=message) as info:
        S.export(model, out, edits=[S.ZeroHeads(0, [0]), edit])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "deep").exists()
    assert_same(model, snap)


def test_adapter_for_another_base_fails_before_anything_is_written(tmp_path):
    from tests.helpers import write_adapter

    model = HookedLlama.from_hf(tiny_hf("gqa"))
    other = HookedLlama.from_hf(tiny_hf("gqa", hidden_size=32, intermediate_size=48))
    adapter = write_adapter(tmp_path / "adapter", other)
    with pytest.raises(S.AdapterError, match="adapter for another base model"):
        S.export(model, tmp_path / "out", edits=[S.MergeLora(str(adapter))])
    assert not (tmp_path / "out").exists() and litter(tmp_path) == []


def test_bad_shard_size_is_refused(tmp_path):
    with pytest.raises(S.ExportError, match="not a size"):
        S.export(HookedLlama.from_hf(tiny_hf("gqa")), tmp_path / "o", max_shard_size="lots")
    assert E.parse_size("2GB") == 2 * 10**9 and E.parse_size("1GiB") == 2**30 and E.parse_size(1234) == 1234


# --------------------------------------------------------------------------- faults
def test_exception_after_first_shard_leaves_nothing(tmp_path, monkeypatch):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    from surgery.export.hf import HFExport

    written = []
    real = HFExport.write_shard

    def failing(self, path, entries):  # the write stage fails after its first shard
        if written:
            raise OSError("disk full (injected)")
        written.append(path)
        return real(self, path, entries)

    monkeypatch.setattr(HFExport, "write_shard", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        S.export(model, out, edits=[S.ZeroHeads(0, [1])], max_shard_size="40KB")
    assert written and written[0].exists() is False  # the shard was written, then cleaned up
    assert not out.exists() and litter(tmp_path) == []


def test_keyboard_interrupt_during_reload_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    from surgery.export.hf import HFExport

    monkeypatch.setattr(HFExport, "compare", interrupted)  # Ctrl-C in the compare stage
    with pytest.raises(KeyboardInterrupt):
        S.export(HookedLlama.from_hf(tiny_hf("gqa")), tmp_path / "out")
    assert not (tmp_path / "out").exists() and litter(tmp_path) == []


def test_parity_failure_removes_the_output_and_says_why(tmp_path, monkeypatch):
    from surgery.export import hf as H

    real = H.streamed_logits
    monkeypatch.setattr(H, "streamed_logits", lambda hf, d, probes: [t + 1e-3 for t in real(hf, d, probes)])
    with pytest.raises(S.ParityError, match=r"differ from the in-memory model by 0\.001 \(tolerance 0\.0001\)"):
        S.export(HookedLlama.from_hf(tiny_hf("gqa")), tmp_path / "out", edits=[S.ZeroHeads(0, [1])])
    assert not (tmp_path / "out").exists() and litter(tmp_path) == []


def test_failure_when_overwriting_keeps_the_old_output(tmp_path, monkeypatch):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    out = tmp_path / "out"
    S.export(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from surgery.export import hf as H

    real = H.streamed_logits
    monkeypatch.setattr(H, "streamed_logits", lambda hf, d, probes: [t + 1.0 for t in real(hf, d, probes)])
    with pytest.raises(S.ExportError):
        S.export(model, out, edits=[S.ZeroHeads(0, [1])], overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and litter(tmp_path) == []


def test_sigkill_mid_write_leaves_no_out_dir(tmp_path):
    out = tmp_path / "out"
    proc = interrupt_mid_write(API_EXPORT.format(repo=str(REPO), out=str(out)), tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    stale = litter(tmp_path)
    assert stale and stale[0].startswith(f"{E.TMP_PREFIX}out-{proc.pid}-")
    # the next export to the same target cleans up the stale temp dir of the dead process
    S.export(HookedLlama.from_hf(tiny_hf("gqa")), out)
    assert litter(tmp_path) == [] and S.verify(out)["ok"]


# --------------------------------------------------------------------------- verify
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "out"
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    S.export(model, out, edits=[S.ZeroHeads(1, [2]), S.AddSteering(0, torch.ones(64))], max_shard_size="60KB")
    return out


def copy_of(exported, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(exported, tmp_path / "copy"))


def test_verify_passes_on_a_fresh_export(exported):
    result = S.verify(exported)
    assert result["ok"] and result["max_abs_logit_diff"] <= result["tolerance"] == 1e-4
    assert result["top5_match"] and result["files_checked"] >= 5 and result["unlisted_files"] == []


@pytest.mark.parametrize("victim", ["model-00002-of-", "config.json", "model.safetensors.index.json"])
def test_flipped_byte_is_reported_with_the_file_name(exported, tmp_path, victim):
    out = copy_of(exported, tmp_path)
    path = next(p for p in sorted(out.iterdir()) if p.name.startswith(victim))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(S.IntegrityError, match=rf"^{path.name}: sha256 mismatch") as info:
        S.verify(out)
    assert "\n" not in str(info.value)


def test_missing_file_is_reported(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    (out / "generation_config.json").unlink()
    with pytest.raises(S.IntegrityError, match="generation_config.json is missing"):
        S.verify(out)


def test_consistent_tampering_is_caught_by_reload_parity(exported, tmp_path):
    """Weights changed *and* the manifest hash updated: the logits check still fails."""
    out = copy_of(exported, tmp_path)
    shard = next(out.glob("model-00001-of-*.safetensors"))
    tensors = load_file(str(shard))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    manifest = json.loads((out / E.MANIFEST).read_text())
    manifest["files"][shard.name] = W.sha256_file(shard)
    (out / E.MANIFEST).write_text(json.dumps(W.seal(manifest)))  # the manifest's own hash redone too
    with pytest.raises(S.ParityError, match="reloaded logits differ"):
        S.verify(out)


def test_verify_without_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(S.IntegrityError, match="no scalpel_manifest.json"):
        S.verify(tmp_path / "x")


# --------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def vocab_model(smol):
    """A tiny random Llama with SmolLM2's real tokenizer (GGUF embeds the vocabulary)."""
    return HookedLlama.from_hf(
        tiny_hf("gqa", vocab_size=smol.d_vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2), smol.tokenizer
    )


def test_gguf_round_trip_f32_with_a_plan(vocab_model, tmp_path):
    model = vocab_model
    plan = S.EditPlan(
        [S.ZeroHeads(1, [0]), S.Orthogonalize(torch.randn(64)), S.ScaleNeurons(2, [1, 2], 0.5), S.RemoveLayers([0])]
    )
    snap = snapshot(model)
    path = tmp_path / "edited.gguf"
    result = S.export_gguf(model, path, edits=plan)
    assert_same(model, snap)
    assert result.max_abs_logit_diff <= 1e-4 and path.is_file() and litter(tmp_path) == []
    x = model.to_tokens("The quick brown fox")
    with torch.no_grad(), plan.applied(model):
        want = model(x)
    assert (hf_logits(tmp_path, x, gguf_file=path.name) - want).abs().max() <= 1e-4
    back = HookedLlama.from_pretrained(str(path))
    assert back.n_layers == 2 and not back.config.tie_word_embeddings
    with torch.no_grad():
        assert (back(x) - want).abs().max() <= 1e-4
    # a model loaded from GGUF exports to a verified HF checkpoint
    S.export(back, tmp_path / "hf", edits=[S.ZeroNeurons(0, [3])])
    assert S.verify(tmp_path / "hf")["ok"]


def test_gguf_round_trip_f16(vocab_model, tmp_path):
    result = S.export_gguf(vocab_model, tmp_path / "m.gguf", edits=[S.ZeroKVGroups(2, [1])], dtype="f16")
    assert result.max_abs_logit_diff <= 1e-4  # against the model with the file's f16 rounding
    assert 0 < result.max_abs_logit_diff_unrounded < 1e-2
    with pytest.raises(S.ExportError, match="already exists"):
        S.export_gguf(vocab_model, tmp_path / "m.gguf", dtype="f16")


def test_gguf_overwrite_replaces_only_our_gguf_files(vocab_model, tmp_path):
    """Issue 12 (1), GGUF: a file is replaced only when its metadata says llama-scalpel wrote it."""
    from gguf import GGUFWriter

    theirs = tmp_path / "theirs.gguf"
    writer = GGUFWriter(theirs, arch="llama")  # a valid GGUF of someone else's
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    (tmp_path / "notes.txt").write_text("mine")
    for victim in (theirs, tmp_path / "notes.txt"):
        before = victim.read_bytes()
        with pytest.raises(
            S.ExportError,
            match=f"{victim} is not a GGUF file written by llama-scalpel "
            r"\(no llama_scalpel.exported_by metadata\)",
        ):
            S.export_gguf(vocab_model, victim, overwrite=True)
        assert victim.read_bytes() == before
    ours = tmp_path / "ours.gguf"
    S.export_gguf(vocab_model, ours)
    first = ours.read_bytes()
    S.export_gguf(vocab_model, ours, edits=[S.ZeroHeads(0, [1])], overwrite=True)
    assert ours.read_bytes() != first and litter(tmp_path) == []


def test_gguf_refuses_a_bias_edit_before_writing(vocab_model, tmp_path):
    with pytest.raises(
        S.ExportError, match=r"GGUF cannot carry the non-zero bias model\.layers\.1\.mlp\.down_proj\.bias"
    ):
        S.export_gguf(vocab_model, tmp_path / "s.gguf", edits=[S.AddSteering(1, torch.ones(64))])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variant, overrides", [("qwen2", {"use_sliding_window": False}), ("qwen3", {"head_dim": 128})])
def test_gguf_round_trip_of_other_families(variant, overrides, tmp_path):
    from tests.helpers import small_sentencepiece_tokenizer

    tok = small_sentencepiece_tokenizer()
    model = HookedLlama.from_hf(tiny_hf(variant, vocab_size=len(tok), **overrides), tok)
    plan = S.EditPlan([S.ZeroHeads(1, [0]), S.RemoveLayers([2])])
    result = S.export_gguf(model, tmp_path / "m.gguf", edits=plan)
    assert result.max_abs_logit_diff <= 1e-4
    x = model.to_tokens("The quick brown fox")
    with torch.no_grad(), plan.applied(model):
        want = model(x)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    assert type(hf).__name__ == type(model.to_hf()).__name__
    back = HookedLlama.from_pretrained(str(tmp_path / "m.gguf"))
    with torch.no_grad():
        assert (hf(x).logits - want).abs().max() <= 1e-4 and (back(x) - want).abs().max() <= 1e-4
    if variant == "qwen2":  # the q/k/v biases travel with the file
        assert back.model.layers[0].self_attn.q_proj.bias.abs().max() > 0
    # a bias the architecture cannot carry is refused before anything is written
    if variant == "qwen3":
        with pytest.raises(
            S.ExportError, match=r"GGUF cannot carry the non-zero bias model\.layers\.1\.self_attn\.o_proj\.bias"
        ):
            S.export_gguf(model, tmp_path / "b.gguf", edits=[make_edit("MeanAblateHeads", model, tmp_path)])
        assert not (tmp_path / "b.gguf").exists()


def test_gguf_needs_a_tokenizer(tmp_path):
    with pytest.raises(S.ExportError, match="needs the model's tokenizer"):
        S.export_gguf(HookedLlama.from_hf(tiny_hf("gqa")), tmp_path / "t.gguf")


def test_stale_temp_files_of_dead_processes_are_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    alive = os.getppid()
    (tmp_path / f"{E.TMP_PREFIX}out-{pid}-0abc").mkdir()
    (tmp_path / f"{E.OLD_PREFIX}out-{pid}-0abd").mkdir()
    (tmp_path / f"{E.TMP_PREFIX}m.gguf-{pid}-1234.gguf").write_bytes(b"x")
    (tmp_path / f".{E.TMP_PREFIX}m.gguf-{pid}-1234.gguf.k2j3.tmp").write_bytes(b"x")  # write_gguf's own
    (tmp_path / f"{E.TMP_PREFIX}out-{alive}-0abe").mkdir()  # a live export: left alone
    (tmp_path / f"{E.TMP_PREFIX}other-{pid}-0abf").mkdir()  # another target: left alone
    assert sorted(W.clean_stale(tmp_path, "out")) == [f"{E.OLD_PREFIX}out-{pid}-0abd", f"{E.TMP_PREFIX}out-{pid}-0abc"]
    assert len(W.clean_stale(tmp_path, "m.gguf")) == 2
    assert litter(tmp_path) == [f"{E.TMP_PREFIX}other-{pid}-0abf", f"{E.TMP_PREFIX}out-{alive}-0abe"]


# --------------------------------------------------------------------------- streaming, state on the model
@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_tensors_are_read_from_accelerate_offload(offload, tmp_path):
    """The tensor source reads a parameter accelerate keeps off its module (meta device, the values in the
    offload hook's weights_map) as it reads one in memory: the same bytes, and the same state hash."""
    from accelerate import cpu_offload, disk_offload

    from surgery.export.tensors import export_config, export_entries, read_tensor, state_sha256

    model = HookedLlama.from_hf(tiny_hf("gqa"))
    want = {k: v.clone() for k, v in model.state_dict().items()}
    sha = state_sha256(model)
    entries = export_entries(model, export_config(model))
    if offload == "cpu":
        cpu_offload(model, execution_device="cpu")
    else:
        disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    assert model.model.layers[1].mlp.down_proj.weight.is_meta  # the weights really left the modules
    for name, t in want.items():
        got = read_tensor(model, name)
        assert got.device.type == "cpu" and torch.equal(got, t), name
    assert state_sha256(model) == sha
    assert all(torch.equal(e.read(model), want[e.name]) for e in entries)
    with pytest.raises(S.EditError, match="offloaded .* an edit needs them in memory"):
        S.ZeroHeads(0, [1]).apply(model)


def test_a_shard_is_streamed_and_checked_against_the_live_bytes(tmp_path, monkeypatch):
    """Shards are written tensor by tensor from the model (never a state-dict copy), and a shard whose bytes
    on disk differ from the live tensors' is caught before the move (the compare stage's hash check)."""
    from safetensors import safe_open

    from surgery.export.hf import HFExport

    model = HookedLlama.from_hf(tiny_hf("gqa"))
    out = tmp_path / "out"
    res = S.export(model, out, max_shard_size="40KB")
    for name in (n for n in res.files if n.endswith(".safetensors") and n.startswith("model")):
        with safe_open(str(out / name), "pt") as f:
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), model.state_dict()[key]), key
    real = HFExport.write_shard

    def corrupting(self, path, entries):  # the bytes on disk are not the ones hashed
        sha = real(self, path, entries)
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
        return sha

    monkeypatch.setattr(HFExport, "write_shard", corrupting)
    monkeypatch.setattr(HFExport, "compare", lambda self, d: setattr(self, "diff", 0.0) or setattr(self, "tol", 1e-4))
    with pytest.raises(S.ParityError, match=r"as read back from disk differs from the model's tensors written into it"):
        S.export(model, tmp_path / "bad", max_shard_size="40KB")
    assert not (tmp_path / "bad").exists() and litter(tmp_path) == []


def test_a_model_carrying_applied_edits_exports_as_it_is(tmp_path):
    """``with plan.applied(model): export(model, out)`` writes what ``export(model, out, edits=plan)`` writes:
    the same weights, the same edit records, the same base hash and KL (taken from the state the context
    restores), so a plan applied once serves a measurement and the export."""
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    snap = snapshot(model)
    plan = S.EditPlan([S.ZeroHeads(0, [1]), S.AddSteering(1, torch.ones(64)), S.RemoveLayers([2])])
    want = S.export(model, tmp_path / "given", edits=plan)
    with plan.applied(model):
        got = S.export(model, tmp_path / "applied")
        assert [h["edit"] for h in model.edit_history] == ["ZeroHeads", "AddSteering", "RemoveLayers"]
    assert_same(model, snap)
    w, g = want.manifest, got.manifest
    assert g["edits"] == w["edits"] and g["edits_applied_before_export"] == 3
    assert g["base"] == w["base"] and g["kl_to_base"] == w["kl_to_base"] and g["kl_to_base"] > 0
    assert g["layer_map"] == w["layer_map"] == [0, 1]
    shards = [n for n in w["files"] if n.endswith(".safetensors")]
    assert all(g["files"][n] == w["files"][n] for n in shards)
    # applied outside any journal, the base is unknown: no KL (as documented), the same weights
    edited = HookedLlama.from_hf(tiny_hf("gqa"))
    plan.apply(edited)
    bare = S.export(edited, tmp_path / "bare")
    assert bare.kl_to_base is None and bare.manifest["base"]["sha256"] is None
    assert all(bare.files[n] == w["files"][n] for n in shards)


def test_a_model_offloaded_to_disk_exports_the_same_checkpoint(tmp_path):
    """A model loaded with every layer on disk (accelerate's offload: its parameters on the meta device)
    exports tensor by tensor from the offload, to the same bytes as the model in memory, and passes the
    same checks (hashes, reloaded logits, base hash)."""
    tiny_hf("gqa").save_pretrained(tmp_path / "ckpt")
    full = HookedLlama.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32)
    off = HookedLlama.from_pretrained(
        str(tmp_path / "ckpt"), dtype=torch.float32, device_map="auto", max_memory={"cpu": 60_000}
    )
    assert off.model.layers[1].mlp.down_proj.weight.is_meta  # really offloaded
    a, b = S.export(full, tmp_path / "a"), S.export(off, tmp_path / "b")
    assert b.max_abs_logit_diff <= 1e-6 and b.manifest["base"] == a.manifest["base"]
    assert {k: v for k, v in b.files.items() if k.endswith(".safetensors")} == {
        k: v for k, v in a.files.items() if k.endswith(".safetensors")
    }


@pytest.mark.parametrize("kind", ["tied", "bias"])
def test_the_reload_check_reads_embeddings_and_output_matrix_in_slices_and_equals_transformers(
    tmp_path, monkeypatch, kind
):
    """The export's reload check never holds the embedding or output matrix whole: it reads them a few rows
    at a time from the tensor accelerate's offload index names (the embeddings when transformers ties them),
    and its logits equal transformers' own disk-offloaded forward."""
    import tempfile

    from hooks import checkpoint
    from surgery.export import hf as H
    from surgery.export.probes import Probe, hf_logits

    hf = tiny_hf(kind)
    hf.save_pretrained(tmp_path / "ckpt")
    back = H.reload_hf(tmp_path / "ckpt", torch.float32, device_map={"": "disk"}, offload_folder=tempfile.mkdtemp())
    g = torch.Generator().manual_seed(0)
    probes = [Probe(None, torch.randint(0, hf.config.vocab_size, (1, n), generator=g)) for n in (5, 9, 3)]
    reads = []
    real = checkpoint.Checkpoint.read
    monkeypatch.setattr(
        checkpoint.Checkpoint,
        "read",
        lambda self, name, rows=None: reads.append((name, rows)) or real(self, name, rows),
    )
    monkeypatch.setattr(H, "ROWS_PER_SLICE", 48)
    got = H.streamed_logits(back, tmp_path / "ckpt", probes)
    want = hf_logits(back, probes)
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) <= 1e-5
    head = "model.embed_tokens.weight" if kind == "tied" else "lm_head.weight"
    assert [r for n, r in reads if n == head][-3:] == [(0, 48), (48, 96), (96, 128)]
    assert all(r is not None and r[1] - r[0] <= 48 for _, r in reads)
