"""nnsight 0.8.1 on a HookedLlama itself: hook points are readable and settable inside a trace, and
``TransformersModel`` / ``LanguageModel`` trace and generate it. References: our own cache, hooks and
generate, which the rest of the suite checks against Hugging Face.

nnsight instruments the modules it wraps for good (a hook point it reaches is then always computed),
so each test wraps its own ``HookedLlama`` sharing the session model's weights."""

import copy
import warnings

import pytest
import torch

from hooks import HookedLlama

pytestmark = [pytest.mark.interop, pytest.mark.slow]
nnsight = pytest.importorskip("nnsight")

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture
def twin(smol):
    """A second HookedLlama on the same weight tensors, with its own hook points and tokenizer."""
    return HookedLlama.from_hf(smol.to_hf(), copy.deepcopy(smol.tokenizer))


def test_trace_reads_hook_points(smol, twin):
    ids = smol.to_tokens(PROMPT)
    with torch.no_grad():
        logits, cache = smol.run_with_cache(ids)
        nn_model = nnsight.NNsight(twin)
        with nn_model.trace(ids):
            pattern = nn_model.model.layers[9].self_attn.hook_pattern.output.save()
            z = nn_model.model.layers[9].self_attn.hook_z.output.save()
            post = nn_model.model.layers[20].mlp.hook_post.output.save()
            resid = nn_model.model.layers[29].hook_resid_post.output.save()
            out = nn_model.output.save()
    for ours, theirs in (
        (cache["pattern", 9], pattern),
        (cache["z", 9], z),
        (cache["post", 20], post),
        (cache["resid_post", 29], resid),
        (logits, out),
    ):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-4 * max(1.0, ours.abs().max().item())


def test_trace_sets_hook_points(smol, twin):
    ids = smol.to_tokens(PROMPT)

    def zero_head(z, hook):
        z[:, :, 2] = 0

    with torch.no_grad():
        ref = smol.run_with_hooks(ids, fwd_hooks=[("blocks.9.attn.hook_z", zero_head)])
        clean = smol(ids)
        nn_model = nnsight.NNsight(twin)
        with nn_model.trace(ids):
            nn_model.model.layers[9].self_attn.hook_z.output[:, :, 2] = 0
            out = nn_model.output.save()
    assert (clean - ref).abs().max() > 1e-2  # the intervention matters
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_transformers_model_traces_and_generates(smol, twin):
    ids = smol.to_tokens(PROMPT)

    def zero(x, hook):
        return torch.zeros_like(x)

    with torch.no_grad():
        with smol.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", zero)]):
            ref = smol.generate(ids, max_new_tokens=6, stop_at_eos=False)
        plain = smol.generate(ids, max_new_tokens=6, stop_at_eos=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = nnsight.TransformersModel(twin, tokenizer=twin.tokenizer)
        with lm.trace(ids):
            logits = lm.output.save()
        with lm.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, stop_at_eos=False) as tracer:
            for _ in tracer.iter[:6]:
                lm.model.layers[0].hook_mlp_out.output[:] = 0
            out = tracer.result.save()
    assert (logits - smol(ids)).abs().max() <= 1e-4 * logits.abs().max()
    assert not torch.equal(ref, plain)  # the ablation changes the continuation
    assert torch.equal(out.cpu(), ref.cpu())


def test_language_model_and_plain_nnsight_generate(smol, twin):
    ids = smol.to_tokens(PROMPT)
    with torch.no_grad():
        ref = smol.generate(ids, max_new_tokens=4, stop_at_eos=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = nnsight.LanguageModel(twin, tokenizer=twin.tokenizer)
        with lm.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False) as tracer:
            out = tracer.result.save()
        nn_model = nnsight.NNsight(twin)
        with nn_model.trace(ids, fn=twin.generate, max_new_tokens=4, stop_at_eos=False) as tracer:
            out2 = tracer.result.save()
    assert torch.equal(out.cpu(), ref.cpu())
    assert torch.equal(out2.cpu(), ref.cpu())
