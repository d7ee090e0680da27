"""Node-level circuits as weight edits: the edited weights give the logits of the circuit run by hooks
(mean and zero ablation, heads, MLPs and neuron subsets), the export reloads in transformers with those
logits, and what cannot be baked is refused with its reason."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from analyses.circuits import Circuit, EdgeGraph
from hooks import HookedLlama, InputError
from surgery import EditError
from surgery.circuits import bake_refusals, circuit_edits, export_circuit, node_circuit
from tests.helpers import tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")
REFERENCE = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(5))
OTHER = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(6))


@pytest.fixture(scope="module")
def model():
    return HookedLlama.from_hf(tiny_hf("gqa"))


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_edits_equal_the_circuit_run_by_hooks(model, ablation):
    nodes = node_circuit(model, heads=["L0H1", (1, 2), (2, 0)], mlps=[1])
    circuit = nodes.as_circuit(EdgeGraph.from_model(model))
    assert bake_refusals(circuit) == []
    plan = circuit_edits(model, circuit, ablation=ablation, reference=REFERENCE)
    kinds = sorted({e.kind for e in plan})
    assert kinds == (
        ["AddSteering", "MeanAblateHeads", "ZeroNeurons"] if ablation == "mean" else ["ZeroHeads", "ZeroNeurons"]
    )
    for tokens in (REFERENCE, OTHER):  # means are position-independent: any input
        with torch.no_grad(), circuit.applied(model, ablation=ablation, reference=REFERENCE):
            want = model(tokens)
        with torch.no_grad(), plan.applied(model):
            got = model(tokens)
        assert (got - want).abs().max() < 1e-5


def test_neuron_subsets_against_plain_hooks(model):
    keep = {0: [3, 10, 50], 2: list(range(40))}
    nodes = node_circuit(model, heads=[(1, 1)], mlps=[1], neurons=keep)
    plan = circuit_edits(model, nodes, ablation="mean", reference=REFERENCE)
    names = [f"blocks.{i}.{n}" for i in range(3) for n in ("attn.hook_z", "mlp.hook_post", "hook_mlp_out")]
    with torch.no_grad():
        _, cache = model.run_with_cache(REFERENCE, names_filter=names)
    mean = {n: cache[n].double().mean(dim=(0, 1)).float() for n in names}

    def z(t, hook):
        t = t.clone()
        for h in range(model.n_heads):
            if (hook.layer, h) != (1, 1):
                t[:, :, h] = mean[hook.name][h]
        return t

    def post(t, hook):
        t = t.clone()
        off = [n for n in range(model.d_mlp) if n not in keep[hook.layer]]
        t[..., off] = mean[hook.name][off]
        return t

    hooks = [(f"blocks.{i}.attn.hook_z", z) for i in range(3)] + [(f"blocks.{i}.mlp.hook_post", post) for i in (0, 2)]
    with torch.no_grad():
        want = model.run_with_hooks(OTHER, fwd_hooks=hooks)
        with plan.applied(model):
            got = model(OTHER)
    assert (got - want).abs().max() < 1e-5


def test_export_reloads_with_the_circuit_logits(model, tmp_path):
    circuit = node_circuit(model, heads=[(0, 0), (2, 3)], mlps=[0, 2]).as_circuit(EdgeGraph.from_model(model))
    result, diff = export_circuit(model, tmp_path / "out", circuit, reference=REFERENCE)
    assert diff < 1e-5
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad(), circuit.applied(model, ablation="mean", reference=REFERENCE):
        want = model(OTHER)
    with torch.no_grad():
        assert (hf(OTHER).logits - want).abs().max() < 1e-4


def test_what_cannot_be_baked_is_refused(model):
    graph = EdgeGraph.from_model(model)
    edge_level = Circuit.from_edges(graph, ["a0.h1->a2.h0<q>", "a2.h0->logits", "input->a0.h1<q>"])
    reasons = bake_refusals(edge_level)
    assert any("some outgoing edges kept and some patched" in r for r in reasons)
    with pytest.raises(EditError, match="cannot be baked"):
        circuit_edits(model, edge_level, reference=REFERENCE)
    node_level = edge_level.node_level()
    assert not any("outgoing" in r for r in bake_refusals(node_level))
    with pytest.raises(EditError, match="corrupted prompt"):
        circuit_edits(model, node_level, ablation="patching")
    no_input = node_level.node_level()
    no_input.edges = no_input.edges & (graph.edges[:, 0] != 0)
    assert any("token embeddings" in r for r in bake_refusals(no_input))
    with pytest.raises(InputError, match="reference"):
        circuit_edits(model, node_level, ablation="mean")
    with pytest.raises(InputError, match="out of range"):
        node_circuit(model, mlps=[7])
