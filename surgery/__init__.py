"""llama-scalpel surgery: exact weight edits, edit plans, and verified export.

>>> from hooks import HookedLlama
>>> import surgery
>>> model = HookedLlama.default()
>>> plan = surgery.EditPlan([surgery.ZeroHeads(3, [1]), surgery.RemoveLayers([29])])
>>> result = surgery.export(model, "out/smol-edited", edits=plan)   # model itself is left unedited
>>> surgery.verify("out/smol-edited")["ok"]
True
"""

from .edits import (
    ALL_EDITS,
    AddSteering,
    Edit,
    MeanAblateHeads,
    Orthogonalize,
    RankOneEdit,
    RemoveLayers,
    ScaleHeads,
    ScaleNeurons,
    ZeroHeads,
    ZeroKVGroups,
    ZeroNeurons,
    kinds,
)
from .abliteration import Abliterate, peaked_weights
from .errors import AdapterError, EditError, ExportError, ExportWriteError, IntegrityError, ParityError, PlanError
from .export import ExportResult, GGUFResult, export, export_gguf, verify
from .lora import MergeLora
from .refine import RefinedDirection, refine_direction
from .refusal_search import abliterate, search_space
from .plan import EditPlan, apply_plan, as_plan, load_plan, save_plan
from .stats import key_covariance, mean_activations

__all__ = [
    "Edit",
    "ZeroHeads",
    "ZeroKVGroups",
    "MeanAblateHeads",
    "ScaleHeads",
    "ZeroNeurons",
    "ScaleNeurons",
    "RemoveLayers",
    "Orthogonalize",
    "AddSteering",
    "RankOneEdit",
    "MergeLora",
    "Abliterate",
    "peaked_weights",
    "ALL_EDITS",
    "kinds",
    "EditPlan",
    "load_plan",
    "save_plan",
    "apply_plan",
    "as_plan",
    "mean_activations",
    "key_covariance",
    "abliterate",
    "search_space",
    "refine_direction",
    "RefinedDirection",
    "export",
    "export_gguf",
    "verify",
    "ExportResult",
    "GGUFResult",
    "EditError",
    "PlanError",
    "AdapterError",
    "ExportError",
    "ExportWriteError",
    "IntegrityError",
    "ParityError",
]
