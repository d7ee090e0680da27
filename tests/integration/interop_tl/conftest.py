"""TransformerLens's own tests, adapted (README.md): its session fixtures, built by ``_tl_shim``, the
``interop`` mark on every test, one torch thread, and the skips of ``SKIPS.py`` (the only ones)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("transformer_lens") is None:  # the interop extra is not installed
    collect_ignore_glob = ["test_*.py"]
else:
    sys.path.insert(0, str(HERE))  # the copied tests import ``_tl_shim``
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.helpers import apply_interop_skips  # noqa: E402


def pytest_collection_modifyitems(config, items):
    spec = importlib.util.spec_from_file_location("interop_tl_skips", HERE / "SKIPS.py")
    skips = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(skips)
    apply_interop_skips(items, HERE, skips.SKIPS, skips.FAILING)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- TransformerLens's session fixtures
def _load(name, **kwargs):
    import _tl_shim

    return _tl_shim.load(name, **kwargs)


def _reference(name, processed):
    import _tl_shim

    return _tl_shim.reference(name, processed=processed)


@pytest.fixture(scope="session")
def distilgpt2_bridge():
    return _load("distilgpt2", compat=False)


@pytest.fixture(scope="session")
def distilgpt2_bridge_compat():
    return _load("distilgpt2")


@pytest.fixture(scope="session")
def distilgpt2_bridge_compat_no_processing():
    return _load("distilgpt2", processed=False)


@pytest.fixture(scope="session")
def distilgpt2_hooked_processed():
    return _reference("distilgpt2", processed=True)


@pytest.fixture(scope="session")
def distilgpt2_hooked_unprocessed():
    return _reference("distilgpt2", processed=False)


@pytest.fixture(scope="session")
def gpt2_model():
    return _load("gpt2")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    import _tl_shim

    return _tl_shim.tokenizer()
