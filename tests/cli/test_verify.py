"""``verify`` detects every change to an export — each file, files added, the manifest's own edit list,
probe records and hashes — and every failure is one line naming what changed (``scalpel verify``: exit 2)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import surgery as S
from _core import writer as W
from hooks import HookedLlama
from surgery import _manifest as M
from tests.helpers import run, tiny_hf


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify2") / "out"
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    S.export(model, out, edits=[S.ZeroHeads(1, [2]), S.ScaleNeurons(0, [3], 2.0)], max_shard_size="60KB")
    return out


@pytest.fixture
def out(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def manifest_of(out: Path) -> dict:
    return json.loads((out / M.MANIFEST).read_text())


def write_manifest(out: Path, manifest: dict, *, reseal: bool = False) -> None:
    (out / M.MANIFEST).write_text(json.dumps(M.seal(manifest) if reseal else manifest, indent=1))


def one_line_error(out: Path, error=S.IntegrityError, **kw) -> str:
    with pytest.raises(error) as info:
        S.verify(out, **kw)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_the_manifest_hash_is_sha256_of_its_canonical_body(exported):
    manifest = manifest_of(exported)
    assert manifest["version"] == 2
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert manifest["manifest_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    result = S.verify(exported)
    assert result["ok"] and result["manifest_version"] == 2 and result["note"] is None


def test_every_file_changed_is_named(exported, tmp_path):
    names = sorted(manifest_of(exported)["files"])
    assert len(names) >= 6  # config, generation config, index, shards, probe logits
    for i, name in enumerate(names):
        out = Path(shutil.copytree(exported, tmp_path / f"c{i}"))
        data = bytearray((out / name).read_bytes())
        data[-1] ^= 0x01
        (out / name).write_bytes(bytes(data))
        assert one_line_error(out, reload=False).startswith(f"{name}: sha256 mismatch")


def test_a_file_added_or_removed_is_named(out):
    (out / "extra.safetensors").write_bytes(b"x")
    assert one_line_error(out) == (
        f"extra.safetensors is in {out} but not in its scalpel_manifest.json; it was "
        "added after export, remove it or re-export"
    )
    (out / "extra.safetensors").unlink()
    (out / "config.json").unlink()
    assert one_line_error(out).startswith("config.json is missing from")


def drop_an_edit(m):
    m["edits"].pop()


def change_a_head(m):
    m["edits"][0]["heads"] = [3]


def change_probe_ids(m):
    m["probes"][0]["input_ids"][0] += 1


def change_top5(m):
    m["probes"][1]["top5"][0]["id"] += 1


def swap_file_hashes(m):
    a, b = sorted(m["files"])[:2]
    m["files"][a], m["files"][b] = m["files"][b], m["files"][a]


def loosen_tolerance(m):
    m["verification"]["tolerance"] = 10.0


def change_base(m):
    m["base"]["source"] = "someone/else"


def drop_the_self_hash(m):
    del m["manifest_sha256"]


@pytest.mark.parametrize(
    "change",
    [
        drop_an_edit,
        change_a_head,
        change_probe_ids,
        change_top5,
        swap_file_hashes,
        loosen_tolerance,
        change_base,
        drop_the_self_hash,
    ],
)
def test_every_change_to_the_manifest_is_detected(out, change):
    manifest = manifest_of(out)
    change(manifest)
    write_manifest(out, manifest)
    message = one_line_error(out, reload=False)
    if change is drop_the_self_hash:
        assert message.endswith(
            "has no valid manifest_sha256 (version 2 manifests carry one); the manifest was modified, re-export"
        )
    else:
        assert message.startswith("scalpel_manifest.json: its contents changed after export (sha256 of its body ")
        assert message.endswith(
            "its edit list, probe records or file hashes were edited; restore the original manifest or re-export"
        )


def test_reformatting_the_manifest_is_not_a_change(out):
    manifest = manifest_of(out)
    (out / M.MANIFEST).write_text(json.dumps(dict(reversed(list(manifest.items()))), indent=4))
    assert S.verify(out)["ok"]


def test_changed_weights_with_every_hash_redone_fail_reload_parity(out):
    shard = next(out.glob("model-00001-of-*.safetensors"))
    tensors = load_file(str(shard))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    manifest = manifest_of(out)
    manifest["files"][shard.name] = W.sha256_file(shard)
    write_manifest(out, manifest, reseal=True)
    assert "reloaded logits differ from those recorded at export by" in one_line_error(out, S.ParityError)


def test_changed_probe_values_with_every_hash_redone_fail_reload_parity(out):
    path = out / M.PROBE_LOGITS
    stored = load_file(str(path))
    stored["probe_2"] = stored["probe_2"].clone()
    stored["probe_2"][-1, 5] += 1e-3  # one logit, by ten times the fp32 tolerance
    save_file(stored, str(path), metadata={"format": "pt"})
    manifest = manifest_of(out)
    manifest["files"][M.PROBE_LOGITS] = W.sha256_file(path)
    write_manifest(out, manifest, reseal=True)
    message = one_line_error(out, S.ParityError)
    diff = float(message.split(" by ")[1].split(" ")[0])
    assert abs(diff - 1e-3) < 1e-5


def as_version_1(manifest: dict) -> dict:
    manifest = dict(manifest)
    del manifest["manifest_sha256"]
    manifest["version"] = 1
    return manifest


def test_a_version_1_manifest_still_verifies_with_a_note(out, capsys):
    write_manifest(out, as_version_1(manifest_of(out)))
    result = S.verify(out)
    assert result["ok"] and result["manifest_version"] == 1 and result["note"] == M.V1_NOTE
    code, text, err = run(["verify", out], capsys)
    assert code == 0 and "manifest version 1 holds no hash of itself" in text, err
    # its file hashes are still checked
    with open(out / "config.json", "a") as f:
        f.write(" ")
    assert one_line_error(out).startswith("config.json: sha256 mismatch")


@pytest.mark.parametrize(
    "malform, message",
    [
        (
            lambda m: m.update(version=3),
            "is manifest version 3, newer than this llama-scalpel reads (up to 2); upgrade llama-scalpel to verify it",
        ),
        (lambda m: m.update(version="2"), "\"version\" is '2', not a manifest version"),
        (lambda m: m.update(format="other"), "is not a llama-scalpel manifest"),
        (lambda m: m.update(files=[]), '"files" is missing or not a map of file name to sha256'),
        (lambda m: m["files"].update({"../escape": "0" * 64}), "file name '../escape' is not a plain file name"),
        (lambda m: m["files"].update({"config.json": "abc"}), "the sha256 of config.json is 'abc', not 64 hex digits"),
        (lambda m: m["files"].pop(M.PROBE_LOGITS), '"files" lacks scalpel_probe_logits.safetensors'),
        (lambda m: m.update(probes={}), '"probes" is missing or empty'),
        (lambda m: m["probes"][0].update(input_ids="1 2"), "probes[0].input_ids is not a non-empty list of token ids"),
        (lambda m: m["probes"][0].update(top5=None), "probes[0].top5 is not a list"),
        (lambda m: m.update(dtype="float8"), "\"dtype\" is 'float8', not one of float32, bfloat16, float16"),
        (lambda m: m["verification"].update(tolerance=-1), "verification.tolerance is -1, not a positive number"),
        (lambda m: m.update(edits={}), '"edits" is not a list'),
    ],
)
def test_a_malformed_manifest_is_one_line_never_a_raw_error(out, malform, message):
    """Malformed yet sealed (a buggy or foreign writer): every field verify reads is checked."""
    manifest = manifest_of(out)
    malform(manifest)
    write_manifest(out, manifest, reseal=manifest.get("version") != 3)
    assert message in one_line_error(out)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{", "is not valid JSON at line 1: Expecting property name enclosed in double quotes"),
        (b"\xff\xfe{}", "is not UTF-8 (byte 0xff at offset 0)"),
        (b"[1, 2]", "is not a llama-scalpel manifest"),
    ],
)
def test_an_unreadable_manifest_is_one_line(out, content, message, capsys):
    (out / M.MANIFEST).write_bytes(content)
    assert message in one_line_error(out)
    code, text, err = run(["verify", out], capsys)
    assert (code, text) == (2, "") and message in err and err.count("\n") == 1


def test_probe_logits_that_do_not_match_the_probes_are_named(out):
    path = out / M.PROBE_LOGITS
    stored = load_file(str(path))
    del stored["probe_1"]
    save_file(stored, str(path), metadata={"format": "pt"})
    manifest = manifest_of(out)
    manifest["files"][M.PROBE_LOGITS] = W.sha256_file(path)
    write_manifest(out, manifest, reseal=True)
    assert one_line_error(out).startswith(
        "scalpel_probe_logits.safetensors: probe_1 is None, but the manifest's probe 1 has"
    )


def test_a_reload_failure_is_one_line(out):
    """Hashes all consistent (version 1), but a config transformers cannot build a model from."""
    config = json.loads((out / "config.json").read_text())
    config["num_attention_heads"] = 5  # 64 is not divisible by 5
    (out / "config.json").write_text(json.dumps(config))
    manifest = as_version_1(manifest_of(out))
    manifest["files"]["config.json"] = W.sha256_file(out / "config.json")
    write_manifest(out, manifest)
    message = one_line_error(out, S.ParityError)
    assert message.startswith(f"{out}: transformers could not reload and run it (")


@pytest.mark.parametrize(
    "bad, message",
    [
        (3, "verify takes the directory surgery.export wrote (a str or pathlib.Path), got 3"),
        ("", "verify takes the directory surgery.export wrote (a str or pathlib.Path), got ''"),
    ],
)
def test_verify_of_a_non_path(bad, message):
    with pytest.raises(S.IntegrityError) as info:
        S.verify(bad)
    assert str(info.value) == message


def test_verify_of_a_file(out):
    assert one_line_error(out / "config.json") == (
        f"{out / 'config.json'} is not a directory; pass the directory surgery.export wrote"
    )
