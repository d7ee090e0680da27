"""Verified export: an edited ``HookedLlama`` as a plain Hugging Face directory of its own class
(``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``) or a GGUF file,
read back by plain transformers and checked against the in-memory model before it is moved into place.

The stages (``stages``: validate → state → write → compare → seal → commit) are shared by the two formats
(``hf.HFExport``, ``gguf.GGUFExport``); the tensors stream one at a time from wherever the weights live
(``tensors``); the probes (``probes``) and the manifest (``manifest``) are built from the stages' results;
``verify`` re-checks a directory later. Every byte goes through the one staged writer (``_core.writer``):
a private temporary beside the target, moved into place exclusively, replacing only an unchanged output of
llama-scalpel (``overwrite=True``); a failure leaves the target as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from _core.writer import MANIFEST, OLD_PREFIX, TMP_PREFIX

from .gguf import GGUFExport
from .hf import HFExport
from .probes import PROBE_PROMPTS, probe_inputs, probe_logits
from .stages import ExportResult, GGUFResult, parse_size
from .tensors import export_config, export_state, read_tensor
from .verify import verify

if TYPE_CHECKING:
    from hooks import HookedLlama

__all__ = [
    "MANIFEST",
    "OLD_PREFIX",
    "PROBE_PROMPTS",
    "TMP_PREFIX",
    "ExportResult",
    "GGUFResult",
    "export",
    "export_config",
    "export_gguf",
    "export_state",
    "parse_size",
    "probe_inputs",
    "probe_logits",
    "read_tensor",
    "verify",
]


def export(
    model: HookedLlama,
    out_dir,
    *,
    edits=None,
    overwrite: bool = False,
    max_shard_size="2GB",
    probe_prompts: Sequence[str] | None = None,
    base_sha256: str | None = None,
    base_logits: Sequence[torch.Tensor] | None = None,
    provenance: dict | None = None,
) -> ExportResult:
    """Write ``model`` (with ``edits`` applied) as a verified Hugging Face checkpoint in ``out_dir``.

    ``edits``: an ``EditPlan``, a list of edits/records, one edit, or a plan file; applied to ``model`` for
    the export only (the model is restored after). A model that already carries applied edits (its
    ``edit_history``, e.g. inside ``with plan.applied(model):``) is exported as it is, those records first
    in the manifest; inside an ``applied()`` context the unedited logits and hash are taken from the state
    that context restores, else they are unknown unless ``base_logits`` (one ``[P, V]`` tensor per probe) is
    given.

    Writes safetensors shards (``max_shard_size``), config.json, generation_config.json, tokenizer files,
    ``scalpel_probe_logits.safetensors`` and ``scalpel_manifest.json``, streaming each tensor from wherever
    it lives (CPU, GPU, accelerate offload); then checks every shard's bytes on disk against the live
    tensors' (sha256) and the logits of a plain-transformers reload (modules read from the shards one at a
    time) against the in-memory edited model (≤ 1e-4 in fp32) before moving it into place. Refuses an
    existing ``out_dir`` unless ``overwrite=True`` (and it is an unchanged export of llama-scalpel or
    empty). ``provenance`` (a JSON-ready dict, e.g. a search's settings and prompt hashes) is stored in the
    manifest as is.

    Example::

        res = surgery.export(model, "out/smol-edited", edits=[surgery.ZeroHeads(3, [1])])
        res.max_abs_logit_diff, res.kl_to_base
    """
    return HFExport(
        model,
        out_dir,
        edits=edits,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        probe_prompts=probe_prompts,
        base_sha256=base_sha256,
        base_logits=base_logits,
        provenance=provenance,
    ).run()


def export_gguf(
    model: HookedLlama,
    path,
    *,
    edits=None,
    dtype: str = "f32",
    overwrite: bool = False,
    probe_prompts: Sequence[str] | None = None,
) -> GGUFResult:
    """Write ``model`` (with ``edits`` applied, restored after) as a GGUF file for llama.cpp / ollama,
    then read it back (every tensor by hash, and transformers' GGUF loader for the probes' logits).

    ``dtype``: ``"f32"`` or ``"f16"`` (2-D weights; norms stay f32). The comparison is against the
    in-memory model with the same rounding applied (≤ 1e-4); the diff to the unrounded model is
    reported too. Llama and Mistral are written as GGUF ``llama``, Qwen2 as ``qwen2`` (with its q/k/v
    biases), Qwen3 as ``qwen3``. GGUF carries no other biases: exactly-zero biases are dropped, an edit
    that needs a non-zero bias (MeanAblateHeads, AddSteering) is refused — export those as a HF checkpoint.
    """
    return GGUFExport(model, path, edits=edits, dtype=dtype, overwrite=overwrite, probe_prompts=probe_prompts).run()
