#!/usr/bin/env python
"""Does rounding the 12-step attention scores to bf16 hurt training? (a CPU diagnostic)

On a GPU, temporal and transform attention (≤ 32 keys) run in
``gman.model.layers.short_attention``, whose matrix products return bf16 under
autocast.  This trains a one-block GMAN with bf16 autocast on the CPU, with the
accelerator's plain (not memory-lean) path and that short attention forced on, once
as is and once with the short attention in float32, from the same seeds and batches,
and prints the mean training loss.  Synthetic speeds on the first ``--sensors``
sensors of the METR-LA graph (``gpu_epoch.synthetic_series``).

    python experiments/bf16_short_attention.py --steps 200

Session 6 (2 threads, 60 sensors, batch 16, 200 steps, seeds 0 and 1): mean loss of
the last 50 steps 2.2566 / 2.2094 with bf16 scores against 2.2455 / 2.2022 in
float32 (−0.3 %, −0.5 %).  Patches module attributes of ``gman.model.layers``; a
diagnostic, not part of the product.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", type=Path, default=None, help="METR-LA adj_mx.pkl (default: the shared data's)")
    p.add_argument("--sensors", type=int, default=60)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for name in ("sensors", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]
    import torch
    import torch.nn.functional as F

    import gman.model.layers as layers
    import gpu_epoch
    from gman.data.graph import load_adjacency
    from gman.model import GMAN
    from gman.training.metrics import masked_mae

    graph = args.graph or gpu_epoch.default_graph()
    if not graph.is_file():
        sys.exit(f"bf16_short_attention: {graph} does not exist (--graph)")
    torch.set_num_threads(args.threads)
    bf16_short = layers.short_attention

    def fp32_short(q, k, v, is_causal=False):
        with torch.autocast("cpu", enabled=False):
            return bf16_short(q.float(), k.float(), v.float(), is_causal).to(q.dtype)

    def attention_with(short):
        def attention(q, k, v, is_causal=False):
            if k.shape[1] <= layers.SHORT_SEQUENCE:
                return short(q, k, v, is_causal)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=is_causal)
            return out.transpose(1, 2).contiguous()
        return attention

    saved = layers.attention, layers.BatchNorm.fused_training, layers.TransformAttention._lean
    layers.BatchNorm.fused_training = lambda self, x: False  # the plain path, as on a GPU
    layers.TransformAttention._lean = lambda self, *a: False
    try:
        adjacency, _ = load_adjacency(graph)
        n = min(args.sensors, adjacency.shape[0])
        values = gpu_epoch.synthetic_series(adjacency[:n, :n], 4000, 0)
        observed = values[values != 0]
        mean, std = float(observed.mean()), float(observed.std())
        data = gpu_epoch.PinnedWindows(values, mean, std, 12, 12, torch.device("cpu"))
        for seed in args.seeds:
            for name, short in (("bf16 scores", bf16_short), ("float32 scores", fp32_short)):
                layers.attention = attention_with(short)
                torch.manual_seed(seed)
                model = GMAN(n, gpu_epoch.STEPS_PER_DAY, history_steps=12, horizon_steps=12, num_layers=1,
                             num_heads=8, head_dim=8, dropout=0.0)
                model.set_spatial_embedding(torch.randn(n, model.se_dim))
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                batches = torch.Generator().manual_seed(seed)
                losses, t0 = [], time.perf_counter()
                for _ in range(args.steps):
                    x, time_, y = data.batch(torch.randint(0, data.num_windows, (16,), generator=batches))
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        pred = model(x, time_)
                    loss = masked_mae(pred.float() * std + mean, y, y != 0)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                tail = losses[-max(1, args.steps // 4):]
                print(f"seed {seed} {name:14s}: mean loss {sum(losses) / len(losses):.4f}, "
                      f"last {len(tail)} steps {sum(tail) / len(tail):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        layers.attention, layers.BatchNorm.fused_training, layers.TransformAttention._lean = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
