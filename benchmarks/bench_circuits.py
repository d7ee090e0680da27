"""Edge attribution over every edge of the default model on the IOI prompt set, against auto-circuit 1.0.1
(in its own environment, ``tests/integration/_comparator_env.py``) on the same weights, prompts and work:

- EAP: one score per edge from the clean run's gradients (auto-circuit's ``mask_gradient_prune_scores``
  with ``mask_val=0``, which its docs state equals its EAP);
- EAP-IG along the edges: gradients at every edge mask set to ``k / n``, ``k = 0 … n`` (auto-circuit's
  ``integrated_grad_samples=n``; ours ``method="eap-ig", path="edges", steps=n + 1``) — and our default
  EAP-IG (interpolated embeddings, EAP-IG's and MIB's), which auto-circuit does not have.

Equal results: auto-circuit's scores are per query head's key/value input (TransformerLens ungroups
grouped-query attention); they are summed per key/value group, negated (it differentiates −metric) and,
for IG, divided by its n + 1 summed samples, then compared edge by edge. Times are wall-clock and process CPU
time of the whole call on the loaded model (both with the same torch thread count, one after the other;
on a shared machine the CPU-time ratio is the steadier one).

Attribution graph of one prompt against circuit-tracer 0.5 (same environment): per-layer JumpReLU skip
transcoders trained once on the default model (``train_saes``, cached under ``$SCALPEL_CACHE/bench-circuits``),
both sides with every active feature attributed, ``batch_size`` targets per pass (circuit-tracer: an autograd
backward; ours: a reverse pass in plain products), the first position zeroed as circuit-tracer does; equal
results = the adjacency matrices compared entry by entry.

    python benchmarks/bench_circuits.py --threads 2 --samples 5      # prints a JSON document
    python benchmarks/bench_circuits.py --only graph                   # the attribution graph only
    python benchmarks/bench_circuits.py --only long --long 1024 --threads 1   # memory for one long prompt only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from _comparator_env import autocircuit_scores, cache_dir, run_script  # noqa: E402

from analyses.circuits import edge_attribution  # noqa: E402
from hooks import HookedLlama  # noqa: E402


def ioi(path: Path) -> tuple[list[str], list[str], tuple[list[str], list[str]]]:
    rows = [
        line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")
    ]
    clean = [r[0] for r in rows]
    return clean, [clean[i ^ 1] for i in range(len(clean))], ([r[1] for r in rows], [r[2] for r in rows])


def compare(ours, theirs: dict, rep: int, factor: float) -> dict:
    summed = autocircuit_scores(theirs, rep)
    names = ours.graph.edge_names()
    want = torch.tensor([summed[n] for n in names], dtype=torch.float64)
    got = factor * ours.scores.double()
    top_want = set(torch.argsort(want.abs(), descending=True)[:100].tolist())
    top_got = set(torch.argsort(got.abs(), descending=True)[:100].tolist())
    return {
        "edges": len(names),
        "max_abs_diff": float((got - want).abs().max()),
        "max_abs_score": float(want.abs().max()),
        "relative": float((got - want).abs().max() / want.abs().max()),
        "top100_overlap": len(top_want & top_got),
    }


LONG = """
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})

def mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
from hooks import HookedLlama
from analyses.circuits import circuit_setup, run_masks
from analyses.circuits.scores import eap_ig_scores, eap_scores
model = HookedLlama.default()
ids = torch.randint(100, 20000, (1, {n}), generator=torch.Generator().manual_seed(0))
bad = ids.clone(); bad[0, 1] = 7
try:  # the peak from here on (not the load's): reset the kernel's high-water mark
    open("/proc/self/clear_refs", "w").write("5")
    base, peak = mb("VmRSS"), lambda: mb("VmHWM")
except OSError:
    base, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, lambda: (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
c0 = time.process_time()
if {what!r} == "forward_backward":
    for p in model.parameters():
        p.requires_grad_(False)
    e = model.model.embed_tokens(ids).requires_grad_(True)
    model(e, start_at_layer=0)[0, -1, 5].backward()
else:
    setup = circuit_setup(model, ids, bad, metric=lambda x: x[:, -1, 5].mean())
    if {what!r} == "eap":
        eap_scores(model, setup)
    elif {what!r} == "eap_ig_inputs":
        eap_ig_scores(model, setup, steps=5)
    elif {what!r} == "eap_ig_edges":
        eap_ig_scores(model, setup, steps=3, path="edges")
    else:
        run_masks(model, setup, torch.ones(2, setup.graph.n_edges), memory_budget_mb=512)
print(json.dumps(dict(mb=peak() - base, cpu_s=time.process_time() - c0)))
"""

LONG_WORK = ("forward_backward", "eap", "eap_ig_inputs", "eap_ig_edges", "masks")


def peak_rss(what: str, n: int, threads: int = 1) -> dict:
    """For one ``n``-token prompt, in a fresh process: ``mb``, the peak resident memory beyond the loaded
    model (MB: the peak from after the load, minus the resident memory then; Linux resets the peak through
    ``/proc/self/clear_refs``, elsewhere the load's own peak hides what lies below it), and ``cpu_s``, the
    CPU seconds of the work (the setup's two forwards included)."""
    import subprocess

    script = LONG.format(root=str(ROOT), n=n, what=what, threads=threads)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"long prompt, {what}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def graph_bench(model, work: Path, prompt: str, batch: int, threads: int, n_tokens: int = 0) -> dict:
    """Our attribution graph and circuit-tracer's, of ``prompt`` through toy trained transcoders."""
    from analyses.neurons import load_corpus
    from analyses.saes import load_sae, train_saes
    from analyses.saes.train import transcoder_hooks

    tdir = work / "transcoders"
    hooks = transcoder_hooks(model)
    if not all((tdir / read).is_dir() for read, _ in hooks):
        train_saes(
            model,
            hooks,
            load_corpus()[:400],
            tdir,
            architecture="jumprelu",
            k=32,
            d_sae=1152,
            skip_connection=True,
            steps=80,
            batch_size=256,
            max_tokens=64,
            overwrite=True,
        )
    tcs = [load_sae(str(tdir / read), model) for read, _ in hooks]
    layers = {i: {k: v.detach().clone() for k, v in t.state_dict().items()} for i, t in enumerate(tcs)}
    torch.save({"hook_in": "ln2.hook_normalized", "layers": layers}, work / "transcoders.pt")
    tok = model.tokenizer
    special = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    tokens = torch.cat([torch.tensor([special]), model.to_tokens(prompt, prepend_bos=False)[0]])
    if n_tokens:
        tokens = tokens[: n_tokens + 1]
    torch.save(tokens, work / "prompt.pt")
    (work / "model" / "tokenizer.json").exists() or tok.save_pretrained(work / "model")
    run_script("circuits", "tracer", work, batch, threads, timeout=3600)
    ref = torch.load(work / "tracer.pt")
    ours = graph_in_fresh_process(work, tdir, batch, threads)
    A, B = torch.load(work / "ours_graph.pt").double(), ref["adjacency"].double()
    same = A.shape == B.shape
    return {
        "positions": len(tokens),
        "active_features": ours["n_active"],
        "nodes": ours["n_nodes"],
        "ours_s": ours["seconds"],
        "tracer_s": ref["seconds"],
        "speedup_wall": ref["seconds"] / ours["seconds"],
        "ours_cpu_s": ours["cpu_seconds"],
        "tracer_cpu_s": ref["cpu_seconds"],
        "speedup_cpu": ref["cpu_seconds"] / ours["cpu_seconds"],
        "ours_peak_mb": ours["peak_rss_mb"],
        "tracer_peak_mb": ref.get("peak_rss_mb"),
        "same_nodes": same and ours["logit_tokens"] == ref["logit_tokens"],
        "max_abs_diff": float((A - B).abs().max()) if same else None,
        "max_abs_entry": float(B.abs().max()),
    }


GRAPH = """
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from hooks import HookedLlama
from analyses.circuits import attribution_graph
from analyses.saes import load_sae
from analyses.saes.train import transcoder_hooks
torch.set_num_threads({threads})
model = HookedLlama.default()
tcs = [load_sae({tdir!r} + "/" + read, model) for read, _ in transcoder_hooks(model)]
tokens = torch.load({work!r} + "/prompt.pt")
def mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on, not the load's (Linux)
base = mb("VmRSS")
t0, c0 = time.perf_counter(), time.process_time()
g = attribution_graph(model, tokens, tcs, batch_size={batch})
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = mb("VmHWM") - base
torch.save(g.adjacency, {work!r} + "/ours_graph.pt")
print(json.dumps(dict(seconds=seconds, cpu_seconds=cpu, peak_rss_mb=peak, n_active=g.n_active, n_nodes=g.n_nodes,
                      logit_tokens=[int(t) for t in g.logit_tokens])))
"""


def graph_in_fresh_process(work: Path, tdir: Path, batch: int, threads: int) -> dict:
    """Our attribution graph of ``work/prompt.pt`` in a fresh process, as circuit-tracer's runs: its time and
    the peak resident memory it adds beyond the loaded model and transcoders; the adjacency -> ours_graph.pt."""
    import subprocess

    script = GRAPH.format(root=str(ROOT), tdir=str(tdir), work=str(work), batch=batch, threads=threads)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"our attribution graph failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(out: dict) -> str:
    """The measured rows as benchmarks/RESULTS.md's tables (markdown)."""
    lines = []
    rows = [
        (k, label)
        for k, label in (
            ("eap", "EAP, every edge"),
            ("eap_ig_edges", f"EAP-IG along the edges, {out.get('samples', 0) + 1} mask values"),
        )
        if k in out
    ]
    if rows:
        lines += [
            f"edge scores: {out['prompts']} prompts × {out['positions']} positions, {out['threads']} thread(s)",
            "",
            "| work | ours: wall / CPU s | auto-circuit: wall / CPU s | × faster (wall / CPU) | max abs diff / max score |",
            "|---|---|---|---|---|",
        ]
        for k, label in rows:
            r = out[k]
            lines.append(
                f"| {label} | {r['ours_s']:.1f} / {r['ours_cpu_s']:.1f} | {r['autocircuit_s']:.1f} / "
                f"{r['autocircuit_cpu_s']:.1f} | {r['speedup_wall']:.1f} / {r['speedup_cpu']:.1f} | "
                f"{r['max_abs_diff']:.1e} / {r['max_abs_score']:.2f} |"
            )
        if "eap_ig_inputs_5_steps" in out:
            r = out["eap_ig_inputs_5_steps"]
            lines.append(f"| EAP-IG over the inputs, 5 steps | {r['ours_s']:.1f} / {r['ours_cpu_s']:.1f} | — | — | — |")
        lines.append("")
    if "attribution_graph" in out:
        g = out["attribution_graph"]
        diff = "different nodes" if g["max_abs_diff"] is None else f"{g['max_abs_diff']:.1e} / {g['max_abs_entry']:.2f}"
        lines += [
            f"attribution graph: {g['positions']} positions, {g['active_features']} active features, {g['nodes']} nodes",
            "",
            "| work | ours: wall / CPU s / peak MB | circuit-tracer: wall / CPU s / peak MB | × faster (wall / CPU) "
            "| max abs diff / max entry |",
            "|---|---|---|---|---|",
            f"| attribution graph | {g['ours_s']:.1f} / {g['ours_cpu_s']:.1f} / {g['ours_peak_mb']:.0f} | "
            f"{g['tracer_s']:.1f} / {g['tracer_cpu_s']:.1f} / {g['tracer_peak_mb']:.0f} | "
            f"{g['speedup_wall']:.2f} / {g['speedup_cpu']:.2f} | {diff} |",
            "",
        ]
    if "long_prompt" in out:
        m = out["long_prompt"]
        lines += [
            f"one {m['positions']}-token prompt, {out['threads']} thread(s): peak resident memory beyond the loaded "
            "model (MB, × the plain forward + backward) / CPU s, each in a fresh process",
            "",
            "| plain forward + backward | EAP | EAP-IG inputs, 5 steps | EAP-IG edges, 3 steps | 2 edge masks |",
            "|---|---|---|---|---|",
            "| "
            + " | ".join(
                f"{m[w]['mb']:,.0f} MB ({m[w]['mb'] / m['forward_backward']['mb']:.1f}×) / {m[w]['cpu_s']:.1f} s"
                for w in LONG_WORK
            )
            + " |",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=5, help="auto-circuit's integrated_grad_samples")
    ap.add_argument("--prompts", default=str(ROOT / "examples" / "prompts_ioi.txt"))
    ap.add_argument(
        "--only", choices=["edges", "graph", "long"], help="run one part (default both; long: only the --long table)"
    )
    ap.add_argument("--n-prompts", type=int, default=0, help="the first N prompts of the set (default all)")
    ap.add_argument("--graph-batch", type=int, default=64, help="attribution targets per backward pass")
    ap.add_argument(
        "--graph-tokens", type=int, default=0, help="the attribution graph of the first N tokens (default all)"
    )
    ap.add_argument(
        "--long", type=int, default=0, metavar="P", help="also: peak memory of EAP and EAP-IG on one P-token prompt"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = cache_dir() / "bench-circuits"
    model = HookedLlama.default()
    if not (work / "model" / "config.json").exists():
        hf = model.to_hf()
        hf.save_pretrained(work / "model")
    clean, corrupted, answers = ioi(Path(args.prompts))
    if args.n_prompts:
        n = args.n_prompts
        clean, corrupted, answers = clean[:n], corrupted[:n], (answers[0][:n], answers[1][:n])
    out: dict = {"threads": args.threads}
    if args.only not in ("edges", "long"):
        out["attribution_graph"] = graph_bench(model, work, clean[0], args.graph_batch, args.threads, args.graph_tokens)
        print(json.dumps(out["attribution_graph"]), file=sys.stderr, flush=True)
    if args.long or args.only == "long":
        out["long_prompt"] = {"positions": args.long or 1024}
        for what in LONG_WORK:
            out["long_prompt"][what] = peak_rss(what, out["long_prompt"]["positions"], args.threads)
            print(f"long prompt, {what}: {out['long_prompt'][what]}", file=sys.stderr, flush=True)
    if args.only in ("graph", "long"):
        print(json.dumps(out, indent=1))
        print(table(out))
        return
    tokens, _ = model.tokenize(clean)
    corrupt_tokens, _ = model.tokenize(corrupted)
    ids = [[model.to_single_token(a) for a in part] for part in answers]
    torch.save(
        {
            "clean": tokens,
            "corrupt": corrupt_tokens,
            "answers": torch.tensor(ids[0]),
            "wrong": torch.tensor(ids[1]),
            "logits": model(tokens).detach(),
        },
        work / "inputs.pt",
    )
    run_script("circuits", "autocircuit", work, args.samples, args.threads, timeout=3600)
    ref = torch.load(work / "autocircuit.pt")
    rep = model.n_heads // model.n_kv_heads
    out.update(
        prompts=len(clean),
        positions=tokens.shape[1],
        samples=args.samples,
        autocircuit_edges=ref["n_edges"],
        tl_vs_hf_max_logit_diff=ref["max_logit_diff"],
        tl_vs_ours_max_logit_diff=ref["max_diff_vs_ours"],
    )
    answer_ids = (torch.tensor(ids[0]), torch.tensor(ids[1]))
    runs = [("eap", {"method": "eap"}, "eap", -1.0)]
    if args.samples:
        ig = {"method": "eap-ig", "path": "edges", "steps": args.samples + 1}
        runs.append(("eap_ig_edges", ig, "ig", -(args.samples + 1.0)))
    for name, kw, theirs, factor in runs:
        t0, c0 = time.perf_counter(), time.process_time()
        scores = edge_attribution(model, tokens, corrupt_tokens, "logit_diff", answers=answer_ids, **kw)
        ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
        their_s, their_cpu = ref[f"seconds_{theirs}"], ref[f"cpu_seconds_{theirs}"]
        out[name] = {
            "ours_s": ours_s,
            "autocircuit_s": their_s,
            "speedup_wall": their_s / ours_s,
            "ours_cpu_s": ours_cpu,
            "autocircuit_cpu_s": their_cpu,
            "speedup_cpu": their_cpu / ours_cpu,
            **compare(scores, ref[theirs], rep, factor),
        }
    t0, c0 = time.perf_counter(), time.process_time()
    edge_attribution(model, tokens, corrupt_tokens, "logit_diff", answers=answer_ids, method="eap-ig", steps=5)
    out["eap_ig_inputs_5_steps"] = {"ours_s": time.perf_counter() - t0, "ours_cpu_s": time.process_time() - c0}
    print(json.dumps(out, indent=1))
    print(table(out))


if __name__ == "__main__":
    main()
