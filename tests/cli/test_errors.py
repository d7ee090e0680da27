"""Bad input and injected faults: every row of docs/errors.md gives its exact one-line message and its
exception class (Python) or exit code (``scalpel``), and leaves nothing behind (no hooks, no output,
no temporary files). Rows already tested elsewhere name that test in the doc; the others run here.
``test_doc_table_matches_the_suite`` parses docs/errors.md so that the doc and the suite cannot drift."""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import signal
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import surgery as S
from hooks import HookedLlama, HookError, InputError, LoadError, UnsupportedArchitectureError
from tests.helpers import API_EXPORT, CHILD, build_tiny, interrupt_mid_write, run, tiny_hf, write_adapter

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "errors.md"
E = sys.modules["surgery.export"]  # the module (``surgery.export`` is the function)
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
LONG_PROMPT = "When Mary and John went to the store, " * 20  # past the tiny tokenizer model's 128 positions


def n_hooks(model) -> int:
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in model.hook_dict.values())


def litter(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((E.TMP_PREFIX, E.OLD_PREFIX)))


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint with a tokenizer (vocab 320, max_position_embeddings 128)."""
    return build_tiny(tmp_path_factory.mktemp("errors") / "tiny")


@pytest.fixture(scope="module")
def tok_model(tok_dir) -> HookedLlama:
    return HookedLlama.from_pretrained(str(tok_dir))


@dataclass
class Ctx:
    tiny: HookedLlama  # tiny GQA, no tokenizer, max_position_embeddings 64
    tok_model: HookedLlama  # the same shapes with a tokenizer
    work: Path  # the current directory: every path in a message is relative to it


@pytest.fixture
def ctx(tiny, tok_model, tok_dir, tmp_path, monkeypatch) -> Ctx:
    """A working directory with the inputs the rows name (all relative, so messages are stable)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").symlink_to(tok_dir, target_is_directory=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "exports").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    hf = tiny_hf("gqa")
    hf.config.save_pretrained(tmp_path / "pickled")
    torch.save(hf.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    vector = torch.zeros(64)
    vector[3] = float("nan")
    torch.save(vector, tmp_path / "nan.pt")
    (tmp_path / "plan.yaml").write_text("edits:\n  - {edit: ZeroHeads, layer: 1, heads: [0]}\n")
    (tmp_path / "orth.yaml").write_text("edits:\n  - {edit: Orthogonalize, direction: [1.0, 2.0, 3.0]}\n")
    write_adapter(tmp_path / "adapter", HookedLlama.from_hf(tiny_hf("gqa", hidden_size=32, intermediate_size=48)))
    (tmp_path / "lora.yaml").write_text("edits:\n  - {edit: MergeLora, adapter_dir: adapter}\n")
    return Ctx(tiny, tok_model, tmp_path)


def sharded_with_truncated_shard(work: Path) -> Path:
    """A sharded checkpoint whose second index-listed shard is cut in half."""
    path = work / "sharded"
    tiny_hf("gqa").save_pretrained(path, max_shard_size="50KB")
    shards = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 2
    data = (path / shards[1]).read_bytes()
    (path / shards[1]).write_bytes(data[: len(data) // 2])
    return path


def read_only(directory: Path, monkeypatch) -> None:
    """Make ``directory`` refuse new entries: chmod 0o500, and where that does not stop us (root),
    the refusal the OS would give, at ``os.mkdir`` (what ``Path.mkdir`` and ``tempfile.mkdtemp`` call)."""
    directory.chmod(0o500)
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory))
    except PermissionError:
        return  # the chmod is enough
    real = os.mkdir
    target = directory.resolve()

    def refuse(path, *args, **kwargs):
        if Path(os.path.abspath(path)).parent.resolve() == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)


@pytest.fixture(autouse=True)
def _writable_again(tmp_path):
    yield
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o700)


def disk_full_after_first_shard(monkeypatch) -> list[Path]:
    """From the second shard on, the write stage fails as it does on a full disk (ENOSPC)."""
    import errno

    from surgery.export.hf import HFExport

    written: list[Path] = []
    real = HFExport.write_shard

    def full(self, path, entries):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        sha = real(self, path, entries)
        written.append(path)
        return sha

    monkeypatch.setattr(HFExport, "write_shard", full)
    return written


# --------------------------------------------------------------------------- hooks used by the rows
def to_meta(t, hook):
    return t.to("meta")


def as_list(t, hook):
    return [t]


# --------------------------------------------------------------------------- Python API rows
# name -> (call, exception class, exact message)
API = {
    "hook on the wrong device": (
        lambda c: c.tiny.run_with_hooks(IDS, fwd_hooks=[("blocks.0.hook_resid_pre", to_meta)]),
        HookError,
        "hook to_meta at blocks.0.hook_resid_pre returned a tensor on meta but the hook point is on cpu; "
        "move it with .to()",
    ),
    "hook returning a non-tensor": (
        lambda c: c.tiny.run_with_hooks(IDS, fwd_hooks=[("blocks.0.hook_resid_pre", as_list)]),
        HookError,
        "hook as_list at blocks.0.hook_resid_pre returned list; return a tensor of shape (2, 7, 64) or None",
    ),
    "hook that is not callable": (
        lambda c: c.tiny.run_with_hooks(IDS, fwd_hooks=[("blocks.0.hook_resid_pre", 3)]),
        HookError,
        "hook for blocks.0.hook_resid_pre must be callable fn(tensor, hook), got int",
    ),
    "names_filter matching nothing": (
        lambda c: c.tiny.run_with_cache(IDS, names_filter=lambda name: name.endswith("hook_attn")),
        HookError,
        "names_filter predicate <lambda> matched no hook point; see model.hook_names()",
    ),
    "empty prompt": (
        lambda c: c.tok_model(""),
        InputError,
        "empty prompt: the text tokenizes to no tokens; pass at least one character",
    ),
    "empty token tensor": (
        lambda c: c.tiny(torch.zeros(1, 0, dtype=torch.long)),
        InputError,
        "empty input of shape (1, 0); pass at least one token",
    ),
    "text for a model without tokenizer": (
        lambda c: c.tiny("Hello"),
        InputError,
        "this model has no tokenizer; pass token ids, or load it with a tokenizer "
        "(HookedLlama.from_pretrained(dir) or from_hf(model, tokenizer))",
    ),
    "prompt longer than max_position_embeddings": (
        lambda c: c.tiny(torch.randint(3, 128, (1, 65))),
        InputError,
        "input reaches position 64 but the model supports 64 positions (max_position_embeddings); shorten the prompt",
    ),
    "token id out of vocab": (
        lambda c: c.tiny(torch.tensor([[5, 999]])),
        InputError,
        "token id 999 is out of range for vocab size 128 (ids 0..127)",
    ),
    "float token ids": (
        lambda c: c.tiny(torch.rand(1, 4)),
        InputError,
        "token ids must be an integer tensor, got torch.float32; pass start_at_layer= to feed a residual stream",
    ),
    "attention_mask of another shape": (
        lambda c: c.tiny(IDS, attention_mask=torch.ones(2, 6)),
        InputError,
        "attention_mask has shape (2, 6) but the input needs (2, 7) (batch, past + new positions)",
    ),
    "attention_mask of another shape (generate)": (
        lambda c: c.tiny.generate(IDS, attention_mask=torch.ones(2, 6), max_new_tokens=2),
        InputError,
        "attention_mask has shape (2, 6) but the tokens have shape (2, 7); pass one 0/1 entry per token (0 = padding)",
    ),
    "missing path": (
        lambda c: HookedLlama.from_pretrained("missing/"),
        LoadError,
        "no such file or directory: missing/",
    ),
    "a file that is not a checkpoint": (
        lambda c: HookedLlama.from_pretrained("notes.txt"),
        LoadError,
        "notes.txt is a file but not a .gguf; pass a checkpoint directory or a .gguf file",
    ),
    "unknown dtype": (
        lambda c: HookedLlama.from_pretrained("tiny", dtype="float8"),
        LoadError,
        "unknown dtype 'float8'; use one of float32, bfloat16, float16",
    ),
    "from_hf of something else": (
        lambda c: HookedLlama.from_hf("HuggingFaceTB/SmolLM2-135M"),
        UnsupportedArchitectureError,
        "from_hf takes a transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM, "
        "got str; for a path or hub id use from_pretrained",
    ),
    "weight edit needing a bias the family lacks": (
        lambda c: S.MeanAblateHeads(1, [0], torch.zeros(1, 16)).apply(HookedLlama.from_hf(tiny_hf("qwen2"))),
        S.EditError,
        "MeanAblateHeads needs a bias on o_proj, which Qwen2ForCausalLM cannot carry (only Llama and Qwen3 have one); "
        "run it at run time with edit.as_hooks(model), or use an edit without a bias (ZeroHeads, Orthogonalize)",
    ),
    "GGUF export of a sliding window": (
        lambda c: S.export_gguf(
            HookedLlama.from_hf(tiny_hf("mistral", vocab_size=320, max_position_embeddings=128), c.tok_model.tokenizer),
            "exports/m.gguf",
        ),
        S.ExportError,
        "GGUF export refused: GGUF export cannot represent a sliding window of 4 tokens (layer 0, context 128); "
        "GGUF llama attends to the whole context; export as a Hugging Face checkpoint instead",
    ),
    "truncated shard": (
        lambda c: HookedLlama.from_pretrained(str(sharded_with_truncated_shard(c.work).name)),
        LoadError,
        "cannot read sharded/model-00002-of-00010.safetensors: not a complete safetensors file; the file is "
        "corrupt or truncated, re-download or re-export it",
    ),
}


@pytest.mark.parametrize("case", list(API))
def test_api_error(case, ctx):
    call, cls, message = API[case]
    with pytest.raises(cls) as info:
        call(ctx)
    assert str(info.value) == message
    assert n_hooks(ctx.tiny) == 0 and ctx.tiny.ctx.positions is None


# --------------------------------------------------------------------------- export faults (Python API)
def test_export_to_read_only_dir_writes_nothing(ctx, monkeypatch):
    read_only(ctx.work / "exports", monkeypatch)
    with pytest.raises(S.ExportError) as info:  # refused by the writer's check of every output, before any work
        S.export(ctx.tiny, "exports/tiny", edits=[S.ZeroHeads(0, [1])])
    assert str(info.value) == (
        "exports/tiny: cannot write in exports (permission denied); pick a writable location or fix the "
        "directory's permissions"
    )
    assert isinstance(info.value, InputError) and info.value.errno == errno.EACCES
    assert list((ctx.work / "exports").iterdir()) == []


def test_disk_full_during_export_writes_nothing(ctx, monkeypatch):
    written = disk_full_after_first_shard(monkeypatch)
    with pytest.raises(S.ExportWriteError) as info:
        S.export(ctx.tiny, "exports/tiny", edits=[S.ZeroHeads(0, [1])], max_shard_size="40KB")
    assert str(info.value) == (
        "no space left on the device of exports (the checkpoint needs about 436 KB); "
        "free some space or pick an out_dir on another disk; nothing was written"
    )
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert len(written) == 1 and not written[0].exists()  # the first shard was written, then removed
    assert list((ctx.work / "exports").iterdir()) == []


# --------------------------------------------------------------------------- CLI rows
# name -> (argv, exit code, exact message after "scalpel: error: ")
CLI = {
    "missing model path": (["info", "--model", "missing/"], 2, "no such file or directory: missing/"),
    "model dir without config.json": (
        ["info", "--model", "empty"],
        2,
        "empty has no config.json; point at a Hugging Face checkpoint directory",
    ),
    "unsupported architecture": (
        ["info", "--model", "gpt2"],
        2,
        "unsupported architecture 'gpt2' (GPT2LMHeadModel) in gpt2/config.json: llama-scalpel "
        "runs LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM "
        "checkpoints (model_type 'llama', 'mistral', 'qwen2' or 'qwen3')",
    ),
    "pickle-only checkpoint": (
        ["info", "--model", "pickled"],
        2,
        "pickled has only pickle weights (pytorch_model.bin), which can run code when loaded; "
        "convert it to safetensors, or pass allow_pickle=True if you trust the file",
    ),
    "empty prompt": (
        ["generate", "", "--model", "tiny"],
        2,
        "empty prompt: the text tokenizes to no tokens; pass at least one character",
    ),
    "prompt longer than max_position_embeddings": (
        ["generate", LONG_PROMPT, "--model", "tiny", "--max-new-tokens", "1"],
        2,
        "input reaches position 199 but the model supports 128 positions (max_position_embeddings); shorten the prompt",
    ),
    "NaN in a steering vector": (
        ["generate", "Hi", "--model", "tiny", "--steer", "1:nan.pt:2"],
        2,
        "--steer 1:nan.pt:2: AddSteering: vector holds a non-finite value (nan) at index 3; every entry must be finite",
    ),
    "direction of the wrong size": (
        ["edit", "orth.yaml", "--model", "tiny", "--out", "out"],
        2,
        "edit #1: Orthogonalize: direction has size 3 but the model's d_model (hidden_size) is 64",
    ),
    "LoRA adapter for another base": (
        ["edit", "lora.yaml", "--model", "tiny", "--out", "out"],
        2,
        "edit #1: MergeLora: adapter for another base model: "
        "model.layers.0.mlp.down_proj lora_B@lora_A is (32, 48) but the model's "
        "weight is (64, 96); merge it into the model it was trained on (its "
        "base_model_name_or_path is not recorded)",
    ),
    "read-only output dir": (
        ["edit", "plan.yaml", "--model", "tiny", "--out", "exports/tiny"],
        2,
        "--out exports/tiny: cannot write in exports (permission denied); pick a writable "
        "location or fix the directory's permissions",
    ),
    "disk full during export": (
        ["edit", "plan.yaml", "--model", "tiny", "--out", "exports/tiny", "--max-shard-size", "40KB"],
        1,
        "no space left on the device of exports (the checkpoint needs about 534 KB); free "
        "some space or pick an out_dir on another disk; nothing was written",
    ),
    "Ctrl-C during export": (["edit", "plan.yaml", "--model", "tiny", "--out", "exports/tiny"], 130, "interrupted"),
}


@pytest.mark.parametrize("case", list(CLI))
def test_cli_error(case, ctx, monkeypatch, capsys):
    argv, code, message = CLI[case]
    if case == "read-only output dir":
        read_only(ctx.work / "exports", monkeypatch)
    if case == "disk full during export":
        disk_full_after_first_shard(monkeypatch)
    if case == "Ctrl-C during export":

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        from surgery.export.hf import HFExport

        monkeypatch.setattr(HFExport, "compare", interrupted)
    before = sorted(str(p.relative_to(ctx.work)) for p in ctx.work.rglob("*"))
    assert run(argv, capsys) == (code, "", f"scalpel: error: {message}\n")
    assert sorted(str(p.relative_to(ctx.work)) for p in ctx.work.rglob("*")) == before  # nothing written


# --------------------------------------------------------------------------- signals (subprocesses)
CLI_EXPORT = CHILD + textwrap.dedent("""
    import cli
    sys.exit(cli.main(["edit", {plan!r}, "--model", {model!r}, "--out", {out!r}, "--max-shard-size", "20KB"]))
""")


def test_sigint_mid_export_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    proc = interrupt_mid_write(API_EXPORT.format(repo=str(REPO), out=str(out)), tmp_path, signal.SIGINT)
    assert proc.returncode == -signal.SIGINT and proc.stderr.rstrip().endswith("KeyboardInterrupt")
    assert not out.exists() and litter(tmp_path) == []


def test_sigterm_mid_cli_export_leaves_nothing(tok_dir, tmp_path):
    (tmp_path / "plan.yaml").write_text("edits:\n  - {edit: ZeroHeads, layer: 1, heads: [0]}\n")
    out = tmp_path / "out"
    script = CLI_EXPORT.format(repo=str(REPO), plan=str(tmp_path / "plan.yaml"), model=str(tok_dir), out=str(out))
    proc = interrupt_mid_write(script, tmp_path, signal.SIGTERM)
    assert (proc.returncode, proc.stdout) == (143, "")
    assert proc.stderr.splitlines()[-1] == "scalpel: error: terminated (SIGTERM)"
    assert not out.exists() and litter(tmp_path) == []


SECOND_SIGTERM = textwrap.dedent("""
    import shutil
    real_rmtree = shutil.rmtree
    def rmtree_after_a_second_sigterm(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the second SIGTERM, delivered while the cleanup runs
        real_rmtree(path, *args, **kwargs)
    shutil.rmtree = rmtree_after_a_second_sigterm
""")


def test_two_sigterms_mid_cli_export_leave_nothing(tok_dir, tmp_path):
    """Issue 12 (5): a second SIGTERM during the cleanup of the first left the temp directory."""
    (tmp_path / "plan.yaml").write_text("edits:\n  - {edit: ZeroHeads, layer: 1, heads: [0]}\n")
    out = tmp_path / "out"
    script = CLI_EXPORT.format(repo=str(REPO), plan=str(tmp_path / "plan.yaml"), model=str(tok_dir), out=str(out))
    script = script.replace("import cli\n", "import cli, os, signal\n" + SECOND_SIGTERM)
    proc = interrupt_mid_write(script, tmp_path, signal.SIGTERM)
    assert (proc.returncode, proc.stdout) == (143, "")
    assert proc.stderr.splitlines() == ["scalpel: error: terminated (SIGTERM)"]
    assert not out.exists() and litter(tmp_path) == []


# --------------------------------------------------------------------------- the doc and the suite agree
_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`")


def doc_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        if re.match(r"^\|\s*\d+\s*\|", line):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            assert len(cells) == 6, line
            rows.append(cells)
    return rows


def _unquote(cell: str) -> str:
    assert cell.startswith("`") and cell.endswith("`"), cell
    return cell[1:-1]


def test_doc_table_matches_the_suite():
    rows = doc_rows()
    assert len(rows) >= 25, f"docs/errors.md has {len(rows)} rows"
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1)), "rows are not numbered 1..N"
    referenced: dict[str, set[str]] = {"test_api_error": set(), "test_cli_error": set()}
    for number, where, _, message, outcome, tests in rows:
        refs = _REF.findall(tests)
        assert refs, f"row {number} names no test"
        for file, func, param in refs:
            source = (REPO / file).read_text()
            functions = {n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
            assert func in functions, f"row {number}: {file}::{func} does not exist"
            if param:
                assert f'"{param}"' in source, f"row {number}: {file}::{func}[{param}] is not a case"
            if file == "tests/cli/test_errors.py" and func in referenced:
                referenced[func].add(param)
                table = API if func == "test_api_error" else CLI
                _, expected_outcome, expected_message = table[param]
                assert _unquote(message) == expected_message, f"row {number}: the message differs from the test's"
                if func == "test_api_error":
                    assert expected_outcome.__name__ in outcome, f"row {number}"
                    assert not where.startswith("`scalpel"), f"row {number}"
                else:
                    assert f"exit {expected_outcome}" in outcome, f"row {number}"
                    assert _unquote(where).startswith(f"scalpel {CLI[param][0][0]} "), f"row {number}"
    assert referenced["test_api_error"] == set(API), "an API case is missing from docs/errors.md"
    assert referenced["test_cli_error"] == set(CLI), "a CLI case is missing from docs/errors.md"
    # every other test of this file is some row's test
    own = {
        n.name
        for n in ast.parse(Path(__file__).read_text()).body
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
    } - {"test_doc_table_matches_the_suite"}
    named = {func for r in rows for file, func, _ in _REF.findall(r[5]) if file == "tests/cli/test_errors.py"}
    assert own == named, f"tests without a row: {sorted(own - named)}"
