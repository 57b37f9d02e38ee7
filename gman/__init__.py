"""gman: GMAN traffic forecasting on sensor networks — train, evaluate, serve.

    from gman import Forecaster                          # serve: forecasts from a trained model
    from gman import GMANDataModule, GMANLightningModule  # train with Lightning from your own script
    from gman import GMAN, load_dataset                   # the network (pure torch) and the readers

Importing ``gman`` is cheap: heavy pieces (torch, Lightning, PyG, MLflow) are
imported by the sub-modules that need them, on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily, so ``import gman`` stays light for serving)
_EXPORTS: dict[str, str] = {
    "Forecaster": "gman.serving.forecaster",
    "GMAN": "gman.model",
    "GMANDataModule": "gman.data.datamodule",
    "GMANLightningModule": "gman.training.module",
    "load_dataset": "gman.data.readers",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gman' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
