"""Evaluation outputs: the baselines' scores and the one-day forecast plot's data, recomputed independently."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from gman.data.dataset import SensorDataset
from gman.data.windows import StandardScaler, WindowDataset
from gman.training import evaluate


def test_score_baselines_matches_a_window_by_window_count(monkeypatch):
    """The baseline rows of horizons.csv, recomputed with plain loops: the historical average is fitted on the
    training steps only, and scoring in chunks (3 windows here) pools exactly."""
    rng = np.random.default_rng(4)
    steps_per_day, num_steps, n, p, q = 24, 24 * 10, 3, 4, 3   # hourly data, 10 days
    index = pd.date_range("2024-01-01", periods=num_steps, freq="1h")
    values = rng.uniform(20, 60, size=(num_steps, n)).astype(np.float32)
    values[rng.random(values.shape) < 0.15] = 0.0                   # missing readings
    values[150:156, 1] = 0.0                                         # a sensor silent through whole histories
    dataset = SensorDataset(values=values, mask=values != 0, index=index, sensor_ids=["a", "b", "c"])
    train_stop = 8 * steps_per_day                                   # 8 days: the weekly table
    starts = np.arange(train_stop - p, num_steps - p - q + 1)
    monkeypatch.setattr(evaluate, "CHUNK_WINDOWS", 3)
    scores = evaluate.score_baselines(dataset, (0, train_stop), starts, p, q, fallback=-7.0)

    time = dataset.time_features()
    slots = time[:, 0] * steps_per_day + time[:, 1]
    expected = {name: np.zeros((len(starts), q, n)) for name in ("last", "average")}
    for i, s in enumerate(starts):
        for j in range(n):
            seen = [values[t, j] for t in range(s, s + p) if values[t, j] != 0]
            expected["last"][i, :, j] = seen[-1] if seen else -7.0
            for k in range(q):
                same_slot = [values[t, j] for t in range(train_stop) if slots[t] == slots[s + p + k] and values[t, j] != 0]
                sensor_train = [values[t, j] for t in range(train_stop) if values[t, j] != 0]
                expected["average"][i, k, j] = np.mean(same_slot) if same_slot else np.mean(sensor_train)
    truth = np.stack([values[s + p:s + p + q] for s in starts])
    observed = truth != 0
    assert (expected["last"] == -7.0).any()                          # the fallback is exercised
    assert len(np.unique(slots[:train_stop])) == 7 * steps_per_day  # the weekly table (8 days of training)
    for name, key in (("last", evaluate.LAST_VALUE), ("average", evaluate.HISTORICAL_AVERAGE)):
        err = np.abs(expected[name] - truth)
        mae = [err[:, k][observed[:, k]].mean() for k in range(q)]
        assert scores[key].mae == pytest.approx(mae, rel=1e-5)
        assert scores[key].mae_all == pytest.approx(err[observed].mean(), rel=1e-5)
        assert scores[key].count == [int(observed[:, k].sum()) for k in range(q)]


class _TargetTimeOfDay(torch.nn.Module):
    """Forecasts, for every sensor, the time-of-day index of the target step (so the plot's rows can be checked)."""

    device = torch.device("cpu")

    def __init__(self, history_steps: int):
        super().__init__()
        self.history_steps = history_steps

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        future = time[:, self.history_steps:, 1].float()             # [B, Q]
        return future[:, :, None].expand(-1, -1, x.shape[-1])


def test_the_one_day_plot_shows_each_target_time_from_the_right_window():
    rng = np.random.default_rng(2)
    num_steps, n, p, q = 288 * 3, 5, 12, 12                          # 5-minute data, three days
    index = pd.date_range("2024-03-04 07:00", periods=num_steps, freq="5min")
    values = rng.uniform(20, 70, size=(num_steps, n)).astype(np.float32)
    values[:, 4] = 50.0                                              # a flat sensor: never among the shown
    values[rng.random(values.shape) < 0.1] = 0.0
    dataset = SensorDataset(values=values, mask=values != 0, index=index, sensor_ids=list("abcde"))
    windows = WindowDataset(dataset, p, q, StandardScaler(45.0, 10.0), start=100, stop=num_steps)
    day = evaluate.forecast_one_day(_TargetTimeOfDay(p), dataset, windows, num_sensors=3, batch_size=7)

    assert day.times[0] == pd.Timestamp("2024-03-05 00:00")          # the first midnight target at 60 minutes
    assert len(day.times) == 288 and (np.diff(day.times.asi8) == 300 * 10**9).all()
    assert "e" not in day.sensor_ids and len(day.sensor_ids) == 3
    columns = [dataset.sensor_ids.index(s) for s in day.sensor_ids]
    rows = dataset.index.get_indexer(day.times)
    truth = values[rows][:, columns]
    np.testing.assert_array_equal(np.isnan(day.truth), truth == 0)
    np.testing.assert_array_equal(day.truth[truth != 0], truth[truth != 0])
    assert set(day.forecasts) == {"GMAN, 15 min ahead", "GMAN, 60 min ahead"}
    time_of_day = (day.times.hour * 12 + day.times.minute // 5).to_numpy()
    for label, forecast in day.forecasts.items():
        np.testing.assert_array_equal(forecast, np.repeat(time_of_day[:, None], 3, axis=1).astype(np.float32), label)


def _errors(q: int, value: float) -> "evaluate.HorizonErrors":
    from gman.training.metrics import HorizonErrors

    return HorizonErrors(mae=[value + k for k in range(q)], rmse=[2 * value] * q, mape=[float("nan")] * q,
                         count=[1] * q, mae_all=value, rmse_all=2 * value, mape_all=float("nan"))


def test_the_table_shows_the_horizons_the_interval_allows():
    five = evaluate.format_table({"GMAN": _errors(12, 1.0)}, 5.0).splitlines()
    assert [c.strip() for c in five[0].split("|")[1:]] == ["15 min", "30 min", "60 min", "all steps"]
    assert five[3].split("|")[1].split()[:2] == ["3.00", "2.00"]  # step 3's MAE (1 + 2) and RMSE
    assert five[3].split("|")[1].split()[2] == "-"              # NaN prints as "-"
    hourly = evaluate.format_table({"GMAN": _errors(3, 1.0)}, 60.0).splitlines()
    assert [c.strip() for c in hourly[0].split("|")[1:]] == ["60 min", "all steps"]
    three_hourly = evaluate.format_table({"GMAN": _errors(3, 1.0)}, 180.0).splitlines()
    assert [c.strip() for c in three_hourly[0].split("|")[1:]] == ["step 3 (540 min)", "all steps"]


def test_metrics_refuse_mismatched_shapes_and_a_wrong_horizon():
    from gman.training.metrics import HorizonMetrics

    metrics = HorizonMetrics(3)
    ones = torch.ones(2, 3, 4)
    with pytest.raises(ValueError, match=r"share one \[B, Q, N\] shape"):
        metrics.update(ones, torch.ones(2, 3, 5), ones.bool())
    with pytest.raises(ValueError, match="expected 3 horizon steps, got 2"):
        metrics.update(ones[:, :2], ones[:, :2], ones[:, :2].bool())


def test_the_historical_average_needs_fitting_and_falls_back_for_unseen_sensors():
    from gman.training.baselines import HistoricalAverage

    with pytest.raises(RuntimeError, match="before fit"):
        HistoricalAverage().predict(np.zeros((1, 2), dtype=np.int64))
    time = np.stack([np.zeros(8, dtype=np.int64), np.arange(8) % 4], axis=1)
    values = np.array([[10.0, 0.0]] * 4 + [[30.0, 0.0]] * 4)
    model = HistoricalAverage().fit(values, values != 0, time, steps_per_day=4)
    np.testing.assert_allclose(model.predict(time[:4]), [[20.0, 20.0]] * 4)  # sensor 1 never observed: overall mean
