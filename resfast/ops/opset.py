"""The op-set contract: the seven ops every backend implements, with one signature each.

An *op set* is what :func:`resfast.ops.opsets.get_ops` returns for a concrete backend:

* ``eager``  :mod:`resfast.ops.reference` (plain PyTorch; the semantics of every op),
* ``triton`` ``torch.ops.resfast_triton`` (host code in :mod:`resfast.ops.triton_ops`),
* ``native`` ``torch.ops.resfast`` (C++/CUDA kernels of ``resfast._C``).

Everything above the op sets (the functional op, its autograd, the SyncBN path and the
shared dense block) is written once against :class:`OpSet`, so a backend supplies kernels
and nothing else. The schemas the triton and native libraries register are in
:mod:`resfast.ops.schemas` (one Python source; the C++ library is tested against it).

Conventions shared by every op:

* ``x`` is ``N x C x H x W`` in any strides (NCHW, channels_last, a channel-prefix view of
  a larger buffer); tensors an op allocates use :func:`resfast.ops.schemas.out_memory_format`.
* ``mean``/``invstd``/``sum_*`` are per-channel ``[C]`` vectors in ``acc_dtype(x)`` (float32,
  float64 for float64 input); BN parameters keep their own dtype and are upcast on load.
* ``z = (x - mean) * invstd * gamma + beta`` is the BN output, ``a = relu(z)`` the activation
  the conv reads; padding is zero *after* BN-ReLU. ``a`` is rounded to ``x``'s dtype before
  the conv, as the unfused ``BatchNorm2d -> ReLU -> Conv2d`` rounds it.
"""
from __future__ import annotations

from typing import List, Optional, Protocol, Tuple, runtime_checkable

from torch import Tensor

__all__ = ["OpSet", "OP_NAMES", "OPTIONAL_OPS"]

#: The ops of the contract, in the order the schemas list them.
OP_NAMES = (
    "bn_stats",
    "bn_stats_update",
    "bn_relu_conv2d",
    "bn_relu_conv2d_out",
    "bn_relu_conv2d_backward",
    "bn_backward_elemt",
    "bn_backward_elemt_out",
)

#: Ops an op set MAY provide (looked up with ``getattr(ops, name, None)``; callers compose the
#: seven ops where one is absent).
#:
#: The eager op set has the first two: PyTorch's batch-norm ops do in one op what the seven
#: split (statistics, running update and normalisation; the two sums and dL/dx), so the eager
#: backend launches about as many ops as the unfused modules:
#:
#: * ``bn_train_relu_conv2d(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
#:   momentum, eps, stride, padding, dilation, groups, out=None) -> (y or None, mean, invstd)``:
#:   ``bn_stats_update`` then ``bn_relu_conv2d`` (written into ``out`` when given);
#: * ``bn_relu_conv2d_backward_full(grad_out, x, weight, bn_weight, bn_bias, mean, invstd,
#:   stride, padding, dilation, groups, bias_grad, grad_x_out=None, accumulate=False,
#:   weight_grad=True) -> (grad_x or None, grad_weight or None, grad_bias or [0], grad_gamma,
#:   grad_beta) or None``: the whole backward when ``mean``/``invstd`` are ``x``'s own batch
#:   statistics (training, no process group), ``grad_x`` written into (or added to)
#:   ``grad_x_out`` when given, the weight gradient skipped without ``weight_grad``; ``None``
#:   where the op set cannot do it in one go (the eager one: float16/bfloat16), and the caller
#:   composes the seven.
#:
#: The triton op set has ``bn_relu_conv2d_backward_full`` too (registered: it returns an empty
#: tensor where the eager one returns ``None`` for ``grad_x``, and never ``None`` as a whole; it
#: computes the weight gradient whatever ``weight_grad`` says), and the last two (statistics in
#: the conv's epilogue; schemas in :data:`resfast.ops.schemas.OPTIONAL_SCHEMAS`):
#:
#: * ``bn_relu_conv2d_stats(<bn_relu_conv2d's arguments>) -> (y, partials)``: ``bn_relu_conv2d``
#:   and the batch statistics of ``y`` as float32 ``[3, STATS_ROWS, C_out]`` partials (count,
#:   mean, M2 per program), taken in the conv's epilogue;
#: * ``bn_stats_merge_update(partials, count, running_mean, running_var, momentum, eps) ->
#:   (mean, invstd)``: ``bn_stats_update`` of the tensor those partials describe, from them;
#:
#: and three more of its own (the first native has too): ``bn_relu_conv2d_train(x, weight, bias, bn_weight, bn_bias,
#: running_mean, running_var, momentum, eps, stride, padding, dilation, groups) -> (y, mean,
#: invstd)`` (``bn_stats_update`` then ``bn_relu_conv2d`` in one call: the functional op's
#: training forward with gradients), ``bn_relu_conv2d_out_stats`` (``bn_relu_conv2d_stats``
#: written into ``out``) and ``bn_stats_merge_out(partials, count, mean, var, invstd, eps)``
#: (the finalize into given vectors), and ``bn_relu_conv2d_merge_out`` (``bn_stats_merge_update``,
#: then the conv into ``out``, with its output's statistics into given vectors: the three in one
#: call), the last three for the shared dense block.
OPTIONAL_OPS = ("bn_train_relu_conv2d", "bn_relu_conv2d_backward_full", "bn_relu_conv2d_stats", "bn_stats_merge_update",
                "bn_relu_conv2d_train", "bn_relu_conv2d_out_stats", "bn_stats_merge_out", "bn_relu_conv2d_merge_out",
                "bn_relu_conv2d_backward_pair")


@runtime_checkable
class OpSet(Protocol):
    """The seven ops of a backend. Semantics: :mod:`resfast.ops.reference`."""

    def bn_stats(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-channel ``(mean, biased_var)``."""
        ...

    def bn_stats_update(self, x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        momentum: float, eps: float) -> Tuple[Tensor, Tensor]:
        """Training statistics ``(mean, invstd)``; updates the running statistics in place
        (unbiased variance, ``momentum`` as in ``F.batch_norm``) when they are given."""
        ...

    def bn_relu_conv2d(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                       bn_bias: Optional[Tensor], mean: Tensor, invstd: Tensor, stride: List[int],
                       padding: List[int], dilation: List[int], groups: int, batch_stats: bool) -> Tensor:
        """``conv2d(relu(bn(x)), weight, bias)``; ``batch_stats`` only matters to autograd."""
        ...

    def bn_relu_conv2d_out(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                           bn_bias: Optional[Tensor], mean: Tensor, invstd: Tensor, stride: List[int],
                           padding: List[int], dilation: List[int], groups: int, out: Tensor) -> None:
        """:meth:`bn_relu_conv2d` written into ``out`` (any strides). ``out`` sharing memory with an
        input (``x``, the weights, the BN vectors) is refused by the native and triton op sets
        (``RuntimeError``: "out shares memory with ..."); the eager one computes, then copies.
        Disjoint channel slices of one buffer (the shared dense block's layers) are not sharing."""
        ...

    def bn_relu_conv2d_backward(self, grad_out: Tensor, x: Tensor, weight: Tensor, bn_weight: Optional[Tensor],
                                bn_bias: Optional[Tensor], mean: Tensor, invstd: Tensor, stride: List[int],
                                padding: List[int], dilation: List[int], groups: int,
                                bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(grad_z, grad_weight, grad_bias or [0], sum_dz, sum_dz_xhat)``."""
        ...

    def bn_backward_elemt(self, grad_z: Tensor, x: Tensor, bn_weight: Optional[Tensor], mean: Tensor,
                          invstd: Tensor, sum_dz: Tensor, sum_dz_xhat: Tensor, inv_count: float) -> Tensor:
        """dL/dx from dL/dz; ``inv_count`` 0 means running statistics (no coupling term)."""
        ...

    def bn_backward_elemt_out(self, grad_z: Tensor, x: Tensor, bn_weight: Optional[Tensor], mean: Tensor,
                              invstd: Tensor, sum_dz: Tensor, sum_dz_xhat: Tensor, inv_count: float,
                              accumulate: bool, out: Tensor) -> None:
        """:meth:`bn_backward_elemt` written into (or, with ``accumulate``, added to) ``out``. ``out``
        may be ``grad_z`` or ``x`` itself (in place: each element comes from the same element of
        both); any other overlap with them or with the per-channel vectors is refused by the native
        and triton op sets (the eager one computes, then copies)."""
        ...
