"""Exact weight edits of a ``HookedLlama``, one module per family; ``base`` is the leaf they all build on.

- ``base``: ``Edit`` (contract, registry of kinds, records, the finiteness guarantee), shared checks,
  ``attn`` / ``mlp`` accessors, hook builders;
- ``stats``: statistics edits are built from (mean head outputs, key covariances);
- ``heads``: ``ZeroHeads``, ``ScaleHeads``, ``ZeroKVGroups``, ``MeanAblateHeads``;
- ``neurons``: ``ZeroNeurons``, ``ScaleNeurons``;
- ``layers``: ``RemoveLayers``;
- ``directions``: ``Orthogonalize``;
- ``steering``: ``AddSteering``;
- ``rank_one``: ``RankOneEdit``;
- ``lora``: ``MergeLora``;
- ``abliteration``: ``Abliterate`` (weighted, norm-preserving direction removal) and ``peaked_weights``.

The exported checkpoint of any edit is a plain directory of the model's own class (``LlamaForCausalLM``,
``Qwen2ForCausalLM`` …): an edit that needs a bias turns on ``attention_bias`` / ``mlp_bias`` and adds
zero biases everywhere else the flag applies; a family whose class has no such flag refuses the edit.
"""

from .abliteration import Abliterate, peaked_weights
from .base import EDIT_KINDS, Edit, HookList, attn, kinds, mlp
from .directions import Orthogonalize
from .heads import MeanAblateHeads, ScaleHeads, ZeroHeads, ZeroKVGroups
from .layers import RemoveLayers
from .lora import MergeLora
from .neurons import ScaleNeurons, ZeroNeurons
from .rank_one import RankOneEdit
from .stats import key_covariance, mean_activations
from .steering import AddSteering

ALL_EDITS = (
    ZeroHeads,
    ZeroKVGroups,
    MeanAblateHeads,
    ScaleHeads,
    ZeroNeurons,
    ScaleNeurons,
    RemoveLayers,
    Orthogonalize,
    AddSteering,
    RankOneEdit,
    MergeLora,
    Abliterate,
)

__all__ = [
    "ALL_EDITS",
    "EDIT_KINDS",
    "Abliterate",
    "AddSteering",
    "Edit",
    "HookList",
    "MeanAblateHeads",
    "MergeLora",
    "Orthogonalize",
    "RankOneEdit",
    "RemoveLayers",
    "ScaleHeads",
    "ScaleNeurons",
    "ZeroHeads",
    "ZeroKVGroups",
    "ZeroNeurons",
    "attn",
    "key_covariance",
    "kinds",
    "mean_activations",
    "mlp",
    "peaked_weights",
]
