"""`SensorDataset`: the one in-memory representation of a sensor data set.

Every reader (DCRNN h5, CSV, Parquet, PEMS0X npz, DataFrame, the built-in
synthetic network) produces one of these, and everything downstream (windows,
data module, evaluation, serving) consumes it.

    values  [T, N] float32   readings in data units; 0.0 wherever mask is False
    mask    [T, N] bool      True = observed reading
    index   [T]              regular, strictly increasing DatetimeIndex
    sensor_ids [N]           column order of values (strings)
    adjacency  [N, N]        float32 edge weights in sensor_ids order, 0 = no edge
    missing_value            the reading that meant "missing" in the source (None = only NaN)
    graph_node_ids [M >= N]  node order of the source graph file (SE files use it), if it differs;
                             it may hold nodes without data (``unmatched_sensors: drop``)

Time features follow the authors' protocol but derive the number of steps per
day from the interval (86400 s / interval s) instead of a hard-coded 288.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from gman.data.graph import repeated
from gman.errors import DataError

SECONDS_PER_DAY = 86_400


@dataclass
class SensorDataset:
    """Readings of N sensors over T regular time steps, plus their graph.

    Construction validates everything (shapes, dtypes, finiteness, a sorted
    regular index, a square adjacency of size N) and raises :class:`DataError`
    with a one-line message otherwise. Inputs are converted, not trusted:
    ``values`` becomes a C-contiguous float32 array with 0.0 at every masked
    position, ``mask`` a bool array, ``sensor_ids`` a list of unique strings.
    """

    values: np.ndarray
    mask: np.ndarray
    index: pd.DatetimeIndex
    sensor_ids: list[str]
    adjacency: np.ndarray | None = None
    name: str = "dataset"
    units: str = ""
    missing_value: float | None = 0.0
    graph_node_ids: list[str] | None = None
    # Only needed when the index has a single step (no interval can be read off it).
    interval_hint: pd.Timedelta | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        where = f"dataset {self.name!r}"
        values = np.asarray(self.values)
        if values.ndim != 2:
            raise DataError(f"{where}: values must be 2-D [time, sensors], got shape {values.shape}")
        if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
            raise DataError(f"{where}: values must be numeric, got dtype {values.dtype}")
        num_steps, num_nodes = values.shape
        if num_steps == 0 or num_nodes == 0:
            raise DataError(f"{where}: values are empty (shape {values.shape})")

        mask = np.asarray(self.mask)
        if mask.shape != values.shape:
            raise DataError(f"{where}: mask shape {mask.shape} differs from values shape {values.shape}")
        mask = mask.astype(bool, copy=False)

        values = np.array(values, dtype=np.float32, order="C", copy=True)
        observed = values[mask]
        if not np.isfinite(observed).all():
            bad = np.argwhere(mask & ~np.isfinite(values))[0]
            raise DataError(f"{where}: non-finite observed value {values[tuple(bad)]} at step {bad[0]}, sensor {bad[1]}")
        values[~mask] = 0.0  # the contract: masked positions hold 0.0
        self.values = values
        self.mask = np.ascontiguousarray(mask)

        self.index = _check_index(self.index, num_steps, where, self.interval_hint)
        self.sensor_ids = _check_sensor_ids(self.sensor_ids, num_nodes, where)
        if self.adjacency is not None:
            self.adjacency = _check_adjacency(self.adjacency, num_nodes, where)
        if self.graph_node_ids is not None:
            self.graph_node_ids = [str(s) for s in self.graph_node_ids]
            if len(set(self.graph_node_ids)) != len(self.graph_node_ids) or not set(self.sensor_ids) <= set(self.graph_node_ids):
                raise DataError(f"{where}: graph_node_ids must be unique and include every sensor id")

    # ------------------------------------------------------------------ sizes
    @property
    def num_steps(self) -> int:
        """T, the number of time steps."""
        return int(self.values.shape[0])

    @property
    def num_nodes(self) -> int:
        """N, the number of sensors."""
        return int(self.values.shape[1])

    @property
    def interval(self) -> pd.Timedelta:
        """The (single) step between consecutive timestamps."""
        if len(self.index) >= 2:
            return pd.Timedelta(self.index[1] - self.index[0])
        return pd.Timedelta(self.interval_hint)

    @property
    def interval_seconds(self) -> int:
        return int(self.interval.total_seconds())

    @property
    def steps_per_day(self) -> int:
        """86400 s / interval s (288 for 5-minute data)."""
        return SECONDS_PER_DAY // self.interval_seconds

    @property
    def missing_fraction(self) -> float:
        return float(1.0 - self.mask.mean())

    # --------------------------------------------------------- time features
    def time_features(self) -> np.ndarray:
        """[T, 2] int64: (day_of_week 0..6 with Monday = 0, time_of_day 0..steps_per_day-1).

        time_of_day = seconds since local midnight // interval seconds.
        """
        return time_features(self.index, self.interval)

    # ------------------------------------------------------------ utilities
    def slice(self, start: int, stop: int) -> "SensorDataset":
        """Steps [start, stop) as a new dataset (same sensors and graph)."""
        if not 0 <= start < stop <= self.num_steps:
            raise DataError(f"dataset {self.name!r}: bad step range [{start}, {stop}) for {self.num_steps} steps")
        return SensorDataset(
            values=self.values[start:stop],
            mask=self.mask[start:stop],
            index=self.index[start:stop],
            sensor_ids=list(self.sensor_ids),
            adjacency=self.adjacency,
            name=self.name,
            units=self.units,
            missing_value=self.missing_value,
            graph_node_ids=self.graph_node_ids,
            interval_hint=self.interval,
        )

    def select(self, sensor_ids: Sequence[str]) -> "SensorDataset":
        """These sensors, in this order, as a new dataset (graph rows and columns alike); others dropped.

        Raises :class:`DataError` naming the first id the data lacks.
        """
        position = {s: k for k, s in enumerate(self.sensor_ids)}
        wanted = [str(s) for s in sensor_ids]
        absent = [s for s in wanted if s not in position]
        if absent:
            raise DataError(f"dataset {self.name!r}: {len(absent)} of the {len(wanted)} sensors asked for are not "
                            f"in the data (first: {absent[0]!r})")
        columns = np.array([position[s] for s in wanted], dtype=np.int64)
        adjacency = None if self.adjacency is None else self.adjacency[np.ix_(columns, columns)]
        return SensorDataset(
            values=self.values[:, columns], mask=self.mask[:, columns], index=self.index, sensor_ids=wanted,
            adjacency=adjacency, name=self.name, units=self.units, missing_value=self.missing_value,
            # the graph's node order stays known (files indexed by node, e.g. a spatial embedding, map by it)
            graph_node_ids=self.graph_node_ids if self.graph_node_ids is not None else list(self.sensor_ids),
            interval_hint=self.interval,
        )

    def graph_order(self) -> np.ndarray:
        """[N] int64: position in ``graph_node_ids`` of each sensor (identity when there is none).

        Row ``graph_order()[i]`` of a node-index-ordered file (a word2vec SE) belongs to sensor i.
        """
        if self.graph_node_ids is None:
            return np.arange(self.num_nodes)
        position = {s: k for k, s in enumerate(self.graph_node_ids)}
        return np.array([position[s] for s in self.sensor_ids], dtype=np.int64)

    def to_frame(self) -> pd.DataFrame:
        """Wide DataFrame (index × sensor ids) with NaN at missing readings."""
        data = np.where(self.mask, self.values, np.nan).astype(np.float32)
        return pd.DataFrame(data, index=self.index, columns=list(self.sensor_ids))

    def summary(self) -> dict:
        """A few plain numbers describing the data set (for logs and cards)."""
        return {
            "name": self.name,
            "num_steps": self.num_steps,
            "num_nodes": self.num_nodes,
            "start": str(self.index[0]),
            "end": str(self.index[-1]),
            "interval_seconds": self.interval_seconds,
            "steps_per_day": self.steps_per_day,
            "missing_fraction": round(self.missing_fraction, 6),
            "num_edges": None if self.adjacency is None else int(np.count_nonzero(self.adjacency)),
            "units": self.units,
            "missing_value": self.missing_value,
        }


def time_features(index: pd.DatetimeIndex, interval: pd.Timedelta) -> np.ndarray:
    """[T, 2] int64 (day_of_week, time_of_day) of ``index`` at step ``interval``.

    Uses the wall-clock time of day (hours, minutes, seconds), so the result is
    the same whatever the index's resolution (ns or us) and for tz-aware indexes.
    """
    interval_seconds = int(pd.Timedelta(interval).total_seconds())
    seconds = index.hour.to_numpy() * 3600 + index.minute.to_numpy() * 60 + index.second.to_numpy()
    day_of_week = index.day_of_week.to_numpy().astype(np.int64)
    time_of_day = (seconds // interval_seconds).astype(np.int64)
    return np.stack([day_of_week, time_of_day], axis=1)


def checked_time_features(time, steps_per_day: int, name: str = "time", error: type[Exception] = ValueError) -> np.ndarray:
    """``time [..., 2]`` (day_of_week, time_of_day) pairs as int64, after checking what a model needs.

    An integer dtype (a float time of day would be read as its integer part, so 0.5
    of a day would be midnight), day_of_week in 0..6 and time_of_day in
    0..steps_per_day−1 (outside, the model's embedding look-up fails with a bare
    IndexError, or on a GPU with a device assertion).  ``error`` is raised with
    one line naming ``name``.
    """
    time = np.asarray(time)
    if time.dtype.kind not in "iu":
        raise error(f"{name}: must hold integer (day_of_week, time_of_day_index) pairs, got dtype {time.dtype}")
    if time.ndim == 0 or time.shape[-1] != 2:
        raise error(f"{name}: the last axis must hold (day_of_week, time_of_day_index) pairs, got shape {list(time.shape)}")
    for column, what, top in ((0, "day_of_week", 6), (1, "time_of_day_index", steps_per_day - 1)):
        part = time[..., column]
        if part.size and (part.min() < 0 or part.max() > top):
            bad = part.min() if part.min() < 0 else part.max()
            raise error(f"{name}: {what} (time[..., {column}]) must be in 0..{top}, got {bad}")
    return time.astype(np.int64, copy=False)


class MixedOffsetsError(ValueError):
    """Timestamps with different UTC offsets, and no time zone to write them in."""


def parse_timestamps(values, zone_for_mixed_offsets: str | None = None, *, errors: str = "raise"):
    """Timestamp strings or datetimes -> datetimes (a Series for a Series, an index otherwise),
    each value parsed on its own (``format="mixed"``).

    Values whose UTC offsets differ (a series across a daylight-saving change) are read as
    instants and written in ``zone_for_mixed_offsets``; without one they raise
    :class:`MixedOffsetsError`.  ``errors`` is pandas': "coerce" turns bad values into NaT.
    """
    try:
        parsed = pd.to_datetime(values, errors=errors, format="mixed")
        if pd.api.types.is_datetime64_any_dtype(parsed):
            return parsed
    except ValueError:  # pandas 3 raises on mixed offsets (pandas 2 returns object dtype)
        pass
    if zone_for_mixed_offsets is None:
        raise MixedOffsetsError("timestamps with different UTC offsets")
    parsed = pd.to_datetime(values, errors=errors, format="mixed", utc=True)
    if isinstance(parsed, pd.Series):
        return parsed.dt.tz_convert(zone_for_mixed_offsets)
    return parsed.tz_convert(zone_for_mixed_offsets)


def _check_index(index, num_steps: int, where: str, interval_hint) -> pd.DatetimeIndex:
    if not isinstance(index, pd.DatetimeIndex):
        try:
            index = pd.DatetimeIndex(index)
        except (TypeError, ValueError) as err:
            raise DataError(f"{where}: index is not a sequence of timestamps ({err})") from None
    if len(index) != num_steps:
        raise DataError(f"{where}: index has {len(index)} timestamps but values have {num_steps} steps")
    if index.hasnans:
        raise DataError(f"{where}: index contains missing timestamps (NaT)")
    if index.unit != "ns":  # one resolution everywhere (pandas 3 defaults to us, older files are ns)
        index = index.as_unit("ns")
    if num_steps >= 2:
        steps = np.diff(index.asi8)
        if (steps == 0).any():
            at = int(np.argmax(steps == 0)) + 1
            raise DataError(f"{where}: duplicate timestamp {index[at]} at step {at}")
        if (steps < 0).any():
            at = int(np.argmax(steps < 0)) + 1
            raise DataError(f"{where}: timestamps not sorted: {index[at]} after {index[at - 1]} at step {at}")
        if (steps != steps[0]).any():
            at = int(np.argmax(steps != steps[0])) + 1
            raise DataError(
                f"{where}: irregular interval: {index[at] - index[at - 1]} between {index[at - 1]} and {index[at]}"
                f" (expected {index[1] - index[0]}; the readers' fill_gaps option, gman data import --fill-gaps, turns missing timestamps into missing readings)"
            )
        interval = pd.Timedelta(index[1] - index[0])
    else:
        interval = interval_hint if interval_hint is not None else index.freq
        if interval is None:
            raise DataError(f"{where}: a single time step needs an interval (the interval option)")
        interval = pd.Timedelta(interval)
    seconds = interval.total_seconds()
    if seconds < 1 or seconds != int(seconds) or SECONDS_PER_DAY % int(seconds) != 0:
        raise DataError(f"{where}: interval {interval} must be a whole number of seconds that divides one day")
    return index


def _check_sensor_ids(sensor_ids, num_nodes: int, where: str) -> list[str]:
    ids = [str(s) for s in sensor_ids]
    if len(ids) != num_nodes:
        raise DataError(f"{where}: {len(ids)} sensor ids for {num_nodes} value columns")
    dupes = repeated(ids)
    if dupes:
        raise DataError(f"{where}: duplicate sensor ids {dupes[:5]}")
    return ids


def _check_adjacency(adjacency, num_nodes: int, where: str) -> np.ndarray:
    adjacency = np.asarray(adjacency)
    if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise DataError(f"{where}: adjacency must be square, got shape {adjacency.shape}")
    if adjacency.shape[0] != num_nodes:
        raise DataError(f"{where}: adjacency is {adjacency.shape[0]}x{adjacency.shape[0]} but there are {num_nodes} sensors")
    try:
        adjacency = np.array(adjacency, dtype=np.float32, order="C", copy=True)
    except (TypeError, ValueError):
        raise DataError(f"{where}: adjacency is not numeric (dtype {adjacency.dtype})") from None
    if not np.isfinite(adjacency).all():
        raise DataError(f"{where}: adjacency contains NaN or infinite weights")
    if (adjacency < 0).any():
        raise DataError(f"{where}: adjacency contains negative weights")
    return adjacency
