"""Training, evaluation and tracking of GMAN.

- ``metrics``: masked MAE / RMSE / MAPE per horizon step (``HorizonMetrics``).
- ``baselines``: last observed value and historical average.
- ``module``: ``GMANLightningModule`` (loss, optimiser, lr staircase, checkpoints).
- ``evaluate``: baselines on the test windows, the horizon table, ``horizons.csv``, plots.
- ``tracking``: MLflow store and experiment set-up, Lightning's MLFlowLogger.
- ``cli``: ``gman train`` and ``gman evaluate``.

Nothing is imported here, so ``import gman.training.metrics`` does not pull in
Lightning or MLflow.
"""
