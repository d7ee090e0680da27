"""Small cases of every distributed loop, run twice by tests/integration/test_distributed.py: in the test
process (one process) and by ``torchrun --nproc_per_node 2`` (gloo, CPU) through this file's ``__main__``,
which runs every case on every rank and saves each rank's results to ``OUT/<case>.rank<r>.pt``.

Each case is written once: the parts a rank takes come from ``_core.distributed`` inside the library, so
the same function is the one-process reference when no launcher is present.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/integration/_distributed_cases.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _core import distributed as dist  # noqa: E402
from tests.helpers import IOI, build_tiny  # noqa: E402

CHAT = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
SAE_HOOK = "blocks.1.hook_resid_post"
TRAIN = dict(d_sae=96, k=12, steps=40, batch_size=64, lr=1e-2, max_tokens=16, text_batch=4, buffer_tokens=256)


def tiny_model(where: Path):
    """The tiny checkpoint with a BPE tokenizer (built in ``where``), with a small chat template."""
    from hooks import HookedLlama

    path = where / "tiny-llama"
    if not (path / "config.json").exists():
        build_tiny(path)
    model = HookedLlama.from_pretrained(str(path)).eval()
    model.tokenizer.chat_template = CHAT
    return model


def corpus(n: int = 120, seed: int = 0) -> list[list[int]]:
    """Token-id documents of 8–40 tokens (ids 2..319: no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, 320, (int(torch.randint(8, 41, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def held_out(model) -> torch.Tensor:
    """Activations at ``SAE_HOOK`` of held-out documents packed as in training (the same on every rank)."""
    from hooks.harvest import harvest, pack_rows

    rows = pack_rows(model, corpus(40, seed=9), TRAIN["max_tokens"])
    return torch.cat([a[SAE_HOOK] for a in harvest(model, [SAE_HOOK], rows)])


def _nmse(sae, x: torch.Tensor) -> float:
    with torch.no_grad():
        r = sae.reconstruct(x)
    return float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# --------------------------------------------------------------------------- cases
def case_sae_step(model, work: Path) -> dict:
    """Three optimiser steps on a fixed global batch of 64 tokens, each rank holding its block of it."""
    from analyses.saes.sae import SAE, SAEConfig
    from analyses.saes.train import _make_opt, _Run, _step

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 32, generator=g) * 3 + 1
    out = {}
    for arch in ("topk", "jumprelu"):
        sae = SAE(SAEConfig(arch, 32, 80, "blocks.0.hook_resid_post", k=5 if arch == "topk" else None))
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        run = _Run(sae.cfg.hook_name, None, sae, work)
        if arch == "jumprelu":
            run.log_threshold = torch.nn.Parameter(torch.full((80,), -1.0))
        _make_opt(run, 1e-2)
        hp = {"amp": False, "bandwidth": 0.5, "l0_coef": 1e-3, "aux_coef": 1 / 32, "dead_after": 100}
        part = x[list(dist.shard(64))]
        losses = [_step(run, part, part, hp) for _ in range(3)]
        out[arch] = {
            "losses": losses,
            "params": {n: p.detach().clone() for n, p in sae.named_parameters()},
            "log_threshold": None if run.log_threshold is None else run.log_threshold.detach().clone(),
            "since_fired": run.since_fired.clone(),
        }
    return out


def case_train_sae(model, work: Path, seed: int = 0, out: str = "sae-ddp") -> dict:
    """``train_sae`` data-parallel: each rank harvests its block of every window, gradients summed."""
    from analyses.saes import load_sae, train_sae

    res = train_sae(model, SAE_HOOK, corpus(), work / out, seed=seed, overwrite=True, progress=False, **TRAIN)
    x = held_out(model)
    back = load_sae(res.path, model) if dist.is_main() else None
    return {
        "params": {n: p.detach().clone() for n, p in res.sae.named_parameters()},
        "losses": res.losses,
        "steps": res.steps,
        "held_out_nmse": _nmse(res.sae, x),
        "written_equals_returned": None if back is None else bool(torch.equal(back.W_enc, res.sae.W_enc)),
        "stats": res.stats,
    }


def case_resume(model, work: Path) -> dict:
    """A run stopped after 5 steps and resumed ends as the uninterrupted run (under torchrun too)."""
    from analyses.saes import train_sae

    kw = dict(TRAIN, steps=12, checkpoint_every=4, overwrite=True, progress=False)
    whole = train_sae(model, SAE_HOOK, corpus(), work / "resume-whole", **kw)
    part = train_sae(model, SAE_HOOK, corpus(), work / "resume-part", stop_after=5, **kw)
    kw["overwrite"] = False
    rest = train_sae(model, SAE_HOOK, corpus(), work / "resume-part", **kw)
    same = all(torch.equal(p, dict(rest.sae.named_parameters())[n]) for n, p in whole.sae.named_parameters())
    return {"steps": [part.steps, rest.resumed_from, rest.steps], "same": same, "losses": whole.losses == rest.losses}


def case_train_hooks(model, work: Path) -> dict:
    """``train_saes(..., parallel="hooks")``: whole hook points per rank (each equal to a one-process run)."""
    from analyses.saes.train import train_saes

    hooks = ["blocks.0.hook_resid_post", ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")]
    kw = dict(TRAIN, architecture="jumprelu", k=8)
    res = train_saes(
        model, hooks, corpus(), work / "saes-hooks", parallel="hooks", overwrite=True, progress=False, **kw
    )
    return {h: {n: p.detach().clone() for n, p in r.sae.named_parameters()} for h, r in res.items()}


def case_harvest_cache(model, work: Path) -> dict:
    """``harvest_to_disk``: each rank harvests its block of the shards, rank 0 seals the directory."""
    from _core.writer import our_manifest
    from hooks.harvest import harvest_to_disk

    names = ["blocks.0.hook_mlp_out", SAE_HOOK]
    cache = harvest_to_disk(model, names, corpus(), work / "acts", max_tokens=16, text_batch=4, rows_per_shard=12)
    return {"files": our_manifest(cache.path)["files"], "total": cache.total, "stats": vars(cache.stats)}


def case_patching(model, work: Path) -> dict:
    """Activation patching chunked into several forwards (the engine splits the chunks)."""
    from analyses import activation_patching

    clean, corrupt = IOI[0][0], IOI[1][0]
    out = {}
    for comp in ("resid_pre", "z"):
        res = activation_patching(model, clean, corrupt, answers=(" Mary", " John"), component=comp, max_batch=3)
        out[comp] = res.values.clone()
    return out


def case_ablation(model, work: Path) -> dict:
    """An ablation sweep over heads and neurons: units split over ranks."""
    from analyses import Scorer, ablation_sweep

    scorer = Scorer.build(model, "logit-diff", [p for p, _, _ in IOI], answers=[" Mary", " John"])
    return {c: ablation_sweep(model, scorer, c, batch_size=10).effects.clone() for c in ("heads", "layers")}


def case_refusal(model, work: Path) -> dict:
    """Generation and refusal scoring over a prompt set, and the KL of an edit over prompts."""
    from analyses.refusal import generate_responses, prompt_kl, refusal_rate

    prompts = [p for p, _, _ in IOI] + ["The quick brown fox", "Mary went to the store"]
    hooks = [("blocks.1.hook_mlp_out", lambda t, hook: t * 0.5)]
    return {
        "responses": generate_responses(model, prompts, max_new_tokens=5, batch_size=2, system_prompt=None),
        "refused": refusal_rate(
            model, prompts, markers=["Mary"], max_new_tokens=5, batch_size=3, system_prompt=None
        ).refused,
        "kl_first": prompt_kl(model, prompts, fwd_hooks=hooks, batch_size=2, system_prompt=None).per_prompt.clone(),
        "kl_cont": prompt_kl(
            model, prompts, fwd_hooks=hooks, where="continuation", max_new_tokens=4, batch_size=3, system_prompt=None
        ).per_prompt.clone(),
    }


def case_abliterate(model, work: Path) -> dict:
    """A 3-trial abliteration search: each trial's refusal scoring is split over the ranks."""
    import surgery as S
    from analyses import refusal as R

    res = S.abliterate(
        model,
        R.load_prompts("harmful:train")[:6],
        R.load_prompts("harmless:train")[:6],
        eval_harmful=R.load_prompts("harmful:eval")[:5],
        eval_harmless=R.load_prompts("harmless:eval")[:4],
        trials=3,
        max_new_tokens=4,
        sampler="sobol",
        batch_size=2,
    )
    with res.edit.applied(model):
        weights = {k: v.clone() for k, v in model.state_dict().items()}
    trials = [{k: v for k, v in t.items() if isinstance(v, (int, float, str, type(None)))} for t in res.trials]
    return {"trials": trials, "chosen": res.chosen, "kl": res.kl, "after": res.after.refused, "weights": weights}


CASES = {
    "sae_step": case_sae_step,
    "train_sae": case_train_sae,
    "resume": case_resume,
    "train_hooks": case_train_hooks,
    "harvest_cache": case_harvest_cache,
    "patching": case_patching,
    "ablation": case_ablation,
    "refusal": case_refusal,
    "abliterate": case_abliterate,
}


def main(out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)
    assert dist.enabled(), "run under torchrun with 2 processes"
    if dist.is_main():  # transformers saves a checkpoint from the main process only
        tiny_model(out)
    dist.barrier()
    model = tiny_model(out)
    for name in names or list(CASES):
        result = CASES[name](model, out / "work")
        torch.save(result, out / f"{name}.rank{dist.rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
