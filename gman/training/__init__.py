"""Training, evaluation and tracking of GMAN.

- ``metrics``: masked MAE / RMSE / MAPE per horizon step (``HorizonMetrics``).
- ``baselines``: last observed value and historical average.
- ``module``: ``GMANLightningModule`` (loss, optimiser, lr staircase, checkpoints).
- ``evaluate``: baselines on the test windows, the horizon table, ``horizons.csv``, plots.
- ``tracking``: MLflow store and experiment set-up, Lightning's MLFlowLogger.
- ``cli``: ``gman train`` and ``gman evaluate``.

The names below are imported lazily on first use, so ``import gman.training.metrics``
does not pull in Lightning or MLflow.
"""
from __future__ import annotations

import importlib

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "GMANLightningModule": "gman.training.module",
    "HorizonMetrics": "gman.training.metrics",
    "horizon_errors": "gman.training.metrics",
    "masked_mae": "gman.training.metrics",
    "HistoricalAverage": "gman.training.baselines",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gman.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: next look-up skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
