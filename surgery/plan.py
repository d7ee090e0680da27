"""Edit plans: ordered lists of edits, read from and written to JSON or YAML.

File format (JSON or YAML, chosen by the suffix; ``.yaml``/``.yml`` → YAML)::

    format: llama-scalpel-plan
    version: 1
    edits:
      - {edit: ZeroHeads, layer: 3, heads: [1, 2]}
      - {edit: RemoveLayers, layers: [10]}
      - {edit: AddSteering, layer: 5, vector: [0.1, ...], scale: 4.0}

A bare list of edit records is accepted too. Edit kinds are class names or their snake_case
(``zero_heads``). Later edits see the model as earlier ones left it (layer numbers after a
``RemoveLayers`` are the new ones).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from _core.readers import is_yaml, read_data, register_loader
from _core.writer import write_file
from hooks.errors import ScalpelError
from hooks.model import check_model

from . import _state
from .edits import Edit, HookList, RemoveLayers
from .errors import EditError, PlanError

if TYPE_CHECKING:
    from hooks.model import HookedLlama

FORMAT = "llama-scalpel-plan"
VERSION = 1
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_INPUT_SIDE = re.compile(r"(attn\.hook_z|mlp\.hook_post|hook_normalized)$")


class EditPlan:
    """An ordered list of edits; ``apply``, ``as_hooks``, ``applied`` work as for a single edit."""

    def __init__(self, edits: Iterable[Edit | dict] = ()) -> None:
        self.edits: list[Edit] = []
        for i, e in enumerate(edits):
            if not isinstance(e, (Edit, dict)) and callable(getattr(e, "to_edit", None)):
                try:  # a run-time change that knows its weight edit (e.g. steering along an SAE feature)
                    e = e.to_edit()
                except ScalpelError as exc:
                    raise EditError(f"edit #{i + 1}: {exc}") from None
            if isinstance(e, dict):
                try:
                    e = Edit.from_dict(e)
                except EditError as exc:
                    raise type(exc)(f"edit #{i + 1}: {exc}", param=exc.param) from None
            if not isinstance(e, Edit):
                raise PlanError(f"edit #{i + 1} is a {type(e).__name__}, not an Edit or an edit record")
            self.edits.append(e)

    # -- list-like ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Edit]:
        return iter(self.edits)

    def __len__(self) -> int:
        return len(self.edits)

    def __getitem__(self, i):
        return self.edits[i]

    def __eq__(self, other) -> bool:
        return isinstance(other, EditPlan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"EditPlan({self.edits!r})"

    def append(self, edit: Edit) -> "EditPlan":
        self.edits.append(edit)
        return self

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "edits": [e.to_dict() for e in self.edits]}

    @classmethod
    def from_dict(cls, data) -> "EditPlan":
        if isinstance(data, list):
            return cls(data)
        if not isinstance(data, dict) or "edits" not in data:
            raise PlanError("an edit plan is a mapping with an 'edits' list (or a bare list of edit records)")
        unknown = [k for k in data if k not in ("format", "version", "edits")]
        if unknown:
            raise PlanError(f"unknown key {unknown[0]!r} in the plan; a plan has only format, version and edits")
        fmt, version = data.get("format", FORMAT), data.get("version", VERSION)
        if fmt != FORMAT:
            raise PlanError(f"not an edit plan: format is {fmt!r}, expected {FORMAT!r}")
        if version != VERSION:
            raise PlanError(
                f"edit plan version {version!r} is not supported (this llama-scalpel reads version {VERSION})"
            )
        if not isinstance(data["edits"], list):
            raise PlanError("the plan's 'edits' must be a list")
        return cls(data["edits"])

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write JSON (or YAML for ``.yaml``/``.yml``) through the staged writer: an existing file is
        replaced only with ``overwrite=True`` and only when llama-scalpel wrote it and it is unchanged
        since (a YAML plan carries a self-checking last line, a JSON plan a record; see ``_core.writer``)."""
        data = self.to_dict()
        if is_yaml(path):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
        else:
            text = json.dumps(data, indent=1) + "\n"
        return write_file(path, text, kind="plan", overwrite=overwrite, param="path")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EditPlan":
        path = Path(path)
        data = read_data(path, PlanError, "plan file", param="path")
        try:
            plan = cls.from_dict(data)
        except EditError as exc:
            raise PlanError(f"{path}: {exc}") from None
        for e in plan:  # adapter paths in a plan file are relative to the file
            if getattr(e, "adapter_dir", None) and not Path(e.adapter_dir).is_absolute():
                beside = path.parent / e.adapter_dir
                if beside.exists():
                    e.adapter_dir = str(beside)
        return plan

    # -- applying -----------------------------------------------------------------------
    def validate(self, model: HookedLlama) -> None:
        """Check every edit against the model as earlier edits leave it; the model is unchanged after."""
        with _state.journal(model):
            self.apply(model, atomic=False)

    def apply(self, model: HookedLlama, *, atomic: bool = True):
        """Apply every edit in order. ``atomic`` (default): all or nothing, an error restores the model
        and re-raises (this keeps a copy of every tensor the plan writes until it is done)."""
        check_model(model, "EditPlan.apply")
        with _state.transaction(model) if atomic else contextlib.nullcontext():
            for i, e in enumerate(self.edits):
                try:
                    e.apply(model)
                except EditError as exc:
                    raise type(exc)(f"edit #{i + 1}: {exc}", param=exc.param) from None
        return model

    @contextlib.contextmanager
    def applied(self, model: HookedLlama) -> Iterator:
        """``with plan.applied(model):`` – every edit applied inside, the exact original model after."""
        with _state.journal(model):
            self.apply(model, atomic=False)  # the journal restores everything anyway
            yield model

    def as_hooks(self, model: HookedLlama) -> HookList:
        """Hooks for the whole plan on the unedited ``model``, in plan order.

        Each edit's hooks are built against the model as the earlier edits leave it (applied inside a
        journal, so ``model`` is unchanged afterwards); layer numbers are mapped back to the original
        model's after a ``RemoveLayers``.
        """
        keyed = []
        original = list(range(model.n_layers))
        with _state.journal(model):
            for i, e in enumerate(self.edits):
                try:
                    part = e.as_hooks(model)
                except EditError as exc:
                    raise type(exc)(f"edit #{i + 1}: {exc}", param=exc.param) from None
                for j, (name, fn) in enumerate(part):
                    name = _renumber(name, original)
                    keyed.append(((-i if _INPUT_SIDE.search(name) else i, j), name, fn))
                if isinstance(e, RemoveLayers):
                    original = [original[k] for k in e.kept(len(original))]
                e.apply(model)
        # Hooks at one point run in list order. Where a hook point is a matrix's *input* (hook_z for
        # o_proj, hook_post for down_proj, the norms' outputs for q/k/v/gate/up/lm_head), a later
        # edit of that matrix's columns acts on the matrix as earlier edits left it, i.e. on the input
        # *before* the earlier edits' hooks: those points take hooks in reverse plan order. Outputs
        # (attn_out, mlp_out, embed, q/k/v, logits) compose in plan order.
        keyed.sort(key=lambda item: item[0])
        return [(name, fn) for _, name, fn in keyed]


def _renumber(name: str, original: list[int]) -> str:
    return _BLOCK.sub(lambda m: f"blocks.{original[int(m.group(1))]}.", name)


def as_plan(edits) -> EditPlan:
    """An ``EditPlan`` from a plan, an edit, a list of edits/records, a plan dict or a plan file path."""
    if edits is None:
        return EditPlan()
    if isinstance(edits, EditPlan):
        return edits
    if isinstance(edits, Edit) or callable(getattr(edits, "to_edit", None)):
        return EditPlan([edits])
    if isinstance(edits, (str, os.PathLike)):
        return EditPlan.load(edits)
    if isinstance(edits, dict):
        return EditPlan.from_dict(edits)
    if isinstance(edits, (bytes, bytearray)) or not hasattr(edits, "__iter__"):
        raise PlanError(
            f"edits must be an EditPlan, an edit, a list of edits, a plan dict or a plan file path, "
            f"got {type(edits).__name__}"
        )
    return EditPlan(edits)


def load_plan(path: str | os.PathLike) -> EditPlan:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise PlanError(f"load_plan takes the path of a plan file (str or pathlib.Path), got {type(path).__name__}")
    return EditPlan.load(path)


def save_plan(plan, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a plan (or anything ``as_plan`` takes) to ``path``; see ``EditPlan.save``."""
    return as_plan(plan).save(path, overwrite=overwrite)


def apply_plan(model: HookedLlama, plan):
    """Apply a plan (or a list of edits, or a plan file) to ``model`` in place; all or nothing."""
    return as_plan(plan).apply(model)


def _sample_plan() -> dict[str, bytes]:
    return {"plan.yaml": b"edits:\n  - {edit: ZeroHeads, layer: 0, heads: [0]}\n"}


register_loader("plan", load_plan, kind="file", files=(".yaml", ".yml", ".json"), sample=_sample_plan)
