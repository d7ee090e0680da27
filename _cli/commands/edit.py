"""``scalpel edit``: apply an edit plan (YAML/JSON) and export a verified checkpoint (HF or GGUF)."""

from __future__ import annotations

from pathlib import Path

from _cli.context import model_meta
from _cli.inputs import CLIError
from _cli.options import common
from _cli.progress import task
from _cli.report import Output

PARAMS = {"path": "plan"}  # surgery.load_plan(path) reads the PLAN argument
HELP = "apply an edit plan (YAML/JSON) and export a verified checkpoint (HF or GGUF)"
EXAMPLE = "scalpel edit plan.yaml --out edited-smollm2"


def add_arguments(p) -> None:
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (a .gguf file with --format gguf)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf")
    p.add_argument("--gguf-dtype", choices=["f32", "f16"], default="f32")
    p.add_argument(
        "--gguf-quant",
        metavar="TYPES",
        help="with --format gguf: also quantise the file with llama.cpp into TYPES (comma-separated: Q8_0, Q6_K, "
        "Q5_K_M, Q4_K_M …), each run in llama.cpp and checked against the model (the [llamacpp] extra)",
    )
    p.add_argument(
        "--gguf-quant-dir",
        metavar="DIR",
        help="where the quantised files and their manifest go (default: beside --out, named after it: smol-gguf/ "
        "for smol.f16.gguf)",
    )
    p.add_argument("--max-shard-size", default="2GB")
    common(p, report=False)


def quant_dir(args) -> Path | None:
    """The directory of ``--gguf-quant``'s files: ``--gguf-quant-dir``, else ``<stem>-gguf`` beside ``--out``
    (``stem``: the file name without ``.gguf`` and a trailing ``.f16`` / ``.f32``)."""
    if not getattr(args, "gguf_quant", None):
        return None
    if args.gguf_quant_dir:
        return Path(args.gguf_quant_dir).expanduser()
    out = Path(args.out).expanduser()
    stem = out.name.removesuffix(".gguf")
    for suffix in (".f16", ".f32", "-f16", "-f32", "-F16", "-F32"):
        stem = stem.removesuffix(suffix)
    return out.parent / f"{stem}-gguf"


def outputs(args) -> list:
    """``--out`` and, with ``--gguf-quant``, the quantised files' directory (checked before any work)."""
    from _cli.commands import default_outputs
    from _core.writer import Output as Written

    found = default_outputs(args)
    qdir = quant_dir(args)
    if qdir is not None:
        shown = f"--gguf-quant-dir {qdir}" if args.gguf_quant_dir else str(qdir)
        found.append(Written(qdir, kind="gguf-quants", overwrite=bool(args.overwrite), param="out_dir", shown=shown))
    return found


def _plan(args):
    import surgery

    plan = surgery.load_plan(args.plan)
    if not len(plan):
        raise CLIError(f"{args.plan} holds no edits")
    return plan


def _check_quant(args) -> list[str]:
    """``--gguf-quant``'s types (checked) and llama.cpp's presence, before any work."""
    if not getattr(args, "gguf_quant", None):
        return []
    from surgery.llamacpp import check_quant_types, require_llamacpp

    try:
        types = check_quant_types(args.gguf_quant.split(","))
        require_llamacpp()
    except Exception as exc:  # one line naming the flag
        raise CLIError(f"--gguf-quant {args.gguf_quant}: {exc}") from None
    return types


def check(args, ctx) -> None:
    """The plan against the model (applied and undone); ``--gguf-quant``'s types and llama.cpp's presence."""
    _check_quant(args)
    _plan(args).validate(ctx.model())


def run(args, ctx) -> Output:
    """Apply an edit plan and export a verified checkpoint (HF directory, or a GGUF file); the export
    applies the plan once, after checking every edit."""
    import surgery

    types = _check_quant(args)
    plan = _plan(args)
    model = ctx.model()
    data = {"command": "edit", "model": model_meta(model), "edits": plan.to_dict(), "format": args.format}
    out = Output("edit", data)
    if args.format == "gguf":
        with task(f"exporting {args.out} (write, reload, compare)"):
            gg = surgery.export_gguf(model, args.out, edits=plan, dtype=args.gguf_dtype, overwrite=args.overwrite)
        data["export"] = {
            "path": str(gg.path),
            "dtype": gg.dtype,
            "sha256": gg.sha256,
            "max_abs_logit_diff": gg.max_abs_logit_diff,
            "max_abs_logit_diff_unrounded": gg.max_abs_logit_diff_unrounded,
            "tolerance": gg.tolerance,
        }
        rows: list[list] = [
            ["file", str(gg.path)],
            ["dtype", gg.dtype],
            ["sha256", gg.sha256],
            ["reload max |logit diff|", gg.max_abs_logit_diff],
            ["tolerance", gg.tolerance],
        ]
        out.files.append(str(gg.path))
        qdir = quant_dir(args)
        if qdir is not None:
            with task(f"quantising {gg.path.name} with llama.cpp ({args.gguf_quant}), each file checked in llama.cpp"):
                q = surgery.quantize_gguf(gg.path, qdir, types, model=model, edits=plan, overwrite=args.overwrite)
            data["quantized"] = {"out_dir": str(q.out_dir), "reference": q.reference, "rows": q.rows()}
            out.table(
                f"llama.cpp runs (vs the edited model, {q.source_check.n_positions} probe positions)",
                ["file", "bytes", "top-1 agreement", "mean KL", "max KL"],
                [[r["file"], r.get("bytes"), r["top1_agreement"], r["kl_mean"], r["kl_max"]] for r in q.rows()],
            )
            out.files.append(str(q.out_dir))
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
