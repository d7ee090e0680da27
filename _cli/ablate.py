"""Ablation measurements behind ``scalpel ablate`` and ``scalpel sweep``.

Metrics, per prompt (batches are left-padded, so position -1 is each prompt's last token):

- ``loss``: mean next-token cross-entropy over the prompt (nats; lower is better);
- ``logit-diff``: ``logit[correct] - logit[incorrect]`` at the last position;
- ``prob``: softmax probability of ``correct`` at the last position.

``ablate`` measures base vs edited with the edit plan applied to the weights (the same weights
``surgery.export`` writes). ``sweep`` ablates one unit at a time, many units per forward pass: the
prompts are repeated once per unit and each copy gets its own unit zeroed by a hook; runs start at the
unit's layer from the cached residual stream (everything before that layer is unchanged).

Example::

    scorer = Scorer.build(model, "logit-diff", items)
    base = evaluate(model, scorer)                 # {"values": [N], "correct_logit": [N], ...}
    table = sweep(model, scorer, "heads", layers=[5, 9])   # SweepResult
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from _cli.inputs import CLIError, PromptItem

METRICS = ("loss", "logit-diff", "prob")


def progress(iterable=None, *, total: int | None = None, desc: str = ""):
    """A tqdm bar on stderr, shown only when stdout is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, disable=not sys.stdout.isatty())


# --------------------------------------------------------------------------- metrics
@dataclass
class Scorer:
    """A metric bound to prompts: token ids of the answers, checked once."""

    metric: str
    items: list[PromptItem]
    correct: torch.Tensor | None = None  # [N]
    incorrect: torch.Tensor | None = None  # [N]

    @classmethod
    def build(cls, model, metric: str, items: list[PromptItem]) -> "Scorer":
        """Check that every prompt has what ``metric`` needs; answers must be single tokens."""
        if metric not in METRICS:
            raise CLIError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        if not items:
            raise CLIError("no prompts: pass --prompts FILE or --prompt TEXT")
        if model.tokenizer is None:
            raise CLIError("this model has no tokenizer, so it cannot read text prompts; load a checkpoint with "
                           "tokenizer files")
        need = {"loss": (), "prob": ("correct",), "logit-diff": ("correct", "incorrect")}[metric]
        for item in items:
            for key in need:
                if getattr(item, key) is None:
                    raise CLIError(f"{item.where}: --metric {metric} needs a {key} answer for every prompt; add "
                                   "PROMPT<TAB>CORRECT<TAB>INCORRECT lines or pass --answers CORRECT INCORRECT")
        ids = {key: torch.tensor([_single_token(model, getattr(it, key), it.where) for it in items])
               for key in need}
        if metric == "loss":
            for item in items:
                if len(model.tokenize(item.text)[0][0]) < 2:
                    raise CLIError(f"{item.where}: --metric loss needs prompts of at least two tokens")
        return cls(metric, items, ids.get("correct"), ids.get("incorrect"))

    @property
    def texts(self) -> list[str]:
        """The prompt texts, in order."""
        return [it.text for it in self.items]

    def score(self, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
              ) -> dict[str, torch.Tensor]:
        """Per-row metric values for logits [B, P, V] of prompts ``rows`` [B] (indices into ``items``)."""
        last = logits[:, -1].float()  # [B, V]
        out: dict[str, torch.Tensor] = {}
        if self.metric == "loss":
            from hooks.model import HookedLlama

            nll = HookedLlama.loss_from_logits(logits, tokens, None, per_token=True)  # [B, P-1]
            keep = (mask[:, 1:] & mask[:, :-1]).to(nll.device).float()
            out["values"] = (nll * keep).sum(-1) / keep.sum(-1)
            return out
        from analyses.metrics import LogitDiff, TargetProb

        c = self.correct[rows]
        out["correct_logit"] = last.gather(-1, c[:, None].to(last.device))[:, 0]
        if self.metric == "logit-diff":
            i = self.incorrect[rows]
            out["incorrect_logit"] = last.gather(-1, i[:, None].to(last.device))[:, 0]
            out["values"] = LogitDiff(c, i).score(last)
        else:
            out["values"] = TargetProb(c).score(last)
        return out


def _single_token(model, text: str, where: str) -> int:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise CLIError(f"{where}: answer {text!r} is {len(ids)} tokens; answers must be single tokens "
                       "(mind the leading space, e.g. ' Mary')")
    return ids[0]


def _tokens(model, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, mask = model.tokenize(texts)
    return tokens.to(model.device), mask.to(model.device).bool()


@torch.no_grad()
def evaluate(model, scorer: Scorer, batch_size: int = 16, desc: str = "prompts") -> dict[str, torch.Tensor]:
    """The metric of every prompt (and the answer logits), batched: ``{"values": [N], ...}`` on CPU."""
    parts: list[dict[str, torch.Tensor]] = []
    n = len(scorer.items)
    chunks = range(0, n, batch_size)
    for start in progress(chunks, total=len(chunks), desc=desc):
        rows = torch.arange(start, min(n, start + batch_size))
        tokens, mask = _tokens(model, scorer.texts[start:start + batch_size])
        logits = model(tokens, attention_mask=mask.long())
        parts.append({k: v.detach().float().cpu() for k, v in scorer.score(logits, tokens, mask, rows).items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# --------------------------------------------------------------------------- ablation plans
def build_plan(model, heads, neurons, layers, *, mean: bool = False, texts: list[str] | None = None):
    """An ``EditPlan`` zeroing (or mean-ablating) ``heads``, zeroing ``neurons`` and removing ``layers``.

    Heads and neurons come first and layer removal last, so every layer number refers to the
    unedited model. ``mean=True`` replaces the heads' outputs by their mean over ``texts``.
    """
    import surgery

    edits = []
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads or []:
        by_layer.setdefault(layer, []).append(head)
    for layer, hs in sorted(by_layer.items()):
        edits.append(surgery.MeanAblateHeads.compute(model, layer, hs, texts) if mean
                     else surgery.ZeroHeads(layer, hs))
    by_layer = {}
    for layer, n in neurons or []:
        by_layer.setdefault(layer, []).append(n)
    for layer, ns in sorted(by_layer.items()):
        edits.append(surgery.ZeroNeurons(layer, ns))
    if layers:
        edits.append(surgery.RemoveLayers(sorted(layers)))
    return surgery.EditPlan(edits)


# --------------------------------------------------------------------------- sweeps
@dataclass
class SweepResult:
    """Effects of ablating each unit alone: ``effects`` [U, N] = edited - base metric per prompt."""

    component: str
    units: list[tuple[int, int | None]]  # (layer, head/neuron) or (layer, None) for layers
    base: torch.Tensor  # [N]
    effects: torch.Tensor  # [U, N]
    metric: str
    ablation: str = "zero"
    extra: dict = field(default_factory=dict)

    def label(self, unit: tuple[int, int | None]) -> str:
        """``"5.3"`` for a head, ``"12:405"`` for a neuron, ``"20"`` for a layer."""
        layer, idx = unit
        return {"heads": f"{layer}.{idx}", "neurons": f"{layer}:{idx}", "layers": f"{layer}"}[self.component]

    def ranking(self) -> list[int]:
        """Unit indices by decreasing |mean effect|."""
        mean = self.effects.mean(-1)
        return sorted(range(len(self.units)), key=lambda u: -abs(float(mean[u])))


def sweep_units(model, component: str, layers: list[int] | None) -> list[tuple[int, int | None]]:
    """Every unit of ``component`` in ``layers`` (default all layers)."""
    layers = list(range(model.n_layers)) if layers is None else layers
    if component == "heads":
        return [(layer, h) for layer in layers for h in range(model.n_heads)]
    if component == "neurons":
        return [(layer, n) for layer in layers for n in range(model.d_mlp)]
    if component == "layers":
        return [(layer, None) for layer in layers]
    raise CLIError(f"unknown component {component!r}; use heads, neurons or layers")


def _unit_hooks(component: str, layer: int, idx: list[int | None], n: int, means: torch.Tensor | None
                ) -> list[tuple[str, Callable]]:
    """Hooks ablating unit ``idx[j]`` in rows ``j*n:(j+1)*n`` of a batch of ``len(idx) * n`` rows."""
    if component == "layers":  # the layer's writes to the residual stream are zero: it is the identity
        zero = lambda t, hook: torch.zeros_like(t)  # noqa: E731
        return [(f"blocks.{layer}.hook_attn_out", zero), (f"blocks.{layer}.hook_mlp_out", zero)]

    def hook(t: torch.Tensor, hook) -> torch.Tensor:
        t = t.clone()
        for j, u in enumerate(idx):
            if component == "heads":
                t[j * n:(j + 1) * n, :, u] = 0 if means is None else means[u].to(t.dtype)
            else:
                t[j * n:(j + 1) * n, :, u] = 0
        return t

    name = f"blocks.{layer}.attn.hook_z" if component == "heads" else f"blocks.{layer}.mlp.hook_post"
    return [(name, hook)]


class _Final(Exception):
    """Raised by a hook to stop a forward at the last residual stream (before the unembedding)."""

    def __init__(self, resid: torch.Tensor) -> None:
        super().__init__("final residual")
        self.resid = resid


def _stop(t: torch.Tensor, hook) -> None:
    raise _Final(t)


def _run_from(model, resid: torch.Tensor, mask: torch.Tensor, layer: int, hooks: list, *, last_only: bool
              ) -> torch.Tensor:
    """Logits of a run starting at ``layer`` from ``resid`` with ``hooks``; with ``last_only`` only the
    last position is unembedded ([R, 1, V]: metrics that read the last token skip the rest)."""
    if not last_only:
        return model.run_with_hooks(resid, attention_mask=mask, start_at_layer=layer, fwd_hooks=hooks)
    try:
        model.run_with_hooks(resid, attention_mask=mask, start_at_layer=layer,
                             fwd_hooks=hooks + [(f"blocks.{model.n_layers - 1}.hook_resid_post", _stop)])
    except _Final as final:
        last = final.resid[:, -1:]
    else:  # pragma: no cover - the hook always fires
        raise RuntimeError("the final residual stream was not reached")
    return model.lm_head(model.model.norm(last))


@torch.no_grad()
def sweep(model, scorer: Scorer, component: str, layers: list[int] | None = None, *, batch_size: int = 64,
          mean: bool = False) -> SweepResult:
    """Ablate each unit of ``component`` in turn (zero, or the mean over the prompts for heads with
    ``mean``) and measure the metric on every prompt. ``batch_size`` bounds rows per forward pass."""
    units = sweep_units(model, component, layers)
    n = len(scorer.items)
    base = evaluate(model, scorer, batch_size=max(1, min(batch_size, 16)), desc="base")
    means = None
    if mean:
        from surgery import mean_activations

        used = sorted({u[0] for u in units})
        means = mean_activations(model, scorer.texts, layers=used)
    chunk_n = max(1, min(n, batch_size))
    per_pass = max(1, batch_size // chunk_n) if component != "layers" else 1
    by_layer: dict[int, list[int]] = {}
    for u, (layer, _) in enumerate(units):
        by_layer.setdefault(layer, []).append(u)
    effects = torch.zeros(len(units), n)
    bar = progress(total=len(units) * ((n + chunk_n - 1) // chunk_n), desc=f"sweep {component}")
    try:
        for start in range(0, n, chunk_n):
            rows = torch.arange(start, min(n, start + chunk_n))
            tokens, mask = _tokens(model, scorer.texts[start:start + chunk_n])
            names = [f"blocks.{layer}.hook_resid_pre" for layer in by_layer]
            _, cache = model.run_with_cache(tokens, attention_mask=mask.long(), names_filter=names)
            for layer, unit_ids in by_layer.items():
                resid = cache[f"blocks.{layer}.hook_resid_pre"]  # [b, P, M]
                layer_means = None if means is None else means[layer].to(model.device)
                for s in range(0, len(unit_ids), per_pass):
                    part = unit_ids[s:s + per_pass]
                    k, b = len(part), len(rows)
                    hooks = _unit_hooks(component, layer, [units[u][1] for u in part], b, layer_means)
                    logits = _run_from(model, resid.repeat(k, 1, 1), mask.long().repeat(k, 1), layer, hooks,
                                       last_only=scorer.metric != "loss")
                    vals = scorer.score(logits, tokens.repeat(k, 1), mask.repeat(k, 1), rows.repeat(k))["values"]
                    vals = vals.float().cpu().view(k, b)
                    for j, u in enumerate(part):
                        effects[u, rows] = vals[j] - base["values"][rows]
                    bar.update(k)
    finally:
        bar.close()
    return SweepResult(component, units, base["values"], effects, scorer.metric,
                       "mean" if mean else ("remove" if component == "layers" else "zero"))
