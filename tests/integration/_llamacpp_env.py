"""llama.cpp for the tests: ``llama-cpp-py-sync`` (the ``[llamacpp]`` extra: llama.cpp's prebuilt CPU library,
~5 MB, nothing compiles). When it is importable (the extra is installed) it is used as is; otherwise it is
installed once under ``$SCALPEL_CACHE/llama-cpp-py-sync-<version>/site`` (with cffi, its one binding
dependency) and put on ``sys.path``, as the SAELens environment is.

``surgery.llamacpp`` loads the library (on glibc < 2.38 from a rebound copy it makes under ``$SCALPEL_CACHE``).

llama.cpp's command-line tools are not in the wheel. ``completion_binary()`` is ``llama-completion`` when one is
found (``$LLAMA_COMPLETION``, or a llama.cpp build at ``$SCALPEL_CACHE/llama-cpp-python-0.3.36/build/bin``):
the control-vector test then also runs llama.cpp's own ``--control-vector`` loader.

Run ``python tests/integration/_llamacpp_env.py`` to install it ahead of the tests.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VERSION = "0.11739"
PACKAGES = [f"llama-cpp-py-sync=={VERSION}", "cffi>=1.15", "pycparser"]


def cache_dir() -> Path:
    return Path(os.environ.get("SCALPEL_CACHE") or Path.home() / ".cache" / "llama-scalpel")


def root() -> Path:
    return cache_dir() / f"llama-cpp-py-sync-{VERSION}"


def install() -> dict:
    """``pip install --target`` the wheel (and cffi) under ``root()/site`` once; returns what was installed."""
    r = root()
    stamp = r / "scalpel-install.json"
    if stamp.exists():
        return json.loads(stamp.read_text())
    t0 = time.time()
    r.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps"]
    done = subprocess.run(cmd + ["--target", str(r / "site"), *PACKAGES], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"installing {PACKAGES} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    info = {"packages": PACKAGES, "seconds": round(time.time() - t0, 1)}
    stamp.write_text(json.dumps(info))
    return info


def completion_binary() -> Path | None:
    """llama.cpp's ``llama-completion`` when one is at hand (module docstring), else ``None``."""
    env = os.environ.get("LLAMA_COMPLETION")
    candidates = [Path(env)] if env else []
    candidates.append(cache_dir() / "llama-cpp-python-0.3.36" / "build" / "bin" / "llama-completion")
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def ensure() -> None:
    """Make ``import llama_cpp_py_sync`` work: the installed extra, else the cached install (made when missing)."""
    try:
        importlib.import_module("llama_cpp_py_sync")
        return
    except ImportError:
        pass
    install()
    site = str(root() / "site")
    if site not in sys.path:
        sys.path.append(site)  # after the environment's own packages (its cffi, when it has one, wins)
    importlib.invalidate_caches()
    importlib.import_module("llama_cpp_py_sync")


if __name__ == "__main__":  # with SCALPEL_CACHE=$(mktemp -d): a fresh install, timed (benchmarks/RESULTS.md)
    info = install()
    print("| what | seconds |\n|---|---|")
    print(f"| pip install --no-deps --target {' '.join(info['packages'])} | {info['seconds']} |")
