"""``refine_direction``: distil an ``Abliterate`` edit into a direction that moves harmless prompts less.

A difference of means (whitened or not) is the direction along which harmful and harmless prompts
differ most; nothing makes it the direction whose removal changes the harmless outputs least. This
step keeps the edit's profile (layers, weights, row-norm preservation) and moves its direction by
gradient descent on the training prompts, against two KLs:

- **keep**: KL(base ‖ edited) of the first generated token on the prompts the edit should leave alone
  (heretic's harmless measure, on training prompts);
- **harmful**: KL(teacher ‖ edited) over the teacher's own greedy answer (``tokens`` long, teacher-forced)
  to each harmful training prompt, the teacher being the given edit. The refined edit answers harmful
  prompts as the edit it started from does.

The direction is ``(r₀ + δ) / ‖r₀ + δ‖`` with ``r₀`` the edit's own and ``δ`` trained by Adam (``lr``)
for ``steps`` full-batch steps on the loss ``keep + harmful``. The weights are rebuilt from the
direction at every step by the same projection the edit bakes in (``abliteration.project_rows``),
applied as hooks on the matrices' inputs, so the edit that comes out is an ordinary ``Abliterate``
with one direction, exact as weights and as hooks.

On SmolLM2-135M (whitened behaviour direction, the attention-led profile at 1.95× its weights, 100-token
answers to the 32 held-out harmful prompts, first-token KL on the 32 held-out harmless ones): the edit
leaving 1 refusal at KL 0.107 became, after the default 6 steps (cosine 0.93 to the start), one leaving
1 at KL 0.030, and 2 at 0.021 with its weights ×0.8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from _core.autograd import differentiates
from _core.errors import arg
from analyses.divergence import kl_rows
from analyses.refusal import DEFAULT_SYSTEM_PROMPT, chat_tokens, load_prompts
from hooks import InputError

from ..edits.abliteration import Abliterate, _delta_hooks, project_rows

if TYPE_CHECKING:
    from hooks.model import HookedLlama

REFINE_STEPS, REFINE_LR, REFINE_TOKENS = 6, 0.006, 16


@dataclass
class RefinedDirection:
    """What ``refine_direction`` returns: the refined ``edit`` (the input edit with the new direction),
    its unit ``direction`` [M], the starting one (``start``), and ``history``: per step the keep KL, the
    harmful KL and the cosine to the start, measured before that step's update."""

    edit: Abliterate
    direction: torch.Tensor
    start: torch.Tensor
    history: list[dict] = field(default_factory=list)

    @property
    def cosine(self) -> float:
        return float(self.direction.double() @ self.start.double())

    def to_dict(self) -> dict:
        first, last = (self.history[0], self.history[-1]) if self.history else ({}, {})
        return {
            "steps": len(self.history),
            "cosine": round(self.cosine, 4),
            "keep_kl": [first.get("keep_kl"), last.get("keep_kl")],
            "harmful_kl": [first.get("harmful_kl"), last.get("harmful_kl")],
        }


def check_refine(steps) -> int:
    """``steps`` as a non-negative int (0: no refinement); anything else is one InputError."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"{arg('refine')} must be a number of steps >= 0 (0: off), got {steps!r}", param="refine")
    return steps


def _answers(model: HookedLlama, edit: Abliterate, prompts, tokens: int, system_prompt, batch_size: int):
    """Per batch: (tokens [B, P+T], mask, weights [B, T] of the answer positions up to the first EOS, teacher
    log-probs [B, T, V]) of the edit's greedy answers."""
    eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    out = []
    with edit.applied(model), torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            tok, mask = chat_tokens(model, prompts[i : i + batch_size], system_prompt)
            full = model.generate(tok, max_new_tokens=tokens, attention_mask=mask, return_type="tokens")
            new = full[:, tok.shape[1] :]
            valid = torch.ones_like(new, dtype=torch.bool)
            if eos is not None:  # positions after the first EOS are padding
                after = (new == eos).long().cumsum(1) - (new == eos).long()
                valid = after == 0
            fmask = torch.cat([mask, torch.ones_like(new)], 1)
            p = tok.shape[1]
            teacher = model(full, attention_mask=fmask)[:, p - 1 : -1].double().log_softmax(-1)
            out.append((full, fmask, valid, teacher))
    return out


@differentiates  # works under torch.no_grad() and torch.inference_mode()
def refine_direction(
    model: HookedLlama,
    edit: Abliterate,
    harmful,
    keep,
    *,
    steps: int = REFINE_STEPS,
    lr: float = REFINE_LR,
    tokens: int = REFINE_TOKENS,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    batch_size: int = 32,
    progress: Callable | None = None,
) -> RefinedDirection:
    """Move ``edit``'s direction to lower the first-token KL on ``keep`` while answering ``harmful`` as
    ``edit`` does (module docstring). ``edit`` needs one direction (a vector, or a stack with
    ``direction_index``). The model is left unedited. ``progress("refinement", steps)``, when given, returns
    ``update(advance=1, status=None)``, called after each step with both KLs as its status.

    Example::

        ref = refine_direction(model, edit, load_prompts("harmful:train"), load_prompts("harmless:train"))
        ref.edit  # an Abliterate with the refined direction; ref.history has the KLs per step
    """
    steps = check_refine(steps)
    if not isinstance(edit, Abliterate):
        raise InputError(f"refine_direction takes an Abliterate edit, got {type(edit).__name__}")
    if edit.direction.dim() == 2 and edit.direction_index is None:
        raise InputError("refine_direction needs one direction: pass a vector, or a stack with direction_index")
    if edit.embeddings:
        raise InputError("refine_direction does not refine an edit of the embeddings (embeddings=True)")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InputError(f"lr must be a positive number, got {lr!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise InputError(f"tokens must be a positive integer, got {tokens!r}")
    harmful, keep = load_prompts(harmful), load_prompts(keep)
    edit.validate(model)
    r0 = edit.unit().float().to(model.device)
    targets = [(lin, w, hin, hout) for _, lin, w, hin, hout in edit.targets(model)]
    start = min(layer for layer, *_ in edit.targets(model))
    base = []  # keep prompts: residuals entering `start` and the unedited last-token log-probs
    with torch.no_grad():
        for i in range(0, len(keep), batch_size):
            tok, mask = chat_tokens(model, keep[i : i + batch_size], system_prompt)
            base.append(
                (
                    model(tok, attention_mask=mask, stop_at_layer=start),
                    mask,
                    model(tok, attention_mask=mask)[:, -1].double().log_softmax(-1),
                )
            )
    answers = []
    for full, fmask, valid, teacher in _answers(model, edit, harmful, tokens, system_prompt, batch_size):
        with torch.no_grad():
            resid = model(full, attention_mask=fmask, stop_at_layer=start)
        answers.append((resid, fmask, valid, teacher))
    n_keep = sum(b[0].shape[0] for b in base)
    n_ans = sum(int(a[2].sum()) for a in answers)

    def hooks(r: torch.Tensor):
        out = []
        for lin, w, hin, hout in targets:
            x = lin.weight.detach().float()
            db = None if lin.bias is None else -w * r * (r @ lin.bias.detach().float())  # as Abliterate bakes it
            out += _delta_hooks(hin, hout, project_rows(x, r, w, edit.norm_preserve) - x, db)
        return out

    def step_losses(r: torch.Tensor) -> tuple[float, float]:
        """Mean keep KL and mean harmful KL at ``r``; their sum is back-propagated batch by batch (the grads
        accumulate on ``delta``)."""
        kk = kh = 0.0
        for resid, mask, logp in base:
            with model.hooks(fwd_hooks=hooks(r / r.norm())):
                logits = model(resid, attention_mask=mask, start_at_layer=start)[:, -1]
            loss = kl_rows(logp, logits).sum() / n_keep
            loss.backward(inputs=[delta])  # only the direction: no weight gradients, nothing left on the model
            kk += float(loss.detach())
        for resid, mask, valid, teacher in answers:
            p = mask.shape[1] - teacher.shape[1]
            with model.hooks(fwd_hooks=hooks(r / r.norm())):
                logits = model(resid, attention_mask=mask, start_at_layer=start)[:, p - 1 : -1]
            loss = (kl_rows(teacher, logits) * valid).sum() / max(n_ans, 1)
            loss.backward(inputs=[delta])
            kh += float(loss.detach())
        return kk, kh

    delta = torch.zeros_like(r0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)  # Adam: the update does not depend on the loss's scale
    history: list[dict] = []
    update = progress("refinement", steps) if progress is not None else None
    for _ in range(steps):
        opt.zero_grad()
        with torch.enable_grad():  # also under torch.set_grad_enabled(False), a TransformerLens habit
            r = r0 + delta
            kk, kh = step_losses(r)
        history.append(
            {"keep_kl": kk, "harmful_kl": kh, "cosine": float((r / r.norm()).detach().double() @ r0.double())}
        )
        opt.step()
        if update is not None:
            update(1, f"refining the direction: keep KL {kk:.4f}, harmful KL {kh:.4f}")
    direction = (r0 + delta).detach()
    direction = (direction / direction.norm()).cpu()
    refined = Abliterate(
        direction,
        attn_weights=dict(edit.attn_weights),
        mlp_weights=dict(edit.mlp_weights),
        strength=edit.strength,
        norm_preserve=edit.norm_preserve,
    )
    return RefinedDirection(edit=refined, direction=direction, start=r0.cpu(), history=history)
