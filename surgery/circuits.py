"""From a circuit to weight edits: a node-level circuit (heads, MLPs or MLP neurons kept; everything else
mean- or zero-ablated) as an ``EditPlan``, checked against the circuit run with hooks and exported.

A node-level circuit keeps some sources (heads, MLPs, optionally a subset of an MLP's neurons) and
ablates every other one: its output is replaced, for every reader at once, by its mean over reference
prompts or by zero. That is an edge circuit in which every edge leaving a kept node is kept and every
edge leaving an ablated node is patched, and it has exact weight forms:

==================  ==============================================================================
ablated             edits (each equal to its hook form, ``surgery.edits``)
==================  ==============================================================================
head, zero          ``ZeroHeads``: the head's ``o_proj`` columns zeroed
head, mean          ``MeanAblateHeads``: columns zeroed, ``W_O[:, h] · mean(z_h)`` into ``o_proj.bias``
MLP, zero           ``ZeroNeurons`` of every neuron (``down_proj`` zeroed)
MLP, mean           that plus ``AddSteering``: the MLP's mean output into ``down_proj.bias``
neurons, zero/mean  ``ZeroNeurons`` of the others (plus ``AddSteering`` of ``W_down[:, n] · mean(post_n)``)
==================  ==============================================================================

What cannot be baked into a Hugging Face checkpoint, and why (``bake_refusals`` says which applies):

- **Edge-level circuits** — a node whose outgoing edges are partly kept and partly patched: every reader
  of the residual stream sees the same sum of outputs, and a weight edit changes a node's output for all
  of them, so one reader cannot get the patched value while another gets the real one (that needs a copy
  of the node's computation per reader, which the model's class does not have). The same holds for a
  kept node whose own inputs are partly patched (an edge into its q, k or v).
- **Patching from a corrupted prompt** (``ablation="patching"``): the patch value depends on another
  input; weights give one function of the current input.
- **Ablating the token embeddings** (the ``input`` node): no edit replaces every embedding by its mean
  without changing the unembedding when the two are tied, and none is offered for untied ones either.
- **Families without the bias slot** a mean needs (``o_proj.bias`` or ``down_proj.bias``): the edits
  refuse them with a one-line ``EditError``; zero ablation needs no bias.

Means are position-independent (over every real token of the reference prompts), so the edited model
runs the circuit on any input, as ``Circuit.applied(model, ablation="mean")`` does.

Example::

    circuit = scores.circuit(top_n=300).node_level()           # or surgery.node_circuit(model, heads=…)
    plan = surgery.circuit_edits(model, circuit, ablation="mean", reference=prompts)
    surgery.export_circuit(model, "ioi-circuit", circuit, reference=prompts)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from _core.errors import EditError, InputError
from analyses.circuits.graph import EdgeGraph
from analyses.circuits.patching import token_means
from analyses.circuits.results import Circuit
from analyses.circuits.selection import node_receivers
from analyses.heads import parse_heads
from hooks import act_name

from .edits import AddSteering, MeanAblateHeads, ZeroHeads, ZeroNeurons
from .plan import EditPlan

if TYPE_CHECKING:
    from hooks.model import HookedLlama

ABLATIONS = ("mean", "zero")


@dataclass
class NodeCircuit:
    """The kept nodes of a node-level circuit: ``heads`` {(layer, head)}, ``mlps`` {layer} kept whole and
    ``neurons`` {layer: kept neurons} for MLPs kept in part."""

    heads: set
    mlps: set
    neurons: dict

    def as_circuit(self, graph: EdgeGraph) -> Circuit:
        """The edge circuit it equals: every edge leaving a kept node (and the embeddings) kept."""
        kept_src = {0}
        kept_src |= {graph.source_index("head", layer, h) for layer, h in self.heads}
        kept_src |= {graph.source_index("mlp", layer) for layer in self.mlps}
        edges = torch.tensor([int(s) in kept_src for s in graph.edges[:, 0].tolist()])
        return Circuit(graph, edges, selection={"by": "nodes"})


def bake_refusals(circuit: Circuit) -> list[str]:
    """Why the circuit has no weight form (empty when it is node-level): one line per reason."""
    g = circuit.graph
    kept = circuit.edges
    reasons = []
    by_source: dict[int, set[bool]] = {}
    for (s, _r), k in zip(g.edges.tolist(), kept.tolist()):
        by_source.setdefault(s, set()).add(k)
    mixed = [g.sources[s].name for s, ks in by_source.items() if len(ks) == 2]
    if mixed:
        reasons.append(
            f"{len(mixed)} node(s) ({', '.join(mixed[:5])}{' …' if len(mixed) > 5 else ''}) have some outgoing edges "
            "kept and some patched: weights change a node's output for every reader at once"
        )
    if by_source.get(0) == {False}:
        reasons.append(
            "the token embeddings (input) are ablated: no edit replaces them without touching the unembedding"
        )
    live = {s for s, ks in by_source.items() if ks == {True}}
    partial_in = []
    for s in sorted(live):
        recv = set(node_receivers(g, s))
        if not recv:
            continue
        into = g.edges[:, 1].unsqueeze(1).eq(torch.tensor(sorted(recv))).any(1)
        srcs_in = g.edges[into, 0].tolist()
        if any((src in live) != bool(k) for src, k in zip(srcs_in, kept[into].tolist())):
            partial_in.append(g.sources[s].name)
    if partial_in:
        reasons.append(
            f"kept node(s) ({', '.join(partial_in[:5])}{' …' if len(partial_in) > 5 else ''}) read some patched and "
            "some real inputs: one residual stream cannot be both"
        )
    return reasons


def node_circuit(model: HookedLlama, *, heads=(), mlps=(), neurons=None, circuit: Circuit | None = None) -> NodeCircuit:
    """The kept nodes: from a node-level ``circuit`` (refused with the reasons when it is edge-level), or
    named: ``heads`` ("L3H5" or (layer, head)), ``mlps`` (layers kept whole), ``neurons`` {layer: [kept]}."""
    if circuit is not None:
        circuit.check_model(model)
        reasons = bake_refusals(circuit)
        if reasons:
            raise EditError("this circuit cannot be baked into weights: " + "; ".join(reasons), param="circuit")
        g = circuit.graph
        live = {int(s) for s in g.edges[circuit.edges, 0].tolist()}
        return NodeCircuit(
            heads={(g.sources[s].layer, g.sources[s].index) for s in live if g.sources[s].kind == "head"},
            mlps={g.sources[s].layer for s in live if g.sources[s].kind == "mlp"},
            neurons={},
        )
    kept_heads = set(parse_heads(model, list(heads))) if heads else set()
    kept_mlps = set()
    for layer in mlps:
        layer = int(layer)
        if not 0 <= layer < model.n_layers:
            raise InputError(f"MLP layer {layer} is out of range (0..{model.n_layers - 1})", param="mlps")
        kept_mlps.add(layer)
    kept_neurons: dict[int, list[int]] = {}
    for layer, ns in (neurons or {}).items():
        layer = int(layer)
        if not 0 <= layer < model.n_layers or layer in kept_mlps:
            raise InputError(
                f"neurons of layer {layer}: the layer is out of range or its MLP is already kept whole", param="neurons"
            )
        ns = sorted({int(n) for n in ns})
        if any(not 0 <= n < model.d_mlp for n in ns):
            raise InputError(f"a neuron of layer {layer} is out of range (0..{model.d_mlp - 1})", param="neurons")
        kept_neurons[layer] = ns
    return NodeCircuit(kept_heads, kept_mlps, kept_neurons)


def circuit_edits(
    model: HookedLlama, circuit: Circuit | NodeCircuit, *, ablation: str = "mean", reference=None
) -> EditPlan:
    """The ``EditPlan`` that bakes a node-level circuit into the weights (see the module table).

    ``ablation``: "mean" (over every real token of the ``reference`` prompts) or "zero"; "patching" and
    edge-level circuits are refused with the reason (module docstring).
    """
    if ablation not in ABLATIONS:
        why = " (patch values from a corrupted prompt depend on another input)" if ablation == "patching" else ""
        raise EditError(
            f"ablation={ablation!r} cannot be baked into weights{why}; use 'mean' or 'zero'", param="ablation"
        )
    nodes = circuit if isinstance(circuit, NodeCircuit) else node_circuit(model, circuit=circuit)
    if ablation == "mean" and reference is None:
        raise InputError("ablation='mean' needs reference= prompts to take the means over", param="reference")
    L, H = model.n_layers, model.n_heads
    means: dict[str, torch.Tensor] = {}
    if ablation == "mean":
        names = [act_name("z", layer) for layer in range(L)]
        names += [
            act_name("mlp_out", layer) for layer in range(L) if layer not in nodes.mlps and layer not in nodes.neurons
        ]
        names += [act_name("post", layer) for layer in nodes.neurons]
        means = token_means(model, reference, names)
    plan = EditPlan()
    for layer in range(L):
        ablated = [h for h in range(H) if (layer, h) not in nodes.heads]
        if ablated:
            if ablation == "zero":
                plan.append(ZeroHeads(layer, ablated))
            else:
                plan.append(MeanAblateHeads(layer, ablated, means[act_name("z", layer)][ablated].float()))
    for layer in range(L):
        if layer in nodes.mlps:
            continue
        kept = nodes.neurons.get(layer, [])
        off = sorted(set(range(model.d_mlp)) - set(kept))
        plan.append(ZeroNeurons(layer, off))
        if ablation == "mean":
            if layer in nodes.neurons:
                w = model.model.layers[layer].mlp.down_proj.weight.detach().double().cpu()
                vec = w[:, off] @ means[act_name("post", layer)].cpu()[off]
            else:
                vec = means[act_name("mlp_out", layer)].cpu()
                bias = model.model.layers[layer].mlp.down_proj.bias
                if bias is not None:
                    vec = vec - bias.detach().double().cpu()
            plan.append(AddSteering(layer, vec.float()))
    return plan


def export_circuit(
    model: HookedLlama,
    out_dir,
    circuit: Circuit | NodeCircuit,
    *,
    ablation: str = "mean",
    reference=None,
    overwrite: bool = False,
    probe_prompts=None,
    tolerance: float = 1e-4,
):
    """Bake a node-level circuit and export it (``surgery.export``: atomic, reloaded and compared).

    Before writing, the edited weights' logits on the ``reference`` prompts (or ``probe_prompts``) are
    compared with the circuit run by hooks on the unedited model (``Circuit.applied``); a difference above
    ``tolerance`` is an ``EditError``. Returns (``ExportResult``, the largest difference).
    """
    from .export import export

    plan = circuit_edits(model, circuit, ablation=ablation, reference=reference)
    nodes = circuit if isinstance(circuit, NodeCircuit) else node_circuit(model, circuit=circuit)
    as_edges = nodes.as_circuit(EdgeGraph.from_model(model)) if not nodes.neurons else None
    check = probe_prompts if probe_prompts is not None else reference
    diff = float("nan")
    if as_edges is not None and check is not None:
        if isinstance(check, torch.Tensor):
            tokens, mask = (check[None] if check.dim() == 1 else check), None
        else:
            tokens, mask = model.tokenize([check] if isinstance(check, str) else list(check))
        with torch.no_grad(), as_edges.applied(model, ablation=ablation, reference=reference):
            want = model(tokens, attention_mask=mask)
        with torch.no_grad(), plan.applied(model):
            got = model(tokens, attention_mask=mask)
        keep = torch.ones_like(tokens, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        diff = float((got - want).abs()[keep].max())
        if diff > tolerance:
            raise EditError(
                f"the edited weights differ from the circuit run by hooks by {diff:.3g} (> {tolerance}); "
                "report this with the circuit file"
            )
    result = export(model, out_dir, edits=plan, overwrite=overwrite, probe_prompts=probe_prompts)
    return result, diff
