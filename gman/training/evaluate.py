"""Scoring on the test windows: baselines, the horizon table, ``horizons.csv`` and the two plots.

Every model is scored on the same test windows and the same mask (observed
labels), in data units, with :class:`gman.training.metrics.HorizonMetrics`.

``horizons.csv`` has one row per model and horizon step (``step`` 1..Q,
``minutes`` = step · interval) plus one row per model with ``step`` = ``all``
for the errors pooled over every step (``minutes`` empty).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gman.training.baselines import HistoricalAverage, historical_average_forecast, last_value_forecast
from gman.training.metrics import HorizonErrors, HorizonMetrics, steps_for_minutes

MODEL_NAME = "GMAN"
LAST_VALUE = "last value"
HISTORICAL_AVERAGE = "historical average"
TABLE_MINUTES = (15, 30, 60)
CSV_COLUMNS = ("model", "step", "minutes", "mae", "rmse", "mape")
CHUNK_WINDOWS = 1024   # windows scored at once by the baselines (bounds memory on PEMS-BAY)


def _future_index(starts: np.ndarray, history_steps: int, horizon_steps: int) -> np.ndarray:
    """[S, Q] full-series steps of each window's targets."""
    return starts[:, None] + history_steps + np.arange(horizon_steps)[None, :]


def score_baselines(dataset, train_range: tuple[int, int], starts: np.ndarray, history_steps: int,
                    horizon_steps: int, fallback: float) -> dict[str, HorizonErrors]:
    """Last observed value and historical average on the windows starting at ``starts``.

    dataset: a SensorDataset; train_range: (start, stop) steps of the training split
    (the historical average is fitted there); fallback: the last-value forecast
    of a sensor with no observed history reading, which should be the mean of
    the observed training readings (what ``gman train`` passes; the scaler's
    mean under the authors' normalisation counts missing readings as 0).
    """
    time = dataset.time_features()
    train_start, train_stop = train_range
    average = HistoricalAverage().fit(dataset.values[train_start:train_stop], dataset.mask[train_start:train_stop],
                                      time[train_start:train_stop], dataset.steps_per_day)
    metrics = {LAST_VALUE: HorizonMetrics(horizon_steps), HISTORICAL_AVERAGE: HorizonMetrics(horizon_steps)}
    starts = np.asarray(starts, dtype=np.int64)
    for lo in range(0, len(starts), CHUNK_WINDOWS):
        chunk = starts[lo:lo + CHUNK_WINDOWS]
        future = _future_index(chunk, history_steps, horizon_steps)
        target = torch.from_numpy(dataset.values[future])
        mask = torch.from_numpy(dataset.mask[future])
        forecasts = {
            LAST_VALUE: last_value_forecast(dataset.values, dataset.mask, chunk, history_steps, horizon_steps,
                                            fallback),
            HISTORICAL_AVERAGE: historical_average_forecast(average, time, chunk, history_steps, horizon_steps),
        }
        for name, forecast in forecasts.items():
            metrics[name].update(torch.from_numpy(forecast), target, mask)
    return {name: m.compute() for name, m in metrics.items()}


# ------------------------------------------------------------------ tables
def horizon_rows(results: dict[str, HorizonErrors], interval_minutes: float) -> list[dict]:
    """Rows of ``horizons.csv`` (see the module docstring)."""
    rows = []
    for model, errors in results.items():
        for q in range(errors.horizon_steps):
            rows.append({"model": model, "step": q + 1, "minutes": (q + 1) * interval_minutes,
                         "mae": errors.mae[q], "rmse": errors.rmse[q], "mape": errors.mape[q]})
        rows.append({"model": model, "step": "all", "minutes": "",
                     "mae": errors.mae_all, "rmse": errors.rmse_all, "mape": errors.mape_all})
    return rows


def write_horizons_csv(path: str | os.PathLike, results: dict[str, HorizonErrors], interval_minutes: float) -> Path:
    """Write ``horizons.csv`` atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in horizon_rows(results, interval_minutes):
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)
    return path


def _columns(interval_minutes: float, horizon_steps: int) -> list[tuple[str, int | None]]:
    """(label, step) per table column: the 15/30/60-minute steps that exist, then the pooled figures."""
    steps = steps_for_minutes(TABLE_MINUTES, interval_minutes, horizon_steps)
    columns: list[tuple[str, int | None]] = [(f"{m} min", s) for m, s in steps.items()]
    if not columns:  # e.g. hourly data with a short horizon: show the last step
        columns = [(f"step {horizon_steps} ({horizon_steps * interval_minutes:g} min)", horizon_steps)]
    return columns + [("all steps", None)]


def format_table(results: dict[str, HorizonErrors], interval_minutes: float) -> str:
    """The terminal table: MAE / RMSE / MAPE at 15, 30, 60 minutes and over all steps, one row per model."""
    horizon_steps = next(iter(results.values())).horizon_steps
    columns = _columns(interval_minutes, horizon_steps)
    name_width = max(len("model"), *(len(name) for name in results))
    width = 20  # three numbers of 6 characters and two spaces

    def fmt(value: float) -> str:
        return f"{value:>6.2f}" if math.isfinite(value) else f"{'-':>6}"

    lines = [
        " " * name_width + "".join(f" | {label:^{width}}" for label, _ in columns),
        f"{'model':<{name_width}}" + f" | {'MAE':>6} {'RMSE':>6} {'MAPE%':>6}" * len(columns),
    ]
    lines.append("-" * len(lines[1]))
    for name, errors in results.items():
        cells = []
        for _, step in columns:
            if step is None:
                values = (errors.mae_all, errors.rmse_all, errors.mape_all)
            else:
                values = (errors.mae[step - 1], errors.rmse[step - 1], errors.mape[step - 1])
            cells.append(" | " + " ".join(fmt(v) for v in values))
        lines.append(f"{name:<{name_width}}" + "".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_errors_by_horizon(path: str | os.PathLike, results: dict[str, HorizonErrors], interval_minutes: float,
                           units: str = "") -> Path:
    """Three panels (MAE, RMSE, MAPE) against lead time, one line per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    unit = f" ({units})" if units else ""
    for ax, metric, label in zip(axes, ("mae", "rmse", "mape"), (f"MAE{unit}", f"RMSE{unit}", "MAPE (%)")):
        for name, errors in results.items():
            minutes = [(q + 1) * interval_minutes for q in range(errors.horizon_steps)]
            ax.plot(minutes, getattr(errors, metric), marker="o", markersize=3, label=name)
        ax.set_xlabel("lead time (minutes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Test error by forecast horizon")
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


@dataclass
class DayForecast:
    """Truth and forecasts over one test day for a few sensors.

    times: [T] timestamps; truth: [T, k] (NaN where missing); forecasts: label -> [T, k].
    """

    times: object
    sensor_ids: list[str]
    truth: np.ndarray
    forecasts: dict[str, np.ndarray]


@torch.no_grad()
def forecast_one_day(module, dataset, windows, num_sensors: int = 3, batch_size: int = 64) -> DayForecast:
    """GMAN's forecasts for the first whole test day (or as much of it as the split holds).

    For each lead (15 and 60 minutes where the interval allows, else the last
    step) and each target time ``t`` of the day, the forecast comes from the
    window whose lead-step target is ``t``.  The sensors shown are the
    ``num_sensors`` with the most varied truth that day.
    """
    P, Q = windows.history_steps, windows.horizon_steps
    interval_minutes = dataset.interval.total_seconds() / 60.0
    leads = sorted(set(steps_for_minutes((15, 60), interval_minutes, Q).values())) or [Q]
    starts = windows.starts
    time_of_day = dataset.time_features()[:, 1]
    last = leads[-1]
    # the day: from the first midnight target (at the longest lead) on, one day's worth of targets
    targets_last = starts + P + last - 1
    midnights = np.flatnonzero(time_of_day[targets_last] == 0)
    first = int(midnights[0]) if len(midnights) else 0
    day_targets = targets_last[first:first + dataset.steps_per_day]          # [T] target steps
    module.eval()
    forecasts = {}
    for lead in leads:
        # window i has its lead-step target at starts[i] + P + lead - 1
        idx = day_targets - (P + lead - 1) - windows.start
        valid = (idx >= 0) & (idx < len(windows))
        out = np.full((len(day_targets), dataset.num_nodes), np.nan, dtype=np.float32)
        chosen = np.flatnonzero(valid)
        for lo in range(0, len(chosen), batch_size):
            rows = chosen[lo:lo + batch_size]
            items = [windows[int(i)] for i in idx[rows]]
            x = torch.stack([it["x"] for it in items]).to(module.device)
            time = torch.stack([it["time"] for it in items]).to(module.device)
            out[rows] = module(x, time)[:, lead - 1].float().cpu().numpy()
        forecasts[f"GMAN, {lead * interval_minutes:g} min ahead"] = out
    truth = np.where(dataset.mask[day_targets], dataset.values[day_targets], np.nan)
    observed = np.isfinite(truth)
    counts = observed.sum(axis=0)
    filled = np.where(observed, truth, 0.0)
    mean = filled.sum(axis=0) / np.maximum(counts, 1)
    spread = np.where(counts > 1, np.sqrt((np.where(observed, truth - mean, 0.0) ** 2).sum(axis=0)
                                          / np.maximum(counts, 1)), -1.0)
    sensors = np.argsort(-spread, kind="stable")[:num_sensors]
    return DayForecast(
        times=dataset.index[day_targets],
        sensor_ids=[dataset.sensor_ids[s] for s in sensors],
        truth=truth[:, sensors],
        forecasts={label: f[:, sensors] for label, f in forecasts.items()},
    )


def plot_forecast_vs_truth(path: str | os.PathLike, day: DayForecast, units: str = "") -> Path:
    """One panel per sensor: truth and GMAN's forecasts over the day."""
    plt = _pyplot()
    k = len(day.sensor_ids)
    fig, axes = plt.subplots(k, 1, figsize=(12, 2.6 * k), sharex=True, squeeze=False)
    for j, ax in enumerate(axes[:, 0]):
        ax.plot(day.times, day.truth[:, j], color="black", linewidth=1.2, label="truth")
        for label, forecast in day.forecasts.items():
            ax.plot(day.times, forecast[:, j], linewidth=1.0, label=label)
        ax.set_ylabel(f"sensor {day.sensor_ids[j]}" + (f"\n({units})" if units else ""))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="best", fontsize="small")
    axes[-1, 0].set_xlabel("time")
    fig.suptitle("Forecast vs truth over one test day")
    fig.autofmt_xdate()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
