"""Ablation measurements on prompts: a metric bound to prompts (``Scorer``) and the sweep that
ablates each head, neuron or layer alone and measures the change (``ablation_sweep``).

Metrics, per prompt (batches are left-padded, so position -1 is each prompt's last token):

- ``loss``: mean next-token cross-entropy over the prompt (nats; lower is better);
- ``logit-diff``: ``logit[correct] - logit[incorrect]`` at the last position;
- ``prob``: softmax probability of ``correct`` at the last position.

An ablation is a patch whose "clean" value is a replacement: zeros (``zero``), the head's mean output
over the prompts (``mean``, heads only), or for a layer its own input (``remove``: the layer's
residual-stream output is replaced by its input, i.e. the layer is the identity). The sweep therefore
runs on the one patching engine (``analyses.engine``): each unit's runs start at its layer from the
cached residual stream, many units share a forward pass, and logits are computed only where the metric
reads them.

Example::

    scorer = Scorer.build(model, "logit-diff", [("When Mary and John went to the store, John gave a drink to",
                                                 " Mary", " John")])
    scorer.evaluate(model)["values"]                        # [N] metric per prompt
    res = ablation_sweep(model, scorer, "heads", layers=[19, 20])
    res.effects.shape                                        # [units, prompts]: ablated - base
    res.top_rows(5); res.figure()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from hooks import InputError

from .components import get_component
from .engine import PairInputs, Variant, mark_variants, replacement_setup, run_variants
from .results import AnalysisResult

METRICS = ("loss", "logit-diff", "prob")
SWEEP_COMPONENTS = {"heads": "z", "neurons": "neurons", "layers": "resid_post"}


@dataclass
class Prompt:
    """A prompt and its single-token answers (``where`` names it in errors, e.g. ``prompts.txt:3``)."""

    text: str
    correct: str | None = None
    incorrect: str | None = None
    where: str = "prompt"


def as_prompts(prompts: Sequence[Any], answers: Sequence[str] | None = None) -> list[Prompt]:
    """Prompts from strings, ``(text, correct[, incorrect])`` tuples or objects with ``text``/``correct``/
    ``incorrect``; ``answers`` (CORRECT [INCORRECT]) fill in those that name none."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            text, correct, incorrect, where = p, None, None, f"prompt #{i}"
        elif isinstance(p, (tuple, list)):
            text, correct, incorrect, where = (
                (list(p) + [None, None])[0],
                (list(p) + [None, None])[1],
                (list(p) + [None, None, None])[2],
                f"prompt #{i}",
            )
        else:
            text, correct, incorrect = p.text, getattr(p, "correct", None), getattr(p, "incorrect", None)
            where = getattr(p, "where", f"prompt #{i}")
        if answers and correct is None:
            correct = answers[0]
            incorrect = answers[1] if len(answers) > 1 else incorrect
        out.append(Prompt(str(text), correct, incorrect, where))
    return out


def _single_token(model, text: str, where: str) -> int:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(
            f"{where}: answer {text!r} is {len(ids)} tokens; answers must be single tokens "
            "(mind the leading space, e.g. ' Mary')"
        )
    return ids[0]


class _PromptLoss:
    """The ``loss`` metric for the engine: per-prompt mean next-token loss from full logits [B, P, V]."""

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        self.tokens, self.mask = tokens, mask

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        from hooks.model import HookedLlama

        nll = HookedLlama.loss_from_logits(logits, self.tokens, None, per_token=True)  # [B, P-1]
        keep = (self.mask[:, 1:] & self.mask[:, :-1]).to(nll.device).float()
        return (nll * keep).sum(-1) / keep.sum(-1)


@dataclass
class Scorer:
    """A metric bound to prompts: the token ids of their answers, checked once."""

    metric: str
    items: list[Prompt]
    correct: torch.Tensor | None = None  # [N]
    incorrect: torch.Tensor | None = None  # [N]

    @classmethod
    def build(cls, model, metric: str, prompts: Sequence[Any], answers: Sequence[str] | None = None) -> "Scorer":
        """Check that every prompt has what ``metric`` needs; answers must be single tokens."""
        if metric not in METRICS:
            raise InputError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        items = as_prompts(prompts, answers)
        if not items:
            raise InputError("no prompts: pass --prompts FILE or --prompt TEXT")
        if model.tokenizer is None:
            raise InputError(
                "this model has no tokenizer, so it cannot read text prompts; load a checkpoint with tokenizer files"
            )
        need = {"loss": (), "prob": ("correct",), "logit-diff": ("correct", "incorrect")}[metric]
        for item in items:
            for key in need:
                if getattr(item, key) is None:
                    raise InputError(
                        f"{item.where}: --metric {metric} needs a {key} answer for every prompt; add "
                        "PROMPT<TAB>CORRECT<TAB>INCORRECT lines or pass --answers CORRECT INCORRECT"
                    )
        ids = {key: torch.tensor([_single_token(model, getattr(it, key), it.where) for it in items]) for key in need}
        if metric == "loss":
            for item in items:
                if len(model.tokenize(item.text)[0][0]) < 2:
                    raise InputError(f"{item.where}: --metric loss needs prompts of at least two tokens")
        return cls(metric, items, ids.get("correct"), ids.get("incorrect"))

    @property
    def texts(self) -> list[str]:
        """The prompt texts, in order."""
        return [it.text for it in self.items]

    def tokens(self, model, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded token ids [b, P] and a bool mask of prompts ``rows``, on the model's device."""
        tokens, mask = model.tokenize([self.items[int(r)].text for r in rows])
        return tokens.to(model.device), mask.to(model.device).bool()

    def metric_for(self, rows: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
        """The engine's metric for prompts ``rows``: a ``Metric`` at the last position, or for ``loss``
        a callable returning the per-prompt loss from full logits."""
        from .metrics import LogitDiff, TargetProb

        if self.metric == "loss":
            return _PromptLoss(tokens, mask)
        if self.metric == "logit-diff":
            return LogitDiff(self.correct[rows], self.incorrect[rows])
        return TargetProb(self.correct[rows])

    def score(
        self, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-row metric values for logits [B, P, V] of prompts ``rows`` [B] (indices into ``items``),
        with the answers' logits for ``logit-diff`` and ``prob``."""
        if self.metric == "loss":
            return {"values": _PromptLoss(tokens, mask)(logits)}
        last = logits[:, -1].float()  # [B, V]
        out = {"values": self.metric_for(rows, tokens, mask).score(last)}
        out["correct_logit"] = last.gather(-1, self.correct[rows][:, None].to(last.device))[:, 0]
        if self.metric == "logit-diff":
            out["incorrect_logit"] = last.gather(-1, self.incorrect[rows][:, None].to(last.device))[:, 0]
        return out

    @torch.no_grad()
    def evaluate(self, model, batch_size: int = 16, progress: Callable | None = None) -> dict[str, torch.Tensor]:
        """The metric of every prompt (and the answer logits), batched: ``{"values": [N], ...}`` on CPU.
        ``progress(n_batches)``, when given, returns a callable advanced once per batch."""
        parts: list[dict[str, torch.Tensor]] = []
        n = len(self.items)
        step = progress(len(range(0, n, batch_size))) if progress else None
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(n, start + batch_size))
            tokens, mask = self.tokens(model, rows)
            logits = model(tokens, attention_mask=mask.long())
            parts.append({k: v.detach().float().cpu() for k, v in self.score(logits, tokens, mask, rows).items()})
            if step:
                step(1)
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# --------------------------------------------------------------------------- sweeps
class AblationSweepResult(AnalysisResult):
    """Effects of ablating each unit alone: ``effects`` [U, N] = ablated - base metric per prompt.

    ``units`` are ``(layer, index)`` pairs (``index`` None for layers), ``base`` [N] the unablated
    metric, ``ablation`` "zero", "mean" or "remove".
    """

    title = "ablation sweep"

    def __init__(
        self,
        component: str,
        units: list[tuple[int, int | None]],
        base: torch.Tensor,
        effects: torch.Tensor,
        metric: str,
        ablation: str,
        n_heads: int | None = None,
        prompts: list[str] | None = None,
    ) -> None:
        self.component, self.units, self.base, self.effects = component, units, base, effects
        self.metric, self.ablation, self.n_heads, self.prompts = metric, ablation, n_heads, prompts or []

    def label(self, unit: tuple[int, int | None]) -> str:
        """``"5.3"`` for a head, ``"12:405"`` for a neuron, ``"20"`` for a layer."""
        layer, idx = unit
        return {"heads": f"{layer}.{idx}", "neurons": f"{layer}:{idx}", "layers": f"{layer}"}[self.component]

    @property
    def mean_effects(self) -> torch.Tensor:
        """[U] mean effect over the prompts (float64)."""
        return self.effects.double().mean(-1)

    def ranking(self) -> list[int]:
        """Unit indices by decreasing |mean effect|."""
        mean = self.effects.mean(-1)
        return sorted(range(len(self.units)), key=lambda u: -abs(float(mean[u])))

    def rows(self) -> list[dict]:
        """One row per unit, ranked by |mean effect|."""
        mean, base_mean = self.mean_effects, float(self.base.double().mean())
        return [
            {
                "rank": r + 1,
                "unit": self.label(self.units[u]),
                "layer": self.units[u][0],
                "index": self.units[u][1],
                "mean_effect": float(mean[u]),
                "mean_ablated": base_mean + float(mean[u]),
                "effects": [float(x) for x in self.effects[u]],
            }
            for r, u in enumerate(self.ranking())
        ]

    def to_dict(self) -> dict:
        return {
            "component": self.component,
            "metric": self.metric,
            "ablation": self.ablation,
            "prompts": list(self.prompts),
            "base": [float(x) for x in self.base],
            "base_mean": float(self.base.double().mean()),
            "units": self.rows(),
        }

    def figure(self, top: int = 30):
        """Heads: a layer x head heatmap of the mean effect; neurons and layers: the top units as bars."""
        if self.component == "heads" and self.n_heads:
            from .plotting import heatmap

            layers = sorted({u[0] for u in self.units})
            z = torch.full((len(layers), self.n_heads), float("nan"))
            for u, (layer, head) in enumerate(self.units):
                z[layers.index(layer), head] = self.mean_effects[u]
            return heatmap(
                z,
                [f"H{h}" for h in range(self.n_heads)],
                [f"L{layer}" for layer in layers],
                title=f"mean effect of ablating each head on {self.metric}",
                x_title="head",
                y_title="layer",
                colorbar_title="effect",
            )
        return self.bar_figure(top)

    def bar_figure(self, top: int = 30):
        """The ``top`` units by |mean effect| as bars (red: the metric goes down)."""
        import plotly.graph_objects as go

        ranked = self.rows()[:top]
        fig = go.Figure(
            go.Bar(
                x=[r["unit"] for r in ranked],
                y=[r["mean_effect"] for r in ranked],
                marker_color=["#c0392b" if r["mean_effect"] < 0 else "#2471a3" for r in ranked],
            )
        )
        fig.update_layout(
            xaxis_title="unit",
            yaxis_title=f"mean effect on {self.metric}",
            xaxis_type="category",
            margin=dict(l=60, r=20, t=40, b=80),
        )
        return fig


def sweep_units(model, component: str, layers: list[int] | None) -> list[tuple[int, int | None]]:
    """Every unit of ``component`` (heads, neurons or layers) in ``layers`` (default all layers)."""
    if component not in SWEEP_COMPONENTS:
        raise InputError(f"unknown component {component!r}; use heads, neurons or layers")
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
    if bad:
        raise InputError(
            f"layer {bad[0]} is out of range; the model has {model.n_layers} layers (0..{model.n_layers - 1})"
        )
    if component == "heads":
        return [(layer, h) for layer in layers for h in range(model.n_heads)]
    if component == "neurons":
        return [(layer, n) for layer in layers for n in range(model.d_mlp)]
    return [(layer, None) for layer in layers]


def _replacement(component: str, means: dict | None):
    if component == "layers":  # the layer's output is its input: the layer is the identity
        return lambda layer, act, cache: cache["resid_pre", layer]
    if means is not None:  # [H, D] mean output of each head, broadcast over batch and positions
        return lambda layer, act, cache: means[layer].to(act.device)[None, None]
    return lambda layer, act, cache: torch.zeros((), dtype=act.dtype, device=act.device)


@torch.no_grad()
def ablation_sweep(
    model,
    scorer: Scorer,
    component: str,
    layers: list[int] | None = None,
    *,
    means: dict[int, torch.Tensor] | None = None,
    batch_size: int = 64,
    progress: Callable | None = None,
) -> AblationSweepResult:
    """Ablate each unit of ``component`` ("heads", "neurons" or "layers") in turn — zero a head or a
    neuron, or with ``means`` (``{layer: [n_heads, d_head]}``, e.g. ``surgery.mean_activations(model,
    scorer.texts)``) replace a head's output by its mean; remove a layer — and measure the metric on
    every prompt. ``batch_size`` bounds the rows (units x prompts) of one forward pass.
    ``progress(total)``, when given, returns a callable advanced by the number of units measured."""
    if means is not None and component != "heads":
        raise InputError("mean ablation applies to heads only")
    units = sweep_units(model, component, layers)
    comp = get_component(SWEEP_COMPONENTS[component])
    n = len(scorer.items)
    base = scorer.evaluate(model, batch_size=max(1, min(batch_size, 16)))
    if means is not None:
        missing = sorted({u[0] for u in units} - set(means))
        if missing:
            raise InputError(f"means has no entry for layer {missing[0]}; compute them for every swept layer")
    chunk_n = max(1, min(n, batch_size))
    per_pass = max(1, batch_size // chunk_n)
    used = sorted({u[0] for u in units})
    effects = torch.zeros(len(units), n)
    step = progress(len(units) * len(range(0, n, chunk_n))) if progress else None
    variants = [Variant(layer, None, idx) for layer, idx in units]
    replace = _replacement(component, means)
    for start in range(0, n, chunk_n):
        rows = torch.arange(start, min(n, start + chunk_n))
        tokens, mask = scorer.tokens(model, rows)
        inputs = PairInputs(tokens, tokens, None if bool(mask.all()) else mask.long(), None)
        setup = replacement_setup(model, comp, inputs, used, replace)
        metric = scorer.metric_for(rows, tokens, mask)
        for s in range(0, len(variants), per_pass):
            part = variants[s : s + per_pass]
            mark_variants(comp, setup, part, metric, reuse_prefix=True)
            values = run_variants(model, comp, setup, part, metric, max_batch=per_pass, per_prompt=True)
            effects[s : s + len(part), rows] = values.float() - base["values"][rows][None]
            if step:
                step(len(part))
    ablation = "mean" if means is not None else ("remove" if component == "layers" else "zero")
    return AblationSweepResult(
        component, units, base["values"], effects, scorer.metric, ablation, n_heads=model.n_heads, prompts=scorer.texts
    )
