"""The search space of ``abliterate``: the parameter box, the ``Abliterate`` edit of a parameter set, the
anchor trials, the samplers (Optuna's TPE or a scrambled Sobol sequence), the closing line search along the
strength, and the Pareto front with its bisection.

The box is heretic's: a fractional ``direction_index`` in ``[0.4, 0.9]·(L−1)`` and, for attention
(``o_proj``) and MLP (``down_proj``) separately, a peaked profile with ``max_weight`` in ``[0.8, 1.5]``,
``peak`` in ``[0.6, 1.0]·(L−1)``, ``min_weight`` a fraction ``[0, 1]`` of ``max_weight`` and ``width`` in
``[1, 0.6·(L−1)]``. With more than one contrast, ``contrast`` is one more (categorical) parameter.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hooks import InputError

from ..edits import Abliterate, peaked_weights

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


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (both coordinates minimised), sorted by the second (KL)."""
    front = [
        i
        for i, (a, b) in enumerate(points)
        if not any((a2 <= a and b2 <= b) and (a2 < a or b2 < b) for a2, b2 in points)
    ]
    return sorted(front, key=lambda i: (points[i][1], points[i][0]))


def bisect_front(n: int, count, target: int, budget: int) -> int:
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


def propose(
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
