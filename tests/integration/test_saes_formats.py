"""SAE loading and maths against SAELens's own classes (run in their own environment), sparsify's and
dictionary_learning's published formulas, and the error messages of bad SAE files."""

from __future__ import annotations

import json

import pytest
import torch
from _saelens_env import run_reference
from safetensors.torch import load_file, save_file

from analyses.saes import SAE, load_sae, save_sae
from hooks import HookError, InputError, LoadError
from tests.helpers import random_sae

CASES = [
    "standard",
    "standard_no_bdec",
    "standard_layer_norm",
    "standard_constant_norm",
    "gated",
    "jumprelu",
    "topk",
    "topk_rescaled",
    "batchtopk",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
]
OURS = {
    "standard": {},
    "gated": {},
    "jumprelu": {},
    "topk": {"k": 9},
    "transcoder": {"hook_name_out": "blocks.1.hook_mlp_out", "d_out": 48},
    "skip_transcoder": {
        "hook_name_out": "blocks.1.hook_mlp_out",
        "d_out": 48,
        "skip_connection": True,
        "apply_b_dec_to_input": False,
    },
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """SAELens-made SAEs with their outputs, and SAELens's outputs for SAEs we saved."""
    root = tmp_path_factory.mktemp("saelens")
    ours = []
    for i, (arch, kw) in enumerate(OURS.items()):
        path = save_sae(random_sae(arch, seed=i, **kw), root / "ours" / arch)
        save_file(
            {"x": torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(i)) * 2}, str(path / "x.safetensors")
        )
        ours.append(path)
    run_reference(root / "ref", ours)
    return root


def _ours(sae: SAE, x: torch.Tensor, transcoder: bool) -> dict:
    sae.use_error_term = False
    with torch.no_grad():
        acts = sae.encode(x)
        res = {"acts": acts, "recons": sae.decode(acts, x), "out": sae(x)}
        if not transcoder:

            def ablate(t, hook):
                t = t.clone()
                t[..., : sae.d_sae // 4] = 0
                return t

            sae.use_error_term = True
            handle = sae.hook_sae_acts_post.add_hook(ablate)
            res["ablated"] = sae(x)
            handle.remove()
    return res


@pytest.mark.saelens
@pytest.mark.parametrize("case", CASES)
def test_saelens_made_sae_matches_saelens(reference, case):
    path = reference / "ref" / case
    ref = load_file(str(path / "ref.safetensors"))
    sae = load_sae(path)
    transcoder = "transcoder" in case
    assert sae.cfg.is_transcoder == transcoder
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    ours = _ours(sae, ref["x"], transcoder)
    assert set(ours) == set(ref) - {"x"}
    assert (ref["acts"] > 0).any() and (ref["acts"] == 0).any()  # the case is sparse and not dead
    for key, value in ours.items():
        torch.testing.assert_close(value, ref[key], atol=1e-5, rtol=1e-5, msg=f"{case} {key}")
    if "ablated" in ref:  # the error term really matters: ablation moves the output off x and off out
        assert (ref["ablated"] - ref["x"]).abs().max() > 1e-2


@pytest.mark.saelens
@pytest.mark.parametrize("arch", list(OURS))
def test_sae_we_save_loads_in_saelens(reference, arch):
    path = reference / "ours" / arch
    ref = load_file(str(path / "sae_lens_out.safetensors"))
    sae = load_sae(path)
    ours = _ours(sae, ref["x"], sae.cfg.is_transcoder)
    for key, value in ours.items():
        torch.testing.assert_close(value, ref[key], atol=1e-5, rtol=1e-5, msg=f"{arch} {key}")


# --------------------------------------------------------------------------- sparsify
def _sparsify_dir(root, hookpoint, *, transcode=False, skip=False, d_in=64, d_out=64, d_sae=160, k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    path = root / hookpoint
    path.mkdir(parents=True)
    t = {
        "encoder.weight": torch.randn(d_sae, d_in, generator=g) * 0.3,
        "encoder.bias": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_out, generator=g) * 0.3,
        "b_dec": torch.randn(d_out, generator=g) * 0.1,
    }
    if skip:
        t["W_skip"] = torch.randn(d_out, d_in, generator=g) * 0.1
    save_file(t, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(
        json.dumps(
            {
                "expansion_factor": 32,
                "normalize_decoder": True,
                "num_latents": 0,
                "k": k,
                "multi_topk": False,
                "skip_connection": skip,
                "transcode": transcode,
                "d_in": d_in,
            }
        )
    )
    return path, t


def sparsify_formula(t, x, k, transcode):
    """sparsify's Sae.forward: top-k of relu(encoder(x - b_dec)), decoded with W_dec[idx] + b_dec (+ skip)."""
    sae_in = x if transcode else x - t["b_dec"]
    pre = torch.relu(sae_in @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(k, dim=-1)
    out = (vals[..., None] * t["W_dec"][idx]).sum(-2) + t["b_dec"]
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return out


def test_sparsify_sae_and_transcoder(tmp_path, tiny):
    path, t = _sparsify_dir(tmp_path, "layers.1")
    sae = load_sae(path, tiny)
    assert (sae.cfg.hook_name, sae.cfg.k, sae.cfg.source_format) == ("blocks.1.hook_resid_post", 7, "sparsify")
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x), sparsify_formula(t, x, 7, False), atol=1e-5, rtol=1e-5)
        assert int((sae.encode(x) > 0).sum(-1).max()) <= 7

    mlp_sae, _ = _sparsify_dir(tmp_path / "sae", "layers.2.mlp")  # an SAE (not a transcoder) reads the MLP output
    assert load_sae(mlp_sae, tiny).hook_name == "blocks.2.hook_mlp_out"
    path, t = _sparsify_dir(tmp_path, "layers.2.mlp", transcode=True, skip=True)
    tc = load_sae(path, tiny)
    assert (tc.hook_name, tc.hook_name_out) == ("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out")
    # sparsify reads the MLP input: the RMSNorm output *with* its weight
    ln2 = tiny.model.layers[2].post_attention_layernorm.weight.detach()
    assert not torch.allclose(ln2, torch.ones_like(ln2))
    with torch.no_grad():
        torch.testing.assert_close(tc.reconstruct(x), sparsify_formula(t, x * ln2, 7, True), atol=1e-5, rtol=1e-5)
    with pytest.raises(LoadError, match="pass the model"):
        load_sae(path)


def test_sparsify_transcoder_spliced_reads_mlp_input(tmp_path, tiny):
    """Spliced, the transcoder sees exactly the MLP's input and its output replaces hook_mlp_out."""
    path, t = _sparsify_dir(tmp_path, "layers.1.mlp", transcode=True)
    tc = load_sae(path, tiny)
    ids = torch.randint(3, 128, (2, 6))
    seen = {}

    def grab(x, hook):
        seen["mlp_in"] = x

    hf = tiny.to_hf()
    hf.model.layers[1].mlp.register_forward_hook(lambda m, args, out: seen.update(hf_in=args[0]))
    with torch.no_grad():
        hf(ids)
        tc.use_error_term = False
        with tiny.saes([tc]):
            _, cache = tiny.run_with_cache(ids, names_filter=lambda n: "mlp_out" in n or "hook_sae" in n)
    torch.testing.assert_close(
        cache["blocks.1.hook_mlp_out"], sparsify_formula(t, seen["hf_in"], 7, True), atol=1e-5, rtol=1e-5
    )
    assert "blocks.1.ln2.hook_normalized.hook_sae_acts_post" in cache


# --------------------------------------------------------------------------- dictionary_learning
def _dl_dir(root, cls, state, trainer):
    root.mkdir(parents=True)
    torch.save(state, root / "ae.pt")
    (root / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, **trainer}}))
    return root


def test_dictionary_learning_formats(tmp_path):
    g = torch.Generator().manual_seed(1)
    d_in, d_sae = 64, 128
    enc_w, enc_b = torch.randn(d_sae, d_in, generator=g) * 0.3, torch.randn(d_sae, generator=g) * 0.1
    dec_w, bias = torch.randn(d_in, d_sae, generator=g) * 0.3, torch.randn(d_in, generator=g) * 0.1
    x = torch.randn(4, d_in, generator=g)
    trainer = {"activation_dim": d_in, "dict_size": d_sae, "layer": 2, "submodule_name": "resid_post_layer_2"}

    # AutoEncoder: f = relu(encoder(x - bias)), x_hat = decoder(f) + bias
    path = _dl_dir(
        tmp_path / "ae",
        "AutoEncoder",
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "bias": bias},
        trainer,
    )
    sae = load_sae(path)
    assert sae.hook_name == "blocks.2.hook_resid_post"
    f = torch.relu((x - bias) @ enc_w.T + enc_b)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae.reconstruct(x), f @ dec_w.T + bias)

    # AutoEncoderTopK: top-k of relu(encoder(x - b_dec))
    path = _dl_dir(
        tmp_path / "topk",
        "AutoEncoderTopK",
        {
            "encoder.weight": enc_w,
            "encoder.bias": enc_b,
            "decoder.weight": dec_w,
            "b_dec": bias,
            "k": torch.tensor(5),
            "threshold": torch.tensor(-1.0),
        },
        {**trainer, "k": 5},
    )
    sae = load_sae(path)
    post = torch.relu((x - bias) @ enc_w.T + enc_b)
    vals, idx = post.topk(5, dim=-1)
    f = torch.zeros_like(post).scatter(-1, idx, vals)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae.reconstruct(x), f @ dec_w.T + bias)

    # JumpReluAutoEncoder: f = relu(pre * (pre > threshold)), pre = x @ W_enc + b_enc (no b_dec subtraction)
    thr = torch.rand(d_sae, generator=g) * 0.3
    path = _dl_dir(
        tmp_path / "jump",
        "JumpReluAutoEncoder",
        {"W_enc": enc_w.T.contiguous(), "b_enc": enc_b, "W_dec": dec_w.T.contiguous(), "b_dec": bias, "threshold": thr},
        trainer,
    )
    sae = load_sae(path)
    pre = x @ enc_w.T + enc_b
    f = torch.relu(pre * (pre > thr))
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae.reconstruct(x), f @ dec_w.T + bias)


def test_dictionary_learning_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pickle ran",))

    (tmp_path / "ae").mkdir()
    torch.save({"encoder.weight": Evil()}, tmp_path / "ae" / "ae.pt")
    with pytest.raises(LoadError, match="cannot be read as plain tensors"):
        load_sae(tmp_path / "ae")


# --------------------------------------------------------------------------- bad input
def test_hugging_face_module_names_map_to_hook_points(tmp_path, tiny):
    sae = random_sae("standard")
    path = save_sae(sae, tmp_path / "hf_named")
    cfg = json.loads((path / "cfg.json").read_text())
    for module, hook in (
        ("model.layers.2", "blocks.2.hook_resid_post"),
        ("model.layers.0.mlp", "blocks.0.hook_mlp_out"),
        ("model.layers.1.self_attn", "blocks.1.hook_attn_out"),
        ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_pre"),
    ):
        cfg["metadata"]["hook_name"] = module
        (path / "cfg.json").write_text(json.dumps(cfg))
        assert load_sae(path, tiny).hook_name == hook


def test_bad_sae_inputs(tmp_path, tiny):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(LoadError) as err:
        load_sae(tmp_path / "empty")
    assert str(err.value) == (
        f"{tmp_path / 'empty'} holds no SAE in a known layout (found notes.txt); expected cfg.json + "
        "sae_weights.safetensors (SAELens), cfg.json + sae.safetensors (sparsify) or ae.pt + "
        "config.json (dictionary_learning)"
    )
    wide = save_sae(random_sae("standard", d_in=80), tmp_path / "wide")
    with pytest.raises(InputError) as err:
        load_sae(wide, tiny)
    assert str(err.value) == (
        "the SAE's d_in is 80 but blocks.1.hook_resid_post has width 64; load it for a model of "
        "this size or pass the right hook_name="
    )
    ok = save_sae(random_sae("standard"), tmp_path / "ok")
    with pytest.raises(HookError) as err:
        load_sae(ok, tiny, hook_name="blocks.7.hook_resid_post")
    assert str(err.value) == (
        "unknown hook name 'blocks.7.hook_resid_post': layer 7 does not exist (the model has 3 layers, 0..2)"
    )
    with pytest.raises(LoadError, match="does not exist"):
        load_sae(tmp_path / "missing")


def test_overwrite_replaces_only_an_sae_we_wrote(tmp_path):
    """save_sae(overwrite=True) never deletes what llama-scalpel did not write."""
    a, b = random_sae("standard", seed=1), random_sae("standard", seed=2)
    ours = save_sae(a, tmp_path / "ours")
    save_sae(b, ours, overwrite=True)  # our own SAE: replaced
    assert torch.equal(load_sae(ours).W_enc, b.W_enc)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scalpel-")]
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    with pytest.raises(InputError, match=r"thesis is not an output of llama-scalpel \(it holds 'thesis.txt'"):
        save_sae(a, user, overwrite=True)
    assert (user / "thesis.txt").read_text() == "years of work"
    # an SAELens-layout directory written by someone else is not ours either
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({n: p.detach().clone() for n, p in a.named_parameters()}, str(foreign / "sae_weights.safetensors"))
    (foreign / "cfg.json").write_text("{}")
    with pytest.raises(InputError, match=r"foreign is not an output of llama-scalpel \(it holds 'cfg.json'"):
        save_sae(b, foreign, overwrite=True)
    assert (foreign / "cfg.json").read_text() == "{}"
    empty = tmp_path / "empty"
    empty.mkdir()
    save_sae(a, empty, overwrite=True)  # an empty directory may be replaced
    assert torch.equal(load_sae(empty).W_enc, a.W_enc)
