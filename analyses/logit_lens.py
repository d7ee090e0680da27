"""Logit lens: decode the residual stream after every layer (and sublayer) with the model's own final
RMSNorm and unembedding, and read the top tokens and the probability / rank of chosen targets.

The final norm is applied as the model applies it (its own RMS of the residual being decoded), so
the lens at the last layer's ``resid_post`` is exactly the model's next-token prediction.

Example::

    lens = logit_lens(model, "The Eiffel Tower is in the city of", targets=[" Paris"])
    lens.target_probs[:, -1, 0]     # probability of " Paris" at the last position, per stage
    lens.figure().show()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from hooks import InputError, act_name
from hooks.indices import check_positions
from hooks.model import takes_model
from hooks.tokens import is_messages, token_labels

from .metrics import token_ids
from .patching import _check_indices
from .plotting import heatmap, position_labels
from .results import AnalysisResult, jsonable

if TYPE_CHECKING:
    from hooks.model import HookedLlama

_KINDS = ("resid_pre", "resid_mid", "resid_post")


@dataclass
class LogitLensResult(AnalysisResult):
    """Per stage (a layer's resid_pre / resid_mid / resid_post) and position of one prompt.

    ``stages``: labels like ``"3_mid"``; ``top_ids`` / ``top_probs`` [S, P, k]; ``top_tokens`` the
    decoded strings (or ids as strings without a tokenizer); ``target_ids`` [T]; ``target_probs`` /
    ``target_ranks`` [S, P, T] (rank 0 = the top token) or None without targets.
    """

    stages: list[str]
    positions: list[int]
    str_tokens: list[str] | None
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_tokens: list[list[list[str]]]
    target_ids: torch.Tensor | None
    target_labels: list[str] | None
    target_probs: torch.Tensor | None
    target_ranks: torch.Tensor | None

    title = "logit lens"

    def rows(self) -> list[dict]:
        rows = []
        for s, stage in enumerate(self.stages):
            for j, p in enumerate(self.positions):
                row = {"stage": stage, "pos": p}
                if self.str_tokens is not None:
                    row["token"] = self.str_tokens[p]
                row["top_tokens"] = self.top_tokens[s][j]
                row["top_probs"] = [float(x) for x in self.top_probs[s, j]]
                if self.target_probs is not None:
                    for t, label in enumerate(self.target_labels):
                        row[f"p({label})"] = float(self.target_probs[s, j, t])
                        row[f"rank({label})"] = int(self.target_ranks[s, j, t])
                rows.append(row)
        return rows

    def top_rows(self, n: int = 10) -> list[dict]:
        """The last position's rows, from the last stage backwards."""
        last = [r for r in self.rows() if r["pos"] == self.positions[-1]]
        return last[::-1][:n]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "stages": self.stages,
                "positions": self.positions,
                "tokens": self.str_tokens,
                "top_ids": self.top_ids,
                "top_probs": self.top_probs,
                "top_tokens": self.top_tokens,
                "targets": self.target_labels,
                "target_ids": self.target_ids,
                "target_probs": self.target_probs,
                "target_ranks": self.target_ranks,
            }
        )

    def figure(self, target: int | None = None):
        """Stage × position heatmap: the top-1 probability with the top-1 token written in each cell, or,
        with ``target=t`` (an index into the targets), that target's probability."""
        x = (
            position_labels(self.str_tokens, len(self.str_tokens or []), self.positions)
            if self.str_tokens is not None
            else [str(p) for p in self.positions]
        )
        text = [[toks[0] for toks in row] for row in self.top_tokens]
        hover = [
            ["<br>".join(f"{t!r} {float(p):.3f}" for t, p in zip(toks, probs)) for toks, probs in zip(row_t, row_p)]
            for row_t, row_p in zip(self.top_tokens, self.top_probs)
        ]
        if target is None:
            z, title = self.top_probs[..., 0], "logit lens: top-1 probability (text: top-1 token)"
        else:
            if self.target_probs is None:
                raise InputError("this logit lens has no targets; pass targets=[...] to logit_lens")
            z, title = self.target_probs[..., target], f"logit lens: p({self.target_labels[target]})"
        return heatmap(
            z,
            x,
            self.stages,
            title=title,
            x_title="position",
            y_title="stage",
            zmid=None,
            colorscale="Blues",
            text=text,
            hover=hover,
            colorbar_title="probability",
        )


def _stage_names(n_layers: int, kinds: Sequence[str], layers: Sequence[int]) -> list[tuple[str, str]]:
    out = []
    for i in layers:
        for kind in _KINDS:
            if kind in kinds:
                out.append((act_name(kind, i), f"{i}_{kind.split('_')[1]}"))
    return out


@takes_model
def logit_lens(
    model: HookedLlama,
    prompt,
    targets=None,
    *,
    k: int = 5,
    stages: str | Sequence[str] = _KINDS,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
) -> LogitLensResult:
    """Decode the residual stream at every stage with the final norm and unembedding.

    Args:
        model: a ``HookedLlama``.
        prompt: one prompt (text, chat messages, or token ids [P] / [1, P]).
        targets: tokens to follow (single-token strings or ids), or None.
        k: how many top tokens to keep per cell.
        stages: any of ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"`` (one name or several).
        layers: layers to decode (default: all); positions: positions to keep (default: all).

    Returns:
        ``LogitLensResult`` with [stage, position, ...] tensors.

    Example::

        lens = logit_lens(model, "The capital of France is", targets=[" Paris"], stages="resid_post")
        lens.top_tokens[-1][-1]        # the model's own top-k next tokens
    """
    kinds = [stages] if isinstance(stages, str) else list(stages)
    bad = [s for s in kinds if s not in _KINDS]
    if bad:
        raise InputError(f"unknown stage(s) {bad}; use resid_pre, resid_mid, resid_post")
    if isinstance(prompt, torch.Tensor):
        tokens = prompt[None] if prompt.dim() == 1 else prompt
    elif isinstance(prompt, str) or is_messages(prompt):
        tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    else:
        raise InputError("logit_lens reads one prompt; pass a string, chat messages or token ids")
    if tokens.shape[0] != 1:
        raise InputError(f"logit_lens reads one prompt, got a batch of {tokens.shape[0]}; index it first")
    tokens = tokens.to(model.device)
    P = tokens.shape[1]
    layers = list(range(model.n_layers)) if layers is None else _check_indices(layers, model.n_layers, "layer")
    positions = list(range(P)) if positions is None else check_positions(P, positions)
    named = _stage_names(model.n_layers, kinds, layers)
    target_ids = token_ids(model, targets).reshape(-1) if targets is not None else None
    with torch.no_grad():
        stop = max(layers) + 1
        _, cache = model.run_with_cache(
            tokens, names_filter=[n for n, _ in named], stop_at_layer=stop if stop < model.n_layers else None
        )
        top_ids, top_probs, t_probs, t_ranks = [], [], [], []
        for name, _ in named:
            resid = cache[name][0, positions]  # [P', M]
            logits = model.lm_head(model.model.norm(resid)).float()  # [P', V]
            probs = logits.softmax(-1)
            p, i = probs.topk(min(k, probs.shape[-1]), dim=-1)
            top_ids.append(i)
            top_probs.append(p)
            if target_ids is not None:
                tid = target_ids.to(logits.device)
                tl = logits[:, tid]  # [P', T]
                t_probs.append(probs[:, tid])
                t_ranks.append((logits[:, None, :] > tl[:, :, None]).sum(-1))
    top_ids_t = torch.stack(top_ids).cpu()
    tok = model.tokenizer
    decode = (lambda i: token_labels(tok, [i])[0]) if tok is not None else str
    top_tokens = [[[decode(int(i)) for i in cell] for cell in stage] for stage in top_ids_t]
    str_tokens = [decode(int(i)) for i in tokens[0].tolist()] if tok is not None else None
    return LogitLensResult(
        stages=[label for _, label in named],
        positions=positions,
        str_tokens=str_tokens,
        top_ids=top_ids_t,
        top_probs=torch.stack(top_probs).cpu(),
        top_tokens=top_tokens,
        target_ids=target_ids.cpu() if target_ids is not None else None,
        target_labels=[decode(int(i)) for i in target_ids] if target_ids is not None else None,
        target_probs=torch.stack(t_probs).cpu() if target_ids is not None else None,
        target_ranks=torch.stack(t_ranks).cpu() if target_ids is not None else None,
    )
