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

Reuse has a price: every block that outlives a step and was allocated in the
middle of a step's freed activations pins the heap there, and the next steps'
activations, which no longer fit around it, extend the heap.  Adam creates its
state at its first step — after the first backward, so inside that hole — and
the gradients of one step live through the next step's forward (Lightning zeroes
them after the forward).  :func:`allocate_training_state` creates both before the
first step instead, and the lean path's reused buffers (``gman.model.layers.scratch``)
are memory maps outside the heap.  Measured on the 2-core machine, N = 207, B = 16,
L = 1: after 60 steps of ``experiments/memory_steady_state.py`` the heap peaks at
855 MiB instead of 1,153 MiB (live data: 451 / 566 MiB), peak RSS 1,168 MiB instead
of 1,350; through Lightning (``experiments/lightning_epoch.py``, 60 steps) peak RSS
1,230–1,307 MiB instead of 1,443–1,540 MiB (four runs each), at the same step time.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["allocate_training_state", "keep_freed_memory"]

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


def allocate_training_state(optimizer) -> bool:
    """Create ``optimizer``'s gradients and, for Adam / AdamW, its state now, before the first
    training step (see the module docstring for why); -> whether the state was created.

    Every parameter without a gradient gets a zero one; keep them by zeroing in place
    (``optimizer.zero_grad(set_to_none=False)``).  Adam's state is made by one step
    with learning rate 0 on those zero gradients, after which every state tensor —
    the step count and both moments — is zeroed, which is exactly the state Adam
    creates at its first real step; parameters do not change (a test checks that
    training is bit-for-bit the same).  An optimiser that already has state (a
    resumed run) or is of another kind keeps it as it is.
    """
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or len(optimizer.state) > 0:
        return False
    rates = [group["lr"] for group in optimizer.param_groups]
    try:
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if not torch.is_tensor(group["lr"]) else torch.zeros_like(group["lr"])
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr
    with torch.no_grad():
        for state in optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()
    return True
