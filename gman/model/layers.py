"""The building blocks of GMAN (Zheng et al., AAAI 2020), one concept per class.

Notation used in every docstring here:

* ``B`` batch, ``T`` number of time steps of the tensor at hand (``P`` history
  or ``Q`` horizon), ``N`` sensors, ``K`` attention heads, ``d`` dimensions per
  head, ``D = K·d`` the model width.
* Every hidden tensor is **channels-last**, ``[B, T, N, D]``; the "FC" layers of
  the paper are per-position ``nn.Linear`` layers applied to the last dimension
  (the authors implement them as 1×1 convolutions, which is the same thing).
* ``‖`` is concatenation along the channel dimension, ``σ`` the logistic
  sigmoid, ``⊙`` the element-wise product.

Spatio-temporal embeddings are passed between modules either as a full tensor
``STE [B, T, N, D]`` or, inside :class:`gman.model.GMAN`, in factored form as a
:class:`STE` pair ``(spatial [N, D], temporal [B, T, D])`` whose broadcast sum
is the full tensor.  Every module accepts both; with the factored form a layer
that projects ``[X ‖ STE]`` computes ``X·W_x + e_S·W_e + e_T·W_e + b`` instead
of ``[X ‖ e_S + e_T]·W + b`` — the same numbers (up to float rounding), without
materialising ``STE`` and with half the multiply-adds.

Batch normalisation follows the authors' TensorFlow code by default: it sits
between the linear map and the activation, **only** in FC layers that have an
activation (``batch_norm="activation"``), with ``eps = 1e-3``; ``"all"`` puts
it after every FC layer except the network's final 1-channel output, ``"none"``
removes it.  The authors' EMA decay ``δ`` corresponds to PyTorch's
``momentum = 1 − δ``; their schedule starts at momentum 0.5 (see
``GMAN.set_bn_momentum``).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BATCH_NORM_MODES",
    "STE",
    "BatchNorm",
    "FC",
    "SpatioTemporalEmbedding",
    "SpatialAttention",
    "TemporalAttention",
    "GatedFusion",
    "STAttBlock",
    "TransformAttention",
    "SPATIAL_ATTENTIONS",
    "attention",
]

BATCH_NORM_MODES = ("activation", "all", "none")
BN_EPS = 1e-3


class STE(NamedTuple):
    """Factored spatio-temporal embedding: ``STE[b, t, n] = spatial[n] + temporal[b, t]``.

    spatial:  [N, D]
    temporal: [B, T, D]
    """

    spatial: Tensor
    temporal: Tensor

    def full(self) -> Tensor:
        """The materialised embedding, [B, T, N, D]."""
        return self.temporal.unsqueeze(2) + self.spatial

    def steps(self, start: int, stop: int) -> "STE":
        """The embedding of time steps ``start:stop`` (the temporal half is sliced)."""
        return STE(self.spatial, self.temporal[:, start:stop])


SteLike = Union[Tensor, STE]


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


class BatchNorm(nn.BatchNorm1d):
    """Batch normalisation over the last dimension of a tensor of any rank.

    ``y = γ ⊙ (x − μ) / √(σ² + ε) + β`` with per-channel statistics taken over
    all leading dimensions (``x.reshape(-1, C)``), no permutes.  Unlike
    ``nn.BatchNorm1d`` it accepts a single row in training mode (then the
    normalised value is ``β``), which happens for the spatial embedding of a
    one-sensor network.

    x: [..., C] -> [..., C]
    """

    def __init__(self, num_features: int, eps: float = BN_EPS, momentum: float = 0.5) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        flat = x.reshape(-1, x.shape[-1])
        running_mean, running_var = self.running_mean, self.running_var
        if self.training:
            self.num_batches_tracked.add_(1)
            if flat.shape[0] == 1:
                # one row: the unbiased variance is undefined; normalise with the
                # batch statistics (output = β) and leave the running statistics alone
                running_mean = running_var = None
        momentum = 0.0 if self.momentum is None else float(self.momentum)
        out = torch.batch_norm(
            flat, self.weight, self.bias, running_mean, running_var,
            self.training, momentum, self.eps, torch.backends.cudnn.enabled,
        )
        return out.view(x.shape)


def _glorot_(weight: Tensor, chunks: int = 1) -> None:
    """Glorot-uniform init; a fused weight of ``chunks`` stacked projections is
    initialised chunk by chunk, as if each were its own layer."""
    with torch.no_grad():
        for part in weight.chunk(chunks, dim=0):
            fan_out, fan_in = part.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            part.uniform_(-bound, bound)


class FC(nn.Module):
    """A stack of per-position fully connected layers (the authors' ``FC``).

    Layer ``i``:  ``h ← act_i(BN_i(dropout(h)·W_iᵀ + b_i))`` where ``act_i`` is
    ReLU or the identity, ``BN_i`` is present according to ``batch_norm`` (see
    the module docstring), and dropout (the authors' ``drop``) is applied
    before every layer when ``dropout > 0``.  Weights are Glorot-uniform,
    biases zero.

    x: [..., in_dim] -> [..., dims[-1]]

    ``chunks[i] > 1`` marks layer ``i`` as ``chunks[i]`` independent
    projections fused into one weight (e.g. query, key and value), initialised
    separately; batch-norm statistics are per channel, so the fusion changes
    nothing.  ``no_bn_last=True`` exempts the last layer from ``"all"`` (the
    network's 1-channel output).
    """

    def __init__(
        self,
        in_dim: int,
        dims: Sequence[int],
        activations: Sequence[bool],
        batch_norm: str = "activation",
        bn_momentum: float = 0.5,
        bias: bool = True,
        dropout: float = 0.0,
        chunks: Sequence[int] | None = None,
        no_bn_last: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("batch_norm", batch_norm, BATCH_NORM_MODES)
        if len(dims) != len(activations):
            raise ValueError("FC: dims and activations must have the same length")
        chunks = list(chunks) if chunks is not None else [1] * len(dims)
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.activations = list(activations)
        self.dropout = float(dropout)
        prev = in_dim
        for i, (dim, act) in enumerate(zip(dims, activations)):
            lin = nn.Linear(prev, dim, bias=bias)
            _glorot_(lin.weight, chunks[i])
            if bias:
                nn.init.zeros_(lin.bias)
            self.linears.append(lin)
            with_bn = (batch_norm == "activation" and act) or (
                batch_norm == "all" and not (no_bn_last and i == len(dims) - 1)
            )
            self.norms.append(BatchNorm(dim, momentum=bn_momentum) if with_bn else nn.Identity())
            prev = dim

    def layer(self, i: int, x: Tensor, pre: Tensor | None = None) -> Tensor:
        """Layer ``i`` on ``x``; ``pre``, when given, is the layer's already computed
        pre-activation (the linear map's output), so only BN and ReLU remain."""
        if pre is None:
            if self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            pre = self.linears[i](x)
        h = self.norms[i](pre)
        if self.activations[i]:
            # in place is safe: neither addmm nor batch-norm keep their output for backward
            h = torch.relu_(h)
        return h

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        for i in range(len(self.linears)):
            x = self.layer(i, x)
        return x


def project_concat(linear: nn.Linear, x: Tensor, ste: SteLike, temporal_major: bool = False) -> Tensor:
    """``[X ‖ STE]·Wᵀ + b`` for a linear layer with ``in_features = 2D``.

    x:   [B, T, N, D]  (or [B, N, T, D] when ``temporal_major``: sensors before steps)
    ste: [B, T, N, D] (same layout as x) or an :class:`STE` pair
    ->   [B, T, N, out] (or [B, N, T, out])

    With an :class:`STE` pair, ``W = [W_x | W_e]`` is split and the result is
    ``X·W_xᵀ + (e_T·W_eᵀ + b) + e_S·W_eᵀ`` (a broadcast sum), computed as one
    ``addmm`` on the flattened rows.
    """
    if not isinstance(ste, STE):
        return linear(torch.cat((x, ste), dim=-1))
    d = x.shape[-1]
    w_x, w_e = linear.weight[:, :d], linear.weight[:, d:]
    te = F.linear(ste.temporal, w_e, linear.bias)  # [B, T, out]
    se = F.linear(ste.spatial, w_e)  # [N, out]
    if temporal_major:
        base = te.unsqueeze(1) + se.unsqueeze(1)  # [B, N, T, out]
    else:
        base = te.unsqueeze(2) + se  # [B, T, N, out]
    out = torch.addmm(base.reshape(-1, base.shape[-1]), x.reshape(-1, d), w_x.t())
    return out.view(base.shape)


def attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False) -> Tensor:
    """Multi-head scaled dot-product attention, ``softmax(QKᵀ/√d)·V`` per head.

    q: [G, Lq, K, d], k, v: [G, Lk, K, d]  (any strides with unit last stride)
    -> [G, Lq, K, d] contiguous, so that ``.view(G, Lq, K·d)`` is free.

    Calls the fused ``F.scaled_dot_product_attention`` with the ``[G, K, L, d]``
    views it takes (on the CPU its flash kernel reads these strides directly
    and writes its output in ``[G, Lq, K, d]`` order).  ``is_causal`` keeps
    query ``i`` from attending to keys ``j > i``.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal
    )
    return out.transpose(1, 2).contiguous()


class SpatialAttention(nn.Module):
    """Spatial attention: at every time step, every sensor attends to all ``N`` sensors.

    For each head ``k = 1..K`` (channels ``k·d … k·d + d − 1``)::

        H̃ = [X ‖ STE]                                    [B, T, N, 2D]
        Q = ReLU(BN(H̃·W_Q + b_Q)),  K_, V likewise        [B, T, N, D] each
        s^(k)_{t,v,u} = ⟨Q^(k)_{t,v}, K_^(k)_{t,u}⟩ / √d   u, v ∈ 1..N
        α^(k)_{t,v,·} = softmax_u(s^(k)_{t,v,u})
        h^(k)_{t,v}  = Σ_u α^(k)_{t,v,u} · V^(k)_{t,u}
        H_S = ‖_k h^(k)                                   [B, T, N, D]
        H_S ← FC[D, D](H_S)   (ReLU, then linear; only if output_fc)

    No adjacency mask: the graph enters through the spatial embedding only.
    The output FC is in the authors' code, not in the paper's equation (5)
    (``output_fc=False`` gives the paper's form).

    forward(x [B, T, N, D], ste [B, T, N, D] | STE) -> [B, T, N, D]
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        batch_norm: str = "activation",
        bn_momentum: float = 0.5,
        output_fc: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        dim = num_heads * head_dim
        self.qkv = FC(2 * dim, [3 * dim], [True], batch_norm, bn_momentum, chunks=[3])
        self.out = FC(dim, [dim, dim], [True, False], batch_norm, bn_momentum) if output_fc else None

    def forward(self, x: Tensor, ste: SteLike) -> Tensor:  # noqa: D102
        b, t, n, dim = x.shape
        qkv = self.qkv.layer(0, x, project_concat(self.qkv.linears[0], x, ste))  # [B, T, N, 3D]
        qkv = qkv.view(b * t, n, 3, self.num_heads, self.head_dim)
        h = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).view(b, t, n, dim)
        return self.out(h) if self.out is not None else h


class TemporalAttention(nn.Module):
    """Temporal attention: at every sensor, every time step attends to the steps.

    For each head ``k`` and sensor ``v``::

        H̃ = [X ‖ STE]                                     [B, T, N, 2D]
        Q, K_, V = ReLU(BN(H̃·W + b))                       [B, T, N, D] each
        u^(k)_{v,j,t} = ⟨Q^(k)_{j,v}, K_^(k)_{t,v}⟩ / √d    j, t ∈ 1..T
        u^(k)_{v,j,t} = −∞  for t > j                        (causal mask)
        β^(k)_{v,j,·} = softmax_t(u^(k)_{v,j,t})
        h^(k)_{j,v}   = Σ_t β^(k)_{v,j,t} · V^(k)_{t,v}
        H_T = ‖_k h^(k), then FC[D, D] (ReLU, linear) if output_fc

    ``causal_mask=True`` (default, the authors' METR-LA code and the paper)
    restricts step ``j`` to steps ``t ≤ j``; their PEMS-BAY code has it off.
    The authors fill masked scores with ``−2¹⁵ + 1`` before the softmax; here
    the fused kernel excludes them exactly (weight 0).  The two agree to
    float32 precision unless unmasked scores come within ~100 of ``−2¹⁵``,
    i.e. never in practice.

    Internally the input is laid out sensor-major ``[B, N, T, ·]`` (one copy)
    so that the attention runs on contiguous ``[B·N, T, K, d]`` views.

    forward(x [B, T, N, D], ste [B, T, N, D] | STE) -> [B, T, N, D]
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        batch_norm: str = "activation",
        bn_momentum: float = 0.5,
        output_fc: bool = True,
        causal_mask: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.causal_mask = bool(causal_mask)
        dim = num_heads * head_dim
        self.qkv = FC(2 * dim, [3 * dim], [True], batch_norm, bn_momentum, chunks=[3])
        self.out = FC(dim, [dim, dim], [True, False], batch_norm, bn_momentum) if output_fc else None

    def forward(self, x: Tensor, ste: SteLike) -> Tensor:  # noqa: D102
        b, t, n, dim = x.shape
        xt = x.transpose(1, 2).contiguous()  # [B, N, T, D]
        ste_t = ste if isinstance(ste, STE) else ste.transpose(1, 2)
        qkv = self.qkv.layer(0, xt, project_concat(self.qkv.linears[0], xt, ste_t, temporal_major=True))
        qkv = qkv.view(b * n, t, 3, self.num_heads, self.head_dim)
        h = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=self.causal_mask)
        h = h.view(b, n, t, dim)
        if self.out is not None:
            h = self.out(h)
        return h.transpose(1, 2).contiguous()


class GatedFusion(nn.Module):
    """Gated fusion of the spatial and temporal attention outputs::

        z = σ(H_S·W_S + H_T·W_T + b)          (W_S has no bias)
        H = z ⊙ H_S + (1 − z) ⊙ H_T           computed as H_T + z ⊙ (H_S − H_T)
        H ← FC[D, D](H)  (ReLU, linear)       only if output_fc (authors' code)

    The paper stops at ``H``; the authors' code adds the FC (``output_fc``).
    With ``batch_norm="all"`` the two gate projections get batch-norm too.

    forward(hs [..., D], ht [..., D]) -> [..., D]
    """

    def __init__(self, dim: int, batch_norm: str = "activation", bn_momentum: float = 0.5, output_fc: bool = True):
        super().__init__()
        self.xs = FC(dim, [dim], [False], batch_norm, bn_momentum, bias=False)
        self.xt = FC(dim, [dim], [False], batch_norm, bn_momentum, bias=True)
        self.out = FC(dim, [dim, dim], [True, False], batch_norm, bn_momentum) if output_fc else None

    def forward(self, hs: Tensor, ht: Tensor) -> Tensor:  # noqa: D102
        lin_s, lin_t = self.xs.linears[0], self.xt.linears[0]
        if isinstance(self.xs.norms[0], nn.Identity) and isinstance(self.xt.norms[0], nn.Identity):
            # one accumulation: XT + H_S·W_Sᵀ
            dim = hs.shape[-1]
            pre = torch.addmm(lin_t(ht).reshape(-1, dim), hs.reshape(-1, dim), lin_s.weight.t()).view(hs.shape)
        else:
            pre = self.xs(hs) + self.xt(ht)
        z = torch.sigmoid(pre)
        h = torch.addcmul(ht, z, hs - ht)
        return self.out(h) if self.out is not None else h


SpatialFactory = Callable[..., nn.Module]
#: Spatial attention implementations by name (``GMAN(spatial_attention=...)``).
#: Each is constructed as ``cls(num_heads, head_dim, batch_norm, bn_momentum,
#: output_fc, **spatial_attention_options)`` and called as ``m(x, ste)``.
SPATIAL_ATTENTIONS: dict[str, SpatialFactory] = {"dense": SpatialAttention}


class STAttBlock(nn.Module):
    """Spatio-temporal attention block with residual connection::

        H_S = SpatialAttention(X, STE);  H_T = TemporalAttention(X, STE)
        H   = GatedFusion(H_S, H_T)
        out = X + H

    forward(x [B, T, N, D], ste [B, T, N, D] | STE) -> [B, T, N, D]

    ``spatial`` may be any module with the same call signature (see
    ``SPATIAL_ATTENTIONS``).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        batch_norm: str = "activation",
        bn_momentum: float = 0.5,
        attention_output_fc: bool = True,
        fusion_output_fc: bool = True,
        causal_mask: bool = True,
        spatial: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dim = num_heads * head_dim
        self.spatial = spatial if spatial is not None else SpatialAttention(
            num_heads, head_dim, batch_norm, bn_momentum, attention_output_fc
        )
        self.temporal = TemporalAttention(
            num_heads, head_dim, batch_norm, bn_momentum, attention_output_fc, causal_mask
        )
        self.fusion = GatedFusion(dim, batch_norm, bn_momentum, fusion_output_fc)

    def forward(self, x: Tensor, ste: SteLike) -> Tensor:  # noqa: D102
        hs = self.spatial(x, ste)
        ht = self.temporal(x, ste)
        return x + self.fusion(hs, ht)


class TransformAttention(nn.Module):
    """Transform attention: each future step attends to the history steps, per sensor.

    For each head ``k`` and sensor ``v``::

        Q  = ReLU(BN(STE_Q·W_Q + b_Q))     [B, Q, N, D]   (future steps)
        K_ = ReLU(BN(STE_P·W_K + b_K))     [B, P, N, D]   (history steps)
        V  = ReLU(BN(X·W_V + b_V))         [B, P, N, D]   (encoder output)
        λ^(k)_{v,j,t} = softmax_t(⟨Q^(k)_{j,v}, K_^(k)_{t,v}⟩ / √d)   j ∈ 1..Q, t ∈ 1..P
        h^(k)_{j,v}   = Σ_t λ^(k)_{v,j,t} · V^(k)_{t,v}
        Y = ‖_k h^(k), then FC[D, D] (ReLU, linear) if output_fc (authors' code)

    forward(x [B, P, N, D], ste_p [B, P, N, D] | STE, ste_q [B, Q, N, D] | STE)
        -> [B, Q, N, D]
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        batch_norm: str = "activation",
        bn_momentum: float = 0.5,
        output_fc: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        dim = num_heads * head_dim
        self.q = FC(dim, [dim], [True], batch_norm, bn_momentum)
        self.k = FC(dim, [dim], [True], batch_norm, bn_momentum)
        self.v = FC(dim, [dim], [True], batch_norm, bn_momentum)
        self.out = FC(dim, [dim, dim], [True, False], batch_norm, bn_momentum) if output_fc else None

    def _project_ste(self, fc: FC, ste: SteLike) -> Tensor:
        """FC of an embedding, laid out sensor-major: [B, N, T, D]."""
        lin = fc.linears[0]
        if isinstance(ste, STE):
            pre = F.linear(ste.temporal, lin.weight, lin.bias).unsqueeze(1) + F.linear(ste.spatial, lin.weight).unsqueeze(1)
        else:
            pre = lin(ste.transpose(1, 2))
        return fc.layer(0, None, pre)  # type: ignore[arg-type]

    def forward(self, x: Tensor, ste_p: SteLike, ste_q: SteLike) -> Tensor:  # noqa: D102
        b, p, n, dim = x.shape
        q = self._project_ste(self.q, ste_q)  # [B, N, Q, D]
        k = self._project_ste(self.k, ste_p)  # [B, N, P, D]
        v = self.v(x.transpose(1, 2).contiguous())  # [B, N, P, D]
        nq = q.shape[2]
        shape = (self.num_heads, self.head_dim)
        h = attention(
            q.reshape(b * n, nq, *shape), k.reshape(b * n, p, *shape), v.reshape(b * n, p, *shape)
        ).view(b, n, nq, dim)
        if self.out is not None:
            h = self.out(h)
        return h.transpose(1, 2).contiguous()


class SpatioTemporalEmbedding(nn.Module):
    """Spatio-temporal embedding (STE).

    Spatial:  ``e_S = FC[D, D](SE)`` (ReLU, linear)                 SE [N, D_se] -> [N, D]
    Temporal: ``e_T = FC[D, D](onehot(dow, 7) ‖ onehot(tod, T_day))`` time [B, T, 2] -> [B, T, D]
    STE = e_S + e_T broadcast to [B, T, N, D]; returned factored as :class:`STE`.

    ``T_day = steps_per_day = 86400 / interval seconds``.  A one-hot row times a
    weight matrix selects one column of it, so the first temporal layer is
    computed as ``W[:, dow] + W[:, 7 + tod] + b`` (an index lookup of the
    ``nn.Linear(7 + T_day, D)`` weight) — exactly the FC of the one-hot
    vector, without building it.  Out-of-range indices raise an index error.

    forward(se [N, D_se], time [B, T, 2] long) -> STE(spatial [N, D], temporal [B, T, D])
    """

    def __init__(self, se_dim: int, steps_per_day: int, dim: int, batch_norm: str = "activation", bn_momentum: float = 0.5):
        super().__init__()
        self.steps_per_day = steps_per_day
        self.spatial = FC(se_dim, [dim, dim], [True, False], batch_norm, bn_momentum)
        self.temporal = FC(7 + steps_per_day, [dim, dim], [True, False], batch_norm, bn_momentum)

    def forward(self, se: Tensor, time: Tensor) -> STE:  # noqa: D102
        e_s = self.spatial(se)
        lin = self.temporal.linears[0]
        table = lin.weight.t()  # [7 + T_day, D]: row i = W · onehot_i
        dow, tod = time[..., 0], time[..., 1]
        pre = F.embedding(dow, table) + F.embedding(tod + 7, table)
        if lin.bias is not None:
            pre = pre + lin.bias
        e_t = self.temporal.layer(0, None, pre)  # type: ignore[arg-type]
        e_t = self.temporal.layer(1, e_t)
        return STE(e_s, e_t)
