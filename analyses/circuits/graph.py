"""The edge graph of a Llama: which component outputs reach which component inputs through the residual stream.

Sources (nodes that write to the residual stream), in forward order:

- ``input``: the token embeddings;
- ``a{L}.h{H}``: attention head H of layer L (its share of ``o_proj``'s output, ``attn.hook_result``);
- ``m{L}``: the MLP of layer L (``hook_mlp_out``).

Receivers (inputs that read the residual stream):

- ``a{L}.h{H}<q>``: the query input of query head H of layer L;
- ``a{L}.kv{G}<k>`` / ``a{L}.kv{G}<v>``: the key / value input of key/value group G. Under grouped-query
  attention one ``k_proj`` / ``v_proj`` slice serves every query head of a group, so the group is the
  receiver (EAP-IG ungroups the heads instead, giving each query head its own copy of the group's
  projection; here the graph is the model's own);
- ``m{L}``: the input of the MLP of layer L (it reads ``hook_resid_mid``, so the heads of its own layer
  feed it);
- ``logits``: the final residual stream, read by the final norm and the unembedding.

An edge ``s -> r`` exists when ``s`` writes before ``r`` reads: every source of an earlier layer feeds
every receiver; the heads of layer L also feed ``m{L}``. Edge names follow EAP-IG's spelling:
``"a3.h2->a5.h1<q>"``, ``"input->m0"``, ``"m29->logits"``.

Example::

    g = EdgeGraph.from_model(model)       # SmolLM2: 301 sources, 481 receivers
    g.n_edges                             # 70,651
    g.edge_index("a19.h2->logits")
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hooks import InputError

if TYPE_CHECKING:
    from hooks.model import HookedLlama


@dataclass(frozen=True)
class Source:
    """A node that writes to the residual stream: ``kind`` "input", "head" or "mlp"."""

    name: str
    kind: str
    layer: int  # -1 for the embeddings
    index: int | None = None  # the query head


@dataclass(frozen=True)
class Receiver:
    """A node input that reads the residual stream: ``kind`` "q", "k", "v", "mlp" or "logits"."""

    name: str
    kind: str
    layer: int  # n_layers for the logits
    index: int | None = None  # the query head (q) or key/value group (k, v)


_EDGE = re.compile(r"^\s*(\S+)\s*->\s*(\S+)\s*$")


class EdgeGraph:
    """Sources, receivers and the valid edges between them for one model shape (see the module docstring).

    ``valid`` is a bool [n_sources, n_receivers] matrix; ``edges`` the [n_edges, 2] (source, receiver)
    index pairs of its true entries in row-major order, which is the order of every edge vector
    (scores, masks) in this package.
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int) -> None:
        if n_heads % n_kv_heads:
            raise InputError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_layers, self.n_heads, self.n_kv_heads = n_layers, n_heads, n_kv_heads
        H, G = n_heads, n_kv_heads
        sources = [Source("input", "input", -1)]
        receivers: list[Receiver] = []
        for layer in range(n_layers):
            sources += [Source(f"a{layer}.h{h}", "head", layer, h) for h in range(H)]
            sources.append(Source(f"m{layer}", "mlp", layer))
            receivers += [Receiver(f"a{layer}.h{h}<q>", "q", layer, h) for h in range(H)]
            receivers += [Receiver(f"a{layer}.kv{g}<k>", "k", layer, g) for g in range(G)]
            receivers += [Receiver(f"a{layer}.kv{g}<v>", "v", layer, g) for g in range(G)]
            receivers.append(Receiver(f"m{layer}", "mlp", layer))
        receivers.append(Receiver("logits", "logits", n_layers))
        self.sources, self.receivers = sources, receivers
        self._src_index = {s.name: i for i, s in enumerate(sources)}
        self._recv_index = {r.name: i for i, r in enumerate(receivers)}
        # how many sources precede each receiver: everything before the layer; MLPs also read their layer's heads
        self.n_src_before = torch.tensor([self._sources_before(r) for r in receivers])
        self.valid = torch.arange(len(sources))[:, None] < self.n_src_before[None, :]
        self.edges = torch.nonzero(self.valid)  # [E, 2]
        self._edge_id = torch.full(self.valid.shape, -1, dtype=torch.long)
        self._edge_id[self.edges[:, 0], self.edges[:, 1]] = torch.arange(len(self.edges))

    @classmethod
    def from_model(cls, model: HookedLlama) -> "EdgeGraph":
        return cls(model.n_layers, model.n_heads, model.n_kv_heads)

    def _sources_before(self, r: Receiver) -> int:
        per_layer = self.n_heads + 1
        if r.kind == "logits":
            return 1 + per_layer * self.n_layers
        if r.kind == "mlp":
            return 1 + per_layer * r.layer + self.n_heads
        return 1 + per_layer * r.layer

    # ------------------------------------------------------------------ sizes and indices
    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def source_index(self, kind: str, layer: int = -1, index: int | None = None) -> int:
        """Position of a source: ``("input")``, ``("head", L, H)`` or ``("mlp", L)``."""
        if kind == "input":
            return 0
        base = 1 + (self.n_heads + 1) * layer
        return base + (int(index) if kind == "head" else self.n_heads)

    def receiver_slice(self, layer: int, kind: str) -> slice:
        """The receivers of ``kind`` ("q", "k", "v", "mlp") of ``layer``, or the logits, as a slice."""
        H, G = self.n_heads, self.n_kv_heads
        if kind == "logits":
            n = len(self.receivers)
            return slice(n - 1, n)
        base = (H + 2 * G + 1) * layer
        start = {"q": 0, "k": H, "v": H + G, "mlp": H + 2 * G}[kind]
        size = {"q": H, "k": G, "v": G, "mlp": 1}[kind]
        return slice(base + start, base + start + size)

    def head_sources(self, layer: int) -> slice:
        start = self.source_index("head", layer, 0)
        return slice(start, start + self.n_heads)

    def edge_name(self, i: int) -> str:
        s, r = self.edges[i].tolist()
        return f"{self.sources[s].name}->{self.receivers[r].name}"

    def edge_names(self) -> list[str]:
        return [f"{self.sources[s].name}->{self.receivers[r].name}" for s, r in self.edges.tolist()]

    def edge_index(self, name: str) -> int:
        """The index of an edge named ``"a3.h2->a5.h1<q>"`` (EAP-IG's spelling)."""
        m = _EDGE.match(str(name))
        if not m or m.group(1) not in self._src_index or m.group(2) not in self._recv_index:
            raise InputError(
                f"cannot read edge {name!r}; write edges as 'source->receiver', e.g. 'a3.h2->a5.h1<q>', "
                "'input->m0' or 'm2->logits'",
                param="edges",
            )
        i = int(self._edge_id[self._src_index[m.group(1)], self._recv_index[m.group(2)]])
        if i < 0:
            raise InputError(f"{name!r} is not an edge: {m.group(1)} writes after {m.group(2)} reads", param="edges")
        return i

    def edge_indices(self, edges) -> torch.Tensor:
        """Edge indices from names, indices, or a bool mask over edges."""
        if isinstance(edges, torch.Tensor) and edges.dtype == torch.bool:
            if edges.shape != (self.n_edges,):
                raise InputError(
                    f"an edge mask must have {self.n_edges} entries, got {tuple(edges.shape)}", param="edges"
                )
            return torch.nonzero(edges)[:, 0]
        out = []
        for e in edges:
            if isinstance(e, str):
                out.append(self.edge_index(e))
            else:
                i = int(e)
                if not 0 <= i < self.n_edges:
                    raise InputError(f"edge index {i} is out of range (0..{self.n_edges - 1})", param="edges")
                out.append(i)
        return torch.tensor(out, dtype=torch.long)

    def mask_matrix(self, edge_mask: torch.Tensor) -> torch.Tensor:
        """[..., E] edge values -> [..., n_sources, n_receivers] (zero off the valid edges)."""
        lead = edge_mask.shape[:-1]
        out = torch.zeros(*lead, self.n_sources, self.n_receivers, dtype=edge_mask.dtype, device=edge_mask.device)
        out[..., self.edges[:, 0], self.edges[:, 1]] = edge_mask
        return out

    def edge_vector(self, matrix: torch.Tensor) -> torch.Tensor:
        """[..., n_sources, n_receivers] -> [..., E], the valid entries in edge order."""
        return matrix[..., self.edges[:, 0], self.edges[:, 1]]

    def to_dict(self) -> dict:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "sources": [s.name for s in self.sources],
            "receivers": [r.name for r in self.receivers],
            "n_edges": self.n_edges,
        }

    def __repr__(self) -> str:
        return (
            f"EdgeGraph({self.n_layers} layers, {self.n_heads} heads / {self.n_kv_heads} kv groups: "
            f"{self.n_sources} sources, {self.n_receivers} receivers, {self.n_edges} edges)"
        )
