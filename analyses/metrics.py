"""Patching metrics: logit difference, target probability, KL to a reference, and the normalised score.

A ``Metric`` reads the logits at one position (``pos``, default -1: the last token; batches are
left-padded, so -1 is every prompt's last real token). Two ways to call it:

- ``metric(logits)`` with logits [B, P, V] gives a 0-d tensor, the mean over prompts, so a metric is
  a drop-in TransformerLens patching metric (and differentiable, for attribution patching);
- ``metric.score(logits_at)`` with logits at ``pos`` [..., B, V] gives per-prompt values [..., B]; the
  batched patching engine uses this to score many patched runs at once.

Example::

    m = logit_diff(model, " Mary", " John")
    m(model("When Mary and John went to the store, John gave a drink to"))   # tensor(6.1...)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from hooks import InputError

from .divergence import kl_rows

if TYPE_CHECKING:
    from hooks.model import HookedLlama


def token_ids(model: HookedLlama, tokens) -> torch.Tensor:
    """Token ids from an id, a single-token string, or a list of them (one per prompt): [] or [B]."""
    if isinstance(tokens, torch.Tensor):
        return tokens.long()
    if isinstance(tokens, str):
        return torch.tensor(model.to_single_token(tokens))
    if isinstance(tokens, int):
        return torch.tensor(tokens)
    if isinstance(tokens, Sequence) and len(tokens) > 0:
        return torch.stack([token_ids(model, t) for t in tokens])
    raise InputError(f"cannot read answer tokens from {tokens!r}; pass ids, single-token strings or a list of them")


def _gather(logits_at: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits_at [..., B, V], ids [] or [B] -> [..., B]."""
    ids = ids.to(logits_at.device)
    idx = ids.expand(logits_at.shape[:-1])[..., None]
    return logits_at.gather(-1, idx)[..., 0]


class Metric:
    """Base class: a scalar read from the logits at position ``pos`` (see the module docstring)."""

    name = "metric"

    def __init__(self, pos: int = -1) -> None:
        self.pos = int(pos)

    def score(self, logits_at: torch.Tensor) -> torch.Tensor:
        """Per-prompt values [..., B] from the logits at ``pos`` [..., B, V]."""
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean over prompts of ``score`` at ``pos``: logits [B, P, V] -> 0-d tensor."""
        if logits.dim() != 3:
            raise InputError(f"a metric takes logits [batch, pos, vocab], got shape {tuple(logits.shape)}")
        return self.score(logits[:, self.pos]).float().mean()

    def to_dict(self) -> dict:
        return {"name": self.name, "pos": self.pos}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"


class LogitDiff(Metric):
    """``logit[correct] - logit[incorrect]`` at ``pos``; ids are scalars or one per prompt [B].

    Example: ``LogitDiff(5099, 2322)(logits)`` (" Mary" minus " John" in SmolLM2).
    """

    name = "logit_diff"

    def __init__(self, correct, incorrect, pos: int = -1) -> None:
        super().__init__(pos)
        self.correct, self.incorrect = torch.as_tensor(correct).long(), torch.as_tensor(incorrect).long()

    def score(self, logits_at: torch.Tensor) -> torch.Tensor:
        logits_at = logits_at.float()
        return _gather(logits_at, self.correct) - _gather(logits_at, self.incorrect)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "correct": self.correct.tolist(), "incorrect": self.incorrect.tolist()}


class TargetProb(Metric):
    """Probability of ``target`` at ``pos`` (softmax over the vocabulary).

    Example: ``TargetProb(5099)(logits)``.
    """

    name = "target_prob"

    def __init__(self, target, pos: int = -1) -> None:
        super().__init__(pos)
        self.target = torch.as_tensor(target).long()

    def score(self, logits_at: torch.Tensor) -> torch.Tensor:
        return _gather(logits_at.float().softmax(-1), self.target)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "target": self.target.tolist()}


class KLDivergence(Metric):
    """``KL(reference || patched)`` of the next-token distributions at ``pos``, per prompt.

    ``reference``: the reference run's logits, [B, P, V] (read at ``pos``) or already at ``pos`` [B, V].
    Lower is closer to the reference: the clean run scores 0.

    Example: ``KLDivergence(clean_logits)(patched_logits)``.
    """

    name = "kl"

    def __init__(self, reference: torch.Tensor, pos: int = -1) -> None:
        super().__init__(pos)
        ref = reference[:, pos] if reference.dim() == 3 else reference
        self.reference = ref.detach().float()  # [B, V]

    def score(self, logits_at: torch.Tensor) -> torch.Tensor:
        return kl_rows(self.reference.to(logits_at.device), logits_at, dtype=torch.float32)  # float32, as always


def logit_diff(model: HookedLlama, correct, incorrect, pos: int = -1) -> LogitDiff:
    """A ``LogitDiff`` from single-token strings or ids (one pair, or one per prompt).

    Example: ``logit_diff(model, " Mary", " John")``.
    """
    return LogitDiff(token_ids(model, correct), token_ids(model, incorrect), pos)


def target_prob(model: HookedLlama, target, pos: int = -1) -> TargetProb:
    """A ``TargetProb`` from a single-token string or id. Example: ``target_prob(model, " Paris")``."""
    return TargetProb(token_ids(model, target), pos)


def kl_divergence(reference_logits, pos: int = -1, **kwargs):
    """A ``KLDivergence`` metric to ``reference_logits`` [B, P, V]. Example: ``kl_divergence(model(clean))``.

    Called with a model first, ``kl_divergence(model, prompts, fwd_hooks=… | edited=…, where="first" |
    "continuation")`` measures KL(base ‖ edited) over a prompt set instead (``analyses.refusal.prompt_kl``).
    """
    if not isinstance(reference_logits, torch.Tensor) and hasattr(reference_logits, "n_layers"):
        from .refusal import prompt_kl

        return prompt_kl(reference_logits, pos, **kwargs)
    if kwargs:
        raise InputError(
            f"kl_divergence(reference_logits) takes no {', '.join(sorted(kwargs))}; pass a model "
            "first to compare over prompts"
        )
    return KLDivergence(reference_logits, pos)


def check_answer_count(answers, batch: int) -> None:
    """Per-prompt answers must number one per prompt."""
    for part in answers if isinstance(answers, tuple) and len(answers) == 2 else (answers,):
        n = (
            len(part)
            if isinstance(part, (list, tuple))
            else (part.numel() if isinstance(part, torch.Tensor) and part.dim() > 0 else 1)
        )
        if n not in (1, batch):
            raise InputError(
                f"answers give {n} tokens for {batch} prompts; pass one (correct, incorrect) pair "
                "per prompt, or a single pair for all"
            )


def normalized(value, clean, corrupted):
    """``(value - corrupted) / (clean - corrupted)``: 0 at the corrupted run, 1 at the clean run.

    Works on floats and tensors; a zero denominator gives NaN (nothing to recover).
    """
    denom = clean - corrupted
    if isinstance(value, torch.Tensor):
        if float(denom) == 0.0:
            return torch.full_like(value, float("nan"))
        return (value - corrupted) / denom
    return float("nan") if float(denom) == 0.0 else (value - corrupted) / denom


class LastPositionCallable(Metric):
    """A TransformerLens-style callable ``logits [B, P, V] -> scalar`` that reads only the last position,
    run on logits [B, 1, V]: the patching engine then unembeds one position instead of all of them."""

    def __init__(self, fn) -> None:
        super().__init__(-1)
        self.fn = fn
        self.name = getattr(fn, "__name__", "metric")

    def _one(self, logits_at: torch.Tensor) -> torch.Tensor:  # [B, V] -> 0-d
        return torch.as_tensor(self.fn(logits_at[:, None, :])).float().reshape(())

    def score(self, logits_at: torch.Tensor) -> torch.Tensor:
        """[..., B, V] -> [..., 1]: the callable's value per leading index (its own batch reduction)."""
        lead = logits_at.shape[:-2]
        flat = logits_at.reshape((-1,) + logits_at.shape[-2:])
        return torch.stack([self._one(x) for x in flat]).reshape(lead + (1,))

    def to_dict(self) -> dict:
        return {"name": self.name, "pos": self.pos, "callable": True}


def reads_last_position_only(fn, logits: torch.Tensor) -> bool:
    """True when ``fn(logits)`` depends on the last position alone: the same value (bit for bit) from
    ``logits[:, -1:]`` and from ``logits`` with every other position set to NaN."""
    if logits.dim() != 3 or logits.shape[1] < 2:
        return False
    try:
        with torch.no_grad():
            full = torch.as_tensor(fn(logits)).float()
            poisoned = logits.clone()
            poisoned[:, :-1] = float("nan")
            a = torch.as_tensor(fn(poisoned)).float()
            b = torch.as_tensor(fn(logits[:, -1:])).float()
    except Exception:  # the callable indexes other positions: run it on full logits
        return False
    return (
        full.numel() == 1
        and a.shape == full.shape
        and b.shape == full.shape
        and bool(torch.isfinite(full).all())
        and torch.equal(a, full)
        and torch.equal(b, full)
    )


def answer_pairs(answers):
    """TransformerLens's answer formats as ``(correct, incorrect)``: a list of (correct, incorrect) pairs
    (one per prompt) or a [batch, 2] id tensor become two per-prompt lists; a plain pair, or a tuple of
    two per-prompt lists, stays."""
    if isinstance(answers, torch.Tensor) and answers.dim() == 2:
        if answers.shape[1] != 2:
            raise InputError(
                f"answers as a tensor must be [batch, 2] (correct, incorrect) ids, got {tuple(answers.shape)}"
            )
        return answers[:, 0], answers[:, 1]
    # a list of pairs [(c, i), ...] is TransformerLens's; a tuple of two lists (corrects, incorrects) is ours
    inner = (list, tuple) if isinstance(answers, list) else tuple
    if isinstance(answers, (list, tuple)) and answers and all(isinstance(a, inner) and len(a) == 2 for a in answers):
        return [a[0] for a in answers], [a[1] for a in answers]
    return answers


def resolve_metric(model: HookedLlama, metric, answers, clean_logits: torch.Tensor | None):
    """The metric an analysis uses: a ``Metric``, a callable on logits (TransformerLens style), or a name.

    Names: ``"logit_diff"`` (needs ``answers=(correct, incorrect)``), ``"target_prob"`` (``answers=target``
    or ``(target, other)``; a list is one target per prompt), ``"kl"`` (KL to the clean run). With
    ``metric=None``: logit_diff when ``answers`` is a pair, target_prob for a single answer.
    """
    if isinstance(metric, Metric):
        return metric
    if callable(metric) and not isinstance(metric, str):
        if clean_logits is not None and reads_last_position_only(metric, clean_logits):
            return LastPositionCallable(metric)
        return metric
    answers = answer_pairs(answers)
    if answers is not None and clean_logits is not None:
        check_answer_count(answers, clean_logits.shape[0])
    if metric is None:
        if answers is None:
            raise InputError(
                "pass metric= (a Metric, a callable on logits, or 'logit_diff' / 'target_prob' / 'kl') "
                "or answers=(correct, incorrect) for a logit difference"
            )
        metric = "logit_diff" if isinstance(answers, (tuple, list)) and len(answers) == 2 else "target_prob"
    if metric == "logit_diff":
        if not (isinstance(answers, (tuple, list)) and len(answers) == 2):
            raise InputError("metric='logit_diff' needs answers=(correct, incorrect), e.g. (' Mary', ' John')")
        return logit_diff(model, answers[0], answers[1])
    if metric in ("target_prob", "prob"):
        if answers is None:
            raise InputError("metric='target_prob' needs answers=target (a single-token string or id)")
        # a tuple (target, other) names the target first; a list is one target per prompt
        target = answers[0] if isinstance(answers, tuple) else answers
        return target_prob(model, target)
    if metric == "kl":
        if clean_logits is None:
            raise InputError("metric='kl' needs the clean run's logits")
        return kl_divergence(clean_logits)
    raise InputError(f"unknown metric {metric!r}; use 'logit_diff', 'target_prob', 'kl', a Metric or a callable")
