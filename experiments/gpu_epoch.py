#!/usr/bin/env python
"""One training epoch of METR-LA size on a GPU: epoch time and MFU.

The issue's target: one epoch of METR-LA size — 23,974 training windows,
N = 207, P = Q = 12, L = 3, K = 8, d = 8, batch 16 — in at most 10 s on an
H100 (a PyTorch port of GMAN needs ~78 s per epoch on an RTX 5000 Ada with
L = 1).  The values are synthetic (a daily speed profile plus noise that is
smoothed over the graph), the graph is the real METR-LA one
(``graphs/metr-la/adj_mx.pkl`` of the shared data, read with
``gman.data.graph.load_adjacency``), and the spatial embedding is random: the
timing does not depend on either.

What the step does, and why:

* bf16 ``torch.autocast`` for the forward pass and loss (the weights, the
  optimiser and the loss reduction stay float32);
* the fused attention kernels only, cuDNN's first (``sdpa_kernel([CUDNN,
  FLASH, EFFICIENT], set_priority=True)``; PyTorch's own order tries cuDNN
  last, after the math kernel): a configuration that would fall back to the
  unfused math kernel fails loudly.  For GMAN's spatial attention (d = 8,
  N = 207 keys) cuDNN's kernel took 0.35 ms forward + backward on an H100
  against flash's 0.43 ms (``--attention-probe``); ``--sdpa no-cudnn`` leaves
  it out;
* no host-device synchronisation inside the step: the masked MAE and its
  running sum stay on the device, the optimiser is ``Adam(fused=True)``, and
  one step is run under ``torch.cuda.set_sync_debug_mode("error")`` to prove it;
* data loading from pinned host memory: the series live in pinned tensors,
  each batch is gathered with one vectorised ``index_select`` into a pinned
  buffer and copied with ``non_blocking=True``, so the copy overlaps compute;
* ``torch.compile`` optional (variant ``compile``), of the model *and* the loss;
  ``compile-ro`` adds CUDA graphs through ``mode="reduce-overhead"``, which
  graphs the forward and the backward separately;
* whole-step CUDA graph (variants ``graph``: eager kernels, ``compile-graph``:
  ``torch.compile`` kernels): forward, loss, backward *and* the optimiser step
  are captured once with ``torch.cuda.graph`` (``Adam(capturable=True)``,
  autocast without its weight-cast cache, static input buffers that each step
  fills with one device copy) and replayed, so the host launches one graph per
  step instead of thousands of kernels.

Each variant (``--variants eager,compile``) builds a fresh model, runs
``--warmup`` steps (compilation happens there), then times one epoch over all
full batches (the last, partial batch is dropped so a compiled graph is not
recompiled for it: 23,968 of 23,974 windows; ``epoch_s_all_windows`` scales
the time up to all of them).  MFU = model FLOP/s / the card's measured bf16
matmul rate (``--matmul-size`` square matrices; float32 when ``--amp none``); the model FLOPs come from
``torch.utils.flop_counter`` on one eager step (matrix products and attention;
multiply-add = 2 FLOPs).

    python experiments/gpu_epoch.py --json gpu_epoch.json                      # on the GPU machine
    python experiments/gpu_epoch.py --device cpu --max-steps 3 --warmup 1 \\
        --variants eager --layers 1 --matmul-size 256                          # CPU smoke test

No MLflow, no Lightning: torch, numpy and this repository.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_DAY = 288  # METR-LA: 5-minute readings
START_DAY_OF_WEEK = 3  # 2012-03-01 was a Thursday (Monday = 0)


VARIANTS = ("eager", "compile", "compile-ro", "graph", "compile-graph")


def default_graph() -> Path:
    shared = Path(os.environ.get("GMAN_SHARED_DATA", ROOT.parent / "shared" / "data"))
    return shared / "graphs" / "metr-la" / "adj_mx.pkl"


def add_epoch_arguments(p: argparse.ArgumentParser) -> None:
    """The METR-LA-size epoch's options, shared with ``lightning_epoch.py``."""
    p.add_argument("--graph", type=Path, default=None, help="METR-LA adj_mx.pkl (default: the shared data's)")
    p.add_argument("--windows", type=int, default=23974, help="training windows per epoch")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layers", type=int, default=3, help="L")
    p.add_argument("--heads", type=int, default=8, help="K")
    p.add_argument("--head-dim", type=int, default=8, help="d")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_epoch_arguments(p)
    p.add_argument("--history", type=int, default=12, help="P")
    p.add_argument("--horizon", type=int, default=12, help="Q")
    p.add_argument("--spatial-attention", choices=["dense", "group"], default="dense")
    p.add_argument("--groups", type=int, default=None, help="G for group attention (default: the paper's rule)")
    p.add_argument("--partition", choices=["random", "bfs"], default="random", help="group partition method")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                   help="autocast dtype (auto: bf16 on cuda, none on cpu, where bf16 is emulated and slow)")
    p.add_argument("--sdpa", choices=["fused", "no-cudnn", "any"], default="fused",
                   help="fused: only cuDNN / flash / memory-efficient attention kernels, in that order; "
                        "no-cudnn: flash / memory-efficient only; any: torch's own choice")
    p.add_argument("--variants", default=None,
                   help="comma list of eager, compile (mode --compile-mode), compile-ro (mode reduce-overhead: "
                        "CUDA graphs) (default: eager,compile on cuda, eager on cpu)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, reduce-overhead, max-autotune, ...)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY (repeatable; VALUE is a Python literal), e.g. "
                        "combo_kernels=True: independent small kernels launched as one")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps per variant before the timed epoch")
    p.add_argument("--max-steps", type=int, default=None, help="cap the timed epoch at this many steps (smoke tests)")
    p.add_argument("--matmul-size", type=int, default=8192, help="square size of the bf16 matmul rate measurement")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after each variant's epoch, profile this many steps (torch.profiler) and record the "
                        "GPU kernel time per step and the top kernels")
    p.add_argument("--profile-dir", type=Path, default=None, help="write each variant's kernel table here")
    p.add_argument("--attention-probe", action="store_true",
                   help="also time one spatial attention (forward + backward) per SDPA backend and explicit scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    for name in ("windows", "batch", "layers", "heads", "head_dim", "history", "horizon", "matmul_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        p.error("--warmup must be zero or more")
    if args.profile_steps < 0:
        p.error("--profile-steps must be zero or more")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be positive")
    if args.groups is not None and args.groups < 1:
        p.error("--groups must be positive")
    if args.windows < args.batch:
        p.error("--windows must be at least --batch")
    if args.variants is not None:
        args.variants = parse_variants(p, args.variants, VARIANTS)
    args.inductor = parse_inductor_settings(p, args.inductor)
    return args


def parse_inductor_settings(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    """``--inductor KEY=VALUE`` items -> {KEY: value}; a malformed item is a parser error."""
    import ast

    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--inductor takes KEY=VALUE, got {item!r}")
        try:
            settings[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            parser.error(f"--inductor {item!r}: the value must be a Python literal (True, 1, 'x', ...)")
    return settings


def apply_inductor_settings(settings: dict) -> None:
    """Set each ``torch._inductor.config`` entry; an unknown key is an error (no silent no-op)."""
    import torch._inductor.config as inductor_config

    for key, value in settings.items():
        if not hasattr(inductor_config, key):
            sys.exit(f"gpu_epoch: --inductor {key}: torch._inductor.config has no such setting")
        setattr(inductor_config, key, value)


def parse_variants(parser: argparse.ArgumentParser, text: str, choices) -> list[str]:
    """``--variants a,b`` -> ["a", "b"]; unknown or no names are a parser error (exit 2)."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    if not variants or any(v not in choices for v in variants):
        parser.error(f"--variants takes {', '.join(choices)}, got {text!r}")
    return variants


# --------------------------------------------------------------------------- data
def synthetic_series(adjacency, num_steps: int, seed: int):
    """Speeds [T, N] in mph on the graph: a daily profile per sensor plus AR(1) noise
    smoothed over the (row-normalised) adjacency; 2 % of readings missing (0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.as_tensor(adjacency, dtype=torch.float32)
    a = a + a.t() + torch.eye(a.shape[0])
    a = a / a.sum(1, keepdim=True)
    n = a.shape[0]
    tod = torch.arange(num_steps, dtype=torch.float32) % STEPS_PER_DAY / STEPS_PER_DAY
    peak = 0.3 + 0.5 * torch.rand(n, generator=g)  # fraction of the day of each sensor's rush hour
    depth = 5 + 25 * torch.rand(n, generator=g)
    profile = 65 - depth * torch.exp(-((tod[:, None] - peak) ** 2) / 0.004)  # [T, N]
    shocks = torch.randn(num_steps, n, generator=g) @ a.t() @ a.t()
    noise = torch.empty_like(shocks)
    state = torch.zeros(n)
    for t in range(num_steps):  # AR(1) in time, ~0.1 s for METR-LA size
        state = 0.9 * state + shocks[t]
        noise[t] = state
    values = (profile + 2.0 * noise).clamp_min(1.0)
    values[torch.rand(num_steps, n, generator=g) < 0.02] = 0.0
    return values


class PinnedWindows:
    """Batches of windows gathered from pinned host tensors.

    Holds ``x_series [T, N]`` (normalised, missing = 0), ``y_series [T, N]``
    (data units, missing = 0) and ``time_table [T, 2]`` (day of week, time of
    day) in pinned memory.  For window starts ``s [B]`` a batch is
    ``x [B, P, N]``, ``time [B, P+Q, 2]``, ``y [B, Q, N]``, each gathered by one
    ``index_select`` into a fresh pinned buffer (PyTorch's caching host
    allocator recycles it once its asynchronous copy has finished) and sent
    to the device with ``non_blocking=True``.
    """

    def __init__(self, values, mean: float, std: float, history: int, horizon: int, device) -> None:
        import torch

        self.device = device
        self.pin = device.type == "cuda"
        num_steps = values.shape[0]
        steps = torch.arange(num_steps)
        x = torch.where(values != 0, (values - mean) / std, torch.zeros(()))
        time_table = torch.stack(((START_DAY_OF_WEEK + steps // STEPS_PER_DAY) % 7, steps % STEPS_PER_DAY), -1)
        self.x_series, self.y_series, self.time_table = (
            (t.contiguous().pin_memory() if self.pin else t.contiguous()) for t in (x, values, time_table)
        )
        self.history, self.horizon = history, horizon
        self.num_windows = num_steps - history - horizon + 1
        self.p_offsets = torch.arange(history)
        self.pq_offsets = torch.arange(history + horizon)
        self.q_offsets = torch.arange(history, history + horizon)

    def _gather(self, table, index):
        import torch

        out = torch.empty((index.numel(), *table.shape[1:]), dtype=table.dtype, pin_memory=self.pin)
        torch.index_select(table, 0, index.reshape(-1), out=out)
        return out.view(*index.shape, *table.shape[1:]).to(self.device, non_blocking=True)

    def batch(self, starts):
        s = starts[:, None]
        return (
            self._gather(self.x_series, s + self.p_offsets),
            self._gather(self.time_table, s + self.pq_offsets),
            self._gather(self.y_series, s + self.q_offsets),
        )


# --------------------------------------------------------------------------- measurements
def matmul_rate(device, size: int, dtype) -> float:
    """Measured FLOP/s of a square ``size`` matrix product in ``dtype`` (2·n³ per product)."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = time.perf_counter() - t0
    return 2.0 * size**3 * reps / seconds


def count_flops(step_fn) -> int:
    """FLOPs of one call of ``step_fn`` (forward + backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    try:  # the CPU flash-attention kernels are not in torch's table; benchmark.py adds them
        sys.path.insert(0, str(ROOT / "experiments"))
        from benchmark import flop_mapping

        extra = flop_mapping()
    except ImportError:
        extra = {}
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    with counter:
        step_fn()
    return int(counter.get_total_flops())


def build_model(args, num_nodes: int, adjacency, device):
    import torch

    from gman.model import GMAN

    options = {}
    if args.spatial_attention == "group":
        options = dict(spatial_attention="group", num_groups=args.groups, partition_method=args.partition,
                       partition_seed=args.seed)
    torch.manual_seed(args.seed)
    model = GMAN(num_nodes, STEPS_PER_DAY, history_steps=args.history, horizon_steps=args.horizon,
                 num_layers=args.layers, num_heads=args.heads, head_dim=args.head_dim, **options)
    if args.spatial_attention == "group" and args.partition == "bfs":
        model.set_partition_graph(adjacency)
    model.set_spatial_embedding(torch.randn(num_nodes, model.se_dim))
    return model.to(device)


def run_variant(args, variant: str, data: PinnedWindows, adjacency, mean: float, std: float, device) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gman.training.metrics import masked_mae

    model = build_model(args, data.x_series.shape[1], adjacency, device).train()
    cuda = device.type == "cuda"
    whole_graph = variant in ("graph", "compile-graph")
    adam_options = {"fused": True, "capturable": whole_graph} if cuda else {"foreach": True}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **adam_options)
    amp_enabled = args.amp == "bf16"

    def forward_loss(x, time_, y):
        # autocast's cache of bf16 weight copies would be stale inside a replayed graph
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled, cache_enabled=not whole_graph):
            pred = model(x, time_)
        return masked_mae(pred.float() * std + mean, y, y != 0)  # on the device

    mode = "reduce-overhead" if variant == "compile-ro" else args.compile_mode
    loss_fn = torch.compile(forward_loss, mode=mode) if variant.startswith("compile") else forward_loss
    # CUDA graphs (reduce-overhead) reuse their output buffers: tell them where a step begins
    mark_step = torch.compiler.cudagraph_mark_step_begin if variant == "compile-ro" else (lambda: None)
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if args.sdpa == "fused":
        backends.insert(0, SDPBackend.CUDNN_ATTENTION)

    def plain_step(batch):
        mark_step()
        loss = loss_fn(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step = plain_step
    captured: dict = {}

    def graph_step(batch):
        for buffer, values in zip(captured["inputs"], batch):
            buffer.copy_(values, non_blocking=True)
        captured["graph"].replay()
        return captured["loss"].detach().clone()

    def capture(batch):
        """Record one whole step (forward, loss, backward, optimiser) as a CUDA graph.
        Gradients are None before capture, so backward allocates them in the graph's
        pool and every replay overwrites (not accumulates) them."""
        captured["inputs"] = tuple(t.clone() for t in batch)
        opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = loss_fn(*captured["inputs"])
            loss.backward()
            opt.step()
        captured["graph"], captured["loss"] = graph, loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(data.num_windows, generator=gen)
    num_batches = data.num_windows // args.batch  # full batches only (see the module docstring)
    timed_batches = min(num_batches, args.max_steps) if args.max_steps else num_batches
    batches = order[: num_batches * args.batch].view(num_batches, args.batch)

    record: dict = {"variant": variant}
    if args.spatial_attention == "group":
        record["groups"] = model.group_attentions()[0].num_groups
    with sdpa_kernel(backends, set_priority=True) if args.sdpa != "any" else contextlib.nullcontext():
        t0 = time.perf_counter()
        if whole_graph:
            # warm up (and compile) on a side stream, as graph capture requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(max(args.warmup, 3)):
                    plain_step(data.batch(batches[i % num_batches]))
            torch.cuda.current_stream().wait_stream(side)
            capture(data.batch(batches[0]))
            step = graph_step
        else:
            for i in range(args.warmup):
                step(data.batch(batches[i % num_batches]))
        sync()
        record["warmup_s"] = round(time.perf_counter() - t0, 2)

        if cuda and args.warmup > 0:  # one step that may not synchronise with the host
            torch.cuda.set_sync_debug_mode("error")
            try:
                step(data.batch(batches[0]))
                record["host_sync_in_step"] = False
            except RuntimeError as err:
                record["host_sync_in_step"] = str(err).splitlines()[0][:200]
                if not whole_graph:
                    opt.zero_grad(set_to_none=True)  # the interrupted step may have left gradients
            finally:
                torch.cuda.set_sync_debug_mode("default")
            sync()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        total = torch.zeros((), device=device)
        sync()
        t0 = time.perf_counter()
        for i in range(timed_batches):
            total += step(data.batch(batches[i]))
        sync()
        epoch_s = time.perf_counter() - t0

        if args.profile_steps:
            record.update(profile_steps(args, variant, step, [data.batch(batches[i % num_batches])
                                                               for i in range(args.profile_steps)], cuda))

        first = data.batch(batches[0])
        if whole_graph:
            # the graph owns the gradients' memory: let the eager count allocate its own
            for param in model.parameters():
                param.grad = None
        flops_per_step = count_flops(lambda: (forward_loss(*first).backward(), opt.zero_grad(set_to_none=True)))

    windows = timed_batches * args.batch
    record.update(
        steps=timed_batches, windows_trained=windows, epoch_s=round(epoch_s, 3),
        epoch_s_all_windows=round(epoch_s * args.windows / windows, 3) if timed_batches == num_batches else None,
        step_ms=round(1e3 * epoch_s / timed_batches, 3), windows_per_s=round(windows / epoch_s, 1),
        mean_train_mae=round(float(total) / timed_batches, 4), flops_per_step=flops_per_step,
        model_tflops=_sig(flops_per_step * timed_batches / epoch_s / 1e12),
    )
    if cuda:
        record["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return record


def profile_steps(args, variant: str, step, batches: list, cuda: bool) -> dict:
    """Run ``step`` on ``batches`` under torch.profiler -> GPU kernel time per step,
    wall time per step, and (in ``--profile-dir``) the kernels by total GPU time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    # the device's own events (kernels, copies), not the operators that launched them
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    kernel_us = sum(e.self_device_time_total for e in kernels)
    out = {"profile_wall_ms_per_step": round(1e3 * wall / len(batches), 3),
           "profile_gpu_ms_per_step": round(kernel_us / 1e3 / len(batches), 3),
           "profile_kernels_per_step": round(sum(e.count for e in kernels) / len(batches), 1)}
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        table = events.table(sort_by=sort, row_limit=40, max_name_column_width=90)
        suffix = ("" if args.sdpa == "fused" else f"_{args.sdpa}") + "".join(f"_{k}" for k in sorted(args.inductor))
        path = args.profile_dir / f"profile_L{args.layers}_{variant}{suffix}.txt"
        path.write_text(f"# {variant}, L = {args.layers}, {len(batches)} steps; {json.dumps(out)}\n{table}\n")
    return out


def attention_probe(args, num_nodes: int, device, reps: int = 20) -> dict:
    """Forward + backward of one spatial attention at the epoch's shape
    (q, k, v [B·P, N, K, d], bf16 on cuda) per SDPA backend and with explicit
    scores (:func:`gman.model.layers.short_attention`): milliseconds, or the error."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gman.model.layers import short_attention

    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    shape = (args.batch * args.history, num_nodes, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)

    def fused(backend):
        def run():
            with sdpa_kernel([backend]):
                out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                       v.transpose(1, 2))
            out.transpose(1, 2).backward(grad)
        return run

    def explicit():
        short_attention(q, k, v).backward(grad)

    candidates = {"flash": fused(SDPBackend.FLASH_ATTENTION), "efficient": fused(SDPBackend.EFFICIENT_ATTENTION),
                  "cudnn": fused(SDPBackend.CUDNN_ATTENTION), "math": fused(SDPBackend.MATH), "explicit": explicit}
    result: dict = {"shape": list(shape), "dtype": str(dtype).replace("torch.", "")}
    for name, run in candidates.items():
        try:
            for _ in range(3):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            result[f"{name}_ms"] = round(1e3 * (time.perf_counter() - t0) / reps, 3)
        except RuntimeError as err:
            result[f"{name}_ms"] = None
            result[f"{name}_error"] = str(err).splitlines()[0][:160]
    return result


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant figures (tiny CPU rates must not round to 0)."""
    return float(f"{x:.{digits}g}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from gman.data.graph import load_adjacency

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_epoch: --device cuda but CUDA is not available")
    variants = args.variants or (["eager", "compile"] if device.type == "cuda" else ["eager"])
    if any(v.startswith("compile") for v in variants) and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # The attention kernel is picked while tracing, but torch.compile's on-disk caches
        # do not key on sdpa_kernel: a run with another --sdpa silently reused the first
        # run's kernels (seen on an H100).  One cache per --sdpa (and --inductor) setting.
        import tempfile

        tag = "".join(f"-{k}={v}" for k, v in sorted(args.inductor.items()))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"torchinductor-gman-sdpa-{args.sdpa}{tag}")
    apply_inductor_settings(args.inductor)
    graphed = [v for v in variants if v in ("graph", "compile-graph")]
    if graphed and device.type != "cuda":
        sys.exit(f"gpu_epoch: --variants {','.join(graphed)} capture CUDA graphs and need --device cuda")
    if args.amp == "auto":
        args.amp = "bf16" if device.type == "cuda" else "none"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 leftovers (optimiser, loss) on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    graph = args.graph or default_graph()
    adjacency, sensor_ids = load_adjacency(graph)
    num_nodes = adjacency.shape[0]
    num_steps = args.windows + args.history + args.horizon - 1
    values = synthetic_series(adjacency, num_steps, args.seed)
    observed = values[values != 0]
    mean, std = float(observed.mean()), float(observed.std())
    data = PinnedWindows(values, mean, std, args.history, args.horizon, device)
    assert data.num_windows == args.windows

    # MFU is against the measured matrix-product rate of the dtype the model computes in
    matmul_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    peak_rate = matmul_rate(device, args.matmul_size, matmul_dtype)
    result = {
        "graph": str(graph), "nodes": num_nodes, "windows": args.windows, "batch": args.batch,
        "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
        "history": args.history, "horizon": args.horizon, "spatial_attention": args.spatial_attention,
        "groups": args.groups, "partition": args.partition if args.spatial_attention == "group" else None,
        "amp": args.amp, "sdpa": args.sdpa, "compile_mode": args.compile_mode,
        "inductor": {k: repr(v) for k, v in args.inductor.items()}, "device": device.type,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "matmul_dtype": str(matmul_dtype).replace("torch.", ""),
        "measured_matmul_tflops": _sig(peak_rate / 1e12),
        "matmul_size": args.matmul_size, "target_epoch_s": 10.0, "variants": [],
    }
    if args.attention_probe:
        result["spatial_attention_probe"] = attention_probe(args, num_nodes, device)
        print(json.dumps(result["spatial_attention_probe"]), flush=True)
    def one(variant: str) -> dict:
        rec = run_variant(args, variant, data, adjacency, mean, std, device)
        rec["mfu"] = _sig(rec["model_tflops"] * 1e12 / peak_rate)
        return rec

    result["variants"] = run_variants(variants, one)
    report(result, args.json)
    return 0


def run_variants(variants: list[str], run_one) -> list[dict]:
    """``run_one(variant)`` for each variant, each record printed as one JSON line as it
    comes; a variant that fails becomes ``{"variant", "error"}`` so that the others still
    run (a single variant's error propagates)."""
    records = []
    for variant in variants:
        print(f"# {variant} ...", file=sys.stderr, flush=True)
        try:
            rec = run_one(variant)
        except Exception as err:  # noqa: BLE001 - record it and go on with the other variants
            if len(variants) == 1:
                raise
            rec = {"variant": variant, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


def report(result: dict, path: Path | None) -> None:
    """Print ``result``; with a path, also write it there (atomically)."""
    from scale_benchmark import write_json  # this folder's scripts share one JSON writer

    print(json.dumps(result, indent=2))
    if path:
        write_json(result, path)


if __name__ == "__main__":
    sys.exit(main())
