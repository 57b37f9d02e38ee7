"""gman: GMAN traffic forecasting on sensor networks — train, evaluate, serve.

    from gman import Forecaster                          # serve: forecasts from a trained model
    from gman import GMANDataModule, GMANLightningModule  # train with Lightning from your own script
    from gman import GMAN, load_dataset                   # the network (pure torch) and the readers

Importing ``gman`` is cheap: heavy pieces (torch, Lightning, PyG, MLflow) are
imported by the sub-modules that need them, on first use.
"""
from __future__ import annotations

from gman._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
