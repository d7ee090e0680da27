"""``scalpel circuit`` on a tiny model: the JSON equals the library's numbers, the report, the circuit
file and the node-level export are written, and bad input is one line before any work."""

from __future__ import annotations

import json

import pytest

from analyses.circuits import Circuit, edge_attribution
from hooks import HookedLlama
from tests.helpers import IOI, build_tiny, run, run_json


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-gqa")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "ioi.txt"
    path.write_text("".join(f"{p}\t{c}\t{i}\n" for p, c, i in IOI[:4]))
    return path


def test_circuit_command_matches_the_library(tiny_dir, prompts, tmp_path, capsys):
    report, saved, out = tmp_path / "c.html", tmp_path / "c.json", tmp_path / "export"
    data = run_json(
        [
            "circuit",
            "--model",
            tiny_dir,
            "--prompts",
            prompts,
            "--corrupt",
            "swap",
            "--method",
            "eap",
            "--top-n",
            "30",
            "--report",
            report,
            "--save-circuit",
            saved,
            "--out",
            out,
        ],
        capsys,
    )
    model = HookedLlama.from_pretrained(str(tiny_dir))
    clean = [p for p, _, _ in IOI[:4]]
    corrupted = [clean[i ^ 1] for i in range(4)]
    answers = ([c for _, c, _ in IOI[:4]], [i for _, _, i in IOI[:4]])
    scores = edge_attribution(model, clean, corrupted, "logit_diff", answers=answers, method="eap")
    circuit = scores.circuit(top_n=30)
    assert data["circuit"]["edges"] == circuit.edge_names()
    assert abs(data["circuit_value"] - circuit.evaluate(model)) < 1e-5
    assert abs(data["faithfulness"]["cpr"] - scores.faithfulness(model).cpr) < 1e-5
    assert "<html" in report.read_text()[:200].lower()
    assert Circuit.from_dict(json.loads(saved.read_text())).edge_names() == circuit.edge_names()
    assert (out / "config.json").exists() and data["export"]["circuit_vs_weights"] < 1e-4


def test_bad_input_is_one_line(tiny_dir, prompts, tmp_path, capsys):
    code, _, err = run(
        [
            "circuit",
            "--model",
            tiny_dir,
            "--prompt",
            "When Mary and John went",
            "--answers",
            " Mary",
            " John",
            "--corrupt",
            "swap",
        ],
        capsys,
    )
    assert code == 2 and "odd number" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["circuit", "--model", tiny_dir, "--prompts", prompts, "--ablation", "patching"], capsys)
    assert code == 2 and "--corrupt" in err
    bad = tmp_path / "corrupt.txt"
    bad.write_text("When Mary went\n")
    code, _, err = run(["circuit", "--model", tiny_dir, "--prompts", prompts, "--corrupt", bad], capsys)
    assert code == 2 and "one per clean prompt" in err
