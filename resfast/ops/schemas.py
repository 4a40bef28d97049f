"""The op schemas (the one source: the triton library registers them, the native library is
tested against them), the fake (meta) implementations that make the ops traceable by
``torch.compile``, and the memory-format rule every op follows for what it allocates."""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from resfast.ops.opset import OP_NAMES

__all__ = ["SCHEMAS", "OPTIONAL_SCHEMAS", "TRITON_OPTIONAL", "STATS_ROWS", "out_memory_format", "conv_out_shape",
           "dense_vector", "define_library", "register_fakes",
           "register_version_bumps", "mutated_arguments", "UNTRACKED_FORWARD_OPS", "refuse_untracked_grad"]

_CONV = "int[] stride, int[] padding, int[] dilation, int groups"
_BN = "Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor invstd"
_ELEMT = "Tensor grad_z, Tensor x, Tensor? bn_weight, Tensor mean, Tensor invstd, Tensor sum_dz, " \
         "Tensor sum_dz_xhat, float inv_count"

SCHEMAS: Dict[str, str] = {
    "bn_stats": "bn_stats(Tensor x) -> (Tensor, Tensor)",
    "bn_stats_update": (
        "bn_stats_update(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
        "float eps) -> (Tensor, Tensor)"
    ),
    "bn_relu_conv2d": f"bn_relu_conv2d(Tensor x, Tensor weight, Tensor? bias, {_BN}, {_CONV}, bool batch_stats) -> Tensor",
    "bn_relu_conv2d_out": f"bn_relu_conv2d_out(Tensor x, Tensor weight, Tensor? bias, {_BN}, {_CONV}, Tensor(a!) out) -> ()",
    "bn_relu_conv2d_backward": (
        f"bn_relu_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, {_BN}, {_CONV}, bool bias_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "bn_backward_elemt": f"bn_backward_elemt({_ELEMT}) -> Tensor",
    "bn_backward_elemt_out": f"bn_backward_elemt_out({_ELEMT}, bool accumulate, Tensor(a!) out) -> ()",
}
assert tuple(SCHEMAS) == OP_NAMES

#: Rows of the statistics partials ``bn_relu_conv2d_stats`` returns (``[3, STATS_ROWS, C_out]``:
#: count, mean and M2 per program; a launch has at most this many programs per channel block).
STATS_ROWS = 256

#: Optional ops of the triton op set (:data:`resfast.ops.opset.OPTIONAL_OPS`), with their schemas:
#: the training forward in one op (``bn_stats_update`` then ``bn_relu_conv2d``: one call, one
#: plan replay; not named ``bn_train_relu_conv2d``, the eager op set's, which the shared dense
#: block takes as its cue to let each reader take its own statistics), the fused op that also
#: takes its output's batch statistics in the conv's epilogue, the
#: finalize that turns them into the next BatchNorm's mean and inverse std, their ``out=``
#: forms (the output written into a buffer's slice; the mean, the biased variance and optionally
#: the inverse std written into given vectors: the shared dense block's new channels, whose
#: statistics every later layer shares), the three in a row as one op (a dense layer's second
#: half: norm2's statistics from conv1's partials, conv3x3 into the block's buffer, the new
#: channels' statistics into its vectors), and the whole
#: training backward in one op (the conv backward and the BN input gradient: one call, one plan
#: replay, instead of two). A registered op returns tensors only: ``grad_x`` is an empty
#: ``[0]`` tensor when it went into ``grad_x_out``.
OPTIONAL_SCHEMAS: Dict[str, str] = {
    "bn_relu_conv2d_stats": (
        f"bn_relu_conv2d_stats(Tensor x, Tensor weight, Tensor? bias, {_BN}, {_CONV}, bool batch_stats) "
        "-> (Tensor, Tensor)"
    ),
    "bn_stats_merge_update": (
        "bn_stats_merge_update(Tensor partials, int count, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "float momentum, float eps) -> (Tensor, Tensor)"
    ),
    "bn_relu_conv2d_train": (
        f"bn_relu_conv2d_train(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
        f"Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, {_CONV}) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "bn_relu_conv2d_out_stats": (
        f"bn_relu_conv2d_out_stats(Tensor x, Tensor weight, Tensor? bias, {_BN}, {_CONV}, Tensor(a!) out) -> Tensor"
    ),
    "bn_stats_merge_out": (
        "bn_stats_merge_out(Tensor partials, int count, Tensor(a!) mean, Tensor(b!) var, Tensor(c!)? invstd, "
        "float eps) -> ()"
    ),
    "bn_relu_conv2d_merge_out": (
        f"bn_relu_conv2d_merge_out(Tensor x, Tensor partials, int count, Tensor(a!)? running_mean, "
        f"Tensor(b!)? running_var, float momentum, float eps, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, "
        f"{_CONV}, Tensor(c!) out, Tensor(d!)? out_mean, Tensor(e!)? out_var, Tensor(f!)? out_invstd, "
        "float out_eps) -> (Tensor, Tensor)"
    ),
    "bn_relu_conv2d_backward_full": (
        f"bn_relu_conv2d_backward_full(Tensor grad_out, Tensor x, Tensor weight, {_BN}, {_CONV}, bool bias_grad, "
        "Tensor(a!)? grad_x_out, bool accumulate, bool weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    # two chained fused convs' training backward (a dense layer's conv3x3, then its conv1x1 into
    # the block's gradient buffer): returns (grad_w2, sum_dz_xhat2, sum_dz2, grad_w1,
    # sum_dz_xhat1, sum_dz1); dL/dx1 written into (accumulate: added to) grad_x_out
    "bn_relu_conv2d_backward_pair": (
        "bn_relu_conv2d_backward_pair(Tensor grad_out, Tensor x2, Tensor w2, Tensor? g2, Tensor? b2, Tensor mean2, "
        "Tensor invstd2, int[] stride2, int[] padding2, int[] dilation2, int groups2, Tensor x1, Tensor w1, "
        "Tensor? g1, Tensor? b1, Tensor mean1, Tensor invstd1, int[] stride1, int[] padding1, int[] dilation1, "
        "int groups1, Tensor(a!) grad_x_out, bool accumulate) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
}
TRITON_OPTIONAL = tuple(OPTIONAL_SCHEMAS)


def out_memory_format(x: Tensor) -> torch.memory_format:
    """Memory format of tensors an op allocates for input ``x``: channels_last when ``x``'s
    channels are its innermost dimension, else NCHW-contiguous. Kernels and fakes agree on it."""
    if x.dim() == 4 and x.size(1) > 1 and x.stride(1) == 1:
        return torch.channels_last
    return torch.contiguous_format


def dense_vector(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` itself when contiguous, else a contiguous copy (differentiable: a gradient reaches
    ``t``). For per-channel vectors read as ``ptr + c`` (the triton statistics finalize reads
    and writes the running statistics that way), and for PyTorch's CPU batch-norm backward,
    which reads a strided weight or bias as contiguous when ``x`` is channels_last."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def conv_out_shape(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int]) -> List[int]:
    """``[N, C_out, H_out, W_out]`` of ``conv2d(x, weight)`` with these arguments."""
    n, _, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [n, weight.shape[0], ho, wo]


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_libs: Dict[str, torch.library.Library] = {}
_faked: Dict[str, bool] = {}
_lock = threading.Lock()


def define_library(namespace: str) -> torch.library.Library:
    """Define every schema in a new Python op library ``namespace`` (the triton backend's)."""
    with _lock:
        if namespace not in _libs:
            lib = torch.library.Library(namespace, "DEF")
            for schema in (*SCHEMAS.values(), *OPTIONAL_SCHEMAS.values()):
                lib.define(schema)
            _libs[namespace] = lib
        return _libs[namespace]


def register_fakes(namespace: str) -> None:
    """Fake implementations of every op of ``torch.ops.<namespace>`` (once per namespace)."""
    with _lock:
        if _faked.get(namespace):
            return
        _faked[namespace] = True
    q = lambda name: f"{namespace}::{name}"  # noqa: E731

    def vec(x: Tensor) -> Tensor:
        return x.new_empty([x.shape[1]], dtype=_acc_dtype(x))

    @torch.library.register_fake(q("bn_stats"))
    def _(x):
        return vec(x), vec(x)

    @torch.library.register_fake(q("bn_stats_update"))
    def _(x, running_mean, running_var, momentum, eps):
        return vec(x), vec(x)

    @torch.library.register_fake(q("bn_relu_conv2d"))
    def _(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, batch_stats):
        shape = conv_out_shape(x, weight, stride, padding, dilation)
        return x.new_empty(shape).contiguous(memory_format=out_memory_format(x))

    @torch.library.register_fake(q("bn_relu_conv2d_out"))
    def _(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, out):
        return None

    @torch.library.register_fake(q("bn_relu_conv2d_backward"))
    def _(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, bias_grad):
        return (
            torch.empty_like(x, memory_format=out_memory_format(x)),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty([weight.shape[0] if bias_grad else 0]),
            vec(x),
            vec(x),
        )

    @torch.library.register_fake(q("bn_backward_elemt"))
    def _(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count):
        return torch.empty_like(x, memory_format=out_memory_format(x))

    @torch.library.register_fake(q("bn_backward_elemt_out"))
    def _(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count, accumulate, out):
        return None

    if hasattr(getattr(torch.ops, namespace), "bn_relu_conv2d_train"):  # triton's and native's
        @torch.library.register_fake(q("bn_relu_conv2d_train"))
        def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, stride, padding,
              dilation, groups):
            shape = conv_out_shape(x, weight, stride, padding, dilation)
            return x.new_empty(shape).contiguous(memory_format=out_memory_format(x)), vec(x), vec(x)

    if hasattr(getattr(torch.ops, namespace), "bn_relu_conv2d_backward_full"):  # triton's and native's
        @torch.library.register_fake(q("bn_relu_conv2d_backward_full"))
        def _(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, bias_grad,
              grad_x_out, accumulate, weight_grad):
            fmt = out_memory_format(x)
            gx = x.new_empty([0]) if grad_x_out is not None else torch.empty_like(x, memory_format=fmt)
            return (
                gx,
                torch.empty_like(weight, memory_format=torch.contiguous_format),
                weight.new_empty([weight.shape[0] if bias_grad else 0]),
                vec(x),
                vec(x),
            )

    if hasattr(getattr(torch.ops, namespace), "bn_relu_conv2d_backward_pair"):  # triton's and native's
        @torch.library.register_fake(q("bn_relu_conv2d_backward_pair"))
        def _(grad_out, x2, w2, g2, b2, mean2, invstd2, stride2, padding2, dilation2, groups2, x1, w1, g1, b1, mean1,
              invstd1, stride1, padding1, dilation1, groups1, grad_x_out, accumulate):
            return (torch.empty_like(w2, memory_format=torch.contiguous_format), vec(x2), vec(x2),
                    torch.empty_like(w1, memory_format=torch.contiguous_format), vec(x1), vec(x1))

    if not hasattr(getattr(torch.ops, namespace), "bn_relu_conv2d_stats"):
        return

    @torch.library.register_fake(q("bn_relu_conv2d_stats"))
    def _(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, batch_stats):
        shape = conv_out_shape(x, weight, stride, padding, dilation)
        return (x.new_empty(shape).contiguous(memory_format=out_memory_format(x)),
                x.new_empty([3, STATS_ROWS, shape[1]], dtype=torch.float32))

    @torch.library.register_fake(q("bn_stats_merge_update"))
    def _(partials, count, running_mean, running_var, momentum, eps):
        return partials.new_empty([partials.shape[2]]), partials.new_empty([partials.shape[2]])

    @torch.library.register_fake(q("bn_relu_conv2d_out_stats"))
    def _(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, out):
        return x.new_empty([3, STATS_ROWS, weight.shape[0]], dtype=torch.float32)

    @torch.library.register_fake(q("bn_relu_conv2d_merge_out"))
    def _(x, partials, count, running_mean, running_var, momentum, eps, weight, bn_weight, bn_bias, stride, padding,
          dilation, groups, out, out_mean, out_var, out_invstd, out_eps):
        return partials.new_empty([partials.shape[2]]), partials.new_empty([partials.shape[2]])

    @torch.library.register_fake(q("bn_stats_merge_out"))
    def _(partials, count, mean, var, invstd, eps):
        return None


_bump_libs: Dict[str, torch.library.Library] = {}


#: Ops whose outputs depend differentiably on their inputs but that have no autograd formula:
#: the ``out=`` forms (autograd cannot follow a kernel's raw writes into ``out``) and the
#: one-op training forwards. resfast calls them only inside its ``autograd.Function`` s
#: (under no_grad); called directly with tensors that require grad they would return values
#: without gradients, so they refuse (:func:`refuse_untracked_grad`). The eager op set is
#: plain PyTorch and differentiable; native's ``bn_relu_conv2d_train`` is a C++ composite of
#: differentiable ops.
UNTRACKED_FORWARD_OPS = ("bn_relu_conv2d_out", "bn_relu_conv2d_train", "bn_relu_conv2d_out_stats",
                         "bn_relu_conv2d_merge_out")


def refuse_untracked_grad(op: str, args: Sequence[object]) -> None:
    """Raise if gradients are being recorded and a tensor argument of ``op`` (one of
    :data:`UNTRACKED_FORWARD_OPS`) requires grad: its result would silently carry none."""
    if not torch.is_grad_enabled():
        return
    if any(isinstance(a, Tensor) and a.requires_grad for a in args):
        raise RuntimeError(
            f"{op} has no autograd formula and an argument requires grad: its result would carry no gradient. "
            f"Call resfast.functional.bn_relu_conv2d (or the blocks), which differentiate it, or call the op under "
            f"torch.no_grad() / with detached tensors")


def mutated_arguments(schema) -> List[int]:
    """Positions of the arguments a schema writes in place (``Tensor(a!)``)."""
    return [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def register_version_bumps(namespace: str, names: Sequence[str]) -> None:
    """Bump the autograd version of every tensor the ops ``names`` of ``torch.ops.<namespace>``
    write in place (running statistics, ``out``), as ATen's in-place ops do.

    Kernels that write through raw pointers are invisible to autograd: without this a graph
    that saved, say, the running mean would read the updated values in its backward instead
    of raising "modified by an inplace operation". Registered as the ops' ``ADInplaceOrView``
    kernel (what ``torch.library.custom_op`` does for its mutable ops; the re-entry costs
    ~10-20 us a call, so an op implemented in Python bumps inside its implementation
    instead); inference tensors have no version counter and are left alone."""
    after = getattr(torch._C, "_after_ADInplaceOrView_keyset", None)
    with _lock:
        if namespace in _bump_libs or after is None:
            return
        lib = _bump_libs[namespace] = torch.library.Library(namespace, "IMPL")
    ns = getattr(torch.ops, namespace)
    for name in names:
        op = getattr(ns, name).default
        written = tuple(mutated_arguments(op._schema))
        if not written:
            raise ValueError(f"{namespace}::{name} writes no argument in place")

        untracked = name in UNTRACKED_FORWARD_OPS

        def kernel(keyset, *args, _op=op, _written=written, _untracked=untracked, _name=f"{namespace}::{name}"):
            if _untracked:
                refuse_untracked_grad(_name, args)
            result = _op.redispatch(keyset & after, *args)
            for i in _written:
                if i < len(args) and isinstance(args[i], Tensor):
                    torch.autograd.graph.increment_version(args[i])
            return result

        lib.impl(name, kernel, "ADInplaceOrView", with_keyset=True)
