"""Masked MAE / RMSE / MAPE per horizon step."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gman.training.metrics import HorizonMetrics, horizon_errors, masked_mae, steps_for_minutes


def test_masked_mae_ignores_missing_labels():
    pred = torch.tensor([[1.0, 2.0, 3.0]])
    target = torch.tensor([[2.0, 0.0, 5.0]])     # 0.0 = missing reading
    mask = torch.tensor([[True, False, True]])
    assert masked_mae(pred, target, mask).item() == pytest.approx((1.0 + 2.0) / 2)
    assert masked_mae(pred, target, torch.zeros_like(mask)).item() == 0.0


def test_a_nan_label_where_the_mask_is_false_changes_neither_the_loss_nor_its_gradient():
    """Users' own arrays hold missing readings as NaN: 0 · NaN would make the loss and its gradient NaN."""
    pred = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    losses, grads = [], []
    for missing in (0.0, float("nan")):
        target = torch.tensor([[2.0, missing, 5.0]])
        loss = masked_mae(pred, target, mask)
        (grad,) = torch.autograd.grad(loss, pred)
        losses.append(loss.item())
        grads.append(grad)
    assert losses == [pytest.approx(1.5)] * 2
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], torch.tensor([[-0.5, 0.0, -0.5]]))


def test_masked_mae_needs_one_shape_and_takes_numpy_arrays():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(5, 3, 4)), rng.normal(size=(5, 3, 4))
    mask = rng.random((5, 3, 4)) > 0.3
    loss = masked_mae(pred, target, mask)
    assert torch.is_tensor(loss) and loss.item() == pytest.approx(np.abs(pred - target)[mask].mean())
    for bad_target, bad_mask in ((target, mask[:, :1]), (target[:, :, :1], mask)):  # would broadcast
        with pytest.raises(ValueError, match=r"^masked_mae: pred, target and mask must share one shape, got \[5, 3, 4\], "):
            masked_mae(torch.tensor(pred), torch.tensor(bad_target), torch.tensor(bad_mask))


def test_per_step_errors_match_a_direct_computation():
    rng = np.random.default_rng(0)
    pred = rng.normal(50, 10, size=(7, 4, 5))
    target = rng.normal(50, 10, size=(7, 4, 5))
    mask = rng.random((7, 4, 5)) > 0.3
    target[~mask] = 0.0
    errors = horizon_errors(pred, target, mask)
    for q in range(4):
        m = mask[:, q]
        err = pred[:, q][m] - target[:, q][m]
        assert errors.mae[q] == pytest.approx(np.abs(err).mean())
        assert errors.rmse[q] == pytest.approx(np.sqrt((err ** 2).mean()))
        assert errors.mape[q] == pytest.approx(100 * np.mean(np.abs(err) / np.abs(target[:, q][m])))
        assert errors.count[q] == m.sum()
    all_err = (pred - target)[mask]
    assert errors.mae_all == pytest.approx(np.abs(all_err).mean())
    assert errors.rmse_all == pytest.approx(np.sqrt((all_err ** 2).mean()))


def test_batches_combine_exactly_and_zero_labels_never_give_nan():
    rng = np.random.default_rng(1)
    pred = torch.tensor(rng.normal(size=(10, 3, 4)))
    target = torch.tensor(rng.normal(size=(10, 3, 4)))
    target[0, 0, 0] = 0.0                        # observed zero: left out of MAPE only
    mask = torch.ones(10, 3, 4, dtype=torch.bool)
    whole = horizon_errors(pred, target, mask)
    metrics = HorizonMetrics(3)
    for chunk in (slice(0, 3), slice(3, 4), slice(4, 10)):
        metrics.update(pred[chunk], target[chunk], mask[chunk])
    parts = metrics.compute()
    assert parts.mae == pytest.approx(whole.mae)
    assert parts.rmse == pytest.approx(whole.rmse)
    assert parts.mape == pytest.approx(whole.mape)
    assert parts.count == whole.count
    assert (parts.mae_all, parts.rmse_all, parts.mape_all) == pytest.approx((whole.mae_all, whole.rmse_all, whole.mape_all))
    assert parts.mae[0] == pytest.approx((pred[:, 0] - target[:, 0]).abs().mean().item())
    # MAPE of step 1 over the 39 non-zero labels only (the zero one would add ~1e4 %, not a NaN)
    err, y = (pred[:, 0] - target[:, 0]).numpy().ravel(), target[:, 0].numpy().ravel()
    kept = y != 0
    assert kept.sum() == 39
    assert parts.mape[0] == pytest.approx(100 * np.mean(np.abs(err[kept]) / np.abs(y[kept])))
    assert parts.mae_all == pytest.approx((pred - target).abs().mean().item())


def test_nan_labels_where_the_mask_is_false_do_not_make_the_errors_nan():
    rng = np.random.default_rng(2)
    pred, target = rng.normal(50, 10, size=(6, 3, 4)), rng.normal(50, 10, size=(6, 3, 4))
    mask = rng.random((6, 3, 4)) > 0.3
    with_nan = horizon_errors(pred, np.where(mask, target, np.nan), mask)
    with_zero = horizon_errors(pred, np.where(mask, target, 0.0), mask)
    assert math.isfinite(with_nan.mae_all) and math.isfinite(with_nan.rmse_all) and math.isfinite(with_nan.mape_all)
    assert with_nan == with_zero


def test_a_step_without_labels_is_nan_not_zero():
    errors = horizon_errors(np.ones((2, 2, 1)), np.ones((2, 2, 1)), np.array([[[True], [False]]] * 2))
    assert errors.mae[0] == 0.0 and math.isnan(errors.mae[1])


def test_minutes_map_to_steps_for_the_data_interval():
    assert steps_for_minutes((15, 30, 60), 5.0, 12) == {15: 3, 30: 6, 60: 12}
    assert steps_for_minutes((15, 30, 60), 15.0, 4) == {15: 1, 30: 2, 60: 4}
    assert steps_for_minutes((15, 30, 60), 10.0, 12) == {30: 3, 60: 6}   # 15 min is no whole step
