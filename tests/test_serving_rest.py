"""End to end: `gman train --register` -> MLflow pyfunc model -> Forecaster by URI / checkpoint -> `mlflow models serve`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from gman.errors import ConfigError
from gman.serving.cli import main as serving_main
from gman.serving.cli import serve_command_line, serving_environment
from gman.serving.forecaster import Forecaster

MODEL_NAME = "gman-tiny"

# `gman train` on a tiny synthetic network (10 sensors x 8 days), one short epoch, registered in MLflow.
TINY_CONFIG = """\
seed_everything: 5
model: {num_layers: 1, num_heads: 2, head_dim: 4, se_dim: 8}
data:
  dataset: synthetic
  options: {num_sensors: 10, days: 8}
  batch_size: 16
  eval_batch_size: 256
trainer: {max_epochs: 1, limit_train_batches: 4, limit_val_batches: 2, enable_progress_bar: false}
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real trained model: `gman train --register`, its output folder, and its sqlite tracking store."""
    root = tmp_path_factory.mktemp("train")
    (root / "tiny.yaml").write_text(TINY_CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "gman.cli", "train", "--config", "tiny.yaml", "--output-dir", "runs/tiny",
         "--register", MODEL_NAME],
        cwd=root, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((root / "runs/tiny/run.json").read_text())
    return {"uri": run["tracking_uri"], "run_id": run["run_id"], "package": root / "runs/tiny/model",
            "checkpoint": Path(run["best_checkpoint"]), "root": root}


def history(steps: int = 14) -> pd.DataFrame:
    """The last ``steps`` readings of the synthetic network the model was trained on (0 = missing kept)."""
    from gman.data.synthetic import make_synthetic

    data = make_synthetic(num_sensors=10, days=8).to_frame().iloc[-steps:]
    frame = data.astype("float64").round(3)
    frame.iloc[2, 1] = np.nan
    frame.iloc[5, 3] = 0.0  # the missing value
    return frame


def split_payload(frame: pd.DataFrame, **extra_columns) -> dict:
    """The documented payload: a ``timestamp`` column plus one column per sensor, missing as null."""
    table = frame.astype(object).where(frame.notna(), None)
    columns = ["timestamp", *extra_columns, *map(str, frame.columns)]
    rows = [
        [stamp.isoformat(), *(values[i] for values in extra_columns.values()), *row]
        for i, (stamp, row) in enumerate(zip(frame.index, table.itertuples(index=False)))
    ]
    return {"dataframe_split": {"columns": columns, "data": [list(r) for r in rows]}}


def test_logged_model_has_signature_example_and_pinned_requirements(registry):
    import mlflow
    from mlflow.models import Model

    mlflow.set_tracking_uri(registry["uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/1"))
    model = Model.load(local / "MLmodel")
    schema = model.signature.inputs
    assert schema.input_names()[:2] == ["timestamp", "history_id"]
    assert set(Forecaster.load(registry["package"]).sensor_ids) <= set(schema.input_names())
    assert {"sensor_id", "target_time", "prediction"} <= set(model.signature.outputs.input_names())
    assert model.saved_input_example_info is not None
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "pandas==" in requirements
    assert not list(local.rglob("*.pkl")), "the pyfunc model must not be pickled"


def test_every_source_loads_the_same_forecaster(registry):
    import mlflow

    mlflow.set_tracking_uri(registry["uri"])
    frame = history()
    expected = Forecaster.load(registry["package"]).predict(frame)
    sources = [registry["checkpoint"], f"runs:/{registry['run_id']}/model", f"models:/{MODEL_NAME}/1"]
    for source in sources:
        pd.testing.assert_frame_equal(Forecaster.load(source).predict(frame), expected)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    served = pyfunc.predict(frame.rename_axis("timestamp").reset_index())
    np.testing.assert_allclose(served["prediction"].to_numpy(), expected["prediction"].to_numpy(), rtol=0, atol=1e-6)


def test_rolling_forecasts_reproduce_the_training_test_scores(registry):
    """Serving's input preparation (scaling, masking, time features) is the training pipeline's:
    forecasts over the test split score exactly what `gman train` reported per horizon."""
    from gman.data.synthetic import make_synthetic
    from gman.data.windows import chronological_split
    from gman.serving.cli import rolling_forecast

    data = make_synthetic(num_sensors=10, days=8)
    start, stop = chronological_split(data.num_steps, (0.7, 0.1, 0.2))[2]
    forecaster = Forecaster.load(registry["package"])
    forecast = rolling_forecast(forecaster, data, start, stop)
    # the batch size is a matter of speed only
    pd.testing.assert_frame_equal(rolling_forecast(forecaster, data, start, stop, batch_size=7), forecast, rtol=1e-6)
    forecast = forecast.dropna(subset=["truth"])
    mae = (forecast["prediction"] - forecast["truth"]).abs().groupby(forecast["step"]).mean()
    reported = pd.read_csv(registry["root"] / "runs/tiny/horizons.csv", dtype={"step": str})
    reported = reported[(reported["model"] == "GMAN") & reported["step"].str.isdigit()]
    reported = reported.set_index(reported["step"].astype(int))["mae"]
    np.testing.assert_allclose(mae.to_numpy(), reported.loc[mae.index].to_numpy(), rtol=2e-5)


def test_log_model_without_an_active_run(registry, tmp_path):
    import mlflow

    from gman.serving.pyfunc import log_model

    mlflow.set_tracking_uri(registry["uri"])
    experiment = mlflow.create_experiment("log-model-alone", artifact_location=str(tmp_path / "artifacts"))
    mlflow.set_experiment(experiment_id=experiment)
    info = log_model(registry["package"], artifact_path="forecaster")
    assert mlflow.active_run() is None  # the run it opened is closed again
    loaded = Forecaster.load(f"runs:/{info.run_id}/forecaster")
    pd.testing.assert_frame_equal(loaded.predict(history()), Forecaster.load(registry["package"]).predict(history()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rest_server_answers_like_the_forecaster(registry, tmp_path):
    port = _free_port()
    env = serving_environment()
    env.update(MLFLOW_TRACKING_URI=registry["uri"], OMP_NUM_THREADS="1")
    command = serve_command_line(f"models:/{MODEL_NAME}/1", host="127.0.0.1", port=port)
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "server did not answer /ping in 90 s"
            try:
                if requests.get(f"{url}/ping", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)

        frame = history()
        sensors = list(frame.columns)
        expected = Forecaster.load(registry["package"]).predict(frame)
        answer = requests.post(f"{url}/invocations", json=split_payload(frame), timeout=30)
        assert answer.status_code == 200, answer.text[-500:]
        served = pd.DataFrame(answer.json()["predictions"])
        assert list(served.columns) == list(expected.columns)
        assert (served["sensor_id"] == expected["sensor_id"]).all()
        assert (pd.to_datetime(served["target_time"]) == expected["target_time"]).all()
        assert (pd.to_datetime(served["issued_at"]) == frame.index[-1]).all()
        np.testing.assert_allclose(served["prediction"], expected["prediction"], rtol=0, atol=1e-5)

        # Several histories in one request (history_id column); integer readings are fine too.
        early = frame.iloc[:12].fillna(0).round().astype(int)
        both = pd.concat([early, frame.iloc[2:]])
        ids = ["early"] * 12 + ["late"] * (len(frame) - 2)
        answer = requests.post(f"{url}/invocations", json=split_payload(both, history_id=ids), timeout=30)
        assert answer.status_code == 200, answer.text[-500:]
        batch = pd.DataFrame(answer.json()["predictions"])
        late = batch[batch["history_id"] == "late"]["prediction"].to_numpy()
        np.testing.assert_allclose(late, expected["prediction"], rtol=0, atol=1e-5)
        assert len(batch) == 2 * len(expected)

        # The wide layout: one record per target time, a field per sensor, the same numbers.
        answer = requests.post(f"{url}/invocations", json={**split_payload(both, history_id=ids), "params": {"layout": "wide"}},
                               timeout=30)
        assert answer.status_code == 200, answer.text[-500:]
        wide = pd.DataFrame(answer.json()["predictions"])
        assert list(wide.columns) == ["history_id", "issued_at", "target_time", *map(str, sensors)]
        late = wide[wide["history_id"] == "late"]
        assert (pd.to_datetime(late["target_time"]) == Forecaster.to_wide(expected).index).all()
        np.testing.assert_allclose(late[list(map(str, sensors))].to_numpy(), Forecaster.to_wide(expected).to_numpy(),
                                   rtol=0, atol=1e-5)
        assert (wide["history_id"] == "early").sum() == len(late)

        # Bad payloads: HTTP 400 whose message is the one-line validation message (no printout of the input), not 500.
        bad = {
            "params: layout 'long' is not one of tidy, wide": {**split_payload(frame), "params": {"layout": "long"}},
            "history: 2 of the model's 10 sensors missing from the columns": split_payload(frame.drop(columns=sensors[:2])),
            "history: 5 time steps, the model needs at least P=12": split_payload(frame.iloc[:5]),
            "history: irregular timestamps": split_payload(frame.drop(index=frame.index[6])),
            f"history: column {str(sensors[0])!r} is not numeric":
                split_payload(frame.astype(object).assign(**{sensors[0]: ["n/a"] * len(frame)})),
        }
        for message, payload in bad.items():
            answer = requests.post(f"{url}/invocations", json=payload, timeout=30)
            assert answer.status_code == 400, (message, answer.status_code, answer.text[-300:])
            served_message = answer.json()["message"]
            assert served_message.startswith(message) and "\n" not in served_message, (message, served_message[:300])
        answer = requests.post(f"{url}/invocations", data="{not json", headers={"Content-Type": "application/json"}, timeout=30)
        assert 400 <= answer.status_code < 500
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the uvicorn workers it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        log.close()


def test_gman_serve_wraps_mlflow_on_loopback(registry, capsys):
    assert serving_main("serve", [f"models:/{MODEL_NAME}/1", "--port", "5123", "--dry-run"]) == 0
    command = capsys.readouterr().out.split()
    assert command[1:4] == ["models", "serve", "-m"] and command[4] == f"models:/{MODEL_NAME}/1"
    assert command[command.index("--env-manager") + 1] == "local"
    assert command[command.index("-h") + 1] == "127.0.0.1" and command[command.index("-p") + 1] == "5123"
    # A package folder is wrapped as an MLflow model first: with --dry-run in a folder that stays (next test).
    with pytest.raises(ConfigError, match="--dry-run: .* add --mlflow-model DIR"):
        serving_main("serve", [str(registry["package"]), "--dry-run"])


def test_gman_serve_dry_run_prints_a_quoted_command_that_works_later(tmp_path, capsys):
    import shlex

    import torch

    from gman.model import GMAN
    from gman.serving.package import save_package

    model = GMAN(num_nodes=3, steps_per_day=288, se_dim=4, history_steps=4, horizon_steps=2, num_layers=1,
                 num_heads=2, head_dim=4)
    model.set_spatial_embedding(torch.randn(3, 4))
    package = save_package(tmp_path / "package", model.eval(), scaler_mean=50.0, scaler_std=9.0,
                           sensor_ids=["a", "b", "c"], interval=pd.Timedelta("5min"), missing_value=0.0,
                           dataset_name="toy")
    folder = tmp_path / "served model"
    assert serving_main("serve", [str(package), "--dry-run", "--host", "bad host", "--mlflow-model", str(folder)]) == 0
    command = shlex.split(capsys.readouterr().out)
    assert command[command.index("-h") + 1] == "bad host"  # quoted, one argument
    served = Path(command[command.index("-m") + 1])
    assert served == folder.resolve() and (served / "MLmodel").is_file()  # still there after gman returned
    frame = pd.DataFrame(np.full((4, 3), 50.0), columns=["a", "b", "c"],
                         index=pd.date_range("2024-01-01", periods=4, freq="5min"))
    pd.testing.assert_frame_equal(Forecaster.load(served).predict(frame), Forecaster.load(package).predict(frame))
    # an MLflow model folder is served as it is (by its absolute path); an existing --mlflow-model is refused
    assert serving_main("serve", [str(served), "--dry-run"]) == 0
    assert shlex.split(capsys.readouterr().out)[command.index("-m") + 1] == str(served)
    for argv, message in [([str(package), "--mlflow-model", str(folder)], "--mlflow-model: .* already exists"),
                          ([str(served), "--mlflow-model", str(tmp_path / "new")], "is an MLflow model already")]:
        with pytest.raises(ConfigError, match=message):
            serving_main("serve", [*argv, "--dry-run"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["package", "served model"]  # nothing half-written


@pytest.mark.parametrize(
    "argv, message",
    [(["--port", "70000"], "--port: 70000 is not a port number"), (["--port", "0"], "--port: 0 is not"),
     (["--workers", "0"], "--workers: must be at least 1, got 0"), (["--timeout", "-5"], "--timeout: must be at least 1")],
)
def test_gman_serve_refuses_bad_arguments_in_one_line(argv, message):
    with pytest.raises(ConfigError, match=message) as info:
        serving_main("serve", ["some-model", *argv])
    assert "\n" not in str(info.value)


def test_gman_serve_refuses_a_taken_port_before_starting_mlflow(monkeypatch):
    def no_server(*args, **kwargs):
        raise AssertionError("the server must not be started")

    monkeypatch.setattr(subprocess, "Popen", no_server)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            serving_main("serve", ["some-model", "--port", str(port)])


@pytest.mark.parametrize("variable, value", [("GMAN_THREADS", "abc"), ("GMAN_BACKEND", "tensorflow")])
def test_gman_serve_refuses_a_bad_gman_variable_before_starting_mlflow(monkeypatch, variable, value):
    from gman.errors import DataError

    def no_server(*args, **kwargs):
        raise AssertionError("the server must not be started")

    monkeypatch.setattr(subprocess, "Popen", no_server)
    monkeypatch.setenv(variable, value)
    with pytest.raises(DataError, match=f"^{variable}: .*{value!r}"):
        serving_main("serve", ["models:/gman-tiny/1", "--port", str(_free_port())])  # served as it is


def test_payload_timestamps_across_a_daylight_saving_change_are_read_as_instants():
    from gman.serving.pyfunc import frame_to_histories

    start = pd.Timestamp("2024-11-03 06:30", tz="UTC").tz_convert("America/Chicago")  # 01:30 CDT; clocks go back at 02:00
    stamps = pd.date_range(start, periods=12, freq="5min")
    payload = pd.DataFrame({"timestamp": [t.isoformat() for t in stamps], "400001": 50.0})
    assert payload["timestamp"].str[-6:].nunique() == 2  # -05:00, then -06:00
    assert frame_to_histories(payload, timezone="America/Chicago").index.equals(stamps.rename("timestamp"))
    kept = frame_to_histories(payload).index  # a model without a zone: each timestamp keeps its own offset
    assert [t.isoformat() for t in kept] == payload["timestamp"].tolist()


# ----------------------------------------------------------------------------- MLflow's scoring app in process

TOY_SENSORS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def toy_package(tmp_path_factory) -> Path:
    """A small untrained package (no time zone: trained on naive timestamps), P = 4, Q = 2."""
    import torch

    from gman.model import GMAN
    from gman.serving.package import save_package

    torch.manual_seed(0)
    model = GMAN(num_nodes=3, steps_per_day=288, se_dim=4, history_steps=4, horizon_steps=2, num_layers=1,
                 num_heads=2, head_dim=4)
    model.set_spatial_embedding(torch.randn(3, 4))
    return save_package(tmp_path_factory.mktemp("toy") / "package", model.eval(), scaler_mean=50.0, scaler_std=9.0,
                        sensor_ids=TOY_SENSORS, interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy")


@pytest.fixture
def scoring_app(toy_package, tmp_path, monkeypatch):
    """The app `mlflow models serve` runs (FastAPI, MLflow's schema check and error handling), in process."""
    import warnings

    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")  # starlette's own note
        from fastapi.testclient import TestClient

    from gman.serving.pyfunc import save_model

    monkeypatch.delenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", raising=False)  # init() sets it; restored afterwards
    model = mlflow.pyfunc.load_model(str(save_model(toy_package, tmp_path / "mlflow-model")))
    with TestClient(scoring_server.init(model)) as client:
        yield client


def toy_history(start: str = "2024-03-04 07:00", steps: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    index = pd.date_range(start, periods=steps, freq="5min")
    return pd.DataFrame(50 + 9 * rng.standard_normal((steps, 3)), index=index, columns=TOY_SENSORS).round(3)


def test_payloads_without_timestamps_get_gmans_one_line_400(scoring_app):
    no_timestamp = split_payload(toy_history())
    no_timestamp["dataframe_split"]["columns"][0] = "time"
    for payload in (no_timestamp, {"dataframe_split": {"columns": [], "data": []}}):
        answer = scoring_app.post("/invocations", json=payload)
        assert answer.status_code == 400, answer.text[-300:]
        assert answer.json()["message"] == "payload: needs a 'timestamp' column with the time of each row"
    epoch_seconds = split_payload(toy_history())
    for row, seconds in zip(epoch_seconds["dataframe_split"]["data"], range(1704067200, 1704070000, 300)):
        row[0] = seconds
    answer = scoring_app.post("/invocations", json=epoch_seconds)
    assert answer.status_code == 400, answer.text[-300:]
    assert answer.json()["message"] == ("payload: column 'timestamp' holds values that are not timestamps (numbers "
                                        "such as 1704067200 are not timestamps (send ISO 8601 text))")


def test_a_sensor_sent_as_null_throughout_is_forecast_as_missing(scoring_app, toy_package):
    frame = toy_history().assign(b=np.nan)  # null in every row of the payload
    with pytest.warns(UserWarning, match=r"1 of 3 sensors have no observed reading .*\['b'\]"):
        expected = Forecaster.load(toy_package).predict(frame)
    with pytest.warns(UserWarning, match=r"1 of 3 sensors have no observed reading .*\['b'\]"):
        answer = scoring_app.post("/invocations", json=split_payload(frame))
    assert answer.status_code == 200, answer.text[-300:]
    served = pd.DataFrame(answer.json()["predictions"])
    np.testing.assert_allclose(served["prediction"], expected["prediction"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("utc_start", ["2024-11-03 06:40", "2024-03-10 07:40"])  # Chicago: clocks back, forward
def test_a_payload_across_a_daylight_saving_change_is_read_on_its_wall_clock_like_the_forecaster(
        scoring_app, toy_package, utc_start):
    """A model trained on naive timestamps reads the wall clock of a tz-aware history; the same instants sent as
    ISO strings (offsets -05:00 and -06:00) give the same forecast, not one read in UTC, 5 or 6 hours off."""
    stamps = pd.date_range(pd.Timestamp(utc_start, tz="UTC").tz_convert("America/Chicago"), periods=6, freq="5min")
    frame = toy_history(steps=6).set_axis(stamps, axis=0)
    forecaster = Forecaster.load(toy_package)
    expected = forecaster.predict(frame)
    payload = split_payload(frame)
    assert len({row[0][-6:] for row in payload["dataframe_split"]["data"]}) == 2
    answer = scoring_app.post("/invocations", json=payload)
    assert answer.status_code == 200, answer.text[-300:]
    served = pd.DataFrame(answer.json()["predictions"])
    np.testing.assert_allclose(served["prediction"], expected["prediction"], rtol=0, atol=1e-5)
    assert (served["issued_at"] == stamps[-1].isoformat()).all()  # in the history's last offset, not rewritten in UTC
    assert not np.allclose(forecaster.predict(frame.tz_convert("UTC"))["prediction"], expected["prediction"], atol=1e-3)
