"""The op set every backend implements, written in plain PyTorch.

These functions define the semantics (and are the reference in op tests); the triton
(``torch.ops.resfast_triton``) and native (``torch.ops.resfast``) backends register ops
with exactly these names and signatures. The batch-norm is folded into a per-channel
affine map ``z = (x - mean) * invstd * gamma + beta`` with ``gamma = 1, beta = 0`` when
``bn_weight`` / ``bn_bias`` are ``None``; ``mean`` and ``invstd`` are float32 ``[C]``.

``x`` may be any strided 4-D tensor (a channel-prefix view of a larger buffer included);
``out`` may be any strided 4-D tensor (a channel slice of a larger buffer included).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "bn_stats",
    "bn_relu_conv2d",
    "bn_relu_conv2d_out",
    "bn_relu_conv2d_backward",
    "bn_backward_elemt",
    "bn_relu",
]


def _cvec(t: Tensor, like: Tensor) -> Tensor:
    return t.to(torch.float32 if like.dtype != torch.float64 else torch.float64).view(1, -1, 1, 1)


def bn_relu(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], mean: Tensor, invstd: Tensor) -> Tensor:
    """``relu((x - mean) * invstd * gamma + beta)`` in float32 (float64 for float64 input), cast to ``x.dtype``."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    z = (xf - _cvec(mean, x)) * _cvec(invstd, x)
    if bn_weight is not None:
        z = z * _cvec(bn_weight, x)
    if bn_bias is not None:
        z = z + _cvec(bn_bias, x)
    return torch.relu(z).to(x.dtype)


def bn_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and *biased* variance of an ``N x C x H x W`` tensor, float32 ``[C]``
    (float64 for float64 input)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(x.to(acc), dim=(0, 2, 3), correction=0)
    return mean, var


def bn_relu_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    batch_stats: bool,
) -> Tensor:
    """``conv2d(relu(bn(x)), weight, bias)``; ``batch_stats`` only matters for autograd
    (whether ``mean``/``invstd`` are functions of ``x``)."""
    a = bn_relu(x, bn_weight, bn_bias, mean, invstd)
    return torch.nn.functional.conv2d(a, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def bn_relu_conv2d_out(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    out: Tensor,
) -> None:
    """Like :func:`bn_relu_conv2d` but writes into ``out`` (which may be a channel slice)."""
    out.copy_(bn_relu_conv2d(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, False))


def bn_relu_conv2d_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`bn_relu_conv2d` up to the BN output.

    Recomputes ``a = relu(bn(x))`` and returns

    * ``grad_z``      dL/dz where ``z`` is the BN output before the ReLU (``x``'s shape and dtype),
    * ``grad_weight`` dL/dweight (``weight``'s dtype),
    * ``grad_bias``   sum of ``grad_out`` over N, H, W (``[C_out]``, ``weight``'s dtype),
    * ``sum_dz``      per-channel sum of ``grad_z`` (float32 ``[C_in]``) = dL/dbeta,
    * ``sum_dz_xhat`` per-channel sum of ``grad_z * (x - mean) * invstd`` (float32) = dL/dgamma.
    """
    a = bn_relu(x, bn_weight, bn_bias, mean, invstd)
    grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_out,
        a,
        weight,
        [weight.shape[0]],
        list(stride),
        list(padding),
        list(dilation),
        False,
        [0, 0],
        groups,
        [True, True, True],
    )
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    # As torch.relu's backward (threshold_backward): zero where the activation is <= 0, so a
    # NaN activation passes its gradient through.
    grad_z = torch.where(a <= 0, torch.zeros((), dtype=grad_a.dtype, device=grad_a.device), grad_a)
    gz = grad_z.to(acc)
    xhat = (x.to(acc) - _cvec(mean, x)) * _cvec(invstd, x)
    sum_dz = gz.sum(dim=(0, 2, 3))
    sum_dz_xhat = (gz * xhat).sum(dim=(0, 2, 3))
    return grad_z.to(x.dtype), grad_w.to(weight.dtype), grad_b.to(weight.dtype), sum_dz, sum_dz_xhat


def bn_backward_elemt(
    grad_z: Tensor,
    x: Tensor,
    bn_weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    mean_dz: Tensor,
    mean_dz_xhat: Tensor,
) -> Tensor:
    """dL/dx = gamma * invstd * (grad_z - mean_dz - xhat * mean_dz_xhat), in ``x``'s dtype.

    With batch statistics ``mean_dz`` / ``mean_dz_xhat`` are the per-channel means of
    ``grad_z`` and ``grad_z * xhat`` over all N*H*W positions (all ranks for SyncBN);
    with running statistics they are zero and this is ``grad_z * gamma * invstd``.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xhat = (x.to(acc) - _cvec(mean, x)) * _cvec(invstd, x)
    scale = _cvec(invstd, x)
    if bn_weight is not None:
        scale = scale * _cvec(bn_weight, x)
    # With running statistics mean_dz_xhat is 0: drop the term, as eager BN's eval backward
    # has none, so a NaN in x does not become NaN * 0 in the gradient.
    coupling = torch.where(_cvec(mean_dz_xhat, x) == 0, torch.zeros((), dtype=acc, device=x.device),
                           xhat * _cvec(mean_dz_xhat, x))
    gx = scale * (grad_z.to(acc) - _cvec(mean_dz, x) - coupling)
    return gx.to(x.dtype)
