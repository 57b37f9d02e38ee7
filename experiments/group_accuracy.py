#!/usr/bin/env python
"""Accuracy of group spatial attention against dense attention, per horizon.

Trains the same configuration (``--config``, default ``experiments/demo.yaml``:
the built-in synthetic network) with ``gman train`` once per variant

* ``dense``  — full spatial attention,
* ``group``  — the paper's group attention, random partition (``model.partition_seed``
  through the seed of GMAN's default, 0) and the paper's ``G`` rule,
* ``group-bfs`` — group attention with the graph-aware partition (connected
  regions of the data's road graph; see ``make_partition(method="bfs")``),

and collects the GMAN rows of every run's ``horizons.csv`` into one CSV
(``variant, seed, step, minutes, mae, rmse, mape``; ``--seeds`` repeats every
variant with other ``seed_everything`` values) plus a printed table of the
means over seeds at the reported horizons.

The training module passes ``model.spatial_attention`` through to GMAN but not
(yet) ``partition_method``; the ``group-bfs`` variant therefore builds the
random-partition model and a callback (:class:`BfsPartition`) replaces every
block's partition with the BFS one from the data's adjacency at the start of
fit.  The partition is part of the state dict, so checkpoints, the test scores
and the packaged model all use the BFS partition (the logged config still says
``partition_method: random``).

    python experiments/group_accuracy.py --out experiments/results/group_vs_dense_synthetic.csv
    python experiments/group_accuracy.py --config experiments/los-loop.yaml --variants dense group \\
        --out experiments/results/group_vs_dense_los_loop.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = {
    "dense": ["--model.spatial_attention", "dense"],
    "group": ["--model.spatial_attention", "group"],
    "group-bfs": ["--model.spatial_attention", "group"],
}
BFS_OVERLAY = "trainer:\n  callbacks:\n    - class_path: group_accuracy.BfsPartition\n"


class BfsPartition(Callback):
    """At the start of fit, give every group-attention block the BFS partition of the data's graph."""

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: D102
        from gman.model.group_attention import make_partition

        adjacency = trainer.datamodule.dataset.adjacency
        if adjacency is None:
            raise RuntimeError("group-bfs: the data set has no adjacency")
        blocks = pl_module.net.group_attentions()
        partition = make_partition(pl_module.net.num_nodes, blocks[0].num_groups, "bfs", adjacency)
        for block in blocks:
            block.set_partition(partition.to(block.partition.device))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=HERE / "demo.yaml")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seed_everything values: one run per variant and seed")
    p.add_argument("--out", type=Path, required=True, help="CSV of per-horizon errors of every variant")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `gman train` arguments (last)")
    return p.parse_args(argv)


def train(variant: str, seed: int, config: Path, workdir: Path, extra: list[str]) -> Path:
    out = workdir / "runs" / f"{variant}-seed{seed}"
    args = ["--config", str(config.resolve())]
    if variant == "group-bfs":
        overlay = workdir / "bfs_overlay.yaml"
        overlay.write_text(BFS_OVERLAY)
        args += ["--config", str(overlay)]
    cmd = [sys.executable, "-m", "gman.cli", "train", *args, *VARIANTS[variant], "--seed_everything", str(seed),
           "--output-dir", str(out),
           "--experiment", "group-vs-dense", "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    # from the repository root, where the configs' relative data paths (../shared/data) point
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"group_accuracy: {variant} failed:\n{result.stderr[-3000:]}")
    print(f"# {variant} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        rows = []
        for seed in args.seeds:
            for variant in args.variants:
                folder = train(variant, seed, args.config, workdir, args.extra)
                with open(folder / "horizons.csv", newline="") as handle:
                    for row in csv.DictReader(handle):
                        if row["model"] == "GMAN":
                            rows.append({"variant": variant, "seed": seed,
                                         **{k: row[k] for k in ("step", "minutes", "mae", "rmse", "mape")}})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    with open(tmp_out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["variant", "seed", "step", "minutes", "mae", "rmse", "mape"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp_out, args.out)
    # mean over seeds at the reported horizons
    print(f"{'variant':>10} {'min':>4} {'MAE':>7} {'RMSE':>7} {'MAPE':>7}   (mean of {len(args.seeds)} seed(s))")
    for variant in args.variants:
        for step in ("3", "6", "12", "all"):
            sel = [r for r in rows if r["variant"] == variant and r["step"] == step]
            if sel:
                mean = {k: sum(float(r[k]) for r in sel) / len(sel) for k in ("mae", "rmse", "mape")}
                print(f"{variant:>10} {sel[0]['minutes']:>4} {mean['mae']:7.3f} {mean['rmse']:7.3f} {mean['mape']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
