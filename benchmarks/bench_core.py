"""Core speed and memory benchmark at the shapes interpretability work uses.

HookedLlama against Hugging Face (sdpa; eager with hidden states and attentions), TransformerLens 4.3
and nnsight 0.8.1. One command writes every table::

    python benchmarks/bench_core.py --out benchmarks/shapes.md                 # default model, CPU fp32
    python benchmarks/bench_core.py --quick                                    # smoke run (~3 min)
    python benchmarks/bench_core.py --device cuda --dtype bfloat16 --model llama-1b --out gpu.md
    python benchmarks/bench_core.py --keep-freed-memory        # glibc keeps freed memory (docs/hooks.md)

Method: each speed table is one process that runs every case once per round (the order rotated
each round), so background load hits all cases alike; the ratio of a case is the median over rounds
of its time divided by the baseline's time *in the same round* (paired ratios), and ms columns are
medians. A second ratio uses the process's CPU time (user + system, all threads) instead of wall
time: on a machine shared with other work it is the steadier of the two. Peak memory (CPU) is measured in a fresh child process per case: the peak resident set
after the case minus the peak after one no-cache forward, so it is what the case adds on top of a
plain forward; "held" is what the returned objects keep alive, each storage counted once. On CUDA
the same quantities come from the allocator's peak statistics, in the table's process.

Tables: one per shape (b1×s64, b8×s256, b1×s1024; ``--shapes`` to choose) and one for workflows
(IOI patching sweep with ``answers=`` and with a TransformerLens-style metric callable, attribution
patching, greedy generation with and without a hook). Interop comparators are skipped when their
packages are missing (``--no-interop`` skips them outright). Runtime on a quiet 2-core CPU: about
10 minutes for all three shapes with the interop comparators.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

SHAPES = {"b1xs64": (1, 64), "b8xs256": (8, 256), "b1xs1024": (1, 1024)}
QUICK_SHAPES = {"b1xs16": (1, 16), "b2xs32": (2, 32)}
ROUNDS = {(1, 64): 11, (8, 256): 4, (1, 1024): 4}  # sized for ~10 min in all on a quiet 2-core CPU
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
BASE = "HF sdpa forward"
# cases measured for memory (the no-cache forward is the reference each is measured over)
MEMORY_CASES = [
    "HookedLlama cache everything",
    "HookedLlama cache residual stream",
    "HookedLlama cache patterns",
    "HookedLlama no-op hook on every point",
    "HF sdpa forward",
    "HF eager + hidden states + attentions",
    "TransformerLens run_with_cache",
    "nnsight cache (all modules)",
]


# ---------------------------------------------------------------------------------------- models
class Bench:
    """The models of one run, built on first use (a memory child builds only what its case needs)."""

    def __init__(self, args) -> None:
        import torch

        sys.path.insert(0, str(ROOT))
        from hooks import HookedLlama

        self.args, self.torch = args, torch
        self.dtype = getattr(torch, args.dtype)
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        if args.model == "default":
            self.model = HookedLlama.default(dtype=self.dtype, device=args.device)
        else:
            from transformers import LlamaConfig

            config = LlamaConfig(
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                vocab_size=128256,
                max_position_embeddings=131072,
                tie_word_embeddings=True,
                rms_norm_eps=1e-5,
                rope_parameters={
                    "rope_type": "llama3",
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                    "rope_theta": 500000.0,
                },
            )
            with torch.device(args.device):  # initialise on the device: a 1B model is slow to fill on a CPU
                self.model = HookedLlama.from_config(config, seed=0, dtype=self.dtype)
        self.model.eval()
        self._hf = self._hf_eager = self._tl = self._nn = None
        self.tl_missing = self.nn_missing = args.no_interop

    @property
    def hf(self):
        if self._hf is None:
            self._hf = self.model.to_hf().eval()
        return self._hf

    @property
    def hf_eager(self):
        if self._hf_eager is None:
            self._hf_eager = self.model.to_hf().eval()
            self._hf_eager.set_attn_implementation("eager")
        return self._hf_eager

    @property
    def tl(self):
        if self._tl is None and not self.tl_missing:
            try:
                import transformer_lens
            except ImportError:
                self.tl_missing = True
                return None
            self._tl = transformer_lens.TransformerBridge.boot_transformers(
                "HuggingFaceTB/SmolLM2-135M-Instruct",
                hf_model=self.model.to_hf(),
                tokenizer=self.model.tokenizer,
                dtype=self.model.dtype,
                device=self.args.device,
            ).eval()
            self._tl.cfg.default_prepend_bos = False
        return self._tl

    @property
    def nn(self):
        if self._nn is None and not self.nn_missing:
            try:
                import nnsight
            except ImportError:
                self.nn_missing = True
                return None
            self._nn = nnsight.TransformersModel(self.model.to_hf(), tokenizer=copy.deepcopy(self.model.tokenizer))
        return self._nn

    def ids(self, B: int, S: int):
        g = self.torch.Generator().manual_seed(B * 100_003 + S)
        return self.torch.randint(3, self.model.d_vocab, (B, S), generator=g).to(self.args.device)

    def sync(self) -> None:
        if self.args.device.startswith("cuda"):
            self.torch.cuda.synchronize()


def forward_cases(b: Bench, ids, names: list[str] | None = None) -> dict:
    """name -> zero-argument callable returning what the case produces (its output is what it holds)."""
    torch, model = b.torch, b.model
    noop_points = [n for n in model.hook_names() if not n.endswith("attn.hook_result")]  # as cache everything

    def noop(t, hook):
        return None

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    def ours_noop():
        with model.hooks(fwd_hooks=[(n, noop) for n in noop_points]):
            return model(ids)

    cases = {
        BASE: lambda: b.hf(ids, use_cache=False).logits,
        "HF eager + hidden states + attentions": lambda: b.hf_eager(
            ids, use_cache=False, output_hidden_states=True, output_attentions=True
        ),
        "HookedLlama no hook": lambda: model(ids),
        "HookedLlama cache everything": lambda: model.run_with_cache(ids),
        "HookedLlama cache residual stream": lambda: model.run_with_cache(
            ids, names_filter=lambda n: "hook_resid_" in n
        ),
        "HookedLlama cache patterns": lambda: model.run_with_cache(
            ids, names_filter=lambda n: n.endswith("hook_pattern")
        ),
        "HookedLlama no-op hook on every point": ours_noop,
    }
    if names is None or any(n.startswith("TransformerLens") for n in names):
        if b.tl is not None:
            cases["TransformerLens forward"] = lambda: b.tl(ids)
            cases["TransformerLens run_with_cache"] = lambda: b.tl.run_with_cache(ids)
    if names is None or any(n.startswith("nnsight") for n in names):
        if b.nn is not None:

            def nn_forward():
                with b.nn.trace(ids):
                    out = b.nn.output.logits.save()
                return out

            def nn_cache():
                with b.nn.trace(ids) as tracer:
                    cache = tracer.cache(device=None)
                return cache

            cases["nnsight trace forward"] = nn_forward
            cases["nnsight cache (all modules)"] = nn_cache
    if names is not None:
        cases = {k: v for k, v in cases.items() if k in names}
    return {k: no_grad(v) for k, v in cases.items()}


# ---------------------------------------------------------------------------------------- timing
def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def interleaved(b: Bench, cases: dict, rounds: int, base: str) -> dict[str, tuple[float, float, float]]:
    """name -> (median ms, median of per-round wall-time ratios to ``base``, same for process CPU time).

    The CPU-time ratio (user + system time of this process, all threads) is steadier than wall time
    when other processes compete for the cores; on a quiet machine the two agree.
    """
    for fn in cases.values():  # warm-up
        out = fn()
        del out
    names = list(cases)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            b.sync()
            c, t = cpu_seconds(), time.perf_counter()
            out = cases[name]()
            b.sync()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(cpu_seconds() - c)
            del out

    def ratio(xs, n):
        return statistics.median(x / max(bx, 1e-9) for x, bx in zip(xs[n], xs[base]))

    return {n: (statistics.median(wall[n]) * 1000, ratio(wall, n), ratio(cpu, n)) for n in names}


def speed_rows(res: dict, per: float = 1.0) -> list[str]:
    return [f"| {name} | {ms / per:.1f} | {r:.2f} | {c:.2f} |" for name, (ms, r, c) in res.items()]


def held_bytes(obj) -> int | None:
    """Bytes the tensors reachable from ``obj`` keep alive, each storage once (None if unknown)."""
    import torch

    seen: dict = {}

    def walk(o, depth=0) -> bool:
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            seen[(o.device, s.data_ptr())] = s.nbytes()
            return True
        if depth > 4:
            return False
        if hasattr(o, "cache_dict"):  # TransformerLens ActivationCache
            o = o.cache_dict
        elif hasattr(o, "store") and isinstance(o.store, dict):  # ours
            o = o.store
        if isinstance(o, dict):
            return all([walk(v, depth + 1) for v in o.values()]) if o else True
        if isinstance(o, (list, tuple)):
            return all([walk(v, depth + 1) for v in o]) if o else True
        return o is None

    return sum(seen.values()) if walk(obj) else None


def memory_child(args) -> dict:
    """Run in a fresh process: the peak RSS one case adds over a no-cache forward, and what it holds."""
    b = Bench(args)
    ids = b.ids(args.batch, args.seq)
    cases = forward_cases(b, ids, names=["HookedLlama no hook", args.memory_case])
    if args.memory_case not in cases:
        return {"case": args.memory_case, "skipped": True}
    out = cases["HookedLlama no hook"]()
    del out
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = cases[args.memory_case]()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": args.memory_case, "peak_over_forward": after - before, "held": held_bytes(out)}


def cuda_memory(b: Bench, cases: dict) -> dict[str, dict]:
    torch = b.torch
    res = {}

    def peak(fn):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out

    ref, out = peak(cases["HookedLlama no hook"])
    del out
    for name in MEMORY_CASES:
        if name in cases:
            p, out = peak(cases[name])
            res[name] = {"peak_over_forward": p - ref, "held": held_bytes(out)}
            del out
    return res


def mib(n) -> str:
    return "—" if n is None else f"{n / 2**20:.0f}"


def shape_table(args) -> str:
    """One process: the speed table of one shape (and on CUDA its memory table)."""
    b = Bench(args)
    B, S = args.batch, args.seq
    ids = b.ids(B, S)
    cases = forward_cases(b, ids)
    res = interleaved(b, cases, args.rounds, BASE)
    lines = [
        f"#### b{B}×s{S}: speed ({args.rounds} interleaved rounds)",
        "",
        "| case | ms | × HF sdpa | × HF sdpa, CPU time |",
        "|---|---|---|---|",
    ]
    lines += speed_rows(res)
    if args.device.startswith("cuda"):
        lines += [""] + memory_lines(B, S, cuda_memory(b, cases))
    return "\n".join(lines) + "\n"


def memory_lines(B: int, S: int, mem: dict[str, dict]) -> list[str]:
    lines = [
        f"#### b{B}×s{S}: peak memory over the no-cache forward",
        "",
        "| case | peak over forward MiB | held MiB | peak ÷ held |",
        "|---|---|---|---|",
    ]
    for name, m in mem.items():
        if m.get("skipped"):
            continue
        held, peak = m["held"], m["peak_over_forward"]
        ratio = f"{peak / held:.2f}" if held else "—"
        lines.append(f"| {name} | {mib(peak)} | {mib(held)} | {ratio} |")
    return lines


def workflow_table(args) -> str:
    """One process: patching sweeps, attribution patching and generation, interleaved."""
    sys.path.insert(0, str(ROOT))
    from analyses import activation_patching, attribution_patching

    b = Bench(args)
    torch, model = b.torch, b.model
    if model.tokenizer is not None:
        clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
        mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    else:  # random model: a random prompt and its copy with one token changed
        clean = b.ids(1, 15)
        corrupt = clean.clone()
        corrupt[0, 9] = (clean[0, 9] + 1) % model.d_vocab
        mary, john = int(clean[0, 4]), int(clean[0, 9])
    clean, corrupt = clean.to(args.device), corrupt.to(args.device)
    layers = list(range(min(model.n_layers, 2))) if args.quick else None

    def tl_metric(logits):  # TransformerLens style: logits [B, P, V] -> scalar
        return logits[0, -1, mary] - logits[0, -1, john]

    def hf_forward():
        with torch.no_grad():
            return b.hf(clean, use_cache=False).logits

    cases = {
        "HF sdpa forward (IOI prompt)": hf_forward,
        "IOI resid_pre sweep, answers=": lambda: activation_patching(
            model, clean, corrupt, answers=(mary, john), component="resid_pre", layers=layers
        ),
        "IOI resid_pre sweep, metric callable": lambda: activation_patching(
            model, clean, corrupt, tl_metric, component="resid_pre", layers=layers
        ),
        "attribution patching (resid_pre, attn_out, mlp_out, z)": lambda: attribution_patching(
            model, clean, corrupt, answers=(mary, john)
        ),
    }
    res = interleaved(b, cases, args.wf_rounds, "HF sdpa forward (IOI prompt)")
    n_tok = clean.shape[1]
    lines = [
        f"#### Workflows ({args.wf_rounds} interleaved rounds)",
        "",
        f"IOI pair, {n_tok} tokens; sweep = every layer × position"
        + (" (quick: 2 layers)" if args.quick else "")
        + ".",
        "",
        "| case | ms | × HF forward of the clean prompt | same, CPU time |",
        "|---|---|---|---|",
    ]
    lines += speed_rows(res)

    n = args.gen_tokens
    prompt = b.ids(1, 64)
    hook = ("blocks.0.hook_mlp_out", lambda t, hook: t * 0.5)

    def ours_hooked():
        with model.hooks(fwd_hooks=[hook]):
            return model.generate(prompt, n, stop_at_eos=False)

    gen = {
        "HF generate": lambda: b.hf.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        ),
        "HookedLlama generate, no hook": lambda: model.generate(prompt, n, stop_at_eos=False),
        "HookedLlama generate, 1 hook": ours_hooked,
    }
    if b.tl is not None:

        def tl_hooked():
            with b.tl.hooks(fwd_hooks=[hook]):
                return b.tl.generate(prompt, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False)

        gen["TransformerLens generate, 1 hook"] = tl_hooked
    if b.nn is not None:

        def nn_hooked():
            with b.nn.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0) as tr:
                for _ in tr.iter[:n]:
                    b.nn.model.layers[0].mlp.output[:] = b.nn.model.layers[0].mlp.output * 0.5

        gen["nnsight generate, 1 intervention"] = nn_hooked
    with torch.no_grad():
        res = interleaved(b, gen, args.wf_rounds, "HF generate")
    lines += [
        "",
        f"Greedy generation, 64-token prompt, {n} new tokens:",
        "",
        "| case | ms per token | × HF generate | same, CPU time |",
        "|---|---|---|---|",
    ]
    lines += speed_rows(res, per=n)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- driver
def child(args, *extra: str) -> str:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--model",
        args.model,
        "--threads",
        str(args.threads),
        "--gen-tokens",
        str(args.gen_tokens),
        *(["--no-interop"] if args.no_interop else []),
        *(["--quick"] if args.quick else []),
        *(["--keep-freed-memory"] if args.keep_freed_memory else []),
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child {' '.join(extra)} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def header(args) -> str:
    import torch
    import transformers

    versions = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for pkg in ("transformer_lens", "nnsight"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions.append(f"{pkg} {version(pkg.replace('_', '-'))}")
    where = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    model = "SmolLM2-135M-Instruct" if args.model == "default" else "random Llama-3.2-1B-shaped model"
    alloc = ", glibc keeping freed memory (`hooks.keep_freed_memory()`)" if args.keep_freed_memory else ""
    return (
        f"### {model}, {args.device} {args.dtype}, {args.threads} torch thread(s){alloc}\n\n"
        f"Machine: {where}; {', '.join(versions)}. Load average at start: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}.\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default="default", choices=["default", "llama-1b"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=None, help=f"comma-separated, from {', '.join(SHAPES)} (default: all)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per shape table (default: sized per shape)")
    ap.add_argument("--wf-rounds", type=int, default=None, help="rounds of the workflow table (default 5)")
    ap.add_argument("--gen-tokens", type=int, default=20)
    ap.add_argument("--no-interop", action="store_true", help="skip TransformerLens and nnsight")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory tables")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="every table's process calls hooks.keep_freed_memory() first (glibc keeps freed "
        "memory): the docs' tuning for caching large activations on a CPU",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 2 rounds, 2-layer sweeps")
    ap.add_argument("--out", default=None, help="write the Markdown tables to this file")
    # internal: one table, or one memory case, per process
    ap.add_argument("--table", choices=["shape", "workflows"], help=argparse.SUPPRESS)
    ap.add_argument("--memory-case", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.gen_tokens = min(args.gen_tokens, 4)
    if args.keep_freed_memory and (args.table or args.memory_case):
        sys.path.insert(0, str(ROOT))
        import hooks

        if not hooks.keep_freed_memory():
            raise SystemExit("--keep-freed-memory needs glibc")
    if args.memory_case:
        print(json.dumps(memory_child(args)))
        return
    if args.table == "shape":
        print(shape_table(args), end="")
        return
    if args.table == "workflows":
        args.wf_rounds = args.wf_rounds or (2 if args.quick else 5)
        print(workflow_table(args), end="")
        return

    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = {k: SHAPES.get(k) or QUICK_SHAPES[k] for k in args.shapes.split(",")}
    start = time.time()
    parts = [header(args)]
    for key, (B, S) in shapes.items():
        rounds = args.rounds or (2 if args.quick else ROUNDS.get((B, S), 5))
        parts.append(child(args, "--table", "shape", "--batch", str(B), "--seq", str(S), "--rounds", str(rounds)))
        print(parts[-1], flush=True)
        if not args.device.startswith("cuda") and not args.no_memory and not (args.quick and key != next(iter(shapes))):
            mem = {}
            for case in MEMORY_CASES:
                out = child(args, "--memory-case", case, "--batch", str(B), "--seq", str(S)).strip().splitlines()
                mem[case] = json.loads(out[-1])
            parts.append("\n".join(memory_lines(B, S, mem)) + "\n")
            print(parts[-1], flush=True)
    parts.append(child(args, "--table", "workflows", *(["--wf-rounds", str(args.wf_rounds)] if args.wf_rounds else [])))
    print(parts[-1], flush=True)
    parts.append(f"Total runtime {time.time() - start:.0f} s.\n")
    text = "\n".join(parts)
    if args.out:
        Path(args.out).write_text(text)
    print(parts[-1])


if __name__ == "__main__":
    main()
