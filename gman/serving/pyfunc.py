"""GMAN as an MLflow pyfunc model: the package folder as an artifact, a `Forecaster` behind `predict`.

REST payload (``POST /invocations``, ``Content-Type: application/json``) — the
history as a DataFrame in pandas' split (or records) layout, one row per time
step, a ``timestamp`` column (ISO 8601; with or without UTC offsets) plus one column per sensor
id; missing readings as ``null`` (or the model's missing value)::

    {"dataframe_split": {
        "columns": ["timestamp", "773869", "767541", ...],
        "data": [["2012-03-01T00:00:00", 64.375, 67.625, ...],
                 ["2012-03-01T00:05:00", 62.667, null, ...], ...]}}

At least the last P rows at the model's interval are needed; all model
sensors must be present. An optional ``history_id`` column holds several
histories in one request (predicted as one batch; the answer gains a
``history_id`` column). The answer is the tidy forecast, timestamps as ISO
strings::

    {"predictions": [{"sensor_id": "773869", "issued_at": "2012-03-01T00:55:00",
                      "target_time": "2012-03-01T01:00:00", "step": 1,
                      "minutes_ahead": 5.0, "prediction": 63.1}, ...]}

``"params": {"layout": "wide"}`` beside ``dataframe_split`` asks for one record
per target time instead (``issued_at``, ``target_time``, then one field per
sensor id; ``history_id`` first with several histories)::

    {"predictions": [{"issued_at": "2012-03-01T00:55:00", "target_time": "2012-03-01T01:00:00",
                      "773869": 63.1, "767541": 61.9, ...}, ...]}

For N = 207 and Q = 12 that is 12 records against 2,484: a 73 kB answer
instead of 413 kB, and MLflow's handler takes ~15 ms less per request
(``experiments/rest_layout_inprocess.py``).

A history the model cannot use answers HTTP 400 whose JSON ``message`` is the
one-line validation message (raised as :class:`InvalidHistory`, an
``MlflowException(INVALID_PARAMETER_VALUE)`` that keeps MLflow's scoring server
from prefixing a printout of the whole input), never 500.

The model is logged with an explicit signature, an input example and explicit
pip requirements (so MLflow does not spend seconds inferring them). The gman
package itself must be installed where the model is served
(``mlflow models serve --env-manager local``).

The server's Forecaster picks its backend as ``Forecaster.load`` does: ONNX
Runtime when the package carries ``model.onnx`` and onnxruntime is installed,
else PyTorch; the server's environment can set ``GMAN_BACKEND``,
``GMAN_THREADS`` and ``GMAN_DEVICE`` (e.g. ``cuda``: the network on a GPU). Per request, beside the model (about 105 ms of CPU for
N = 207, L = 3 with ONNX Runtime), MLflow spends about 25 ms enforcing the
input schema and 25 ms writing the 2,484-row JSON answer (measured in-process).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

from gman.errors import ForecastInputError, GmanError
from gman.serving import package as pkg

TIMESTAMP_COLUMN = "timestamp"
HISTORY_ID_COLUMN = "history_id"
PACKAGE_ARTIFACT = "package"
LAYOUTS = ("tidy", "wide")
WIDE_ROW_COLUMNS = (HISTORY_ID_COLUMN, "issued_at", "target_time")


class GMANPyfuncModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: ``load_context`` builds a Forecaster from the package artifact; ``predict`` forecasts."""

    # predict() has no type hints on purpose: with them MLflow would derive the schema from the hints
    # and expect an ``inputs`` payload. This flag stops MLflow warning about their absence.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from gman.serving.forecaster import Forecaster

        self.forecaster = Forecaster.from_package(context.artifacts[PACKAGE_ARTIFACT])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would derive a schema from them
        try:
            layout = (params or {}).get("layout") or "tidy"
            if layout not in LAYOUTS:
                raise ForecastInputError(f"params: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
            histories = frame_to_histories(model_input, timezone=self.forecaster.timezone)
            forecast = self.forecaster.predict(histories)
            if "history" in forecast.columns:
                forecast = forecast.rename(columns={"history": HISTORY_ID_COLUMN})
            return forecast_to_json_frame(forecast, layout)
        except GmanError as err:
            # MLflow's scoring server turns INVALID_PARAMETER_VALUE into HTTP 400 with this message.
            raise InvalidHistory(str(err)) from None


class InvalidHistory(MlflowException):
    """A history the model cannot use: HTTP 400 whose ``message`` is the validation message alone.

    MLflow's scoring server (``mlflow.pyfunc.scoring_server.invocations``, MLflow 3.x)
    rewrites the message of every ``MlflowException`` raised by ``predict`` as
    ``"Failed to predict data '<the whole input DataFrame printed>'. \nError: <message>"``,
    by assigning ``e.message``, and turns any other exception into a generic
    message without the text. It offers no setting or exception type that
    passes a message through, so here ``message`` is a read-only view of the
    validation message: the server's rewrite is kept aside as
    ``server_message`` and the JSON answer carries the one-line message.
    """

    def __init__(self, message: str):
        self._validation_message = message
        self.server_message: str | None = None
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._validation_message

    @message.setter
    def message(self, value: str) -> None:
        if value != self._validation_message:  # MlflowException.__init__ sets the same text; the server its own
            self.server_message = value


def frame_to_histories(frame: Any, timezone: str | None = None) -> pd.DataFrame | dict[str, pd.DataFrame]:
    """Payload DataFrame (``timestamp`` column + sensor columns [+ ``history_id``]) -> history / dict of histories.

    Timestamps whose UTC offsets differ (a history across a daylight-saving change) are read as
    instants and written in ``timezone`` (the model's); for a model without one each keeps its
    offset, so the model reads its wall clock, as ``Forecaster.predict`` reads a tz-aware index
    (see :func:`gman.serving.forecaster.history_index`).
    """
    if not isinstance(frame, pd.DataFrame):
        raise ForecastInputError(f"payload: expected a DataFrame (dataframe_split or dataframe_records), got {type(frame).__name__}")
    if TIMESTAMP_COLUMN in frame.columns:
        from gman.serving.forecaster import history_index

        try:
            index = history_index(frame[TIMESTAMP_COLUMN], timezone, TIMESTAMP_COLUMN)
        except (TypeError, ValueError) as err:
            raise ForecastInputError(f"payload: column {TIMESTAMP_COLUMN!r} holds values that are not timestamps ({err})") from None
        frame = frame.drop(columns=TIMESTAMP_COLUMN).set_axis(index, axis=0)
    elif not isinstance(frame.index, pd.DatetimeIndex):
        raise ForecastInputError(f"payload: needs a {TIMESTAMP_COLUMN!r} column with the time of each row")
    if HISTORY_ID_COLUMN not in frame.columns:
        return frame
    ids = frame[HISTORY_ID_COLUMN]
    if ids.isna().any():
        raise ForecastInputError(f"payload: column {HISTORY_ID_COLUMN!r} has missing values")
    frame = frame.drop(columns=HISTORY_ID_COLUMN)
    return {str(key): part for key, part in frame.groupby(ids.astype(str).to_numpy(), sort=False)}


def _iso(values: pd.Series) -> np.ndarray:
    """Timestamps -> ISO 8601 strings (formatting each distinct value once: Q of them, not Q*N)."""
    codes, uniques = pd.factorize(values)
    return np.array([t.isoformat() for t in uniques], dtype=object)[codes]


def forecast_to_json_frame(forecast: pd.DataFrame, layout: str = "tidy") -> pd.DataFrame:
    """The tidy forecast with its timestamp columns as ISO strings (JSON-safe); with
    ``layout="wide"`` one row per (history, target time) and one column per sensor id."""
    out = forecast.copy()
    for column in ("issued_at", "target_time"):
        out[column] = _iso(out[column])
    if layout == "tidy":
        return out
    rows = [c for c in WIDE_ROW_COLUMNS if c in out.columns]
    clash = sorted(set(rows) & set(out["sensor_id"]))
    if clash:
        raise ForecastInputError(f"params: layout 'wide' cannot be used: sensor id {clash[0]!r} is also a column name of it")
    order = list(dict.fromkeys(out["sensor_id"]))  # the model's sensor order, not sorted ids
    wide = out.pivot(index=rows, columns="sensor_id", values="prediction")[order]
    wide.columns.name = None
    return wide.reset_index()


# ----------------------------------------------------------------------------- signature and logging


def signature_for(metadata: dict[str, Any]) -> ModelSignature:
    """Inputs: ``timestamp``, ``history_id``, one column per sensor; outputs: the tidy forecast; one
    parameter, ``layout`` ("tidy" or "wide", see the module docstring).

    Input columns are typed ``Any`` and all optional, ``timestamp`` too, so that every
    check happens in gman, whose one-line messages name the column at fault. (MLflow's
    own enforcement would reject integer readings in a ``double`` column and datetime
    values in a ``string`` one, and a missing required column in a 400 whose message
    prints the whole input.)
    """
    inputs = [ColSpec(AnyType(), TIMESTAMP_COLUMN, required=False), ColSpec(AnyType(), HISTORY_ID_COLUMN, required=False)]
    inputs += [ColSpec(AnyType(), str(s), required=False) for s in metadata["sensor_ids"]]
    outputs = [
        ColSpec("string", HISTORY_ID_COLUMN, required=False),
        ColSpec("string", "sensor_id"),
        ColSpec("string", "issued_at"),
        ColSpec("string", "target_time"),
        ColSpec("long", "step"),
        ColSpec("double", "minutes_ahead"),
        ColSpec("double", "prediction"),
    ]
    params = ParamSchema([ParamSpec("layout", "string", "tidy")])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs), params=params)


def input_example(metadata: dict[str, Any]) -> pd.DataFrame:
    """A valid P-step payload: every sensor at the training mean, from a fixed Monday midnight."""
    p = int(metadata["history_steps"])
    stamps = pd.date_range("2024-01-01", periods=p, freq=pd.Timedelta(seconds=int(metadata["interval_seconds"])))
    mean = round(float(metadata["scaler"]["mean"]), 3)
    frame = pd.DataFrame(np.full((p, len(metadata["sensor_ids"])), mean), columns=[str(s) for s in metadata["sensor_ids"]])
    frame.insert(0, TIMESTAMP_COLUMN, [t.isoformat() for t in stamps])
    return frame


def pip_requirements(metadata: dict[str, Any] | None = None) -> list[str]:
    """Pinned versions of what the wrapper imports (gman itself must be installed where it is served);
    onnxruntime too when the package carries an ONNX graph and onnxruntime is installed here."""
    names = ["torch", "numpy", "pandas", "mlflow"]
    if metadata is not None and metadata.get("onnx"):
        try:
            importlib.metadata.version("onnxruntime")
        except importlib.metadata.PackageNotFoundError:
            pass
        else:
            names.append("onnxruntime")
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]


# The model's code, as MLflow's "models from code" stores it: it imports the installed gman,
# so nothing is pickled (MLflow would otherwise cloudpickle the PythonModel instance).
_MODEL_CODE = """\
# Written by gman.serving.pyfunc: the MLflow pyfunc entry point of a GMAN model package.
import mlflow.models

from gman.serving.pyfunc import GMANPyfuncModel

mlflow.models.set_model(GMANPyfuncModel())
"""


@contextlib.contextmanager
def _model_kwargs(package_dir: str | os.PathLike):
    """Keyword arguments shared by ``log_model`` and ``save_model`` (the code file lives while in use)."""
    metadata = pkg.read_metadata(package_dir)  # also validates the folder before MLflow copies it
    with tempfile.TemporaryDirectory(prefix="gman-pyfunc-") as tmp:
        code = Path(tmp) / "gman_pyfunc_model.py"
        code.write_text(_MODEL_CODE, encoding="utf-8")
        yield {
            "python_model": str(code),
            "artifacts": {PACKAGE_ARTIFACT: str(Path(package_dir).resolve())},
            "signature": signature_for(metadata),
            "input_example": input_example(metadata),
            "pip_requirements": pip_requirements(metadata),
        }


def log_model(package_dir: str | os.PathLike, *, artifact_path: str = "model", registered_model_name: str | None = None):
    """Log the package as an MLflow pyfunc model in the active run (one is started if none is); returns ModelInfo.

    With ``registered_model_name`` the model is also registered (a new version).
    """
    with _model_kwargs(package_dir) as kwargs:
        kwargs.update(name=artifact_path, registered_model_name=registered_model_name)
        if mlflow.active_run() is None:
            with mlflow.start_run():
                return mlflow.pyfunc.log_model(**kwargs)
        return mlflow.pyfunc.log_model(**kwargs)


def save_model(package_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write an MLflow pyfunc model folder for the package to ``path`` (no tracking server needed)."""
    with _model_kwargs(package_dir) as kwargs:
        mlflow.pyfunc.save_model(str(path), **kwargs)
    return Path(path)
