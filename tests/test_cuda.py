"""GMAN on a CUDA device: the same function as on the CPU, in float32 and bf16 autocast.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.  The CPU side of each comparison takes
the memory-lean training paths (hand-written backward passes, CPU only), so the
gradient test also checks those against plain autograd on the GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch

from gman.model import GMAN
from gman.training import metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

N, P, Q, B = 37, 6, 5, 4
STEPS_PER_DAY = 288


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64 on the CPU."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm())


def make_model(seed: int = 0, **options) -> GMAN:
    torch.manual_seed(seed)
    model = GMAN(N, STEPS_PER_DAY, history_steps=P, horizon_steps=Q, num_layers=2, num_heads=4, head_dim=8,
                 dropout=0.0, **options)
    model.set_spatial_embedding(torch.randn(N, model.se_dim))
    return model


def make_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, P, N, generator=g)
    tod = (torch.randint(0, STEPS_PER_DAY, (B, 1), generator=g) + torch.arange(P + Q)) % STEPS_PER_DAY
    time_ = torch.stack((torch.randint(0, 7, (B, P + Q), generator=g), tod), -1)
    y = torch.randn(B, Q, N, generator=g)
    y[torch.rand(B, Q, N, generator=g) < 0.1] = 0.0
    return x, time_, y


@pytest.fixture(autouse=True)
def exact_float32_matmul():
    """TF32 would blur the float32 comparisons; restore the setting afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("spatial", ["dense", "group"])
def test_inference_on_cuda_matches_float64_on_cpu(spatial):
    options = dict(spatial_attention="group", num_groups=5) if spatial == "group" else {}
    model = make_model(**options).eval()
    x, time_, _ = make_batch()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double(), time_)
        gpu = copy.deepcopy(model).cuda()
        fp32 = gpu(x.cuda(), time_.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu(x.cuda(), time_.cuda())
    assert fp32.shape == bf16.shape == (B, Q, N)
    assert torch.isfinite(bf16.float()).all()
    assert rel_err(fp32, ref) < 1e-4
    assert rel_err(bf16, ref) < 3e-2


def masked_mae(pred, y):
    """The training loss (missing labels are 0), in float32 under autocast."""
    return metrics.masked_mae(pred.float(), y, y != 0)


def test_a_forecaster_on_the_gpu_forecasts_what_it_does_on_the_cpu(tmp_path):
    import numpy as np
    import pandas as pd

    from gman.serving import package as pkg
    from gman.serving.forecaster import Forecaster

    ids = [f"s{i}" for i in range(N)]
    path = pkg.save_package(tmp_path / "pkg", make_model().eval(), scaler_mean=55.0, scaler_std=10.0, sensor_ids=ids,
                            interval=pd.Timedelta("5min"), missing_value=0.0, dataset_name="toy", units="mph")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(55 + 10 * rng.standard_normal((P, N)), columns=ids,
                         index=pd.date_range("2024-05-06 07:00", periods=P, freq="5min"))
    frame.iloc[2, 3] = np.nan
    on_cpu = Forecaster.load(path, backend="torch").predict(frame)
    gpu = Forecaster.load(path, device="cuda")
    assert gpu.device.type == "cuda" and gpu.backend == "torch"
    on_gpu = gpu.predict({"a": frame, "b": frame})  # a batch of two
    for key in ("a", "b"):
        got = on_gpu[on_gpu["history"] == key].drop(columns="history").reset_index(drop=True)
        np.testing.assert_allclose(got["prediction"], on_cpu["prediction"], rtol=0, atol=1e-2)  # mph
        pd.testing.assert_frame_equal(got.drop(columns="prediction"), on_cpu.drop(columns="prediction"))


def test_training_gradients_on_cuda_match_the_cpu_lean_paths():
    model = make_model().train()
    x, time_, y = make_batch()
    cpu = copy.deepcopy(model)
    masked_mae(cpu(x, time_), y).backward()
    gpu = copy.deepcopy(model).cuda()
    masked_mae(gpu(x.cuda(), time_.cuda()), y.cuda()).backward()
    scale = max(float(p.grad.norm()) for p in cpu.parameters() if p.grad is not None)
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        if p_cpu.grad is None:
            assert p_gpu.grad is None, name
            continue
        # biases right before a batch norm have a zero gradient in exact arithmetic: rounding noise
        # on both sides, so the tolerance has an absolute part scaled to the largest gradient
        err = float((p_gpu.grad.double().cpu() - p_cpu.grad.double()).norm())
        assert err <= 1e-3 * float(p_cpu.grad.norm()) + 1e-6 * scale, name
    for (name, b_cpu), b_gpu in zip(cpu.named_buffers(), gpu.buffers()):
        if b_cpu.is_floating_point():  # batch-norm running statistics
            assert rel_err(b_gpu, b_cpu) < 1e-4 or b_cpu.norm() == 0, name


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
def test_each_fused_attention_kernel_gets_gmans_bf16_spatial_attention_right(backend):
    """Forward and backward of gman's spatial attention call (``gman.model.layers.attention`` on
    [G, L, K, d] views, d = 8, which the kernels pad) in bf16, per SDPA backend, against float64
    on the CPU.  On an H100 the mean training loss of a METR-LA-size epoch differed by 13 %
    between a flash and a cuDNN build (experiments/results/gpu/NOTES.md, session 6); this pins
    each kernel down separately.  Skips only where the backend cannot run at all (a probe)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gman.model.layers import attention

    kernel = getattr(SDPBackend, backend)
    probe = torch.zeros(1, 1, 16, 8, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel([kernel]):
            torch.nn.functional.scaled_dot_product_attention(probe, probe, probe)
    except RuntimeError as err:
        pytest.skip(f"{backend} not available here: {str(err).splitlines()[0]}")

    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(12, 207, 8, 8, generator=g, dtype=torch.float64) for _ in range(4))  # [G, L, K, d]
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref_inputs)).transpose(1, 2)
    ref.backward(grad)
    inputs = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([kernel]):
        out = attention(*inputs)
        out.backward(grad.to("cuda", torch.bfloat16))
    assert out.shape == (12, 207, 8, 8)
    assert rel_err(out, ref) < 2e-2
    for got, want in zip(inputs, ref_inputs):
        assert rel_err(got.grad, want.grad) < 3e-2


def test_a_bf16_training_step_does_not_synchronise_with_the_host():
    model = make_model().cuda().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    x, time_, y = (t.cuda() for t in make_batch())

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(x, time_)
        loss = masked_mae(pred, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first = step()  # lazy state (optimiser moments) is created outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            last = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(last) < float(first)


def train_on_the_gpu(tmp_path, compile_mode=None) -> tuple[dict, set]:
    """Two short bf16-mixed epochs with Lightning -> (validation metrics, (module, batch) devices seen)."""
    import lightning as L

    from gman.data.datamodule import GMANDataModule
    from gman.training.module import GMANLightningModule

    L.seed_everything(0)
    datamodule = GMANDataModule(options={"num_sensors": 20, "days": 4}, history_steps=6, horizon_steps=6,
                                batch_size=16, eval_batch_size=64)
    module = GMANLightningModule(num_layers=1, num_heads=4, head_dim=8, se_dim=16, compile_mode=compile_mode)
    devices = set()

    class RecordDevice(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            devices.add((pl_module.device.type, batch["x"].device.type))

    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=2, limit_train_batches=30,
                        callbacks=[RecordDevice()],
                        limit_val_batches=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}, devices


def test_lightning_trains_on_the_gpu_in_bf16_mixed_precision(tmp_path):
    val, devices = train_on_the_gpu(tmp_path)
    assert devices == {("cuda", "cuda")}  # Lightning moves the module back to the CPU after fit
    assert "val_mae" in val, sorted(val)
    assert all(torch.isfinite(torch.tensor(v)) for v in val.values()), val


@pytest.mark.parametrize("compile_mode", ["default", "reduce-overhead"])
def test_compiled_training_on_the_gpu_lands_where_eager_training_does(tmp_path, compile_mode):
    eager, _ = train_on_the_gpu(tmp_path / "eager")
    compiled, devices = train_on_the_gpu(tmp_path / "compiled", compile_mode)
    assert devices == {("cuda", "cuda")}
    # same seed and batches; bf16 and fused kernels, so only loosely equal
    assert compiled["val_mae"] == pytest.approx(eager["val_mae"], rel=0.05), (eager, compiled)
