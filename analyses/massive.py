"""Massive activations: the few tokens whose residual-stream norm is many times every other token's.

Many models park a huge activation on one or two tokens (the first token, often a delimiter too) from an
early layer on. On SmolLM2-135M-Instruct the first token's ``resid_post`` norm is 660–800 at layers 2–5
and 22 700 at layers 15–28, where other tokens sit at 90–800; a mid-sentence " the" reaches 660 at layers
2–5. A difference of means, a steering scale or a reconstruction metric that reads such a position
measures that outlier, not the contrast the prompts were written for.

A position is **massive** when its norm exceeds ``ratio`` (default ``RATIO`` = 4) times the typical norm
at that hook point: the median norm over the real (non-padding) positions that were *not* read, or, when
the prompts leave fewer than ``MIN_REFERENCE`` such positions (one-token prompts), the median over the
first sentences of the shipped corpus at the same hook point. Nothing is hard-coded to position 0: the
norms decide. The functions that read positions (``steering_direction``, ``refusal_directions``,
``sae_metrics``) call ``warn_if_massive``, which issues one ``MassiveActivationWarning`` line naming the
fix; ``warnings.simplefilter("error", MassiveActivationWarning)`` turns it into an error.

Example::

    norms = cache["blocks.15.hook_resid_post"].norm(dim=-1)        # [batch, pos]
    massive_mask(norms, mask)                                      # [batch, pos] bool
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hooks.model import HookedLlama

RATIO = 4.0  # how many times the typical norm makes a position massive
MIN_REFERENCE = 4  # fewer unread real positions than this: the corpus gives the typical norm
_CORPUS_SENTENCES = 16


class MassiveActivationWarning(UserWarning):
    """A direction or metric read a massive-activation position (one line, naming the fix)."""


def typical_norm(norms: torch.Tensor, mask: torch.Tensor | None = None) -> float | None:
    """The median of ``norms`` [B, P] over the positions ``mask`` [B, P] keeps (``None``: fewer than
    ``MIN_REFERENCE`` of them)."""
    vals = norms.float()[mask.bool()] if mask is not None else norms.float().flatten()
    return float(vals.median()) if vals.numel() >= MIN_REFERENCE else None


def massive_mask(
    norms: torch.Tensor, mask: torch.Tensor | None = None, *, ratio: float = RATIO, reference: float | None = None
) -> torch.Tensor:
    """[B, P] bool: the real positions whose norm exceeds ``ratio`` × ``reference`` (default: the median
    norm of the real positions of ``norms`` [B, P]).

    Example: ``massive_mask(torch.tensor([[858., 90, 95, 88, 92]]))`` → ``[[True, False, False, False, False]]``.
    """
    keep = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask.bool()
    ref = reference if reference is not None else typical_norm(norms, keep)
    if ref is None:
        return torch.zeros_like(keep)
    return keep & (norms.float() > ratio * ref)


def corpus_norm(model: HookedLlama, hook_name: str) -> float:
    """The median norm at ``hook_name`` over the first sentences of the shipped corpus (a forward that stops
    after the hook's layer); the typical norm when the caller's prompts hold too few positions."""
    from .neurons import load_corpus

    if model.tokenizer is not None:
        tokens, mask = model.tokenize(load_corpus(None)[:_CORPUS_SENTENCES])
    else:  # a model without a tokenizer: seeded random tokens
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(model.d_vocab, (_CORPUS_SENTENCES, 16), generator=g)
        mask = torch.ones_like(tokens)
    layer = int(hook_name.split(".")[1]) if hook_name.startswith("blocks.") else -1
    stop = layer + 1 if 0 <= layer < model.n_layers - 1 else None
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens.to(model.device), attention_mask=mask.to(model.device), names_filter=[hook_name], stop_at_layer=stop
        )
    norms = cache[hook_name].float().norm(dim=-1).cpu()
    keep = mask.bool() & ~massive_mask(norms, mask)
    return float(norms[keep].median())


def reference_norm(model: HookedLlama, hook_name: str, norms: torch.Tensor, mask: torch.Tensor) -> float:
    """The typical norm at ``hook_name``: the median of ``norms`` [B, P] over ``mask`` [B, P] (the real,
    unread positions) without their own massive ones, or the corpus's when fewer than ``MIN_REFERENCE``."""
    ref = typical_norm(norms, mask)
    if ref is None:
        return corpus_norm(model, hook_name)
    keep = mask.bool() & ~massive_mask(norms, mask, reference=ref)
    return typical_norm(norms, keep) or ref


def warn_if_massive(
    what: str,
    where: str,
    read_norms: torch.Tensor,
    reference: float | torch.Tensor,
    fix: str,
    *,
    ratio: float = RATIO,
    stacklevel: int = 3,
) -> int:
    """Warn (one ``MassiveActivationWarning`` line) when any of ``read_norms`` exceeds ``ratio`` ×
    ``reference`` (a number, or a tensor broadcast to ``read_norms``); returns how many did.

    Example: ``warn_if_massive("my metric", "blocks.15.hook_resid_post", norms[read], 190.0, "skip the first token")``.
    """
    read = read_norms.float()
    ref = torch.as_tensor(reference, dtype=torch.float32).expand_as(read)
    times = read / ref.clamp_min(1e-12)
    n = int((times > ratio).sum())
    if n:
        i = int(times.flatten().argmax())
        warnings.warn(
            f"{what} read {n} of {read.numel()} positions at {where} with a massive activation "
            f"(norm {float(read.flatten()[i]):.0f}, {float(times.flatten()[i]):.0f}× the typical "
            f"{float(ref.flatten()[i]):.0f}); {fix}",
            MassiveActivationWarning,
            stacklevel=stacklevel,
        )
    return n
