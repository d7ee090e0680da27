"""Export as named stages, shared by the Hugging Face directory (``hf.HFExport``) and the GGUF file
(``gguf.GGUFExport``)::

    validate → state → write → compare → seal → commit

1. **validate** (``validate``): every argument, the target against the overwrite rule (``_core.writer``),
   the probes, and the base the KL is measured against (its hash and unedited logits); nothing written.
2. **state** (``state``): the plan applied inside a journal (each edit checked first; the model is
   restored when the export ends), the edited model's probe logits, the config and the list of tensors to
   write (``tensors.export_entries``: names, shapes, where each is read from; nothing copied).
3. **write** (format's own): the tensors streamed into the staged target, one at a time, from wherever they
   live (``tensors.read_tensor``: CPU, GPU, accelerate offload), hashing what is written as it goes.
4. **compare** (format's own): the staged output read back by plain transformers and its logits compared
   with the in-memory edited model's; written bytes compared with the live tensors' by hash.
5. **seal** (format's own): the manifest (``manifest.ExportManifest``, built from the stages' results).
6. **commit**: the writer moves the staged output into place exclusively; the result is returned.

Any failure before commit leaves the target as it was (the writer removes the stage). Tests inject faults
by patching a stage (a method of these classes), never through production code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from hooks.loading import plain_config
from hooks.model import check_model

from .. import _state
from ..errors import ExportError
from ..plan import as_plan
from .manifest import config_changes, layer_map
from .probes import probe_inputs, probe_logits
from .tensors import export_config, export_entries, state_sha256

if TYPE_CHECKING:
    from hooks import HookedLlama

    from .tensors import TensorEntry


@dataclass
class ExportResult:
    """What ``export`` wrote and measured."""

    out_dir: Path
    files: dict[str, str]  # file name -> sha256
    max_abs_logit_diff: float  # reloaded transformers model vs in-memory edited model, all probe positions
    tolerance: float
    kl_to_base: float | None  # mean over probes of KL(base ‖ edited) at the last position
    manifest: dict[str, Any] = field(repr=False)

    def __getitem__(self, key):
        return getattr(self, key)


@dataclass
class GGUFResult:
    path: Path
    dtype: str
    sha256: str
    max_abs_logit_diff: float  # transformers' GGUF loader vs the in-memory model with the file's rounding
    max_abs_logit_diff_unrounded: float  # … vs the in-memory model itself (f16 rounding shows here)
    tolerance: float
    probes: list = field(repr=False, default_factory=list)

    def __getitem__(self, key):
        return getattr(self, key)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.I)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value) -> int:
    """``"2GB"`` → 2·10⁹ bytes (``GiB`` = 2³⁰), as transformers reads ``max_shard_size``; ints pass."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ExportError(
            f"max_shard_size {value!r} is not a size; use e.g. '2GB', '500MB' or a byte count", param="max_shard_size"
        )
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if n <= 0:
        raise ExportError(f"max_shard_size {value!r} must be positive", param="max_shard_size")
    return n


def target_path(value, name: str) -> Path:
    """``out_dir`` / ``path`` as a ``Path``: a non-empty string or path-like, else ``ExportError``."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise ExportError(f"{name} must be a path (str or pathlib.Path), got {type(value).__name__}", param=name)
    if not str(value).strip():
        raise ExportError(f"{name} is empty; name the file or directory to write", param=name)
    return Path(value).expanduser()


@dataclass
class Base:
    """What the edits are measured against: the unedited model's hash (and what it is the hash of) and its
    probe logits (None when unknown: edits applied before the call outside any journal)."""

    sha256: str | None
    sha256_of: str | None
    logits: list[torch.Tensor] | None


class Export:
    """One export, stage by stage (module docstring). Subclasses define ``write``, ``compare``, ``seal`` and
    ``commit`` for their format, and ``run`` in the order of the stages."""

    kind = "export"  # the writer's kind of output
    param = "out_dir"  # the argument naming the target
    function = "export"  # the public function that runs it, as errors name it

    def __init__(
        self,
        model: HookedLlama,
        target,
        *,
        edits=None,
        overwrite: bool = False,
        probe_prompts: Sequence[str] | None = None,
        base_sha256: str | None = None,
        base_logits: Sequence[torch.Tensor] | None = None,
        provenance: dict | None = None,
    ) -> None:
        self.model, self.target_arg, self.overwrite = model, target, overwrite
        self.edits, self.probe_prompts = edits, probe_prompts
        self.base_sha256, self.base_logits, self.provenance = base_sha256, base_logits, provenance

    # ------------------------------------------------------------------- 1. validate
    def validate(self) -> None:
        """Arguments, target, probes and base (module docstring); raises before anything is written."""
        from _core.writer import Output, check_outputs

        check_model(self.model, self.function)
        if self.provenance is not None:
            try:
                json.dumps(self.provenance, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ExportError(f"provenance must be a JSON-ready dict ({exc})", param="provenance") from None
        self.target = target_path(self.target_arg, self.param)
        self.shown = str(self.target_arg)
        self.absolute = Path(os.path.abspath(self.target))
        check_outputs(
            [Output(self.target, kind=self.kind, overwrite=self.overwrite, param=self.param, shown=self.shown)]
        )
        self.plan = as_plan(self.edits)
        self.probes = probe_inputs(self.model, self.probe_prompts)
        self.prior = list(self.model.edit_history)
        self.base_config = plain_config(self.model.config).to_dict()
        self.base = self.find_base()

    def find_base(self) -> Base:
        """The base hash (the caller's, the source file's, or the unedited state dict's) and probe logits."""
        model, prior = self.model, self.prior
        self.base_is_edited = False  # True below when nothing is edited: one forward then serves both
        logits = self.base_logits
        if logits is not None:
            logits = [torch.as_tensor(t).float().cpu() for t in logits]
            if len(logits) != len(self.probes) or any(
                b.shape != (p.ids.shape[1], model.d_vocab) for b, p in zip(logits, self.probes)
            ):
                raise ExportError(
                    f"base_logits must hold one [positions, {model.d_vocab}] tensor per probe prompt",
                    param="base_logits",
                )
        sha, of = self.base_sha256, "given by the caller" if self.base_sha256 is not None else None
        if sha is None and getattr(model, "source_sha256", None):
            sha, of = model.source_sha256, "source file"
        if sha is not None and logits is not None:
            return Base(sha, of, logits)
        self.base_is_edited = logits is None and not prior and len(self.plan) == 0
        with _state.unapplied(model) as unedited:  # edits applied inside an open applied(): their base is known
            if not prior or unedited:
                if sha is None:
                    sha, of = state_sha256(model), "state dict tensors"
                if logits is None and not self.base_is_edited:
                    logits = probe_logits(model, self.probes)
        return Base(sha, of, logits)

    # ------------------------------------------------------------------- 2. state
    @contextlib.contextmanager
    def state(self) -> Iterator[None]:
        """Inside: the plan applied (the model restored on exit), ``edited`` probe logits, ``config``,
        ``entries`` (the tensors to write) and ``history`` (every edit record, earlier ones first)."""
        model = self.model
        n_original = model.n_layers + sum(
            len(r.get("layers", ())) for r in self.prior if r.get("edit") == "RemoveLayers"
        )
        with _state.journal(model):
            self.plan.apply(model, atomic=False)  # validates each edit first; raises before anything is written
            self.edited = probe_logits(model, self.probes)
            if not all(torch.isfinite(e).all() for e in self.edited):
                raise ExportError("the edited model gives NaN or inf logits on the probe prompts; nothing was written")
            if self.base_is_edited:  # nothing edited: the base's logits are these
                self.base.logits = self.edited
            self.config = export_config(model)
            self.entries: list[TensorEntry] = export_entries(model, self.config)
            self.history = list(model.edit_history)
            self.layer_map = layer_map(self.history, n_original)
            self.config_changes = config_changes(self.base_config, self.config.to_dict())
            self.dtype = model.dtype
            yield

    # ------------------------------------------------------------------- 3–6, per format
    def run(self):  # pragma: no cover - abstract
        raise NotImplementedError


def source_dir(model: HookedLlama) -> Path | None:
    source = getattr(model, "source", None)
    if source and Path(str(source)).is_dir():
        return Path(str(source))
    return None
