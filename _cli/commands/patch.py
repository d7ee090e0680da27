"""``scalpel patch``: activation patching over components x positions (clean vs corrupted prompt)."""

from __future__ import annotations

from _cli.context import model_meta
from _cli.inputs import CLIError, split_list
from _cli.options import common, positive_int
from _cli.progress import track
from _cli.report import Output
from hooks.indices import check_indices, parse_layers

HELP = "activation patching over components x positions (clean vs corrupted prompt)"
EXAMPLE = (
    "scalpel patch --clean 'When Mary and John went to the store, John gave a drink to' "
    "--corrupt 'When Mary and John went to the store, Mary gave a drink to' --answers ' Mary' ' John'"
)


def add_arguments(p) -> None:
    p.add_argument("--clean", required=True, metavar="TEXT")
    p.add_argument("--corrupt", required=True, metavar="TEXT")
    p.add_argument("--metric", choices=["logit-diff", "prob", "kl"], default="logit-diff")
    p.add_argument("--answers", nargs="+", metavar="ANSWER", help="CORRECT [INCORRECT], e.g. ' Mary' ' John'")
    p.add_argument(
        "--components",
        default="resid_pre,attn_out,mlp_out",
        metavar="LIST",
        help="components to patch (default resid_pre,attn_out,mlp_out; also resid_mid, resid_post, z, "
        "q, k, v, pattern, neurons)",
    )
    p.add_argument("--layers", metavar="LIST", help="layers to patch, e.g. 0-9 (default all)")
    p.add_argument("--top", type=positive_int, default=10, help="cells per component in the table (default 10)")
    common(p)


PATCH_METRICS = {"logit-diff": "logit_diff", "prob": "target_prob", "kl": "kl"}


def _inputs(args) -> tuple[list, list[int] | None]:
    """The components and layers of the command line (syntax only, before the model is loaded)."""
    from analyses import get_component

    answers = args.answers
    if args.metric == "logit-diff" and (not answers or len(answers) != 2):
        raise CLIError("--metric logit-diff needs --answers CORRECT INCORRECT, e.g. --answers ' Mary' ' John'")
    if args.metric == "prob" and (not answers or len(answers) > 2):
        raise CLIError("--metric prob needs --answers CORRECT")
    components = split_list(args.components)
    if not components:
        raise CLIError("--components is empty; e.g. resid_pre,attn_out,mlp_out")
    comps = [get_component(c) for c in components]  # unknown names: one-line error with the close ones
    return comps, parse_layers(args.layers) if args.layers else None


def check(args, ctx) -> None:
    """Every input against the model: the layers in range, a tokenizer for the prompts."""
    _, layers = _inputs(args)
    model = ctx.model()
    if model.tokenizer is None:
        raise CLIError("this model has no tokenizer, so it cannot read text prompts")
    if layers is not None:
        check_indices(model, "layer", layers, param="layers", negative=True)


def run(args, ctx) -> Output:
    """Activation patching of each component x layer x position, clean into corrupted
    (``analyses.activation_patching``, which checks the layers)."""
    from analyses import activation_patching

    check(args, ctx)
    comps, layers = _inputs(args)
    answers = args.answers
    model = ctx.model()
    metric = PATCH_METRICS[args.metric]
    data = {
        "command": "patch",
        "model": model_meta(model),
        "clean": args.clean,
        "corrupt": args.corrupt,
        "metric": args.metric,
        "answers": answers,
        "components": {},
    }
    out = Output("patch", data, title="scalpel patch")
    for comp in track(comps, "patching components"):
        res = activation_patching(
            model,
            args.clean,
            args.corrupt,
            metric,
            answers=tuple(answers) if answers else None,
            component=comp,
            layers=layers,
        )
        data["components"][comp.name] = res.to_dict()
        data.setdefault("clean_value", res.clean_value)
        data.setdefault("corrupted_value", res.corrupted_value)
        top = res.top_rows(args.top)
        keys = [k for k in top[0] if k not in ("effect",)] if top else []
        out.table(
            f"{comp.name}: top {len(top)} cells by |effect| (clean {res.clean_value:.4g}, "
            f"corrupted {res.corrupted_value:.4g})",
            keys + ["effect"],
            [[repr(r[k]) if k == "token" else r[k] for k in keys] + [r["effect"]] for r in top],
        )
        out.figure(f"{comp.name}: normalised patching score (0 = corrupted, 1 = clean)", res.figure())
    return out
