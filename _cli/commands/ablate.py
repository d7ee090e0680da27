"""``scalpel ablate``: base vs edited metric on prompts; ``--out`` exports the edited checkpoint."""

from __future__ import annotations

import torch

from _cli.context import model_meta
from _cli.inputs import (
    CLIError,
    check_answers,
    check_heads,
    check_layers,
    check_neurons,
    gather_prompts,
    parse_heads,
    parse_layers,
    parse_neurons,
)
from _cli.options import common, prompt_options
from _cli.plans import build_plan
from _cli.progress import counter, task
from _cli.report import Output

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


def _units(args, model) -> tuple[list, list, list]:
    heads = parse_heads(args.heads) if args.heads else []
    neurons = parse_neurons(args.neurons) if args.neurons else []
    layers = parse_layers(args.layers) if args.layers else []
    if model is not None:
        check_heads(model, heads)
        check_neurons(model, neurons)
        check_layers(model, layers)
    return heads, neurons, layers


def _trim(text: str, n: int = 40) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else "…" + text[-(n - 1) :]


def run(args, ctx) -> Output:
    """Base vs edited metric on the prompts (per prompt and mean); ``--out`` exports the edited model."""
    if not (args.heads or args.neurons or args.layers):
        raise CLIError(
            "ablate needs something to ablate: --heads L.H,... and/or --neurons L:N,... and/or --layers L,..."
        )
    _units(args, None)  # syntax first, before loading anything
    items = gather_prompts(args.prompt, args.prompts, check_answers(args.answers))
    if not items:
        raise CLIError("ablate needs prompts: --prompts FILE or --prompt TEXT")
    model = ctx.model()
    heads, neurons, layers = _units(args, model)
    from analyses import Scorer

    scorer = Scorer.build(model, args.metric, items)
    plan = build_plan(model, heads, neurons, layers, mean=args.mean, texts=scorer.texts)
    plan.validate(model)
    with counter("base") as bar:
        base = scorer.evaluate(model, args.batch_size, progress=bar)
    with plan.applied(model), counter("edited") as bar:
        edited = scorer.evaluate(model, args.batch_size, progress=bar)
    rows = []
    for i, item in enumerate(items):
        row = {
            "prompt": item.text,
            "correct": item.correct,
            "incorrect": item.incorrect,
            "base": float(base["values"][i]),
            "edited": float(edited["values"][i]),
            "effect": float(edited["values"][i] - base["values"][i]),
        }
        for key in ("correct_logit", "incorrect_logit"):
            if key in base:
                row[f"base_{key}"], row[f"edited_{key}"] = float(base[key][i]), float(edited[key][i])
        rows.append(row)
    mean = {
        k: float(torch.tensor([r[k] for r in rows], dtype=torch.float64).mean()) for k in ("base", "edited", "effect")
    }
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
    if args.out:
        import surgery

        with task(f"exporting {args.out} (write, reload, compare)"):
            res = surgery.export(model, args.out, edits=plan, overwrite=args.overwrite)
        data["export"] = {
            "out_dir": str(res.out_dir),
            "files": res.files,
            "max_abs_logit_diff": res.max_abs_logit_diff,
            "tolerance": res.tolerance,
            "kl_to_base": res.kl_to_base,
        }
        out.files.append(str(res.out_dir))
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
    if args.out:
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
    out.figure(f"{args.metric} per prompt, base vs edited", _bars(rows, mean, args.metric))
    return out


def _plural(n: int, word: str) -> str:
    return "" if n == 0 else f"{n} {word}{'s' if n != 1 else ''}"


def _bars(rows: list[dict], mean: dict, metric: str):
    """Grouped bars, base vs edited, per prompt (hover shows the prompt) and their mean."""
    import plotly.graph_objects as go

    labels = [f"#{i}" for i in range(len(rows))] + ["mean"]
    hover = [r["prompt"] for r in rows] + ["mean over prompts"]
    fig = go.Figure(
        [
            go.Bar(
                name=name,
                x=labels,
                y=[r[key] for r in rows] + [mean[key]],
                hovertext=hover,
                hovertemplate="%{hovertext}<br>" + name + " %{y:.4g}<extra></extra>",
            )
            for name, key in (("base", "base"), ("edited", "edited"))
        ]
    )
    fig.update_layout(
        barmode="group",
        yaxis_title=metric,
        xaxis_title="prompt",
        xaxis_type="category",
        margin=dict(l=60, r=20, t=40, b=60),
        legend=dict(orientation="h", y=1.1),
    )
    return fig
