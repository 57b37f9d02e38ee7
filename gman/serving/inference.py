"""Inference-only rewrite of a trained GMAN: the same function, less work per call.

In eval mode a batch-norm layer is a fixed per-channel affine map,
``BN(z) = γ·(z − μ)/√(σ² + ε) + β = a·z + c``, so when it follows a linear layer
``z = x·Wᵀ + b`` the pair is one linear layer with ``W' = a ⊙ W`` (row-wise) and
``b' = a·b + c``. :func:`fold_batch_norm` returns a copy of the network with
every batch-norm folded that way and replaced by the identity; the forward
code is unchanged (an ``FC`` layer without batch-norm applies ReLU directly).
The result equals the plain network up to float rounding (tested to 1e-4 on
random inputs and random batch-norm statistics).

Only for inference: the folded copy has no batch-norm statistics to update, so
it must not be trained.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from gman.model import GMAN, BatchNorm
from gman.model.layers import FC, GatedFusion


def fold_batch_norm(model: GMAN) -> GMAN:
    """A copy of ``model`` (eval mode) with each ``FC`` layer's batch-norm folded into its linear map."""
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in folded.modules():
            if not isinstance(module, FC):
                continue
            for i, norm in enumerate(module.norms):
                if not isinstance(norm, BatchNorm):
                    continue
                linear = module.linears[i]
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # a
                shift = norm.bias - norm.running_mean * scale  # c
                weight = linear.weight * scale[:, None]
                bias = shift if linear.bias is None else linear.bias * scale + shift
                new = nn.Linear(linear.in_features, linear.out_features, bias=True,
                                device=linear.weight.device, dtype=linear.weight.dtype)
                new.weight.copy_(weight)
                new.bias.copy_(bias)
                module.linears[i] = new
                module.norms[i] = nn.Identity()
        for module in folded.modules():
            if isinstance(module, GatedFusion):
                # The gate is xs(H_S) + xt(H_T); without batch-norm its fast path uses only the
                # weight of xs (bias-free by construction), so a folded xs bias joins xt's.
                lin_s, lin_t = module.xs.linears[0], module.xt.linears[0]
                if lin_s.bias is not None:
                    lin_t.bias.add_(lin_s.bias)
                    module.xs.linears[0] = _without_bias(lin_s)
    for parameter in folded.parameters():
        parameter.requires_grad_(False)
    return folded


def _without_bias(linear: nn.Linear) -> nn.Linear:
    new = nn.Linear(linear.in_features, linear.out_features, bias=False,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(linear.weight)
    return new
