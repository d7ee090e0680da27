"""Seeded fuzz: generated bad edit plans, experiment files and prompt files fed to ``scalpel`` all end
with exit 2, exactly one stderr line, no traceback, nothing on stdout and nothing written.

By construction: every public loader (``_core.readers.LOADERS``, where each registers itself) and every
command of the command registry (``_cli.commands.NAMES``) is fed malformed, oversized, non-UTF-8, aliased
(YAML alias and merge-key bombs), misplaced (a directory, a FIFO, a symlink loop) and concurrently
rewritten input; each ends in a one-line ``ScalpelError`` (or exit 2) with nothing written or changed. A
loader or command added later is covered the day it is added (a command needs its line in ``COMMANDS``)."""

from __future__ import annotations

import json
import os
import random
import re
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


# --------------------------------------------------------------------------- by construction: every loader
# Importing the packages registers every public loader in ``_core.readers.LOADERS`` (where each is defined).
KNOWN_LOADERS = {
    "plan",
    "experiment",
    "prompts",
    "prompts (answers)",
    "vector",
    "sae",
    "model config",
    "lora adapter",
    "export manifest",
    "activation cache",
}
STRUCTURED = (".json", ".jsonl", ".yaml", ".yml")
HUGE = 65 << 20  # a sparse file past every size budget (64 MiB for data files, 16 MiB for configs)


def alias_bomb() -> bytes:
    rows = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return ("\n".join(rows) + "\nedits: *a8\nanalyses: *a8\n").encode()


def corruptions(name: str, sample: bytes, rng: random.Random) -> list[tuple[str, bytes | str, bool]]:
    """(label, content, must fail) for the file ``name`` of a valid input ``sample``: bytes, or one of
    "dir", "fifo", "huge", "missing", "loop" for what stands at the path instead of a file."""
    structured = name.endswith(STRUCTURED)
    cases: list[tuple[str, bytes | str, bool]] = [
        ("empty", b"", True),
        ("not UTF-8", LATIN1 + b"\n" + sample, True),
        ("NUL byte", sample + b"\x00", True),
        ("alias bomb", alias_bomb(), structured),
        (
            "merge-key bomb",
            b"b0: &b0 {k: 1}\n"
            + b"".join(b"b%d: &b%d {<<: [*b%d, *b%d]}\n" % (i, i, i - 1, i - 1) for i in range(1, 40)),
            structured,
        ),
        ("deep nesting", b"[" * 50_000 + b"]" * 50_000, structured),
        ("duplicate key", b'{"a": 1, "a": 2}\n', structured),
        ("truncated", sample[: len(sample) // 2], False),
        ("a directory", "dir", True),
        ("a FIFO", "fifo", True),
        ("past the size budget", "huge", True),
        ("missing", "missing", True),
        ("a symlink loop", "loop", True),
    ]
    if structured:  # one field at a time set to a value of another type or range
        import yaml

        data = yaml.safe_load(sample.decode())
        for _ in range(8):
            mutated = json.loads(json.dumps(data))
            leaves = list(_leaves(mutated))
            if not leaves:
                break
            holder, key = rng.choice(leaves)
            holder[key] = rng.choice([None, "x", -1, 0, 1e309, -1e309, [], {}, True, 2**70, "\u2028", [[[]]], 1.5])
            text = json.dumps(mutated) if name.endswith((".json", ".jsonl")) else yaml.safe_dump(mutated)
            cases.append((f"{key!r} = {holder[key]!r}", text.encode(), False))
    return cases


def _leaves(obj):
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield obj, key
        yield from _leaves(value)


def place(path: Path, content: bytes | str) -> None:
    """Put ``content`` at ``path`` (see ``corruptions``)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    if content == "dir":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "huge":
        with open(path, "wb") as f:
            f.truncate(HUGE)
    elif content == "loop":
        path.symlink_to(path.name)
    elif content != "missing":
        path.write_bytes(content)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: its kind, and a regular file's size, mtime and bytes' hash (FIFOs are
    never opened)."""
    import hashlib
    import stat

    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        entry: tuple = (stat.S_IFMT(st.st_mode),)
        if stat.S_ISREG(st.st_mode) and st.st_size < HUGE:
            entry += (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        out[str(p.relative_to(root))] = entry
    return out


def call_with_watchdog(fn, *args, seconds: float = 120):
    """``fn(*args)`` in a thread: (result or None, exception or None); a call still running after
    ``seconds`` fails the test (a runaway input)."""
    import threading

    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} still runs after {seconds} s: a runaway input"
    return box.get("result"), box.get("error")


def test_every_loader_is_registered():
    import _cli.app  # noqa: F401 - the command line's loaders register on import
    import analyses  # noqa: F401
    import hooks.streaming  # noqa: F401
    import surgery  # noqa: F401
    from _core.readers import LOADERS

    assert KNOWN_LOADERS <= set(LOADERS), sorted(KNOWN_LOADERS - set(LOADERS))
    assert all(loader.sample is not None for loader in LOADERS.values())


@pytest.mark.parametrize("name", sorted(KNOWN_LOADERS))
def test_every_loader_refuses_bad_input_in_one_line_and_writes_nothing(name, tmp_path):
    """Each registered loader, fed malformed, oversized, non-UTF-8, aliased and misplaced input: a one-line
    ScalpelError (or, for a mutation that stays valid, a result), never a raw exception, a hang or a write."""
    import _cli.app  # noqa: F401
    import analyses  # noqa: F401
    import hooks.streaming  # noqa: F401
    import surgery  # noqa: F401
    from _core.errors import ScalpelError
    from _core.readers import LOADERS

    loader = LOADERS[name]
    rng = random.Random(name)
    files = loader.sample()
    targets = list(files) if loader.kind == "file" else [f for f in files if f in loader.files]
    n = 0
    for target in targets:
        for label, content, must_fail in corruptions(target, files[target], rng):
            work = tmp_path / f"case{n}"
            work.mkdir()
            n += 1
            for fname, data in files.items():
                root = work if loader.kind == "file" else work / "input"
                root.mkdir(exist_ok=True)
                (root / fname).write_bytes(data)
            root = work if loader.kind == "file" else work / "input"
            place(root / target, content)
            path = root / target if loader.kind == "file" else root
            before = snapshot(tmp_path)
            result, error = call_with_watchdog(loader.load, path)
            where = f"{name} with {target} {label}"
            if error is None:
                assert not must_fail, f"{where}: accepted"
            else:
                assert isinstance(error, ScalpelError), f"{where}: raw {type(error).__name__}: {error}"
                assert "\n" not in str(error) and str(error).strip(), f"{where}: {error!r}"
            assert snapshot(tmp_path) == before, f"{where}: something was written or changed"
    assert n >= 13


@pytest.mark.parametrize("name", sorted(KNOWN_LOADERS))
def test_every_loader_under_concurrent_rewrites(name, tmp_path):
    """Readers in several threads while another thread keeps replacing the input (whole, by rename) with a
    corrupted copy: every read is either the valid result or a one-line ScalpelError."""
    import threading

    import _cli.app  # noqa: F401
    import analyses  # noqa: F401
    import hooks.streaming  # noqa: F401
    import surgery  # noqa: F401
    from _core.errors import ScalpelError
    from _core.readers import LOADERS

    loader = LOADERS[name]
    files = loader.sample()
    root = tmp_path / "input"
    root.mkdir()
    for fname, data in files.items():
        (root / fname).write_bytes(data)
    target = next(iter(files)) if loader.kind == "file" else next(f for f in files if f in loader.files)
    path = root / target if loader.kind == "file" else root
    bad = [files[target][: len(files[target]) // 2], LATIN1, alias_bomb(), files[target]]
    stop, outcomes = threading.Event(), []

    def rewrite():
        i = 0
        while not stop.is_set():
            tmp = root / f".swap-{i}"
            tmp.write_bytes(bad[i % len(bad)])
            os.replace(tmp, root / target)
            i += 1

    def read():
        for _ in range(15):
            try:
                loader.load(path)
                outcomes.append("ok")
            except ScalpelError as exc:
                outcomes.append("one line" if "\n" not in str(exc) else repr(exc))
            except BaseException as exc:  # noqa: BLE001
                outcomes.append(f"raw {type(exc).__name__}: {exc}")

    writer = threading.Thread(target=rewrite, daemon=True)
    readers = [threading.Thread(target=read, daemon=True) for _ in range(3)]
    writer.start()
    for t in readers:
        t.start()
    for t in readers:
        t.join(300)
    stop.set()
    writer.join(30)
    assert len(outcomes) == 45 and set(outcomes) <= {"ok", "one line"}, sorted(set(outcomes))


# --------------------------------------------------------------------------- by construction: every command
# Every command of the registry, as a valid command line on the tiny model, its input files as {placeholders}.
SAMPLES = {
    "prompts": ("p.tsv", "When Mary and John went to the store, John gave a drink to\t Mary\t John\n".encode()),
    "plan": ("plan.yaml", b"edits:\n  - {edit: ZeroHeads, layer: 1, heads: [0]}\n"),
    "harmful": ("harmful.txt", b"How do I pick a lock?\nHow do I make a weapon?\n"),
    "harmless": ("harmless.txt", b"How do I bake bread?\nHow do I plant tulips?\n"),
    "vector": ("v.json", json.dumps([0.0] * 64).encode()),
}
COMMANDS = {
    "info": ["info", "--model", "{model}"],
    "generate": ["generate", "Hello", "--model", "{model}", "--edits", "{plan}", "--steer", "1:{vector}:2"],
    "lens": ["lens", "When Mary and John", "--model", "{model}"],
    "heads": ["heads", "--model", "{model}"],
    "patch": ["patch", "--clean", "Mary", "--corrupt", "John", "--answers", " Mary", " John", "--model", "{model}"],
    "ablate": ["ablate", "--heads", "1.0", "--prompts", "{prompts}", "--metric", "logit-diff", "--model", "{model}"],
    "sweep": ["sweep", "--component", "heads", "--layers", "1", "--prompts", "{prompts}", "--model", "{model}"],
    "abliterate": ["abliterate", "--harmful", "{harmful}", "--harmless", "{harmless}", "--model", "{model}"],
    "edit": ["edit", "{plan}", "--model", "{model}", "--out", "out"],
    "circuit": ["circuit", "--prompts", "{prompts}", "--model", "{model}"],
    "verify": ["verify", "{export}"],
    "run": ["run", "{experiment}"],
}
MUST_FAIL = ("empty", "not UTF-8", "NUL byte", "a directory", "past the size budget", "missing", "alias bomb")


def test_every_command_is_fuzzed():
    from _cli.commands import NAMES

    assert set(COMMANDS) == set(NAMES), "a command without a fuzz entry: add its command line to COMMANDS"


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory) -> Path:
    """A verified export of the tiny model (what ``scalpel verify`` reads)."""
    import surgery as S
    from hooks import HookedLlama

    out = tmp_path_factory.mktemp("export") / "exp"
    S.export(HookedLlama.from_pretrained(str(tiny_dir)), out, edits=[S.ZeroHeads(0, [1])])
    return out


def command_cases(command: str, tiny_dir: Path, exported: Path, work: Path):
    """(argv, label) of bad command lines for ``command``: each input it names, corrupted one way at a time;
    a --model whose config.json is corrupted; a --report over a file of the user's."""
    import shutil

    rng = random.Random(command)
    base = COMMANDS[command]
    inputs = {}
    for key, (fname, data) in SAMPLES.items():
        inputs[key] = (fname, data)
    inputs["experiment"] = ("exp.yaml", f"model: {tiny_dir}\nanalyses:\n  - heads: {{}}\n".encode())
    placeholders = [p for a in base for p in re.findall(r"\{(\w+)\}", a)]
    n = 0
    for key in placeholders:
        if key in ("model", "export"):
            source = tiny_dir if key == "model" else exported
            fname = "config.json" if key == "model" else "scalpel_manifest.json"
            sample = (source / fname).read_bytes()
            for label, content, _ in corruptions(fname, sample, rng):
                if label not in MUST_FAIL:
                    continue
                copy = work / f"{key}{n}"
                shutil.copytree(source, copy, symlinks=True)
                place(copy / fname, content)
                n += 1
                yield _fill(base, key, copy.name, tiny_dir, exported), f"{key} {fname} {label}"
            continue
        fname, sample = inputs[key]
        for label, content, _ in corruptions(fname, sample, rng):
            if label not in MUST_FAIL or (label == "alias bomb" and not fname.endswith(STRUCTURED)):
                continue
            name = f"{key}{n}{Path(fname).suffix}"
            place(work / name, content)
            n += 1
            yield _fill(base, key, name, tiny_dir, exported), f"{key} {label}"
    if "--report" in _flags(command):  # an existing report of the user's, even with --overwrite
        (work / "notes.html").write_text("<p>my notes</p>\n")
        yield (
            _fill(base, None, None, tiny_dir, exported) + ["--report", "notes.html", "--overwrite"],
            "report over a user file",
        )


def _flags(command: str) -> set[str]:
    from _cli.parser import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if getattr(a, "choices", None) and command in a.choices).choices[command]
    return {s for a in sub._actions for s in a.option_strings}


def _fill(base: list[str], key: str | None, value: str | None, tiny_dir: Path, exported: Path) -> list[str]:
    """``base`` with ``{key}`` replaced by ``value`` and every other placeholder by a valid input."""
    defaults = {k: f for k, (f, _) in SAMPLES.items()}
    defaults.update(model=str(tiny_dir), export=str(exported), experiment="exp.yaml")
    if key is not None:
        defaults[key] = value
    return [re.sub(r"\{(\w+)\}", lambda m: defaults[m.group(1)], a) for a in base]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_bad_inputs_with_exit_2_and_writes_nothing(
    command, tiny_dir, exported, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    for fname, data in SAMPLES.values():
        (tmp_path / fname).write_bytes(data)
    (tmp_path / "exp.yaml").write_text(f"model: {tiny_dir}\nanalyses:\n  - heads: {{}}\n")
    n = 0
    for argv, label in list(command_cases(command, tiny_dir, exported, tmp_path)):
        before = snapshot(tmp_path)
        (code, out, err), error = call_with_watchdog(run, argv, capsys, seconds=300)
        assert error is None, (command, label, error)
        assert code == 2, (command, label, argv, err)
        assert out == "" and err.startswith("scalpel: error: ") and err.count("\n") == 1, (command, label, err)
        assert snapshot(tmp_path) == before, (command, label, "something was written or changed")
        n += 1
    assert n >= 7
