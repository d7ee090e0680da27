"""Every Python code block of docs/hooks.md runs, in order, on the default model (one namespace, with
the names the prose assumes: ``model``, ``tokens``, ``fn``, ``grad_fn``)."""

import linecache
import re
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.interop]

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


def test_hooks_doc_blocks_run(smol, capsys):
    from hooks import HookedLlama

    blocks = python_blocks("hooks.md")
    assert len(blocks) >= 4
    model = HookedLlama.from_hf(smol.to_hf(), smol.tokenizer)  # hooks added by the blocks stay off `smol`
    ns = {"model": model, "HookedLlama": HookedLlama, "torch": torch,
          "tokens": model.to_tokens("When Mary and John went to the store, John gave a drink to"),
          "fn": lambda t, hook: None, "grad_fn": lambda g, hook: None}
    for i, block in enumerate(blocks):
        where = f"<docs/hooks.md block {i + 1}>"
        linecache.cache[where] = (len(block), None, block.splitlines(True), where)  # nnsight reads the source
        try:
            exec(compile(block, where, "exec"), ns)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"docs/hooks.md block {i + 1} failed: {exc!r}") from exc
    assert not any(p.fwd_hooks for p in model.hook_dict.values())
    assert "Tokenized prompt" in capsys.readouterr().out
    assert ns["z"].shape == (1, 14, 9, 64) and ns["labels"][0] == "embed"
