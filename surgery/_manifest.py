"""The export manifest: its self-hash and the checks ``verify`` runs on it before touching a weight.

Version 2 manifests carry ``manifest_sha256``: the sha256 of the manifest's canonical JSON (every key
but that one, keys sorted, no spaces, UTF-8). Any change to the manifest itself — its edit list, probe
records, file hashes, tolerance — changes that hash. Version 1 manifests (without it) still verify,
with a note saying what cannot be checked.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from _core.readers import CONFIG_LIMIT, parse_data, read_bytes, register_loader
from _core.writer import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, SELF_HASH, canonical_sha256, seal

from .errors import IntegrityError

__all__ = ["MANIFEST_VERSION", "SELF_HASH", "PROBE_LOGITS", "canonical_sha256", "seal", "read_manifest", "first_line"]

PROBE_LOGITS = "scalpel_probe_logits.safetensors"
DTYPES = ("float32", "bfloat16", "float16")
V1_NOTE = (
    f"manifest version 1 holds no hash of itself, so a change to its edit list or probe records "
    f"cannot be detected; re-export to get a version {MANIFEST_VERSION} manifest"
)
_SHA = re.compile(r"^[0-9a-f]{64}$")


def read_manifest(out_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The manifest of an export, checked: (manifest, note or None). Raises ``IntegrityError``, one line."""
    mfile = out_dir / MANIFEST
    if not out_dir.is_dir():
        raise IntegrityError(f"{out_dir} is not a directory; pass the directory surgery.export wrote")
    if not mfile.is_file():
        raise IntegrityError(f"{out_dir} has no {MANIFEST}; it was not written by surgery.export")
    where = f"{out_dir / MANIFEST}"
    fix = "the manifest was modified or corrupted, re-export"
    raw = read_bytes(mfile, what="manifest", error=IntegrityError, limit=CONFIG_LIMIT)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntegrityError(
            f"{where} is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); {fix}"
        ) from None
    manifest = parse_data(text, where, IntegrityError, yaml_format=False, fix=fix)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise IntegrityError(
            f'{where} is not a llama-scalpel manifest (no "format": "{MANIFEST_FORMAT}"); '
            "it was not written by surgery.export"
        )
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise IntegrityError(
            f'{where}: "version" is {version!r}, not a manifest version; the manifest was '
            "modified or corrupted, re-export"
        )
    if version > MANIFEST_VERSION:
        raise IntegrityError(
            f"{where} is manifest version {version}, newer than this llama-scalpel reads "
            f"(up to {MANIFEST_VERSION}); upgrade llama-scalpel to verify it"
        )
    note = None
    if version >= 2:
        want = manifest.get(SELF_HASH)
        if not isinstance(want, str) or not _SHA.match(want):
            raise IntegrityError(
                f"{where} has no valid {SELF_HASH} (version {version} manifests carry one); "
                "the manifest was modified, re-export"
            )
        got = canonical_sha256(manifest)
        if got != want:
            raise IntegrityError(
                f"{MANIFEST}: its contents changed after export (sha256 of its body {got[:12]}…, "
                f"recorded {want[:12]}…): its edit list, probe records or file hashes were "
                "edited; restore the original manifest or re-export"
            )
    else:
        note = V1_NOTE
    _check_fields(manifest, where)
    return manifest, note


def _check_fields(manifest: dict, where: str) -> None:
    """Everything ``verify`` reads has the type it needs, so a malformed manifest is one line."""

    def bad(field: str, what: str) -> IntegrityError:
        return IntegrityError(f"{where}: {field} {what}; the manifest was modified or corrupted, re-export")

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise bad('"files"', "is missing or not a map of file name to sha256")
    for name, sha in files.items():
        if not name or "/" in name or "\\" in name or name in (".", "..") or name == MANIFEST:
            raise bad(f"file name {name!r}", "is not a plain file name of the directory")
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise bad(f"the sha256 of {name}", f"is {sha!r}, not 64 hex digits")
    if PROBE_LOGITS not in files:
        raise bad(f'"files" lacks {PROBE_LOGITS}', "(the logits recorded at export)")
    probes = manifest.get("probes")
    if not isinstance(probes, list) or not probes:
        raise bad('"probes"', "is missing or empty")
    for i, probe in enumerate(probes):
        ids = probe.get("input_ids") if isinstance(probe, dict) else None
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
        ):
            raise bad(f"probes[{i}].input_ids", "is not a non-empty list of token ids")
        top5 = probe.get("top5")
        if not isinstance(top5, list) or not all(isinstance(t, dict) and isinstance(t.get("id"), int) for t in top5):
            raise bad(f"probes[{i}].top5", 'is not a list of {"id": …} records')
    if manifest.get("dtype", "float32") not in DTYPES:
        raise bad('"dtype"', f"is {manifest.get('dtype')!r}, not one of {', '.join(DTYPES)}")
    tol = (
        (manifest.get("verification") or {}).get("tolerance", 1e-4)
        if isinstance(manifest.get("verification", {}), dict)
        else None
    )
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise bad("verification.tolerance", f"is {tol!r}, not a positive number")
    if not isinstance(manifest.get("edits", []), list):
        raise bad('"edits"', "is not a list")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _sample_manifest() -> dict[str, bytes]:
    """A valid version-2 manifest (for the loader registry's fuzz test)."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "files": {PROBE_LOGITS: "0" * 64},
        "probes": [{"input_ids": [1, 2], "top5": [{"id": 1}]}],
        "dtype": "float32",
    }
    return {MANIFEST: json.dumps(seal(manifest)).encode()}


register_loader("export manifest", read_manifest, kind="dir", files=(MANIFEST,), sample=_sample_manifest)
