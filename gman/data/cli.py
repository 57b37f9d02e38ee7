"""``gman data list | fetch | import | check``: the dataset registry on the command line."""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from gman._modes import give_usual_mode
from gman.errors import ConfigError, DataError

USAGE = "gman data {list,fetch,import,check} ..."


def main(command: str, argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.action is None:
        parser.print_help()
        return 0
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gman data", description="List, fetch, import and check datasets.")
    actions = parser.add_subparsers(dest="action", metavar="{list,fetch,import,check}")

    listing = actions.add_parser("list", help="the dataset cards and whether their files are present")
    listing.set_defaults(run=_list)

    fetch = actions.add_parser("fetch", help="download a dataset's files (resume, sha256 check)")
    fetch.add_argument("name")
    fetch.add_argument("--file", action="append", dest="files", help="only this file (repeatable)")
    fetch.add_argument("--no-progress", action="store_true")
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a server (default 60)")
    fetch.set_defaults(run=_fetch)

    check = actions.add_parser("check", help="sensors, steps, dates, missing %%, graph stats, data/graph mismatches")
    check.add_argument("name")
    check.set_defaults(run=_check)

    imp = actions.add_parser("import", help="turn your own data into a dataset folder with a card")
    imp.add_argument("name", help="name of the new dataset (folder and card name)")
    imp.add_argument("--values", required=True, type=Path, help="readings: wide/long CSV, Parquet, h5, npz [T, N, F]")
    imp.add_argument("--format", choices=["h5", "csv", "long-csv", "parquet", "npz"])
    imp.add_argument("--timestamp-column")
    imp.add_argument("--sensor-column")
    imp.add_argument("--value-column")
    imp.add_argument("--key", help="h5 key / npz array name")
    imp.add_argument("--feature", help="npz: feature index or name (flow, occupancy, speed)")
    imp.add_argument("--sensor-ids", help="text file of sensor ids for data without ids (npz, --no-header CSV)")
    imp.add_argument("--no-header", action="store_true",
                     help="the CSV's first row is readings, not sensor ids (e.g. PeMSD7(M) V_228.csv)")
    imp.add_argument("--start-time", help="timestamp of the first row, for files without timestamps")
    imp.add_argument("--interval", help="time step, e.g. 5min (needed with --start-time)")
    imp.add_argument("--timezone", help="time zone of the timestamps, e.g. America/Los_Angeles "
                                        "(needed when their UTC offset changes with daylight saving time)")
    imp.add_argument("--fill-gaps", action="store_true",
                     help="turn missing timestamps into missing readings instead of an error")
    imp.add_argument("--missing-value", default="0", help="reading that means missing besides NaN; 'none' = NaN only (default 0)")
    imp.add_argument("--graph", type=Path, help="graph file (DCRNN pickle, dense CSV, edge list, distances)")
    imp.add_argument("--graph-format", choices=["dcrnn-pickle", "dense-csv", "edge-list", "distance-csv", "distance-matrix"])
    imp.add_argument("--graph-sensor-ids", help="the graph's nodes (text file of ids): the order of a bare adjacency "
                     "matrix or of an edge list over node indices, or every sensor of a distance file (sensors without edges too)")
    imp.add_argument("--graph-threshold", type=float, help="Gaussian kernel cut-off for distance graphs (default 0.1)")
    imp.add_argument("--unmatched-sensors", choices=["error", "drop"], default="error",
                     help="sensors in only one of data and graph: an error (default), or dropped, keeping the sensors in both")
    imp.add_argument("--units", default="")
    imp.add_argument("--title", default="")
    imp.add_argument("--split", type=float, nargs=3, default=[0.7, 0.1, 0.2], metavar=("TRAIN", "VAL", "TEST"))
    imp.add_argument("--force", action="store_true", help="replace an existing dataset of that name")
    imp.set_defaults(run=_import)
    return parser


# ----------------------------------------------------------------------------- list

def _list(args) -> int:
    from gman.data import registry

    names = registry.card_names()
    try:
        root = registry.datasets_root()
    except ConfigError:
        root = None
    print(f"data root: {root if root else '(none: set ' + registry.ENV_DATASETS_DIR + ')'}")
    if not names:
        print("no dataset cards found")
        return 0
    rows = []
    invalid = 0
    for name in names:
        try:
            card = registry.load_card(name)
        except DataError as err:  # one broken card must not hide the others
            invalid += 1
            rows.append((name, "-", f"invalid: {err}", ""))
            continue
        missing = card.missing_files()
        present = len(card.files) - len(missing)
        if not missing:
            status = "ready"
        else:
            status = "missing " + ", ".join(f.name + ("" if f.urls else " (manual)") for f in missing)
        rows.append((name, f"{present}/{len(card.files)}", status, card.raw.get("title", "")))
    width = max(len(r[0]) for r in rows)
    print(f"{'NAME':<{width}}  FILES  STATUS")
    for name, count, status, title in rows:
        print(f"{name:<{width}}  {count:<5}  {status}")
        if title:
            print(f"{'':<{width}}         {title}")
    return 1 if invalid else 0


# ----------------------------------------------------------------------------- fetch

def _fetch(args) -> int:
    from gman.data import registry

    paths = registry.fetch(args.name, only=args.files, progress=not args.no_progress, timeout=args.timeout,
                           log=lambda message: print(message))
    print(f"{args.name}: {len(paths)} file(s) in {paths[0].parent if paths else registry.datasets_root() / args.name}")
    return 0


# ----------------------------------------------------------------------------- check

def _check(args) -> int:
    """Print what the data set holds; exit 1 when something disagrees (files, data vs graph)."""
    import numpy as np

    from gman.data import registry
    from gman.data.graph import graph_stats
    from gman.data.readers import load_dataset

    card = registry.load_card(args.name)
    problems: list[str] = []
    print(f"dataset {card.name}: {card.raw.get('title', '')}")
    print(f"  card: {card.card_path}")
    print(f"  data: {card.data_dir}")
    for entry in card.files:
        path = card.data_dir / entry.name
        if not path.is_file():
            note = "missing" + ("" if entry.urls else f" (get it from {entry.page or 'its source'})")
            print(f"  file {entry.name}: {note}")
            problems.append(f"{path}: missing")
            continue
        try:
            registry.verify_file(path, entry)
            state = "ok (sha256 verified)" if entry.sha256 else "present (no sha256 in the card)"
        except DataError as err:
            state = f"MISMATCH: {err}"
            problems.append(str(err))
        print(f"  file {entry.name}: {state}")

    needed = [card.values["file"]] + ([card.graph["file"]] if card.graph.get("file") else [])
    absent = [f for f in needed if not (card.data_dir / f).is_file()]
    if absent:
        print(f"{card.name}: cannot read the data: {', '.join(absent)} missing in {card.data_dir} "
              f"(run 'gman data fetch {card.name}' or put the files there)")
        return 1
    options = registry.card_reader_options(args.name)
    options.pop("split", None)
    values_path = options.pop("values_path")
    graph_path = options.get("graph_path")
    graph_problem = None
    try:  # the graph is read and matched to the data by sensor id, as training does
        dataset = load_dataset(values_path, **options)
    except DataError as err:
        if graph_path is None:
            raise
        dataset = load_dataset(values_path, **{k: v for k, v in options.items() if not k.startswith("graph_")})
        graph_problem = str(err)

    observed = dataset.mask.mean(axis=0)
    print(f"  sensors: {dataset.num_nodes}")
    print(f"  steps: {dataset.num_steps} ({dataset.index[0]} .. {dataset.index[-1]}), interval {_interval_text(dataset.interval)}")
    zone = dataset.index.tz
    print(f"  time zone: {zone} (time of day read there)" if zone is not None else "  time zone: none (naive timestamps)")
    print(f"  missing: {100 * (1 - dataset.mask.mean()):.2f} % of readings; "
          f"{int((observed == 0).sum())} sensor(s) never observed")
    split = card.raw.get("split")
    if split:
        print(f"  split: {'/'.join(f'{round(100 * s)}' for s in split)} (train/val/test)")

    if graph_problem is not None:
        print(f"  graph: {Path(graph_path).name}: does not match the data")
        problems.append(graph_problem)
    elif graph_path is not None:
        adjacency = dataset.adjacency
        stats = graph_stats(adjacency)
        print(f"  graph: {Path(graph_path).name}: {stats.nodes} nodes, {stats.edges} edges (+{stats.self_loops} self-loops), "
              f"{stats.isolated_nodes} isolated, {stats.weakly_connected_components} weakly connected component(s), "
              f"{'symmetric' if stats.symmetric else 'directed'}; matched to the data's sensors by id")
        weights = adjacency[adjacency != 0]
        if weights.size:
            print(f"  edge weights: min {weights.min():.4g}, max {weights.max():.4g}, mean {float(np.mean(weights)):.4g}")
    else:
        print("  graph: none (node2vec spatial embeddings need one)")

    for problem in problems:
        print(f"  problem: {problem}")
    print(f"{card.name}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


# ----------------------------------------------------------------------------- import

def _import(args) -> int:
    """Read the user's files with the package's readers, then write normalised files and a card, atomically.

    Written: ``values.parquet`` (wide: DatetimeIndex 'timestamp' x sensor ids, NaN = missing),
    ``adjacency.csv`` (dense, in the graph file's node order, header = sensor ids; see
    :func:`_write_adjacency`) when a graph is given, and ``dataset.yaml`` with their sizes and sha256
    and the missing value the readings were read with.
    """
    import numpy as np
    import pandas as pd

    from gman.data import registry
    from gman.data.readers import load_dataset
    from gman.data.windows import chronological_split
    from gman.errors import DataError

    name = args.name
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"name: {name!r} is not a valid dataset name (one folder name)")
    root = registry.datasets_root()
    target = root / name
    if target.exists() and not args.force:
        raise DataError(f"{target}: a dataset of that name exists; use --force to replace it")
    try:  # the check training makes, so that no card is written that training refuses
        chronological_split(100, args.split)
    except ConfigError as err:
        raise ConfigError(f"--split: {str(err).removeprefix('split: ')}") from None
    missing_value = None
    if str(args.missing_value).lower() not in ("none", "null", "nan"):
        try:
            missing_value = float(args.missing_value)
        except ValueError:
            raise ConfigError(f"--missing-value: {args.missing_value!r} is not a number or 'none'") from None

    options = {
        "format": args.format, "timestamp_column": args.timestamp_column, "sensor_column": args.sensor_column,
        "value_column": args.value_column, "key": args.key, "feature": args.feature, "sensor_ids": args.sensor_ids,
        "start_time": args.start_time, "interval": args.interval, "missing_value": missing_value,
        "graph_path": None if args.graph is None else str(args.graph), "graph_format": args.graph_format,
        "graph_sensor_ids": args.graph_sensor_ids, "graph_threshold": args.graph_threshold,
        "unmatched_sensors": args.unmatched_sensors, "fill_gaps": args.fill_gaps or None, "timezone": args.timezone,
        "header": False if args.no_header else None,
        "name": name, "units": args.units,
    }
    options = {k: v for k, v in options.items() if v is not None or k == "missing_value"}
    dataset = load_dataset(args.values, **options)
    if not dataset.mask.any():
        raise DataError(f"{args.values}: every reading is missing (NaN or the missing value {missing_value}); nothing to import")

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.import-", dir=root))
    give_usual_mode(staging, folder=True)  # mkdtemp creates 0700: a shared data root is read by others
    try:
        frame = pd.DataFrame(np.where(dataset.mask, dataset.values, np.nan), index=dataset.index,
                             columns=[str(s) for s in dataset.sensor_ids])
        frame.index.name = "timestamp"
        frame.to_parquet(staging / "values.parquet")
        files = ["values.parquet"]
        graph = None
        if dataset.adjacency is not None:
            graph = _write_adjacency(dataset, staging / "adjacency.csv")
            files.append("adjacency.csv")
        card = {
            "name": name,
            "title": args.title or f"{name}: {dataset.num_nodes} sensors, {dataset.num_steps} steps (imported)",
            "description": (
                f"Imported with 'gman data import' from {Path(args.values).resolve()}"
                + (f" and {Path(args.graph).resolve()}" if args.graph else "")
                + f" on {datetime.now(timezone.utc):%Y-%m-%d}. Normalised: wide Parquet, NaN = missing"
                + (", dense adjacency in the graph's node order (header = sensor ids)." if graph else ".")
            ),
            "interval": _interval_text(dataset.interval),
            "start_time": None,
            "units": args.units,
            # the convention the source used: values.parquet holds NaN there already, but a model trained
            # on this card records it, so that its forecasts mask the same readings in live histories
            "missing_value": missing_value,
            "split": [float(s) for s in args.split],
            "license": "as of the imported source",
            "values": {"file": "values.parquet", "format": "parquet"},
        }
        if graph:
            card["graph"] = graph
        card["files"] = [
            {"name": f, "size": (staging / f).stat().st_size, "sha256": registry.sha256_of(staging / f), "urls": []}
            for f in files
        ]
        registry.write_card(staging, card)
        _replace_folder(staging, target, replace=args.force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    missing = 100 * (1 - dataset.mask.mean())
    print(f"imported {name}: {dataset.num_nodes} sensors x {dataset.num_steps} steps "
          f"({dataset.index[0]} .. {dataset.index[-1]}, {missing:.2f} % missing) -> {target}")
    return 0


def _write_adjacency(dataset, path: Path) -> dict:
    """Write the data set's graph as a dense CSV in the graph file's node order; returns the card's ``graph``.

    The node order is kept (its ids in the header row) because files indexed by graph node, such as
    the authors' spatial-embedding files, map to sensors through it; the data's column order may differ.
    Graph nodes without data (``unmatched_sensors: drop``) stay as nodes without edges, and the card
    then drops them again on every load.
    """
    import numpy as np
    import pandas as pd

    nodes = list(dataset.graph_node_ids or dataset.sensor_ids)
    column = {s: k for k, s in enumerate(dataset.sensor_ids)}
    with_data = [k for k, s in enumerate(nodes) if s in column]
    columns = [column[nodes[k]] for k in with_data]
    matrix = np.zeros((len(nodes), len(nodes)), dtype=np.float32)
    matrix[np.ix_(with_data, with_data)] = dataset.adjacency[np.ix_(columns, columns)]
    pd.DataFrame(matrix, columns=nodes).to_csv(path, index=False, float_format="%.9g")
    graph = {"file": path.name, "format": "dense-csv"}
    if len(nodes) > dataset.num_nodes:
        graph["unmatched_sensors"] = "drop"
    return graph


def _replace_folder(staging: Path, target: Path, replace: bool = True) -> None:
    """Move the finished ``staging`` folder to ``target``; an old ``target`` is removed only afterwards.

    Without ``replace`` a ``target`` that appeared meanwhile (another import of the same name) is kept
    and this one refused: the existence check at the start of the import is not enough.
    """
    if not replace:
        try:
            os.rename(staging, target)  # fails on a non-empty target folder, never replaces one
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise DataError(f"{target}: a dataset of that name was imported meanwhile; use --force to replace it") from None
        return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _interval_text(interval) -> str:
    seconds = int(interval.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}min"
    return f"{seconds}s"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main("data", sys.argv[1:]))
