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


def check_outputs(paths: Sequence[tuple[str, str | None]], overwrite: bool) -> None:
    """Refuse (exit 2, before any work) to replace an existing output unless ``--overwrite``, or to
    write where the directory does not let us (probed by creating and removing an empty directory)."""
    for flag, path in paths:
        if path and Path(path).expanduser().exists() and not overwrite:
            raise CLIError(f"{flag} {path} already exists; pass --overwrite to replace it")
        if path and Path(path).expanduser().exists() and flag == "--report" and Path(path).is_dir():
            raise CLIError(f"--report {path} is a directory; name an .html file")
        if path:
            where = Path(path).expanduser().parent
            while not where.exists() and where != where.parent:
                where = where.parent
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".scalpel-probe-", dir=where))
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise CLIError(f"{flag} {path}: cannot write in {where} ({reason}); pick a writable location "
                               "or fix the directory's permissions") from None
