"""``scalpel lens``: logit lens, what each layer's residual stream predicts."""

from __future__ import annotations

from typing import Any

from _cli.context import model_meta
from _cli.inputs import CLIError, parse_ints, split_list
from _cli.options import common, positive_int
from _cli.report import Output
from hooks.indices import check_indices, parse_layers

HELP = "logit lens: what each layer's residual stream predicts"
EXAMPLE = "scalpel lens 'The Eiffel Tower is in the city of' --target ' Paris' --layers 20-29"


def add_arguments(p) -> None:
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument(
        "--target",
        action="append",
        metavar="TOKEN",
        help="follow this single-token answer's probability and rank (repeatable), e.g. ' Paris'",
    )
    p.add_argument("--top", type=positive_int, default=1, help="top-k tokens per cell in the table (default 1)")
    p.add_argument("--stages", default="post", help="residual stages: pre, mid and/or post (default post)")
    p.add_argument("--layers", metavar="LIST", help="layers to decode, e.g. 10-29 (default all)")
    p.add_argument("--positions", metavar="LIST", help="positions to decode, e.g. -1 or 0,3,-1 (default all)")
    p.add_argument(
        "--columns",
        type=positive_int,
        default=6,
        help="positions shown in the table, the last ones (default 6; the JSON and the report hold all)",
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message of the chat template")
    common(p)


def _cell(token: str, prob: float) -> str:
    return f"{token!r} {prob:.2f}"


STAGES = {"pre": "resid_pre", "mid": "resid_mid", "post": "resid_post"}


def _inputs(args) -> tuple[list[str], list[int] | None, list[int] | None]:
    """Stages, layers and positions of the command line (syntax only, before the model is loaded)."""
    kinds = []
    for s in split_list(args.stages):
        if s not in STAGES and s not in STAGES.values():
            raise CLIError(f"--stages {args.stages!r}: use pre, mid and/or post (e.g. post or pre,mid,post)")
        kinds.append(STAGES.get(s, s))
    layers = parse_layers(args.layers) if args.layers else None
    positions = parse_ints(args.positions, "positions") if args.positions not in (None, "") else None
    return kinds, layers, positions


def check(args, ctx) -> None:
    """A tokenizer for the prompt and the layers against the model (positions: when the prompt is read)."""
    _, layers, _ = _inputs(args)
    model = ctx.model()
    if model.tokenizer is None:
        raise CLIError("this model has no tokenizer, so it cannot read a text prompt")
    if layers is not None:
        check_indices(model, "layer", layers, param="layers", negative=True)


def run(args, ctx) -> Output:
    """Logit lens of one prompt: the top token (and probability) each layer's residual stream predicts
    (``analyses.logit_lens``, which checks layers and positions)."""
    from analyses import logit_lens

    check(args, ctx)
    kinds, layers, positions = _inputs(args)
    model = ctx.model()
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    res = logit_lens(
        model, prompt, args.target or None, k=max(args.top, 5), stages=kinds, layers=layers, positions=positions
    )
    data = {"command": "lens", "model": model_meta(model), "prompt": args.prompt, "lens": res.to_dict()}
    out = Output("lens", data, title="scalpel lens")
    shown = list(range(len(res.positions)))[-args.columns :]
    tokens, labels = res.str_tokens, res.target_labels or []
    headers = ["stage"] + [
        f"{res.positions[j]}:{tokens[res.positions[j]]!r}" if tokens else str(res.positions[j]) for j in shown
    ]
    rows = []
    for s, stage in enumerate(res.stages):
        row: list[Any] = [stage]
        for j in shown:
            toks, probs = res.top_tokens[s][j][: args.top], res.top_probs[s, j, : args.top]
            row.append(" ".join(_cell(t, float(p)) for t, p in zip(toks, probs)))
        if res.target_probs is not None and res.target_ranks is not None:
            for t in range(len(labels)):
                row += [float(res.target_probs[s, -1, t]), int(res.target_ranks[s, -1, t])]
        rows.append(row)
    for label in labels:
        headers += [f"p({label!r}) last", f"rank({label!r}) last"]
    out.table(
        f"logit lens: top-{args.top} token and probability per stage",
        headers,
        rows,
        note=f"{len(shown)} of {len(res.positions)} positions shown (--columns)"
        if len(shown) < len(res.positions)
        else "",
    )
    out.figure("logit lens: top-1 token and its probability", res.figure())
    for t, label in enumerate(labels):
        out.figure(f"logit lens: p({label!r})", res.figure(target=t))
    return out
