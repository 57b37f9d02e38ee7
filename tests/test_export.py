"""`gman export`: ONNX (checked with onnxruntime) and torch.export graphs compute what the Forecaster computes."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from gman.errors import GmanError
from gman.model import GMAN
from gman.serving.cli import example_inputs
from gman.serving.cli import main as serving_main
from gman.serving.forecaster import Forecaster
from gman.serving.package import save_package
from gman.data.dataset import time_features

SENSORS = [f"s{i}" for i in range(7)]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = GMAN(num_nodes=len(SENSORS), steps_per_day=288, se_dim=4, history_steps=6, horizon_steps=3,
                 num_layers=1, num_heads=2, head_dim=4)
    model.set_spatial_embedding(torch.randn(len(SENSORS), 4))
    return save_package(tmp_path_factory.mktemp("pkg") / "model", model.eval(), scaler_mean=50.0, scaler_std=9.0,
                        sensor_ids=SENSORS, interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy")


def _history_and_inputs(forecaster: Forecaster):
    """A history frame (NaN and 0 missing) and the same data as raw arrays for an exported graph."""
    rng = np.random.default_rng(5)
    values = 50 + 9 * rng.standard_normal((6, len(SENSORS)))
    values[1, 2], values[4, 5] = np.nan, 0.0
    index = pd.date_range("2024-05-05 23:45", periods=6, freq="5min")
    frame = pd.DataFrame(values, index=index, columns=SENSORS)
    future = forecaster.future_index(index[-1])
    time = time_features(index.append(future), forecaster.interval)
    return frame, values[None].astype(np.float32), time[None]


def test_onnx_export_matches_pytorch(package, tmp_path, capsys):
    onnx = pytest.importorskip("onnx", reason="the [onnx] extra is not installed")
    onnxruntime = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    pytest.importorskip("onnxscript", reason="the [onnx] extra is not installed")

    output = tmp_path / "gman.onnx"
    assert serving_main("export", ["--model", str(package), "--format", "onnx", "--output", str(output)]) == 0
    assert "max abs difference vs PyTorch" in capsys.readouterr().out

    proto = onnx.load(str(output))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["gman.json"])["sensor_ids"] == SENSORS
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    forecaster = Forecaster.load(package)
    # The same history through the Forecaster's pandas path and through the graph; batch 1 and 5.
    frame, values, time = _history_and_inputs(forecaster)
    (graph,) = session.run(None, {"values": values, "time": time})
    expected = Forecaster.to_wide(forecaster.predict(frame)).to_numpy()
    assert np.max(np.abs(graph[0] - expected)) <= 1e-4
    values5, time5 = example_inputs(forecaster, batch=5, seed=3)
    (graph5,) = session.run(None, {"values": values5.numpy(), "time": time5.numpy()})
    with torch.no_grad():
        reference = forecaster.as_module()(values5, time5).numpy()
    assert graph5.shape == (5, 3, len(SENSORS))
    assert np.max(np.abs(graph5 - reference)) <= 1e-4


def test_torch_export_program_matches_pytorch(package, tmp_path):
    output = tmp_path / "gman.pt2"
    assert serving_main("export", ["--model", str(package), "--format", "torch-export", "--output", str(output)]) == 0
    extra = {"gman.json": ""}
    program = torch.export.load(output, extra_files=extra)
    assert json.loads(extra["gman.json"])["horizon_steps"] == 3
    forecaster = Forecaster.load(package)
    frame, values, time = _history_and_inputs(forecaster)
    with torch.no_grad():
        graph = program.module()(torch.from_numpy(values), torch.from_numpy(time)).numpy()
    expected = Forecaster.to_wide(forecaster.predict(frame)).to_numpy()
    assert np.max(np.abs(graph[0] - expected)) <= 1e-4


def test_export_rejects_unknown_format(package):
    with pytest.raises(GmanError, match="--format: invalid choice"):
        serving_main("export", ["--model", str(package), "--format", "tflite"])


@pytest.mark.parametrize(
    "fmt, output",
    [("onnx", "m.pt2"), ("onnx", "m.txt"), ("onnx", "m"), ("torch-export", "m.onnx"), ("torch-export", "m.pt")],
)
def test_export_refuses_an_output_whose_extension_is_not_the_formats(package, tmp_path, monkeypatch, fmt, output):
    def no_load(cls, source, **options):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(Forecaster, "load", classmethod(no_load))
    suffix = ".onnx" if fmt == "onnx" else ".pt2"
    with pytest.raises(GmanError, match=f"--output: .*{output} must end in {suffix} for --format {fmt}") as err:
        serving_main("export", ["--model", str(package), "--format", fmt, "--output", str(tmp_path / output)])
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt, name", [("onnx", "m.onnx"), ("torch-export", "m.pt2")])
def test_export_refuses_an_unwritable_output_before_loading_the_model(package, tmp_path, monkeypatch, fmt, name):
    def no_load(cls, source, **options):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(Forecaster, "load", classmethod(no_load))
    (tmp_path / name).mkdir()  # a folder with the file's name
    (tmp_path / "plain").write_text("a file\n")
    for output, message in [(tmp_path / name, f"--output: {tmp_path / name} is a folder; name a file"),
                            (tmp_path / "plain" / "sub" / name,
                             f"--output: {tmp_path / 'plain' / 'sub' / name} cannot be written: {tmp_path / 'plain'} is a file")]:
        with pytest.raises(GmanError) as err:
            serving_main("export", ["--model", str(package), "--format", fmt, "--output", str(output)])
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "plain"]) and not list((tmp_path / name).iterdir())


def test_an_export_that_fails_its_parity_check_leaves_the_previous_file_alone(package, tmp_path, monkeypatch, capsys):
    import gman.serving.cli as serving_cli

    output = tmp_path / "gman.pt2"
    output.write_bytes(b"the previous, good export")
    monkeypatch.setattr(serving_cli, "PARITY_TOLERANCE", -1.0)  # every graph fails the check
    from gman.errors import DataError

    with pytest.raises(DataError, match="exported graph differs from PyTorch"):
        serving_main("export", ["--model", str(package), "--format", "torch-export", "--output", str(output)])
    assert output.read_bytes() == b"the previous, good export" and sorted(tmp_path.iterdir()) == [output]
