"""The built-in synthetic network: reproducible, realistic in shape, and it rewards spatial modelling."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gman.data.readers import load_dataset
from gman.data.synthetic import make_synthetic, make_synthetic_network
from gman.data.windows import chronological_split
from gman.errors import ConfigError


@pytest.fixture(scope="module")
def default():
    return make_synthetic()


def test_default_size_units_and_time_axis(default):
    assert (default.num_steps, default.num_nodes) == (28 * 288, 64)
    assert default.index[0] == pd.Timestamp("2023-10-02 00:00") and default.index[0].dayofweek == 0
    assert default.interval == pd.Timedelta("5min") and default.units == "mph" and default.name == "synthetic"
    assert default.sensor_ids[0] == "A01" and len(set(default.sensor_ids)) == 64
    observed = default.values[default.mask]
    assert 3.0 <= observed.min() and observed.max() <= 85.0
    assert 60.0 < np.median(observed) < 68.0  # mostly free flow at ~65 mph
    train_stop = chronological_split(default.num_steps)[0][1]
    assert train_stop >= 7 * 288  # a full week of time-of-week slots in the training part


def test_reproducible_checksums_and_seed_dependence(default):
    again = make_synthetic(seed=0)
    assert np.array_equal(default.values, again.values) and np.array_equal(default.mask, again.mask)
    # Pinned values: a change of the generator must be deliberate (and then update these).
    assert int(default.mask.sum()) == 491678
    assert np.allclose(default.values[1000, :4], [68.71513, 65.231255, 61.465565, 57.019653], rtol=1e-5)
    assert np.isclose(default.values.sum(dtype=np.float64), 29952836.02, rtol=1e-6)
    other = make_synthetic(seed=1)
    assert not np.array_equal(default.values, other.values)
    # The network does not depend on the length of the series.
    short = make_synthetic(seed=0, days=2)
    assert short.sensor_ids == default.sensor_ids and np.array_equal(short.adjacency, default.adjacency)


def test_missing_readings_are_zero_and_include_whole_hour_outages(default):
    missing = ~default.mask
    assert 0.03 < missing.mean() < 0.06
    assert (default.values[missing] == 0).all()
    # Outages of whole hours: some gap of >= 12 steps that starts exactly on the hour.
    starts = missing[1:] & ~missing[:-1]
    step_of_hour = (np.arange(1, default.num_steps) % 12)[:, None]
    long_gap_on_hour = False
    for t, n in zip(*np.nonzero(starts & (step_of_hour == 0))):
        if missing[t + 1 : t + 13, n].all():
            long_gap_on_hour = True
            break
    assert long_gap_on_hour


def test_daily_and_weekly_profiles(default):
    speeds = np.where(default.mask, default.values, np.nan)
    features = default.time_features()
    weekday, hour = features[:, 0] < 5, features[:, 1] // 12
    night = np.nanmean(speeds[weekday & (hour == 3)])
    am_peak = np.nanmean(speeds[weekday & (hour == 8)])
    pm_peak = np.nanmean(speeds[weekday & (hour == 18)])
    weekend_morning = np.nanmean(speeds[~weekday & (hour == 8)])
    assert am_peak < night - 8 and pm_peak < night - 8
    assert weekend_morning > am_peak + 8  # lighter weekends


def test_graph_is_directed_downstream_with_gaussian_weights(default):
    network = make_synthetic_network(seed=0)
    adjacency = default.adjacency
    assert np.allclose(np.diag(adjacency), 1.0)
    off = (adjacency > 0) & ~np.eye(64, dtype=bool)
    assert off.any() and not np.array_equal(off, off.T)  # one-way roads
    assert np.isfinite(network.distance_km[off]).all()  # an edge only where j is downstream of i
    assert (adjacency[off] >= 0.1).all() and (adjacency[off] < 1).all()
    # B merges into A: the last B sensor has A sensors as downstream neighbours.
    last_b = max(i for i, s in enumerate(default.sensor_ids) if s.startswith("B"))
    assert any(default.sensor_ids[j].startswith("A") for j in np.flatnonzero(off[last_b]))


def test_options_and_load_dataset_entry_point():
    small = load_dataset("synthetic", seed=3, num_sensors=20, days=2, interval_minutes=15)
    assert (small.num_steps, small.num_nodes, small.steps_per_day) == (192, 20, 96)
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        load_dataset("synthetic", bogus=1)
    with pytest.raises(ConfigError, match="interval_minutes"):
        make_synthetic(interval_minutes=7)
    with pytest.raises(ConfigError, match="num_sensors"):
        make_synthetic(num_sensors=1000)


def _forward_filled(dataset) -> np.ndarray:
    return pd.DataFrame(np.where(dataset.mask, dataset.values, np.nan)).ffill().bfill().to_numpy()


def linear_forecast_mae(dataset, horizon: int = 12, history: int = 12) -> dict[str, float]:
    """60-min-ahead MAE on the test part of three per-sensor forecasters fit on the training part.

    last: y(t + h) = y(t); own: least squares on the sensor's last `history` readings;
    spatial: the same plus the last reading of each downstream neighbour (A[i, j] > 0).
    Inputs are forward-filled; only observed targets are scored.
    """
    x = _forward_filled(dataset)
    (_, train_stop), _, (test_start, _) = chronological_split(dataset.num_steps)
    t = np.arange(history - 1, dataset.num_steps - horizon)  # last history step of each window
    train = t + horizon < train_stop
    test = t - history + 1 >= test_start
    errors = {"last": [], "own": [], "spatial": []}
    for i in range(dataset.num_nodes):
        own = np.stack([x[t - k, i] for k in range(history)], axis=1)
        downstream = [j for j in np.flatnonzero(dataset.adjacency[i] > 0) if j != i]
        target, observed = x[t + horizon, i], dataset.mask[t + horizon, i]
        for name, features in (("own", own), ("spatial", np.hstack([own, x[t][:, downstream]]))):
            design = np.hstack([features, np.ones((len(t), 1))])
            fit, test_rows = train & observed, test & observed
            weights, *_ = np.linalg.lstsq(design[fit], target[fit], rcond=None)
            errors[name].append(np.abs(design[test_rows] @ weights - target[test_rows]))
        errors["last"].append(np.abs(own[test & observed, 0] - target[test & observed]))
    return {name: float(np.concatenate(e).mean()) for name, e in errors.items()}


def test_downstream_neighbours_predict_the_60_minute_future(default):
    mae = linear_forecast_mae(default)
    print(f"60-min MAE (mph) on the test part: {mae}")
    assert mae["own"] < mae["last"]
    assert mae["spatial"] < mae["last"]
    assert mae["spatial"] <= 0.9 * mae["own"]  # >= 10 % lower with the downstream neighbours
