"""GPU paths (run where CUDA exists; CI has none): half precision, caches moved to the CPU, generation."""

import pytest
import torch

from hooks import HookedLlama
from tests.conftest import tiny_hf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_logits_match_hf(dtype):
    hf = tiny_hf("gqa").to("cuda", dtype)
    model = HookedLlama.from_hf(hf)
    ids = torch.randint(3, 128, (2, 16), device="cuda")
    with torch.no_grad():
        ref, ours = hf(ids).logits.float(), model(ids).float()
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * ref.abs().max().item()
    assert (ours - ref).abs().max() <= tol


def test_cuda_cache_to_cpu_and_generation():
    hf = tiny_hf("gqa").to("cuda")
    model = HookedLlama.from_hf(hf)
    ids = torch.randint(3, 128, (1, 8), device="cuda")
    _, cache = model.run_with_cache(ids, device="cpu")
    assert all(t.device.type == "cpu" for t in cache.values())
    out = model.generate(ids, max_new_tokens=8, stop_at_eos=False)
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.tolist() == ref.tolist()
