"""The separate environment holding sae-lens (which pins transformer-lens < 4, so it cannot share the
test environment): built once under $SCALPEL_CACHE/saelens-venv from tests/integration/saelens_ref/requirements.txt
(torch==2.13.0 first, so the CPU wheel is used), then reused."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).parent / "saelens_ref"
REQUIREMENTS = HERE / "requirements.txt"
SCRIPT = HERE / "reference.py"


def cache_dir() -> Path:
    return Path(os.environ.get("SCALPEL_CACHE", Path.home() / ".cache" / "llama-scalpel"))


def saelens_python() -> Path:
    """Path of the python of the sae-lens environment, building it when missing or stale."""
    root = cache_dir() / "saelens-venv"
    python = root / "bin" / "python"
    stamp = root / "scalpel-requirements.sha256"
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    venv.create(root, with_pip=True, clear=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["torch==2.13.0"], ["-r", str(REQUIREMENTS)]):
        done = subprocess.run(pip + args, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the sae-lens environment failed: {done.stderr[-2000:]}")
    stamp.write_text(want)
    return python


def run_reference(out_dir: Path, our_dirs=()) -> None:
    python = saelens_python()
    done = subprocess.run(
        [str(python), str(SCRIPT), str(out_dir), *map(str, our_dirs)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the SAELens reference script failed: {done.stderr[-3000:]}")


if __name__ == "__main__":
    print(saelens_python(), file=sys.stderr)
