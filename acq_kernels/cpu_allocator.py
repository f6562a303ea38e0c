"""Opt-in tuning of glibc's allocator for CPU training and benchmarks.

glibc serves every allocation above its mmap threshold (32 MiB at most by default) with a fresh
mmap and unmaps it on free, so each large activation, gradient or output tensor page-faults on
first touch: on a 2-core machine that costs ~5x the kernel itself (x.clone() of 51 MB: 24 ms;
with freed memory reused: 4 ms). Raising the mmap and trim thresholds keeps freed buffers in the
heap for reuse. It is process-wide, so the library never does it on import: the `acq` CLI and
the benchmark harness call it (all contenders of a benchmark then run under the same allocator).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied: int | None = None


def tune_cpu_allocator(max_reused_bytes: int = 1 << 30) -> bool:
    """Let glibc reuse freed allocations up to `max_reused_bytes` instead of unmapping them.

    Returns True if applied (Linux with glibc), False where it does not apply. Idempotent.
    """
    global _applied
    if not isinstance(max_reused_bytes, int) or isinstance(max_reused_bytes, bool):
        raise TypeError("tune_cpu_allocator: max_reused_bytes must be an int")
    if not 0 < max_reused_bytes <= (1 << 31) - 1:
        raise ValueError("tune_cpu_allocator: max_reused_bytes must be in (0, 2**31)")
    if _applied == max_reused_bytes:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    trim = min(2 * max_reused_bytes, (1 << 31) - 1)
    ok = mallopt(_M_MMAP_THRESHOLD, max_reused_bytes) == 1 and mallopt(_M_TRIM_THRESHOLD, trim) == 1
    if ok:
        _applied = max_reused_bytes
    return ok
