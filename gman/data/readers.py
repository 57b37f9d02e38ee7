"""Readers of traffic series -> :class:`SensorDataset`, behind one entry point.

``load_dataset(source, **options)``; ``source`` is one of

- ``"synthetic"``: the built-in network (options: those of :func:`make_synthetic`);
- a path; the format comes from the extension or ``format=``:

  | format       | file                                                                          |
  | ------------ | ----------------------------------------------------------------------------- |
  | ``h5``       | DCRNN ``metr-la.h5``: ``pd.read_hdf`` DataFrame, DatetimeIndex x sensor ids   |
  | ``csv``      | wide: a timestamp column (or ``start_time`` + ``interval``) and one column per sensor; |
  |              | a CSV with ``timestamp, sensor_id, value`` columns is read as long           |
  | ``long-csv`` | one reading per row: ``timestamp, sensor_id, value``                          |
  | ``parquet``  | wide (DatetimeIndex or timestamp column) or long, as for CSV                  |
  | ``npz``      | PEMS0X ``data`` array [T, N, F]: ``feature`` + ``start_time`` + ``interval``  |

- a pandas DataFrame (wide with a DatetimeIndex or timestamp column, or long);
- a dataset card name (``gman.data.registry.card_reader_options(name)`` gives the options;
  explicit options win, and a ``graph_path`` naming another file than the card's drops the card's
  ``graph_format``, ``graph_sensor_ids`` and ``unmatched_sensors``, which describe its own file).

Missing readings: NaN always (in CSV files: empty cells and pandas' NA words
such as ``NA``, ``N/A``, ``null``, ``NaN``), plus every reading equal to ``missing_value``
(default 0.0, the convention of METR-LA / PEMS-BAY; ``None`` = only NaN).
+/-Inf, other text in numeric columns, duplicate / unsorted timestamps and irregular
intervals are errors (``fill_gaps=True`` turns missing timestamps into missing
readings instead).

The graph (``graph_path``, ``graph_format``) is read by
:func:`gman.data.graph.load_adjacency` and matched to the data **by sensor id**:
the adjacency is reordered to the data's column order; a bare matrix without
ids is taken to be in the data's column order (or in ``graph_sensor_ids``).
Sensors in only one of the two are an error unless ``unmatched_sensors="drop"``,
which keeps the sensors in both (with a warning that counts the others) and
restricts the graph to them: the edges among the kept sensors stay as they
are, paths through dropped nodes are lost.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gman.data.dataset import MixedOffsetsError, SensorDataset, parse_timestamps
from gman.data.graph import id_text, repeated
from gman.errors import ConfigError, DataError, UnknownDatasetError

#: Options of file / DataFrame sources (``load_dataset`` keyword arguments).
READER_OPTIONS = {
    "values_path": "path of the series file (a card's data file; the source when source is None)",
    "format": "h5 | csv | long-csv | parquet | npz (default: from the extension)",
    "graph_path": "graph file (DCRNN pickle, dense CSV, edge list, distances)",
    "adjacency": "from Python, instead of graph_path: the graph as a square array in the data's sensor order "
                 "(or graph_sensor_ids'), or a square DataFrame whose index and columns are sensor ids",
    "graph_format": "dcrnn-pickle | dense-csv | edge-list | distance-csv | distance-matrix",
    "graph_sensor_ids": "the graph's nodes, a list or a text file of ids: the order of a bare adjacency matrix, the "
                        "row order of an edge list over node indices, or every sensor a distance file knows",
    "graph_threshold": "Gaussian kernel cut-off for distance graphs (default 0.1)",
    "unmatched_sensors": "sensors found in only one of data and graph: 'error' (default) or 'drop' "
                         "(keep the sensors in both; the graph is restricted to them)",
    "start_time": "timestamp of the first row, for files without timestamps",
    "interval": "time step, e.g. '5min' (required with start_time)",
    "missing_value": "reading that means 'missing' besides NaN (default 0.0; None = NaN only)",
    "feature": "npz: index or name (flow, occupancy, speed) of the feature to read",
    "key": "h5 key / npz array name",
    "sensor_ids": "ids for data that has none (npz): a list or a text file of ids",
    "header": "csv: False for a file without a header row (PeMSD7(M) V_228.csv); ids then come from sensor_ids or are 0..N-1",
    "timestamp_column": "name of the timestamp column (default: detected)",
    "sensor_column": "long format: sensor id column (default sensor_id)",
    "value_column": "long format: value column (default value)",
    "fill_gaps": "turn missing timestamps into missing readings instead of an error (default False)",
    "timezone": "IANA time zone (e.g. America/Los_Angeles) the timestamps are converted to (tz-aware ones, "
                "or ones whose UTC offset changes with daylight saving time) or taken to be in (naive ones); "
                "the time of day and day of week are read in it",
    "name": "data set name (default: file stem or card name)",
    "units": "units of the readings, e.g. mph",
}

#: Card options that describe the card's own graph file (dropped when graph_path names another one).
_CARD_GRAPH_FILE_OPTIONS = ("graph_format", "graph_sensor_ids", "unmatched_sensors")

VALUE_FORMATS = ("h5", "csv", "long-csv", "parquet", "npz")
_EXTENSIONS = {
    ".h5": "h5", ".hdf5": "h5", ".hdf": "h5",
    ".csv": "csv", ".txt": "csv",
    ".parquet": "parquet", ".pq": "parquet",
    ".npz": "npz",
}
_TIMESTAMP_NAMES = ("timestamp", "time", "datetime", "date", "")
_NPZ_FEATURES = {"flow": 0, "occupancy": 1, "speed": 2}


@dataclass
class _Table:
    """A series as read, before validation: values [T, N] float64 (NaN = missing)."""

    values: np.ndarray
    index: pd.DatetimeIndex | None
    sensor_ids: list[str] | None  # None: the file has no ids (npz)


# ============================================================================ entry point

def load_dataset(source: Any = None, **options) -> SensorDataset:
    """Load a :class:`SensorDataset` from ``source`` (see the module docstring)."""
    if isinstance(source, SensorDataset):
        if options:
            raise ConfigError(f"load_dataset: a SensorDataset is used as it is; reader options ({', '.join(options)}) "
                              "do not apply to it")
        return source
    if isinstance(source, pd.DataFrame):
        _check_keys(options, READER_OPTIONS, "DataFrame")
        return _load_table_source(source, "DataFrame", options)
    if source is None:
        if options.get("values_path") is None:
            raise ConfigError("load_dataset: give a source (path, card name, 'synthetic' or DataFrame) or values_path")
        source = options.pop("values_path")
    if isinstance(source, str) and source == "synthetic":
        return _load_synthetic(options)
    if isinstance(source, Path) or source_is_path(str(source)):
        _check_keys(options, READER_OPTIONS, str(source))
        if options.get("values_path") is not None:
            raise ConfigError(f"values_path: given together with the path source {source!r}; give one")
        options.pop("values_path", None)
        return _load_table_source(Path(source), str(source), options)
    return _load_card(str(source), options)


# the data settings (``GMANDataModule`` arguments, a run config's ``data`` section) that are reader options
_SETTINGS_READER_KEYS = ("values_path", "format", "graph_path", "graph_format", "graph_sensor_ids",
                         "start_time", "interval", "feature", "name", "units")


def settings_reader_options(settings: dict[str, Any]) -> dict[str, Any]:
    """The ``load_dataset`` options that data settings give (a ``GMANDataModule``'s arguments, or the
    ``data`` section of a run's config): its reader keys that are set, ``missing_value`` unless
    ``"auto"``, and the ``options`` mapping (a key given both ways is a :class:`ConfigError`)."""
    options = {key: settings[key] for key in _SETTINGS_READER_KEYS if settings.get(key) is not None}
    if settings.get("missing_value", "auto") != "auto":
        options["missing_value"] = settings["missing_value"]
    for key, value in (settings.get("options") or {}).items():
        if key in options:
            raise ConfigError(f"data.options: {key!r} is also set as data.{key}; set it once")
        options[key] = value
    return options


def source_is_path(text: str) -> bool:
    """Whether a dataset source string names a file (else a card): a path separator or a data file
    extension says so; a bare name is a card when a card of that name exists, even if a file or
    folder of the same name sits in the working directory, and a path only when it exists."""
    if "/" in text or "\\" in text or Path(text).suffix.lower() in _EXTENSIONS:
        return True
    if not Path(text).exists():
        return False
    try:
        from gman.data.registry import card_names
    except ModuleNotFoundError:
        return True
    return text not in card_names()


def _load_synthetic(options: dict) -> SensorDataset:
    from gman.data.synthetic import make_synthetic

    allowed = {name: "" for name in inspect.signature(make_synthetic).parameters}
    # unset (None) reader options are ignored; the synthetic data's missing value is 0
    options = {k: v for k, v in options.items() if not (v is None and k in READER_OPTIONS)}
    if options.get("missing_value", 0.0) == 0.0:
        options.pop("missing_value", None)
    _check_keys(options, allowed, "synthetic")
    return make_synthetic(**options)


def _load_card(name: str, options: dict) -> SensorDataset:
    try:
        from gman.data.registry import card_reader_options
    except ModuleNotFoundError as err:  # the registry module is optional for plain files
        if err.name != "gman.data.registry":
            raise
        raise DataError(f"{name}: not a file, and no dataset cards are available") from None
    try:
        card_options = dict(card_reader_options(name))
    except UnknownDatasetError as err:  # perhaps meant as a file
        raise DataError(f"{err}; as a data file it is not found (a path needs a '/', a data file extension, "
                        "or to exist)") from None
    card_options.setdefault("name", name)
    card_options.pop("split", None)  # a card's split is the data module's business
    own_graph = card_options.get("graph_path")
    if options.get("graph_path") is not None and (
        own_graph is None or Path(options["graph_path"]).resolve() != Path(own_graph).resolve()
    ):
        # another graph file: how the card's file is read (its format, its node list, its
        # unmatched nodes) does not describe it; unless given, they come from the new file
        for key in _CARD_GRAPH_FILE_OPTIONS:
            card_options.pop(key, None)
    # explicit options win over the card's, except unset (None) ones; missing_value=None means "only NaN"
    card_options.update({k: v for k, v in options.items() if v is not None or k == "missing_value"})
    _check_keys(card_options, READER_OPTIONS, f"dataset card {name!r}")
    values_path = card_options.pop("values_path", None)
    if values_path is None:
        raise ConfigError(f"dataset card {name!r}: gives no values_path")
    return _load_table_source(Path(values_path), str(values_path), card_options)


def _check_keys(options: dict, allowed, where: str) -> None:
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown option {unknown[0]!r}; known: {', '.join(sorted(allowed))}")


# ============================================================================ files and frames

def _load_table_source(source, where: str, options: dict) -> SensorDataset:
    """Read a path or DataFrame, then validate, mask, attach the graph."""
    options = {k: v for k, v in options.items() if v is not None or k == "missing_value"}
    if isinstance(source, pd.DataFrame):
        table = _read_frame(source, where, options)
        default_name = "dataframe"
    else:
        table = _read_file(source, options)
        default_name = source.stem
    return _finish(table, where, options, default_name)


def _read_file(path: Path, options: dict) -> _Table:
    fmt = options.get("format") or _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: cannot tell the format from the extension; give format= one of {', '.join(VALUE_FORMATS)}")
    if fmt not in VALUE_FORMATS:
        raise ConfigError(f"format: unknown value {fmt!r} for {path}; choose from {', '.join(VALUE_FORMATS)}")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    where = str(path)
    if fmt == "npz":
        return _read_npz(path, options)
    try:
        if fmt == "h5":
            frame = pd.read_hdf(path, key=options.get("key"))
        elif fmt == "parquet":
            frame = pd.read_parquet(path)
        else:
            sensor_column = options.get("sensor_column", "sensor_id")  # long format: ids as text ("007" stays)
            frame = pd.read_csv(path, skipinitialspace=True, header=0 if options.get("header", True) else None,
                                dtype={sensor_column: str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except Exception as err:  # corrupt files raise all sorts (HDF5ExtError, ArrowInvalid, ParserError, ...)
        raise DataError(f"{path}: cannot read as {fmt} ({type(err).__name__}: {_first_line(err)})") from None
    if fmt in ("csv", "long-csv") and options.get("header", True):
        check_csv_header(path, "for a file without a header row give header: false "
                               "(gman data import --no-header) and sensor_ids")
    if isinstance(frame, pd.Series):
        frame = frame.to_frame()
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{path}: expected a table, got {type(frame).__name__}")
    if fmt == "long-csv":
        return _read_long(frame, where, options)
    table = _read_frame(frame, where, options)
    if not options.get("header", True):
        table.sensor_ids = None  # positions, not ids: sensor_ids= or the node index names them
    return table


def check_csv_header(path: Path, no_header_hint: str) -> None:
    """Refuse a CSV header row that pandas would quietly mend: a repeated column name (pandas renames
    the copy ``x.1``, which then looks like another sensor) and a first row of readings (a file without
    a header row; a leading timestamp cell is allowed).  ``no_header_hint`` ends the second message."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
            header = next(csv.reader(handle), None)
    except (OSError, csv.Error):
        return  # pandas reports the problem
    if not header:
        return
    cells = [cell.strip() for cell in header]
    # readings first: a row of readings often repeats a value, and "column named twice" would mislead
    readings = [cell for cell in (cells[1:] if _is_timestamp(cells[0]) else cells) if cell]
    if readings and all(_is_fractional_number(cell) for cell in readings):
        shown = ", ".join(cells[:3]) + (", ..." if len(cells) > 3 else "")
        raise DataError(f"{path}: the first row ({shown}) holds readings, not column names; {no_header_hint}")
    first: dict[str, int] = {}
    for i, cell in enumerate(cells):
        if cell and cell in first:
            raise DataError(f"{path}: the header names column {cell!r} twice (columns {first[cell] + 1} and {i + 1}); "
                            "each sensor needs exactly one column")
        first.setdefault(cell, i)


def _is_fractional_number(cell: str) -> bool:
    """A number written with a decimal point or exponent (a reading; sensor ids are whole numbers or text)."""
    try:
        float(cell)
    except ValueError:
        return False
    return any(mark in cell for mark in ".eE") and cell.lower().lstrip("+-") not in ("inf", "infinity", "nan")


def _is_timestamp(cell: str) -> bool:
    if _is_fractional_number(cell) or cell.lstrip("+-").isdigit():
        return False
    try:
        pd.Timestamp(cell)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def _read_frame(frame: pd.DataFrame, where: str, options: dict) -> _Table:
    """A wide or long DataFrame -> _Table."""
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise DataError(f"{where}: no data rows or columns")
    columns = [str(c) for c in frame.columns]
    sensor_column = options.get("sensor_column", "sensor_id")
    value_column = options.get("value_column", "value")
    if not isinstance(frame.index, pd.DatetimeIndex) and sensor_column in columns and value_column in columns:
        return _read_long(frame, where, options)
    return _read_wide(frame, where, options)


def _read_wide(frame: pd.DataFrame, where: str, options: dict) -> _Table:
    frame = frame.copy(deep=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    timestamp_column = options.get("timestamp_column")
    index = None
    if timestamp_column is not None:
        if timestamp_column not in frame.columns:
            raise DataError(f"{where}: no timestamp column {timestamp_column!r}")
    elif isinstance(frame.index, pd.DatetimeIndex):
        index = frame.index
    elif "start_time" not in options:
        first = frame.columns[0]
        first_is_text = not pd.api.types.is_numeric_dtype(frame[first])
        if first.lower() in _TIMESTAMP_NAMES or first.startswith("Unnamed") or first_is_text:
            timestamp_column = first
        else:
            raise DataError(
                f"{where}: no timestamp column (first column {first!r} is numeric); "
                "give timestamp_column, or start_time and interval"
            )
    elif frame.columns[0].lower() in _TIMESTAMP_NAMES:
        raise ConfigError(f"start_time: given, but {where} has its own timestamps (column {frame.columns[0]!r})")
    if timestamp_column is not None:
        index = pd.DatetimeIndex(_parse_timestamps(frame[timestamp_column], where, timestamp_column, options))
        frame = frame.drop(columns=[timestamp_column])
    if frame.shape[1] == 0:
        raise DataError(f"{where}: no sensor columns")
    unnamed = [c for c in frame.columns if c.startswith("Unnamed: ") or c == ""]
    if unnamed:
        raise DataError(
            f"{where}: column {unnamed[0]!r} has no name in the header (a row-number column, or a trailing comma?); "
            "remove it or name it"
        )
    ids = [id_text(c) for c in frame.columns]
    duplicates = repeated(ids)
    if duplicates:
        raise DataError(f"{where}: sensor id {duplicates[0]!r} names two columns")
    values = _numeric_values(frame, where)
    return _Table(values, index, ids)


def _read_long(frame: pd.DataFrame, where: str, options: dict) -> _Table:
    """timestamp, sensor_id, value rows -> wide; absent (timestamp, sensor) pairs are missing."""
    frame = frame.copy(deep=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    sensor_column = options.get("sensor_column", "sensor_id")
    value_column = options.get("value_column", "value")
    timestamp_column = options.get("timestamp_column")
    if timestamp_column is None:
        timestamp_column = next((c for c in frame.columns if c.lower() in _TIMESTAMP_NAMES), None)
    for role, column in (("timestamp", timestamp_column), ("sensor", sensor_column), ("value", value_column)):
        if column is None or column not in frame.columns:
            raise DataError(f"{where}: long format needs a {role} column (have {list(frame.columns)[:6]})")
    if frame.shape[0] == 0:
        raise DataError(f"{where}: no data rows")
    timestamps = _parse_timestamps(frame[timestamp_column], where, timestamp_column, options)
    values = _numeric_values(frame[[value_column]], where)[:, 0]
    long = pd.DataFrame({timestamp_column: timestamps, sensor_column: frame[sensor_column].to_numpy(),
                         value_column: values})
    wide = pivot_long(long, timestamp_column, sensor_column, value_column, where).sort_index()
    return _Table(wide.to_numpy(dtype=np.float64), pd.DatetimeIndex(wide.index), list(wide.columns))


def pivot_long(frame: pd.DataFrame, time_column: str, sensor_column: str, value_column: str, where: str,
               error: type[Exception] = DataError) -> pd.DataFrame:
    """Rows of (time, sensor, value) -> a wide frame: time x sensor id (as text, in order of first
    appearance), NaN where a pair has no row; not sorted.  An empty sensor id, or two readings of one
    sensor at one time, is a one-line ``error`` naming ``where``.  The data readers and ``gman predict``'s
    long histories share it."""
    if frame[sensor_column].isna().any():
        row = int(np.argmax(frame[sensor_column].isna().to_numpy()))
        raise error(f"{where}: empty {sensor_column!r} in data row {row + 1}")
    frame = frame.assign(**{sensor_column: frame[sensor_column].map(id_text)})
    duplicated = frame.duplicated([time_column, sensor_column])
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        raise error(f"{where}: two readings for sensor {row[sensor_column]!r} at {row[time_column]}")
    wide = frame.pivot(index=time_column, columns=sensor_column, values=value_column)
    wide = wide.reindex(columns=list(pd.unique(frame[sensor_column])))
    wide.columns.name = None
    return wide


def _read_npz(path: Path, options: dict) -> _Table:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:
        raise DataError(f"{path}: cannot read as npz ({type(err).__name__}: {_first_line(err)})") from None
    with archive:
        keys = list(archive.files)
        key = options.get("key") or ("data" if "data" in keys else (keys[0] if len(keys) == 1 else None))
        if key is None:
            raise DataError(f"{path}: no array 'data' in the npz and several others ({keys[:5]}); give key=")
        if key not in keys:
            raise DataError(f"{path}: no array {key!r} in the npz (has {keys[:5]}); give key=")
        try:
            array = archive[key]
        except Exception as err:
            raise DataError(f"{path}: cannot read array {key!r} ({_first_line(err)})") from None
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{path}: array {key!r} is not numeric (dtype {array.dtype})")
    if array.ndim == 3:
        feature = options.get("feature", 0)
        if isinstance(feature, str) and not feature.lstrip("-").isdigit():
            if feature not in _NPZ_FEATURES or array.shape[2] != 3:
                raise ConfigError(f"feature: {feature!r} unknown for {path} with {array.shape[2]} features; give an index")
            feature = _NPZ_FEATURES[feature]
        feature = int(feature)
        if not 0 <= feature < array.shape[2]:
            raise ConfigError(f"feature: index {feature} out of range for {path} with {array.shape[2]} features")
        array = array[:, :, feature]
    elif array.ndim != 2:
        raise DataError(f"{path}: array {key!r} must be [T, N] or [T, N, F], got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{path}: array {key!r} is empty (shape {array.shape})")
    if "start_time" not in options:
        raise DataError(f"{path}: an npz file holds no timestamps; give start_time and interval")
    return _Table(array.astype(np.float64), None, None)


# ============================================================================ validation

def _finish(table: _Table, where: str, options: dict, default_name: str) -> SensorDataset:
    values = table.values
    index = table.index
    interval = _parse_interval(options.get("interval"), where)
    if index is None:
        start_time = options.get("start_time")
        if start_time is None or interval is None:
            raise DataError(f"{where}: the data has no timestamps; give start_time and interval")
        try:
            start = pd.Timestamp(start_time)
        except (TypeError, ValueError):
            raise ConfigError(f"start_time: cannot parse {start_time!r} as a timestamp") from None
        index = pd.date_range(start, periods=values.shape[0], freq=interval)
    elif options.get("start_time") is not None:
        raise ConfigError(f"start_time: given, but {where} has its own timestamps")
    index = pd.DatetimeIndex(index)
    if index.hasnans:
        raise DataError(f"{where}: empty timestamp at row {int(np.argmax(index.isna())) + 1}")
    if options.get("timezone") is not None:
        index = _in_timezone(index, options["timezone"], where)
    if index.unit != "ns":  # pandas 3 writes h5 indexes as datetime64[us]; older files are [ns]
        index = index.as_unit("ns")

    if interval is not None and len(index) >= 2 and not options.get("fill_gaps"):
        actual = pd.Timedelta(index[1] - index[0])
        if actual != interval:
            raise DataError(f"{where}: interval is {actual} in the file but {interval} was given")
    if options.get("fill_gaps"):
        values, index = _fill_gaps(values, index, interval, where)

    # readings are stored as float32: a finite float64 beyond its range would become inf there
    infinite = np.isinf(values) | (np.abs(np.nan_to_num(values)) > np.finfo(np.float32).max)
    if infinite.any():
        t, n = np.argwhere(infinite)[0]
        sensor = repr(table.sensor_ids[n]) if table.sensor_ids else f"column {n}"
        what = "infinite value" if np.isinf(values[t, n]) else "value beyond float32's range"
        raise DataError(f"{where}: {what} {values[t, n]} at {index[t]}, sensor {sensor}")

    mask = ~np.isnan(values)
    missing_value = options.get("missing_value", 0.0)
    if missing_value is not None:
        try:
            missing_value = float(missing_value)
        except (TypeError, ValueError):
            raise ConfigError(f"missing_value: expected a number or None, got {missing_value!r}") from None
        mask &= values != missing_value
    values = np.where(mask, values, 0.0)

    sensor_ids = table.sensor_ids
    if sensor_ids is not None and options.get("sensor_ids") is not None:
        raise ConfigError(f"sensor_ids: given, but {where} names its sensors itself (for a CSV without a header row "
                          "give header: false)")
    if sensor_ids is None and options.get("sensor_ids") is not None:
        sensor_ids = _read_id_list(options["sensor_ids"], "sensor_ids")
        if len(sensor_ids) != values.shape[1]:
            raise DataError(f"{where}: {len(sensor_ids)} sensor_ids given for {values.shape[1]} sensors")
    adjacency, graph_node_ids = None, None
    if options.get("graph_path") is not None and options.get("adjacency") is not None:
        raise ConfigError("adjacency: given together with graph_path; give one")
    if options.get("graph_path") is not None or options.get("adjacency") is not None:
        adjacency, sensor_ids, graph_node_ids, kept = _match_graph(sensor_ids, values.shape[1], where, options)
        if kept is not None:
            values, mask = values[:, kept], mask[:, kept]
    if sensor_ids is None:
        sensor_ids = [str(i) for i in range(values.shape[1])]  # PEMS0X convention: node index

    name = str(options.get("name") or default_name)
    try:
        return SensorDataset(
            values=values,
            mask=mask,
            index=index,
            sensor_ids=sensor_ids,
            adjacency=adjacency,
            name=name,
            units=str(options.get("units", "")),
            missing_value=missing_value,
            graph_node_ids=graph_node_ids,
            interval_hint=interval,  # the interval option: what a single time step cannot show
        )
    except DataError as err:
        message = str(err).removeprefix(f"dataset {name!r}: ")
        raise DataError(f"{where}: {message}") from None


def _match_graph(data_ids: list[str] | None, num_nodes: int, where: str, options: dict):
    """(adjacency in the data's sensor order, the data's sensor ids, the graph's node order or None,
    the data columns kept or None for all)."""
    from gman.data.graph import load_adjacency

    in_memory = options.get("adjacency")
    graph_path = Path(options["graph_path"]) if in_memory is None else "adjacency"
    unmatched = options.get("unmatched_sensors", "error")
    if unmatched not in ("error", "drop"):
        raise ConfigError(f"unmatched_sensors: expected 'error' or 'drop', got {unmatched!r}")
    kwargs = {}
    if options.get("graph_threshold") is not None:
        threshold = options["graph_threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ConfigError(f"graph_threshold: expected a Gaussian-kernel weight cut-off in [0, 1), got {threshold!r}")
        kwargs["threshold"] = float(threshold)
    # Data without ids (npz) are in node-index order: ids "0".."N-1" unless the graph names its nodes.
    index_ids = [str(i) for i in range(num_nodes)]
    if options.get("graph_sensor_ids") is not None:
        kwargs["id_map"] = _read_id_list(options["graph_sensor_ids"], "graph_sensor_ids")
    if in_memory is not None:
        adjacency, graph_ids = _adjacency_in_memory(in_memory, kwargs.get("id_map"))
    else:
        adjacency, graph_ids = load_adjacency(
            graph_path, format=options.get("graph_format"), sensor_ids=data_ids or index_ids, **kwargs
        )
    if adjacency.shape[0] != num_nodes and (graph_ids is None or data_ids is None):
        raise DataError(
            f"{where} and {graph_path}: the data has {num_nodes} sensors but the graph has {adjacency.shape[0]}"
        )
    if graph_ids is None:  # a bare matrix: in the data's column order
        return adjacency, data_ids, None, None
    graph_ids = [str(s) for s in graph_ids]
    if data_ids is None:  # data without ids (npz): in the graph's node order
        return adjacency, graph_ids, None, None
    in_graph, in_data = set(graph_ids), set(data_ids)
    only_data = [s for s in data_ids if s not in in_graph]
    only_graph = [s for s in graph_ids if s not in in_data]
    kept = None
    if only_data or only_graph:
        counts = (f"{len(only_data)} only in the data (e.g. {only_data[:3]}), "
                  f"{len(only_graph)} only in the graph (e.g. {only_graph[:3]})")
        if unmatched == "error":
            hint = ""
            if only_data and not only_graph and "id_map" not in kwargs:
                hint = " (a file of edges or distances names a sensor only in its rows: list sensors without edges in graph_sensor_ids)"
            raise DataError(
                f"{where} and {graph_path}: sensor ids differ: {counts}; "
                f"unmatched_sensors: drop keeps the sensors in both{hint}"
            )
        kept = np.array([i for i, s in enumerate(data_ids) if s in in_graph], dtype=np.int64)
        if len(kept) == 0:
            raise DataError(f"{where} and {graph_path}: no sensor id in common ({counts})")
        warnings.warn(
            f"{where} and {graph_path}: unmatched_sensors drop: kept the {len(kept)} sensors in both, dropped {counts}",
            stacklevel=2,
        )
        data_ids = [data_ids[i] for i in kept]
    position = {s: i for i, s in enumerate(graph_ids)}
    order = np.array([position[s] for s in data_ids])
    same_order = kept is None and bool((order == np.arange(len(order))).all())
    return adjacency[np.ix_(order, order)], data_ids, None if same_order else graph_ids, kept


def _adjacency_in_memory(adjacency, id_map: list[str] | None) -> tuple[np.ndarray, list[str] | None]:
    """The ``adjacency`` option: (a float32 [M, M] matrix, its node ids or None for the data's order)."""
    if isinstance(adjacency, pd.DataFrame):
        ids = [id_text(c) for c in adjacency.columns]
        if [id_text(i) for i in adjacency.index] != ids:
            raise DataError("adjacency: a DataFrame graph needs the same sensor ids, in the same order, as index and columns")
        if id_map is not None:
            raise ConfigError("graph_sensor_ids: a DataFrame adjacency names its nodes itself")
        matrix, nodes = adjacency.to_numpy(), ids
    else:
        matrix, nodes = np.asarray(adjacency), id_map
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not np.issubdtype(matrix.dtype, np.number):
        raise DataError(f"adjacency: expected a square numeric matrix, got shape {matrix.shape}, dtype {matrix.dtype}")
    if nodes is not None and len(nodes) != matrix.shape[0]:
        raise DataError(f"adjacency: {matrix.shape[0]} rows but {len(nodes)} graph_sensor_ids")
    twice = repeated(nodes) if nodes is not None else []
    if twice:
        raise DataError(f"adjacency: sensor id {twice[0]!r} names two nodes")
    return matrix.astype(np.float32), nodes


def _fill_gaps(values: np.ndarray, index: pd.DatetimeIndex, interval, where: str):
    """Reindex to a full regular range; new rows are NaN (missing)."""
    if len(index) < 2:
        return values, index
    if not index.is_monotonic_increasing or index.has_duplicates:
        raise DataError(f"{where}: timestamps are not sorted and unique; cannot fill gaps")
    given = interval is not None
    if not given:  # the most common step: one stray timestamp must not set the grid
        steps, counts = np.unique(np.diff(index.asi8), return_counts=True)
        interval = pd.Timedelta(int(steps[np.argmax(counts)]), unit="ns")
    full = pd.date_range(index[0], index[-1], freq=interval)
    off_grid = ~index.isin(full)
    if off_grid.any():
        grid = f"{interval} grid" if given else f"{interval} grid (the most common step; give interval to set it)"
        raise DataError(f"{where}: timestamp {index[off_grid][0]} is not on the {grid} from {index[0]}")
    frame = pd.DataFrame(values, index=index).reindex(full)
    return frame.to_numpy(dtype=np.float64), full


def _numeric_values(frame: pd.DataFrame, where: str) -> np.ndarray:
    """[T, N] float64; a non-numeric cell is an error naming its column and row."""
    numeric = frame.apply(pd.to_numeric, errors="coerce") if not all(
        pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype) for dtype in frame.dtypes
    ) else frame
    values = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
    if numeric is not frame:
        text = numeric.isna().to_numpy() & frame.notna().to_numpy()
        if text.any():
            row, col = np.argwhere(text)[0]
            raise DataError(
                f"{where}: non-numeric value {frame.iat[row, col]!r} in column {frame.columns[col]!r}, data row {row + 1}"
            )
    return values


def _parse_timestamps(column: pd.Series, where: str, name: str, options: dict) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(column):
        return column
    if pd.api.types.is_numeric_dtype(column):  # pandas would read them as nanoseconds since 1970
        raise DataError(
            f"{where}: column {name!r} holds numbers ({column.iloc[0]!r}, ...), not timestamps; write them as "
            "dates and times, or drop the column and give start_time and interval"
        )
    try:  # changing offsets are read in UTC here; _finish converts them to the timezone option
        parsed = parse_timestamps(column, None if options.get("timezone") is None else "UTC", errors="coerce")
    except MixedOffsetsError:
        raise DataError(
            f"{where}: column {name!r} holds timestamps with different UTC offsets (daylight saving time?); "
            "give the timezone option, e.g. timezone: America/Los_Angeles"
        ) from None
    bad = parsed.isna() & column.notna()
    if bad.any():
        row = int(np.argmax(bad.to_numpy()))
        raise DataError(f"{where}: cannot parse {column.iloc[row]!r} in column {name!r}, data row {row + 1} as a timestamp")
    return parsed


def _in_timezone(index: pd.DatetimeIndex, timezone: Any, where: str) -> pd.DatetimeIndex:
    """``index`` converted to (tz-aware) or localised in (naive) the ``timezone`` option."""
    try:
        pd.Timestamp(0, tz=str(timezone))
    except Exception:  # noqa: BLE001 - pandas raises several kinds for an unknown zone
        raise ConfigError(f"timezone: {timezone!r} is not a time zone name (e.g. UTC, America/Los_Angeles)") from None
    if index.tz is not None:
        return index.tz_convert(str(timezone))
    try:
        return index.tz_localize(str(timezone), ambiguous="infer", nonexistent="raise")
    except Exception as err:  # noqa: BLE001 - AmbiguousTimeError, NonExistentTimeError, ValueError
        raise DataError(f"{where}: naive timestamps cannot be placed in {timezone}: {_first_line(err)}") from None


def _parse_interval(interval, where: str) -> pd.Timedelta | None:
    if interval is None:
        return None
    try:
        if isinstance(interval, (int, float, np.integer, np.floating)):
            value = pd.Timedelta(seconds=float(interval))
        else:
            value = pd.Timedelta(interval)
    except (TypeError, ValueError):
        raise ConfigError(f"interval: cannot parse {interval!r} (use e.g. '5min' or seconds)") from None
    if value <= pd.Timedelta(0):
        raise ConfigError(f"interval: must be positive, got {interval!r}")
    return value


def _read_id_list(ids, option: str) -> list[str]:
    if isinstance(ids, (list, tuple)):
        return [id_text(s) for s in ids]
    from gman.data.graph import read_sensor_ids

    return read_sensor_ids(ids)




def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
