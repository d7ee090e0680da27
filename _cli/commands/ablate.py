"""``scalpel ablate``: base vs edited metric on prompts; ``--out`` exports the edited checkpoint."""

from __future__ import annotations

import contextlib

from _cli.context import model_meta
from _cli.inputs import CLIError, check_answers, gather_prompts
from _cli.options import common, prompt_options
from _cli.progress import task
from _cli.report import Output
from hooks.indices import parse_heads, parse_layers, parse_neurons

HELP = "measure an ablation on prompts (base vs edited); --out exports the edited checkpoint"
EXAMPLE = (
    "scalpel ablate --heads 19.2,20.0,22.5,23.3 --prompts examples/prompts_ioi.txt --metric logit-diff "
    "--report ablation.html --out edited-smollm2"
)


def add_arguments(p) -> None:
    p.add_argument("--heads", metavar="L.H,...", help="attention heads, e.g. 5.3,9.1")
    p.add_argument("--neurons", metavar="L:N,...", help="MLP neurons, e.g. 12:405")
    p.add_argument("--layers", metavar="LIST", help="layers to remove, e.g. 20 or 18-20")
    p.add_argument(
        "--mean", action="store_true", help="mean-ablate the heads (mean over the prompts) instead of zeroing"
    )
    prompt_options(p)
    p.add_argument("--out", metavar="DIR", help="export the edited model as a verified HF checkpoint")
    common(p)


def _units(args) -> tuple[list, list, list]:
    """The heads, neurons and layers of the command line (syntax only, before the model is loaded)."""
    if not (args.heads or args.neurons or args.layers):
        raise CLIError(
            "ablate needs something to ablate: --heads L.H,... and/or --neurons L:N,... and/or --layers L,..."
        )
    heads = parse_heads(args.heads) if args.heads else []
    neurons = parse_neurons(args.neurons) if args.neurons else []
    layers = parse_layers(args.layers) if args.layers else []
    return heads, neurons, layers


def _prompts(args) -> list:
    items = gather_prompts(args.prompt, args.prompts, check_answers(args.answers))
    if not items:
        raise CLIError("ablate needs prompts: --prompts FILE or --prompt TEXT")
    return items


def check(args, ctx) -> None:
    """Every input against the model: units in range, prompts and answers fit the metric."""
    import surgery
    from analyses import Scorer

    heads, neurons, layers = _units(args)
    model = ctx.model()
    Scorer.build(model, args.metric, _prompts(args))
    surgery.ablation_plan(model, heads, neurons, layers)  # the range checks (a mean plan computes nothing here)


def _trim(text: str, n: int = 40) -> str:
    """The prompt cut on the right to ``n`` characters (it reads from its start; --json has it whole)."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 1] + "…"


def run(args, ctx) -> Output:
    """Base vs edited metric on the prompts (``analyses.measure_ablation``); ``--out`` exports the edited
    model from the state that was measured (the plan is applied once)."""
    import surgery
    from analyses import Scorer, measure_ablation

    heads, neurons, layers = _units(args)  # syntax first, before loading anything
    items = _prompts(args)
    model = ctx.model()
    scorer = Scorer.build(model, args.metric, items)
    plan = surgery.ablation_plan(model, heads, neurons, layers, mean=args.mean, texts=scorer.texts)

    def export(edited):  # the model as measured, the plan applied: exported as it is (applied once)
        with task(f"exporting {args.out} (write, reload, compare)"):
            return surgery.export(edited, args.out, overwrite=args.overwrite)

    with contextlib.ExitStack() as bars:
        res = measure_ablation(
            model,
            plan,
            scorer,
            batch_size=args.batch_size,
            progress=lambda label, n: bars.enter_context(task(label, n)),
            while_applied=export if args.out else None,
        )
    exported = res.while_applied
    rows, mean = res.rows(), res.mean
    spec = {
        "heads": [f"{l}.{h}" for l, h in heads],
        "neurons": [f"{l}:{n}" for l, n in neurons],
        "layers": layers,
        "ablation": "mean" if args.mean else "zero",
    }
    data = {
        "command": "ablate",
        "model": model_meta(model),
        "metric": args.metric,
        "units": spec,
        "edits": plan.to_dict(),
        "prompts": rows,
        "mean": mean,
    }
    out = Output("ablate", data, title="scalpel ablate")
    if exported is not None:
        data["export"] = {
            "out_dir": str(exported.out_dir),
            "files": exported.files,
            "max_abs_logit_diff": exported.max_abs_logit_diff,
            "tolerance": exported.tolerance,
            "kl_to_base": exported.kl_to_base,
        }
        out.files.append(str(exported.out_dir))
    answers = args.metric != "loss"
    headers = ["#", "prompt"] + (["answers"] if answers else []) + ["base", "edited", "effect"]
    table = [
        [i, _trim(r["prompt"])]
        + ([f"{r['correct']!r}" + (f" vs {r['incorrect']!r}" if r["incorrect"] else "")] if answers else [])
        + [r["base"], r["edited"], r["effect"]]
        for i, r in enumerate(rows)
    ]
    table.append(["", "mean"] + ([""] if answers else []) + [mean["base"], mean["edited"], mean["effect"]])
    what = " + ".join(
        x for x in (_plural(len(heads), "head"), _plural(len(neurons), "neuron"), _plural(len(layers), "layer")) if x
    )
    out.table(
        f"{'mean-' if args.mean else ''}ablating {what}: {args.metric} per prompt (effect = edited - base)",
        headers,
        table,
    )
    if exported is not None:
        e = data["export"]
        out.table(
            "export",
            ["", "value"],
            [
                ["directory", e["out_dir"]],
                ["files", len(e["files"])],
                ["reload max |logit diff|", e["max_abs_logit_diff"]],
                ["tolerance", e["tolerance"]],
                ["KL to base (probes)", e["kl_to_base"]],
            ],
        )
    out.figure(f"{args.metric} per prompt, base vs edited", res.figure())
    return out


def _plural(n: int, word: str) -> str:
    return "" if n == 0 else f"{n} {word}{'s' if n != 1 else ''}"
