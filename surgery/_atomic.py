"""Filesystem safety for exports: what an overwrite may replace, exclusive moves into place, cleanup
that a second signal cannot interrupt, stale temporary directories, file modes, fsync, and turning
operating-system failures (read-only directory, disk full) into one-line ``ExportWriteError``s.

Overwrite rule: an existing target is replaced only when it is a previous export of llama-scalpel
(a directory whose ``scalpel_manifest.json`` has ``format: llama-scalpel-manifest`` and holds only the
files that manifest lists; a GGUF file whose metadata has ``llama_scalpel.exported_by``) or is empty
(an empty directory, an empty file). Anything else is refused before any work.

Exclusive moves: the finished temporary directory/file is renamed onto the target with
``renameat2(RENAME_NOREPLACE)`` (Linux), falling back to ``os.link`` + unlink for files and to a
rename that can replace at most an empty directory; a target that appeared meanwhile (another export
to the same path) is never replaced."""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import json
import os
import re
import secrets
import shutil
import signal
import threading
import warnings
from pathlib import Path
from typing import Iterator

from .errors import ExportWriteError

TMP_PREFIX = ".scalpel-tmp-"
OLD_PREFIX = ".scalpel-old-"
MANIFEST = "scalpel_manifest.json"
MANIFEST_FORMAT = "llama-scalpel-manifest"
GGUF_MARK = "llama_scalpel.exported_by"  # GGUF metadata key that says the file is an export of ours
GGUF_MARK_VALUE = "llama-scalpel"


# --------------------------------------------------------------------------- what an overwrite may replace
def _listed_files(directory: Path) -> set[str] | None:
    """The files a llama-scalpel manifest in ``directory`` lists, or None when there is no such manifest."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    files = manifest.get("files")
    return set(files) if isinstance(files, dict) else None


def gguf_is_ours(path: Path) -> bool:
    """Whether ``path`` is a GGUF file whose metadata says llama-scalpel wrote it."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get(GGUF_MARK)
        return field is not None and bytes(field.parts[field.data[0]]).decode() == GGUF_MARK_VALUE
    except Exception:
        return False


def replace_refusal(path: Path, shown: str, *, gguf: bool = False) -> str | None:
    """Why an overwrite may not replace the existing ``path`` (None: it may). ``shown`` names it."""
    what = "path" if gguf else "out_dir"
    if path.is_symlink():
        return f"{shown} is a symbolic link; overwriting never replaces links, pick another {what}"
    if gguf:
        if path.is_dir():
            return f"{shown} exists and is a directory, not a .gguf file; pick another path"
        if path.stat().st_size == 0 or gguf_is_ours(path):
            return None
        return (
            f"{shown} is not a GGUF file written by llama-scalpel (no {GGUF_MARK} metadata); overwriting "
            "replaces only a previous export or an empty file, pick another path"
        )
    if not path.is_dir():
        return f"{shown} exists and is not a directory; remove it or pick another out_dir"
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return None
    listed = _listed_files(path)
    if listed is None:
        return (
            f"{shown} is not an export of llama-scalpel (it holds {entries[0]!r} and no valid {MANIFEST}); "
            "overwriting replaces only a previous export or an empty directory, pick another out_dir"
        )
    extra = [e for e in entries if e not in listed and e != MANIFEST]
    if extra:
        return (
            f"{shown} holds {extra[0]!r}, which its {MANIFEST} does not list; overwriting would delete it, "
            "move it out or pick another out_dir"
        )
    return None


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


def move_into_place(tmp: Path, target: Path, shown: str, *, overwrite: bool, gguf: bool = False) -> None:
    """Move the finished ``tmp`` onto ``target``. With ``overwrite`` a target that is (still) replaceable
    is moved aside first and removed after; a target that appeared meanwhile is never replaced."""
    from .errors import ExportError

    old = None
    if overwrite and os.path.lexists(target):
        problem = replace_refusal(target, shown, gguf=gguf)  # again: it may have changed since the start
        if problem:
            raise ExportError(f"{problem}; nothing was written")
        old = target.parent / f"{OLD_PREFIX}{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, old)
    try:
        move_exclusive(tmp, target)
    except FileExistsError:
        if old is not None:
            with contextlib.suppress(OSError):
                move_exclusive(old, target)
        raise ExportError(
            f"{shown} appeared while this export ran (another export to the same place?); it was "
            "left as it is and nothing was written; pick another path"
        ) from None
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                move_exclusive(old, target)
        raise
    with contextlib.suppress(OSError):
        _fsync(target.parent)
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


def _clean_stale(parent: Path, name: str) -> list[str]:
    """Remove ``.scalpel-tmp-<name>-<pid>-*`` / ``.scalpel-old-…`` left by processes that are gone."""
    removed = []
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
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def _new_file_mode() -> int:
    """0666 less the process umask (what ``open`` would give a new file)."""
    try:
        with open("/proc/self/status") as status:  # Linux: read without touching the umask
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an I/O failure
_DENIED = (_errno.EACCES, _errno.EPERM, _errno.EROFS)
_NO_SPACE = (_errno.ENOSPC, _errno.EDQUOT)


def _human_size(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def _existing_parent(path: Path) -> Path:
    """The directory an export of ``path`` writes into: its parent, or the nearest one that exists."""
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


@contextlib.contextmanager
def _writing(out_dir: Path, needed: int = 0) -> Iterator[None]:
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
        where = _existing_parent(out_dir)
        if code in _DENIED:
            text = (
                f"cannot write in {where}: permission denied (read-only directory or file system); "
                "pick an out_dir in a writable directory or fix its permissions"
            )
        elif code in _NO_SPACE:
            size = f" (the checkpoint needs about {_human_size(needed)})" if needed else ""
            text = f"no space left on the device of {where}{size}; free some space or pick an out_dir on another disk"
        else:
            reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
            text = f"cannot write the checkpoint to {out_dir}: {reason}"
        err = ExportWriteError(f"{text}; nothing was written")
        err.errno = code
        raise err from exc


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading logs and progress bars (restored after)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as tlog

    bar = tlog.is_progress_bar_enabled()
    level = tlog.get_verbosity()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)  # the GGUF loader draws its own bar
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()
