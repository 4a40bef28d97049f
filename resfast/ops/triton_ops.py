"""The ``resfast_triton`` op library: host launch code for the Triton kernels in
:mod:`resfast.kernels.triton`, registered with ``torch.library`` for CUDA tensors (and CPU
tensors, which Triton runs only under ``TRITON_INTERPRET=1``).

Schemas and fake implementations come from :mod:`resfast.ops.schemas`, autograd from
:mod:`resfast.ops.autograd`, so ``torch.ops.resfast_triton.*`` trace under
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``. Semantics are those of
:mod:`resfast.ops.reference`; the contract is :class:`resfast.ops.opset.OpSet`.

Tile shapes: on CUDA each conv kernel is ``triton.autotune``'d over a handful of configs
keyed on the problem shape; under the interpreter one small fixed config is used, since
autotuning there would run every config through NumPy.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from resfast import backends
from resfast.kernels.triton import bn_elemt, bn_relu_conv_bwd, bn_relu_conv_fwd, bn_stats as bn_stats_k
from resfast.ops import autograd, schemas
from resfast.ops.opset import OP_NAMES
from resfast.ops.schemas import conv_out_shape, out_memory_format

__all__ = [*OP_NAMES, "OPS", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Smallest group width that gets tl.dot; narrower groups use the direct FMA formulation.
_DOT_MIN_CHANNELS = 16


def bn_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (float32 ``[C]``), one stable pass."""
    _check_x("x", x)
    n, c, h, w = x.shape
    p = n * h * w
    if p == 0:
        raise ValueError(f"bn_stats needs at least one value per channel, got x of shape {tuple(x.shape)}")
    if _interpret():
        block_c, block_p = 16, 32
    elif x.stride(1) == 1:  # channels innermost: read a wide channel tile per position
        block_c = min(64, _pow2(c))
        block_p = max(32, 4096 // block_c)
    else:  # positions innermost (NCHW): read long position runs of a few channels
        block_c, block_p = min(4, _pow2(c)), 512
    c_tiles = _cdiv(c, block_c)
    splits = max(1, min(_cdiv(_target_programs(x), c_tiles), _cdiv(p, block_p)))
    chunk = _cdiv(_cdiv(p, splits), block_p) * block_p
    splits = _cdiv(p, chunk)
    f32 = dict(dtype=torch.float32, device=x.device)
    pcount, pmean, pm2 = (torch.empty([splits, c], **f32) for _ in range(3))
    mean, var = torch.empty([c], **f32), torch.empty([c], **f32)
    with _device(x):
        bn_stats_k.bn_stats_partial_kernel[(c_tiles, splits)](
            x, pcount, pmean, pm2, c, h * w, w, p, chunk, *x.stride(),
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
        merge_c = 16 if _interpret() else 128
        bn_stats_k.bn_stats_merge_kernel[(_cdiv(c, merge_c),)](
            pcount, pmean, pm2, mean, var, c, splits, BLOCK_C=merge_c, num_warps=4)
    return mean, var


def bn_stats_update(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                    eps: float) -> Tuple[Tensor, Tensor]:
    """Training statistics ``(mean, invstd)`` of ``x``; the running statistics updated in place
    (unbiased variance) when given."""
    mean, var = bn_stats(x)
    if running_mean is not None:
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_((var * (count / max(count - 1, 1))).to(running_var.dtype),
                                                  alpha=momentum)
    return mean, torch.rsqrt(var + eps)


def bn_relu_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    mean: Tensor, invstd: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
    batch_stats: bool,
) -> Tensor:
    """``conv2d(relu((x - mean) * invstd * gamma + beta), weight, bias)``, output in
    ``out_memory_format(x)``; ``batch_stats`` only matters to autograd."""
    _check_conv("bn_relu_conv2d", x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups)
    shape = conv_out_shape(x, weight, stride, padding, dilation)
    y = _empty_like_fake(x, shape)
    _launch_forward(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, y)
    return y


def bn_relu_conv2d_out(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    mean: Tensor, invstd: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
    out: Tensor,
) -> None:
    """:func:`bn_relu_conv2d` written into ``out`` (any strides, e.g. a channel slice of a larger buffer)."""
    _check_conv("bn_relu_conv2d_out", x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation,
                groups)
    shape = conv_out_shape(x, weight, stride, padding, dilation)
    _check_like("out", out, x, shape)
    _launch_forward(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, out)


def bn_relu_conv2d_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    mean: Tensor, invstd: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
    bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_z, grad_weight, grad_bias, sum_dz, sum_dz_xhat)`` as
    :func:`resfast.ops.reference.bn_relu_conv2d_backward` defines them."""
    _check_conv("bn_relu_conv2d_backward", x, weight, None, bn_weight, bn_bias, mean, invstd, stride, padding,
                dilation, groups)
    shape = conv_out_shape(x, weight, stride, padding, dilation)
    _check_like("grad_out", grad_out, x, shape)
    n, c, h, w = x.shape
    co, cin_g, kh, kw = weight.shape
    ho, wo = shape[2], shape[3]
    cout_g = co // groups
    use_dot = cin_g >= _DOT_MIN_CHANNELS and cout_g >= _DOT_MIN_CHANNELS
    mean, invstd, gamma, beta = _bn_vectors(mean, invstd, bn_weight, bn_bias)
    dummy = mean
    flags = dict(KH=kh, KW=kw, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, USE_DOT=use_dot,
                 DOT_F32=_dot_f32(x))
    conv = (*stride, *padding, *dilation)

    grad_z = torch.empty_like(x, memory_format=out_memory_format(x))
    m = n * h * w
    block_m = 32 if _interpret() else 64
    m_tiles = _cdiv(m, block_m)
    psum_dz = torch.empty([m_tiles, c], dtype=torch.float32, device=x.device)
    psum_dzx = torch.empty_like(psum_dz)
    if use_dot:
        grid_in = lambda meta: (m_tiles, groups * _cdiv(c // groups, meta["BLOCK_N"]))  # noqa: E731
    else:
        grid_in = lambda meta: (m_tiles, _cdiv(c, meta["BLOCK_N"]))  # noqa: E731
    tuned_in = (bn_relu_conv_bwd.bn_relu_conv_bwd_input_dot if use_dot
                else bn_relu_conv_bwd.bn_relu_conv_bwd_input_direct)

    p = n * ho * wo
    chunk_unit = 32 if _interpret() else 128
    tiles_w = max(1, (co * cin_g * kh * kw) // (64 * 64 if use_dot else 128))
    splits = max(1, min(_cdiv(_target_programs(x), tiles_w), _cdiv(p, 2 * chunk_unit)))
    chunk = _cdiv(_cdiv(p, splits), chunk_unit) * chunk_unit
    splits = _cdiv(p, chunk)
    pgw = torch.empty([splits, co, cin_g, kh, kw], dtype=torch.float32, device=x.device)
    pgb = torch.empty([splits, co], dtype=torch.float32, device=x.device)
    if use_dot:
        grid_w = lambda meta: (groups * _cdiv(cout_g, meta["BLOCK_CO"]),  # noqa: E731
                               _cdiv(cin_g, meta["BLOCK_CI"]) * kh * kw, splits)
    else:
        grid_w = lambda meta: (_cdiv(co * cin_g, meta["BLOCK_CO"]), kh * kw, splits)  # noqa: E731
    tuned_w = (bn_relu_conv_bwd.bn_relu_conv_bwd_weight_dot if use_dot
               else bn_relu_conv_bwd.bn_relu_conv_bwd_weight_direct)

    with _device(x):
        _launch(tuned_in, grid_in, dict(BLOCK_N=16, BLOCK_K=16),
                grad_out, weight, x, _or(gamma, dummy), _or(beta, dummy), mean, invstd, grad_z, psum_dz, psum_dzx,
                m, c, h, w, ho, wo, cin_g, cout_g,
                *grad_out.stride(), *weight.stride(), *x.stride(), *grad_z.stride(), *conv,
                BLOCK_M=block_m, **flags)
        _launch(tuned_w, grid_w, dict(BLOCK_CO=16, BLOCK_CI=16, BLOCK_P=16),
                grad_out, x, _or(gamma, dummy), _or(beta, dummy), mean, invstd, pgw, pgb,
                p, h, w, co, ho, wo, cin_g, cout_g, chunk,
                *grad_out.stride(), *x.stride(), *conv, **flags)
    grad_weight = pgw.sum(0).to(weight.dtype)
    grad_bias = pgb.sum(0).to(weight.dtype) if bias_grad else weight.new_empty([0])
    return grad_z, grad_weight, grad_bias, psum_dz.sum(0), psum_dzx.sum(0)


def bn_backward_elemt(
    grad_z: Tensor, x: Tensor, bn_weight: Optional[Tensor], mean: Tensor, invstd: Tensor, sum_dz: Tensor,
    sum_dz_xhat: Tensor, inv_count: float,
) -> Tensor:
    """dL/dx from dL/dz in ``x``'s dtype and ``out_memory_format(x)``, as
    :func:`resfast.ops.reference.bn_backward_elemt` defines it."""
    gx = torch.empty_like(x, memory_format=out_memory_format(x))
    _launch_elemt(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count, False, gx)
    return gx


def bn_backward_elemt_out(
    grad_z: Tensor, x: Tensor, bn_weight: Optional[Tensor], mean: Tensor, invstd: Tensor, sum_dz: Tensor,
    sum_dz_xhat: Tensor, inv_count: float, accumulate: bool, out: Tensor,
) -> None:
    """:func:`bn_backward_elemt` written into ``out`` (any strides), or added to it with ``accumulate``."""
    _check_like("out", out, x, list(x.shape))
    _launch_elemt(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count, accumulate, out)


def _launch_elemt(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count, accumulate, out) -> None:
    _check_x("x", x)
    _check_like("grad_z", grad_z, x, list(x.shape))
    c = x.shape[1]
    for name, t in (("bn_weight", bn_weight), ("mean", mean), ("invstd", invstd), ("sum_dz", sum_dz),
                    ("sum_dz_xhat", sum_dz_xhat)):
        _check_vector(name, t, c, x)
    n, _, h, w = x.shape
    p = n * h * w
    if p == 0:
        return
    if _interpret():
        block_p, block_c = 32, 16
    elif x.stride(1) == 1:
        block_c = min(64, _pow2(c))
        block_p = max(16, 2048 // block_c)
    else:
        block_p, block_c = 256, min(8, _pow2(c))
    mean, invstd, gamma, _ = _bn_vectors(mean, invstd, bn_weight, None)
    sdz, sdzx = (t.to(torch.float32).contiguous() for t in (sum_dz, sum_dz_xhat))
    with _device(x):
        bn_elemt.bn_backward_elemt_kernel[(_cdiv(p, block_p), _cdiv(c, block_c))](
            grad_z, x, out, _or(gamma, mean), mean, invstd, sdz, sdzx, float(inv_count), c, h * w, w, p,
            *grad_z.stride(), *x.stride(), *out.stride(),
            HAS_GAMMA=gamma is not None, ACCUMULATE=bool(accumulate), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)


# ----------------------------------------------------------------------------- helpers


def _launch_forward(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, y):
    n, c, h, w = x.shape
    co, cin_g, kh, kw = weight.shape
    ho, wo = y.shape[2], y.shape[3]
    cout_g = co // groups
    m = n * ho * wo
    if y.numel() == 0:
        return
    use_dot = cin_g >= _DOT_MIN_CHANNELS and cout_g >= _DOT_MIN_CHANNELS
    mean, invstd, gamma, beta = _bn_vectors(mean, invstd, bn_weight, bn_bias)
    if use_dot:
        grid = lambda meta: (_cdiv(m, meta["BLOCK_M"]), groups * _cdiv(cout_g, meta["BLOCK_N"]))  # noqa: E731
        tuned = bn_relu_conv_fwd.bn_relu_conv_fwd_dot
    else:
        grid = lambda meta: (_cdiv(m, meta["BLOCK_M"]), _cdiv(co, meta["BLOCK_N"]))  # noqa: E731
        tuned = bn_relu_conv_fwd.bn_relu_conv_fwd_direct
    with _device(x):
        _launch(tuned, grid, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16),
                x, weight, _or(bias, mean), _or(gamma, mean), _or(beta, mean), mean, invstd, y,
                m, h, w, co, ho, wo, cin_g, cout_g,
                *x.stride(), *weight.stride(), *y.stride(), *stride, *padding, *dilation,
                KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
                USE_DOT=use_dot, DOT_F32=_dot_f32(x))


def _launch(tuned, grid: Callable[[Dict], Tuple[int, ...]], interp_meta: Dict[str, int], *args, **kwargs) -> None:
    """Autotuned launch on CUDA; one fixed small tile under the interpreter."""
    if _interpret():
        tuned.fn[grid(interp_meta)](*args, **kwargs, **interp_meta)
    else:
        tuned[grid](*args, **kwargs)


def _interpret() -> bool:
    return backends.triton_interpret()


def _dot_f32(x: Tensor) -> bool:
    # MACHINE_FACTS: the interpreter's tl.dot on two bfloat16 operands is wrong.
    return _interpret() and x.dtype == torch.bfloat16


def _target_programs(x: Tensor) -> int:
    if x.is_cuda and not _interpret():
        return 4 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return 8


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _or(t: Optional[Tensor], dummy: Tensor) -> Tensor:
    """A pointer argument for an optional tensor; the kernel never reads it when absent."""
    return dummy if t is None else t


def _empty_like_fake(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Allocate as the registered fake does (``new_empty(shape).contiguous(fmt)``) so strides match exactly."""
    fmt = out_memory_format(x)
    t = x.new_empty(shape)
    if not t.is_contiguous(memory_format=fmt):
        t = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    return t


def _bn_vectors(mean, invstd, gamma, beta):
    """float32 contiguous per-channel vectors (BN parameters keep their dtype; kernels upcast on load)."""
    f = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return f(mean), f(invstd), c(gamma), c(beta)


# ----------------------------------------------------------------------------- validation


def _check_x(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"resfast_triton: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"resfast_triton: {name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"resfast_triton: {name} has dtype {x.dtype}; the triton backend supports float32, float16 "
                        f"and bfloat16 (use backend='eager' or 'native' for {x.dtype})")
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu":
        if not _interpret():
            raise ValueError(f"resfast_triton: {name} is a CPU tensor; Triton kernels need CUDA tensors, or "
                             "TRITON_INTERPRET=1 (set before importing triton) to interpret them on the CPU")
        return
    raise ValueError(f"resfast_triton: {name} is on {x.device}; Triton kernels need CUDA tensors")


def _check_like(name: str, t, x: Tensor, shape: Sequence[int]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"resfast_triton: {name} must be a torch.Tensor, got {type(t).__name__}")
    if list(t.shape) != list(shape):
        raise ValueError(f"resfast_triton: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"resfast_triton: {name} dtype {t.dtype} does not match x dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"resfast_triton: {name} is on {t.device} but x is on {x.device}")


def _check_vector(name: str, t, n: int, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"resfast_triton: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != (n,):
        raise ValueError(f"resfast_triton: {name} must have shape ({n},), got {tuple(t.shape)}")
    if not t.is_floating_point() or t.dtype == torch.float64:
        raise TypeError(f"resfast_triton: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"resfast_triton: {name} is on {t.device} but x is on {x.device}")


def _check_conv(op, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups) -> None:
    _check_x("x", x)
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"resfast_triton.{op}: weight must be a 4-D tensor (C_out, C_in/groups, kH, kW), got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"resfast_triton.{op}: weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"resfast_triton.{op}: weight is on {weight.device} but x is on {x.device}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"resfast_triton.{op}: groups must be a positive int, got {groups!r}")
    c, co = x.shape[1], weight.shape[0]
    if c % groups or co % groups or weight.shape[1] * groups != c:
        raise ValueError(f"resfast_triton.{op}: channel mismatch: x has C={c}, weight has shape "
                         f"{tuple(weight.shape)}, groups={groups}; need C == weight.shape[1] * groups and "
                         f"groups dividing C_out={co}")
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or any(int(i) < lo for i in v):
            raise ValueError(f"resfast_triton.{op}: {name} must be two ints >= {lo}, got {list(v)}")
    if bias is not None:
        _check_vector("bias", bias, co, x)
        if bias.dtype != x.dtype:
            raise TypeError(f"resfast_triton.{op}: bias dtype {bias.dtype} does not match x dtype {x.dtype}")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("mean", mean), ("invstd", invstd)):
        _check_vector(name, t, c, x)
    shape = conv_out_shape(x, weight, stride, padding, dilation)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"resfast_triton.{op}: the conv output would be empty: x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, stride={list(stride)}, padding={list(padding)}, "
                         f"dilation={list(dilation)}")


# ----------------------------------------------------------------------------- registration

lib = schemas.define_library("resfast_triton")
for _name in OP_NAMES:
    lib.impl(_name, globals()[_name], "CUDA")
    lib.impl(_name, globals()[_name], "CPU")  # runs only under TRITON_INTERPRET=1; _check_x says so otherwise
schemas.register_fakes("resfast_triton")
OPS = torch.ops.resfast_triton
autograd.register_autograd("resfast_triton", OPS)
