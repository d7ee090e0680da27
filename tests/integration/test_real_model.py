"""The real default model (SmolLM2-135M-Instruct) against HF's own model loaded from the same GGUF."""

import pytest
import torch

from hooks import HookedLlama

pytestmark = pytest.mark.slow

PROMPTS = [
    "The Eiffel Tower is in the city of",
    "When Mary and John went to the store, John gave a drink to",
    "def fibonacci(n):\n    if n < 2:\n        return",
]


def test_default_model_shape(smol):
    c = smol.config
    assert (smol.n_layers, c.num_attention_heads, c.num_key_value_heads, smol.d_model) == (30, 9, 3, 576)
    assert smol.lm_head.weight is smol.model.embed_tokens.weight
    assert len(smol.hook_names()) == 30 * 22 + 4


def test_logits_match_hf_from_same_gguf(smol, smol_hf):
    for prompt in PROMPTS:
        ids = smol.to_tokens(prompt)
        with torch.no_grad():
            diff = (smol(ids) - smol_hf(ids).logits).abs().max().item()
        assert diff <= 1e-4, (prompt, diff)


def test_padded_batch_matches_hf(smol, smol_hf):
    tokens, mask = smol.tokenize(PROMPTS)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = smol(PROMPTS)
        ref = smol_hf(tokens, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= 1e-4
    assert ours[:, -1].argmax(-1).tolist() == ref[:, -1].argmax(-1).tolist()


def test_greedy_generation_token_identical_to_hf(smol, smol_hf):
    ids = smol.to_tokens("Once upon a time")
    ours = smol.generate(ids, max_new_tokens=32)
    ref = smol_hf.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=smol.tokenizer.pad_token_id)
    assert ours.tolist() == ref.tolist()
    assert smol.generate("The Eiffel Tower is in the city of", max_new_tokens=3).startswith(
        "The Eiffel Tower is in the city of Paris"
    )


def test_chat_messages_use_the_chat_template(smol):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = smol.apply_chat_template(messages)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert smol.to_tokens(messages).tolist() == smol.to_tokens(text).tolist()
    answer = smol.generate(messages, max_new_tokens=8)
    assert "Paris" in answer.split("assistant\n")[-1]


def test_hooked_run_on_real_model_matches_hf_attentions(smol, smol_hf):
    ids = smol.to_tokens(PROMPTS[0])
    smol_hf.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = smol_hf(ids, output_attentions=True, output_hidden_states=True)
    finally:
        smol_hf.config._attn_implementation = "sdpa"
    _, cache = smol.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_pattern", "hook_resid_post")))
    for layer in (0, 14, 29):
        assert (cache["pattern", layer] - out.attentions[layer]).abs().max() <= 1e-5
    assert (cache["resid_post", 10] - out.hidden_states[11]).abs().max() <= 1e-4


def test_default_cache_reload_is_identical(smol, tmp_path, monkeypatch):
    # a second load (from the fp32 cache) gives bit-identical logits and the same tokenizer
    again = HookedLlama.default()
    ids = smol.to_tokens(PROMPTS[1])
    with torch.no_grad():
        assert torch.equal(again(ids), smol(ids))
    assert again.to_tokens(PROMPTS[2]).tolist() == smol.to_tokens(PROMPTS[2]).tolist()
    assert again.source_sha256 == smol.source_sha256 and len(smol.source_sha256) == 64


def test_completion_only_return(smol):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = smol.generate(messages, max_new_tokens=8)
    reply = smol.generate(messages, max_new_tokens=8, return_type="completion")
    assert full.endswith(reply) and "Paris" in reply and "<|im_start|>" not in reply
