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
means over seeds at the reported horizons.  ``--existing VARIANT:SEED:FOLDER``
adds the rows of a run that already finished with the same configuration (an
output folder of ``gman train`` holding ``horizons.csv``) instead of training it
again.

    python experiments/group_accuracy.py --out experiments/results/group_vs_dense_synthetic.csv
    python experiments/group_accuracy.py --config experiments/los-loop.yaml --variants group group-bfs \\
        --existing dense:0:runs/ll/final-s0 --out experiments/results/group_vs_dense_los_loop.csv
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = {
    "dense": ["--model.spatial_attention", "dense"],
    "group": ["--model.spatial_attention", "group"],
    "group-bfs": ["--model.spatial_attention", "group", "--model.partition_method", "bfs"],
}
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=HERE / "demo.yaml")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seed_everything values: one run per variant and seed")
    p.add_argument("--out", type=Path, required=True, help="CSV of per-horizon errors of every variant")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--existing", nargs="+", default=[], metavar="VARIANT:SEED:FOLDER",
                   help="rows of finished runs (gman train output folders) to include instead of training them")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `gman train` arguments (last)")
    args = p.parse_args(argv)
    args.existing = [parse_existing(p, spec) for spec in args.existing]
    return args


def parse_existing(parser: argparse.ArgumentParser, spec: str) -> tuple[str, int, Path]:
    """``VARIANT:SEED:FOLDER`` -> (variant, seed, folder); the folder must hold horizons.csv."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1].lstrip("-").isdigit():
        parser.error(f"--existing {spec!r}: expected VARIANT:SEED:FOLDER, e.g. dense:0:runs/ll/final-s0")
    folder = Path(parts[2])
    if not (folder / "horizons.csv").is_file():
        parser.error(f"--existing {spec!r}: {folder / 'horizons.csv'} does not exist")
    return parts[0], int(parts[1]), folder


def gman_rows(variant: str, seed: int, folder: Path) -> list[dict]:
    """The GMAN rows of a run's horizons.csv, labelled with the variant and seed."""
    with open(folder / "horizons.csv", newline="") as handle:
        return [{"variant": variant, "seed": seed, **{k: row[k] for k in ("step", "minutes", "mae", "rmse", "mape")}}
                for row in csv.DictReader(handle) if row["model"] == "GMAN"]


def train(variant: str, seed: int, config: Path, workdir: Path, extra: list[str]) -> Path:
    out = workdir / "runs" / f"{variant}-seed{seed}"
    cmd = [sys.executable, "-m", "gman.cli", "train", "--config", str(config.resolve()), *VARIANTS[variant], "--seed_everything", str(seed),
           "--output-dir", str(out),
           "--experiment", "group-vs-dense", "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", *extra]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
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
        rows = [row for spec in args.existing for row in gman_rows(*spec)]
        finished = {(variant, seed) for variant, seed, _ in args.existing}
        for seed in args.seeds:
            for variant in args.variants:
                if (variant, seed) not in finished:
                    rows += gman_rows(variant, seed, train(variant, seed, args.config, workdir, args.extra))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    with open(tmp_out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["variant", "seed", "step", "minutes", "mae", "rmse", "mape"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp_out, args.out)
    # mean over seeds at the reported horizons
    print(f"{'variant':>10} {'min':>4} {'MAE':>7} {'RMSE':>7} {'MAPE':>7}   (mean over seeds)")
    variants = list(dict.fromkeys([spec[0] for spec in args.existing] + args.variants))
    for variant in variants:
        for step in ("3", "6", "12", "all"):
            sel = [r for r in rows if r["variant"] == variant and r["step"] == step]
            if sel:
                mean = {k: sum(float(r[k]) for r in sel) / len(sel) for k in ("mae", "rmse", "mape")}
                print(f"{variant:>10} {sel[0]['minutes']:>4} {mean['mae']:7.3f} {mean['rmse']:7.3f} {mean['mape']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
