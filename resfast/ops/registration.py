"""Op schemas shared by the triton (``resfast_triton``) and native (``resfast``) op libraries,
their fake (meta) implementations and their autograd formulas.

A backend only supplies kernels: the schemas, the fakes that make the ops traceable by
``torch.compile`` and the backward formula are written once, here.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["SCHEMAS", "out_memory_format", "define_library", "register_fakes_and_autograd", "register_native",
           "bn_relu_conv2d_backward_math"]

SCHEMAS: Dict[str, str] = {
    "bn_stats": "bn_stats(Tensor x) -> (Tensor, Tensor)",
    "bn_relu_conv2d": (
        "bn_relu_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor mean, Tensor invstd, int[] stride, int[] padding, int[] dilation, int groups, "
        "bool batch_stats) -> Tensor"
    ),
    "bn_relu_conv2d_out": (
        "bn_relu_conv2d_out(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor mean, Tensor invstd, int[] stride, int[] padding, int[] dilation, int groups, "
        "Tensor(a!) out) -> ()"
    ),
    "bn_relu_conv2d_backward": (
        "bn_relu_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bn_weight, "
        "Tensor? bn_bias, Tensor mean, Tensor invstd, int[] stride, int[] padding, int[] dilation, "
        "int groups) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "bn_backward_elemt": (
        "bn_backward_elemt(Tensor grad_z, Tensor x, Tensor? bn_weight, Tensor mean, Tensor invstd, "
        "Tensor mean_dz, Tensor mean_dz_xhat) -> Tensor"
    ),
}


def out_memory_format(x: Tensor) -> torch.memory_format:
    """Memory format of tensors an op allocates for input ``x``: channels_last when ``x``'s
    channels are its innermost dimension, else NCHW-contiguous. Kernels and fakes agree on it."""
    if x.dim() == 4 and x.size(1) > 1 and x.stride(1) == 1:
        return torch.channels_last
    return torch.contiguous_format


def conv_out_shape(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int]) -> List[int]:
    n, _, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [n, weight.shape[0], ho, wo]


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_libs: Dict[str, torch.library.Library] = {}
_lock = threading.Lock()


def define_library(namespace: str) -> torch.library.Library:
    """Define the five schemas in a new Python op library ``namespace`` (used by triton)."""
    with _lock:
        if namespace not in _libs:
            lib = torch.library.Library(namespace, "DEF")
            for schema in SCHEMAS.values():
                lib.define(schema)
            _libs[namespace] = lib
        return _libs[namespace]


_registered: Dict[str, bool] = {}


def register_native() -> None:
    """Fakes and autograd for the C++ ops ``torch.ops.resfast.*`` (schemas come from csrc)."""
    import resfast._C  # noqa: F401  (loads TORCH_LIBRARY(resfast, m))

    register_fakes_and_autograd("resfast")


def register_fakes_and_autograd(namespace: str) -> None:
    with _lock:
        if _registered.get(namespace):
            return
        _registered[namespace] = True
    q = lambda name: f"{namespace}::{name}"  # noqa: E731
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(q("bn_stats"))
    def _(x):
        c = x.shape[1]
        return x.new_empty([c], dtype=_acc_dtype(x)), x.new_empty([c], dtype=_acc_dtype(x))

    @torch.library.register_fake(q("bn_relu_conv2d"))
    def _(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, batch_stats):
        shape = conv_out_shape(x, weight, stride, padding, dilation)
        return x.new_empty(shape).contiguous(memory_format=out_memory_format(x))

    @torch.library.register_fake(q("bn_relu_conv2d_out"))
    def _(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, out):
        return None

    @torch.library.register_fake(q("bn_relu_conv2d_backward"))
    def _(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups):
        c = x.shape[1]
        return (
            torch.empty_like(x, memory_format=out_memory_format(x)),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty([weight.shape[0]]),
            x.new_empty([c], dtype=_acc_dtype(x)),
            x.new_empty([c], dtype=_acc_dtype(x)),
        )

    @torch.library.register_fake(q("bn_backward_elemt"))
    def _(grad_z, x, bn_weight, mean, invstd, mean_dz, mean_dz_xhat):
        return torch.empty_like(x, memory_format=out_memory_format(x))

    def setup_context(ctx, inputs, output):
        x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, batch_stats = inputs
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, invstd)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        ctx.batch_stats = batch_stats
        ctx.has_bias = bias is not None

    def backward(ctx, grad_out):
        x, weight, bn_weight, bn_bias, mean, invstd = ctx.saved_tensors
        gx, gw, gb, gbw, gbb = bn_relu_conv2d_backward_math(
            ops, grad_out, x, weight, bn_weight, bn_bias, mean, invstd, *ctx.conv_args, ctx.batch_stats
        )
        return (gx, gw, gb if ctx.has_bias else None, gbw, gbb, None, None, None, None, None, None, None)

    torch.library.register_autograd(q("bn_relu_conv2d"), backward, setup_context=setup_context)


def bn_relu_conv2d_backward_math(
    ops,
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
    batch_stats: bool,
    process_group=None,
):
    """Gradients ``(x, weight, bias, bn_weight, bn_bias)`` of ``bn_relu_conv2d`` from the op set ``ops``.

    With ``process_group`` (SyncBN), the per-channel sums that couple the positions through
    the batch statistics are all-reduced over the group before dL/dx is formed; the BN
    parameter gradients stay local, as ``nn.SyncBatchNorm``'s do (DDP averages them).
    """
    grad_z, gw, gb, sum_dz, sum_dz_xhat = ops.bn_relu_conv2d_backward(
        grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups
    )
    if batch_stats:
        count = x.numel() // x.shape[1]
        if process_group is not None:
            import torch.distributed as dist

            packed = torch.cat([sum_dz, sum_dz_xhat, sum_dz.new_tensor([float(count)])])
            dist.all_reduce(packed, group=process_group)
            c = sum_dz.numel()
            g_sum_dz, g_sum_dz_xhat, count = packed[:c], packed[c : 2 * c], packed[2 * c]
        else:
            g_sum_dz, g_sum_dz_xhat = sum_dz, sum_dz_xhat
        mean_dz, mean_dz_xhat = g_sum_dz / count, g_sum_dz_xhat / count
    else:
        mean_dz = torch.zeros_like(sum_dz)
        mean_dz_xhat = mean_dz
    gx = ops.bn_backward_elemt(grad_z, x, bn_weight, mean, invstd, mean_dz, mean_dz_xhat)
    gbw = sum_dz_xhat.to(bn_weight.dtype) if bn_weight is not None else None
    gbb = sum_dz.to(bn_bias.dtype) if bn_bias is not None else None
    return gx, gw, gb, gbw, gbb


class BNReLUConv2dFunction(torch.autograd.Function):
    """Autograd over any op set, for paths that are not registered ops: the eager op set
    (which the shared dense block also uses) and SyncBN (the backward all-reduces)."""

    @staticmethod
    def forward(ctx, ops, process_group, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation,
                groups, batch_stats):
        ctx.ops, ctx.process_group = ops, process_group
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, invstd)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        ctx.batch_stats, ctx.has_bias = batch_stats, bias is not None
        return ops.bn_relu_conv2d(x, weight, bias, bn_weight, bn_bias, mean, invstd, list(stride), list(padding),
                                  list(dilation), groups, batch_stats)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bn_weight, bn_bias, mean, invstd = ctx.saved_tensors
        gx, gw, gb, gbw, gbb = bn_relu_conv2d_backward_math(
            ctx.ops, grad_out, x, weight, bn_weight, bn_bias, mean, invstd, *ctx.conv_args, ctx.batch_stats,
            ctx.process_group,
        )
        return (None, None, gx, gw, gb if ctx.has_bias else None, gbw, gbb, None, None, None, None, None, None, None)
