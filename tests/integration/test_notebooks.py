"""The example notebooks run top to bottom (their asserts check hand recomputations against the hooks,
edits against hooks, exports against the in-memory model), and they are stored without outputs.

Executing them needs the real default model: marked slow. Each runs in a fresh ``python3`` kernel (this
interpreter, which has the project installed) from a temporary copy, with the repository root as working
directory and ``TMPDIR`` pointing at a directory removed afterwards (the notebooks export checkpoints into
``tempfile.mkdtemp()``); the test also fails if an export file appears inside the repository.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = [
    "01_inside_llama.ipynb",
    "02_find_and_cut_a_circuit.ipynb",
    "03_steer_and_ship.ipynb",
    "04_sae_features.ipynb",
    "05_abliterate.ipynb",
    "06_circuits.ipynb",
]
TIMEOUT = 300  # seconds per cell
EXPORT_SUFFIXES = (".safetensors", ".gguf")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, f"{name}: cells {dirty} carry outputs or execution counts; strip them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def _python3_kernel_ok() -> bool:
    """Whether the ``python3`` kernelspec exists and starts this interpreter (which has the project)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        return False
    exe = spec.argv[0] if spec.argv else ""
    # jupyter_client replaces a bare "python"/"python3" with sys.executable
    if exe in ("python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        return True
    try:
        return Path(exe).resolve() == Path(sys.executable).resolve()
    except OSError:
        return False


@pytest.fixture(scope="module")
def kernel_env():
    """Make sure ``python3`` starts this interpreter: if not, install a kernelspec into a temporary
    prefix and put it first on ``JUPYTER_PATH`` (nothing is installed for the user)."""
    old = os.environ.get("JUPYTER_PATH")
    prefix = None
    if not _python3_kernel_ok():
        from ipykernel.kernelspec import install

        prefix = tempfile.mkdtemp(prefix="scalpel-kernelspec-")
        install(prefix=prefix, kernel_name="python3")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            [os.path.join(prefix, "share", "jupyter")] + ([old] if old else [])
        )
    try:
        yield
    finally:
        if prefix is not None:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old
            shutil.rmtree(prefix, ignore_errors=True)


def _exports_in_repo(since: float) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__", ".pytest_cache")]
        for f in filenames:
            if not (f.endswith(EXPORT_SUFFIXES) or f == "scalpel_manifest.json"):
                continue
            p = os.path.join(dirpath, f)
            try:
                if os.path.getmtime(p) >= since:
                    found.append(os.path.relpath(p, ROOT))
            except OSError:  # removed meanwhile
                pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_env, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    work = Path(tempfile.mkdtemp(prefix="scalpel-nb-"))
    try:
        copy = work / name
        shutil.copy(EXAMPLES / name, copy)
        tmp = work / "tmp"
        tmp.mkdir()
        monkeypatch.setenv("TMPDIR", str(tmp))  # the kernel inherits it: exports land here
        # one OpenMP thread, as the other real-model tests use (one_thread): the same speed on two idle
        # cores, and steady when other processes share them
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        nb = nbformat.read(copy, as_version=4)
        client = nbclient.NotebookClient(
            nb, timeout=TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        )
        start = time.time()
        try:
            client.execute()
        except CellExecutionError as exc:
            pytest.fail(f"{name}: a cell failed\n{exc}", pytrace=False)
        elapsed = time.time() - start
        print(f"{name}: {elapsed:.1f} s")
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{name}: error outputs {[(e.ename, e.evalue) for e in errors]}"
        assert not _exports_in_repo(start), f"{name} wrote exports into the repository: {_exports_in_repo(start)}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
