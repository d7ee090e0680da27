"""``scalpel circuit``: edge-level circuit discovery (EAP, EAP-IG, exact), the circuit's faithfulness curve,
and optionally the node-level circuit baked into weights and exported."""

from __future__ import annotations

from _cli.context import model_meta
from _cli.inputs import CLIError, check_answers, gather_prompts, read_prompts
from _cli.options import common, positive_int
from _cli.progress import task
from _cli.report import Output

HELP = "find a circuit: edge scores (EAP / EAP-IG / exact), faithfulness, the circuit figure; --out exports it"
EXAMPLE = (
    "scalpel circuit --prompts examples/prompts_ioi.txt --corrupt swap --method eap-ig --steps 5 "
    "--top-n 300 --report circuit.html"
)


def add_arguments(p) -> None:
    p.add_argument(
        "--prompts",
        action="append",
        metavar="FILE",
        help="clean prompts with answers: PROMPT<TAB>CORRECT<TAB>INCORRECT per line (or .jsonl)",
    )
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a clean prompt given inline (repeatable)")
    p.add_argument("--answers", nargs="+", metavar="ANSWER", help="CORRECT INCORRECT for prompts that name none")
    p.add_argument(
        "--corrupt",
        metavar="FILE|swap",
        help="corrupted prompts, one per clean prompt in the same order, or 'swap': each prompt's neighbour "
        "(0<->1, 2<->3 …, as the IOI file pairs them). Without it the edges are mean-ablated",
    )
    p.add_argument("--method", choices=["eap", "eap-ig", "exact"], default="eap-ig")
    p.add_argument("--steps", type=positive_int, default=5, help="EAP-IG integration steps (default 5)")
    p.add_argument(
        "--ablation", choices=["patching", "mean", "zero"], help="default: patching with --corrupt, else mean"
    )
    sel = p.add_mutually_exclusive_group()
    sel.add_argument(
        "--top-n", type=positive_int, metavar="N", help="keep the N edges of largest |score| (default 200)"
    )
    sel.add_argument("--threshold", type=float, metavar="T", help="keep the edges with |score| >= T")
    sel.add_argument("--greedy", type=positive_int, metavar="N", help="grow N edges from the logits (EAP-IG's greedy)")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the faithfulness curve (MIB's sizes)")
    p.add_argument("--save-circuit", metavar="FILE.json", help="write the circuit (edges, scores, nodes) as JSON")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="bake the node-level circuit (every other head and MLP mean-ablated over the prompts) into the "
        "weights and export it as a verified HF checkpoint",
    )
    common(p)


def outputs(args) -> list:
    from _cli.commands import default_outputs
    from _core.errors import arg
    from _core.writer import Output as Target

    found = default_outputs(args)
    if args.save_circuit:
        found.append(
            Target(
                args.save_circuit,
                kind="json",
                overwrite=bool(args.overwrite),
                param="save_circuit",
                shown=arg("save_circuit", args.save_circuit),
            )
        )
    return found


def inputs(args) -> list:
    from _cli.commands import default_inputs

    found = default_inputs(args)
    if args.corrupt and args.corrupt != "swap":
        found.append(args.corrupt)
    return found


def _prompts(args) -> tuple[list, list | None]:
    """(clean items with answers, corrupted texts or None), syntax only."""
    items = gather_prompts(args.prompt, args.prompts, check_answers(args.answers))
    if not items:
        raise CLIError("circuit needs prompts: --prompts FILE or --prompt TEXT", param="prompts")
    missing = [it.where for it in items if it.correct is None or it.incorrect is None]
    if missing:
        raise CLIError(
            f"{missing[0]}: circuit scores a logit difference; give each prompt CORRECT and INCORRECT answers "
            "(tab-separated in the file, or --answers CORRECT INCORRECT)",
            param="answers",
        )
    corrupted = None
    if args.corrupt == "swap":
        if len(items) % 2:
            raise CLIError(
                f"--corrupt swap pairs prompts 0<->1, 2<->3 …; got {len(items)} prompts (an odd number)",
                param="corrupt",
            )
        corrupted = [items[i ^ 1].text for i in range(len(items))]
    elif args.corrupt:
        corrupted = [it.text for it in read_prompts(args.corrupt)]
        if len(corrupted) != len(items):
            raise CLIError(
                f"--corrupt has {len(corrupted)} prompts for {len(items)} clean ones; give one per clean prompt",
                param="corrupt",
            )
    ablation = args.ablation or ("patching" if corrupted is not None else "mean")
    if ablation == "patching" and corrupted is None:
        raise CLIError("--ablation patching needs --corrupt FILE or --corrupt swap", param="corrupt")
    if args.out and ablation == "patching":
        pass  # the export bakes the node-level circuit with mean ablation (patching has no weight form)
    return items, corrupted


def check(args, ctx) -> None:
    """Every input against the model: a tokenizer, clean and corrupted prompts of equal token lengths."""
    items, corrupted = _prompts(args)
    model = ctx.model()
    if model.tokenizer is None:
        raise CLIError("this model has no tokenizer, so it cannot read text prompts")
    if corrupted is not None:
        for it, c in zip(items, corrupted):
            a, b = len(model.to_tokens(it.text)[0]), len(model.to_tokens(c)[0])
            if a != b:
                raise CLIError(
                    f"{it.where}: the clean prompt has {a} tokens and its corrupted prompt {b}; pair prompts of equal "
                    "token length",
                    param="corrupt",
                )


def run(args, ctx) -> Output:
    """``analyses.circuits.edge_attribution`` → a circuit → faithfulness; ``--out``: ``surgery.export_circuit``."""
    from analyses.circuits import edge_attribution

    check(args, ctx)
    items, corrupted = _prompts(args)
    ablation = args.ablation or ("patching" if corrupted is not None else "mean")
    model = ctx.model()
    clean = [it.text for it in items]
    answers = ([it.correct for it in items], [it.incorrect for it in items])
    with task(f"scoring every edge ({args.method})"):
        scores = edge_attribution(
            model,
            clean,
            corrupted,
            "logit_diff",
            answers=answers,
            method=args.method,
            steps=args.steps,
            ablation=ablation,
            path="inputs" if ablation == "patching" else "edges",
        )
    if args.threshold is not None:
        circuit = scores.circuit(threshold=args.threshold)
    elif args.greedy is not None:
        circuit = scores.circuit(greedy=args.greedy)
    else:
        circuit = scores.circuit(top_n=args.top_n or 200)
    value = circuit.evaluate(model)
    curve = None
    if not args.no_faithfulness:
        with task("faithfulness curve (MIB's circuit sizes)"):
            curve = scores.faithfulness(model)
    data = {
        "command": "circuit",
        "model": model_meta(model),
        "method": args.method,
        "ablation": ablation,
        "n_prompts": len(items),
        "clean_value": scores.clean_value,
        "ablated_value": scores.ablated_value,
        "circuit_value": value,
        "circuit": circuit.to_dict(),
        "top_edges": scores.top_rows(20),
        "faithfulness": None if curve is None else curve.to_dict(),
        "seconds": scores.stats.get("seconds"),
    }
    out = Output("circuit", data, title="scalpel circuit")
    denom = scores.clean_value - scores.ablated_value
    out.table(
        f"{args.method} over {scores.graph.n_edges} edges, {len(items)} prompts ({ablation}); logit difference",
        ["", "value"],
        [
            ["clean model", scores.clean_value],
            ["every edge patched", scores.ablated_value],
            [f"circuit ({circuit.n_edges} edges, {len(circuit.nodes())} nodes)", value],
            ["faithfulness of the circuit", (value - scores.ablated_value) / denom if denom else float("nan")],
        ],
    )
    top = scores.top_rows(15)
    out.table(
        "strongest edges (score: estimated change when the edge is patched)",
        ["edge", "score"],
        [[r["edge"], r["score"]] for r in top],
    )
    if curve is not None:
        out.table(
            f"faithfulness (CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f})",
            ["fraction", "edges", "logit diff", "faithfulness"],
            [[r["fraction"], r["edges"], r["metric"], r["faithfulness"]] for r in curve.rows()],
        )
        out.figure("faithfulness: circuits of growing size", curve.figure())
    out.figure(f"the circuit ({circuit.n_edges} edges)", circuit.figure())
    out.figure("strongest edges", scores.figure())
    if args.save_circuit:
        from _core.writer import write_file

        write_file(args.save_circuit, circuit.to_json(), kind="json", overwrite=args.overwrite, param="save_circuit")
        out.files.append(args.save_circuit)
    if args.out:
        from surgery.circuits import export_circuit

        node_level = circuit.node_level()
        with task(f"exporting the node-level circuit to {args.out} (write, reload, compare)"):
            result, diff = export_circuit(
                model, args.out, node_level, ablation="mean", reference=clean, overwrite=args.overwrite
            )
        data["export"] = {
            "out_dir": str(result.out_dir),
            "max_abs_logit_diff": result.max_abs_logit_diff,
            "circuit_vs_weights": diff,
            "nodes": node_level.nodes(),
        }
        out.files.append(str(result.out_dir))
        out.table(
            "export (node-level circuit, mean-ablated over the prompts)",
            ["", "value"],
            [
                ["directory", str(result.out_dir)],
                ["nodes kept", len(node_level.nodes())],
                ["weights vs circuit by hooks, max |logit diff|", diff],
                ["reload max |logit diff|", result.max_abs_logit_diff],
            ],
        )
    return out
