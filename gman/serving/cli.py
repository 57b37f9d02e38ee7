"""``gman predict``, ``gman serve`` and ``gman export``.

    gman predict --model SOURCE --input history.csv|.parquet --output forecast.csv|.parquet
    gman predict --model SOURCE --dataset NAME [--split test] --output forecast.parquet [--sensors ID,ID]
                 [--data-option num_sensors=10 ...]
    gman serve MODEL [--host 127.0.0.1] [--port 5000] [--workers 1] [--mlflow-model DIR] [--dry-run]
    gman export --model SOURCE --format onnx|torch-export [--output PATH | --into-package]

SOURCE is anything ``Forecaster.load`` takes: a package folder, a Lightning
checkpoint, an MLflow model folder or URI (``runs:/<id>/model``,
``models:/<name>/<version>``; the tracking server comes from ``MLFLOW_TRACKING_URI``).

*predict from a file*: a wide table, one row per time step, a ``timestamp``
column (or a DatetimeIndex / first column of timestamps in Parquet / CSV) and
one column per sensor id; or a long table with ``timestamp, sensor_id, value``,
whose missing readings may be left out (a sensor or a step without rows: missing
readings; ids are read as text, "007" stays). The tidy forecast (or ``--layout
wide``) is written to ``--output``.

*predict over a split*: rolling forecasts issued at every ``--stride``-th step
of the data set's split (cards, ``synthetic`` or a file, read by
``gman.data.load_dataset``), each row with its truth; plus two PNGs beside the
output: forecast vs truth for a few sensors, and the error (MAE) by sensor,
on a map where the data set card gives sensor locations. A per-sensor error
table is written as ``<output stem>_errors_by_sensor.csv``.

*serve*: MLflow's scoring server (``mlflow models serve --env-manager local``)
on loopback by default. A package folder or checkpoint is first wrapped as an
MLflow pyfunc model in a temporary folder, or in ``--mlflow-model DIR``, which is
kept; MLflow URIs and MLflow model folders are served as they are. ``--dry-run``
prints the shell-quoted ``mlflow models serve`` command instead of running it;
for a package folder or checkpoint it needs ``--mlflow-model DIR`` (the printed
command serves that folder, so it still works after gman has exited).

*export*: the network with its scaling (:class:`gman.serving.scaled.ScaledGMAN`:
raw readings with NaN for missing + time features in, data units out; batch
size dynamic) to ONNX (checked against PyTorch with onnxruntime: max abs
difference <= 1e-4) or to a ``torch.export`` program (``.pt2``). The package
metadata (sensor order, interval, P, Q...) travels inside the file: ONNX
metadata property / ``.pt2`` extra file ``gman.json``. ONNX graphs are traced
from the inference copy of the network (batch-norm folded into the linear
maps). ``--into-package`` adds the graph to a package folder as ``model.onnx``;
``Forecaster`` (and so ``gman predict`` / ``gman serve``) then runs it with ONNX
Runtime when that is installed (``GMAN_BACKEND=torch`` forces PyTorch).

Every file is written under a temporary name and renamed when complete; an
``--output`` that cannot be written (a folder, a path under a file) is refused
before the model is loaded.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gman._modes import give_usual_mode
from gman.errors import ConfigError, DataError, ForecastInputError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from gman.data.dataset import SensorDataset
    from gman.serving.forecaster import Forecaster

SPLITS = ("train", "val", "test")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PARITY_TOLERANCE = 1e-4
EXPORT_SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2"}


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, exit 2 via gman.cli) instead of exiting."""

    def error(self, message: str):  # noqa: D102
        raise ConfigError(f"{self.prog}: {message}")


def main(command: str, argv: list[str]) -> int:
    if command == "predict":
        return predict_command(argv)
    if command == "serve":
        return serve_command(argv)
    if command == "export":
        return export_command(argv)
    raise ConfigError(f"gman.serving.cli: unknown command {command!r}")


@contextlib.contextmanager
def _atomic_path(path: Path, option: str = "--output"):
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    A path that cannot be written is a one-line error naming ``option``, the argument it came from.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    except OSError as err:
        raise ConfigError(f"{option}: cannot write {path} ({err.strerror or err})") from None
    os.close(handle)
    try:
        yield Path(tmp)
        give_usual_mode(tmp)  # mkstemp creates 0600
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise ConfigError(f"{option}: cannot write {path} ({err.strerror or err})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_output_path(path: Path, option: str) -> None:
    """Refuse, before any work, an output file that could not be written: a folder, or a path under a
    file; the folders still missing are made when it is written."""
    if path.is_dir():
        raise ConfigError(f"{option}: {path} is a folder; name a file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{option}: {path} cannot be written: {parent} is a file, not a folder")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: {path} cannot be written: no permission to write in {parent}")


# ============================================================================ predict


def predict_command(argv: list[str]) -> int:
    parser = _Parser(prog="gman predict", description="Forecast from a history file or over a data set split.")
    parser.add_argument("--model", required=True, help="package folder, checkpoint, MLflow model folder or URI")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="history file (.csv or .parquet): timestamps x sensor ids, or long")
    source.add_argument("--dataset", help="data set card name, 'synthetic', or a data file: rolling forecasts over a split")
    parser.add_argument("--output", required=True, help="forecast file (.csv or .parquet)")
    parser.add_argument("--layout", choices=("tidy", "wide"), default=None, help="--input only: output layout (default tidy)")
    parser.add_argument("--data-option", action="append", default=None, metavar="KEY=VALUE",
                        help="--dataset only: reader / synthetic option, e.g. num_sensors=10 (repeatable; YAML values; "
                             "for the data a run folder's model trained on, the run's options are the defaults)")
    parser.add_argument("--split", choices=(*SPLITS, "all"), default=None,
                        help="--dataset only: which split (default test); 'all' forecasts over the whole series "
                             "(new data the model has not seen)")
    parser.add_argument("--split-fractions", default=None,
                        help="--dataset only: train,val,test fractions (default: the training run's split for its "
                             "own data, else the card's split, else 0.7,0.1,0.2)")
    parser.add_argument("--stride", type=int, default=None, help="--dataset only: issue a forecast every STRIDE steps (default 1)")
    parser.add_argument("--sensors", default=None, help="--dataset only: comma-separated sensor ids to plot (default: 3)")
    parser.add_argument("--plot-days", type=float, default=None,
                        help="--dataset only: days shown in the forecast plot (default 2; more than 0)")
    parser.add_argument("--no-plots", action="store_true", help="--dataset only: skip the PNGs")
    parser.add_argument("--device", default=None,
                        help="torch device of the network, e.g. cuda (default: cpu, or GMAN_DEVICE)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="--dataset only: windows per forward pass (default: 16 on the CPU, 256 on a GPU)")
    args = parser.parse_args(argv)
    _check_mode_options(parser, args)

    output = Path(args.output)
    writer = _frame_writer(output, "--output")
    check_output_path(output, "--output")
    if args.dataset is not None:  # the files written beside it
        for suffix in ("_errors_by_sensor.csv", *(() if args.no_plots else ("_vs_truth.png", "_error_map.png"))):
            check_output_path(output.with_name(f"{output.stem}{suffix}"), "--output")
    from gman.serving.forecaster import Forecaster

    forecaster = Forecaster.load(args.model, device=args.device)
    if args.input is not None:
        history = read_history(Path(args.input), forecaster.timezone, sensor_ids=forecaster.sensor_ids,
                               interval=forecaster.interval)
        forecast = forecaster.predict(history, layout=args.layout, where=args.input)
        with _atomic_path(output) as tmp:
            writer(forecast, tmp, index=args.layout == "wide")
        print(f"{len(forecast)} rows -> {output}")
        return 0

    from gman.data.readers import load_dataset, settings_reader_options
    from gman.data.windows import chronological_split

    # the data the model was trained on is read as it was in training (feature, interval, missing value...)
    training = _training_data_settings(Path(args.model), args.dataset)
    options, trained_split = {}, None
    if training is not None:
        settings, config = training
        options = {k: v for k, v in settings_reader_options(settings).items() if k != "values_path"}
        trained_split = settings.get("split")
    options.update(_parse_options(args.data_option or []))
    fractions = args.split_fractions or (tuple(trained_split) if trained_split else _card_split(args.dataset))
    sensors = _choose_sensors(args.sensors, forecaster.sensor_ids)  # before the work, not after
    dataset = load_dataset(args.dataset, **options)
    if args.split == "all":
        start, stop = 0, dataset.num_steps
    else:
        start, stop = chronological_split(dataset.num_steps, fractions)[SPLITS.index(args.split)]
    forecast = rolling_forecast(forecaster, dataset, start, stop, stride=args.stride, batch_size=args.batch_size)
    with _atomic_path(output) as tmp:
        writer(forecast, tmp, index=False)
    errors = errors_by_sensor(forecast, forecaster.sensor_ids)
    errors_path = output.with_name(f"{output.stem}_errors_by_sensor.csv")
    with _atomic_path(errors_path) as tmp:
        errors.to_csv(tmp, index=False)
    lines = [f"reader options and split of the training run: {training[1]} (--data-option / --split-fractions "
             "override them)"] if training is not None else []
    lines += [f"{len(forecast)} rows ({forecast['issued_at'].nunique()} forecasts, split {args.split}) -> {output}",
             f"MAE by sensor -> {errors_path} (mean {f'{errors.mae.mean():.4g} {forecaster.units}'.strip()})"]
    if not args.no_plots:
        vs_truth = output.with_name(f"{output.stem}_vs_truth.png")
        error_map = output.with_name(f"{output.stem}_error_map.png")
        plot_forecast_vs_truth(forecast, sensors, vs_truth, days=args.plot_days, units=forecaster.units)
        locations = sensor_locations(args.dataset, forecaster.sensor_ids)
        plot_error_map(errors, locations, error_map, units=forecaster.units, title=dataset.name)
        lines += [f"plots -> {vs_truth}, {error_map}" + ("" if locations is not None else " (no sensor locations: bar chart)")]
    print("\n".join(lines))
    return 0


# the options that belong to one mode only: (dest, flag) -> the mode's source option
_DATASET_ONLY = {"data_option": "--data-option", "split": "--split", "split_fractions": "--split-fractions",
                 "stride": "--stride", "sensors": "--sensors", "plot_days": "--plot-days", "no_plots": "--no-plots",
                 "batch_size": "--batch-size"}
_INPUT_ONLY = {"layout": "--layout"}


def _check_mode_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an option of the other mode (it would be ignored) and bad numbers, before any work; fill defaults."""
    mode, other, foreign = ("--input", "--dataset", _DATASET_ONLY) if args.input is not None else ("--dataset", "--input", _INPUT_ONLY)
    given = [flag for dest, flag in foreign.items() if getattr(args, dest) not in (None, False)]
    if given:
        parser.error(f"{given[0]}: belongs to {other} and has no effect with {mode}")
    for name, value, bound in (("--stride", args.stride, 1), ("--batch-size", args.batch_size, 1)):
        if value is not None and value < bound:
            parser.error(f"{name}: must be at least {bound}, got {value}")
    if args.plot_days is not None and not 0 < args.plot_days < float("inf"):  # also NaN
        parser.error(f"--plot-days: must be a number of days more than 0, got {args.plot_days:g}")
    if args.split_fractions is not None:
        args.split_fractions = _parse_fractions(args.split_fractions)
    args.layout = args.layout or "tidy"
    args.split = args.split or "test"
    args.stride = args.stride or 1
    args.plot_days = args.plot_days or 2.0


def _frame_writer(path: Path, option: str):
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return lambda frame, tmp, index: frame.to_csv(tmp, index=index)
    if suffix in (".parquet", ".pq"):
        return lambda frame, tmp, index: frame.to_parquet(tmp, index=index)
    raise ConfigError(f"{option}: {path} must end in .csv or .parquet")


def _parse_options(items: list[str]) -> dict[str, Any]:
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--data-option: expected KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--data-option: value of {key.strip()!r} is not valid YAML: {value!r}") from None
    return options


def _training_data_settings(model: Path, dataset: str) -> tuple[dict[str, Any], Path] | None:
    """(the ``data`` settings, the config file) of the ``gman train`` run that ``model`` comes from (its
    package folder ``<run>/model`` or a checkpoint under ``<run>``), when ``dataset`` is the data that
    run trained on; else None (another data set, or a model outside a run folder)."""
    import yaml

    from gman.data.readers import source_is_path

    for folder in (model, model.parent, model.parent.parent):
        config = folder / "config.yaml"
        if config.is_file() and (folder / "run.json").is_file():
            break
    else:
        return None
    try:
        settings = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError, AttributeError):
        return None
    trained_on = str(settings.get("dataset") or "synthetic")
    if trained_on == "synthetic" and settings.get("values_path"):
        trained_on = str(settings["values_path"])  # values_path alone names the series file
    if source_is_path(trained_on) != source_is_path(dataset):
        return None
    same = (Path(trained_on).resolve() == Path(dataset).resolve()) if source_is_path(dataset) else trained_on == dataset
    return (settings, config) if same else None


def _card_split(dataset: str) -> tuple[float, float, float]:
    """The card's standard split (PEMS0X: 60/20/20), else the authors' 70/10/20."""
    try:
        from gman.data.registry import load_card

        split = load_card(dataset).raw.get("split")
    except Exception:  # a file or 'synthetic'
        split = None
    return tuple(float(f) for f in split) if split else (0.7, 0.1, 0.2)  # type: ignore[return-value]


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--split-fractions: expected three numbers like 0.7,0.1,0.2, got {text!r}") from None
    if len(fractions) != 3:
        raise ConfigError(f"--split-fractions: expected three numbers like 0.7,0.1,0.2, got {text!r}")
    return fractions  # type: ignore[return-value]


def read_history(path: Path, timezone: str | None = None, *, sensor_ids: list[str] | None = None,
                 interval: "pd.Timedelta | None" = None) -> "pd.DataFrame":
    """A history file -> DataFrame (DatetimeIndex x sensor-id columns); long tables are pivoted.

    Timestamps with changing UTC offsets are written in ``timezone`` (the model's); without one each
    keeps its offset (:func:`gman.serving.forecaster.history_index`). A long table leaves missing
    readings out: its ids are read as text ("007" stays), a sensor of ``sensor_ids`` (the model's)
    without rows becomes a column of missing readings, and steps of ``interval`` without any row
    become rows of missing readings (not in a table whose UTC offsets change, read for a model without
    a time zone: there every step needs a row, NaN for missing readings).
    """
    import pandas as pd

    from gman.data.readers import check_csv_header, pivot_long
    from gman.serving.forecaster import history_index

    if not path.is_file():
        raise DataError(f"{path}: no such history file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            check_csv_header(path, "the file needs a header row (timestamp, then one sensor id per column; "
                                   "or timestamp, sensor_id, value)")
            frame = pd.read_csv(path, dtype={"sensor_id": str})  # long format: ids as text, as the data readers do
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: history must be a .csv or .parquet file")
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: cannot read ({' '.join(str(err).split())[:200]})") from None
    frame.columns = [str(c) for c in frame.columns]
    long_columns = ["timestamp", "sensor_id", "value"]
    if "sensor_id" in frame.columns and not set(long_columns) <= set(frame.columns):
        missing = [c for c in long_columns if c not in frame.columns]
        found = list(frame.columns[:8]) + (["..."] if len(frame.columns) > 8 else [])
        raise DataError(f"{path}: a 'sensor_id' column makes this the long format, which needs columns "
                        f"{', '.join(long_columns)}: no {' or '.join(map(repr, missing))} column (columns found: {found})")
    long = set(long_columns) <= set(frame.columns)
    if long:
        frame = pivot_long(frame, *long_columns, str(path), error=ForecastInputError).reset_index()
    if isinstance(frame.index, pd.DatetimeIndex):
        return frame
    if frame.shape[1] == 0 or len(frame) == 0:
        raise ForecastInputError(f"{path}: no {'columns' if frame.shape[1] == 0 else 'data rows'}")
    column = "timestamp" if "timestamp" in frame.columns else frame.columns[0]
    if pd.api.types.is_numeric_dtype(frame[column]):  # pandas would read numbers as nanoseconds since 1970
        first = frame[column].iloc[:1].tolist()[0]
        if column == "timestamp":
            raise ForecastInputError(f"{path}: column 'timestamp' holds numbers ({first!r}, ...), not timestamps")
        raise ForecastInputError(f"{path}: needs a 'timestamp' column (the first column, {column!r}, holds "
                                 f"numbers such as {first!r}, not timestamps)")
    try:
        index = history_index(frame[column], timezone, "timestamp")
    except (TypeError, ValueError):
        raise ForecastInputError(f"{path}: column {column!r} does not hold timestamps (need a 'timestamp' column)") from None
    history = frame.drop(columns=column).set_axis(index, axis=0)
    return _complete_long_history(history, sensor_ids, interval) if long else history


def _complete_long_history(history: "pd.DataFrame", sensor_ids: list[str] | None,
                           interval: "pd.Timedelta | None") -> "pd.DataFrame":
    """A pivoted long table in time order, the model's sensors first (one without rows: all missing) and the
    steps no row named as missing rows, on the ``interval`` grid its timestamps lie on.

    A table that names none of the model's sensors is left as it is, for the Forecaster to refuse.
    """
    import pandas as pd

    if sensor_ids is not None and not history.columns.intersection(sensor_ids).empty:
        known = set(sensor_ids)
        history = history.reindex(columns=[*sensor_ids, *(c for c in history.columns if c not in known)])
    index = history.index
    if not isinstance(index, pd.DatetimeIndex):  # offsets that change: order by instant, no grid to fill
        instants = np.array([t.value for t in index], dtype=np.int64)
        return history.iloc[np.argsort(instants, kind="stable")]
    history = history.sort_index()  # the pivot ordered the timestamps as text
    index = history.index
    if interval is None or len(index) < 2 or index.hasnans or not index.is_unique:
        return history  # the Forecaster says what is wrong with the timestamps
    grid = pd.date_range(index[0], index[-1], freq=interval, unit=index.unit, name=index.name)
    if len(grid) > len(index) and index.isin(grid).all():
        history = history.reindex(grid)
    return history


def rolling_forecast(
    forecaster: "Forecaster", dataset: "SensorDataset", start: int, stop: int, *, stride: int = 1, batch_size: int | None = None
) -> "pd.DataFrame":
    """Forecasts issued at steps ``start+P-1, start+P-1+stride, ...`` of ``dataset`` within [start, stop).

    ``batch_size`` windows per forward pass (default :attr:`Forecaster.batch_size`).

    Each forecast's history and truth lie inside the range (the windows of
    ``WindowDataset``). Returns the tidy forecast plus ``truth`` (NaN where missing).
    """
    import pandas as pd

    from gman.serving.forecaster import TIDY_COLUMNS

    p, q = forecaster.history_steps, forecaster.horizon_steps
    if dataset.interval != forecaster.interval:
        raise ForecastInputError(f"dataset {dataset.name!r}: interval {dataset.interval}, the model expects {forecaster.interval}")
    position = {s: i for i, s in enumerate(dataset.sensor_ids)}
    absent = [s for s in forecaster.sensor_ids if s not in position]
    if absent:
        raise ForecastInputError(f"dataset {dataset.name!r}: {len(absent)} model sensors missing, e.g. {absent[:5]}")
    columns = np.array([position[s] for s in forecaster.sensor_ids])
    starts = np.arange(start, stop - p - q + 1, stride)
    if len(starts) == 0:
        raise ForecastInputError(f"dataset {dataset.name!r}: steps [{start}, {stop}) are fewer than P + Q = {p + q}")
    values = dataset.values[:, columns]
    mask = dataset.mask[:, columns]
    time = forecaster.time_features(dataset.index)
    predictions = []
    if batch_size is None:
        batch_size = forecaster.batch_size
    for lo in range(0, len(starts), batch_size):
        chunk = starts[lo : lo + batch_size]
        history = chunk[:, None] + np.arange(p)  # [b, P] step numbers
        window = chunk[:, None] + np.arange(p + q)
        predictions.append(forecaster.predict_arrays(values[history], mask[history], time[window], batch_size))
    prediction = np.concatenate(predictions)  # [W, Q, N]

    future = starts[:, None] + p + np.arange(q)  # [W, Q]
    truth = np.where(mask[future], values[future], np.nan)  # [W, Q, N]
    num_windows, n = len(starts), len(columns)
    steps = np.arange(1, q + 1)
    per_window = q * n
    index = dataset.index
    frame = pd.DataFrame(
        {
            "sensor_id": np.tile(np.asarray(forecaster.sensor_ids, dtype=object), num_windows * q),
            "issued_at": index[starts + p - 1].repeat(per_window),
            "target_time": index[future.reshape(-1)].repeat(n),
            "step": np.tile(np.repeat(steps, n), num_windows),
            "minutes_ahead": np.tile(np.repeat(steps * forecaster.interval.total_seconds() / 60.0, n), num_windows),
            "prediction": prediction.reshape(-1).astype(np.float64),
            "truth": truth.reshape(-1).astype(np.float64),
        }
    )
    return frame[[*TIDY_COLUMNS, "truth"]]


def errors_by_sensor(forecast: "pd.DataFrame", sensor_ids: list[str]) -> "pd.DataFrame":
    """Masked MAE / RMSE per sensor over all steps (rows without truth are skipped)."""
    import pandas as pd

    scored = forecast.dropna(subset=["truth"])
    error = scored["prediction"] - scored["truth"]
    grouped = pd.DataFrame({"sensor_id": scored["sensor_id"], "abs": error.abs(), "sq": error**2}).groupby("sensor_id", sort=False)
    table = pd.DataFrame({"mae": grouped["abs"].mean(), "rmse": np.sqrt(grouped["sq"].mean()), "count": grouped["abs"].size()})
    table = table.reindex(sensor_ids)
    table["count"] = table["count"].fillna(0).astype(int)
    return table.rename_axis("sensor_id").reset_index()


def _choose_sensors(text: str | None, sensor_ids: list[str]) -> list[str]:
    if text is None:
        return sensor_ids[:3]
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in set(sensor_ids)]
    if unknown or not chosen:
        raise ConfigError(f"--sensors: unknown sensor ids {unknown[:5]} (the model has {len(sensor_ids)}, e.g. {sensor_ids[:3]})")
    return chosen


def sensor_locations(dataset: str, sensor_ids: list[str]) -> "pd.DataFrame | None":
    """latitude/longitude of ``sensor_ids`` (rows in that order) from the data set card's location file, or None.

    The card's ``files`` list names the location file (``*location*.csv``, e.g.
    DCRNN's ``graph_sensor_locations.csv``); it is used when it sits in the
    card's data folder and covers every sensor.
    """
    try:
        from gman.data.registry import load_card

        card = load_card(dataset)
    except Exception:  # not a card name (a file, 'synthetic'), or no registry: no map
        return None
    for entry in card.files:
        path = card.data_dir / entry.name
        if "location" in entry.name.lower() and path.is_file():
            locations = read_locations(path)
            if set(sensor_ids) <= set(locations.index):
                return locations.loc[sensor_ids]
    return None


def read_locations(path: Path) -> "pd.DataFrame":
    """A sensor location CSV -> DataFrame indexed by sensor id with ``latitude``, ``longitude``.

    Accepts a header with ``sensor_id, latitude, longitude`` (METR-LA's file) or
    three unnamed columns ``id, latitude, longitude`` (PEMS-BAY's).
    """
    import pandas as pd

    frame = pd.read_csv(path, dtype=str)
    if not {"sensor_id", "latitude", "longitude"} <= set(frame.columns):
        frame = pd.read_csv(path, header=None, dtype=str)
        if frame.shape[1] != 3:
            raise DataError(f"{path}: expected sensor_id, latitude, longitude columns")
        frame.columns = ["sensor_id", "latitude", "longitude"]
    try:
        coordinates = frame[["latitude", "longitude"]].astype(float)
    except ValueError:
        raise DataError(f"{path}: latitude/longitude are not numbers") from None
    coordinates.index = frame["sensor_id"].str.strip()
    return coordinates


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_forecast_vs_truth(forecast: "pd.DataFrame", sensors: list[str], path: Path, *, days: float, units: str) -> None:
    """One panel per sensor: truth, and forecasts at a short and the longest horizon, over the first ``days``."""
    import pandas as pd

    plt = _pyplot()
    q = int(forecast["step"].max())
    steps = sorted({min(3, q), q})
    minutes_per_step = float(forecast["minutes_ahead"].iloc[0]) / int(forecast["step"].iloc[0])
    first = forecast["target_time"].min()
    shown = forecast[forecast["target_time"] < first + pd.Timedelta(days=days)]
    fig, axes = plt.subplots(len(sensors), 1, figsize=(11, 2.6 * len(sensors)), sharex=True, squeeze=False)
    for ax, sensor in zip(axes[:, 0], sensors):
        rows = shown[shown["sensor_id"] == sensor]
        # every target time once (with stride <= Q each is covered), gaps where the sensor reported nothing
        truth = rows.drop_duplicates("target_time").set_index("target_time")["truth"].sort_index()
        ax.plot(truth.index, truth.to_numpy(), color="black", linewidth=1.0, label="truth")
        for step in steps:
            at = rows[rows["step"] == step]
            minutes = step * minutes_per_step  # the lead time, also where this sensor has no row at this step
            ax.plot(at["target_time"], at["prediction"], linewidth=0.9, label=f"forecast {minutes:g} min ahead")
        ax.set_title(f"sensor {sensor}", fontsize=9)
        ax.set_ylabel(units or "value")
    axes[0, 0].legend(loc="lower left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    _save_figure(fig, path)


def plot_error_map(errors: "pd.DataFrame", locations: "pd.DataFrame | None", path: Path, *, units: str, title: str) -> None:
    """MAE by sensor: coloured dots at (longitude, latitude) when known, else a bar per sensor."""
    plt = _pyplot()
    label = f"MAE ({units})" if units else "MAE"
    if locations is not None:
        fig, ax = plt.subplots(figsize=(7.5, 6))
        dots = ax.scatter(locations["longitude"], locations["latitude"], c=errors["mae"].to_numpy(), cmap="viridis", s=22)
        fig.colorbar(dots, ax=ax, label=label)
        # a degree of longitude is cos(latitude) times as long as a degree of latitude
        ax.set_aspect(1.0 / np.cos(np.radians(float(locations["latitude"].mean()))), adjustable="datalim")
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
    else:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(errors)), 4))
        ax.bar(np.arange(len(errors)), errors["mae"].to_numpy(), color="tab:blue")
        ax.set_xlabel("sensor (model order)")
        ax.set_ylabel(label)
        if len(errors) <= 40:
            ax.set_xticks(np.arange(len(errors)), errors["sensor_id"], rotation=90, fontsize=7)
    ax.set_title(f"{title}: forecast error by sensor (all horizons)")
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    plt = _pyplot()
    try:
        with _atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


# ============================================================================ serve


def serve_command(argv: list[str]) -> int:
    parser = _Parser(prog="gman serve", description="Serve a model over REST with MLflow's scoring server.")
    parser.add_argument("model", help="package folder, checkpoint, MLflow model folder or URI (runs:/, models:/)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds allowed per request (default 60)")
    parser.add_argument("--mlflow-model", default=None, metavar="DIR",
                        help="a package folder or checkpoint is served as an MLflow model folder written first: "
                             "write it to DIR (a new folder) and keep it (default: a temporary folder, removed "
                             "when the server stops)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the mlflow command (shell-quoted) instead of running it; for a package folder "
                             "or checkpoint, give --mlflow-model DIR: the folder is written there so that the "
                             "printed command works later")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port: {args.port} is not a port number (1-65535)")
    for name in ("workers", "timeout"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be at least 1, got {getattr(args, name)}")
    from gman.serving.forecaster import _backend, _threads

    _backend(None), _threads(None)  # GMAN_BACKEND / GMAN_THREADS, which the server reads: refused here in one line
    keep = None if args.mlflow_model is None else Path(args.mlflow_model)
    if _is_mlflow_model(args.model):
        if keep is not None:
            parser.error(f"--mlflow-model: {args.model} is an MLflow model already and is served as it is")
    elif keep is None and args.dry_run:
        parser.error(f"--dry-run: {args.model} is served from an MLflow model folder written first; add "
                     "--mlflow-model DIR to write it there, kept, for the printed command")
    if keep is not None and keep.exists():
        parser.error(f"--mlflow-model: {keep} already exists; name a new folder")
    if not args.dry_run:
        check_listenable(args.host, args.port)
    if args.host not in LOOPBACK:
        print(f"gman serve: binding {args.host}: the server has no authentication; "
              "anyone who can reach this address can query the model", file=sys.stderr)
    with _mlflow_model_uri(args.model, keep=keep) as uri:
        command = serve_command_line(uri, host=args.host, port=args.port, workers=args.workers, timeout=args.timeout)
        if keep is not None:
            print(f"gman serve: MLflow model folder -> {uri}", file=sys.stderr)
        if args.dry_run:
            print(shlex.join(command))
            return 0
        return _run_until_stopped(command)


def check_listenable(host: str, port: int) -> None:
    """Refuse, in one line, an address the server could not listen on (port taken, unknown host),
    before MLflow builds the model environment and uvicorn fails with a traceback."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError(f"gman serve: --host {host}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(f"gman serve: cannot listen on {host}:{port}: {err.strerror or err}") from None


def _run_until_stopped(command: list[str]) -> int:
    """Run the server; on SIGTERM or Ctrl-C stop it and return, so temporary folders are removed."""
    server = subprocess.Popen(command, env=serving_environment())
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: server.terminate())
    try:
        code = server.wait()
        return 128 - code if code < 0 else code  # stopped by signal N: 128 + N, as a shell reports it (143)
    except KeyboardInterrupt:
        server.terminate()
        server.wait()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_command_line(uri: str, *, host: str, port: int, workers: int = 1, timeout: int = 60) -> list[str]:
    """The ``mlflow models serve`` command (local environment: the model runs with this Python)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    launcher = [str(mlflow)] if mlflow.is_file() else [sys.executable, "-m", "mlflow"]
    return [*launcher, "models", "serve", "-m", uri, "--env-manager", "local", "-h", host, "-p", str(port),
            "-w", str(workers), "-t", str(timeout)]


def serving_environment() -> dict[str, str]:
    """This environment with the interpreter's ``bin`` first on PATH (MLflow execs ``uvicorn`` from PATH)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see gman.serving.forecaster._import_torch
    return env


def _is_mlflow_model(source: str) -> bool:
    """An MLflow URI (``runs:/``, ``models:/``...) or an MLflow model folder: served as it is."""
    from gman.serving.forecaster import _URI_SCHEME

    path = Path(source)
    return bool(_URI_SCHEME.match(source) and not path.exists()) or (path / "MLmodel").is_file()


@contextlib.contextmanager
def _mlflow_model_uri(source: str, *, keep: Path | None = None):
    """An MLflow model URI for ``source``: URIs and MLflow folders as they are; a package folder or
    checkpoint wrapped as an MLflow model folder, written to ``keep`` (complete or not at all) or to a
    temporary folder removed afterwards."""
    from gman.serving import package as pkg

    path = Path(source)
    if _is_mlflow_model(source):
        yield str(path.resolve()) if path.exists() else source  # a printed command may run elsewhere
        return
    with tempfile.TemporaryDirectory(prefix="gman-serve-") as tmp:
        if pkg.is_package(path):
            package = path
        else:  # a checkpoint: rebuild a package from it first
            from gman.serving.forecaster import Forecaster

            forecaster = Forecaster.load(path)
            package = Path(tmp) / "package"
            _save_forecaster_package(forecaster, package)
        from gman.serving.pyfunc import save_model

        if keep is None:
            model_dir = Path(tmp) / "mlflow-model"
            save_model(package, model_dir)
        else:
            model_dir = keep.resolve()
            model_dir.parent.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
            try:
                save_model(package, partial / "model")
                os.replace(partial / "model", model_dir)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        yield str(model_dir)


def _save_forecaster_package(forecaster: "Forecaster", path: Path) -> Path:
    import pandas as pd

    from gman.serving.package import save_package

    meta = forecaster.metadata
    return save_package(
        path, forecaster.model, scaler_mean=meta["scaler"]["mean"], scaler_std=meta["scaler"]["std"],
        sensor_ids=forecaster.sensor_ids, interval=pd.Timedelta(seconds=meta["interval_seconds"]),
        missing_value=meta.get("missing_value"), dataset_name=meta.get("dataset_name", ""), units=meta.get("units", ""),
        timezone=meta.get("timezone"), scaler_missing_input=meta["scaler"].get("missing_input", 0.0),
    )


# ============================================================================ export


def export_command(argv: list[str]) -> int:
    parser = _Parser(prog="gman export", description="Export a model to ONNX or torch.export (.pt2).")
    parser.add_argument("--model", required=True, help="package folder, checkpoint, MLflow model folder or URI")
    parser.add_argument("--format", required=True, choices=("onnx", "torch-export"))
    parser.add_argument("--output", default=None,
                        help="output file, ending in .onnx for onnx and .pt2 for torch-export "
                             "(default gman-model.onnx / gman-model.pt2)")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    parser.add_argument("--into-package", action="store_true",
                        help="(onnx, --model a package folder) add the graph to the package as model.onnx, "
                             "which Forecaster then runs with ONNX Runtime")
    args = parser.parse_args(argv)
    from gman.serving import package as pkg
    from gman.serving.forecaster import Forecaster

    if args.into_package and (args.format != "onnx" or not pkg.is_package(args.model) or args.output):
        parser.error("--into-package needs --format onnx, --model a package folder, and no --output")
    suffix = EXPORT_SUFFIXES[args.format]
    if args.output is not None and Path(args.output).suffix.lower() != suffix:
        parser.error(f"--output: {args.output} must end in {suffix} for --format {args.format}")
    default = "gman-model.onnx" if args.format == "onnx" else "gman-model.pt2"
    output = Path(args.output or default)
    if not args.into_package:
        check_output_path(output, "--output")
    forecaster = Forecaster.load(args.model, backend="torch")
    if args.into_package:
        with tempfile.TemporaryDirectory(prefix="gman-export-") as tmp:
            difference = export_onnx(forecaster, Path(tmp) / pkg.ONNX_FILE, check=not args.no_check)
            output = pkg.attach_onnx(args.model, Path(tmp) / pkg.ONNX_FILE)
    elif args.format == "onnx":
        difference = export_onnx(forecaster, output, check=not args.no_check)
    else:
        difference = export_torch(forecaster, output, check=not args.no_check)
    checked = "not checked" if difference is None else f"max abs difference vs PyTorch {difference:.2e}"
    print(f"{args.format} -> {output} ({checked})")
    return 0


def example_inputs(forecaster: "Forecaster", batch: int, seed: int = 0):
    """Raw readings [B, P, N] (about 10 % NaN) and valid time features [B, P+Q, 2] for tracing and checks."""
    import torch

    meta = forecaster.metadata
    generator = torch.Generator().manual_seed(seed)
    p, q, n = forecaster.history_steps, forecaster.horizon_steps, len(forecaster.sensor_ids)
    values = meta["scaler"]["mean"] + meta["scaler"]["std"] * torch.randn(batch, p, n, generator=generator)
    values[torch.rand(batch, p, n, generator=generator) < 0.1] = float("nan")
    start = torch.randint(0, 7 * forecaster.steps_per_day, (batch, 1), generator=generator)
    step = (start + torch.arange(p + q)) % (7 * forecaster.steps_per_day)
    time = torch.stack([step // forecaster.steps_per_day, step % forecaster.steps_per_day], dim=-1)
    return values.float(), time.long()


def _dynamic_batch():
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    return {"values": {0: batch}, "time": {0: batch}}


def _reference(forecaster: "Forecaster", values, time) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return forecaster.as_module()(values, time).numpy()


def export_onnx(forecaster: "Forecaster", path: Path, *, check: bool = True) -> float | None:
    """Write the ONNX graph (opset of the dynamo exporter, dynamic batch); returns the parity max abs difference."""
    import torch

    try:
        import onnx
    except ImportError:
        raise ConfigError("gman export --format onnx needs the optional extra: pip install 'gman[onnx]'") from None
    # The exporter logs a warning per torchvision operator it cannot register (torchvision is not a dependency).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    module = forecaster.as_module(fold=True)  # batch-norm folded: fewer nodes; checked against the plain network
    values, time = example_inputs(forecaster, batch=2)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter
        program = torch.onnx.export(
            module, (values, time), input_names=["values", "time"], output_names=["forecast"],
            dynamo=True, dynamic_shapes=_dynamic_batch(), verbose=False,
        )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {"gman.json": json.dumps(forecaster.metadata)})
    # checked under its temporary name: a graph that fails the check never replaces the file at path
    with _atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        if not check:
            return None
        try:
            import onnxruntime
        except ImportError:
            print("gman export: onnxruntime not installed; parity check skipped", file=sys.stderr)
            return None
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        values, time = example_inputs(forecaster, batch=3, seed=1)  # another batch size than traced
        (output,) = session.run(None, {"values": values.numpy(), "time": time.numpy()})
        return _check_parity(output, _reference(forecaster, values, time), path)


def export_torch(forecaster: "Forecaster", path: Path, *, check: bool = True) -> float | None:
    """Write a ``torch.export`` program (.pt2, dynamic batch); returns the parity max abs difference."""
    import torch

    module = forecaster.as_module()
    values, time = example_inputs(forecaster, batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (values, time), dynamic_shapes=_dynamic_batch())
    with _atomic_path(path) as tmp:  # checked under its temporary name, as export_onnx's graph
        torch.export.save(program, tmp, extra_files={"gman.json": json.dumps(forecaster.metadata)})
        if not check:
            return None
        loaded = torch.export.load(tmp).module()
        values, time = example_inputs(forecaster, batch=3, seed=1)
        with torch.inference_mode():
            output = loaded(values, time).numpy()
        return _check_parity(output, _reference(forecaster, values, time), path)


def _check_parity(output: np.ndarray, expected: np.ndarray, path: Path) -> float:
    difference = float(np.max(np.abs(output - expected)))
    if not difference <= PARITY_TOLERANCE:  # raised inside _atomic_path: the checked file is not kept
        raise DataError(f"{path}: exported graph differs from PyTorch by {difference:.3g} > {PARITY_TOLERANCE}")
    return difference
