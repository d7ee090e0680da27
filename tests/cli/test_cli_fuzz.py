"""Seeded fuzz: generated bad edit plans, experiment files and prompt files fed to ``scalpel`` all end
with exit 2, exactly one stderr line, no traceback, nothing on stdout and nothing written."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import build_tiny, run

ROOT = Path(__file__).resolve().parents[2]
N_PER_KIND = 180  # three kinds: 540 generated files
LATIN1 = "caf\xe9 na\xefve".encode("latin-1")  # not UTF-8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("fuzz") / "tiny-llama")


def _edit(rng: random.Random) -> dict:
    return rng.choice(
        [
            {"edit": "ZeroHeads", "layer": rng.randrange(3), "heads": [rng.randrange(4)]},
            {"edit": "ZeroNeurons", "layer": rng.randrange(3), "neurons": [rng.randrange(96)]},
            {"edit": "RemoveLayers", "layers": [rng.randrange(3)]},
        ]
    )


def bad_plan(rng: random.Random) -> tuple[str, bytes]:
    """(suffix, bytes) of a plan that is wrong in one of many ways."""
    good = {"edits": [_edit(rng) for _ in range(rng.randint(1, 3))]}
    kind = rng.randrange(10)
    if kind == 0:  # unknown top-level key
        good[rng.choice(["model", "edit", "Edits", "notes", "version_"])] = rng.randint(0, 9)
    elif kind == 1:  # unknown edit kind
        good["edits"][0]["edit"] = rng.choice(["ZeroHead", "zeroheads", "Ablate", "", "RemoveLayer"])
    elif kind == 2:  # a value out of range
        good["edits"][0] = rng.choice(
            [
                {"edit": "ZeroHeads", "layer": rng.randint(3, 99), "heads": [0]},
                {"edit": "ZeroHeads", "layer": 0, "heads": [rng.randint(4, 50)]},
                {"edit": "ZeroNeurons", "layer": 0, "neurons": [rng.randint(96, 9999)]},
                {"edit": "ZeroHeads", "layer": -rng.randint(1, 5), "heads": [0]},
            ]
        )
    elif kind == 3:  # a wrongly typed value
        good["edits"][0] = {"edit": "ZeroHeads", "layer": rng.choice(["one", 1.5, None, [1]]), "heads": [0]}
    elif kind == 4:  # edits is not a list / the document is not a mapping
        good = rng.choice([{"edits": "ZeroHeads"}, {"edits": 3}, "just text", 42, {"edits": [[1, 2]]}])
    elif kind == 5:  # another format or version
        good.update(rng.choice([{"format": "other"}, {"version": rng.randint(2, 9)}]))
    elif kind == 6:  # missing field
        e = good["edits"][0]
        e.pop(rng.choice([k for k in e if k != "edit"]))
    if kind == 7:  # duplicated key (YAML)
        text = "edits:\n  - {edit: ZeroHeads, layer: 0, heads: [0]}\nedits: []\n"
        return ".yaml", text.encode()
    if kind == 8:  # not UTF-8
        return rng.choice([".yaml", ".json"]), b"# " + LATIN1 + b"\n" + json.dumps(good).encode()
    if kind == 9:  # malformed: cut short
        text = json.dumps(good)
        return ".json", text[: rng.randint(1, len(text) - 1)].encode()
    if rng.random() < 0.5:
        return ".json", json.dumps(good).encode()
    import yaml

    return ".yaml", yaml.safe_dump(good).encode()


def bad_experiment(rng: random.Random, model: str) -> bytes:
    kind = rng.randrange(8)
    good = {"model": model, "prompts": ["The cat sat on the"], "analyses": [{"heads": {}}]}
    if kind == 0:
        good[rng.choice(["reprot", "analysis", "steps", "modle", "Prompts"])] = 1
    elif kind == 1:
        good["analyses"] = [{rng.choice(["head", "lense", "frob", "Ablate"]): {}}]
    elif kind == 2:
        good = rng.choice([["heads"], "text", 3, {"model": model}])
    elif kind == 3:
        good["analyses"] = [{"heads": {"layers": rng.choice(["99", "3-9", "x"])}}]
    elif kind == 4:
        good["analyses"] = [{"heads": {"frobnicate": 1}}]
    elif kind == 5:
        return b"analyses:\n  - heads: {}\nanalyses:\n  - info: {}\n"
    elif kind == 6:
        return b"name: " + LATIN1 + b"\nanalyses:\n  - heads: {}\n"
    elif kind == 7:
        text = json.dumps(good)
        return ("analyses: [" + text[: rng.randint(1, 20)]).encode()
    import yaml

    return yaml.safe_dump(good).encode()


def bad_prompts(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    line = "When Mary and John went to the store, John gave a drink to"
    if kind == 0:
        return ("\t".join([line] + [" Mary"] * rng.randint(3, 6)) + "\n").encode()  # too many fields
    if kind == 1:
        return LATIN1 + b"\t Mary\t John\n"
    if kind == 2:
        return rng.choice([b"", b"\n\n", b"# only a comment\n", b"\xef\xbb\xbf\n"])
    if kind == 3:
        answer = rng.choice([" Mary", " John"])
        return f"{line}\t{answer}\t{answer}\n".encode()  # identical answers
    if kind == 4:
        return "\t Mary\t John\n".encode()  # empty prompt
    return f"{line}\t Marylandia\t John\n".encode()  # a multi-token answer


def cases(tiny_dir: Path, work: Path):
    rng = random.Random(12)
    for i in range(N_PER_KIND):
        suffix, data = bad_plan(rng)
        (work / f"plan{i}{suffix}").write_bytes(data)
        yield ["edit", f"plan{i}{suffix}", "--model", str(tiny_dir), "--out", "out"]
    for i in range(N_PER_KIND):
        (work / f"exp{i}.yaml").write_bytes(bad_experiment(rng, str(tiny_dir)))
        yield ["run", f"exp{i}.yaml", "--report", "r.html"]
    for i in range(N_PER_KIND):
        (work / f"p{i}.tsv").write_bytes(bad_prompts(rng))
        yield [
            "ablate",
            "--heads",
            "1.0",
            "--prompts",
            f"p{i}.tsv",
            "--metric",
            "logit-diff",
            "--model",
            str(tiny_dir),
            "--out",
            "out",
            "--report",
            "r.html",
        ]


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_generated_bad_inputs_exit_2_with_one_line_and_write_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    n = 0
    for argv in cases(tiny_dir, tmp_path):
        before = listing(tmp_path)
        code, out, err = run(argv, capsys)
        inputs = Path(argv[1]).read_bytes() if argv[0] != "ablate" else Path(argv[4]).read_bytes()
        assert code == 2, (argv, inputs, err)
        assert out == "" and err.startswith("scalpel: error: ") and err.count("\n") == 1, (argv, inputs, err)
        assert "Traceback" not in err
        assert listing(tmp_path) == before, (argv, inputs)  # nothing written
        n += 1
    assert n >= 500


def test_a_few_bad_inputs_in_a_subprocess(tiny_dir, tmp_path):
    rng = random.Random(7)
    for i in range(3):
        suffix, data = bad_plan(rng)
        (tmp_path / f"plan{i}{suffix}").write_bytes(data)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "cli",
                "edit",
                str(tmp_path / f"plan{i}{suffix}"),
                "--model",
                str(tiny_dir),
                "--out",
                str(tmp_path / "out"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.startswith("scalpel: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out").exists()
