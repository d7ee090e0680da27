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

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from _core import distributed as dist
from _core.errors import arg
from _core.readers import Prompt  # one prompt with its answers: what a prompt file holds and a scorer scores
from hooks import InputError
from hooks.indices import check_indices

from .components import get_component
from .engine import PairInputs, Variant, mark_variants, replacement_setup, run_variants
from .results import AnalysisResult

if TYPE_CHECKING:
    from hooks.model import HookedLlama

METRICS = ("loss", "logit-diff", "prob")
SWEEP_COMPONENTS = {"heads": "z", "neurons": "neurons", "layers": "resid_post"}


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


def _single_token(model: HookedLlama, text: str, where: str) -> int:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(
            f"{where}: answer {text!r} is {len(ids)} tokens; answers must be single tokens "
            "(mind the leading space, e.g. ' Mary')",
            param="answers",
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
    def build(
        cls, model: HookedLlama, metric: str, prompts: Sequence[Any], answers: Sequence[str] | None = None
    ) -> "Scorer":
        """Check that every prompt has what ``metric`` needs; answers must be single tokens."""
        if metric not in METRICS:
            raise InputError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}", param="metric")
        items = as_prompts(prompts, answers)
        if not items:
            raise InputError(f"{arg('prompts')} is empty; give at least one prompt", param="prompts")
        if model.tokenizer is None:
            raise InputError(
                "this model has no tokenizer, so it cannot read text prompts; load a checkpoint with tokenizer files"
            )
        need = {"loss": (), "prob": ("correct",), "logit-diff": ("correct", "incorrect")}[metric]
        for item in items:
            for key in need:
                if getattr(item, key) is None:
                    raise InputError(
                        f"{item.where}: {arg('metric', metric)} needs a {key} answer for every prompt; add "
                        f"PROMPT<TAB>CORRECT<TAB>INCORRECT lines or pass {arg('answers')} CORRECT INCORRECT",
                        param="answers",
                    )
        ids = {key: torch.tensor([_single_token(model, getattr(it, key), it.where) for it in items]) for key in need}
        if metric == "loss":
            for item in items:
                if len(model.tokenize(item.text)[0][0]) < 2:
                    raise InputError(
                        f"{item.where}: {arg('metric', 'loss')} needs prompts of at least two tokens", param="prompts"
                    )
        return cls(metric, items, ids.get("correct"), ids.get("incorrect"))

    @property
    def texts(self) -> list[str]:
        """The prompt texts, in order."""
        return [it.text for it in self.items]

    def tokens(self, model: HookedLlama, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded token ids [b, P] and a bool mask of prompts ``rows``, on the model's device."""
        tokens, mask = model.tokenize([self.items[int(r)].text for r in rows])
        return tokens.to(model.device), mask.to(model.device).bool()

    def metric_for(self, rows: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
        """The engine's metric for prompts ``rows``: a ``Metric`` at the last position, or for ``loss``
        a callable returning the per-prompt loss from full logits."""
        from .metrics import LogitDiff, TargetProb

        if self.metric == "loss":
            return _PromptLoss(tokens, mask)
        correct, incorrect = self._answers()
        if self.metric == "logit-diff":
            return LogitDiff(correct[rows], incorrect[rows])
        return TargetProb(correct[rows])

    def _answers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer ids [N] (an empty tensor for an answer the metric does not use)."""
        empty = torch.zeros(0, dtype=torch.long)
        return (
            self.correct if self.correct is not None else empty,
            self.incorrect if self.incorrect is not None else empty,
        )

    def score(
        self, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-row metric values for logits [B, P, V] of prompts ``rows`` [B] (indices into ``items``),
        with the answers' logits for ``logit-diff`` and ``prob``."""
        if self.metric == "loss":
            return {"values": _PromptLoss(tokens, mask)(logits)}
        last = logits[:, -1].float()  # [B, V]
        correct, incorrect = self._answers()
        out = {"values": self.metric_for(rows, tokens, mask).score(last)}
        out["correct_logit"] = last.gather(-1, correct[rows][:, None].to(last.device))[:, 0]
        if self.metric == "logit-diff":
            out["incorrect_logit"] = last.gather(-1, incorrect[rows][:, None].to(last.device))[:, 0]
        return out

    @torch.no_grad()
    def evaluate(
        self, model: HookedLlama, batch_size: int = 16, progress: Callable | None = None
    ) -> dict[str, torch.Tensor]:
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


# --------------------------------------------------------------------------- one ablation, base vs edited
class AblationResult(AnalysisResult):
    """The metric of every prompt on the unedited and on the edited model.

    ``base`` / ``edited`` hold ``{"values": [N], ...}`` as ``Scorer.evaluate`` returns them (with the
    answers' logits for ``logit-diff`` and ``prob``); ``effects`` [N] = edited - base; ``edits`` the edit
    plan as a dict; ``while_applied`` what the ``while_applied`` callback returned (None without one).
    """

    title = "ablation"

    def __init__(
        self,
        items: list[Prompt],
        metric: str,
        base: dict[str, torch.Tensor],
        edited: dict[str, torch.Tensor],
        edits: dict | None = None,
        while_applied: Any = None,
    ) -> None:
        self.items, self.metric, self.base, self.edited = items, metric, base, edited
        self.edits, self.while_applied = edits, while_applied

    @property
    def effects(self) -> torch.Tensor:
        """[N] edited - base metric per prompt."""
        return self.edited["values"] - self.base["values"]

    def rows(self) -> list[dict]:
        """One row per prompt: the prompt, its answers, base, edited, effect (and the answers' logits)."""
        out = []
        for i, item in enumerate(self.items):
            row = {
                "prompt": item.text,
                "correct": item.correct,
                "incorrect": item.incorrect,
                "base": float(self.base["values"][i]),
                "edited": float(self.edited["values"][i]),
                "effect": float(self.edited["values"][i] - self.base["values"][i]),
            }
            for key in ("correct_logit", "incorrect_logit"):
                if key in self.base:
                    row[f"base_{key}"], row[f"edited_{key}"] = float(self.base[key][i]), float(self.edited[key][i])
            out.append(row)
        return out

    @property
    def mean(self) -> dict[str, float]:
        """Mean base, edited and effect over the prompts (float64)."""
        rows = self.rows()
        return {
            k: float(torch.tensor([r[k] for r in rows], dtype=torch.float64).mean())
            for k in ("base", "edited", "effect")
        }

    def to_dict(self) -> dict:
        return {"metric": self.metric, "edits": self.edits, "prompts": self.rows(), "mean": self.mean}

    def figure(self, **kwargs: Any):
        """Grouped bars, base vs edited, per prompt (hover shows the prompt) and their mean."""
        import plotly.graph_objects as go

        rows, mean = self.rows(), self.mean
        labels = [f"#{i}" for i in range(len(rows))] + ["mean"]
        hover = [r["prompt"] for r in rows] + ["mean over prompts"]
        fig = go.Figure(
            [
                go.Bar(
                    name=key,
                    x=labels,
                    y=[r[key] for r in rows] + [mean[key]],
                    hovertext=hover,
                    hovertemplate="%{hovertext}<br>" + key + " %{y:.4g}<extra></extra>",
                )
                for key in ("base", "edited")
            ]
        )
        fig.update_layout(
            barmode="group",
            yaxis_title=self.metric,
            xaxis_title="prompt",
            xaxis_type="category",
            margin=dict(l=60, r=20, t=40, b=60),
            legend=dict(orientation="h", y=1.1),
        )
        return fig


@contextlib.contextmanager
def _applied(model: HookedLlama, edits) -> Iterator[None]:
    """``edits`` applied to ``model`` inside (an edit plan, one edit, or a list of edits applied in order)."""
    if hasattr(edits, "applied"):
        with edits.applied(model):
            yield
        return
    if not isinstance(edits, (list, tuple)) or not all(hasattr(e, "applied") for e in edits):
        raise InputError(
            f"{arg('edits')} must be an edit plan, an edit or a list of edits (surgery.EditPlan, surgery.ZeroHeads …), "
            f"got {type(edits).__name__}",
            param="edits",
        )
    with contextlib.ExitStack() as stack:
        for edit in edits:
            stack.enter_context(edit.applied(model))
        yield


def _edits_dict(edits) -> dict | None:
    if hasattr(edits, "to_dict"):
        return edits.to_dict()
    if isinstance(edits, (list, tuple)) and all(hasattr(e, "to_dict") for e in edits):
        return {"edits": [e.to_dict() for e in edits]}
    return None


@torch.no_grad()
def measure_ablation(
    model: HookedLlama,
    edits,
    prompts: Scorer | Sequence[Any],
    metric: str = "loss",
    *,
    answers: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: Callable | None = None,
    while_applied: Callable[[Any], Any] | None = None,
) -> AblationResult:
    """The metric of every prompt with and without ``edits`` (an ``EditPlan``, one edit or a list of them):
    what ``scalpel ablate`` reports.

    The edits are applied once: the edited measurement runs first, then ``while_applied(model)`` when
    given (still on the edited model — e.g. ``lambda m: surgery.export(m, "out")`` exports the very state
    that was measured), then the model is restored exactly and measured unedited. A plan that does not
    fit the model is refused before anything is measured. ``prompts`` as ``Scorer.build`` takes them (or a
    built ``Scorer``); ``progress(label, n_batches)``, when given, returns a callable advanced per batch.

    Example::

        res = measure_ablation(model, surgery.EditPlan([surgery.ZeroHeads(19, [2])]), IOI, "logit-diff")
        res.effects          # [N] edited - base
        res.rows(); res.mean["effect"]; res.figure()
    """
    scorer = prompts if isinstance(prompts, Scorer) else Scorer.build(model, metric, prompts, answers)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"{arg('batch_size')} must be a positive integer, got {batch_size!r}", param="batch_size")

    def bar(label: str):
        return (lambda n: progress(label, n)) if progress else None

    extra = None
    with _applied(model, edits):  # applies (and checks) every edit before any measurement
        edited = scorer.evaluate(model, batch_size, progress=bar("edited"))
        if while_applied is not None:
            extra = while_applied(model)
    base = scorer.evaluate(model, batch_size, progress=bar("base"))
    return AblationResult(scorer.items, scorer.metric, base, edited, _edits_dict(edits), extra)


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
        """``"L5H3"`` for a head, ``"12:405"`` for a neuron, ``"20"`` for a layer (each as ``--heads`` /
        ``--neurons`` / ``--layers`` read it)."""
        layer, idx = unit
        return {"heads": f"L{layer}H{idx}", "neurons": f"{layer}:{idx}", "layers": f"{layer}"}[self.component]

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

    def figure(self, top: int = 30, **kwargs: Any):
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


def sweep_units(model: HookedLlama, component: str, layers: list[int] | None) -> list[tuple[int, int | None]]:
    """Every unit of ``component`` (heads, neurons or layers) in ``layers`` (default all layers)."""
    if component not in SWEEP_COMPONENTS:
        raise InputError(f"unknown component {component!r}; use heads, neurons or layers")
    layers = list(range(model.n_layers)) if layers is None else check_indices(model, "layer", layers, param="layers")
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
    model: HookedLlama,
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
        passes = range(0, len(variants), per_pass)
        for s in [passes[i] for i in dist.shard(len(passes))]:  # under torchrun: this rank's block of units
            part = variants[s : s + per_pass]
            mark_variants(comp, setup, part, metric, reuse_prefix=True)
            with dist.local():
                values = run_variants(model, comp, setup, part, metric, max_batch=per_pass, per_prompt=True)
            effects[s : s + len(part), rows] = values.float() - base["values"][rows][None]
            if step:
                step(len(part))
    dist.all_reduce(effects)  # each entry was computed by one rank (the others hold 0): every rank gets all
    ablation = "mean" if means is not None else ("remove" if component == "layers" else "zero")
    return AblationSweepResult(
        component, units, base["values"], effects, scorer.metric, ablation, n_heads=model.n_heads, prompts=scorer.texts
    )
