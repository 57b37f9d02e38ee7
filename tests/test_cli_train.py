"""`gman train` end to end in subprocesses: outputs, MLflow, SIGKILL + --resume, bad input."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

TESTS_DIR = Path(__file__).resolve().parent
# as the `gman` console script starts it: sys.argv[0] is not a file of the package's git checkout
GMAN = [sys.executable, "-c", "import sys; from gman.cli import main; sys.exit(main())"]

# A tiny run: 10 sensors x 8 days of synthetic data, an L=1, D=8 model, 8 batches per epoch.
TINY_CONFIG = """\
seed_everything: 3
model:
  num_layers: 1
  num_heads: 2
  head_dim: 4
  se_dim: 8
  dropout: 0.1
  lr_decay_every: 1
data:
  dataset: synthetic
  options: {num_sensors: 10, days: 8}
  batch_size: 16
  eval_batch_size: 128
trainer:
  max_epochs: 3
  limit_train_batches: 8
  enable_progress_bar: false
  callbacks:
    - class_path: test_cli_train.SigkillAt
    - class_path: test_cli_train.RaiseAt
      init_args: {message: injected failure}
    - class_path: test_cli_train.SigtermAfter
    - class_path: test_cli_train.RecordRunStatus
"""


class SigkillAt(Callback):
    """Sends its own process SIGKILL (or ``GMAN_TEST_SIGNAL``) at ``GMAN_TEST_SIGKILL_AT=epoch:batch``
    (inert without it)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        spec = os.environ.get("GMAN_TEST_SIGKILL_AT")
        if spec and (trainer.current_epoch, batch_idx) == tuple(int(v) for v in spec.split(":")):
            os.kill(os.getpid(), getattr(signal, os.environ.get("GMAN_TEST_SIGNAL", "SIGKILL")))


class RaiseAt(Callback):
    """Raises RuntimeError(message) at ``GMAN_TEST_RAISE_AT=epoch:batch`` (inert without it)."""

    def __init__(self, message: str = "failure") -> None:
        self.message = message

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        spec = os.environ.get("GMAN_TEST_RAISE_AT")
        if spec and (trainer.current_epoch, batch_idx) == tuple(int(v) for v in spec.split(":")):
            raise RuntimeError(self.message)


class SigtermAfter(Callback):
    """Once the test stage is over, makes ``GMAN_TEST_SIGTERM_AFTER=module:function`` (one that gman's report
    calls, e.g. ``gman.serving.pyfunc:log_model``) send its process SIGTERM when it returns (inert without it)."""

    def on_test_end(self, trainer, pl_module):
        spec = os.environ.get("GMAN_TEST_SIGTERM_AFTER")
        if not spec:
            return
        import importlib

        module_name, name = spec.split(":")
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def then_sigterm(*args, **kwargs):
            result = original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
            return result

        setattr(module, name, then_sigterm)


class RecordRunStatus(Callback):
    """Writes the MLflow run's status as training starts to the file ``GMAN_TEST_STATUS_FILE`` (inert without it)."""

    def on_train_start(self, trainer, pl_module):
        path = os.environ.get("GMAN_TEST_STATUS_FILE")
        if path:
            logger = trainer.logger
            Path(path).write_text(logger.experiment.get_run(logger.run_id).info.status)


def gman(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                   "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]), **env}
    environment.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([*GMAN, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def yaml_of(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def gman_rows(folder: Path) -> list[dict]:
    with open(folder / "horizons.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["model"] == "GMAN"]


def mlflow_run(workdir: Path, run_id: str, db: str = "mlflow.db"):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{workdir / db}").get_run(run_id)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train")
    (path / "tiny.yaml").write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="module")
def uninterrupted(workdir) -> Path:
    result = gman(["train", "--config", "tiny.yaml", "--output-dir", "runs/straight"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert Path(lines[-1]) == workdir / "runs" / "straight"     # the last line is the run folder
    return workdir / "runs" / "straight"


def test_train_writes_a_complete_run_folder_and_mlflow_run(uninterrupted, workdir):
    folder = uninterrupted
    for name in ("horizons.csv", "error_by_horizon.png", "forecast_vs_truth.png", "config.yaml", "run.json",
                 "checkpoints/best.ckpt", "model/gman.json"):
        assert (folder / name).is_file(), name
    assert not (workdir / "runs" / "straight.partial").exists()
    with open(folder / "horizons.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["model", "step", "minutes", "mae", "rmse", "mape"]
    assert {r["model"] for r in rows} == {"GMAN", "last value", "historical average"}
    assert [r["minutes"] for r in rows if r["model"] == "GMAN"][:12] == [str(5 * q) for q in range(1, 13)]
    run = json.loads((folder / "run.json").read_text())
    mlrun = mlflow_run(workdir, run["run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["model.num_layers"] == "1" and mlrun.data.params["data_derived.num_nodes"] == "10"
    step12 = next(r for r in rows if r["model"] == "GMAN" and r["step"] == "12")
    assert mlrun.data.metrics["test_mae_step12_60min"] == pytest.approx(float(step12["mae"]), rel=1e-5)
    assert "val_mae" in mlrun.data.metrics and "baseline_last_value_mae_step03_15min" in mlrun.data.metrics
    # the callbacks (runs with and without, say, EMAWeightAveraging must not look alike)
    assert mlrun.data.params["trainer.callbacks.0.class_path"] == "test_cli_train.SigkillAt"
    assert mlrun.data.params["trainer.callbacks.1.init_args.message"] == "injected failure"
    # the code version: gman's, and the commit of the checkout the package was imported from
    import gman

    head = subprocess.run(["git", "-C", str(Path(gman.__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert mlrun.data.tags["gman.version"] == gman.__version__
    assert mlrun.data.tags.get("mlflow.source.git.commit") == (head or None)


def test_a_checkpoint_alone_is_servable(uninterrupted, tmp_path):
    """best.ckpt carries the serving metadata: copied away from its run folder it still loads."""
    import shutil

    import pandas as pd

    from gman import Forecaster

    lonely = tmp_path / "best.ckpt"
    shutil.copy(uninterrupted / "checkpoints" / "best.ckpt", lonely)
    from_ckpt = Forecaster.load(lonely)
    from_package = Forecaster.load(uninterrupted / "model")
    assert from_ckpt.sensor_ids == from_package.sensor_ids and from_ckpt.interval == from_package.interval
    index = pd.date_range("2024-01-01", periods=from_ckpt.history_steps, freq=from_ckpt.interval)
    history = pd.DataFrame(60.0, index=index, columns=from_ckpt.sensor_ids)
    pd.testing.assert_frame_equal(from_ckpt.predict(history), from_package.predict(history))


def test_sigkill_mid_epoch_then_resume_gives_the_same_test_metrics(uninterrupted, workdir):
    killed = gman(["train", "--config", "tiny.yaml", "--output-dir", "runs/killed"], workdir,
                  GMAN_TEST_SIGKILL_AT="2:5")
    assert killed.returncode == -signal.SIGKILL
    partial = workdir / "runs" / "killed.partial"
    assert (partial / "checkpoints" / "last.ckpt").is_file() and not (workdir / "runs" / "killed").exists()
    run_id = json.loads((partial / "run.json").read_text())["run_id"]
    assert mlflow_run(workdir, run_id).info.status == "RUNNING"

    resumed = gman(["train", "--resume", "runs/killed.partial"], workdir)  # relative to the working directory
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = workdir / "runs" / "killed"
    run = json.loads((final / "run.json").read_text())  # the recorded paths stay absolute
    assert run["output_dir"] == str(final) and run["best_checkpoint"].startswith(str(final))
    assert resumed.stdout.strip().splitlines()[-1] == str(final)
    assert json.loads((final / "run.json").read_text())["run_id"] == run_id   # the same MLflow run
    assert mlflow_run(workdir, run_id).info.status == "FINISHED"
    straight, again = gman_rows(uninterrupted), gman_rows(final)
    assert [(r["mae"], r["rmse"], r["mape"]) for r in again] == [(r["mae"], r["rmse"], r["mape"]) for r in straight]
    # bit for bit, not just to the csv's six digits: the logged test metrics are equal floats
    straight_id = json.loads((uninterrupted / "run.json").read_text())["run_id"]
    expected = {k: v for k, v in mlflow_run(workdir, straight_id).data.metrics.items() if k.startswith("test_")}
    got = {k: v for k, v in mlflow_run(workdir, run_id).data.metrics.items() if k.startswith("test_")}
    assert len(expected) == 3 * 12 + 3 and got == expected


@pytest.fixture(scope="module")
def terminated(workdir) -> tuple[subprocess.CompletedProcess, Path]:
    """A run stopped by SIGTERM in its second epoch (last.ckpt holds epoch 0), tracked in a store given by a
    relative path: ``termed.db`` in ``workdir``."""
    stopped = gman(["train", "--config", "tiny.yaml", "--output-dir", "runs/termed", "--tracking_uri",
                    "sqlite:///termed.db"], workdir, GMAN_TEST_SIGKILL_AT="1:3", GMAN_TEST_SIGNAL="SIGTERM")
    return stopped, workdir / "runs" / "termed.partial"


def test_sigterm_ends_the_run_killed_with_a_failing_status(terminated, workdir):
    """Lightning stops on SIGTERM with a bare SystemExit; gman must not exit 0 for a run it did not finish."""
    stopped, partial = terminated
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "resume it with: gman train --resume" in stopped.stderr
    run = json.loads((partial / "run.json").read_text())
    assert run["status"] == "KILLED" and mlflow_run(workdir, run["run_id"], "termed.db").info.status == "KILLED"
    assert not (workdir / "runs" / "termed").exists()


def test_sigterm_during_the_report_ends_the_run_killed_and_the_resume_logs_the_model_once(workdir):
    """After fit and test Lightning no longer handles SIGTERM; gman does, as during fit.  Here it comes
    after the model was logged and registered: the resumed run must not log or register it again."""
    from mlflow.tracking import MlflowClient

    stopped = gman(["train", "--config", "tiny.yaml", "--output-dir", "runs/termed-report", "--register",
                    "tiny-report", "--trainer.max_epochs", "1"], workdir,
                   GMAN_TEST_SIGTERM_AFTER="gman.serving.pyfunc:log_model")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    partial = workdir / "runs" / "termed-report.partial"
    assert f"resume it with: gman train --resume {partial}" in stopped.stderr
    run = json.loads((partial / "run.json").read_text())
    assert run["status"] == "KILLED" and mlflow_run(workdir, run["run_id"]).info.status == "KILLED"

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")

    def models_and_versions():
        experiment = mlflow_run(workdir, run["run_id"]).info.experiment_id
        models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run['run_id']}'")
        return len(models), len(client.search_model_versions("name = 'tiny-report'"))

    assert models_and_versions() == (1, 1)
    resumed = gman(["train", "--resume", str(partial), "--register", "tiny-report"], workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert mlflow_run(workdir, run["run_id"]).info.status == "FINISHED"
    assert models_and_versions() == (1, 1)


@pytest.mark.parametrize("args, message", [
    (["--model.learning_rate", "0.01"], "model.learning_rate cannot change when a run is resumed (0.001 -> 0.01)"),
    (["--data.batch_size", "8", "--trainer.max_epochs", "5"],
     "data.batch_size cannot change when a run is resumed (16 -> 8)"),
    (["--seed_everything", "4"], "seed_everything cannot change when a run is resumed (3 -> 4)"),
    (["--trainer.callbacks", "[]"], "trainer.callbacks"),
])
def test_a_resume_refuses_a_changed_setting_and_leaves_the_run_as_it_was(terminated, workdir, monkeypatch, capsys,
                                                                         args, message):
    """Only the settings of RESUME_MAY_CHANGE may differ from the run's config.yaml; any other change is refused
    in one line naming it, before the folder or the MLflow run is touched."""
    from gman.cli import main

    _, partial = terminated
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    files = {p: p.read_bytes() for p in partial.rglob("*") if p.is_file()}
    run_id = json.loads((partial / "run.json").read_text())["run_id"]
    before = mlflow_run(workdir, run_id, "termed.db")
    assert main(["train", "--resume", str(partial), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gman: error:")]
    assert len(err) == 1 and err[0].startswith("gman: error: --resume: ") and message in err[0], err
    assert {p: p.read_bytes() for p in partial.rglob("*") if p.is_file()} == files
    after = mlflow_run(workdir, run_id, "termed.db")
    assert (after.info.status, after.info.end_time, after.data.tags, after.data.params) == (
        before.info.status, before.info.end_time, before.data.tags, before.data.params)


def test_a_resume_from_another_directory_finds_its_store_and_applies_the_allowed_changes(terminated, workdir,
                                                                                        tmp_path, monkeypatch,
                                                                                        capsys):
    """The relative tracking URI is stored absolute; a resume pointed at a store that lacks the run is a
    one-line error that creates no database and leaves run.json as it was.  A resume that changes when the run
    stops (RESUME_MAY_CHANGE) applies it, writes it into config.yaml (folder and MLflow artifact) and records it
    in a tag (the params keep the values the run started with)."""
    _, partial = terminated
    expected_uri = f"sqlite:///{workdir / 'termed.db'}"
    assert json.loads((partial / "run.json").read_text())["tracking_uri"] == expected_uri
    assert yaml_of(partial / "config.yaml")["tracking_uri"] == expected_uri
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    run_json = (partial / "run.json").read_bytes()
    from mlflow.tracking import MlflowClient

    from gman.cli import main

    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for uri, message in (("sqlite:///termed.db", "does not exist (no file"),
                         (f"sqlite:///{workdir / 'mlflow-empty.db'}", "is not in")):
        if "empty" in uri:  # a store that exists but never saw the run
            MlflowClient(uri).search_experiments()
        assert main(["train", "--resume", str(partial), "--tracking_uri", uri]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gman: error:")]
        assert len(err) == 1 and err[0].startswith("gman: error: --resume: ") and message in err[0], err
        assert list(elsewhere.iterdir()) == [] and (partial / "run.json").read_bytes() == run_json

    resumed = gman(["train", "--resume", str(partial), "--trainer.max_epochs", "2", "--patience", "3"], elsewhere,
                   GMAN_TEST_STATUS_FILE=str(tmp_path / "status"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "status").read_text() == "RUNNING"  # not the KILLED of the first attempt while it trains
    final = workdir / "runs" / "termed"
    assert resumed.stdout.strip().splitlines()[-1] == str(final)
    assert list(elsewhere.iterdir()) == []
    run = json.loads((final / "run.json").read_text())
    mlrun = mlflow_run(workdir, run["run_id"], "termed.db")
    assert run["status"] == "FINISHED" and mlrun.info.status == "FINISHED"

    change = "trainer.max_epochs: 3 -> 2; patience: 10 -> 3"
    assert f"resuming MLflow run {run['run_id']}: {change}" in resumed.stdout
    assert mlrun.data.tags["gman.resume.1"] == change
    assert mlrun.data.params["trainer.max_epochs"] == "3" and mlrun.data.params["patience"] == "10"
    import torch

    last = torch.load(final / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1  # trained 2 epochs, not 3
    assert last["callbacks"]["EarlyStopping{'monitor': 'val_mae', 'mode': 'min'}"]["patience"] == 3
    artifact = MlflowClient(expected_uri).download_artifacts(run["run_id"], "config.yaml", str(tmp_path))
    for config in (yaml_of(final / "config.yaml"), yaml_of(Path(artifact))):
        assert (config["trainer"]["max_epochs"], config["patience"]) == (2, 3)


def test_evaluate_a_checkpoint_and_an_mlflow_run_reproduce_the_test_metrics(uninterrupted, workdir, monkeypatch,
                                                                            capsys):
    from gman.cli import main

    monkeypatch.chdir(workdir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["evaluate", "--checkpoint", str(uninterrupted / "checkpoints" / "best.ckpt"),
                 "--output-dir", "runs/eval-ckpt"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(workdir / "runs" / "eval-ckpt") and any(line.startswith("GMAN ") for line in out)
    run_id = json.loads((uninterrupted / "run.json").read_text())["run_id"]
    assert main(["evaluate", "--run-id", run_id, "--output-dir", "runs/eval-run"]) == 0
    assert f"checkpoint: MLflow run {run_id}, artifact checkpoints/" in capsys.readouterr().out  # not a deleted temp path
    # a data error names where the data settings came from
    assert main(["evaluate", "--checkpoint", str(uninterrupted / "checkpoints" / "best.ckpt"),
                 "--data.options", "{num_sensors: 10, bogus: 1}", "--output-dir", "runs/eval-bad"]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'bogus'" in err and f"data settings default to the training run's {uninterrupted / 'config.yaml'}" in err
    assert not (workdir / "runs" / "eval-bad").exists()
    expected = gman_rows(uninterrupted)
    for folder in ("eval-ckpt", "eval-run"):
        got = gman_rows(workdir / "runs" / folder)
        # same numbers up to float summation order (evaluation may run on another thread count)
        assert [r["step"] for r in got] == [r["step"] for r in expected]
        for name in ("mae", "rmse"):
            assert [float(r[name]) for r in got] == pytest.approx([float(r[name]) for r in expected], rel=1e-5)
        assert (workdir / "runs" / folder / "forecast_vs_truth.png").is_file()


def test_evaluate_normalises_with_the_checkpoints_scaler_whatever_the_config_says(uninterrupted, workdir, monkeypatch):
    """A run from before data.normalisation existed (fitted on observed readings) must not be re-scored with a
    scaler fitted again another way: evaluate takes the scaler from the checkpoint."""
    import shutil

    import yaml

    from gman.cli import main
    from gman.training.cli import _settings_older_runs_had

    monkeypatch.chdir(workdir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old = workdir / "runs" / "other-normalisation"
    shutil.copytree(uninterrupted, old)
    config = yaml.safe_load((old / "config.yaml").read_text())
    assert config["data"]["normalisation"] == "authors"
    config["data"]["normalisation"] = "observed"  # a different scaler than the one the weights were trained with
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["evaluate", "--checkpoint", str(old / "checkpoints" / "best.ckpt"), "--output-dir", "runs/eval-other"]) == 0
    got, expected = gman_rows(workdir / "runs" / "eval-other"), gman_rows(uninterrupted)
    assert [float(r["mae"]) for r in got] == pytest.approx([float(r["mae"]) for r in expected], rel=1e-5)
    # --resume of a run whose config predates the option keeps the observed statistics it started with
    del config["data"]["normalisation"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    assert _settings_older_runs_had(old / "config.yaml") == ["--data.normalisation", "observed"]
    assert _settings_older_runs_had(uninterrupted / "config.yaml") == []


def test_evaluate_lays_the_data_out_in_the_checkpoints_sensor_order(uninterrupted, workdir, monkeypatch, capsys):
    """The same readings with the columns reversed (and no graph) score as trained; a sensor the data lacks
    is a one-line error that leaves no output folder."""
    import yaml

    from gman.cli import main
    from gman.data.datamodule import GMANDataModule

    monkeypatch.chdir(workdir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = yaml.safe_load((uninterrupted / "config.yaml").read_text())["data"]
    frame = GMANDataModule(dataset=data["dataset"], options=data["options"]).load().to_frame()
    frame.iloc[:, ::-1].to_csv(workdir / "reversed.csv", index_label="timestamp")
    frame.iloc[:, 1:].to_csv(workdir / "one-short.csv", index_label="timestamp")
    checkpoint = str(uninterrupted / "checkpoints" / "best.ckpt")
    assert main(["evaluate", "--checkpoint", checkpoint, "--data.dataset", "reversed.csv", "--data.options", "{}",
                 "--output-dir", "runs/eval-reversed"]) == 0
    got, expected = gman_rows(workdir / "runs" / "eval-reversed"), gman_rows(uninterrupted)
    assert [float(r["mae"]) for r in got] == pytest.approx([float(r["mae"]) for r in expected], rel=1e-5)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", checkpoint, "--data.dataset", "one-short.csv", "--data.options", "{}",
                 "--output-dir", "runs/eval-short"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"1 of the model's 10 sensors are not in the data (first: {str(frame.columns[0])!r})" in err
    assert len(err.splitlines()) == 1 and not list((workdir / "runs").glob("eval-short*"))


@pytest.mark.parametrize("args, key", [
    (["--model.bogus", "1"], "model.bogus"),
    (["--data.batch_size", "many"], "data.batch_size"),
    (["--config", "unknown-key.yaml"], "wrong_key"),
    (["--data.dataset", "nowhere/speeds.csv"], "nowhere/speeds.csv"),
    (["--data.dataset", "empty.csv"], "empty.csv"),
    (["--config", "tiny.yaml", "--model.num_heads", "0"], "num_heads"),
    (["--config", "section.yaml"], "section.yaml: section 'model' must be a mapping of settings, got 3"),
    (["--config", "list.yaml"], "list.yaml: expected a YAML mapping of sections"),
    (["--config", "picture.png"], "picture.png: not a text file"),
    (["--config", "nothere.yaml"], "nothere.yaml: no such file"),
    (["--patience", "-1"], "patience: expected an integer >= 1"),
    (["--model.day_of_week", "maybe"], "model.day_of_week: 'maybe' is not valid; expected true | false, 'weekend'"),
    (["--data.split", "0.5,0.5"], "data.split: '0.5,0.5' is not valid; expected a list of numbers, e.g. [0.7, 0.1, 0.2], null"),
    (["--data.node2vec_options", "{bogus: 1}"], "data.node2vec_options: unknown option 'bogus'"),
    (["--tracking_uri", "bogus://x"], "tracking_uri: bogus://x: cannot use this MLflow tracking store"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(args, key, tmp_path, monkeypatch, capsys):
    from gman.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "unknown-key.yaml").write_text("model:\n  wrong_key: 3\n")
    (tmp_path / "section.yaml").write_text("model: 3\n")
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    assert main(["train", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gman: error:")]
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args, key", [
    (["--trainer.max_epochs", "-2"], "trainer: `max_epochs` must be a non-negative integer or -1"),
    (["--trainer.accelerator", "tpu"], "trainer: "),
])
def test_bad_trainer_settings_are_one_line_and_leave_nothing(args, key, tmp_path, monkeypatch, capsys):
    """The trainer is built before the MLflow store is touched: no run folder and no mlflow.db come of it."""
    from gman.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    assert main(["train", "--config", "tiny.yaml", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gman: error:")]
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("existing, message", [
    ("done", r"runs/done already exists; choose another --output_dir$"),
    ("done.partial", r"runs/done.partial \(an interrupted run\) exists; resume it with --resume .*runs/done.partial"),
])
def test_an_existing_run_folder_is_refused_before_the_data_is_read(existing, message, tmp_path, monkeypatch, capsys):
    from gman.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "runs" / existing).mkdir(parents=True)
    # the data file does not exist: the folder's error must come first
    assert main(["train", "--data.dataset", "nowhere/speeds.csv", "--output-dir", "runs/done"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gman: error:")]
    assert len(err) == 1 and re.search(message, err[0]), err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [existing] and not (tmp_path / "mlflow.db").exists()


def test_a_failing_run_is_marked_failed_and_its_folder_kept_only_if_resumable(workdir, monkeypatch, capsys):
    from gman.cli import main

    monkeypatch.chdir(workdir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for spec, name, resumable in (("0:1", "fail-early", False), ("1:0", "fail-late", True)):
        monkeypatch.setenv("GMAN_TEST_RAISE_AT", spec)
        with pytest.raises(RuntimeError, match="injected failure"):
            main(["train", "--config", "tiny.yaml", "--output-dir", f"runs/{name}"])
        partial = workdir / "runs" / f"{name}.partial"
        assert not (workdir / "runs" / name).exists()
        assert partial.exists() == resumable
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id],
                                  filter_string=f"tags.`gman.output_dir` = '{workdir / 'runs' / name}'")
        assert [r.info.status for r in runs] == ["FAILED"]
        if resumable:
            assert json.loads((partial / "run.json").read_text())["status"] == "FAILED"
            assert "--resume" in capsys.readouterr().err


def test_the_default_run_folder_is_inside_runs_whatever_the_experiment_is_called(workdir, monkeypatch, capsys):
    """The experiment's name is made one safe folder name; MLflow keeps it as given."""
    from mlflow.tracking import MlflowClient

    from gman.cli import main

    monkeypatch.chdir(workdir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("GMAN_TEST_RAISE_AT", "1:0")  # stops it once last.ckpt exists: its .partial folder is kept
    experiment = "../odd/ex: é 'q' *"
    with pytest.raises(RuntimeError, match="injected failure"):
        main(["train", "--config", "tiny.yaml", "--experiment", experiment])
    (folder,) = [p for p in (workdir / "runs").iterdir() if p.name.startswith("odd-ex-")]
    assert re.fullmatch(r"odd-ex-é-q-\d{8}-\d{6}\.partial", folder.name), folder.name
    assert not list(workdir.parent.glob("odd*")) and not list(workdir.glob("odd*"))  # no ../odd/ex... folder
    assert f"--resume {folder}" in capsys.readouterr().err
    assert MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_experiment_by_name(experiment) is not None


@pytest.fixture
def mlflow_server(tmp_path):
    """A local MLflow tracking server (no authentication: it ignores the user and password a URI sends)."""
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = tmp_path / "server"
    store.mkdir()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                               "--default-artifact-root", str(store / "artifacts")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the MLflow server did not start")
                time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_password_in_the_tracking_uri_is_never_written_or_shown(mlflow_server, tmp_path, monkeypatch, capsys):
    """The URI's password is masked wherever gman writes or prints the URI (params, config.yaml, run.json, the
    console, errors); a resume takes it again from --tracking_uri or MLFLOW_TRACKING_URI."""
    from mlflow.tracking import MlflowClient

    from gman.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)

    def password_anywhere() -> list[Path]:
        return [p for p in tmp_path.rglob("*") if p.is_file() and b"s3cret" in p.read_bytes()]

    # a store that cannot be reached: the error names the URI without its password
    assert main(["train", "--config", "tiny.yaml", "--tracking_uri", "http://me:s3cret@127.0.0.1:9",
                 "--output-dir", "runs/nowhere"]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("gman: error:")]
    assert len(errors) == 1 and "tracking_uri: http://me:***@127.0.0.1:9: cannot use this MLflow tracking store" in \
        errors[0], errors
    assert "s3cret" not in out + err and not (tmp_path / "runs").exists()

    uri, masked = f"http://me:s3cret@127.0.0.1:{mlflow_server}", f"http://me:***@127.0.0.1:{mlflow_server}"
    monkeypatch.setenv("GMAN_TEST_RAISE_AT", "1:0")  # stopped once last.ckpt exists, to be resumed
    with pytest.raises(RuntimeError, match="injected failure"):
        main(["train", "--config", "tiny.yaml", "--tracking_uri", uri, "--output-dir", "runs/pw",
              "--trainer.max_epochs", "2"])
    monkeypatch.delenv("GMAN_TEST_RAISE_AT")
    partial = tmp_path / "runs" / "pw.partial"
    run = json.loads((partial / "run.json").read_text())
    assert run["tracking_uri"] == masked and yaml_of(partial / "config.yaml")["tracking_uri"] == masked
    assert MlflowClient(uri).get_run(run["run_id"]).data.params["tracking_uri"] == masked
    assert password_anywhere() == [] and "s3cret" not in "".join(capsys.readouterr())

    files = {p: p.read_bytes() for p in partial.iterdir() if p.is_file()}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri put it there, in this process
    assert main(["train", "--resume", str(partial)]) == 2
    assert f"gman: error: tracking_uri: {masked}: the run's store needs its password" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in partial.iterdir() if p.is_file()} == files
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["train", "--resume", str(partial)]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == str(tmp_path / "runs" / "pw") and f"'synthetic', {masked})" in out
    assert MlflowClient(uri).get_run(run["run_id"]).info.status == "FINISHED"
    assert password_anywhere() == [] and "s3cret" not in out + err


def test_evaluate_refuses_a_file_that_is_no_checkpoint_in_one_plain_line(tmp_path, monkeypatch, capsys):
    import pickle

    from gman.cli import main

    monkeypatch.chdir(tmp_path)
    Path("notackpt.ckpt").write_text("hi\n")
    Path("horizons.csv").write_text("step,mae\n1,2.0\n")
    Path("objects.ckpt").write_bytes(pickle.dumps({"state_dict": {}, "when": object}))
    for name, ending in [("notackpt.ckpt", "(a .ckpt file written by gman train)\n"),
                         ("horizons.csv", "(a .ckpt file written by gman train)\n"),
                         ("objects.ckpt", "which a weights-only load refuses\n")]:
        assert main(["evaluate", "--checkpoint", name]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"gman: error: --checkpoint: {name} is not a gman checkpoint") and err.endswith(ending), err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not Path("runs").exists() or not any(Path("runs").iterdir())  # nothing written


def test_a_run_folder_is_claimed_by_one_process_only(tmp_path):
    """Two gman train into one folder: the second is refused in one line and cannot clean up the first's folder."""
    from gman.errors import ConfigError
    from gman.training.cli import _claimed_run_folder

    folder = tmp_path / "runs" / "r.partial"
    with _claimed_run_folder(folder, resuming=False):
        with pytest.raises(ConfigError, match="was just created by another gman train"):
            with _claimed_run_folder(folder, resuming=False):
                pass
        with pytest.raises(ConfigError, match="is being trained by another gman train process"):
            with _claimed_run_folder(folder, resuming=True):
                pass
        assert folder.is_dir()
    with _claimed_run_folder(folder, resuming=True):  # free again once the holder is done
        pass


def test_a_file_system_error_is_one_line_and_others_keep_their_traceback(monkeypatch, capsys):
    import errno

    import gman.data.cli
    from gman.cli import main

    def full_disk(command, argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/last.ckpt")

    monkeypatch.setattr(gman.data.cli, "main", full_disk)
    assert main(["data", "list"]) == 1
    assert capsys.readouterr().err == "gman: error: /data/run/last.ckpt: No space left on device\n"

    def connection_reset(command, argv):
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    monkeypatch.setattr(gman.data.cli, "main", connection_reset)
    with pytest.raises(ConnectionResetError):
        main(["data", "list"])


def test_a_store_that_refuses_the_new_run_is_a_one_line_error_that_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """E.g. a read-only sqlite file whose experiment exists: MLflow fails only when the run is created."""
    from mlflow.tracking import MlflowClient

    from gman.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)

    def read_only(self, *args, **kwargs):
        raise RuntimeError("attempt to write a readonly database")

    monkeypatch.setattr(MlflowClient, "create_run", read_only)
    assert main(["train", "--config", "tiny.yaml", "--output-dir", "runs/ro"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gman: error:")]
    assert len(errors) == 1 and "cannot use this MLflow tracking store (RuntimeError: attempt to write a readonly" \
        in errors[0], errors
    assert not list((tmp_path / "runs").glob("ro*"))
