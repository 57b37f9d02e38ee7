#!/usr/bin/env python
"""Peak memory of a long CPU training loop: where the benchmark's 13 steps understate it.

Runs ``--steps`` training steps of GMAN (the model, random batch and step of
``experiments/benchmark.py``: zero_grad, forward, masked MAE, backward, Adam)
and samples glibc's heap (``mallinfo2``) every 0.5 ms from a second thread.
After the chosen steps it prints

* the heap footprint peak (memory glibc holds: heap + mmapped blocks),
* the in-use peak (allocated and not freed), and
* the process's peak RSS (``ru_maxrss``),

so the gap between footprint and in-use — freed blocks the allocator keeps but
cannot reuse (fragmentation) — can be followed over the steps.  Linux with
glibc only.  Allocator settings and defaults (K = d = 8, P = Q = 12) as the benchmark's.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402


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

    run = benchmark.make_training(
        benchmark.parse_args(["--threads", str(args.threads)]), args.nodes, args.batch, args.layers
    )
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
    print(f"N={args.nodes} B={args.batch} L={args.layers} threads={args.threads}")
    for step in range(args.steps):
        run.train_step()
        if step in report:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"after step {step + 1:3d}: heap footprint peak {peak['footprint'] / mib:6.0f} MiB, "
                  f"in use peak {peak['in_use'] / mib:6.0f} MiB, peak RSS {maxrss:6.0f} MiB", flush=True)
    done.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
