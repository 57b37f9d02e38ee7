"""Each GMAN layer against a small, independent float64 computation of its equations.

The references below are written from the equations (paper + authors' code),
with explicit per-head loops and ``einsum``; they read the module's weights
but none of its code.  Tolerance 1e-6 in float64.
"""
from __future__ import annotations

import pytest
import torch

from gman.model import (
    GMAN,
    STE,
    GatedFusion,
    SpatialAttention,
    SpatioTemporalEmbedding,
    TemporalAttention,
    TransformAttention,
)

TOL = dict(rtol=1e-6, atol=1e-6)
B, T, N, K, D_HEAD = 2, 5, 6, 3, 2  # K != d
DIM = K * D_HEAD


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """These tiny models run fastest (and steadiest on a busy machine) on one thread."""


# ------------------------------------------------------------------ reference
def ref_bn(x, bn, training):
    """Batch-norm over all leading dims, eps from the module (1e-3)."""
    if bn is None:
        return x
    flat = x.reshape(-1, x.shape[-1])
    if training:
        mean, var = flat.mean(0), flat.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def ref_fc(x, fc, training):
    """FC stack: act(BN(x W^T + b)) layer by layer."""
    for lin, norm, act in zip(fc.linears, fc.norms, fc.activations):
        x = x @ lin.weight.T + (lin.bias if lin.bias is not None else 0)
        x = ref_bn(x, norm if isinstance(norm, torch.nn.BatchNorm1d) else None, training)
        if act:
            x = torch.clamp(x, min=0)
    return x


def ref_heads(q, k, v, mask=None):
    """Per head h: softmax(q_h k_h^T / sqrt(d)) v_h over the second-to-last axis.

    q: [..., Lq, D], k, v: [..., Lk, D]; heads are K consecutive channel groups of d.
    """
    outs = []
    for h in range(K):
        sl = slice(h * D_HEAD, (h + 1) * D_HEAD)
        s = torch.einsum("...id,...jd->...ij", q[..., sl], k[..., sl]) / D_HEAD ** 0.5
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        a = torch.exp(s - s.amax(-1, keepdim=True))
        a = a / a.sum(-1, keepdim=True)
        outs.append(torch.einsum("...ij,...jd->...id", a, v[..., sl]))
    return torch.cat(outs, dim=-1)


def ref_qkv(x, ste, fc, training):
    """Q, K, V = ReLU(BN([X || STE] W + b)) with the fused weight split in three."""
    h = ref_fc(torch.cat((x, ste), dim=-1), fc, training)
    return h[..., :DIM], h[..., DIM:2 * DIM], h[..., 2 * DIM:]


def ref_spatial(m, x, ste, training):
    q, k, v = ref_qkv(x, ste, m.qkv, training)  # [B, T, N, D]: attention over N
    h = ref_heads(q, k, v)
    return ref_fc(h, m.out, training) if m.out is not None else h


def ref_temporal(m, x, ste, training, causal):
    q, k, v = ref_qkv(x, ste, m.qkv, training)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, T, D]: attention over T
    steps = x.shape[1]
    mask = torch.ones(steps, steps, dtype=torch.bool).tril() if causal else None
    h = ref_heads(q, k, v, mask).transpose(1, 2)
    return ref_fc(h, m.out, training) if m.out is not None else h


def ref_transform(m, x, ste_p, ste_q, training):
    q = ref_fc(ste_q, m.q, training).transpose(1, 2)
    k = ref_fc(ste_p, m.k, training).transpose(1, 2)
    v = ref_fc(x, m.v, training).transpose(1, 2)
    h = ref_heads(q, k, v).transpose(1, 2)
    return ref_fc(h, m.out, training) if m.out is not None else h


def ref_fusion(m, hs, ht, training):
    xs = ref_fc(hs, m.xs, training)
    xt = ref_fc(ht, m.xt, training)
    z = 1.0 / (1.0 + torch.exp(-(xs + xt)))
    h = z * hs + (1 - z) * ht
    return ref_fc(h, m.out, training) if m.out is not None else h


def ref_ste(m, se, time, steps_per_day, training):
    e_s = ref_fc(se, m.spatial, training)  # [N, D]
    onehot = torch.cat(
        (torch.nn.functional.one_hot(time[..., 0], 7), torch.nn.functional.one_hot(time[..., 1], steps_per_day)), -1
    ).double()
    e_t = ref_fc(onehot, m.temporal, training)  # [B, T, D]
    return e_t[:, :, None, :] + e_s[None, None]


# ------------------------------------------------------------------ helpers
def randomise(module):
    """Give batch-norm layers non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(7)
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm1d):
            c = bn.num_features
            with torch.no_grad():
                bn.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                bn.bias.copy_(0.3 * torch.randn(c, generator=g))
                bn.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return module.double()


def factored(steps, n=N, batch=B, seed=3):
    g = torch.Generator().manual_seed(seed)
    ste = STE(torch.randn(n, DIM, generator=g, dtype=torch.float64),
              torch.randn(batch, steps, DIM, generator=g, dtype=torch.float64))
    return ste


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MODES = [
    pytest.param("activation", True, True, id="bn-act-train"),
    pytest.param("activation", False, True, id="bn-act-eval"),
    pytest.param("all", True, True, id="bn-all-train"),
    pytest.param("none", True, False, id="no-bn-paper-form"),
]


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("batch_norm,training,output_fc", MODES)
@pytest.mark.parametrize("factored_ste", [False, True])
def test_spatial_attention_matches_reference(batch_norm, training, output_fc, factored_ste):
    torch.manual_seed(0)
    m = randomise(SpatialAttention(K, D_HEAD, batch_norm, output_fc=output_fc)).train(training)
    x, ste = rand(B, T, N, DIM), factored(T)
    got = m(x, ste if factored_ste else ste.full())
    torch.testing.assert_close(got, ref_spatial(m, x, ste.full(), training), **TOL)


@pytest.mark.parametrize("batch_norm,training,output_fc", MODES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("factored_ste", [False, True])
def test_temporal_attention_matches_reference(batch_norm, training, output_fc, causal, factored_ste):
    torch.manual_seed(0)
    m = randomise(TemporalAttention(K, D_HEAD, batch_norm, output_fc=output_fc, causal_mask=causal)).train(training)
    x, ste = rand(B, T, N, DIM), factored(T)
    got = m(x, ste if factored_ste else ste.full())
    torch.testing.assert_close(got, ref_temporal(m, x, ste.full(), training, causal), **TOL)


@pytest.mark.parametrize("batch_norm,training,output_fc", MODES)
@pytest.mark.parametrize("factored_ste", [False, True])
def test_transform_attention_matches_reference(batch_norm, training, output_fc, factored_ste):
    torch.manual_seed(0)
    P, Q = 4, 3
    m = randomise(TransformAttention(K, D_HEAD, batch_norm, output_fc=output_fc)).train(training)
    x, ste = rand(B, P, N, DIM), factored(P + Q)
    ste_p, ste_q = ste.steps(0, P), ste.steps(P, P + Q)
    if not factored_ste:
        ste_p, ste_q = ste_p.full(), ste_q.full()
    got = m(x, ste_p, ste_q)
    assert got.shape == (B, Q, N, DIM)
    torch.testing.assert_close(got, ref_transform(m, x, ste.full()[:, :P], ste.full()[:, P:], training), **TOL)


@pytest.mark.parametrize("batch_norm,training,output_fc", MODES)
def test_gated_fusion_matches_reference(batch_norm, training, output_fc):
    torch.manual_seed(0)
    m = randomise(GatedFusion(DIM, batch_norm, output_fc=output_fc)).train(training)
    hs, ht = rand(B, T, N, DIM, seed=1), rand(B, T, N, DIM, seed=2)
    torch.testing.assert_close(m(hs, ht), ref_fusion(m, hs, ht, training), **TOL)


@pytest.mark.parametrize("training", [True, False])
def test_spatio_temporal_embedding_matches_one_hot_reference(training):
    torch.manual_seed(0)
    spd = 48
    m = randomise(SpatioTemporalEmbedding(5, spd, DIM)).train(training)
    with torch.no_grad():  # non-zero biases so the lookup's bias handling is exercised
        for lin in m.temporal.linears:
            lin.bias.normal_()
    se = rand(N, 5)
    time = torch.stack((torch.randint(0, 7, (B, T)), torch.randint(0, spd, (B, T))), -1)
    ste = m(se, time)
    assert ste.spatial.shape == (N, DIM) and ste.temporal.shape == (B, T, DIM)
    torch.testing.assert_close(ste.full(), ref_ste(m, se, time, spd, training), **TOL)


def test_whole_model_matches_reference_composition():
    """GMAN.forward = input FC → encoder blocks → transform → decoder blocks → output FC."""
    torch.manual_seed(0)
    P, Q, spd = 4, 3, 24
    model = randomise(GMAN(N, spd, se_dim=5, history_steps=P, horizon_steps=Q, num_layers=2,
                           num_heads=K, head_dim=D_HEAD, dropout=0.0)).eval()
    model.set_spatial_embedding(rand(N, 5, seed=4))
    x = rand(B, P, N, seed=5)
    time = torch.stack((torch.randint(0, 7, (B, P + Q)), torch.randint(0, spd, (B, P + Q))), -1)

    ste = ref_ste(model.ste, model.spatial_embedding, time, spd, False)
    ste_p, ste_q = ste[:, :P], ste[:, P:]
    h = ref_fc(x[..., None], model.input_fc, False)

    def block(blk, h, s):
        hs = ref_spatial(blk.spatial, h, s, False)
        ht = ref_temporal(blk.temporal, h, s, False, True)
        return h + ref_fusion(blk.fusion, hs, ht, False)

    for blk in model.encoder:
        h = block(blk, h, ste_p)
    h = ref_transform(model.transform, h, ste_p, ste_q, False)
    for blk in model.decoder:
        h = block(blk, h, ste_q)
    expected = ref_fc(h, model.output_fc, False)[..., 0]
    torch.testing.assert_close(model(x, time), expected, **TOL)


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("t", [1, 3, 4])
def test_causal_mask_future_steps_do_not_change_the_past(t):
    torch.manual_seed(0)
    m = randomise(TemporalAttention(K, D_HEAD, causal_mask=True)).eval()
    x, ste = rand(B, T, N, DIM), factored(T).full()
    x2, ste2 = x.clone(), ste.clone()
    x2[:, t] += rand(B, N, DIM, seed=9)
    ste2[:, t] += rand(B, N, DIM, seed=10)
    y, y2 = m(x, ste), m(x2, ste2)
    torch.testing.assert_close(y[:, :t], y2[:, :t], rtol=0, atol=1e-12)
    assert (y[:, t:] - y2[:, t:]).abs().amax() > 1e-3

    free = randomise(TemporalAttention(K, D_HEAD, causal_mask=False)).eval()
    assert (free(x, ste)[:, :t] - free(x2, ste2)[:, :t]).abs().amax() > 1e-3


@pytest.mark.parametrize("training", [True, False])
def test_spatial_attention_is_permutation_equivariant(training):
    torch.manual_seed(0)
    m = randomise(SpatialAttention(K, D_HEAD)).train(training)
    x, ste = rand(B, T, N, DIM), factored(T)
    perm = torch.randperm(N)
    y = m(x, ste)
    y_perm = m(x[:, :, perm], STE(ste.spatial[perm], ste.temporal))
    torch.testing.assert_close(y_perm, y[:, :, perm], **TOL)


def test_whole_model_is_permutation_equivariant_in_sensors():
    torch.manual_seed(0)
    model = randomise(GMAN(N, 24, se_dim=5, history_steps=4, horizon_steps=3, num_layers=1,
                           num_heads=K, head_dim=D_HEAD, dropout=0.0))
    se, x = rand(N, 5, seed=4), rand(B, 4, N, seed=5)
    time = torch.stack((torch.randint(0, 7, (B, 7)), torch.randint(0, 24, (B, 7))), -1)
    perm = torch.randperm(N)
    for training in (True, False):
        model.train(training)
        model.set_spatial_embedding(se)
        y = model(x, time)
        model.set_spatial_embedding(se[perm])
        y_perm = model(x[:, :, perm], time)
        torch.testing.assert_close(y_perm, y[:, :, perm], **TOL)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(5, 5), (3, 7), (1, 4)])
def test_short_attention_equals_the_fused_kernel(is_causal, lq, lk):
    """The explicit path that accelerators take for short sequences computes what SDPA does."""
    from gman.model.layers import short_attention

    g = torch.Generator().manual_seed(lq * 10 + lk)
    q = torch.randn(6, lq, 3, 4, generator=g, dtype=torch.float64)
    k = torch.randn(6, lk, 3, 4, generator=g, dtype=torch.float64)
    v = torch.randn(6, lk, 3, 4, generator=g, dtype=torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal).transpose(1, 2)
    got = short_attention(q, k, v, is_causal)
    assert got.shape == (6, lq, 3, 4) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # its gradients against finite differences (views with strides, as the model passes them)
    qkv = torch.randn(2, max(lq, lk), 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    q_, k_, v_ = qkv.unbind(2)
    assert torch.autograd.gradcheck(lambda q, k, v: short_attention(q, k, v, is_causal),
                                    (q_[:, :lq], k_[:, :lk], v_[:, :lk]))
