"""sae_metrics' conventions, recomputed text by text (no padding): every number is over the measured
positions (each text's first token left out with skip_first), the CE and KL over the predictions made at
those positions, and a feature that fires only on a first token is dead."""

import warnings

import pytest
import torch

from analyses import MassiveActivationWarning
from analyses.divergence import kl_rows
from analyses.saes import sae_metrics
from hooks import HookedLlama
from tests.helpers import random_sae, tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup():
    model = HookedLlama.from_hf(tiny_hf("gqa", initializer_range=0.1))
    sae = random_sae("standard", d_in=model.d_model, d_sae=24)
    with torch.no_grad():  # feature 0 fires only on a huge input along its encoder row: the planted first token
        sae.b_enc[0] = -1e4
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (9, 6, 12, 7)]
    return model, sae, texts


def first_token_fires_feature_0(sae):
    direction = sae.W_enc[:, 0].detach() / sae.W_enc[:, 0].norm()

    def hook(t, hook):
        first = (hook.positions == 0)[..., None].to(t.dtype)  # each row's first real token (left padding)
        return t + first * 2e5 * direction

    return [(HOOK, hook)]


def by_hand(model, sae, texts, skip_first: bool):
    first = 1 if skip_first else 0
    nll = {"clean": [], "sae": [], "zero": []}
    kls, acts = [], []
    with torch.no_grad():
        for ids in texts:
            x = torch.tensor([ids])
            logits, cache = model.run_with_cache(x, names_filter=HOOK)
            acts.append(sae.encode(cache[HOOK][0, first:]))

            def put(mode):
                def hook(t, hook):
                    new = sae.reconstruct(t[:, first:]) if mode == "sae" else torch.zeros_like(t[:, first:])
                    return torch.cat([t[:, :first], new], 1)

                return [(HOOK, hook)]

            runs = {"clean": logits, **{m: model.run_with_hooks(x, fwd_hooks=put(m)) for m in ("sae", "zero")}}
            for m, lg in runs.items():
                lp = lg[0, :-1].double().log_softmax(-1)
                per = -lp.gather(-1, x[0, 1:, None])[:, 0]  # the prediction made at position p, of token p + 1
                nll[m].append(per[first:])
            kls.append(kl_rows(logits[0, :-1], runs["sae"][0, :-1])[first:])
    a = torch.cat(acts)
    return {m: float(torch.cat(v).mean()) for m, v in nll.items()}, float(torch.cat(kls).mean()), a


@pytest.mark.parametrize("skip_first", [True, False])
def test_ce_kl_and_dead_are_over_the_measured_positions(setup, skip_first):
    model, sae, texts = setup
    with model.hooks(fwd_hooks=first_token_fires_feature_0(sae)), warnings.catch_warnings():
        warnings.simplefilter("ignore", MassiveActivationWarning)  # the planted first tokens, measured when not skipped
        m = sae_metrics(model, sae, texts, batch_size=3, skip_first=skip_first)  # left-padded batches
        ce, kl, acts = by_hand(model, sae, texts, skip_first)
    assert m.n_tokens == acts.shape[0] == sum(len(t) for t in texts) - (len(texts) if skip_first else 0)
    assert m.ce_clean == pytest.approx(ce["clean"], abs=1e-5)
    assert m.ce_spliced == pytest.approx(ce["sae"], abs=1e-5)
    assert m.ce_zero == pytest.approx(ce["zero"], abs=1e-5)
    assert m.kl == pytest.approx(kl, abs=1e-6)
    fired = (acts > 0).sum(0)
    assert m.dead == int((fired == 0).sum())
    torch.testing.assert_close(m.frequency, (fired / acts.shape[0]).float())
    # feature 0 fires only on the first tokens: dead when they are not measured, alive when they are
    assert (m.frequency[0] == 0) == skip_first
