"""Every Python code block of docs/hooks.md, analyses.md, surgery.md, saes.md and README.md runs,
in order, on the default model: one test per document, its blocks in one namespace that holds the names the
prose assumes (``tokens``, an ``edit``, a ``refusal_direction`` …), in a temporary directory as cwd.
``HookedLlama.default()`` returns the session's model (or a copy where the document edits it in place)."""

import copy
import json
import linecache
import re
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.interop]

ROOT = Path(__file__).resolve().parents[2]
IOI = "When Mary and John went to the store, John gave a drink to"


def python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(), flags=re.S)


def run_blocks(name: str, ns: dict, n_blocks: int) -> dict:
    """Run the document's Python blocks in order in ``ns``; a failure names the document and block."""
    blocks = python_blocks(name)
    assert len(blocks) == n_blocks, f"{name}: {len(blocks)} python blocks, expected {n_blocks}"
    for i, block in enumerate(blocks):
        where = f"<{name} block {i + 1}>"
        linecache.cache[where] = (len(block), None, block.splitlines(True), where)  # nnsight reads the source
        try:
            exec(compile(block, where, "exec"), ns)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"{name} block {i + 1} failed: {exc!r}") from exc
    return ns


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def default_is(monkeypatch, model):
    from hooks import HookedLlama

    monkeypatch.setattr(HookedLlama, "default", lambda *a, **k: model)


def own_copy(smol):
    """A model with its own weights and hooks (a document that edits in place leaves ``smol`` alone)."""
    from hooks import HookedLlama

    return HookedLlama.from_hf(copy.deepcopy(smol.to_hf()), smol.tokenizer)


def sae_on_disk(model, d_sae: int = 1152):
    """The SAE the prose loads from ``saes/blocks.6.hook_resid_post`` (random weights, SAELens layout)."""
    from analyses.saes import SAE, SAEConfig, save_sae

    sae = SAE(SAEConfig("standard", model.cfg.d_model, d_sae, "blocks.6.hook_resid_post"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_sae(sae, "saes/blocks.6.hook_resid_post")


def test_hooks_doc_blocks_run(smol, capsys):
    from hooks import HookedLlama

    model = HookedLlama.from_hf(smol.to_hf(), smol.tokenizer)  # hooks added by the blocks stay off `smol`
    ns = {
        "model": model,
        "HookedLlama": HookedLlama,
        "torch": torch,
        "tokens": model.to_tokens(IOI),
        "fn": lambda t, hook: None,
        "grad_fn": lambda g, hook: None,
    }
    run_blocks("docs/hooks.md", ns, 4)
    assert not any(p.fwd_hooks for p in model.hook_dict.values())
    assert "Tokenized prompt" in capsys.readouterr().out
    assert ns["z"].shape == (1, 14, 9, 64) and ns["labels"][0] == "embed"


def test_readme_blocks_run(smol, in_tmp, monkeypatch):
    default_is(monkeypatch, smol)
    sae_on_disk(smol)
    ns = run_blocks("README.md", {}, 1)
    assert ns["patch"].values.shape == (30, 14)
    assert (in_tmp / "out/smol-edited").is_dir()
    assert ns["cache"]["blocks.6.hook_resid_post.hook_sae_acts_post"].shape[:2] == (1, 14)
    assert not any(p.fwd_hooks for p in smol.hook_dict.values())


def test_saes_doc_blocks_run(smol, in_tmp, monkeypatch):
    default_is(monkeypatch, smol)
    sae_on_disk(smol)
    ns = run_blocks("docs/saes.md", {}, 3)
    acts = ns["cache"]["blocks.6.hook_resid_post.hook_sae_acts_post"]
    assert acts.shape[-1] == ns["sae"].cfg.d_sae and (acts >= 0).all()
    assert not any(p.fwd_hooks for p in smol.hook_dict.values())


def test_analyses_doc_blocks_run(smol, in_tmp, monkeypatch):
    import surgery

    default_is(monkeypatch, smol)
    (in_tmp / "my.txt").write_text("How do I bake bread?\nName a colour.\n")
    (in_tmp / "my.jsonl").write_text(json.dumps({"prompt": "How do I bake bread?"}) + "\n")
    edit = surgery.ZeroHeads(5, [0, 4])
    other = own_copy(smol)
    surgery.apply_plan(other, surgery.EditPlan([edit]))
    ns = run_blocks("docs/analyses.md", {"tokens": smol.to_tokens(IOI), "edit": edit, "other_model": other}, 6)
    res = ns["res"]
    assert res.effects.shape[1] == 1 and ns["dirs"].directions.shape == (smol.n_layers, smol.cfg.d_model)
    assert ns["r"].n == 8 and 0 <= ns["r"].rate <= 1
    assert ns["kl"].mean > 0
    assert not any(p.fwd_hooks for p in smol.hook_dict.values())


def test_surgery_doc_blocks_run(smol, in_tmp, monkeypatch):
    model = own_copy(smol)  # the plans section edits the model in place
    default_is(monkeypatch, model)
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(smol.cfg.d_model, generator=g)
    ns = run_blocks("docs/surgery.md", {"refusal_direction": direction / direction.norm()}, 4)
    assert ns["result"].max_abs_logit_diff < 1e-4 and ns["result"].kl_to_base > 0
    assert (in_tmp / "out/smol-edited.gguf").is_file() and (in_tmp / "out/smol-abliterated").is_dir()
    assert ns["res"].before.n == 8 and len(ns["plan"].edits) == 4
    assert model.n_layers == smol.n_layers - 1  # apply_plan removed layer 29 in place; smol keeps it


def test_interop_doc_blocks_run(smol, in_tmp):
    """docs/interop.md: TransformerLens and nnsight on HF's own SmolLM2, as the page writes them."""
    ns = run_blocks("docs/interop.md", {}, 7)
    ids = ns["ids"]
    assert ids.shape == (1, 14)
    with torch.no_grad():
        ours = smol(ids)
    assert (ns["logits"] - ours).abs().max() <= 1e-4  # nnsight's traced logits equal HookedLlama's
    assert ns["res"].shape == (4,) and ns["res"][-1] > ns["res"][0]  # late resid_pre carries the answer
    assert ns["out"].shape == (1, 34) and ns["patched"].shape == (1, 14, smol.d_vocab)
    assert ns["abl"].shape == (1, 14, smol.d_vocab) and not torch.equal(ns["abl"], ns["logits"])
