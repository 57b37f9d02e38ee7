"""Serving fast paths: the batch-norm-folded inference copy and the ONNX Runtime backend compute the plain network."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from gman.data.dataset import time_features
from gman.errors import DataError
from gman.model import GMAN, BatchNorm
from gman.serving import package as pkg
from gman.serving.cli import main as serving_main
from gman.serving.forecaster import Forecaster
from gman.serving.inference import fold_batch_norm

SENSORS = [f"s{i}" for i in range(9)]
P, Q = 5, 4
TOLERANCE = 1e-4


def random_model(batch_norm: str = "activation", seed: int = 0) -> GMAN:
    """A small GMAN with non-trivial batch-norm statistics and affine parameters (eval mode)."""
    torch.manual_seed(seed)
    model = GMAN(num_nodes=len(SENSORS), steps_per_day=288, se_dim=6, history_steps=P, horizon_steps=Q,
                 num_layers=2, num_heads=2, head_dim=4, batch_norm=batch_norm)
    model.set_spatial_embedding(torch.randn(len(SENSORS), 6))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BatchNorm):
                module.running_mean.uniform_(-1.0, 1.0)
                module.running_var.uniform_(0.3, 3.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def random_inputs(batch: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, P, len(SENSORS), generator=generator)
    time = torch.stack([torch.randint(0, 7, (batch, P + Q), generator=generator),
                        torch.randint(0, 288, (batch, P + Q), generator=generator)], -1)
    return x, time


@pytest.mark.parametrize("batch_norm", ["activation", "all", "none"])
def test_folded_network_matches_the_plain_one(batch_norm):
    model = random_model(batch_norm)
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, BatchNorm) for m in folded.modules())
    assert any(isinstance(m, BatchNorm) for m in model.modules()) == (batch_norm != "none")  # the original is untouched
    for batch in (1, 4):
        x, time = random_inputs(batch)
        with torch.no_grad():
            difference = (folded(x, time) - model(x, time)).abs().max().item()
        assert difference <= TOLERANCE


@pytest.mark.parametrize("batch_norm", ["activation", "all"])
def test_folding_keeps_the_networks_dtype_and_device(batch_norm):
    model = random_model(batch_norm).double()
    folded = fold_batch_norm(model)
    assert {p.dtype for p in folded.parameters()} == {torch.float64}
    assert {p.device for p in folded.parameters()} == {torch.device("cpu")}  # the CUDA case: tests/test_cuda.py
    x, time = random_inputs(2)
    with torch.no_grad():
        out = folded(x.double(), time)
        assert out.dtype == torch.float64
        # in float64 folding is exact up to rounding, far inside float32's TOLERANCE
        assert (out - model(x.double(), time)).abs().max().item() < 1e-10


def history(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = 55 + 10 * rng.standard_normal((P + 3, len(SENSORS)))
    values[2, 3], values[6, 1] = np.nan, 0.0  # NaN and the missing value
    index = pd.date_range("2024-05-05 23:50", periods=P + 3, freq="5min")
    return pd.DataFrame(values, index=index, columns=SENSORS)


def save(path, model):
    return pkg.save_package(path, model, scaler_mean=55.0, scaler_std=10.0, sensor_ids=SENSORS,
                            interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy", units="mph")


def test_torch_backend_predicts_what_the_plain_network_predicts(tmp_path):
    model = random_model()
    forecaster = Forecaster.load(save(tmp_path / "pkg", model), backend="torch")
    assert forecaster.backend == "torch"
    frame = history()
    values, mask, index = forecaster.prepare(frame)
    x = torch.from_numpy(forecaster.normalise(values, mask))[None]
    time = torch.from_numpy(time_features(forecaster.window_index(index), forecaster.interval))[None]
    with torch.no_grad():
        expected = (model(x, time)[0] * 10.0 + 55.0).numpy()
    got = forecaster.predict(frame, layout="wide").to_numpy()
    assert np.abs(got - expected).max() <= TOLERANCE


def test_device_choice_and_its_errors(tmp_path, monkeypatch):
    path = save(tmp_path / "pkg", random_model())
    plain = Forecaster.load(path, backend="torch")
    on_cpu = Forecaster.load(path, device="cpu")
    assert on_cpu.backend == "torch" and str(on_cpu.device) == "cpu"
    assert str(plain.to("cpu").device) == "cpu"
    pd.testing.assert_frame_equal(on_cpu.predict(history()), plain.predict(history()))
    for device, message in [("cdua", r"device: 'cdua' is not a torch device"),
                            ("cuda:0" if not torch.cuda.is_available() else "cuda:99", r"device: 'cuda:(0|99)'")]:
        with pytest.raises(DataError, match=message) as err:
            Forecaster.load(path, device=device)
        assert "\n" not in str(err.value)
    monkeypatch.setenv("GMAN_DEVICE", "cdua")
    with pytest.raises(DataError, match="'cdua'"):
        Forecaster.load(path)
    from gman.cli import main as gman_main

    monkeypatch.delenv("GMAN_DEVICE")
    argv = ["predict", "--model", str(path), "--input", "none.csv", "--output", str(tmp_path / "f.csv")]
    assert gman_main([*argv, "--device", "cdua"]) == 2 and not (tmp_path / "f.csv").exists()


@pytest.mark.parametrize(
    "variable, value, message",
    [("GMAN_THREADS", "abc", "GMAN_THREADS: expected a positive integer, got 'abc'"),
     ("GMAN_THREADS", "0", "GMAN_THREADS: expected a positive integer, got '0'"),
     ("GMAN_BACKEND", "tensorflow", "GMAN_BACKEND: 'tensorflow' is not one of auto, torch, onnx"),
     ("GMAN_DEVICE", "cdua", "GMAN_DEVICE: 'cdua' is not a torch device")],
)
def test_bad_gman_variables_are_one_line_errors_that_name_them(tmp_path, monkeypatch, capsys, variable, value, message):
    from gman.cli import main as gman_main

    path = save(tmp_path / "pkg", random_model())
    history().rename_axis("timestamp").to_csv(tmp_path / "h.csv")
    monkeypatch.setenv(variable, value)
    with pytest.raises(DataError, match=message) as err:
        Forecaster.load(path)
    assert "\n" not in str(err.value)
    argv = ["predict", "--model", str(path), "--input", str(tmp_path / "h.csv"), "--output", str(tmp_path / "f.csv")]
    assert gman_main(argv) == 2 and not (tmp_path / "f.csv").exists()
    err = capsys.readouterr().err
    assert err.startswith(f"gman: error: {message}") and err.count("\n") == 1, err
    monkeypatch.delenv(variable)
    assert gman_main(argv) == 0  # the same command without the bad value works


@pytest.fixture(scope="module")
def onnx_package(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    pytest.importorskip("onnxscript", reason="the [onnx] extra is not installed")
    path = save(tmp_path_factory.mktemp("onnx") / "pkg", random_model(seed=3))
    assert serving_main("export", ["--model", str(path), "--format", "onnx", "--into-package"]) == 0
    return path


def test_into_package_records_the_graph(onnx_package):
    meta = json.loads((onnx_package / "gman.json").read_text())
    assert meta["onnx"]["file"] == "model.onnx" and len(meta["onnx"]["sha256"]) == 64
    assert (onnx_package / "model.onnx").is_file()


def test_onnx_backend_matches_torch(onnx_package):
    ort = Forecaster.load(onnx_package)  # auto: onnxruntime is installed
    plain = Forecaster.load(onnx_package, backend="torch")
    assert (ort.backend, plain.backend) == ("onnxruntime", "torch")
    frames = {"a": history(0), "b": history(1)}
    for sample in (frames["a"], frames):
        got, expected = ort.predict(sample), plain.predict(sample)
        pd.testing.assert_frame_equal(got.drop(columns="prediction"), expected.drop(columns="prediction"))
        assert np.abs(got["prediction"].to_numpy() - expected["prediction"].to_numpy()).max() <= TOLERANCE
    # the network itself is still at hand (read lazily) and gives the same numbers
    x, time = random_inputs(2)
    torch.testing.assert_close(ort.predict_normalised(x, time), plain.predict_normalised(x, time), rtol=0, atol=1e-6)
    assert ort.sensor_ids == SENSORS and (ort.history_steps, ort.horizon_steps) == (P, Q)


def test_backend_choice(onnx_package, tmp_path, monkeypatch):
    monkeypatch.setenv("GMAN_BACKEND", "torch")
    assert Forecaster.load(onnx_package).backend == "torch"
    monkeypatch.delenv("GMAN_BACKEND")
    plain = save(tmp_path / "plain", random_model())
    assert Forecaster.load(plain).backend == "torch"  # no graph: PyTorch
    with pytest.raises(DataError, match="no ONNX graph"):
        Forecaster.load(plain, backend="onnx")
    with pytest.raises(DataError, match="backend"):
        Forecaster.load(plain, backend="tensorflow")


def test_a_gpu_device_needs_the_torch_backend(onnx_package):
    with pytest.raises(DataError, match=r"device: 'cuda' needs backend 'torch'"):
        Forecaster.load(onnx_package, backend="onnx", device="cuda")
    ort = Forecaster.load(onnx_package)
    assert ort.backend == "onnxruntime" and ort.device == "cpu"
    with pytest.raises(DataError, match=r"device: 'cuda' needs backend 'torch'"):
        ort.to("cuda")
    assert Forecaster.load(onnx_package, device="cpu").backend == "onnxruntime"  # the CPU keeps the default


def test_tampered_graph_is_refused(onnx_package, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(onnx_package, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(DataError, match="SHA-256"):
        Forecaster.load(copy)


def test_onnx_backend_loads_without_torch(onnx_package):
    code = (
        "import sys, numpy as np, pandas as pd, gman\n"
        f"f = gman.Forecaster.load({str(onnx_package)!r})\n"
        "index = pd.date_range('2024-01-01', periods=f.history_steps, freq=f.interval)\n"
        "f.predict(pd.DataFrame(np.full((len(index), len(f.sensor_ids)), 50.0), index=index, columns=f.sensor_ids))\n"
        "assert f.backend == 'onnxruntime', f.backend\n"
        "bad = sorted(m for m in ('torch', 'lightning', 'torch_geometric', 'mlflow') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GMAN_BACKEND"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_a_server_stopped_by_a_signal_exits_with_128_plus_the_signal():
    import sys

    from gman.serving.cli import _run_until_stopped

    command = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]
    assert _run_until_stopped(command) == 143
