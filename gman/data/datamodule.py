"""`GMANDataModule`: a sensor data set as train / val / test windows for Lightning.

    dataset (card name, "synthetic", or a path) --load_dataset--> SensorDataset [T, N]
        --chronological_split (70/10/20)--> three step ranges
        --StandardScaler.fit_authors (train input windows) or .fit (observed train readings)--> mean, std
        --WindowDataset per part (P history -> Q future, never across a boundary)--> DataLoaders

Every constructor argument is a plain type (str / int / float / list / dict /
None), so LightingCLI / jsonargparse configure the module from YAML. After
``setup()`` the module exposes what training, evaluation and serving need:
``dataset``, ``scaler``, ``num_nodes``, ``steps_per_day``, ``interval``,
``sensor_ids``, ``missing_value``, ``spatial_embedding`` ([N, D] float32 tensor,
or None for a learnable table), ``split_ranges``, ``train_windows`` /
``val_windows`` / ``test_windows``, and maps from a window's ``start`` to
timestamps (``window_times``, ``target_times``).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from gman.data.dataset import SensorDataset
from gman.data.windows import (
    DEFAULT_SPLIT,
    NORMALISATIONS,
    SPLIT_NAMES,
    StandardScaler,
    WindowDataset,
    chronological_split,
)
from gman.errors import ConfigError, DataError

SPATIAL_EMBEDDINGS = ("learnable", "node2vec")  # or a path to a word2vec text file


class GMANDataModule(LightningDataModule):
    """Train / val / test windows of one sensor data set.

    Args:
        dataset: ``"synthetic"`` (built in), a dataset card name, or a path to a
            series file (format from the extension or ``format``); from Python also a
            ``pathlib.Path``, a pandas DataFrame (read as :func:`gman.data.readers.load_dataset`
            reads one, with the reader options given here) or a ready
            :class:`~gman.data.dataset.SensorDataset` (``load_dataset(frame, adjacency=A)``
            gives one with a graph held in memory).  An object is not saved with the
            hyperparameters: they record ``"dataframe"`` or the data set's name.
        values_path, format, graph_path, graph_format, graph_sensor_ids,
        start_time, interval, feature, name, units: reader options of
            :func:`gman.data.readers.load_dataset` (None = unset / the card's value).
        missing_value: reading that means "missing" besides NaN; ``"auto"`` = the
            card's or reader's default (0.0); None = only NaN is missing.
        options: any further ``load_dataset`` options (e.g. ``seed``, ``days``,
            ``num_sensors`` for synthetic data; ``key``, ``fill_gaps``, ...).
        history_steps, horizon_steps: P and Q.
        split: train / val / test fractions of the raw steps; None = the card's
            split, else 0.7 / 0.1 / 0.2.
        batch_size, eval_batch_size (None = batch_size), num_workers.
        spatial_embedding: ``"learnable"`` (default, and what None means: the model learns a
            table, so that data without a graph trains; not the authors', whose embedding is a
            fixed node2vec of the graph: ``"node2vec"``, which ``gman train``'s demo and the
            shipped configs set), ``"node2vec"`` (computed from the graph, cached), or a path
            to a word2vec text file whose rows are in the graph's node order.
        node2vec_options: keyword options of
            :func:`gman.data.embedding.node2vec_embedding` (``dim``, ``p``, ``q``, ...).
        seed: seeds the training order (per epoch) and node2vec; None (default): the run's seed,
            i.e. ``seed_everything`` (Lightning's ``PL_GLOBAL_SEED``), or 0 where none was set, so that
            runs with different ``seed_everything`` values also see different batch orders.
        normalisation: ``"authors"`` (default, the authors' code): one mean and std over the
            training input windows with missing readings as 0, so a missing input enters the
            network as ``(0 - mean) / std``; ``"observed"`` (not in the authors' code): over the
            observed training readings only, a missing input entering as 0 (the mean).  See
            :class:`gman.data.windows.StandardScaler`.
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        values_path: str | None = None,
        format: str | None = None,
        graph_path: str | None = None,
        graph_format: str | None = None,
        graph_sensor_ids: str | list[str] | None = None,
        start_time: str | None = None,
        interval: str | None = None,
        missing_value: float | str | None = "auto",
        feature: int | str | None = None,
        name: str | None = None,
        units: str | None = None,
        options: dict[str, Any] | None = None,
        history_steps: int = 12,
        horizon_steps: int = 12,
        split: list[float] | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        spatial_embedding: str = "learnable",
        node2vec_options: dict[str, Any] | None = None,
        seed: int | None = None,
        normalisation: str = "authors",
    ):
        super().__init__()
        # from Python: paths and in-memory data (kept out of the hyperparameters, which checkpoints store)
        self._data_object: pd.DataFrame | SensorDataset | None = None
        if isinstance(dataset, os.PathLike):
            dataset = os.fspath(dataset)
        elif isinstance(dataset, (pd.DataFrame, SensorDataset)):
            self._data_object = dataset
            dataset = dataset.name if isinstance(dataset, SensorDataset) else "dataframe"
        elif not isinstance(dataset, str):
            raise ConfigError(f"data.dataset: expected a card name, 'synthetic', a file path, a pandas DataFrame or a "
                              f"SensorDataset, got {type(dataset).__name__}")
        if spatial_embedding is None:
            spatial_embedding = "learnable"
        elif isinstance(spatial_embedding, os.PathLike):
            spatial_embedding = os.fspath(spatial_embedding)
        for option, value, low in (("history_steps", history_steps, 1), ("horizon_steps", horizon_steps, 1),
                                   ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{option}: expected an integer >= {low}, got {value!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"data.seed: expected an integer >= 0 or null, got {seed!r}")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size < 1):
            raise ConfigError(f"data.eval_batch_size: expected an integer >= 1 or null, got {eval_batch_size!r}")
        if isinstance(missing_value, str) and missing_value != "auto":
            raise ConfigError(f"data.missing_value: expected a number, null or 'auto', got {missing_value!r}")
        if not isinstance(spatial_embedding, str) or (
            spatial_embedding not in SPATIAL_EMBEDDINGS and not _looks_like_path(spatial_embedding)
        ):
            raise ConfigError(
                f"data.spatial_embedding: expected 'learnable', 'node2vec' or a path to a word2vec file, "
                f"got {spatial_embedding!r}"
            )
        if normalisation not in NORMALISATIONS:
            raise ConfigError(f"data.normalisation: expected one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
        if node2vec_options:
            import inspect

            from gman.data.embedding import node2vec_embedding

            known = set(inspect.signature(node2vec_embedding).parameters) - {"adjacency"}
            unknown = sorted(set(node2vec_options) - known)
            if unknown:
                raise ConfigError(f"data.node2vec_options: unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if split is not None:
            chronological_split(100, split)  # validates (ConfigError) before any data is read
        self.save_hyperparameters(logger=False)
        self.history_steps = int(history_steps)
        self.horizon_steps = int(horizon_steps)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)

        # set by setup()
        self.dataset: SensorDataset | None = None  # type: ignore[assignment]
        self.scaler: StandardScaler | None = None
        self.num_nodes: int | None = None
        self.steps_per_day: int | None = None
        self.interval: pd.Timedelta | None = None  # type: ignore[assignment]
        self.sensor_ids: list[str] | None = None
        self.missing_value: float | None = None if missing_value == "auto" else missing_value  # type: ignore[assignment]
        self.spatial_embedding: torch.Tensor | None = None  # type: ignore[assignment]
        self.split_ranges: list[tuple[int, int]] | None = None
        self._given_scaler: StandardScaler | None = None
        self._model_layout: tuple[list[str], str | None] | None = None
        self.train_windows: WindowDataset | None = None
        self.val_windows: WindowDataset | None = None
        self.test_windows: WindowDataset | None = None

    @property
    def seed(self) -> int:
        """``data.seed``, or where it is None the run's seed (``PL_GLOBAL_SEED``, else 0)."""
        if self.hparams.seed is not None:
            return int(self.hparams.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    # ------------------------------------------------------------------ set-up
    def reader_options(self) -> dict[str, Any]:
        """The ``load_dataset`` keyword options this module's settings give (unset ones left out)."""
        from gman.data.readers import settings_reader_options

        return settings_reader_options(dict(self.hparams))

    def use_scaler(self, scaler: StandardScaler) -> None:
        """Normalise with ``scaler`` instead of fitting one in :meth:`setup` (call before it): a trained
        model is evaluated with the scaler it was trained with, whatever ``normalisation`` says."""
        if self.dataset is not None:
            raise RuntimeError("GMANDataModule.use_scaler: call it before setup()")
        self._given_scaler = scaler

    def use_trained(self, module) -> None:
        """Normalise and lay out the data as a trained ``GMANLightningModule`` expects (call before
        :meth:`setup`): its scaler (:meth:`use_scaler`) and, for a module loaded from a ``gman train``
        checkpoint, its sensor order and time zone (:meth:`use_model_layout`)."""
        scaler = module.trained_scaler()
        if scaler is not None:
            self.use_scaler(scaler)
        package = getattr(module, "checkpoint_package", None)
        if package is not None:
            self.use_model_layout(package["sensor_ids"], package.get("timezone"))

    def use_model_layout(self, sensor_ids: Sequence[str], timezone: str | None = None) -> None:
        """Lay the data out as a trained model expects (call before :meth:`setup`): its sensors in its
        order (other sensors dropped; one the data lacks is a :class:`DataError`), and tz-aware
        timestamps converted to its ``timezone``, so that the time-of-day features are the ones it was
        trained with.  ``gman evaluate`` calls it with the checkpoint's package metadata."""
        if self.dataset is not None:
            raise RuntimeError("GMANDataModule.use_model_layout: call it before setup()")
        self._model_layout = ([str(s) for s in sensor_ids], timezone)

    def _in_model_layout(self, dataset: SensorDataset) -> SensorDataset:
        if self._model_layout is None:
            return dataset
        sensor_ids, timezone = self._model_layout
        if list(dataset.sensor_ids) != sensor_ids:
            absent = [s for s in sensor_ids if s not in set(dataset.sensor_ids)]
            if absent:
                raise DataError(f"{self._source()}: {len(absent)} of the model's {len(sensor_ids)} sensors are not "
                                f"in the data (first: {absent[0]!r})")
            dataset = dataset.select(sensor_ids)
        if timezone is not None and dataset.index.tz is not None and str(dataset.index.tz) != timezone:
            dataset = dataclasses.replace(dataset, index=dataset.index.tz_convert(timezone))
        return dataset

    def load(self) -> SensorDataset:
        """Read the configured data set (no splitting or scaling)."""
        from gman.data.readers import load_dataset

        options = self.reader_options()
        if self._data_object is not None:
            return load_dataset(self._data_object, **options)
        if self.hparams.dataset == "synthetic" and "values_path" in options:
            # values_path alone names the series file (dataset keeps its default)
            return load_dataset(options.pop("values_path"), **options)
        return load_dataset(self.hparams.dataset, **options)

    def prepare_data(self) -> None:
        """Nothing to download: data sets are files or built in (``gman data fetch`` fetches cards)."""

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:  # idempotent: fit, then test, re-use the same windows
            return
        dataset = self._in_model_layout(self.load())
        fractions = self._split_fractions()
        ranges = chronological_split(dataset.num_steps, fractions)
        window = self.history_steps + self.horizon_steps
        short = [(part, stop - start) for part, (start, stop) in zip(SPLIT_NAMES, ranges) if stop - start < window]
        if short:
            parts = ", ".join(f"{part} {length}" for part, length in short)
            raise DataError(
                f"{self._source()}: {dataset.num_steps} steps split {list(fractions)} leave too few steps "
                f"({parts}) for history + horizon = {window} in every part; use a longer series or another split"
            )
        train_start, train_stop = ranges[0]
        where = f"{self._source()}: training split (steps {train_start}..{train_stop - 1})"
        train_values, train_mask = dataset.values[train_start:train_stop], dataset.mask[train_start:train_stop]
        if self._given_scaler is not None:
            scaler = self._given_scaler
        elif self.hparams.normalisation == "authors":
            scaler = StandardScaler.fit_authors(train_values, train_mask, self.history_steps, self.horizon_steps, where)
        else:
            scaler = StandardScaler.fit(train_values, train_mask, where)
        windows = [
            WindowDataset(dataset, self.history_steps, self.horizon_steps, scaler, start, stop, name=part)
            for part, (start, stop) in zip(SPLIT_NAMES, ranges)
        ]
        self.spatial_embedding = self._spatial_embedding(dataset)
        self.dataset = dataset
        self.scaler = scaler
        self.num_nodes = dataset.num_nodes
        self.steps_per_day = dataset.steps_per_day
        self.interval = dataset.interval
        self.sensor_ids = list(dataset.sensor_ids)
        self.missing_value = dataset.missing_value
        self.split_ranges = ranges
        self.train_windows, self.val_windows, self.test_windows = windows

    def _source(self) -> str:
        return str(self.hparams.values_path or self.hparams.dataset)

    def _split_fractions(self) -> tuple[float, ...]:
        if self.hparams.split is not None:
            return tuple(self.hparams.split)
        card_split = self._card_split()
        return tuple(card_split) if card_split is not None else DEFAULT_SPLIT

    def _card_split(self):
        """A dataset card's ``split`` (e.g. 60/20/20 for PEMS0X), or None."""
        from gman.data.readers import source_is_path

        name = self.hparams.dataset
        if self._data_object is not None:
            return None
        if self.hparams.values_path is not None and name == "synthetic":
            return None  # the series file of values_path, not the built-in network
        if name == "synthetic" or source_is_path(name):
            return None
        try:
            from gman.data.registry import card_reader_options
        except ModuleNotFoundError as err:
            if err.name != "gman.data.registry":
                raise
            return None
        return card_reader_options(name).get("split")

    def _spatial_embedding(self, dataset: SensorDataset) -> torch.Tensor | None:
        """[N, D] float32 in the data's sensor order, or None for a learnable table."""
        choice = self.hparams.spatial_embedding
        if choice == "learnable":
            return None
        if choice == "node2vec":
            if dataset.adjacency is None:
                raise ConfigError(
                    f"data.spatial_embedding: node2vec needs a graph, but {self._source()} has none (set graph_path)"
                )
            from gman.data.embedding import node2vec_embedding

            options = {"seed": self.seed, "progress": False, **(self.hparams.node2vec_options or {})}
            vectors = node2vec_embedding(dataset.adjacency, **options)  # already in the data's order
        else:
            from gman.data.embedding import read_word2vec

            graph_nodes = len(dataset.graph_node_ids) if dataset.graph_node_ids is not None else dataset.num_nodes
            vectors = read_word2vec(choice, num_nodes=graph_nodes)[dataset.graph_order()]
        return torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))

    # ------------------------------------------------------------- loaders
    def _loader(self, windows: WindowDataset | None, batch_size: int, train: bool) -> DataLoader:
        if windows is None:
            raise RuntimeError("GMANDataModule: call setup() before asking for a dataloader")
        sampler = self._train_sampler(len(windows)) if train else self._eval_sampler(windows)
        return DataLoader(
            windows,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def _train_sampler(self, num_samples: int):
        """The epoch-seeded order; under DDP this process's round-robin share of it.

        World size and rank come from the trainer (set up by the time Lightning asks
        for the loader), else from ``torch.distributed``; one process gets the plain
        ``EpochSeededRandomSampler``.
        """
        from gman.data.sampling import EpochSeededRandomSampler, ShardedEpochSampler

        world, rank = _world_and_rank(getattr(self, "trainer", None))
        if world == 1:
            return EpochSeededRandomSampler(num_samples, seed=self.seed)
        return ShardedEpochSampler(num_samples, num_replicas=world, rank=rank, seed=self.seed)

    def _eval_sampler(self, windows: WindowDataset):
        """None (time order) for one process; under DDP every W-th window, not padded.

        Lightning's default for validation and test is a ``DistributedSampler`` that pads the split to
        a multiple of W by repeating windows, which the summed metrics would count twice.  Lightning's
        ``UnrepeatedDistributedSampler`` (what it uses for prediction) leaves the shards one window
        apart instead; evaluation runs without gradients, so DDP syncs nothing per batch and uneven
        shards are safe.  A split with fewer windows than processes keeps Lightning's padding (every
        rank needs a batch).
        """
        world, rank = _world_and_rank(getattr(self, "trainer", None))
        if world == 1 or len(windows) < world:
            return None
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        return UnrepeatedDistributedSampler(windows, num_replicas=world, rank=rank, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Shuffled windows; the order of epoch e depends only on (seed, e).

        Under DDP each of the W processes gets every W-th window of that order
        (:class:`~gman.data.sampling.ShardedEpochSampler`), so W processes with
        ``batch_size`` b train on the batches of one process with batch W·b.
        """
        return self._loader(self.train_windows, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_windows, self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_windows, self.eval_batch_size, train=False)

    def predict_dataloader(self) -> DataLoader:
        """The test windows, in order."""
        return self._loader(self.test_windows, self.eval_batch_size, train=False)

    # ------------------------------------------------------------- time look-ups
    def window_times(self, start: int) -> pd.DatetimeIndex:
        """[P + Q] timestamps of the window starting at step ``start``: history, then future."""
        self._require_setup()
        start = int(start)
        stop = start + self.history_steps + self.horizon_steps
        if start < 0 or stop > self.dataset.num_steps:
            raise IndexError(f"window start {start} out of range for {self.dataset.num_steps} steps")
        return self.dataset.index[start:stop]

    def target_times(self, starts) -> np.ndarray:
        """[B, Q] datetime64[ns]: the forecast timestamps ``index[start + P + q]`` of each window start."""
        self._require_setup()
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        steps = starts[:, None] + self.history_steps + np.arange(self.horizon_steps)[None, :]
        if steps.size and (starts.min() < 0 or steps.max() >= self.dataset.num_steps):
            raise IndexError(f"window starts out of range for {self.dataset.num_steps} steps")
        return self.dataset.index.to_numpy()[steps]

    def _require_setup(self) -> None:
        if self.dataset is None:
            raise RuntimeError("GMANDataModule: call setup() first")

    def __str__(self) -> str:
        return self.__repr__()

    def __repr__(self) -> str:
        if self.dataset is None:
            return f"GMANDataModule(dataset={self.hparams.dataset!r}, not set up)"
        sizes = ", ".join(f"{w.name} {len(w)}" for w in (self.train_windows, self.val_windows, self.test_windows))
        return (
            f"GMANDataModule({self.dataset.name}: T={self.dataset.num_steps}, N={self.num_nodes}, "
            f"P={self.history_steps}, Q={self.horizon_steps}, windows: {sizes}, {self.scaler})"
        )


def _world_and_rank(trainer) -> tuple[int, int]:
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or bool(Path(text).suffix) or Path(text).exists()
