"""Shared fixtures: tiny random configs covering every supported variant and family (Llama, Mistral,
Qwen2, Qwen3), and the real default model (SmolLM2-135M-Instruct), loaded once per session."""

from __future__ import annotations

import pytest
import torch

from hooks import HookedLlama
from tests.helpers import VARIANTS, tiny_hf


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: batched patching of tiny models is faster without OpenMP
    hand-offs, and timings stay steady when other processes share the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture
def tiny() -> HookedLlama:
    """A tiny GQA HookedLlama with random weights (no tokenizer)."""
    return HookedLlama.from_hf(tiny_hf("gqa"))


@pytest.fixture(scope="session")
def smol() -> HookedLlama:
    """The real default model, SmolLM2-135M-Instruct, fp32 on CPU."""
    return HookedLlama.default()


@pytest.fixture(scope="session")
def smol_hf():
    """HF's own LlamaForCausalLM loaded from the same GGUF (the independent reference)."""
    from transformers import AutoModelForCausalLM

    from hooks.loading import default_gguf_path

    path = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def pytest_collection_modifyitems(config, items):
    """Tests that run a comparator in its own environment go last (stable order otherwise): on a clean
    machine that environment is still being built (`.ci/run` starts the builds first), and these tests wait
    on its lock rather than holding up everything else."""
    late = {"test_circuits_comparators.py"}
    items.sort(key=lambda item: item.path.name in late or item.get_closest_marker("saelens") is not None)
