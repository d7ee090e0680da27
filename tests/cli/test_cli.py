"""The ``scalpel`` command line on a tiny random Llama saved as an HF directory (with a small BPE
tokenizer): every command's ``--json`` numbers against an independent reference, mostly plain
transformers running the same checkpoint with the edit done by hand."""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import cli
from tests.helpers import (
    CLEAN,
    CORRUPT,
    FAMILY_DIRS,
    IOI,
    build_tiny,
    hf_metric,
    run,
    run_json,
    skip_layer,
    zero_heads,
    zero_neurons,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, request) -> Path:
    """The tiny Llama directory; tests parametrised indirectly get another family's (``FAMILY_DIRS``)."""
    variant = getattr(request, "param", "gqa")
    return build_tiny(tmp_path_factory.mktemp("tiny") / f"tiny-{variant}", variant)


ALL_FAMILIES = pytest.mark.parametrize("tiny_dir", ["gqa", *FAMILY_DIRS], indirect=True)


@pytest.fixture(scope="module")
def hf(tiny_dir) -> LlamaForCausalLM:
    """The reference: transformers' own model of the checkpoint."""
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# prompt<TAB>correct<TAB>incorrect\n" + "\n".join("\t".join(r) for r in IOI) + "\n")
    return path


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


# --------------------------------------------------------------------------- info / generate
@ALL_FAMILIES
def test_info_json_matches_the_model(tiny_dir, hf, capsys):
    doc = run_json(["info", "--model", tiny_dir], capsys)
    assert doc["parameters"] == sum(p.numel() for p in hf.parameters())
    c = hf.config
    assert (
        doc["config"]["n_layers"],
        doc["config"]["n_heads"],
        doc["config"]["n_kv_heads"],
        doc["config"]["d_mlp"],
    ) == (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)
    assert doc["dtype"] == "float32" and doc["device"] == "cpu"
    assert doc["config"]["architecture"] == type(hf).__name__
    assert doc["config"]["attention_bias"] == (hf.model.layers[0].self_attn.q_proj.bias is not None)
    if c.model_type == "llama":
        window = None
    elif c.model_type == "mistral":
        window = [c.sliding_window] * c.num_hidden_layers
    else:
        window = [c.sliding_window if t == "sliding_attention" else None for t in c.layer_types]
    assert doc["config"]["sliding_window"] == (window if any(window or []) else None)
    assert doc["config"]["qk_norm"] == hasattr(hf.model.layers[0].self_attn, "q_norm")
    shapes = {h["name"]: h["shape"] for h in doc["hooks"]}
    P, M, H, G, D, F = (
        4,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        hf.model.layers[0].self_attn.head_dim,
        c.intermediate_size,
    )
    qk_norm = c.model_type == "qwen3"  # attn.q_ln / attn.k_ln hook_scale and hook_normalized
    assert len(shapes) == 1 + 2 + c.num_hidden_layers * (22 + 4 * qk_norm) + 1
    if qk_norm:
        assert shapes["blocks.1.attn.q_ln.hook_scale"] == [1, P, H, 1] and shapes[
            "blocks.1.attn.k_ln.hook_normalized"
        ] == [1, P, G, D]
    assert shapes["hook_embed"] == [1, P, M] and shapes["hook_logits"] == [1, P, c.vocab_size]
    assert shapes["blocks.2.attn.hook_k"] == [1, P, G, D] and shapes["blocks.2.attn.hook_q"] == [1, P, H, D]
    assert shapes["blocks.0.attn.hook_pattern"] == [1, H, P, P] and shapes["blocks.1.attn.hook_result"] == [1, P, H, M]
    assert shapes["blocks.1.mlp.hook_post"] == [1, P, F] and shapes["blocks.1.ln2.hook_scale"] == [1, P, 1]
    code, text, _ = run(["info", "--model", tiny_dir], capsys)
    assert code == 0 and "blocks.{i}.attn.hook_z" in text and f"{doc['parameters']:,}" in text


@torch.no_grad()
def hf_complete(model, tok, prompt: str, n: int) -> list[int]:
    """Greedy new token ids from transformers' own ``generate``."""
    x = ids(tok, prompt)
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return out[0, x.shape[1] :].tolist()


def test_generate_base_edited_and_steered_match_transformers(tiny_dir, hf, tok, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "format": "llama-scalpel-plan",
                "version": 1,
                "edits": [{"edit": "ZeroHeads", "layer": 1, "heads": [0, 2]}],
            }
        )
    )
    vec = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(1))
    torch.save(vec, tmp_path / "v.pt")
    doc = run_json(
        ["generate", "When Mary", "--model", tiny_dir, "--max-new-tokens", 12, "--edits", plan, "--compare"], capsys
    )
    assert doc["base_tokens"] == hf_complete(hf, tok, "When Mary", 12)
    assert doc["edited_tokens"] == hf_complete(zero_heads(hf, 1, [0, 2]), tok, "When Mary", 12)
    assert doc["base_tokens"] != doc["edited_tokens"]
    assert doc["edited"] == tok.decode(doc["edited_tokens"], skip_special_tokens=True)
    steered = copy.deepcopy(hf)
    steered.model.layers[2].mlp.register_forward_hook(lambda m, a, out: out + 3.0 * vec)
    doc = run_json(
        ["generate", "When Mary", "--model", tiny_dir, "--max-new-tokens", 12, "--steer", f"2:{tmp_path / 'v.pt'}:3"],
        capsys,
    )
    assert doc["base"] is None and doc["edited_tokens"] == hf_complete(steered, tok, "When Mary", 12)
    code, text, _ = run(
        ["generate", "When Mary", "--model", tiny_dir, "--max-new-tokens", 4, "--edits", plan, "--compare"], capsys
    )
    assert code == 0 and text.splitlines()[1].split() == ["base", "edited"]


# --------------------------------------------------------------------------- lens / heads / patch
def test_lens_json_matches_python_api_and_transformers(tiny_dir, hf, tok, capsys):
    from analyses import logit_lens
    from hooks import HookedLlama

    doc = run_json(["lens", CLEAN, "--model", tiny_dir, "--target", " Mary", "--stages", "pre,post"], capsys)
    lens = doc["lens"]
    api = logit_lens(HookedLlama.from_pretrained(str(tiny_dir)), CLEAN, [" Mary"], stages=["resid_pre", "resid_post"])
    assert lens["stages"] == api.stages and lens["top_tokens"] == api.top_tokens
    torch.testing.assert_close(f64(lens["top_probs"]), api.top_probs.double(), rtol=0, atol=1e-6)
    with torch.no_grad():
        out = hf(ids(tok, CLEAN), output_hidden_states=True)
        for layer in range(hf.config.num_hidden_layers):  # hidden_states[L + 1] is resid_post of layer L
            resid = out.hidden_states[layer + 1][0]
            probs = hf.lm_head(hf.model.norm(resid)).softmax(-1) if layer < 2 else out.logits[0].softmax(-1)
            row = lens["stages"].index(f"{layer}_post")
            torch.testing.assert_close(
                f64(lens["top_probs"])[row, :, 0], probs.max(-1).values.double(), rtol=0, atol=1e-5
            )
            mary = tok(" Mary", add_special_tokens=False)["input_ids"][0]
            torch.testing.assert_close(f64(lens["target_probs"])[row, :, 0], probs[:, mary].double(), rtol=0, atol=1e-5)


def test_heads_json_matches_attention_of_transformers(tiny_dir, capsys):
    from analyses import repeated_random_tokens
    from hooks import HookedLlama

    doc = run_json(["heads", "--model", tiny_dir, "--seq-len", 6, "--n-seqs", 3, "--seed", 4], capsys)
    eager = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    tokens = repeated_random_tokens(HookedLlama.from_pretrained(str(tiny_dir)), 6, 3, seed=4)
    with torch.no_grad():
        attn = eager(tokens, output_attentions=True).attentions  # per layer [B, H, Q, K]
    n = 6
    for layer, a in enumerate(attn):
        q = torch.arange(2, tokens.shape[1])  # BOS at 0, previous-token from the 2nd token of R
        prev = a[:, :, q, q - 1].mean((0, 2))
        q2 = torch.arange(1 + n, tokens.shape[1])
        ind = a[:, :, q2, q2 - n + 1].mean((0, 2))
        torch.testing.assert_close(f64(doc["heads"]["previous_token"][layer]), prev.double(), rtol=0, atol=1e-5)
        torch.testing.assert_close(f64(doc["heads"]["induction"][layer]), ind.double(), rtol=0, atol=1e-5)
    best = max(doc["ranked"]["induction"], key=lambda r: r["score"])
    assert doc["ranked"]["induction"][0] == best


def test_patch_json_matches_a_hand_patched_transformers_run(tiny_dir, hf, tok, capsys):
    doc = run_json(
        [
            "patch",
            "--model",
            tiny_dir,
            "--clean",
            CLEAN,
            "--corrupt",
            CORRUPT,
            "--answers",
            " Mary",
            " John",
            "--components",
            "resid_pre,attn_out",
        ],
        capsys,
    )
    assert doc["clean_value"] == pytest.approx(hf_metric(hf, tok, CLEAN, " Mary", " John", "logit-diff"), abs=1e-4)
    assert doc["corrupted_value"] == pytest.approx(
        hf_metric(hf, tok, CORRUPT, " Mary", " John", "logit-diff"), abs=1e-4
    )
    values = f64(doc["components"]["resid_pre"]["values"])  # [layer, pos]
    assert values.shape == (3, ids(tok, CLEAN).shape[1])
    with torch.no_grad():
        clean_resid = hf(ids(tok, CLEAN), output_hidden_states=True).hidden_states  # [L] = resid_pre of layer L
        for layer, pos in [(0, 9), (1, 9), (2, values.shape[1] - 1), (1, 3)]:

            def patch(m, args, layer=layer, pos=pos):
                hs = args[0].clone()
                hs[:, pos] = clean_resid[layer][:, pos]
                return (hs,) + args[1:]

            h = hf.model.layers[layer].register_forward_pre_hook(patch)
            try:
                expect = hf_metric(hf, tok, CORRUPT, " Mary", " John", "logit-diff")
            finally:
                h.remove()
            assert float(values[layer, pos]) == pytest.approx(expect, abs=1e-4)


# --------------------------------------------------------------------------- ablate / sweep
@pytest.mark.parametrize("metric", ["logit-diff", "prob", "loss"])
@ALL_FAMILIES
def test_ablate_json_matches_transformers_with_heads_zeroed_by_hand(tiny_dir, hf, tok, prompts_file, metric, capsys):
    doc = run_json(
        [
            "ablate",
            "--model",
            tiny_dir,
            "--heads",
            "1.0,1.3,2.1",
            "--prompts",
            prompts_file,
            "--metric",
            metric,
            "--batch-size",
            2,
        ],
        capsys,
    )
    edited = zero_heads(zero_heads(hf, 1, [0, 3]), 2, [1])
    assert len(doc["prompts"]) == len(IOI)
    for row, (prompt, c, i) in zip(doc["prompts"], IOI):
        assert row["prompt"] == prompt and row["correct"] == c
        assert row["base"] == pytest.approx(hf_metric(hf, tok, prompt, c, i, metric), abs=1e-4)
        assert row["edited"] == pytest.approx(hf_metric(edited, tok, prompt, c, i, metric), abs=1e-4)
        assert row["effect"] == pytest.approx(row["edited"] - row["base"], abs=1e-6)
    assert doc["mean"]["effect"] == pytest.approx(sum(r["effect"] for r in doc["prompts"]) / len(IOI), abs=1e-6)
    assert [e["edit"] for e in doc["edits"]["edits"]] == ["ZeroHeads", "ZeroHeads"]


def test_ablate_out_checkpoint_reloads_with_the_reported_logits(tiny_dir, hf, tok, prompts_file, tmp_path, capsys):
    out_dir = tmp_path / "edited"
    doc = run_json(
        [
            "ablate",
            "--model",
            tiny_dir,
            "--heads",
            "0.1",
            "--neurons",
            "1:5,1:17",
            "--layers",
            "2",
            "--prompts",
            prompts_file,
            "--metric",
            "logit-diff",
            "--out",
            out_dir,
        ],
        capsys,
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 2
    by_hand = skip_layer(zero_neurons(zero_heads(hf, 0, [1]), 1, [5, 17]), 2)
    for row in doc["prompts"]:
        with torch.no_grad():
            last = reloaded(ids(tok, row["prompt"])).logits[0, -1]
        c, i = (tok(a, add_special_tokens=False)["input_ids"][0] for a in (row["correct"], row["incorrect"]))
        assert row["edited_correct_logit"] == pytest.approx(float(last[c]), abs=1e-4)
        assert row["edited_incorrect_logit"] == pytest.approx(float(last[i]), abs=1e-4)
        assert row["edited"] == pytest.approx(
            hf_metric(by_hand, tok, row["prompt"], row["correct"], row["incorrect"], "logit-diff"), abs=1e-4
        )
    assert doc["export"]["max_abs_logit_diff"] <= 1e-4
    assert (out_dir / "scalpel_manifest.json").is_file()
    code, text, _ = run(["verify", out_dir], capsys)
    assert code == 0 and "top-5 tokens match" in text


def test_ablate_out_applies_the_plan_once_and_exports_what_it_measured(
    tiny_dir, prompts_file, tmp_path, monkeypatch, capsys
):
    """Measure and export from one edited state: every edit of the plan is applied once (no separate
    validation pass, no second application inside the export), and the export knows the base (its KL)."""
    import surgery

    applied = []
    real = surgery.ZeroHeads.apply

    def counted(self, model):
        applied.append(self.layer)
        return real(self, model)

    monkeypatch.setattr(surgery.ZeroHeads, "apply", counted)
    argv = [
        "ablate",
        "--model",
        str(tiny_dir),
        "--heads",
        "0.1,2.3",
        "--prompts",
        str(prompts_file),
        "--metric",
        "prob",
    ]
    doc = run_json(argv + ["--out", str(tmp_path / "e")], capsys)
    assert sorted(applied) == [0, 2]
    assert doc["export"]["kl_to_base"] > 0 and doc["export"]["max_abs_logit_diff"] <= 1e-4
    manifest = json.loads((tmp_path / "e" / "scalpel_manifest.json").read_text())
    assert [e["edit"] for e in manifest["edits"]] == ["ZeroHeads", "ZeroHeads"]


def test_sweep_heads_effects_equal_one_ablation_at_a_time(tiny_dir, hf, tok, prompts_file, tmp_path, capsys):
    table = tmp_path / "rank.csv"
    doc = run_json(
        [
            "sweep",
            "--model",
            tiny_dir,
            "--component",
            "heads",
            "--prompts",
            prompts_file,
            "--metric",
            "logit-diff",
            "--batch-size",
            7,
            "--csv",
            table,
        ],
        capsys,
    )
    assert len(doc["units"]) == 12
    base = [hf_metric(hf, tok, p, c, i, "logit-diff") for p, c, i in IOI]
    assert doc["base"] == pytest.approx(base, abs=1e-4)
    for unit in doc["units"]:
        edited = zero_heads(hf, unit["layer"], [unit["index"]])
        expect = [hf_metric(edited, tok, p, c, i, "logit-diff") - b for (p, c, i), b in zip(IOI, base)]
        assert unit["effects"] == pytest.approx(expect, abs=1e-4), unit["unit"]
    means = [abs(u["mean_effect"]) for u in doc["units"]]
    assert means == sorted(means, reverse=True)
    rows = list(csv.DictReader(table.open()))
    assert [r["unit"] for r in rows] == [u["unit"] for u in doc["units"]]
    assert float(rows[0]["mean_effect"]) == doc["units"][0]["mean_effect"]


def test_sweep_layers_and_neurons_match_transformers(tiny_dir, hf, tok, prompts_file, capsys):
    doc = run_json(
        ["sweep", "--model", tiny_dir, "--component", "layers", "--prompts", prompts_file, "--metric", "loss"], capsys
    )
    base = [hf_metric(hf, tok, p, c, i, "loss") for p, c, i in IOI]
    for unit in doc["units"]:
        expect = [hf_metric(skip_layer(hf, unit["layer"]), tok, p, c, i, "loss") - b for (p, c, i), b in zip(IOI, base)]
        assert unit["effects"] == pytest.approx(expect, abs=1e-4)
    doc = run_json(
        [
            "sweep",
            "--model",
            tiny_dir,
            "--component",
            "neurons",
            "--layers",
            "1",
            "--prompts",
            prompts_file,
            "--metric",
            "prob",
            "--batch-size",
            32,
        ],
        capsys,
    )
    assert len(doc["units"]) == hf.config.intermediate_size
    base = [hf_metric(hf, tok, p, c, i, "prob") for p, c, i in IOI]
    for unit in doc["units"][:3] + doc["units"][-2:]:
        edited = zero_neurons(hf, 1, [unit["index"]])
        expect = [hf_metric(edited, tok, p, c, i, "prob") - b for (p, c, i), b in zip(IOI, base)]
        assert unit["effects"] == pytest.approx(expect, abs=1e-5)


def test_sweep_mean_ablation_matches_surgery_mean_ablate(tiny_dir, prompts_file, capsys):
    doc = run_json(
        [
            "sweep",
            "--model",
            tiny_dir,
            "--component",
            "heads",
            "--layers",
            "2",
            "--mean",
            "--prompts",
            prompts_file,
            "--metric",
            "logit-diff",
        ],
        capsys,
    )
    for unit in doc["units"][:2]:
        one = run_json(
            [
                "ablate",
                "--model",
                tiny_dir,
                "--heads",
                unit["unit"],
                "--mean",
                "--prompts",
                prompts_file,
                "--metric",
                "logit-diff",
            ],
            capsys,
        )
        assert unit["effects"] == pytest.approx([r["effect"] for r in one["prompts"]], abs=1e-4)
        assert one["edits"]["edits"][0]["edit"] == "MeanAblateHeads"


# --------------------------------------------------------------------------- edit / verify / run
@ALL_FAMILIES
def test_edit_exports_hf_and_gguf_that_transformers_reloads(tiny_dir, hf, tok, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "edits:\n  - {edit: ZeroHeads, layer: 2, heads: [3]}\n  - {edit: ZeroNeurons, layer: 0, neurons: [1, 2]}\n"
    )
    by_hand = zero_neurons(zero_heads(hf, 2, [3]), 0, [1, 2])
    x = ids(tok, CLEAN)
    with torch.no_grad():
        expect = by_hand(x).logits
    doc = run_json(["edit", plan, "--model", tiny_dir, "--out", tmp_path / "hf-out"], capsys)
    assert doc["export"]["max_abs_logit_diff"] <= 1e-4 and len(doc["edits"]["edits"]) == 2
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-out").eval()
        got = reloaded(x).logits
    assert type(reloaded) is type(hf)  # the family's own class
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-4)
    if getattr(hf.config, "sliding_window", None) is not None:  # GGUF has no sliding window: refused, nothing written
        code, _, err = run(
            ["edit", plan, "--model", tiny_dir, "--out", tmp_path / "m.gguf", "--format", "gguf"], capsys
        )
        assert code == 2 and "sliding window of 4 tokens" in err and not (tmp_path / "m.gguf").exists()
        return
    doc = run_json(["edit", plan, "--model", tiny_dir, "--out", tmp_path / "m.gguf", "--format", "gguf"], capsys)
    assert doc["export"]["max_abs_logit_diff"] <= 1e-4
    with torch.no_grad():
        gg = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
        torch.testing.assert_close(gg(x).logits, expect, rtol=0, atol=1e-4)
    doc = run_json(["verify", tmp_path / "hf-out"], capsys)
    assert doc["ok"] is True and doc["max_abs_logit_diff"] <= doc["tolerance"]


def experiment(tmp_path: Path, tiny_dir: Path, prompts_file: Path) -> Path:
    exp = {
        "name": "tiny experiment",
        "model": str(tiny_dir),
        "prompts": prompts_file.name,
        "metric": "logit-diff",
        "analyses": [
            {"lens": {"prompt": CLEAN, "target": " Mary"}},
            {"heads": {"seq_len": 5, "n_seqs": 2}},
            {"patch": {"clean": CLEAN, "corrupt": CORRUPT, "answers": [" Mary", " John"], "components": "resid_pre"}},
            {"sweep": {"component": "heads", "layers": "1-2"}},
        ],
        "ablations": [{"name": "two", "heads": "1.0,2.1"}, {"name": "loss", "layers": 1, "metric": "loss"}],
        "export": {"ablation": "two", "out": "exported"},
        "report": "experiment.html",
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def test_run_experiment_equals_the_single_commands(tiny_dir, prompts_file, tmp_path, monkeypatch, capsys):
    path = experiment(tmp_path, tiny_dir, prompts_file)
    monkeypatch.chdir(tmp_path)
    doc = run_json(["run", path], capsys)
    assert [s["command"] for s in doc["steps"]] == ["lens", "heads", "patch", "sweep", "ablate", "ablate"]
    assert Path("exported/scalpel_manifest.json").is_file() and Path("experiment.html").is_file()
    single = run_json(
        ["ablate", "--model", tiny_dir, "--heads", "1.0,2.1", "--prompts", prompts_file, "--metric", "logit-diff"],
        capsys,
    )
    assert doc["steps"][4]["result"]["prompts"] == single["prompts"]
    assert doc["steps"][5]["result"]["metric"] == "loss"
    sweep = run_json(
        [
            "sweep",
            "--model",
            tiny_dir,
            "--component",
            "heads",
            "--layers",
            "1-2",
            "--prompts",
            prompts_file,
            "--metric",
            "logit-diff",
        ],
        capsys,
    )
    assert doc["steps"][3]["result"]["units"] == sweep["units"]
    html = Path("experiment.html").read_text()
    assert html.count('class="plotly-graph-div"') == 8  # lens 2, heads 1, patch 1, sweep 2, ablate 1 + 1
    code, _, err = run(["run", path], capsys)  # outputs exist now: refused, nothing replaced
    assert code == 2 and "already exists" in err


def external_refs(html: str) -> dict:
    """Script tags and every src/href of the page's tags (script bodies are not parsed as tags)."""
    from html.parser import HTMLParser

    found = {"script": 0, "external": []}

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found["script"] += tag == "script"
            found["external"] += [v for k, v in attrs if k in ("src", "href") and v]

    Tags().feed(html)
    return found


def test_report_is_self_contained(tiny_dir, prompts_file, tmp_path, capsys):
    report = tmp_path / "r.html"
    code, out, err = run(
        ["sweep", "--model", tiny_dir, "--component", "layers", "--prompts", prompts_file, "--report", report], capsys
    )
    assert code == 0, err
    html = report.read_text()
    tags = external_refs(html)
    assert tags["script"] >= 2 and tags["external"] == []  # plotly.js and the figure, both inline
    assert html.count('class="plotly-graph-div"') == 1 and len(html) > 3_000_000  # plotly.js inlined once
    assert str(report) in out


@pytest.mark.parametrize("name", ["ioi_heads.yaml", "prune_layers.yaml"])
def test_shipped_experiments_parse_into_commands(name, capsys):
    path = Path(__file__).resolve().parents[2] / "examples" / name
    doc = run_json(["run", path, "--dry-run"], capsys)
    steps = doc["steps"]
    ablations = [s["options"] for s in steps if s["command"] == "ablate"]
    assert len(ablations) == 2 and sum("out" in a for a in ablations) == 1
    for step in steps:
        assert step["command"] in cli.COMMAND_HELP
        if step["command"] in ("ablate", "sweep"):  # every path relative to the experiment file
            prompts = Path(step["options"]["prompts"])
            assert prompts.is_file() and prompts.parent == path.parent
    out = Path(next(a["out"] for a in ablations if "out" in a))
    assert out.parent == path.parent


def test_run_steps_take_yaml_values_as_their_commands_take_flags(tmp_path):
    """A step's YAML values are typed (an int, a list, a quoted head list) and checked against its flags."""
    from _cli.commands.run import plan_steps
    from _cli.inputs import CLIError

    exp = tmp_path / "sub" / "exp.yaml"
    exp.parent.mkdir()
    data = {
        "prompts": "../prompts.txt",
        "metric": "logit-diff",
        "analyses": [
            {"sweep": {"component": "heads", "layers": 1, "top": 3}},
            {"lens": {"prompt": 2024, "layers": [0, 2], "target": " Mary", "stages": ["pre", "post"]}},
        ],
        "ablations": [{"heads": ["1.0", "2.1"], "batch-size": 2, "out": "edited"}],
    }
    sweep, lens, ablate = plan_steps(data, exp)
    assert (sweep.args.layers, sweep.args.top, sweep.args.batch_size) == (1, 3, 64)  # the parser's defaults
    assert sweep.args.prompts == [str(exp.parent / "../prompts.txt")]
    assert (lens.args.prompt, lens.args.layers, lens.args.target) == ("2024", [0, 2], [" Mary"])
    assert ablate.args.heads == ["1.0", "2.1"] and ablate.args.batch_size == 2
    assert ablate.args.out == str(exp.parent / "edited")
    for options, message in [
        ({"top": 0}, "top: expected a positive integer, got '0'"),
        ({"component": "tokens"}, "component: 'tokens' is not one of heads, neurons, layers"),
        ({"mean": "yes"}, "mean is a switch; write true or false"),
        ({"topp": 3}, "unknown option 'topp' (did you mean 'top'?)"),
        ({"overwrite": True}, "'overwrite' is set for the whole experiment, not per step"),
    ]:
        bad = {"analyses": [{"sweep": {"component": "heads", **options}}]}
        with pytest.raises(CLIError, match=re.escape(message)):
            plan_steps(bad, exp)
