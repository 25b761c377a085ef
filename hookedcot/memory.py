"""An opt-in allocator setting: keep freed activation memory in the process.

glibc hands a large freed block back to the OS once the top of the heap exceeds its trim
threshold, so a process that repeatedly builds and drops a big activation cache page-faults the
same memory in again on every call. Fixing the thresholds keeps that memory in the heap for
reuse. The setting is process-wide and cannot be undone, so hookedcot never applies it by itself:
call `hookedcot.retain_freed_memory()` (the CLI and the benchmarks do). The environment variable
HOOKEDCOT_RETAIN_FREED_MEMORY=0 turns the call into a no-op. Outside glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit; blocks above it are always mapped afresh.
_MMAP_THRESHOLD = 32 * 2**20
_NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Keep freed memory in this process so repeated large caches reuse it instead of faulting it
    back in (process-wide, for good). Returns True when the setting is in force."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("HOOKEDCOT_RETAIN_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
