"""Last observed value and historical average baselines; the epoch-seeded sampler."""
from __future__ import annotations

import numpy as np
import pytest

from gman.data.sampling import EpochSeededRandomSampler
from gman.training.baselines import HistoricalAverage, historical_average_forecast, last_value_forecast


def test_last_value_uses_the_last_observed_reading_in_the_history_window():
    values = np.array([[1, 10], [2, 0], [3, 0], [4, 0], [5, 50]], dtype=np.float32)
    mask = np.array([[1, 1], [1, 0], [1, 0], [1, 0], [1, 1]], dtype=bool)
    # window starting at step 1, P=2: history = steps 1, 2; sensor 1 unobserved there -> fallback
    forecast = last_value_forecast(values, mask, np.array([0, 1, 2]), history_steps=2, horizon_steps=2, fallback=-1.0)
    assert forecast.shape == (3, 2, 2)
    np.testing.assert_array_equal(forecast[0], [[2, 10], [2, 10]])   # sensor 1: step 0 observed, step 1 not
    np.testing.assert_array_equal(forecast[1], [[3, -1], [3, -1]])
    np.testing.assert_array_equal(forecast[2], [[4, -1], [4, -1]])


def _time(num_steps: int, steps_per_day: int) -> np.ndarray:
    step = np.arange(num_steps)
    return np.stack([(step // steps_per_day) % 7, step % steps_per_day], axis=1)


def test_historical_average_is_weekly_when_training_covers_a_week():
    steps_per_day = 4
    num_steps = 14 * steps_per_day
    time = _time(num_steps, steps_per_day)
    slot = time[:, 0] * steps_per_day + time[:, 1]
    values = np.stack([slot.astype(np.float32), 100 + slot.astype(np.float32)], axis=1)
    values[1, 0] += 10                          # two observations of slot 1 for sensor 0: mean moves by 5
    mask = np.ones_like(values, dtype=bool)
    mask[8 + 7 * steps_per_day, 1] = False      # slot 8, second week: not counted
    values[8 + 7 * steps_per_day, 1] = 0.0
    model = HistoricalAverage().fit(values, mask, time, steps_per_day)
    assert model.weekly and model.table.shape == (7 * steps_per_day, 2)
    assert model.table[1, 0] == pytest.approx(1 + 5)
    assert model.table[8, 1] == pytest.approx(108)
    forecast = historical_average_forecast(model, time, np.array([0]), history_steps=2, horizon_steps=3)
    np.testing.assert_allclose(forecast[0, :, 1], [102, 103, 104])


def test_historical_average_falls_back_to_time_of_day_for_short_training():
    steps_per_day = 4
    time = _time(3 * steps_per_day, steps_per_day)
    values = np.tile(np.arange(steps_per_day, dtype=np.float32), 3)[:, None] + 7 * time[:, :1]
    mask = np.ones_like(values, dtype=bool)
    mask[:, 0][time[:, 1] == 3] = False         # slot 3 never observed -> sensor mean
    model = HistoricalAverage().fit(values, mask, time, steps_per_day)
    assert not model.weekly and model.table.shape == (steps_per_day, 1)
    assert model.table[0, 0] == pytest.approx(7.0)          # days 0, 1, 2: 0, 7, 14
    observed = values[mask[:, 0], 0]
    assert model.table[3, 0] == pytest.approx(observed.mean())


def test_historical_average_refuses_a_time_that_is_no_slot():
    """A float time was floored, and a negative one wrapped round to a slot at the end of the week."""
    steps_per_day = 4
    time = _time(7 * steps_per_day, steps_per_day)
    values, mask = np.ones((len(time), 1), dtype=np.float32), np.ones((len(time), 1), dtype=bool)
    with pytest.raises(ValueError, match=r"^HistoricalAverage.fit: time: must hold integer .* got dtype float64$"):
        HistoricalAverage().fit(values, mask, time / [1, steps_per_day], steps_per_day)
    model = HistoricalAverage().fit(values, mask, time, steps_per_day)
    with pytest.raises(ValueError, match=r"^HistoricalAverage.predict: time: day_of_week \(time\[\.\.\., 0\]\) must be in 0\.\.6, got -1$"):
        model.predict(time - [1, 0])
    with pytest.raises(ValueError, match=r"time_of_day_index \(time\[\.\.\., 1\]\) must be in 0\.\.3, got 4$"):
        model.predict(time + [0, 1])
    assert model.predict(time).shape == (len(time), 1)


def test_both_baselines_are_exported_by_gman_training():
    import gman.training
    from gman.training import baselines

    for name in ("HistoricalAverage", "historical_average_forecast", "last_value_forecast"):
        assert name in gman.training.__all__ and name in dir(gman.training)
        assert getattr(gman.training, name) is getattr(baselines, name)


def test_epoch_seeded_sampler_replays_an_epoch_and_varies_across_epochs():
    sampler = EpochSeededRandomSampler(50, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    again = EpochSeededRandomSampler(50, seed=3)
    again.set_epoch(2)
    assert list(again) == first                   # a fresh process replays epoch 2 exactly
    assert sorted(first) == list(range(50))
    sampler.set_epoch(3)
    assert list(sampler) != first
    assert len(sampler) == 50

