"""SensorDataset: validation, derived sizes and time features."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gman.data.dataset import SensorDataset
from gman.errors import DataError


def make(num_steps=10, num_nodes=3, freq="5min", start="2024-01-01", **kwargs):
    values = np.arange(num_steps * num_nodes, dtype=np.float64).reshape(num_steps, num_nodes) + 1.0
    mask = np.ones_like(values, dtype=bool)
    index = pd.date_range(start, periods=num_steps, freq=freq)
    return SensorDataset(values, mask, index, [f"s{i}" for i in range(num_nodes)], **kwargs)


def test_converts_and_zeroes_masked_values():
    values = np.array([[1.0, np.nan], [3.0, 4.0]])
    mask = np.array([[True, False], [False, True]])
    ds = SensorDataset(values, mask, pd.date_range("2024-01-01", periods=2, freq="5min"), [10, 20])
    assert ds.values.dtype == np.float32 and ds.mask.dtype == bool
    assert ds.values.tolist() == [[1.0, 0.0], [0.0, 4.0]]  # masked positions hold 0, NaN gone
    assert ds.sensor_ids == ["10", "20"]
    assert (ds.num_steps, ds.num_nodes) == (2, 2)
    assert ds.missing_fraction == 0.5


def test_interval_and_steps_per_day_come_from_the_index():
    assert make(freq="5min").steps_per_day == 288
    ds = make(freq="15min")
    assert ds.interval == pd.Timedelta("15min") and ds.steps_per_day == 96
    assert make(freq="1h").steps_per_day == 24


def test_time_features_monday_zero_and_time_of_day_from_interval():
    # 2024-01-07 is a Sunday; 23:30 at 15-min steps is slot 94 of 96.
    ds = make(num_steps=4, freq="15min", start="2024-01-07 23:30")
    features = ds.time_features()
    assert features.dtype == np.int64 and features.shape == (4, 2)
    assert features.tolist() == [[6, 94], [6, 95], [0, 0], [0, 1]]


def test_time_features_same_for_us_and_ns_resolution():
    index = pd.date_range("2012-03-01", periods=300, freq="5min")
    a = SensorDataset(np.ones((300, 1)), np.ones((300, 1), bool), index.as_unit("ns"), ["a"])
    b = SensorDataset(np.ones((300, 1)), np.ones((300, 1), bool), index.as_unit("us"), ["a"])
    assert np.array_equal(a.time_features(), b.time_features())
    assert a.time_features()[0].tolist() == [3, 0]  # 2012-03-01 was a Thursday
    assert a.time_features()[289].tolist() == [4, 1]


@pytest.mark.parametrize(
    "index, message",
    [
        (pd.DatetimeIndex(["2024-01-01 00:00", "2024-01-01 00:05", "2024-01-01 00:05"]), "duplicate timestamp"),
        (pd.DatetimeIndex(["2024-01-01 00:00", "2024-01-01 00:10", "2024-01-01 00:05"]), "not sorted"),
        (pd.DatetimeIndex(["2024-01-01 00:00", "2024-01-01 00:05", "2024-01-01 00:15"]), "irregular interval"),
        (pd.DatetimeIndex(["2024-01-01 00:00", "2024-01-01 00:07", "2024-01-01 00:14"]), "divides one day"),
    ],
)
def test_bad_index_raises(index, message):
    with pytest.raises(DataError, match=message):
        SensorDataset(np.ones((3, 2)), np.ones((3, 2), bool), index, ["a", "b"])


def test_bad_shapes_ids_values_and_adjacency_raise():
    index = pd.date_range("2024-01-01", periods=3, freq="5min")
    ones = np.ones((3, 2))
    mask = np.ones((3, 2), bool)
    with pytest.raises(DataError, match="mask shape"):
        SensorDataset(ones, mask[:2], index, ["a", "b"])
    with pytest.raises(DataError, match="2 value columns"):
        SensorDataset(ones, mask, index, ["a"])
    with pytest.raises(DataError, match="duplicate sensor ids"):
        SensorDataset(ones, mask, index, ["a", "a"])
    with pytest.raises(DataError, match="non-finite"):
        SensorDataset(np.array([[1, np.inf]] * 3), mask, index, ["a", "b"])
    with pytest.raises(DataError, match="square"):
        SensorDataset(ones, mask, index, ["a", "b"], adjacency=np.ones((2, 3)))
    with pytest.raises(DataError, match="3x3 but there are 2 sensors"):
        SensorDataset(ones, mask, index, ["a", "b"], adjacency=np.eye(3))
    with pytest.raises(DataError, match="values must be 2-D"):
        SensorDataset(np.ones(3), np.ones(3, bool), index, ["a"])
    for graph_nodes in (["a"], ["a", "b", "a"]):  # a sensor missing, a node twice
        with pytest.raises(DataError, match="graph_node_ids must be unique and include every sensor id"):
            SensorDataset(ones, mask, index, ["a", "b"], graph_node_ids=graph_nodes)
    assert SensorDataset(ones, mask, index, ["a", "b"], graph_node_ids=["b", "x", "a"]).graph_order().tolist() == [2, 0]


def test_slice_and_frame_round_trip():
    ds = make(num_steps=10, adjacency=np.eye(3))
    ds.mask[2, 1] = False
    part = ds.slice(2, 6)
    assert part.num_steps == 4 and part.index[0] == ds.index[2]
    assert np.array_equal(part.adjacency, ds.adjacency)
    frame = part.to_frame()
    assert np.isnan(frame.iloc[0, 1]) and frame.iloc[1, 1] == ds.values[3, 1]
    assert list(frame.columns) == ds.sensor_ids
    single = ds.slice(0, 1)
    assert single.interval == pd.Timedelta("5min") and single.steps_per_day == 288
