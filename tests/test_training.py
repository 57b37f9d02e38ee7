"""GMANLightningModule: masked loss, lr staircase, data-derived sizes, checkpoints, spatial embedding."""
from __future__ import annotations

import lightning as L
import numpy as np
import pandas as pd
import pytest
import yaml
import torch

from gman.data.datamodule import GMANDataModule
from gman.data.embedding import write_word2vec
from gman.errors import ConfigError
from gman.training.metrics import horizon_errors, masked_mae
from gman.training.module import GMANLightningModule, horizon_metric_names

TINY = dict(num_layers=1, num_heads=2, head_dim=4, se_dim=8)
DATA = dict(options={"num_sensors": 10, "days": 3}, history_steps=4, horizon_steps=3, batch_size=8,
            eval_batch_size=64)


def tiny_trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(max_epochs=1, limit_train_batches=3, limit_val_batches=2, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return L.Trainer(**{**options, **kwargs})


def test_sizes_come_from_the_data_and_a_checkpoint_rebuilds_the_model_without_it(tmp_path):
    L.seed_everything(0)
    datamodule = GMANDataModule(**DATA)
    module = GMANLightningModule(**TINY)
    assert module.net is None                                   # built once the data is known
    trainer = tiny_trainer(tmp_path)
    trainer.fit(module, datamodule=datamodule)
    hp = module.hparams
    assert (hp.num_nodes, hp.history_steps, hp.horizon_steps, hp.steps_per_day) == (10, 4, 3, 288)
    assert hp.scaler_mean == pytest.approx(datamodule.scaler.mean) and hp.interval_minutes == 5.0
    assert hp.learnable_spatial_embedding is True
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)

    restored = GMANLightningModule.load_from_checkpoint(path)  # no data module anywhere
    batch = next(iter(datamodule.val_dataloader()))
    module.eval(), restored.eval()
    with torch.no_grad():
        expected = module(batch["x"], batch["time"])
        got = restored(batch["x"], batch["time"])
    torch.testing.assert_close(got, expected)
    assert expected.shape == (batch["x"].shape[0], 3, 10)


def test_loss_is_masked_mae_in_data_units():
    module = GMANLightningModule(**TINY, num_nodes=3, steps_per_day=24, history_steps=2, horizon_steps=2,
                                 scaler_mean=50.0, scaler_std=10.0, interval_minutes=60.0,
                                 learnable_spatial_embedding=True)
    module.eval()
    batch = {"x": torch.randn(4, 2, 3), "time": torch.zeros(4, 4, 2, dtype=torch.long)}
    with torch.no_grad():
        pred = module(batch["x"], batch["time"])
        normalised = module.net(batch["x"], batch["time"])
    torch.testing.assert_close(pred, normalised * 10.0 + 50.0)  # de-normalised output
    y = pred + 2.0
    y_mask = torch.ones_like(y, dtype=torch.bool)
    y_mask[:, :, 0] = False
    y[:, :, 0] = 0.0                                            # missing readings, huge errors if counted
    with torch.no_grad():
        loss = module.training_step({**batch, "y": y, "y_mask": y_mask}, 0)
    assert loss.item() == pytest.approx(2.0, abs=1e-4)


def test_under_bf16_autocast_forecasts_and_the_loss_stay_float32():
    module = GMANLightningModule(**TINY, num_nodes=3, steps_per_day=24, history_steps=2, horizon_steps=2,
                                 scaler_mean=60.0, scaler_std=10.0, interval_minutes=60.0,
                                 learnable_spatial_embedding=True)
    module.eval()
    x, time = torch.randn(4, 2, 3), torch.zeros(4, 4, 2, dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        normalised = module.net(x, time)
        pred = module(x, time)
    assert normalised.dtype == torch.bfloat16 and pred.dtype == torch.float32
    # scaled in float32: near 60 bf16 can only hold multiples of 0.25
    torch.testing.assert_close(pred, normalised.float() * 10.0 + 60.0)
    assert (pred * 4 != (pred * 4).round()).any()

    # the label count of the loss is exact: 1 + 256 observed labels in bf16 would count as 256
    pred = torch.full((1, 1, 257), 1.0, dtype=torch.bfloat16)
    target = torch.zeros(1, 1, 257)
    loss = masked_mae(pred, target, torch.ones(1, 1, 257, dtype=torch.bool))
    assert loss.dtype == torch.float32 and loss.item() == 1.0


def test_learning_rate_follows_the_staircase_down_to_the_floor():
    module = GMANLightningModule(**TINY, num_nodes=3, steps_per_day=24, history_steps=2, horizon_steps=2,
                                 scaler_mean=0.0, scaler_std=1.0, interval_minutes=60.0,
                                 learnable_spatial_embedding=True,
                                 learning_rate=1e-3, lr_decay_factor=0.5, lr_decay_every=2, min_learning_rate=3e-4)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 3e-4, 3e-4])


def test_spatial_embedding_file_is_copied_into_the_network_not_the_hparams(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    path = write_word2vec(tmp_path / "se.txt", vectors)
    datamodule = GMANDataModule(**{**DATA, "spatial_embedding": str(path)})
    module = GMANLightningModule(**TINY)
    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=datamodule)
    assert module.hparams.se_dim == 6 and module.hparams.learnable_spatial_embedding is False
    assert all(not torch.is_tensor(v) for v in module.hparams.values())
    expected = vectors[datamodule.dataset.graph_order()]
    np.testing.assert_allclose(module.net.spatial_embedding.numpy(), expected, rtol=1e-6)
    assert "net.spatial_embedding" in module.state_dict()
    assert not module.net.spatial_embedding.requires_grad   # a given SE is fixed, as the authors' node2vec


def test_bad_model_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="num_heads"):
        GMANLightningModule(num_layers=1, num_heads=0, head_dim=4, num_nodes=3, steps_per_day=24,
                            history_steps=2, horizon_steps=2, scaler_mean=0.0, scaler_std=1.0,
                            interval_minutes=60.0, learnable_spatial_embedding=True)
    with pytest.raises(ConfigError, match="lr_decay_factor"):
        GMANLightningModule(lr_decay_factor=1.5)
    with pytest.raises(ConfigError, match=r"model.compile_mode .*'fastest'"):
        GMANLightningModule(compile_mode="fastest")
    with pytest.raises(ConfigError, match=r"model.compile_backend .*'nope'"):
        GMANLightningModule(compile_mode="default", compile_backend="nope")


def test_compiled_network_trains_like_the_eager_one_and_checkpoints_plain_names(tmp_path):
    """``compile_mode`` sends the network through torch.compile (here a backend that counts
    the graphs it gets and runs them as traced): the compiled network computes what the eager
    one does, training lands where eager training does, and the checkpoint keeps plain names."""
    graphs = []

    @torch._dynamo.register_backend(name="gman_test_counting")
    def counting(gm, example_inputs):  # noqa: ARG001
        graphs.append(gm)
        return gm.forward

    val_mae = {}
    for mode in (None, "default"):
        L.seed_everything(0)
        module = GMANLightningModule(**TINY, compile_mode=mode, compile_backend="gman_test_counting")
        trainer = tiny_trainer(tmp_path / str(mode))
        datamodule = GMANDataModule(**DATA)
        trainer.fit(module, datamodule=datamodule)
        val_mae[mode] = float(trainer.callback_metrics["val_mae"])
        if mode is None:
            assert not graphs
    assert graphs, "the network was not compiled"
    batch = next(iter(datamodule.val_dataloader()))
    module.eval()
    with torch.no_grad():  # the compiled call against the module's own eager forward, same weights
        torch.testing.assert_close(module.net(batch["x"], batch["time"]), module.net.forward(batch["x"], batch["time"]))
    # Three Adam steps move each weight by about ±lr whatever the size of its gradient, so the
    # float rounding that separates the eager CPU path (hand-written backward) from the compiled
    # one (plain autograd) can flip steps of near-zero gradients: close, not equal
    assert val_mae["default"] == pytest.approx(val_mae[None], rel=2e-2)
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert "net.input_fc.linears.0.weight" in state and not any("_orig_mod" in key for key in state)


def test_cpu_training_state_made_early_trains_as_lightning_defaults_do(tmp_path):
    """On the CPU the module makes Adam's state when training starts and zeroes gradients in
    place, also before validating (memory placement, see gman.allocator); the weights after three steps equal, to the
    bit, those of Lightning's defaults (state made at the first step, gradients set to None)."""

    class LightningDefaults(GMANLightningModule):
        def on_train_start(self) -> None:
            pass

        def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
            optimizer.zero_grad()

        def on_validation_model_zero_grad(self) -> None:
            self.zero_grad()

    weights, kept_grads = [], []
    for cls in (GMANLightningModule, LightningDefaults):
        L.seed_everything(0)
        module = cls(**TINY)
        tiny_trainer(tmp_path / cls.__name__).fit(module, datamodule=GMANDataModule(**DATA))
        weights.append({k: v.clone() for k, v in module.net.state_dict().items()})
        kept_grads.append(all(p.grad is not None for p in module.parameters()))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert kept_grads == [True, False]  # Lightning frees them before validating; kept on the CPU


def test_metric_names_say_step_and_minutes():
    errors = horizon_errors(np.ones((2, 12, 3)), np.zeros((2, 12, 3)) + 2, np.ones((2, 12, 3), dtype=bool))
    names = horizon_metric_names(errors, 5.0)
    assert names["test_mae_step03_15min"] == pytest.approx(1.0)
    assert names["test_mape_step12_60min"] == pytest.approx(50.0)
    assert {"test_mae", "test_rmse", "test_mape"} <= set(names)


@pytest.mark.parametrize("start,last", [(0.5, 0.5 * 0.5**2), (0.02, 0.01)])  # epoch 2: halved twice, floored at 0.01
def test_authors_batch_norm_momentum_schedule_halves_with_the_lr_staircase(tmp_path, start, last):
    from gman.model import BatchNorm

    L.seed_everything(0)
    module = GMANLightningModule(**TINY, bn_momentum=start, bn_momentum_schedule=True, lr_decay_every=1)
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, datamodule=GMANDataModule(**DATA))
    momenta = {m.momentum for m in module.net.modules() if isinstance(m, BatchNorm)}
    assert momenta == {last}


def test_two_processes_can_create_the_same_new_sqlite_store(tmp_path):
    """Two runs started together on a fresh mlflow.db must not race MLflow's schema migration."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys; from gman.training.tracking import ensure_experiment; "
        f"print(ensure_experiment('race', {uri!r}))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in results]
    assert results[0][0].strip() == results[1][0].strip()  # both see the one experiment


def test_tracking_uri_resolution_and_a_deleted_experiment_coming_back(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from gman.training.tracking import ensure_experiment, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://tracking.example:5000"  # the environment beats the default
    # a setting beats the environment
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'x.db'}"
    # a relative sqlite path is made absolute (the URI is stored with the run); query, memory and absolute kept
    assert (resolve_tracking_uri("sqlite:///db/../x.db?mode=ro", tmp_path)
            == f"sqlite:///{tmp_path.resolve() / 'x.db'}?mode=ro")
    assert resolve_tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("sqlite:///:memory:", tmp_path) == "sqlite:///:memory:"
    with pytest.raises(ConfigError, match="tracking_uri: 'mlflow.db' is not a URI"):
        resolve_tracking_uri("mlflow.db")
    # a password is masked wherever gman writes or shows the URI
    from gman.training.tracking import has_masked_password, scrub_password, without_password

    assert without_password("postgresql://me:pw@db.example:5432/mlflow") == "postgresql://me:***@db.example:5432/mlflow"
    assert without_password("https://me:p%40ss@mlflow.example/") == "https://me:***@mlflow.example/"
    for plain in ("https://me@mlflow.example", "http://mlflow.example:5000", "sqlite:////abs/x.db", "databricks"):
        assert without_password(plain) == plain and not has_masked_password(plain)
    assert has_masked_password("https://me:***@mlflow.example/")
    assert (scrub_password("request to https://me:p%40ss@h failed", "https://me:p%40ss@h")
            == "request to https://me:***@h failed")
    # a short password is masked in the URI only, not in every word that contains its letters
    assert scrub_password("error at http://u:a@host: bad data", "http://u:a@host") == "error at http://u:***@host: bad data"
    assert scrub_password("token correcthorse refused", "http://u:correcthorse@h") == "token *** refused"
    assert without_password("http://u:@host") == "http://u:@host" and not has_masked_password("http://u:@host")

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    first = ensure_experiment("gman-test", uri)
    client = MlflowClient(uri)
    client.delete_experiment(first)
    assert ensure_experiment("gman-test", uri) == first
    assert client.get_experiment(first).lifecycle_stage == "active"


def test_group_attention_with_a_graph_partition_trains_and_the_checkpoint_keeps_the_partition(tmp_path):
    """model.spatial_attention=group with partition_method=bfs: groups from the data's road graph, saved."""
    L.seed_everything(0)
    datamodule = GMANDataModule(**DATA)
    module = GMANLightningModule(**TINY, spatial_attention="group", num_groups=3, partition_method="bfs")
    trainer = tiny_trainer(tmp_path)
    trainer.fit(module, datamodule=datamodule)
    groups = module.net.group_attentions()
    assert groups and all(g.num_groups == 3 for g in groups)
    path = tmp_path / "g.ckpt"
    trainer.save_checkpoint(path)
    restored = GMANLightningModule.load_from_checkpoint(path)  # partition comes back from the state dict
    batch = next(iter(datamodule.val_dataloader()))
    module.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(batch["x"], batch["time"]), module(batch["x"], batch["time"]))


def test_days_of_week_absent_from_training_are_reported(recwarn):
    datamodule = GMANDataModule(**{**DATA, "options": {"num_sensors": 10, "days": 4}})
    datamodule.setup()
    day = datamodule.dataset.time_features()[:, 0]
    train_stop = datamodule.split_ranges[0][1]
    expected = sorted(set(day[train_stop:].tolist()) - set(day[:train_stop].tolist()))
    assert expected  # 4 days split 70/10/20: the last day is never trained on
    with pytest.warns(UserWarning, match="model.day_of_week false") as caught:
        GMANLightningModule(**TINY).build_for(datamodule)
    names = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
    message = next(str(w.message) for w in caught if "model.day_of_week false" in str(w.message))
    assert all(names[d] in message for d in expected), (expected, message)
    recwarn.clear()
    module = GMANLightningModule(**TINY, day_of_week=False)
    module.build_for(datamodule)
    assert not [w for w in recwarn if "model.day_of_week false" in str(w.message)]
    assert module.net.config["day_of_week"] is False
    weekend = GMANLightningModule(**TINY, day_of_week="weekend")
    weekend.build_for(datamodule)  # the last day is a working day like the trained ones
    assert not [w for w in recwarn if "model.day_of_week false" in str(w.message)]
    assert weekend.net.config["day_of_week"] == "weekend"


def test_weekend_embedding_reports_a_kind_of_day_absent_from_training():
    from types import SimpleNamespace

    import numpy as np

    from gman.training.module import _warn_unseen_days, unseen_days

    def days_split(*days: int):
        """A stand-in data module: one step per day; the last two are validation and test."""
        features = np.stack([np.array(days), np.zeros(len(days), dtype=int)], axis=1)
        n = len(days)
        return SimpleNamespace(dataset=SimpleNamespace(time_features=lambda: features),
                               split_ranges=[(0, n - 2), (n - 2, n - 1), (n - 1, n)])

    thu_to_wed = days_split(3, 4, 5, 6, 0, 1, 2)  # Los-loop's week: Tuesday, Wednesday never trained
    assert unseen_days(thu_to_wed, True) == ["Tuesday", "Wednesday"]
    assert unseen_days(thu_to_wed, "weekend") == []
    weekend_later = days_split(0, 1, 2, 5, 6)  # Monday-Wednesday train, the weekend is new
    assert unseen_days(weekend_later, "weekend") == ["weekend"]
    with pytest.warns(UserWarning, match="'weekend'"):
        _warn_unseen_days(weekend_later, "weekend")


def test_ema_weight_averaging_is_what_gets_tested(tmp_path):
    """With Lightning's EMAWeightAveraging in the callbacks, the test stage (and so horizons.csv and the
    package) runs the best checkpoint's averaged weights, not the live weights stored beside them."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    from gman.training.cli import run_test_on_best_checkpoint

    L.seed_everything(0)
    datamodule = GMANDataModule(**DATA)
    module = GMANLightningModule(**TINY)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val_mae", mode="min")
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[checkpoint, EMAWeightAveraging(decay=0.5)])
    trainer.fit(module, datamodule=datamodule)
    saved = torch.load(checkpoint.best_model_path, weights_only=False)
    averaged, live = saved["state_dict"], saved["current_model_state"]
    name = next(k for k in live if k.endswith("output_fc.linears.0.weight"))
    assert not torch.allclose(averaged[name], live[name])
    run_test_on_best_checkpoint(trainer, module, datamodule)
    tested = module.state_dict()
    for key, value in averaged.items():
        torch.testing.assert_close(tested[key], value, rtol=0, atol=0, msg=key)


def test_the_package_records_the_time_zone_of_the_training_data(tmp_path):
    import pandas as pd

    index = pd.date_range("2024-03-01", periods=15 * 288, freq="5min", tz="America/New_York", name="timestamp")
    rng = np.random.default_rng(0)
    pd.DataFrame(rng.uniform(40, 60, (len(index), 3)), index=index, columns=["a", "b", "c"]).to_csv(tmp_path / "v.csv")
    datamodule = GMANDataModule(dataset=str(tmp_path / "v.csv"), options={"timezone": "America/New_York"},
                                history_steps=4, horizon_steps=3)
    datamodule.setup()
    module = GMANLightningModule(**TINY)
    module.build_for(datamodule)
    assert module.package_fields(datamodule)["timezone"] == "America/New_York"
    from gman.serving.package import package_metadata

    assert package_metadata(module.net, **module.package_fields(datamodule))["timezone"] == "America/New_York"
    naive = GMANDataModule(**DATA)
    naive.setup()
    module = GMANLightningModule(**TINY)
    module.build_for(naive)
    assert module.package_fields(naive)["timezone"] is None


def test_node2vec_is_computed_as_wide_as_model_se_dim():
    """The demo's model.se_dim (16) is the node2vec width, not node2vec's own default (64)."""
    from gman.training.cli import parse_train_args

    demo = parse_train_args([])
    assert demo.config.model.se_dim == 16 and demo.datamodule.hparams.node2vec_options["dim"] == 16
    wide = parse_train_args(["--model.se_dim", "24"])
    assert wide.datamodule.hparams.node2vec_options["dim"] == 24
    with pytest.raises(ConfigError, match="data.node2vec_options.dim 8 differs from model.se_dim 16; set one of them"):
        parse_train_args(["--data.node2vec_options", "{dim: 8}"])


def test_a_given_embedding_width_replaces_model_se_dim_with_a_warning(tmp_path):
    dm = GMANDataModule(**{**DATA, "spatial_embedding": "learnable"})
    dm.setup()
    dm.spatial_embedding = torch.zeros(dm.num_nodes, 12)  # as a 12-wide embedding file would give
    module = GMANLightningModule(**{**TINY, "se_dim": 8})
    with pytest.warns(UserWarning, match="model.se_dim 8 is replaced by the width of the data's spatial embedding, 12"):
        module.build_for(dm)
    assert module.hparams.se_dim == 12


def test_relative_data_paths_are_stored_absolute(tmp_path, monkeypatch):
    """A run's config.yaml names its files absolutely, so gman evaluate and --resume work from anywhere."""
    from gman.training.cli import parse_train_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    index = pd.date_range("2024-01-01", periods=300, freq="5min", name="timestamp")
    pd.DataFrame({"a": 1.0, "b": 2.0}, index=index).to_csv(tmp_path / "data" / "v.csv")
    (tmp_path / "data" / "g.csv").write_text("a,b\n1,1\n1,1\n")
    (tmp_path / "data" / "se.txt").write_text("2 4\na 0 0 0 1\nb 0 0 1 0\n")
    cli = parse_train_args(["--data.dataset", "data/v.csv", "--data.graph_path", "data/g.csv",
                            "--data.spatial_embedding", "data/se.txt", "--model.se_dim", "4"])
    dumped = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))["data"]
    assert dumped["dataset"] == str(tmp_path / "data" / "v.csv")
    assert dumped["graph_path"] == str(tmp_path / "data" / "g.csv")
    assert dumped["spatial_embedding"] == str(tmp_path / "data" / "se.txt")
    assert parse_train_args(["--data.dataset", "synthetic"]).config.data.dataset == "synthetic"


def test_the_best_epoch_not_the_last_is_what_gets_tested(tmp_path):
    """A known defect of a popular port: "best" kept a reference to the live weights. Here the best
    validation MAE is forced into epoch 0 of 3; the test stage must run epoch 0's weights."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from gman.training.cli import run_test_on_best_checkpoint

    class ValMaeIsTheEpoch(Callback):
        """Replaces the logged val_mae by epoch + 1 (epoch 0 best) and keeps each epoch's weights."""

        def __init__(self):
            self.weights = []

        def on_validation_end(self, trainer, pl_module):  # after the module logged val_mae, before ModelCheckpoint
            if not trainer.sanity_checking:
                trainer.callback_metrics["val_mae"] = torch.tensor(float(trainer.current_epoch + 1))
                self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    L.seed_everything(0)
    datamodule = GMANDataModule(**DATA)
    module = GMANLightningModule(**TINY, learning_rate=0.05)
    forced = ValMaeIsTheEpoch()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val_mae", mode="min")
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[forced, checkpoint])
    trainer.fit(module, datamodule=datamodule)
    assert checkpoint.best_model_score.item() == 1.0 and len(forced.weights) == 3
    name = next(k for k in forced.weights[0] if k.endswith("output_fc.linears.0.weight"))
    assert not torch.equal(forced.weights[0][name], forced.weights[-1][name])
    assert torch.equal(module.state_dict()[name], forced.weights[-1][name])  # live weights: the last epoch's
    run_test_on_best_checkpoint(trainer, module, datamodule)
    tested = module.state_dict()
    for key, value in forced.weights[0].items():
        torch.testing.assert_close(tested[key], value, rtol=0, atol=0, msg=key)


def test_each_ddp_rank_draws_its_own_dropout_masks_and_rank_0_the_one_process_ones(monkeypatch):
    module = GMANLightningModule(**TINY)
    module._batch_seed_base = 11

    def draws(rank: int, batch_idx: int = 2) -> torch.Tensor:
        monkeypatch.setattr(GMANLightningModule, "global_rank", property(lambda self: rank))
        module.on_train_batch_start({}, batch_idx)
        return torch.rand(8)

    one_process = (11 * 1_000_003 * 1_000_003 + 2) % (2**63 - 1)
    got = draws(0)
    torch.manual_seed(one_process)
    assert torch.equal(got, torch.rand(8))
    assert not torch.equal(draws(0), draws(1)) and not torch.equal(draws(1), draws(2))
    assert torch.equal(draws(1), draws(1))


def test_the_baselines_are_scored_on_the_windows_gman_was_tested_on(tmp_path):
    """Under trainer.limit_test_batches the table compares all three models on the same windows."""
    from gman.training.cli import score_test_split

    L.seed_everything(0)
    datamodule = GMANDataModule(**{**DATA, "eval_batch_size": 16})
    module = GMANLightningModule(**TINY)
    trainer = tiny_trainer(tmp_path, limit_test_batches=2)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    first_two_batches = datamodule.test_windows.starts[:32]
    assert module.test_window_starts.tolist() == list(first_two_batches)
    results, _ = score_test_split(module, datamodule)
    counts = {name: errors.count for name, errors in results.items()}
    assert len(set(map(tuple, counts.values()))) == 1, counts
    assert sum(counts["GMAN"]) == int(sum(datamodule.test_windows[i]["y_mask"].sum() for i in range(32)))


def test_last_value_residual_is_refused_with_the_authors_normalisation(tmp_path):
    """Its base is the last input reading; the authors' scaler feeds a missing one as a reading of 0."""
    module = GMANLightningModule(**TINY, last_value_residual=True)
    with pytest.raises(ConfigError, match="model.last_value_residual needs data.normalisation 'observed'"):
        tiny_trainer(tmp_path).fit(module, datamodule=GMANDataModule(**DATA))
    observed = GMANDataModule(**DATA, normalisation="observed")
    module = GMANLightningModule(**TINY, last_value_residual=True)
    tiny_trainer(tmp_path).fit(module, datamodule=observed)
    assert module.net.config["last_value_residual"] is True


def test_the_last_value_baselines_fallback_is_the_observed_training_mean():
    from gman.training.cli import _observed_training_mean

    datamodule = GMANDataModule(**DATA)
    datamodule.setup("fit")
    start, stop = datamodule.split_ranges[0]
    values, mask = datamodule.dataset.values[start:stop], datamodule.dataset.mask[start:stop]
    assert (~mask).any()  # the synthetic data has missing readings, which the authors' mean counts as 0
    assert _observed_training_mean(datamodule) == pytest.approx(values[mask].astype(np.float64).mean())
    assert _observed_training_mean(datamodule) > datamodule.scaler.mean


def test_a_loaded_checkpoint_refuses_data_normalised_or_ordered_otherwise_until_use_trained(tmp_path):
    L.seed_everything(0)
    datamodule = GMANDataModule(**DATA)
    module = GMANLightningModule(**TINY)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    frame = datamodule.dataset.to_frame()

    def test_mae(data) -> float:
        loaded = GMANLightningModule.load_from_checkpoint(tmp_path / "m.ckpt")
        if data is not None:
            data.use_trained(loaded)
        else:
            data = other
        tiny_trainer(tmp_path).test(loaded, datamodule=data, verbose=False)
        return loaded.test_errors.mae_all

    other = GMANDataModule(**DATA, normalisation="observed")
    with pytest.raises(ConfigError, match="data: normalised with mean .* but the model was trained with mean .*; "
                                          r"call datamodule.use_trained\(module\)"):
        test_mae(None)
    other = GMANDataModule(**{**DATA, "dataset": frame.iloc[:, ::-1], "options": None})
    with pytest.raises(ConfigError, match="data: its sensors are not the model's, in the model's order"):
        test_mae(None)
    expected = test_mae(GMANDataModule(**DATA))
    assert test_mae(GMANDataModule(**DATA, normalisation="observed")) == pytest.approx(expected, rel=1e-6)
    assert test_mae(GMANDataModule(**{**DATA, "dataset": frame.iloc[:, ::-1], "options": None})) == pytest.approx(
        expected, rel=1e-5)
