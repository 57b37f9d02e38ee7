"""MLflow: the pyfunc model logged and registered, loaded back by URI, and served over REST by `mlflow models serve`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch

from gman.model import GMAN
from gman.serving.cli import main as serving_main
from gman.serving.cli import serve_command_line, serving_environment
from gman.serving.forecaster import Forecaster
from gman.serving.package import save_package

SENSORS = ["773869", "767541", "767542", "717447", "717446", "717445"]
MODEL_NAME = "gman-tiny"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A sqlite tracking store with a tiny GMAN logged in a run and registered as version 1."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    torch.manual_seed(0)
    model = GMAN(num_nodes=len(SENSORS), steps_per_day=288, se_dim=4, num_layers=1, num_heads=2, head_dim=4)
    model.set_spatial_embedding(torch.randn(len(SENSORS), 4))
    package = save_package(
        root / "package", model.eval(), scaler_mean=58.0, scaler_std=11.0, sensor_ids=SENSORS,
        interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="metr-la-subset", units="mph",
    )
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment = mlflow.create_experiment("serving", artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=experiment) as run:
            from gman.serving.pyfunc import log_model

            info = log_model(package, artifact_path="model", registered_model_name=MODEL_NAME)
        yield {"uri": tracking_uri, "package": package, "run_id": run.info.run_id, "info": info, "root": root}
    finally:
        mlflow.set_tracking_uri(previous)


def history(steps: int = 14) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    values = np.round(58 + 11 * rng.standard_normal((steps, len(SENSORS))), 3)
    values[2, 1] = np.nan
    values[5, 3] = 0.0  # the missing value
    index = pd.date_range("2012-03-04 23:10", periods=steps, freq="5min")
    return pd.DataFrame(values, index=index, columns=SENSORS)


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
    from mlflow.models import Model

    info = registry["info"]
    assert info.registered_model_version == 1
    schema = info.signature.inputs
    assert schema.input_names()[:2] == ["timestamp", "history_id"]
    assert set(SENSORS) <= set(schema.input_names())
    assert {"sensor_id", "target_time", "prediction"} <= set(info.signature.outputs.input_names())
    local = Path(__import__("mlflow").artifacts.download_artifacts(f"runs:/{registry['run_id']}/model"))
    model = Model.load(local / "MLmodel")
    assert model.saved_input_example_info is not None
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "pandas==" in requirements
    assert not list(local.rglob("*.pkl")), "the pyfunc model must not be pickled"


def test_uris_load_the_same_forecaster(registry):
    import mlflow

    mlflow.set_tracking_uri(registry["uri"])
    expected = Forecaster.load(registry["package"]).predict(history())
    for uri in (f"runs:/{registry['run_id']}/model", f"models:/{MODEL_NAME}/1"):
        pd.testing.assert_frame_equal(Forecaster.load(uri).predict(history()), expected)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    served = pyfunc.predict(history().rename_axis("timestamp").reset_index())
    np.testing.assert_allclose(served["prediction"].to_numpy(), expected["prediction"].to_numpy(), rtol=0, atol=1e-6)


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

        # Bad payloads: HTTP 400 carrying the validation message, not 500.
        bad = {
            "sensors missing from the columns": split_payload(frame.drop(columns=SENSORS[:2])),
            "the model needs at least P=12": split_payload(frame.iloc[:5]),
            "irregular timestamps": split_payload(frame.drop(index=frame.index[6])),
            "is not numeric": split_payload(frame.astype(object).assign(**{SENSORS[0]: ["n/a"] * len(frame)})),
        }
        for message, payload in bad.items():
            answer = requests.post(f"{url}/invocations", json=payload, timeout=30)
            assert answer.status_code == 400, (message, answer.status_code, answer.text[-300:])
            assert message in answer.json()["message"], (message, answer.json()["message"][-300:])
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
    # A package folder is wrapped as an MLflow model first.
    assert serving_main("serve", [str(registry["package"]), "--dry-run"]) == 0
    assert "mlflow-model" in capsys.readouterr().out
