"""``keep_freed_memory()``: let glibc keep freed memory for reuse, from inside a running Python.

Caching many activations on a CPU costs little arithmetic; what it costs is fresh pages. glibc's
malloc hands large freed blocks back to the operating system (``munmap`` above its mmap threshold,
``trim`` at the top of the heap), so the next cache faults every page in again, zeroed by the kernel.
Setting ``M_MMAP_THRESHOLD`` to glibc's maximum (32 MiB) and turning trimming off makes
it keep those blocks and reuse them: the same effect as starting Python with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1099511627776``, but callable in a notebook
that is already running. The process's resident size then stays at its high-water mark.

The library never calls it by itself: it changes the whole process's allocator. On anything but
glibc (macOS, musl, Windows) it does nothing and returns ``False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD_NEVER = -1  # mallopt(3): -1 turns trimming off
DEFAULT_THRESHOLD = 128 << 10


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory(enable: bool = True) -> bool:
    """Make glibc keep freed memory for reuse (``enable=False``: back to returning it early).

    Returns True when glibc took both settings, False where there is no glibc (nothing changed).
    ``enable=False`` sets glibc's documented defaults (128 KiB for both thresholds); glibc's dynamic
    mmap threshold stays off after any explicit setting.

    Example::

        import hooks
        hooks.keep_freed_memory()        # then run_with_cache in a loop: no fresh pages per cache
    """
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    mmap, trim = (MMAP_THRESHOLD_MAX, TRIM_THRESHOLD_NEVER) if enable else (DEFAULT_THRESHOLD, DEFAULT_THRESHOLD)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))
