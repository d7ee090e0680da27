"""llama-scalpel surgery: exact weight edits, edit plans, and verified export.

>>> from hooks import HookedLlama
>>> import surgery
>>> model = HookedLlama.default()
>>> plan = surgery.EditPlan([surgery.ZeroHeads(3, [1]), surgery.RemoveLayers([29])])
>>> result = surgery.export(model, "out/smol-edited", edits=plan)   # model itself is left unedited
>>> surgery.verify("out/smol-edited")["ok"]
True
"""

from .ablation import ablation_plan
from .abliteration import (
    AbliterationConfig,
    AbliterationResult,
    RefinedDirection,
    abliterate,
    refine_direction,
    search_space,
)
from .circuits import NodeCircuit, bake_refusals, circuit_edits, export_circuit, node_circuit
from .control_vector import ControlVector, check_control_vector, load_control_vector
from .edits import (
    ALL_EDITS,
    Abliterate,
    AddSteering,
    Edit,
    MeanAblateHeads,
    MergeLora,
    Orthogonalize,
    RankOneEdit,
    RemoveLayers,
    ScaleHeads,
    ScaleNeurons,
    ZeroHeads,
    ZeroKVGroups,
    ZeroNeurons,
    key_covariance,
    kinds,
    mean_activations,
    peaked_weights,
)
from .errors import AdapterError, EditError, ExportError, ExportWriteError, IntegrityError, ParityError, PlanError
from .export import ExportResult, GGUFResult, export, export_gguf, verify
from .llamacpp import QUANT_TYPES, QuantizeResult, quantize_gguf
from .plan import EditPlan, apply_plan, as_plan, load_plan, save_plan

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
    "ablation_plan",
    "circuit_edits",
    "export_circuit",
    "node_circuit",
    "bake_refusals",
    "NodeCircuit",
    "load_plan",
    "save_plan",
    "apply_plan",
    "as_plan",
    "mean_activations",
    "key_covariance",
    "abliterate",
    "AbliterationConfig",
    "AbliterationResult",
    "search_space",
    "refine_direction",
    "RefinedDirection",
    "export",
    "export_gguf",
    "verify",
    "ExportResult",
    "GGUFResult",
    "quantize_gguf",
    "QuantizeResult",
    "QUANT_TYPES",
    "ControlVector",
    "load_control_vector",
    "check_control_vector",
    "EditError",
    "PlanError",
    "AdapterError",
    "ExportError",
    "ExportWriteError",
    "IntegrityError",
    "ParityError",
]
