"""What every command shares: the model named by ``--model`` (loaded once), its metadata, and the
check that outputs may be written, done before any work.

Example::

    ctx = Context("default")
    model = ctx.model()                 # HookedLlama, loaded on first use
    model_meta(model)["n_layers"]       # 30
    check_outputs([("--out", "edited")], overwrite=False)   # CLIError if edited/ exists
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from _cli.inputs import CLIError

DEFAULT_MODEL = "default"


class Context:
    """What commands share: the loaded model (loaded once, on first use)."""

    def __init__(self, model_spec: str | None, dtype: str | None = None, device: str | None = None) -> None:
        self.model_spec, self.dtype, self.device = model_spec or DEFAULT_MODEL, dtype, device
        self._model = None

    @property
    def loaded(self) -> bool:
        """Whether a command has loaded the model."""
        return self._model is not None

    def model(self):
        """The ``HookedLlama`` named by ``--model`` (``default``: SmolLM2-135M-Instruct)."""
        if self._model is None:
            import warnings

            from _cli.progress import task
            from hooks import HookedLlama

            with warnings.catch_warnings(), task(f"loading the model ({self.model_spec})"):
                warnings.simplefilter("ignore")
                if self.model_spec == DEFAULT_MODEL:
                    self._model = HookedLlama.default(dtype=self.dtype, device=self.device)
                else:
                    self._model = HookedLlama.from_pretrained(self.model_spec, dtype=self.dtype, device=self.device)
            self._model.eval()
        return self._model


def model_meta(model) -> dict[str, Any]:
    """Where the model came from, for JSON documents and reports."""
    return {
        "source": model.source,
        "sha256": getattr(model, "source_sha256", None),
        "n_layers": model.n_layers,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
    }


def check_outputs(paths: Sequence[tuple[str, str | None]], overwrite: bool, *, gguf: bool = False) -> None:
    """Refuse (exit 2, before any work): an empty output path, two outputs naming the same path (or one
    inside another), an existing output without ``--overwrite``, an ``--out`` that is not ours to replace
    (see surgery's overwrite rule), or a directory that does not let us write (probed by creating and
    removing an empty directory). ``gguf``: ``--out`` names a .gguf file."""
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
            inner, outer = (
                ((flag, path), (other_flag, other))
                if real.startswith(other_real + os.sep)
                else ((other_flag, other), (flag, path))
                if other_real.startswith(real + os.sep)
                else (None, None)
            )
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
            raise CLIError(
                f"{flag} {path}: cannot write in {where} ({reason}); pick a writable location "
                "or fix the directory's permissions"
            ) from None


# flags a command would silently ignore: (command, flag attribute, shown flag, condition that makes it ignored, fix)
IGNORED = (
    ("generate", "temperature", "--temperature", lambda a: not a.sample and a.temperature != 1.0, "add --sample"),
    ("generate", "top_p", "--top-p", lambda a: not a.sample and a.top_p is not None, "add --sample"),
    ("generate", "seed", "--seed", lambda a: not a.sample and a.seed != 0, "add --sample"),
    ("edit", "gguf_dtype", "--gguf-dtype", lambda a: a.format != "gguf" and a.gguf_dtype != "f32", "add --format gguf"),
    (
        "edit",
        "max_shard_size",
        "--max-shard-size",
        lambda a: a.format == "gguf" and a.max_shard_size != "2GB",
        "leave it out (a GGUF is one file)",
    ),
    ("ablate", "mean", "--mean", lambda a: a.mean and not a.heads, "add --heads (--mean applies to heads)"),
    ("ablate", "answers", "--answers", lambda a: a.answers and a.metric == "loss", "add --metric logit-diff or prob"),
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
        raise CLIError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); pick one of them"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device}: MPS is not available here; use --device cpu")
