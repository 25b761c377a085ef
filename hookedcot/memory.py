"""Keep freed activation memory inside the process, so repeated forwards do not page-fault it in.

glibc hands a large freed block back to the OS as soon as the top of the heap holds more than
its trim threshold (by default twice the largest block it recently mapped). A `run_with_cache`
of every hook allocates gigabytes and frees them all when the cache goes, so the next call
faults every page in again: measured on SmolLM2 at 8 × 128 tokens, about 49k minor faults and
1.3–1.4 × the plain forward's time. With the thresholds fixed, the memory stays in the heap and
is reused: 0 faults and about the plain forward's time. TransformerLens loses the same way on every forward (design §5).

The setting is process-wide and made once, when the first model is built. Opt out with
HOOKEDCOT_RETAIN_FREED_MEMORY=0 (the process then returns freed memory to the OS at once, at
the cost of the faults). Outside glibc (macOS, musl) this does nothing.
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
    """Fix glibc's trim and mmap thresholds once per process; True when they are in force."""
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
