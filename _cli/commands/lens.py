"""``scalpel lens``: logit lens, what each layer's residual stream predicts."""

from __future__ import annotations

from _cli.context import model_meta
from _cli.inputs import CLIError, check_layers, parse_ints, parse_layers
from _cli.options import common, positive_int
from _cli.report import Output

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


def run(args, ctx) -> Output:
    """Logit lens of one prompt: the top token (and probability) each layer's residual stream predicts."""
    from analyses import logit_lens

    kinds = []
    for s in args.stages.split(","):
        s = s.strip()
        if s not in STAGES and s not in STAGES.values():
            raise CLIError(f"--stages {args.stages!r}: use pre, mid and/or post (e.g. post or pre,mid,post)")
        kinds.append(STAGES.get(s, s))
    layers = parse_layers(args.layers) if args.layers else None
    positions = parse_ints(args.positions, "--positions") if args.positions else None
    model = ctx.model()
    if model.tokenizer is None:
        raise CLIError("this model has no tokenizer, so it cannot read a text prompt")
    if layers is not None:
        check_layers(model, layers)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    n_pos = model.tokenize(prompt)[0].shape[1]
    for p in positions or []:
        if not -n_pos <= p < n_pos:
            raise CLIError(
                f"--positions {p}: out of range; the prompt has {n_pos} tokens (0..{n_pos - 1} or -1..-{n_pos})"
            )
    res = logit_lens(
        model, prompt, args.target or None, k=max(args.top, 5), stages=kinds, layers=layers, positions=positions
    )
    data = {"command": "lens", "model": model_meta(model), "prompt": args.prompt, "lens": res.to_dict()}
    out = Output("lens", data, title="scalpel lens")
    shown = list(range(len(res.positions)))[-args.columns :]
    headers = ["stage"] + [
        f"{res.positions[j]}:{res.str_tokens[res.positions[j]]!r}" if res.str_tokens else str(res.positions[j])
        for j in shown
    ]
    rows = []
    for s, stage in enumerate(res.stages):
        row = [stage]
        for j in shown:
            toks, probs = res.top_tokens[s][j][: args.top], res.top_probs[s, j, : args.top]
            row.append(" ".join(_cell(t, float(p)) for t, p in zip(toks, probs)))
        if res.target_probs is not None:
            for t in range(len(res.target_labels)):
                row += [float(res.target_probs[s, -1, t]), int(res.target_ranks[s, -1, t])]
        rows.append(row)
    if res.target_probs is not None:
        for label in res.target_labels:
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
    if res.target_probs is not None:
        for t, label in enumerate(res.target_labels):
            out.figure(f"logit lens: p({label!r})", res.figure(target=t))
    return out
