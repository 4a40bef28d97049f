"""The one argument validator of the public ops: every backend accepts and rejects the same
calls, with errors that name the argument, the value it got and what it needs, raised
before anything (running statistics included) is modified.

Kernels keep only the checks that protect their own memory accesses.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from resfast.ops.schemas import conv_out_shape

__all__ = [
    "FLOAT_DTYPES",
    "check_bn_relu_conv2d_args",
    "check_out",
    "check_running_stats_no_grad",
    "check_momentum",
    "check_eps",
    "check_param_dtype",
    "overlaps",
    "refuse_overlap",
    "int_pair",
    "padding_pair",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
IntPair = Union[int, Sequence[int]]


def int_pair(v: IntPair, name: str) -> List[int]:
    """``[v, v]`` for an int, ``[a, b]`` for a pair of ints; ``TypeError`` otherwise."""
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return [int(v[0]), int(v[1])]
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def padding_pair(padding, weight: Tensor, stride: Sequence[int], dilation: Sequence[int]) -> List[int]:
    """:func:`int_pair` of ``padding``, and ``F.conv2d``'s strings: ``"valid"`` is ``[0, 0]``,
    ``"same"`` (stride 1 only, as ``F.conv2d``) ``dilation * (kernel - 1) // 2`` per side, refused
    where that total is odd (``F.conv2d`` then pads one side more; the fused op pads both sides
    alike). Before trial 30 every string was refused."""
    if not isinstance(padding, str):
        return int_pair(padding, "padding")
    if padding == "valid":
        return [0, 0]
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"padding='same' is not supported for strided convolutions (stride={list(stride)}), as in "
                         "F.conv2d")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if any(t % 2 for t in total):
        raise ValueError(f"padding='same' with kernel {tuple(weight.shape[2:])} and dilation {list(dilation)} pads "
                         "one side more than the other (F.conv2d pads the extra row / column at the end); the fused "
                         "op pads both sides alike: pass numeric padding, or an odd kernel")
    return [t // 2 for t in total]


def check_momentum(momentum) -> float:
    """A float in ``[0, 1]``; ``None`` (the cumulative average) needs a module's ``num_batches_tracked``."""
    if momentum is None:
        raise TypeError("momentum=None (the cumulative moving average) needs the module's num_batches_tracked: use "
                        "resfast.BNReLUConv2d(momentum=None), or pass momentum=1/num_batches_tracked to the functional op")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= float(momentum) <= 1.0:
        raise TypeError(f"momentum must be a float in [0, 1], got {momentum!r}")
    return float(momentum)


def check_eps(eps, name: str = "eps") -> float:
    """A positive float (``ValueError`` otherwise): eager PyTorch's batch norm refuses ``eps <= 0``
    in training, and normalising a zero-variance channel by ``1 / sqrt(0)`` gives no number."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0:
        raise ValueError(f"{name} must be a positive float, got {eps!r}")
    return float(eps)


def check_param_dtype(x_dtype: torch.dtype, tensors: Sequence[Tuple[str, Optional[Tensor]]]) -> None:
    """BN parameters and running statistics: all one dtype, which is ``x``'s dtype or, for a
    float16 / bfloat16 ``x``, float32 (the dtypes ``F.batch_norm`` takes on every device)."""
    allowed = {x_dtype, torch.float32} if x_dtype in (torch.float16, torch.bfloat16) else {x_dtype}
    present = [(n, t) for n, t in tensors if t is not None]
    for name, t in present:
        if t.dtype not in allowed:
            want = " or ".join(sorted(str(d).replace("torch.", "") for d in allowed))
            raise TypeError(f"{name} has dtype {t.dtype} but x is {x_dtype}: the BatchNorm parameters and running "
                            f"statistics must be {want}")
    dtypes = {t.dtype for _, t in present}
    if len(dtypes) > 1:
        listing = ", ".join(f"{n}={t.dtype}" for n, t in present)
        raise TypeError(f"the BatchNorm parameters and running statistics must share one dtype, got {listing}")


def check_bn_relu_conv2d_args(
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride, padding,
    dilation, groups, out,
) -> Tuple[List[int], List[int], List[int], float]:
    """Check every argument of :func:`resfast.functional.bn_relu_conv2d`; returns
    ``(stride, padding, dilation, momentum)`` normalised. Modifies nothing."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in/groups, kH, kW), got shape {tuple(weight.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"x has no channels (shape {tuple(x.shape)}); the fused op needs at least one input channel")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has unsupported dtype {x.dtype}; supported: float32, float16, bfloat16, float64")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {training!r}")
    momentum = check_momentum(momentum)
    check_eps(eps)
    stride, dilation = int_pair(stride, "stride"), int_pair(dilation, "dilation")
    padding = padding_pair(padding, weight, stride, dilation)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c_in, c_out = x.shape[1], weight.shape[0]
    if c_in % groups:
        raise ValueError(f"groups={groups} does not divide the input channels C={c_in} of x")
    if c_out % groups:
        raise ValueError(f"groups={groups} does not divide the output channels C_out={c_out} of weight")
    if weight.shape[1] * groups != c_in:
        raise ValueError(
            f"channel mismatch: x has C={c_in} channels but weight of shape {tuple(weight.shape)} with "
            f"groups={groups} expects {weight.shape[1] * groups}"
        )
    named = {"bias": (bias, c_out), "bn_weight": (bn_weight, c_in), "bn_bias": (bn_bias, c_in),
             "running_mean": (running_mean, c_in), "running_var": (running_var, c_in)}
    for name, (t, n) in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
    check_running_stats_no_grad(running_mean, running_var)
    check_param_dtype(x.dtype, [("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                                ("running_var", running_var)])
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var (got None)")
    if training and running_mean is not None and not torch.compiler.is_compiling() \
            and _running_overlap(running_mean, running_var):
        # (eager PyTorch's answer then depends on the order of its two in-place updates; in eval
        # nothing is written and both are only read, as F.batch_norm reads them)
        raise ValueError("running_mean and running_var share memory; pass two separate tensors")
    if x.shape[0] > 0 and x.numel() == 0:
        # (PyTorch's conv2d refuses it too: "Only zero batch or zero channel inputs are supported")
        raise ValueError(f"x of shape {tuple(x.shape)} has no positions (H or W is 0); only an empty batch (N = 0) "
                         "may be empty")
    if training and x.numel() > 0 and x.numel() // max(c_in, 1) <= 1:
        raise ValueError(f"expected more than 1 value per channel when training, got x of shape {tuple(x.shape)}")
    tensors = {"x": x, "weight": weight, "bias": bias, "out": out, **{k: v for k, (v, _) in named.items()}}
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")
    if any(s < 1 for s in stride) or any(d < 1 for d in dilation) or any(p < 0 for p in padding):
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    shape = conv_out_shape(x, weight, stride, padding, dilation)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"the conv output would be empty: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    if out is not None:
        check_out(out, shape, x, inputs=[("x", x), ("weight", weight), ("bias", bias), ("bn_weight", bn_weight),
                                         ("bn_bias", bn_bias), ("running_mean", running_mean),
                                         ("running_var", running_var)])
    return stride, padding, dilation, momentum


def check_running_stats_no_grad(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> None:
    """``RuntimeError`` where a running statistic requires grad while autograd records, as
    eager PyTorch's ``batch_norm`` refuses it ("not differentiable with respect to argument
    'running_mean'"): the fused ops give no gradient for them, which would otherwise come
    back as ``None`` (read as zero) for an output that does depend on them in eval mode."""
    if not torch.is_grad_enabled():
        return
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if isinstance(t, Tensor) and t.requires_grad:
            raise RuntimeError(f"{name} requires grad, but the BatchNorm running statistics are not differentiable "
                               "(eager PyTorch's batch_norm refuses them too); call requires_grad_(False) on them, "
                               "or pass a detached copy")


def check_out(out, shape: Sequence[int], x: Tensor, inputs: Sequence[Tuple[str, Optional[Tensor]]]) -> None:
    """``out=`` rules of PyTorch's own ops: the right shape, dtype and device; no gradient
    wanted of it; no element written twice (stride 0); no memory shared with an input."""
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if list(out.shape) != list(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"out dtype {out.dtype} does not match x dtype {x.dtype}")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device} but x is on {x.device}; all tensors must be on one device")
    if out.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("out= does not support automatic differentiation: out requires grad; pass an out that "
                           "does not require grad, or no out")
    if torch._debug_has_internal_overlap(out) == 1:
        raise RuntimeError("out has internal overlap (several elements share one memory location, e.g. an expanded "
                           "tensor); pass a tensor whose elements are distinct, e.g. out.clone()")
    refuse_overlap(out, inputs)


def refuse_overlap(out: Tensor, inputs: Sequence[Tuple[str, Optional[Tensor]]], op: str = "") -> None:
    """``RuntimeError`` when ``out`` may share memory with one of the named ``inputs``
    (:func:`overlaps`); ``op``, when given, starts the message."""
    for name, t in inputs:
        if isinstance(t, Tensor) and overlaps(out, t):
            raise RuntimeError(f"{op + ': ' if op else ''}out shares memory with {name}: the op would overwrite its "
                               f"own input while reading it; pass an out that does not overlap {name} (e.g. a fresh "
                               "tensor or another slice)")


def _running_overlap(running_mean: Tensor, running_var: Tensor) -> bool:
    """:func:`overlaps` of the running statistics; False where their storage cannot be read
    (the wrapper tensors of ``torch.func`` transforms; the caller skips ``torch.compile``'s
    tracing) or has no addresses (``meta`` tensors all report address 0)."""
    if running_mean.device.type == "meta":
        return False
    try:
        return overlaps(running_mean, running_var)
    except (NotImplementedError, RuntimeError):
        return False


def overlaps(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` may share a memory location.

    Exact for different storages, disjoint byte ranges, views of one non-overlapping layout
    that differ in one dimension (two channel slices of one buffer, the way the dense block and
    ``out=``-into-a-slice use them, in NCHW or channels_last), and any two views of at most
    ``_EXACT_ELEMENTS`` elements each (per-channel vectors such as the columns of one
    ``[C, 2]`` statistics buffer, whose byte ranges interleave); anything else that shares
    bytes counts as overlapping.
    """
    if a.numel() == 0 or b.numel() == 0 or a.device.type == "meta":  # (meta tensors hold no memory)
        return False
    if a.device != b.device or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    lo_a, hi_a = _byte_range(a)
    lo_b, hi_b = _byte_range(b)
    if hi_a <= lo_b or hi_b <= lo_a:
        return False
    if a.dtype == b.dtype and a.dim() == b.dim() and a.stride() == b.stride():
        boxes = _box_overlap(a, b)
        if boxes is not None:
            return boxes
    if a.numel() <= _EXACT_ELEMENTS and b.numel() <= _EXACT_ELEMENTS and _concrete(a) and _concrete(b):
        return _exact_overlap(a, b)
    return True


_EXACT_ELEMENTS = 1 << 16  # views this small are compared element by element


def _box_overlap(a: Tensor, b: Tensor) -> Optional[bool]:
    """Whether ``a`` and ``b`` (one dtype, one strides) overlap, where both are boxes of one
    injective layout that differ in one dimension; ``None`` where they are not."""
    differing = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
    step_dims = [d for d in range(a.dim()) if a.stride(d) != 0]
    delta = b.storage_offset() - a.storage_offset()
    # Offsets of the two views in one virtual parent: which dimension can the offset move along?
    for d in step_dims:
        if delta % a.stride(d):
            continue
        shift = delta // a.stride(d)
        if any(dd != d for dd in differing) and differing:
            continue
        lo, hi = min(0, shift), max(a.shape[d], shift + b.shape[d])
        sizes = list(a.shape)
        sizes[d] = hi - lo
        if not _non_overlapping(sizes, a.stride()):
            continue
        # Both views are boxes of one injective layout: they overlap iff the boxes meet along d.
        return shift < a.shape[d] and 0 < shift + b.shape[d]
    return None


def _concrete(t: Tensor) -> bool:
    return all(type(v) is int for v in (*t.shape, *t.stride(), t.storage_offset()))


def _exact_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether any byte of an element of ``a`` is a byte of an element of ``b`` (one storage).
    Plain Python on the views' metadata: no tensor op (safe under any dispatch mode)."""
    def starts(t: Tensor) -> set:
        offs = [t.storage_offset() * t.element_size()]
        for size, stride in zip(t.shape, t.stride()):
            step = stride * t.element_size()
            offs = [o + i * step for o in offs for i in range(size)]
        return set(offs)

    sa, sb = starts(a), starts(b)
    if a.element_size() == b.element_size():  # element starts then meet exactly where elements do
        return not sa.isdisjoint(sb)
    bytes_a = {o + i for o in sa for i in range(a.element_size())}
    return any(o + i in bytes_a for o in sb for i in range(b.element_size()))


def _byte_range(t: Tensor) -> Tuple[int, int]:
    lo = hi = t.storage_offset()
    for size, stride in zip(t.shape, t.stride()):
        if stride >= 0:
            hi += (size - 1) * stride
        else:
            lo += (size - 1) * stride
    return lo * t.element_size(), (hi + 1) * t.element_size()


def _non_overlapping(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """True when no two indices of a ``sizes``/``strides`` layout map to one offset."""
    dims = sorted((abs(st), sz) for sz, st in zip(sizes, strides) if sz > 1)
    span = 1
    for st, sz in dims:
        if st < span:
            return False
        span = st * sz
    return True
