"""``scalpel sweep``: ablate each head / neuron / layer in turn and rank them by effect."""

from __future__ import annotations

import csv
import io

from _cli.context import model_meta
from _cli.inputs import CLIError, check_answers, gather_prompts
from _cli.options import common, positive_int, prompt_options
from _cli.progress import counter, task
from _cli.report import Output, write_atomic
from hooks.indices import check_indices, parse_layers

HELP = "ablate each head / neuron / layer in turn and rank them by effect"
EXAMPLE = (
    "scalpel sweep --component heads --layers 18-23 --prompts examples/prompts_ioi.txt --metric logit-diff --top 10"
)


def add_arguments(p) -> None:
    p.add_argument("--component", choices=["heads", "neurons", "layers"], required=True)
    p.add_argument("--layers", metavar="LIST", help="layers to sweep (default all; required for neurons)")
    p.add_argument("--mean", action="store_true", help="heads: mean-ablate (mean over the prompts) instead of zeroing")
    p.add_argument("--top", type=positive_int, default=20, help="rows in the table (default 20)")
    p.add_argument("--csv", metavar="FILE", help="write the full ranking as CSV")
    prompt_options(p, batch_size=64, batch_help="rows per forward pass (units x prompts)")
    common(p)


def _inputs(args) -> tuple[list[int] | None, list]:
    """The layers and prompts of the command line (syntax only, before the model is loaded)."""
    layers = parse_layers(args.layers) if args.layers else None
    if args.component == "neurons" and layers is None:
        raise CLIError("sweep --component neurons needs --layers (every neuron of every layer is a long sweep)")
    if args.mean and args.component != "heads":
        raise CLIError("--mean applies to --component heads only")
    items = gather_prompts(args.prompt, args.prompts, check_answers(args.answers))
    if not items:
        raise CLIError("sweep needs prompts: --prompts FILE or --prompt TEXT")
    return layers, items


def check(args, ctx) -> None:
    """Every input against the model: layers in range, prompts and answers fit the metric."""
    from analyses import Scorer

    layers, items = _inputs(args)
    model = ctx.model()
    if layers is not None:
        check_indices(model, "layer", layers, param="layers")
    Scorer.build(model, args.metric, items)


def run(args, ctx) -> Output:
    """Ablate every unit of a component alone, rank by |mean effect|, table + figure (+ CSV)."""
    from analyses import Scorer, ablation_sweep

    layers, items = _inputs(args)
    model = ctx.model()
    scorer = Scorer.build(model, args.metric, items)
    means = None
    if args.mean:
        import surgery

        with task("mean head outputs over the prompts"):
            means = surgery.mean_activations(model, scorer.texts, layers=layers)
    with counter(f"sweep {args.component}") as bar:
        res = ablation_sweep(
            model, scorer, args.component, layers, means=means, batch_size=args.batch_size, progress=bar
        )
    data = {"command": "sweep", "model": model_meta(model), **res.to_dict()}
    ranked, base_mean = data["units"], data["base_mean"]
    out = Output("sweep", data, title=f"scalpel sweep --component {args.component}")
    label = {"heads": "head (L.H)", "neurons": "neuron (L:N)", "layers": "layer"}[args.component]
    out.table(
        f"{len(ranked)} {args.component} ranked by |mean effect| on {args.metric} "
        f"(base mean {base_mean:.4g}; {res.ablation} ablation, {len(items)} prompts)",
        ["rank", label, "mean effect", f"mean {args.metric} ablated"],
        [[r["rank"], r["unit"], r["mean_effect"], r["mean_ablated"]] for r in ranked[: args.top]],
    )
    if args.csv:
        write_atomic(args.csv, _csv(ranked, len(items)), overwrite=args.overwrite)
        out.files.append(args.csv)
    out.figure(f"top {min(30, len(ranked))} {args.component} by |mean effect|", res.bar_figure(30))
    if args.component == "heads":
        out.figure("mean effect of ablating each head", res.figure())
    return out


def _csv(ranked: list[dict], n_prompts: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["rank", "unit", "layer", "index", "mean_effect", "mean_ablated"] + [f"effect_{i}" for i in range(n_prompts)]
    )
    for r in ranked:
        w.writerow(
            [
                r["rank"],
                r["unit"],
                r["layer"],
                "" if r["index"] is None else r["index"],
                repr(r["mean_effect"]),
                repr(r["mean_ablated"]),
            ]
            + [repr(x) for x in r["effects"]]
        )
    return buf.getvalue()
