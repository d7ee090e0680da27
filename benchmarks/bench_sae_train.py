"""Train a TopK SAE on a middle-layer residual of the default model within a CPU time budget, then
measure it: fraction of variance explained, L0 and CE-loss recovered on held-out texts.

Texts: paragraphs of the Python standard library's docstrings (English technical prose, on every
machine with Python, no download); every 10th paragraph is held out for the evaluation.

    python benchmarks/bench_sae_train.py --out /tmp/sae-bench     # prints a JSON line of numbers
    python benchmarks/bench_sae_train.py --device cuda --dtype bfloat16 --steps 2000   # one GPU (gpu_check.sh)
    python benchmarks/bench_sae_train.py --transcoder --architecture jumprelu           # an MLP transcoder
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analyses.saes import sae_metrics, train_sae  # noqa: E402
from hooks import HookedLlama  # noqa: E402


def stdlib_paragraphs(limit: int) -> list[str]:
    """Docstring paragraphs (>= 120 characters) of the standard library, in a fixed order."""
    out: list[str] = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for para in (doc or "").split("\n\n"):
                    para = " ".join(para.split())
                    if len(para) >= 120 and ">>>" not in para:
                        out.append(para)
                        if len(out) >= limit:
                            return out
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/sae-bench")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--texts", type=int, default=1100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="the model's dtype (default: the checkpoint's)")
    ap.add_argument("--architecture", default="topk", choices=["topk", "jumprelu"])
    ap.add_argument("--l0-coef", type=float, default=2e-3)
    ap.add_argument("--transcoder", action="store_true", help="the layer's MLP transcoder instead of a residual SAE")
    ap.add_argument("--cache-to-disk", action="store_true", help="harvest once to <out>.acts and train from it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = HookedLlama.default(device=args.device, dtype=args.dtype)
    paras = stdlib_paragraphs(args.texts)
    train = [p for i, p in enumerate(paras) if i % 10]
    held = [p for i, p in enumerate(paras) if i % 10 == 0]
    hook = f"blocks.{args.layer}.hook_resid_post"
    out_hook = None
    if args.transcoder:
        hook, out_hook = f"blocks.{args.layer}.ln2.hook_normalized", f"blocks.{args.layer}.hook_mlp_out"
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    t_start = time.time()
    res = train_sae(
        model,
        hook,
        train,
        args.out,
        hook_name_out=out_hook,
        architecture=args.architecture,
        l0_coef=args.l0_coef,
        cache_to_disk=args.cache_to_disk,
        expansion=args.expansion,
        k=args.k,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_tokens=args.max_tokens,
        overwrite=True,
    )
    sync()
    t_train = time.time() - t0
    t_loop = time.time() - t_start
    m = sae_metrics(model, res.sae, held, max_tokens=args.max_tokens)
    inl = sae_metrics(model, res.sae, held, max_tokens=args.max_tokens, outlier_ratio=10.0)
    total = time.time() - t0
    print(
        json.dumps(
            {
                "hook": hook if out_hook is None else f"{hook} -> {out_hook}",
                "architecture": args.architecture,
                "device": str(model.device),
                "dtype": str(model.dtype).removeprefix("torch."),
                "amp": model.device.type == "cuda",
                "d_sae": res.sae.d_sae,
                "k": args.k,
                "steps": res.steps,
                "train_texts": len(train),
                "heldout_texts": len(held),
                "heldout_tokens": m.n_tokens,
                "fve": round(m.fve, 4),
                "fve_without_outliers": round(inl.fve, 4),
                "outlier_tokens": m.n_tokens - inl.n_tokens,
                "l0": m.l0,
                "ce_clean": round(m.ce_clean, 4),
                "ce_spliced": round(m.ce_spliced, 4),
                "ce_zero": round(m.ce_zero, 4),
                "ce_recovered": round(m.ce_recovered, 4),
                "kl": round(m.kl, 4),
                "ce_recovered_without_outliers": round(inl.ce_recovered, 4),
                "dead": m.dead,
                "seconds_to_trained": round(t_train),
                "train_tokens_per_s": round(res.tokens / t_loop),
                "padding": res.stats["padding"],
                "harvested_tokens": res.stats["kept"],
                "cache_to_disk": args.cache_to_disk,
                "seconds_total": round(total),
            }
        )
    )


if __name__ == "__main__":
    main()
