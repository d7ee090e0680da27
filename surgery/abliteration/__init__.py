"""Refusal removal as one configured capability: ``surgery.abliterate``.

- ``config``: ``AbliterationConfig``, every setting declared once (type, default, description), shared by
  the API (``abliterate(model, …, config=…, **overrides)``), ``scalpel abliterate``'s flags and the
  result's provenance;
- ``space``: the parameter box, anchors, samplers, line search, Pareto front;
- ``refine``: ``refine_direction``, the gradient refinement of an edit's direction;
- ``search``: ``AbliterationSearch``, the search in named stages (setup → trials → refinement →
  confirmation → result), and ``abliterate``;
- ``result``: ``AbliterationResult``.

The edit itself (``Abliterate``) is an ordinary edit (``surgery.edits.abliteration``); the scorers
(``RefusalScorer``, ``FirstTokenKL``) and the directions are analyses (``analyses.refusal``).
"""

from .config import REFINE_STEPS, WHITEN, AbliterationConfig, settings
from .refine import RefinedDirection, refine_direction
from .result import AbliterationResult
from .search import AbliterationSearch, SearchNotice, abliterate, behaviour_split
from .space import search_space, startup_trials

__all__ = [
    "REFINE_STEPS",
    "WHITEN",
    "AbliterationConfig",
    "AbliterationResult",
    "AbliterationSearch",
    "RefinedDirection",
    "SearchNotice",
    "abliterate",
    "behaviour_split",
    "refine_direction",
    "search_space",
    "settings",
    "startup_trials",
]
