"""Serving: the self-contained model package, `Forecaster`, the MLflow pyfunc wrapper, `gman predict/serve/export`.

Names are imported lazily: ``from gman.serving import Forecaster`` pulls in
pandas and numpy (torch only when a PyTorch network is loaded; a package with
``model.onnx`` served by ONNX Runtime never imports it), never Lightning or PyG;
MLflow only for ``log_model``.
"""
from __future__ import annotations

from gman._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Forecaster": "gman.serving.forecaster",
    "save_package": "gman.serving.package",
    "package_metadata": "gman.serving.package",
    "log_model": "gman.serving.pyfunc",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
