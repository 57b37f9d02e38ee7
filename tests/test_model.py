"""GMAN module: shapes, configuration, validation, gradients, learning, reproducibility."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gman.model import GMAN, SPATIAL_ATTENTIONS, BatchNorm, SpatialAttention
from gman.model.layers import FC

STEPS_PER_DAY = 288


def make_time(batch: int, steps: int, steps_per_day: int = STEPS_PER_DAY, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dow = torch.randint(0, 7, (batch, steps), generator=g)
    tod = torch.randint(0, steps_per_day, (batch, steps), generator=g)
    return torch.stack((dow, tod), dim=-1)


def small_model(**kw) -> GMAN:
    args = dict(num_nodes=6, steps_per_day=STEPS_PER_DAY, se_dim=8, history_steps=4, horizon_steps=3,
                num_layers=1, num_heads=2, head_dim=3)
    args.update(kw)
    return GMAN(**args)


@pytest.mark.parametrize(
    "B,N,P,Q,L,K,d",
    [
        (2, 5, 12, 12, 1, 8, 8),
        (3, 1, 4, 3, 2, 2, 5),   # N = 1, K != d
        (1, 7, 3, 6, 1, 3, 4),   # B = 1, Q > P
        (2, 4, 6, 2, 3, 1, 16),  # one head
        (2, 3, 1, 1, 1, 4, 2),   # single history / horizon step
    ],
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_output_shapes(B, N, P, Q, L, K, d, mode):
    torch.manual_seed(0)
    model = GMAN(N, STEPS_PER_DAY, se_dim=5, history_steps=P, horizon_steps=Q, num_layers=L,
                 num_heads=K, head_dim=d)
    model.train(mode == "train")
    y = model(torch.randn(B, P, N), make_time(B, P + Q))
    assert y.shape == (B, Q, N)
    assert torch.isfinite(y).all()


def test_steps_per_day_is_not_hard_coded():
    model = small_model(steps_per_day=96)  # 15-minute data
    assert model.ste.temporal.linears[0].in_features == 7 + 96
    y = model(torch.randn(2, 4, 6), make_time(2, 7, steps_per_day=96))
    assert y.shape == (2, 3, 6)


def test_day_of_week_can_be_left_out_of_the_time_embedding():
    torch.manual_seed(0)
    with_dow = small_model().eval()
    time = make_time(2, 7)
    other_days = time.clone()
    other_days[..., 0] = (other_days[..., 0] + 3) % 7
    x = torch.randn(2, 4, 6)
    assert not torch.allclose(with_dow(x, time), with_dow(x, other_days))
    without = small_model(day_of_week=False).eval()
    assert without.ste.temporal.linears[0].in_features == STEPS_PER_DAY
    assert without.config["day_of_week"] is False
    torch.testing.assert_close(without(x, time), without(x, other_days), rtol=0, atol=0)
    rebuilt = GMAN(**without.config)
    rebuilt.load_state_dict(without.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x, time), without(x, time), rtol=0, atol=0)
    with pytest.raises(ValueError, match="day_of_week"):
        small_model(day_of_week="no")
    with pytest.raises(ValueError, match="day_of_week"):
        small_model(day_of_week=1)


def test_weekend_time_embedding_tells_working_days_from_weekend_days_only():
    torch.manual_seed(0)
    model = small_model(day_of_week="weekend").eval()
    assert model.ste.temporal.linears[0].in_features == 2 + STEPS_PER_DAY
    x, time = torch.randn(2, 4, 6), make_time(2, 7)

    def on(day: int):
        t = time.clone()
        t[..., 0] = day
        with torch.no_grad():
            return model(x, t)

    monday, friday, saturday, sunday = on(0), on(4), on(5), on(6)
    torch.testing.assert_close(monday, friday, rtol=0, atol=0)
    torch.testing.assert_close(saturday, sunday, rtol=0, atol=0)
    assert not torch.allclose(monday, saturday)
    rebuilt = GMAN(**model.config)
    assert rebuilt.config["day_of_week"] == "weekend"


def test_heads_are_k_heads_of_d_dims():
    model = small_model(num_heads=2, head_dim=3)
    spatial = model.encoder[0].spatial
    assert isinstance(spatial, SpatialAttention)
    assert (spatial.num_heads, spatial.head_dim) == (2, 3)
    assert model.dim == 6
    assert spatial.qkv.linears[0].weight.shape == (3 * 6, 2 * 6)


def test_config_round_trip_and_json():
    model = small_model(learnable_spatial_embedding=True, causal_mask=False, batch_norm="none",
                        attention_output_fc=False, dropout=0.0)
    cfg = model.config
    assert json.loads(json.dumps(cfg)) == cfg
    rebuilt = GMAN(**cfg)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    x, t = torch.randn(2, 4, 6), make_time(2, 7)
    torch.testing.assert_close(model(x, t), rebuilt(x, t), rtol=0, atol=0)


def test_spatial_embedding_buffer_and_parameter():
    fixed = small_model()
    assert "spatial_embedding" in dict(fixed.named_buffers())
    assert torch.count_nonzero(fixed.spatial_embedding) == 0
    se = torch.randn(6, 8)
    fixed.set_spatial_embedding(se)
    torch.testing.assert_close(fixed.spatial_embedding, se)
    assert "spatial_embedding" in fixed.state_dict()

    learn = small_model(learnable_spatial_embedding=True)
    assert "spatial_embedding" in dict(learn.named_parameters())
    assert learn.spatial_embedding.abs().sum() > 0
    learn.set_spatial_embedding(se)
    torch.testing.assert_close(learn.spatial_embedding.detach(), se)


@pytest.mark.parametrize("bad", [torch.zeros(5, 8), torch.zeros(6, 7), torch.zeros(6), torch.full((6, 8), float("nan"))])
def test_set_spatial_embedding_rejects(bad):
    with pytest.raises(ValueError) as err:
        small_model().set_spatial_embedding(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_nodes=0), dict(steps_per_day=-1), dict(num_heads=2.5), dict(head_dim=True),
        dict(num_layers=0), dict(history_steps="12"), dict(dropout=1.0), dict(dropout=-0.1),
        dict(bn_momentum=0.0), dict(batch_norm="after"), dict(causal_mask=1),
        dict(spatial_attention="nope"), dict(num_nodes=np.float64(6)), dict(num_layers=np.bool_(True)),
        dict(spatial_attention="group", num_groups=np.float32(2)),
    ],
)
def test_constructor_validation(kw):
    with pytest.raises(ValueError) as err:
        small_model(**kw)
    assert "\n" not in str(err.value)


def test_numpy_integers_are_integer_arguments():
    """Sizes read from arrays (``values.shape``, ``np.int64`` scalars) are taken, and the
    config holds plain ints, so it stays JSON-serialisable."""
    model = small_model(num_nodes=np.int64(6), steps_per_day=np.int32(STEPS_PER_DAY), num_heads=np.uint8(2),
                        spatial_attention="group", num_groups=np.int64(2), partition_seed=np.int64(3),
                        dropout=np.float32(0.25))
    config = model.config
    assert config["num_nodes"] == 6 and type(config["num_nodes"]) is int
    assert type(config["num_groups"]) is int and type(config["partition_seed"]) is int
    assert type(model.num_heads) is int
    assert json.loads(json.dumps(config)) == config
    assert model(torch.randn(2, 4, 6), make_time(2, 7)).shape == (2, 3, 6)


def test_forward_validates_shapes():
    model = small_model()  # P = 4, Q = 3, N = 6
    good_time = make_time(2, 7)
    for x in (torch.randn(2, 5, 6), torch.randn(2, 4, 5), torch.randn(4, 6)):  # wrong P, wrong N, no batch
        with pytest.raises(ValueError, match=r"x must have shape \[B, 4, 6\], got"):
            model(x, good_time)
    x = torch.randn(2, 4, 6)
    for time in (make_time(2, 6), make_time(3, 7), make_time(2, 7)[..., :1]):  # wrong P+Q, wrong B, one feature
        with pytest.raises(ValueError, match=r"time must have shape \[2, 7, 2\], got"):
            model(x, time)
    assert model(x, good_time).shape == (2, 3, 6)


def test_forward_refuses_a_time_that_is_not_integer():
    """A float time would be floored: 0.5 (noon, as a fraction of the day) would read as midnight."""
    model = small_model().eval()
    x, time = torch.randn(2, 4, 6), make_time(2, 7)
    for dtype in (torch.float32, torch.float64, torch.bool):
        with pytest.raises(ValueError, match=r"time must be an integer tensor of \(day_of_week, time_of_day_index\) "
                                             rf"pairs, got dtype {dtype}$"):
            model(x, time.to(dtype))
    with torch.no_grad():
        for dtype in (torch.int32, torch.int16):  # any integer dtype reads the same indices
            torch.testing.assert_close(model(x, time.to(dtype)), model(x, time), rtol=0, atol=0)


def test_forward_refuses_x_of_another_dtype_than_the_parameters():
    double = small_model().double()
    with pytest.raises(ValueError, match=r"^GMAN: x has dtype torch.float32, the model's parameters torch.float64; "):
        double(torch.randn(2, 4, 6), make_time(2, 7))
    with pytest.raises(ValueError, match=r"x must be a float tensor of normalised readings, got dtype torch.int64"):
        small_model()(torch.zeros(2, 4, 6, dtype=torch.long), make_time(2, 7))
    assert double(torch.randn(2, 4, 6, dtype=torch.float64), make_time(2, 7)).dtype == torch.float64
    # autocast casts the matrix products' operands itself: float32 parameters take float32 or bf16 x
    model = small_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.bfloat16):
            assert model(torch.randn(2, 4, 6, dtype=dtype), make_time(2, 7)).dtype == torch.bfloat16
        with pytest.raises(ValueError, match="x has dtype torch.float32, the model's parameters torch.float64"):
            double(torch.randn(2, 4, 6), make_time(2, 7))  # autocast leaves float64 alone


def test_batch_norm_placement_and_momentum():
    def count(m):
        return sum(isinstance(x, BatchNorm) for x in m.modules())

    act, every, none = small_model(), small_model(batch_norm="all"), small_model(batch_norm="none")
    assert count(none) == 0 < count(act) < count(every)
    # the final 1-channel output layer never gets batch-norm
    assert not isinstance(every.output_fc.norms[-1], BatchNorm)
    assert all(bn.eps == 1e-3 and bn.momentum == 0.5 for bn in act.modules() if isinstance(bn, BatchNorm))
    # "activation" (the authors' code): batch-norm exactly on the FC layers with a ReLU, nowhere else
    fcs = [m for m in act.modules() if isinstance(m, FC)]
    assert len(fcs) > 10
    for fc in fcs:
        assert [isinstance(n, BatchNorm) for n in fc.norms] == list(fc.activations), fc
    assert not any(isinstance(n, BatchNorm) for n in act.output_fc.norms[-1:])
    fusion = act.encoder[0].fusion
    assert not isinstance(fusion.xs.norms[0], BatchNorm) and not isinstance(fusion.xt.norms[0], BatchNorm)
    assert count(act) == sum(sum(fc.activations) for fc in fcs)
    act.set_bn_momentum(0.1)
    assert all(bn.momentum == 0.1 for bn in act.modules() if isinstance(bn, BatchNorm))
    for model in (every, none):
        y = model(torch.randn(2, 4, 6), make_time(2, 7))
        assert y.shape == (2, 3, 6)


def test_spatial_attention_is_swappable():
    class Zero(torch.nn.Module):
        def __init__(self, num_heads, head_dim, batch_norm, bn_momentum, output_fc, scale=0.0):
            super().__init__()
            self.scale = scale

        def forward(self, x, ste):
            return x * self.scale

    SPATIAL_ATTENTIONS["zero-test"] = Zero
    try:
        model = small_model(spatial_attention="zero-test", spatial_attention_options={"scale": 0.5})
        assert isinstance(model.encoder[0].spatial, Zero) and model.encoder[0].spatial.scale == 0.5
        assert model(torch.randn(2, 4, 6), make_time(2, 7)).shape == (2, 3, 6)
        assert GMAN(**model.config).config == model.config
    finally:
        del SPATIAL_ATTENTIONS["zero-test"]


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = small_model(learnable_spatial_embedding=True, num_layers=2)
    y = model(torch.randn(3, 4, 6), make_time(3, 7))
    (y ** 2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


def test_same_seed_same_output():
    def run():
        torch.manual_seed(123)
        model = small_model(learnable_spatial_embedding=True)
        x = torch.randn(2, 4, 6)
        return model(x, make_time(2, 7))  # training mode: dropout and batch statistics too

    torch.testing.assert_close(run(), run(), rtol=0, atol=0)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """These tiny models run fastest (and steadiest on a busy machine) on one thread."""


def test_learns_a_tiny_signal():
    """A few hundred Adam steps on a periodic signal drive the MAE well down."""
    torch.manual_seed(0)
    n, p, q, spd = 4, 6, 3, 24
    model = GMAN(n, spd, se_dim=4, history_steps=p, horizon_steps=q, num_layers=1, num_heads=2, head_dim=4,
                 dropout=0.0, learnable_spatial_embedding=True)
    steps = torch.arange(2000)
    phase = torch.arange(n) * 0.7
    series = torch.sin(2 * torch.pi * steps[:, None] / spd + phase)  # [T, N]
    time_all = torch.stack((steps // spd % 7, steps % spd), dim=-1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(starts):
        idx = starts[:, None] + torch.arange(p + q)
        return series[idx[:, :p]], time_all[idx], series[idx[:, p:]]

    g = torch.Generator().manual_seed(1)
    eval_x, eval_t, eval_y = batch(torch.randint(0, 1900, (64,), generator=g))
    model.eval()
    with torch.no_grad():
        before = (model(eval_x, eval_t) - eval_y).abs().mean().item()
    model.train()
    for _ in range(300):
        x, t, y = batch(torch.randint(0, 1900, (16,), generator=g))
        opt.zero_grad()
        loss = (model(x, t) - y).abs().mean()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = (model(eval_x, eval_t) - eval_y).abs().mean().item()
    assert after < 0.3 * before, (before, after)
    assert after < 0.2


@pytest.mark.parametrize("causal_mask,blocked", [(True, False), (False, False), (False, True)])
def test_lean_training_path_matches_plain_autograd(monkeypatch, causal_mask, blocked):
    """The memory-lean CPU training functions give the stock operators' outputs,
    gradients and running statistics (float64).  With ``blocked`` the lean path's
    attention over sensors (and over steps, being unmasked) is the blocked one,
    while the plain path keeps PyTorch's fused kernel."""
    from gman.model import layers

    def run(fused: bool):
        torch.manual_seed(0)
        model = small_model(num_layers=2, num_heads=3, head_dim=2, dropout=0.0, causal_mask=causal_mask,
                            learnable_spatial_embedding=True).double()
        x = torch.randn(3, 4, 6, dtype=torch.float64)
        monkeypatch.setattr(layers, "BLOCKED_MIN_KEYS", 1 if fused and blocked else 10**9)
        if not fused:
            monkeypatch.setattr(layers.BatchNorm, "fused_training", lambda self, x: False)
        y = model(x, make_time(3, 7))
        (y.sin() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        monkeypatch.undo()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
        return y.detach(), grads, stats

    y1, g1, s1 = run(True)
    y2, g2, s2 = run(False)
    torch.testing.assert_close(y1, y2, rtol=1e-9, atol=1e-9)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-7, atol=1e-9, msg=name)
    for name in s1:
        torch.testing.assert_close(s1[name], s2[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("frozen", ["batch_norm", "all"])
def test_lean_training_path_with_frozen_parameters_matches_plain_autograd(monkeypatch, frozen):
    """Frozen batch-norm γ, β (fine-tuning), or a frozen model whose input gradient is wanted
    (saliency): the lean functions skip those gradients and give the stock ones for the rest."""
    from gman.model import layers

    def run(fused: bool):
        torch.manual_seed(0)
        model = small_model(dropout=0.0, learnable_spatial_embedding=True).double()
        for name, parameter in model.named_parameters():
            if frozen == "all" or ".norms." in name:
                parameter.requires_grad_(False)
        x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
        if not fused:
            monkeypatch.setattr(layers.BatchNorm, "fused_training", lambda self, x: False)
        y = model(x, make_time(3, 7))
        (y.sin() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        monkeypatch.undo()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return x.grad, grads

    (x1, g1), (x2, g2) = run(True), run(False)
    torch.testing.assert_close(x1, x2, rtol=1e-7, atol=1e-9)
    assert g1.keys() == g2.keys() and (len(g1) == 0) == (frozen == "all")
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-7, atol=1e-9, msg=name)


def test_one_query_row_leaves_the_transform_attentions_running_statistics_finite():
    """B = N = Q = 1: the queries' batch-norm sees one row, whose unbiased variance is undefined;
    the step must leave its running statistics as the plain BatchNorm does (untouched)."""
    torch.manual_seed(0)
    model = small_model(num_nodes=1, history_steps=3, horizon_steps=1, learnable_spatial_embedding=True)
    model(torch.randn(1, 3, 1), make_time(1, 4)).sum().backward()
    query_norm = model.transform.q.norms[0]
    assert torch.equal(query_norm.running_var, torch.ones_like(query_norm.running_var))
    assert all(torch.isfinite(b).all() for n, b in model.named_buffers() if "running" in n)


def test_lean_attention_gradients_do_not_alias_its_scratch_buffers():
    """When an embedding term has the projection's own shape (one sensor), ``sum_to_size``
    returns its input, the scratch buffer: the gradient handed back must be a copy."""
    from gman.model import layers

    torch.manual_seed(0)
    g, length, heads, d = 2, 3, 2, 2
    dim = heads * d
    x = torch.randn(g, length, dim, dtype=torch.float64, requires_grad=True)
    w_x = torch.randn(3 * dim, dim, dtype=torch.float64, requires_grad=True)
    t = torch.randn(g, length, 3 * dim, dtype=torch.float64, requires_grad=True)  # full shape
    s = torch.randn(3 * dim, dtype=torch.float64, requires_grad=True)
    bn = layers.BatchNorm(3 * dim).double()
    out = layers._ProjBNReLUAttention.apply(x, w_x, t, s, *bn.fused_args(), g, heads, True)
    out.sum().backward()
    buffers = {b.untyped_storage().data_ptr() for b in layers._SCRATCH.buffers.values()}
    assert buffers and t.grad.untyped_storage().data_ptr() not in buffers
    torch.testing.assert_close(t.grad.sum(dim=(0, 1)), s.grad)  # the same gradient, summed


def test_scratch_buffers_are_reused_grown_and_released():
    from gman.model.layers import release_scratch, scratch

    like = torch.zeros(1)
    a = scratch(0, (4, 6), like)
    b = scratch(0, (3, 5), like)  # smaller: a view of the same buffer
    assert b.shape == (3, 5) and b.data_ptr() == a.data_ptr()
    c = scratch(1, (4, 6), like)  # another slot: its own memory
    assert c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    d = scratch(0, (10, 10), like)  # larger: a new buffer
    assert d.shape == (10, 10) and d.untyped_storage().nbytes() >= 400
    assert scratch(0, (2, 2), like.double()).dtype == torch.float64  # per dtype
    release_scratch()
    from gman.model import layers

    assert layers._SCRATCH.buffers == {}


@pytest.mark.parametrize("lq,lk", [(70, 70), (9, 9), (5, 9)])
def test_blocked_attention_matches_explicit_softmax(monkeypatch, lq, lk):
    """blocked_attention and its backward against softmax(QKᵀ/√d)·V by autograd
    (float64), over several blocks with a partial last one, on strided inputs."""
    from gman.model import layers

    orig_apply = layers._BlockedAttention.apply
    monkeypatch.setattr(layers, "_BLOCK_SCORES", 2 * lq * lk)  # blocks of 2 (group, head) pairs
    monkeypatch.setattr(layers, "BLOCKED_MIN_KEYS", 1)
    torch.manual_seed(0)
    g, heads, d = 3, 3, 4  # 9 pairs: blocks of 2, 2, 2, 2, 1
    q = torch.randn(g, heads, lq, d, dtype=torch.float64).transpose(1, 2).requires_grad_()
    kv = torch.randn(g, lk, 2, heads, d, dtype=torch.float64, requires_grad=True)
    k, v = kv.unbind(2)
    grad_out = torch.randn(g, lq, heads, d, dtype=torch.float64)

    scores = torch.einsum("gqhe,gkhe->ghqk", q, k) / d**0.5
    expected = torch.einsum("ghqk,gkhe->gqhe", scores.softmax(-1), v)
    expected_grads = torch.autograd.grad(expected, (q, kv), grad_out)

    blocked_calls = []
    monkeypatch.setattr(layers._BlockedAttention, "apply", lambda *a: blocked_calls.append(1) or orig_apply(*a))
    out = layers.attention(q, k, v)  # self-attention: the blocked path on the CPU
    assert len(blocked_calls) == (lq == lk)
    assert out.is_contiguous() and out.shape == (g, lq, heads, d)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out, (q, kv), grad_out), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(layers, "BLOCKED_MIN_KEYS", 10**9)  # the fused kernel agrees too
    torch.testing.assert_close(layers.attention(q, k, v), expected, rtol=1e-10, atol=1e-12)


def test_lean_training_path_is_used_on_cpu_training(monkeypatch):
    from gman.model import layers

    calls = {"attn": 0, "pair": 0, "transform": 0}
    orig_attn, orig_pair = layers._ProjBNReLUAttention.apply, layers._BNReLULinear.apply
    orig_transform = layers._TransformFlashAttention.apply

    def transform(*a):
        calls["transform"] += 1
        return orig_transform(*a)

    def attn(*a):
        calls["attn"] += 1
        return orig_attn(*a)

    def pair(*a):
        calls["pair"] += 1
        return orig_pair(*a)

    monkeypatch.setattr(layers._ProjBNReLUAttention, "apply", attn)
    monkeypatch.setattr(layers._BNReLULinear, "apply", pair)
    monkeypatch.setattr(layers._TransformFlashAttention, "apply", transform)
    model = small_model(num_layers=1)
    model(torch.randn(2, 4, 6), make_time(2, 7))
    assert calls["attn"] == 4 and calls["pair"] > 0 and calls["transform"] == 1  # spatial + temporal, enc + dec
    calls.update(attn=0, pair=0, transform=0)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 4, 6), make_time(2, 7))
    assert calls == {"attn": 0, "pair": 0, "transform": 0}


def test_last_value_residual_adds_the_last_history_step_to_every_horizon_step():
    torch.manual_seed(0)
    plain = GMAN(5, 24, se_dim=4, history_steps=3, horizon_steps=4, num_layers=1, num_heads=2, head_dim=2)
    residual = GMAN(**{**plain.config, "last_value_residual": True})
    residual.load_state_dict(plain.state_dict())
    assert residual.config["last_value_residual"] is True and plain.config["last_value_residual"] is False
    plain.eval(), residual.eval()
    x = torch.randn(2, 3, 5)
    time = torch.randint(0, 7, (2, 7, 2))
    with torch.no_grad():
        expected = plain(x, time) + x[:, -1:, :]
        torch.testing.assert_close(residual(x, time), expected)
    fresh = GMAN(**residual.config).eval()  # a new residual model forecasts the last value exactly
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, time), x[:, -1:, :].expand(2, 4, 5))
    with pytest.raises(ValueError, match="last_value_residual must be true or false"):
        GMAN(5, 24, last_value_residual="yes")


def test_residual_step_gain_scales_each_horizon_steps_change():
    torch.manual_seed(0)
    base = GMAN(5, 24, se_dim=4, history_steps=3, horizon_steps=4, num_layers=1, num_heads=2, head_dim=2,
                last_value_residual=True)
    torch.nn.init.normal_(base.output_fc.linears[-1].weight)  # a non-zero change to scale
    gained = GMAN(**{**base.config, "residual_step_gain": True})
    gained.load_state_dict(base.state_dict(), strict=False)
    gain = torch.tensor([[0.0], [0.5], [1.0], [2.0]])
    with torch.no_grad():
        gained.residual_gain.copy_(gain)
    base.eval(), gained.eval()
    x = torch.randn(2, 3, 5)
    time = torch.randint(0, 7, (2, 7, 2))
    with torch.no_grad():
        last = x[:, -1:, :]
        expected = (base(x, time) - last) * gain + last
        out = gained(x, time)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[:, 0], x[:, -1])  # gain 0 at step 1: exactly the last value
    assert set(GMAN(**gained.config).state_dict()) == set(gained.state_dict())  # config rebuilds the gain
    with pytest.raises(ValueError, match="residual_step_gain needs last_value_residual"):
        GMAN(5, 24, residual_step_gain=True)


def test_cpu_dropout_keeps_the_expectation_and_masks_the_gradient():
    from gman.model.layers import dropout

    torch.manual_seed(0)
    x = torch.full((1_000_003,), 2.0, requires_grad=True)  # not a multiple of four 16-bit draws
    y = dropout(x, 0.25)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - 0.25) < 0.002  # binomial sd 0.0004
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 2.0 / 0.75))  # 1 - p' = round(0.75·2¹⁶)/2¹⁶ = 0.75
    y.sum().backward()
    assert torch.equal(x.grad == 0, y.detach() == 0)
    torch.manual_seed(1)
    a = dropout(torch.ones(1000), 0.1)
    torch.manual_seed(1)
    assert torch.equal(a, dropout(torch.ones(1000), 0.1))  # seeded by torch's generator
    assert not torch.equal(a, dropout(torch.ones(1000), 0.1))
    z = torch.randn(5, 3)
    assert dropout(z, 0.5, training=False) is z
    assert torch.equal(dropout(z, 0.0), z)
    assert torch.equal(dropout(z, 1.0), torch.zeros_like(z))


def test_dropout_sits_before_the_two_output_layers_only_and_is_off_in_eval(monkeypatch):
    """The authors' METR-LA code: dropout 0.1 on the input of each of the two output FC layers, nowhere else."""
    from gman.model import gman as gman_module
    from gman.model import layers

    calls = []
    original = layers.dropout

    def recording(x, p, training=True):
        calls.append((tuple(x.shape), p, training))
        return original(x, p, training)

    monkeypatch.setattr(layers, "dropout", recording)
    monkeypatch.setattr(gman_module, "dropout", recording, raising=False)
    model = small_model(dropout=0.1, head_dim=4)  # D = K·d = 8
    x, time = torch.randn(2, 4, 6), make_time(2, 7)
    model.train()
    model(x, time)
    assert [(shape, p) for shape, p, _ in calls] == [((2, 3, 6, 8), 0.1), ((2, 3, 6, 8), 0.1)]
    assert all(training for _, _, training in calls)
    calls.clear()
    model.eval()
    with torch.no_grad():
        first = model(x, time)
        again = model(x, time)
    assert torch.equal(first, again) and not any(training for _, _, training in calls)
