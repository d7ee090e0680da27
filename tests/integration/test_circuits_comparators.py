"""Edge scores against auto-circuit 1.0.1 (in its own environment, ``_comparator_env``, on the same
weights loaded into TransformerLens). auto-circuit's edges are per query head (TransformerLens ungroups
grouped-query attention); a key/value group's edge here is the sum of its query heads' edges there, as
the group's projection is one input shared by those heads."""

from __future__ import annotations

import pytest
import torch
from _comparator_env import autocircuit_scores, run_script

from analyses.circuits import edge_attribution
from analyses.metrics import LogitDiff
from hooks import HookedLlama
from tests.helpers import tiny_hf

SAMPLES = 4


@pytest.fixture(scope="module", params=["mha", "gqa"])
def reference(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"autocircuit-{request.param}")
    hf = tiny_hf(request.param)
    hf.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(3, 128, (3, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 4] = torch.randint(3, 128, (3,), generator=g)
    answers, wrong = torch.tensor([5, 9, 11]), torch.tensor([7, 3, 20])
    with torch.no_grad():
        logits = HookedLlama.from_hf(hf)(clean)
    torch.save(
        {"clean": clean, "corrupt": corrupt, "answers": answers, "wrong": wrong, "logits": logits}, root / "inputs.pt"
    )
    run_script("circuits", "autocircuit", root, SAMPLES, 1)
    ref = torch.load(root / "autocircuit.pt")
    model = HookedLlama.from_hf(hf)
    return model, clean, corrupt, LogitDiff(answers, wrong), ref


def test_transformerlens_model_is_the_same_model(reference):
    assert reference[-1]["max_logit_diff"] < 1e-4 and reference[-1]["max_diff_vs_ours"] < 1e-4


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_scores_equal_auto_circuit(reference, method):
    model, clean, corrupt, metric, ref = reference
    rep = model.n_heads // model.n_kv_heads
    if method == "eap":
        ours = edge_attribution(model, clean, corrupt, metric, method="eap")
        want, factor = autocircuit_scores(ref["eap"], rep), -1.0  # auto-circuit differentiates −metric
    else:  # mask gradients summed over SAMPLES + 1 mask values = (SAMPLES + 1) × our mean over the same points
        ours = edge_attribution(model, clean, corrupt, metric, method="eap-ig", path="edges", steps=SAMPLES + 1)
        want, factor = autocircuit_scores(ref["ig"], rep), -(SAMPLES + 1.0)
    names = ours.graph.edge_names()
    assert set(want) == set(names)
    got = factor * ours.scores
    expected = torch.tensor([want[n] for n in names])
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-4), float((got - expected).abs().max())


# --------------------------------------------------------------------------- circuit-tracer
@pytest.fixture(scope="module")
def tracer_reference(tmp_path_factory):
    """circuit-tracer 0.5's attribution graph of one prompt, same model and JumpReLU skip transcoders."""
    from analyses.saes import SAE, SAEConfig
    from tests.helpers import build_tiny

    root = tmp_path_factory.mktemp("tracer")
    build_tiny(root / "model")
    model = HookedLlama.from_pretrained(str(root / "model"))
    g = torch.Generator().manual_seed(0)
    M, tcs, layers = model.d_model, [], {}
    for layer in range(model.n_layers):
        cfg = SAEConfig(
            "jumprelu",
            M,
            40,
            f"blocks.{layer}.ln2.hook_normalized",
            hook_name_out=f"blocks.{layer}.hook_mlp_out",
            d_out=M,
            skip_connection=True,
        )
        t = SAE(cfg)
        with torch.no_grad():
            t.W_enc.copy_(torch.randn(M, 40, generator=g) * 0.3)
            t.W_dec.copy_(torch.randn(40, M, generator=g) * 0.02)
            t.b_enc.copy_(torch.randn(40, generator=g) * 0.1)
            t.b_dec.copy_(torch.randn(M, generator=g) * 0.01)
            t.threshold.copy_(torch.rand(40, generator=g) * 0.2)
            t.W_skip.copy_(torch.randn(M, M, generator=g) * 0.05)
        tcs.append(t)
        layers[layer] = {k: v.detach().clone() for k, v in t.state_dict().items()}
    torch.save({"hook_in": "ln2.hook_normalized", "layers": layers}, root / "transcoders.pt")
    # circuit-tracer puts a special token first when the prompt has none: give it one
    tokens = torch.cat(
        [torch.tensor([0]), model.to_tokens("When Mary and John went to the store, John gave a drink to")[0]]
    )
    torch.save(tokens, root / "prompt.pt")
    run_script("circuits", "tracer", root, 16, 1)
    return model, tcs, tokens, torch.load(root / "tracer.pt")


def test_attribution_graph_equals_circuit_tracer(tracer_reference):
    from analyses.circuits import attribution_graph

    model, tcs, tokens, ref = tracer_reference
    assert ref["max_logit_diff"] < 1e-4
    ours = attribution_graph(model, tokens, tcs, batch_size=16)
    assert ours.logit_tokens == ref["logit_tokens"]
    assert torch.allclose(ours.logit_probabilities, ref["logit_probabilities"].float(), atol=1e-6)
    assert torch.equal(ours.features, ref["active_features"][ref["selected_features"]].long())
    A, B = ours.adjacency, ref["adjacency"].float()
    assert A.shape == B.shape
    assert (A - B).abs().max() <= 1e-5 * (1 + B.abs().max()), float((A - B).abs().max())
