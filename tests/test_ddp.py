"""Lightning DDP on the CPU (2 processes, gloo) against 1 process at the same global batch, and ``gman train`` under DDP.

A script (written to a temporary folder; the ``ddp`` strategy re-runs it for
rank 1) trains ``GMANLightningModule`` on ``GMANDataModule``'s synthetic data
with the project's MLflow logger, once with 1 process and batch 16 and once
with 2 processes and batch 8, and prints the validation masked MAE and saves
the weights.  All runs of the module are started at once (most of their time
is interpreter and library start-up).

Same samples per step.  Under DDP the data module's training loader deals its
epoch-seeded order round-robin (``gman.data.sampling.ShardedEpochSampler``:
rank ``r`` takes positions ``r, r + 2, ...``), so the two ranks' step-``i``
batches together are exactly the 1-process step-``i`` batch, and DDP averages
their gradients.  (Before, Lightning wrapped the plain epoch-seeded sampler in
a re-shuffling ``DistributedSamplerWrapper``: validation MAE was then 8.9 %
apart after 8 steps.)

Tolerance.  The model here has ``batch_norm="none"``; then the only
differences left are the masked-MAE normalisation (each rank divides by its
own count of observed labels, so the average of the two rank means weighs
labels slightly differently from the 1-process mean) and float summation
order.  Measured: weights 0.13 % apart (relative L2) and validation MAE 0.3 %
apart after 8 steps, against 3.1 % for the weights of a 1-process run that
merely visits the windows in another order — so the 1 % tolerances below tell
a correct DDP run from a wrong one.  With the authors' batch-norm layers the
statistics are per process (half a batch each), which moved the weights by
~3 % and validation MAE by ~1.3 % in an earlier measurement.  Lightning's
``sync_batchnorm=True`` does not help and ``gman train`` refuses it: its
``nn.SyncBatchNorm.convert_sync_batchnorm`` swaps GMAN's ``BatchNorm`` (an
``nn.BatchNorm1d`` subclass) for ``nn.SyncBatchNorm``, which GMAN's layers
never call (they apply their norm only when it is a gman ``BatchNorm``), so
the converted network silently runs without batch norm (see docs/multi-gpu.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 16
TOLERANCE = 0.01  # relative, validation MAE and weights after 8 optimiser steps (see the module docstring)

SCRIPT = '''\
import sys
import lightning as L
import torch
from gman.data.datamodule import GMANDataModule
from gman.training.module import GMANLightningModule
from gman.training.tracking import make_logger


class FirstBatch(L.Callback):
    """Each rank writes the window starts of its first batch to first_rank<r>.txt (one file
    per rank: the ranks share stdout, where lines can interleave)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            with open(f"{out}/first_rank{trainer.global_rank}.txt", "w") as handle:
                handle.write(" ".join(map(str, batch["start"].tolist())))


devices, out = int(sys.argv[1]), sys.argv[2]
L.seed_everything(5, verbose=False)
data = GMANDataModule(dataset="synthetic", options={"num_sensors": 10, "days": 6}, batch_size=16 // devices,
                  eval_batch_size=64, seed=5)
model = GMANLightningModule(num_layers=1, num_heads=2, head_dim=4, se_dim=8, dropout=0.0, learning_rate=0.003,
                            batch_norm="none")
logger = make_logger("ddp-test", f"sqlite:///{out}/mlflow.db")
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                    max_epochs=1, limit_train_batches=8, num_sanity_val_steps=0,
                    logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[FirstBatch()])
trainer.fit(model, datamodule=data)
logger.finish("FINISHED")
if trainer.is_global_zero:
    print("VAL_MAE", float(trainer.callback_metrics["val_mae"]), "WORLD", trainer.world_size, flush=True)
    torch.save({k: v for k, v in model.net.state_dict().items() if v.is_floating_point()}, f"{out}/weights.pt")
'''

CLI_CONFIG = """\
seed_everything: 5
model: {num_layers: 1, num_heads: 2, head_dim: 4, se_dim: 8, dropout: 0.0}
data: {dataset: synthetic, options: {num_sensors: 10, days: 6}, batch_size: 8, eval_batch_size: 64}
trainer: {max_epochs: 1, limit_train_batches: 4, accelerator: cpu, devices: 2, strategy: ddp, enable_progress_bar: false}
"""


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """Start ``python args`` in ``cwd``; its output goes to files there (a full pipe would block it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(cwd / "stdout.txt", "w") as stdout, open(cwd / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True)


def finish(process: subprocess.Popen, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Wait for a process of :func:`start`; its exit status and output."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, (cwd / "stdout.txt").read_text(),
                                       (cwd / "stderr.txt").read_text())


def first_batches(workdir: Path) -> dict[int, list[int]]:
    return {int(f.stem[len("first_rank"):]): [int(v) for v in f.read_text().split()]
            for f in workdir.glob("first_rank*.txt")}


def mlflow_runs(db: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    """All runs of this module, started at once (they are independent; most of their time is start-up)."""
    procs = {}
    for name, devices in (("single", 1), ("ddp", 2)):
        workdir = tmp_path_factory.mktemp(name)
        (workdir / "fit.py").write_text(SCRIPT)
        procs[name] = (workdir, start(["fit.py", str(devices), str(workdir)], workdir))
    workdir = tmp_path_factory.mktemp("cli")
    (workdir / "config.yaml").write_text(CLI_CONFIG)
    procs["cli"] = (workdir, start(["-m", "gman.cli", "train", "--config", "config.yaml", "--output-dir", "runs/out"],
                                   workdir))
    yield procs
    for _, process in procs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def runs(launched) -> dict:
    out = {}
    for name in ("single", "ddp"):
        workdir, process = launched[name]
        result = finish(process, workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("VAL_MAE")]
        _, value, _, world = line.split()
        out[name] = {"val_mae": float(value), "world": int(world), "dir": workdir,
                     "first": first_batches(workdir)}
    return out


def test_two_processes_match_one_at_the_same_global_batch(runs):
    import torch

    single, ddp = runs["single"], runs["ddp"]
    assert (single["world"], ddp["world"]) == (1, 2)
    # the two ranks' first batches are the 1-process first batch, split in two
    assert sorted(ddp["first"][0] + ddp["first"][1]) == sorted(single["first"][0])
    assert not set(ddp["first"][0]) & set(ddp["first"][1])
    a, b = single["val_mae"], ddp["val_mae"]
    assert abs(a - b) / a < TOLERANCE, f"val_mae 1 process {a:.4f} vs 2 processes {b:.4f}"
    wa, wb = (torch.load(r["dir"] / "weights.pt") for r in (single, ddp))
    diff = sum(((wa[k] - wb[k]) ** 2).sum() for k in wa) ** 0.5 / sum((w**2).sum() for w in wa.values()) ** 0.5
    assert diff < TOLERANCE, f"weights of the two runs are {float(diff):.2%} apart"
    print(f"\n1 vs 2 processes: val_mae {a:.5f} vs {b:.5f} ({abs(a - b) / a:.3%} apart), "
          f"weights {float(diff):.3%} apart (relative L2)")


def test_only_rank_zero_creates_an_mlflow_run(runs):
    (logged,) = mlflow_runs(runs["ddp"]["dir"] / "mlflow.db")
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics["val_mae"] == pytest.approx(runs["ddp"]["val_mae"], rel=1e-6)


def test_data_module_gives_the_one_process_batches_under_ddp(runs):
    from gman.data.datamodule import GMANDataModule
    from gman.data.sampling import EpochSeededRandomSampler

    data = GMANDataModule(dataset="synthetic", options={"num_sensors": 10, "days": 6}, seed=5)
    data.setup("fit")
    order = list(EpochSeededRandomSampler(len(data.train_windows), seed=5))
    starts = [int(data.train_windows.starts[i]) for i in order[:GLOBAL_BATCH]]
    assert runs["single"]["first"][0] == starts
    # rank r takes positions r, r + 2, ... of the 1-process order
    assert runs["ddp"]["first"] == {0: starts[0::2], 1: starts[1::2]}




def test_gman_train_runs_under_ddp(launched):
    """Lightning's launcher re-runs the command for rank 1; only rank 0 writes the folder and the MLflow run."""
    tmp_path, process = launched["cli"]
    result = finish(process, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["out"]
    out = tmp_path / "runs" / "out"
    assert json.loads((out / "run.json").read_text())["status"] == "FINISHED"
    assert (out / "horizons.csv").is_file() and (out / "model").is_dir() and (out / "checkpoints" / "best.ckpt").is_file()
    (logged,) = mlflow_runs(tmp_path / "mlflow.db")
    assert logged.info.status == "FINISHED"
    assert {"val_mae", "test_mae", "epoch"} <= set(logged.data.metrics)
    assert logged.data.params["trainer.strategy"] == "ddp" and logged.data.params["trainer.devices"] == "2"
    assert result.stdout.count(str(out)) == 1  # the summary is printed once, by rank 0


def test_sync_batchnorm_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import torch

    from gman.cli import main
    from gman.errors import ConfigError
    from gman.training.module import GMANLightningModule

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["train", "--trainer.sync_batchnorm", "true", "--output-dir", "runs/out"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gman: error:")]
    assert len(err) == 1 and err[0].startswith("gman: error: trainer.sync_batchnorm:"), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    # without GMAN's batch norm there is nothing to convert, and the key is accepted
    from gman.training.cli import _check_sync_batchnorm

    module = GMANLightningModule(num_layers=1, num_heads=2, head_dim=4, se_dim=8, batch_norm="none", num_nodes=4,
                                 steps_per_day=288, history_steps=3, horizon_steps=3, scaler_mean=0.0,
                                 scaler_std=1.0, interval_minutes=5.0, learnable_spatial_embedding=True)
    config = types.SimpleNamespace(trainer=types.SimpleNamespace(sync_batchnorm=True))
    _check_sync_batchnorm(config, module)
    # the module itself refuses a network Lightning has converted (Trainer(sync_batchnorm=True) outside the CLI)
    module.hparams.batch_norm = "activation"
    module._build()
    module.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module.net)
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm"):
        module.on_fit_start()


def test_a_rank_the_trainer_does_not_see_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from gman.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")  # says "not rank 0", but the trainer is a one-process one
    args = ["--trainer.max_epochs", "1", "--data.options", "{num_sensors: 10, days: 4}", "--output-dir", "runs/out"]
    assert main(["train", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gman: error:")]
    assert len(err) == 1 and "SLURM_PROCID=1" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_world_size_that_the_launcher_does_not_give_is_refused_before_anything_is_written(tmp_path, monkeypatch,
                                                                                             capsys):
    """torchrun started 2 processes, the config asks for 4 devices: Lightning would say so only inside fit,
    after rank 0 had created the MLflow run."""
    from gman.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in {"TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                       "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    args = ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
            "--trainer.devices", "4", "--data.options", "{num_sensors: 10, days: 4}", "--output-dir", "runs/out"]
    assert main(["train", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gman: error:")]
    assert len(err) == 1 and "does not match the world size (2)" in err[0], err
    assert list(tmp_path.iterdir()) == []
