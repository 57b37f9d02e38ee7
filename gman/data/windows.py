"""Chronological split, scalar z-score scaler and index-based sliding windows.

The authors' protocol: split the raw series chronologically (70/10/20 by
default), then cut windows of P history and Q future steps *inside* each part,
so that no window crosses a split boundary; normalise with one scalar mean and
standard deviation fitted on the training split only (see :class:`StandardScaler`
for the authors' statistics and the ``observed`` alternative).

A window is a start index into tensors shared by all its windows (no copy of
the series per window):

    x      = (values[s : s+P] - mean) / std, scaler.missing_input where missing   [P, N] float32
    x_mask = mask[s : s+P]                                      [P, N] bool
    time   = (day_of_week, time_of_day)[s : s+P+Q]              [P+Q, 2] int64
    y      = values[s+P : s+P+Q]  (data units, 0 where missing) [Q, N] float32
    y_mask = mask[s+P : s+P+Q]                                  [Q, N] bool
    start  = s, in steps of the full series                     [] int64
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from gman.data.dataset import SensorDataset
from gman.errors import ConfigError, DataError

DEFAULT_SPLIT = (0.7, 0.1, 0.2)
SPLIT_NAMES = ("train", "val", "test")


def chronological_split(num_steps: int, fractions: Sequence[float] = DEFAULT_SPLIT) -> list[tuple[int, int]]:
    """[(start, stop)] * 3 step ranges for train, validation and test.

    train = round(f_train * T) and test = round(f_test * T) steps, validation gets
    the rest, in that order in time (the authors' rounding).
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3:
        raise ConfigError(f"split: expected three fractions (train, val, test), got {list(fractions)}")
    if any(not math.isfinite(f) or f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"split: fractions must be positive and sum to 1, got {list(fractions)}")
    num_train = int(round(fractions[0] * num_steps))
    num_test = int(round(fractions[2] * num_steps))
    num_val = num_steps - num_train - num_test
    train = (0, num_train)
    val = (num_train, num_train + num_val)
    test = (num_train + num_val, num_steps)
    return [train, val, test]


NORMALISATIONS = ("authors", "observed")


class StandardScaler:
    """Scalar z-score: z = (v - mean) / std, one mean and one std for all sensors, and the
    normalised value a missing input reading takes (``missing_input``).

    Two ways to fit it (``GMANDataModule(normalisation=...)``):

    * ``"authors"`` (:meth:`fit_authors`, the authors' code: ``np.mean(trainX)``,
      ``np.std(trainX)``): over the training input windows, each step counted once
      per window that holds it, missing readings counted as the 0 they are in the
      authors' files; a missing input then enters the network as ``(0 - mean) / std``.
    * ``"observed"`` (:meth:`fit`, not in the authors' code): over the observed
      training readings only; a missing input enters as 0, the training mean.

    Works on numpy arrays and torch tensors alike (plain arithmetic).
    """

    def __init__(self, mean: float, std: float, missing_input: float = 0.0):
        mean, std, missing_input = float(mean), float(std), float(missing_input)
        if not (math.isfinite(mean) and math.isfinite(std) and math.isfinite(missing_input)) or std <= 0:
            raise DataError(f"scaler: need a finite mean, a positive std and a finite missing input, got "
                            f"mean={mean}, std={std}, missing_input={missing_input}")
        self.mean = mean
        self.std = std
        self.missing_input = missing_input

    @classmethod
    def fit(cls, values: np.ndarray, mask: np.ndarray, where: str = "scaler") -> "StandardScaler":
        """``"observed"``: mean and (population) std of ``values[mask]``: masked readings carry no
        statistics, and a missing input becomes 0 (the mean).
        ``where`` names the readings in errors (e.g. the data set's training split)."""
        observed = np.asarray(values, dtype=np.float64)[np.asarray(mask, dtype=bool)]
        if observed.size == 0:
            raise DataError(f"{where}: no observed readings to fit the scaler on (all missing)")
        std = float(observed.std())
        if std == 0.0:
            raise DataError(f"{where}: all observed readings equal {observed[0]}; cannot normalise (std = 0)")
        return cls(float(observed.mean()), std)

    @classmethod
    def fit_authors(cls, values: np.ndarray, mask: np.ndarray, history_steps: int, horizon_steps: int,
                    where: str = "scaler") -> "StandardScaler":
        """``"authors"``: mean and (population) std of every input reading of the training windows
        (``values`` [T, N] of the training split, missing readings as 0), as the authors' code
        computes them over ``trainX`` [windows, P, N]: step ``t`` weighs as many windows as hold it."""
        mask = np.asarray(mask, dtype=bool)
        values = np.where(mask, np.asarray(values, dtype=np.float64), 0.0)
        num_windows = values.shape[0] - history_steps - horizon_steps + 1
        if num_windows < 1:
            raise DataError(f"{where}: {values.shape[0]} steps hold no window of {history_steps} + {horizon_steps} steps")
        if not mask.any():
            raise DataError(f"{where}: no observed readings to fit the scaler on (all missing)")
        weights = np.convolve(np.ones(num_windows), np.ones(history_steps))  # windows holding each input step
        inputs = values[: len(weights)]
        total = weights.sum() * values.shape[1]
        mean = float((weights @ inputs).sum() / total)
        std = float(np.sqrt((weights @ (inputs - mean) ** 2).sum() / total))
        if std == 0.0:
            raise DataError(f"{where}: all training inputs equal {mean}; cannot normalise (std = 0)")
        return cls(mean, std, missing_input=(0.0 - mean) / std)

    def normalise(self, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(v - mean) / std where observed, ``missing_input`` elsewhere, float32."""
        return np.where(mask, self.transform(np.asarray(values, dtype=np.float64)), self.missing_input).astype(np.float32)

    def transform(self, values):
        return (values - self.mean) / self.std

    def inverse_transform(self, values):
        return values * self.std + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "missing_input": self.missing_input}

    @classmethod
    def from_dict(cls, data: dict) -> "StandardScaler":
        return cls(data["mean"], data["std"], data.get("missing_input", 0.0))

    def __repr__(self) -> str:
        return f"StandardScaler(mean={self.mean:.6g}, std={self.std:.6g}, missing_input={self.missing_input:.6g})"


class WindowDataset(Dataset):
    """Windows of P history and Q future steps inside steps [start, stop) of a dataset.

    Window ``i`` starts at step ``start + i``; there are ``(stop - start) - P - Q + 1``.
    The part's normalised history, readings, mask and time features are held
    once as tensors; items are slices (views) of them.
    """

    def __init__(
        self,
        dataset: SensorDataset,
        history_steps: int,
        horizon_steps: int,
        scaler: StandardScaler,
        start: int = 0,
        stop: int | None = None,
        name: str = "windows",
    ):
        stop = dataset.num_steps if stop is None else int(stop)
        start = int(start)
        if history_steps < 1 or horizon_steps < 1:
            raise ConfigError(f"history_steps and horizon_steps must be >= 1, got {history_steps}, {horizon_steps}")
        if not 0 <= start <= stop <= dataset.num_steps:
            raise DataError(f"{name}: bad step range [{start}, {stop}) for {dataset.num_steps} steps")
        length = stop - start
        window = history_steps + horizon_steps
        if length < window:
            raise DataError(
                f"dataset {dataset.name!r}: {name} part has {length} steps, fewer than "
                f"history + horizon = {window}; use a longer series or a different split"
            )
        self.history_steps = int(history_steps)
        self.horizon_steps = int(horizon_steps)
        self.start = start
        self.stop = stop
        self.name = name
        self.scaler = scaler
        self.num_nodes = dataset.num_nodes

        values = dataset.values[start:stop]
        mask = dataset.mask[start:stop]
        normalised = scaler.normalise(values, mask)
        # torch.from_numpy shares memory with the (contiguous) numpy arrays: no extra copy.
        self.values = torch.from_numpy(np.ascontiguousarray(values))
        self.mask = torch.from_numpy(np.ascontiguousarray(mask))
        self.normalised = torch.from_numpy(normalised)
        self.time = torch.from_numpy(dataset.time_features()[start:stop].copy())

    def __len__(self) -> int:
        return (self.stop - self.start) - self.history_steps - self.horizon_steps + 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        p, q = self.history_steps, self.horizon_steps
        return {
            "x": self.normalised[i : i + p],
            "x_mask": self.mask[i : i + p],
            "time": self.time[i : i + p + q],
            "y": self.values[i + p : i + p + q],
            "y_mask": self.mask[i + p : i + p + q],
            "start": torch.tensor(self.start + i, dtype=torch.int64),
        }

    @property
    def starts(self) -> np.ndarray:
        """[len] int64: the full-series step of each window's first history step."""
        return np.arange(self.start, self.start + len(self), dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"WindowDataset({self.name}: steps [{self.start}, {self.stop}), {len(self)} windows, "
            f"P={self.history_steps}, Q={self.horizon_steps}, N={self.num_nodes})"
        )
