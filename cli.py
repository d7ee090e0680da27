"""``scalpel``: the llama-scalpel command line.

Every command takes ``--model`` (default: the embedded SmolLM2-135M-Instruct; or an HF directory, a
hub id in the local cache, or a ``.gguf`` file), prints aligned tables (``--json``: one JSON
document instead) and with ``--report FILE.html`` writes a self-contained HTML page with the plots.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input. Errors are one line
(``--debug`` shows the traceback). Existing outputs are never replaced without ``--overwrite``.

Example::

    scalpel info
    scalpel ablate --heads 8.6,9.8 --prompts examples/prompts_ioi.txt --metric logit-diff \\
        --report ablation.html --out edited-smollm2

In Python: ``cli.main(["info", "--json"])`` returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from _cli_inputs import CLIError
from _cli_report import Output, render_text, to_json, write_report

PROG = "scalpel"
DEFAULT_MODEL = "default"
COMMAND_HELP = {
    "info": "architecture, parameter count, dtype/device and the hook map",
    "generate": "complete a prompt, with or without edits or steering",
    "lens": "logit lens: what each layer's residual stream predicts",
    "heads": "head detector scores (previous-token, duplicate, induction), ranked",
    "patch": "activation patching over components x positions (clean vs corrupted prompt)",
    "ablate": "measure an ablation on prompts (base vs edited); --out exports the edited checkpoint",
    "sweep": "ablate each head / neuron / layer in turn and rank them by effect",
    "edit": "apply an edit plan (YAML/JSON) and export a verified checkpoint (HF or GGUF)",
    "verify": "check an exported checkpoint: file hashes and reload parity",
    "run": "run a whole experiment described in one YAML file",
}


# --------------------------------------------------------------------------- argparse without exits
class UsageError(CLIError):
    """A command-line usage error (unknown command or flag, bad value): exit code 2."""


class HelpShown(Exception):
    """``--help`` was printed: exit code 0."""


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` that raises ``UsageError`` instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        """Raise ``UsageError`` naming the sub-command, e.g. ``ablate: unrecognized arguments: --x``."""
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        raise UsageError(f"{f'{command}: ' if command else ''}{message}; see '{self.prog} --help'")

    def exit(self, status: int = 0, message: str | None = None):
        """After ``--help`` / ``--version``: raise ``HelpShown`` instead of ``sys.exit``."""
        if message:
            sys.stderr.write(message)
        raise HelpShown(status)


def _common(p: argparse.ArgumentParser, *, model: bool = True, report: bool = True) -> None:
    g = p.add_argument_group("common options")
    if model:
        g.add_argument("--model", default=DEFAULT_MODEL, metavar="MODEL",
                       help="'default' (SmolLM2-135M-Instruct), an HF checkpoint directory, a cached hub id or a .gguf")
        g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="load the weights in this dtype (default float32)")
        g.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")
    g.add_argument("--json", action="store_true", help="print one machine-readable JSON document instead of tables")
    if report:
        g.add_argument("--report", metavar="FILE.html", help="write a self-contained HTML report with the figures")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files/directories")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _prompt_options(p: argparse.ArgumentParser, *, metric_default: str = "loss", batch_size: int = 16,
                    batch_help: str = "prompts per forward pass") -> None:
    p.add_argument("--prompts", action="append", metavar="FILE",
                   help="prompt file: one prompt per line (PROMPT<TAB>CORRECT<TAB>INCORRECT for answers) or .jsonl")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt given inline (repeatable)")
    p.add_argument("--metric", choices=["loss", "logit-diff", "prob"], default=metric_default,
                   help=f"loss: mean next-token loss; logit-diff: correct - incorrect logit at the last token; "
                        f"prob: probability of the correct answer (default {metric_default})")
    p.add_argument("--answers", nargs="+", metavar="ANSWER",
                   help="CORRECT [INCORRECT] single-token answers for prompts that name none, e.g. ' Mary' ' John'")
    p.add_argument("--batch-size", type=_positive_int, default=batch_size, help=f"{batch_help} (default {batch_size})")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> Parser:
    """The ``scalpel`` argument parser (one sub-parser per command)."""
    parser = Parser(prog=PROG, description="Open up and modify Llama models: hooks, analyses, weight surgery, "
                                            "verified export.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    p = sub.add_parser("info", help=COMMAND_HELP["info"], description=COMMAND_HELP["info"])
    p.add_argument("--all-hooks", action="store_true", help="list every hook point instead of one line per kind")
    _common(p)

    p = sub.add_parser("generate", help=COMMAND_HELP["generate"], description=COMMAND_HELP["generate"])
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--edits", metavar="PLAN", help="edit plan file (.yaml/.json) applied before generating")
    p.add_argument("--steer", action="append", metavar="LAYER:VECTOR:SCALE",
                   help="add SCALE x the vector in VECTOR (.pt/.npy/.safetensors/.json) after layer LAYER (repeatable)")
    p.add_argument("--compare", action="store_true", help="print the base and the edited completion side by side")
    p.add_argument("--max-new-tokens", type=_positive_int, default=40)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message of the chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _common(p)

    p = sub.add_parser("lens", help=COMMAND_HELP["lens"], description=COMMAND_HELP["lens"])
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--target", action="append", metavar="TOKEN",
                   help="follow this single-token answer's probability and rank (repeatable), e.g. ' Paris'")
    p.add_argument("--top", type=_positive_int, default=1, help="top-k tokens per cell in the table (default 1)")
    p.add_argument("--stages", default="post", help="residual stages: pre, mid and/or post (default post)")
    p.add_argument("--layers", metavar="LIST", help="layers to decode, e.g. 10-29 (default all)")
    p.add_argument("--positions", metavar="LIST", help="positions to decode, e.g. -1 or 0,3,-1 (default all)")
    p.add_argument("--columns", type=_positive_int, default=6, help="positions shown in the table, the last ones "
                   "(default 6; the JSON and the report hold all)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message of the chat template")
    _common(p)

    p = sub.add_parser("heads", help=COMMAND_HELP["heads"], description=COMMAND_HELP["heads"])
    p.add_argument("--seq-len", type=_positive_int, default=20,
                   help="length of the random token run; each sequence is [BOS] R R (default 20)")
    p.add_argument("--n-seqs", type=_positive_int, default=8, help="random sequences (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", metavar="LIST", help="layers to score (default all)")
    p.add_argument("--top", type=_positive_int, default=10, help="rows per detector in the table (default 10)")
    _common(p)

    p = sub.add_parser("patch", help=COMMAND_HELP["patch"], description=COMMAND_HELP["patch"])
    p.add_argument("--clean", required=True, metavar="TEXT")
    p.add_argument("--corrupt", required=True, metavar="TEXT")
    p.add_argument("--metric", choices=["logit-diff", "prob", "kl"], default="logit-diff")
    p.add_argument("--answers", nargs="+", metavar="ANSWER", help="CORRECT [INCORRECT], e.g. ' Mary' ' John'")
    p.add_argument("--components", default="resid_pre,attn_out,mlp_out", metavar="LIST",
                   help="components to patch (default resid_pre,attn_out,mlp_out; also resid_mid, resid_post, z, "
                        "q, k, v, pattern, neurons)")
    p.add_argument("--layers", metavar="LIST", help="layers to patch, e.g. 0-9 (default all)")
    p.add_argument("--top", type=_positive_int, default=10, help="cells per component in the table (default 10)")
    _common(p)

    p = sub.add_parser("ablate", help=COMMAND_HELP["ablate"], description=COMMAND_HELP["ablate"])
    p.add_argument("--heads", metavar="L.H,...", help="attention heads, e.g. 5.3,9.1")
    p.add_argument("--neurons", metavar="L:N,...", help="MLP neurons, e.g. 12:405")
    p.add_argument("--layers", metavar="LIST", help="layers to remove, e.g. 20 or 18-20")
    p.add_argument("--mean", action="store_true", help="mean-ablate the heads (mean over the prompts) instead of zeroing")
    _prompt_options(p)
    p.add_argument("--out", metavar="DIR", help="export the edited model as a verified HF checkpoint")
    _common(p)

    p = sub.add_parser("sweep", help=COMMAND_HELP["sweep"], description=COMMAND_HELP["sweep"])
    p.add_argument("--component", choices=["heads", "neurons", "layers"], required=True)
    p.add_argument("--layers", metavar="LIST", help="layers to sweep (default all; required for neurons)")
    p.add_argument("--mean", action="store_true", help="heads: mean-ablate (mean over the prompts) instead of zeroing")
    p.add_argument("--top", type=_positive_int, default=20, help="rows in the table (default 20)")
    p.add_argument("--csv", metavar="FILE", help="write the full ranking as CSV")
    _prompt_options(p, batch_size=64, batch_help="rows per forward pass (units x prompts)")
    _common(p)

    p = sub.add_parser("edit", help=COMMAND_HELP["edit"], description=COMMAND_HELP["edit"])
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (a .gguf file with --format gguf)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf")
    p.add_argument("--gguf-dtype", choices=["f32", "f16"], default="f32")
    p.add_argument("--max-shard-size", default="2GB")
    _common(p, report=False)

    p = sub.add_parser("verify", help=COMMAND_HELP["verify"], description=COMMAND_HELP["verify"])
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--no-reload", action="store_true", help="check the hashes only")
    _common(p, model=False, report=False)

    p = sub.add_parser("run", help=COMMAND_HELP["run"], description=COMMAND_HELP["run"])
    p.add_argument("experiment", metavar="EXPERIMENT.yaml")
    p.add_argument("--dry-run", action="store_true", help="check the experiment file and print its steps only")
    p.add_argument("--model", default=None, metavar="MODEL", help="override the experiment's model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None)
    _common(p, model=False)
    return parser


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("llama-scalpel")
    except md.PackageNotFoundError:
        return "dev"


# --------------------------------------------------------------------------- models
class Context:
    """What commands share: the loaded model (loaded once, on first use)."""

    def __init__(self, model_spec: str | None, dtype: str | None = None, device: str | None = None) -> None:
        self.model_spec, self.dtype, self.device = model_spec or DEFAULT_MODEL, dtype, device
        self._model = None

    def model(self):
        """The ``HookedLlama`` named by ``--model`` (``default``: SmolLM2-135M-Instruct)."""
        if self._model is None:
            import warnings

            from hooks import HookedLlama

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if self.model_spec == DEFAULT_MODEL:
                    self._model = HookedLlama.default(dtype=self.dtype, device=self.device)
                else:
                    self._model = HookedLlama.from_pretrained(self.model_spec, dtype=self.dtype, device=self.device)
            self._model.eval()
        return self._model


def model_meta(model) -> dict[str, Any]:
    """Where the model came from, for JSON documents and reports."""
    return {"source": model.source, "sha256": getattr(model, "source_sha256", None), "n_layers": model.n_layers,
            "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device)}


def check_outputs(paths: Sequence[tuple[str, str | None]], overwrite: bool, *, gguf: bool = False) -> None:
    """Refuse (exit 2, before any work): an empty output path, two outputs naming the same path (or one
    inside another), an existing output without ``--overwrite``, an ``--out`` that is not ours to replace
    (see surgery's overwrite rule), or a directory that does not let us write (probed by creating and
    removing an empty directory). ``gguf``: ``--out`` names a .gguf file."""
    import os
    import tempfile

    given = [(flag, path) for flag, path in paths if path is not None]
    for flag, path in given:
        if not str(path).strip():
            raise CLIError(f"{flag} is empty; name the file or directory to write")
    seen: list[tuple[str, str, str]] = []
    for flag, path in given:
        real = os.path.realpath(os.path.expanduser(path))
        for other_flag, other, other_real in seen:
            if real == other_real:
                raise CLIError(f"{flag} {path} and {other_flag} {other} name the same path; give each output its own")
            inner, outer = ((flag, path), (other_flag, other)) if real.startswith(other_real + os.sep) else \
                ((other_flag, other), (flag, path)) if other_real.startswith(real + os.sep) else (None, None)
            if inner is not None:
                raise CLIError(f"{inner[0]} {inner[1]} is inside {outer[0]} {outer[1]}; write it elsewhere")
        seen.append((flag, path, real))
    for flag, path in given:
        target = Path(path).expanduser()
        if os.path.lexists(target) and not overwrite:
            raise CLIError(f"{flag} {path} already exists; pass --overwrite to replace it")
        if os.path.lexists(target) and flag.endswith("--out"):
            from surgery._atomic import replace_refusal

            problem = replace_refusal(Path(os.path.abspath(target)), f"{flag} {path}", gguf=gguf)
            if problem:
                raise CLIError(problem)
        elif target.is_dir():
            raise CLIError(f"{flag} {path} is a directory; name a file")
        where = target.parent
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".scalpel-probe-", dir=where))
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise CLIError(f"{flag} {path}: cannot write in {where} ({reason}); pick a writable location "
                           "or fix the directory's permissions") from None


# flags a command would silently ignore: (command, flag attribute, shown flag, condition that makes it ignored, fix)
IGNORED = (
    ("generate", "temperature", "--temperature", lambda a: not a.sample and a.temperature != 1.0, "add --sample"),
    ("generate", "top_p", "--top-p", lambda a: not a.sample and a.top_p is not None, "add --sample"),
    ("generate", "seed", "--seed", lambda a: not a.sample and a.seed != 0, "add --sample"),
    ("edit", "gguf_dtype", "--gguf-dtype", lambda a: a.format != "gguf" and a.gguf_dtype != "f32",
     "add --format gguf"),
    ("edit", "max_shard_size", "--max-shard-size", lambda a: a.format == "gguf" and a.max_shard_size != "2GB",
     "leave it out (a GGUF is one file)"),
    ("ablate", "mean", "--mean", lambda a: a.mean and not a.heads, "add --heads (--mean applies to heads)"),
    ("ablate", "answers", "--answers", lambda a: a.answers and a.metric == "loss",
     "add --metric logit-diff or prob"),
    ("sweep", "answers", "--answers", lambda a: a.answers and a.metric == "loss", "add --metric logit-diff or prob"),
)


def check_ignored(args) -> None:
    """Refuse a flag that this command line would ignore (no silent acceptance)."""
    for command, _, flag, ignored, fix in IGNORED:
        if args.command == command and ignored(args):
            raise CLIError(f"{flag} has no effect here; {fix}, or leave {flag} out")
    outputs = [getattr(args, k, None) for k in ("out", "csv", "report")]
    if args.overwrite and args.command not in ("run",) and not any(o is not None for o in outputs):
        raise CLIError("--overwrite has no effect: this command line writes no output (--out, --report or --csv)")
    device = getattr(args, "device", None)
    if device is not None:
        check_device(device)


def check_device(device: str) -> None:
    """``--device``: a torch device that exists here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CLIError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                       "pick one of them")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device}: MPS is not available here; use --device cpu")


# --------------------------------------------------------------------------- dispatch
def _handlers() -> dict[str, Callable]:
    import _cli_commands as c
    import _cli_run

    return {"info": c.cmd_info, "generate": c.cmd_generate, "lens": c.cmd_lens, "heads": c.cmd_heads,
            "patch": c.cmd_patch, "ablate": c.cmd_ablate, "sweep": c.cmd_sweep, "edit": c.cmd_edit,
            "verify": c.cmd_verify, "run": _cli_run.cmd_run}


def execute(args: argparse.Namespace, ctx: Context) -> Output:
    """Run one parsed command with a shared ``Context``; returns its ``Output`` (nothing printed)."""
    return _handlers()[args.command](args, ctx)


def _print(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that cleanup code runs (an export removes its temp directory)."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """While ``main`` runs, SIGTERM raises ``Terminated`` instead of ending the process on the spot."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    fired = []

    def handler(signum, frame):
        if fired:  # a second SIGTERM while the first unwinds: the cleanup under way must finish
            return
        fired.append(signum)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``scalpel`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (0, 1 or 2;
    130 after Ctrl-C, 143 after SIGTERM)."""
    with _sigterm_unwinds():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        try:
            args = build_parser().parse_args(argv)
        except HelpShown as shown:
            return int(shown.args[0] or 0)
        outputs = [("--report", getattr(args, "report", None)), ("--out", getattr(args, "out", None)),
                   ("--csv", getattr(args, "csv", None))]
        check_ignored(args)
        check_outputs(outputs, args.overwrite, gguf=getattr(args, "format", None) == "gguf")
        ctx = Context(getattr(args, "model", None), getattr(args, "dtype", None), getattr(args, "device", None))
        with _quiet_progress(not sys.stdout.isatty()):
            out = execute(args, ctx)
        if getattr(args, "report", None):
            meta = {"command": "scalpel " + " ".join(_quote(a) for a in argv)}
            if ctx._model is not None:
                meta["model"] = ctx.model().source or "in memory"
            write_report(args.report, out.sections or [out], title=out.title or f"{PROG} {args.command}", meta=meta)
            out.files.append(str(args.report))
            out.data.setdefault("files", []).append(str(args.report))
        _print(to_json(out.data) if args.json else render_text(out))
        return 0
    except Terminated:
        _error("terminated (SIGTERM)", debug)
        return 143
    except KeyboardInterrupt:
        _error("interrupted", debug)
        return 130
    except Exception as exc:  # one line, exit 2 for bad input, 1 for anything else
        code = 2 if _is_usage(exc) else 1
        _error(_message(exc), debug)
        return code


@contextlib.contextmanager
def _quiet_progress(quiet: bool):
    """Silence transformers' own progress bars (shard writing, GGUF de-quantising) when ``quiet``;
    ours are silenced by ``_cli_ablate.progress``. Everything is restored on exit."""
    if not quiet:
        yield
        return
    from functools import partial

    from tqdm.auto import tqdm
    from transformers.utils import logging as tlog

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - gguf is a dependency
        gguf_utils = None
    was_enabled = tlog.is_progress_bar_enabled()
    saved = getattr(gguf_utils, "tqdm", None)
    tlog.disable_progress_bar()
    if saved is not None:
        gguf_utils.tqdm = partial(tqdm, disable=True)
    try:
        yield
    finally:
        if saved is not None:
            gguf_utils.tqdm = saved
        if was_enabled:
            tlog.enable_progress_bar()


def _is_usage(exc: BaseException) -> bool:
    from hooks.errors import ScalpelError

    export_errors = sys.modules.get("surgery.errors")  # loaded whenever an export ran
    if export_errors is not None and isinstance(exc, export_errors.ExportWriteError):
        import errno  # a read-only --out is bad input (2); a full disk is a runtime failure (1)

        return exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    if isinstance(exc, (ScalpelError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    try:
        import yaml

        return isinstance(exc, yaml.YAMLError)
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        return False


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = f"no such file or directory: {exc.filename}"
    first = text.splitlines()[0] if text else ""
    from hooks.errors import ScalpelError

    if isinstance(exc, ScalpelError) and first:
        for python, flag in PYTHON_TO_FLAGS:  # the command line names its flags, not Python arguments
            first = first.replace(python, flag)
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


PYTHON_TO_FLAGS = (("pass overwrite=True", "pass --overwrite"), ("max_new_tokens=", "--max-new-tokens "),
                   ("lower max_new_tokens", "lower --max-new-tokens"),
                   ("use do_sample=False for greedy decoding", "leave out --sample for greedy decoding"))


def _error(message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


if __name__ == "__main__":
    sys.exit(main())
