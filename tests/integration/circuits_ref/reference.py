"""Reference edge scores and attribution graphs from auto-circuit and circuit-tracer (run in their own
environment, see ``_comparator_env.py``).

    python reference.py autocircuit DIR IG_SAMPLES THREADS
        DIR/model (a transformers Llama directory) and DIR/inputs.pt ({clean, corrupt: [B, P] ids,
        answers, wrong: [B] ids}) -> DIR/autocircuit.pt: {"eap": {edge: score}, "ig": {edge: score},
        "seconds_eap", "seconds_ig", "cpu_seconds_eap", "cpu_seconds_ig", "max_logit_diff"} with auto-circuit's edge names and signs
        (mask gradients of −mean logit difference; IG summed over IG_SAMPLES + 1 mask values).

    python reference.py tracer DIR BATCH THREADS
        DIR/model (with its tokenizer), DIR/transcoders.pt ({"hook_in", "layers": {layer: our SAE's tensors}},
        JumpReLU) and DIR/prompt.pt ([P] ids) -> DIR/tracer.pt: circuit-tracer's attribution graph
        (adjacency, active and selected features, logit targets), its seconds and CPU seconds, and the
        peak resident memory it added (MB beyond the resident memory before the call; the peak is reset there).

The TransformerLens model is built from the directory's own config and weights (no hub access), unprocessed
(no folding or centring, so activations are the HF model's), its logits checked against transformers'.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def tl_model(model_dir: Path):
    import json

    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM

    # transformers 5 writes the RoPE base under rope_parameters, which 4.57 does not read (it would use 10000)
    raw = json.loads((model_dir / "config.json").read_text())
    theta = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta")
    extra = {"rope_theta": float(theta)} if theta else {}
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, **extra).eval()
    c = hf.config
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    gqa = c.num_key_value_heads != c.num_attention_heads
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=min(c.max_position_embeddings, 2048),
        d_vocab=c.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        eps=c.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=float(getattr(c, "rope_theta", 10000.0)),
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        n_key_value_heads=c.num_key_value_heads if gqa else None,
        ungroup_grouped_query_attention=gqa,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        dtype=torch.float32,
    )
    model = HookedTransformer(cfg)
    model.load_state_dict(convert_llama_weights(hf, cfg), strict=False)
    model.eval()
    return model, hf


def _kv_cache_alias() -> None:
    """auto-circuit 1.0.1 imports ``transformer_lens.past_key_value_caching``, which TransformerLens 3 renamed
    (``transformer_lens.cache.key_value_cache``); it only types its optional KV caches with it."""
    import types

    import transformer_lens
    from transformer_lens.cache import key_value_cache

    cls = key_value_cache.TransformerLensKeyValueCache
    alias = types.ModuleType("transformer_lens.past_key_value_caching")
    alias.HookedTransformerKeyValueCache = cls
    sys.modules.setdefault("transformer_lens.past_key_value_caching", alias)
    if not hasattr(transformer_lens, "HookedTransformerKeyValueCache"):
        transformer_lens.HookedTransformerKeyValueCache = cls


def autocircuit(directory: Path, samples: int, threads: int) -> None:
    _kv_cache_alias()
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model

    torch.set_num_threads(threads)
    model, hf = tl_model(directory / "model")
    data = torch.load(directory / "inputs.pt")
    with torch.no_grad():
        ours = model(data["clean"])
        ref = hf(data["clean"]).logits
    max_diff = float((ours - ref).abs().max())
    model.cfg.use_attn_result = True
    model.cfg.use_split_qkv_input = True
    model.cfg.use_hook_mlp_in = True
    model.cfg.use_attn_in = True
    for p in model.parameters():
        p.requires_grad_(False)
    B = data["clean"].shape[0]
    dataset = PromptDataset(
        list(data["clean"]),
        list(data["corrupt"]),
        [a.view(1) for a in data["answers"]],
        [w.view(1) for w in data["wrong"]],
    )
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=B, shuffle=False)
    pm = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True, device=torch.device("cpu"))

    def named(scores) -> dict:
        return {f"{e.src.name}->{e.dest.name}": float(scores[e.dest.module_name][e.patch_idx]) for e in pm.edges}

    out: dict = {"max_logit_diff": max_diff, "n_edges": len(pm.edges)}
    if "logits" in data:  # our model's logits on the clean prompts: the same model on both sides
        out["max_diff_vs_ours"] = float((ours - data["logits"]).abs().max())
    t0, c0 = time.perf_counter(), time.process_time()
    eap = mask_gradient_prune_scores(pm, loader, None, grad_function="logit", answer_function="avg_diff", mask_val=0.0)
    out["seconds_eap"], out["cpu_seconds_eap"] = time.perf_counter() - t0, time.process_time() - c0
    out["eap"] = named(eap)
    if samples > 0:
        t0, c0 = time.perf_counter(), time.process_time()
        ig = mask_gradient_prune_scores(
            pm, loader, None, grad_function="logit", answer_function="avg_diff", integrated_grad_samples=samples
        )
        out["seconds_ig"], out["cpu_seconds_ig"] = time.perf_counter() - t0, time.process_time() - c0
        out["ig"] = named(ig)
    torch.save(out, directory / "autocircuit.pt")


def tracer(directory: Path, batch_size: int, threads: int) -> None:
    """circuit-tracer's attribution graph of DIR/prompt.pt's tokens through DIR/transcoders.pt (our SAE
    tensors per layer, JumpReLU), on the model of DIR/model -> DIR/tracer.pt."""
    from circuit_tracer.attribution.attribute import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(threads)
    base, hf = tl_model(directory / "model")
    saved = torch.load(directory / "transcoders.pt")
    tcs = {}
    for layer, t in saved["layers"].items():
        d_in, d_sae = t["W_enc"].shape
        tc = SingleLayerTranscoder(
            d_in,
            d_sae,
            JumpReLU(t["threshold"].clone(), 0.1),
            layer,
            skip_connection="W_skip" in t,
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        with torch.no_grad():
            tc.W_enc.copy_(t["W_enc"].T)
            tc.W_dec.copy_(t["W_dec"])
            tc.b_enc.copy_(t["b_enc"])
            tc.b_dec.copy_(t["b_dec"])
            if "W_skip" in t:
                tc.W_skip.copy_(t["W_skip"])
        tcs[int(layer)] = tc
    tset = TranscoderSet(tcs, feature_input_hook=saved["hook_in"], feature_output_hook="hook_mlp_out")
    model = TransformerLensReplacementModel(base.cfg)
    model.load_state_dict(convert_llama_weights(hf, base.cfg), strict=False)
    # the tokenizer.json itself: a config written by transformers 5 names a class 4.57 does not have
    import json

    conf = json.loads((directory / "model" / "tokenizer_config.json").read_text())
    special = {k: conf[k] for k in ("bos_token", "eos_token", "pad_token") if isinstance(conf.get(k), str)}
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(directory / "model" / "tokenizer.json"), **special)
    model._configure_replacement_model(tset)
    tokens = torch.load(directory / "prompt.pt")
    with torch.no_grad():
        max_diff = float((base(tokens[None])[0] - hf(tokens[None]).logits[0]).abs().max())

    def mb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as f:  # the peak from here on, not the load's (Linux)
        f.write("5")
    base_rss = mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    graph = attribute(tokens, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=batch_size)
    out = {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "peak_rss_mb": mb("VmHWM") - base_rss,
        "max_logit_diff": max_diff,
        "adjacency": graph.adjacency_matrix,
        "active_features": graph.active_features,
        "selected_features": graph.selected_features,
        "logit_tokens": [int(t.vocab_idx) for t in graph.logit_targets],
        "logit_probabilities": graph.logit_probabilities,
    }
    torch.save(out, directory / "tracer.pt")


if __name__ == "__main__":
    what, directory = sys.argv[1], Path(sys.argv[2])
    if what == "autocircuit":
        autocircuit(directory, int(sys.argv[3]), int(sys.argv[4]))
    elif what == "tracer":
        tracer(directory, int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown reference {what!r}")
