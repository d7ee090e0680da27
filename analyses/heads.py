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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from hooks import indices
from hooks.indices import check_index, check_pairs, size_of

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from hooks.model import HookedLlama


def _sizes(model: HookedLlama | PretrainedConfig) -> tuple[int, int, int]:
    """(n_layers, n_heads, n_kv_heads) of a HookedLlama or a transformers config (``hooks.indices.size_of``)."""
    return size_of(model, "layer"), size_of(model, "head"), size_of(model, "kv_group")


def group_size(model: HookedLlama | PretrainedConfig) -> int:
    """Query heads per key/value group (1 for multi-head attention, ``n_heads`` for multi-query)."""
    _, h, g = _sizes(model)
    return h // g


def kv_group(model: HookedLlama | PretrainedConfig, head: int) -> int:
    """The key/value group query head ``head`` reads. ``kv_group(model, 7) == 2`` with 9 heads / 3 groups."""
    return check_index(model, "head", head, param="head") // group_size(model)


def query_heads(model: HookedLlama | PretrainedConfig, group: int) -> list[int]:
    """The query heads that read key/value group ``group``. ``query_heads(model, 2) == [6, 7, 8]``."""
    group = check_index(model, "kv_group", group, param="group")
    n = group_size(model)
    return list(range(group * n, (group + 1) * n))


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


def head_ref(model: HookedLlama, layer: int, head: int) -> HeadRef:
    """A checked ``HeadRef`` for query head ``head`` of ``layer``."""
    layer = check_index(model, "layer", layer, param="layer", negative=True)  # negatives count from the end (TL)
    return HeadRef(layer, int(head), kv_group(model, head))


def parse_heads(model: HookedLlama, heads: Iterable, *, param: str = "heads") -> list[tuple[int, int]]:
    """(layer, query head) pairs from labels ``"L3H5"`` or ``"3.5"``, tuples ``(3, 5)`` or ``HeadRef``s, checked
    (negative layers count from the end); the one head parser is ``hooks.indices.parse_heads``.

    Example: ``parse_heads(model, ["L3H5", (4, 1)]) == [(3, 5), (4, 1)]``.
    """
    return check_pairs(model, "head", indices.parse_heads(heads, param=param), param=param, negative=True)


def head_table(model: HookedLlama) -> list[dict]:
    """Every (layer, query head, kv group) of the model as rows, for reports."""
    n_layers, n_heads, _ = _sizes(model)
    return [head_ref(model, layer, h).to_dict() for layer in range(n_layers) for h in range(n_heads)]
