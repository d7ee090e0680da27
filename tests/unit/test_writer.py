"""The one staged writer (``_core.writer``): validate the whole call, stage beside the target, verify,
move into place exclusively; replace only what llama-scalpel wrote and what is unchanged since."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from _core import writer as W
from _core.errors import ExportError, ExportWriteError, InputError, OutputError
from _core.writer import Output, cache_key, cached, check_outputs, writable, write_dir, write_file


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Records go to a private $SCALPEL_CACHE (the user's is never touched by the tests)."""
    monkeypatch.setenv("SCALPEL_CACHE", str(tmp_path / "cache"))


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (the record store excluded): a snapshot of the disk."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "cache" not in p.relative_to(root).parts
    }


def litter(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".scalpel-*")]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- single files
def test_a_new_file_is_written_whole_with_the_usual_mode(tmp_path):
    target = tmp_path / "sub" / "ranking.csv"
    assert write_file(target, "a,b\n1,2\n", kind="csv") == target
    assert target.read_bytes() == b"a,b\n1,2\n"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert litter(tmp_path) == []
    record = json.loads(W._record_file(target).read_text())
    assert record["sha256"] == sha(b"a,b\n1,2\n") and record["path"] == os.path.realpath(target)


def test_text_formats_carry_a_self_checking_marker(tmp_path):
    html = write_file(tmp_path / "r.html", "<html></html>", kind="report")
    data = html.read_bytes()
    body, last = data[: data.rindex(b"\n", 0, len(data) - 1) + 1], data.splitlines()[-1]
    assert body == b"<html></html>\n"
    assert last == f"<!-- llama-scalpel report sha256:{sha(body)} -->".encode()
    plan = write_file(tmp_path / "p.yaml", "edits: []\n", kind="plan")
    assert plan.read_text().splitlines()[-1] == f"# llama-scalpel plan sha256:{sha(b'edits: []' + bytes([10]))}"
    assert not W._record_file(html).exists()  # the marker is the proof: no record needed


def test_an_existing_file_needs_overwrite_and_must_be_ours_and_unchanged(tmp_path):
    path = tmp_path / "r.html"
    write_file(path, "<p>one</p>\n", kind="report")
    with pytest.raises(OutputError) as info:
        write_file(path, "<p>two</p>\n", kind="report")
    assert str(info.value) == f"{path} already exists; pass overwrite=True to replace it"
    assert info.value.param == "overwrite"
    write_file(path, "<p>two</p>\n", kind="report", overwrite=True)
    assert path.read_text().startswith("<p>two</p>\n")
    path.write_text(path.read_text().replace("two", "TWO"))  # the user edits the report
    before = path.read_bytes()
    with pytest.raises(OutputError) as info:
        write_file(path, "<p>three</p>\n", kind="report", overwrite=True)
    assert str(info.value) == (
        f"{path} was not written by llama-scalpel, or was changed since; overwriting replaces only an unchanged "
        "file llama-scalpel wrote or an empty file, move it out or pick another path"
    )
    assert path.read_bytes() == before and litter(tmp_path) == []


def test_a_file_without_a_marker_is_ours_only_while_its_record_matches(tmp_path):
    path = tmp_path / "t.csv"
    write_file(path, "x\n", kind="csv")
    write_file(path, "y\n", kind="csv", overwrite=True)  # the record matches: replaced
    assert path.read_text() == "y\n"
    path.write_text("z\n")  # same size, other bytes
    with pytest.raises(OutputError, match="was not written by llama-scalpel, or was changed since"):
        write_file(path, "w\n", kind="csv", overwrite=True)
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("data of the user\n")
    with pytest.raises(OutputError):
        write_file(theirs, "w\n", kind="csv", overwrite=True)
    assert theirs.read_text() == "data of the user\n"
    empty = tmp_path / "empty.csv"
    empty.touch()
    write_file(empty, "w\n", kind="csv", overwrite=True)  # an empty file loses nothing
    assert empty.read_text() == "w\n"


def test_links_and_directories_are_never_replaced_by_a_file(tmp_path):
    (tmp_path / "real.csv").write_text("mine\n")
    (tmp_path / "link.csv").symlink_to(tmp_path / "real.csv")
    with pytest.raises(OutputError, match="is a symbolic link; overwriting never replaces links"):
        write_file(tmp_path / "link.csv", "x\n", kind="csv", overwrite=True)
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(OutputError, match="exists and is a directory, not a CSV file"):
        write_file(tmp_path / "d.csv", "x\n", kind="csv", overwrite=True)
    assert (tmp_path / "real.csv").read_text() == "mine\n"


def test_a_failed_verify_leaves_nothing(tmp_path):
    def refuse(staged: Path) -> None:
        assert staged.read_bytes().startswith(b"data") and staged.name.startswith(".scalpel-tmp-out.json-")
        raise InputError("verification failed")

    with pytest.raises(InputError, match="verification failed"):
        write_file(tmp_path / "new" / "deeper" / "out.json", "data", kind="json", verify=refuse)
    assert not (tmp_path / "new").exists()  # the directories it created are gone too


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(tmp, data):
        tmp.write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(W, "_stage_bytes", full)
    (tmp_path / "r").mkdir()
    with pytest.raises(ExportWriteError) as info:
        write_file(tmp_path / "r" / "lens.html", "x" * 5000, kind="report", param="report")
    assert str(info.value) == (
        f"no space left on the device of {tmp_path / 'r'} (the report needs about 5 KB); free some space or pick "
        "a report on another disk; nothing was written"
    )
    assert info.value.errno == errno.ENOSPC and list((tmp_path / "r").iterdir()) == []


def test_a_file_that_appears_meanwhile_is_never_replaced(tmp_path):
    """Eight threads write the same new path at once: one wins, the others leave it as it is."""
    target = tmp_path / "out.json"
    barrier = threading.Barrier(8)
    results: list[object] = []

    def one(i: int) -> None:
        def wait(staged: Path) -> None:
            barrier.wait(timeout=30)  # every thread has validated and staged before any moves

        try:
            write_file(target, f'{{"writer": {i}}}', kind="json", verify=wait)
            results.append(i)
        except OutputError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, int)]
    assert len(winners) == 1 and json.loads(target.read_text()) == {"writer": winners[0]}
    assert all(
        r == f"{target} appeared while this write ran (another write to the same place?); it was left as it is "
        "and nothing was written; pick another path"
        for r in results
        if isinstance(r, str)
    )
    assert litter(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    stale = tmp_path / ".scalpel-tmp-out.csv-999999999-abcd1234"
    stale.write_text("left by a SIGKILL")
    alive = tmp_path / f".scalpel-tmp-out.csv-{os.getpid()}-abcd1234"
    alive.write_text("this process's own")
    write_file(tmp_path / "out.csv", "x\n", kind="csv")
    assert not stale.exists() and alive.exists()


# --------------------------------------------------------------------------- directories
def test_a_directory_is_sealed_with_a_manifest(tmp_path):
    with write_dir(tmp_path / "acts", kind="activations") as stage:
        stage.write_text("index.json", "{}")
        stage.write_bytes("sub/a.bin", b"\x00\x01")
        stage.meta["key"] = "k1"
    manifest = json.loads((tmp_path / "acts" / W.MANIFEST).read_text())
    assert manifest["files"] == {"index.json": sha(b"{}"), "sub/a.bin": sha(b"\x00\x01")}
    assert manifest["format"] == "llama-scalpel-manifest" and manifest["kind"] == "activations"
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert manifest["manifest_sha256"] == sha(canonical)
    assert stage.result.files == manifest["files"] and stage.result.path == tmp_path / "acts"
    assert cached(tmp_path / "acts", "k1") and not cached(tmp_path / "acts", "k2")


def test_a_directory_is_replaced_only_when_ours_and_unchanged(tmp_path):
    out = tmp_path / "out"
    with write_dir(out, kind="sae") as stage:
        stage.write_text("cfg.json", "{}")
    with write_dir(out, kind="sae", overwrite=True) as stage:
        stage.write_text("cfg.json", '{"v": 2}')
    assert (out / "cfg.json").read_text() == '{"v": 2}'
    (out / "cfg.json").write_text('{"v": 3}')  # edited by hand
    with pytest.raises(OutputError) as info:
        with write_dir(out, kind="sae", overwrite=True):
            pytest.fail("the body must not run")
    assert str(info.value) == (
        f"{out} holds 'cfg.json', changed since llama-scalpel wrote it (its sha256 is not the one "
        "scalpel_manifest.json records); overwriting would lose the change, move it out or pick another path"
    )
    (out / "cfg.json").write_text('{"v": 2}')
    (out / "notes.md").write_text("mine")  # an unlisted file
    with pytest.raises(OutputError, match="holds 'notes.md', which its scalpel_manifest.json does not list"):
        write_dir(out, kind="sae", overwrite=True).__enter__()
    (out / "notes.md").unlink()
    manifest = json.loads((out / W.MANIFEST).read_text())
    manifest["kind"] = "export"  # the manifest itself edited
    (out / W.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OutputError, match="its scalpel_manifest.json was changed after llama-scalpel wrote it"):
        write_dir(out, kind="sae", overwrite=True).__enter__()
    assert litter(tmp_path) == []


def test_a_failing_body_leaves_the_old_directory(tmp_path):
    out = tmp_path / "out"
    with write_dir(out, kind="dir") as stage:
        stage.write_text("a.txt", "old")
    before = tree(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with write_dir(out, kind="dir", overwrite=True) as stage:
            stage.write_text("a.txt", "new")
            raise RuntimeError("boom")
    assert tree(tmp_path) == before and litter(tmp_path) == []


def test_writer_checks_run_on_the_staged_copy(tmp_path):
    seen = []
    with write_dir(tmp_path / "x", kind="dir") as stage:
        stage.write_text("a.txt", "1")
        stage.verify(lambda staged: seen.append(sorted(p.name for p in staged.iterdir())))
    assert seen == [["a.txt", W.MANIFEST]]
    with pytest.raises(ValueError, match="verify said no"):
        with write_dir(tmp_path / "y", kind="dir") as stage:
            stage.verify(lambda staged: (_ for _ in ()).throw(ValueError("verify said no")))
    assert not (tmp_path / "y").exists() and litter(tmp_path) == []


# --------------------------------------------------------------------------- validating a whole call
def test_check_outputs_refuses_clashes_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("hi\n")
    Path("model").mkdir()
    cases = [
        ([Output("a", "export"), Output("a", "plan")], [], "a and a name the same path; give each output its own"),
        ([Output("a", "export"), Output("a/r.html", "report")], [], "a/r.html is inside a; write it elsewhere"),
        ([Output("prompts.txt", "csv", True)], ["prompts.txt"], "prompts.txt is also an input of this call"),
        ([Output(".", "export", True)], ["prompts.txt"], ". holds the input prompts.txt; replacing it would delete"),
        ([Output("model/out", "export")], ["model"], "model/out is inside the input model; write it elsewhere"),
        ([Output(" ", "report", param="report")], [], "report is empty; name the file or directory to write"),
    ]
    for outputs, inputs, message in cases:
        with pytest.raises(OutputError) as info:
            check_outputs(outputs, inputs=inputs)
        assert str(info.value).startswith(message), (outputs, str(info.value))
    check_outputs([Output("a", "export"), Output("a.plan.yaml", "plan"), None], inputs=["prompts.txt", None])


def test_an_implied_output_that_is_not_ours_is_refused_first(tmp_path, monkeypatch):
    """Issue 25: `--out abl --overwrite` replaced an unrelated abl.plan.yaml; one check_outputs call says no."""
    monkeypatch.chdir(tmp_path)
    Path("abl.plan.yaml").write_text("my notes: do not lose\n")
    outputs = [
        Output("abl", "export", True, "out"),
        Output("abl.plan.yaml", "plan", True, "out", shown="abl.plan.yaml (the plan written beside abl)"),
    ]
    with pytest.raises(OutputError) as info:
        check_outputs(outputs)
    assert str(info.value).startswith("abl.plan.yaml (the plan written beside abl) was not written by llama-scalpel")
    assert info.value.param == "out" and Path("abl.plan.yaml").read_text() == "my notes: do not lose\n"


def test_an_unwritable_place_is_refused_before_any_work(tmp_path, monkeypatch):
    real = os.mkdir
    locked = (tmp_path / "locked").resolve()
    locked.mkdir()

    def refuse(path, *args, **kwargs):
        if Path(os.path.abspath(path)).parent.resolve() == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(OutputError) as info:
        check_outputs([Output(locked / "r.html", "report", param="report")])
    assert str(info.value) == (
        f"{locked / 'r.html'}: cannot write in {locked} (permission denied); pick a writable location or fix the "
        "directory's permissions"
    )


def test_writable_says_why_and_is_silent_for_new_paths(tmp_path):
    assert writable(tmp_path / "new", kind="export", overwrite=False) is None
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("x")
    assert writable(tmp_path / "old", kind="export", overwrite=False).endswith("pass overwrite=True to replace it")
    assert "is not an export of llama-scalpel" in writable(tmp_path / "old", kind="export", overwrite=True)
    (tmp_path / "empty").mkdir()
    assert writable(tmp_path / "empty", kind="export", overwrite=True) is None


def test_errors_are_input_and_export_errors():
    assert issubclass(OutputError, InputError) and issubclass(OutputError, ExportError)


# --------------------------------------------------------------------------- cache keys
def test_cache_keys_follow_what_made_the_cache():
    import torch

    a = cache_key(model="m1", texts=["a", "b"], hook="blocks.0.hook_resid_post", settings={"k": 1})
    assert a == cache_key(settings={"k": 1}, hook="blocks.0.hook_resid_post", texts=["a", "b"], model="m1")
    assert a != cache_key(model="m1", texts=["b", "a"], hook="blocks.0.hook_resid_post", settings={"k": 1})
    assert a != cache_key(model="m2", texts=["a", "b"], hook="blocks.0.hook_resid_post", settings={"k": 1})
    t = torch.arange(6.0)
    assert cache_key(x=t) == cache_key(x=t.clone()) != cache_key(x=t + 1e-6)
    assert cache_key(x=t) != cache_key(x=t.to(torch.float64))


def test_tensors_sha256_is_the_state_hash_exports_record(tiny):
    """One format for a model's weights hash: name, dtype, shape and raw bytes of each tensor in name order."""
    h = hashlib.sha256()
    state = tiny.state_dict()
    for name in sorted(state):
        t = state[name].detach().contiguous()
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    assert W.tensors_sha256(state) == h.hexdigest()
    assert W.tensors_sha256(list(reversed(list(state.items())))) == h.hexdigest()  # any order in, name order used
