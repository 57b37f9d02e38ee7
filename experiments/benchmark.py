#!/usr/bin/env python
"""Speed and memory of the GMAN module on random inputs.

For each configuration, in its own child process (so that peak RSS is that
configuration's alone), it measures

* ``train_step_s``: median over ``--steps`` steps (after ``--warmup``) of one
  training step: ``zero_grad``, forward, masked MAE, backward, Adam step;
* ``train_step_cpu_s``: median process CPU time (all threads) of a train step,
  which stays meaningful when other processes compete for the cores;
* ``infer_s``: median forward time per batch in ``eval`` + ``inference_mode``;
* ``peak_mem_mb``: the child's peak resident set size (``ru_maxrss``), and on
  CUDA also ``gpu_peak_mem_mb`` (``torch.cuda.max_memory_allocated``);
* ``flops_per_step``: floating-point operations of one train step (forward +
  backward; multiply-add = 2) from ``torch.utils.flop_counter.FlopCounterMode``,
  with the CPU flash-attention kernels added to its table, and
  ``achieved_gflops = flops_per_step / train_step_s``;

prints a table and the JSON records, and writes the records (a list) to
``--json``.  Several configurations: give ``--nodes/--batch/--layers`` several
values (zipped; a single value is used for every configuration) or
``--preset issue`` for the three configurations of the performance targets.

    python experiments/benchmark.py --nodes 207 --batch 16 --layers 1 --threads 2 --json out.json
    python experiments/benchmark.py --preset issue --threads 2 --json experiments/results/benchmark_cpu.json
    python experiments/benchmark.py --nodes 325 --batch 32 --layers 1 --device cuda --amp bf16 --compile --json gpu.json
    python experiments/benchmark.py --nodes 8600 --batch 1 --spatial-attention group [--groups 331]

Needs only torch and this repository (no Lightning, no MLflow).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"issue": [(207, 16, 1), (325, 32, 1), (207, 16, 3)]}
FIELDS = ["spatial_attention", "nodes", "batch", "layers", "heads", "head_dim", "threads", "device", "amp", "compile",
          "train_step_s", "train_step_cpu_s", "infer_s", "peak_mem_mb", "flops_per_step", "achieved_gflops"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[207], help="N, sensors (several: one run each)")
    p.add_argument("--batch", type=int, nargs="+", default=[16], help="B, batch size")
    p.add_argument("--layers", type=int, nargs="+", default=[1], help="L, ST-attention blocks per encoder/decoder")
    p.add_argument("--preset", choices=sorted(PRESETS), help="run a named list of (N, B, L) instead")
    p.add_argument("--spatial-attention", choices=["dense", "group"], default="dense",
                   help="dense: all N sensors; group: the paper's group spatial attention")
    p.add_argument("--groups", type=int, default=None, help="G for group attention (default: the paper's rule)")
    p.add_argument("--heads", type=int, default=8, help="K")
    p.add_argument("--head-dim", type=int, default=8, help="d")
    p.add_argument("--history", type=int, default=12, help="P")
    p.add_argument("--horizon", type=int, default=12, help="Q")
    p.add_argument("--steps-per-day", type=int, default=288)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast dtype for forward + loss")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--steps", type=int, default=10, help="timed steps (train and inference each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler table of one train step per config")
    p.add_argument("--malloc", choices=["reuse", "default"], default="reuse",
                   help="reuse: keep freed memory as gman train does (gman.allocator); default: glibc's own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT.json", help="write the list of records here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("nodes", "batch", "layers", "heads", "head_dim", "history", "horizon", "steps", "steps_per_day"):
        values = getattr(args, name)
        if any(v < 1 for v in (values if isinstance(values, list) else [values])):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.groups is not None and (args.groups < 1 or args.spatial_attention != "group"):
        p.error("--groups takes a positive G and needs --spatial-attention group")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be positive")
    return args


def configurations(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    if args.preset:
        return list(PRESETS[args.preset])
    lists = [args.nodes, args.batch, args.layers]
    n = max(len(v) for v in lists)
    if any(len(v) not in (1, n) for v in lists):
        sys.exit("benchmark: --nodes, --batch and --layers need the same number of values (or one)")
    return [tuple(v[i] if len(v) > 1 else v[0] for v in lists) for i in range(n)]  # type: ignore[misc]


# --------------------------------------------------------------------------- child
def flop_mapping():
    """FlopCounterMode's table plus the CPU flash-attention kernels it lacks."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    extra = {}

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd)):
        op = getattr(aten, name, None)
        if op is not None:
            extra[op] = formula  # FlopCounterMode wraps it (shapes in, flops out)
    return extra


def make_training(args: argparse.Namespace, nodes: int, batch: int, layers: int) -> SimpleNamespace:
    """The benchmarked model, optimiser, random batch and training step (zero_grad, forward,
    masked MAE, backward, Adam step) for one configuration; the allocator setting applied first.

    -> namespace with ``model``, ``step_model`` (compiled or the model), ``opt``, ``x``,
    ``time``, ``y``, ``amp`` (autocast context), ``device``, ``malloc_tuned`` and ``train_step()``.
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from gman.allocator import allocate_training_state, keep_freed_memory

    malloc_tuned = keep_freed_memory() if args.malloc == "reuse" else False
    from gman.model import GMAN
    from gman.training.metrics import masked_mae  # torch only: no Lightning, no MLflow

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmark: --device cuda but CUDA is not available")
    torch.manual_seed(args.seed)
    P, Q = args.history, args.horizon
    group = dict(num_groups=args.groups) if args.spatial_attention == "group" else {}
    model = GMAN(nodes, args.steps_per_day, history_steps=P, horizon_steps=Q, num_layers=layers,
                 num_heads=args.heads, head_dim=args.head_dim, spatial_attention=args.spatial_attention,
                 **group).to(device)
    model.set_spatial_embedding(torch.randn(nodes, model.se_dim))
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if device.type == "cuda" else {}))
    cpu = device.type == "cpu"
    if cpu:  # as GMANLightningModule.on_train_start: gradients and Adam state before the first step
        allocate_training_state(opt)

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, P, nodes, generator=g).to(device)
    tod = torch.randint(0, args.steps_per_day, (batch, 1), generator=g) + torch.arange(P + Q)
    time_ = torch.stack((torch.randint(0, 7, (batch, P + Q), generator=g), tod % args.steps_per_day), -1).to(device)
    y = torch.randn(batch, Q, nodes, generator=g)
    y[torch.rand(batch, Q, nodes, generator=g) < 0.05] = 0.0  # missing labels
    y = y.to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def train_step():
        opt.zero_grad(set_to_none=not cpu)  # as GMANLightningModule.optimizer_zero_grad
        with amp:
            pred = step_model(x, time_)
        loss = masked_mae(pred.float(), y, y != 0)
        loss.backward()
        opt.step()
        return loss

    return SimpleNamespace(model=model, step_model=step_model, opt=opt, x=x, time=time_, y=y, amp=amp,
                           device=device, malloc_tuned=malloc_tuned, train_step=train_step)


def run_child(args: argparse.Namespace, nodes: int, batch: int, layers: int) -> dict:
    import torch

    from gman.training.metrics import masked_mae

    run = make_training(args, nodes, batch, layers)
    model, device, train_step = run.model, run.device, run.train_step

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    cpu_times: list[float] = []

    def timed(fn, n):
        times = []
        del cpu_times[:]
        for _ in range(n):
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        return times

    model.train()
    compile_s = None
    if args.compile:
        t0 = time.perf_counter()
        train_step()
        sync()
        compile_s = time.perf_counter() - t0
    timed(train_step, args.warmup)
    train_times = timed(train_step, args.steps)
    train_cpu = statistics.median(cpu_times)

    model.eval()

    def infer():
        with torch.inference_mode(), run.amp:
            run.step_model(run.x, run.time)

    timed(infer, max(1, args.warmup))
    infer_times = timed(infer, args.steps)

    # the step's own memory: the profiler and FLOP-counter passes below are instrumentation
    peak_mem_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    gpu_peak_mem_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None
    model.train()

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts, record_shapes=True) as prof:
            train_step()
            sync()
        out = Path(args.profile)
        out.mkdir(parents=True, exist_ok=True)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        (out / f"profile_N{nodes}_B{batch}_L{layers}.txt").write_text(
            prof.key_averages().table(sort_by=sort, row_limit=40)
            + "\n\n" + prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40)
        )

    flops = None
    if not args.no_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
        with counter:
            run.opt.zero_grad(set_to_none=True)
            with run.amp:
                pred = model(run.x, run.time)  # eager: the counter does not see inside compiled graphs
            masked_mae(pred.float(), run.y, run.y != 0).backward()
        flops = int(counter.get_total_flops())

    train_s = statistics.median(train_times)
    record = {
        "nodes": nodes, "batch": batch, "layers": layers, "heads": args.heads, "head_dim": args.head_dim,
        "spatial_attention": args.spatial_attention,
        "groups": model.group_attentions()[0].num_groups if args.spatial_attention == "group" else None,
        "history": args.history, "horizon": args.horizon, "threads": torch.get_num_threads(), "device": device.type,
        "amp": args.amp, "compile": bool(args.compile), "malloc_reuse": run.malloc_tuned,
        "train_step_s": round(train_s, 4), "train_step_min_s": round(min(train_times), 4),
        "train_step_cpu_s": round(train_cpu, 4),
        "infer_s": round(statistics.median(infer_times), 4),
        "peak_mem_mb": peak_mem_mb,
        "flops_per_step": flops,
        "achieved_gflops": round(flops / train_s / 1e9, 2) if flops else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps, "warmup": args.warmup,
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
    }
    if compile_s is not None:
        record["compile_first_step_s"] = round(compile_s, 2)
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name()
        record["gpu_peak_mem_mb"] = gpu_peak_mem_mb
    return record


# --------------------------------------------------------------------------- parent
def table(records: list[dict]) -> str:
    cols = [f for f in FIELDS]
    rows = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: " | ".join(s.rjust(w) for s, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(cols), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        (nodes,), (batch,), (layers,) = args.nodes, args.batch, args.layers
        print("RECORD " + json.dumps(run_child(args, nodes, batch, layers)), flush=True)
        return 0

    raw = list(sys.argv[1:] if argv is None else argv)
    base = strip_config_args(raw)
    records = []
    for nodes, batch, layers in configurations(args):
        cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--child",
               "--nodes", str(nodes), "--batch", str(batch), "--layers", str(layers)]
        print(f"# N={nodes} B={batch} L={layers} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RECORD ")]
        if proc.returncode != 0 or not lines:
            print(f"benchmark: configuration N={nodes} B={batch} L={layers} failed (exit {proc.returncode})",
                  file=sys.stderr)
            return 1
        records.append(json.loads(lines[-1][len("RECORD "):]))
    print(table(records))
    print(json.dumps(records, indent=2))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(records, indent=2) + "\n")
        os.replace(tmp, out)
    return 0


def strip_config_args(argv: list[str]) -> list[str]:
    """The parent's arguments less the per-configuration ones (and --json, --preset)."""
    drop_with_values = {"--nodes", "--batch", "--layers", "--json", "--preset"}
    out, skip = [], False
    for tok in argv:
        if skip:
            if tok.startswith("--"):
                skip = False
            else:
                continue
        name = tok.split("=", 1)[0]
        if name in drop_with_values:
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


if __name__ == "__main__":
    sys.exit(main())
