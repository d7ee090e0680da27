"""Rich notebook displays (``_repr_html_``) of models and caches."""

from __future__ import annotations

import html
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import HookedLlama


def _table(rows, header) -> str:
    head = "".join(f"<th style='text-align:left'>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def model_html(model: HookedLlama) -> str:
    c = model.config
    facts = [
        ("layers", model.n_layers),
        ("d_model", c.hidden_size),
        ("heads / kv heads", f"{c.num_attention_heads} / {c.num_key_value_heads}"),
        ("d_head", model.d_head),
        ("d_mlp", c.intermediate_size),
        ("vocab", c.vocab_size),
        ("dtype", model.dtype),
        ("device", model.device),
        ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
    ]
    kinds = Counter(n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in model.hook_names())
    hooks = [(k, f"× {v}" if v > 1 else "") for k, v in kinds.items()]
    return (
        f"<b>HookedLlama</b> ({html.escape(str(model.source or 'in memory'))})"
        + _table(facts, ["", ""])
        + "<details><summary>hook points</summary>"
        + _table(hooks, ["name (blocks.{i}. prefix)", "count"])
        + "</details>"
    )


def cache_html(cache) -> str:
    rows = [
        (name, tuple(t.shape), str(t.dtype).replace("torch.", ""), f"{t.numel() * t.element_size() / 1024:.1f} KiB")
        for name, t in list(cache.items())[:40]
    ]
    more = f"<p>… and {len(cache) - 40} more</p>" if len(cache) > 40 else ""
    return (
        f"<b>ActivationCache</b>: {len(cache)} activations, {cache.nbytes / 2**20:.2f} MiB"
        + _table(rows, ["name", "shape", "dtype", "size"])
        + more
    )
