"""Check what README command 1 (the main job) wrote, in the environment it was run in.

Usage: check_main_job.py STDOUT_FILE JOB_DIR. Checks: the table of base/edited/effect per prompt was
printed with its mean row and the export table; the report is an HTML page with the plot library
inlined; the edited checkpoint reloads in plain transformers as a LlamaForCausalLM whose logit
difference on every prompt equals the printed edited value; `scalpel verify` accepts it.
"""

import math
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out_text = Path(sys.argv[1]).read_text(encoding="utf-8")
job = Path(sys.argv[2])
problems = []


def need(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        problems.append(what)


lines = out_text.splitlines()
need(any(line.startswith("ablating 4 heads: logit-diff per prompt") for line in lines), "the ablation table's title")
prompts = []
for line in (job / "examples" / "prompts_ioi.txt").read_text(encoding="utf-8").splitlines():
    if line.strip() and not line.startswith("#"):
        prompt, correct, incorrect = line.split("\t")
        prompts.append((prompt, correct, incorrect))
rows = {}
for line in lines:
    cells = line.split()
    if cells and cells[0].isdigit() and len(cells) > 4:
        try:
            rows[int(cells[0])] = [float(c) for c in cells[-3:]]
        except ValueError:
            pass
need(sorted(rows) == list(range(len(prompts))), f"one table row per prompt ({len(prompts)})")
mean_row = [line for line in lines if line.split()[:1] == ["mean"]]
need(len(mean_row) == 1, "the mean row")
need(any(line.startswith("reload max |logit diff|") for line in lines), "the export table")

report = job / "ablation.html"
need(
    report.is_file() and "plotly" in report.read_text(encoding="utf-8", errors="replace").lower(),
    "ablation.html with the plots",
)

ckpt = job / "edited-smollm2"
need((ckpt / "scalpel_manifest.json").is_file(), "edited-smollm2/scalpel_manifest.json")
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(ckpt)
need(
    type(model).__name__ == "LlamaForCausalLM",
    f"plain transformers reloads a LlamaForCausalLM ({type(model).__name__})",
)
worst = 0.0
with torch.no_grad():
    for i, (prompt, correct, incorrect) in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt").input_ids
        last = model(ids).logits[0, -1]
        c, w = (tok(a, add_special_tokens=False).input_ids for a in (correct, incorrect))
        diff = float(last[c[0]] - last[w[0]])
        shown = rows.get(i, [math.nan] * 3)[1]
        worst = max(worst, abs(diff - shown) / max(1.0, abs(shown)))
need(worst <= 2e-3, f"reloaded logit differences equal the printed edited column (worst relative gap {worst:.2g})")
verify = subprocess.run(["scalpel", "verify", str(ckpt)], capture_output=True, text=True)
need(verify.returncode == 0, f"scalpel verify exits 0 (exit {verify.returncode}: {verify.stderr.strip()[-200:]})")
if problems:
    sys.exit(f"README command 1 wrote something wrong: {'; '.join(problems)}")
