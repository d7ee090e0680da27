"""``scalpel abliterate``: find and bake a refusal-removal edit, report it, export it verified.

Its flags are generated from ``surgery.abliteration.AbliterationConfig``: one per setting, with that
setting's name (``--max-new-tokens`` for ``max_new_tokens``), description and default; the command passes
only the settings given on the command line, so the library's defaults are the command's.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

from _cli.context import model_meta
from _cli.options import common
from _cli.progress import task
from _cli.report import Output

HELP = "remove refusals: search an Abliterate edit (refusals vs KL), report it, export it verified"
EXAMPLE = (
    "scalpel abliterate --harmful harmful:train --harmless harmless:train --trials 24 "
    "--report abliterate.html --out abliterated-smollm2"
)


class _Unset:
    """The flags' default: a setting not given keeps the library's default (None is a value: 'off')."""

    def __repr__(self) -> str:
        return "library default"


_UNSET = _Unset()
_TYPES = {"int": int, "float": float, "str": str}


def _settings() -> list:
    from surgery.abliteration import settings

    return [s for s in settings() if s.metadata["cli"]]


def _parser_type(field):
    """How a flag reads its text: the setting's own ``parse`` or its annotation's base type."""
    parse = field.metadata["parse"]
    if parse is not None:
        return _checked(parse)
    return _TYPES[str(field.type).split("|")[0].strip()]


def _checked(parse):
    def read(text: str):
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read {text!r}") from None

    read.__name__ = getattr(parse, "__name__", "value")
    return read


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
    g = p.add_argument_group("search settings")
    for f in _settings():
        default = f.default if f.default is not None else ("off" if f.metadata["parse"] is not None else "none")
        g.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_parser_type(f),
            choices=f.metadata["choices"],
            metavar=f.metadata["metavar"] or (None if f.metadata["choices"] else f.name.split("_")[-1].upper()),
            default=_UNSET,
            help=f"{f.metadata['help']} (default {default})",
        )
    p.add_argument("--samples", type=int, default=4, help="before/after responses shown (default 4)")
    p.add_argument(
        "--out", metavar="DIR", help="export the edited model as a verified HF checkpoint (DIR.plan.yaml beside it)"
    )
    common(p)


def config(args):
    """The ``AbliterationConfig`` of the command line: the settings given, the library's defaults otherwise."""
    from surgery import AbliterationConfig

    return AbliterationConfig.build(**{f.name: v for f in _settings() if (v := getattr(args, f.name)) is not _UNSET})


def plan_path(args) -> Path | None:
    """The plan written beside ``--out``: ``DIR.plan.yaml``."""
    return Path(args.out).expanduser().parent / (Path(args.out).name + ".plan.yaml") if args.out else None


def outputs(args) -> list:
    """``--out``, ``--report`` and the implied ``DIR.plan.yaml`` (checked with the others before any work)."""
    from _cli.commands import default_outputs
    from _core.writer import Output as Written

    found = default_outputs(args)
    path = plan_path(args)
    if path is not None:
        found.append(Written(path, kind="plan", overwrite=bool(args.overwrite), param="out_dir", shown=str(path)))
    return found


def check(args, ctx) -> None:
    """Settings and prompt files, before the model does any work."""
    from analyses.refusal import load_prompts

    config(args)
    for name in ("harmful", "harmless", "eval_harmful", "eval_harmless"):
        if getattr(args, name):
            load_prompts(getattr(args, name))


class _Stages:
    """The search's ``progress``: one line per stage, the previous one removed when the next starts
    (``_cli.progress``: on a terminal only, never with --json)."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()

    def __call__(self, stage: str, total: int | None):
        self.stack.close()
        return self.stack.enter_context(task(stage, total))


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning raised during the search as one line on stderr (``note:`` for a ``SearchNotice``, such as
    the sampler used without Optuna)."""
    from surgery.abliteration import SearchNotice

    kind = "note" if issubclass(category, SearchNotice) else "warning"
    print(f"{kind}: {str(message).splitlines()[0] if str(message) else category.__name__}", file=sys.stderr)


def run(args, ctx) -> Output:
    """Search, confirm by generation, report the front and sample responses, export with provenance."""
    import surgery
    from analyses.refusal import load_prompts
    from surgery.abliteration import SearchNotice

    cfg = config(args)
    sets = {
        k: load_prompts(getattr(args, k)) if getattr(args, k) else None
        for k in ("harmful", "harmless", "eval_harmful", "eval_harmless")
    }
    model = ctx.model()
    stages = _Stages()
    with warnings.catch_warnings():
        warnings.simplefilter("always", SearchNotice)
        warnings.showwarning = _one_line
        try:
            res = surgery.abliterate(
                model,
                sets["harmful"],
                sets["harmless"],
                eval_harmful=sets["eval_harmful"],
                eval_harmless=sets["eval_harmless"],
                config=cfg,
                progress=stages,
            )
        finally:
            stages.stack.close()
    data: dict[str, Any] = {
        "command": "abliterate",
        "model": model_meta(model),
        **res.summary(),
        "provenance": res.provenance,
        "edits": res.plan.to_dict(),
    }
    out = Output("abliterate", data, title="scalpel abliterate")
    source = res.provenance["contrast"] + (" (refined)" if res.trials[res.chosen]["params"].get("refined") else "")
    t = res.timings
    out.table(
        "abliteration (held-out prompts)",
        ["", "value"],
        [
            ["refusals before", f"{res.before.count}/{res.before.n}"],
            ["refusals after", f"{res.after.count}/{res.after.n}"],
            ["first-token KL on harmless", res.kl],
            ["direction from", source],
            ["sampler", res.provenance["sampler"]],
            ["trials", len(res.trials)],
            ["chosen trial", res.chosen],
            [
                "seconds (setup / trials / refinement / confirmation)",
                " / ".join(f"{t[k]:.0f}" for k in ("setup_s", "search_s", "refine_s", "confirm_s")),
            ],
            ["seconds", round(t["total_s"], 1)],
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
        path = plan_path(args)
        with task(f"exporting {args.out} (write, reload, compare)"):
            res_x = surgery.export(model, args.out, edits=res.plan, overwrite=args.overwrite, provenance=res.provenance)
        res.plan.save(path, overwrite=args.overwrite)
        data["export"] = {
            "out_dir": str(res_x.out_dir),
            "plan": str(path),
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
                ["plan", str(path)],
                ["reload max |logit diff|", res_x.max_abs_logit_diff],
                ["tolerance", res_x.tolerance],
            ],
        )
        out.files += [str(res_x.out_dir), str(path)]
    return out
