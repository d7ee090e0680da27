"""Circuits: edge-level discovery on a Llama's edge graph and circuits you can run, measure and export.

- ``EdgeGraph``: sources (embeddings, heads, MLPs) and receivers (each head's q input, each key/value
  group's k and v inputs, each MLP's input, the logits) joined through the residual stream.
- ``edge_attribution(model, clean, corrupted, …, method="eap" | "eap-ig" | "exact")`` → ``EdgeScores``;
  ``acdc(…, threshold=)`` → ``Circuit``.
- ``EdgeScores.circuit(top_n= | threshold= | greedy=, prune=)`` → ``Circuit``: a table, a plotly graph, JSON,
  ``evaluate(model)``, and ``applied(model)``, a context manager that runs the model as the circuit.
- ``faithfulness_curve`` → ``FaithfulnessCurve`` (MIB's circuit sizes, CPR and CMD).
- ``attribution_graph(model, prompt, transcoders)`` → ``AttributionGraph``: direct effects between
  transcoder features, error nodes, token embeddings and logits in a local replacement model; pruned by
  influence; circuit-tracer's graph JSON and a plotly view.

>>> from analyses.circuits import edge_attribution
>>> scores = edge_attribution(model, clean, corrupted, answers=(" Mary", " John"), method="eap-ig", steps=10)
>>> circuit = scores.circuit(top_n=300)
>>> scores.faithfulness(model).cpr
"""

from .attribution_graph import AttributionGraph, attribution_graph
from .discovery import acdc, edge_attribution
from .graph import EdgeGraph, Receiver, Source
from .patching import ABLATIONS, CircuitSetup, EdgeHooks, SourceValues, circuit_setup, run_masks
from .results import Circuit, EdgeScores, FaithfulnessCurve, faithfulness_curve
from .selection import MIB_FRACTIONS, greedy, prune_dangling, top_n

__all__ = [
    "EdgeGraph",
    "Source",
    "Receiver",
    "edge_attribution",
    "acdc",
    "EdgeScores",
    "Circuit",
    "FaithfulnessCurve",
    "faithfulness_curve",
    "circuit_setup",
    "CircuitSetup",
    "run_masks",
    "EdgeHooks",
    "SourceValues",
    "ABLATIONS",
    "MIB_FRACTIONS",
    "top_n",
    "greedy",
    "prune_dangling",
    "attribution_graph",
    "AttributionGraph",
]
