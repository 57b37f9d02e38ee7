"""The model package: one self-contained folder that `gman train` writes and `Forecaster.load` reads.

Layout (format version 1)::

    <package>/
        gman.json            everything but the weights (see ``package_metadata``)
        weights.safetensors  the GMAN state dict, when the ``safetensors`` package is installed
        weights.pt           ... otherwise; read back with ``torch.load(weights_only=True)``
        model.onnx           optional: the same model with its scaling as an ONNX graph, which
                             ``Forecaster`` runs with ONNX Runtime when that is installed
                             (``gman export --format onnx --into-package``)

The state dict includes the spatial embedding (a buffer, or a parameter when
learnable), so SE files are not needed at load time. Nothing in the folder is
pickled code: ``gman.json`` is plain JSON and the weights file holds tensors
only. ``gman.json`` also records the SHA-256 of the weights file, checked at load.

``gman.json`` keys::

    format, format_version, gman_version
    model: {class, config}           config = GMAN.config, so GMAN(**config) rebuilds the network
    scaler: {mean, std, missing_input}  scalar z-score of the training split, and the normalised
                                     value of a missing input (absent in older packages: 0.0)
    sensor_ids: [N str]              column order of the model's inputs and outputs
    interval_seconds, steps_per_day  e.g. 300 and 288 for 5-minute data
    history_steps P, horizon_steps Q
    missing_value                    reading that means "no data" (e.g. 0.0), or null
    dataset_name, units
    weights: {file, sha256}
    onnx: {file, sha256}             only when the package carries model.onnx

Writing is atomic: the folder is built under a temporary name beside the
target and renamed into place, so a failure never leaves half a package.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gman._modes import give_usual_mode
from gman.errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd
    import torch

    from gman.model import GMAN

FORMAT_NAME = "gman-model-package"
FORMAT_VERSION = 1
METADATA_FILE = "gman.json"
SAFETENSORS_FILE = "weights.safetensors"
TORCH_FILE = "weights.pt"
ONNX_FILE = "model.onnx"
SECONDS_PER_DAY = 86_400


def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _interval_seconds(interval: Any) -> int:
    import pandas as pd

    try:
        seconds = pd.Timedelta(interval).total_seconds()
    except (TypeError, ValueError):
        raise ConfigError(f"interval: not a time span: {interval!r}") from None
    if seconds < 1 or seconds != int(seconds) or SECONDS_PER_DAY % int(seconds) != 0:
        raise ConfigError(f"interval: {interval} must be a whole number of seconds that divides one day")
    return int(seconds)


def package_metadata(
    model: "GMAN",
    *,
    scaler_mean: float,
    scaler_std: float,
    sensor_ids: list[str],
    interval: "pd.Timedelta",
    missing_value: float | None,
    dataset_name: str,
    units: str = "",
    timezone: str | None = None,
    scaler_missing_input: float = 0.0,
) -> dict[str, Any]:
    """The ``gman.json`` content for ``model`` (without the ``weights`` entry), validated.

    ``timezone``: the zone of the training data's timestamps (None for naive ones), in which
    the model read the time of day; a Forecaster converts tz-aware histories to it.

    Also what a training checkpoint should carry (under the key ``"gman_package"``)
    so that ``Forecaster.load`` can serve the checkpoint directly.
    """
    import gman

    config = dict(model.config)
    num_nodes = int(config["num_nodes"])
    ids = [str(s) for s in sensor_ids]
    if len(ids) != num_nodes:
        raise ConfigError(f"sensor_ids: {len(ids)} ids for a model of {num_nodes} sensors")
    if len(set(ids)) != len(ids):
        raise ConfigError("sensor_ids: contains duplicates")
    interval_seconds = _interval_seconds(interval)
    steps_per_day = SECONDS_PER_DAY // interval_seconds
    if int(config["steps_per_day"]) != steps_per_day:
        raise ConfigError(
            f"interval: {interval_seconds} s gives {steps_per_day} steps per day "
            f"but the model was built for {config['steps_per_day']}"
        )
    mean, std, missing_input = float(scaler_mean), float(scaler_std), float(scaler_missing_input)
    if not (math.isfinite(mean) and math.isfinite(std) and math.isfinite(missing_input)) or std <= 0:
        raise ConfigError(f"scaler: need a finite mean, a positive std and a finite missing input, got mean={mean}, "
                          f"std={std}, missing_input={missing_input}")
    if missing_value is not None:
        missing_value = float(missing_value)
        if not math.isfinite(missing_value):
            missing_value = None  # NaN always counts as missing; no need to record it
    try:
        json.dumps(config)
    except TypeError as err:
        raise ConfigError(f"model.config is not JSON-serialisable: {err}") from None
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "gman_version": gman.__version__,
        "model": {"class": "gman.model.GMAN", "config": config},
        "scaler": {"mean": mean, "std": std, "missing_input": missing_input},
        "sensor_ids": ids,
        "interval_seconds": interval_seconds,
        "steps_per_day": steps_per_day,
        "history_steps": int(config["history_steps"]),
        "horizon_steps": int(config["horizon_steps"]),
        "missing_value": missing_value,
        "dataset_name": str(dataset_name),
        "units": str(units),
        "timezone": _check_timezone(timezone, "timezone"),
    }


def _check_timezone(timezone: Any, where: str) -> str | None:
    """``timezone`` as a name pandas reads back (``str`` of a tz object), or None."""
    if timezone is None:
        return None
    import pandas as pd

    try:
        pd.Timestamp(0, tz=str(timezone))
    except Exception:  # noqa: BLE001 - pandas raises several kinds for an unknown zone
        raise ConfigError(f"{where}: {timezone!r} is not a time zone pandas knows") from None
    return str(timezone)


def _write_weights(state_dict: dict[str, "torch.Tensor"], folder: Path) -> Path:
    import torch

    # Contiguous CPU copies: safetensors requires them, and they keep the file device-free.
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
    if _has_safetensors():
        from safetensors.torch import save_file

        path = folder / SAFETENSORS_FILE
        save_file(tensors, str(path))
    else:
        path = folder / TORCH_FILE
        torch.save(tensors, path)
    return path


def save_package(
    path: str | os.PathLike,
    model: "GMAN",
    *,
    scaler_mean: float,
    scaler_std: float,
    sensor_ids: list[str],
    interval: "pd.Timedelta",
    missing_value: float | None,
    dataset_name: str,
    units: str = "",
    timezone: str | None = None,
    scaler_missing_input: float = 0.0,
) -> Path:
    """Write ``model`` and everything needed to serve it to the folder ``path``; returns ``path``.

    An existing package at ``path`` is replaced (atomically); an existing
    folder that is not a package is refused.
    """
    target = Path(path)
    metadata = package_metadata(
        model,
        scaler_mean=scaler_mean,
        scaler_std=scaler_std,
        sensor_ids=sensor_ids,
        interval=interval,
        missing_value=missing_value,
        dataset_name=dataset_name,
        units=units,
        timezone=timezone,
        scaler_missing_input=scaler_missing_input,
    )
    if target.exists():
        if not target.is_dir():
            raise ConfigError(f"{target}: exists and is not a folder; refusing to overwrite it with a model package")
        if any(target.iterdir()) and not (target / METADATA_FILE).is_file():
            raise ConfigError(f"{target}: exists and is not a gman model package; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        give_usual_mode(staging, folder=True)  # mkdtemp creates 0700
        weights = _write_weights(model.state_dict(), staging)
        metadata["weights"] = {"file": weights.name, "sha256": _sha256(weights)}
        with open(staging / METADATA_FILE, "w", encoding="utf-8") as handle:
            json.dump(metadata, handle, indent=2)
            handle.write("\n")
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace_folder(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an old ``target`` is moved aside first and removed after."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)  # put the previous package back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- reading


def is_package(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a ``gman.json``."""
    return (Path(path) / METADATA_FILE).is_file()


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``<path>/gman.json``; raises :class:`DataError` naming the file on any problem."""
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise DataError(f"{Path(path)}: not a gman model package (no {METADATA_FILE})")
    try:
        metadata = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{file}: cannot read JSON ({err})") from None
    check_metadata(metadata, str(file))
    return metadata


_REQUIRED_KEYS = (
    "format_version", "model", "scaler", "sensor_ids", "interval_seconds", "steps_per_day",
    "history_steps", "horizon_steps", "missing_value",
)


def check_metadata(metadata: Any, where: str) -> None:
    """Raise :class:`DataError` when ``metadata`` is not a usable package description."""
    if not isinstance(metadata, dict):
        raise DataError(f"{where}: expected a JSON object")
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise DataError(f"{where}: missing keys {missing}")
    if metadata.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise DataError(f"{where}: format {metadata['format']!r} is not {FORMAT_NAME!r}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise DataError(f"{where}: format_version {metadata['format_version']} is not supported (this gman reads {FORMAT_VERSION})")
    config = metadata["model"].get("config") if isinstance(metadata["model"], dict) else None
    if not isinstance(config, dict):
        raise DataError(f"{where}: model.config must be an object")
    if len(metadata["sensor_ids"]) != config.get("num_nodes"):
        raise DataError(f"{where}: {len(metadata['sensor_ids'])} sensor ids for num_nodes={config.get('num_nodes')}")
    std = metadata["scaler"].get("std") if isinstance(metadata["scaler"], dict) else None
    if not isinstance(std, (int, float)) or not std > 0:
        raise DataError(f"{where}: scaler.std must be a positive number")
    missing_input = metadata["scaler"].get("missing_input", 0.0)
    if isinstance(missing_input, bool) or not isinstance(missing_input, (int, float)) or not math.isfinite(missing_input):
        raise DataError(f"{where}: scaler.missing_input must be a finite number")
    interval = metadata["interval_seconds"]
    if not isinstance(interval, int) or interval < 1 or SECONDS_PER_DAY % interval != 0:
        raise DataError(f"{where}: interval_seconds must be a whole number of seconds dividing one day, got {interval!r}")
    if SECONDS_PER_DAY // interval != metadata["steps_per_day"]:
        raise DataError(f"{where}: interval_seconds and steps_per_day disagree")
    try:
        _check_timezone(metadata.get("timezone"), "timezone")
    except ConfigError as err:
        raise DataError(f"{where}: {err}") from None


def load_state_dict(path: str | os.PathLike, metadata: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """The weights of the package at ``path`` (tensors only; no code is unpickled)."""
    import torch

    folder = Path(path)
    entry = metadata.get("weights") or {}
    name = entry.get("file")
    if name is None:  # tolerate hand-made packages: take whichever weights file is there
        name = SAFETENSORS_FILE if (folder / SAFETENSORS_FILE).is_file() else TORCH_FILE
    file = folder / name
    if Path(name).name != name or not file.is_file():
        raise DataError(f"{folder}: weights file {name!r} not found")
    expected = entry.get("sha256")
    if expected and _sha256(file) != expected:
        raise DataError(f"{file}: SHA-256 differs from gman.json (corrupted or replaced weights)")
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise DataError(f"{file}: reading safetensors weights needs the 'safetensors' package") from None
        return load_file(str(file), device="cpu")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError for bad files
        raise DataError(f"{file}: cannot load weights ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{file}: expected a dict of tensors")
    return state


def onnx_file(path: str | os.PathLike, metadata: dict[str, Any]) -> Path | None:
    """The package's ONNX graph (``metadata["onnx"]``), its SHA-256 checked; None when it has none."""
    entry = metadata.get("onnx")
    if not entry:
        return None
    folder = Path(path)
    name = entry.get("file", ONNX_FILE) if isinstance(entry, dict) else None
    if not isinstance(name, str) or Path(name).name != name or not (folder / name).is_file():
        raise DataError(f"{folder}: ONNX file {name!r} named in {METADATA_FILE} not found")
    file = folder / name
    expected = entry.get("sha256")
    if expected and _sha256(file) != expected:
        raise DataError(f"{file}: SHA-256 differs from gman.json (corrupted or replaced graph)")
    return file


def attach_onnx(path: str | os.PathLike, graph: str | os.PathLike) -> Path:
    """Copy the ONNX file ``graph`` into the package at ``path`` as ``model.onnx`` and record it in gman.json.

    The graph must compute the package's model with its scaling (what
    ``gman export --format onnx`` writes: raw readings ``values [B, P, N]`` and
    ``time [B, P+Q, 2]`` in, ``forecast [B, Q, N]`` out); it is not checked here.
    """
    folder = Path(path)
    metadata = read_metadata(folder)
    target = folder / ONNX_FILE
    staging = folder / f".{ONNX_FILE}.tmp"
    shutil.copyfile(graph, staging)
    os.replace(staging, target)
    metadata["onnx"] = {"file": ONNX_FILE, "sha256": _sha256(target)}
    text = json.dumps(metadata, indent=2) + "\n"
    staging = folder / f".{METADATA_FILE}.tmp"
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, folder / METADATA_FILE)
    return target


def build_model(metadata: dict[str, Any], state_dict: dict[str, "torch.Tensor"], where: str) -> "GMAN":
    """``GMAN(**config)`` with ``state_dict`` loaded (strict), in eval mode."""
    from gman.model import GMAN

    try:
        model = GMAN(**metadata["model"]["config"])
    except TypeError as err:
        raise DataError(f"{where}: model config does not fit this gman's GMAN ({err})") from None
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]  # one line: torch's message spans several
        raise DataError(f"{where}: weights do not fit the model config ({detail})") from None
    return model.eval()
