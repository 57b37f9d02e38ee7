"""Forecaster: same numbers as the training pipeline, tidy output with ids and timestamps, one-line input errors."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from gman.data.dataset import SensorDataset
from gman.data.windows import StandardScaler, WindowDataset
from gman.errors import DataError, ForecastInputError
from gman.model import GMAN
from gman.serving import package as pkg
from gman.serving.forecaster import TIDY_COLUMNS, Forecaster

SENSORS = ["400001", "400017", "400030", "400040", "400045"]
P, Q = 6, 4
MEAN, STD = 60.0, 8.0


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory) -> Forecaster:
    torch.manual_seed(0)
    model = GMAN(
        num_nodes=len(SENSORS), steps_per_day=288, se_dim=6, history_steps=P, horizon_steps=Q,
        num_layers=1, num_heads=2, head_dim=4,
    )
    model.set_spatial_embedding(torch.randn(len(SENSORS), 6))
    path = pkg.save_package(
        tmp_path_factory.mktemp("pkg") / "model", model.eval(), scaler_mean=MEAN, scaler_std=STD,
        sensor_ids=SENSORS, interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy", units="mph",
    )
    return Forecaster.load(path)


def series(steps: int = 40, start: str = "2024-03-03 23:20") -> pd.DataFrame:
    """Readings crossing midnight from Sunday to Monday, with NaN and 0 (= missing) readings."""
    rng = np.random.default_rng(3)
    values = MEAN + STD * rng.standard_normal((steps, len(SENSORS)))
    values[rng.random(values.shape) < 0.1] = np.nan
    values[rng.random(values.shape) < 0.05] = 0.0
    index = pd.date_range(start, periods=steps, freq="5min")
    return pd.DataFrame(values, index=index, columns=SENSORS)


def test_predict_matches_the_model_on_a_training_window(forecaster):
    frame = series()
    observed = frame.notna().to_numpy() & (frame.to_numpy() != 0.0)
    dataset = SensorDataset(
        values=np.nan_to_num(frame.to_numpy()).astype(np.float32), mask=observed,
        index=frame.index, sensor_ids=SENSORS, name="toy",
    )
    windows = WindowDataset(dataset, P, Q, StandardScaler(MEAN, STD))
    for i in (0, 7, len(windows) - 1):  # the middle one spans midnight Sunday -> Monday
        item = windows[i]
        with torch.no_grad():
            expected = forecaster.model(item["x"][None], item["time"][None])[0] * STD + MEAN
        forecast = forecaster.predict(frame.iloc[i : i + P])
        wide = Forecaster.to_wide(forecast)
        assert list(wide.columns) == SENSORS
        assert list(wide.index) == list(frame.index[i + P : i + P + Q])
        np.testing.assert_allclose(wide.to_numpy(), expected.numpy(), rtol=1e-6, atol=1e-4)


def test_tidy_forecast_has_ids_timestamps_and_steps(forecaster):
    frame = series()
    forecast = forecaster.predict(frame)  # a longer history: only the last P steps count
    assert list(forecast.columns) == TIDY_COLUMNS
    assert len(forecast) == Q * len(SENSORS)
    last = frame.index[-1]
    assert (forecast["issued_at"] == last).all()
    assert list(forecast["sensor_id"][: len(SENSORS)]) == SENSORS
    np.testing.assert_array_equal(forecast["step"].unique(), np.arange(1, Q + 1))
    assert (forecast["target_time"] == last + forecast["step"] * pd.Timedelta("5min")).all()
    assert (forecast["minutes_ahead"] == forecast["step"] * 5.0).all()
    pd.testing.assert_frame_equal(forecast, forecaster.predict(frame.iloc[-P:]))
    assert forecaster.predict(frame, layout="wide").shape == (Q, len(SENSORS))


def test_missing_value_and_nan_are_the_same_and_column_order_is_free(forecaster):
    frame = series().iloc[:P]
    as_zero = frame.fillna(0.0)
    as_nan = frame.replace(0.0, np.nan)
    shuffled = as_nan[SENSORS[::-1]]
    expected = forecaster.predict(as_nan)
    pd.testing.assert_frame_equal(forecaster.predict(as_zero), expected)
    pd.testing.assert_frame_equal(forecaster.predict(shuffled), expected)
    # Integer readings and float32 columns are numbers too.
    ints = as_nan.fillna(0).round().astype("int64")
    assert forecaster.predict(ints)["prediction"].notna().all()


def test_several_histories_predict_as_one_batch(forecaster):
    frame = series()
    parts = {"early": frame.iloc[:P], "late": frame.iloc[-P:]}
    batch = forecaster.predict(parts)
    assert list(batch.columns) == ["history", *TIDY_COLUMNS]
    for key, part in parts.items():
        alone = forecaster.predict(part)
        mine = batch[batch["history"] == key].drop(columns="history").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone, atol=1e-5, rtol=0)
    listed = forecaster.predict(list(parts.values()))
    assert set(listed["history"]) == {0, 1}
    wide = forecaster.predict(parts, layout="wide")
    assert wide.index.names == ["history", "target_time"] and wide.shape == (2 * Q, len(SENSORS))


def test_extra_columns_are_ignored_with_a_warning(forecaster):
    frame = series().iloc[:P]
    with pytest.warns(UserWarning, match="ignoring 1 columns .*'speed_limit'"):
        forecast = forecaster.predict(frame.assign(speed_limit=65))
    pd.testing.assert_frame_equal(forecast, forecaster.predict(frame))


def _unsorted(frame):
    return frame.iloc[[1, 0, *range(2, len(frame))]]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.drop(columns=["400017", "400045"]), r"2 of the model's 5 sensors missing .*'400017', '400045'"),
        (lambda f: f.iloc[-3:], r"3 time steps, the model needs at least P=6"),
        (lambda f: f.set_axis(f.index + (f.index - f.index[0]), axis=0), r"interval is 0 days 00:10:00, the model expects 0 days 00:05:00"),
        (lambda f: f.drop(index=f.index[3]), r"irregular timestamps: 0 days 00:10:00 between"),
        (_unsorted, r"timestamps not sorted"),
        (lambda f: f.set_axis(f.index.where(np.arange(len(f)) != 2, f.index[1]), axis=0), r"duplicate timestamp"),
        (lambda f: f.astype({"400030": str}), r"column '400030' is not numeric"),
        (lambda f: f.assign(**{"400040": np.inf}), r"infinite value at .* for sensor '400040'"),
        (lambda f: f.reset_index(drop=True), r"index must be a DatetimeIndex"),
        (lambda f: f.to_numpy(), r"expected a DataFrame or a list/dict"),
        (lambda f: pd.concat([f, f[["400001"]]], axis=1), r"duplicate sensor columns \['400001'\]"),
    ],
)
def test_unusable_histories_raise_one_line_errors(forecaster, damage, message):
    frame = series().iloc[:8].fillna(50.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ForecastInputError, match=message) as err:
            forecaster.predict(damage(frame))
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)


def test_batch_errors_name_the_history(forecaster):
    frame = series().iloc[:P]
    with pytest.raises(ForecastInputError, match=r"history\['bad'\]: 2 time steps"):
        forecaster.predict({"good": frame, "bad": frame.iloc[:2]})


def test_checkpoint_with_package_metadata_loads_like_the_package(forecaster, tmp_path):
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in forecaster.model.state_dict().items()},
        "gman_package": forecaster.metadata,
        "epoch": 3,
    }
    torch.save(checkpoint, tmp_path / "best.ckpt")
    frame = series().iloc[:P]
    loaded = Forecaster.load(tmp_path / "best.ckpt")
    pd.testing.assert_frame_equal(loaded.predict(frame), forecaster.predict(frame))

    del checkpoint["gman_package"]
    torch.save(checkpoint, tmp_path / "bare.ckpt")
    with pytest.raises(DataError, match="no 'gman_package' entry"):
        Forecaster.load(tmp_path / "bare.ckpt")
    with pytest.raises(DataError, match="no such file or folder"):
        Forecaster.load(tmp_path / "missing.ckpt")
