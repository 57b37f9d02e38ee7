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

Attention runs in the fused ``F.scaled_dot_product_attention`` on
``[G, K, L, d]`` views of channels-last tensors (the CPU flash kernel reads
them without copies), except unmasked attention over many keys on the CPU
(spatial attention), which runs in :func:`blocked_attention`.  Training on the
CPU (float32/float64, autograd on, not under torch.compile or export) takes
memory-lean paths with hand-written backward passes built from the stock
kernels — :class:`_ProjBNReLUAttention` (query/key/value projection + BN +
ReLU + attention),
:class:`_TransformFlashAttention` and :class:`_BNReLULinear` (the tail of each
FC[D, D]) — that keep the layer inputs and batch statistics instead of the
``[B, T, N, 3D]`` projections and recompute those in backward (the attention
projections' into reused :func:`scratch` buffers, out of the heap).  They compute
the same function and gradients as the plain path (tested to 1e-7 in
float64); evaluation, GPUs, autocast, compile and export use the plain path.
"""
from __future__ import annotations

import math
import mmap
import threading
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
DAY_CATEGORIES = {True: 7, False: 0, "weekend": 2}
"""``day_of_week`` settings of the time embedding and the one-hot width each gives."""
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

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        """BN(x), then ReLU when ``relu`` (in place on the fresh output, before it is
        reshaped, so that autograd sees no in-place operation on a view)."""
        flat = x.reshape(-1, x.shape[-1])
        running_mean, running_var = self.running_mean, self.running_var
        if self.training:
            self.num_batches_tracked.add_(1)
            if flat.shape[0] == 1:
                # one row: the unbiased variance is undefined; normalise with the
                # batch statistics (output = β) and leave the running statistics alone
                running_mean = running_var = None
        out = torch.batch_norm(
            flat, self.weight, self.bias, running_mean, running_var,
            self.training, self._momentum(), self.eps, torch.backends.cudnn.enabled,
        )
        if relu:
            out = torch.relu_(out)
        return out.view(x.shape)

    def _momentum(self) -> float:
        return 0.0 if self.momentum is None else float(self.momentum)

    def fused_training(self, x: Tensor) -> bool:
        """Whether the memory-lean training paths (``_BNReLULinear``,
        ``_ProjBNReLUAttention``) apply to ``x``: training on the CPU in
        float32/float64 with autograd recording, more than one row, and not
        inside torch.compile or export tracing (which see the plain operations).
        Counts the batch when they do."""
        ok = (
            self.training
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and x.numel() > x.shape[-1]
        )
        if ok:
            self.num_batches_tracked.add_(1)
        return ok

    def fused_args(self) -> tuple:
        return self.weight, self.bias, self.running_mean, self.running_var, self._momentum(), self.eps


def _bn_relu_forward(x: Tensor, weight, bias, running_mean, running_var, momentum: float, eps: float):
    """Training-mode batch-norm + in-place ReLU on [M, C]; returns (y, mean, invstd)."""
    y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
    return y.relu_(), mean, invstd


def _bn_relu_recompute(x: Tensor, weight, bias, mean, invstd, out: Tensor | None = None) -> Tensor:
    """``ReLU(γ·(x − μ)·s + β)`` from the saved statistics (one pass, no reduction;
    written into ``out`` when given)."""
    scale = weight * invstd
    return torch.addcmul(bias - mean * scale, x, scale, out=out).relu_()


def _bn_relu_backward(grad_y: Tensor, x: Tensor, y: Tensor, weight, mean, invstd, eps: float, mask: list):
    """Gradients of ReLU(BN(x)) w.r.t. x, γ, β (those flagged in ``mask``) with the stock
    kernels; ``grad_y`` (a temporary) is overwritten with the ReLU's backward."""
    grad_pre = torch.ops.aten.threshold_backward.grad_input(grad_y, y, 0, grad_input=grad_y)
    del y
    return torch.ops.aten.native_batch_norm_backward(
        grad_pre, x, weight, None, None, mean, invstd, True, eps, mask
    )


class _ScratchBuffers(threading.local):
    """Per-thread buffers for the lean attention path's ``[G·L, 3·K·d]`` temporaries."""

    def __init__(self) -> None:
        self.buffers: dict = {}


_SCRATCH = _ScratchBuffers()


def scratch(slot: int, shape: Sequence[int], like: Tensor) -> Tensor:
    """A reusable uninitialised tensor of ``shape`` (``like``'s dtype and device) from buffer ``slot``.

    The projection-sized temporaries of :class:`_ProjBNReLUAttention` (30 MB each
    for N = 207, B = 16) are the largest requests a CPU training step makes; freshly
    allocated each time, they leave holes in the heap that the next, differently
    sized requests split, and glibc's heap grows instead of reusing them (RSS
    about twice the live memory).  Taking them from a few fixed buffers instead
    keeps them out of the heap.  On the CPU each buffer is its own anonymous memory
    map rather than a heap block: a long-lived block in the middle of the heap
    splits the free space that every step's activations are carved from (see
    ``gman.allocator``; N = 207, B = 16, L = 1, with Adam's state also made early:
    the heap after the first step 617 MiB against 899 MiB with heap blocks).  A
    buffer is grown (replaced) when a larger shape
    comes and is otherwise reused through a view of its first elements; one set
    per thread.  Callers must not let such a tensor (or a view of it) outlive the
    call that took it: the next call overwrites it.  :func:`release_scratch`
    frees them.
    """
    numel = math.prod(shape)
    key = (slot, like.dtype, like.device)
    buffer = _SCRATCH.buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        _SCRATCH.buffers.pop(key, None)  # free the smaller one before allocating
        if like.device.type == "cpu":
            buffer = mapped_empty(numel, like.dtype)
        else:
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        _SCRATCH.buffers[key] = buffer
    return buffer[:numel].view(shape)


def mapped_empty(numel: int, dtype: torch.dtype) -> Tensor:
    """A 1-D CPU tensor of ``numel`` elements (zeros, as the kernel maps them) in its own
    anonymous memory map, outside ``malloc``'s heap; the map is released with the tensor's storage."""
    if numel < 1:
        raise ValueError(f"mapped_empty: numel must be positive, got {numel}")
    return torch.frombuffer(mmap.mmap(-1, numel * dtype.itemsize), dtype=dtype, count=numel)


def release_scratch() -> None:
    """Free this thread's :func:`scratch` buffers (e.g. when training ends)."""
    _SCRATCH.buffers.clear()


def _unless_scratch(t: Tensor | None, buffer: Tensor) -> Tensor | None:
    """``t``, or a copy when it shares memory with the scratch ``buffer`` (a
    ``sum_to_size`` to the same shape returns its input)."""
    if t is not None and t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
        return t.clone()
    return t


class _BNReLULinear(torch.autograd.Function):
    """``ReLU(BN(x))·Wᵀ + b`` (training mode) that keeps ``x``, not ``ReLU(BN(x))``.

    The tail of every FC[D, D] (ReLU, linear) in GMAN.  Stock autograd would
    keep both the batch-norm input and the ReLU output ``[M, C]`` alive until
    backward; this keeps the input only and recomputes the ReLU output from
    the saved batch statistics in one pass during backward.  The gradients are
    those of the stock batch-norm, ReLU and linear kernels.

    x [M, C], weight [C_out, C], bias [C_out] -> [M, C_out]
    """

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, weight, bias):  # noqa: D102
        y, mean, invstd = _bn_relu_forward(x, bn_weight, bn_bias, running_mean, running_var, momentum, eps)
        out = torch.addmm(bias, y, weight.t()) if bias is not None else torch.mm(y, weight.t())
        ctx.eps, ctx.has_bias = eps, bias is not None
        ctx.save_for_backward(x, bn_weight, bn_bias, mean, invstd, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        x, bn_weight, bn_bias, mean, invstd, weight = ctx.saved_tensors
        y = _bn_relu_recompute(x, bn_weight, bn_bias, mean, invstd)
        grad_weight = grad_out.t().mm(y) if ctx.needs_input_grad[7] else None
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[8] else None
        grad_y = grad_out.mm(weight)
        gx, gw, gb = _bn_relu_backward(grad_y, x, y, bn_weight, mean, invstd, ctx.eps, list(ctx.needs_input_grad[:3]))
        return gx, gw, gb, None, None, None, None, grad_weight, grad_bias


class _ProjBNReLUAttention(torch.autograd.Function):
    """Multi-head attention on ``split(ReLU(BN(X·W_xᵀ + t + s)))`` (training mode)
    that keeps only ``X``, the attention output and the batch statistics.

    ``X·W_xᵀ + t + s`` is the query/key/value projection of ``[X ‖ STE]`` with the
    embedding's terms ``t``, ``s`` broadcast (see :func:`ste_terms`); its rows are
    ``G`` independent sequences of equal length ``L``.  Q, K, V are the three
    thirds of ``ReLU(BN(·))``, each split into ``K`` heads of ``d``; the
    attention runs in :func:`blocked_attention` for long sequences without a
    mask (spatial attention, see :func:`_use_blocked`) and in PyTorch's CPU
    flash kernel otherwise.  Backward recomputes the projection (one matrix
    product) and Q, K, V (one pass) and calls the attention's own backward, so
    none of the ``[G·L, 3·K·d]`` tensors outlives the forward pass.  Those
    temporaries (one in forward, up to four in backward) live in
    :func:`scratch` buffers, so no step allocates one.  Gradients are those
    of the stock linear, batch-norm, ReLU and attention kernels.

    x [..., D], w_x [3Kd, D], t, s broadcastable to [..., 3Kd]
    -> [G, K, L, d] (a transposed view of a contiguous [G, L, K, d])
    """

    @staticmethod
    def forward(ctx, x, w_x, t, s, bn_weight, bn_bias, running_mean, running_var, momentum, eps, groups, heads, is_causal):  # noqa: D102
        # the projection is a temporary (a scratch buffer): batch-norm and ReLU overwrite it
        rows = x.numel() // x.shape[-1]
        y = _project(x, w_x, t, s, out=scratch(0, (rows, w_x.shape[0]), x)).view(rows, -1)
        mean, invstd = y.new_empty(y.shape[-1]), y.new_empty(y.shape[-1])
        torch.ops.aten.native_batch_norm.out(
            y, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps, out=y, save_mean=mean, save_invstd=invstd
        )
        y.relu_()
        q, k, v = _split_heads(y, groups, heads)
        ctx.blocked = _use_blocked(q.shape[2], k.shape[2], is_causal)
        if ctx.blocked:
            out = blocked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
            lse = None
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal)
        ctx.eps, ctx.groups, ctx.heads, ctx.is_causal = eps, groups, heads, is_causal
        ctx.save_for_backward(x, w_x, t, s, bn_weight, bn_bias, mean, invstd, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        # The [G·L, 3Kd] temporaries (projection, Q‖K‖V, the attention gradients and their copy in
        # the projection's layout) are scratch buffers; none of them reaches the returned gradients.
        x, w_x, t, s, bn_weight, bn_bias, mean, invstd, out, lse = ctx.saved_tensors
        rows, width = x.numel() // x.shape[-1], w_x.shape[0]
        flat = _project(x, w_x, t, s, out=scratch(0, (rows, width), x)).view(rows, width)
        y = _bn_relu_recompute(flat, bn_weight, bn_bias, mean, invstd, out=scratch(1, (rows, width), x))
        q, k, v = _split_heads(y, ctx.groups, ctx.heads)
        g, heads, length, d = q.shape
        grad_y = scratch(2, (g, length, 3, heads, d), x)  # in the projection's layout
        if ctx.blocked:  # [3, G·K, d, L] -> [G, L, 3, K, d]: one permuted copy
            grads = blocked_attention_backward(
                grad_out.transpose(1, 2), *(z.transpose(1, 2) for z in (q, k, v, out)),
                into=scratch(3, (3, g * heads, d, length), x),
            )
            grad_y.copy_(grads.view(3, g, heads, d, length).permute(1, 4, 0, 2, 3))
            del grads
        else:
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, q, k, v, out, lse, 0.0, ctx.is_causal
            )
            torch.stack((gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2)), dim=2, out=grad_y)
            del gq, gk, gv
        del q, k, v
        # ReLU's backward in place (taking the gradients through a transposed view instead of
        # copying them first was measured slower), then batch-norm's written over the spent y
        torch.ops.aten.threshold_backward.grad_input(grad_y, y.view_as(grad_y), 0, grad_input=grad_y)
        need = ctx.needs_input_grad
        grad_pre = y
        bn_w, bn_b = bn_weight.new_empty(bn_weight.shape), bn_weight.new_empty(bn_weight.shape)
        _, grad_bn_w, grad_bn_b = torch.ops.aten.native_batch_norm_backward.out(
            grad_y.view(rows, width), flat, bn_weight, None, None, mean, invstd, True, ctx.eps,
            # all three: the .out form refuses out1 / out2 buffers for a result it is told to skip
            [True, True, True], out0=grad_pre, out1=bn_w, out2=bn_b,
        )
        del grad_y, flat
        grad_pre = grad_pre.view(*x.shape[:-1], width)
        grad_x = torch.matmul(grad_pre, w_x) if need[0] else None
        grad_w = grad_pre.reshape(-1, width).t().mm(x.reshape(-1, x.shape[-1])) if need[1] else None
        grad_t = _unless_scratch(grad_pre.sum_to_size(t.shape), grad_pre) if need[2] else None
        grad_s = _unless_scratch(grad_pre.sum_to_size(s.shape), grad_pre) if need[3] else None
        return (grad_x, grad_w, grad_t, grad_s, grad_bn_w if need[4] else None, grad_bn_b if need[5] else None,
                None, None, None, None, None, None, None)


def _bn_relu_inplace(y: Tensor, bn_weight, bn_bias, running_mean, running_var, momentum: float, eps: float):
    """Training-mode batch-norm + ReLU written over the temporary ``y [M, C]``; -> (mean, invstd)."""
    mean, invstd = y.new_empty(y.shape[-1]), y.new_empty(y.shape[-1])
    torch.ops.aten.native_batch_norm.out(
        y, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps, out=y, save_mean=mean, save_invstd=invstd
    )
    y.relu_()
    return mean, invstd


class _TransformFlashAttention(torch.autograd.Function):
    """Transform attention's Q, K, V projections (FC with batch-norm and ReLU) and
    multi-head attention (training mode), keeping only the value input, the
    embedding terms, the attention output and the batch statistics.

    Q = ReLU(BN(t_q + s_q)), K = ReLU(BN(t_k + s_k)) (the factored future and
    history embeddings' projections, broadcast to [B, N, L, D]) and
    V = ReLU(BN(X_t·W_vᵀ + b_v)) with ``X_t [B, N, P, D]``.  Backward recomputes
    the three projections (one matrix product, two broadcast sums) and calls the
    CPU flash kernel's backward; gradients are the stock ones.

    -> [B·N, K, Q, d] (a transposed view of a contiguous [B·N, Q, K, d])
    """

    @staticmethod
    def forward(ctx, xt, w_v, b_v, tq, sq, tk, sk, wq, bq, rmq, rvq, wk, bk, rmk, rvk, wv, bv, rmv, rvv, momentum, eps, heads):  # noqa: D102
        b, n, p, dim = xt.shape
        groups = b * n
        q = (tq + sq).view(-1, dim)
        k = (tk + sk).view(-1, dim)
        v = F.linear(xt, w_v, b_v).view(-1, dim)
        stats = []
        for y, w, bb, rm, rv in ((q, wq, bq, rmq, rvq), (k, wk, bk, rmk, rvk), (v, wv, bv, rmv, rvv)):
            stats += _bn_relu_inplace(y, w, bb, rm, rv, momentum, eps)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(_heads(t, groups, heads) for t in (q, k, v)), 0.0, False
        )
        ctx.eps, ctx.heads, ctx.groups = eps, heads, groups
        ctx.save_for_backward(xt, w_v, b_v, tq, sq, tk, sk, wq, bq, wk, bk, wv, bv, *stats, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        (xt, w_v, b_v, tq, sq, tk, sk, wq, bq, wk, bk, wv, bv,
         mq, sdq, mk, sdk, mv, sdv, out, lse) = ctx.saved_tensors
        dim = xt.shape[-1]
        pres = [(tq + sq).view(-1, dim), (tk + sk).view(-1, dim), F.linear(xt, w_v, b_v).view(-1, dim)]
        params = ((wq, bq, mq, sdq), (wk, bk, mk, sdk), (wv, bv, mv, sdv))
        ys = [_bn_relu_recompute(pre, w, bb, m, s) for pre, (w, bb, m, s) in zip(pres, params)]
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, *(_heads(y, ctx.groups, ctx.heads) for y in ys), out, lse, 0.0, False
        )
        need = ctx.needs_input_grad
        result = [None] * 22
        for i, (g, pre, y, (w, bb, m, s)) in enumerate(zip(grads, pres, ys, params)):
            g = g.transpose(1, 2).reshape(-1, dim)
            gpre, gw, gb = _bn_relu_backward(g, pre, y, w, m, s, ctx.eps, [True, need[7 + 4 * i], need[8 + 4 * i]])
            result[7 + 4 * i], result[8 + 4 * i] = gw, gb
            if i == 0:
                gpre = gpre.view(tq.shape[0], -1, *tq.shape[2:])  # [B, N, Q, D]
                result[3], result[4] = gpre.sum_to_size(tq.shape), gpre.sum_to_size(sq.shape)
            elif i == 1:
                gpre = gpre.view(tk.shape[0], -1, *tk.shape[2:])
                result[5], result[6] = gpre.sum_to_size(tk.shape), gpre.sum_to_size(sk.shape)
            else:
                result[0] = gpre.mm(w_v).view(xt.shape) if need[0] else None
                result[1] = gpre.t().mm(xt.reshape(-1, dim)) if need[1] else None
                result[2] = gpre.sum(0) if need[2] else None
        return tuple(result)


def _heads(y: Tensor, groups: int, heads: int) -> Tensor:
    """[G·L, K·d] -> [G, K, L, d] view."""
    return y.view(groups, -1, heads, y.shape[-1] // heads).transpose(1, 2)


def _split_heads(y: Tensor, groups: int, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[G·L, 3·K·d] -> three [G, K, L, d] views (Q, K, V)."""
    length = y.shape[0] // groups
    q, k, v = y.view(groups, length, 3, heads, -1).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
)


def _glorot_(weight: Tensor, chunks: int = 1) -> None:
    """Glorot-uniform init; a fused weight of ``chunks`` stacked projections is
    initialised chunk by chunk, as if each were its own layer."""
    with torch.no_grad():
        for part in weight.chunk(chunks, dim=0):
            fan_out, fan_in = part.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            part.uniform_(-bound, bound)


_DROPOUT_LEVELS = 1 << 16


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout`` (zero each element with probability ``p``, scale the rest by
    ``1 / (1 − p)``), with a cheaper random mask on the CPU.

    PyTorch's CPU ``bernoulli_`` draws one 32-bit number per element on one
    thread (16 ms for GMAN's [16, 12, 207, 64] activations on the 2-core
    machine, two of them per training step).  Here the mask compares 16-bit
    uniform integers, four from every 64-bit draw, against ``round((1 − p)·2¹⁶)``
    (3 ms); the kept fraction is then ``1 − p'`` with ``|p' − p| ≤ 2⁻¹⁷``, and the
    kept elements are scaled by ``1 / (1 − p')``, so the expectation is ``x``
    exactly.  Other devices use ``F.dropout``.
    """
    keep = round((1.0 - p) * _DROPOUT_LEVELS)
    if not training or keep in (0, _DROPOUT_LEVELS) or x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training)  # also p = 0, and p too close to 1 for 16-bit levels
    n = x.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    mask = bits.view(torch.int16)[:n].view(x.shape) < keep - _DROPOUT_LEVELS // 2
    return x * mask.to(x.dtype).mul_(_DROPOUT_LEVELS / keep)


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
                x = dropout(x, self.dropout, self.training)
            pre = self.linears[i](x)
        norm, act = self.norms[i], self.activations[i]
        if isinstance(norm, BatchNorm):
            return norm(pre, relu=act)
        # ``pre`` is always a freshly computed tensor (not a view) that nothing keeps
        # for backward, so the ReLU can overwrite it
        return torch.relu_(pre) if act else pre

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        n, i = len(self.linears), 0
        while i < n:
            pairable = (
                i + 1 < n
                and self.activations[i]
                and isinstance(self.norms[i], BatchNorm)
                and isinstance(self.norms[i + 1], nn.Identity)
                and self.dropout == 0
            )
            if not pairable:
                x = self.layer(i, x)
                i += 1
                continue
            pre = self.linears[i](x)
            norm = self.norms[i]
            if norm.fused_training(pre):
                # ReLU(BN(pre))·W' + b' without keeping ReLU(BN(pre)) for backward
                lin = self.linears[i + 1]
                out = _BNReLULinear.apply(pre.reshape(-1, pre.shape[-1]), *norm.fused_args(), lin.weight, lin.bias)
                x = out.view(*pre.shape[:-1], out.shape[-1])
                i += 2
            else:
                x = self.layer(i, x, pre)
                i += 1
        return x


def project_concat(linear: nn.Linear, x: Tensor, ste: SteLike, temporal_major: bool = False) -> Tensor:
    """``[X ‖ STE]·Wᵀ + b`` for a linear layer with ``in_features = 2D``.

    x:   [B, T, N, D]  (or [B, N, T, D] when ``temporal_major``: sensors before steps)
    ste: [B, T, N, D] (same layout as x) or an :class:`STE` pair
    ->   [B, T, N, out] (or [B, N, T, out])

    With an :class:`STE` pair, ``W = [W_x | W_e]`` is split and the result is
    ``X·W_xᵀ + (e_T·W_eᵀ + b) + e_S·W_eᵀ`` (a broadcast sum, added in place to
    the matrix product).
    """
    if not isinstance(ste, STE):
        return linear(torch.cat((x, ste), dim=-1))
    return _project(x, *ste_terms(linear, ste, temporal_major))


def ste_terms(linear: nn.Linear, ste: STE, temporal_major: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``[X ‖ STE]·Wᵀ + b`` into ``X·W_xᵀ`` and two broadcastable terms.

    -> ``W_x [out, D]``, ``e_T·W_eᵀ + b`` ([B, T, 1, out], or [B, 1, T, out] when
    ``temporal_major``) and ``e_S·W_eᵀ`` ([N, out], or [N, 1, out]).
    """
    d = ste.spatial.shape[-1]
    w_x, w_e = linear.weight[:, :d], linear.weight[:, d:]
    te = F.linear(ste.temporal, w_e, linear.bias)  # [B, T, out]
    se = F.linear(ste.spatial, w_e)  # [N, out]
    if temporal_major:
        return w_x, te.unsqueeze(1), se.unsqueeze(1)
    return w_x, te.unsqueeze(2), se


def _project(x: Tensor, w_x: Tensor, te: Tensor, se: Tensor, out: Tensor | None = None) -> Tensor:
    """``X·W_xᵀ + te + se`` (broadcast), accumulated in place into the product
    (written into ``out`` [..., out_features] when given)."""
    if out is None:
        out = torch.matmul(x, w_x.t())
    else:
        torch.mm(x.reshape(-1, x.shape[-1]), w_x.t(), out=out.view(-1, out.shape[-1]))
        out = out.view(*x.shape[:-1], out.shape[-1])
    out += te
    out += se
    return out


SHORT_SEQUENCE = 32
"""Key length up to which :func:`attention` on an accelerator multiplies explicitly
instead of calling a fused kernel (see there)."""


BLOCKED_MIN_KEYS = 64
"""Key length from which unmasked attention on the CPU runs :func:`blocked_attention`
instead of PyTorch's flash kernel (see there)."""

_BLOCK_SCORES = 1 << 20
"""Score entries per block of :func:`blocked_attention` (4 MiB in float32: on 2 cores,
1 MiB of L2 each, 2^18 – 2^21 ran within 10 % of each other; 2^17 and 2^22 were slower)."""


def _block_pairs(length: int) -> int:
    """(group, head) pairs per block for sequences of ``length``: at least one per thread,
    since a batch of one matrix runs on one thread (4x slower measured at L = 325)."""
    return max(torch.get_num_threads(), _BLOCK_SCORES // length**2)


def _use_blocked(queries: int, keys: int, is_causal: bool) -> bool:
    """Self-attention (as many queries as keys), unmasked, over many keys."""
    return not is_causal and queries == keys >= BLOCKED_MIN_KEYS


def _heads_last(x: Tensor) -> Tensor:
    """[G, L, K, d] (any strides) -> [G·K, d, L] contiguous (one copy)."""
    g, length, heads, d = x.shape
    return x.permute(0, 2, 3, 1).reshape(g * heads, d, length)


def _from_heads_last(x: Tensor, groups: int) -> Tensor:
    """[G·K, d, L] -> [G, L, K, d] (a permuted view)."""
    gk, d, length = x.shape
    return x.view(groups, gk // groups, d, length).permute(0, 3, 1, 2)


def _softmax_scores(scores: Tensor, q_t: Tensor, k_t: Tensor, scale: float) -> Tensor:
    """``scores ← softmax(scale · q_tᵀ·k_t)`` in place (= softmax(QKᵀ/√d) for heads-last
    Q, K); q_t [c, d, Lq], k_t [c, d, Lk], scores [c, Lq, Lk] -> scores."""
    torch.baddbmm(scores, q_t.transpose(1, 2), k_t, beta=0.0, alpha=scale, out=scores)
    return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


def blocked_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked multi-head self-attention ``softmax(QKᵀ/√d)·V``, a block of heads at a time.

    q, k, v: [G, L, K, d] (any strides) -> [G, L, K, d] contiguous

    Why not the fused kernel: for GMAN's spatial attention (hundreds of keys,
    d = 8) PyTorch's CPU flash kernel multiplies ``[·, L] × [L, d]`` tiles
    whose 8-column outputs run at a fraction of the machine's speed.  Here
    Q, K, V are laid out heads-last ``[G·K, d, L]`` (one copy each) so that every
    product with the scores is ``[d, L] × [L, L]`` — 8 long rows, which the
    BLAS runs 3–4× faster — and the ``[c, L, L]`` scores of a block of ``c``
    (group, head) pairs are made, soft-maxed in place and used while they sit
    in cache (c·L² ≈ :data:`_BLOCK_SCORES`).  Measured on 2 cores (AVX-512),
    float32, G = 192, L = 207, K = d = 8: 60 ms forward and 111 ms backward
    against 94 ms and 217 ms for the flash kernel.  The loop runs over blocks
    of (group, head) pairs, never over time steps or sensors, and keeps at most
    two blocks of scores, so memory stays O(G·L·K·d) like a fused kernel's.
    """
    g, length, heads, d = q.shape
    q_t, k_t, v_t = _heads_last(q), _heads_last(k), _heads_last(v)
    out_t = q.new_empty(g * heads, d, length)
    block = _block_pairs(length)
    scores = q.new_empty(min(block, g * heads), length, length)
    for i in range(0, g * heads, block):
        j = min(i + block, g * heads)
        p = _softmax_scores(scores[: j - i], q_t[i:j], k_t[i:j], d**-0.5)
        torch.bmm(v_t[i:j], p.transpose(1, 2), out=out_t[i:j])  # Oᵀ = Vᵀ·Pᵀ
    return _from_heads_last(out_t, g).contiguous()


def blocked_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, into: Tensor | None = None
) -> Tensor:
    """Gradients of :func:`blocked_attention` w.r.t. q, k, v; the scores are recomputed.

    grad_out, out, q, k, v: [G, L, K, d] (any strides)
    -> [3, G·K, d, L]: dq, dk, dv heads-last (``_from_heads_last(·[i], G)`` gives
    each as [G, L, K, d]; a permuted view gives the ``[G, L, 3, K, d]`` layout
    of a fused projection), written into ``into`` (contiguous, that shape) when given

    With P = softmax(S), S = QKᵀ/√d and Δ_i = Σ_e dO_ie·O_ie (= Σ_j P_ij·dP_ij):
    dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − Δ), dQ = dS·K/√d, dK = dSᵀ·Q/√d,
    all computed transposed (``dVᵀ = dOᵀ·P`` etc.) for the reason given in
    :func:`blocked_attention`.
    """
    g, length, heads, d = q.shape
    scale = d**-0.5
    q_t, k_t, v_t, grad_t = _heads_last(q), _heads_last(k), _heads_last(v), _heads_last(grad_out)
    delta = (grad_out * out).sum(-1).transpose(1, 2).reshape(g * heads, length, 1)
    grads = q.new_empty(3, g * heads, d, length) if into is None else into
    dq_t, dk_t, dv_t = grads.unbind(0)
    block = _block_pairs(length)
    scores = q.new_empty(min(block, g * heads), length, length)
    grad_scores = torch.empty_like(scores)
    for i in range(0, g * heads, block):
        j = min(i + block, g * heads)
        p = _softmax_scores(scores[: j - i], q_t[i:j], k_t[i:j], scale)
        torch.bmm(grad_t[i:j], p, out=dv_t[i:j])  # dVᵀ = dOᵀ·P
        ds = torch.bmm(grad_t[i:j].transpose(1, 2), v_t[i:j], out=grad_scores[: j - i])  # dP = dO·Vᵀ
        ds.sub_(delta[i:j]).mul_(p)  # dS
        torch.baddbmm(dq_t[i:j], k_t[i:j], ds.transpose(1, 2), beta=0.0, alpha=scale, out=dq_t[i:j])
        torch.baddbmm(dk_t[i:j], q_t[i:j], ds, beta=0.0, alpha=scale, out=dk_t[i:j])
    return grads


class _BlockedAttention(torch.autograd.Function):
    """:func:`blocked_attention` with :func:`blocked_attention_backward` as its gradient.

    q, k, v: [G, L, K, d] -> [G, L, K, d] contiguous
    """

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: D102
        out = blocked_attention(q, k, v)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        grads = blocked_attention_backward(grad_out, *ctx.saved_tensors)
        return tuple(_from_heads_last(g, grad_out.shape[0]) for g in grads)


def _cpu_blocked_ok(q: Tensor, queries: int, keys: int, is_causal: bool) -> bool:
    """Whether :func:`attention` takes the blocked path: CPU, float32/float64, unmasked,
    long, and not traced (compile, export and TorchScript see the fused operator)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and _use_blocked(queries, keys, is_causal)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
    )


def attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False) -> Tensor:
    """Multi-head scaled dot-product attention, ``softmax(QKᵀ/√d)·V`` per head.

    q: [G, Lq, K, d], k, v: [G, Lk, K, d]  (any strides with unit last stride)
    -> [G, Lq, K, d] contiguous, so that ``.view(G, Lq, K·d)`` is free.

    Calls the fused ``F.scaled_dot_product_attention`` with the ``[G, K, L, d]``
    views it takes (on the CPU its flash kernel reads these strides directly
    and writes its output in ``[G, Lq, K, d]`` order).  ``is_causal`` keeps
    query ``i`` from attending to keys ``j > i``.

    On the CPU, unmasked attention over at least :data:`BLOCKED_MIN_KEYS` keys
    (spatial attention) runs in :func:`blocked_attention`, which is faster
    there than the flash kernel for GMAN's small head size.

    On a GPU, sequences of at most :data:`SHORT_SEQUENCE` keys (temporal and
    transform attention: P, Q ≈ 12 steps; the intra-group attention of group
    spatial attention) go through :func:`short_attention` instead: the fused
    kernels tile 64–128 queries per program, so for 12 steps they spend most of
    their time on padding (measured on an H200, bf16, B = 16, N = 207: 1.2 ms
    forward + backward per temporal attention against 0.3 ms for the far larger
    spatial one), while the explicit scores are tiny ([G, K, 12, 12]).
    """
    if q.device.type != "cpu" and k.shape[1] <= SHORT_SEQUENCE:
        return short_attention(q, k, v, is_causal)
    if _cpu_blocked_ok(q, q.shape[1], k.shape[1], is_causal):
        return _BlockedAttention.apply(q, k, v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal
    )
    return out.transpose(1, 2).contiguous()


def short_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False) -> Tensor:
    """:func:`attention` with the scores made explicitly (same shapes and meaning).

    S = QKᵀ/√d: [G, K, Lq, Lk]; S_ij = −∞ for j > i when ``is_causal``;
    softmax over keys (float32 under autocast); out = softmax(S)·V.

    Tried and measured slower: the two products as broadcast multiplications
    summed over one axis (so that torch.compile fuses each into one kernel
    instead of 16 × 16-tiled batched matmuls).  On an H100, L = 3, its fused
    backward kernels cost ~1.1 ms more per training step than these matmuls.
    """
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [G, K, L, d]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if is_causal:
        lq, lk = q.shape[1], k.shape[1]
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights.to(vh.dtype), vh)  # [G, K, Lq, d]
    return out.transpose(1, 2).contiguous()


def qkv_attention(
    fc: FC, x: Tensor, ste: SteLike, groups: int, heads: int, is_causal: bool = False, temporal_major: bool = False
) -> Tensor:
    """Q, K, V = ReLU(BN([X ‖ STE]·Wᵀ + b)) split in three and into heads; attention.

    fc:  the one-layer FC (2D -> 3·K·d, ReLU) of the query/key/value projection
    x:   [..., D] whose rows are ``groups`` sequences of equal length L; ste alike
         (or an :class:`STE` pair, with ``temporal_major`` for [B, N, T] rows)
    ->   [G, L, K, d] contiguous
    """
    norm = fc.norms[0]
    if (
        _HAS_CPU_FLASH
        and isinstance(ste, STE)
        and isinstance(norm, BatchNorm)
        and fc.activations[0]
        and norm.fused_training(x)
    ):
        w_x, t, s = ste_terms(fc.linears[0], ste, temporal_major)
        out = _ProjBNReLUAttention.apply(x, w_x, t, s, *norm.fused_args(), groups, heads, is_causal)
        return out.transpose(1, 2).contiguous()
    qkv = fc.layer(0, x, project_concat(fc.linears[0], x, ste, temporal_major))
    length = qkv.numel() // (groups * qkv.shape[-1])
    # unbind (not slicing): its backward stacks the three gradients in one pass
    q, k, v = qkv.view(groups, length, 3, heads, -1).unbind(2)
    return attention(q, k, v, is_causal=is_causal)


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
        h = qkv_attention(self.qkv, x, ste, b * t, self.num_heads).view(b, t, n, dim)
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
        h = qkv_attention(self.qkv, xt, ste_t, b * n, self.num_heads, self.causal_mask, temporal_major=True)
        h = h.view(b, n, t, dim)
        if self.out is not None:
            h = self.out(h)
        return h.transpose(1, 2).contiguous()


class GatedFusion(nn.Module):
    """Gated fusion of the spatial and temporal attention outputs::

        z = σ(H_S·W_S + H_T·W_T + b)          (W_S has no bias)
        H = z ⊙ H_S + (1 − z) ⊙ H_T           computed as lerp(H_T, H_S, z)
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
        h = torch.lerp(ht, hs, z)  # ht + z·(hs − ht): keeps no extra tensor for backward
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

    def _lean(self, x: Tensor, ste_p: SteLike, ste_q: SteLike) -> bool:
        norms = [fc.norms[0] for fc in (self.q, self.k, self.v)]
        return (
            _HAS_CPU_FLASH
            and isinstance(ste_p, STE)
            and isinstance(ste_q, STE)
            and all(isinstance(m, BatchNorm) for m in norms)
            # the queries' batch-norm sees B·N·Q rows, not x's B·P·N: one row (B = N = Q = 1) takes the
            # plain path, whose BatchNorm leaves the running statistics alone (an unbiased variance of NaN)
            and x.shape[0] * x.shape[2] * ste_q.temporal.shape[1] > 1
            and all([m.fused_training(x) for m in norms])
        )

    def forward(self, x: Tensor, ste_p: SteLike, ste_q: SteLike) -> Tensor:  # noqa: D102
        b, p, n, dim = x.shape
        if self._lean(x, ste_p, ste_q):
            terms = []
            for fc, ste in ((self.q, ste_q), (self.k, ste_p)):
                lin = fc.linears[0]
                terms += [F.linear(ste.temporal, lin.weight, lin.bias).unsqueeze(1), F.linear(ste.spatial, lin.weight).unsqueeze(1)]
            bn = [a for fc in (self.q, self.k, self.v) for a in fc.norms[0].fused_args()[:4]]
            lin_v = self.v.linears[0]
            h = _TransformFlashAttention.apply(
                x.transpose(1, 2).contiguous(), lin_v.weight, lin_v.bias, *terms, *bn,
                *self.v.norms[0].fused_args()[4:], self.num_heads,
            )
            h = h.transpose(1, 2).reshape(b, n, -1, dim)
            if self.out is not None:
                h = self.out(h)
            return h.transpose(1, 2).contiguous()
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

    ``day_of_week=False`` drops the ``onehot(dow, 7)`` part (the first layer is then
    ``nn.Linear(T_day, D)``).  A day of the week that never occurs in the training
    steps keeps its randomly initialised weight column, which then adds an
    arbitrary offset to every validation / test step on that day: data of less
    than two weeks (Los-loop: one week, split 70/10/20) should leave it out.
    ``day_of_week="weekend"`` (not in the paper) keeps a 2-way one-hot instead,
    ``onehot(dow ≥ 5, 2)``: Monday–Friday vs Saturday–Sunday, so that short data
    whose training part has both kinds of day still tells a working day's
    profile from a weekend's (holidays count as the weekday they fall on).

    ``T_day = steps_per_day = 86400 / interval seconds``.  A one-hot row times a
    weight matrix selects one column of it, so the first temporal layer is
    computed as ``W[:, dow] + W[:, 7 + tod] + b`` (an index lookup of the
    ``nn.Linear(7 + T_day, D)`` weight) — exactly the FC of the one-hot
    vector, without building it.  Out-of-range indices raise an index error.

    forward(se [N, D_se], time [B, T, 2] long) -> STE(spatial [N, D], temporal [B, T, D])
    """

    def __init__(self, se_dim: int, steps_per_day: int, dim: int, batch_norm: str = "activation", bn_momentum: float = 0.5,
                 day_of_week: bool | str = True):
        super().__init__()
        self.steps_per_day = steps_per_day
        self.day_of_week = day_of_week
        # day categories: 7 weekdays, 2 (working day / weekend) or none; also the row of
        # time-of-day 0 in the first temporal layer's input
        self.tod_offset = DAY_CATEGORIES[day_of_week]
        self.spatial = FC(se_dim, [dim, dim], [True, False], batch_norm, bn_momentum)
        self.temporal = FC(self.tod_offset + steps_per_day, [dim, dim], [True, False], batch_norm, bn_momentum)

    def forward(self, se: Tensor, time: Tensor) -> STE:  # noqa: D102
        e_s = self.spatial(se)
        lin = self.temporal.linears[0]
        table = lin.weight.t()  # [7 + T_day, D] (or [T_day, D]): row i = W · onehot_i
        dow, tod = time[..., 0], time[..., 1]
        pre = F.embedding(tod + self.tod_offset, table)
        if self.tod_offset == 2:
            pre = pre + F.embedding((dow >= 5).long(), table)  # Saturday = 5, Sunday = 6
        elif self.tod_offset:
            pre = pre + F.embedding(dow, table)
        if lin.bias is not None:
            pre = pre + lin.bias
        e_t = self.temporal.layer(0, None, pre)  # type: ignore[arg-type]
        e_t = self.temporal.layer(1, e_t)
        return STE(e_s, e_t)
