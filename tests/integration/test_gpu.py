"""GPU paths (run where CUDA exists; CI has none): half precision, caches moved to the CPU, generation."""

import pytest
import torch

from hooks import HookedLlama
from tests.helpers import EDIT_NAMES, TOL, make_edit, random_ids, tiny_hf

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


# --------------------------------------------------------------------------- surgery on the GPU
@pytest.mark.parametrize("name", EDIT_NAMES)
def test_cuda_edit_equals_its_hooks_and_the_cpu_edit(name, tmp_path):
    """Each edit built and applied on a CUDA model (MeanAblateHeads / RankOneEdit compute their vectors
    there from CPU token ids): weights == hooks on the GPU, the same logits as on the CPU, a record that
    serialises and replays on the CPU, and a model still wholly on the GPU afterwards."""
    import json

    import surgery as S

    cpu, gpu = HookedLlama.from_hf(tiny_hf("gqa")), HookedLlama.from_hf(tiny_hf("gqa").to("cuda"))
    edit_cpu, edit_gpu = make_edit(name, cpu, tmp_path / "cpu"), make_edit(name, gpu, tmp_path / "gpu")
    x = random_ids()
    with torch.no_grad():
        hooked = gpu.run_with_hooks(x.cuda(), fwd_hooks=edit_gpu.as_hooks(gpu))
        with edit_gpu.applied(gpu):
            weights = gpu(x.cuda())
            assert all(t.device.type == "cuda" for t in gpu.state_dict().values())
        with edit_cpu.applied(cpu):
            want = cpu(x)
        replayed = S.Edit.from_dict(json.loads(json.dumps(edit_gpu.to_dict())))
        with replayed.applied(cpu):
            again = cpu(x)
    assert (weights - hooked).abs().max() <= TOL
    assert (weights.cpu() - want).abs().max() <= TOL
    assert (again - want).abs().max() <= TOL


def test_cuda_export_reloads_on_the_cpu(tmp_path):
    """A plan exported from a CUDA model: the verified HF checkpoint reloads with plain transformers on the
    CPU with the CPU-edited model's logits (the GGUF export, which needs a tokenizer, is checked on the real
    model below)."""
    from transformers import AutoModelForCausalLM

    import surgery as S

    cpu, gpu = HookedLlama.from_hf(tiny_hf("gqa")), HookedLlama.from_hf(tiny_hf("gqa").to("cuda"))
    plan = S.EditPlan([make_edit(n, cpu, tmp_path) for n in ("ZeroHeads", "AbliterateNormPreserving", "AddSteering")])
    result = S.export(gpu, tmp_path / "out", edits=plan)
    assert result.max_abs_logit_diff <= 1e-4
    assert all(t.device.type == "cuda" for t in gpu.state_dict().values())
    x = random_ids()
    with torch.no_grad(), plan.applied(cpu):
        want = cpu(x)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(x).logits - want).abs().max() <= TOL
    assert S.verify(tmp_path / "out")["ok"]


# --------------------------------------------------------------------------- the real model on the GPU
@pytest.fixture(scope="module")
def smol_cuda():
    return HookedLlama.default(device="cuda")


@pytest.mark.slow
def test_cuda_default_model_matches_hf(smol_cuda):
    from transformers import AutoModelForCausalLM

    from hooks.loading import default_gguf_path

    path = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).to("cuda").eval()
    x, mask = smol_cuda.tokenize(["The Eiffel Tower is in the city of", "def add(a, b):\n    return a + b"])
    with torch.no_grad():
        ours = smol_cuda(x, attention_mask=mask)
        ref = hf(x.cuda(), attention_mask=mask.cuda()).logits
    real = mask.bool().cuda()
    assert ours.device.type == "cuda" and (ours[real] - ref[real]).abs().max() <= 1e-4


@pytest.mark.slow
def test_cuda_abliterate_search_exports_and_replays(smol_cuda, tmp_path):
    """The refusal search end to end on the GPU: the recorded KL is recomputed, the plan replays the
    chosen weights bit-exactly there, the export reloads with plain transformers on the CPU, and the GGUF
    export verifies."""
    from transformers import AutoModelForCausalLM

    import surgery as S
    from tests.helpers import small_search_replays

    model = smol_cuda
    res = small_search_replays(model, tmp_path)
    out = S.export(model, tmp_path / "out", edits=res.plan)
    gguf = S.export_gguf(model, tmp_path / "out.gguf", edits=res.plan)
    assert out.max_abs_logit_diff <= 1e-4 and gguf.max_abs_logit_diff <= 1e-4
    assert all(t.device.type == "cuda" for t in model.state_dict().values())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    x = model.to_tokens("The Eiffel Tower is in the city of")
    with torch.no_grad(), res.edit.applied(model):
        edited = model(x).cpu()
    with torch.no_grad():
        assert (hf(x.cpu()).logits - edited).abs().max() <= 1e-4
