"""``abliterate``: search the ``Abliterate`` parameters that remove refusals at the least KL.

The search space is heretic's: a fractional ``direction_index`` in ``[0.4, 0.9]·(L−1)`` and, for
attention (``o_proj``) and MLP (``down_proj``) separately, a peaked profile with ``max_weight`` in
``[0.8, 1.5]``, ``peak`` in ``[0.6, 1.0]·(L−1)``, ``min_weight`` a fraction ``[0, 1]`` of ``max_weight``
and ``width`` in ``[1, 0.6·(L−1)]``; rows keep their norms (``norm_preserve=True``).

The direction has two sources, and with ``contrast="auto"`` the search treats the choice as one more
parameter (``contrast``):

- ``"sets"``: harmful-set mean minus harmless-set mean (heretic's);
- ``"behaviour"``: the mean over the harmful training prompts the unedited model *refuses* minus the
  mean over the training prompts it *answers*, harmful and harmless alike (each classified by
  ``classify_tokens`` greedy tokens and the marker scorer). Harmless prompts it declines are left out
  of both means: on SmolLM2-135M they are capability disclaimers ("as a text-based AI I can't wash your
  car"), neither the refusals to remove nor compliance. A model whose refusals do not follow the harm
  of the request has a refusal direction that the set means miss; this one finds it.

Both are **whitened** by default (``whiten``, a shrunk linear discriminant): the mean difference is
multiplied by ``(S + λ·tr(S)/d·I)⁻¹``, ``S`` the covariance of the prompts the edit should leave alone
(the harmless set; for "behaviour", every answered or harmless training prompt) at the same position.
Projecting out a direction along which those prompts hardly vary moves their outputs less. On
SmolLM2-135M (attention-led anchor, 100-token counts on the 32 held-out prompts) the plain direction
removes all but 2 refusals at KL 0.095; whitened at λ = 30 it leaves 2 at KL 0.053 and 5 at 0.040.

Each trial is scored on the held-out prompts by two numbers:

- **refusals**: how many held-out harmful prompts the edited model still refuses in a short greedy
  answer (``proxy_tokens``, 16; heretic's markers). Short answers track the 100-token counts within one
  or two on SmolLM2-135M; a teacher-forced log-probability of the unedited refusals, tried first, did
  not rank edits by the refusals they leave;
- **KL**: KL(base ‖ edited) of the first generated token on the held-out harmless prompts (heretic's
  measure), in float64. The residual stream entering the first edited layer is the unedited one, so
  this pass starts there (``start_at_layer``) from cached residuals.

The search is aimed at ``target_refusals``: the sampler minimises ``max(refusals, target) + KL`` (fewest
refusals down to the target, then the least KL). Its first trials are anchors (``anchors``: for each
contrast a broad edit and an attention-led one), so it sees strong edits before it models the box;
Optuna's TPE (the ``[abliterate]`` extra) proposes the rest, or, without Optuna, a scrambled Sobol
sequence over the same box (seeded, deterministic). The last ``LINE_STEPS`` trials are a line search
along the strength of the best shape found (both max weights times 1.25, 1.25², 1.25³ while it still
refuses more than the target; divided otherwise), since strength is the one parameter whose effect is
monotone and the box's upper bound (heretic's 1.5) is too weak for some directions.
Then the best trial so far is **refined** (``surgery.refine.refine_direction``, ``refine`` gradient
steps on the training prompts): its direction moves to lower the first-token KL on the prompts to keep
while answering the harmful training prompts as the trial's edit does, and the last
``refine_trials(trials)`` trials score the refined direction with the best trial's profile (×1, ×1.25
towards the target, ×1.25 the other way). On SmolLM2-135M the refined edit leaves as many refusals
as its teacher at about 0.3× the KL.
Then the Pareto front of all trials (refusals, KL) is confirmed by generation (greedy,
``max_new_tokens``, marker scorer, the edit baked into the weights as it will be exported): the
lowest-KL point when it already meets ``target_refusals``; else the most aggressive point sets the goal
and bisection along the front finds the lowest-KL point that meets it (``max_confirm`` generations at
most).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from analyses.refusal import (
    DEFAULT_SYSTEM_PROMPT,
    REFUSAL_MARKERS,
    AbliterationResult,
    chat_tokens,
    check_whiten,
    kl_rows,
    load_prompts,
    prompts_sha256,
    refusal_directions,
    refusal_rate,
)
from hooks import InputError

from .abliteration import Abliterate, peaked_weights
from .plan import EditPlan
from .refine import REFINE_STEPS, check_refine, refine_direction

PARAMS = (
    "direction_index",
    "attn.max_weight",
    "attn.peak",
    "attn.min_weight",
    "attn.width",
    "mlp.max_weight",
    "mlp.peak",
    "mlp.min_weight",
    "mlp.width",
)


def search_space(n_layers: int) -> dict[str, tuple[float, float]]:
    """The box every trial is drawn from (heretic's ranges; ``min_weight`` as a fraction of ``max_weight``)."""
    last = n_layers - 1
    comp = {
        "max_weight": (0.8, 1.5),
        "peak": (0.6 * last, 1.0 * last),
        "min_weight": (0.0, 1.0),
        "width": (1.0, max(1.0 + 1e-6, 0.6 * last)),
    }
    out = {"direction_index": (0.4 * last, 0.9 * last)}
    for c in ("attn", "mlp"):
        out.update({f"{c}.{k}": v for k, v in comp.items()})
    return out


CONTRASTS = ("sets", "behaviour")
# The directions' default shrinkage (refusal_directions(whiten=…)): measured on SmolLM2-135M, where 10–100
# all beat the plain difference of means and 30 gave the lowest KL at a given refusal count.
WHITEN = 30.0


def edit_for(
    directions, params: dict, n_layers: int, *, norm_preserve: bool = True, refined: torch.Tensor | None = None
) -> Abliterate:
    """The ``Abliterate`` edit of one parameter set (``directions``: a ``RefusalDirections``, or a dict of
    them by contrast, picked by ``params["contrast"]``; with ``params["refined"]``, the direction is
    ``refined``, the vector ``refine_direction`` gave)."""
    if isinstance(directions, dict):
        directions = directions[params.get("contrast") or next(iter(directions))]
    prof = {
        c: (
            params[f"{c}.max_weight"],
            params[f"{c}.peak"],
            params[f"{c}.min_weight"] * params[f"{c}.max_weight"],
            params[f"{c}.width"],
        )
        for c in ("attn", "mlp")
    }
    if params.get("refined"):
        if refined is None:
            raise InputError("a refined parameter set needs the refined direction (refined=)")
        direction = refined
    else:
        direction = directions.direction(params["direction_index"])
    return Abliterate(
        direction,
        attn_weights=peaked_weights(n_layers, *prof["attn"]),
        mlp_weights=peaked_weights(n_layers, *prof["mlp"]),
        norm_preserve=norm_preserve,
    )


class _Scorer:
    """The two objectives of one trial: refusals in a short greedy answer, and first-token KL from cached
    unedited residual streams."""

    def __init__(self, model, harmful_eval, harmless_eval, markers, system_prompt, proxy_tokens, batch_size):
        self.model, self.harmful_eval, self.markers = model, harmful_eval, markers
        self.system_prompt, self.proxy_tokens, self.batch_size = system_prompt, proxy_tokens, batch_size
        tokens, mask = chat_tokens(model, harmless_eval, system_prompt)
        with torch.no_grad():
            _, cache = model.run_with_cache(
                tokens, attention_mask=mask, names_filter=lambda n: n.endswith("hook_resid_pre")
            )
            self.base_logp = model(tokens, attention_mask=mask)[:, -1].double().log_softmax(-1)
        self.harmless = (mask, [cache[f"blocks.{i}.hook_resid_pre"] for i in range(model.n_layers)])

    def __call__(self, start: int) -> tuple[float, float]:
        m = self.model
        with torch.no_grad():
            mask, resid = self.harmless
            logits = m(resid[start], attention_mask=mask, start_at_layer=start)[:, -1]
            kl = float(kl_rows(self.base_logp, logits).mean())
        count = refusal_rate(
            m,
            self.harmful_eval,
            markers=self.markers,
            max_new_tokens=self.proxy_tokens,
            system_prompt=self.system_prompt,
            batch_size=self.batch_size,
        ).count
        return float(count), kl


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (both coordinates minimised), sorted by the second (KL)."""
    front = [
        i
        for i, (a, b) in enumerate(points)
        if not any((a2 <= a and b2 <= b) and (a2 < a or b2 < b) for a2, b2 in points)
    ]
    return sorted(front, key=lambda i: (points[i][1], points[i][0]))


def _bisect_front(n: int, count, target: int, budget: int) -> int:
    """The front position to take, confirming at most ``budget`` positions (``count(k)``: refusals of the
    k-th front point; positions run from lowest KL to lowest refusal proxy).

    The lowest-KL point is taken when it meets ``target``; otherwise the most aggressive point sets the
    goal (``target``, or its own count when it cannot reach it), and bisection finds the lowest-KL point
    meeting that goal. Returns the confirmed position with the fewest refusals, lowest KL first.
    """
    counts: dict[int, int] = {}

    def get(k: int) -> int:
        if k not in counts:
            counts[k] = count(k)
        return counts[k]

    if get(0) > target and n > 1 and budget > 1:
        goal = max(target, get(n - 1))
        lo, hi = 0, n - 1  # count(lo) > goal >= count(hi)
        if get(0) > goal:
            while hi - lo > 1 and len(counts) < budget:
                mid = (lo + hi) // 2
                if get(mid) <= goal:
                    hi = mid
                else:
                    lo = mid
    return min(counts, key=lambda k: (counts[k], k))


def _anchor_shapes(last: float, space: dict) -> list[dict]:
    """The two anchor shapes (see ``anchors``), before the contrast is added and the box applied."""
    broad = {"direction_index": 0.6 * last}
    for comp in ("attn", "mlp"):
        broad.update(
            {
                f"{comp}.max_weight": 1.0,
                f"{comp}.peak": 0.8 * last,
                f"{comp}.min_weight": 1.0,
                f"{comp}.width": space[f"{comp}.width"][1],
            }
        )
    attn_led = {
        "direction_index": 0.7 * last,
        "attn.max_weight": space["attn.max_weight"][1],
        "attn.peak": 0.8 * last,
        "attn.min_weight": 0.95,
        "attn.width": 0.45 * last,
        "mlp.max_weight": 1.0,
        "mlp.peak": 0.67 * last,
        "mlp.min_weight": 0.9,
        "mlp.width": 0.23 * last,
    }
    return [broad, attn_led]


def anchors(space: dict, n_layers: int, contrasts: Sequence[str] = ("sets",)) -> list[dict]:
    """The first trials of every search, for each contrast (random start-up trials in a 9-parameter box
    rarely draw a strong edit; on SmolLM2-135M only directions from layers ≈ 0.7·(L−1) remove refusals):

    - **broad**: weight 1 on every layer within the widest width of a late peak (0.8·(L−1)), attention
      and MLP alike, direction index 0.6·(L−1);
    - **attention-led**: attention at the box's top weight, nearly flat over the late layers (peak
      0.8·(L−1), width 0.45·(L−1), ends at 0.95 of the peak), the MLP at weight 1 only in a band around
      the direction's layer (peak 0.67·(L−1), width 0.23·(L−1), ends at 0.9); direction index 0.7·(L−1).
      On SmolLM2-135M (plain directions), at direction index 0.7·(L−1), it leaves 1/32 short-answer
      refusals at KL 0.095 where the broad shape leaves 8/32 at 0.109; searches that started from the
      broad anchors alone ended at 0–1/32 short-answer refusals for KL 0.14–0.16.
    """
    out = []
    for c in contrasts:
        for params in _anchor_shapes(n_layers - 1, space):
            out.append(
                {k: min(max(v, space[k][0]), space[k][1]) for k, v in params.items()}
                | ({"contrast": c} if len(contrasts) > 1 else {})
            )
    return out


def startup_trials(trials: int) -> int:
    """Trials before TPE models the box (anchors included): min(10, trials // 3); heretic's default, 60
    of 200, would leave a 24-trial run all random."""
    return max(1, min(10, trials // 3))


def _sample(
    trials: int,
    space: dict,
    seed: int,
    sampler: str,
    contrasts: Sequence[str] = ("sets",),
    n_layers: int | None = None,
    target: int = 0,
):
    names = list(space)
    contrasts = list(contrasts)
    first = anchors(space, n_layers, contrasts)[:trials] if n_layers else []
    if sampler == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            direction="minimize",
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(trials), multivariate=True),
        )
        for params in first:
            study.enqueue_trial(params)
        for _ in range(trials):
            t = study.ask()
            params = {n: t.suggest_float(n, *space[n]) for n in names}
            if len(contrasts) > 1:
                params["contrast"] = t.suggest_categorical("contrast", contrasts)
            value = yield params
            count, kl = value
            study.tell(t, max(count, target) + kl)  # fewest refusals down to the target, then the least KL
        return
    for params in first:
        yield dict(params)
    sob = torch.quasirandom.SobolEngine(len(names) + (len(contrasts) > 1), scramble=True, seed=seed)
    for _ in range(trials - len(first)):
        u = sob.draw(1)[0].double().tolist()
        params = {n: space[n][0] + x * (space[n][1] - space[n][0]) for n, x in zip(names, u)}
        if len(contrasts) > 1:
            params["contrast"] = contrasts[min(int(u[-1] * len(contrasts)), len(contrasts) - 1)]
        yield params


LINE_STEPS, LINE_FACTOR = 3, 1.25  # the strength line search that ends every search of >= 12 trials


def refine_trials(trials: int) -> int:
    """Trials that score the refined direction (the search's last ones): min(LINE_STEPS, trials // 4)."""
    return min(LINE_STEPS, trials // 4)


def _propose(
    trials: int,
    space: dict,
    seed: int,
    sampler: str,
    contrasts: Sequence[str] = ("sets",),
    n_layers: int | None = None,
    target: int = 0,
):
    """Parameter sets to score (send back each one's ``(refusals, kl)``): the sampler's, then a line
    search along the strength of the best shape so far (the one with fewest refusals down to
    ``target``, then least KL): both max weights times ``LINE_FACTOR``**k, k = 1..``LINE_STEPS``, while
    it still refuses more than ``target``, divided by it otherwise (less KL). The scaled weights may
    leave the box: strength is the one parameter whose effect is known to be monotone."""
    n_line = LINE_STEPS if trials >= 4 * LINE_STEPS else 0
    seen: list[tuple[float, float, dict]] = []
    inner = _sample(trials - n_line, space, seed, sampler, contrasts, n_layers, target)
    try:
        params = next(inner)
        while True:
            value = yield params
            seen.append((*value, params))
            params = inner.send(value)
    except StopIteration:
        pass
    if not seen:
        return
    count, _, best = min(seen, key=lambda v: (max(v[0], target), v[1]))
    factor = LINE_FACTOR if count > target else 1 / LINE_FACTOR
    for k in range(1, n_line + 1):
        yield {**best, **{f"{c}.max_weight": best[f"{c}.max_weight"] * factor**k for c in ("attn", "mlp")}}


def behaviour_split(
    model,
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
    rate = refusal_rate(
        model,
        list(harmful) + list(harmless),
        markers=markers,
        max_new_tokens=classify_tokens,
        system_prompt=system_prompt,
        batch_size=batch_size,
    )
    n_bad = len(harmful)
    refused = [p for p, r in zip(rate.prompts[:n_bad], rate.refused[:n_bad]) if r]
    answered = [p for p, r in zip(rate.prompts, rate.refused) if not r]
    return refused, answered, rate


def abliterate(
    model,
    harmful,
    harmless,
    *,
    trials: int = 24,
    seed: int = 0,
    eval_harmful=None,
    eval_harmless=None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    markers: Sequence[str] | None = None,
    max_new_tokens: int = 100,
    positions: Sequence[int] = (-1,),
    project_harmless: bool = True,
    norm_preserve: bool = True,
    target_refusals: int = 0,
    max_confirm: int = 6,
    sampler: str = "auto",
    proxy_tokens: int = 16,
    batch_size: int = 32,
    contrast: str = "auto",
    classify_tokens: int = 24,
    whiten: float | None = WHITEN,
    refine: int = REFINE_STEPS,
    progress: bool = False,
) -> AbliterationResult:
    """Find an ``Abliterate`` edit that removes refusals at the least KL (module docstring).

    Args:
        model: a ``HookedLlama`` with a chat template (left unedited).
        harmful, harmless: prompts for the directions (anything ``analyses.refusal.load_prompts`` takes).
        trials: parameter sets scored (short-answer refusals and first-token KL); seed: the sampler's seed.
        proxy_tokens: greedy tokens per held-out harmful prompt when a trial's refusals are counted.
        eval_harmful, eval_harmless: held-out prompts the trials are scored and confirmed on (default:
            the last third of ``harmful`` / ``harmless``, the rest giving the directions).
        max_new_tokens, markers, system_prompt: the refusal scorer (greedy generation, heretic's markers).
        target_refusals: the refusal count wanted; the lowest-KL front point that meets it (or, when none
            does, the fewest refusals the front reaches) is chosen; max_confirm: at most this many generations.
        sampler: "optuna" (TPE), "sobol", or "auto" (optuna when importable).
        contrast: where the direction comes from: "sets" (harmful − harmless means, as heretic),
            "behaviour" (harmful prompts the unedited model refuses − prompts it answers, harmful and
            harmless; harmless prompts it declines are left out; each classified by ``classify_tokens``
            greedy tokens), or "auto" (both; the search picks; only "sets" when fewer than 2 harmful
            prompts are refused or fewer than 2 prompts answered; ``provenance["contrasts"]``).
        whiten: the directions' shrinkage (``analyses.refusal.refusal_directions``), whitened against the
            prompts the edit should leave alone: the harmless set, and for "behaviour" every answered or
            harmless training prompt. ``None``: plain differences of means. On SmolLM2-135M the default
            (30) removes as many refusals as the plain direction at 0.55–0.6× its harmless KL.
        refine: steps of ``surgery.refine.refine_direction`` (0: none). The best trial after the line
            search is the teacher; its direction is refined on the training prompts (harmful, and the
            covariance set above as the prompts to keep), and the last ``refine_trials(trials)`` trials
            score the refined direction at the teacher's strength ×1, then ×1.25 towards
            ``target_refusals`` (up while it refuses more) and ×1.25 the other way.

    Returns:
        ``AbliterationResult``: trials, Pareto front, the chosen edit and its plan, before/after refusals.

    Example::

        res = abliterate(model, load_prompts("harmful:train"), load_prompts("harmless:train"),
                         eval_harmful=load_prompts("harmful:eval"), eval_harmless=load_prompts("harmless:eval"))
        res.after.count, res.kl; surgery.export(model, "out/smol-abliterated", edits=res.plan)
    """
    t0 = time.perf_counter()
    harmful, harmless = load_prompts(harmful), load_prompts(harmless)
    if eval_harmful is None:
        cut = len(harmful) - max(1, len(harmful) // 3)
        harmful, eval_harmful = harmful[:cut], harmful[cut:]
    if eval_harmless is None:
        cut = len(harmless) - max(1, len(harmless) // 3)
        harmless, eval_harmless = harmless[:cut], harmless[cut:]
    eval_harmful, eval_harmless = load_prompts(eval_harmful), load_prompts(eval_harmless)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise InputError(f"trials must be a positive integer, got {trials!r}")
    if sampler == "auto":
        try:
            import optuna  # noqa: F401

            sampler = "optuna"
        except ImportError:
            sampler = "sobol"
    if sampler not in ("optuna", "sobol"):
        raise InputError(f"sampler must be 'optuna', 'sobol' or 'auto', got {sampler!r}")
    check_whiten(whiten)
    refine = check_refine(refine)
    if contrast not in ("auto", *CONTRASTS):
        raise InputError(f"contrast must be 'auto', 'sets' or 'behaviour', got {contrast!r}")
    for name, value in (("classify_tokens", classify_tokens), ("proxy_tokens", proxy_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    markers = list(REFUSAL_MARKERS if markers is None else markers)
    L = model.n_layers
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=trials, desc="abliterate trials")
    directions, behaviour = {}, None
    if contrast in ("auto", "sets"):
        directions["sets"] = refusal_directions(
            model,
            harmful,
            harmless,
            positions=positions,
            project_harmless=project_harmless,
            whiten=whiten,
            system_prompt=system_prompt,
            batch_size=batch_size,
        )
    if contrast in ("auto", "behaviour"):
        refused, answered, behaviour = behaviour_split(
            model,
            harmful,
            harmless,
            markers=markers,
            classify_tokens=classify_tokens,
            system_prompt=system_prompt,
            batch_size=batch_size,
        )
        if len(refused) >= 2 and len(answered) >= 2:
            keep = None if whiten is None else list(dict.fromkeys(answered + harmless))
            directions["behaviour"] = refusal_directions(
                model,
                refused,
                answered,
                positions=positions,
                project_harmless=project_harmless,
                whiten=whiten,
                keep=keep,
                system_prompt=system_prompt,
                batch_size=batch_size,
            )
        elif contrast == "behaviour":
            raise InputError(
                f"contrast='behaviour' needs at least 2 refused harmful and 2 answered training prompts; "
                f"the model refused {len(refused)} of {len(harmful)} harmful and answered {len(answered)} of "
                f"{behaviour.n}"
            )
    before = refusal_rate(
        model,
        eval_harmful,
        markers=markers,
        max_new_tokens=max_new_tokens,
        system_prompt=system_prompt,
        batch_size=batch_size,
    )
    scorer = _Scorer(model, eval_harmful, eval_harmless, markers, system_prompt, proxy_tokens, batch_size)
    t_setup = time.perf_counter() - t0
    space = search_space(L)
    rows: list[dict] = []
    n_refined = refine_trials(trials) if refine else 0
    refined = None

    def edit_of(params: dict) -> Abliterate:
        return edit_for(
            directions, params, L, norm_preserve=norm_preserve, refined=None if refined is None else refined.direction
        )

    def score(params: dict) -> tuple[float, float]:
        edit = edit_of(params)
        start = min(list(edit.attn_weights) + list(edit.mlp_weights))
        with edit.applied(model):
            proxy, kl = scorer(start)
        rows.append({"trial": len(rows), "params": dict(params), "refusal_proxy": proxy, "kl": kl, "refusals": None})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(proxy=f"{proxy:.2f}", kl=f"{kl:.4f}")
        return proxy, kl

    gen = _propose(trials - n_refined, space, seed, sampler, list(directions), L, target_refusals)
    params = next(gen)
    while True:
        value = score(params)
        try:
            params = gen.send(value)
        except StopIteration:
            break
    t_search = time.perf_counter() - t0 - t_setup
    refine_info = None
    if n_refined:
        teacher = min(range(len(rows)), key=lambda i: (max(rows[i]["refusal_proxy"], target_refusals), rows[i]["kl"]))
        tparams = rows[teacher]["params"]
        use_behaviour = tparams.get("contrast", next(iter(directions))) == "behaviour"
        keep = list(dict.fromkeys(answered + harmless)) if use_behaviour else list(harmless)
        refined = refine_direction(
            model,
            edit_of(tparams),
            harmful,
            keep,
            steps=refine,
            system_prompt=system_prompt,
            batch_size=batch_size,
            progress=progress,
        )
        refine_info = {"teacher_trial": teacher, **refined.to_dict()}
        mults = [1.0]
        while mults:
            m = mults.pop(0)
            proxy, _ = score(
                {
                    **tparams,
                    "refined": True,
                    **{f"{c}.max_weight": tparams[f"{c}.max_weight"] * m for c in ("attn", "mlp")},
                }
            )
            if m == 1.0:  # then a step towards the target, and one the other way (a lower-KL point)
                first = LINE_FACTOR if proxy > target_refusals else 1 / LINE_FACTOR
                mults = [first, 1 / first][: n_refined - 1]
    if bar is not None:
        bar.close()
    t_refine = time.perf_counter() - t0 - t_setup - t_search
    front = _pareto([(r["refusal_proxy"], r["kl"]) for r in rows])
    results: dict[int, object] = {}

    def confirm(i: int) -> int:
        """Generate with trial ``i``'s edit baked into the weights (as it will be exported), count refusals."""
        edit = edit_of(rows[i]["params"])
        with edit.applied(model):
            results[i] = refusal_rate(
                model,
                eval_harmful,
                markers=markers,
                max_new_tokens=max_new_tokens,
                system_prompt=system_prompt,
                batch_size=batch_size,
            )
        rows[i]["refusals"] = results[i].count
        return results[i].count

    chosen = front[_bisect_front(len(front), lambda k: confirm(front[k]), target_refusals, max_confirm)]
    after = results[chosen]
    edit = edit_of(rows[chosen]["params"])
    provenance = {
        "search": "llama-scalpel abliterate",
        "sampler": sampler,
        "seed": seed,
        "trials": trials,
        "chosen_trial": chosen,
        "params": rows[chosen]["params"],
        "norm_preserve": norm_preserve,
        "contrast": rows[chosen]["params"].get("contrast", next(iter(directions))),
        "contrasts": list(directions),
        **(
            {}
            if behaviour is None
            else {
                "behaviour_split": {
                    "refused": len(refused),
                    "answered": len(answered),
                    "declined_harmless": behaviour.count - len(refused),
                    "classify_tokens": classify_tokens,
                }
            }
        ),
        "positions": list(positions),
        "project_harmless": project_harmless,
        "whiten": whiten,
        "refine": {"steps": refine, "trials": n_refined, **(refine_info or {})},
        "system_prompt": system_prompt,
        "max_new_tokens": max_new_tokens,
        "prompts_sha256": {
            "harmful": prompts_sha256(harmful),
            "harmless": prompts_sha256(harmless),
            "eval_harmful": prompts_sha256(eval_harmful),
            "eval_harmless": prompts_sha256(eval_harmless),
        },
        "prompt_counts": {
            "harmful": len(harmful),
            "harmless": len(harmless),
            "eval_harmful": len(eval_harmful),
            "eval_harmless": len(eval_harmless),
        },
    }
    t_total = time.perf_counter() - t0
    return AbliterationResult(
        trials=rows,
        front=front,
        chosen=chosen,
        edit=edit,
        plan=EditPlan([edit]),
        directions=directions[provenance["contrast"]],
        before=before,
        after=after,
        kl=rows[chosen]["kl"],
        provenance=provenance,
        timings={
            "setup_s": t_setup,
            "search_s": t_search,
            "refine_s": t_refine,
            "confirm_s": t_total - t_setup - t_search - t_refine,
            "total_s": t_total,
        },
    )
