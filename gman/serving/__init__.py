"""Serving: the self-contained model package, `Forecaster`, the MLflow pyfunc wrapper, `gman predict/serve/export`.

Names are imported lazily: ``from gman.serving import Forecaster`` pulls in
torch and pandas, but never Lightning or PyG; MLflow only for ``log_model``.
"""
from __future__ import annotations

import importlib

_EXPORTS: dict[str, str] = {
    "Forecaster": "gman.serving.forecaster",
    "save_package": "gman.serving.package",
    "package_metadata": "gman.serving.package",
    "log_model": "gman.serving.pyfunc",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gman.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
