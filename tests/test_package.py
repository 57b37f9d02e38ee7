"""The model package: a self-contained, atomically written folder, read back without unpickling code."""
from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import torch

from gman.errors import ConfigError, DataError, GmanError
from gman.model import GMAN
from gman.serving import package as pkg
from gman.serving.forecaster import Forecaster

SENSORS = ["717", "718", "719", "720"]


def tiny_model(learnable: bool = False, seed: int = 0) -> GMAN:
    torch.manual_seed(seed)
    model = GMAN(
        num_nodes=len(SENSORS), steps_per_day=288, se_dim=6, history_steps=4, horizon_steps=3,
        num_layers=1, num_heads=2, head_dim=4, learnable_spatial_embedding=learnable,
    )
    if not learnable:
        model.set_spatial_embedding(torch.randn(len(SENSORS), 6))
    # Non-trivial batch-norm statistics, so a package that dropped buffers would be caught.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def save(path, model, **overrides):
    kwargs = dict(
        scaler_mean=55.0, scaler_std=12.5, sensor_ids=SENSORS, interval=pd.Timedelta("5min"),
        missing_value=0.0, dataset_name="toy", units="mph",
    )
    kwargs.update(overrides)
    return pkg.save_package(path, model, **kwargs)


def random_inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, len(SENSORS), generator=generator)
    time = torch.stack([torch.randint(0, 7, (batch, 7), generator=generator), torch.randint(0, 288, (batch, 7), generator=generator)], -1)
    return x, time


@pytest.mark.parametrize("learnable", [False, True])
def test_round_trip_rebuilds_the_same_network(tmp_path, learnable):
    model = tiny_model(learnable)
    path = save(tmp_path / "pkg", model)
    weights = pkg.SAFETENSORS_FILE if pkg._has_safetensors() else pkg.TORCH_FILE
    assert sorted(p.name for p in path.iterdir()) == sorted(["gman.json", weights])

    meta = json.loads((path / "gman.json").read_text())
    assert meta["format_version"] == pkg.FORMAT_VERSION
    assert meta["model"]["config"] == model.config
    assert meta["scaler"] == {"mean": 55.0, "std": 12.5, "missing_input": 0.0}
    assert meta["sensor_ids"] == SENSORS
    assert (meta["interval_seconds"], meta["steps_per_day"]) == (300, 288)
    assert (meta["history_steps"], meta["horizon_steps"]) == (4, 3)
    assert (meta["missing_value"], meta["dataset_name"], meta["units"]) == (0.0, "toy", "mph")

    # The weights hold tensors only (weights_only=True) including the spatial embedding.
    state = pkg.load_state_dict(path, meta)
    assert torch.equal(state["spatial_embedding"], model.spatial_embedding.detach())

    forecaster = Forecaster.load(path)
    x, time = random_inputs()
    with torch.no_grad():
        expected = model(x, time)
    torch.testing.assert_close(forecaster.predict_normalised(x, time), expected, rtol=0, atol=0)
    assert forecaster.sensor_ids == SENSORS
    assert forecaster.interval == pd.Timedelta("5min")
    assert (forecaster.history_steps, forecaster.horizon_steps) == (4, 3)


def test_overwrites_a_package_but_refuses_other_folders(tmp_path):
    path = save(tmp_path / "pkg", tiny_model(seed=0))
    save(path, tiny_model(seed=1))  # replaced in place
    x, time = random_inputs()
    torch.testing.assert_close(Forecaster.load(path).predict_normalised(x, time), tiny_model(seed=1)(x, time).detach())

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a gman model package"):
        save(other, tiny_model())
    assert (other / "keep.txt").read_text() == "mine"


def test_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    def broken(state_dict, folder):
        (folder / "weights.pt").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pkg, "_write_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "pkg", tiny_model())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sensor_ids": SENSORS[:3]}, "3 ids for a model of 4 sensors"),
        ({"sensor_ids": ["a", "a", "b", "c"]}, "duplicates"),
        ({"interval": pd.Timedelta("10min")}, "144 steps per day but the model was built for 288"),
        ({"interval": pd.Timedelta("7min")}, "divides one day"),
        ({"scaler_std": 0.0}, "positive std"),
    ],
)
def test_bad_arguments_raise_one_line_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        save(tmp_path / "pkg", tiny_model(), **overrides)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pkg").exists()


def test_damaged_packages_raise_data_errors(tmp_path):
    path = save(tmp_path / "pkg", tiny_model())
    with pytest.raises(DataError, match="neither a gman model package"):
        Forecaster.load(tmp_path)  # the parent folder is not a package

    weights = path / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(DataError, match="SHA-256"):
        Forecaster.load(path)

    meta = json.loads((path / "gman.json").read_text())
    meta["format_version"] = 99
    (path / "gman.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format_version 99"):
        Forecaster.load(path)


class _Payload:
    """Any pickled object: ``torch.load(weights_only=True)`` must refuse to rebuild it."""

    def __reduce__(self):
        return (print, ("code ran at load",))


def test_weights_with_pickled_code_are_refused(tmp_path, capsys):
    path = save(tmp_path / "pkg", tiny_model())
    state = torch.load(path / "weights.pt", weights_only=True)
    state["extra"] = _Payload()
    torch.save(state, path / "weights.pt")
    meta = json.loads((path / "gman.json").read_text())
    del meta["weights"]["sha256"]  # so that the unpickler itself is what stops it
    (path / "gman.json").write_text(json.dumps(meta))
    with pytest.raises(GmanError, match="cannot load weights"):
        Forecaster.load(path)
    assert "code ran at load" not in capsys.readouterr().out


def test_weights_must_fit_the_config(tmp_path):
    path = save(tmp_path / "pkg", tiny_model())
    meta = json.loads((path / "gman.json").read_text())
    meta["model"]["config"]["num_layers"] = 2
    (path / "gman.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="weights do not fit the model config") as err:
        Forecaster.load(path)
    assert "\n" not in str(err.value)


def test_loading_imports_neither_lightning_nor_pyg(tmp_path):
    import subprocess

    path = save(tmp_path / "pkg", tiny_model())
    code = (
        "import sys, gman\n"
        f"f = gman.Forecaster.load({str(path)!r})\n"
        "heavy = [m for m in ('lightning', 'pytorch_lightning', 'torch_geometric', 'mlflow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_top_level_names_are_there_and_import_nothing_heavy_until_used():
    import subprocess

    code = (
        "import sys, gman\n"
        "assert not [m for m in ('torch', 'lightning', 'pandas') if m in sys.modules]\n"
        "assert {'Forecaster', 'GMAN', 'GMANDataModule', 'GMANLightningModule', 'load_dataset'} <= set(dir(gman))\n"
        "from gman import GMAN, GMANDataModule, GMANLightningModule, load_dataset\n"
        "import gman.model, gman.data.datamodule, gman.training.module, gman.data.readers\n"
        "assert GMAN is gman.model.GMAN and GMANDataModule is gman.data.datamodule.GMANDataModule\n"
        "assert GMANLightningModule is gman.training.module.GMANLightningModule\n"
        "assert load_dataset is gman.data.readers.load_dataset\n"
        "from gman.training import GMANLightningModule as M, HorizonMetrics\n"
        "assert M is GMANLightningModule\n"
        "try:\n"
        "    gman.Nope\n"
        "except AttributeError as err:\n"
        "    assert 'Nope' in str(err)\n"
        "else:\n"
        "    raise SystemExit('gman.Nope resolved')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
