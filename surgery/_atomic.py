"""Filesystem safety for exports: stale temporary directories, file modes, fsync, and turning
operating-system failures (read-only directory, disk full) into one-line ``ExportWriteError``s."""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Iterator

from .errors import ExportWriteError

TMP_PREFIX = ".scalpel-tmp-"
OLD_PREFIX = ".scalpel-old-"


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
    pattern = re.compile(rf"^\.?(?:{re.escape(TMP_PREFIX)}|{re.escape(OLD_PREFIX)}){re.escape(name)}-(\d+)-[0-9a-f]+"
                         r"(?:\.gguf)?(?:\..+\.tmp)?$")
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
            text = (f"cannot write in {where}: permission denied (read-only directory or file system); "
                    "pick an out_dir in a writable directory or fix its permissions")
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
    from transformers.utils import logging as tlog

    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

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

