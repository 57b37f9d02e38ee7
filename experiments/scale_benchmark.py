#!/usr/bin/env python
"""Cost of dense vs group spatial attention as the sensor network grows.

For every ``N`` in ``--nodes`` (batch ``B`` per ``N`` from ``--batch``) and every
spatial attention in ``--modes``, one configuration of ``experiments/benchmark.py``
is run — its harness, in its own child process, so that peak RSS is that
configuration's alone — giving train-step time, inference time, peak memory
(RSS on the CPU, max allocated on a GPU), FLOPs per train step and achieved
FLOP/s.  The random inputs of the benchmark need no data: a "synthetic graph"
here is just ``N`` sensors with random spatial embeddings, which is all the
model sees of a graph.

Dense configurations whose attention scores, if materialised, would exceed
``--dense-max-gib`` (``K·B·P·N²`` float32 per spatial-attention call: 26 GiB at
N = 8,600, B = 1) are recorded as skipped, with that figure: unfused attention
(the authors' code, or a kernel fallback) could not run them.

The results — every record plus the log-log slopes of per-window cost vs N
fitted over ``--slope-range`` — go to ``--json``; ``--plot`` draws per-window
train time, per-window FLOPs and peak memory against N on log-log axes with
``N²`` and ``N^{4/3}`` reference slopes.

    python experiments/scale_benchmark.py --threads 2 \\
        --json experiments/results/scale_cpu.json --plot experiments/results/scale_cpu.png
    python experiments/scale_benchmark.py --plot-only experiments/results/scale_cpu.json --plot out.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NODES = [207, 325, 883, 2000, 8600]
BATCH = [16, 16, 4, 2, 1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=NODES, help="N values")
    p.add_argument("--batch", type=int, nargs="+", default=BATCH, help="B per N (one value: the same for all)")
    p.add_argument("--modes", nargs="+", choices=["dense", "group"], default=["dense", "group"])
    p.add_argument("--groups", type=int, default=None, help="G for every N (default: the paper's rule per N)")
    p.add_argument("--layers", type=int, default=1, help="L")
    p.add_argument("--heads", type=int, default=8, help="K")
    p.add_argument("--head-dim", type=int, default=8, help="d")
    p.add_argument("--history", type=int, default=12, help="P")
    p.add_argument("--steps", type=int, default=5, help="timed steps below --large-nodes")
    p.add_argument("--large-steps", type=int, default=2, help="timed steps from --large-nodes up")
    p.add_argument("--large-nodes", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--dense-max-gib", type=float, default=20.0,
                   help="skip dense configurations whose materialised scores would exceed this")
    p.add_argument("--slope-range", type=int, nargs=2, default=[883, 8600], metavar=("N_LO", "N_HI"))
    p.add_argument("--json", type=Path, default=None, help="write records and slopes here")
    p.add_argument("--plot", type=Path, default=None, help="write the log-log plot here (PNG)")
    p.add_argument("--plot-only", type=Path, nargs="+", default=None, metavar="RESULTS.json",
                   help="re-plot saved results (several files: records merged, a measured one replacing a skipped one)")
    args = p.parse_args(argv)
    if len(args.batch) not in (1, len(args.nodes)):
        p.error("--batch takes one value or one per --nodes value")
    for name in ("nodes", "batch"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} values must be positive")
    for name in ("layers", "heads", "head_dim", "history", "steps", "large_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.groups is not None and args.groups < 1:
        p.error("--groups must be positive")
    if args.dense_max_gib <= 0:
        p.error("--dense-max-gib must be positive")
    return args


def dense_score_gib(nodes: int, batch: int, heads: int, history: int) -> float:
    """GiB of one spatial attention's scores if materialised: K·B·P·N² float32."""
    return heads * batch * history * nodes**2 * 4 / 2**30


def run_configuration(args: argparse.Namespace, mode: str, nodes: int, batch: int) -> dict:
    """One configuration through ``benchmark.py``'s per-configuration child process."""
    sys.path.insert(0, str(HERE))
    import benchmark

    steps = args.large_steps if nodes >= args.large_nodes else args.steps
    argv = ["--nodes", str(nodes), "--batch", str(batch), "--layers", str(args.layers),
            "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--history", str(args.history),
            "--horizon", str(args.history), "--steps", str(steps), "--warmup", str(args.warmup),
            "--device", args.device, "--amp", args.amp, "--spatial-attention", mode]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if mode == "group" and args.groups:
        argv += ["--groups", str(args.groups)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        code = benchmark.main(argv + ["--json", str(out)])
        if code != 0 or not out.is_file():
            return {"status": "failed", "exit_code": code}
        (record,) = json.loads(out.read_text())
    record["status"] = "ok"
    return record


def fit_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(cost) against log(N)."""
    pts = [(math.log(n), math.log(c)) for n, c in points if c and c > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else None


COSTS = {  # name -> per-window cost of a record
    "train_s_per_window": lambda r: r["train_step_s"] / r["batch"],
    # process CPU time: less sensitive than wall time to other work on a shared machine
    "train_cpu_s_per_window": lambda r: r["train_step_cpu_s"] / r["batch"] if r.get("train_step_cpu_s") else None,
    "infer_s_per_window": lambda r: r["infer_s"] / r["batch"],
    "flops_per_window": lambda r: r["flops_per_step"] / r["batch"] if r.get("flops_per_step") else None,
}


def slopes(records: list[dict], lo: int, hi: int) -> dict:
    """Per mode and cost: the fitted slope over lo <= N <= hi and the endpoint slope."""
    out: dict = {}
    for mode in sorted({r["spatial_attention"] for r in records}):
        ok = sorted((r for r in records if r["spatial_attention"] == mode and r["status"] == "ok"
                     and lo <= r["nodes"] <= hi), key=lambda r: r["nodes"])
        out[mode] = {}
        for name, cost in COSTS.items():
            pts = [(r["nodes"], cost(r)) for r in ok]
            fitted = fit_slope(pts)
            ends = [p for p in pts if p[0] in (lo, hi)]
            out[mode][name] = {
                "fitted": None if fitted is None else round(fitted, 3),
                "endpoints": None if len(ends) != 2 else round(fit_slope(ends) or 0.0, 3),
                "nodes": [n for n, _ in pts],
            }
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in results["records"] if r["status"] == "ok"]
    panels = [("train_s_per_window", "train step / window, wall (s)"),
              ("train_cpu_s_per_window", "train step / window, process CPU (s)"),
              ("flops_per_window", "FLOPs / window (train step)"),
              ("peak_mem", "peak memory (MiB)")]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    skipped = [r for r in results["records"] if r["status"] == "skipped"]
    colours = {"dense": "tab:red", "group": "tab:blue"}
    for ax, (name, label) in zip(axes, panels):
        anchor = None
        for mode in ("dense", "group"):
            rs = sorted((r for r in records if r["spatial_attention"] == mode), key=lambda r: r["nodes"])
            if name == "peak_mem":
                pts = [(r["nodes"], r.get("gpu_peak_mem_mb") or r["peak_mem_mb"], r["batch"]) for r in rs]
            else:
                pts = [(r["nodes"], COSTS[name](r), r["batch"]) for r in rs]
            pts = [pt for pt in pts if pt[1]]
            if not pts:
                continue
            fit = results["slopes"].get(mode, {}).get(name, {}) if name in COSTS else {}
            slope, used = fit.get("fitted"), fit.get("nodes") or []
            tag = mode + (f" (slope {slope:.2f} over N {min(used)}-{max(used)})" if slope else "")
            ax.loglog([n for n, _, _ in pts], [c for _, c, _ in pts], "o-", color=colours[mode], label=tag)
            for n, c, b in pts:
                ax.annotate(f"B={b}", (n, c), fontsize=7, textcoords="offset points", xytext=(3, -9))
            anchor = pts[0][:2] if mode == "group" or anchor is None else anchor  # slopes drawn from group's first point
        for r in skipped:
            ax.axvline(r["nodes"], color=colours["dense"], ls=":", lw=0.8)
        if anchor and name != "peak_mem":
            n0, c0 = anchor
            xs = [n0, max(r["nodes"] for r in results["records"])]
            for power, style, text in ((2.0, "--", "∝ N²"), (4.0 / 3.0, "-.", "∝ N^{4/3}")):
                ax.loglog(xs, [c0 * (x / n0) ** power for x in xs], style, color="grey", lw=1, label=text)
        ax.set_xlabel("sensors N")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    settings = results["settings"]
    fig.suptitle(f"GMAN spatial attention cost vs N ({settings['device']}, {settings.get('threads') or 'all'} threads, L={settings['layers']}, "
                 f"K={settings['heads']}, d={settings['head_dim']}, P=Q={settings['history']}"
                 + ("; dotted: dense skipped)" if skipped else ")"), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def merge(results: list[dict]) -> dict:
    """Records of several result files; for one (mode, N, B), a measured record replaces a skipped one."""
    records: dict[tuple, dict] = {}
    for res in results:
        for r in res["records"]:
            key = (r["spatial_attention"], r["nodes"], r["batch"])
            if key not in records or records[key]["status"] != "ok":
                records[key] = r
    lo, hi = results[0]["slope_range"]
    merged = sorted(records.values(), key=lambda r: (r["nodes"], r["spatial_attention"]))
    return {**results[0], "records": merged, "slopes": slopes(merged, lo, hi)}


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        results = merge([json.loads(path.read_text()) for path in args.plot_only])
        plot(results, args.plot or args.plot_only[0].with_suffix(".png"))
        return 0
    batches = args.batch * len(args.nodes) if len(args.batch) == 1 else args.batch
    records: list[dict] = []
    for nodes, batch in zip(args.nodes, batches):
        for mode in args.modes:
            base = {"spatial_attention": mode, "nodes": nodes, "batch": batch, "layers": args.layers}
            gib = dense_score_gib(nodes, batch, args.heads, args.history)
            if mode == "dense" and gib > args.dense_max_gib:
                records.append({**base, "status": "skipped", "dense_score_gib": round(gib, 2),
                                "reason": f"materialised dense scores would take {gib:.1f} GiB per spatial "
                                          f"attention (> {args.dense_max_gib:g} GiB)"})
                print(f"# {mode} N={nodes} B={batch}: skipped ({gib:.1f} GiB of scores)", file=sys.stderr)
                continue
            print(f"# {mode} N={nodes} B={batch} ...", file=sys.stderr, flush=True)
            record = {**base, **run_configuration(args, mode, nodes, batch), "dense_score_gib": round(gib, 3)}
            records.append(record)
            if args.json:  # partial results survive an interrupted sweep
                write_json(_results(args, records), args.json)
    results = _results(args, records)
    print(json.dumps(results["slopes"], indent=2))
    if args.json:
        write_json(results, args.json)
    if args.plot:
        plot(results, args.plot)
    return 0 if all(r["status"] != "failed" for r in records) else 1


def _results(args: argparse.Namespace, records: list[dict]) -> dict:
    lo, hi = args.slope_range
    settings = {k: getattr(args, k) for k in ("layers", "heads", "head_dim", "history", "device", "amp",
                                               "threads", "groups", "dense_max_gib", "warmup", "steps", "large_steps")}
    return {"settings": settings, "slope_range": [lo, hi], "records": records, "slopes": slopes(records, lo, hi)}


if __name__ == "__main__":
    sys.exit(main())
