"""``scalpel heads``: head detector scores (previous-token, duplicate, induction), ranked."""

from __future__ import annotations

from _cli.context import model_meta
from _cli.inputs import CLIError, check_layers, parse_layers
from _cli.options import common, positive_int
from _cli.report import Output

HELP = "head detector scores (previous-token, duplicate, induction), ranked"
EXAMPLE = "scalpel heads --top 5"


def add_arguments(p) -> None:
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=20,
        help="length of the random token run; each sequence is [BOS] R R (default 20)",
    )
    p.add_argument("--n-seqs", type=positive_int, default=8, help="random sequences (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", metavar="LIST", help="layers to score (default all)")
    p.add_argument("--top", type=positive_int, default=10, help="rows per detector in the table (default 10)")
    common(p)


KINDS = ("previous_token", "duplicate_token", "induction")


def run(args, ctx) -> Output:
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
    data = {
        "command": "heads",
        "model": model_meta(model),
        "heads": res.to_dict(),
        "ranked": {
            kind: [
                {
                    "head": f"{r['layer']}.{r['head']}",
                    "layer": r["layer"],
                    "index": r["head"],
                    "kv_group": r["kv_group"],
                    "score": r[kind],
                }
                for r in ranked[kind]
            ]
            for kind in KINDS
        },
    }
    out = Output("heads", data, title="scalpel heads")
    table = []
    for rank in range(min(args.top, len(rows))):
        line = [rank + 1]
        for kind in KINDS:
            r = ranked[kind][rank]
            line += [f"{r['layer']}.{r['head']}", r[kind]]
        table.append(line)
    out.table(
        f"top {min(args.top, len(rows))} heads per detector ({res.n_seqs} random sequences repeated twice, "
        f"{args.seq_len} tokens, seed {args.seed}; score = mean attention to the expected position)",
        ["rank", "previous-token", "score", "duplicate", "score", "induction", "score"],
        table,
    )
    out.figure("head detector scores (layer x head)", res.figure())
    return out
