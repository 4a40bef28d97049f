"""The reference op set: every op of :class:`resfast.ops.opset.OpSet` in plain PyTorch.

These functions define the semantics every backend must reproduce (the triton op set
``torch.ops.resfast_triton`` and the native op set ``torch.ops.resfast`` register ops with
the same names and schemas, :mod:`resfast.ops.schemas`), and they are the ``eager``
backend. The batch-norm is folded into a per-channel affine map
``z = (x - mean) * invstd * gamma + beta`` with ``gamma = 1, beta = 0`` when ``bn_weight`` /
``bn_bias`` are ``None``; ``mean`` and ``invstd`` are float32 ``[C]`` (float64 for float64
input).

``x`` may be any strided 4-D tensor (a channel-prefix view of a larger buffer included);
``out`` may be any strided 4-D tensor (a channel slice of a larger buffer included).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from resfast.ops.schemas import out_memory_format

__all__ = [
    "bn_stats",
    "bn_stats_update",
    "bn_relu_conv2d",
    "bn_relu_conv2d_out",
    "bn_relu_conv2d_backward",
    "bn_backward_elemt",
    "bn_backward_elemt_out",
    "bn_relu_conv2d_backward_full",
    "bn_train_relu_conv2d",
    "bn_relu",
    "acc_dtype",
]


def acc_dtype(x: Tensor) -> torch.dtype:
    """The dtype statistics and accumulations use for input ``x``: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dense(x: Tensor) -> Tensor:
    """``x`` itself when it is dense (NCHW- or channels_last-contiguous), else a dense copy in
    its own memory format: PyTorch's CPU batch-norm (forward and backward) and convolution run
    2-3x slower on a channel-prefix view of a larger buffer than the copy costs (measured on
    8 x 224-of-256 x 56 x 56 float32: batch-norm backward 8.4 ms on the view, 0.9 + 4.8 ms
    copied first)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=out_memory_format(x))


def _cvec(t: Tensor, like: Tensor) -> Tensor:
    return t.to(acc_dtype(like)).view(1, -1, 1, 1)


def _gemm_1x1(a: Tensor, weight: Tensor, stride, padding, groups: int) -> bool:
    """Whether the conv of ``a`` by ``weight`` runs here as batched matrix products: on the
    CPU, a 1x1, stride-1, unpadded, single-group conv of an NCHW-contiguous float32 or float64
    input. PyTorch's CPU convolution (oneDNN) reorders NCHW data into its blocked layout on
    every call; for densenet121's 1x1 convs the products are faster (8 x 224 x 56 x 56 -> 128
    float32 on 2 cores: forward 5.5 against 7.1 ms, backward 17 against 46 ms)."""
    return (a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) and weight.dtype == a.dtype
            and a.dim() == 4 and weight.shape[2] == 1 and weight.shape[3] == 1 and list(stride) == [1, 1]
            and list(padding) == [0, 0] and groups == 1 and a.is_contiguous())


def conv2d(a: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    """``F.conv2d(a, weight, bias, ...)``; a CPU 1x1 conv (:func:`_gemm_1x1`) as one batched
    matrix product ``weight @ a[n]`` over the ``N`` images (float32/float64 accumulation as
    the convolution's)."""
    if not _gemm_1x1(a, weight, stride, padding, groups):
        return F.conv2d(a, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    n, c, h, w = a.shape
    co = weight.shape[0]
    y = torch.bmm(weight.reshape(co, c).expand(n, co, c), a.view(n, c, h * w)).view(n, co, h, w)
    return y if bias is None else y.add_(bias.view(1, co, 1, 1))


def conv2d_backward(grad_out: Tensor, a: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                    mask: List[bool]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``aten.convolution_backward`` of :func:`conv2d` (bias given as ``[C_out]`` when
    ``mask[2]``): ``(grad_a, grad_weight, grad_bias)``, ``None`` where ``mask`` says no. A CPU
    1x1 conv runs as two batched matrix products: ``weight^T @ grad_out[n]`` and
    ``sum_n grad_out[n] @ a[n]^T`` (one ``addbmm``, summed in order over the images)."""
    if not (_gemm_1x1(a, weight, stride, padding, groups) and grad_out.dtype == a.dtype):
        return torch.ops.aten.convolution_backward(
            grad_out, a, weight, [weight.shape[0]] if mask[2] else None, list(stride), list(padding),
            list(dilation), False, [0, 0], groups, list(mask))
    n, c, h, w = a.shape
    co = weight.shape[0]
    g = grad_out.reshape(n, co, h * w)
    w2 = weight.reshape(co, c)
    grad_a = torch.bmm(w2.t().expand(n, c, co), g).view(n, c, h, w) if mask[0] else None
    grad_w = (torch.addbmm(w2.new_empty(co, c), g, a.view(n, c, h * w).transpose(1, 2), beta=0).view(weight.shape)
              if mask[1] else None)
    grad_b = g.sum((0, 2)) if mask[2] else None
    return grad_a, grad_w, grad_b


def bn_relu(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], mean: Tensor, invstd: Tensor) -> Tensor:
    """``relu((x - mean) * invstd * gamma + beta)`` computed in float32 (float64 for float64
    input) and rounded to ``x.dtype``, in two passes: PyTorch's own inference-mode batch-norm
    (with ``var = invstd^-2`` and ``eps = 0`` it divides by exactly ``1 / invstd``), then an
    in-place ReLU (a NaN stays NaN, as ``torch.relu``). The batch norm is ``torch.batch_norm``,
    the op ``F.batch_norm`` calls: torch 2.11's ``F.batch_norm`` refuses ``eps = 0`` even in
    inference mode (2.14's only in training)."""
    acc = acc_dtype(x)
    affine = [None if t is None else t.to(acc) for t in (bn_weight, bn_bias)]
    z = torch.batch_norm(x, affine[0], affine[1], mean.to(acc), invstd.to(acc).pow(-2), False, 0.0, 0.0,
                         torch.backends.cudnn.enabled)
    return z.relu_()


def bn_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and *biased* variance of an ``N x C x H x W`` tensor, ``acc_dtype(x)`` ``[C]``."""
    var, mean = torch.var_mean(x.to(acc_dtype(x)), dim=(0, 2, 3), correction=0)
    return mean, var


def bn_stats_update(
    x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
) -> Tuple[Tensor, Tensor]:
    """Training-mode statistics of ``x``: returns ``(mean, invstd)`` (``acc_dtype(x)`` ``[C]``,
    ``invstd = 1 / sqrt(biased_var + eps)``) and, when the running statistics are given,
    updates them in place as ``F.batch_norm`` does:
    ``running = (1 - momentum) * running + momentum * batch`` with the *unbiased* variance.
    (PyTorch's own ``batch_norm_update_stats``: one pass, the update included; while
    ``torch.compile`` traces, ``var_mean`` and the update in separate ops.)"""
    # Without running statistics the fused aten op returns the statistics in x's dtype (a
    # bfloat16 mean is off by ~1e-3), so var_mean in the accumulation dtype takes them.
    if running_mean is None or running_mean.dtype != acc_dtype(x) or running_var.dtype != acc_dtype(x) \
            or torch.compiler.is_compiling():  # the fused aten op has no fake kernel
        mean, var = bn_stats(x)
        if running_mean is not None:
            _update_running(x, running_mean, running_var, mean, var, momentum)
    else:
        with torch.no_grad():
            mean, var = torch.batch_norm_update_stats(x, running_mean, running_var, momentum)
        # the aten op writes the running statistics without bumping their versions
        torch.autograd.graph.increment_version((running_mean, running_var))
        mean, var = mean.to(acc_dtype(x)), var.to(acc_dtype(x))
    return mean, var.add_(eps).rsqrt_()


def unbiased_var(var: Tensor, count) -> Tensor:
    """``var * count / (count - 1)`` (``var`` itself for a count of 1 or less), the variance a
    running statistic takes, computed in ``var``'s dtype. ``count`` is an int, or under
    ``torch.jit.trace`` a 0-dim integer tensor (the tracer records ``numel()`` and sizes as
    tensors): the true division of two integer tensors would round to float32, 3e-8 relative
    in a float64 running variance, where ``F.batch_norm`` computes the factor in double."""
    if isinstance(count, Tensor):
        c = count.to(var.dtype)
        return var * (c / (c - 1).clamp_min(1))
    return var * (count / max(count - 1, 1))


@torch.no_grad()
def _update_running(x, running_mean, running_var, mean, var, momentum) -> None:
    count = x.numel() // x.shape[1]
    running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    unbiased = unbiased_var(var, count)
    running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


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
    a = bn_relu(_dense(x), bn_weight, bn_bias, mean, invstd)
    return conv2d(a, weight, bias, stride, padding, dilation, groups)


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
    bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`bn_relu_conv2d` up to the BN output.

    Recomputes ``a = relu(bn(x))`` and returns

    * ``grad_z``      dL/dz where ``z`` is the BN output before the ReLU (``x``'s shape and dtype),
    * ``grad_weight`` dL/dweight (``weight``'s dtype),
    * ``grad_bias``   sum of ``grad_out`` over N, H, W (``[C_out]``, ``weight``'s dtype) when
      ``bias_grad``, else an empty ``[0]`` tensor,
    * ``sum_dz``      per-channel sum of ``grad_z`` (``acc_dtype(x)`` ``[C_in]``) = dL/dbeta,
    * ``sum_dz_xhat`` per-channel sum of ``grad_z * (x - mean) * invstd`` = dL/dgamma.
    """
    x = _dense(x)
    grad_z, grad_w, grad_b = _conv_relu_backward(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride,
                                                 padding, dilation, groups, True, bias_grad)
    sum_dz, sum_dz_xhat = _bn_grad_sums(grad_z, x, mean, invstd)
    return grad_z.to(x.dtype), grad_w, grad_b, sum_dz, sum_dz_xhat


def _conv_relu_backward(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups,
                        weight_grad: bool, bias_grad: bool):
    """``(grad_z, grad_weight or None, grad_bias or [0])``: the conv and ReLU backward of
    ``conv2d(relu(bn(x)))`` with the activation recomputed from ``x`` (dense)."""
    a = bn_relu(x, bn_weight, bn_bias, mean, invstd)
    grad_a, grad_w, grad_b = conv2d_backward(grad_out, a, weight, stride, padding, dilation, groups,
                                             [True, weight_grad, bias_grad])
    # torch.relu's own backward: zero where the activation is <= 0, so a NaN activation passes
    # its gradient through; written over grad_a (one temporary fewer alive).
    grad_z = torch.ops.aten.threshold_backward.grad_input(grad_a, a, 0, grad_input=grad_a)
    grad_w = grad_w.to(weight.dtype) if weight_grad else None
    grad_b = grad_b.to(weight.dtype) if bias_grad else weight.new_empty([0])
    return grad_z, grad_w, grad_b


def bn_relu_conv2d_backward_full(
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
    bias_grad: bool,
    grad_x_out: Optional[Tensor] = None,
    accumulate: bool = False,
    weight_grad: bool = True,
) -> Optional[Tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor, Tensor]]:
    """The whole backward of ``conv2d(relu(bn(x)))`` when ``mean``/``invstd`` are the batch
    statistics of ``x`` itself (training, no process group): ``(grad_x, grad_weight,
    grad_bias or [0], sum_dz_xhat, sum_dz)``, in the order of ``(grad_x, grad_weight,
    grad_bias, grad_gamma, grad_beta)``; ``grad_x`` is written into (``accumulate``: added to)
    ``grad_x_out`` when that is given, and ``None`` is returned for it; without
    ``weight_grad`` the weight gradient is not computed and ``None`` is returned for it.

    An optional op of the eager op set (:data:`resfast.ops.opset.OPTIONAL_OPS`). For float32
    and float64 it runs as the unfused ``BatchNorm2d -> ReLU -> Conv2d`` backward does: the
    activation is recomputed with ``mean``/``invstd`` and PyTorch's training-mode batch-norm
    backward forms the two per-channel sums and dL/dx in one op, instead of
    :func:`bn_relu_conv2d_backward` then :func:`bn_backward_elemt` (about a dozen elementwise
    passes). For float16/bfloat16 it returns ``None``: the caller composes those two ops (the
    accumulated gradient is then rounded once).
    """
    if x.dtype not in (torch.float32, torch.float64):
        return None
    acc = acc_dtype(x)
    x = _dense(x)
    grad_z, grad_w, grad_b = _conv_relu_backward(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride,
                                                 padding, dilation, groups, weight_grad, bias_grad)
    # (contiguous: PyTorch's CPU batch-norm backward reads a strided weight as contiguous when
    # x and the gradient are channels_last)
    gamma = None if bn_weight is None else bn_weight.to(acc).contiguous()
    grad_x, sum_dz_xhat, sum_dz = torch.ops.aten.native_batch_norm_backward(
        grad_z, x, gamma, None, None, mean.to(acc), invstd.to(acc), True, 0.0, [True, True, True])
    del grad_z
    if grad_x_out is not None:
        if accumulate:
            grad_x_out.add_(grad_x)
        else:
            grad_x_out.copy_(grad_x)
        grad_x = None
    return grad_x, grad_w, grad_b, sum_dz_xhat.to(acc), sum_dz.to(acc)


def bn_train_relu_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    out: Optional[Tensor] = None,
) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """``conv2d(relu(bn(x)), weight, bias)`` with ``x``'s own batch statistics (training
    mode): returns ``(y, mean, invstd)`` (``y`` is ``None`` when it was written into
    ``out``) and updates the running statistics in place when they are given, exactly as
    :func:`bn_stats_update` then :func:`bn_relu_conv2d` do.

    An optional op of the eager op set (:data:`resfast.ops.opset.OPTIONAL_OPS`): for float32
    and float64 (with running statistics in that dtype) PyTorch's training-mode batch-norm
    takes the statistics, updates the running ones and normalises in one op, as the unfused
    ``BatchNorm2d`` does; other dtypes compose the two ops.
    """
    acc = acc_dtype(x)
    if x.dtype not in (torch.float32, torch.float64) or (running_mean is not None and (
            running_mean.dtype != acc or running_var.dtype != acc)):
        mean, invstd = bn_stats_update(x, running_mean, running_var, momentum, eps)
        y = bn_relu_conv2d(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, True)
    else:
        gamma, beta = [None if t is None else t.to(acc) for t in (bn_weight, bn_bias)]
        z, mean, invstd = torch.ops.aten.native_batch_norm(_dense(x), gamma, beta, running_mean, running_var, True,
                                                           momentum, eps)
        y = conv2d(z.relu_(), weight, bias, stride, padding, dilation, groups)
        del z
    if out is None:
        return y, mean, invstd
    out.copy_(y)
    return None, mean, invstd


def _bn_grad_sums(grad_z: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel ``sum(grad_z)`` and ``sum(grad_z * xhat)`` in ``acc_dtype(x)``, by PyTorch's own
    batch-norm backward reduction (one pass; the "weight" it is given only sets the dtype of
    what it returns, the sums do not depend on it)."""
    acc = acc_dtype(x)
    m, i = mean.to(acc), invstd.to(acc)
    _, sum_dz_xhat, sum_dz = torch.ops.aten.native_batch_norm_backward(
        grad_z, x, i, None, None, m, i, True, 0.0, [False, True, True])
    return sum_dz.to(acc), sum_dz_xhat.to(acc)


def bn_backward_elemt(
    grad_z: Tensor,
    x: Tensor,
    bn_weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    sum_dz: Tensor,
    sum_dz_xhat: Tensor,
    inv_count: float,
) -> Tensor:
    """dL/dx = gamma * invstd * (grad_z - sum_dz * inv_count - xhat * sum_dz_xhat * inv_count),
    in ``x``'s dtype.

    With batch statistics ``inv_count`` is 1 / (the number of positions the statistics were
    taken over: N*H*W, on all ranks for SyncBN) and ``sum_dz`` / ``sum_dz_xhat`` are summed
    over the same positions; with running statistics ``inv_count`` is 0 and this is
    ``grad_z * gamma * invstd`` (the coupling term is dropped, as eager BN's eval backward
    has none, so a NaN in ``x`` does not become NaN * 0 in the gradient).
    """
    return _bn_backward_elemt_acc(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count).to(x.dtype)


def _bn_backward_elemt_acc(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count) -> Tensor:
    acc = acc_dtype(x)
    scale = _cvec(invstd, x)
    if bn_weight is not None:
        scale = scale * _cvec(bn_weight, x)
    if inv_count == 0.0:
        return grad_z.to(acc) * scale
    # gamma * invstd * (grad_z - mean_dz - (x - mean) * invstd * mean_dz_xhat), (x - mean) formed first.
    k = _cvec(invstd, x) * (_cvec(sum_dz_xhat, x) * inv_count)
    g = (x.to(acc) - _cvec(mean, x)).mul_(k)
    # A zero coupling factor drops the term (as the kernels do), so a NaN in x stays local.
    g.masked_fill_(k == 0, 0)
    g.sub_(grad_z).add_(_cvec(sum_dz, x) * inv_count)
    return g.mul_(-scale)


def bn_backward_elemt_out(
    grad_z: Tensor,
    x: Tensor,
    bn_weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    sum_dz: Tensor,
    sum_dz_xhat: Tensor,
    inv_count: float,
    accumulate: bool,
    out: Tensor,
) -> None:
    """:func:`bn_backward_elemt` written into ``out`` (any strides, e.g. a channel slice of a
    shared gradient buffer), or added to it when ``accumulate`` (for float16 / bfloat16 the
    sum is formed in float32 and rounded once to ``out``'s dtype)."""
    if accumulate and x.dtype in (torch.float16, torch.bfloat16):
        gx = _bn_backward_elemt_acc(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count)
        out.copy_(gx.add_(out))
        return
    gx = bn_backward_elemt(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count)
    if accumulate:
        out.add_(gx)
    else:
        out.copy_(gx)
