"""Attention-head detection on repeated random token sequences: previous-token, duplicate-token and
induction scores for every (layer, query head).

Each sequence is ``[BOS] R R`` with ``R`` a run of ``seq_len`` random tokens (seeded). For a query at
position q of the second copy, the earlier copy of the same token sits at ``q - seq_len`` and the token
after it at ``q - seq_len + 1``. A head's score is its attention weight to a target key, averaged with
equal weight over the sequences and over these query positions (``o`` = 1 with the BOS, 0 without;
``P = o + 2 * seq_len``):

- previous-token: key ``q - 1`` for queries ``q = o + 1 … P - 1`` (every token of both copies but the
  first of ``R``; the BOS is never a query, and ``R``'s first token attending to the BOS is not counted);
- duplicate-token: key ``q - seq_len`` for the second copy's queries ``q = o + seq_len … P - 1``;
- induction: key ``q - seq_len + 1`` for the same queries (the second copy's first token attends to the
  first copy's second token).

Scores are of query heads (under GQA each query head has its own pattern) and lie in [0, 1].

Only the attention patterns of the layers asked for are cached, and the forward stops after the last
of them.

Example::

    scores = detect_heads(model, seq_len=20, n_seqs=8)
    scores.top("induction", 5)        # [HeadRef(layer, head, group), ...]
    scores.figure().show()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from hooks import InputError, act_name
from hooks.model import takes_model

from .heads import HeadRef, head_ref
from .patching import _check_indices
from .results import AnalysisResult, jsonable

if TYPE_CHECKING:
    from hooks.model import HookedLlama

KINDS = ("previous_token", "duplicate_token", "induction")


def repeated_random_tokens(
    model: HookedLlama, seq_len: int = 20, n_seqs: int = 8, seed: int = 0, prepend_bos: bool = True
) -> torch.Tensor:
    """[n_seqs, (1 +) 2 * seq_len] sequences ``[BOS] R R`` of random non-special tokens (seeded).

    Example: ``repeated_random_tokens(model, 10, 4).shape == (4, 21)``.
    """
    if seq_len < 2 or n_seqs < 1:
        raise InputError(f"need seq_len >= 2 and n_seqs >= 1, got seq_len={seq_len}, n_seqs={n_seqs}")
    special = set()
    tok = model.tokenizer
    if tok is not None:
        special |= set(getattr(tok, "all_special_ids", []) or [])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(model.config, key, None)
        special |= set(v if isinstance(v, (list, tuple)) else ([v] if v is not None else []))
    allowed = torch.tensor([i for i in range(model.d_vocab) if i not in special])
    g = torch.Generator().manual_seed(seed)
    half = allowed[torch.randint(len(allowed), (n_seqs, seq_len), generator=g)]
    seqs = torch.cat([half, half], dim=1)
    bos = getattr(model.config, "bos_token_id", None)
    if prepend_bos and bos is not None:
        seqs = torch.cat([torch.full((n_seqs, 1), int(bos)), seqs], dim=1)
    return seqs


def pattern_scores(pattern: torch.Tensor, seq_len: int, offset: int) -> torch.Tensor:
    """Scores [3, H] (previous-token, duplicate-token, induction) from one layer's pattern [B, H, Q, K]
    of ``[BOS]? R R`` sequences; ``offset`` is 1 with a BOS, else 0."""
    n = seq_len
    P = pattern.shape[-1]
    q_prev = torch.arange(offset + 1, P)
    q_second = torch.arange(offset + n, P)
    prev = pattern[:, :, q_prev, q_prev - 1]  # [B, H, Q']
    dup = pattern[:, :, q_second, q_second - n]
    ind = pattern[:, :, q_second, q_second - n + 1]
    return torch.stack([prev.float().mean((0, 2)), dup.float().mean((0, 2)), ind.float().mean((0, 2))])


@dataclass
class HeadDetectionResult(AnalysisResult):
    """Scores [layer, head] of each kind (``previous_token``, ``duplicate_token``, ``induction``), in [0, 1].

    ``layers`` lists the layers scored (rows of the tensors); heads are query heads.
    """

    previous_token: torch.Tensor
    duplicate_token: torch.Tensor
    induction: torch.Tensor
    layers: list[int]
    group_size: int
    seq_len: int
    n_seqs: int
    seed: int

    title = "attention head detection"

    def scores(self, kind: str) -> torch.Tensor:
        """The [layer, head] scores of one kind."""
        if kind not in KINDS:
            raise InputError(f"unknown head kind {kind!r}; use one of {', '.join(KINDS)}")
        return getattr(self, kind)

    def top(self, kind: str, k: int = 5) -> list[HeadRef]:
        """The ``k`` highest-scoring heads of a kind, best first, as ``HeadRef(layer, head, group)``."""
        s = self.scores(kind)
        idx = s.flatten().topk(min(k, s.numel())).indices
        H = s.shape[1]
        return [HeadRef(self.layers[int(i) // H], int(i) % H, (int(i) % H) // self.group_size) for i in idx]

    def rows(self) -> list[dict]:
        H = self.induction.shape[1]
        return [
            {
                "layer": layer,
                "head": h,
                "kv_group": h // self.group_size,
                **{kind: float(self.scores(kind)[li, h]) for kind in KINDS},
            }
            for li, layer in enumerate(self.layers)
            for h in range(H)
        ]

    def top_rows(self, n: int = 10) -> list[dict]:
        """The heads with the highest induction score."""
        return sorted(self.rows(), key=lambda r: -r["induction"])[:n]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "layers": self.layers,
                "seq_len": self.seq_len,
                "n_seqs": self.n_seqs,
                "seed": self.seed,
                **{kind: self.scores(kind) for kind in KINDS},
                "top": {kind: [r.to_dict() for r in self.top(kind, 5)] for kind in KINDS},
            }
        )

    def figure(self):
        """Three layer × head heatmaps side by side (previous-token, duplicate-token, induction)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        H = self.induction.shape[1]
        fig = make_subplots(
            rows=1,
            cols=3,
            subplot_titles=[k.replace("_", "-") for k in KINDS],
            shared_yaxes=True,
            horizontal_spacing=0.03,
        )
        for c, kind in enumerate(KINDS, start=1):
            fig.add_trace(
                go.Heatmap(
                    z=self.scores(kind).double().tolist(),
                    x=[f"H{h}" for h in range(H)],
                    y=[f"L{l}" for l in self.layers],
                    zmin=0,
                    zmax=1,
                    colorscale="Blues",
                    showscale=c == 3,
                    hovertemplate="%{y}%{x}: %{z:.3f}<extra>" + kind + "</extra>",
                ),
                row=1,
                col=c,
            )
        fig.update_yaxes(autorange="reversed", type="category")
        fig.update_layout(
            title=dict(
                text=f"head detection ({self.n_seqs} repeated random sequences of "
                f"{self.seq_len} tokens, seed {self.seed})"
            )
        )
        return fig


@takes_model
def detect_heads(
    model: HookedLlama,
    *,
    seq_len: int = 20,
    n_seqs: int = 8,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    prepend_bos: bool = True,
    tokens: torch.Tensor | None = None,
) -> HeadDetectionResult:
    """Previous-token, duplicate-token and induction scores of every head on repeated random sequences.

    Args:
        model: a ``HookedLlama``.
        seq_len: length of the random run ``R`` (sequences are ``[BOS] R R``); n_seqs: how many; seed: RNG seed.
        layers: layers to score (default: all); the forward stops after the last one.
        prepend_bos: start each sequence with the BOS token (if the model has one).
        tokens: your own ``[B, (1 +) 2 * seq_len]`` repeated sequences instead of random ones.

    Returns:
        ``HeadDetectionResult``; ``.top("induction", k)`` gives the best heads.

    Example::

        detect_heads(model).top("previous_token", 3)
    """
    layers = (
        list(range(model.n_layers)) if layers is None else sorted(set(_check_indices(layers, model.n_layers, "layer")))
    )
    for layer in layers:
        head_ref(model, layer, 0)  # range check
    if tokens is None:
        tokens = repeated_random_tokens(model, seq_len, n_seqs, seed, prepend_bos)
    tokens = tokens.to(model.device)
    offset = tokens.shape[1] - 2 * seq_len
    if offset not in (0, 1):
        raise InputError(f"tokens of length {tokens.shape[1]} are not [BOS?] + 2 × seq_len={seq_len}")
    stop = max(layers) + 1
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens,
            names_filter=[act_name("pattern", i) for i in layers],
            stop_at_layer=stop if stop < model.n_layers else None,
        )
    per_layer = torch.stack([pattern_scores(cache["pattern", i], seq_len, offset) for i in layers])  # [L, 3, H]
    return HeadDetectionResult(
        previous_token=per_layer[:, 0].cpu(),
        duplicate_token=per_layer[:, 1].cpu(),
        induction=per_layer[:, 2].cpu(),
        layers=layers,
        group_size=model.n_heads // model.n_kv_heads,
        seq_len=seq_len,
        n_seqs=tokens.shape[0],
        seed=seed,
    )
