"""The ``scalpel`` commands backed by ``analyses``: lens, heads, patch.

Each calls one analysis function, puts the result's ``to_dict()`` in the JSON document, a readable
slice of it in a table, and its ``figure()`` in the report.

Example::

    from cli import Context, build_parser
    args = build_parser().parse_args(["lens", "The capital of France is", "--target", " Paris"])
    out = cmd_lens(args, Context("default"))
    out.data["lens"]["target_probs"][-1][-1]      # p(" Paris") at the last layer, last position
"""

from __future__ import annotations

from _cli_inputs import CLIError, check_layers, parse_layers
from _cli_report import Output


def _meta(model) -> dict:
    from cli import model_meta

    return model_meta(model)


def _ints(spec: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{flag} {spec!r}: expected comma-separated integers, e.g. 0,3,-1") from None


def _cell(token: str, prob: float) -> str:
    return f"{token!r} {prob:.2f}"


# --------------------------------------------------------------------------- lens
STAGES = {"pre": "resid_pre", "mid": "resid_mid", "post": "resid_post"}


def cmd_lens(args, ctx) -> Output:
    """Logit lens of one prompt: the top token (and probability) each layer's residual stream predicts."""
    from analyses import logit_lens

    kinds = []
    for s in args.stages.split(","):
        s = s.strip()
        if s not in STAGES and s not in STAGES.values():
            raise CLIError(f"--stages {args.stages!r}: use pre, mid and/or post (e.g. post or pre,mid,post)")
        kinds.append(STAGES.get(s, s))
    layers = parse_layers(args.layers) if args.layers else None
    positions = _ints(args.positions, "--positions") if args.positions else None
    model = ctx.model()
    if model.tokenizer is None:
        raise CLIError("this model has no tokenizer, so it cannot read a text prompt")
    if layers is not None:
        check_layers(model, layers)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    n_pos = model.tokenize(prompt)[0].shape[1]
    for p in positions or []:
        if not -n_pos <= p < n_pos:
            raise CLIError(f"--positions {p}: out of range; the prompt has {n_pos} tokens (0..{n_pos - 1} or -1..-{n_pos})")
    res = logit_lens(model, prompt, args.target or None, k=max(args.top, 5), stages=kinds, layers=layers,
                     positions=positions)
    data = {"command": "lens", "model": _meta(model), "prompt": args.prompt, "lens": res.to_dict()}
    out = Output("lens", data, title="scalpel lens")
    shown = list(range(len(res.positions)))[-args.columns:]
    headers = ["stage"] + [f"{res.positions[j]}:{res.str_tokens[res.positions[j]]!r}" if res.str_tokens
                           else str(res.positions[j]) for j in shown]
    rows = []
    for s, stage in enumerate(res.stages):
        row = [stage]
        for j in shown:
            toks, probs = res.top_tokens[s][j][:args.top], res.top_probs[s, j, :args.top]
            row.append(" ".join(_cell(t, float(p)) for t, p in zip(toks, probs)))
        if res.target_probs is not None:
            for t in range(len(res.target_labels)):
                row += [float(res.target_probs[s, -1, t]), int(res.target_ranks[s, -1, t])]
        rows.append(row)
    if res.target_probs is not None:
        for label in res.target_labels:
            headers += [f"p({label!r}) last", f"rank({label!r}) last"]
    out.table(f"logit lens: top-{args.top} token and probability per stage", headers, rows,
              note=f"{len(shown)} of {len(res.positions)} positions shown (--columns)" if len(shown) < len(res.positions) else "")
    out.figure("logit lens: top-1 token and its probability", res.figure())
    if res.target_probs is not None:
        for t, label in enumerate(res.target_labels):
            out.figure(f"logit lens: p({label!r})", res.figure(target=t))
    return out


# --------------------------------------------------------------------------- heads
KINDS = ("previous_token", "duplicate_token", "induction")


def cmd_heads(args, ctx) -> Output:
    """Previous-token, duplicate-token and induction scores of every head, ranked per detector."""
    from analyses import detect_heads

    if args.seq_len < 2:
        raise CLIError("--seq-len must be at least 2")
    layers = parse_layers(args.layers) if args.layers else None
    model = ctx.model()
    if layers is not None:
        check_layers(model, layers)
    res = detect_heads(model, seq_len=args.seq_len, n_seqs=args.n_seqs, seed=args.seed, layers=layers)
    rows = res.rows()
    ranked = {kind: sorted(rows, key=lambda r, k=kind: -r[k]) for kind in KINDS}
    data = {"command": "heads", "model": _meta(model), "heads": res.to_dict(),
            "ranked": {kind: [{"head": f"{r['layer']}.{r['head']}", "layer": r["layer"], "index": r["head"],
                               "kv_group": r["kv_group"], "score": r[kind]} for r in ranked[kind]] for kind in KINDS}}
    out = Output("heads", data, title="scalpel heads")
    table = []
    for rank in range(min(args.top, len(rows))):
        line = [rank + 1]
        for kind in KINDS:
            r = ranked[kind][rank]
            line += [f"{r['layer']}.{r['head']}", r[kind]]
        table.append(line)
    out.table(f"top {min(args.top, len(rows))} heads per detector ({res.n_seqs} random sequences repeated twice, "
              f"{args.seq_len} tokens, seed {args.seed}; score = mean attention to the expected position)",
              ["rank", "previous-token", "score", "duplicate", "score", "induction", "score"], table)
    out.figure("head detector scores (layer x head)", res.figure())
    return out


# --------------------------------------------------------------------------- patch
PATCH_METRICS = {"logit-diff": "logit_diff", "prob": "target_prob", "kl": "kl"}


def cmd_patch(args, ctx) -> Output:
    """Activation patching of each component x layer x position, clean into corrupted."""
    from analyses import activation_patching, get_component

    answers = args.answers
    if args.metric == "logit-diff" and (not answers or len(answers) != 2):
        raise CLIError("--metric logit-diff needs --answers CORRECT INCORRECT, e.g. --answers ' Mary' ' John'")
    if args.metric == "prob" and (not answers or len(answers) > 2):
        raise CLIError("--metric prob needs --answers CORRECT")
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    if not components:
        raise CLIError("--components is empty; e.g. resid_pre,attn_out,mlp_out")
    comps = [get_component(c) for c in components]  # unknown names: one-line error with the close ones
    layers = parse_layers(args.layers) if args.layers else None
    model = ctx.model()
    if model.tokenizer is None:
        raise CLIError("this model has no tokenizer, so it cannot read text prompts")
    if layers is not None:
        check_layers(model, layers)
    metric = PATCH_METRICS[args.metric]
    data = {"command": "patch", "model": _meta(model), "clean": args.clean, "corrupt": args.corrupt,
            "metric": args.metric, "answers": answers, "components": {}}
    out = Output("patch", data, title="scalpel patch")
    from _cli_ablate import progress

    for comp in progress(comps, total=len(comps), desc="components"):
        res = activation_patching(model, args.clean, args.corrupt, metric,
                                  answers=tuple(answers) if answers else None, component=comp, layers=layers)
        data["components"][comp.name] = res.to_dict()
        data.setdefault("clean_value", res.clean_value)
        data.setdefault("corrupted_value", res.corrupted_value)
        top = res.top_rows(args.top)
        keys = [k for k in top[0] if k not in ("effect",)] if top else []
        out.table(f"{comp.name}: top {len(top)} cells by |effect| (clean {res.clean_value:.4g}, "
                  f"corrupted {res.corrupted_value:.4g})", keys + ["effect"],
                  [[repr(r[k]) if k == "token" else r[k] for k in keys] + [r["effect"]] for r in top])
        out.figure(f"{comp.name}: normalised patching score (0 = corrupted, 1 = clean)", res.figure())
    return out
