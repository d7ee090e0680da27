"""``scalpel heads``: head detector scores (previous-token, duplicate, induction), ranked."""

from __future__ import annotations

from typing import Any

from _cli.context import model_meta
from _cli.inputs import CLIError
from _cli.options import common, positive_int
from _cli.report import Output
from hooks.indices import check_indices, parse_layers

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


def _layers(args) -> list[int] | None:
    if args.seq_len < 2:
        raise CLIError("--seq-len must be at least 2")
    return parse_layers(args.layers) if args.layers else None


def check(args, ctx) -> None:
    """The layers against the model."""
    layers = _layers(args)
    if layers is not None:
        check_indices(ctx.model(), "layer", layers, param="layers", negative=True)


def run(args, ctx) -> Output:
    """Previous-token, duplicate-token and induction scores of every head, ranked per detector
    (``analyses.detect_heads``, which checks the layers)."""
    from analyses import detect_heads

    layers = _layers(args)
    model = ctx.model()
    res = detect_heads(model, seq_len=args.seq_len, n_seqs=args.n_seqs, seed=args.seed, layers=layers)
    rows = res.rows()
    ranked = {kind: sorted(rows, key=lambda r: -r[kind]) for kind in KINDS}
    data = {
        "command": "heads",
        "model": model_meta(model),
        "heads": res.to_dict(),
        "ranked": {
            kind: [
                {
                    "head": f"L{r['layer']}H{r['head']}",
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
        line: list[Any] = [rank + 1]
        for kind in KINDS:
            r = ranked[kind][rank]
            line += [f"L{r['layer']}H{r['head']}", r[kind]]
        table.append(line)
    out.table(
        f"top {min(args.top, len(rows))} heads per detector ({res.n_seqs} random sequences repeated twice, "
        f"{args.seq_len} tokens, seed {args.seed}; score = mean attention to the expected position)",
        ["rank", "previous-token", "score", "duplicate", "score", "induction", "score"],
        table,
    )
    out.figure("head detector scores (layer x head)", res.figure())
    out.figure(*_pattern_view(model, args, res))
    return out


def _pattern_view(model, args, res) -> tuple[str, Any]:
    """The attention patterns of the best head of each detector on the first sequence (the viewer)."""
    from analyses import attention_patterns, repeated_random_tokens

    tokens = repeated_random_tokens(model, args.seq_len, args.n_seqs, args.seed)[:1]
    best: dict[tuple[int, int], list[str]] = {}
    for kind in KINDS:
        ref = res.top(kind, 1)[0]
        best.setdefault((ref.layer, ref.head), []).append(kind.replace("_", "-"))
    view = attention_patterns(model, tokens, heads=list(best))
    names = ", ".join(f"{label} ({', '.join(kinds)})" for label, kinds in zip(view.labels, best.values()))
    return f"attention patterns on the first sequence, the best head of each detector: {names}", view
