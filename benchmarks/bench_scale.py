"""Scale benchmark: loading, exporting, spilling caches and disk offload of Llama-3.2-shaped checkpoints,
each job against plain transformers doing the same job, in one run.

    python benchmarks/bench_scale.py --out benchmarks/scale.md               # 1B and 3B, every case
    python benchmarks/bench_scale.py --shapes 1b --cases load,offload        # a part

Checkpoints: random bf16 weights in the shapes of Llama-3.2-1B (2.47 GB) and -3B (6.43 GB), written as
2 GB safetensors shards (with a small byte-level BPE tokenizer, for the export's probe prompts) under a
temporary directory that is deleted at the end. Every case runs in its own child process, so its
peak memory is its own: "peak" is the child's peak resident set minus its resident set after the
imports (what the job itself took), reported against the checkpoint's bytes. Times are wall-clock and
process CPU time (user + system, all threads).

Cases (ours / transformers):
- load: ``HookedLlama.from_pretrained(dir)`` + one forward of 16 tokens / ``AutoModelForCausalLM.from_pretrained``
  + the same forward (both keep the checkpoint's bf16).
- export: ``surgery.export(model, out)`` (shards, hashes of every tensor, reload and logits check) /
  ``save_pretrained(out, max_shard_size="2GB")`` + reload with transformers + logits compared by hand on
  the same probe prompts the export checks (``surgery.export.PROBE_PROMPTS``, every position).
- spill: caching every hook point of one 512-token prompt to disk (``run_with_cache(device="disk")``,
  one layer in memory at a time) / transformers' eager forward with hidden states and attentions,
  written with ``safetensors.save_file``.
- offload: ``device_map="auto"`` with ``max_memory={"cpu": half the weights}``, load + one forward: the
  layers that do not fit run from disk / the same call to transformers (with an ``offload_folder``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, head_dim=128),
    "tiny": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, head_dim=64),
}
COMMON = dict(
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_parameters=LLAMA3_ROPE,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)
CASES = ("load", "export", "spill", "offload")
SHARD = 2_000_000_000


# ---------------------------------------------------------------------------------------- checkpoints
def make_checkpoint(shape: str, directory: Path, device: str = "cpu") -> int:
    """Random bf16 weights of ``shape`` (drawn on ``device``) written shard by shard (never the whole model in
    memory); returns the weights' bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], **COMMON, dtype="bfloat16")
    with torch.device("meta"):
        names = [(n, tuple(p.shape)) for n, p in LlamaForCausalLM(config).named_parameters()]  # tied: once
    directory.mkdir(parents=True)
    g = torch.Generator(device).manual_seed(0)
    shard: dict = {}
    size, total, files, weight_map = 0, 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shp in names:
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shp, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
        nbytes = t.numel() * 2
        if size + nbytes > SHARD:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(files)
    for i, name in enumerate(files):  # transformers' names: model-0000i-of-0000n.safetensors
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (directory / name).rename(directory / final)
        weight_map = {k: (final if v == name else v) for k, v in weight_map.items()}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return total


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog.", "The capital of France is Paris."] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|begin_of_text|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|begin_of_text|>", pad_token="<pad>"
    )


# ---------------------------------------------------------------------------------------- child jobs
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(case: str, impl: str, directory: Path, work: Path, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(threads)
    import safetensors.torch  # noqa: F401 - imported before the baseline, as every job needs it
    import transformers  # noqa: F401

    import surgery  # noqa: F401
    from hooks import HookedLlama

    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    ids = torch.randint(2, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    base_rss = _rss()
    t0, c0 = time.perf_counter(), _cpu()
    timed_from = None
    extra: dict = {}
    with torch.no_grad():
        if case == "load":
            if impl == "ours":
                model = HookedLlama.from_pretrained(str(directory))
                logits = model(ids)
            else:
                model = transformers.AutoModelForCausalLM.from_pretrained(directory)
                logits = model(ids).logits
            extra["dtype"] = str(logits.dtype)
        elif case == "export":
            out = work / f"export-{impl}"
            if impl == "ours":
                model = HookedLlama.from_pretrained(str(directory))
                timed_from = (time.perf_counter(), _cpu())
                with torch.enable_grad():  # as a user calls it
                    res = surgery.export(model, out)
                extra["max_abs_logit_diff"] = float(getattr(res, "max_abs_logit_diff", float("nan")))
            else:
                model = transformers.AutoModelForCausalLM.from_pretrained(directory)
                timed_from = (time.perf_counter(), _cpu())
                probes, mask = _probe_batch(directory)  # the export checks the same prompts, every position
                want = model(probes, attention_mask=mask).logits
                model.save_pretrained(out, max_shard_size="2GB")
                del model
                back = transformers.AutoModelForCausalLM.from_pretrained(out)
                diff = (back(probes, attention_mask=mask).logits - want).abs().amax(-1)
                extra["max_abs_logit_diff"] = float(diff[mask.bool()].max())
            shutil.rmtree(out, ignore_errors=True)
        elif case == "spill":
            long = torch.randint(2, 300, (1, 512), generator=torch.Generator().manual_seed(1))
            if impl == "ours":
                model = HookedLlama.from_pretrained(str(directory))
                timed_from = (time.perf_counter(), _cpu())
                _, cache = model.run_with_cache(long, device="disk", spill_dir=work)
                extra["cache_bytes"] = cache.store.disk_bytes
                del cache
            else:
                from safetensors.torch import save_file

                model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
                timed_from = (time.perf_counter(), _cpu())
                out = model(long, output_hidden_states=True, output_attentions=True)
                tensors = {f"hidden.{i}": h.contiguous() for i, h in enumerate(out.hidden_states)}
                tensors.update({f"attn.{i}": a.contiguous() for i, a in enumerate(out.attentions)})
                save_file(tensors, str(work / "hf_acts.safetensors"))
                extra["cache_bytes"] = (work / "hf_acts.safetensors").stat().st_size
                (work / "hf_acts.safetensors").unlink()
        elif case == "offload":
            limit = {"cpu": weights // 2}
            if impl == "ours":
                model = HookedLlama.from_pretrained(str(directory), device_map="auto", max_memory=limit)
                logits = model(ids)
            else:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    directory, device_map="auto", max_memory=limit, offload_folder=str(work / "offload")
                )
                logits = model(ids).logits
            extra["on_disk"] = sum(1 for v in model.hf_device_map.values() if v == "disk")
    t1, c1 = time.perf_counter(), _cpu()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = timed_from or (t0, c0)
    return {
        "case": case,
        "impl": impl,
        "seconds": t1 - start[0],
        "cpu_seconds": c1 - start[1],
        "total_seconds": t1 - t0,
        "peak_bytes": peak - base_rss,
        "weights_bytes": weights,
        **extra,
    }


def _probe_batch(directory: Path):
    """The export's probe prompts (``surgery.export.PROBE_PROMPTS``) tokenized and right-padded into one batch,
    as the export runs them: (ids, attention mask)."""
    import torch
    import transformers

    from surgery.export.probes import PROBE_PROMPTS

    tok = transformers.AutoTokenizer.from_pretrained(directory)
    rows = [tok(p).input_ids for p in PROBE_PROMPTS]
    n = max(map(len, rows))
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def run_child(case: str, impl: str, directory: Path, work: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", case, impl, str(directory), str(work), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"case": case, "impl": impl, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- GPU check
def gpu_check(out: Path, shape: str, device: str, threads: int) -> int:
    """The ``scale8b`` step of ``benchmarks/gpu_check.sh``: a random ``shape`` bf16 checkpoint on ``device``:
    load (ours and transformers), logits parity, caches (on the device, spilled to pinned CPU memory and to
    disk), CPU offload through accelerate, the streamed export; timings in ``out`` (JSON). Exit 1 when a
    check fails."""
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(threads)
    import transformers

    import surgery
    from hooks import HookedLlama

    cuda = device.startswith("cuda")
    report: dict = {"shape": shape, "device": device, "checks": {}, "seconds": {}}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(name, fn):
        sync()
        t = time.perf_counter()
        value = fn()
        sync()
        report["seconds"][name] = round(time.perf_counter() - t, 2)
        print(f"{name}: {report['seconds'][name]} s", flush=True)
        return value

    def gpu_peak(name):
        if cuda:
            report.setdefault("gpu_peak_gib", {})[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()

    with tempfile.TemporaryDirectory(prefix="scale-check-") as tmp:
        root = Path(tmp)
        directory = root / "ckpt"
        report["weights_bytes"] = timed("make checkpoint", lambda: make_checkpoint(shape, directory, device))
        ids = torch.randint(2, 300, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            hf = timed(
                "transformers load",
                lambda: transformers.AutoModelForCausalLM.from_pretrained(directory, device_map=device),
            )
            want = timed("transformers forward", lambda: hf(ids).logits)
            hf = None  # freed before ours loads
            gpu_peak("transformers")
            model = timed("load", lambda: HookedLlama.from_pretrained(str(directory), device=device))
            got = timed("forward", lambda: model(ids))
            gpu_peak("load + forward")
        diff = (got.float() - want.float()).abs().max().item()
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        report["checks"]["logits max |diff| vs transformers (bf16)"] = diff
        report["checks"]["argmax agreement"] = agree
        ok = diff <= 0.05 and agree >= 0.99
        long = torch.randint(2, 300, (1, 1024), generator=torch.Generator().manual_seed(1)).to(device)
        _, cache = timed("cache everything b1x1024 on the device", lambda: model.run_with_cache(long))
        gpu_peak("cache on the device")
        resid = cache["resid_post", model.n_layers // 2].float().cpu()
        del cache
        _, pinned = timed(
            "cache everything b1x1024 spilled to pinned CPU", lambda: model.run_with_cache(long, device="cpu")
        )
        gpu_peak("cache spilled to the CPU")
        same_pinned = torch.equal(pinned["resid_post", model.n_layers // 2].float(), resid)
        del pinned
        _, disk = timed(
            "cache everything b1x1024 spilled to disk",
            lambda: model.run_with_cache(long, device="disk", spill_dir=root),
        )
        same_disk = torch.equal(disk["resid_post", model.n_layers // 2].float(), resid)
        report["cache_disk_bytes"] = disk.store.disk_bytes
        del disk
        report["checks"]["spilled caches equal the device cache"] = same_pinned and same_disk
        ok = ok and same_pinned and same_disk
        res = timed("streamed export + verify", lambda: surgery.export(model, root / "export"))
        report["checks"]["export max |diff|"] = float(getattr(res, "max_abs_logit_diff", float("nan")))
        shutil.rmtree(root / "export", ignore_errors=True)
        model = None
        if cuda:
            torch.cuda.empty_cache()
            limit = {0: f"{report['weights_bytes'] // 3 // 2**20}MiB", "cpu": "200GiB"}
            with torch.no_grad():
                off = timed(
                    "load with a third on the GPU (accelerate CPU offload)",
                    lambda: HookedLlama.from_pretrained(str(directory), device_map="auto", max_memory=limit),
                )
                got_off = timed("forward with CPU offload", lambda: off(ids))
            diff_off = (got_off.float().to(want.device) - want.float()).abs().max().item()
            report["checks"]["offloaded logits max |diff|"] = diff_off
            ok = ok and diff_off <= 0.05
            gpu_peak("CPU offload")
    report["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    report["ok"] = ok
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------- report
def _gib(n) -> str:
    return f"{n / 2**30:.2f}"


def table(shape: str, weights: int, results: dict) -> list[str]:
    lines = [
        f"#### Llama-3.2-{shape.upper()}-shaped, bf16, {weights / 1e9:.2f} GB of weights ({_gib(weights)} GiB)",
        "",
        "| job | ours s (CPU s) | transformers s (CPU s) | × time | ours peak GiB (× weights) "
        "| transformers peak GiB (× weights) | target (#27) | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        ours, hf = results.get((case, "ours")), results.get((case, "hf"))
        if ours is None or hf is None:
            continue
        if "error" in ours or "error" in hf:
            lines.append(
                f"| {case} | {ours.get('error', '')} | {hf.get('error', '')} | | | | {TARGETS[case][0]} | no |"
            )
            continue
        ratio, peak = ours["seconds"] / hf["seconds"], ours["peak_bytes"] / weights
        lines.append(
            f"| {case} | {ours['seconds']:.1f} ({ours['cpu_seconds']:.1f}) | {hf['seconds']:.1f} ({hf['cpu_seconds']:.1f}) "
            f"| {ratio:.2f} | {_gib(ours['peak_bytes'])} ({peak:.2f}) "
            f"| {_gib(hf['peak_bytes'])} ({hf['peak_bytes'] / weights:.2f}) | {TARGETS[case][0]} "
            f"| {'yes' if TARGETS[case][1](ratio, peak, ours) else 'no'} |"
        )
    return lines


# #27's targets, per case: (as printed, met(time ratio, peak / weights, our result))
TARGETS = {
    "load": ("≤ 1.3× time, peak ≤ 1.05× weights", lambda r, p, o: r <= 1.3 and p <= 1.05),
    "export": ("≤ 1.5× time, peak ≤ 1.2× weights", lambda r, p, o: r <= 1.5 and p <= 1.2),
    "spill": ("one layer in memory (peak < weights + 1 layer's cache)", lambda r, p, o: p <= 1.2),
    "offload": ("runs with layers on disk, peak < weights", lambda r, p, o: o.get("on_disk", 0) > 0 and p < 1.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1b,3b")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="runs of each case (the table shows the fastest)")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", nargs=4, metavar=("CASE", "IMPL", "DIR", "WORK"), help=argparse.SUPPRESS)
    p.add_argument("--gpu-check", type=Path, metavar="OUT.json", help="the GPU check (gpu_check.sh's scale8b step)")
    p.add_argument("--shape", default="8b", help="with --gpu-check: the checkpoint's shape (tiny for a dry run)")
    p.add_argument("--device", default="cuda", help="with --gpu-check: the device (cpu for a dry run)")
    args = p.parse_args()
    if args.gpu_check:
        sys.exit(gpu_check(args.gpu_check, args.shape, args.device, args.threads))
    if args.child:
        case, impl, directory, work = args.child
        print(json.dumps(child(case, impl, Path(directory), Path(work), args.threads)))
        return
    cases = [c for c in args.cases.split(",") if c]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; load average at start "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.threads} torch threads.",
        "",
    ]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        for shape in [s for s in args.shapes.split(",") if s]:
            directory = root / f"llama-{shape}"
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.bench_scale import "
                    f"make_checkpoint; from pathlib import Path; print(make_checkpoint({shape!r}, Path({str(directory)!r})))",
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=True,
            )
            weights = int(proc.stdout.strip().splitlines()[-1])
            results: dict = {}
            for case in cases:
                for _ in range(args.rounds):
                    for impl in ("hf", "ours"):
                        work = Path(tempfile.mkdtemp(dir=root))
                        r = run_child(case, impl, directory, work, args.threads)
                        shutil.rmtree(work, ignore_errors=True)
                        print(json.dumps(r), flush=True)
                        best = results.get((case, impl))
                        if best is None or "error" in best or ("error" not in r and r["seconds"] < best["seconds"]):
                            results[(case, impl)] = r
            lines += table(shape, weights, results) + [""]
            shutil.rmtree(directory, ignore_errors=True)
    lines.append(f"Total runtime {time.time() - started:.0f} s.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
