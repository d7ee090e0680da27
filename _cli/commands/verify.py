"""``scalpel verify``: check an exported checkpoint: file hashes and reload parity."""

from __future__ import annotations

from _cli.options import common
from _cli.report import Output

PARAMS = {"out_dir": "dir"}  # surgery.verify(out_dir) checks DIR
HELP = "check an exported checkpoint: file hashes and reload parity"
EXAMPLE = "scalpel verify edited-smollm2"


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--no-reload", action="store_true", help="check the hashes only")
    common(p, model=False, report=False)


def run(args, ctx) -> Output:
    """Re-check an exported checkpoint: sha256 of every file, then reload parity with transformers."""
    import surgery

    res = surgery.verify(args.dir, reload=not args.no_reload)
    data = {"command": "verify", **{k: v for k, v in res.items()}}
    out = Output("verify", data)
    rows = [
        ["directory", res.get("out_dir", args.dir)],
        ["ok", bool(res.get("ok"))],
        ["files checked (sha256)", res.get("files_checked")],
    ]
    rows.append(["manifest version", res.get("manifest_version")])
    if res.get("note"):
        rows.append(["note", res["note"]])
    if "max_abs_logit_diff" in res:
        rows += [
            ["reload max |logit diff|", res["max_abs_logit_diff"]],
            ["tolerance", res["tolerance"]],
            ["top-5 tokens match", bool(res.get("top5_match"))],
        ]
    out.table("verified", ["", "value"], rows)
    return out
