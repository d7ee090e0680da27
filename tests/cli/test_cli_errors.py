"""``scalpel`` on bad input: exit code 2, one line on stderr, nothing on stdout, nothing written;
runtime failures exit 1; ``--debug`` shows the traceback; progress bars stay silent off a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from tests.helpers import build_tiny, run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-errors") / "tiny-llama")


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working directory with a prompts file, a good plan, a bad plan, a bad YAML and an existing output."""
    (tmp_path / "prompts.txt").write_text("When Mary and John went to the store, John gave a drink to\t Mary\t John\n")
    (tmp_path / "plan.yaml").write_text("edits:\n  - {edit: ZeroHeads, layer: 1, heads: [0]}\n")
    (tmp_path / "bad_plan.yaml").write_text("edits:\n  - {edit: ZeroHeads, layer: 1, heads: [0]\n")
    (tmp_path / "unknown_edit.yaml").write_text("edits:\n  - {edit: ZeroHedas, layer: 1, heads: [0]}\n")
    (tmp_path / "bad.yaml").write_text("model: default\nanalyses:\n  - lens: {prompt: 'x'\n")
    (tmp_path / "wrong_key.yaml").write_text("model: default\nanalyses:\n  - heads: {}\nreprot: r.html\n")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("keep")
    (tmp_path / "old.html").write_text("old report")
    (tmp_path / "dup_key.yaml").write_text("edits:\n  - {edit: ZeroHeads, layer: 1, heads: [0]}\nedits: []\n")
    (tmp_path / "extra_key.yaml").write_text("edits:\n  - {edit: ZeroHeads, layer: 1, heads: [0]}\nmodel: x\n")
    (tmp_path / "latin1.yaml").write_bytes("# caf\xe9\nedits: []\n".encode("latin-1"))
    (tmp_path / "latin1_run.yaml").write_bytes("name: caf\xe9\nanalyses:\n  - heads: {}\n".encode("latin-1"))
    (tmp_path / "dup_run.yaml").write_text("analyses:\n  - heads: {}\nanalyses:\n  - info: {}\n")
    (tmp_path / "same.tsv").write_text("When Mary and John went to the store, John gave a drink to\t Mary\t Mary\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


ABLATE = ["ablate", "--prompts", "prompts.txt", "--metric", "logit-diff"]
BAD = {
    "unknown command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "unknown flag": (["info", "--frob"], "unrecognized arguments: --frob"),
    "missing argument": (["lens"], "the following arguments are required: PROMPT"),
    "bad choice": (["sweep", "--component", "tokens", "--prompt", "x"], "invalid choice: 'tokens'"),
    "missing prompts file": (["ablate", "--heads", "1.0", "--prompts", "nope.txt"], "no such prompts file: nope.txt"),
    "missing experiment": (["run", "nope.yaml"], "no such experiment file: nope.yaml"),
    "missing plan": (["edit", "nope.yaml", "--out", "o"], "no such plan file"),
    "missing model": (["info", "--model", "no/such-model"], "not in the local Hugging Face cache"),
    "malformed experiment YAML": (["run", "bad.yaml"], "bad.yaml is not valid YAML at line"),
    "unknown experiment key": (["run", "wrong_key.yaml"], "unknown key 'reprot' (did you mean 'report'?)"),
    "malformed plan YAML": (["edit", "bad_plan.yaml", "--out", "o"], "bad_plan.yaml is not valid YAML"),
    "unknown edit kind": (["edit", "unknown_edit.yaml", "--out", "o"], "unknown edit kind 'ZeroHedas'"),
    "bad head spec": (ABLATE + ["--heads", "5.x"], "bad head spec '5.x': write LAYER.HEAD"),
    "head layer out of range": (
        ABLATE + ["--heads", "99.0"],
        "--heads 99.0: layer 99 is out of range; the model has 3 layers",
    ),
    "head out of range": (ABLATE + ["--heads", "1.9"], "--heads 1.9: head 9 is out of range"),
    "bad neuron spec": (ABLATE + ["--neurons", "12"], "bad neuron spec '12'"),
    "neuron out of range": (
        ABLATE + ["--neurons", "1:4051"],
        "--neurons 1:4051: neuron 4051 is out of range; the layer has 96 neurons (0..95)",
    ),
    "nothing to ablate": (ABLATE, "ablate needs something to ablate"),
    "multi-token answer": (
        [
            "ablate",
            "--heads",
            "1.0",
            "--prompt",
            "When Mary",
            "--metric",
            "logit-diff",
            "--answers",
            " Maryland",
            " John",
        ],
        "answer ' Maryland' is",
    ),
    "missing answers": (
        ["ablate", "--heads", "1.0", "--prompt", "When Mary", "--metric", "logit-diff"],
        "needs a correct answer for every prompt",
    ),
    "existing output dir": (
        ABLATE + ["--heads", "1.0", "--out", "exists"],
        "--out exists already exists; pass --overwrite",
    ),
    "existing report": (ABLATE + ["--heads", "1.0", "--report", "old.html"], "--report old.html already exists"),
    "existing edit output": (["edit", "plan.yaml", "--out", "exists"], "--out exists already exists"),
    "neurons sweep without layers": (["sweep", "--component", "neurons", "--prompt", "a b c"], "needs --layers"),
    "lens position out of range": (
        ["lens", "When Mary", "--positions", "0,99"],
        "position 99 is out of range; the prompt has 2 tokens (0..1, or -2..-1)",
    ),
    "bad steer spec": (["generate", "hi", "--steer", "x:v.pt"], "bad steer spec 'x:v.pt'"),
    "missing steer vector": (["generate", "hi", "--steer", "1:v.pt:2"], "no such vector file: v.pt"),
    "verify a non-export": (["verify", "exists"], "has no scalpel_manifest.json"),
    # issue 12
    "overwrite of a directory that is not an export": (
        ABLATE + ["--heads", "1.0", "--out", ".", "--overwrite"],
        "--out . holds the input prompts.txt; replacing it would delete that input, pick another out_dir",
    ),
    "overwrite of a directory of the user's files": (
        ["ablate", "--heads", "1.0", "--prompt", "When Mary", "--out", "exists", "--overwrite"],
        "--out exists is not an export of llama-scalpel (it holds 'keep.txt' and no valid scalpel_manifest.json); "
        "overwriting replaces only a previous export or an empty directory, pick another out_dir",
    ),
    "--csv and --report the same file": (
        ["sweep", "--component", "layers", "--prompt", "a b", "--csv", "r.html", "--report", "r.html"],
        "--csv r.html and --report r.html name the same path",
    ),
    "--report inside --out": (
        ABLATE + ["--heads", "1.0", "--out", "o", "--report", "o/r.html"],
        "--report o/r.html is inside --out o; write it elsewhere",
    ),
    "--out and --report the same": (
        ABLATE + ["--heads", "1.0", "--out", "o", "--report", "o"],
        "--out o and --report o name the same path",
    ),
    "empty --out": (ABLATE + ["--heads", "1.0", "--out", ""], "--out is empty; name the file or directory to write"),
    "empty --prompts": (["ablate", "--heads", "1.0", "--prompts", ""], "--prompts is empty; name a prompts file"),
    "duplicated plan key": (
        ["edit", "dup_key.yaml", "--out", "o"],
        "dup_key.yaml is not valid YAML at line 3: duplicate key 'edits'",
    ),
    "unknown plan key": (
        ["edit", "extra_key.yaml", "--out", "o"],
        "extra_key.yaml: unknown key 'model' in the plan; a plan has only format, version and edits",
    ),
    "plan not UTF-8": (
        ["edit", "latin1.yaml", "--out", "o"],
        "latin1.yaml is not UTF-8 text (byte 0xe9 at offset 5); save it as UTF-8",
    ),
    "experiment not UTF-8": (
        ["run", "latin1_run.yaml"],
        "latin1_run.yaml is not UTF-8 text (byte 0xe9 at offset 9); save it as UTF-8",
    ),
    "duplicated experiment key": (["run", "dup_run.yaml"], "dup_run.yaml is not valid YAML at line 3: duplicate key"),
    "identical answers": (
        ["ablate", "--heads", "1.0", "--prompts", "same.tsv", "--metric", "logit-diff"],
        "same.tsv:1: the correct and incorrect answers are the same (' Mary')",
    ),
    "ignored --temperature": (
        ["generate", "hi", "--temperature", "0.5"],
        "--temperature has no effect here; add --sample, or leave --temperature out",
    ),
    "ignored --overwrite": (["info", "--overwrite"], "--overwrite has no effect"),
    "ignored --gguf-dtype": (
        ["edit", "plan.yaml", "--out", "o", "--gguf-dtype", "f16"],
        "--gguf-dtype has no effect here; add --format gguf",
    ),
    "--device cuda without a GPU": (
        ["info", "--device", "cuda"],
        "--device cuda: no CUDA GPU is available here; use --device cpu",
    ),
    "sampling temperature 0": (
        ["generate", "hi", "--sample", "--temperature", "0"],
        "temperature must be a finite number > 0, got 0.0; leave out --sample",
    ),
    "sampling top-p above 1": (["generate", "hi", "--sample", "--top-p", "2"], "--top-p must be a number in (0, 1]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tiny_dir, work, capsys):
    argv, message = BAD[case]
    if argv[0] in ("info", "generate", "lens", "ablate", "sweep", "edit") and "--model" not in argv:
        argv = argv + ["--model", str(tiny_dir)]
    before = snapshot(work)
    code, out, err = run(argv, capsys)
    assert code == 2, err
    assert out == ""
    assert err.startswith("scalpel: error: ") and err.count("\n") == 1, err
    assert message in err
    assert snapshot(work) == before


def test_tampered_checkpoint_fails_verify_with_exit_2(tiny_dir, work, capsys):
    code, _, err = run(["edit", "plan.yaml", "--model", tiny_dir, "--out", "edited"], capsys)
    assert code == 0, err
    assert run(["verify", "edited"], capsys)[0] == 0
    with open(work / "edited" / "config.json", "a") as f:
        f.write(" ")
    code, out, err = run(["verify", "edited"], capsys)
    assert (code, out) == (2, "") and "config.json: sha256 mismatch" in err and err.count("\n") == 1


def test_runtime_failure_exits_1_and_debug_shows_the_traceback(tiny_dir, monkeypatch, capsys):
    from _cli.commands import info

    def broken(args, ctx):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(info, "run", broken)
    code, out, err = run(["info", "--model", tiny_dir], capsys)
    assert (code, out, err) == (1, "", "scalpel: error: RuntimeError: disk on fire\n")
    code, _, err = run(["info", "--model", tiny_dir, "--debug"], capsys)
    assert (
        code == 1
        and "Traceback (most recent call last)" in err
        and err.endswith("scalpel: error: RuntimeError: disk on fire\n")
    )


def test_overwrite_replaces_only_a_previous_export(tiny_dir, work, capsys):
    """Issue 12 (1): ``--out . --overwrite`` in a directory of the user's files deleted them."""
    (work / "thesis.txt").write_text("years of work")
    before = snapshot(work)
    code, _, err = run(["edit", "plan.yaml", "--model", tiny_dir, "--out", "exists", "--overwrite"], capsys)
    assert code == 2 and err == (
        "scalpel: error: --out exists is not an export of llama-scalpel (it holds 'keep.txt' "
        "and no valid scalpel_manifest.json); overwriting replaces only a previous export or "
        "an empty directory, pick another out_dir\n"
    )
    assert snapshot(work) == before
    assert run(["edit", "plan.yaml", "--model", tiny_dir, "--out", "edited"], capsys)[0] == 0
    code, _, err = run(["edit", "plan.yaml", "--model", tiny_dir, "--out", "edited", "--overwrite"], capsys)
    assert code == 0, err
    assert (work / "edited" / "scalpel_manifest.json").is_file() and (
        work / "thesis.txt"
    ).read_text() == "years of work"


def test_help_and_version_exit_0(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and all(c in out for c in cli.COMMAND_HELP)
    code, out, _ = run(["ablate", "--help"], capsys)
    assert code == 0 and "--heads" in out and "--out" in out
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("scalpel ")


def test_every_help_has_a_worked_example_and_version_names_torch_and_transformers(capsys):
    import importlib.metadata as md

    for name in cli.COMMAND_HELP:
        code, out, _ = run([name, "--help"], capsys)
        example = out.split("example (the default model):", 1)[-1].strip()
        assert code == 0 and example.startswith(f"scalpel {name}"), name
        assert "--model" not in example, name  # it runs on the default model
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == (
        f"scalpel {cli.parser_version()} (torch {md.version('torch')}, transformers {md.version('transformers')})"
    )
    code, out, _ = run(["--print-completion", "bash"], capsys)
    assert code == 0 and "complete" in out and all(c in out for c in cli.COMMAND_HELP) and "--batch-size" in out


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_subprocess_bad_input_has_no_traceback(tiny_dir, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "ablate",
            "--heads",
            "5.x",
            "--prompt",
            "hi",
            "--model",
            str(tiny_dir),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stdout == ""
        and proc.stderr
        == "scalpel: error: bad head spec '5.x': write LAYER.HEAD, e.g. 3.5 or L3H5 (several: 3.5,9.1)\n"
    )
    assert not (tmp_path / "o").exists()


def test_subprocess_sweep_prints_no_progress_bars_when_piped(tiny_dir, tmp_path):
    (tmp_path / "p.txt").write_text("When Mary and John went to the store\n")
    exe = [sys.executable, "-m", "cli"]
    proc = subprocess.run(
        exe
        + [
            "sweep",
            "--component",
            "neurons",
            "--layers",
            "2",
            "--prompts",
            str(tmp_path / "p.txt"),
            "--batch-size",
            "8",
            "--model",
            str(tiny_dir),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "it/s" not in proc.stderr and "%|" not in proc.stderr
    assert "96 neurons ranked by |mean effect| on loss" in proc.stdout


def test_a_bom_is_not_part_of_the_first_prompt(tiny_dir, work, capsys):
    """Issue 12 (4): a UTF-8 BOM at the start of a prompt file became part of the first prompt."""
    import json

    line = "When Mary and John went to the store, John gave a drink to\t Mary\t John\n"
    (work / "bom.tsv").write_bytes(b"\xef\xbb\xbf" + line.encode())
    results = []
    for name in ("prompts.txt", "bom.tsv"):
        code, out, err = run(
            ["ablate", "--heads", "1.0", "--prompts", name, "--metric", "logit-diff", "--json", "--model", tiny_dir],
            capsys,
        )
        assert code == 0, err
        results.append(json.loads(out)["prompts"][0])
    assert results[1]["prompt"] == results[0]["prompt"] == line.split("\t")[0]
    assert results[1]["base"] == results[0]["base"]


def test_run_checks_every_step_before_the_first_writes(tiny_dir, work, capsys):
    """Issue 12 (7): a bad head in step 2 was found after step 1 had written; two steps with one out clobbered
    each other; the error named overwrite=True."""
    step = "  - {heads: '1.0', metric: logit-diff, out: %s}\n"
    (work / "late_error.yaml").write_text(
        f"model: {tiny_dir}\nprompts: prompts.txt\nablations:\n"
        + step % "a"
        + "  - {heads: '1.9', metric: logit-diff}\n"
    )
    (work / "same_out.yaml").write_text(
        f"model: {tiny_dir}\nprompts: prompts.txt\nablations:\n" + step % "a" + step % "a"
    )
    before = snapshot(work)
    code, out, err = run(["run", "late_error.yaml"], capsys)
    assert (code, out) == (2, "") and err == (
        "scalpel: error: late_error.yaml: step 2 (ablations: ablate): heads 1.9: "
        "head 9 is out of range; the layer has 4 heads (0..3)\n"
    )
    code, out, err = run(["run", "same_out.yaml"], capsys)
    assert (code, out) == (2, "") and err == (
        "scalpel: error: step 2 out a and step 1 out a name the same path; give each output its own\n"
    )
    assert snapshot(work) == before and not (work / "a").exists()


class _Terminal:
    """Wraps a captured stream so that it claims to be a terminal."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self._stream, name)


def test_progress_shows_on_a_terminal_only_and_never_with_json(tiny_dir, work, monkeypatch, capsys):
    argv = ["ablate", "--model", tiny_dir, "--heads", "1.0", "--prompts", "prompts.txt", "--metric", "logit-diff"]
    code, out, err = run(argv, capsys)  # piped: tables only, nothing on stderr
    assert (code, err) == (0, "") and "ablating 1 head" in out
    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", _Terminal(sys.stdout))
        m.setattr(sys, "stderr", _Terminal(sys.stderr))
        code, out, err = run(argv, capsys)
        assert code == 0 and "loading the model" in err and "edited" in err and "ablating 1 head" in out
        code, out, err = run(argv + ["--json"], capsys)
        assert (code, err) == (0, "") and json.loads(out)["command"] == "ablate"


# --------------------------------------------------------------------------- library words, CLI spelling
def test_the_flag_spelling_comes_from_the_parser():
    from _cli.parser import build_parser, flag_spelling, subparser
    from _core.errors import MISSING

    parser = build_parser()
    generate = flag_spelling(subparser(parser, "generate"))
    assert generate("max_new_tokens", 40) == "--max-new-tokens 40" and generate("top_p", MISSING) == "--top-p"
    assert generate("do_sample", MISSING) == "--sample" and generate("do_sample", False) == "no --sample"
    assert generate("overwrite", True) == "--overwrite" and generate("prompt", MISSING) == "PROMPT"
    assert generate("no_such_parameter", 3) == "no_such_parameter=3"  # no flag: the Python spelling
    ablate = flag_spelling(subparser(parser, "ablate"))
    assert ablate("out_dir", "my dir") == "--out 'my dir'" and ablate("answers", [" Mary", "John"]) == (
        "--answers ' Mary' John"
    )


def test_a_library_message_names_the_flag_on_the_command_line_and_the_keyword_in_python(tiny_dir, capsys):
    """No message text is rewritten: the library spells the argument with ``arg()``, the CLI installs its
    spelling while the command runs."""
    from hooks import HookedLlama, InputError

    model = HookedLlama.from_pretrained(str(tiny_dir))
    with pytest.raises(InputError, match=r"plus max_new_tokens=200 needs .* lower max_new_tokens to at most") as err:
        model.generate("When Mary", 200)
    assert err.value.param == "max_new_tokens"
    code, out, err_text = run(["generate", "When Mary", "--model", tiny_dir, "--max-new-tokens", "200"], capsys)
    assert (code, out) == (2, "") and "plus --max-new-tokens 200 needs" in err_text
    assert "lower --max-new-tokens to at most" in err_text and "max_new_tokens" not in err_text
    import _cli.app

    assert not hasattr(_cli.app, "PYTHON_TO_FLAGS")


def test_every_parameter_a_command_line_error_names_is_a_flag_of_that_command(tiny_dir, work, monkeypatch, capsys):
    """The ``param`` of each refusal in ``BAD`` maps to a flag (or argument) of its command, so the CLI can
    name it: a library parameter the parser does not know would be spelled the Python way."""
    import _cli.app
    from _cli.parser import build_parser, command_spelling
    from _core.errors import MISSING

    seen = []
    message = _cli.app._message
    monkeypatch.setattr(_cli.app, "_message", lambda exc: seen.append(exc) or message(exc))
    parser = build_parser()
    for argv, _ in BAD.values():
        if argv[0] in ("info", "generate", "lens", "ablate", "sweep", "edit") and "--model" not in argv:
            argv = argv + ["--model", str(tiny_dir)]
        seen.clear()
        assert run(argv, capsys)[0] == 2
        param = getattr(seen[0], "param", None)
        if param is not None and argv[0] in cli.COMMAND_HELP:
            spelled = command_spelling(parser, argv[0])(param, MISSING)
            assert spelled != param or spelled.isupper(), (argv, param)  # a --flag or a POSITIONAL
