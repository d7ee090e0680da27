"""Reading what users type and the files they point at: unit specs (heads, neurons, layers),
steering specs, prompt files and vectors. Every problem is a one-line ``CLIError`` (exit code 2).

Prompt files (``--prompts``):

- ``.jsonl``: one JSON object per line, ``{"prompt": "...", "correct": " Mary", "incorrect": " John"}``
  (``correct``/``incorrect`` optional);
- anything else (``.txt``, ``.tsv``): one prompt per line; a line may carry its answers after tabs,
  ``PROMPT<TAB>CORRECT<TAB>INCORRECT``. Blank lines and lines starting with ``#`` are skipped; spaces
  are kept as written (answers such as `` Mary`` start with a space).

Example::

    parse_heads("5.3,9.1")          # [(5, 3), (9, 1)]
    parse_neurons("12:4051")        # [(12, 4051)]
    parse_layers("3,10-12")         # [3, 10, 11, 12]
    read_prompts("examples/prompts_ioi.txt")[0].correct   # ' Mary'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from analyses.ablation import Prompt
from hooks.errors import ScalpelError


class CLIError(ScalpelError, ValueError):
    """Bad command-line input: a malformed spec, a missing or unreadable file, an existing output."""


# --------------------------------------------------------------------------- unit specs
_HEAD = re.compile(r"^(?:(\d+)\.(\d+)|[Ll](\d+)[Hh](\d+))$")
_NEURON = re.compile(r"^(\d+):(\d+)$")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _items(spec: str | list[str]) -> list[str]:
    parts = spec if isinstance(spec, list) else [spec]
    out = [p.strip() for s in parts for p in str(s).split(",")]
    return [p for p in out if p]


def parse_heads(spec: str | list[str]) -> list[tuple[int, int]]:
    """``"5.3,9.1"`` (or ``"L5H3"``) → ``[(5, 3), (9, 1)]``: (layer, query head) pairs, syntax only."""
    out = []
    for item in _items(spec):
        m = _HEAD.match(item)
        if not m:
            raise CLIError(f"bad head spec {item!r}: write LAYER.HEAD, e.g. 5.3 (several: 5.3,9.1)")
        layer, head = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        out.append((int(layer), int(head)))
    if not out:
        raise CLIError("--heads is empty: write LAYER.HEAD, e.g. 5.3")
    return _dedupe(out)


def parse_neurons(spec: str | list[str]) -> list[tuple[int, int]]:
    """``"12:4051,3:7"`` → ``[(12, 4051), (3, 7)]``: (layer, neuron) pairs, syntax only."""
    out = []
    for item in _items(spec):
        m = _NEURON.match(item)
        if not m:
            raise CLIError(f"bad neuron spec {item!r}: write LAYER:NEURON, e.g. 12:405 (several: 12:405,3:7)")
        out.append((int(m.group(1)), int(m.group(2))))
    if not out:
        raise CLIError("--neurons is empty: write LAYER:NEURON, e.g. 12:405")
    return _dedupe(out)


def parse_layers(spec: str | list[str] | int) -> list[int]:
    """``"3,10-12"`` → ``[3, 10, 11, 12]`` (ranges inclusive), syntax only."""
    if isinstance(spec, int):
        return [spec]
    out: list[int] = []
    for item in _items(spec):
        m = _RANGE.match(item)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise CLIError(f"bad layer spec {item!r}: write layer numbers or ranges, e.g. 20 or 3,10-12")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        out += list(range(lo, hi + 1))
    if not out:
        raise CLIError("the layer list is empty: write layer numbers, e.g. 20 or 3,10-12")
    return _dedupe(out)


def _dedupe(items: list) -> list:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def check_heads(model, heads: list[tuple[int, int]], flag: str = "--heads") -> None:
    """Range-check (layer, head) pairs against ``model``."""
    for layer, head in heads:
        check_layers(model, [layer], flag, f"{layer}.{head}")
        if not 0 <= head < model.n_heads:
            raise CLIError(
                f"{flag} {layer}.{head}: head {head} is out of range; the model has {model.n_heads} "
                f"query heads per layer (0..{model.n_heads - 1})"
            )


def check_neurons(model, neurons: list[tuple[int, int]], flag: str = "--neurons") -> None:
    """Range-check (layer, neuron) pairs against ``model``."""
    for layer, n in neurons:
        check_layers(model, [layer], flag, f"{layer}:{n}")
        if not 0 <= n < model.d_mlp:
            raise CLIError(
                f"{flag} {layer}:{n}: neuron {n} is out of range; the model has {model.d_mlp} "
                f"neurons per layer (0..{model.d_mlp - 1})"
            )


def check_layers(model, layers: list[int], flag: str = "--layers", spec: str | None = None) -> None:
    """Range-check layer indices against ``model``."""
    n = model.n_layers
    for layer in layers:
        if not 0 <= layer < n:
            raise CLIError(
                f"{flag} {spec if spec is not None else layer}: layer {layer} is out of range; "
                f"the model has {n} layers (0..{n - 1})"
            )


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
    try:
        if suffix == ".npy":
            import numpy as np

            value = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            value = load_file(str(path))
        elif suffix == ".json":
            value = torch.tensor(json.loads(path.read_text()), dtype=torch.float32)
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
    """Prompts from a ``.jsonl`` or text/TSV file (see the module docstring)."""
    if not str(path).strip():
        raise CLIError("--prompts is empty; name a prompts file")
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"no such prompts file: {path}")
    from surgery._files import read_text

    lines = read_text(path, CLIError, "prompts file").splitlines()  # UTF-8; a leading BOM is not part of a prompt
    items: list[PromptItem] = []
    jsonl = path.suffix.lower() == ".jsonl"
    for i, line in enumerate(lines, start=1):
        where = f"{path}:{i}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if jsonl:
            items.append(_json_item(line, where))
        else:
            fields = line.split("\t")
            if len(fields) > 3 or not fields[0].strip():
                raise CLIError(
                    f"{where}: expected PROMPT or PROMPT<TAB>CORRECT<TAB>INCORRECT, "
                    f"got {len(fields)} tab-separated fields"
                )
            fields += [None] * (3 - len(fields))
            items.append(PromptItem(fields[0], fields[1] or None, fields[2] or None, where))
    if not items:
        raise CLIError(f"{path} holds no prompts (blank lines and # comments are skipped)")
    return items


def _json_item(line: str, where: str) -> PromptItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{where}: not valid JSON ({exc.msg})") from None
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
        raise CLIError(f'{where}: each line must be an object with a non-empty "prompt" string')
    unknown = sorted(set(obj) - {"prompt", "correct", "incorrect"})
    if unknown:
        raise CLIError(f"{where}: unknown key(s) {', '.join(unknown)}; keys: prompt, correct, incorrect")
    for key in ("correct", "incorrect"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise CLIError(f'{where}: "{key}" must be a string')
    return PromptItem(obj["prompt"], obj.get("correct"), obj.get("incorrect"), where)


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


def parse_ints(spec: str, flag: str) -> list[int]:
    """Comma-separated integers (negative allowed), e.g. ``0,3,-1``."""
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{flag} {spec!r}: expected comma-separated integers, e.g. 0,3,-1") from None
