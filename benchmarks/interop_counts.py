"""The adapted TransformerLens and nnsight suites on HookedLlama and on their reference models: the counts.

Runs ``tests/integration/interop_tl`` (TransformerLens's own tests) and ``tests/integration/interop_nnsight``
(nnsight's own tests) twice each, in fresh pytest processes: on HookedLlama (``SCALPEL_INTEROP_TARGET=scalpel``,
what CI runs) and on the reference on the same weights (``SCALPEL_INTEROP_TARGET=reference``: TransformerLens
4.3's ``TransformerBridge``, plain ``LlamaForCausalLM`` under nnsight). Prints the passed / failed / skipped
table (the one in docs/hooks.md) and every test that passes on the reference but not on HookedLlama::

    python benchmarks/interop_counts.py                 # both suites (~10 min on a quiet 2-core CPU)
    python benchmarks/interop_counts.py --suite tl      # one suite
    python benchmarks/interop_counts.py --json out.json # the outcome of every test as well

HookedLlama's known failures (``FAILING`` in each suite's SKIPS.py: strict expected failures, so CI stays
green and a test that starts to pass is noticed) count as failed here. Exits 1 when a test passes on the
reference and not on HookedLlama, unless that test is listed with its reason in docs/hooks.md's "coming from
TransformerLens / nnsight" section.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITES = {
    "tl": ("tests/integration/interop_tl", "TransformerLens's tests", "TransformerLens 4.3 TransformerBridge"),
    "nnsight": ("tests/integration/interop_nnsight", "nnsight's tests", "plain LlamaForCausalLM under nnsight"),
}
_LINE = re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+?)(?: - .*)?$")
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b")
_KIND = {"xfailed": "failed", "xpassed": "passed", "error": "failed", "errors": "failed"}


def run(folder: str, target: str) -> tuple[dict[str, str], dict[str, int]]:
    """({test id: "passed" | "failed"}, {outcome: count}) of one suite on one target (one pytest process)."""
    env = dict(os.environ, SCALPEL_INTEROP_TARGET=target, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=no", "-rA", folder]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    outcomes: dict[str, str] = {}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for line in proc.stdout.splitlines():
        match = _LINE.match(line.strip())
        if match:
            kind, test = match.groups()
            outcomes.setdefault(test.split("/")[-1], "passed" if kind in ("PASSED", "XPASS") else "failed")
    for n, kind in _SUMMARY.findall(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""):
        counts[_KIND.get(kind, kind)] += int(n)
    if not outcomes:
        sys.exit(f"no test outcome from {' '.join(cmd)} (target {target}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return outcomes, counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--json", type=Path, help="also write every test's outcome here")
    args = parser.parse_args()
    documented = (REPO / "docs" / "hooks.md").read_text(encoding="utf-8")
    rows, regressions, record = [], [], {}
    for key in SUITES if args.suite == "all" else [args.suite]:
        folder, what, reference = SUITES[key]
        (ours, ours_n), (ref, ref_n) = run(folder, "scalpel"), run(folder, "reference")
        record[key] = {"scalpel": ours, "reference": ref}
        for model, counts in (("HookedLlama", ours_n), (reference, ref_n)):
            rows.append((what, model, counts["passed"], counts["failed"], counts["skipped"]))
        for test in sorted(t for t, v in ref.items() if v == "passed" and ours.get(t) != "passed"):
            regressions.append((test, test.split("::")[-1] in documented))
    print("| suite (same tests, same Llama weights) | model | passed | failed | skipped |")
    print("|---|---|---|---|---|")
    for what, model, passed, failed, skipped in rows:
        print(f"| {what} | {model} | {passed} | {failed} | {skipped} |")
    for test, listed in regressions:
        print(f"passes on the reference only: {test}" + ("" if listed else "  (not listed in docs/hooks.md)"))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return 1 if any(not listed for _, listed in regressions) else 0


if __name__ == "__main__":
    sys.exit(main())
