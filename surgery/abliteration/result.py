"""What ``surgery.abliterate`` returns: ``AbliterationResult`` (trials, Pareto front, the chosen edit and plan,
refusals before and after, KL, provenance, timings). Its figure is drawn by ``analyses.refusal.search_figure``."""

from __future__ import annotations

from dataclasses import dataclass

from analyses.refusal import RefusalDirections, RefusalRate, search_figure
from analyses.results import AnalysisResult, jsonable

from ..edits import Abliterate
from ..plan import EditPlan


@dataclass
class AbliterationResult(AnalysisResult):
    """What ``surgery.abliterate`` found: every trial, the Pareto front, the chosen edit and plan.

    ``trials``: ``[{"trial", "params", "refusal_proxy", "kl", "refusals"}]`` (``refusal_proxy``: refusals
    in a short greedy answer, ``proxy_tokens`` long; ``refusals``: the confirmed count in
    ``max_new_tokens``, ``None`` where not generated); ``front``: trial indices on the (short-answer
    refusals, KL) Pareto front, lowest KL first; ``chosen``: the trial taken; ``edit`` / ``plan``: its
    ``Abliterate`` edit and a one-edit plan; ``directions``: the refusal directions of the chosen contrast;
    ``before`` / ``after``: ``RefusalRate`` of the unedited and edited model on the held-out harmful
    prompts; ``kl``: first-token KL(base ‖ edited) on the held-out harmless prompts; ``provenance``: the
    settings (``provenance["config"]``, ``AbliterationConfig.to_dict()``), the sampler used, prompt-set
    hashes and counts, the chosen trial and params, the contrasts and the behaviour split (for an export
    manifest; ``params["refined"]`` marks a trial of the refined direction, and ``provenance["refine"]``
    holds the refinement's steps, teacher trial, cosine and KLs); ``timings``: seconds per stage
    (``setup_s``, ``search_s``, ``refine_s``, ``confirm_s``, ``total_s``).
    """

    trials: list[dict]
    front: list[int]
    chosen: int
    edit: Abliterate
    plan: EditPlan
    directions: RefusalDirections
    before: RefusalRate
    after: RefusalRate
    kl: float
    provenance: dict
    timings: dict

    title = "abliteration search"

    def rows(self) -> list[dict]:
        out = []
        for r in self.trials:
            row = {
                "trial": r["trial"],
                "refusal_proxy": r["refusal_proxy"],
                "kl": r["kl"],
                "refusals": r["refusals"],
                "front": r["trial"] in self.front,
                "chosen": r["trial"] == self.chosen,
            }
            row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in r["params"].items()})
            out.append(row)
        return out

    def top_rows(self, n: int = 10) -> list[dict]:
        rows = self.rows()
        return [rows[i] for i in self.front][:n]

    def summary(self) -> dict:
        return {
            "refusals_before": self.before.count,
            "refusals_after": self.after.count,
            "n_eval_harmful": self.after.n,
            "kl": self.kl,
            "chosen_trial": self.chosen,
            "params": self.trials[self.chosen]["params"],
            "front": self.front,
            "timings": self.timings,
            "confirmed": [
                {"trial": r["trial"], "refusals": r["refusals"], "kl": r["kl"]}
                for r in self.trials
                if r["refusals"] is not None
            ],
        }

    def to_dict(self) -> dict:
        return jsonable(
            {
                **self.summary(),
                "trials": self.trials,
                "provenance": self.provenance,
                "before": self.before.to_dict(),
                "after": self.after.to_dict(),
            }
        )

    def figure(self):
        """Every trial's short-answer refusal count against its KL; the Pareto front joined; confirmed counts labelled."""
        return search_figure(self.trials, self.front, self.chosen, self.before, self.after, self.kl)
