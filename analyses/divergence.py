"""KL divergence between next-token distributions: the one implementation the whole package uses.

Convention, for every caller (patching's ``KLDivergence`` metric, ``prompt_kl``, the abliteration scorer
and refinement, SAE metrics, the export manifest's ``kl_to_base``):

- **direction**: ``KL(reference ‖ other) = Σ_v p(v) (log p(v) − log q(v))``, ``p = softmax(reference)``,
  ``q = softmax(other)``: the reference (clean, base, unedited) run comes first, as in TransformerLens'
  and heretic's uses;
- **base**: natural logarithm (nats);
- **positions**: none chosen here: each row of the last dimension is one distribution, so the caller picks
  the positions (the last token, the first generated one, every next-token prediction) by slicing;
- **reduction**: none: ``[..., V] -> [...]``; callers average over the rows they mean;
- **precision**: computed in ``dtype`` (float64 by default; the patching metric keeps float32, as before);
  inputs may be logits or log-probabilities (``log_softmax`` is applied to both either way).
"""

from __future__ import annotations

import torch


def kl_rows(reference: torch.Tensor, other: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """KL(reference ‖ other) over the last dimension, per row, in nats (module docstring): [..., V] -> [...].

    Example: ``kl_rows(base_logits[:, -1], edited_logits[:, -1]).mean()``.
    """
    p = reference.to(dtype).log_softmax(-1)
    q = other.to(dtype).log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)
