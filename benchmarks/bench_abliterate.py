"""Benchmark: refusal removal on SmolLM2-135M-Instruct, ``scalpel abliterate`` against heretic 1.4.0.

Both run offline on CPU with the same prompt files (the shipped ``analyses/data`` sets: directions
from the train splits, trials scored on the 32 + 32 eval prompts), the same trial budget and the same
scorer (greedy 100 tokens, heretic's refusal markers, system prompt "You are a helpful assistant.",
refusals on the 32 eval harmful prompts, first-token KL(base ‖ edited) on the 32 eval harmless ones).

- heretic runs as a program in its own virtual environment (AGPL: a comparator only, never imported):
  created by this script if missing (``torch==2.13.0`` first, then ``heretic-llm==1.4.0``), pointed at a
  local HF directory of the default model (exported by this script) and local prompt files through a
  ``config.toml`` in its working directory; ``COLAB_GPU=1`` makes its menu read from stdin, which is
  empty, so it stops at the menu after the last trial. Its per-trial KL and refusal counts are read
  from its log; its wall time is up to the end of the last trial.
- ours: ``scalpel abliterate`` as a subprocess (``--json``, ``--out``: search, confirmation, export and
  reload check included in its wall time).

Usage::

    python benchmarks/bench_abliterate.py                      # both at once, one thread each, 24 trials
    python benchmarks/bench_abliterate.py --only ours --trials 24
    python benchmarks/bench_abliterate.py --json results.json
    python benchmarks/bench_abliterate.py --heretic-split behaviour --seed 1   # heretic given our split
    python benchmarks/bench_abliterate.py --only ours --heretic-results old.json   # compare with a stored run

``--heretic-split behaviour`` gives heretic the training prompts our ``behaviour`` contrast uses (bad: the
harmful prompts the unedited model refuses in 24 greedy tokens; good: every prompt it answers), written
to files in the work directory, so the two searches can be compared on one direction source.
Each tool's result is its lowest-refusal Pareto point; ``matched`` (``matched()``) compares each side's
least KL at the other's fewest refusals. heretic is deterministic at a
fixed seed (two runs of seed 0 gave identical trials), so ``--heretic-results`` may take its side from
an earlier run's ``--json`` file (same seed, split and trial count, checked) instead of running it again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "analyses" / "data"
SYSTEM_PROMPT = "You are a helpful assistant."
CLASSIFY_TOKENS = 24  # as ``abliterate(classify_tokens=24)``
sys.path.insert(0, str(ROOT))  # the project's modules, imported where needed (heretic's side needs none)


def one_thread(env: dict) -> dict:
    """Each tool gets one core: both run at once on the 2-core machine, and threads do not compete."""
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def ensure_heretic(venv: Path) -> Path:
    exe = venv / "bin" / "heretic"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = str(venv / "bin" / "pip")
    subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([pip, "install", "-q", "heretic-llm==1.4.0"], check=True)
    return exe


def ensure_model(work: Path) -> Path:
    out = work / "smollm2-hf"
    if not (out / "config.json").exists():
        import surgery
        from hooks import HookedLlama

        surgery.export(HookedLlama.default(), out)
    return out


def behaviour_files(work: Path) -> tuple[Path, Path]:
    """The training prompts of our ``behaviour`` contrast as heretic prompt files: (bad, good)."""
    bad, good = work / "behaviour_refused.txt", work / "behaviour_answered.txt"
    if not (bad.exists() and good.exists()):
        from analyses.refusal import load_prompts
        from hooks import HookedLlama
        from surgery.abliteration import behaviour_split

        refused, answered, _ = behaviour_split(
            HookedLlama.default(),
            load_prompts("harmful:train"),
            load_prompts("harmless:train"),
            classify_tokens=CLASSIFY_TOKENS,
            system_prompt=SYSTEM_PROMPT,
        )
        bad.write_text("\n".join(refused) + "\n")
        good.write_text("\n".join(answered) + "\n")
    return bad, good


def run_heretic(exe: Path, model_dir: Path, work: Path, trials: int, seed: int, split: str) -> dict:
    """heretic with our sampler's start-up share (``startup_trials``), in ``work/heretic``."""
    from surgery.abliteration import startup_trials

    cwd = work / "heretic"
    cwd.mkdir(parents=True, exist_ok=True)

    def spec(name) -> str:
        return f'{{ dataset = "{name if isinstance(name, Path) else DATA / name}" }}'

    bad, good = behaviour_files(work) if split == "behaviour" else ("harmful_train.txt", "harmless_train.txt")

    (cwd / "config.toml").write_text(
        "\n".join(
            [
                f'model = "{model_dir}"',
                f"n_trials = {trials}",
                f"n_startup_trials = {startup_trials(trials)}",
                f"seed = {seed}",
                "batch_size = 32",
                "max_response_length = 100",
                f'system_prompt = "{SYSTEM_PROMPT}"',
                f"good_prompts = {spec(good)}",
                f"bad_prompts = {spec(bad)}",
                f"good_evaluation_prompts = {spec('harmless_eval.txt')}",
                f"bad_evaluation_prompts = {spec('harmful_eval.txt')}",
            ]
        )
        + "\n"
    )
    env = {
        **one_thread(os.environ),
        "COLAB_GPU": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "NO_COLOR": "1",
        "PYTHONUNBUFFERED": "1",
        "TERM": "dumb",
        "COLUMNS": "200",
    }
    log = cwd / "heretic.log"
    t0 = time.perf_counter()
    last_trial_end = None
    kls, refusals = [], []
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(exe)],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in proc.stdout:
            fh.write(line)
            m = re.search(r"\* KL divergence: ([0-9.]+)", line)
            if m:
                kls.append(float(m.group(1)))
            m = re.search(r"\* Refusals: (\d+)/(\d+)", line)  # a trial's result (not the Pareto list)
            if m:
                refusals.append(int(m.group(1)))
                last_trial_end = time.perf_counter() - t0
        proc.wait()
    base_line = re.search(r"Initial refusals: (\d+)/(\d+)", log.read_text())
    pairs = list(zip(refusals, kls))
    best = min(pairs) if pairs else None
    return {
        "tool": "heretic 1.4.0",
        "prompts": split,
        "seed": seed,
        "trials": pairs,
        "refusals_before": int(base_line.group(1)) if base_line else None,
        "best_refusals": best[0] if best else None,
        "best_kl": best[1] if best else None,
        "wall_s": last_trial_end,
        "log": str(log),
        "exit_code": proc.returncode,
    }


def run_ours(work: Path, trials: int, seed: int, contrast: str) -> dict:
    out = work / "ours"
    cmd = [
        sys.executable,
        "-c",
        "import sys, cli; sys.exit(cli.main())",
        "abliterate",
        "--harmful",
        str(DATA / "harmful_train.txt"),
        "--harmless",
        str(DATA / "harmless_train.txt"),
        "--eval-harmful",
        str(DATA / "harmful_eval.txt"),
        "--eval-harmless",
        str(DATA / "harmless_eval.txt"),
        "--trials",
        str(trials),
        "--seed",
        str(seed),
        "--contrast",
        contrast,
        "--system-prompt",
        SYSTEM_PROMPT,
        "--out",
        str(out),
        "--overwrite",
        "--json",
        "--report",
        str(work / "abliterate.html"),
    ]
    env = {**one_thread(os.environ), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"scalpel abliterate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout)
    return {
        "tool": "llama-scalpel",
        "contrast": contrast,
        "seed": seed,
        "refusals_before": data["refusals_before"],
        "best_refusals": data["refusals_after"],
        "best_kl": data["kl"],
        "wall_s": wall,
        "timings": data["timings"],
        "params": data["params"],
        "confirmed": [(c["refusals"], c["kl"]) for c in data["confirmed"]],
        "refine": data["provenance"].get("refine"),
        "export": data.get("export", {}).get("max_abs_logit_diff"),
    }


def matched(heretic_trials, ours_refusals: int, ours_kl: float, ours_confirmed) -> dict:
    """Each side's least KL at the other's fewest refusals: heretic's least KL among its trials with at
    most our chosen edit's refusals (None when it never gets there), and ours among our confirmed
    (generated) points with at most heretic's fewest refusals (``at_heretic_best``)."""
    within = [kl for r, kl in heretic_trials if r <= ours_refusals]
    h_refusals, h_kl = min(heretic_trials)
    ours_within = [kl for r, kl in ours_confirmed if r <= h_refusals]
    return {
        "refusals": ours_refusals,
        "ours_kl": ours_kl,
        "heretic_kl": min(within) if within else None,
        "at_heretic_best": {
            "refusals": h_refusals,
            "heretic_kl": h_kl,
            "ours_kl": min(ours_within) if ours_within else None,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--only", choices=["ours", "heretic"])
    ap.add_argument("--work", default="/tmp/bench-abliterate")
    ap.add_argument("--heretic-venv", default="/work/heretic-venv")
    ap.add_argument("--seed", type=int, default=0, help="both searches' seed")
    ap.add_argument("--contrast", choices=["auto", "sets", "behaviour"], default="auto", help="ours: --contrast")
    ap.add_argument(
        "--heretic-split",
        choices=["sets", "behaviour"],
        default="sets",
        help="heretic's training prompts: the shipped sets, or our behaviour split",
    )
    ap.add_argument(
        "--heretic-results", help="an earlier --json file whose heretic run (same seed, split, trials) to reuse"
    )
    ap.add_argument("--json")
    ap.add_argument("--sequential", action="store_true", help="one tool after the other (default: both at once)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    jobs = {}
    if args.heretic_results:
        old = json.loads(Path(args.heretic_results).read_text())["heretic"]
        want = {"seed": args.seed, "prompts": args.heretic_split, "n": args.trials}
        have = {"seed": old.get("seed"), "prompts": old.get("prompts"), "n": len(old["trials"])}
        if have != want:
            raise SystemExit(f"--heretic-results: that run had {have}, this one needs {want}")
        results["heretic"] = {**old, "reused_from": args.heretic_results}
    elif args.only != "ours":
        exe = ensure_heretic(Path(args.heretic_venv))
        model_dir = ensure_model(work)
        if args.heretic_split == "behaviour":
            behaviour_files(work)  # before the clock starts
        jobs["heretic"] = lambda: run_heretic(exe, model_dir, work, args.trials, args.seed, args.heretic_split)
    if args.only != "heretic":
        jobs["ours"] = lambda: run_ours(work, args.trials, args.seed, args.contrast)
    if args.sequential:
        results |= {name: job() for name, job in jobs.items()}
    else:  # both at once, one thread each (``one_thread``): same machine, same moment, same share
        with ThreadPoolExecutor(max(1, len(jobs))) as pool:
            futures = {name: pool.submit(job) for name, job in jobs.items()}
            results |= {name: f.result() for name, f in futures.items()}
    print(f"{'':16}{'refusals before':>16}{'refusals after':>16}{'KL harmless':>13}{'wall s':>9}")
    for name, r in results.items():
        print(
            f"{name:16}{str(r['refusals_before']):>16}{str(r['best_refusals']):>16}"
            f"{(r['best_kl'] if r['best_kl'] is not None else float('nan')):>13.4f}{(r['wall_s'] or 0):>9.0f}"
        )
    if "heretic" in results and "ours" in results:
        results["matched"] = matched(
            results["heretic"]["trials"],
            results["ours"]["best_refusals"],
            results["ours"]["best_kl"],
            results["ours"]["confirmed"],
        )
        m = results["matched"]
        print(
            f"at <= {m['refusals']} refusals (ours): ours KL {m['ours_kl']:.4f}, heretic "
            + (f"KL {m['heretic_kl']:.4f}" if m["heretic_kl"] is not None else "never got there")
        )
        h = m["at_heretic_best"]
        print(
            f"at <= {h['refusals']} refusals (heretic's fewest): heretic KL {h['heretic_kl']:.4f}, ours "
            + (f"KL {h['ours_kl']:.4f}" if h["ours_kl"] is not None else "none confirmed")
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
