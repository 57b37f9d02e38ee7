"""Process-wide CPU memory setting for training: keep freed memory for reuse.

PyTorch's CPU tensors come from ``malloc``.  glibc hands a freed block above its
mmap threshold straight back to the kernel, and trims free memory at the top
of the heap beyond twice that threshold; the next step's allocation of the same
size then page-faults on every 4 KiB page while the kernel zeroes it.  A GMAN
training step allocates and frees about a gigabyte of activations and
temporaries (N = 207, B = 16, L = 1), so by default every step paid 50–120
thousand page faults, about 0.1 s of system time.  :func:`keep_freed_memory`
raises both thresholds (mmap: 32 MiB, glibc's ceiling for the setting on
64-bit; trim: 1 GiB), so freed blocks are reused.  Measured on the 2-core
machine, N = 207, B = 16, L = 1: one thread, faults per step 82,000 → 2,500,
median step 2.26 s → 1.98 s; two threads (``experiments/benchmark.py``), 1.20 s
→ 1.06 s, peak RSS 1,334 → 1,361 MiB (the memory held for reuse; RSS varies
by ±50 MiB from run to run either way).

``gman train`` / ``gman evaluate`` and ``experiments/benchmark.py`` call it; set
``GMAN_MALLOC_TUNING=0`` to leave the allocator alone.  Elsewhere than glibc
(macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); -> whether they were set."""
    if os.environ.get("GMAN_MALLOC_TUNING", "1").strip() == "0":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
