#!/usr/bin/env python
"""Peak memory of a long CPU training loop: where the benchmark's 13 steps understate it.

Runs ``--steps`` training steps of GMAN (random data, same step as
``experiments/benchmark.py``: zero_grad, forward, masked MAE, backward, Adam)
and samples glibc's heap (``mallinfo2``) every 0.5 ms from a second thread.
After the chosen steps it prints

* the heap footprint peak (memory glibc holds: heap + mmapped blocks),
* the in-use peak (allocated and not freed), and
* the process's peak RSS (``ru_maxrss``),

so the gap between footprint and in-use — freed blocks the allocator keeps but
cannot reuse (fragmentation) — can be followed over the steps.  Linux with
glibc only.  Allocator settings as ``gman train`` (``gman.allocator``).

    python experiments/memory_steady_state.py --nodes 207 --batch 16 --layers 1 --steps 30
"""
from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=207)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for name in ("nodes", "batch", "layers", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        p.error("needs glibc >= 2.33 (mallinfo2)")
    mallinfo2.restype = _MallInfo2

    import torch

    from gman.allocator import keep_freed_memory
    from gman.model import GMAN
    from gman.training.metrics import masked_mae

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, b = args.nodes, args.batch
    model = GMAN(n, 288, num_layers=args.layers)
    model.set_spatial_embedding(torch.randn(n, 64))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(b, 12, n), torch.randn(b, 12, n)
    time_index = torch.stack((torch.randint(0, 7, (b, 24)), torch.randint(0, 288, (b, 24))), -1)

    peak = {"footprint": 0, "in_use": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            info = mallinfo2()
            peak["footprint"] = max(peak["footprint"], info.arena + info.hblkhd)
            peak["in_use"] = max(peak["in_use"], info.uordblks + info.hblkhd)
            time.sleep(0.0005)

    threading.Thread(target=sample, daemon=True).start()
    report = {0, 2, 12, args.steps - 1}
    mib = 2**20
    print(f"N={n} B={b} L={args.layers} threads={args.threads}")
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        masked_mae(model(x, time_index), y, y != 0).backward()
        optimizer.step()
        if step in report:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"after step {step + 1:3d}: heap footprint peak {peak['footprint'] / mib:6.0f} MiB, "
                  f"in use peak {peak['in_use'] / mib:6.0f} MiB, peak RSS {maxrss:6.0f} MiB", flush=True)
    done.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
