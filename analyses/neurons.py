"""Neuron top activations: the tokens of a text corpus on which chosen MLP neurons fire most.

A neuron is one entry of ``blocks.{layer}.mlp.hook_post`` (``act(gate) * up``, the input of
down_proj). The corpus runs in padded batches that stop after ``layer``; padding is never counted.
The project ships a small corpus of ~100 varied English sentences (``analyses/data/corpus.txt``),
used when no corpus is given.

Example::

    top = top_activating(model, layer=5, neurons=[12, 873], k=5)
    top.rows()[0]   # {'neuron': 12, 'rank': 0, 'activation': 3.1, 'token': ' bread', 'context': '…'}
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from _core.readers import read_prompt_file
from hooks import InputError, act_name
from hooks.indices import check_index, check_indices
from hooks.model import takes_model

from .results import AnalysisResult, jsonable

if TYPE_CHECKING:
    from hooks.model import HookedLlama

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.txt"


def load_corpus(path: str | Path | None = None) -> list[str]:
    """The texts of a prompt file (default: the shipped corpus), read by the one prompt-file reader
    (``_core.readers.read_prompt_file``: ``.txt`` one text a line, blank lines and ``#`` lines skipped,
    ``.jsonl``/``.json`` on purpose; UTF-8 only).

    Example: ``len(load_corpus()) == 100``.
    """
    if path is not None and (isinstance(path, bytes) or not isinstance(path, (str, os.PathLike))):
        raise InputError(f"corpus must be a file path or a list of strings, got {type(path).__name__}", param="corpus")
    path = Path(path) if path is not None else CORPUS_PATH
    if not path.exists():
        raise InputError(f"corpus file {path} does not exist; pass a list of strings or an existing text file")
    return [r.text for r in read_prompt_file(path, error=InputError, what="corpus file", param="corpus", strip=True)]


@dataclass
class NeuronTopActivations(AnalysisResult):
    """Top-k activations of each neuron: ``values`` [N, k], ``doc`` / ``pos`` [N, k] (document index and
    token position within it; -1 where the corpus has fewer than k tokens), ``tokens`` / ``contexts``
    [N][k] strings. ``neurons`` lists the neuron indices (rows)."""

    layer: int
    neurons: list[int]
    values: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    tokens: list[list[str]]
    contexts: list[list[str]]
    n_docs: int
    n_tokens: int

    unit = "neuron"  # what a row is, in figure labels ("N348"); SAE features say "feature" ("F348")

    @property
    def title(self) -> str:
        return f"top activations of layer {self.layer} neurons"

    def rows(self) -> list[dict]:
        return [
            {
                "layer": self.layer,
                "neuron": n,
                "rank": r,
                "activation": float(self.values[i, r]),
                "doc": int(self.doc[i, r]),
                "pos": int(self.pos[i, r]),
                "token": self.tokens[i][r],
                "context": self.contexts[i][r],
            }
            for i, n in enumerate(self.neurons)
            for r in range(self.values.shape[1])
            if int(self.doc[i, r]) >= 0
        ]

    def top_rows(self, n: int = 10) -> list[dict]:
        """Each neuron's strongest activation."""
        return [r for r in self.rows() if r["rank"] == 0][:n]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "layer": self.layer,
                "neurons": self.neurons,
                "values": self.values,
                "doc": self.doc,
                "pos": self.pos,
                "tokens": self.tokens,
                "contexts": self.contexts,
                "n_docs": self.n_docs,
                "n_tokens": self.n_tokens,
            }
        )

    def figure(self, max_neurons: int = 64):
        """Heatmap neuron × rank of the top activations; hover shows the token in context."""
        from .plotting import heatmap

        m = min(max_neurons, len(self.neurons))
        text = [[repr(t) for t in row] for row in self.tokens[:m]]
        hover = [[c.replace("\n", " ") for c in row] for row in self.contexts[:m]]
        return heatmap(
            self.values[:m],
            [f"#{r + 1}" for r in range(self.values.shape[1])],
            [f"{self.unit[0].upper()}{n}" for n in self.neurons[:m]],
            title=self.title,
            x_title="rank",
            y_title=self.unit,
            zmid=None,
            colorscale="Viridis",
            text=text,
            hover=hover,
            colorbar_title="activation",
        )


def _doc_ids(model: HookedLlama, doc, max_tokens: int) -> torch.Tensor:
    """Token ids [n] of one document (a string, or ids), truncated to its first ``max_tokens`` tokens."""
    ids = model.tokenize(doc)[0][0] if isinstance(doc, str) else torch.as_tensor(doc, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise InputError("a corpus document is empty")
    return ids[:max_tokens]


def _batches(model: HookedLlama, corpus, batch_size: int, max_tokens: int):
    """(doc offset, tokens [b, P], mask [b, P]) batches, left-padded (pad id 0, masked out); ``corpus`` may
    be any iterable (a generator over a file's lines is read one batch at a time)."""
    it, start = iter(corpus), 0
    while True:
        chunk = list(itertools.islice(it, batch_size))
        if not chunk:
            return
        rows = [_doc_ids(model, d, max_tokens) for d in chunk]
        width = max(len(r) for r in rows)
        tokens = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
        yield start, tokens, mask
        start += len(chunk)


def iter_corpus(path: str | Path | None = None):
    """The non-blank lines of a text file (default: the shipped corpus), read lazily."""
    path = Path(path) if path is not None else CORPUS_PATH
    if not path.exists():
        raise InputError(f"corpus file {path} does not exist; pass a list of strings or an existing text file")

    def lines():
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.strip()

    return lines()


def stream_top_k(
    model: HookedLlama, corpus, read, n_units: int, k: int, batch_size: int, max_tokens: int, context: int
) -> dict:
    """Top-``k`` (document, position) per unit of ``read(tokens, mask) -> [b, P, N]`` over ``corpus``:
    the top-k fields of ``NeuronTopActivations`` (``values``, ``doc``, ``pos``, ``tokens``, ``contexts``,
    ``n_docs``, ``n_tokens``) as a dict.

    Memory stays bounded: only the token ids of documents that hold a current top-k entry are kept.
    """
    N = n_units
    best_v = torch.full((N, 0), float("-inf"))
    best_doc = torch.zeros((N, 0), dtype=torch.long)
    best_pos = torch.zeros((N, 0), dtype=torch.long)
    all_tokens: dict[int, list[int]] = {}
    n_tokens = n_docs = 0
    with torch.no_grad():
        for offset, tokens, mask in _batches(model, corpus, batch_size, max_tokens):
            acts = read(tokens.to(model.device), mask.to(model.device)).float().cpu()  # [b, P, N]
            real = mask.bool()
            pad = (~real).sum(1)  # left padding per row
            acts = acts.masked_fill(~real[..., None], float("-inf"))
            b, P = tokens.shape
            n_tokens += int(real.sum())
            n_docs = offset + b
            for i in range(b):
                all_tokens[offset + i] = tokens[i, int(pad[i]) :].tolist()
            flat = acts.reshape(b * P, N).T  # [N, b*P]
            doc = (torch.arange(b)[:, None].expand(b, P) + offset).reshape(-1)
            pos = (torch.arange(P)[None, :] - pad[:, None]).reshape(-1)
            cand_v = torch.cat([best_v, flat], dim=1)
            cand_doc = torch.cat([best_doc, doc.expand(N, -1)], dim=1)
            cand_pos = torch.cat([best_pos, pos.expand(N, -1)], dim=1)
            top = cand_v.topk(min(k, cand_v.shape[1]), dim=1)
            best_v, best_doc, best_pos = top.values, cand_doc.gather(1, top.indices), cand_pos.gather(1, top.indices)
            live = set(best_doc[torch.isfinite(best_v)].tolist())
            all_tokens = {d: t for d, t in all_tokens.items() if d in live}
    if n_docs == 0:
        raise InputError("the corpus is empty")
    missing = ~torch.isfinite(best_v)
    best_doc, best_pos = best_doc.masked_fill(missing, -1), best_pos.masked_fill(missing, -1)
    decode = (
        (lambda ids: model.tokenizer.decode(ids))
        if model.tokenizer is not None
        else (lambda ids: " ".join(str(i) for i in ids))
    )
    tok_strs, contexts = [], []
    for i in range(N):
        ts, cs = [], []
        for r in range(best_v.shape[1]):
            d, p = int(best_doc[i, r]), int(best_pos[i, r])
            if d < 0:
                ts.append(""), cs.append("")
                continue
            ids = all_tokens[d]
            ts.append(decode([ids[p]]))
            cs.append(
                decode(ids[max(0, p - context) : p])
                + "[["
                + decode([ids[p]])
                + "]]"
                + decode(ids[p + 1 : p + 1 + context])
            )
        tok_strs.append(ts), contexts.append(cs)
    return dict(
        values=best_v, doc=best_doc, pos=best_pos, tokens=tok_strs, contexts=contexts, n_docs=n_docs, n_tokens=n_tokens
    )


@takes_model
def top_activating(
    model: HookedLlama,
    layer: int,
    neurons: Sequence[int] | int | None = None,
    corpus=None,
    k: int = 10,
    *,
    batch_size: int = 16,
    max_tokens: int = 64,
    context: int = 6,
) -> NeuronTopActivations:
    """The ``k`` corpus tokens on which each neuron of ``layer`` is most active.

    Args:
        model: a ``HookedLlama``.
        layer: the MLP layer; neurons: indices into d_mlp (default: all of them).
        corpus: a list of strings, a list of token-id sequences, a path to a text file (one document a
            line), or None for the shipped corpus.
        k: activations kept per neuron; batch_size: documents per forward; max_tokens: truncation length;
        context: tokens of context shown on each side.

    Returns:
        ``NeuronTopActivations`` with (text, token, activation) per neuron and rank.

    Example::

        top_activating(model, 3, neurons=[7], k=3).rows()
    """
    layer = check_index(model, "layer", layer, param="layer", negative=True)  # negatives count from the end
    if neurons is None:
        neurons = list(range(model.d_mlp))
    neurons = check_indices(model, "neuron", [neurons] if isinstance(neurons, int) else neurons, param="neurons")
    if corpus is None or isinstance(corpus, (str, Path)):
        corpus = load_corpus(corpus)
    corpus = list(corpus)
    if not corpus:
        raise InputError("the corpus is empty")
    idx = torch.tensor(neurons, device=model.device)
    name = act_name("post", layer)
    stop = layer + 1 if layer + 1 < model.n_layers else None

    def read(tokens, mask):
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[name], stop_at_layer=stop)
        return cache[name][..., idx]

    top = stream_top_k(model, corpus, read, len(neurons), k, batch_size, max_tokens, context)
    return NeuronTopActivations(layer=layer, neurons=neurons, **top)
