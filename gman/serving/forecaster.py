"""`Forecaster`: a trained GMAN that answers "what will each sensor read in the next Q steps?".

    >>> from gman import Forecaster
    >>> forecaster = Forecaster.load("runs/package")         # or a .ckpt, runs:/<id>/model, models:/<name>/<v>
    >>> forecast = forecaster.predict(history)               # history: DatetimeIndex x sensor-id columns
    >>> Forecaster.to_wide(forecast)                         # target_time x sensor_id

``history`` holds at least the last P steps at the model's interval. Missing
readings are NaN (or None: a column of None alone, or of numbers and None, as
JSON nulls make it) or the package's missing value. The forecast is tidy: one
row per (sensor, future step)::

    sensor_id      str        one of forecaster.sensor_ids
    issued_at      Timestamp  last observed timestamp of the history
    target_time    Timestamp  issued_at + step * interval
    step           int        1..Q
    minutes_ahead  float      step * interval in minutes
    prediction     float      forecast reading, in the data's units

Preparing the model input repeats the data pipeline exactly (``WindowDataset``):

    x    = (v - mean) / std at observed readings, the scaler's missing input at missing ones   [B, P, N]
    time = (day_of_week, time_of_day) of the P history + Q future timestamps      [B, P+Q, 2]
    prediction = GMAN(x, time) * std + mean                                      [B, Q, N]

Loading needs torch, numpy and pandas only: no Lightning, PyG, or (except for
MLflow URIs) MLflow is imported, and no pickled code runs.

Backends. A package may also carry ``model.onnx`` (``gman export --format onnx
--into-package``): the same computation as one ONNX graph. With the default
``backend="auto"`` (or the ``GMAN_BACKEND`` environment variable) a Forecaster
runs that graph with ONNX Runtime when ``onnxruntime`` is importable — then
torch is not even imported (it is, lazily, if ``forecaster.model`` is asked
for) — and otherwise the PyTorch network. ``backend="torch"`` forces PyTorch,
``backend="onnx"`` requires ONNX Runtime. The PyTorch backend predicts with an
inference copy of the network whose batch-norm layers are folded into the
preceding linear maps (:func:`gman.serving.inference.fold_batch_norm`; equal up
to float rounding). ``threads`` sets ONNX Runtime's intra-op threads (default
1, or ``GMAN_THREADS``); for PyTorch it calls ``torch.set_num_threads`` (a
process-wide setting) only when given.

Time zones. A model trained on tz-aware timestamps records their zone
(:attr:`Forecaster.timezone`); a tz-aware history is converted to it before the
time of day is read, so the same instants give the same forecast whatever zone
they are written in. Naive histories are read as wall-clock time in that zone.
A model trained on naive timestamps reads the wall clock of a tz-aware history.
An index of timestamps whose UTC offsets differ (what pandas keeps of ISO strings
across a daylight-saving change: an object Index of Timestamps; see
:func:`history_index`) is read as instants, each at its own offset's wall clock
for a model without a zone (the future steps at the last one's offset). The
forecast's timestamps stay in the history's own zone (the last offset there).

Devices. ``device="cuda"`` (or ``GMAN_DEVICE``, or :meth:`Forecaster.to` later)
runs the PyTorch network on that torch device; the histories are prepared on
the CPU and only the ``[B, P, N]`` inputs and ``[B, Q, N]`` forecasts cross
over. A device other than the CPU implies ``backend="torch"``.
"""
from __future__ import annotations

import datetime
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import pandas as pd

from gman.data.dataset import checked_time_features, time_features
from gman.data.graph import repeated
from gman.errors import DataError, ForecastInputError
from gman.serving import package as pkg

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from gman.model import GMAN
    from gman.serving.scaled import ScaledGMAN

History = Union[pd.DataFrame, Sequence[pd.DataFrame], Mapping[Any, pd.DataFrame]]

# "runs:/...", "models:/...", "s3://...", "mlflow-artifacts:/..." — a URI scheme, not a Windows drive letter.
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
TIDY_COLUMNS = ["sensor_id", "issued_at", "target_time", "step", "minutes_ahead", "prediction"]
BACKENDS = ("auto", "torch", "onnx")


def __getattr__(name: str):
    if name == "ScaledGMAN":  # moved to gman.serving.scaled (it needs torch at import)
        from gman.serving.scaled import ScaledGMAN

        return ScaledGMAN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Forecaster:
    """A GMAN network plus everything needed to turn a raw history into forecasts.

    Build one with :meth:`load` (or :meth:`from_package`); the constructor takes
    the network and the package metadata (``gman.json`` content), e.g.
    ``Forecaster(net, package_metadata(net, ...))`` for a network in memory.

    The constructor snapshots ``model``: it predicts with a copy (in eval mode) of the
    weights ``model`` has then, and leaves ``model`` itself alone (its train/eval mode,
    its device). Later changes to ``model``'s weights do not reach the Forecaster:
    build a new one to serve them. ``copy=False`` hands ``model`` over instead (no
    copy: the Forecaster puts it in eval mode and :meth:`to` moves it), for a network
    nothing else holds.
    """

    def __init__(self, model: "GMAN | None", metadata: dict[str, Any], *, session: Any = None,
                 package_path: str | os.PathLike | None = None, copy: bool = True):
        pkg.check_metadata(metadata, "metadata")
        if model is None and (session is None or package_path is None):
            raise ValueError("Forecaster: needs a model, or an ONNX Runtime session and the package path")
        if not isinstance(copy, bool):
            raise ValueError(f"Forecaster: copy must be true or false, got {copy!r}")
        if model is not None and copy:
            model = deepcopy(model)
        self._model = None if model is None else model.eval()
        self._net: Any = None  # the inference copy of the model (batch-norm folded), built on first use
        self._session = session
        self._package_path = None if package_path is None else Path(package_path)
        self.metadata = metadata
        self._sensor_ids = [str(s) for s in metadata["sensor_ids"]]
        self._sensor_array = np.array(self._sensor_ids, dtype=object)
        self._interval = pd.Timedelta(seconds=int(metadata["interval_seconds"]))
        self._mean = float(metadata["scaler"]["mean"])
        self._std = float(metadata["scaler"]["std"])
        self._missing_input = float(metadata["scaler"].get("missing_input", 0.0))
        missing = metadata.get("missing_value")
        self._missing_value = None if missing is None else float(missing)
        self._timezone: str | None = metadata.get("timezone")
        self._columns_cache: tuple[tuple, np.ndarray, list[str]] | None = None
        self._tidy_constant: dict[str, Any] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, source: str | os.PathLike, *, backend: str | None = None, threads: int | None = None,
             device: str | None = None) -> "Forecaster":
        """Load from a package folder, a Lightning checkpoint file, an MLflow model folder, or an MLflow URI.

        ``backend``: "auto" (default, or ``GMAN_BACKEND``), "torch" or "onnx" (see the module docstring);
        ``threads``: intra-op threads of the backend; ``device``: torch device of the network
        ("cpu" by default, or ``GMAN_DEVICE``; "cuda", "cuda:1", ... imply the torch backend).
        """
        _backend(backend), _threads(threads)  # bad arguments or GMAN_* variables: refused before any work
        name = "device"
        if device is None and os.environ.get("GMAN_DEVICE"):
            device, name = os.environ["GMAN_DEVICE"], "GMAN_DEVICE"
        if device is not None and str(device) != "cpu":
            if _backend(backend) == "onnx":
                raise DataError(f"{name}: {device!r} needs backend 'torch' (ONNX Runtime runs here on the CPU)")
            backend = "torch"
        forecaster = cls._load(source, backend=backend, threads=threads)
        return forecaster if device is None else forecaster._to(device, name)

    @classmethod
    def _load(cls, source: str | os.PathLike, *, backend: str | None, threads: int | None) -> "Forecaster":
        text = os.fspath(source)
        options = dict(backend=backend, threads=threads)
        if _URI_SCHEME.match(text) and not Path(text).exists():
            return cls.from_mlflow(text, **options)
        path = Path(text)
        if path.is_dir():
            if pkg.is_package(path):
                return cls.from_package(path, **options)
            found = _find_package(path)
            if found is not None:  # an MLflow model folder (MLmodel + artifacts/package)
                return cls.from_package(found, **options)
            raise DataError(f"{path}: neither a gman model package (gman.json) nor an MLflow model holding one")
        if path.is_file():
            if _backend(backend) == "onnx":
                raise DataError(f"{path}: a checkpoint has no ONNX graph; load a package with model.onnx for backend 'onnx'")
            _set_torch_threads(threads)
            return cls.from_checkpoint(path)
        raise DataError(f"model source {text!r}: no such file or folder, and not an MLflow URI")

    def to(self, device: "str | torch.device") -> "Forecaster":
        """Run the PyTorch network on ``device`` from now on (returns ``self``, like ``nn.Module.to``)."""
        return self._to(device, "device")

    def _to(self, device: "str | torch.device", name: str) -> "Forecaster":
        """:meth:`to`; errors name ``name`` (the argument, or the GMAN_DEVICE variable it came from)."""
        torch = _import_torch()
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise DataError(f"{name}: {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
        if target.type != "cpu" and self._session is not None:
            raise DataError(f"{name}: {device!r} needs backend 'torch' (ONNX Runtime runs here on the CPU); "
                            "load with backend='torch'")
        if target.type == "cuda" and not torch.cuda.is_available():
            raise DataError(f"{name}: {device!r}, but CUDA is not available to this torch ({torch.__version__})")
        if self._session is None:
            try:
                self._model = self.model.to(target)
            except (RuntimeError, AssertionError) as err:  # an index past the device count, a backend not built
                raise DataError(f"{name}: cannot use {device!r} ({' '.join(str(err).split())[:200]})") from None
            self._net = None if self._net is None else self._net.to(target)
        return self

    @property
    def device(self) -> "torch.device | str":
        """Where the network runs: a torch device, or "cpu" for the ONNX Runtime backend."""
        if self._session is not None:
            return "cpu"
        return next(self.model.parameters()).device

    @classmethod
    def from_package(cls, path: str | os.PathLike, *, backend: str | None = None, threads: int | None = None) -> "Forecaster":
        """Load the package folder written by :func:`gman.serving.package.save_package`."""
        metadata = pkg.read_metadata(path)
        choice = _backend(backend)
        if choice != "torch":
            onnx_file = pkg.onnx_file(path, metadata)
            if onnx_file is None and choice == "onnx":
                raise DataError(f"{path}: the package holds no ONNX graph (add one: gman export --format onnx --into-package)")
            runtime = _onnxruntime() if onnx_file is not None else None
            if runtime is None and choice == "onnx":
                raise DataError("backend 'onnx' needs onnxruntime: pip install 'gman[onnx]'")
            if runtime is not None and onnx_file is not None:
                return cls(None, metadata, session=_ort_session(runtime, onnx_file, threads), package_path=path)
        _set_torch_threads(threads)
        _import_torch()
        state = pkg.load_state_dict(path, metadata)
        return cls(pkg.build_model(metadata, state, str(path)), metadata, copy=False)  # a network of its own

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "Forecaster":
        """Load a Lightning checkpoint of ``GMANLightningModule`` without importing Lightning.

        The file is read with ``torch.load(weights_only=True)`` (plain containers
        and tensors only); the network's weights are the ``state_dict`` entries
        under ``net.`` (or ``model.``). The package metadata comes from, in order:

        1. ``checkpoint["gman_package"]`` (what :func:`gman.serving.package.package_metadata` returns);
        2. ``hyper_parameters`` (GMAN arguments, scaler, interval) plus the sensor
           ids, missing value and names of the package that ``gman train`` wrote
           beside the checkpoint folder (``<run>/model/gman.json`` for
           ``<run>/checkpoints/<name>.ckpt``): the checkpoint holds no sensor ids.
        """
        import pickle

        torch = _import_torch()
        path = Path(path)
        not_a_model = f"{path}: not a gman model (package folder, Lightning checkpoint or MLflow model)"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's note on the pickle protocol of files it then refuses
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for non-weights content, RuntimeError/KeyError... for other files
            if path.name == pkg.METADATA_FILE:
                raise DataError(f"{path}: the metadata file of a gman package; give its folder, {path.parent}") from None
            exported = _EXPORTED_FILES.get(path.suffix.lower())
            if exported is not None:
                raise DataError(f"{not_a_model}: {exported}; give the package folder it was exported from") from None
            # torch reads any file that is no zip archive as a legacy pickle, and says "weights only" of
            # text or an ONNX graph too: only a real pickle or checkpoint holds refused Python objects
            refused = isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower()
            why = ("it holds Python objects beyond tensors and plain containers, which a weights-only load refuses"
                   if refused and _is_pickle_or_zip(path) else "torch cannot read it as a checkpoint")
            raise DataError(f"{not_a_model}: {why}") from None
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise DataError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
        state = {}
        for prefix in ("net.", "model."):
            state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
            if state:
                break
        if not state:
            raise DataError(f"{path}: no network weights (keys 'net.*' or 'model.*') in state_dict")
        metadata = checkpoint.get("gman_package")
        if metadata is None:
            metadata = _metadata_from_hparams(path, checkpoint.get("hyper_parameters") or {})
        pkg.check_metadata(metadata, str(path))
        return cls(pkg.build_model(metadata, state, str(path)), metadata, copy=False)  # a network of its own

    @classmethod
    def from_mlflow(cls, uri: str, *, backend: str | None = None, threads: int | None = None) -> "Forecaster":
        """Download an MLflow model (``runs:/<id>/model``, ``models:/<name>/<version>``...) and load its package."""
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        except (MlflowException, OSError) as err:
            detail = " ".join(str(err).split())[:300]
            raise DataError(f"model source {uri!r}: cannot download from MLflow ({detail})") from None
        found = _find_package(Path(local))
        if found is None:
            raise DataError(f"model source {uri!r}: the MLflow model holds no gman package (gman.json)")
        return cls.from_package(found, backend=backend, threads=threads)

    # --------------------------------------------------------------- properties
    @property
    def model(self) -> "GMAN":
        """The PyTorch network (eval mode); with the ONNX backend it is read from the package on first use.

        :meth:`predict` runs a batch-norm-folded copy of it made at the first prediction, so change
        the weights by building a new Forecaster, not by changing this module.
        """
        if self._model is None:
            assert self._package_path is not None
            _import_torch()
            state = pkg.load_state_dict(self._package_path, self.metadata)
            self._model = pkg.build_model(self.metadata, state, str(self._package_path))
        return self._model

    @property
    def backend(self) -> str:
        """What :meth:`predict` runs: "onnxruntime" or "torch"."""
        return "onnxruntime" if self._session is not None else "torch"

    @property
    def sensor_ids(self) -> list[str]:
        """The N sensor ids, in the model's column order."""
        return list(self._sensor_ids)

    @property
    def interval(self) -> pd.Timedelta:
        """Time between consecutive steps (history and forecast)."""
        return self._interval

    @property
    def history_steps(self) -> int:
        """P: the number of most recent steps the model reads."""
        return int(self.metadata["history_steps"])

    @property
    def horizon_steps(self) -> int:
        """Q: the number of future steps forecast."""
        return int(self.metadata["horizon_steps"])

    @property
    def steps_per_day(self) -> int:
        return int(self.metadata["steps_per_day"])

    @property
    def missing_value(self) -> float | None:
        """The reading that means 'no data' (besides NaN), or None."""
        return self._missing_value

    @property
    def timezone(self) -> str | None:
        """Zone of the training data's timestamps (None: they were naive), where the model reads the time of day."""
        return self._timezone

    def time_features(self, index: pd.DatetimeIndex) -> np.ndarray:
        """[T, 2] (day of week, time-of-day step) of ``index`` as the model learned them.

        A tz-aware ``index`` is converted to the model's :attr:`timezone` first; naive
        timestamps are taken to be wall-clock times there (or wherever the naive training
        data was recorded).
        """
        if self._timezone is not None and index.tz is not None:
            index = index.tz_convert(self._timezone)
        return time_features(index, self._interval)

    @property
    def units(self) -> str:
        return str(self.metadata.get("units", ""))

    def __repr__(self) -> str:
        return (
            f"Forecaster(dataset={self.metadata.get('dataset_name')!r}, N={len(self._sensor_ids)}, "
            f"P={self.history_steps}, Q={self.horizon_steps}, interval={self.interval}, backend={self.backend!r})"
        )

    # --------------------------------------------------------------- prediction
    def predict(self, history: History, *, layout: str = "tidy", where: str = "history") -> pd.DataFrame:
        """Forecast the next Q steps after the last timestamp of ``history``.

        ``history`` is one DataFrame (DatetimeIndex x sensor-id columns), or a
        list / dict of them, predicted as one batch. With several histories the
        result gains a leading ``history`` column (list position or dict key).
        ``layout="wide"`` returns target_time x sensor_id instead (rows indexed
        by (history, target_time) for several histories). Errors and warnings name the
        history ``where`` (``where[key]`` for one of several), e.g. the file it came from.
        """
        if layout not in ("tidy", "wide"):
            raise ForecastInputError(f"layout: {layout!r} is not 'tidy' or 'wide'")
        if isinstance(history, pd.DataFrame):
            keys, frames, single = [None], [history], True
        elif isinstance(history, Mapping):
            keys, frames, single = list(history.keys()), list(history.values()), False
        elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
            keys, frames, single = list(range(len(history))), list(history), False
        else:
            raise ForecastInputError(
                f"{where}: expected a DataFrame or a list/dict of DataFrames, got {type(history).__name__}"
            )
        if not frames:
            raise ForecastInputError(f"{where}: empty list/dict of histories")

        prepared = [self._prepare(frame, where if single else f"{where}[{key!r}]") for key, frame in zip(keys, frames)]
        values = np.stack([p[0] for p in prepared])
        mask = np.stack([p[1] for p in prepared])
        windows = [self.window_index(p[2]) for p in prepared]  # [P+Q] timestamps each
        time = np.stack([self._window_time_features(w, p[3]) for w, p in zip(windows, prepared)])
        predictions = self.predict_arrays(values, mask, time)  # [B, Q, N]

        p = self.history_steps
        frames_out = [self._tidy(pred, w[p:]) for pred, w in zip(predictions, windows)]
        if single:
            forecast = frames_out[0]
        else:
            for key, frame in zip(keys, frames_out):
                frame.insert(0, "history", [key] * len(frame))
            forecast = pd.concat(frames_out, ignore_index=True)
        return self.to_wide(forecast) if layout == "wide" else forecast

    def prepare(self, history: pd.DataFrame, where: str = "history") -> tuple[np.ndarray, np.ndarray, pd.DatetimeIndex]:
        """Validate ``history`` and return its last P steps: values [P, N] float32 (data units), mask [P, N], index [P].

        Raises :class:`ForecastInputError` (one line) for a history the model cannot use.
        """
        values, mask, index, _ = self._prepare(history, where)
        return values, mask, index

    def _prepare(self, history: pd.DataFrame, where: str) -> tuple[np.ndarray, np.ndarray, pd.DatetimeIndex, np.ndarray | None]:
        """:meth:`prepare`, plus the UTC offsets (seconds) of the last P timestamps where the history's
        index holds timestamps with different offsets (None otherwise)."""
        p = self.history_steps
        if not isinstance(history, pd.DataFrame):
            raise ForecastInputError(f"{where}: expected a pandas DataFrame, got {type(history).__name__}")
        index, offsets = _instants(history.index, where)
        if not isinstance(index, pd.DatetimeIndex):
            raise ForecastInputError(
                f"{where}: index must be a DatetimeIndex of timestamps, got {type(index).__name__} "
                "(use DataFrame.set_index on the timestamp column)"
            )
        if len(index) < p:
            raise ForecastInputError(f"{where}: {len(index)} time steps, the model needs at least P={p}")
        if index.hasnans:
            raise ForecastInputError(f"{where}: index contains missing timestamps (NaT)")
        self._check_timestamps(index, where)

        positions, extra = self._column_positions(history.columns, where)
        if extra:
            warnings.warn(f"{where}: ignoring {len(extra)} columns that are not model sensors, e.g. {extra[:5]}", stacklevel=3)
        dtypes = history.dtypes.to_numpy()
        if all(_is_number_dtype(d) for d in set(dtypes)):  # the usual case: read every column at once
            values = history.iloc[-p:].to_numpy(dtype=np.float32, na_value=np.nan)[:, positions]
        else:
            values = np.empty((p, len(positions)), dtype=np.float32)
            for j, column in enumerate(positions):
                values[:, j] = _readings(history.iloc[:, column], p, where)
        if np.isinf(values).any():
            step, sensor = np.argwhere(np.isinf(values))[0]
            raise ForecastInputError(
                f"{where}: infinite value at {index[-p:][step]} for sensor {self._sensor_ids[sensor]!r}"
            )
        mask = ~np.isnan(values)
        if self._missing_value is not None:
            mask &= values != self._missing_value
        silent = ~mask.any(axis=0)
        if silent.any():
            # allowed (training also feeds windows with gaps), but worth saying: such a sensor's
            # forecast rests on the time of day and its neighbours' readings alone
            ids = [self._sensor_ids[i] for i in np.flatnonzero(silent)]
            warnings.warn(
                f"{where}: {len(ids)} of {len(self._sensor_ids)} sensors have no observed reading in the last "
                f"P={p} steps, e.g. {ids[:5]}; they are fed as {self._missing_input_meaning()}",
                stacklevel=3,
            )
        return values, mask, index[-p:], None if offsets is None else offsets[-p:]

    def _missing_input_meaning(self) -> str:
        """What the model sees at a missing reading, in the data's units: the training mean where the
        scaler's missing input is 0, else the reading that normalises to it (0 for the authors' scaler)."""
        reading = round(self._mean + self._missing_input * self._std, 6) + 0.0  # + 0.0: no "-0"
        units = f" {self.units}" if self.units else ""
        if self._missing_input == 0.0:
            return f"the training mean ({reading:.4g}{units})"
        return f"the scaler's missing input, i.e. a reading of {reading:.4g}{units}"

    def _column_positions(self, columns: pd.Index, where: str) -> tuple[np.ndarray, list[str]]:
        """Positions of the model's sensors among ``columns`` and the extra column names (last answer cached)."""
        key = tuple(columns)
        cached = self._columns_cache
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        names = [str(c) for c in key]
        position = {name: i for i, name in enumerate(names)}
        if len(position) != len(names):
            dupes = repeated(names)
            raise ForecastInputError(f"{where}: duplicate sensor columns {dupes[:5]}")
        absent = [s for s in self._sensor_ids if s not in position]
        if absent:
            raise ForecastInputError(
                f"{where}: {len(absent)} of the model's {len(self._sensor_ids)} sensors missing from the columns, "
                f"e.g. {absent[:5]}"
            )
        known = set(self._sensor_ids)
        extra = [c for c in names if c not in known]
        positions = np.array([position[s] for s in self._sensor_ids], dtype=np.int64)
        self._columns_cache = (key, positions, extra)
        return positions, extra

    def _check_timestamps(self, index: pd.DatetimeIndex, where: str) -> None:
        """Sorted, unique timestamps throughout; the model's interval over the last P steps, the
        ones it reads (an older gap in a longer history is no obstacle)."""
        step = self._interval // pd.Timedelta(1, unit=index.unit)  # the interval in the index's integer unit
        diffs = np.diff(index.asi8)
        recent = diffs[len(diffs) - (self.history_steps - 1):] if self.history_steps > 1 else diffs[:0]
        if (diffs > 0).all() and (recent == step).all():
            return
        if (diffs <= 0).any():
            at = int(np.argmax(diffs <= 0)) + 1
            what = "duplicate timestamp" if index[at] == index[at - 1] else "timestamps not sorted:"
            raise ForecastInputError(f"{where}: {what} {index[at]} after {index[at - 1]}")
        last = index[-self.history_steps:]
        steps = last[1:] - last[:-1]
        if (steps == steps[0]).all():
            raise ForecastInputError(
                f"{where}: interval is {steps[0]}, the model expects {self._interval} (resample the history)"
            )
        at = int(np.argmax(steps != self._interval)) + 1
        raise ForecastInputError(
            f"{where}: irregular timestamps in the last P={self.history_steps} steps: {last[at] - last[at - 1]} "
            f"between {last[at - 1]} and {last[at]} (model interval {self._interval}; insert missing steps as NaN)"
        )

    def _window_time_features(self, window: pd.DatetimeIndex, offsets: np.ndarray | None) -> np.ndarray:
        """:meth:`time_features` of a P+Q window; with the UTC offsets of the P history timestamps (a history
        whose offsets differ), a model without a zone reads each at its own wall clock, as it reads a
        tz-aware index in its zone, and the future steps at the last one's offset."""
        if offsets is None or self._timezone is not None:
            return self.time_features(window)
        clock = np.concatenate([offsets, np.repeat(offsets[-1:], len(window) - len(offsets))])
        wall = window.tz_convert(None) + pd.to_timedelta(clock, unit="s")
        return time_features(wall, self._interval)

    def future_index(self, issued_at: pd.Timestamp) -> pd.DatetimeIndex:
        """The Q target timestamps after ``issued_at``: issued_at + k * interval, k = 1..Q."""
        return self.window_index(pd.DatetimeIndex([issued_at]))[-self.horizon_steps :]

    def window_index(self, history_index: pd.DatetimeIndex) -> pd.DatetimeIndex:
        """The P+Q timestamps of a forecast window: the history's, then issued_at + k * interval, k = 1..Q."""
        last = history_index[-1:]
        offsets = np.arange(-(len(history_index) - 1), self.horizon_steps + 1) * self._interval.to_timedelta64()
        # Arithmetic on the (naive or UTC) instants, as history timestamps themselves are spaced.
        return pd.DatetimeIndex(last.repeat(len(offsets)) + pd.TimedeltaIndex(offsets))

    def normalise(self, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """x = (v - mean) / std where observed, the scaler's missing input elsewhere (float32) — as
        ``WindowDataset`` does."""
        return np.where(mask, (values - self._mean) / self._std, self._missing_input).astype(np.float32)

    def predict_arrays(self, values: np.ndarray, mask: np.ndarray, time: np.ndarray,
                       batch_size: int | None = None) -> np.ndarray:
        """Forecasts [B, Q, N] float32 in data units from values/mask [B, P, N] and time [B, P+Q, 2].

        ``time`` holds integer (day_of_week 0..6, time_of_day_index 0..steps_per_day−1) pairs, as
        :meth:`time_features` gives them; other arrays are refused with a :class:`ForecastInputError`.

        Runs ``batch_size`` windows per forward pass (default :attr:`batch_size`): on the CPU a larger batch falls out
        of cache (N = 207, L = 3, 2 cores, per window: 64.5 ms at B = 1, 52.6 at 8, 53.5 at 16,
        72.9 at 64; 200 histories in one pass took 82 ms each and 1.5 GB).
        """
        values = np.asarray(values, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        time = np.ascontiguousarray(checked_time_features(time, self.steps_per_day, "time", ForecastInputError))
        p, q, n = self.history_steps, self.horizon_steps, len(self._sensor_ids)
        if values.ndim != 3 or values.shape[1:] != (p, n):
            raise ForecastInputError(f"values: expected shape [B, {p}, {n}] (B, P, N), got {list(values.shape)}")
        if mask.shape != values.shape:
            raise ForecastInputError(f"mask: expected the shape of values, {list(values.shape)}, got {list(mask.shape)}")
        if time.shape != (len(values), p + q, 2):
            raise ForecastInputError(f"time: expected shape [{len(values)}, {p + q}, 2] (B, P+Q, 2), got {list(time.shape)}")
        step = batch_size or self.batch_size
        if len(values) <= step:
            return self._predict_batch(values, mask, time)
        return np.concatenate([self._predict_batch(values[lo:lo + step], mask[lo:lo + step], time[lo:lo + step])
                               for lo in range(0, len(values), step)])

    def _predict_batch(self, values: np.ndarray, mask: np.ndarray, time: np.ndarray) -> np.ndarray:
        """:meth:`predict_arrays` of checked arrays in one forward pass."""
        if self._session is not None:  # the graph reads raw values: NaN = missing
            raw = np.where(mask, values, np.float32(np.nan)).astype(np.float32, copy=False)
            (out,) = self._session.run(None, {"values": raw, "time": time})
            return out
        torch = _import_torch()
        if self._net is None:
            from gman.serving.inference import fold_batch_norm

            self._net = fold_batch_norm(self.model)
        where = next(self._net.parameters()).device
        x = torch.from_numpy(self.normalise(values, mask)).to(where)
        with torch.inference_mode():
            out = self._net(x, torch.from_numpy(time).to(where)).cpu()
        return (out.numpy() * self._std + self._mean).astype(np.float32)

    @property
    def batch_size(self) -> int:
        """Windows per forward pass in :meth:`predict_arrays`: 16 on the CPU, 256 on a GPU."""
        return 16 if str(self.device) == "cpu" else 256

    def predict_normalised(self, x: "torch.Tensor", time: "torch.Tensor") -> "torch.Tensor":
        """The network alone: normalised x [B, P, N], time [B, P+Q, 2] -> normalised forecast [B, Q, N]."""
        import torch

        model = self.model
        where = next(model.parameters()).device
        with torch.inference_mode():
            return model(x.to(where), time.to(where)).to(x.device)

    def as_module(self, *, fold: bool = False) -> "ScaledGMAN":
        """The numeric part of :meth:`predict` as one torch module (raw readings in, data units out), for export.

        ``fold=True`` wraps the inference copy (batch-norm folded) instead of the network itself.
        """
        from gman.serving.scaled import ScaledGMAN

        model = self.model
        if fold:
            from gman.serving.inference import fold_batch_norm

            model = fold_batch_norm(model)
        return ScaledGMAN(model, self._mean, self._std, self._missing_value, self._missing_input).eval()

    def _tidy(self, prediction: np.ndarray, future: pd.DatetimeIndex) -> pd.DataFrame:
        """[Q, N] forecast at the Q ``future`` timestamps -> Q*N tidy rows, step-major, sensors in model order."""
        q, n = prediction.shape
        if self._tidy_constant is None or len(self._tidy_constant["step"]) != q * n:
            steps = np.repeat(np.arange(1, q + 1, dtype=np.int64), n)
            self._tidy_constant = {  # the columns that do not depend on the forecast, built once
                "sensor_id": pd.array(np.tile(self._sensor_array, q), dtype="str"),
                "step": steps,
                "minutes_ahead": steps * (self._interval.total_seconds() / 60.0),
            }
        constant = self._tidy_constant
        return pd.DataFrame(
            {
                "sensor_id": constant["sensor_id"],
                "issued_at": future[:1].repeat(q * n) - self._interval,  # = the history's last timestamp
                "target_time": future.repeat(n),
                "step": constant["step"],
                "minutes_ahead": constant["minutes_ahead"],
                "prediction": prediction.reshape(-1).astype(np.float64),
            }
        )

    @staticmethod
    def to_wide(forecast: pd.DataFrame) -> pd.DataFrame:
        """Tidy forecast -> target_time x sensor_id (rows (history, target_time) when several histories)."""
        rows = ["history", "target_time"] if "history" in forecast.columns else "target_time"
        wide = forecast.pivot(index=rows, columns="sensor_id", values="prediction")
        order = list(dict.fromkeys(forecast["sensor_id"]))  # keep the model's sensor order, not sorted ids
        wide = wide[order]
        wide.columns.name = "sensor_id"
        return wide


def _metadata_from_hparams(path: Path, hparams: dict[str, Any]) -> dict[str, Any]:
    """Package metadata for a training checkpoint: sizes/scaler from hparams, sensor ids from the run's package."""
    import inspect

    from gman.model import GMAN

    needed = ("num_nodes", "steps_per_day", "history_steps", "horizon_steps", "scaler_mean", "scaler_std", "interval_minutes")
    absent = [key for key in needed if hparams.get(key) is None]
    if absent:
        raise DataError(f"{path}: checkpoint hyper_parameters lack {absent} (and there is no 'gman_package' entry)")
    sibling = path.parent.parent / "model"
    if not pkg.is_package(sibling):
        raise DataError(
            f"{path}: checkpoint holds no sensor ids and no gman package was found at {sibling}; "
            "load the package folder that gman train wrote"
        )
    names = pkg.read_metadata(sibling)
    gman_args = set(inspect.signature(GMAN).parameters)
    config = {k: v for k, v in hparams.items() if k in gman_args}
    if len(names["sensor_ids"]) != config["num_nodes"]:
        raise DataError(f"{path}: {config['num_nodes']} sensors in the checkpoint but {len(names['sensor_ids'])} in {sibling}")
    interval_seconds = int(round(float(hparams["interval_minutes"]) * 60))
    return {
        **names,
        "model": {"class": "gman.model.GMAN", "config": config},
        "scaler": {"mean": float(hparams["scaler_mean"]), "std": float(hparams["scaler_std"]),
                   "missing_input": float(hparams.get("scaler_missing_input") or 0.0)},
        "interval_seconds": interval_seconds,
        "steps_per_day": int(hparams["steps_per_day"]),
        "history_steps": int(hparams["history_steps"]),
        "horizon_steps": int(hparams["horizon_steps"]),
        "weights": None,
    }


def _is_number_dtype(dtype) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


# what pandas.api.types.infer_dtype calls an object column of numbers (and missing values) only
_NUMBER_KINDS = frozenset({"empty", "integer", "floating", "mixed-integer-float", "decimal"})


def _readings(column: pd.Series, p: int, where: str) -> np.ndarray:
    """The last ``p`` values of a sensor column as float32 readings, NaN where missing.

    A column of nothing but missing values, or of numbers and missing values in an ``object``
    column, holds readings: that is what JSON ``null`` makes of a sensor without readings (all
    None) and what ``None`` among numbers makes of a column. Text, booleans and dates do not.
    """
    if _is_number_dtype(column.dtype):
        return column.iloc[-p:].to_numpy(dtype=np.float32, na_value=np.nan)
    if column.isna().all():
        return np.full(p, np.nan, dtype=np.float32)
    if column.dtype == object and pd.api.types.infer_dtype(column, skipna=True) in _NUMBER_KINDS:
        try:
            return pd.to_numeric(column.iloc[-p:], errors="raise").to_numpy(dtype=np.float32, na_value=np.nan)
        except (TypeError, ValueError, OverflowError):
            pass  # e.g. an integer too large for any number type: refused below
    raise ForecastInputError(f"{where}: column {str(column.name)!r} is not numeric (dtype {column.dtype})")


def _instants(index: pd.Index, where: str) -> tuple[pd.Index, np.ndarray | None]:
    """A history's index, and None; or, for an index of tz-aware timestamps whose UTC offsets differ (what
    pandas keeps of ISO strings across a daylight-saving change: an object Index), the same instants in
    the last one's offset and each one's offset in seconds. Any other index is returned as it is."""
    if isinstance(index, pd.DatetimeIndex) or index.dtype != object or len(index) == 0:
        return index, None
    if not all(t is pd.NaT or (isinstance(t, datetime.datetime) and t.tzinfo is not None) for t in index):
        return index, None  # refused by the caller: not a DatetimeIndex
    if any(t is pd.NaT for t in index):
        raise ForecastInputError(f"{where}: index contains missing timestamps (NaT)")
    offsets = np.array([t.utcoffset().total_seconds() for t in index], dtype=np.int64)
    last = datetime.timezone(datetime.timedelta(seconds=int(offsets[-1])))
    instants = pd.DatetimeIndex(pd.to_datetime(list(index), utc=True), name=index.name).tz_convert(last)
    return instants, offsets


def history_index(values: Any, timezone: str | None, name: str | None = None) -> pd.Index:
    """Timestamps (ISO strings or datetimes) -> the index of a history, as :meth:`Forecaster.predict` reads it.

    Values whose UTC offsets differ (a history across a daylight-saving change) are written in
    ``timezone`` (the model's) when there is one; for a model without one they stay as they are, an
    Index of Timestamps that keep their offsets, so each is read at its own wall clock as a tz-aware
    index is. Raises ValueError or TypeError for values that are not timestamps.
    """
    from gman.data.dataset import MixedOffsetsError, parse_timestamps

    if pd.api.types.is_numeric_dtype(getattr(values, "dtype", None)) and not pd.api.types.is_bool_dtype(values):
        # pandas would read them as nanoseconds since 1970
        first = next(iter(values), None)
        raise ValueError(f"numbers such as {first!r} are not timestamps (send ISO 8601 text)")
    try:
        return pd.DatetimeIndex(parse_timestamps(values, timezone), name=name)
    except MixedOffsetsError:
        stamps = [pd.Timestamp(v) for v in values]
        if any(t is not pd.NaT and t.tzinfo is None for t in stamps):
            raise ValueError("some timestamps have a UTC offset and some have none") from None
        return pd.Index(stamps, dtype=object, name=name)


# what gman export writes, which Forecaster.load does not read: suffix -> what the file is and what runs it
_EXPORTED_FILES = {
    ".onnx": "an exported ONNX graph, which runs with onnxruntime (or inside a package: gman export --into-package)",
    ".pt2": "an exported torch.export program, which loads with torch.export.load",
}


def _is_pickle_or_zip(path: Path) -> bool:
    """Does the file start as a pickle (protocol 2+) or a zip archive (torch.save's format) does?"""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def _find_package(folder: Path) -> Path | None:
    """The gman package inside an MLflow model folder (``MLmodel`` + ``artifacts/<name>/gman.json``), if any."""
    if pkg.is_package(folder):
        return folder
    if not (folder / "MLmodel").is_file():
        return None
    for candidate in sorted(folder.glob(f"artifacts/*/{pkg.METADATA_FILE}")):
        return candidate.parent
    return None


def _backend(backend: str | None) -> str:
    """``backend``, else ``GMAN_BACKEND``, else "auto"; errors name the argument or the variable."""
    name, choice = "backend", backend
    if backend is None:
        name, choice = "GMAN_BACKEND", os.environ.get("GMAN_BACKEND") or "auto"
    if choice not in BACKENDS:
        raise DataError(f"{name}: {choice!r} is not one of {', '.join(BACKENDS)}")
    return choice


def _threads(threads: int | None) -> int | None:
    """``threads``, else ``GMAN_THREADS``, else None; errors name the argument or the variable."""
    if threads is None and os.environ.get("GMAN_THREADS"):
        text = os.environ["GMAN_THREADS"]
        try:
            threads = int(text.strip())
        except ValueError:
            raise DataError(f"GMAN_THREADS: expected a positive integer, got {text!r}") from None
        if threads < 1:
            raise DataError(f"GMAN_THREADS: expected a positive integer, got {text!r}")
        return threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DataError(f"threads: expected a positive integer, got {threads!r}")
    return threads


def _import_torch():
    """``import torch``; when this is the process's first import of it, OpenMP threads default to
    ``OMP_WAIT_POLICY=PASSIVE`` (sleep, not spin, between operators).

    Measured on the 2-core machine with other work running: with spinning
    threads one B = 1 forward cost 550 ms of CPU time with 2 threads against
    120 ms with passive ones (113 ms with 1 thread). An explicit
    ``OMP_WAIT_POLICY`` in the environment is left alone.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    return torch


def _set_torch_threads(threads: int | None) -> None:
    threads = _threads(threads)
    if threads is not None:
        _import_torch().set_num_threads(threads)


def _onnxruntime():
    """The onnxruntime module, or None when it is not installed (it is an optional extra)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _ort_session(runtime, path: Path, threads: int | None):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads (default 1), no busy-waiting between ops.

    Spinning threads help an idle machine by microseconds and cost a loaded one
    (other processes on the same cores) whole time slices per operator.
    """
    options = runtime.SessionOptions()
    options.intra_op_num_threads = _threads(threads) or 1
    options.inter_op_num_threads = 1
    options.execution_mode = runtime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = runtime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
        detail = " ".join(str(err).split())[:300]
        raise DataError(f"{path}: ONNX Runtime cannot load the graph ({detail})") from None
