"""Attribution graphs against finite differences in the replacement model, written here with plain hooks
that substitute cached values (no autograd), and against the maths of completeness and influence."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from analyses.circuits.attribution_graph import attribution_graph
from analyses.circuits.attribution_result import influence
from analyses.circuits.replacement import ReplacementModel, skip_output
from analyses.saes import SAE, SAEConfig
from hooks import HookedLlama, InputError
from tests.helpers import tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")


def random_transcoders(model, arch: str, skip: bool, seed: int = 0, hook: str = "ln2.hook_normalized", d_sae: int = 40):
    g = torch.Generator().manual_seed(seed)
    M, out = model.d_model, []
    for layer in range(model.n_layers):
        cfg = SAEConfig(
            arch,
            M,
            d_sae,
            f"blocks.{layer}.{hook}",
            hook_name_out=f"blocks.{layer}.hook_mlp_out",
            d_out=M,
            k=6 if arch == "topk" else None,
            skip_connection=skip,
        )
        t = SAE(cfg)
        with torch.no_grad():
            t.W_enc.copy_(torch.randn(M, d_sae, generator=g) * 0.3)
            t.W_dec.copy_(torch.randn(d_sae, M, generator=g) * 0.02)
            t.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
            if arch == "jumprelu":
                t.threshold.copy_(torch.rand(d_sae, generator=g) * 0.2)
            if skip:
                t.W_skip.copy_(torch.randn(M, M, generator=g) * 0.05)
        out.append(t)
    return out


def frozen_value(model, rm, tokens, target, source=None):
    """The target's input in the replacement model with the source's output added once more (linear, so
    the difference with ``source=None`` is the direct effect). Frozen patterns, scales and MLP outputs are
    substituted from a cached clean run by hooks."""
    names = [
        n for n in model.hook_names() if n.endswith(("hook_pattern", "hook_scale", "hook_mlp_out")) and "_ln." not in n
    ]
    names += [rm.input_hook(i) for i in rm.transcoders]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=sorted(set(names)))
    seen: dict[int, torch.Tensor] = {}

    def put(t, hook):
        return cache[hook.name]

    def mlp(t, hook):
        out = cache[hook.name].clone()
        tr = rm.transcoders.get(hook.layer)
        if tr is not None and tr.cfg.skip_connection:
            out += skip_output(tr, seen[hook.layer]) - skip_output(tr, cache[rm.input_hook(hook.layer)])
        if source is not None and source[0] == "mlp" and source[1] == hook.layer:
            out[0, source[2]] += source[3]
        return out

    def read_in(t, hook):
        seen[hook.layer] = t

    def embed(t, hook):
        if source is not None and source[0] == "embed":
            t = t.clone()
            t[0, source[2]] += source[3]
        return t

    fwd = [("hook_embed", embed)] + [(n, put) for n in names if n.endswith(("hook_pattern", "hook_scale"))]
    fwd += [(f"blocks.{i}.hook_mlp_out", mlp) for i in range(model.n_layers)]
    fwd += [(rm.input_hook(i), read_in) for i in rm.transcoders]
    with torch.no_grad(), model.hooks(fwd_hooks=fwd):
        logits = model(tokens[None])[0, -1]
    if target[0] == "logit":
        return float(logits[target[1]] - logits.mean())
    layer, pos, feat = target[1:]
    tr = rm.transcoders[layer]
    return float((seen[layer][0, pos] @ tr.W_enc[:, feat] + tr.b_enc[feat]).detach())


@pytest.fixture(scope="module", params=[("jumprelu", True, "ln2.hook_normalized"), ("topk", False, "hook_resid_mid")])
def built(request):
    arch, skip, hook = request.param
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    tcs = random_transcoders(model, arch, skip, hook=hook)
    tokens = torch.randint(3, 128, (7,), generator=torch.Generator().manual_seed(0))
    graph = attribution_graph(model, tokens, tcs, batch_size=16, zero_first=False)
    return model, tcs, tokens, graph


def test_replacement_model_reconstructs_the_mlps(built):
    model, tcs, tokens, _ = built
    rm = ReplacementModel(model, tcs)
    state = rm.prompt_state(tokens)
    with torch.no_grad():
        ref = model(tokens[None])[0]
    assert torch.allclose(state.logits, ref, atol=1e-5)  # the eager attention that hooks the patterns
    # features + skip + b_dec + error add up to each MLP's output
    for layer, t in rm.transcoders.items():
        x = state.tc_in[layer]
        recon = t.decode(state.acts[layer]) + (skip_output(t, x) if t.cfg.skip_connection else 0)
        assert torch.allclose(recon + state.errors[layer], state.mlp_out[layer], atol=1e-6)


def test_reverse_maps_equal_autograd(built):
    """Each layer's reverse maps (skip connection, then attention with the frozen pattern and norm divisors)
    equal autograd through the model's own layer with those values substituted by hooks, over every
    position and over the positions after the first."""
    model, tcs, tokens, _ = built
    rm = ReplacementModel(model, tcs)
    lin = rm.linear(rm.prompt_state(tokens))
    L, P, M = model.n_layers, len(tokens), model.d_model
    names = [
        n for n in model.hook_names() if n.endswith(("hook_pattern", "hook_scale", "hook_mlp_out")) and "_ln." not in n
    ]
    names += [rm.input_hook(i) for i in rm.transcoders] + [f"blocks.{i}.hook_resid_pre" for i in range(L)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=sorted(set(names)))
    gen = torch.Generator().manual_seed(2)
    seen: dict[int, torch.Tensor] = {}

    def put(t, hook):
        return cache[hook.name]

    def read_in(t, hook):
        seen[hook.layer] = t

    def mlp(t, hook):
        tr = rm.transcoders[hook.layer]
        out = cache[hook.name]
        if tr.cfg.skip_connection:
            out = out + skip_output(tr, seen[hook.layer]) - skip_output(tr, cache[rm.input_hook(hook.layer)])
        return out

    for layer in range(L):
        fwd = [(n, put) for n in names if n.endswith(("hook_pattern", "hook_scale"))]
        fwd += [(f"blocks.{layer}.hook_mlp_out", mlp), (rm.input_hook(layer), read_in)]
        x = cache[f"blocks.{layer}.hook_resid_pre"].clone().requires_grad_(True)
        with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
            y = model(x, start_at_layer=layer, stop_at_layer=layer + 1)
            G = torch.randn(3, P, M, generator=gen)
            want = torch.cat([torch.autograd.grad(y, x, G[i : i + 1], retain_graph=True)[0] for i in range(3)])
        got = G.clone()
        lin.skip_back(layer, got)
        lin.attn_back(layer, got)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
        later = G[:, 1:].clone()  # a gradient at a later position never reaches an earlier one but through values
        lin.skip_back(layer, later, 1)
        dv = lin.attn_back(layer, later, 1)
        assert dv.shape == (3, 1, model.n_kv_heads * model.d_head)
        assert torch.allclose(later, want[:, 1:], atol=1e-5, rtol=1e-4)


def check_finite_differences(model, tcs, tokens, graph, n_features: int = 3) -> int:
    rm = ReplacementModel(model, tcs)
    A, F, P, L = graph.adjacency, graph.n_features, graph.n_pos, graph.n_layers
    state = rm.prompt_state(tokens)
    gen = torch.Generator().manual_seed(1)
    targets = [("logit", graph.logit_tokens[0], F + L * P + P)]
    for i in torch.randperm(F, generator=gen)[:n_features].tolist():
        layer, pos, feat = graph.features[i].tolist()
        targets.append(("feature", layer, pos, feat, i))
    checked = 0
    for target in targets:
        row = target[-1]
        tgt = target[:-1] if target[0] == "feature" else target[:2]
        base = frozen_value(model, rm, tokens, tgt)
        strongest = torch.argsort(A[row].abs(), descending=True)[:4].tolist()
        # strongest, an error node, the first token and another
        for col in strongest + [F + 2 * P + 1, F + L * P, F + L * P + 2]:
            kind = graph.node_kind(col)
            if kind == "feature":
                layer, pos, feat = graph.features[col].tolist()
                t = tcs[layer]
                vec = graph.activations[col] * t.W_dec[feat]
                src = ("mlp", layer, pos, vec.detach())
            elif kind == "error":
                layer, pos = divmod(col - F, P)
                src = ("mlp", layer, pos, state.errors[layer, pos])
            else:
                pos = col - F - L * P
                src = ("embed", None, pos, state.embed[pos])
            fd = frozen_value(model, rm, tokens, tgt, src) - base
            assert abs(fd - float(A[row, col])) <= 1e-4 * (1 + abs(fd)), (target, col, fd, float(A[row, col]))
            checked += 1
    return checked


def test_edges_equal_finite_differences(built):
    model, tcs, tokens, graph = built
    assert check_finite_differences(model, tcs, tokens, graph) == 4 * 7


@pytest.mark.parametrize("n_tokens", [7, 12])
def test_edges_equal_finite_differences_with_the_first_position_zeroed(built, n_tokens):
    """circuit-tracer's default (no sources at the first position but its token): the first position's
    gradient is not carried, its token's effect read off through the values; 12 positions take the
    per-head position mixing of long prompts."""
    model, tcs, _, _ = built
    tokens = torch.randint(3, 128, (n_tokens,), generator=torch.Generator().manual_seed(3))
    graph = attribution_graph(model, tokens, tcs, batch_size=5)
    assert graph.adjacency[:, graph.n_features + graph.n_layers * graph.n_pos].any()
    assert check_finite_differences(model, tcs, tokens, graph, n_features=5) == 6 * 7
    # rows are the same in any batching
    again = attribution_graph(model, tokens, tcs, batch_size=1000)
    A, B = again.adjacency, graph.adjacency
    assert (A - B).abs().max() <= 1e-6 * (1 + B.abs().max())  # fp32 products of another shape


@pytest.mark.parametrize("zero_first", [False, True])
def test_every_split_position_gives_the_same_rows(built, monkeypatch, zero_first):
    """Positions before the split are carried forwards from their sources, later ones backwards from the
    targets (the split is chosen by cost): every split gives the same adjacency as carrying every position
    backwards, one in the middle equals finite differences, and features visited by influence get the same
    rows."""
    model, tcs, tokens, _ = built
    module = importlib.import_module("analyses.circuits.attribution_graph")
    graphs = []
    for m in range(len(tokens)):
        monkeypatch.setattr(module, "_first_position", lambda *a, m=m: m)
        graphs.append(attribution_graph(model, tokens, tcs, batch_size=8, zero_first=zero_first))
    B = graphs[0].adjacency
    for g in graphs[1:]:
        assert (g.adjacency - B).abs().max() <= 1e-6 * (1 + B.abs().max())
    mid = graphs[3]
    assert check_finite_differences(model, tcs, tokens, mid, n_features=4) == 5 * 7
    monkeypatch.setattr(module, "_first_position", lambda *a: 3)
    small = attribution_graph(model, tokens, tcs, batch_size=4, max_feature_nodes=60, zero_first=zero_first)
    F, f = mid.n_features, small.n_features
    keep = [int(torch.nonzero((mid.features == row).all(1))[0, 0]) for row in small.features]
    assert (small.features[:, 1] < 3).any() and (small.features[:, 1] >= 3).any()  # both sides of the split
    cols = torch.tensor(keep + list(range(F, mid.n_nodes)))
    want = mid.adjacency[torch.tensor(keep)][:, cols]
    assert (small.adjacency[:f] - want).abs().max() <= 1e-6 * (1 + want.abs().max())


def test_rows_add_up_to_the_target(built):
    """With b_dec = 0 and no model biases, a feature's pre-activation is its row's sum plus b_enc, and a
    logit node's value (logit − mean logit) its row's sum."""
    model, tcs, tokens, graph = built
    A, F = graph.adjacency, graph.n_features
    b_enc = torch.stack([tcs[layer].b_enc[feat] for layer, _, feat in graph.features.tolist()]).detach()
    scale = A[:F].abs().sum(1)
    assert ((A[:F].sum(1) + b_enc - graph.pre_activations).abs() <= 1e-5 * (1 + scale)).all()
    logit_rows = A[-graph.n_logits :]
    assert ((logit_rows.sum(1) - graph.target_values).abs() <= 1e-5 * (1 + logit_rows.abs().sum(1))).all()
    assert graph.n_features == graph.n_active and torch.all(graph.activations > 0)


def test_influence_pruning_and_the_graph_file(built, tmp_path):
    model, tcs, tokens, graph = built
    A = graph.adjacency
    # influence = w (Â + Â² + …) = w ((I − Â)^-1 − I)
    a = A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-10)
    w = graph.logit_weights()
    closed = w.double() @ (
        torch.linalg.inv(torch.eye(len(a), dtype=torch.float64) - a.double()) - torch.eye(len(a), dtype=torch.float64)
    )
    assert torch.allclose(influence(A, w).double(), closed, atol=1e-5)
    nodes, edges, _ = graph.prune(0.8, 0.98)
    assert nodes[-graph.n_logits - graph.n_pos :].all() and not edges[:, ~nodes].any()
    path = graph.save_json(tmp_path / "g.json")
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    assert sum(n["feature_type"] == "logit" for n in data["nodes"]) == graph.n_logits
    assert len(graph.figure().data) >= 4
    small = attribution_graph(model, tokens, tcs, batch_size=5, max_feature_nodes=7, zero_first=False)
    assert small.n_features == 7 and small.n_active == graph.n_active
    # circuit-tracer's default: no features at the first position, its error nodes zero
    first = attribution_graph(model, tokens, tcs, batch_size=16)
    assert (first.features[:, 1] > 0).all() and first.n_active == graph.n_active - int(
        (graph.features[:, 1] == 0).sum()
    )
    F, P = first.n_features, first.n_pos
    assert not first.adjacency[:, F : F + first.n_layers * P].view(-1, first.n_layers, P)[:, :, 0].any()


def test_bad_transcoders_are_refused():
    model = HookedLlama.from_hf(tiny_hf("gqa"))
    tokens = torch.randint(3, 128, (5,))
    sae = SAE(SAEConfig("topk", 64, 16, "blocks.0.hook_resid_post", k=2))
    with pytest.raises(InputError, match="is not a transcoder"):
        attribution_graph(model, tokens, [sae])
    wrong = random_transcoders(model, "jumprelu", False)[:1]
    wrong[0].cfg.hook_name_out = "blocks.1.hook_mlp_out"
    with pytest.raises(InputError, match="not a per-layer MLP transcoder"):
        attribution_graph(model, tokens, wrong)
    gated = random_transcoders(model, "jumprelu", False)[:1]
    gated[0].cfg.normalize_activations = "layer_norm"
    with pytest.raises(InputError, match="no linear encoder input"):
        attribution_graph(model, tokens, gated)
    with pytest.raises(InputError, match="two transcoders"):
        attribution_graph(model, tokens, random_transcoders(model, "jumprelu", False)[:1] * 2)
    with pytest.raises(InputError, match="one prompt"):
        attribution_graph(model, torch.randint(3, 128, (2, 5)), random_transcoders(model, "jumprelu", False))
