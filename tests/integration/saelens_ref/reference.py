"""Reference numbers from SAELens's own SAE classes, run inside a separate environment with sae-lens.

Usage: python reference.py OUT_DIR [OUR_SAE_DIR ...]
Writes OUT_DIR/<case>/ (a SAELens directory saved by SAELens) with ref.safetensors: the input ``x``,
``acts`` = encode(x), ``recons`` = decode(acts), ``out`` = forward(x) without error term and
``ablated`` = forward(x) with the error term and features 0..d_sae/4 zeroed by a hook (SAEs only).
Each OUR_SAE_DIR (written by llama-scalpel, holding x.safetensors) gets sae_lens_out.safetensors with
encode / decode / forward of SAELens's loader on that input.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_lens import SAE, GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import (JumpReLUTranscoder, JumpReLUTranscoderConfig, SkipTranscoder,
                                      SkipTranscoderConfig, Transcoder, TranscoderConfig)

D_IN, D_SAE, D_OUT = 64, 192, 48
HOOK, HOOK_OUT = "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"


def meta(**extra):
    return SAEMetadata(hook_name=HOOK, model_name="tiny", **extra)


def cases():
    yield "standard", StandardSAE(StandardSAEConfig(D_IN, D_SAE, metadata=meta()))
    yield "standard_no_bdec", StandardSAE(StandardSAEConfig(D_IN, D_SAE, apply_b_dec_to_input=False, metadata=meta()))
    yield "standard_layer_norm", StandardSAE(StandardSAEConfig(D_IN, D_SAE, normalize_activations="layer_norm",
                                                               metadata=meta()))
    yield "standard_constant_norm", StandardSAE(StandardSAEConfig(D_IN, D_SAE,
                                                                  normalize_activations="constant_norm_rescale",
                                                                  metadata=meta()))
    yield "gated", GatedSAE(GatedSAEConfig(D_IN, D_SAE, metadata=meta()))
    yield "jumprelu", JumpReLUSAE(JumpReLUSAEConfig(D_IN, D_SAE, metadata=meta()))
    yield "topk", TopKSAE(TopKSAEConfig(D_IN, D_SAE, k=12, metadata=meta()))
    yield "topk_rescaled", TopKSAE(TopKSAEConfig(D_IN, D_SAE, k=12, rescale_acts_by_decoder_norm=True,
                                                 metadata=meta()))
    yield "batchtopk", BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(D_IN, D_SAE, k=12, metadata=meta()))
    tmeta = meta(hook_name_out=HOOK_OUT)
    yield "transcoder", Transcoder(TranscoderConfig(D_IN, D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=tmeta))
    yield "skip_transcoder", SkipTranscoder(SkipTranscoderConfig(D_IN, D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=tmeta))
    yield "jumprelu_transcoder", JumpReLUTranscoder(JumpReLUTranscoderConfig(D_IN, D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=tmeta))


def randomise(sae):
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.uniform_(0.0, 0.3)
            elif name == "topk_threshold":
                p.fill_(0.2)
            else:
                p.normal_(0.0, 0.3)
        for name, b in sae.named_buffers():
            if name == "topk_threshold":
                b.fill_(0.2)


def outputs(sae, x, transcoder):
    sae.use_error_term = False
    acts = sae.encode(x)
    res = {"x": x, "acts": acts, "recons": sae.decode(acts), "out": sae(x)}
    if not transcoder:
        def ablate(t, hook):
            t = t.clone()
            t[..., : D_SAE // 4] = 0
            return t

        sae.use_error_term = True
        sae.hook_sae_acts_post.add_hook(ablate)
        res["ablated"] = sae(x)
        sae.hook_sae_acts_post.remove_hooks()
        sae.use_error_term = False
    return {k: v.detach().contiguous() for k, v in res.items()}


def main():
    out_dir = Path(sys.argv[1])
    torch.manual_seed(0)
    done = []
    for name, sae in cases():
        randomise(sae)
        path = out_dir / name
        if name == "batchtopk":
            sae.save_inference_model(path)
            sae = SAE.load_from_disk(path)
        else:
            sae.save_model(path)
        x = torch.randn(3, 5, D_IN) * 2.0
        transcoder = "transcoder" in name
        with torch.no_grad():
            save_file(outputs(sae, x, transcoder), str(path / "ref.safetensors"))
        done.append(name)
    for ours in map(Path, sys.argv[2:]):
        sae = SAE.load_from_disk(ours)
        x = load_file(str(ours / "x.safetensors"))["x"]
        with torch.no_grad():
            save_file(outputs(sae, x, "transcoder" in sae.cfg.architecture()), str(ours / "sae_lens_out.safetensors"))
        done.append(str(ours))
    print(json.dumps({"cases": done}))


if __name__ == "__main__":
    main()
