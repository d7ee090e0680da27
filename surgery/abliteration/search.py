"""``abliterate``: search the ``Abliterate`` parameters that remove refusals at the least KL, in five named
stages (``AbliterationSearch``: setup → trials → refinement → confirmation → result).

1. **setup**: the prompts (a held-out third of each set when no eval sets are given), the sampler
   (``optuna`` when installed, else a Sobol sequence, with a one-line ``SearchNotice``), the refusal
   directions of each contrast, the baseline refusals and the KL scorer's cache.

   The direction has two sources, and with ``contrast="auto"`` the search treats the choice as one more
   parameter: ``"sets"``, harmful-set mean minus harmless-set mean (heretic's); ``"behaviour"``, the mean
   over the harmful training prompts the unedited model *refuses* minus the mean over the training prompts
   it *answers*, harmful and harmless alike (each classified by ``classify_tokens`` greedy tokens and the
   marker scorer). Harmless prompts it declines are left out of both means: on SmolLM2-135M they are
   capability disclaimers ("as a text-based AI I can't wash your car"), neither the refusals to remove nor
   compliance. Both are **whitened** by default (``whiten``, a shrunk linear discriminant) against the
   prompts the edit should leave alone (the harmless set; for "behaviour", every answered or harmless
   training prompt). On SmolLM2-135M (attention-led anchor, 100-token counts on the 32 held-out prompts) the
   plain direction removes all but 2 refusals at KL 0.095; whitened at λ = 30 it leaves 2 at KL 0.053.
2. **trials**: each parameter set (``space``) is scored on the held-out prompts by the refusals in a short
   greedy answer (``proxy_tokens``, heretic's markers; these track the 100-token counts within one or two
   on SmolLM2-135M) and the first-token KL(base ‖ edited) on the harmless ones (``FirstTokenKL``, from
   cached residuals at the first edited layer). The sampler minimises ``max(refusals, target) + KL``; the
   first trials are anchors, the last ``LINE_STEPS`` a line search along the strength of the best shape.
3. **refinement**: the best trial's direction is refined (``refine_direction``, ``refine`` gradient steps
   on the training prompts) and the last ``refine_trials(trials)`` trials score it with the best trial's
   profile (×1, ×1.25 towards the target, ×1.25 the other way). On SmolLM2-135M the refined edit leaves as
   many refusals as its teacher at about 0.3× the KL.
4. **confirmation**: the Pareto front of all trials is confirmed by generation (greedy,
   ``max_new_tokens``, the edit baked into the weights as it will be exported): the lowest-KL point when it
   already meets ``target_refusals``; else the most aggressive point sets the goal and bisection along the
   front finds the lowest-KL point that meets it (``max_confirm`` generations at most).
5. **result**: the ``AbliterationResult`` with the chosen edit, its plan and the provenance.

``progress(stage, total)``, when given, is called at the start of each stage and returns
``update(advance=1, status=None)``; the search calls it after each trial (status: the best so far) and,
at most twice a second, after every forward pass of the model, so a display moves while a trial runs.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from analyses.refusal import (
    DEFAULT_SYSTEM_PROMPT,
    FirstTokenKL,
    RefusalScorer,
    load_prompts,
    prompts_sha256,
    refusal_directions,
)
from hooks import InputError
from hooks.model import check_model

from ..plan import EditPlan
from .config import AbliterationConfig
from .refine import refine_direction
from .result import AbliterationResult
from .space import (
    LINE_FACTOR,
    bisect_front,
    edit_for,
    pareto_front,
    propose,
    refine_trials,
    search_space,
)

if TYPE_CHECKING:
    from hooks import HookedLlama

    from ..edits import Abliterate

Progress = Callable[[str, "int | None"], Callable[..., None]]  # progress(stage, total) -> update(advance, status)
STAGES = ("setup", "trials", "refinement", "confirmation")


class SearchNotice(UserWarning):
    """A one-line notice about how the search runs (e.g. the sampler used when Optuna is missing)."""


def _quiet(stage: str, total: int | None) -> Callable[..., None]:
    return lambda advance=1, status=None: None


def behaviour_split(
    model: HookedLlama,
    harmful,
    harmless,
    *,
    markers: Sequence[str] | None = None,
    classify_tokens: int = 24,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    batch_size: int = 32,
):
    """The two sides of the ``"behaviour"`` contrast: (harmful prompts the model refuses, prompts of either
    set it answers, the ``RefusalRate`` of ``harmful + harmless``); harmless prompts it declines are in neither."""
    scorer = RefusalScorer(
        markers=AbliterationConfig.markers if markers is None else markers,
        max_new_tokens=classify_tokens,
        system_prompt=system_prompt,
        batch_size=batch_size,
    )
    rate = scorer(model, list(harmful) + list(harmless))
    n_bad = len(harmful)
    refused = [p for p, r in zip(rate.prompts[:n_bad], rate.refused[:n_bad]) if r]
    answered = [p for p, r in zip(rate.prompts, rate.refused) if not r]
    return refused, answered, rate


def resolve_sampler(name: str) -> str:
    """``"auto"`` → ``"optuna"`` when it is importable, else ``"sobol"`` with a one-line ``SearchNotice``."""
    if name != "auto":
        if name == "optuna":
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise InputError(
                    "sampler='optuna' needs Optuna: pip install 'llama-scalpel[abliterate]', or use sampler='sobol'",
                    param="sampler",
                ) from None
        return name
    try:
        import optuna  # noqa: F401
    except ImportError:
        warnings.warn(
            SearchNotice(
                "optuna is not installed: trials are drawn from a scrambled Sobol sequence over the same box "
                "instead of Optuna's TPE (pip install 'llama-scalpel[abliterate]' for TPE)"
            ),
            stacklevel=3,
        )
        return "sobol"
    return "optuna"


class AbliterationSearch:
    """One search, stage by stage (module docstring): ``setup()``, ``trials()``, ``refinement()``,
    ``confirmation()``, ``result()``; ``run()`` does all five. The model is left unedited."""

    def __init__(
        self,
        model: HookedLlama,
        harmful,
        harmless,
        config: AbliterationConfig,
        *,
        eval_harmful=None,
        eval_harmless=None,
        progress: Progress | None = None,
    ) -> None:
        check_model(model, "abliterate")
        self.model, self.config = model, config
        self.progress = progress or _quiet
        harmful, harmless = load_prompts(harmful), load_prompts(harmless)
        if eval_harmful is None:
            cut = len(harmful) - max(1, len(harmful) // 3)
            harmful, eval_harmful = harmful[:cut], harmful[cut:]
        if eval_harmless is None:
            cut = len(harmless) - max(1, len(harmless) // 3)
            harmless, eval_harmless = harmless[:cut], harmless[cut:]
        self.harmful, self.harmless = harmful, harmless
        self.eval_harmful, self.eval_harmless = load_prompts(eval_harmful), load_prompts(eval_harmless)
        self.rows: list[dict] = []  # one per scored trial
        self.timings: dict[str, float] = {}
        self.refined = None
        self.refine_info: dict | None = None
        self.behaviour = None
        self.refused: list[str] = []
        self.answered: list[str] = []

    # ------------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _stage(self, name: str, total: int | None) -> Iterator[Callable[..., None]]:
        """Time the stage, open its progress line, and tick it (at most twice a second) on every forward."""
        t0 = time.perf_counter()
        update = self.progress(name, total)
        state = {"status": None, "last": 0.0, "forwards": 0}

        def step(advance: int = 1, status: str | None = None) -> None:
            if status is not None:
                state["status"] = status
            update(advance, state["status"])

        def tick(t: torch.Tensor, hook) -> None:
            state["forwards"] += 1
            now = time.perf_counter()
            if now - state["last"] >= 0.5:
                state["last"] = now
                update(0, state["status"])

        with self.model.hooks(fwd_hooks=[("hook_logits", tick)]):
            yield step
        self.timings[f"{name}_s"] = time.perf_counter() - t0

    def edit_of(self, params: dict) -> Abliterate:
        """The ``Abliterate`` edit of a parameter set (the refined direction for ``params["refined"]``)."""
        return edit_for(
            self.directions,
            params,
            self.model.n_layers,
            norm_preserve=self.config.norm_preserve,
            refined=None if self.refined is None else self.refined.direction,
        )

    def score(self, params: dict) -> tuple[float, float]:
        """One trial: (short-answer refusals, first-token KL) with the edit applied; appended to ``rows``."""
        edit = self.edit_of(params)
        start = min(list(edit.attn_weights) + list(edit.mlp_weights))
        with edit.applied(self.model):
            kl = self.kl(start)
            proxy = float(self.proxy(self.model, self.eval_harmful).count)
        self.rows.append(
            {"trial": len(self.rows), "params": dict(params), "refusal_proxy": proxy, "kl": kl, "refusals": None}
        )
        return proxy, kl

    def best(self) -> int:
        """The trial with the fewest short-answer refusals down to the target, then the least KL."""
        target = self.config.target_refusals
        return min(
            range(len(self.rows)), key=lambda i: (max(self.rows[i]["refusal_proxy"], target), self.rows[i]["kl"])
        )

    def _best_status(self) -> str:
        if not self.rows:
            return ""
        r = self.rows[self.best()]
        return f"best {r['refusal_proxy']:g}/{len(self.eval_harmful)} short refusals, KL {r['kl']:.4f}"

    def directions_of(self, refused: list[str], answered: list[str], keep: list[str] | None = None):
        """Refusal directions of one contrast with the configured positions, whitening and scorer settings."""
        c = self.config
        return refusal_directions(
            self.model,
            refused,
            answered,
            positions=c.positions,
            project_harmless=c.project_harmless,
            whiten=c.whiten,
            keep=keep,
            system_prompt=c.system_prompt,
            batch_size=c.batch_size,
        )

    # ------------------------------------------------------------------- stage 1
    def setup(self) -> None:
        """Sampler, directions of each contrast, baseline refusals, the KL scorer's cache."""
        c, model = self.config, self.model
        with self._stage("setup", None) as step:
            self.sampler = resolve_sampler(c.sampler)
            self.directions: dict[str, Any] = {}
            if c.contrast in ("auto", "sets"):
                step(0, "directions: harmful − harmless")
                self.directions["sets"] = self.directions_of(self.harmful, self.harmless)
            if c.contrast in ("auto", "behaviour"):
                step(0, "classifying the training prompts (refused / answered)")
                self.refused, self.answered, self.behaviour = behaviour_split(
                    model,
                    self.harmful,
                    self.harmless,
                    markers=c.markers,
                    classify_tokens=c.classify_tokens,
                    system_prompt=c.system_prompt,
                    batch_size=c.batch_size,
                )
                if len(self.refused) >= 2 and len(self.answered) >= 2:
                    step(0, "directions: refused − answered")
                    keep = None if c.whiten is None else list(dict.fromkeys(self.answered + self.harmless))
                    self.directions["behaviour"] = self.directions_of(self.refused, self.answered, keep)
                elif c.contrast == "behaviour":
                    raise InputError(
                        f"contrast='behaviour' needs at least 2 refused harmful and 2 answered training prompts; "
                        f"the model refused {len(self.refused)} of {len(self.harmful)} harmful and answered "
                        f"{len(self.answered)} of {self.behaviour.n}",
                        param="contrast",
                    )
            step(0, "baseline refusals")
            self.confirm_scorer = RefusalScorer(c.markers, c.max_new_tokens, c.system_prompt, c.batch_size)
            self.proxy = RefusalScorer(c.markers, c.proxy_tokens, c.system_prompt, c.batch_size)
            self.before = self.confirm_scorer(model, self.eval_harmful)
            step(0, "caching the harmless prompts' residuals")
            self.kl = FirstTokenKL(model, self.eval_harmless, c.system_prompt)
            self.n_refined = refine_trials(c.trials) if c.refine else 0

    # ------------------------------------------------------------------- stage 2
    def trials(self) -> None:
        """The sampler's trials (anchors first) and the closing line search along the strength."""
        c, n = self.config, self.config.trials - self.n_refined
        space = search_space(self.model.n_layers)
        with self._stage("trials", n) as step:
            gen = propose(n, space, c.seed, self.sampler, list(self.directions), self.model.n_layers, c.target_refusals)
            params = next(gen)
            while True:
                value = self.score(params)
                step(1, self._best_status())
                try:
                    params = gen.send(value)
                except StopIteration:
                    break

    # ------------------------------------------------------------------- stage 3
    def refinement(self) -> None:
        """Refine the best trial's direction, then score it at the teacher's strength ×1, then ×1.25 towards
        ``target_refusals`` and ×1.25 the other way."""
        if not self.n_refined:
            self.timings["refinement_s"] = 0.0
            return
        c = self.config
        with self._stage("refinement", c.refine + self.n_refined) as step:
            teacher = self.best()
            tparams = self.rows[teacher]["params"]
            use_behaviour = tparams.get("contrast", next(iter(self.directions))) == "behaviour"
            keep = list(dict.fromkeys(self.answered + self.harmless)) if use_behaviour else list(self.harmless)
            self.refined = refine_direction(
                self.model,
                self.edit_of(tparams),
                self.harmful,
                keep,
                steps=c.refine,
                system_prompt=c.system_prompt,
                batch_size=c.batch_size,
                progress=lambda stage, total: step,
            )
            self.refine_info = {"teacher_trial": teacher, **self.refined.to_dict()}
            mults = [1.0]
            while mults:
                m = mults.pop(0)
                proxy, _ = self.score(
                    {
                        **tparams,
                        "refined": True,
                        **{f"{k}.max_weight": tparams[f"{k}.max_weight"] * m for k in ("attn", "mlp")},
                    }
                )
                step(1, self._best_status())
                if m == 1.0:  # then a step towards the target, and one the other way (a lower-KL point)
                    first = LINE_FACTOR if proxy > c.target_refusals else 1 / LINE_FACTOR
                    mults = [first, 1 / first][: self.n_refined - 1]

    # ------------------------------------------------------------------- stage 4
    def confirmation(self) -> None:
        """Confirm the Pareto front by generation with the edit baked in; choose the point (module docstring)."""
        c = self.config
        self.front = pareto_front([(r["refusal_proxy"], r["kl"]) for r in self.rows])
        results: dict[int, Any] = {}
        with self._stage("confirmation", min(c.max_confirm, len(self.front))) as step:

            def confirm(k: int) -> int:
                i = self.front[k]
                with self.edit_of(self.rows[i]["params"]).applied(self.model):
                    results[i] = self.confirm_scorer(self.model, self.eval_harmful)
                self.rows[i]["refusals"] = results[i].count
                step(1, f"trial {i}: {results[i].count}/{results[i].n} refusals, KL {self.rows[i]['kl']:.4f}")
                return results[i].count

            self.chosen = self.front[bisect_front(len(self.front), confirm, c.target_refusals, c.max_confirm)]
        self.after = results[self.chosen]

    # ------------------------------------------------------------------- stage 5
    def result(self) -> AbliterationResult:
        c, chosen = self.config, self.chosen
        edit = self.edit_of(self.rows[chosen]["params"])
        contrast = self.rows[chosen]["params"].get("contrast", next(iter(self.directions)))
        provenance: dict[str, Any] = {
            "search": "llama-scalpel abliterate",
            "config": c.to_dict(),
            "sampler": self.sampler,
            "chosen_trial": chosen,
            "params": self.rows[chosen]["params"],
            "contrast": contrast,
            "contrasts": list(self.directions),
        }
        if self.behaviour is not None:
            provenance["behaviour_split"] = {
                "refused": len(self.refused),
                "answered": len(self.answered),
                "declined_harmless": self.behaviour.count - len(self.refused),
                "classify_tokens": c.classify_tokens,
            }
        provenance["refine"] = {"steps": c.refine, "trials": self.n_refined, **(self.refine_info or {})}
        sets = {
            "harmful": self.harmful,
            "harmless": self.harmless,
            "eval_harmful": self.eval_harmful,
            "eval_harmless": self.eval_harmless,
        }
        provenance["prompts_sha256"] = {k: prompts_sha256(v) for k, v in sets.items()}
        provenance["prompt_counts"] = {k: len(v) for k, v in sets.items()}
        t = self.timings
        return AbliterationResult(
            trials=self.rows,
            front=self.front,
            chosen=chosen,
            edit=edit,
            plan=EditPlan([edit]),
            directions=self.directions[contrast],
            before=self.before,
            after=self.after,
            kl=self.rows[chosen]["kl"],
            provenance=provenance,
            timings={
                "setup_s": t["setup_s"],
                "search_s": t["trials_s"],
                "refine_s": t["refinement_s"],
                "confirm_s": t["confirmation_s"],
                "total_s": sum(t[f"{s}_s"] for s in STAGES),
            },
        )

    def run(self) -> AbliterationResult:
        """All five stages, with ``config.threads`` CPU threads (restored after)."""
        threads = torch.get_num_threads()
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        try:
            self.setup()
            self.trials()
            self.refinement()
            self.confirmation()
            return self.result()
        finally:
            torch.set_num_threads(threads)


def abliterate(
    model: HookedLlama,
    harmful,
    harmless,
    *,
    eval_harmful=None,
    eval_harmless=None,
    config: AbliterationConfig | dict | None = None,
    progress: Progress | None = None,
    **settings: Any,
) -> AbliterationResult:
    """Find an ``Abliterate`` edit that removes refusals at the least KL (module docstring).

    Args:
        model: a ``HookedLlama`` with a chat template (left unedited).
        harmful, harmless: prompts for the directions (anything ``analyses.refusal.load_prompts`` takes).
        eval_harmful, eval_harmless: held-out prompts the trials are scored and confirmed on (default:
            the last third of ``harmful`` / ``harmless``, the rest giving the directions).
        config: an ``AbliterationConfig`` (or a dict of settings); ``**settings`` override single settings
            (``trials=12``, ``whiten=None`` …): every setting, its default and meaning is declared once in
            ``surgery.abliteration.config``. An unknown name is a one-line ``InputError``.
        progress: ``progress(stage, total) -> update(advance=1, status=None)`` (module docstring).

    Returns:
        ``AbliterationResult``: trials, Pareto front, the chosen edit and its plan, before/after refusals.

    Example::

        res = abliterate(model, load_prompts("harmful:train"), load_prompts("harmless:train"),
                         eval_harmful=load_prompts("harmful:eval"), eval_harmless=load_prompts("harmless:eval"),
                         trials=24)
        res.after.count, res.kl; surgery.export(model, "out/smol-abliterated", edits=res.plan)
    """
    cfg = AbliterationConfig.build(config, **settings)
    search = AbliterationSearch(
        model, harmful, harmless, cfg, eval_harmful=eval_harmful, eval_harmless=eval_harmless, progress=progress
    )
    return search.run()
