"""Harvesting, sweeps and SAE training beyond one process, on the default model (CPU, float32).

1. **Harvest vs transformers.** Activations of ``blocks.{L}.hook_resid_post`` over standard-library
   docstrings packed into rows of ``--row`` tokens (``hooks.harvest``), against a transformers forward
   over the same rows stopped after layer L (a forward hook on layer L raises with its output).
   Interleaved rounds, median of the per-round ratios of tokens/s (wall) and of process CPU time.
2. **Padding waste.** Positions the forwards compute per real token: packed rows against the same texts
   left-padded per batch of ``--row``-truncated texts (what ``cache_to_disk`` and the old ``train_sae`` did).
3. **1 vs 2 processes** (``torchrun --nproc_per_node N``, one thread each): harvesting to disk
   (``harvest_to_disk``, shards of ``--batch`` rows: each rank its block of them), an ablation sweep over
   every head (``analyses.ablation_sweep``) and SAE training
   (``train_sae`` data-parallel, harvesting on the fly): throughput of the whole job, 2 processes over 1.

    python benchmarks/bench_distributed.py                  # all, prints a markdown report
    python benchmarks/bench_distributed.py --skip-scaling   # parts 1 and 2 only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_sae_train import stdlib_paragraphs  # noqa: E402

from _core import distributed as dist  # noqa: E402
from hooks import HookedLlama  # noqa: E402
from hooks.harvest import harvest, pack_rows  # noqa: E402


class _Stop(Exception):
    pass


def hf_stopped_at(hf, layer: int):
    """``run(tokens)``: transformers' forward of ``tokens`` up to the output of decoder layer ``layer``."""

    def stop(module, args, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    def run(tokens: torch.Tensor) -> torch.Tensor:
        handle = hf.model.layers[layer].register_forward_hook(stop)
        try:
            hf.model(input_ids=tokens, use_cache=False)
        except _Stop as s:
            return s.args[0]
        finally:
            handle.remove()
        raise RuntimeError("layer not reached")

    return run


def cpu_time() -> float:
    return time.process_time()


def harvest_vs_hf(model, texts: list[str], layer: int, row: int, batch: int, rounds: int) -> dict:
    hook = f"blocks.{layer}.hook_resid_post"
    rows = list(pack_rows(model, texts, row))
    rows = [r for r in rows if r.numel() == row]
    batches = [torch.stack(rows[i : i + batch]) for i in range(0, len(rows) - batch + 1, batch)]
    n_tok = sum(b.numel() for b in batches)
    hf = model.to_hf()
    run_hf = hf_stopped_at(hf, layer)
    with torch.no_grad():  # the same numbers first
        got = next(harvest(model, [hook], list(batches[0]), batch_rows=batch, skip_first=False))[hook]
        want = run_hf(batches[0]).reshape(-1, model.d_model)
        diff = float((got - want).abs().max())

    def ours():
        for _ in harvest(model, [hook], rows[: len(batches) * batch], batch_rows=batch, skip_first=False):
            pass

    def theirs():
        with torch.no_grad():
            for b in batches:
                run_hf(b)

    walls: dict[str, list[float]] = {"ours": [], "hf": []}
    cpus: dict[str, list[float]] = {"ours": [], "hf": []}
    for r in range(rounds):
        for name, fn in (("ours", ours), ("hf", theirs)) if r % 2 == 0 else (("hf", theirs), ("ours", ours)):
            w, c = time.perf_counter(), cpu_time()
            fn()
            walls[name].append(time.perf_counter() - w)
            cpus[name].append(cpu_time() - c)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "hook": hook,
        "rows": len(batches) * batch,
        "tokens": n_tok,
        "max_abs_diff": diff,
        "ours_tok_s": n_tok / med(walls["ours"]),
        "hf_tok_s": n_tok / med(walls["hf"]),
        "ratio_wall": med([h / o for o, h in zip(walls["ours"], walls["hf"])]),
        "ratio_cpu": med([h / o for o, h in zip(cpus["ours"], cpus["hf"])]),
    }


def padding_waste(model, texts: list[str], row: int, batch: int) -> dict:
    """Positions computed and real tokens: packed rows (``hooks.harvest``) against left-padded batches of
    the texts truncated to ``row`` tokens (what ``cache_to_disk`` and the earlier ``train_sae`` ran)."""
    positions = sum(r.numel() for r in pack_rows(model, texts, row))  # what the forwards compute
    full = [len(model.tokenizer(t)["input_ids"]) for t in texts]  # counted apart: each text, plus its separator
    lengths = [min(n, row) for n in full]
    padded = sum(max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch))
    return {
        "texts": len(texts),
        "packed_positions": positions,
        "packed_real_tokens": sum(n + 1 for n in full),
        "padded_positions": padded,
        "padded_real_tokens": sum(lengths),
    }


# --------------------------------------------------------------------------- the torchrun worker
def worker(args) -> None:
    torch.set_num_threads(1)
    dist.init()
    model = HookedLlama.default()
    paras = stdlib_paragraphs(args.texts)
    out: dict = {"world": dist.world_size()}
    # harvesting to disk (hooks.harvest.harvest_to_disk): each rank its block of the shards, rank 0 seals
    from hooks.harvest import harvest_to_disk

    hook = f"blocks.{args.layer}.hook_resid_post"
    acts = Path(args.work) / f"acts-w{dist.world_size()}"
    dist.barrier()
    t, c = time.perf_counter(), cpu_time()
    cache = harvest_to_disk(
        model, [hook], paras, acts, max_tokens=args.row, text_batch=args.batch, rows_per_shard=args.batch
    )
    out["harvest_cpu"] = sum(dist.gather(cpu_time() - c))
    dist.barrier()
    out["harvest_s"] = time.perf_counter() - t
    out["harvest_tokens"] = cache.stats.tokens
    # an ablation sweep over every head of the model on a few prompts
    from analyses import Scorer, ablation_sweep

    prompts = [p[:200] for p in paras[: args.prompts]]
    scorer = Scorer.build(model, "loss", prompts)
    dist.barrier()
    t, c = time.perf_counter(), cpu_time()
    res = ablation_sweep(model, scorer, "heads", layers=list(range(args.sweep_layers)), batch_size=16)
    out["sweep_cpu"] = sum(dist.gather(cpu_time() - c))
    dist.barrier()
    out["sweep_s"] = time.perf_counter() - t
    out["sweep_units"] = len(res.units)
    # SAE training, data-parallel, harvesting on the fly
    from analyses.saes import train_sae

    dist.barrier()
    t, c = time.perf_counter(), cpu_time()
    tr = train_sae(
        model,
        hook,
        paras,
        Path(args.work) / f"sae-w{dist.world_size()}",
        d_sae=2304,
        k=32,
        steps=args.steps,
        batch_size=1024,
        lr=1e-3,
        max_tokens=args.row,
        overwrite=True,
        progress=False,
    )
    out["train_cpu"] = sum(dist.gather(cpu_time() - c))
    dist.barrier()
    out["train_s"] = time.perf_counter() - t
    out["train_tokens"] = tr.tokens
    out["train_last_nmse"] = tr.losses[-1]
    if dist.is_main():
        Path(args.result).write_text(json.dumps(out))


def scaling(args) -> dict:
    res = {}
    for n in (1, 2):
        work = tempfile.mkdtemp(prefix="run-", dir=args.work)  # fresh: nothing cached by an earlier run
        result = Path(work) / f"scaling-{n}.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__]
        cmd += ["--worker", "--result", str(result), "--work", work, "--texts", str(args.texts)]
        cmd += ["--steps", str(args.steps), "--prompts", str(args.prompts), "--sweep-layers", str(args.sweep_layers)]
        cmd += ["--layer", str(args.layer), "--row", str(args.row), "--batch", str(args.batch)]
        load = os.getloadavg()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-4000:])
        res[n] = dict(json.loads(result.read_text()), load_at_start=[round(x, 2) for x in load])
        shutil.rmtree(work)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/bench-distributed")
    ap.add_argument("--texts", type=int, default=600)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--row", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--sweep-layers", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-scaling", action="store_true")
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    model = HookedLlama.default()
    paras = stdlib_paragraphs(args.texts)
    report = {"load_at_start": [round(x, 2) for x in os.getloadavg()], "threads": args.threads}
    report["harvest_vs_hf"] = harvest_vs_hf(model, paras, args.layer, args.row, args.batch, args.rounds)
    report["padding"] = padding_waste(model, paras, args.row, args.batch)
    del model
    if not args.skip_scaling:
        report["scaling"] = scaling(args)
    print(json.dumps(report, indent=1), file=sys.stderr)  # the raw figures
    print(markdown(report))


def targets(r: dict) -> list[str]:
    """The table of the targets: measured, goal, met."""
    h, p = r["harvest_vs_hf"], r["padding"]
    rows = [
        ("harvest tokens/s over transformers stopped at the same layer (wall)", h["ratio_wall"], 1.0, "×"),
        (
            "padding waste of packed rows (positions − real tokens)",
            p["packed_positions"] - p["packed_real_tokens"],
            0,
            "",
        ),
    ]
    if "scaling" in r:
        one, two = r["scaling"][1], r["scaling"][2]
        for key, label in (("harvest", "harvesting"), ("sweep", "ablation sweep"), ("train", "SAE training")):
            rows.append(
                (f"{label}: 2 processes over 1 (one thread each, wall)", one[key + "_s"] / two[key + "_s"], 1.7, "×")
            )
    out = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for label, got, goal, unit in rows:
        met = got == goal if unit == "" else got >= goal
        shown = f"{got}" if unit == "" else f"{got:.2f}{unit}"
        out.append(f"| {label} | {shown} | {'' if unit == '' else '≥ '}{goal}{unit} | {'yes' if met else 'no'} |")
    return out


def markdown(r: dict) -> str:
    h, p = r["harvest_vs_hf"], r["padding"]
    lines = [
        f"Load average at start: {r['load_at_start']}; {r['threads']} torch thread(s).",
        "",
        *targets(r),
        "",
        f"Harvest of `{h['hook']}`, {h['rows']} packed rows ({h['tokens']} tokens), against transformers "
        f"stopped after the same layer (max |diff| {h['max_abs_diff']:.1e}):",
        "",
        "| | tokens/s | ratio to transformers (wall) | ratio (process CPU time) |",
        "|---|---|---|---|",
        f"| harvest (`hooks.harvest`) | {h['ours_tok_s']:.0f} | {h['ratio_wall']:.2f}× | {h['ratio_cpu']:.2f}× |",
        f"| transformers, stopped at the layer | {h['hf_tok_s']:.0f} | 1 | 1 |",
        "",
        f"Padding waste on {p['texts']} texts (positions computed per real token):",
        "",
        "| | positions | real tokens | waste |",
        "|---|---|---|---|",
        f"| packed rows | {p['packed_positions']} | {p['packed_real_tokens']} | "
        f"{p['packed_positions'] - p['packed_real_tokens']} |",
        f"| left-padded batches of truncated texts | {p['padded_positions']} | {p['padded_real_tokens']} | "
        f"{p['padded_positions'] - p['padded_real_tokens']} ({p['padded_positions'] / p['padded_real_tokens'] - 1:.0%}) |",
    ]
    if "scaling" in r:
        one, two = r["scaling"][1], r["scaling"][2]
        lines += [
            "",
            f"1 vs 2 processes, one thread each (load at start {one['load_at_start']} / {two['load_at_start']}):",
            "",
            "| job | 1 process | 2 processes | speed-up (wall) | CPU time, 1 / 2 processes (all ranks) |",
            "|---|---|---|---|---|",
        ]
        for key, label in (
            ("harvest", f"harvest {one['harvest_tokens']} tokens"),
            ("sweep", f"ablation sweep, {one['sweep_units']} heads"),
            ("train", f"train_sae {one['train_tokens']} tokens (on the fly)"),
        ):
            lines.append(
                f"| {label} | {one[key + '_s']:.1f} s | {two[key + '_s']:.1f} s | "
                f"{one[key + '_s'] / two[key + '_s']:.2f}× | {one[key + '_cpu']:.1f} s / {two[key + '_cpu']:.1f} s "
                f"({one[key + '_cpu'] / two[key + '_cpu']:.2f}) |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
