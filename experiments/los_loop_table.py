#!/usr/bin/env python
"""Collect the per-horizon tables of several `gman train` runs into one comparison.

Each run folder holds ``horizons.csv`` (model, step, minutes, mae, rmse, mape; a
row per horizon step plus ``all``) and ``config.yaml``.  Runs given with the same
label are seeds of one arm: the table shows their mean MAE and, in brackets, the
spread (max − min) across seeds.  The baselines (last value, historical average)
come from the first run; they do not depend on the seed.

    python experiments/los_loop_table.py \\
        "node2vec=runs/ll-n2v-s0" "node2vec=runs/ll-n2v-s1" "published SE=runs/ll-pub-s0" \\
        --json experiments/results/los_loop.json

Prints a Markdown table (masked MAE at 5 (three decimals), 15, 30, 60 min and over all steps, and
at how many steps every seed is below both baselines) and writes the numbers to ``--json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = ["1", "3", "6", "12", "all"]


def read_horizons(folder: Path) -> dict[str, dict[str, float]]:
    """{model: {step: mae}} from ``folder/horizons.csv``."""
    path = folder / "horizons.csv"
    if not path.is_file():
        raise SystemExit(f"los_loop_table: {path} not found (is {folder} a finished gman train run folder?)")
    table: dict[str, dict[str, float]] = defaultdict(dict)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            table[row["model"]][row["step"]] = float(row["mae"])
    return table


def _mae(value: float, column: str) -> str:
    """Two decimals; three at 5 minutes, where GMAN and last value differ by thousandths."""
    return f"{value:.3f}" if column == "1" else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=FOLDER")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    arms: dict[str, list[dict]] = defaultdict(list)
    baselines = None
    for item in args.runs:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            p.error(f"runs: expected LABEL=FOLDER, got {item!r}")
        table = read_horizons(Path(folder))
        if "GMAN" not in table:
            p.error(f"runs: {folder}/horizons.csv has no GMAN rows")
        arms[label].append({"folder": folder, "mae": table["GMAN"]})
        if baselines is None:
            baselines = {name: table[name] for name in ("last value", "historical average") if name in table}

    steps = sorted((s for s in next(iter(arms.values()))[0]["mae"] if s != "all"), key=int)
    result = {"arms": {}, "baselines": baselines}
    lines = ["| model | seeds | 5 min | 15 min | 30 min | 60 min | all steps | steps below both baselines |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, runs in arms.items():
        mean = {s: sum(r["mae"][s] for r in runs) / len(runs) for s in steps + ["all"]}
        spread = {s: max(r["mae"][s] for r in runs) - min(r["mae"][s] for r in runs) for s in steps + ["all"]}
        below = [s for s in steps if all(r["mae"][s] < min(b[s] for b in baselines.values()) for r in runs)]
        result["arms"][label] = {"folders": [r["folder"] for r in runs], "mean_mae": mean, "spread_mae": spread,
                                 "steps_below_both_baselines_every_seed": below}
        cells = [_mae(mean[c], c) + (f" ({_mae(spread[c], c)})" if len(runs) > 1 else "") for c in COLUMNS]
        lines.append(f"| GMAN, {label} | {len(runs)} | " + " | ".join(cells) + f" | {len(below)} of {len(steps)} |")
    for name, table in baselines.items():
        lines.append(f"| {name} | – | " + " | ".join(_mae(table[c], c) for c in COLUMNS) + " | |")
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
