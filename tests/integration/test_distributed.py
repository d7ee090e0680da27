"""Data parallelism under the real launcher: ``torchrun --nproc_per_node 2`` (gloo, CPU, one thread each)
runs every case of ``_distributed_cases.py`` once; each case is compared with the same function run in
this process, where no launcher is present (one process). Sweeps, patching, generation and scoring must be
bit-identical and the same on both ranks; SAE training must keep the ranks in step, equal the one-process
update on the same global batch (to rounding) and end within the seed-to-seed spread of one-process runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _distributed_cases import CASES, tiny_model

from _core import distributed as dist
from hooks import InputError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_distributed_cases.py")
LAUNCH = [k for k in os.environ if k in dist.LAUNCH_ENV or k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """Run every case under torchrun once; the directory holding ``<case>.rank<r>.pt``."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_model(tmp_path_factory.mktemp("tiny"))


def ranks(out: Path, case: str) -> list:
    return [torch.load(out / f"{case}.rank{r}.pt", weights_only=False) for r in (0, 1)]


def one_process(model, tmp_path: Path, case: str, **kw):
    assert not dist.enabled()
    return CASES[case](model, tmp_path, **kw)


def assert_equal(a, b, where: str = "") -> None:
    """Nested dicts / lists of tensors, numbers and strings are identical."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: max difference {float((a.float() - b.float()).abs().max())}"
    else:
        assert a == b, where


@pytest.mark.parametrize("case", ["patching", "ablation", "refusal", "harvest_cache", "abliterate"])
def test_sweeps_are_bit_identical_to_one_process(launched, model, tmp_path, case):
    r0, r1 = ranks(launched, case)
    assert_equal(r0, r1, f"{case} rank 1 vs rank 0")  # every rank returns the whole result
    assert_equal(r0, one_process(model, tmp_path, case), f"{case} torchrun vs one process")


def test_sae_step_equals_the_one_process_step_on_the_global_batch(launched, model, tmp_path):
    """Each rank holds half of the 64 tokens; after three steps the SAE equals one process's on all 64
    (the loss is normalised by the global batch's variance and the gradients summed over ranks)."""
    r0, r1 = ranks(launched, "sae_step")
    assert_equal(r0, r1, "rank 1 vs rank 0")  # the ranks stay in step exactly
    ref = one_process(model, tmp_path, "sae_step")
    for arch in ("topk", "jumprelu"):
        assert r0[arch]["losses"] == pytest.approx(ref[arch]["losses"], rel=1e-5)
        for name, p in ref[arch]["params"].items():
            torch.testing.assert_close(r0[arch]["params"][name], p, rtol=1e-5, atol=1e-6, msg=f"{arch} {name}")
        assert torch.equal(r0[arch]["since_fired"], ref[arch]["since_fired"])
    torch.testing.assert_close(r0["jumprelu"]["log_threshold"], ref["jumprelu"]["log_threshold"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(r0["topk"]["params"]["W_enc"], ref["topk"]["params"]["W_enc"] * 0)  # it trained


def test_train_sae_data_parallel(launched, model, tmp_path):
    r0, r1 = ranks(launched, "train_sae")
    assert_equal(r0["params"], r1["params"], "rank 1 vs rank 0")
    assert r0["written_equals_returned"] is True and r1["written_equals_returned"] is None  # rank 0 writes
    assert r0["steps"] == 40 and r0["stats"]["padding"] == 0
    refs = [one_process(model, tmp_path, "train_sae", seed=s, out=f"sae-{s}") for s in (0, 1)]
    assert refs[0]["steps"] == 40
    spread = abs(refs[0]["held_out_nmse"] - refs[1]["held_out_nmse"])
    assert abs(r0["held_out_nmse"] - refs[0]["held_out_nmse"]) <= max(3 * spread, 0.02), (r0, refs)
    assert r0["held_out_nmse"] < 0.75 * refs[0]["losses"][0]  # and it learnt


def test_training_resumes_bit_identically_under_torchrun(launched):
    for r in ranks(launched, "resume"):
        assert r == {"steps": [5, 5, 12], "same": True, "losses": True}


def test_train_saes_hooks_per_rank_equal_one_process(launched, model, tmp_path):
    r0, r1 = ranks(launched, "train_hooks")
    assert_equal(r0, r1, "rank 1 vs rank 0")
    assert_equal(r0, one_process(model, tmp_path, "train_hooks"), "hooks per rank vs one process")


def test_one_process_without_the_launcher(monkeypatch):
    for k in dist.LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    assert not dist.launched() and not dist.enabled()
    assert (dist.rank(), dist.world_size(), list(dist.shard(5))) == (0, 1, [0, 1, 2, 3, 4])
    assert dist.gather_blocks([1, 2]) == [1, 2] and dist.broadcast("x") == "x"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert dist.launched() and not dist.enabled()  # a world of one is not distributed


def test_batch_size_must_split_over_the_ranks(model, tmp_path, monkeypatch):
    from analyses.saes import train_sae

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(InputError) as err:
        train_sae(model, "blocks.1.hook_resid_post", [[5, 6, 7]], tmp_path / "sae", batch_size=63)
    assert str(err.value) == "batch_size=63 does not split over 2 processes; pass a multiple of 2"
    assert err.value.param == "batch_size" and not (tmp_path / "sae").exists()
