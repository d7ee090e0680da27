"""Edge-level circuits against an independent reference: a plain-torch forward of Hugging Face's own
Llama modules in which every receiver (each head's q, each key/value group's k and v, each MLP, the
logits) reads its own residual stream, written here from the definition of edge patching."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from analyses.circuits import Circuit, EdgeGraph, acdc, circuit_setup, edge_attribution, run_masks
from analyses.circuits.scores import eap_ig_scores, eap_scores, exact_scores
from analyses.circuits.selection import MIB_FRACTIONS, areas, greedy, prune_dangling, top_n
from analyses.metrics import LogitDiff
from hooks import HookedLlama, InputError
from tests.helpers import tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")
METRIC = LogitDiff(5, 7)


def _pair(seed: int = 1, batch: int = 3, seq: int = 8, at: int = 4):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 128, (batch, seq), generator=g)
    corrupted = clean.clone()
    corrupted[:, at] = torch.randint(3, 128, (batch,), generator=g)
    return clean, corrupted


def _norm(mod, x):
    return mod(x)  # HF's LlamaRMSNorm


def reference_logits(hf, graph: EdgeGraph, tokens, patch: dict, patched: set, deltas: dict | None = None):
    """Logits [B, P, V] of ``hf`` with the edges in ``patched`` ({(source, receiver) names}) carrying
    ``patch[source]`` instead of the source's output in this run; a dict {(source, receiver): weight}
    patches each edge by that fraction (the mask value). ``deltas`` {receiver: tensor} are added to
    receivers' inputs (zero leaves, for gradients)."""
    cfg = hf.config
    H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    rep = H // G
    B, P = tokens.shape
    emb = hf.model.embed_tokens(tokens)
    outs = {"input": emb}
    resid = emb
    pos = torch.arange(P)[None].expand(B, P)
    cos, sin = hf.model.rotary_emb(emb, pos)
    causal = torch.full((P, P), float("-inf")).triu(1)

    weights = patched if isinstance(patched, dict) else dict.fromkeys(patched, 1.0)
    incoming: dict = {}
    for (s, r), w in weights.items():
        incoming.setdefault(r, []).append((s, w))

    def receive(name, base):
        x = base
        for s, w in incoming.get(name, ()):
            x = x + w * (patch[s] - outs[s])
        if deltas is not None and name in deltas:
            x = x + deltas[name]
        return x

    for layer, block in enumerate(hf.model.layers):
        at = block.self_attn
        qs, ks, vs = [], [], []
        for h in range(H):
            x = _norm(block.input_layernorm, receive(f"a{layer}.h{h}<q>", resid))
            qs.append(
                torch.nn.functional.linear(
                    x,
                    at.q_proj.weight[h * D : (h + 1) * D],
                    None if at.q_proj.bias is None else at.q_proj.bias[h * D : (h + 1) * D],
                )
            )
        for g in range(G):
            xk = _norm(block.input_layernorm, receive(f"a{layer}.kv{g}<k>", resid))
            xv = _norm(block.input_layernorm, receive(f"a{layer}.kv{g}<v>", resid))
            ks.append(
                torch.nn.functional.linear(
                    xk,
                    at.k_proj.weight[g * D : (g + 1) * D],
                    None if at.k_proj.bias is None else at.k_proj.bias[g * D : (g + 1) * D],
                )
            )
            vs.append(
                torch.nn.functional.linear(
                    xv,
                    at.v_proj.weight[g * D : (g + 1) * D],
                    None if at.v_proj.bias is None else at.v_proj.bias[g * D : (g + 1) * D],
                )
            )
        q = torch.stack(qs, 1)  # [B, H, P, D]
        k = torch.stack(ks, 1)
        v = torch.stack(vs, 1)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        results = 0
        for h in range(H):
            scores = q[:, h] @ k[:, h // rep].transpose(-1, -2) / math.sqrt(D) + causal
            z = scores.softmax(-1) @ v[:, h // rep]  # [B, P, D]
            out = z @ at.o_proj.weight[:, h * D : (h + 1) * D].T
            outs[f"a{layer}.h{h}"] = out
            results = results + out
        if at.o_proj.bias is not None:
            results = results + at.o_proj.bias
        resid = resid + results
        x = _norm(block.post_attention_layernorm, receive(f"m{layer}", resid))
        mlp = block.mlp(x)
        outs[f"m{layer}"] = mlp
        resid = resid + mlp
    x = hf.model.norm(receive("logits", resid))
    return hf.lm_head(x), outs


def _sources(hf, graph, tokens):
    with torch.no_grad():
        _, outs = reference_logits(hf, graph, tokens, {}, set())
    return outs


@pytest.fixture(scope="module", params=["mha", "gqa", "bias"])
def case(request):
    hf = tiny_hf(request.param)
    model = HookedLlama.from_hf(hf)
    clean, corrupted = _pair()
    return hf, model, clean, corrupted


def test_graph_shape_and_names():
    g = EdgeGraph(30, 9, 3)  # SmolLM2
    assert (g.n_sources, g.n_receivers) == (1 + 30 * 10, 30 * 16 + 1)
    per_layer = [(1 + 10 * layer) * 15 + (1 + 10 * layer + 9) for layer in range(30)]
    assert g.n_edges == sum(per_layer) + 1 + 300
    i = g.edge_index("a19.h2->logits")
    assert g.edge_name(i) == "a19.h2->logits"
    assert g.edge_name(g.edge_index("a3.h4->m3")) == "a3.h4->m3"  # a layer's heads feed its MLP
    with pytest.raises(InputError, match="writes after"):
        g.edge_index("m3->a3.h0<q>")
    with pytest.raises(InputError, match="cannot read edge"):
        g.edge_index("a3.h2 to logits")


def test_masks_equal_the_reference(case):
    hf, model, clean, corrupted = case
    setup = circuit_setup(model, clean, corrupted, metric=METRIC)
    graph = setup.graph
    patch = _sources(hf, graph, corrupted)
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(4, graph.n_edges, generator=gen) < torch.tensor([[0.05], [0.3], [0.7], [1.0]])).float()
    ours = run_masks(model, setup, masks, per_prompt=True)
    for mask, row in zip(masks, ours):
        patched = {tuple(graph.edge_name(int(i)).split("->")) for i in torch.nonzero(mask)[:, 0]}
        with torch.no_grad():
            logits, _ = reference_logits(hf, graph, clean, patch, patched)
        ref = METRIC.score(logits[:, -1])
        assert torch.allclose(row, ref, atol=1e-5), (row, ref)
    # every edge patched is the corrupted run; chunks of one mask give the same numbers
    with torch.no_grad():
        assert torch.allclose(ours[-1], METRIC.score(model(corrupted)[:, -1]), atol=1e-5)
    assert torch.allclose(run_masks(model, setup, masks, max_batch=1, per_prompt=True), ours, atol=1e-6)


def test_mean_and_zero_ablation_from_the_first_position(case):
    hf, model, clean, corrupted = case
    graph = EdgeGraph.from_model(model)
    means = {k: v.mean(dim=(0, 1), keepdim=True) for k, v in _sources(hf, graph, corrupted).items()}
    setup = circuit_setup(model, clean, metric=METRIC, ablation="mean", reference=corrupted)
    assert setup.start == 0
    mask = torch.zeros(graph.n_edges)
    mask[torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(3))[:40]] = 1
    patched = {tuple(graph.edge_name(int(i)).split("->")) for i in torch.nonzero(mask)[:, 0]}
    with torch.no_grad():
        ref = METRIC(reference_logits(hf, graph, clean, means, patched)[0])
    assert abs(float(run_masks(model, setup, mask[None])[0]) - float(ref)) < 1e-5
    zero = circuit_setup(model, clean, metric=METRIC, ablation="zero")
    with torch.no_grad():
        zeros = {k: torch.zeros_like(v) for k, v in _sources(hf, graph, clean).items()}
        ref = METRIC(reference_logits(hf, graph, clean, zeros, patched)[0])
    assert abs(float(run_masks(model, zero, mask[None])[0]) - float(ref)) < 1e-5


def test_eap_equals_gradients_of_the_reference(case):
    hf, model, clean, corrupted = case
    setup = circuit_setup(model, clean, corrupted, metric=METRIC)
    graph = setup.graph
    clean_src, patch = _sources(hf, graph, clean), _sources(hf, graph, corrupted)
    deltas = {r.name: torch.zeros(*clean.shape, hf.config.hidden_size, requires_grad=True) for r in graph.receivers}
    for p in hf.parameters():
        p.requires_grad_(False)
    logits, _ = reference_logits(hf, graph, clean, {}, set(), deltas)
    METRIC(logits).backward()
    ref = torch.tensor(
        [
            float(((patch[s] - clean_src[s]) * deltas[r].grad).sum())
            for s, r in (name.split("->") for name in graph.edge_names())
        ]
    )
    ours = eap_scores(model, setup)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-4)
    # the same gradients through the patched forward (every edge's mask at 0): EAP-IG along the edges, one step
    assert torch.allclose(eap_ig_scores(model, setup, steps=1, path="edges"), ours, atol=1e-6)


def test_eap_ig_completeness_and_convergence(case):
    hf, model, clean, corrupted = case
    setup = circuit_setup(model, clean, corrupted, metric=METRIC)
    total = float(run_masks(model, setup, torch.ones(1, setup.graph.n_edges))[0]) - setup.clean_value
    errors = [abs(float(eap_ig_scores(model, setup, steps=s, path="edges").sum()) - total) for s in (3, 9, 27)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05 * abs(total)
    exact = exact_scores(model, setup)
    eap = eap_scores(model, setup)
    gap = [float((eap_ig_scores(model, setup, steps=s).sub(exact)).abs().mean()) for s in (2, 8, 32)]
    assert gap[0] > gap[1] > gap[2]
    assert gap[2] < float((eap - exact).abs().mean())


@pytest.mark.parametrize("path", ["inputs", "edges"])
def test_eap_ig_in_passes_of_one_point_equals_one_pass(case, path):
    """Long prompts take few interpolation points per forward (bounded memory): the scores do not change."""
    _, model, clean, corrupted = case
    setup = circuit_setup(model, clean, corrupted, metric=METRIC)
    one_pass = eap_ig_scores(model, setup, steps=4, path=path)
    per_point = eap_ig_scores(model, setup, steps=4, path=path, max_rows=clean.shape[0])
    assert torch.allclose(per_point, one_pass, atol=1e-6, rtol=1e-5)


def test_setup_keeps_the_sources_compact_and_reads_them_like_the_reference(case):
    """The setup keeps hook_z / hook_mlp_out (not [S, B, P, M]); read by source, by slice across layers, or
    over a window of positions, it gives the outputs of the reference forward, with or without keeping heads."""
    hf, model, clean, corrupted = case
    setup = circuit_setup(model, clean, corrupted, metric=METRIC)
    graph = setup.graph
    ref_clean, ref_patch = _sources(hf, graph, clean), _sources(hf, graph, corrupted)
    names = [s.name for s in graph.sources]
    dense = torch.stack([ref_clean[name] for name in names])
    assert setup.clean_src.shape == dense.shape
    assert torch.allclose(setup.clean_src.dense(), dense, atol=1e-5)
    patch = torch.stack([ref_patch[name] for name in names])
    assert torch.allclose(setup.patch_src[:], patch, atol=1e-5)
    assert torch.allclose(setup.differences(slice(0, graph.n_sources)), patch - dense, atol=1e-5)
    for values in (setup.clean_src, type(setup.clean_src).from_cache(model, model.run_with_cache(clean)[1])):
        values._keep = values is setup.clean_src  # one keeps the heads it formed, one forms them anew
        assert torch.equal(values[3:17], values.dense()[3:17])  # across layer boundaries
        assert torch.equal(values[graph.source_index("mlp", 1)], values.dense()[graph.source_index("mlp", 1)])
        assert torch.equal(values.positions(2, 6)[5:25], values.dense()[5:25, :, 2:6])
    # the first position where clean and corrupted differ: where the corrupted token is
    assert setup.start == 4


@pytest.mark.parametrize("method", ["eap", "inputs", "edges", "edges-mean"])
def test_products_in_blocks_of_positions_equal_one_block(case, method):
    """Long prompts form the products a few positions at a time (bounded memory): the scores do not change."""
    from analyses.circuits.scores import gradient_products

    _, model, clean, corrupted = case
    kw = {"ablation": "mean", "reference": corrupted} if method == "edges-mean" else {}
    setup = circuit_setup(model, clean, None if kw else corrupted, metric=METRIC, **kw)
    run = {"eap": {}, "inputs": {"embed": model.model.embed_tokens(torch.cat([corrupted, clean]))}}
    args = run.get(method, {"alphas": [0.0, 0.5, 1.0]})
    one = gradient_products(model, setup, **args)
    top = float(one.abs().max())
    assert top > 1e-4
    for chunk in (1, 3):
        blocks = gradient_products(model, setup, chunk_positions=chunk, **args)
        assert float((blocks - one).abs().max()) <= 1e-6 * top


@pytest.mark.parametrize("ablation", ["patching", "mean"])
def test_eap_ig_along_the_edges_is_the_mask_gradient(case, ablation):
    """Each mask value's scores are d metric / d mask[edge] at every edge's mask = α (autograd through the
    reference forward with every edge weighted by its mask), for α = 0, 1/2 and 1 (one, two and three steps)."""
    hf, model, clean, corrupted = case
    kw = {"ablation": "mean", "reference": corrupted} if ablation == "mean" else {}
    setup = circuit_setup(model, clean, None if kw else corrupted, metric=METRIC, **kw)
    graph = setup.graph
    ig = {s: eap_ig_scores(model, setup, steps=s, path="edges").double() for s in (1, 2, 3)}
    at = {0.0: ig[1], 1.0: 2 * ig[2] - ig[1], 0.5: 3 * ig[3] - 2 * ig[2]}  # α = k / (steps − 1)
    patch = _sources(hf, graph, corrupted)
    if kw:
        patch = {k: v.mean(dim=(0, 1), keepdim=True) for k, v in patch.items()}
    for p in hf.parameters():
        p.requires_grad_(False)
    names = [tuple(name.split("->")) for name in graph.edge_names()]
    for alpha, grad in at.items():
        mask = torch.full((graph.n_edges,), alpha, requires_grad=True)
        logits, _ = reference_logits(hf, graph, clean, patch, dict(zip(names, mask.unbind())))
        METRIC(logits).backward()
        ref = mask.grad.double()
        # not all zero (with every edge patched from the corrupted run, each source already writes its patch)
        assert ref.abs().max() > 1e-3 or (alpha == 1.0 and ablation == "patching")
        assert torch.allclose(grad, ref, atol=1e-6, rtol=1e-4), (alpha, float((grad - ref).abs().max()))


def test_acdc_equals_one_edge_at_a_time(case):
    _, model, clean, corrupted = case
    setup = circuit_setup(model, clean, corrupted, metric=METRIC)
    graph = setup.graph
    from analyses.circuits.scores import acdc as greedy_acdc
    from analyses.circuits.scores import acdc_order

    ablated = float(run_masks(model, setup, torch.ones(1, graph.n_edges))[0])
    threshold = 0.02 * abs(setup.clean_value - ablated)
    kept, _ = greedy_acdc(model, setup, threshold)
    # the plain loop
    better = 1.0 if setup.clean_value >= ablated else -1.0
    state, current = torch.zeros(graph.n_edges), setup.clean_value
    for e in acdc_order(graph).tolist():
        trial = state.clone()
        trial[e] = 1
        v = float(run_masks(model, setup, trial[None])[0])
        if better * (current - v) < threshold:
            state, current = trial, v
    assert torch.equal(kept, state == 0)
    assert 0 < int(kept.sum()) < graph.n_edges
    circuit = acdc(model, clean, corrupted, METRIC, threshold=threshold)
    assert torch.equal(circuit.edges, kept)


def test_selection_and_faithfulness(case):
    _, model, clean, corrupted = case
    scores = edge_attribution(model, clean, corrupted, METRIC, method="exact")
    graph = scores.graph
    c = scores.circuit(top_n=25)
    assert c.n_edges == 25 and set(c.edge_names()) == {r["edge"] for r in scores.top_rows(25)}
    assert scores.circuit(threshold=0.0).n_edges == graph.n_edges
    grown = greedy(graph, scores.scores, 30)
    # every kept edge reaches a node whose input is already in the circuit, back to the logits
    assert grown.sum() == 30 and graph.edges[grown][:, 1].eq(graph.n_receivers - 1).any()
    curve = scores.faithfulness(model)
    assert curve.fractions == list(MIB_FRACTIONS) and curve.n_edges[-1] == graph.n_edges
    assert abs(curve.faithfulness[-1] - 1.0) < 1e-5
    masks = torch.stack([(~top_n(scores.scores, n)).float() for n in curve.n_edges])
    values = run_masks(model, scores.setup, masks)
    assert torch.allclose(torch.tensor(curve.values), values, atol=1e-6)
    f = curve.faithfulness
    x = list(MIB_FRACTIONS)
    assert math.isclose(curve.cpr, sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(9)), rel_tol=1e-9)
    assert areas([0.0, 1.0], [1.0, 1.0]) == (1.0, 0.0)


def test_dangling_edges_are_pruned_on_a_hand_built_circuit():
    g = EdgeGraph(3, 4, 2)  # kv group 0 feeds heads 0 and 1, group 1 heads 2 and 3
    kept = [
        "input->a0.h0<q>", "a0.h0->m0", "m0->logits",  # a path from the embeddings to the logits
        "input->a1.kv0<k>", "a1.h1->logits",  # a head reached through its group's key input
        "m0->m1", "m1->a2.kv1<v>", "a2.h3->logits",  # a longer path through a value input
    ]  # fmt: skip
    dangling = [
        "a1.h3->logits",  # its source reads nothing in the circuit (group 1 of layer 1 has no edge)
        "a0.h2->a1.h2<q>", "a1.h2->logits",  # a chain that starts from an unreached head
        "input->m2",  # m2 writes nowhere in the circuit
        "input->a0.h3<q>", "a0.h3->a2.h0<q>",  # a chain that ends at a head writing nowhere
        "a0.h1->m0",  # reaches the logits, but a0.h1 is not reached
    ]  # fmt: skip
    keep = torch.zeros(g.n_edges, dtype=torch.bool)
    keep[g.edge_indices(kept + dangling)] = True
    pruned = prune_dangling(g, keep)
    assert sorted(g.edge_names()[i] for i in torch.nonzero(pruned)[:, 0].tolist()) == sorted(kept)
    assert torch.equal(prune_dangling(g, pruned), pruned)
    assert not prune_dangling(g, torch.zeros(g.n_edges, dtype=torch.bool)).any()
    with pytest.raises(InputError, match="bool edge mask") as err:
        prune_dangling(g, keep.float())
    assert err.value.param == "keep"


def test_pruning_a_circuit_changes_only_its_edge_count(case):
    """Under patching every dropped edge carried its patch value already: the circuit's metric is unchanged."""
    _, model, clean, corrupted = case
    scores = edge_attribution(model, clean, corrupted, METRIC, method="eap")
    for n in (10, 40, 150):
        circuit = scores.circuit(top_n=n)
        pruned = scores.circuit(top_n=n, prune=True)
        assert pruned.n_edges <= n and pruned.selection["pruned"]
        assert torch.equal(pruned.edges, circuit.edges & pruned.edges)
        values = run_masks(model, scores.setup, torch.stack([(~circuit.edges).float(), (~pruned.edges).float()]))
        assert abs(float(values[0] - values[1])) < 1e-5
    assert scores.circuit(top_n=10, prune=True).n_edges < 10  # some of the top edges dangle


def test_circuit_runs_as_itself(case):
    _, model, clean, corrupted = case
    scores = edge_attribution(model, clean, corrupted, METRIC, method="eap")
    circuit = scores.circuit(top_n=40)
    with circuit.applied(model, ablation="patching", corrupted=corrupted), torch.no_grad():
        inside = float(METRIC(model(clean)))
    assert abs(inside - circuit.evaluate(model)) < 1e-5
    with torch.no_grad():
        assert abs(float(METRIC(model(clean))) - scores.clean_value) < 1e-6  # hooks gone on exit
    # mean ablation works for any input, generation with a KV cache included (= without one)
    with circuit.applied(model, ablation="mean", reference=corrupted):
        cached = model.generate(clean[:1], max_new_tokens=4)
        plain = model.generate(clean[:1], max_new_tokens=4, use_past_kv_cache=False)
    assert torch.equal(cached, plain)
    back = Circuit.from_dict(circuit.to_dict())
    assert torch.equal(back.edges, circuit.edges) and back.nodes() == circuit.nodes()
    assert len(circuit.figure().data) == circuit.n_edges + 1


def test_bad_input_is_refused_first(case):
    _, model, clean, corrupted = case
    with pytest.raises(InputError, match="ablation='patching' needs corrupted"):
        edge_attribution(model, clean, None, METRIC)
    with pytest.raises(InputError, match="method="):
        edge_attribution(model, clean, corrupted, METRIC, method="acdc")
    with pytest.raises(InputError, match="steps="):
        edge_attribution(model, clean, corrupted, METRIC, method="eap-ig", steps=0)
    with pytest.raises(InputError, match="path='middle'; use 'inputs'") as err:
        edge_attribution(model, clean, corrupted, METRIC, method="eap-ig", path="middle")
    assert err.value.param == "path"
    with pytest.raises(InputError, match="with a mean or zero ablation pass path='edges'"):
        edge_attribution(model, clean, metric=METRIC, method="eap-ig", ablation="mean", reference=corrupted)
    scores = edge_attribution(model, clean, corrupted, METRIC)
    with pytest.raises(InputError, match="exactly one"):
        scores.circuit(top_n=3, threshold=0.1)
    with pytest.raises(InputError, match="top_n="):
        scores.circuit(top_n=-1)
    other = HookedLlama.from_hf(tiny_hf("mqa"))
    with pytest.raises(InputError, match="kv groups"):
        scores.circuit(top_n=3).evaluate(other, clean=clean, corrupted=corrupted, metric=METRIC)
