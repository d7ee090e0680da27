"""``scalpel abliterate``: find and bake a refusal-removal edit, report it, export it verified."""

from __future__ import annotations

import argparse
import math

from _cli.context import model_meta
from _cli.inputs import CLIError
from _cli.options import common, positive_int
from _cli.report import Output
from surgery.refine import REFINE_STEPS
from surgery.refusal_search import WHITEN

HELP = "remove refusals: search an Abliterate edit (refusals vs KL), report it, export it verified"
EXAMPLE = (
    "scalpel abliterate --harmful harmful:train --harmless harmless:train --trials 24 "
    "--report abliterate.html --out abliterated-smollm2"
)


def shrinkage(text: str) -> float | None:
    """``argparse`` type for ``--whiten``: a positive number, or 'off' (None)."""
    if text.strip().lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'off', got {text!r}")
    return value


def refine_steps(text: str) -> int:
    """``argparse`` type for ``--refine``: a number of steps >= 0, or 'off' (0)."""
    if text.strip().lower() == "off":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of steps >= 0 or 'off', got {text!r}")
    return value


def add_arguments(p) -> None:
    p.add_argument(
        "--harmful",
        required=True,
        metavar="FILE",
        help="prompts the model refuses: .txt (one a line) or .jsonl, or harmful:train (shipped)",
    )
    p.add_argument(
        "--harmless",
        required=True,
        metavar="FILE",
        help="prompts it answers: .txt or .jsonl, or harmless:train (shipped)",
    )
    p.add_argument(
        "--eval-harmful", metavar="FILE", help="held-out harmful prompts (default: the last third of --harmful)"
    )
    p.add_argument(
        "--eval-harmless", metavar="FILE", help="held-out harmless prompts (default: the last third of --harmless)"
    )
    p.add_argument("--trials", type=positive_int, default=24, help="parameter sets tried (default 24)")
    p.add_argument("--seed", type=int, default=0, help="the search's seed (default 0)")
    p.add_argument(
        "--contrast",
        choices=["auto", "sets", "behaviour"],
        default="auto",
        help="direction from harmful − harmless means (sets), from refused − answered prompts "
        "(behaviour), or let the search choose (auto, default)",
    )
    p.add_argument(
        "--whiten",
        type=shrinkage,
        default=WHITEN,
        metavar="LAMBDA",
        help=f"whiten the direction against the harmless prompts' covariance with this shrinkage "
        f"(default {WHITEN:g}; 'off': the plain difference of means)",
    )
    p.add_argument(
        "--refine",
        type=refine_steps,
        default=REFINE_STEPS,
        metavar="STEPS",
        help=f"refine the best edit's direction for this many gradient steps on the training prompts "
        f"(less KL on harmless prompts, the same answers to harmful ones; default {REFINE_STEPS}; "
        f"'off': none)",
    )
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=100, help="greedy tokens per scored response (default 100)"
    )
    p.add_argument(
        "--system-prompt",
        default="You are a helpful assistant.",
        help="system message of every prompt (default 'You are a helpful assistant.')",
    )
    p.add_argument("--samples", type=positive_int, default=4, help="before/after responses shown (default 4)")
    p.add_argument(
        "--out", metavar="DIR", help="export the edited model as a verified HF checkpoint (plan.yaml beside it)"
    )
    common(p)


def run(args, ctx) -> Output:
    """Search, confirm by generation, report the front and sample responses, export with provenance."""
    from pathlib import Path

    from analyses.refusal import load_prompts
    from hooks import InputError

    plan_path = Path(args.out).expanduser().parent / (Path(args.out).name + ".plan.yaml") if args.out else None
    if plan_path is not None and plan_path.exists() and not args.overwrite:
        raise CLIError(f"{plan_path} already exists; pass --overwrite to replace it")
    try:
        sets = {
            k: load_prompts(getattr(args, k)) if getattr(args, k) else None
            for k in ("harmful", "harmless", "eval_harmful", "eval_harmless")
        }
    except InputError as exc:
        raise CLIError(str(exc)) from None
    import surgery

    model = ctx.model()
    res = surgery.abliterate(
        model,
        sets["harmful"],
        sets["harmless"],
        eval_harmful=sets["eval_harmful"],
        eval_harmless=sets["eval_harmless"],
        trials=args.trials,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        system_prompt=args.system_prompt,
        contrast=args.contrast,
        whiten=args.whiten,
        refine=args.refine,
        progress=True,
    )
    data = {
        "command": "abliterate",
        "model": model_meta(model),
        **res.summary(),
        "provenance": res.provenance,
        "edits": res.plan.to_dict(),
    }
    out = Output("abliterate", data, title="scalpel abliterate")
    source = res.provenance["contrast"] + (" (refined)" if res.trials[res.chosen]["params"].get("refined") else "")
    out.table(
        "abliteration (held-out prompts)",
        ["", "value"],
        [
            ["refusals before", f"{res.before.count}/{res.before.n}"],
            ["refusals after", f"{res.after.count}/{res.after.n}"],
            ["first-token KL on harmless", res.kl],
            ["direction from", source],
            ["trials", len(res.trials)],
            ["chosen trial", res.chosen],
            ["seconds", round(res.timings["total_s"], 1)],
        ],
    )
    out.table(
        "Pareto front (short-answer refusals vs KL; 100-token refusals where confirmed)",
        ["trial", "short", "KL", "refusals"],
        [[i, res.trials[i]["refusal_proxy"], res.trials[i]["kl"], res.trials[i]["refusals"]] for i in res.front],
    )
    out.figure("Pareto front", res.figure())
    out.figure("refusal direction per layer", res.directions.figure())
    n = min(args.samples, res.before.n)
    samples = [
        [p, b[:160], a[:160]] for p, b, a in zip(res.before.prompts[:n], res.before.responses, res.after.responses)
    ]
    data["samples"] = [
        {"prompt": p, "before": b, "after": a}
        for p, b, a in zip(res.before.prompts[:n], res.before.responses, res.after.responses)
    ]
    out.table("responses before / after", ["prompt", "before", "after"], samples)
    if args.out:
        res_x = surgery.export(model, args.out, edits=res.plan, overwrite=args.overwrite, provenance=res.provenance)
        res.plan.save(plan_path)
        data["export"] = {
            "out_dir": str(res_x.out_dir),
            "plan": str(plan_path),
            "files": res_x.files,
            "max_abs_logit_diff": res_x.max_abs_logit_diff,
            "tolerance": res_x.tolerance,
            "kl_to_base": res_x.kl_to_base,
        }
        out.table(
            "export (reloaded with plain transformers)",
            ["", "value"],
            [
                ["directory", str(res_x.out_dir)],
                ["plan", str(plan_path)],
                ["reload max |logit diff|", res_x.max_abs_logit_diff],
                ["tolerance", res_x.tolerance],
            ],
        )
        out.files += [str(res_x.out_dir), str(plan_path)]
    return out
