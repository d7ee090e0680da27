"""Benchmark: the IOI resid_pre activation-patching sweep (30 layers × 14 positions = 420 patches) on
SmolLM2-135M, CPU fp32, against TransformerLens and plain Hugging Face hooks; plus attribution patching
in forward-equivalents.

Methods, run interleaved (each round runs every method once, in a rotated order, so background load
hits all of them alike); the median over rounds is reported:

- ``ours``: ``analyses.activation_patching(component="resid_pre")`` (batched engine, default settings),
  including its clean and corrupted forwards;
- ``ours_tl_metric``: the same sweep with a TransformerLens-style metric callable
  (``lambda logits: logits[0, -1, mary] - logits[0, -1, john]``) instead of ``answers=``: the engine
  detects that it reads only the last position and unembeds that position alone;
- ``ours_no_prefix``: the same with ``reuse_prefix=False`` (every position recomputed, no skipped
  no-op patches): shows what batching + starting at the patched layer alone gives;
- ``tl``: TransformerLens 4.3 ``patching.get_act_patch_resid_pre`` on a ``TransformerBridge`` booted from
  the same weights (420 forwards; needs the interop extra);
- ``hf_batched``: a ``LlamaForCausalLM`` with a forward pre-hook on decoder layer L that patches row j at
  position j: 30 forwards of batch 14;
- ``hf_naive`` (``--naive``): one HF forward per patch with a pre-hook (420 forwards).

Every method's 30 × 14 grid is compared with ours (max abs difference).

Usage::

    python benchmarks/bench_patching.py                 # 2 rounds, 1 thread
    python benchmarks/bench_patching.py --rounds 3 --naive --json out.json
    python benchmarks/bench_patching.py --quick         # ours and hf_batched only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens draws a progress bar per sweep

import torch  # noqa: E402

from analyses import activation_patching, attribution_patching, logit_diff  # noqa: E402
from hooks import HookedLlama  # noqa: E402

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def run_ours(model, **kwargs):
    return activation_patching(
        model, CLEAN, CORRUPT, answers=(" Mary", " John"), component="resid_pre", **kwargs
    ).values


def run_ours_tl_metric(model):
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    return activation_patching(model, CLEAN, CORRUPT, metric, component="resid_pre").values


def make_tl(model):
    import transformer_lens as tl
    import transformer_lens.patching as tl_patching

    bridge = tl.TransformerBridge.boot_transformers(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        hf_model=model.to_hf(),
        tokenizer=model.tokenizer,
        dtype=torch.float32,
        device="cpu",
    )
    bridge.cfg.default_prepend_bos = False
    bridge.eval()
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    def run():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(clean)
            return tl_patching.get_act_patch_resid_pre(bridge, corrupt, cache, metric).cpu()

    return run


def _patcher(clean_resid: torch.Tensor, positions: list[int]):
    """Forward pre-hook for an HF decoder layer: row j gets the clean residual at ``positions[j]``."""

    def pre_hook(module, args, kwargs):
        by_kw = "hidden_states" in kwargs
        x = (kwargs["hidden_states"] if by_kw else args[0]).clone()
        for j, p in enumerate(positions):
            x[j, p] = clean_resid[0, p]
        if by_kw:
            return args, {**kwargs, "hidden_states": x}
        return (x,) + tuple(args[1:]), kwargs

    return pre_hook


def make_hf(model, batched: bool):
    hf = model.to_hf().eval()  # its own LlamaForCausalLM object (TL wraps the one it is given in place)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    P, n = clean.shape[1], len(hf.model.layers)

    def patched(layer, resid, positions, tokens):
        handle = hf.model.layers[layer].register_forward_pre_hook(_patcher(resid, positions), with_kwargs=True)
        try:
            logits = hf(tokens).logits[:, -1]
        finally:
            handle.remove()
        return logits[:, mary] - logits[:, john]

    def run():
        out = torch.zeros(n, P)
        with torch.no_grad():
            hidden = hf(clean, output_hidden_states=True).hidden_states  # hidden[L] enters layer L
            for layer in range(n):
                if batched:  # one forward per layer, row j patched at position j
                    out[layer] = patched(layer, hidden[layer], list(range(P)), corrupt.expand(P, -1))
                else:  # one forward per patch
                    for p in range(P):
                        out[layer, p] = patched(layer, hidden[layer], [p], corrupt)[0]
        return out

    return run


def attribution_cost(model, rounds: int) -> dict:
    """Attribution patching (4 and all 12 components) in forward-equivalents, median over rounds."""
    ids = model.to_tokens(CLEAN)
    every = [
        "resid_pre",
        "resid_mid",
        "resid_post",
        "attn_out",
        "mlp_out",
        "z",
        "result",
        "q",
        "k",
        "v",
        "pattern",
        "neurons",
    ]
    fwd, four, all12 = [], [], []
    for _ in range(rounds):
        with torch.no_grad():
            t = time.perf_counter()
            model(ids)
            fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        attribution_patching(model, CLEAN, CORRUPT, answers=(" Mary", " John"))
        four.append(time.perf_counter() - t)
        t = time.perf_counter()
        attribution_patching(model, CLEAN, CORRUPT, answers=(" Mary", " John"), components=every)
        all12.append(time.perf_counter() - t)
    f = statistics.median(fwd)
    return {
        "forward_s": f,
        "attr_4_components_s": statistics.median(four),
        "attr_4_components_fwd_equiv": statistics.median(four) / f,
        "attr_all_12_components_s": statistics.median(all12),
        "attr_all_12_components_fwd_equiv": statistics.median(all12) / f,
    }


def correlations(model) -> dict:
    """Pearson correlation of attribution and activation patching over each component's IOI sweep."""
    answers = (" Mary", " John")
    attr = attribution_patching(model, CLEAN, CORRUPT, answers=answers)
    out = {}
    for comp in ("resid_pre", "attn_out", "mlp_out", "z"):
        act = activation_patching(model, CLEAN, CORRUPT, answers=answers, component=comp)
        out[comp] = float(torch.corrcoef(torch.stack([act.effect.flatten(), attr[comp].effect.flatten()]))[0, 1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--quick", action="store_true", help="skip TransformerLens and the naive loop")
    ap.add_argument("--naive", action="store_true", help="also time one HF forward per patch (420 forwards)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = HookedLlama.default()
    methods = {
        "ours": lambda: run_ours(model),
        "ours_tl_metric": lambda: run_ours_tl_metric(model),
        "ours_no_prefix": lambda: run_ours(model, reuse_prefix=False),
        "hf_batched": make_hf(model, batched=True),
    }
    if not args.quick:
        try:
            methods["tl"] = make_tl(model)
        except ImportError:
            print("transformer_lens is not installed; skipping it (pip install -e .[interop])")
        if args.naive:
            methods["hf_naive"] = make_hf(model, batched=False)
    names = list(methods)
    times = {n: [] for n in names}
    grids = {}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            grids[name] = methods[name]()
            times[name].append(time.perf_counter() - t)
            print(f"round {r + 1}: {name:15s} {times[name][-1]:8.2f} s", flush=True)
    ref = grids["ours"]
    report = {"threads": args.threads, "rounds": args.rounds, "patches": int(ref.numel()), "methods": {}}
    ours = statistics.median(times["ours"])
    for name in names:
        med = statistics.median(times[name])
        report["methods"][name] = {
            "median_s": med,
            "all_s": times[name],
            "speedup_of_ours": med / ours,
            "max_abs_diff_vs_ours": float((grids[name].float() - ref).abs().max()),
        }
    report["attribution"] = attribution_cost(model, max(3, args.rounds))
    report["attribution_vs_activation_pearson"] = correlations(model)
    metric = logit_diff(model, " Mary", " John")
    with torch.no_grad():
        report["clean_logit_diff"] = float(metric(model(CLEAN)))
        report["corrupted_logit_diff"] = float(metric(model(CORRUPT)))
    print()
    print(f"{'method':15s} {'median s':>9s} {'ours is ×':>10s} {'max |Δ| vs ours':>16s}")
    for name, row in report["methods"].items():
        print(f"{name:15s} {row['median_s']:9.2f} {row['speedup_of_ours']:10.1f} {row['max_abs_diff_vs_ours']:16.2e}")
    a = report["attribution"]
    print(
        f"attribution patching: 4 components {a['attr_4_components_fwd_equiv']:.2f} forward-equivalents, "
        f"all 12 {a['attr_all_12_components_fwd_equiv']:.2f} (one forward {a['forward_s'] * 1e3:.0f} ms)"
    )
    print(
        "attribution vs activation patching (Pearson):",
        ", ".join(f"{k} {v:.3f}" for k, v in report["attribution_vs_activation_pearson"].items()),
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
