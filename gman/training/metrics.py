"""Masked forecast errors per horizon step.

Only observed labels count (``mask`` = True where a reading exists), so a
missing reading (stored as 0.0, or NaN in a user's own arrays) never turns into
an error of "speed 0" or a NaN, and MAPE is never NaN.  All errors are computed in data units (de-normalised).

For predictions ``ŷ``, labels ``y`` and mask ``m`` of shape [S, Q, N]
(windows, horizon steps, sensors), per step ``q``:

    MAE_q  = Σ m·|ŷ − y| / Σ m
    RMSE_q = sqrt(Σ m·(ŷ − y)² / Σ m)
    MAPE_q = 100 · Σ m'·|ŷ − y| / |y| / Σ m'     with m' = m ∧ |y| > eps

and the "all steps" figures pool every (window, step, sensor) the same way
(the RMSE of the pooled squared error, not the mean of the per-step RMSEs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Labels closer to zero than this are left out of MAPE (a relative error of a
# zero reading is undefined); the readers already map "missing" to mask=False.
MAPE_EPS = 1e-4


def masked_mae(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar masked mean absolute error of pred, target, mask of one shape (e.g. [B, Q, N]);
    0 when nothing is observed (keeps the loss finite).

    ``mask`` is True where a label is observed; what ``target`` holds elsewhere (0, NaN)
    changes neither the loss nor its gradient.  Numpy arrays are taken too (``torch.as_tensor``);
    the result is a 0-dim tensor.  Computed in at least float32: a bf16 count of observed
    labels would be rounded (36,565 labels count as 36,352).
    """
    pred, target, mask = (torch.as_tensor(a) for a in (pred, target, mask))
    if not pred.shape == target.shape == mask.shape:
        raise ValueError(f"masked_mae: pred, target and mask must share one shape, got "
                         f"{list(pred.shape)}, {list(target.shape)}, {list(mask.shape)}")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    observed = mask.bool()
    # where, not a product with the mask: 0 · NaN is NaN.  The difference is masked before abs, so
    # neither abs nor its gradient ever sees a NaN label.
    error = torch.where(observed, pred.to(dtype) - target, 0.0).abs()
    return error.sum() / observed.sum().to(dtype).clamp_min(1.0)


@dataclass
class HorizonErrors:
    """Errors of one model on one set of windows: arrays of length Q, plus the pooled figures."""

    mae: list[float]
    rmse: list[float]
    mape: list[float]
    count: list[int]
    mae_all: float
    rmse_all: float
    mape_all: float

    @property
    def horizon_steps(self) -> int:
        return len(self.mae)


class HorizonMetrics:
    """Accumulates masked error sums per horizon step over batches.

    ``update(pred [B, Q, N], target [B, Q, N], mask [B, Q, N])`` adds to five
    sums per step; ``compute()`` turns them into a :class:`HorizonErrors`.
    Sums (not means) are kept so that batches of any size, and devices of a
    distributed run (``sums`` can be all-reduced), combine exactly.
    """

    def __init__(self, horizon_steps: int):
        self.horizon_steps = horizon_steps
        self.reset()

    def reset(self) -> None:
        # rows: abs error, squared error, count, abs percentage error, MAPE count
        self.sums = torch.zeros(5, self.horizon_steps, dtype=torch.float64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        if pred.shape != target.shape or pred.shape != mask.shape or pred.dim() != 3:
            raise ValueError(f"pred, target, mask must share one [B, Q, N] shape, got "
                             f"{tuple(pred.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}")
        if pred.shape[1] != self.horizon_steps:
            raise ValueError(f"expected {self.horizon_steps} horizon steps, got {pred.shape[1]}")
        pred, target = pred.detach().double().cpu(), target.detach().double().cpu()
        mask = mask.detach().cpu().bool()
        error = torch.where(mask, pred - target, 0.0).abs()  # not error · mask: a missing label may be NaN
        observed = mask.double()
        mape_mask = (mask & (target.abs() > MAPE_EPS)).double()
        ape = torch.where(mape_mask.bool(), error / target.abs().clamp_min(MAPE_EPS), torch.zeros_like(error))
        self.sums += torch.stack([
            (error * observed).sum(dim=(0, 2)),
            (error.square() * observed).sum(dim=(0, 2)),
            observed.sum(dim=(0, 2)),
            ape.sum(dim=(0, 2)),
            mape_mask.sum(dim=(0, 2)),
        ])

    def compute(self) -> HorizonErrors:
        abs_err, sq_err, count, ape, mape_count = self.sums

        def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
            # NaN only where a step has no observed label at all (nothing to score)
            return torch.where(den > 0, num / den.clamp_min(1.0), torch.full_like(num, float("nan")))

        def pooled(num: torch.Tensor, den: torch.Tensor) -> float:
            total = float(den.sum())
            return float(num.sum()) / total if total > 0 else float("nan")

        return HorizonErrors(
            mae=ratio(abs_err, count).tolist(),
            rmse=ratio(sq_err, count).sqrt().tolist(),
            mape=(100.0 * ratio(ape, mape_count)).tolist(),
            count=[int(c) for c in count.tolist()],
            mae_all=pooled(abs_err, count),
            rmse_all=pooled(sq_err, count) ** 0.5,
            mape_all=100.0 * pooled(ape, mape_count),
        )


def horizon_errors(pred, target, mask) -> HorizonErrors:
    """One-shot :class:`HorizonMetrics` over whole arrays [S, Q, N] (numpy or torch)."""
    pred, target, mask = (torch.as_tensor(a) for a in (pred, target, mask))
    metrics = HorizonMetrics(pred.shape[1])
    metrics.update(pred, target, mask)
    return metrics.compute()


def step_minutes(step: int, interval_minutes: float) -> float:
    """Lead time of horizon ``step`` (1-based) in minutes."""
    return step * interval_minutes


def steps_for_minutes(minutes: tuple[int, ...], interval_minutes: float, horizon_steps: int) -> dict[int, int]:
    """Map each lead time in minutes to its 1-based horizon step, where the data's interval has one.

    With 5-minute data, 15/30/60 minutes are steps 3/6/12; a lead time that
    is not a whole number of intervals, or lies beyond the horizon, is left out.
    """
    found = {}
    for m in minutes:
        step = m / interval_minutes
        if abs(step - round(step)) < 1e-9 and 1 <= round(step) <= horizon_steps:
            found[m] = int(round(step))
    return found
