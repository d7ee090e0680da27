"""nnsight's own tests, adapted (README.md): the fixtures of nnsight's ``tests/conftest.py`` that
``test_nn_lm.py`` uses, built by ``_nn_shim``; the ``interop`` mark on every test, one torch thread, and
the skips of ``SKIPS.py`` (the only ones)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import apply_interop_skips

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("nnsight") is None:  # the interop extra is not installed
    collect_ignore_glob = ["test_*.py"]
else:
    sys.path.insert(0, str(HERE))  # the shim, importable by its own name
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

_MARKS = ("scan", "order", "source", "skips", "iter", "cache", "rename")


def pytest_configure(config):
    for mark in _MARKS:
        config.addinivalue_line("markers", f"{mark}: nnsight's own test group")


def pytest_collection_modifyitems(config, items):
    spec = importlib.util.spec_from_file_location("interop_nnsight_skips", HERE / "SKIPS.py")
    skips = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(skips)
    apply_interop_skips(items, HERE, skips.SKIPS, skips.FAILING)


@pytest.fixture(autouse=True)
def _the_model_under_test(monkeypatch):
    """While a test of this folder runs: ``nnsight.LanguageModel`` builds the target, one torch thread."""
    import _nn_shim
    import nnsight
    import torch

    monkeypatch.setattr(nnsight, "LanguageModel", _nn_shim.LanguageModel)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- nnsight's fixtures (tests/conftest.py)
@pytest.fixture(scope="module")
def device() -> str:
    return "cpu"


@pytest.fixture
def ET_prompt() -> str:
    return "The Eiffel Tower is located in the city of"


@pytest.fixture
def MSG_prompt() -> str:
    return "Madison Square Garden is located in the city of"


@pytest.fixture(scope="module")
def gpt2(device):
    """nnsight's ``gpt2`` fixture: the model under test, with GPT-2's module names."""
    import _nn_shim

    return _nn_shim.language_model()
