"""The one way llama-scalpel writes: exports, GGUF files, plans, reports, CSV/JSON files, SAEs,
training checkpoints and activation caches all go through ``write_file`` or ``write_dir``.

1. **Validate the whole call first** (``check_outputs``): every output of one call, implied ones
   included (``DIR.plan.yaml`` beside ``DIR``), against the others (the same path, one inside another)
   and against the call's inputs; each existing target against the overwrite rule; each place for
   being writable. One-line ``OutputError`` (``param=`` the argument at fault) before any work.
2. **Stage** into a private temporary with a unique name beside the target
   (``.scalpel-tmp-<name>-<pid>-<random>``); a SIGKILL can leave it, and the next write to the same
   target removes stale ones whose process is gone.
3. **Verify**: a directory's manifest is sealed (what wrote it, every file's sha256, the manifest's own
   hash), then the caller's checks run on the staged copy.
4. **Move into place exclusively** (``renameat2(RENAME_NOREPLACE)``): a target that appeared meanwhile is
   never replaced. With ``overwrite=True`` an existing target is moved aside, the new one moved in, and
   the old one removed, and only when the overwrite rule still allows it at that moment.

**Overwrite rule** (``writable``): an existing target is replaced only when ``overwrite=True`` and it is
empty (an empty directory or file), or llama-scalpel wrote it and it is unchanged since:

- a directory whose ``scalpel_manifest.json`` is ours (``format: llama-scalpel-manifest``, its own hash
  intact when it has one), whose listed files all have the sha256 it records, and which holds no file
  it does not list;
- a text file carrying our self-checking marker as its last line (HTML reports:
  ``<!-- llama-scalpel report sha256:… -->``; YAML plans: ``# llama-scalpel plan sha256:…``), the hash of
  everything above it matching;
- any other file (CSV, JSON, safetensors, checkpoints) whose sha256 matches the record kept for its path
  under ``$SCALPEL_CACHE/written/`` (formats that cannot carry a marker);
- a GGUF file whose metadata holds ``llama_scalpel.exported_by`` (and, when a record exists, matches it).

A path the caller did not name is never touched; a symbolic link is never replaced. Cleanup of a failed
write runs with SIGINT/SIGTERM held, so a second signal cannot leave half a temporary behind.
Filesystem failures become one-line ``ExportWriteError`` naming the place and the fix (read-only,
disk full).

Example::

    check_outputs([Output("abl", kind="export"), Output("abl.plan.yaml", kind="plan")], inputs=["prompts.txt"])
    write_file("report.html", html_text, kind="report", overwrite=True)
    with write_dir("acts", kind="activations") as stage:
        save_file(tensors, str(stage.path / "shard_00000.safetensors"))
        stage.meta["key"] = cache_key(model=model_sha, texts=texts)
    stage.result.files        # {"shard_00000.safetensors": "…sha256…"}
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno as _errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .errors import ExportWriteError, OutputError, arg
from .readers import CONFIG_LIMIT, human_size, read_json_object

TMP_PREFIX = ".scalpel-tmp-"
OLD_PREFIX = ".scalpel-old-"
MANIFEST = "scalpel_manifest.json"
MANIFEST_FORMAT = "llama-scalpel-manifest"
MANIFEST_VERSION = 2
SELF_HASH = "manifest_sha256"
GGUF_MARK = "llama_scalpel.exported_by"  # GGUF metadata key that says the file is an export of ours
GGUF_MARK_VALUE = "llama-scalpel"
WRITTEN_BY = "llama-scalpel"

# kind -> (is a directory, what messages call it)
KINDS: dict[str, tuple[bool, str]] = {
    "export": (True, "checkpoint"),
    "sae": (True, "SAE"),
    "activations": (True, "activation cache"),
    "dir": (True, "directory"),
    "gguf": (False, "GGUF file"),
    "plan": (False, "plan"),
    "report": (False, "report"),
    "csv": (False, "CSV file"),
    "json": (False, "JSON file"),
    "checkpoint": (False, "training checkpoint"),
    "file": (False, "file"),
}
_MARKED = {".html": ("<!--", "-->"), ".htm": ("<!--", "-->"), ".yaml": ("#", ""), ".yml": ("#", "")}
_MARKER = re.compile(rb"^(?:<!--|#) llama-scalpel ([\w-]+) sha256:([0-9a-f]{64})(?: -->)?\r?\n?$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def register_kind(kind: str, *, directory: bool, noun: str | None = None) -> None:
    """Declare another kind of output (``directory``: written with ``write_dir``)."""
    KINDS[kind] = (directory, noun or kind)


def _kind(kind: str) -> tuple[bool, str]:
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; known: {', '.join(KINDS)} (or register_kind)")
    return KINDS[kind]


@dataclass(frozen=True)
class Output:
    """One output of a call: where, what kind (``export``, ``sae``, ``activations``, ``gguf``, ``plan``,
    ``report``, ``csv``, ``json``, ``checkpoint`` …), whether an existing one may be replaced, the argument
    that named it (``param``, for errors) and how messages show it (``shown``, default the path)."""

    path: str | os.PathLike
    kind: str = "file"
    overwrite: bool = False
    param: str = "path"
    shown: str | None = None

    @property
    def name(self) -> str:
        return self.shown if self.shown is not None else str(self.path)


@dataclass
class WriteResult:
    """What ``write_dir`` wrote: the final path, every file's sha256 and the sealed manifest."""

    path: Path
    files: dict[str, str]
    manifest: dict[str, Any]


# --------------------------------------------------------------------------- hashes and manifests
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every regular file under ``root`` but the manifest."""
    out = {}
    for p in sorted(_walk(root)):
        rel = p.relative_to(root).as_posix()
        if rel != MANIFEST:
            out[rel] = sha256_file(p)
    return out


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            yield Path(dirpath) / name


def canonical_sha256(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (keys sorted, no spaces, UTF-8), without its own hash."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(manifest: dict) -> dict:
    """Add ``manifest_sha256`` (last, so the file reads as before)."""
    manifest.pop(SELF_HASH, None)
    manifest[SELF_HASH] = canonical_sha256(manifest)
    return manifest


def library_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("llama-scalpel")
    except md.PackageNotFoundError:  # pragma: no cover - running from a checkout without install
        return "unknown"


def fingerprint(value: Any) -> Any:
    """A JSON-ready stand-in for ``value`` in a cache key: tensors and arrays by their dtype, shape and
    bytes' sha256, paths as text, mappings and sequences element by element."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v) for v in value]
    if hasattr(value, "detach") and hasattr(value, "dtype"):  # a torch tensor
        return {"tensor": tensor_sha256(value), "dtype": str(value.dtype), "shape": list(value.shape)}
    if hasattr(value, "tobytes") and hasattr(value, "dtype"):  # a numpy array
        return {"array": hashlib.sha256(value.tobytes()).hexdigest(), "dtype": str(value.dtype)}
    return repr(value)


def tensor_sha256(tensor, h=None) -> str:
    """sha256 of a tensor's raw bytes (moved to the CPU one tensor at a time), or update ``h`` with them."""
    import torch

    h = hashlib.sha256() if h is None else h
    t = tensor.detach()
    if t.device.type == "meta":
        h.update(f"meta{tuple(t.shape)}{t.dtype}".encode())
    elif t.numel():
        t = t.to("cpu").contiguous()
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # the tensor's own bytes, not a copy
    return h.hexdigest()


def tensors_sha256(named) -> str:
    """One sha256 over named tensors (a state dict, or ``(name, tensor)`` pairs) in name order: each
    tensor's name, dtype, shape and raw bytes."""
    items = named.items() if isinstance(named, dict) else named
    h = hashlib.sha256()
    for name, t in sorted(items, key=lambda kv: kv[0]):
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|".encode())
        tensor_sha256(t, h)
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    """The key of a cache made from ``parts`` (model hash, hook names, texts, settings …): sha256 of their
    canonical JSON (tensors by their bytes). A cache is reused only when its key matches (``cached``)."""
    text = json.dumps(fingerprint(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def our_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of a directory llama-scalpel wrote and that is unchanged since (every listed file's
    sha256 matches, no unlisted file), or None."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    manifest = _read_manifest(path)
    if manifest is None or _dir_changes(path, manifest) is not None:
        return None
    return manifest


def cached(path: str | os.PathLike, key: str) -> bool:
    """Whether ``path`` is a complete, unchanged output of ours whose manifest records ``key``."""
    manifest = our_manifest(path)
    return manifest is not None and manifest.get("key") == key


# --------------------------------------------------------------------------- the overwrite rule
def writable(
    path: str | os.PathLike, *, kind: str, overwrite: bool, shown: str | None = None, param: str | None = None
) -> str | None:
    """Why ``path`` may not be written (None: it may): it exists and ``overwrite`` is False, or it is not
    an unchanged output of llama-scalpel (see the module docstring). Cheap when the path does not exist."""
    found = _refusal(Path(path).expanduser(), kind, overwrite, shown or str(path), param or _default_param(kind))
    return None if found is None else found[0]


def _default_param(kind: str) -> str:
    return "out_dir" if kind == "export" else "path"


def _refusal(target: Path, kind: str, overwrite: bool, shown: str, param: str) -> tuple[str, str] | None:
    """(reason, param) when ``target`` may not be written, else None."""
    directory, noun = _kind(kind)
    if not os.path.lexists(target):
        return None
    if not overwrite:
        return f"{shown} already exists; pass {arg('overwrite', True)} to replace it", "overwrite"
    if target.is_symlink():
        return f"{shown} is a symbolic link; overwriting never replaces links, pick another {param}", param
    if kind == "gguf":
        why = _gguf_refusal(target, shown, param)
    elif directory:
        why = _dir_refusal(target, shown, param, kind)
    else:
        why = _file_refusal(target, shown, param, noun)
    return None if why is None else (why, param)


def _dir_refusal(path: Path, shown: str, param: str, kind: str) -> str | None:
    if not path.is_dir():
        return f"{shown} exists and is not a directory; remove it or pick another {param}"
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return None
    what = "an export" if kind == "export" else "an output"
    manifest = _read_manifest(path)
    if manifest is None:
        return (
            f"{shown} is not {what} of llama-scalpel (it holds {entries[0]!r} and no valid {MANIFEST}); "
            f"overwriting replaces only a previous {what[3:]} or an empty directory, pick another {param}"
        )
    change = _dir_changes(path, manifest)
    if change is None:
        return None
    name, how = change
    if how == "unlisted":
        return (
            f"{shown} holds {name!r}, which its {MANIFEST} does not list; overwriting would delete it, "
            f"move it out or pick another {param}"
        )
    if how == "manifest":
        return (
            f"{shown}: its {MANIFEST} was changed after llama-scalpel wrote it; overwriting replaces only an "
            f"unchanged output, move it out or pick another {param}"
        )
    return (
        f"{shown} holds {name!r}, changed since llama-scalpel wrote it (its sha256 is not the one "
        f"{MANIFEST} records); overwriting would lose the change, move it out or pick another {param}"
    )


def _read_manifest(path: Path) -> dict | None:
    """Our manifest in the directory ``path`` (format, file map, own hash when present), or None."""
    try:
        manifest = read_json_object(path / MANIFEST, limit=CONFIG_LIMIT)
    except Exception:  # noqa: BLE001 - unreadable, not JSON, too big: not a manifest of ours
        return None
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        return None
    if not all(isinstance(k, str) and _plain(k) and isinstance(v, str) for k, v in files.items()):
        return None
    return manifest


def _plain(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


_VERIFIED: dict[str, tuple] = {}  # realpath -> the (name, size, mtime) listing a full hash check passed on
_RECORD_OK: dict[str, tuple] = {}  # realpath -> (sha256, size, mtime, inode) of a file whose record matched


def _listing(path: Path) -> tuple:
    out = []
    for p in _walk(path):
        st = p.lstat()
        out.append((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns, stat.S_IFMT(st.st_mode)))
    return tuple(sorted(out))


def _dir_changes(path: Path, manifest: dict) -> tuple[str, str] | None:
    """The first change since the manifest was sealed: (name, "unlisted" | "changed" | "manifest"), or None."""
    want = manifest.get(SELF_HASH)
    if want is not None and want != canonical_sha256(manifest):
        return MANIFEST, "manifest"
    listed: dict[str, str] = manifest["files"]
    real = os.path.realpath(path)
    listing = _listing(path)
    for rel, _, _, mode in listing:
        if rel != MANIFEST and (rel not in listed or mode != stat.S_IFREG):
            return rel, "unlisted"
    if _VERIFIED.get(real) == listing:
        return None
    for rel, sha in listed.items():
        file = path / rel
        if file.is_file() and sha256_file(file) != sha:
            return rel, "changed"
    _VERIFIED[real] = listing
    return None


def _file_refusal(path: Path, shown: str, param: str, noun: str) -> str | None:
    if path.is_dir():
        return f"{shown} exists and is a directory, not a {noun}; pick another {param}"
    if not path.is_file():
        return f"{shown} exists and is not a regular file; pick another {param}"
    if path.stat().st_size == 0 or _marker_ok(path) or _record_ok(path):
        return None
    return (
        f"{shown} was not written by llama-scalpel, or was changed since; overwriting replaces only an "
        f"unchanged file llama-scalpel wrote or an empty file, move it out or pick another {param}"
    )


def gguf_is_ours(path: Path) -> bool:
    """Whether ``path`` is a GGUF file whose metadata says llama-scalpel wrote it."""
    try:
        from gguf import GGUFReader

        field_ = GGUFReader(str(path)).fields.get(GGUF_MARK)
        return field_ is not None and bytes(field_.parts[field_.data[0]]).decode() == GGUF_MARK_VALUE
    except Exception:  # noqa: BLE001 - not a readable GGUF: not ours
        return False


def _gguf_refusal(path: Path, shown: str, param: str) -> str | None:
    if path.is_dir():
        return f"{shown} exists and is a directory, not a .gguf file; pick another {param}"
    if path.stat().st_size == 0:
        return None
    if not gguf_is_ours(path):
        return (
            f"{shown} is not a GGUF file written by llama-scalpel (no {GGUF_MARK} metadata); overwriting "
            f"replaces only a previous export or an empty file, pick another {param}"
        )
    if _record(path) is not None and not _record_ok(path):
        return (
            f"{shown} was changed since llama-scalpel wrote it (its sha256 is not the one recorded); "
            f"overwriting would lose the change, move it out or pick another {param}"
        )
    return None


# --------------------------------------------------------------------------- markers and records
def _marker_ok(path: Path) -> bool:
    """The file's last line is our marker and the sha256 of everything above it matches."""
    if path.suffix.lower() not in _MARKED:
        return False
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 200))
        tail = f.read()
    cut = tail.rstrip(b"\n").rfind(b"\n")
    if cut < 0 and size > 200:
        return False
    m = _MARKER.match(tail[cut + 1 :])
    if m is None:
        return False
    body_len = size - (len(tail) - (cut + 1))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = body_len
        while left > 0 and (block := f.read(min(1 << 22, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest() == m.group(2).decode()


def _add_marker(path: Path, kind: str, suffix: str) -> bool:
    """Append the self-checking marker line where the format (by the target's ``suffix``) carries one;
    whether it did."""
    open_, close = _MARKED.get(suffix.lower(), (None, None))
    if open_ is None:
        return False
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.flush()
    digest = sha256_file(path)
    line = f"{open_} llama-scalpel {kind} sha256:{digest}{' ' + close if close else ''}\n"
    with open(path, "ab") as f:
        f.write(line.encode())
    return True


def cache_root() -> Path:
    """``$SCALPEL_CACHE`` (default ``~/.cache/llama-scalpel``)."""
    return Path(os.environ.get("SCALPEL_CACHE") or Path.home() / ".cache" / "llama-scalpel")


def _record_file(path: Path) -> Path:
    real = os.path.realpath(path)
    return (
        cache_root() / "written" / (hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:40] + ".json")
    )


def _record(path: Path) -> dict | None:
    try:
        data = read_json_object(_record_file(path), limit=1 << 16)
    except Exception:  # noqa: BLE001 - no record, or a damaged one: nothing proven
        return None
    return data if data.get("path") == os.path.realpath(path) and _SHA.match(str(data.get("sha256"))) else None


def _record_ok(path: Path) -> bool:
    rec = _record(path)
    if rec is None:
        return False
    st = path.stat()
    if rec.get("size") != st.st_size:
        return False
    real = os.path.realpath(path)
    seen = (rec["sha256"], st.st_size, st.st_mtime_ns, st.st_ino)
    if _RECORD_OK.get(real) == seen:
        return True
    ok = sha256_file(path) == rec["sha256"]
    if ok:
        _RECORD_OK[real] = seen
    return ok


def record(path: str | os.PathLike, kind: str, digest: str | None = None) -> None:
    """Record under ``$SCALPEL_CACHE/written/`` that llama-scalpel wrote exactly these bytes at ``path``
    (what makes a file without a marker replaceable later). A cache that cannot be written is a warning."""
    path = Path(path)
    try:
        digest = digest or sha256_file(path)
        file = _record_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "path": os.path.realpath(path),
            "sha256": digest,
            "size": path.stat().st_size,
            "kind": kind,
            "written_by": f"{WRITTEN_BY} {library_version()}",
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = file.with_name(f"{TMP_PREFIX}{file.name}-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, file)  # our own record store: the newest record of a path wins
    except OSError as exc:
        warnings.warn(
            f"could not record that llama-scalpel wrote {path} ({exc}); it will not be replaceable with "
            "overwrite=True later; set SCALPEL_CACHE to a writable directory",
            stacklevel=3,
        )


# --------------------------------------------------------------------------- validating a whole call
def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _inside(inner: str, outer: str) -> bool:
    return inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_outputs(outputs: Sequence[Output | None], inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Validate every output of one call before any work (see the module docstring); one-line
    ``OutputError`` naming the argument at fault. ``None`` entries (an output not asked for) are skipped."""
    outs = [o for o in outputs if o is not None and o.path is not None]
    for o in outs:
        _kind(o.kind)
        if isinstance(o.path, bytes) or not isinstance(o.path, (str, os.PathLike)):
            raise OutputError(
                f"{o.param} must be a path (str or pathlib.Path), got {type(o.path).__name__}", param=o.param
            )
        if not os.fspath(o.path).strip():
            raise OutputError(f"{arg(o.param)} is empty; name the file or directory to write", param=o.param)
    reals = [(o, _real(o.path)) for o in outs]
    for i, (o, real) in enumerate(reals):
        for other, other_real in reals[:i]:
            if real == other_real:
                raise OutputError(
                    f"{o.name} and {other.name} name the same path; give each output its own", param=o.param
                )
            if _inside(real, other_real) or _inside(other_real, real):
                inner, outer = (o, other) if _inside(real, other_real) else (other, o)
                raise OutputError(f"{inner.name} is inside {outer.name}; write it elsewhere", param=inner.param)
    ins = [(p, _real(p)) for p in inputs if p is not None and os.fspath(p).strip()]
    for o, real in reals:
        for given, in_real in ins:
            if real == in_real:
                raise OutputError(
                    f"{o.name} is also an input of this call ({given}); writing it would replace what is read, "
                    f"pick another {o.param}",
                    param=o.param,
                )
            if _inside(in_real, real):
                raise OutputError(
                    f"{o.name} holds the input {given}; replacing it would delete that input, pick another {o.param}",
                    param=o.param,
                )
            if _inside(real, in_real):
                raise OutputError(f"{o.name} is inside the input {given}; write it elsewhere", param=o.param)
    for o in outs:
        target = Path(os.path.expanduser(os.fspath(o.path)))
        found = _refusal(target, o.kind, o.overwrite, o.name, o.param)
        if found is not None:
            raise OutputError(found[0], param=found[1])
        _probe(target, o)


def _existing_parent(path: Path) -> Path:
    """The nearest existing directory (or other entry) above ``path``."""
    where = path.parent
    while not os.path.lexists(where) and where != where.parent:
        where = where.parent
    return where


def _probe(target: Path, o: Output) -> None:
    """The directory the output will be written into lets us create entries (probed with an empty
    directory, created and removed at once)."""
    where = _existing_parent(target)
    try:
        os.rmdir(_mkdtemp(where, ".scalpel-probe-"))
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        err = OutputError(
            f"{o.name}: cannot write in {where} ({reason}); pick a writable location or fix the directory's "
            "permissions",
            param=o.param,
        )
        err.errno = exc.errno  # as an ExportWriteError carries it
        raise err from None


def _mkdtemp(parent: Path, prefix: str) -> Path:
    for _ in range(100):
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(_errno.EEXIST, "no unique temporary name", str(parent))


# --------------------------------------------------------------------------- writing
def _target(path, param: str) -> Path:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise OutputError(f"{param} must be a path (str or pathlib.Path), got {type(path).__name__}", param=param)
    if not os.fspath(path).strip():
        raise OutputError(f"{arg(param)} is empty; name the file or directory to write", param=param)
    return Path(os.path.expanduser(os.fspath(path)))


def _make_parents(parent: Path) -> list[Path]:
    """Create the missing directories above a target; the ones created, outermost first."""
    missing = []
    where = parent
    while not os.path.lexists(where) and where != where.parent:
        missing.append(where)
        where = where.parent
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        created.append(d)
    return created


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(d)  # only if still empty


def _stage_bytes(tmp: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``tmp`` (created exclusively) and flush it to disk."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _Staging:
    """One staged write: the validated target, the temporary beside it (``tmp``, not yet created), and on
    any failure the temporary and the directories created for it removed (with signals held)."""

    def __init__(self, path, kind: str, overwrite: bool, param: str, shown, *, directory: bool, needed: int) -> None:
        self.target = _target(path, param)
        if _kind(kind)[0] != directory:
            raise ValueError(f"{kind!r} outputs are {'files' if directory else 'directories'}; use the other writer")
        self.out = Output(self.target, kind, overwrite, param, shown if shown is not None else str(path))
        check_outputs([self.out])
        self.absolute = Path(os.path.abspath(self.target))
        self.needed, self.created = needed, []
        self.tmp: Path | None = None

    def writing(self):
        """Filesystem failures inside as one-line ``ExportWriteError``s."""
        return writing(self.target, self.needed, kind=self.out.kind, param=self.out.param, shown=self.out.name)

    def __enter__(self) -> "_Staging":
        try:
            with self.writing():
                self.created = _make_parents(self.absolute.parent)
                clean_stale(self.absolute.parent, self.absolute.name)
        except BaseException:
            _remove_created(self.created)
            raise
        self.tmp = self.absolute.parent / f"{TMP_PREFIX}{self.absolute.name}-{os.getpid()}-{secrets.token_hex(4)}"
        return self

    def commit(self) -> None:
        """Move the finished temporary into place (exclusively; see ``move_into_place``)."""
        with self.writing():
            move_into_place(
                self.tmp,
                self.absolute,
                self.out.name,
                overwrite=self.out.overwrite,
                kind=self.out.kind,
                param=self.out.param,
            )
        self.tmp = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            with signals_deferred():
                if self.tmp is not None:
                    remove(self.tmp)
                _remove_created(self.created)
        return False


def write_file(
    path: str | os.PathLike,
    data: bytes | str | Callable[[Path], None],
    *,
    kind: str = "file",
    overwrite: bool = False,
    verify: Callable[[Path], str | None] | None = None,
    param: str = "path",
    shown: str | None = None,
) -> Path:
    """Write one file: ``data`` (bytes, text as UTF-8, or a function writing the staged path) is staged
    beside ``path``, marked or recorded as ours, checked by ``verify(staged_path)``, then moved into
    place exclusively (see the module docstring). ``verify`` may return the staged file's sha256 (when its
    check read every byte anyway), so the file is not hashed a second time. Returns ``path``."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    size = len(payload) if isinstance(payload, (bytes, bytearray)) else 0
    with _Staging(path, kind, overwrite, param, shown, directory=False, needed=size) as staging:
        tmp = staging.tmp
        with staging.writing():
            if callable(payload):
                payload(tmp)
                if not tmp.is_file():
                    raise FileNotFoundError(_errno.ENOENT, "the writer function wrote no file", str(tmp))
            else:
                _stage_bytes(tmp, bytes(payload))
            marked = _add_marker(tmp, kind, staging.absolute.suffix)
            os.chmod(tmp, new_file_mode())
            fsync(tmp)
        checked = verify(tmp) if verify is not None else None  # may return the file's sha256 it just read
        digest = checked if isinstance(checked, str) else sha256_file(tmp)
        staging.commit()
    target, absolute = staging.target, staging.absolute
    if not marked:
        record(absolute, kind, digest)
        with contextlib.suppress(OSError):  # just hashed: a later overwrite check need not hash it again
            st = absolute.stat()
            _RECORD_OK[os.path.realpath(absolute)] = (digest, st.st_size, st.st_mtime_ns, st.st_ino)
    return target


class Stage:
    """The staging directory of one ``write_dir`` call: write files into ``path``; ``meta`` adds fields to
    the manifest; ``verify(fn)`` adds a check ``fn(staged_dir)`` run after the manifest is sealed and
    before the move. ``result`` (a ``WriteResult``) is set once the directory is in place."""

    def __init__(self, path: Path, target: Path, kind: str) -> None:
        self.path, self.target, self.kind = path, target, kind
        self.meta: dict[str, Any] = {}
        self.result: WriteResult | None = None
        self._checks: list[Callable[[Path], None]] = []

    def verify(self, check: Callable[[Path], None]) -> None:
        self._checks.append(check)

    def file(self, name: str) -> Path:
        """The staged path of the file ``name`` (a relative path; its directories are created)."""
        if not _plain(name):
            raise ValueError(f"{name!r} is not a relative file name inside the directory")
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_bytes(self, name: str, data: bytes) -> Path:
        path = self.file(name)
        _stage_bytes(path, data)
        return path

    def write_text(self, name: str, text: str) -> Path:
        """``text`` as UTF-8 in the file ``name``."""
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=1, ensure_ascii=False) + "\n")

    def save_tensors(self, name: str, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
        """A safetensors file of ``tensors`` (contiguous CPU copies are made where needed)."""
        from safetensors.torch import save_file

        path = self.file(name)
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return path

    def save_pretrained(self, obj) -> None:
        """``obj.save_pretrained`` into the stage (a transformers config, tokenizer or generation config)."""
        obj.save_pretrained(self.path)


@contextlib.contextmanager
def write_dir(
    path: str | os.PathLike,
    *,
    kind: str = "dir",
    overwrite: bool = False,
    param: str = "path",
    shown: str | None = None,
    needed: int = 0,
) -> Iterator[Stage]:
    """Write one directory (see the module docstring): yields a ``Stage`` whose ``path`` the body fills;
    on a clean exit the manifest (``scalpel_manifest.json``: kind, what wrote it, ``stage.meta``, every
    file's sha256, its own hash) is sealed, the checks run, and the stage moves into place. Any failure
    removes the stage and leaves the target as it was. ``needed``: bytes expected (for a full disk's message)."""
    with _Staging(path, kind, overwrite, param, shown, directory=True, needed=needed) as staging:
        tmp = staging.tmp
        stage = Stage(tmp, staging.target, kind)
        with staging.writing():
            tmp.mkdir()
            yield stage
            files = sha256_tree(tmp)
            manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": kind}
            manifest["written_by"] = f"{WRITTEN_BY} {library_version()}"
            manifest.update({k: v for k, v in stage.meta.items() if k not in ("format", "files", SELF_HASH)})
            manifest["files"] = files
            seal(manifest)
            text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
            _stage_bytes(tmp / MANIFEST, text.encode("utf-8"))
            mode = new_file_mode()
            for p in _walk(tmp):
                if p.is_file() and not p.is_symlink():
                    os.chmod(p, mode)  # some writers create 0600 files; outputs are readable as usual
                    fsync(p)
            fsync(tmp)
        for check in stage._checks:
            check(tmp)
        staging.commit()
    _VERIFIED[os.path.realpath(staging.absolute)] = _listing(staging.absolute)  # just written: not hashed again
    stage.result = WriteResult(staging.target, files, manifest)


# --------------------------------------------------------------------------- exclusive moves
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2():
    """libc's ``renameat2`` (Linux, glibc ≥ 2.28), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def move_exclusive(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` when ``dst`` exists (it is never replaced)."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == _errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(dst))
        if code not in (_errno.ENOSYS, _errno.EINVAL, _errno.ENOTSUP, _errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    # fallback where renameat2 is missing or the file system does not support it
    if os.path.lexists(dst):
        raise FileExistsError(_errno.EEXIST, os.strerror(_errno.EEXIST), str(dst))
    if not src.is_dir():
        try:
            os.link(src, dst)  # atomic: fails with EEXIST when dst appeared
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system: the plain rename below
            pass
        else:
            os.unlink(src)
            return
    try:
        os.rename(src, dst)  # a directory replaces at most an empty directory that appeared meanwhile
    except OSError as exc:
        if exc.errno in (_errno.ENOTEMPTY, _errno.EEXIST, _errno.ENOTDIR, _errno.EISDIR):
            raise FileExistsError(_errno.EEXIST, os.strerror(_errno.EEXIST), str(dst)) from None
        raise


def move_into_place(
    tmp: Path,
    target: Path,
    shown: str,
    *,
    overwrite: bool,
    kind: str = "export",
    param: str | None = None,
    refusal: Callable[[Path], str | None] | None = None,
) -> None:
    """Move the finished ``tmp`` onto ``target``. With ``overwrite`` a target that is (still) replaceable
    is moved aside first and removed after; a target that appeared meanwhile is never replaced.
    ``refusal(target)``: the caller's own overwrite rule, in place of ``writable`` (reason or None)."""
    param = param or _default_param(kind)
    old = None
    if overwrite and os.path.lexists(target):
        # again: it may have changed since the start
        why = (
            refusal(target)
            if refusal is not None
            else writable(target, kind=kind, overwrite=True, shown=shown, param=param)
        )
        if why is not None:
            raise OutputError(f"{why}; nothing was written", param=param)
        old = target.parent / f"{OLD_PREFIX}{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, old)
    try:
        move_exclusive(tmp, target)
    except FileExistsError:
        if old is not None:
            with contextlib.suppress(OSError):
                move_exclusive(old, target)
        what = "export" if kind in ("export", "gguf") else "write"
        raise OutputError(
            f"{shown} appeared while this {what} ran (another {what} to the same place?); it was "
            "left as it is and nothing was written; pick another path",
            param=param,
        ) from None
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                move_exclusive(old, target)
        raise
    with contextlib.suppress(OSError):
        fsync(target.parent)
    if old is not None:
        remove(old)


# --------------------------------------------------------------------------- cleanup a signal cannot cut short
@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM arriving inside are held and delivered (to the handlers in place before) on exit,
    so a second Ctrl-C or SIGTERM cannot stop a cleanup half-way. Main thread only (elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            saved[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
        except (ValueError, OSError):  # pragma: no cover - not the main interpreter
            pass
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(held):
            previous = saved.get(sig)
            if callable(previous):
                previous(sig, None)
            elif previous != signal.SIG_IGN:
                os.kill(os.getpid(), sig)


def remove(path: Path) -> None:
    """Remove a file or directory tree of ours, with SIGINT/SIGTERM held until it is gone."""
    with signals_deferred():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def clean_stale(parent: Path, name: str) -> list[str]:
    """Remove ``.scalpel-tmp-<name>-<pid>-*`` / ``.scalpel-old-…`` left by processes that are gone."""
    removed: list[str] = []
    # ours, and the GGUF writer's own temp file inside a temp name of ours (".<our name>.<random>.tmp")
    pattern = re.compile(
        rf"^\.?(?:{re.escape(TMP_PREFIX)}|{re.escape(OLD_PREFIX)}){re.escape(name)}-(\d+)-[0-9a-f]+"
        r"(?:\.gguf)?(?:\..+\.tmp)?$"
    )
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            remove(entry)
            removed.append(entry.name)
    return removed


def new_file_mode() -> int:
    """0666 less the process umask (what ``open`` would give a new file)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # Linux: read without touching the umask
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- operating-system failures
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an I/O failure
_DENIED = (_errno.EACCES, _errno.EPERM, _errno.EROFS)
_NO_SPACE = (_errno.ENOSPC, _errno.EDQUOT)


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


@contextlib.contextmanager
def writing(
    target: str | os.PathLike,
    needed: int = 0,
    *,
    kind: str = "export",
    param: str | None = None,
    shown: str | None = None,
) -> Iterator[None]:
    """A filesystem failure inside becomes one ``ExportWriteError`` naming the directory and the fix
    (the caller removes what was written)."""
    try:
        yield
    except ExportWriteError:
        raise
    except Exception as exc:
        if isinstance(exc, OSError):
            code = exc.errno
        else:
            m = _OS_ERROR.search(str(exc))
            if type(exc).__name__ != "SafetensorError" or m is None:
                raise
            code = int(m.group(1))
        param = param or _default_param(kind)
        noun = _kind(kind)[1]
        where = _existing_parent(Path(target))
        if code in _DENIED:
            text = (
                f"cannot write in {where}: permission denied (read-only directory or file system); "
                f"pick {_a(param)} in a writable directory or fix its permissions"
            )
        elif code in _NO_SPACE:
            size = f" (the {noun} needs about {human_size(needed)})" if needed else ""
            text = f"no space left on the device of {where}{size}; free some space or pick {_a(param)} on another disk"
        else:
            reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
            text = f"cannot write the {noun} to {shown or target}: {reason}"
        err = ExportWriteError(f"{text}; nothing was written", param=param)
        err.errno = code
        raise err from exc
