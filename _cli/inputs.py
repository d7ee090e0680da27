"""Reading what users type and the files they point at: steering specs, prompt files and vectors. Every
problem is a one-line ``CLIError`` (exit code 2). Head, neuron and layer lists are parsed and range-checked
by the library's one parser and check of each kind (``hooks.indices``).

Prompt files (``--prompts``):

- ``.jsonl``: one JSON object per line, ``{"prompt": "...", "correct": " Mary", "incorrect": " John"}``
  (``correct``/``incorrect`` optional), or a JSON string;
- ``.json``: a list of the same;
- anything else (``.txt``, ``.tsv``): one prompt per line (split on ``\n`` only: U+2028 stays inside a
  prompt); a line may carry its answers after tabs, ``PROMPT<TAB>CORRECT<TAB>INCORRECT``. Blank lines and
  lines starting with ``#`` are skipped; spaces are kept as written (answers such as `` Mary`` start with
  a space). UTF-8 only (a leading BOM is dropped), duplicate JSON keys refused.

Example::

    parse_steer("12:happy.pt:4")    # Steer(12, Path('happy.pt'), 4.0)
    read_prompts("examples/prompts_ioi.txt")[0].correct   # ' Mary'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from _core.errors import ScalpelError, arg
from _core.readers import read_data, read_prompt_file, register_loader
from analyses.ablation import Prompt


class CLIError(ScalpelError, ValueError):
    """Bad command-line input: a malformed spec, a missing or unreadable file, an existing output."""


# --------------------------------------------------------------------------- steering
@dataclass
class Steer:
    """``--steer LAYER:FILE[:SCALE]``: add ``scale * vector`` after layer ``layer``."""

    layer: int
    path: Path
    scale: float = 1.0


def parse_steer(spec: str) -> Steer:
    """``"12:happy.pt:4"`` → ``Steer(12, Path("happy.pt"), 4.0)``; the scale is optional (1.0)."""
    layer, sep, rest = spec.partition(":")
    if not sep or not layer.strip().isdigit() or not rest:
        raise CLIError(f"bad steer spec {spec!r}: write LAYER:VECTOR_FILE:SCALE, e.g. 12:happy.pt:4")
    path, scale = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    if not path:
        raise CLIError(f"bad steer spec {spec!r}: the vector file is missing (LAYER:VECTOR_FILE:SCALE)")
    return Steer(int(layer), Path(path), scale)


def load_vector(path: str | Path) -> torch.Tensor:
    """A 1-D float tensor from ``.pt`` (a tensor, or a dict holding one), ``.npy``, ``.safetensors``
    (one tensor) or ``.json`` (a list of numbers)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"no such vector file: {path}")
    suffix = path.suffix.lower()
    value: Any  # a tensor, or a dict of them (.pt, .safetensors)
    try:
        if suffix == ".npy":
            import numpy as np

            value = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            value = load_file(str(path))
        elif suffix == ".json":
            value = torch.tensor(read_data(path, CLIError, "vector file", param="steer"), dtype=torch.float32)
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, numpy, safetensors and JSON errors all mean "cannot read"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CLIError(f"cannot read a vector from {path}: {first}") from None
    if isinstance(value, dict):
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise CLIError(f"{path} holds {len(tensors)} tensors; save exactly one steering vector")
        value = tensors[0]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise CLIError(f"{path} does not hold a float tensor")
    value = value.squeeze()
    if value.dim() != 1:
        raise CLIError(f"{path} holds a tensor of shape {tuple(value.shape)}; a steering vector is 1-D [d_model]")
    return value.float()


# --------------------------------------------------------------------------- prompts
PromptItem = Prompt  # one prompt and (optionally) its answers; ``where`` names its file and line for errors


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Prompts from a ``.txt``/``.tsv``, ``.jsonl`` or ``.json`` file (see the module docstring), read by the
    one prompt-file reader (``_core.readers.read_prompt_file``) with answers."""
    if not str(path).strip():
        raise CLIError("--prompts is empty; name a prompts file")
    return read_prompt_file(path, answers=True, error=CLIError, what="prompts file")


register_loader("vector", load_vector, kind="file", files=(".json",), sample=lambda: {"v.json": b"[1.0, 2.0, 3.0]"})
register_loader(
    "prompts (answers)",
    read_prompts,
    kind="file",
    files=(".txt", ".tsv", ".jsonl", ".json"),
    sample=lambda: {"prompts.tsv": b"When Mary and John went to the store, John gave a drink to\t Mary\t John\n"},
)


def gather_prompts(texts: list[str] | None, files: list[str] | None, answers: list[str] | None) -> list[PromptItem]:
    """Prompts given inline (``--prompt``) and in files (``--prompts``); ``--answers`` fills in the
    answers of prompts that name none."""
    items = [PromptItem(t, where=f"--prompt {t!r}") for t in texts or []]
    for f in files or []:
        items += read_prompts(f)
    if answers:
        for item in items:
            if item.correct is None:
                item.correct = answers[0]
                if len(answers) > 1:
                    item.incorrect = answers[1]
    for item in items:
        if item.correct is not None and item.correct == item.incorrect:
            raise CLIError(
                f"{item.where}: the correct and incorrect answers are the same ({item.correct!r}), which "
                "makes every logit difference 0; give two different answers"
            )
    return items


def check_answers(answers: list[str] | None) -> list[str] | None:
    """``--answers``: CORRECT [INCORRECT], at most two values."""
    if answers and len(answers) > 2:
        raise CLIError(f"--answers takes CORRECT [INCORRECT], got {len(answers)} values")
    return answers


def parse_ints(spec: str | int | list, param: str) -> list[int]:
    """Comma-separated integers (negative allowed), e.g. ``0,3,-1``; an integer or a list of integers as is."""
    parts = spec if isinstance(spec, list) else [spec]
    try:
        return [int(x) if isinstance(x, int) and not isinstance(x, bool) else _int(x) for p in parts for x in _split(p)]
    except ValueError:
        raise CLIError(f"{arg(param)} {spec!r}: expected comma-separated integers, e.g. 0,3,-1", param=param) from None


def split_list(spec: str | list) -> list:
    """Comma-separated text as its items (stripped, empty ones dropped); a list as it is."""
    return [x for p in (spec if isinstance(spec, list) else [spec]) for x in _split(p)]


def _split(part):
    return [x.strip() for x in part.split(",") if x.strip()] if isinstance(part, str) else [part]


def _int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, (str, int)):
        raise ValueError(x)
    return int(x)
