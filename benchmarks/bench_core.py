"""Core speed benchmark: HookedLlama against HF (sdpa), TransformerLens 4.3 and nnsight 0.8.1.

One process, interleaved rounds (every case once per round, so drift hits all alike), medians,
ratios to HF's sdpa forward of the same shape. Writes a Markdown table (``--out``).

    python benchmarks/bench_core.py                       # default model, CPU fp32
    python benchmarks/bench_core.py --device cuda --dtype bfloat16 --shape llama-1b   # GPU, random 1B-shaped Llama
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hooks import HookedLlama  # noqa: E402


def build_model(args) -> HookedLlama:
    dtype = getattr(torch, args.dtype)
    if args.shape == "default":
        return HookedLlama.default(dtype=dtype, device=args.device)
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                          "rope_theta": 500000.0})
    return HookedLlama.from_config(config, seed=0, dtype=dtype).to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_rounds(cases: dict, rounds: int, device: str) -> dict[str, float]:
    for fn in cases.values():  # warm-up
        fn(); fn()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}


def peak_memory(fn, device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shape", default="default", choices=["default", "llama-1b"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gen-tokens", type=int, default=20)
    ap.add_argument("--no-interop", action="store_true", help="skip TransformerLens and nnsight")
    ap.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_model(args)
    hf = model.to_hf()
    tl = nn = None
    if not args.no_interop:
        with contextlib.suppress(ImportError):
            import transformer_lens

            tl = transformer_lens.TransformerBridge.boot_transformers(
                "smollm2-local", hf_model=model.to_hf(), tokenizer=model.tokenizer, dtype=model.dtype,
                device=args.device).eval()
            tl.cfg.default_prepend_bos = False
        with contextlib.suppress(ImportError):
            import nnsight

            nn = nnsight.TransformersModel(model.to_hf(), tokenizer=copy.deepcopy(model.tokenizer))

    lines = [f"### {args.shape} model, {args.device} {args.dtype}, {args.threads} thread(s), "
             f"{args.rounds} interleaved rounds, median ms",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
             "", "| shape | case | ms | × HF sdpa forward |", "|---|---|---|---|"]
    vocab = model.d_vocab
    for B, S in ((1, 16), (2, 32)):
        ids = torch.randint(0, vocab, (B, S), device=args.device)
        cases = {
            "HF sdpa forward": lambda: hf(ids),
            "HookedLlama forward, no hook": lambda: model(ids),
            "HookedLlama cache everything": lambda: model.run_with_cache(ids),
            "HookedLlama cache resid_post only": lambda: model.run_with_cache(ids, names_filter=lambda n: n.endswith("resid_post")),
        }
        if tl is not None:
            cases["TransformerLens forward"] = lambda: tl(ids)
            cases["TransformerLens run_with_cache (all)"] = lambda: tl.run_with_cache(ids)
        if nn is not None:
            def nn_forward():
                with nn.trace(ids):
                    nn.output.logits.save()

            def nn_cache():
                with nn.trace(ids) as tracer:
                    tracer.cache()
            cases["nnsight trace forward"] = nn_forward
            cases["nnsight trace cache (all modules)"] = nn_cache
        with torch.no_grad():
            res = run_rounds(cases, args.rounds, args.device)
        base = res["HF sdpa forward"]
        for name, ms in res.items():
            lines.append(f"| b{B}×s{S} | {name} | {ms:.1f} | {ms / base:.2f} |")
        with torch.no_grad():
            mem = {name: peak_memory(cases[name], args.device) for name in
                   ("HF sdpa forward", "HookedLlama forward, no hook", "HookedLlama cache everything")}
            _, cache = model.run_with_cache(ids)
        cached_mib = cache.nbytes / 2**20
        if mem["HF sdpa forward"] is not None:
            lines.append(f"| b{B}×s{S} | peak MiB: HF {mem['HF sdpa forward']:.0f}, no hook "
                         f"{mem['HookedLlama forward, no hook']:.0f}, cache-all {mem['HookedLlama cache everything']:.0f} "
                         f"(cached bytes {cached_mib:.0f}) | | |")
        else:
            lines.append(f"| b{B}×s{S} | cache-everything holds {cached_mib:.1f} MiB in {len(cache)} tensors | | |")

    # greedy generation, per token
    n = args.gen_tokens
    prompt = torch.randint(0, vocab, (1, 16), device=args.device)
    hook = ("blocks.0.hook_mlp_out", lambda t, hook: t * 0.5)  # `hook=` keyword: TransformerLens passes it so
    gen_cases = {
        "HF generate": lambda: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           pad_token_id=0),
        "HookedLlama generate, no hook": lambda: model.generate(prompt, n, stop_at_eos=False),
    }

    def ours_hooked():
        with model.hooks(fwd_hooks=[hook]):
            model.generate(prompt, n, stop_at_eos=False)
    gen_cases["HookedLlama generate, 1 hook"] = ours_hooked
    if tl is not None:
        def tl_hooked():
            with tl.hooks(fwd_hooks=[hook]):
                tl.generate(prompt, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False)
        gen_cases["TransformerLens generate, 1 hook"] = tl_hooked
    if nn is not None:
        def nn_hooked():
            with nn.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0) as tracer:
                for _ in tracer.iter[:n]:
                    nn.model.layers[0].mlp.output[:] = nn.model.layers[0].mlp.output * 0.5
        gen_cases["nnsight generate, 1 intervention"] = nn_hooked
    with torch.no_grad():
        res = run_rounds(gen_cases, max(3, args.rounds // 3), args.device)
    base = res["HF generate"]
    lines += ["", f"Greedy generation, 16-token prompt, {n} new tokens (ms per token):", "",
              "| case | ms/token | × HF generate |", "|---|---|---|"]
    for name, ms in res.items():
        lines.append(f"| {name} | {ms / n:.1f} | {ms / base:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
