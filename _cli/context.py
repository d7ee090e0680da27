"""What every command shares: the model named by ``--model`` (loaded once) and its metadata, and the
checks of flags a command line would ignore (outputs are checked by ``_core.writer.check_outputs``).

Example::

    ctx = Context("default")
    model = ctx.model()                 # HookedLlama, loaded on first use
    model_meta(model)["n_layers"]       # 30
    check_ignored(args)                 # CLIError: --temperature has no effect here; add --sample, ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from _cli.inputs import CLIError

if TYPE_CHECKING:
    from hooks import HookedLlama

DEFAULT_MODEL = "default"


class Context:
    """What commands share: the loaded model (loaded once, on first use)."""

    def __init__(self, model_spec: str | None, dtype: str | None = None, device: str | None = None) -> None:
        self.model_spec, self.dtype, self.device = model_spec or DEFAULT_MODEL, dtype, device
        self._model: HookedLlama | None = None

    @property
    def loaded(self) -> bool:
        """Whether a command has loaded the model."""
        return self._model is not None

    def model(self) -> HookedLlama:
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


def model_meta(model: HookedLlama) -> dict[str, Any]:
    """Where the model came from, for JSON documents and reports."""
    return {
        "source": model.source,
        "sha256": getattr(model, "source_sha256", None),
        "n_layers": model.n_layers,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
    }


# flags a command would silently ignore: (command, flag attribute, shown flag, condition that makes it ignored, fix)
IGNORED = (
    ("generate", "temperature", "--temperature", lambda a: not a.sample and a.temperature != 1.0, "add --sample"),
    ("generate", "top_p", "--top-p", lambda a: not a.sample and a.top_p is not None, "add --sample"),
    ("generate", "seed", "--seed", lambda a: not a.sample and a.seed != 0, "add --sample"),
    ("edit", "gguf_dtype", "--gguf-dtype", lambda a: a.format != "gguf" and a.gguf_dtype != "f32", "add --format gguf"),
    ("edit", "gguf_quant", "--gguf-quant", lambda a: a.format != "gguf" and a.gguf_quant, "add --format gguf"),
    (
        "edit",
        "gguf_quant_dir",
        "--gguf-quant-dir",
        lambda a: not a.gguf_quant and a.gguf_quant_dir,
        "add --gguf-quant TYPES (e.g. Q8_0,Q4_K_M)",
    ),
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
