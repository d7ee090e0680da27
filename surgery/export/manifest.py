"""The export manifest, built from the stages' results: ``ExportManifest`` (a dataclass) becomes the body of
``scalpel_manifest.json``; ``_core.writer`` adds ``format``, ``version``, ``kind``, ``written_by``, the files'
sha256 and the manifest's own hash when it seals the directory. ``surgery._manifest`` reads it back."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
from dataclasses import dataclass
from typing import Any

import torch

from .probes import Probe, kl_last, top5


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "safetensors", "gguf", "peft"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        out["llama-scalpel"] = md.version("llama-scalpel")
    except md.PackageNotFoundError:
        out["llama-scalpel"] = "dev"
    return out


def config_changes(before: dict, after: dict) -> dict[str, list]:
    """``{field: [before, after]}`` for the config fields the edits changed."""
    ignore = {"transformers_version", "_name_or_path", "quantization_config", "dtype", "torch_dtype", "architectures"}
    keys = sorted((set(before) | set(after)) - ignore)
    return {k: [before.get(k), after.get(k)] for k in keys if before.get(k) != after.get(k)}


def layer_map(history: list[dict], n_original: int) -> list[int] | None:
    """Original layer index of each exported layer, when layers were removed (None otherwise)."""
    layers = list(range(n_original))
    removed = False
    for record in history:
        if record.get("edit") == "RemoveLayers":
            gone = set(record["layers"])
            layers = [orig for i, orig in enumerate(layers) if i not in gone]
            removed = True
    return layers if removed else None


def probe_records(
    probes: list[Probe], edited: list[torch.Tensor], base: list[torch.Tensor] | None, tokenizer
) -> list[dict]:
    return [
        {
            "text": p.text,
            "input_ids": p.ids[0].tolist(),
            "top5": top5(e, tokenizer),
            "base_top5": top5(b, tokenizer) if b is not None else None,
            "kl_to_base": kl_last(b, e) if b is not None else None,
        }
        for p, e, b in zip(probes, edited, base or [None] * len(probes))
    ]


@dataclass
class ExportManifest:
    """The manifest's body (docs/surgery.md, "Export"), in the order it is written."""

    base: dict[str, Any]  # source, sha256, sha256_of
    edits: list[dict]  # every edit record, earlier ones included
    edits_applied_before_export: int
    config_changes: dict[str, list]
    layer_map: list[int] | None
    provenance: dict | None
    dtype: str
    libraries: dict[str, str]
    probes: list[dict]
    kl_to_base: float | None
    verification: dict[str, Any]
    created: str = dataclasses.field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        out = {"created": self.created}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "created"})
        return out
