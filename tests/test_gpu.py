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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cache_everything_matches_hf_eager_and_shares_logits(dtype):
    hf = tiny_hf("gqa").to("cuda", dtype)
    hf.set_attn_implementation("eager")
    model = HookedLlama.from_hf(hf)
    ids = torch.randint(3, 128, (2, 16), device="cuda")
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True, output_attentions=True, use_cache=False)
        logits, cache = model.run_with_cache(ids)
    assert cache["hook_logits"].untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for i in range(model.n_layers):
        assert (cache["pattern", i].float() - ref.attentions[i].float()).abs().max() <= tol
        resid_tol = tol * max(1.0, ref.hidden_states[i + 1].float().abs().max().item())
        if i < model.n_layers - 1:  # HF's last hidden state is after the final norm
            assert (cache["resid_post", i].float() - ref.hidden_states[i + 1].float()).abs().max() <= resid_tol
    logit_tol = tol * max(1.0, ref.logits.float().abs().max().item())
    assert (logits.float() - ref.logits.float()).abs().max() <= logit_tol
