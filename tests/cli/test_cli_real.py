"""``scalpel`` on the default model (SmolLM2-135M-Instruct): the README's ablation, checked against a
plain-transformers reload of the checkpoint it exports; ``lens`` against the Python API; and the HTML
reports rendered by headless Chromium without JavaScript errors."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import CLEAN, CORRUPT, build_tiny, chromium, run

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "examples" / "prompts_ioi.txt"
README_HEADS = "19.2,20.0,22.5,23.3"


def render(page: Path, tmp_path: Path) -> tuple[int, list[str]]:
    """(plotly figures drawn, JavaScript errors) of ``page`` in headless Chromium."""
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and re.search(r"Uncaught|Error", line)]
    drawn = len(re.findall(r'class="plot-container plotly"', proc.stdout))
    assert drawn == 0 or "main-svg" in proc.stdout
    return drawn, errors


@pytest.mark.slow
def test_readme_ablation_exports_a_checkpoint_with_the_reported_logits(smol, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    code, out, err = run(
        [
            "ablate",
            "--heads",
            README_HEADS,
            "--prompts",
            PROMPTS,
            "--metric",
            "logit-diff",
            "--report",
            "ablation.html",
            "--out",
            "edited-smollm2",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["prompts"]) == 12 and doc["model"]["sha256"] == smol.source_sha256
    reloaded = AutoModelForCausalLM.from_pretrained("edited-smollm2", dtype=torch.float32).eval()
    tok = smol.tokenizer
    with torch.no_grad():
        for row in doc["prompts"]:
            ids = smol.to_tokens(row["prompt"])
            c, i = smol.to_single_token(row["correct"]), smol.to_single_token(row["incorrect"])
            base = smol(ids)[0, -1]  # one prompt, no padding
            assert row["base"] == pytest.approx(float(base[c] - base[i]), abs=1e-4)
            edited = reloaded(torch.tensor([tok(row["prompt"])["input_ids"]])).logits[0, -1]
            assert row["edited_correct_logit"] == pytest.approx(float(edited[c]), abs=1e-4)
            assert row["edited_incorrect_logit"] == pytest.approx(float(edited[i]), abs=1e-4)
            assert row["edited"] == pytest.approx(float(edited[c] - edited[i]), abs=1e-4)
    # the four heads carry the indirect-object answer: without them the model no longer prefers it
    assert doc["mean"]["base"] > 4 and doc["mean"]["edited"] < 0
    manifest = json.loads(Path("edited-smollm2/scalpel_manifest.json").read_text())
    assert manifest["base"]["sha256"] == smol.source_sha256
    assert [e["edit"] for e in manifest["edits"]] == ["ZeroHeads"] * 4
    assert run(["verify", "edited-smollm2", "--no-reload"], capsys)[0] == 0
    drawn, errors = render(Path("ablation.html"), tmp_path)
    assert (drawn, errors) == (1, [])


@pytest.mark.slow
def test_lens_on_the_default_model_matches_the_python_api(smol, capsys):
    from analyses import logit_lens

    prompt = "The Eiffel Tower is in the city of"
    code, out, err = run(["lens", prompt, "--target", " Paris", "--json"], capsys)
    assert code == 0, err
    lens = json.loads(out)["lens"]
    api = logit_lens(smol, prompt, [" Paris"], stages="resid_post")
    assert lens["stages"] == api.stages == [f"{i}_post" for i in range(30)]
    assert lens["top_tokens"] == api.top_tokens
    torch.testing.assert_close(
        torch.tensor(lens["target_probs"], dtype=torch.float64), api.target_probs.double(), rtol=0, atol=1e-6
    )
    with torch.no_grad():
        probs = smol(prompt)[0, -1].softmax(-1)
    assert lens["target_probs"][-1][-1][0] == pytest.approx(float(probs[smol.to_single_token(" Paris")]), abs=1e-5)
    assert lens["top_tokens"][-1][-1][0] == " Paris" and lens["target_ranks"][-1][-1][0] == 0


def test_experiment_report_renders_every_figure_in_chromium(tmp_path, monkeypatch, capsys):
    tiny = build_tiny(tmp_path / "tiny-llama")
    (tmp_path / "p.txt").write_text(f"{CLEAN}\t Mary\t John\n{CORRUPT}\t John\t Mary\n")
    exp = {
        "name": "render check",
        "model": str(tiny),
        "prompts": "p.txt",
        "metric": "logit-diff",
        "analyses": [
            {"lens": {"prompt": CLEAN, "target": " Mary"}},
            {"heads": {"seq_len": 5, "n_seqs": 2}},
            {"patch": {"clean": CLEAN, "corrupt": CORRUPT, "answers": [" Mary", " John"], "components": "resid_pre,z"}},
            {"sweep": {"component": "heads"}},
        ],
        "ablations": [{"heads": "1.0"}],
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["run", "exp.yaml", "--report", "exp.html"], capsys)
    assert code == 0, err
    n_figures = Path("exp.html").read_text().count('class="plotly-graph-div"')
    assert n_figures == 8
    assert render(Path("exp.html"), tmp_path) == (n_figures, [])
    # the check itself can fail: a page with a script error is reported
    broken = Path("broken.html")
    broken.write_text(Path("exp.html").read_text().replace("</body>", "<script>undefined_function();</script></body>"))
    drawn, errors = render(broken, tmp_path)
    assert drawn == n_figures and len(errors) == 1 and "undefined_function" in errors[0]
