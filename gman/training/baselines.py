"""Two reference forecasters scored on the same windows and mask as GMAN.

Both work on the raw series (data units) and window start indices, the way
``WindowDataset`` builds windows: the history of window ``s`` is steps
``s .. s+P-1`` and its targets are steps ``s+P .. s+P+Q-1``.

* **Last observed value**: every future step repeats, per sensor, the last
  observed reading inside the history window (``fallback`` where the sensor
  reported nothing in the whole window: the mean of the observed training
  readings is what ``gman train`` passes).
* **Historical average**: the mean observed reading per sensor and
  time-of-week slot (``day_of_week · steps_per_day + time_of_day``) over the
  training split; when the training split is shorter than one week, the slot
  is the time of day only.  A slot never observed in training falls back to
  the sensor's training mean, then to the overall training mean.
"""
from __future__ import annotations

import numpy as np

from gman.data.dataset import checked_time_features


def last_value_forecast(values: np.ndarray, mask: np.ndarray, starts: np.ndarray,
                        history_steps: int, horizon_steps: int, fallback: float) -> np.ndarray:
    """Forecasts [S, Q, N] repeating each sensor's last observed history reading.

    values, mask: [T, N] series and observation mask; starts: [S] window starts;
    fallback: the forecast of a sensor with no observed reading in a window's history.
    """
    values, mask = np.asarray(values), np.asarray(mask, dtype=bool)
    num_steps = values.shape[0]
    # last_seen[t, n] = the latest step <= t where sensor n was observed (-1: none yet)
    step_ids = np.where(mask, np.arange(num_steps)[:, None], -1)
    last_seen = np.maximum.accumulate(step_ids, axis=0)
    starts = np.asarray(starts, dtype=np.int64)
    end = starts + history_steps - 1                                 # [S] last history step
    seen = last_seen[end]                                            # [S, N]
    in_window = seen >= starts[:, None]
    last = values[np.clip(seen, 0, None), np.arange(values.shape[1])[None, :]]
    last = np.where(in_window, last, fallback).astype(np.float32)    # [S, N]
    return np.repeat(last[:, None, :], horizon_steps, axis=1)


class HistoricalAverage:
    """Mean reading per sensor and time slot over the training split.

    ``fit(values [T, N], mask [T, N], time [T, 2], steps_per_day)`` on the
    training steps; ``predict(time [..., 2]) -> [..., N]``.  ``weekly`` says
    whether the slot is time-of-week (True) or time-of-day (training split
    shorter than a week).
    """

    def __init__(self) -> None:
        self.table: np.ndarray | None = None   # [num_slots, N]
        self.steps_per_day = 0
        self.weekly = False

    def _slot(self, time: np.ndarray) -> np.ndarray:
        day_of_week, time_of_day = time[..., 0], time[..., 1]
        return day_of_week * self.steps_per_day + time_of_day if self.weekly else time_of_day

    def fit(self, values: np.ndarray, mask: np.ndarray, time: np.ndarray, steps_per_day: int) -> "HistoricalAverage":
        values = np.asarray(values, dtype=np.float64)
        mask = np.asarray(mask, dtype=bool)
        # a float or out-of-range time would be floored or wrap round to another slot
        time = checked_time_features(time, int(steps_per_day), "HistoricalAverage.fit: time")
        self.steps_per_day = int(steps_per_day)
        self.weekly = values.shape[0] >= 7 * self.steps_per_day
        num_slots = (7 if self.weekly else 1) * self.steps_per_day
        slot = self._slot(time)                                          # [T]
        observed = mask.astype(np.float64)
        sums = np.zeros((num_slots, values.shape[1]))
        counts = np.zeros((num_slots, values.shape[1]))
        np.add.at(sums, slot, values * observed)
        np.add.at(counts, slot, observed)
        overall = (values * observed).sum() / max(observed.sum(), 1.0)
        sensor_counts = observed.sum(axis=0)
        sensor_mean = np.where(sensor_counts > 0, (values * observed).sum(axis=0) / np.maximum(sensor_counts, 1.0),
                               overall)
        table = np.where(counts > 0, sums / np.maximum(counts, 1.0), sensor_mean[None, :])
        self.table = table.astype(np.float32)
        return self

    def predict(self, time: np.ndarray) -> np.ndarray:
        if self.table is None:
            raise RuntimeError("HistoricalAverage.predict called before fit")
        return self.table[self._slot(checked_time_features(time, self.steps_per_day, "HistoricalAverage.predict: time"))]


def historical_average_forecast(model: HistoricalAverage, time: np.ndarray, starts: np.ndarray,
                                history_steps: int, horizon_steps: int) -> np.ndarray:
    """Forecasts [S, Q, N] of the fitted table at each window's future steps.

    time: [T, 2] time features of the whole series; starts: [S] window starts.
    """
    future = np.asarray(starts, dtype=np.int64)[:, None] + history_steps + np.arange(horizon_steps)[None, :]
    return model.predict(np.asarray(time)[future])
