"""SAEs on the default model: a small TopK SAE trained in the suite (real FVE / L0 / CE-loss recovered),
resumable training, feature attribution against feature patching, top contexts, steering and its export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import surgery as S
from analyses import load_corpus
from analyses.saes import (
    FeatureAblation,
    FeatureSteering,
    feature_attribution,
    feature_patching,
    load_sae,
    sae_metrics,
    top_feature_contexts,
    train_sae,
)
from hooks import HookedLlama
from tests.helpers import IOI_CLEAN, random_sae, tiny_hf

HOOK = "blocks.6.hook_resid_post"
TRAIN = dict(d_sae=1152, k=16, steps=150, batch_size=256, lr=1e-3, max_tokens=32, progress=False)


@pytest.fixture(scope="module")
def trained(smol, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sae")
    texts = load_corpus()
    res = train_sae(smol, HOOK, texts[:80], root / "sae", **TRAIN)
    return res, root, texts[80:]


@pytest.mark.slow
def test_trained_sae_reconstructs_and_recovers_loss(smol, trained):
    res, root, held_out = trained
    assert json.loads((root / "sae" / "cfg.json").read_text())["architecture"] == "topk"
    sae = load_sae(root / "sae", smol)  # the SAELens layout it wrote (SAELens reads it: test_saes_formats)
    assert not (root / "sae" / "checkpoint.pt").exists()
    m = sae_metrics(smol, sae, held_out, max_tokens=32)
    assert m.l0 == 16.0
    assert m.fve > 0.75, m.rows()
    assert m.ce_recovered > 0.8, m.rows()
    assert m.ce_clean < m.ce_spliced < m.ce_zero
    assert 0 < m.kl < 2.0
    assert m.figure().data
    # by hand, one unpadded text at a time: FVE, MSE and L0 over tokens 1.., CE over the predictions made there
    xs, nll_clean, nll_sae = [], [], []
    with torch.no_grad():
        for text in held_out:
            ids = smol.to_tokens(text)[:, :32]
            logits, cache = smol.run_with_cache(ids, names_filter=HOOK)
            x = cache[HOOK][0, 1:]
            xs.append(x)

            def recon_after_first(t, hook):
                return torch.cat([t[:, :1], sae.reconstruct(t[:, 1:])], dim=1)

            spliced_logits = smol.run_with_hooks(ids, fwd_hooks=[(HOOK, recon_after_first)])
            # the predictions made at measured positions: the first token's is left out (skip_first)
            nll_clean.append(smol.loss_from_logits(logits, ids, None, per_token=True)[0, 1:])
            nll_sae.append(smol.loss_from_logits(spliced_logits, ids, None, per_token=True)[0, 1:])
        x = torch.cat(xs)
        r = sae.reconstruct(x)
    assert m.n_tokens == x.shape[0]
    assert m.fve == pytest.approx(float(1 - (x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), abs=1e-4)
    assert m.mse == pytest.approx(float((x - r).pow(2).mean()), rel=1e-4)
    assert m.l0 == float((sae.encode(x) > 0).sum(-1).float().mean())
    assert m.ce_clean == pytest.approx(float(torch.cat(nll_clean).mean()), abs=1e-4)
    assert m.ce_spliced == pytest.approx(float(torch.cat(nll_sae).mean()), abs=1e-4)


@pytest.mark.slow
def test_training_resumes_bit_identically(smol, tmp_path):
    small = dict(TRAIN, steps=12, checkpoint_every=4)
    whole = train_sae(smol, HOOK, load_corpus()[:80], tmp_path / "whole", **small)
    part = train_sae(smol, HOOK, load_corpus()[:80], tmp_path / "part", stop_after=7, **small)
    assert part.steps == 7 and (tmp_path / "part" / "checkpoint.pt").exists()
    rest = train_sae(smol, HOOK, load_corpus()[:80], tmp_path / "part", **small)
    assert rest.resumed_from == 7
    for name, p in whole.sae.named_parameters():
        assert torch.equal(p, dict(rest.sae.named_parameters())[name]), name


@pytest.mark.slow
def test_attribution_agrees_with_feature_patching(smol, trained):
    res, _, _ = trained
    sae = res.sae
    attr = feature_attribution(smol, sae, IOI_CLEAN, answers=(" Mary", " John"))
    assert attr.values.shape == (1, len(smol.to_tokens(IOI_CLEAN)[0]), sae.d_sae)
    top = attr.top(12)
    # the gradient itself: central difference of scaling each feature by 1 ± 0.2 %
    up, down = (
        feature_patching(smol, sae, IOI_CLEAN, top, answers=(" Mary", " John"), factor=1 + s) for s in (0.002, -0.002)
    )
    torch.testing.assert_close((up - down) / 0.004, attr.total[top], rtol=0.03, atol=5e-3)
    # ablation (a large change): the first-order estimate ranks and signs the effects
    exact = feature_patching(smol, sae, IOI_CLEAN, top, answers=(" Mary", " John"))
    estimate = -attr.total[top]
    assert torch.corrcoef(torch.stack([exact, estimate]))[0, 1] > 0.4, (exact, estimate)
    assert (exact.sign() == estimate.sign()).float().mean() >= 0.6, (exact, estimate)
    assert attr.figure().data


@pytest.mark.slow
def test_top_feature_contexts_stream_a_file(smol, trained, tmp_path):
    sae = trained[0].sae
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(load_corpus()[80:]) + "\n")
    feats = [3, 70]
    res = top_feature_contexts(smol, sae, feats, corpus=str(path), k=3, max_tokens=32)
    assert res.values.shape == (2, 3) and res.n_docs == 20
    # the reported activation is the feature's activation at that document and position
    row = res.rows()[0]
    doc = load_corpus()[80 + row["doc"]]
    _, cache = smol.run_with_cache(doc, names_filter=HOOK)
    acts = sae.encode(cache[HOOK])[0, :, row["feature"]]
    acts = acts.detach()
    assert abs(float(acts[row["pos"]]) - row["activation"]) < 1e-4
    assert float(acts[1:].max()) == pytest.approx(row["activation"], abs=1e-4)
    assert "[[" in row["context"]


@pytest.mark.slow
def test_feature_steering_generation(smol, trained):
    sae = trained[0].sae
    prompt = [{"role": "user", "content": "Write one sentence about the sea."}]
    plain = smol.generate(prompt, max_new_tokens=8, return_type="completion")
    with FeatureSteering(sae, 5, 40.0).applied(smol):
        steered = smol.generate(prompt, max_new_tokens=8, return_type="completion")
    assert steered != plain
    assert all(not p.fwd_hooks for p in smol.hook_dict.values())


def test_feature_steering_exports_exactly_and_ablation_is_refused(tmp_path):
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    sae = random_sae("standard")  # reads and writes blocks.1.hook_resid_post
    steer = FeatureSteering(sae, 7, 3.0)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), steer.applied(model):
        want = model(ids)
    result = S.export(model, tmp_path / "out", edits=[steer])
    manifest = json.loads((tmp_path / "out" / "scalpel_manifest.json").read_text())
    assert manifest["edits"][0]["edit"] == "AddSteering" and manifest["edits"][0]["layer"] == 1
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert result.kl_to_base > 0
    with pytest.raises(S.EditError) as err:
        S.export(model, tmp_path / "abl", edits=[FeatureAblation(sae, [1, 2])])
    assert str(err.value) == (
        "edit #1: ablating SAE features is not linear in the weights (the SAE's encoder is "
        "non-linear), so it cannot be exported; apply it at run time with "
        "FeatureAblation(...).applied(model)"
    )
    assert not (tmp_path / "abl").exists()
