"""Separate Python environments for the comparator libraries that cannot share the test environment
(they pin transformer-lens < 4 or transformers ≤ 4.57): built once under ``$SCALPEL_CACHE/<name>-venv``
from ``tests/integration/<name>_ref/requirements.txt`` (torch==2.13.0 first, so the CPU wheel is used),
rebuilt when that file changes, then reused. Each environment runs its ``<name>_ref/reference.py``.
A build holds a lock (``<name>-venv.lock``: concurrent test processes wait for one build), runs each pip
step under ``$SCALPEL_ENV_BUILD_TIMEOUT`` seconds (default 3600) and, when it fails, removes the half-built
environment and raises one error naming the step, which every later call in the process repeats at once.
How long a build from nothing takes: benchmarks/RESULTS.md (comparator environments).

======== ============================================================ ==========================
name     holds                                                        used by
======== ============================================================ ==========================
saelens  sae-lens (transformer-lens 3.9)                              test_saes_formats.py
circuits auto-circuit 1.0.1, circuit-tracer 0.5.0 (transformer-lens  test_circuits_comparators.py,
         3.2, transformers 4.57)                                      benchmarks/bench_circuits.py
======== ============================================================ ==========================
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
TORCH = "torch==2.13.0"


def cache_dir() -> Path:
    return Path(os.environ.get("SCALPEL_CACHE", Path.home() / ".cache" / "llama-scalpel"))


def requirements(name: str) -> Path:
    path = HERE / f"{name}_ref" / "requirements.txt"
    if not path.is_file():
        raise ValueError(f"no comparator environment {name!r} (no {path})")
    return path


_FAILED: dict[str, str] = {}  # name -> the error of a build that failed in this process


def _build_timeout() -> float:
    return float(os.environ.get("SCALPEL_ENV_BUILD_TIMEOUT", "3600"))


def env_python(name: str) -> Path:
    """The python of the ``name`` environment, building it when missing or stale."""
    req = requirements(name)
    if name in _FAILED:
        raise RuntimeError(_FAILED[name])
    root = cache_dir() / f"{name}-venv"
    python = root / "bin" / "python"
    stamp = root / "scalpel-requirements.sha256"
    want = hashlib.sha256(req.read_bytes()).hexdigest()

    def ready() -> bool:
        return python.exists() and stamp.exists() and stamp.read_text() == want

    if ready():
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{name}-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then reuse its build
        if ready():
            return python
        try:
            _build(name, root, python, req)
        except RuntimeError as err:
            shutil.rmtree(root, ignore_errors=True)
            _FAILED[name] = str(err)
            raise
        stamp.write_text(want)
    return python


def _build(name: str, root: Path, python: Path, req: Path) -> None:
    limit = _build_timeout()
    steps = [("venv", [sys.executable, "-m", "venv", "--clear", str(root)])]
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps += [("pip install " + TORCH, pip + [TORCH]), (f"pip install -r {req}", pip + ["-r", str(req)])]
    for what, cmd in steps:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"building the {name} comparator environment under {root} failed: `{what}` did not finish in "
                f"{limit:.0f} s (check the network to the package index; SCALPEL_ENV_BUILD_TIMEOUT sets the limit)"
            ) from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
            raise RuntimeError(
                f"building the {name} comparator environment under {root} failed: `{what}` exited with "
                f"{done.returncode}; its last lines:\n" + "\n".join(tail)
            )


def run_script(name: str, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``<name>_ref/reference.py args…`` in the ``name`` environment; its failure is an error."""
    python = env_python(name)
    done = subprocess.run(
        [str(python), str(HERE / f"{name}_ref" / "reference.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {name} reference script failed: {done.stderr[-3000:]}")
    return done


def autocircuit_scores(scores: dict, rep: int) -> dict:
    """auto-circuit's ``{"A3.1->A5.2.K": score}`` in our edge names, summed per key/value group (its key and
    value receivers are per query head; ``rep`` query heads share a group)."""
    out: dict = {}
    for name, value in scores.items():
        src, dst = name.split("->")
        src = {"Resid Start": "input"}.get(src, src)
        src = re.sub(r"^MLP (\d+)$", r"m\1", re.sub(r"^A(\d+)\.(\d+)$", r"a\1.h\2", src))
        if dst == "Resid End":
            dst = "logits"
        elif dst.startswith("MLP"):
            dst = "m" + dst.split()[1]
        else:
            layer, head, kind = re.match(r"^A(\d+)\.(\d+)\.([QKV])$", dst).groups()
            dst = f"a{layer}.h{head}<q>" if kind == "Q" else f"a{layer}.kv{int(head) // rep}<{kind.lower()}>"
        key = f"{src}->{dst}"
        out[key] = out.get(key, 0.0) + value
    return out


if __name__ == "__main__":  # builds (or finds) each environment and prints how long that took
    import time

    for name in sys.argv[1:] or ["saelens", "circuits"]:
        t0 = time.perf_counter()
        where = env_python(name)
        print(f"{name}\t{where}\t{time.perf_counter() - t0:.0f} s", flush=True)
