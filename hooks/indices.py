"""Index checks and unit parsers: the one place that knows the valid range of each kind of index a user
names — layers, query heads, key/value groups, MLP neurons and token positions — and how head, neuron and
layer lists are written. ``hooks``, ``analyses``, ``surgery`` and the command line all check through here,
so a bad index gives the same one-line ``RangeError`` (an ``InputError`` and an ``EditError``) everywhere.

Ranges (``negative=True`` also takes -n..-1, counting from the end as TransformerLens does)::

    check_index(model, "layer", 40)              # RangeError: layer 40 is out of range; the model has 30 layers (0..29)
    check_indices(model, "neuron", [7, 1535])    # [7, 1535]
    check_pairs(model, "head", [(19, 2)])        # [(19, 2)]; (19, 9) -> "heads 19.9: head 9 is out of range; ..."
    check_positions(12, [0, -1])                 # [0, 11]

Unit lists (syntax only; ranges are checked against a model with the checks above)::

    parse_heads("19.2,20.0")          # [(19, 2), (20, 0)]   also "L19H2", [(19, 2)], ["19.2"], HeadRef-like objects
    parse_neurons("12:4051,3:7")      # [(12, 4051), (3, 7)]
    parse_layers("3,10-12")           # [3, 10, 11, 12]       also 3 and [3, 10]
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Iterable

from _core.errors import arg

from .errors import InputError, RangeError

# kind -> (what one is called, what the model holds them in)
KINDS = {
    "layer": ("layer", "the model has {n} layers"),
    "head": ("head", "the layer has {n} heads"),
    "kv_group": ("key/value group", "the layer has {n} key/value groups"),
    "neuron": ("neuron", "the layer has {n} neurons"),
    "position": ("position", "the prompt has {n} tokens"),
}
PAIR_SEPARATOR = {"head": ".", "kv_group": ".", "neuron": ":"}  # how a (layer, index) pair is written


def size_of(model: Any, kind: str) -> int:
    """How many indices of ``kind`` a ``HookedLlama`` (or a ``transformers`` config) has: layers of the
    model, or heads / key/value groups / neurons of one layer."""
    if kind not in KINDS or kind == "position":
        raise ValueError(f"size_of: unknown kind {kind!r}")
    names = {
        "layer": ("n_layers", "num_hidden_layers"),
        "head": ("n_heads", "num_attention_heads"),
        "kv_group": ("n_kv_heads", "num_key_value_heads"),
        "neuron": ("d_mlp", "intermediate_size"),
    }[kind]
    for name in names:
        value = getattr(model, name, None)
        if isinstance(value, int):
            return value
    raise InputError(f"cannot tell how many {KINDS[kind][0]}s a {type(model).__name__} has", param="model")


def _integer(value: Any, kind: str, param: str | None, who: str | None) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if hasattr(value, "numel") and value.numel() == 1 and not value.is_floating_point():  # a 0-d integer tensor
        return int(value)
    raise RangeError(f"{_prefix(who)}{KINDS[kind][0]} must be an integer, got {value!r}", param=param)


def _prefix(who: str | None) -> str:
    return f"{who}: " if who else ""


def check_range(
    kind: str, value: Any, size: int, *, param: str | None = None, who: str | None = None, negative: bool = False
) -> int:
    """``value`` as an index 0..size-1 of ``kind`` (with ``negative``, -size..-1 count from the end and are
    returned as 0..size-1); else a one-line ``RangeError`` naming the valid range (prefixed by ``who``)."""
    index = _integer(value, kind, param, who)
    low = -size if negative else 0
    if not low <= index < size:
        name, owner = KINDS[kind]
        valid = f"0..{size - 1}" + (f", or -{size}..-1" if negative else "")
        raise RangeError(
            f"{_prefix(who)}{name} {index} is out of range; {owner.format(n=size)} ({valid})",
            param=param,
        )
    return index % size


def check_index(
    model: Any, kind: str, value: Any, *, param: str | None = None, who: str | None = None, negative: bool = False
) -> int:
    """One index of ``kind`` ("layer", "head", "kv_group", "neuron") checked against ``model``."""
    return check_range(kind, value, size_of(model, kind), param=param, who=who, negative=negative)


def check_indices(
    model: Any,
    kind: str,
    values: Iterable[Any],
    *,
    param: str | None = None,
    who: str | None = None,
    negative: bool = False,
) -> list[int]:
    """Every index of ``values`` checked against ``model`` (see ``check_index``), in order."""
    size = size_of(model, kind)
    return [check_range(kind, v, size, param=param, who=who, negative=negative) for v in values]


def check_pairs(
    model: Any, kind: str, pairs: Iterable[tuple[Any, Any]], *, param: str | None = None, negative: bool = False
) -> list[tuple[int, int]]:
    """(layer, index) pairs of ``kind`` ("head", "kv_group", "neuron") checked against ``model``. A bad pair
    is named as written, ``heads 19.9: head 9 is out of range; ...`` (``--heads 19.9`` on the command line)."""
    param = param if param is not None else f"{kind}s"
    sep = PAIR_SEPARATOR[kind]
    out = []
    for layer, index in pairs:
        who = f"{arg(param)} {layer}{sep}{index}"
        out.append(
            (
                check_index(model, "layer", layer, param=param, who=who, negative=negative),
                check_index(model, kind, index, param=param, who=who),
            )
        )
    return out


def check_positions(
    n_positions: int, positions: Iterable[Any], *, param: str | None = "positions", who: str | None = None
) -> list[int]:
    """Token positions of a prompt of ``n_positions`` tokens (negatives count from the end), as 0..n-1."""
    return [check_range("position", p, n_positions, param=param, who=who, negative=True) for p in positions]


# --------------------------------------------------------------------------- unit lists (syntax)
_HEAD = re.compile(r"^(?:(\d+)\.(\d+)|[Ll](\d+)[Hh](\d+))$")
_NEURON = re.compile(r"^(\d+):(\d+)$")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _items(spec: Any) -> list[Any]:
    """Comma-separated text split into items; lists (of text or pairs) taken item by item."""
    parts = list(spec) if isinstance(spec, (list, tuple)) and not _is_pair(spec) else [spec]
    out: list[Any] = []
    for part in parts:
        if isinstance(part, str):
            out += [p.strip() for p in part.split(",") if p.strip()]
        else:
            out.append(part)
    return out


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, numbers.Integral) for v in x)


def _dedupe(items: list) -> list:
    return list(dict.fromkeys(items))


def _pair_from_text(item: str, kind: str) -> tuple[int, int] | None:
    m = (_HEAD if kind == "head" else _NEURON).match(item)
    if m is None:
        return None
    groups = [g for g in m.groups() if g is not None]
    return int(groups[0]), int(groups[1])


_SYNTAX = {  # kind -> how a pair is written, for messages
    "head": ("LAYER.HEAD", "3.5 or L3H5 (several: 3.5,9.1)", "5.3"),
    "neuron": ("LAYER:NEURON", "12:405 (several: 12:405,3:7)", "12:405"),
}


def _parse_pairs(spec: Any, kind: str, param: str) -> list[tuple[int, int]]:
    """(layer, index) pairs of ``kind`` from text, a list of text items, pairs or (heads) ``HeadRef``-like
    objects; syntax only, duplicates dropped."""
    form, examples, one = _SYNTAX[kind]
    out = []
    for item in _items(spec):
        if isinstance(item, str):
            pair = _pair_from_text(item, kind)
            if pair is None:
                raise InputError(f"bad {kind} spec {item!r}: write {form}, e.g. {examples}", param=param)
            out.append(pair)
        elif kind == "head" and hasattr(item, "layer") and hasattr(item, "head"):
            out.append((item.layer, item.head))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append((item[0], item[1]))
        else:
            raise InputError(
                f"bad {kind} spec {item!r}: write {form}, e.g. {one}, or a (layer, {kind}) pair", param=param
            )
    if not out:
        raise InputError(f"{arg(param)} is empty: write {form}, e.g. {one}", param=param)
    return _dedupe(out)


def parse_heads(spec: Any, *, param: str = "heads") -> list[tuple[int, int]]:
    """(layer, query head) pairs from ``"19.2,20.0"`` or ``"L19H2"`` text, a list of such items, ``(layer,
    head)`` pairs or objects with ``layer`` and ``head`` (``HeadRef``); syntax only, duplicates dropped."""
    return _parse_pairs(spec, "head", param)


def parse_neurons(spec: Any, *, param: str = "neurons") -> list[tuple[int, int]]:
    """(layer, neuron) pairs from ``"12:4051,3:7"``, a list of such items or ``(layer, neuron)`` pairs."""
    return _parse_pairs(spec, "neuron", param)


def parse_layers(spec: Any, *, param: str = "layers") -> list[int]:
    """Layer numbers from ``"3,10-12"`` (ranges inclusive), an integer or a list of either."""
    out: list[int] = []
    for item in _items(spec):
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            out.append(int(item))
            continue
        m = _RANGE.match(item) if isinstance(item, str) else None
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise InputError(f"bad layer spec {item!r}: write layer numbers or ranges, e.g. 20 or 3,10-12", param=param)
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        out += list(range(lo, hi + 1))
    if not out:
        raise InputError("the layer list is empty: write layer numbers, e.g. 20 or 3,10-12", param=param)
    return _dedupe(out)
