"""GQA-aware head addressing: query heads, key/value groups, and the mapping between them.

In a Llama with grouped-query attention, ``n_heads`` query heads share ``n_kv_heads`` key/value heads:
query head ``h`` reads key/value group ``h // (n_heads // n_kv_heads)`` (as HF's ``repeat_kv`` does).
``hook_q`` / ``hook_z`` / ``hook_pattern`` / ``hook_result`` are indexed by query head; ``hook_k`` /
``hook_v`` by key/value group. Every analysis that reports heads uses these helpers, so a head row
always carries both its query index and its group.

Example::

    kv_group(model, 7)          # 2 for SmolLM2 (9 query heads, 3 groups)
    query_heads(model, 2)       # [6, 7, 8]
    parse_heads(model, ["L3H5", (4, 1)])   # [(3, 5), (4, 1)]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from hooks import InputError


def _sizes(model) -> tuple[int, int, int]:
    """(n_layers, n_heads, n_kv_heads) of a HookedLlama or a LlamaConfig."""
    if hasattr(model, "n_heads"):
        return model.n_layers, model.n_heads, model.n_kv_heads
    return model.num_hidden_layers, model.num_attention_heads, model.num_key_value_heads


def group_size(model) -> int:
    """Query heads per key/value group (1 for multi-head attention, ``n_heads`` for multi-query)."""
    _, h, g = _sizes(model)
    return h // g


def kv_group(model, head: int) -> int:
    """The key/value group query head ``head`` reads. ``kv_group(model, 7) == 2`` with 9 heads / 3 groups."""
    _, h, _ = _sizes(model)
    if not 0 <= int(head) < h:
        raise InputError(f"query head {head} is out of range; the model has {h} query heads (0..{h - 1})")
    return int(head) // group_size(model)


def query_heads(model, group: int) -> list[int]:
    """The query heads that read key/value group ``group``. ``query_heads(model, 2) == [6, 7, 8]``."""
    _, _, g = _sizes(model)
    if not 0 <= int(group) < g:
        raise InputError(f"key/value group {group} is out of range; the model has {g} groups (0..{g - 1})")
    n = group_size(model)
    return list(range(int(group) * n, (int(group) + 1) * n))


@dataclass(frozen=True, order=True)
class HeadRef:
    """One attention head: ``layer``, query ``head`` and the key/value ``group`` it reads.

    Example: ``HeadRef(3, 7, 2).label == "L3H7"``.
    """

    layer: int
    head: int
    group: int

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head}"

    def to_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "kv_group": self.group}


def head_ref(model, layer: int, head: int) -> HeadRef:
    """A checked ``HeadRef`` for query head ``head`` of ``layer``."""
    n_layers, _, _ = _sizes(model)
    if not -n_layers <= int(layer) < n_layers:  # negatives count from the end, as in TransformerLens
        raise InputError(f"layer {layer} is out of range; the model has {n_layers} layers (0..{n_layers - 1})")
    return HeadRef(int(layer) % n_layers, int(head), kv_group(model, head))


_LABEL = re.compile(r"^L(\d+)H(\d+)$", re.IGNORECASE)


def parse_heads(model, heads: Iterable) -> list[tuple[int, int]]:
    """(layer, query head) pairs from labels ``"L3H5"``, tuples ``(3, 5)`` or ``HeadRef``s, checked.

    Example: ``parse_heads(model, ["L3H5", (4, 1)]) == [(3, 5), (4, 1)]``.
    """
    if isinstance(heads, (str, HeadRef)) or (
        isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, int) for x in heads)
    ):
        heads = [heads]
    out = []
    for h in heads:
        if isinstance(h, HeadRef):
            layer, head = h.layer, h.head
        elif isinstance(h, str):
            m = _LABEL.match(h.strip())
            if not m:
                raise InputError(f"cannot read head {h!r}; write heads as 'L3H5' or (layer, head)")
            layer, head = int(m.group(1)), int(m.group(2))
        else:
            try:
                layer, head = (int(x) for x in h)
            except (TypeError, ValueError):
                raise InputError(f"cannot read head {h!r}; write heads as 'L3H5' or (layer, head)") from None
        ref = head_ref(model, layer, head)
        out.append((ref.layer, ref.head))
    return out


def head_table(model) -> list[dict]:
    """Every (layer, query head, kv group) of the model as rows, for reports."""
    n_layers, n_heads, _ = _sizes(model)
    return [head_ref(model, layer, h).to_dict() for layer in range(n_layers) for h in range(n_heads)]
