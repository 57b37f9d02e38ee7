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

from gman._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "GMANLightningModule": "gman.training.module",
    "HorizonMetrics": "gman.training.metrics",
    "horizon_errors": "gman.training.metrics",
    "masked_mae": "gman.training.metrics",
    "HistoricalAverage": "gman.training.baselines",
    "historical_average_forecast": "gman.training.baselines",
    "last_value_forecast": "gman.training.baselines",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
