"""``verify``: re-check an exported directory later (the manifest, every file's hash, then the logits of a
plain-transformers reload against those recorded at export)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from _core.writer import MANIFEST, sha256_file
from hooks.errors import ScalpelError

from .._manifest import PROBE_LOGITS, first_line, read_manifest
from ..errors import IntegrityError, ParityError
from .hf import reload_logits
from .probes import FP32_TOLERANCE, Probe, max_diff, tolerance


def verify(out_dir, *, reload: bool = True, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Re-check an exported directory: the manifest's own hash (version 2: any change to its edit list,
    probe records or file hashes), every file's sha256 against the manifest, no file the manifest does
    not list (each an ``IntegrityError`` naming what changed), then reload with plain transformers and
    compare the probe logits with those recorded at export (``ParityError`` past the recorded tolerance).

    Returns ``{"ok": True, "manifest_version", "note", "files_checked", "unlisted_files",
    "max_abs_logit_diff", "tolerance", "top5_match"}``; ``note`` says what a version 1 manifest cannot
    vouch for.
    """
    if isinstance(out_dir, bytes) or not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
        raise IntegrityError(
            f"verify takes the directory surgery.export wrote (a str or pathlib.Path), got {out_dir!r:.40}"
        )
    out_dir = Path(out_dir).expanduser()
    manifest, note = read_manifest(out_dir)
    files: dict[str, str] = manifest["files"]
    for name, want in files.items():
        path = out_dir / name
        if not path.is_file():
            raise IntegrityError(f"{name} is missing from {out_dir} (listed in {MANIFEST}); restore it or re-export")
        try:
            got = sha256_file(path)
        except OSError as exc:
            raise IntegrityError(f"cannot read {path} ({exc.strerror or exc}); fix its permissions") from None
        if got != want:
            raise IntegrityError(
                f"{name}: sha256 mismatch (manifest {want[:12]}…, file {got[:12]}…); the file was modified or corrupted"
            )
    unlisted = sorted(p.name for p in out_dir.iterdir() if p.name not in files and p.name != MANIFEST)
    if unlisted:
        raise IntegrityError(
            f"{unlisted[0]} is in {out_dir} but not in its {MANIFEST}"
            f"{f' (and {len(unlisted) - 1} more)' if len(unlisted) > 1 else ''}; "
            "it was added after export, remove it or re-export"
        )
    result: dict[str, Any] = {
        "ok": True,
        "out_dir": str(out_dir),
        "manifest_version": manifest["version"],
        "note": note,
        "files_checked": len(files),
        "unlisted_files": [],
    }
    if not reload:
        return result
    recorded = getattr(torch, manifest.get("dtype", "float32"))
    dtype = recorded if dtype is None else dtype
    probes = [Probe(p.get("text"), torch.tensor([p["input_ids"]], dtype=torch.long)) for p in manifest["probes"]]
    expected = _recorded_logits(out_dir, probes, manifest)
    try:
        got = reload_logits(out_dir, dtype, probes)
    except ScalpelError:
        raise
    except Exception as exc:  # the files match their hashes, so this is the environment: say so in one line
        raise ParityError(
            f"{out_dir}: transformers could not reload and run it ({first_line(exc)}); check the "
            'transformers version (the manifest\'s "libraries" lists the one that wrote it)'
        ) from exc
    diff = max_diff(got, expected)
    tol = float(manifest.get("verification", {}).get("tolerance", FP32_TOLERANCE))
    if dtype != recorded:
        tol = max(tol, tolerance(dtype, expected))
    top5 = all(g[-1].topk(5).indices.tolist() == [t["id"] for t in p["top5"]] for g, p in zip(got, manifest["probes"]))
    if not diff <= tol:
        raise ParityError(
            f"{out_dir}: reloaded logits differ from those recorded at export by {diff:.3g} (tolerance {tol:.1g})"
        )
    result.update(max_abs_logit_diff=diff, tolerance=tol, top5_match=top5)
    return result


def _recorded_logits(out_dir: Path, probes: list[Probe], manifest: dict) -> list[torch.Tensor]:
    """The probe logits stored at export, one [positions, vocab] tensor per manifest probe."""
    from safetensors.torch import load_file

    try:
        stored = load_file(str(out_dir / PROBE_LOGITS))
    except Exception as exc:  # noqa: BLE001 - hashed, so only a foreign writer gets here
        raise IntegrityError(f"{PROBE_LOGITS} in {out_dir} cannot be read ({first_line(exc)}); re-export") from None
    vocab = None
    out = []
    for i, p in enumerate(probes):
        t = stored.get(f"probe_{i}")
        if t is None or t.dim() != 2 or t.shape[0] != p.ids.shape[1] or (vocab is not None and t.shape[1] != vocab):
            shape = None if t is None else tuple(t.shape)
            raise IntegrityError(
                f"{PROBE_LOGITS}: probe_{i} is {shape}, but the manifest's probe {i} has "
                f"{p.ids.shape[1]} tokens; the logits and the manifest do not belong together, "
                "re-export"
            )
        vocab = t.shape[1]
        out.append(t)
    if len(stored) != len(probes):
        raise IntegrityError(
            f"{PROBE_LOGITS} holds {len(stored)} probes but the manifest lists {len(probes)}; "
            "the logits and the manifest do not belong together, re-export"
        )
    return out
