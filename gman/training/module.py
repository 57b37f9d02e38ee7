"""``GMANLightningModule``: GMAN trained the authors' way, with Lightning doing the loop.

Loss and metrics are masked and computed on de-normalised values:

    ŷ = GMAN(x, time) · std + mean                  [B, Q, N] in data units
    loss = Σ y_mask · |ŷ − y| / Σ y_mask            (masked MAE)

Optimiser Adam(lr); learning rate per epoch ``e`` (the authors' staircase):

    lr_e = max(lr · factor^⌊e / every⌋, min_lr)    factor 0.7, every 5 epochs, min_lr 1e-5

Optionally the authors' batch-norm momentum schedule, which halves with the
same staircase: ``momentum_e = max(bn_momentum · 0.5^⌊e / every⌋, 0.01)``.

The sizes that depend on the data (``num_nodes``, ``steps_per_day``, P, Q,
scaler, data interval) are arguments too.  Left at ``None`` they are read
from the trainer's data module in :meth:`setup`, where the network is built,
and written back into ``hparams`` so that the checkpoint holds them:
``GMANLightningModule.load_from_checkpoint(path)`` rebuilds the network with
no data at hand.  The spatial embedding values live in the network's state
dict, never in ``hparams``.

Determinism of a resumed run: before every training batch the global torch
RNG (dropout) is reseeded from ``(base seed, epoch, batch)``; with the data
module's epoch-seeded sampler, an epoch replayed from the last epoch-end
checkpoint draws exactly the batches and dropout masks of the interrupted
run.
"""
from __future__ import annotations

import warnings
from typing import Any, Literal, Union

import lightning as L
import numpy as np
import torch

from gman.allocator import allocate_training_state
from gman.errors import ConfigError
from gman.model import GMAN
from gman.model.layers import release_scratch
from gman.training.metrics import HorizonErrors, HorizonMetrics, masked_mae

# data-dependent hyper-parameters: filled from the data module when left None
DATA_DERIVED = ("num_nodes", "steps_per_day", "history_steps", "horizon_steps",
                "scaler_mean", "scaler_std", "scaler_missing_input", "interval_minutes", "learnable_spatial_embedding")
MIN_BN_MOMENTUM = 0.01
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Lightning's sync_batchnorm runs nn.SyncBatchNorm.convert_sync_batchnorm, which swaps every nn.BatchNorm1d
# subclass -- gman.model.BatchNorm included -- for nn.SyncBatchNorm.  GMAN's layers call their norm only when
# it is a gman BatchNorm, so the swapped layers are never called and the network silently trains and
# predicts without batch normalisation.
SYNC_BATCHNORM_ERROR = (
    "trainer.sync_batchnorm: not supported with GMAN's batch norm (model.batch_norm: {batch_norm}): Lightning "
    "would swap its layers for nn.SyncBatchNorm, which GMAN's layers never call, so the model would train "
    "without batch norm; leave trainer.sync_batchnorm false (statistics per process) or set model.batch_norm: none"
)


class GMANLightningModule(L.LightningModule):
    """Trains, validates and tests a :class:`gman.model.GMAN`.

    Args (model): ``num_layers`` L, ``num_heads`` K, ``head_dim`` d, ``se_dim``,
        ``dropout``, ``causal_mask``, ``day_of_week``, ``attention_output_fc``, ``fusion_output_fc``,
        ``batch_norm``, ``bn_momentum``, ``spatial_attention(_options)``, ``num_groups``,
        ``partition_method`` (``random`` | ``bfs``: from the data's graph), ``partition_seed``,
        ``last_value_residual``, ``residual_step_gain`` (not in the paper; off by default): see GMAN.
    Args (optimisation): ``learning_rate``, ``weight_decay`` (Adam), ``lr_decay_factor``,
        ``lr_decay_every`` (epochs), ``min_learning_rate``, ``bn_momentum_schedule`` (the
        authors': batch-norm momentum from ``bn_momentum`` 0.5, halved with each learning-rate
        decay, floored at 0.01; ``False`` keeps it constant).

    Defaults are the authors' METR-LA settings (``experiments/metr-la.yaml`` spells them out),
    except ``num_layers`` = 3, the paper's best L (their code runs 5 on METR-LA, 1 on PEMS-BAY).

    Small differences from the authors' training loop, each of negligible effect: early stopping
    and the best checkpoint need a strict improvement of ``val_mae`` (theirs counts a tie,
    ``<=``); ``val_mae`` is pooled over all observed labels (theirs averages per-batch masked
    MAEs); PyTorch's batch-norm running variance is the unbiased one, starting at 1 (TensorFlow's
    moving average tracks the population variance from zero, with a start-up correction).
    Args (speed): ``compile_mode`` (None: eager; ``default``, ``reduce-overhead`` (CUDA
        graphs), ``max-autotune``, ``max-autotune-no-cudagraphs``) runs the network through
        ``torch.compile`` with ``compile_backend`` (``inductor``; ``aot_eager`` etc. for
        debugging). ``nn.Module.compile`` compiles in place, so checkpoints and packages keep
        the plain parameter names and load without it. Meant for GPUs: the benchmark's
        hand-written bf16 step at L = 3 ran 3–4x faster compiled than eager on an H100 and an
        H200 (``experiments/results/gpu/NOTES.md``; this Lightning path is not yet timed on a
        GPU). On the CPU it replaces the memory-lean hand-written training path with plain
        autograd (slower), and compiling takes about a minute.
    Args (from the data, normally left None): ``num_nodes``, ``steps_per_day``,
        ``history_steps``, ``horizon_steps``, ``scaler_mean``, ``scaler_std``, ``scaler_missing_input``,
        ``interval_minutes``, ``learnable_spatial_embedding`` (True when the data
        module gives no spatial embedding).

    After ``trainer.test``, ``test_errors`` holds the per-horizon
    :class:`HorizonErrors` and ``test_window_starts`` the sorted start steps of the windows
    they cover (all ranks'; fewer than the split's under ``limit_test_batches``); test metrics are logged as
    ``test_{mae,rmse,mape}_step{q:02d}_{minutes}min`` plus the pooled ``test_mae`` etc.
    """

    def __init__(
        self,
        num_layers: int = 3,
        num_heads: int = 8,
        head_dim: int = 8,
        se_dim: int = 64,
        dropout: float = 0.1,
        causal_mask: bool = True,
        day_of_week: Union[bool, Literal["weekend"]] = True,
        attention_output_fc: bool = True,
        fusion_output_fc: bool = True,
        batch_norm: str = "activation",
        bn_momentum: float = 0.5,
        bn_momentum_schedule: bool = True,
        spatial_attention: str = "dense",
        spatial_attention_options: dict[str, Any] | None = None,
        num_groups: int | None = None,
        partition_method: str = "random",
        partition_seed: int = 0,
        last_value_residual: bool = False,
        residual_step_gain: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        lr_decay_factor: float = 0.7,
        lr_decay_every: int = 5,
        min_learning_rate: float = 1e-5,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        num_nodes: int | None = None,
        steps_per_day: int | None = None,
        history_steps: int | None = None,
        horizon_steps: int | None = None,
        scaler_mean: float | None = None,
        scaler_std: float | None = None,
        scaler_missing_input: float | None = None,
        interval_minutes: float | None = None,
        learnable_spatial_embedding: bool | None = None,
    ) -> None:
        super().__init__()
        if learning_rate <= 0 or min_learning_rate < 0:
            raise ConfigError(f"model.learning_rate must be > 0 and model.min_learning_rate >= 0, "
                              f"got {learning_rate}, {min_learning_rate}")
        if not 0 < lr_decay_factor <= 1 or lr_decay_every < 1:
            raise ConfigError(f"model.lr_decay_factor must be in (0, 1] and model.lr_decay_every >= 1, "
                              f"got {lr_decay_factor}, {lr_decay_every}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ConfigError(f"model.compile_mode must be null or one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        if compile_mode is not None and compile_backend not in torch.compiler.list_backends(exclude_tags=()):
            raise ConfigError(f"model.compile_backend must be one of {', '.join(torch.compiler.list_backends(exclude_tags=()))}, "
                              f"got {compile_backend!r}")
        # the resolved config is logged to MLflow by the CLI; logger=False avoids a second, partial copy
        self.save_hyperparameters(logger=False)
        self.net: GMAN | None = None
        self.checkpoint_package: dict[str, Any] | None = None  # set by on_load_checkpoint
        self._val_metrics: HorizonMetrics | None = None
        self._test_metrics: HorizonMetrics | None = None
        self.test_errors: HorizonErrors | None = None
        self.test_window_starts: np.ndarray | None = None
        self._tested_starts: list[torch.Tensor] = []
        self._batch_seed_base = 0
        # scaler_missing_input may stay None: checkpoints written before it existed normalised missing inputs to 0
        if all(self.hparams[name] is not None for name in DATA_DERIVED if name != "scaler_missing_input"):
            self._build()

    # ------------------------------------------------------------------ network
    def _build(self) -> None:
        """Instantiate GMAN from hparams (all data-derived sizes known)."""
        hp = self.hparams
        try:
            self.net = GMAN(
                num_nodes=hp.num_nodes, steps_per_day=hp.steps_per_day, se_dim=hp.se_dim,
                history_steps=hp.history_steps, horizon_steps=hp.horizon_steps,
                num_layers=hp.num_layers, num_heads=hp.num_heads, head_dim=hp.head_dim,
                dropout=hp.dropout, causal_mask=hp.causal_mask, day_of_week=hp.day_of_week,
                learnable_spatial_embedding=hp.learnable_spatial_embedding,
                attention_output_fc=hp.attention_output_fc, fusion_output_fc=hp.fusion_output_fc,
                batch_norm=hp.batch_norm, bn_momentum=hp.bn_momentum,
                spatial_attention=hp.spatial_attention, spatial_attention_options=hp.spatial_attention_options,
                num_groups=hp.num_groups, partition_method=hp.partition_method, partition_seed=hp.partition_seed,
                last_value_residual=hp.last_value_residual,
                residual_step_gain=hp.residual_step_gain,
            )
        except ValueError as err:  # GMAN validates its arguments with one-line ValueErrors
            raise ConfigError(f"model: {str(err).removeprefix('GMAN: ')}") from None
        if hp.compile_mode is not None:
            self.net.compile(mode=hp.compile_mode if hp.compile_backend == "inductor" else None,
                             backend=hp.compile_backend)
        self._val_metrics = HorizonMetrics(hp.horizon_steps)
        self._test_metrics = HorizonMetrics(hp.horizon_steps)

    def setup(self, stage: str) -> None:
        """Read the data-dependent sizes from the trainer's data module and build the network (once);
        a network built before (a loaded checkpoint) is checked against the data module instead."""
        built_before = self.net is not None
        self.configure_model()
        if built_before and self._trainer is not None and getattr(self.trainer, "datamodule", None) is not None:
            self._check_data_fits(self.trainer.datamodule)

    def trained_scaler(self):
        """The :class:`~gman.data.windows.StandardScaler` the network was trained with (None before it is known)."""
        from gman.data.windows import StandardScaler

        hp = self.hparams
        if hp.get("scaler_mean") is None or hp.get("scaler_std") is None:
            return None
        return StandardScaler(hp.scaler_mean, hp.scaler_std, hp.get("scaler_missing_input") or 0.0)

    def _check_data_fits(self, datamodule) -> None:
        """A trained network fed data normalised or laid out otherwise forecasts nonsense without a word:
        refuse it, pointing to :meth:`GMANDataModule.use_trained`."""
        scaler, trained = getattr(datamodule, "scaler", None), self.trained_scaler()
        fix = "call datamodule.use_trained(module) before the data module is set up"
        if getattr(datamodule, "num_nodes", None) is not None and int(datamodule.num_nodes) != int(self.hparams.num_nodes):
            raise ConfigError(f"data: {datamodule.num_nodes} sensors, but the model was trained on {self.hparams.num_nodes}")
        if scaler is not None and trained is not None and not all(
            abs(a - b) <= 1e-6 * max(1.0, abs(b))
            for a, b in ((scaler.mean, trained.mean), (scaler.std, trained.std), (scaler.missing_input, trained.missing_input))
        ):
            raise ConfigError(f"data: normalised with mean {scaler.mean:.6g}, std {scaler.std:.6g}, but the model was trained "
                              f"with mean {trained.mean:.6g}, std {trained.std:.6g}; {fix}")
        ids = (self.checkpoint_package or {}).get("sensor_ids")
        if ids is not None and getattr(datamodule, "sensor_ids", None) is not None \
                and list(datamodule.sensor_ids) != [str(s) for s in ids]:
            raise ConfigError(f"data: its sensors are not the model's, in the model's order; {fix}")

    def configure_model(self) -> None:
        """:meth:`setup`'s work, also under Lightning's name for it: callbacks that copy the
        model when they are set up (``EMAWeightAveraging``) call it first."""
        if self.net is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            raise ConfigError("model: num_nodes, steps_per_day, ... are unset and there is no data module to read them from")
        self.build_for(datamodule)

    def build_for(self, datamodule) -> None:
        """Build the network for a set-up ``GMANDataModule``: its sizes into hparams, its embedding into the net."""
        derived = data_hparams(datamodule, se_dim=self.hparams.se_dim)
        if derived["se_dim"] != self.hparams.se_dim:
            warnings.warn(f"model.se_dim {self.hparams.se_dim} is replaced by the width of the data's spatial embedding, "
                          f"{derived['se_dim']} (node2vec: data.node2vec_options.dim)", stacklevel=2)
        self.hparams.update(derived)
        if self.hparams.last_value_residual and float(self.hparams.get("scaler_missing_input") or 0.0) != 0.0:
            # the residual's base would be a reading of 0 wherever the last reading is missing
            raise ConfigError("model.last_value_residual needs data.normalisation 'observed', where a missing last "
                              "reading enters as the training mean; with 'authors' it enters as a reading of 0")
        self._build()
        if self.hparams.day_of_week is not False:
            _warn_unseen_days(datamodule, self.hparams.day_of_week)
        if datamodule.spatial_embedding is not None:
            self.net.set_spatial_embedding(torch.as_tensor(datamodule.spatial_embedding, dtype=torch.float32))
        if self.hparams.spatial_attention == "group" and self.hparams.partition_method == "bfs":
            adjacency = datamodule.dataset.adjacency
            if adjacency is None:
                raise ConfigError("model.partition_method: 'bfs' needs a road graph, and the data set has none")
            self.net.set_partition_graph(adjacency)  # saved in the state dict: checkpoints keep the partition

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the checkpoint's serving metadata (``checkpoint_package``; None if it has none): the
        sensor order and time zone the model was trained with, which ``gman evaluate`` lays its data out in."""
        self.checkpoint_package = checkpoint.get("gman_package")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the serving metadata (sensor ids, interval, scaler...) so a checkpoint alone is servable.

        ``Forecaster.load(path.ckpt)`` reads ``checkpoint["gman_package"]`` first;
        without it, it has to find the run's ``model/gman.json`` beside the checkpoint.
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.net is None or datamodule is None or getattr(datamodule, "dataset", None) is None:
            return
        from gman.serving.package import package_metadata

        checkpoint["gman_package"] = package_metadata(self.net, **self.package_fields(datamodule))

    def package_fields(self, datamodule) -> dict[str, Any]:
        """Keyword arguments of ``save_package`` / ``package_metadata`` for this model trained on ``datamodule``."""
        dataset = datamodule.dataset
        return dict(
            scaler_mean=self.hparams.scaler_mean, scaler_std=self.hparams.scaler_std,
            scaler_missing_input=self.hparams.get("scaler_missing_input") or 0.0,
            sensor_ids=list(datamodule.sensor_ids), interval=dataset.interval,
            missing_value=getattr(datamodule, "missing_value", None), dataset_name=dataset.name,
            units=getattr(dataset, "units", ""),
            timezone=None if dataset.index.tz is None else str(dataset.index.tz),
        )

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """x [B, P, N] normalised, time [B, P+Q, 2] -> forecast [B, Q, N] in data units (float32).

        The network's output is cast to float32 before it is scaled: under
        bf16 autocast it is bf16, whose 8-bit mantissa would round a 61 mph
        forecast to a multiple of 0.25 and so bias every loss and metric.
        """
        return self.net(x, time).float() * self.hparams.scaler_std + self.hparams.scaler_mean

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        pred = self(batch["x"], batch["time"])
        loss = masked_mae(pred, batch["y"], batch["y_mask"])
        self.log("train_mae", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=pred.shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._val_metrics.update(self(batch["x"], batch["time"]), batch["y"], batch["y_mask"])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._test_metrics.update(self(batch["x"], batch["time"]), batch["y"], batch["y_mask"])
        if "start" in batch:
            self._tested_starts.append(batch["start"].detach().cpu())

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["x"], batch["time"])

    # ------------------------------------------------------------ epoch hooks
    def _reduced(self, metrics: HorizonMetrics) -> HorizonErrors:
        """Sum the error sums over devices (a no-op on one device), compute, reset."""
        sums = self.trainer.strategy.reduce(metrics.sums.to(self.device), reduce_op="sum")
        metrics.sums = sums.detach().cpu().double()
        errors = metrics.compute()
        metrics.reset()
        return errors

    def on_validation_epoch_start(self) -> None:
        self._val_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        errors = self._reduced(self._val_metrics)
        # the figures are already the whole split's (summed over ranks): sync_dist=True averages equal
        # values, and says so to Lightning, which would otherwise warn about every key under DDP
        self.log("val_mae", errors.mae_all, prog_bar=True, sync_dist=True)
        self.log_dict({"val_rmse": errors.rmse_all, "val_mape": errors.mape_all}, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self._test_metrics.reset()
        self._tested_starts = []

    def on_test_epoch_end(self) -> None:
        errors = self._reduced(self._test_metrics)
        self.test_errors = errors
        # which windows were scored, so that the baselines are scored on the same ones
        starts = [int(s) for t in self._tested_starts for s in t.tolist()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every_rank: list[list[int]] = [[] for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(every_rank, starts)
            starts = [s for rank_starts in every_rank for s in rank_starts]
        # None where the batches name no window starts (a data module of another kind): then unknown
        self.test_window_starts = np.unique(np.asarray(starts, dtype=np.int64)) if starts else None
        self._tested_starts = []
        # whole-split figures already (see on_validation_epoch_end)
        self.log_dict(horizon_metric_names(errors, self.hparams.interval_minutes), sync_dist=True)

    def on_fit_start(self) -> None:
        if self.net is not None and any(isinstance(m, torch.nn.SyncBatchNorm) for m in self.net.modules()):
            raise ConfigError(SYNC_BATCHNORM_ERROR.format(batch_norm=self.hparams.batch_norm))
        # LightningCLI / seed_everything seeded torch just before; remember that seed for the reseeding below
        self._batch_seed_base = torch.initial_seed()

    @property
    def _places_training_state(self) -> bool:
        """On the CPU, gradients and Adam's state are made before the first step and the
        gradients are then zeroed in place, never freed (a few MB): made again amid a step's
        activations, they would fragment the heap (see gman.allocator)."""
        return self.device.type == "cpu"

    def on_train_start(self) -> None:
        if self._places_training_state:
            for optimizer in self.trainer.optimizers:
                allocate_training_state(optimizer)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        optimizer.zero_grad(set_to_none=not self._places_training_state)

    def on_validation_model_zero_grad(self) -> None:
        # Lightning's default frees the gradients before validating
        self.zero_grad(set_to_none=not self._places_training_state)

    def on_train_end(self) -> None:
        release_scratch()  # the lean CPU training path's reusable buffers; testing and serving do not use them

    def on_train_epoch_start(self) -> None:
        if self.hparams.bn_momentum_schedule:
            halvings = self.current_epoch // self.hparams.lr_decay_every
            self.net.set_bn_momentum(max(self.hparams.bn_momentum * 0.5**halvings, MIN_BN_MOMENTUM))

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Dropout draws from the global RNG, which Lightning does not checkpoint and which other code
        # (e.g. a DataLoader iterator picking its base seed) also draws from.  Reseeding per
        # batch makes its dropout masks a function of (seed, epoch, batch) alone, so a run resumed
        # from a checkpoint replays exactly the masks of the run it continues.
        seed = (self._batch_seed_base * 1_000_003 + self.current_epoch) * 1_000_003 + batch_idx
        # under DDP each rank draws its own masks (rank 0 keeps the one-process masks)
        seed += self.global_rank * 1_000_000_007
        torch.manual_seed(seed % (2**63 - 1))
        if self.hparams.compile_mode in ("reduce-overhead", "max-autotune"):
            # CUDA graphs reuse their output memory: a training step starts here
            torch.compiler.cudagraph_mark_step_begin()

    # -------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        # fused: one kernel for all parameters on a GPU (the default foreach path launches per tensor group)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay, **fused)
        floor = hp.min_learning_rate / hp.learning_rate

        def staircase(epoch: int) -> float:
            return max(hp.lr_decay_factor ** (epoch // hp.lr_decay_every), floor)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, staircase)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def unseen_days(datamodule, day_of_week: bool | str = True) -> list[str]:
    """Days of the week (kinds of day, ``working day`` / ``weekend``, when ``day_of_week`` is
    ``"weekend"``) in the validation / test steps of a set-up data module that no training step has."""
    ranges = getattr(datamodule, "split_ranges", None)
    if getattr(datamodule, "dataset", None) is None or not ranges:
        return []
    day, names = datamodule.dataset.time_features()[:, 0], DAY_NAMES
    if day_of_week == "weekend":
        day, names = (day >= 5).astype(int), ("working day", "weekend")
    seen = set(day[slice(*ranges[0])].tolist())
    later = set().union(*(day[slice(*r)].tolist() for r in ranges[1:]))
    return [names[d] for d in sorted(later - seen)]


def _warn_unseen_days(datamodule, day_of_week: bool | str) -> None:
    days = unseen_days(datamodule, day_of_week)
    if days:

        warnings.warn(
            f"{', '.join(days)} occur(s) in the validation/test steps but not in the training steps: their "
            "day-of-week embedding keeps its random initial weights and shifts every forecast on those days; "
            "set model.day_of_week false (time of day only) or 'weekend' (working day / weekend) for data "
            "shorter than two weeks",
            stacklevel=3,
        )


def data_hparams(datamodule, se_dim: int) -> dict[str, Any]:
    """The data-dependent hyper-parameters of a set-up ``GMANDataModule``."""
    se = datamodule.spatial_embedding
    interval = datamodule.interval
    seconds = interval.total_seconds() if hasattr(interval, "total_seconds") else float(interval)
    return {
        "num_nodes": int(datamodule.num_nodes),
        "steps_per_day": int(datamodule.steps_per_day),
        "history_steps": int(datamodule.history_steps),
        "horizon_steps": int(datamodule.horizon_steps),
        "scaler_mean": float(datamodule.scaler.mean),
        "scaler_std": float(datamodule.scaler.std),
        "scaler_missing_input": float(datamodule.scaler.missing_input),
        "interval_minutes": seconds / 60.0,
        "learnable_spatial_embedding": se is None,
        # a given embedding fixes the width; a learnable one takes the configured se_dim
        "se_dim": int(se.shape[1]) if se is not None else int(se_dim),
    }


def horizon_metric_names(errors: HorizonErrors, interval_minutes: float | None,
                         prefix: str = "test") -> dict[str, float]:
    """``{"test_mae_step03_15min": ..., "test_mae": pooled, ...}``: readable per-step metric names."""
    logged: dict[str, float] = {}
    for q in range(errors.horizon_steps):
        minutes = "" if interval_minutes is None else f"_{(q + 1) * interval_minutes:g}min"
        for name in ("mae", "rmse", "mape"):
            logged[f"{prefix}_{name}_step{q + 1:02d}{minutes}"] = getattr(errors, name)[q]
    logged.update({f"{prefix}_mae": errors.mae_all, f"{prefix}_rmse": errors.rmse_all,
                   f"{prefix}_mape": errors.mape_all})
    return logged
