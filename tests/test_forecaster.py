"""Forecaster: same numbers as the training pipeline, tidy output with ids and timestamps, one-line input errors."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from gman.data.dataset import SensorDataset
from gman.data.windows import StandardScaler, WindowDataset
from gman.errors import ConfigError, DataError, ForecastInputError
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


def test_sensors_without_a_reading_in_the_window_are_forecast_with_a_warning(forecaster):
    frame = series().iloc[:P].copy()
    frame["400030"] = np.nan  # never observed
    frame["400045"] = 0.0  # the model's missing value throughout
    frame.iloc[:-1, 0] = np.nan  # one reading, at the last step: observed, no warning for it
    with pytest.warns(UserWarning, match=r"2 of 5 sensors have no observed reading in the last P=6 steps, e\.g\. \['400030', '400045'\]"):
        forecast = forecaster.predict(frame)
    assert np.isfinite(forecast["prediction"]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forecaster.predict(series().iloc[:P])  # every sensor observed at least once: silent


def test_a_sensor_whose_readings_are_all_none_is_missing_not_text(forecaster):
    """JSON null makes an ``object`` column of None (all of them) or of numbers and None: readings, missing."""
    frame = series().iloc[:P].fillna(50.0)
    as_nan = frame.copy()
    as_nan["400030"] = np.nan
    as_nan.iloc[[0, 2], 1] = np.nan
    with pytest.warns(UserWarning, match=r"1 of 5 sensors have no observed reading .*\['400030'\]"):
        expected = forecaster.predict(as_nan)
    as_none = frame.astype({"400017": object})
    as_none["400030"] = None
    as_none.iloc[[0, 2], 1] = None
    assert as_none["400030"].dtype == object and as_none["400017"].dtype == object
    with pytest.warns(UserWarning, match=r"1 of 5 sensors have no observed reading .*\['400030'\]"):
        pd.testing.assert_frame_equal(forecaster.predict(as_none), expected)
    for text in (["n/a"] + [None] * (P - 1), [True] * P, ["61.5"] * P):  # text, booleans, numbers written as text
        with pytest.raises(ForecastInputError, match=r"^history: column '400030' is not numeric \(dtype "):
            forecaster.predict(frame.assign(**{"400030": pd.Series(text, index=frame.index, dtype=object)}))


@pytest.mark.parametrize("missing_input, meaning", [(0.0, r"the training mean \(60 mph\)"),
                                                    ((0.0 - MEAN) / STD, "the scaler's missing input, i.e. a reading of 0 mph")])
def test_the_warning_says_what_a_sensor_without_readings_is_fed_as(forecaster, tmp_path, missing_input, meaning):
    path = pkg.save_package(tmp_path / "m", forecaster.model, scaler_mean=MEAN, scaler_std=STD, sensor_ids=SENSORS,
                            interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy", units="mph",
                            scaler_missing_input=missing_input)
    frame = series().iloc[:P].fillna(50.0).assign(**{"400030": np.nan})
    with pytest.warns(UserWarning, match=f"they are fed as {meaning}$"):
        Forecaster.load(path).predict(frame)


def test_a_model_trained_in_a_time_zone_reads_every_history_on_its_clock(tmp_path):
    torch.manual_seed(0)
    model = GMAN(num_nodes=len(SENSORS), steps_per_day=288, se_dim=6, history_steps=P, horizon_steps=Q,
                 num_layers=1, num_heads=2, head_dim=4)
    model.set_spatial_embedding(torch.randn(len(SENSORS), 6))
    path = pkg.save_package(tmp_path / "la", model.eval(), scaler_mean=MEAN, scaler_std=STD, sensor_ids=SENSORS,
                            interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy",
                            timezone="America/Los_Angeles")
    la = Forecaster.load(path)
    assert la.timezone == "America/Los_Angeles"
    local = series().iloc[:P].fillna(50.0)  # naive: Los Angeles wall-clock time
    aware = local.tz_localize("America/Los_Angeles")
    in_utc = aware.tz_convert("UTC")
    expected = la.predict(local)["prediction"]
    for history in (aware, in_utc):  # the same instants, written in other zones
        forecast = la.predict(history)
        np.testing.assert_array_equal(forecast["prediction"], expected)
        assert forecast["issued_at"].iloc[0] == history.index[-1]  # in the history's own zone
        assert forecast["target_time"].iloc[0] == history.index[-1] + pd.Timedelta("5min")
    # a model without a zone reads a history's own wall clock, as it reads naive training data
    naive_model = Forecaster.load(pkg.save_package(
        tmp_path / "naive", model.eval(), scaler_mean=MEAN, scaler_std=STD, sensor_ids=SENSORS,
        interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy"))
    assert naive_model.timezone is None
    np.testing.assert_array_equal(naive_model.predict(in_utc)["prediction"],
                                  naive_model.predict(in_utc.tz_localize(None))["prediction"])
    assert not np.array_equal(naive_model.predict(in_utc)["prediction"], expected)  # eight hours later on its clock
    with pytest.raises(ConfigError, match="timezone: 'Nowhere/Land' is not a time zone"):
        pkg.save_package(tmp_path / "bad", model.eval(), scaler_mean=MEAN, scaler_std=STD, sensor_ids=SENSORS,
                         interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy", timezone="Nowhere/Land")


def _unsorted(frame):
    return frame.iloc[[1, 0, *range(2, len(frame))]]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.drop(columns=["400017", "400045"]), r"2 of the model's 5 sensors missing .*'400017', '400045'"),
        (lambda f: f.iloc[-3:], r"3 time steps, the model needs at least P=6"),
        (lambda f: f.set_axis(f.index + (f.index - f.index[0]), axis=0), r"interval is 0 days 00:10:00, the model expects 0 days 00:05:00"),
        (lambda f: f.drop(index=f.index[3]), r"irregular timestamps in the last P=6 steps: 0 days 00:10:00 between"),
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


def test_a_gap_before_the_last_p_steps_does_not_matter(forecaster):
    frame = series()
    gappy = frame.drop(index=frame.index[5:9])  # an hour ago: not among the last P steps
    pd.testing.assert_frame_equal(forecaster.predict(gappy), forecaster.predict(frame.iloc[-P:]))
    with pytest.raises(ForecastInputError, match="timestamps not sorted"):  # order is still checked throughout
        forecaster.predict(_unsorted(frame))


def test_batch_errors_name_the_history(forecaster):
    frame = series().iloc[:P]
    with pytest.raises(ForecastInputError, match=r"history\['bad'\]: 2 time steps"):
        forecaster.predict({"good": frame, "bad": frame.iloc[:2]})


def _arrays(forecaster: Forecaster) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values, mask [1, P, N] and time [1, P+Q, 2] of the history ``series().iloc[:P]``."""
    frame = series().iloc[:P].fillna(50.0)
    values, mask, index = forecaster.prepare(frame)
    time = forecaster.time_features(forecaster.window_index(index))
    return values[None], mask[None], time[None]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda v, m, t: (v, m, t + 0.5), r"^time: must hold integer \(day_of_week, time_of_day_index\) pairs, got dtype float64$"),
        (lambda v, m, t: (v, m, t / [1, 288]), r"^time: must hold integer .* got dtype float64$"),  # fraction of the day
        (lambda v, m, t: (v, m, t + [0, 288]), r"^time: time_of_day_index \(time\[\.\.\., 1\]\) must be in 0\.\.287, got \d+$"),
        (lambda v, m, t: (v, m, t - [1, 0]), r"^time: day_of_week \(time\[\.\.\., 0\]\) must be in 0\.\.6, got -1$"),
        (lambda v, m, t: (v, m, t[:, :P]), rf"^time: expected shape \[1, {P + Q}, 2\] \(B, P\+Q, 2\), got \[1, {P}, 2\]$"),
        (lambda v, m, t: (v[..., :-1], m[..., :-1], t), rf"^values: expected shape \[B, {P}, 5\] \(B, P, N\), got \[1, {P}, 4\]$"),
        (lambda v, m, t: (v, m[:, :1], t), r"^mask: expected the shape of values"),
    ],
)
def test_predict_arrays_refuses_arrays_the_model_cannot_read(forecaster, damage, message):
    values, mask, time = _arrays(forecaster)
    expected = forecaster.predict(series().iloc[:P].fillna(50.0), layout="wide").to_numpy()
    np.testing.assert_allclose(forecaster.predict_arrays(values, mask, time)[0], expected, rtol=1e-5)
    with pytest.raises(ForecastInputError, match=message):
        forecaster.predict_arrays(*damage(values, mask, time))


def test_a_forecaster_of_a_network_in_memory_snapshots_it_and_leaves_it_alone(forecaster, tmp_path, monkeypatch):
    net = GMAN(**forecaster.model.config)
    net.load_state_dict(forecaster.model.state_dict())
    net.train()  # the caller is training it
    metadata = pkg.package_metadata(net, scaler_mean=MEAN, scaler_std=STD, sensor_ids=SENSORS,
                                    interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy")
    snapshot = Forecaster(net, metadata)
    assert net.training and snapshot.model is not net and not snapshot.model.training
    frame = series().iloc[:P]
    before = snapshot.predict(frame)
    pd.testing.assert_frame_equal(before, forecaster.predict(frame))
    with torch.no_grad():
        net.output_fc.linears[-1].bias.add_(1.0)  # one more training step, say
    pd.testing.assert_frame_equal(snapshot.predict(frame), before)  # the weights it was built with
    moved = Forecaster(net, metadata).predict(frame)  # a new Forecaster serves the new weights
    np.testing.assert_allclose(moved["prediction"], before["prediction"] + STD, rtol=1e-5)

    handed_over = Forecaster(net, metadata, copy=False)
    assert handed_over.model is net and not net.training
    with pytest.raises(ValueError, match="copy must be true or false"):
        Forecaster(net, metadata, copy="no")
    # loading builds a network of its own: no second copy of it
    path = pkg.save_package(tmp_path / "model", forecaster.model, scaler_mean=MEAN, scaler_std=STD, sensor_ids=SENSORS,
                            interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy", units="mph")
    monkeypatch.setattr("gman.serving.forecaster.deepcopy", lambda _: pytest.fail("the loaded network was copied"))
    pd.testing.assert_frame_equal(Forecaster.load(path, backend="torch").predict(frame), forecaster.predict(frame))


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


def test_a_file_that_is_no_model_is_refused_in_one_plain_line(tmp_path, capsys):
    from gman.cli import main as gman_main

    (tmp_path / "horizons.csv").write_text("step,mae\n1,2.0\n")
    (tmp_path / "notackpt.ckpt").write_text("hi\n")
    torch.save({"state_dict": {}, "when": pd.Timestamp("2024-01-01")}, tmp_path / "objects.ckpt")  # not weights only
    for name, why in [("horizons.csv", "torch cannot read it as a checkpoint"),
                      ("notackpt.ckpt", "torch cannot read it as a checkpoint"),
                      ("objects.ckpt", "Python objects beyond tensors")]:
        with pytest.raises(DataError) as err:
            Forecaster.load(tmp_path / name)
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name}: not a gman model (package folder, Lightning checkpoint or "
                                  "MLflow model): ") and why in message, message
        assert "weights_only" not in message and "(" not in message.split("):", 1)[1], message  # no torch lecture or codes
        argv = ["predict", "--model", str(tmp_path / name), "--input", "h.csv", "--output", str(tmp_path / "f.csv")]
        assert gman_main(argv) == 2
        assert capsys.readouterr().err == f"gman: error: {message}\n"  # nothing else: no torch warning either


def test_exported_files_and_the_metadata_file_are_refused_with_what_they_are(forecaster, tmp_path, capsys):
    """Only a real pickle or zip checkpoint is said to hold refused Python objects; an exported graph or program
    is named as such, and gman.json points to its folder."""
    import zipfile

    from gman.cli import main as gman_main

    onnx_bytes = b"\x08\n\x12\x07pytorch\x1a\x042.13" + bytes(range(64))  # how gman export's ONNX files begin
    (tmp_path / "m.onnx").write_bytes(onnx_bytes)
    (tmp_path / "graph.bin").write_bytes(onnx_bytes)
    with zipfile.ZipFile(tmp_path / "m.pt2", "w") as archive:  # torch.export.save writes a zip archive
        archive.writestr("m/archive_format", "pt2")
    not_a_model = "not a gman model (package folder, Lightning checkpoint or MLflow model): "
    cases = {
        tmp_path / "m.onnx": f"{not_a_model}an exported ONNX graph, which runs with onnxruntime",
        tmp_path / "m.pt2": f"{not_a_model}an exported torch.export program, which loads with torch.export.load",
        tmp_path / "graph.bin": f"{not_a_model}torch cannot read it as a checkpoint",
    }
    for path, message in cases.items():
        with pytest.raises(DataError) as err:
            Forecaster.load(path)
        assert str(err.value).startswith(f"{path}: {message}"), str(err.value)
        assert "Python objects" not in str(err.value) and "\n" not in str(err.value)
    saved = pkg.save_package(tmp_path / "package", forecaster.model, scaler_mean=MEAN, scaler_std=STD,
                             sensor_ids=SENSORS, interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy")
    argv = ["predict", "--model", str(saved / "gman.json"), "--input", "h.csv", "--output", str(tmp_path / "f.csv")]
    assert gman_main(argv) == 2
    assert capsys.readouterr().err == (f"gman: error: {saved / 'gman.json'}: the metadata file of a gman package; "
                                       f"give its folder, {saved}\n")


def test_checkpoint_without_package_metadata_takes_the_ids_from_the_runs_package(forecaster, tmp_path):
    """A checkpoint of only hyper_parameters and weights, in <run>/checkpoints/, beside <run>/model."""
    meta = forecaster.metadata
    hparams = {**meta["model"]["config"], "scaler_mean": MEAN, "scaler_std": STD, "interval_minutes": 5.0,
               "learning_rate": 1e-3}
    checkpoint = {"state_dict": {f"net.{k}": v for k, v in forecaster.model.state_dict().items()},
                  "hyper_parameters": hparams}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, run / "checkpoints" / "best.ckpt")
    with pytest.raises(DataError, match="holds no sensor ids and no gman package was found at"):
        Forecaster.load(run / "checkpoints" / "best.ckpt")

    pkg.save_package(run / "model", forecaster.model, scaler_mean=MEAN, scaler_std=STD, sensor_ids=SENSORS,
                     interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy", units="mph")
    loaded = Forecaster.load(run / "checkpoints" / "best.ckpt")
    assert loaded.sensor_ids == SENSORS and loaded.interval == pd.Timedelta("5min") and loaded.units == "mph"
    frame = series().iloc[:P]
    pd.testing.assert_frame_equal(loaded.predict(frame), forecaster.predict(frame))

    other = GMAN(num_nodes=4, steps_per_day=288, se_dim=6, history_steps=P, horizon_steps=Q,
                 num_layers=1, num_heads=2, head_dim=4)
    other.set_spatial_embedding(torch.randn(4, 6))
    pkg.save_package(run / "model", other.eval(), scaler_mean=MEAN, scaler_std=STD, sensor_ids=SENSORS[:4],
                     interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy", units="mph")
    with pytest.raises(DataError, match="5 sensors in the checkpoint but 4 in"):
        Forecaster.load(run / "checkpoints" / "best.ckpt")


# ----------------------------------------------------------------------------- gman predict


def test_gman_predict_from_csv_and_long_parquet(forecaster, tmp_path, monkeypatch):
    from gman.serving.cli import main

    frame = series().iloc[:P + 2]
    expected = forecaster.predict(frame)
    monkeypatch.setattr(Forecaster, "load", classmethod(lambda cls, source, **options: forecaster))

    frame.rename_axis("timestamp").to_csv(tmp_path / "history.csv")
    assert main("predict", ["--model", "m", "--input", str(tmp_path / "history.csv"), "--output", str(tmp_path / "f.csv")]) == 0
    written = pd.read_csv(tmp_path / "f.csv", dtype={"sensor_id": str}, parse_dates=["issued_at", "target_time"])
    np.testing.assert_allclose(written["prediction"], expected["prediction"], rtol=1e-9)
    assert (written["target_time"] == expected["target_time"]).all()

    long = frame.rename_axis("timestamp").reset_index().melt(id_vars="timestamp", var_name="sensor_id", value_name="value")
    long.sample(frac=1.0, random_state=0).to_parquet(tmp_path / "history.parquet")
    out = tmp_path / "wide.parquet"
    assert main("predict", ["--model", "m", "--input", str(tmp_path / "history.parquet"), "--output", str(out), "--layout", "wide"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out), Forecaster.to_wide(expected), check_freq=False, check_names=False)

    frame.iloc[:3].rename_axis("timestamp").to_csv(tmp_path / "short.csv")
    with pytest.raises(ForecastInputError, match="the model needs at least P=6"):
        main("predict", ["--model", "m", "--input", str(tmp_path / "short.csv"), "--output", str(tmp_path / "g.csv")])
    assert not (tmp_path / "g.csv").exists()


def test_gman_predict_errors_and_warnings_name_the_input_file(forecaster, tmp_path, monkeypatch):
    from gman.serving.cli import main

    monkeypatch.setattr(Forecaster, "load", classmethod(lambda cls, source, **options: forecaster))
    frame = series().iloc[:P + 2].fillna(50.0).rename_axis("timestamp")
    argv = ["--model", "m", "--output", str(tmp_path / "f.csv"), "--input"]
    frame.iloc[:3].to_csv(tmp_path / "short.csv")
    with pytest.raises(ForecastInputError, match=f"^{re.escape(str(tmp_path / 'short.csv'))}: 3 time steps, the model needs at least P=6$"):
        main("predict", [*argv, str(tmp_path / "short.csv")])
    frame.assign(**{"400030": np.nan}).to_csv(tmp_path / "silent.csv")
    with pytest.warns(UserWarning, match=f"^{re.escape(str(tmp_path / 'silent.csv'))}: 1 of 5 sensors have no observed reading"):
        assert main("predict", [*argv, str(tmp_path / "silent.csv")]) == 0
    # no timestamp column: the first sensor's readings are no timestamps (pandas would read them as nanoseconds)
    frame.to_csv(tmp_path / "no_time.csv", index=False)
    with pytest.raises(ForecastInputError, match=f"^{re.escape(str(tmp_path / 'no_time.csv'))}: needs a 'timestamp' column \\(the first "
                                                 "column, '400001', holds numbers such as [0-9.]+, not timestamps\\)$"):
        main("predict", [*argv, str(tmp_path / "no_time.csv")])
    frame.reset_index(drop=True).rename_axis("timestamp").to_csv(tmp_path / "step_numbers.csv")
    with pytest.raises(ForecastInputError, match="step_numbers.csv: column 'timestamp' holds numbers \\(0, ...\\), not timestamps"):
        main("predict", [*argv, str(tmp_path / "step_numbers.csv")])


@pytest.mark.parametrize("mode", [["--input", "h.csv"], ["--dataset", "synthetic"]])
def test_gman_predict_refuses_an_unwritable_output_before_loading_the_model(tmp_path, monkeypatch, mode):
    from gman.serving.cli import main

    def no_load(cls, source, **options):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(Forecaster, "load", classmethod(no_load))
    (tmp_path / "f.csv").mkdir()
    (tmp_path / "plain").write_text("a file\n")
    (tmp_path / "g_errors_by_sensor.csv").mkdir()  # where --dataset writes its per-sensor table beside g.csv
    cases = [(tmp_path / "f.csv", f"--output: {tmp_path / 'f.csv'} is a folder; name a file"),
             (tmp_path / "plain" / "f.csv", f"--output: {tmp_path / 'plain' / 'f.csv'} cannot be written: "
                                            f"{tmp_path / 'plain'} is a file, not a folder")]
    if mode[0] == "--dataset":
        cases.append((tmp_path / "g.csv", f"--output: {tmp_path / 'g_errors_by_sensor.csv'} is a folder; name a file"))
    for output, message in cases:
        with pytest.raises(ConfigError) as err:
            main("predict", ["--model", "m", *mode, "--output", str(output)])
        assert str(err.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.csv", "g_errors_by_sensor.csv", "plain"]


def test_an_output_that_fails_at_writing_time_is_a_one_line_error(tmp_path):
    from gman.serving.cli import _atomic_path

    (tmp_path / "plain").write_text("a file\n")
    with pytest.raises(ConfigError, match=r"^--output: cannot write .*plain/f.csv \(File exists\)$"):
        with _atomic_path(tmp_path / "plain" / "f.csv"):
            raise AssertionError("not reached")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match=r"^--output: cannot write .*taken \(Is a directory\)$"):
        with _atomic_path(tmp_path / "taken") as tmp:
            tmp.write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "taken"]  # the temporary file is gone


def test_gman_predict_over_a_dataset_split(forecaster, tmp_path, monkeypatch):
    from gman.serving.cli import main

    frame = series(steps=120).fillna(0.0)  # 0 = missing in the file, as in METR-LA
    frame.rename_axis("timestamp").to_csv(tmp_path / "toy.csv")
    monkeypatch.setattr(Forecaster, "load", classmethod(lambda cls, source, **options: forecaster))
    out = tmp_path / "test_forecast.parquet"
    argv = ["--model", "m", "--dataset", str(tmp_path / "toy.csv"), "--split", "test", "--output", str(out),
            "--stride", "2", "--sensors", "400017,400040"]
    assert main("predict", argv) == 0

    forecast = pd.read_parquet(out)
    start = 84 + 12  # 70 % train, 10 % validation of 120 steps
    issued = frame.index[start + P - 1 : 120 - Q : 2]
    assert list(forecast["issued_at"].unique()) == list(issued)
    assert len(forecast) == len(issued) * Q * len(SENSORS)
    # A row's forecast and truth are those of the Forecaster on that history.
    at = issued[3]
    one = forecast[forecast["issued_at"] == at].reset_index(drop=True)
    alone = forecaster.predict(frame.loc[:at].iloc[-P:])
    np.testing.assert_allclose(one["prediction"], alone["prediction"], rtol=0, atol=1e-4)
    truth = frame.loc[one["target_time"]].to_numpy()[np.arange(len(one)), [SENSORS.index(s) for s in one["sensor_id"]]]
    np.testing.assert_allclose(one["truth"].to_numpy(), np.where(truth == 0.0, np.nan, truth), rtol=1e-6)  # float32 data

    errors = pd.read_csv(tmp_path / "test_forecast_errors_by_sensor.csv", dtype={"sensor_id": str})
    assert list(errors["sensor_id"]) == SENSORS
    scored = forecast.dropna(subset=["truth"])
    mae = (scored["prediction"] - scored["truth"]).abs().groupby(scored["sensor_id"]).mean()
    np.testing.assert_allclose(errors.set_index("sensor_id")["mae"], mae.reindex(SENSORS), rtol=1e-9)
    for name in ("test_forecast_vs_truth.png", "test_forecast_error_map.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --split all: forecasts issued from the first full history to the last full window of the file
    everything = tmp_path / "all.parquet"
    assert main("predict", ["--model", "m", "--dataset", str(tmp_path / "toy.csv"), "--split", "all",
                            "--output", str(everything), "--no-plots"]) == 0
    issued_all = pd.read_parquet(everything)["issued_at"].unique()
    assert list(issued_all) == list(frame.index[P - 1 : 120 - Q])


def test_gman_predict_reads_the_training_data_as_the_training_run_did(forecaster, tmp_path, monkeypatch, capsys):
    """A package inside its run folder: --dataset naming the data it trained on takes that run's reader options
    (here its missing value, -1) and split; --data-option and --split-fractions still win."""
    import yaml

    from gman.serving.cli import main

    frame = series(steps=120).fillna(-1.0)
    data = tmp_path / "toy.csv"
    frame.rename_axis("timestamp").to_csv(data)
    run = tmp_path / "runs" / "r1"
    (run / "model").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"data": {"dataset": str(data), "missing_value": -1.0, "split": [0.5, 0.25, 0.25], "options": None}}))
    monkeypatch.setattr(Forecaster, "load", classmethod(lambda cls, source, **options: forecaster))
    out = tmp_path / "f.parquet"
    assert main("predict", ["--model", str(run / "model"), "--dataset", str(data), "--output", str(out),
                            "--no-plots"]) == 0
    assert f"reader options and split of the training run: {run / 'config.yaml'}" in capsys.readouterr().out
    forecast = pd.read_parquet(out)
    assert forecast["issued_at"].min() == frame.index[90 + P - 1]  # test = the last 25 % of 120 steps
    assert forecast["truth"].isna().any() and not (forecast["truth"] == -1.0).any()  # -1 = missing
    # another data set is read with the given options only, and the options given win
    assert main("predict", ["--model", str(run / "model"), "--dataset", str(data), "--output", str(out),
                            "--no-plots", "--split-fractions", "0.7,0.1,0.2", "--data-option", "missing_value=null"]) == 0
    forecast = pd.read_parquet(out)
    assert forecast["issued_at"].min() == frame.index[96 + P - 1] and (forecast["truth"] == -1.0).any()
    other = tmp_path / "other.csv"
    frame.rename_axis("timestamp").to_csv(other)
    capsys.readouterr()
    assert main("predict", ["--model", str(run / "model"), "--dataset", str(other), "--output", str(out),
                            "--no-plots"]) == 0
    assert "training run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [(["--input", "h.csv", "--split", "val"], "--split: belongs to --dataset and has no effect with --input"),
     (["--input", "h.csv", "--split-fractions", "0.6,0.2,0.2"], "--split-fractions: belongs to --dataset"),
     (["--input", "h.csv", "--stride", "2"], "--stride: belongs to --dataset"),
     (["--input", "h.csv", "--sensors", "400001"], "--sensors: belongs to --dataset"),
     (["--input", "h.csv", "--plot-days", "1"], "--plot-days: belongs to --dataset"),
     (["--input", "h.csv", "--no-plots"], "--no-plots: belongs to --dataset"),
     (["--input", "h.csv", "--batch-size", "8"], "--batch-size: belongs to --dataset"),
     (["--input", "h.csv", "--data-option", "days=2"], "--data-option: belongs to --dataset"),
     (["--dataset", "synthetic", "--layout", "wide"], "--layout: belongs to --input and has no effect with --dataset"),
     (["--dataset", "synthetic", "--plot-days", "0"], "--plot-days: must be a number of days more than 0, got 0"),
     (["--dataset", "synthetic", "--plot-days", "-2"], "--plot-days: must be a number of days more than 0, got -2"),
     (["--dataset", "synthetic", "--plot-days", "nan"], "--plot-days: must be a number of days more than 0, got nan"),
     (["--dataset", "synthetic", "--stride", "0"], "--stride: must be at least 1, got 0"),
     (["--dataset", "synthetic", "--split-fractions", "0.7,0.3"], "--split-fractions: expected three numbers")],
)
def test_gman_predict_refuses_ignored_and_bad_options_before_any_work(tmp_path, monkeypatch, extra, message):
    from gman.serving.cli import main

    def no_load(cls, source, **options):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(Forecaster, "load", classmethod(no_load))
    with pytest.raises(ConfigError, match=message) as err:
        main("predict", ["--model", "m", "--output", str(tmp_path / "f.csv"), *extra])
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_forecast_plot_labels_the_lead_time_in_minutes(monkeypatch, tmp_path):
    from gman.serving import cli

    issued = pd.date_range("2024-03-04", periods=30, freq="10min")  # a 10-minute model, Q = 4
    rows = [{"sensor_id": "a", "issued_at": t, "target_time": t + k * pd.Timedelta("10min"), "step": k,
             "minutes_ahead": 10.0 * k, "prediction": 1.0, "truth": 1.0} for t in issued for k in range(1, 5)]
    forecast = pd.DataFrame(rows)
    figures = []
    monkeypatch.setattr(cli, "_save_figure", lambda fig, path: figures.append(fig))
    for days in (1.0, 25 / 1440):  # the whole day; 25 minutes: no step-3 or step-4 rows are shown
        cli.plot_forecast_vs_truth(forecast, ["a"], tmp_path / "p.png", days=days, units="mph")
        labels = [text.get_text() for text in figures[-1].axes[0].get_legend().get_texts()]
        assert labels == ["truth", "forecast 30 min ahead", "forecast 40 min ahead"], (days, labels)


def test_error_map_uses_sensor_locations(shared_data, tmp_path):
    from gman.serving.cli import plot_error_map, read_locations

    metr = read_locations(shared_data / "graphs/metr-la/graph_sensor_locations.csv")
    bay = read_locations(shared_data / "graphs/pems-bay/graph_sensor_locations_bay.csv")  # no header
    assert (len(metr), len(bay)) == (207, 325)
    assert metr.loc["773869"].tolist() == [34.15497, -118.31829]
    assert bay.loc["400001"].tolist() == [37.364085, -121.901149]
    errors = pd.DataFrame({"sensor_id": metr.index, "mae": np.linspace(1, 5, len(metr))})
    plot_error_map(errors, metr, tmp_path / "map.png", units="mph", title="metr-la")
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


def test_history_files_across_a_daylight_saving_change_are_read_as_instants(tmp_path):
    from gman.serving.cli import read_history

    start = pd.Timestamp("2024-11-03 06:30", tz="UTC").tz_convert("America/Chicago")  # 01:30 CDT, clocks go back
    stamps = pd.date_range(start, periods=P + 6, freq="5min", name="timestamp")
    pd.DataFrame({"400001": 50.0}, index=stamps).to_csv(tmp_path / "h.csv")  # offsets -05:00 then -06:00
    assert read_history(tmp_path / "h.csv", "America/Chicago").index.equals(stamps)
    kept = read_history(tmp_path / "h.csv").index  # a model without a zone: each timestamp keeps its offset
    assert [t.isoformat() for t in kept] == [t.isoformat() for t in stamps]
    pd.DataFrame({"timestamp": ["x"] * 3, "400001": 1.0}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ForecastInputError, match="does not hold timestamps"):
        read_history(tmp_path / "bad.csv")


def test_a_history_across_a_daylight_saving_change_is_read_on_its_wall_clock_from_every_source(
        forecaster, tmp_path, monkeypatch):
    """A model without a zone reads a tz-aware history's wall clock; the same instants written with their UTC
    offsets (an Index of Timestamps, or a file: what crossing a DST change gives) forecast the same."""
    from gman.serving.cli import main

    monkeypatch.setattr(Forecaster, "load", classmethod(lambda cls, source, **options: forecaster))
    for utc_start in ("2024-11-03 06:30", "2024-03-10 07:30"):  # Chicago: clocks go back, then forward
        stamps = pd.date_range(pd.Timestamp(utc_start, tz="UTC").tz_convert("America/Chicago"), periods=P + 2,
                               freq="5min", name="timestamp")
        frame = series(steps=P + 2).fillna(50.0).set_axis(stamps, axis=0)
        expected = forecaster.predict(frame)
        offsets = pd.Index([pd.Timestamp(t.isoformat()) for t in stamps], dtype=object)
        assert {t.utcoffset() for t in offsets} == {pd.Timedelta(hours=-5), pd.Timedelta(hours=-6)}
        pd.testing.assert_series_equal(forecaster.predict(frame.set_axis(offsets, axis=0))["prediction"],
                                       expected["prediction"])
        frame.to_csv(tmp_path / "dst.csv")
        assert main("predict", ["--model", "m", "--input", str(tmp_path / "dst.csv"), "--output", str(tmp_path / "f.csv")]) == 0
        written = pd.read_csv(tmp_path / "f.csv")
        np.testing.assert_allclose(written["prediction"], expected["prediction"], rtol=1e-9)
        assert (written["issued_at"] == str(stamps[-1])).all()  # the history's last offset, not UTC
        assert not np.allclose(forecaster.predict(frame.tz_convert("UTC"))["prediction"], expected["prediction"], atol=1e-3)


def test_a_long_history_may_leave_out_missing_readings_and_keeps_ids_as_text(forecaster, tmp_path, monkeypatch):
    """Rows left out of a long table are missing readings: a sensor without rows, a step without any; ids
    with leading zeros stay text."""
    from gman.serving.cli import main

    ids = ["001", "017", "030", "040", "045"]
    zeros = Forecaster.load(pkg.save_package(tmp_path / "m", forecaster.model, scaler_mean=MEAN, scaler_std=STD,
                                             sensor_ids=ids, interval=pd.Timedelta("5min"), missing_value=0.0,
                                             dataset_name="toy"))
    monkeypatch.setattr(Forecaster, "load", classmethod(lambda cls, source, **options: zeros))
    frame = series().iloc[:P + 2].set_axis(ids, axis=1)
    frame["030"] = np.nan  # never read
    frame.iloc[P - 1] = np.nan  # a step at which no sensor reported
    with pytest.warns(UserWarning, match=r"1 of 5 sensors have no observed reading .*\['030'\]"):
        expected = zeros.predict(frame)
    long = frame.rename_axis("timestamp").reset_index().melt(id_vars="timestamp", var_name="sensor_id",
                                                            value_name="value").dropna()
    long.sample(frac=1.0, random_state=0).to_csv(tmp_path / "long.csv", index=False)
    assert "030" not in set(long["sensor_id"]) and frame.index[P - 1] not in set(long["timestamp"])
    out = tmp_path / "f.csv"
    with pytest.warns(UserWarning, match=r"1 of 5 sensors have no observed reading .*\['030'\]"):
        assert main("predict", ["--model", "m", "--input", str(tmp_path / "long.csv"), "--output", str(out)]) == 0
    written = pd.read_csv(out, dtype={"sensor_id": str})
    assert list(written["sensor_id"][:5]) == ids
    np.testing.assert_allclose(written["prediction"], expected["prediction"], rtol=1e-9)


def test_history_files_whose_header_pandas_would_mend_are_refused(forecaster, tmp_path, monkeypatch):
    from gman.serving.cli import main, read_history

    frame = series().iloc[:P + 2].fillna(50.0).rename_axis("timestamp")
    monkeypatch.setattr(Forecaster, "load", classmethod(lambda cls, source, **options: forecaster))
    argv = ["--model", "m", "--output", str(tmp_path / "f.csv"), "--input"]

    # a repeated sensor column: pandas would call the copy '400001.1' and the forecast would use the first
    frame.assign(extra=frame["400001"] + 1).to_csv(tmp_path / "dup.csv", header=["400001", *SENSORS[1:], "400001"])
    with pytest.raises(DataError, match=r"dup.csv: the header names column '400001' twice \(columns 2 and 7\)"):
        main("predict", [*argv, str(tmp_path / "dup.csv")])
    assert not (tmp_path / "f.csv").exists()

    # no header row: the first row of readings would become the column names
    frame.to_csv(tmp_path / "bare.csv", header=False)
    with pytest.raises(DataError, match=r"bare.csv: the first row \(2024-03-03 23:20:00, [0-9.]+, [0-9.]+, \.\.\.\) "
                                        r"holds readings, not column names; the file needs a header row"):
        read_history(tmp_path / "bare.csv")
    frame.reset_index(drop=True).to_csv(tmp_path / "bare_values.csv", header=False, index=False)
    with pytest.raises(DataError, match="holds readings, not column names"):
        read_history(tmp_path / "bare_values.csv")

    # the long format with its value column named otherwise
    long = frame.reset_index().melt(id_vars="timestamp", var_name="sensor_id", value_name="speed")
    long.to_csv(tmp_path / "long.csv", index=False)
    with pytest.raises(DataError, match=r"long.csv: a 'sensor_id' column makes this the long format, which needs columns "
                                        r"timestamp, sensor_id, value: no 'value' column \(columns found: "
                                        r"\['timestamp', 'sensor_id', 'speed'\]\)"):
        main("predict", [*argv, str(tmp_path / "long.csv")])
    long.rename(columns={"speed": "value"}).to_csv(tmp_path / "long_ok.csv", index=False)
    frame.to_csv(tmp_path / "wide.csv")  # sensor ids that are integers are no header of readings
    pd.testing.assert_frame_equal(read_history(tmp_path / "long_ok.csv"), read_history(tmp_path / "wide.csv"))
    assert main("predict", [*argv, str(tmp_path / "wide.csv")]) == 0


def test_many_histories_run_in_batches_and_give_what_one_at_a_time_gives(forecaster):
    frame = series(steps=60).fillna(50.0)
    histories = [frame.iloc[i:i + P] for i in range(40)]  # 40 > batch_size: three forward passes
    assert forecaster.batch_size == 16
    together = forecaster.predict(histories)
    for i in (0, 15, 16, 39):
        alone = forecaster.predict(histories[i])
        got = together[together["history"] == i].drop(columns="history").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, alone, rtol=1e-5)


def test_missing_inputs_take_the_scalers_missing_input_in_predict_and_in_exports(forecaster, tmp_path):
    """A model trained with the authors' statistics sees a missing input as (0 - mean) / std: the package
    records it, and predict, the ONNX / .pt2 module and the training windows all agree."""
    missing_input = (0.0 - MEAN) / STD
    path = pkg.save_package(tmp_path / "authors", forecaster.model, scaler_mean=MEAN, scaler_std=STD,
                            sensor_ids=SENSORS, interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy",
                            units="mph", scaler_missing_input=missing_input)
    authors = Forecaster.load(path, backend="torch")
    assert authors.metadata["scaler"]["missing_input"] == pytest.approx(missing_input)
    frame = series()
    observed = frame.notna().to_numpy() & (frame.to_numpy() != 0.0)
    dataset = SensorDataset(values=np.nan_to_num(frame.to_numpy()).astype(np.float32), mask=observed,
                            index=frame.index, sensor_ids=SENSORS, name="toy")
    windows = WindowDataset(dataset, P, Q, StandardScaler(MEAN, STD, missing_input))
    i = next(i for i in range(len(windows)) if not windows[i]["x_mask"].all())  # a window with missing inputs
    item = windows[i]
    with torch.no_grad():
        expected = authors.model(item["x"][None], item["time"][None])[0] * STD + MEAN
        module = authors.as_module(fold=True)
        raw = torch.from_numpy(np.where(observed, frame.to_numpy(), np.nan)[i:i + P].astype(np.float32))[None]
        exported = module(raw, item["time"][None])[0]
    got = Forecaster.to_wide(authors.predict(frame.iloc[i:i + P])).to_numpy()
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(exported.numpy(), expected.numpy(), rtol=1e-5, atol=1e-3)
    # the same window read as the older 0-for-missing model differs
    older = Forecaster.to_wide(forecaster.predict(frame.iloc[i:i + P])).to_numpy()
    assert np.abs(older - got).max() > 1e-3
