"""Chronological split, scalar scaler and index-based windows."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from gman.data.dataset import SensorDataset
from gman.data.windows import StandardScaler, WindowDataset, chronological_split
from gman.errors import ConfigError, DataError


@pytest.fixture
def series():
    rng = np.random.default_rng(0)
    values = rng.uniform(20, 70, size=(100, 4))
    mask = rng.random((100, 4)) > 0.1
    index = pd.date_range("2024-01-01 23:00", periods=100, freq="5min")
    return SensorDataset(values, mask, index, ["a", "b", "c", "d"])


def test_chronological_split_authors_rounding():
    assert chronological_split(34272) == [(0, 23990), (23990, 27418), (27418, 34272)]  # METR-LA sizes
    assert chronological_split(100, (0.6, 0.2, 0.2)) == [(0, 60), (60, 80), (80, 100)]
    with pytest.raises(ConfigError, match="sum to 1"):
        chronological_split(100, (0.7, 0.2, 0.2))
    with pytest.raises(ConfigError, match="three fractions"):
        chronological_split(100, (0.8, 0.2))


def test_scaler_ignores_masked_readings():
    values = np.array([[0.0, 10.0], [20.0, 1000.0]])
    mask = np.array([[False, True], [True, False]])
    scaler = StandardScaler.fit(values, mask)
    assert scaler.mean == 15.0 and scaler.std == 5.0
    z = scaler.transform(np.array([10.0, 20.0]))
    assert np.allclose(z, [-1.0, 1.0])
    t = scaler.inverse_transform(torch.tensor([-1.0, 1.0]))
    assert torch.allclose(t, torch.tensor([10.0, 20.0]))
    assert StandardScaler.from_dict(scaler.to_dict()).std == 5.0
    with pytest.raises(DataError, match="all missing"):
        StandardScaler.fit(values, np.zeros_like(mask))
    with pytest.raises(DataError, match="std = 0"):
        StandardScaler.fit(np.full((3, 2), 5.0), np.ones((3, 2), bool))


def test_window_items_match_the_series(series):
    scaler = StandardScaler.fit(series.values[:70], series.mask[:70])
    windows = WindowDataset(series, 12, 6, scaler, start=70, stop=100, name="test")
    assert len(windows) == 30 - 18 + 1
    item = windows[3]
    s = 73
    assert item["start"].item() == s and item["start"].dtype == torch.int64
    expected_x = np.where(series.mask[s : s + 12], (series.values[s : s + 12] - scaler.mean) / scaler.std, 0.0)
    assert np.allclose(item["x"].numpy(), expected_x, atol=1e-6)
    assert np.array_equal(item["x_mask"].numpy(), series.mask[s : s + 12])
    assert np.array_equal(item["y"].numpy(), series.values[s + 12 : s + 18])
    assert np.array_equal(item["y_mask"].numpy(), series.mask[s + 12 : s + 18])
    assert np.array_equal(item["time"].numpy(), series.time_features()[s : s + 18])
    assert item["y"][~item["y_mask"]].abs().sum() == 0  # missing future readings are 0
    # The last window ends exactly at the part's end: no window crosses the boundary.
    last = windows[-1]
    assert last["start"].item() + 18 == 100
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_windows_are_views_not_copies(series):
    scaler = StandardScaler(45.0, 10.0)
    windows = WindowDataset(series, 4, 4, scaler)
    item = windows[5]
    assert item["y"].untyped_storage().data_ptr() == windows.values.untyped_storage().data_ptr()
    assert windows.values.numel() == series.values.size  # one copy of the part, not one per window


def test_default_collate_batches(series):
    windows = WindowDataset(series, 12, 12, StandardScaler(45.0, 10.0))
    batch = next(iter(DataLoader(windows, batch_size=8)))
    assert batch["x"].shape == (8, 12, 4) and batch["time"].shape == (8, 24, 2)
    assert batch["start"].tolist() == list(range(8))


def test_too_short_part_is_a_data_error(series):
    with pytest.raises(DataError, match="val part has 10 steps, fewer than history \\+ horizon = 24"):
        WindowDataset(series, 12, 12, StandardScaler(0.0, 1.0), start=70, stop=80, name="val")
