"""``scalpel edit``: apply an edit plan (YAML/JSON) and export a verified checkpoint (HF or GGUF)."""

from __future__ import annotations

from _cli.context import model_meta
from _cli.inputs import CLIError
from _cli.options import common
from _cli.progress import task
from _cli.report import Output

HELP = "apply an edit plan (YAML/JSON) and export a verified checkpoint (HF or GGUF)"
EXAMPLE = "scalpel edit plan.yaml --out edited-smollm2"


def add_arguments(p) -> None:
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (a .gguf file with --format gguf)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf")
    p.add_argument("--gguf-dtype", choices=["f32", "f16"], default="f32")
    p.add_argument("--max-shard-size", default="2GB")
    common(p, report=False)


def run(args, ctx) -> Output:
    """Apply an edit plan and export a verified checkpoint (HF directory, or a GGUF file)."""
    import surgery

    plan = surgery.load_plan(args.plan)
    if not len(plan):
        raise CLIError(f"{args.plan} holds no edits")
    model = ctx.model()
    plan.validate(model)
    data = {"command": "edit", "model": model_meta(model), "edits": plan.to_dict(), "format": args.format}
    out = Output("edit", data)
    if args.format == "gguf":
        with task(f"exporting {args.out} (write, reload, compare)"):
            res = surgery.export_gguf(model, args.out, edits=plan, dtype=args.gguf_dtype, overwrite=args.overwrite)
        data["export"] = {
            "path": str(res.path),
            "dtype": res.dtype,
            "sha256": res.sha256,
            "max_abs_logit_diff": res.max_abs_logit_diff,
            "max_abs_logit_diff_unrounded": res.max_abs_logit_diff_unrounded,
            "tolerance": res.tolerance,
        }
        rows = [
            ["file", str(res.path)],
            ["dtype", res.dtype],
            ["sha256", res.sha256],
            ["reload max |logit diff|", res.max_abs_logit_diff],
            ["tolerance", res.tolerance],
        ]
        out.files.append(str(res.path))
    else:
        with task(f"exporting {args.out} (write, reload, compare)"):
            res = surgery.export(
                model, args.out, edits=plan, overwrite=args.overwrite, max_shard_size=args.max_shard_size
            )
        data["export"] = {
            "out_dir": str(res.out_dir),
            "files": res.files,
            "max_abs_logit_diff": res.max_abs_logit_diff,
            "tolerance": res.tolerance,
            "kl_to_base": res.kl_to_base,
        }
        rows = [
            ["directory", str(res.out_dir)],
            ["files", len(res.files)],
            ["reload max |logit diff|", res.max_abs_logit_diff],
            ["tolerance", res.tolerance],
            ["KL to base (probes)", res.kl_to_base],
        ]
        out.files.append(str(res.out_dir))
    out.table(f"applied {len(plan)} edit(s): " + ", ".join(e.kind for e in plan), ["", "value"], rows)
    return out
