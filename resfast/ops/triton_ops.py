"""The ``resfast_triton`` op library: host launch code for the Triton kernels in
:mod:`resfast.kernels.triton`, registered with ``torch.library`` for CUDA tensors (and CPU
tensors, which Triton runs only under ``TRITON_INTERPRET=1``).

Schemas and fake implementations come from :mod:`resfast.ops.schemas`, autograd from
:mod:`resfast.ops.autograd`, so ``torch.ops.resfast_triton.*`` trace under
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``. Semantics are those of
:mod:`resfast.ops.reference`; the contract is :class:`resfast.ops.opset.OpSet`.

**Launch plans.** Every op first builds its *launch plan*: the list of
:class:`KernelLaunch` records (kernel, candidate tile configs, and a ``bind(config)`` that
gives the grid, the arguments and the constexprs exactly as they are passed to the kernel),
then runs it. :func:`launch_plan` returns the plan of an op without running it (on ``meta``
tensors too), so the static sm_90 model (:mod:`resfast.profiling.static_model`) compiles
each kernel exactly as this code launches it. Launches per training call: forward 3
(statistics, their finalize with the running-statistics update, the conv), backward 3 or 4
(one conv-backward kernel, or two when a group's output channels exceed one tile, the
finalize of the gradient partials, the BN input gradient).

**Tile configs and autotuning** (:class:`Tuner`): on CUDA each tuned launch picks among a
short list of configs (pruned offline with the static model) by timing them once per
*bucketed* key (positions rounded to a power of two, channel counts to a multiple of 64, so
DenseNet's many layer widths share a few keys); the choice is kept in a JSON file shared by
processes (``triton-tune.json`` in ``RESFAST_CACHE_DIR``, default ``~/.cache/resfast``). The first config of each
list is the planner's static choice (from the static model's predictions); it runs when
``RESFAST_TRITON_AUTOTUNE=0``. Tuning never runs inside a CUDA-graph capture: a capture uses
the cached choice or the static one, so warm up (one eager training step with the same
shapes) before capturing. Under the interpreter one small fixed config runs.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import resfast.backends as backend_table
from resfast.kernels.triton import bn_elemt, bn_relu_conv_bwd, bn_relu_conv_fwd, bn_stats as bn_stats_k
from resfast.kernels.triton import bn_relu_conv_fwd_tma, bn_relu_conv_wgrad
from resfast.ops import autograd, schemas
from resfast.ops.opset import OP_NAMES
from resfast.ops.schemas import STATS_ROWS, TRITON_OPTIONAL, conv_out_shape, dense_vector, out_memory_format
from resfast.ops.validation import overlaps, refuse_overlap

__all__ = [*OP_NAMES, *TRITON_OPTIONAL, "OPS", "SUPPORTED_DTYPES", "TileConfig", "Bound", "KernelLaunch", "launch_plan", "Tuner",
           "TUNER", "MODEL_SMS"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: SM count assumed for ``meta`` tensors (the static model's H100 / H200 SXM).
MODEL_SMS = 132


# ----------------------------------------------------------------------------- launch plans


@dataclass(frozen=True)
class TileConfig:
    """One tile config of a kernel: constexpr tile sizes (``meta``; sizes the host derives from
    the shape may cap them), launch options, and for persistent kernels the programs per SM."""

    meta: Tuple[Tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 1

    def __post_init__(self) -> None:
        # read on every launch's host path: the meta dict and the hash once per config
        object.__setattr__(self, "_meta", dict(self.meta))
        object.__setattr__(self, "_hash", hash((self.meta, self.num_warps, self.num_stages, self.programs_per_sm)))

    def __hash__(self) -> int:
        return self._hash

    def get(self, name: str, default: int = 0) -> int:
        return self._meta.get(name, default)

    @property
    def label(self) -> str:
        """``"TILE_H=8,TILE_W=16,...,w4,s3,p2"`` (the static model's config column)."""
        return ",".join(f"{k}={v}" for k, v in self.meta) + f",w{self.num_warps},s{self.num_stages},p{self.programs_per_sm}"


def _cfg(num_warps: int, num_stages: int, programs_per_sm: int = 1, **meta: int) -> TileConfig:
    return TileConfig(tuple(meta.items()), num_warps, num_stages, programs_per_sm)


@dataclass
class Bound:
    """A launch bound to one config: exactly what ``fn[grid](*args, **constexprs)`` receives
    (``num_warps`` / ``num_stages`` included in ``constexprs``), and for the static model the
    per-program trip counts of the kernel's loops, outermost first (``loops``: name -> trips)
    and the sizes the host derived (``derived``)."""

    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any]
    loops: Dict[str, int] = field(default_factory=dict)
    depths: Dict[str, int] = field(default_factory=dict)  # nesting depth of a loop when not 1
    derived: Dict[str, int] = field(default_factory=dict)
    hbm_bytes: Optional[int] = None  # when the config changes them (split partials), else the launch's
    fn: Any = None  # the kernel this config launches, when not the launch's own


@dataclass
class KernelLaunch:
    """One kernel launch of an op as the host code makes it.

    ``configs`` are the candidates on CUDA (the first is the default, the one used inside a
    CUDA-graph capture before any tuning); ``interp_config`` is what runs under the
    interpreter; ``bind(config)`` allocates any per-config scratch and returns the
    :class:`Bound` launch. ``key`` is the bucketed autotune key; ``hbm_bytes`` the fewest
    bytes the launch must move to or from HBM (the static model's floor)."""

    name: str
    fn: Any
    configs: Sequence[TileConfig]
    interp_config: TileConfig
    bind: Callable[[TileConfig], Bound]
    key: Tuple[Any, ...] = ()
    hbm_bytes: int = 0

    def run(self, config: TileConfig) -> None:
        """Launch with ``config``."""
        b = self.bind(config)
        if min(b.grid) <= 0:
            return
        fn = b.fn or self.fn
        if b.constexprs.get("TMA"):
            _tma_allocator()
        recorder = _RECORDING.recorder
        if recorder is None:
            fn[b.grid](*b.args, **b.constexprs)
            return
        recorder.launch(fn, b)
        with torch.utils._python_dispatch._disable_current_modes():  # (the interpreter's own tensor ops)
            kernel = fn[b.grid](*b.args, **b.constexprs)
        recorder.direct(fn, b, kernel)


def _tma_allocator() -> None:
    """Device-side TMA tensor descriptors (a config's ``TMA``) live in a global scratch buffer
    that triton allocates at each launch through ``triton.set_allocator``: set one (torch's
    caching allocator, on the launch's stream) unless the caller has set their own."""
    try:
        from triton.runtime import _allocation
    except ImportError:  # a triton without device-side descriptors never compiles a TMA config
        return
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        import triton

        def alloc(size: int, alignment: int, stream: Optional[int]) -> Tensor:
            return torch.empty(size, dtype=torch.int8, device="cuda")

        triton.set_allocator(alloc)


def launch_plan(op: str, *args: Any) -> List[KernelLaunch]:
    """The launches op ``op`` (a name of :data:`resfast.ops.opset.OP_NAMES`) makes for these
    arguments, without running them. Works on ``meta`` tensors (an SM count of
    :data:`MODEL_SMS` is assumed), which is how the static model uses it."""
    planners = {**_PLANNERS, **_OPTIONAL_PLANNERS}
    if op not in planners:
        raise ValueError(f"launch_plan: unknown op {op!r}; expected one of {(*OP_NAMES, *TRITON_OPTIONAL)}")
    return planners[op](*args)[1]


def _run(launches: Sequence[KernelLaunch], x: Tensor) -> None:
    with _device(x):
        for launch in launches:
            if _interpret():
                launch.run(launch.interp_config)
            else:
                launch.run(TUNER.choose(launch))


# ----------------------------------------------------------------------------- ops


def _write_back(*pairs: Optional[Tensor]) -> None:
    """Copy each contiguous stand-in (from :func:`dense_vector`) back into its original."""
    for orig, dense in zip(pairs[::2], pairs[1::2]):
        if orig is not None and dense is not orig:
            orig.copy_(dense)


def _written(*tensors: Optional[Tensor]) -> None:
    """Bump the autograd version of tensors a kernel wrote in place (as ATen's in-place ops
    do): the kernels write through raw pointers, which autograd cannot see, and a graph that
    saved the old value must raise "modified by an inplace operation", not read the new one.
    (Here rather than in an ``ADInplaceOrView`` kernel: that re-entry costs ~10-20 us a call.)"""
    bumped = [t for t in tensors if t is not None]
    recorder = _RECORDING.recorder
    if recorder is not None:
        recorder.bump(bumped)
    torch.autograd.graph.increment_version(bumped)


def bn_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (float32 ``[C]``), one stable pass."""
    out, launches = _plan_bn_stats(x)
    _run(launches, x)
    return out


def bn_stats_update(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                    eps: float) -> Tuple[Tensor, Tensor]:
    """Training statistics ``(mean, invstd)`` of ``x``; the running statistics updated in place
    (unbiased variance) when given. Two launches: the statistics and their finalize."""
    rm, rv = dense_vector(running_mean), dense_vector(running_var)
    out, launches = _plan_bn_stats_update(x, rm, rv, momentum, eps)
    _run(launches, x)
    _write_back(running_mean, rm, running_var, rv)
    _written(running_mean, running_var)
    return out


def bn_relu_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    mean: Tensor, invstd: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
    batch_stats: bool,
) -> Tensor:
    """``conv2d(relu((x - mean) * invstd * gamma + beta), weight, bias)``, output in
    ``out_memory_format(x)``; ``batch_stats`` only matters to autograd."""
    y, launches = _plan_bn_relu_conv2d(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation,
                                       groups, batch_stats)
    _run(launches, x)
    return y


def bn_relu_conv2d_train(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float, stride: List[int],
    padding: List[int], dilation: List[int], groups: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The training forward in one op: :func:`bn_stats_update` of ``x`` (the running statistics
    updated in place when given), then :func:`bn_relu_conv2d` with those statistics: ``(y,
    mean, invstd)``. The same three launches as the two ops; one call and one plan replay."""
    rm, rv = dense_vector(running_mean), dense_vector(running_var)
    out, launches = _plan_bn_relu_conv2d_train(x, weight, bias, bn_weight, bn_bias, rm, rv, momentum, eps, stride,
                                               padding, dilation, groups)
    _run(launches, x)
    _write_back(running_mean, rm, running_var, rv)
    _written(running_mean, running_var)
    return out


def bn_relu_conv2d_out(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    mean: Tensor, invstd: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
    out: Tensor,
) -> None:
    """:func:`bn_relu_conv2d` written into ``out`` (any strides, e.g. a channel slice of a larger buffer)."""
    _, launches = _plan_bn_relu_conv2d_out(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding,
                                           dilation, groups, out)
    _run(launches, x)
    _written(out)


def bn_relu_conv2d_out_stats(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    mean: Tensor, invstd: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
    out: Tensor,
) -> Tensor:
    """:func:`bn_relu_conv2d_stats` with the output written into ``out`` (any strides, e.g. a
    channel slice of a larger buffer): returns the partials. One launch."""
    pstat, launches = _plan_bn_relu_conv2d_out_stats(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride,
                                                     padding, dilation, groups, out)
    _run(launches, x)
    _written(out)
    return pstat


def bn_relu_conv2d_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    mean: Tensor, invstd: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
    bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_z, grad_weight, grad_bias, sum_dz, sum_dz_xhat)`` as
    :func:`resfast.ops.reference.bn_relu_conv2d_backward` defines them."""
    out, launches = _plan_bn_relu_conv2d_backward(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride,
                                                  padding, dilation, groups, bias_grad)
    _run(launches, x)
    return out


def bn_relu_conv2d_stats(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    mean: Tensor, invstd: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
    batch_stats: bool,
) -> Tuple[Tensor, Tensor]:
    """:func:`bn_relu_conv2d` and the batch statistics of its output, taken in the conv's
    epilogue: ``(y, partials)``, ``partials`` the float32 ``[3, STATS_ROWS, C_out]`` per-program
    ``(count, mean, M2)`` of ``y`` (from the float32 accumulator, before ``y`` is rounded to its
    dtype), for :func:`bn_stats_merge_update`. One launch."""
    out, launches = _plan_bn_relu_conv2d_stats(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding,
                                               dilation, groups, batch_stats)
    _run(launches, x)
    return out


def bn_stats_merge_update(partials: Tensor, count: int, running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], momentum: float, eps: float) -> Tuple[Tensor, Tensor]:
    """``(mean, invstd)`` from :func:`bn_relu_conv2d_stats`'s partials of a tensor with
    ``count`` positions per channel, the running statistics updated in place as
    :func:`bn_stats_update` does. One launch (the statistics finalize)."""
    rm, rv = dense_vector(running_mean), dense_vector(running_var)
    out, launches = _plan_bn_stats_merge_update(partials, count, rm, rv, momentum, eps)
    _run(launches, partials)
    _write_back(running_mean, rm, running_var, rv)
    _written(running_mean, running_var)
    return out


def bn_relu_conv2d_backward_full(
    grad_out: Tensor, x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    mean: Tensor, invstd: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
    bias_grad: bool, grad_x_out: Optional[Tensor], accumulate: bool, weight_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole training backward when ``mean``/``invstd`` are ``x``'s own batch statistics:
    ``(grad_x, grad_weight, grad_bias or [0], sum_dz_xhat, sum_dz)`` as
    :func:`resfast.ops.reference.bn_relu_conv2d_backward_full` defines them, ``grad_x`` written
    into (``accumulate``: added to) ``grad_x_out`` when given and an empty ``[0]`` tensor
    returned for it. :func:`bn_relu_conv2d_backward` then :func:`bn_backward_elemt` (or its
    ``_out`` form) in one op: the same launches, one call and one plan replay instead of two.
    The weight gradient is computed whatever ``weight_grad`` says (the kernel takes it in the
    same pass); the caller drops it."""
    out, launches = _plan_bn_relu_conv2d_backward_full(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride,
                                                       padding, dilation, groups, bias_grad, grad_x_out, accumulate,
                                                       weight_grad)
    _run(launches, x)
    if grad_x_out is not None:
        _written(grad_x_out)
    return out


def bn_relu_conv2d_backward_pair(
    grad_out: Tensor, x2: Tensor, w2: Tensor, g2: Optional[Tensor], b2: Optional[Tensor], mean2: Tensor,
    invstd2: Tensor, stride2: List[int], padding2: List[int], dilation2: List[int], groups2: int, x1: Tensor,
    w1: Tensor, g1: Optional[Tensor], b1: Optional[Tensor], mean1: Tensor, invstd1: Tensor, stride1: List[int],
    padding1: List[int], dilation1: List[int], groups1: int, grad_x_out: Tensor, accumulate: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The training backward of two chained fused convs, ``y = conv2(relu(bn2(x2)))`` with ``x2 =
    conv1(relu(bn1(x1)))``, both with their inputs' own batch statistics (a dense layer's conv3x3
    after its conv1x1): :func:`bn_relu_conv2d_backward_full` of the second (dL/dx2 into a
    temporary), then of the first with dL/dx1 written into (``accumulate``: added to)
    ``grad_x_out``. Returns ``(grad_w2, sum_dz_xhat2, sum_dz2, grad_w1, sum_dz_xhat1, sum_dz1)``.
    The same launches as the two ops; one call and one plan replay."""
    out, launches = _plan_bn_relu_conv2d_backward_pair(grad_out, x2, w2, g2, b2, mean2, invstd2, stride2, padding2,
                                                       dilation2, groups2, x1, w1, g1, b1, mean1, invstd1, stride1,
                                                       padding1, dilation1, groups1, grad_x_out, accumulate)
    _run(launches, x1)
    _written(grad_x_out)
    return out


def bn_relu_conv2d_merge_out(
    x: Tensor, partials: Tensor, count: int, running_mean: Optional[Tensor], running_var: Optional[Tensor],
    momentum: float, eps: float, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    stride: List[int], padding: List[int], dilation: List[int], groups: int, out: Tensor, out_mean: Optional[Tensor],
    out_var: Optional[Tensor], out_invstd: Optional[Tensor], out_eps: float,
) -> Tuple[Tensor, Tensor]:
    """A dense layer's second half in one op: ``(mean, invstd) = bn_stats_merge_update(partials,
    count, running_mean, running_var, momentum, eps)`` (``x``'s statistics from the partials of
    the op that wrote it), then the fused conv of ``x`` with them written into ``out``, and with
    ``out_mean`` / ``out_var`` given its output's statistics taken in the epilogue and finalized
    into them (``bn_relu_conv2d_out_stats``, then ``bn_stats_merge_out`` with ``out_invstd`` and
    ``out_eps``). Returns ``(mean, invstd)``. The same launches as the three ops; one call and
    one plan replay."""
    rm, rv = dense_vector(running_mean), dense_vector(running_var)
    (mean, invstd), launches = _plan_bn_relu_conv2d_merge_out(x, partials, count, rm, rv, momentum, eps, weight,
                                                              bn_weight, bn_bias, stride, padding, dilation, groups,
                                                              out, out_mean, out_var, out_invstd, out_eps)
    _run(launches, x)
    _write_back(running_mean, rm, running_var, rv)
    _written(running_mean, running_var, out, out_mean, out_var, out_invstd)
    return mean, invstd


def bn_stats_merge_out(partials: Tensor, count: int, mean: Tensor, var: Tensor, invstd: Optional[Tensor],
                       eps: float) -> None:
    """The batch mean and biased variance of the tensor :func:`bn_relu_conv2d_stats`'s (or
    :func:`bn_relu_conv2d_out_stats`'s) partials describe (``count`` positions per channel),
    written into ``mean`` and ``var`` (contiguous float32 vectors, e.g. slices of a block's
    per-channel statistics), as :func:`bn_stats` computes them, and ``1 / sqrt(var + eps)`` into
    ``invstd`` when given. One launch (the finalize)."""
    _, launches = _plan_bn_stats_merge_out(partials, count, mean, var, invstd, eps)
    _run(launches, partials)
    _written(mean, var, invstd)


def bn_backward_elemt(
    grad_z: Tensor, x: Tensor, bn_weight: Optional[Tensor], mean: Tensor, invstd: Tensor, sum_dz: Tensor,
    sum_dz_xhat: Tensor, inv_count: float,
) -> Tensor:
    """dL/dx from dL/dz in ``x``'s dtype and ``out_memory_format(x)``, as
    :func:`resfast.ops.reference.bn_backward_elemt` defines it."""
    gx, launches = _plan_bn_backward_elemt(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count)
    _run(launches, x)
    return gx


def bn_backward_elemt_out(
    grad_z: Tensor, x: Tensor, bn_weight: Optional[Tensor], mean: Tensor, invstd: Tensor, sum_dz: Tensor,
    sum_dz_xhat: Tensor, inv_count: float, accumulate: bool, out: Tensor,
) -> None:
    """:func:`bn_backward_elemt` written into ``out`` (any strides), or added to it with ``accumulate``."""
    _, launches = _plan_bn_backward_elemt_out(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count,
                                              accumulate, out)
    _run(launches, x)
    _written(out)


# ----------------------------------------------------------------------------- planners: statistics


def _plan_bn_stats(x: Tensor, finalize: Optional[Dict[str, Any]] = None):
    _check_x("x", x)
    n, c, h, w = x.shape
    p = n * h * w
    if p == 0:
        raise ValueError(f"bn_stats needs at least one value per channel, got x of shape {tuple(x.shape)}")
    f32 = dict(dtype=torch.float32, device=x.device)
    mean, var = torch.empty([c], **f32), torch.empty([c], **f32)
    target = _target_programs(x)
    if _interpret():
        block_c, block_p = 16, 32
    elif x.stride(1) == 1:  # channels innermost: a wide channel tile per position
        block_c = min(64, _pow2(c))
        if STATS_SMALL_TILES:
            # 2026-12-01: one 16-byte vector per thread (16 x 64 for 64 channels), 47-48
            # registers, 10 programs per SM, at most 512 splits (the finalize's one trip): the
            # 64 x 64 tile's 5 programs spent about 750 of a warp's 1,200 instructions outside
            # the position loop (the peeled first tile and three cross-warp sums). PREDICTED:
            # resnext50_s3 7.59 -> 5.11 us, s2 10.52 -> 7.96, s4 6.12 -> 4.22; no shape slower
            block_p = max(16, 1024 // block_c)
            target = min(STATS_PER_SM * _num_sms(x) if x.device.type != "cpu" else target,
                         512 * _cdiv(c, block_c))
        else:
            block_p = max(32, 4096 // block_c)
        # few positions (DenseNet-121's 7 x 7 block): shorter position tiles, so that the pass
        # has as many programs as it targets and each a shorter path (PREDICTED at
        # densenet121_3x3_b4: 98 programs of 64 x 64 -> 392 of 16 x 64, 4.65 -> 3.33 us)
        while block_p > 16 and _cdiv(c, block_c) * _cdiv(p, block_p // 2) <= target:
            block_p //= 2
    else:  # positions innermost (NCHW): long position runs of a few channels
        block_c, block_p = min(4, _pow2(c)), 512
    if STATS_TILE is not None:
        block_c, block_p = STATS_TILE
    c_tiles = _cdiv(c, block_c)
    splits = max(1, min(_cdiv(target, c_tiles), _cdiv(p, block_p)))
    chunk = _cdiv(_cdiv(p, splits), block_p) * block_p
    splits = _cdiv(p, chunk)
    pcount, pmean, pm2 = (torch.empty([splits, c], **f32) for _ in range(3))
    fixed = _cfg(4, 1)
    elt = x.element_size()
    # positions evenly strided (channels_last, or a channel prefix of it): one multiply per row
    sxn, _, sxh, sxw = x.stride()
    dense_p = (h == 1 or sxh == w * sxw) and (n == 1 or sxn == h * sxh)

    def bind_partial(cfg: TileConfig) -> Bound:
        return Bound((c_tiles, splits), (x, pcount, pmean, pm2, c, h * w, w, p, chunk, *x.stride()),
                     dict(BLOCK_P=block_p, BLOCK_C=block_c, DENSE_P=dense_p, num_warps=cfg.num_warps),
                     loops={"positions": _cdiv(chunk, block_p) - 1})  # the first tile is peeled off the loop

    partial = KernelLaunch("bn_stats", bn_stats_k.bn_stats_partial_kernel, [fixed], fixed, bind_partial,
                           hbm_bytes=x.numel() * elt + 3 * splits * c * 4)
    fin = finalize or {}
    finalize_launch = _finalize_launch(pcount, pmean, pm2, mean, var, fin.get("running_mean"),
                                       fin.get("running_var"), float(fin.get("momentum", 0.0)),
                                       float(fin.get("eps", 0.0)), bool(fin.get("invstd", False)), c, splits, p)
    return (mean, var), [partial, finalize_launch]


#: ``False``: the statistics pass's 64 x 64 tiles at 5 programs per SM (before 2026-12-01) on
#: channels-innermost inputs, instead of one 16-byte vector a thread at :data:`STATS_PER_SM`.
STATS_SMALL_TILES = True
#: Programs per SM of the statistics pass's small tiles (47-48 registers x 4 warps hold 10).
STATS_PER_SM = 10
#: The statistics pass's ``(BLOCK_C, BLOCK_P)`` for every launch, interpreter included (tests);
#: ``None``: the planner's choice.
STATS_TILE = None


#: The statistics finalize's ``(BLOCK_S, BLOCK_C)`` for every launch, interpreter included
#: (tests); ``None``: the planner's choice.
STATS_FIN_TILE = None
#: ``False``: the statistics finalize's tiles before the one-channel 512-split tile.
STATS_FIN_ONE_CHANNEL = True


def _finalize_launch(pcount, pmean, pm2, mean, var, rm, rv, momentum: float, eps: float, out_invstd: bool, c: int,
                     splits: int, count: int, invstd: Optional[Tensor] = None) -> "KernelLaunch":
    """The statistics finalize: merge ``[splits, c]`` partials into ``mean`` and ``var`` (or the
    inverse std), updating the running statistics when given (``count`` positions in all);
    with ``invstd`` (and the variance written) the inverse std into it as well."""
    # few channels: narrow channel tiles spread the merge over more programs (each a
    # single-SM latency chain), long split steps take few trips (static model, predicted:
    # 256 x 4 is 0.36-0.42 us for 128-512 channels and over 64 splits, where 64 x 16 was
    # 0.41-0.61 us; at 64 splits or fewer 64 x 16 stays, 0.34 us)
    # Since 2026-11-30 (the calibrated model): one channel per program, up to 512 splits per
    # step (PREDICTED: 4.06-4.92 -> 2.30 us at DenseNet-121's 3x3 convs, 128 channels; a
    # warp's path 624-739 -> 336 instructions: no cross-thread sum over channels' columns)
    if STATS_FIN_TILE is not None:
        merge_s, merge_c = STATS_FIN_TILE
    elif _interpret():
        merge_s, merge_c = 4, 16
    elif splits <= 512 and STATS_FIN_ONE_CHANNEL:
        merge_s, merge_c = 512, 1
    else:
        merge_s, merge_c = (32, 32) if c > 512 else (64, 16) if splits <= 64 else (256, 4)
    fixed = _cfg(4, 1)

    def bind_finalize(cfg: TileConfig) -> Bound:
        return Bound((_cdiv(c, merge_c),),
                     (pcount, pmean, pm2, mean, var, _or(rm, mean), _or(rv, var), _or(invstd, var), c, splits,
                      momentum, eps, count / max(count - 1, 1)),
                     dict(HAS_RUNNING=rm is not None, OUT_INVSTD=out_invstd, BLOCK_S=merge_s, BLOCK_C=merge_c,
                          ALSO_INVSTD=invstd is not None, num_warps=cfg.num_warps),
                     loops={"pass1": _cdiv(splits, merge_s), "pass2": _cdiv(splits, merge_s)})

    return KernelLaunch("bn_stats_finalize", bn_stats_k.bn_stats_finalize_kernel, [fixed], fixed, bind_finalize,
                        hbm_bytes=3 * splits * c * 4 + 2 * c * 4 * (2 if rm is not None else 1)
                        + (c * 4 if invstd is not None else 0))


def _plan_bn_stats_update(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                          eps: float):
    _check_x("x", x)
    _check_running("bn_stats_update", running_mean, running_var, x.shape[1], x)
    return _plan_bn_stats(x, dict(running_mean=running_mean, running_var=running_var, momentum=momentum, eps=eps,
                                  invstd=True))


# ----------------------------------------------------------------------------- planners: conv forward

# Tile configs, pruned with the static model (docs/notes/triton_kernels.md): (TILE_H, TILE_W)
# output positions per MMA tile, caps on the channel block, warps, stages, programs per SM.
_FWD_CONFIGS = [
    _cfg(4, 1, 4, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=32, STACK=1),
    # 5 programs per SM: its 72-92 registers (ResNeXt-50's packed groups and depthwise, triton
    # 3.6 and 3.8) hold 5-7 (predicted: ResNeXt-50's stride-2 stage-2 block 121.2 -> 95.8 us,
    # WRN-28-10 stage 3 346.9 -> 310.1 us)
    _cfg(4, 1, 5, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32, STACK=1),
    # wide 1x1 convs over many input channels (DenseNet-121's at 28 x 28 and 14 x 14: 480 and 992
    # -> 128): all 128 output channels on an 8 x 8 tile, 8 warps, 126 registers, 2 programs per SM,
    # so each x element is BN-ReLU'd once (not once per 64-channel block) by twice the programs of
    # the 8 x 16 tile below, each a shorter path (PREDICTED, triton 3.8: 52.9 -> 39.0 us at 28 x
    # 28, 34.4 -> 25.1 at 14 x 14; docs/notes/triton_kernels.md, 2026-12-02). Before the 8 x 16
    # one, so the static choice of such convs (the widest channel tile first) takes it too.
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=128, BLOCK_K=64, STACK=1),
    _cfg(8, 1, 2, TILE_H=8, TILE_W=16, BLOCK_N=128, BLOCK_K=64, STACK=1),
    _cfg(8, 1, 2, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=32, STACK=1),
    # the fewest registers (the statistics epilogue of WRN-28-10's stride-2 stage-3 block
    # spills in every other config), though its 64-row tile is issued by both warpgroups
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32, STACK=1),
    # narrow outputs (DenseNet's 128 -> 32 3x3 convs): a 64-row tile over all 128 input
    # channels in one chunk, so the halo is staged once per tile (predicted at 28 x 28:
    # 7.06 -> 6.70 us)
    _cfg(4, 1, 2, TILE_H=4, TILE_W=16, BLOCK_N=32, BLOCK_K=128, STACK=1),
    # packed small groups, 5 programs per SM: the first config capped at 96 registers
    # (``MAXNREG``, the launch's ``maxnreg``; 105 without it, 4 per SM), so 5 fit an SM and the
    # planner's fill gives each fewer tiles; the dependent-issue bound predicts ResNeXt-50
    # stage 1's forward at 97.7 -> 77.6 us, spill-free
    _cfg(4, 1, 5, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=32, STACK=1, MAXNREG=96),
    # packed small groups, 8 programs per SM: the 4-warp 8 x 8 tile capped at 64 registers, its
    # non-finite fix-up by scalar FMAs (``FIXUP_FMA``; the MMA fix-up's registers set the
    # kernel's count); spill-free with triton 3.8 and 3.6 (docs/notes/triton_kernels.md,
    # fifteenth session: ResNeXt-50 stage 1 77.6 -> 65.5 us predicted, 103.7 -> 65.3 with 3.6)
    _cfg(4, 1, 8, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32, STACK=1, MAXNREG=64, FIXUP_FMA=1),
    # ... on a 4 x 16 strip: 28 x 28 and 14 x 14 images waste less of it than of an 8 x 8 tile
    # (28 x 28: 14 strips of 64 positions per image instead of 16 tiles), spill-free with triton
    # 3.8 and 3.6 at stride 1 (``STRIP``: listed at stride 1 only; at stride 2 it spills 20 bytes
    # with 3.6). docs/notes/triton_kernels.md, 2026-11-30: PREDICTED ResNeXt-50 stage 2 44.7 ->
    # 39.5 us, stage 3 22.1 -> 20.8
    _cfg(4, 1, 8, TILE_H=4, TILE_W=16, BLOCK_N=64, BLOCK_K=32, STACK=1, MAXNREG=64, FIXUP_FMA=1, STRIP=1),
    # narrow outputs on small images (DenseNet-121's 128 -> 32 3x3 conv at 7 x 7, one tile per
    # image): two 64-channel input chunks instead of four 32-channel ones, half the load rounds
    # (PREDICTED: 15.0 -> 12.3 us, 112 registers, spill-free)
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=32, BLOCK_K=64, STACK=1),
    # split-K (``SPLITK``: programs per tile, each over its share of the input chunks, the tile's
    # last program summing the float32 partials in split order; one group per block, not with
    # the statistics epilogue, :func:`_split_k_ok`): a small image's few tiles with a long chunk
    # loop (DenseNet-121's 3x3 conv at 7 x 7 and 14 x 14, its 1x1 conv at 7 x 7 over 1024 input
    # channels). docs/notes/triton_kernels.md, 2026-12-01 (PREDICTED)
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=32, BLOCK_K=32, STACK=1, SPLITK=4),
    _cfg(4, 1, 4, TILE_H=8, TILE_W=8, BLOCK_N=32, BLOCK_K=16, STACK=1, SPLITK=8),
    _cfg(8, 1, 2, TILE_H=8, TILE_W=16, BLOCK_N=32, BLOCK_K=32, STACK=1, SPLITK=4),
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=64, STACK=1, SPLITK=4),
]
# Extra candidates of the forward with the statistics epilogue (``bn_relu_conv2d_stats``, the
# producer of a chained pair), whose register accumulators take the 4-warp 8 x 8 tile to about
# 122 registers: capped at 128, 4 programs fit an SM (the list's 8 x 8 declares 5, which the
# epilogue's registers cannot hold, so its grid ran in two waves). Predicted (triton 3.8):
# ResNeXt-50 stage 1's producer 169.8 -> 149.4 us, the stride-2 stage-2 block's 217.9 ->
# 137.1 us, spill-free (under triton 3.6 the latter spills 92 bytes: the tuner measures it).
_FWD_STATS_CONFIGS = [
    _cfg(4, 1, 4, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32, STACK=1, MAXNREG=128),
]
# The statistics epilogue with per-pair shifted sums (``PAIRS``: ``STATS_PAIRS`` in the kernel,
# half the Welford accumulators' registers, no division per tile; the program's row stored
# before the cold fix-up, whose statistics come from a walk of their own): the packed
# ``FIXUP_FMA`` tile capped at 80 registers, 6 programs per SM, spill-free with triton 3.8 (3.6:
# at stride 1) on ResNeXt-50's packed convs and depthwise (docs/notes/triton_kernels.md, "The
# statistics epilogue at 6 programs per SM"; predicted stage 1's producer 149.4 -> 96.8 us).
_FWD_STATS_PAIRS_CONFIGS = [
    _cfg(4, 1, 6, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32, STACK=1, MAXNREG=80, FIXUP_FMA=1, PAIRS=1),
]
# The forward's tile loop carries the tile's digits (no division per tile) when a program walks
# at least this many tiles (static model: a gain from 7 tiles per program, ResNeXt-50's and
# DenseNet-121's 3x3 convs; a small loss at 1-5, WRN-28-10's and the 7 x 7 stages).
_WALK_MIN_TILES = 6
#: ``False``: the forward's config list without the ``FIXUP_FMA`` config (the plan before it).
FWD_FIXUP_FMA = True
#: ``False``: the statistics epilogue's config list without the ``PAIRS`` configs (the plan
#: before the per-pair shifted sums, ``STATS_PAIRS``).
FWD_STATS_PAIRS = True
_FWD_INTERP = _cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16, STACK=1)


#: The shared dense block's chaining (a layer's statistics in its convs' epilogues:
#: ``bn_relu_conv2d_stats`` -> ``bn_relu_conv2d_merge_out`` and ``bn_relu_conv2d_out_stats`` ->
#: ``bn_stats_merge_out``): ``None`` by :func:`stats_epilogue_pays`; ``True`` / ``False`` always /
#: never (tests and plan comparisons).
DENSE_CHAIN: Optional[bool] = None


def stats_epilogue_pays(groups: int) -> bool:
    """Whether a conv taking its output's batch statistics in its epilogue (the producer's
    forward, then a finalize) is predicted faster than the plain forward, then a statistics pass
    over the output and its finalize. By the static sm_90 model (triton 3.8, batch 64, bf16,
    channels_last; PREDICTED, docs/notes/triton_kernels.md, "2026-12-01: the dense block
    unchained"): for grouped convs, whose producer runs the register-light packed configs
    (``PAIRS``, ``FIXUP_FMA``), it costs ResNeXt-50's convs 2.7-9.6 us against the 3.0-15.5 us
    pass it saves; for ungrouped convs the producer has neither the split-K configs
    (``SPLITK``) nor the packed ones and costs more than the pass at every size the model
    holds: DenseNet-121's 1x1 conv +74.8 / +36.7 / +36.6 / +10.7 us at 56 / 28 / 14 / 7 pixels
    a side against a 15.6 / 6.0 / 3.8 / 3.3 us pass over its 128-channel output, the 3x3 conv
    +68.5 / +22.3 / +7.7 / +9.6 us against at most the same, WRN-28-10's 8 x 8 stage +58.4 us."""
    return groups > 1


# The most float32 partials a split-K forward's workspace may hold (128 MiB): split-K is for
# small images' few tiles (DenseNet-121's 7x7 / 14x14 at batch 64: at most 1.6M partials); a large
# output would make the workspace a multiple of the output (and past 2**31 elements, beyond the
# kernel's 32-bit offsets), so it keeps the plain configs.
_SPLIT_K_MAX_PARTIALS = 1 << 25


def _split_k_ok(groups: int, cin_g: int, cout_g: int, cfg: TileConfig, n: int = 1, ho: int = 1,
                wo: int = 1) -> bool:
    """A split-K forward config (``SPLITK``) applies: one group per block (no packed groups,
    whose non-finite fix-up needs a program's whole tile), the input chunks shared evenly, and
    its workspace of float32 partials (every tile and split of ``n`` outputs of ``ho`` x ``wo``;
    bounded here by tiles that overhang by a whole tile) at most ``_SPLIT_K_MAX_PARTIALS``."""
    split_k = cfg.get("SPLITK", 1)
    blk = _blocks(groups, cin_g, cout_g, cfg.get("BLOCK_K"), cfg.get("BLOCK_N"), cfg.get("PACK", 16))
    partials = (n * (ho + cfg.get("TILE_H")) * (wo + cfg.get("TILE_W")) * blk.ngb * blk.nsub * split_k
                * blk.block_n)
    return (blk.gp == 1 and blk.ksub >= split_k and blk.ksub % split_k == 0
            and partials <= _SPLIT_K_MAX_PARTIALS)


_SPLIT_COUNTERS: Dict[Tuple[Any, ...], Tensor] = {}
_SPLIT_COUNTERS_LOCK = threading.Lock()
#: Every buffer :func:`_split_counters` has handed out, by ``id``: the plan cache's recorder logs
#: such an argument as "the counters of the replay's device and stream", fetched afresh per replay.
_COUNTER_BUFFERS: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()


def _capturing(device: torch.device) -> bool:
    """Whether work for ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _split_counters(device: torch.device, n: int) -> Tensor:
    """``n`` int32 ticket counters for a split-K forward, zero between launches (the last
    program of each counter resets it), so they are zeroed once, when made, not per launch (no
    memset launch). One buffer per device and CUDA stream: launches on one stream run in order,
    so no two launches share a counter at once; launches on different streams take different
    buffers; inside a CUDA-graph capture a buffer per launch (the graph zeroes it). Off CUDA (the
    interpreter) one buffer per device and thread, reused the same way, so the CPU tests see the
    counters the kernels leave behind. Made outside any dispatch mode (the plan cache's recorder,
    which logs such a buffer as :class:`_CountersRef`), so a recorded op never logs their
    allocation."""
    with torch.utils._python_dispatch._disable_current_modes():
        if _capturing(device):
            # a CUDA-graph capture: counters of the launch's own, zeroed by a memset the graph
            # replays. Captures share a stream (torch.cuda.graph's default side stream), and two
            # graphs that baked in one stream's buffer would race on it when replayed concurrently
            return _new_counters(device, n)
        if device.type == "cuda":
            key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
        else:
            key = (device.type, device.index, threading.get_ident())
        with _SPLIT_COUNTERS_LOCK:
            buf = _SPLIT_COUNTERS.get(key)
            if buf is None or buf.numel() < n:
                buf = _SPLIT_COUNTERS[key] = _new_counters(device, max(n, 4096))
            elif device.type == "cpu" and bool(buf[:n].any()):
                # an interpreted launch that raised part-way left tickets taken (on a GPU a kernel
                # runs whole or the context is lost; meta tensors, the static model's, hold no
                # values): start from zero, not from its leftovers
                buf.zero_()
            return buf


def _new_counters(device: torch.device, n: int) -> Tensor:
    """``n`` zeroed int32 counters, known to the plan cache's recorder."""
    buf = torch.zeros([n], dtype=torch.int32, device=device)
    _COUNTER_BUFFERS[id(buf)] = buf
    return buf


@dataclass(frozen=True)
class _Blocks:
    """How a conv's channels are cut into blocks (see :mod:`resfast.kernels.triton.bn_relu`)."""

    gp: int      # groups packed per group block
    kr: int      # input channels per group block
    nr: int      # output channels per group block
    ngb: int     # group blocks
    block_k: int
    block_n: int

    @property
    def ksub(self) -> int:
        return _cdiv(self.kr, self.block_k)

    @property
    def nsub(self) -> int:
        return _cdiv(self.nr, self.block_n)

    def even_k(self, c: int) -> bool:
        """Every input-channel chunk is full (no channel masks in the kernels)."""
        return self.kr % self.block_k == 0 and self.ngb * self.kr == c

    def even_n(self, co: int) -> bool:
        """Every output-channel chunk is full."""
        return self.nr % self.block_n == 0 and self.ngb * self.nr == co


@functools.lru_cache(maxsize=4096)
def _blocks(groups: int, cin_g: int, cout_g: int, cap_k: int, cap_n: int, pack: int = 16) -> _Blocks:
    """Pack ``pack // width`` groups into one block when groups are narrower than ``pack``
    channels (one block-diagonal MMA tile, ``pack`` wide); otherwise a block is one group, its
    channels cut into ``cap_k`` / ``cap_n`` chunks."""
    width = _pow2(max(cin_g, cout_g))
    gp = max(1, min(groups, pack // width)) if width < pack else 1
    kr, nr = gp * cin_g, gp * cout_g
    if gp > 1:
        bk, bn = max(16, _pow2(kr)), max(16, _pow2(nr))
    else:
        bk = max(16, min(cap_k, _pow2(kr)))
        bn = max(16, min(cap_n, _pow2(nr)))
    return _Blocks(gp, kr, nr, _cdiv(groups, gp), bk, bn)


def _plan_bn_relu_conv2d(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups,
                         batch_stats):
    _check_conv("bn_relu_conv2d", x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups)
    shape = conv_out_shape(x, weight, stride, padding, dilation)
    y = _empty_like_fake(x, shape)
    _check_span("y (the output)", y)  # a channel-expanding conv's output image exceeds its input's
    return y, _forward_launches(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, y)


def _plan_bn_relu_conv2d_out(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups,
                             out, pstat=None, op="bn_relu_conv2d_out"):
    """``pstat``: the statistics partials the conv's epilogue writes (``bn_relu_conv2d_out_stats``)."""
    _check_conv(op, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups)
    shape = conv_out_shape(x, weight, stride, padding, dilation)
    _check_like("out", out, x, shape)
    # (a pure function of the plan cache's signature: replays skip it, as they skip the checks above)
    refuse_overlap(out, (("x", x), ("weight", weight), ("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                         ("mean", mean), ("invstd", invstd)), f"resfast_triton.{op}")
    return None, _forward_launches(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation,
                                   groups, out, pstat)


def _forward_launches(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, y,
                      pstat=None):
    if y.numel() == 0:
        return []
    co, cin_g, kh, kw = weight.shape
    flat = _flat_positions(kh, kw, stride, padding, x, y)
    if flat is not None:  # a 1x1 conv over evenly strided positions: one image of all of them
        x, y = flat
    n, c, h, w = x.shape
    ho, wo = y.shape[2], y.shape[3]
    cout_g = co // groups
    mean, invstd, gamma, beta = _bn_vectors(mean, invstd, bn_weight, bn_bias)
    bias = None if bias is None else bias.contiguous()  # the kernel reads it at ptr + co
    if (FWD_FROM_A and pstat is None and flat is None and kh * kw > 1 and _wide_group(groups, cin_g, cout_g)
            and _fwd_from_a_ok(x, weight, stride)):
        a_cfgs = _fwd_a_configs(groups, cin_g, cout_g, stride)
        if a_cfgs:
            return _forward_from_a(x, weight, bias, gamma, beta, mean, invstd, stride, padding, dilation, groups, y,
                                   a_cfgs)
    use_scratch = kh * kw > 1
    fit = not use_scratch  # no halo: a tile's shape changes only how it fills the grid
    stats_cfgs = _FWD_STATS_CONFIGS + (_FWD_STATS_PAIRS_CONFIGS if FWD_STATS_PAIRS else [])
    configs = _prune_tiles(_FWD_CONFIGS + (stats_cfgs if pstat is not None else []), ho, wo, fit=fit)
    if not FWD_FIXUP_FMA:  # the plan before the register-light fix-up's config (to compare plans)
        configs = [cfg for cfg in configs if not cfg.get("FIXUP_FMA")]
    if tuple(stride) != (1, 1):  # the 4 x 16 strip spills with triton 3.6 at stride 2
        configs = [cfg for cfg in configs if not cfg.get("STRIP")]
    # split-K configs: one group per block, no statistics epilogue, the chunks evenly shared
    configs = [cfg for cfg in configs
               if cfg.get("SPLITK", 1) == 1 or (pstat is None and _split_k_ok(groups, cin_g, cout_g, cfg, n, ho, wo))]
    # the static choice first (what runs untuned or inside a CUDA-graph capture), by the
    # static model's predictions: wide 1x1 convs the 128 x 64 channel tile, small images 8x8
    if pstat is not None:
        # the statistics epilogue's register accumulators: the 8-warp 64-channel tile first
        # (half the registers per thread; the 4-warp tiles can spill with them)
        configs.sort(key=lambda cfg: (cfg.num_warps != 8 or cfg.get("BLOCK_N") != 64))
    elif kh * kw == 1 and cin_g >= 64 and cout_g >= 64:
        configs.sort(key=lambda cfg: -cfg.get("BLOCK_N"))
    elif ho * wo <= 8 * 8:
        configs.sort(key=lambda cfg: cfg.get("TILE_H") * cfg.get("TILE_W"))

    fwd_bytes = (_x_read_bytes(x, kh, kw, stride, dilation, ho, wo) + _nbytes(weight)
                 + y.numel() * y.element_size() + (_nbytes(pstat) if pstat is not None else 0))

    def bind(cfg: TileConfig) -> Bound:
        th, tw = cfg.get("TILE_H"), cfg.get("TILE_W")
        if fit:
            th, tw = _fit_tile(th, tw, ho, wo)
        blk = _blocks(groups, cin_g, cout_g, cfg.get("BLOCK_K"), cfg.get("BLOCK_N"), cfg.get("PACK", 16))
        ncb = blk.ngb * blk.nsub
        tiles_h, tiles_w = _cdiv(ho, th), _cdiv(wo, tw)
        num_tiles = n * tiles_h * tiles_w
        split_k = cfg.get("SPLITK", 1)
        nprog = _balanced_splits(num_tiles, ncb * split_k, x, cfg, STATS_ROWS if pstat is not None else None,
                                 fill=blk.gp > 1)
        halo_h = (th - 1) * stride[0] + (kh - 1) * dilation[0] + 1
        halo_w = (tw - 1) * stride[1] + (kw - 1) * dilation[1] + 1
        halo_b = min(64, _pow2(halo_h * halo_w))
        if use_scratch:
            slot = _cdiv(halo_h * halo_w, halo_b) * halo_b * blk.block_k
            scratch = torch.empty([nprog * ncb * split_k * slot], dtype=x.dtype, device=x.device)
        else:
            scratch = y
        ws_bytes = 0
        if split_k > 1:  # float32 partials of every tile and split, and the tiles' ticket counters
            ws = torch.empty([num_tiles * ncb * split_k * th * tw * blk.block_n], dtype=torch.float32,
                             device=x.device)
            cnt = _split_counters(x.device, num_tiles * ncb)
            ws_bytes = 2 * ws.numel() * 4
        else:
            ws, cnt = mean, mean  # unused
        packed = blk.gp > 1
        flags = mean  # unused: a packed program's fix-up is decided in the program itself
        args = (x, weight, _or(bias, mean), _or(gamma, mean), _or(beta, mean), mean, invstd, y, scratch, flags,
                _or(pstat, mean), ws, cnt, c, h, w, co, ho, wo, cin_g, cout_g, blk.kr, blk.nr, blk.nsub, tiles_h, tiles_w,
                num_tiles, STATS_ROWS, *_digits(nprog, (tiles_w, tiles_h)), *x.stride(), *weight.stride(), *y.stride(), *stride, *padding, *dilation)
        const = dict(KH=kh, KW=kw, STACK=min(_pow2(kw), cfg.get("STACK", 4)), FIXUP_FMA=bool(cfg.get("FIXUP_FMA")),
                     HALO_H=halo_h, HALO_W=halo_w, HALO_B=halo_b,
                     USE_SCRATCH=use_scratch, ONE_CHUNK=blk.ksub == split_k, PACKED=packed, HAS_BIAS=bias is not None,
                     HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, DOT_F32=_dot_f32(x),
                     EVEN_K=blk.even_k(c), EVEN_N=blk.even_n(co), TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n,
                     BLOCK_K=blk.block_k, STATS=pstat is not None,
                     STATS_PAIRS=pstat is not None and bool(cfg.get("PAIRS")),
                     # the interpreter always walks, so the tests run the walk (the other path is the fix-up's)
                     WALK=_interpret() or _cdiv(num_tiles, nprog) >= _WALK_MIN_TILES, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages)
        if split_k > 1:
            const["SPLIT_K"] = split_k
        if cfg.get("MAXNREG"):  # a launch option: registers per thread at most
            const["maxnreg"] = cfg.get("MAXNREG")
        # per-program trips of the kernel's loops in the order of their heads in the code
        loops = {}
        if const["STATS_PAIRS"]:  # the partials' rows no program owns, zeroed first
            loops["zero_rows"] = (STATS_ROWS - 1) // nprog
        loops["tiles"] = _cdiv(num_tiles, nprog)
        if blk.ksub > split_k:
            loops["chunks"] = blk.ksub // split_k
        if packed:  # the exact fix-up runs only for tiles that are not finite
            loops.update(fixup_tiles=0, fixup_groups=0)
            if const["STATS_PAIRS"]:  # and then its statistics' walk over the stored tiles
                loops["fixup_stats"] = 0
        return Bound((nprog, ncb) + ((split_k,) if split_k > 1 else ()), args, const, loops=loops,
                     depths={"chunks": 2, "fixup_groups": 2},
                     derived=dict(TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, GP=blk.gp,
                                  programs=nprog * ncb * split_k),
                     hbm_bytes=(fwd_bytes + ws_bytes) if split_k > 1 else None)

    key = ("fwd", *_conv_key(x, weight, stride, padding, dilation, groups, ho, wo), bias is not None,
           pstat is not None)
    return [KernelLaunch("conv_fwd", bn_relu_conv_fwd.bn_relu_conv_fwd_kernel, configs, _FWD_INTERP, bind, key,
                         hbm_bytes=fwd_bytes)]


# The forward of a wide group from stored activations (FWD_FROM_A): a BN-ReLU pass writes a =
# relu(bn(x)) (a temporary of the forward only), then bn_relu_conv_fwd_tma_kernel reads a and the
# weights by TMA tensor descriptors (docs/notes/triton_kernels.md, 2026-12-01, "WRN-28-10's
# forward from stored activations"; PREDICTED). ``BLOCK_P`` rows x ``BLOCK_C`` channels per step.
_A_PASS_CONFIGS = [
    _cfg(4, 1, 8, BLOCK_P=64, BLOCK_C=32),
    _cfg(4, 1, 8, BLOCK_P=32, BLOCK_C=64),
    _cfg(4, 1, 8, BLOCK_P=128, BLOCK_C=32),
    _cfg(8, 1, 4, BLOCK_P=128, BLOCK_C=64),
]
_A_PASS_INTERP = _cfg(4, 1, 1, BLOCK_P=16, BLOCK_C=16)
# (``SWAP``: the weights as the MMA's A operand and ``a`` as its B, the accumulator
# ``[BLOCK_N, positions]``; with the 2-D weight view, ``W2D``, both operands straight from shared
# memory, no ``LDSM``.) The static model's choices (PREDICTED, triton 3.8): the first at
# ``wrn28_10_s1``, the 128 x 128 one at ``s2`` and ``s3``, the 64 x 32 one at ``s2_down``, the
# 8 x 8 one at ``s3_down``.
_FWD_TMA_CONFIGS = [
    _cfg(4, 2, 2, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=64, SWAP=1),
    _cfg(8, 2, 1, TILE_H=8, TILE_W=16, BLOCK_N=128, BLOCK_K=128),
    _cfg(4, 3, 2, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=32, SWAP=1),
    _cfg(4, 3, 2, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=64),
    _cfg(4, 2, 2, TILE_H=16, TILE_W=16, BLOCK_N=64, BLOCK_K=64, SWAP=1),
    _cfg(8, 3, 1, TILE_H=8, TILE_W=8, BLOCK_N=128, BLOCK_K=64),
]
_FWD_TMA_INTERP = _cfg(4, 2, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16, SWAP=1)
#: ``False``: wide groups' forward by the masked kernel (the plan before the BN-ReLU pass).
FWD_FROM_A = True


def _fwd_from_a_ok(x: Tensor, weight: Tensor, stride) -> bool:
    """Whether a wide group's forward may run from stored activations: a TMA device, ``x``
    dense channels-last with 2- or 4-byte elements and a 16-byte channel row (``a`` takes its
    layout, seen as ``[N, H / SH, SH, W / SW, SW * C]``: the stride divides ``H`` and ``W``),
    the weights with their channels innermost, 16-byte strides and base, no zero stride."""
    elt = x.element_size()
    n, c, h, w = x.shape
    if not _tma_device(x) or elt not in (2, 4) or weight.element_size() != elt or (c * elt) % 16:
        return False
    if x.stride() != _cl_strides(x) or h % stride[0] or w % stride[1] or weight.stride(1) != 1:
        return False
    strides = [weight.stride(0), weight.stride(2), weight.stride(3)]
    sizes = [weight.shape[0], weight.shape[2], weight.shape[3]]
    if any((s_ <= 0 and n_ > 1) or (s_ * elt) % 16 for s_, n_ in zip(strides, sizes)):
        return False
    return weight.data_ptr() % 16 == 0


def _fwd_a_configs(groups: int, cin_g: int, cout_g: int, stride) -> List[TileConfig]:
    """The forward-from-``a`` configs whose input chunks never read another group's (or, at a
    width stride, another residue class's) channels: one group at width stride 1 (a box past
    the channels reads the copy engine's zeros), else chunks that divide the group."""
    cfgs = [_FWD_TMA_INTERP] if _interpret() else _FWD_TMA_CONFIGS
    kept = []
    for cfg in cfgs:
        blk = _blocks(groups, cin_g, cout_g, cfg.get("BLOCK_K"), cfg.get("BLOCK_N"))
        if (groups == 1 and stride[1] == 1) or blk.kr % blk.block_k == 0:
            kept.append(cfg)
    return kept


def _forward_from_a(x, weight, bias, gamma, beta, mean, invstd, stride, padding, dilation, groups, y, a_cfgs):
    co, cin_g, kh, kw = weight.shape
    n, c, h, w = x.shape
    ho, wo = y.shape[2], y.shape[3]
    cout_g = co // groups
    a = torch.empty_like(x)  # x's dense channels-last layout; freed with the forward's other scratch
    p = n * h * w
    x_bytes = _nbytes(x)

    def bind_a(cfg: TileConfig) -> Bound:
        bp, bc = cfg.get("BLOCK_P"), min(cfg.get("BLOCK_C"), max(16, _pow2(c)))
        ncb = _cdiv(c, bc)
        num_pb = _cdiv(p, bp)
        nprog = max(1, min(num_pb, _cdiv(_persistent_programs(x, cfg), ncb)))
        args = (x, a, _or(gamma, mean), _or(beta, mean), mean, invstd, c, p, num_pb)
        const = dict(HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, EVEN=p % bp == 0 and c % bc == 0,
                     BLOCK_P=bp, BLOCK_C=bc, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return Bound((nprog, ncb), args, const, loops={"rows": _cdiv(num_pb, nprog)},
                     derived=dict(BLOCK_P=bp, BLOCK_C=bc, programs=nprog * ncb))

    def bind_conv(cfg: TileConfig) -> Bound:
        th, tw = _fit_tile(cfg.get("TILE_H"), cfg.get("TILE_W"), ho, wo)
        blk = _blocks(groups, cin_g, cout_g, cfg.get("BLOCK_K"), cfg.get("BLOCK_N"))
        ncb = blk.ngb * blk.nsub
        tiles_h, tiles_w = _cdiv(ho, th), _cdiv(wo, tw)
        num_tiles = n * tiles_h * tiles_w
        args = (a, weight, _or(bias, mean), y, c, co, ho, wo, h // stride[0], w // stride[1], cin_g, blk.kr, blk.nr,
                blk.nsub, tiles_h, tiles_w, n,
                a.stride(0), stride[0] * a.stride(2), a.stride(2), stride[1] * a.stride(3),
                weight.stride(0), weight.stride(2), weight.stride(3), *y.stride(), *padding, *dilation)
        const = dict(KH=kh, KW=kw, SH=stride[0], SW=stride[1], KSUB=blk.ksub, HAS_BIAS=bias is not None,
                     DOT_F32=_dot_f32(x), STAGES=cfg.num_stages, SWAP=bool(cfg.get("SWAP")),
                     # the weights as one 2-D [CO, KH * KW * CIN_G] view: dense channels-last, chunks dividing
                     # the group (a box never reaches the next tap's channels)
                     W2D=(weight.stride() == _cl_strides(weight) and cin_g % blk.block_k == 0), TILE_H=th, TILE_W=tw,
                     BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                     TMA=True)
        return Bound((num_tiles, ncb), args, const, loops={"steps": kh * kw * blk.ksub},
                     derived=dict(TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, GP=blk.gp,
                                  programs=num_tiles * ncb))

    key = ("fwd", *_conv_key(x, weight, stride, padding, dilation, groups, ho, wo), bias is not None, False)
    return [KernelLaunch("bn_relu_a", bn_relu_conv_fwd_tma.bn_relu_store_kernel,
                         [cfg for cfg in _A_PASS_CONFIGS if cfg.get("BLOCK_C") <= max(16, _pow2(c))] or _A_PASS_CONFIGS,
                         _A_PASS_INTERP, bind_a, key + ("a",), hbm_bytes=2 * x_bytes),
            KernelLaunch("conv_fwd", bn_relu_conv_fwd_tma.bn_relu_conv_fwd_tma_kernel, a_cfgs, _FWD_TMA_INTERP,
                         bind_conv, key + ("from_a",),
                         hbm_bytes=x_bytes + _nbytes(weight) + y.numel() * y.element_size())]


def _plan_bn_relu_conv2d_stats(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups,
                               batch_stats):
    _check_conv("bn_relu_conv2d_stats", x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation,
                groups)
    shape = conv_out_shape(x, weight, stride, padding, dilation)
    y = _empty_like_fake(x, shape)
    _check_span("y (the output)", y)  # a channel-expanding conv's output image exceeds its input's
    pstat = torch.empty([3, STATS_ROWS, shape[1]], dtype=torch.float32, device=x.device)
    return (y, pstat), _forward_launches(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding,
                                         dilation, groups, y, pstat)


def _plan_bn_relu_conv2d_train(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, stride,
                               padding, dilation, groups):
    (mean, invstd), stats = _plan_bn_stats_update(x, running_mean, running_var, momentum, eps)
    y, conv = _plan_bn_relu_conv2d(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation,
                                   groups, True)
    return (y, mean, invstd), [*stats, *conv]


def _plan_bn_relu_conv2d_out_stats(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation,
                                   groups, out):
    pstat = torch.empty([3, STATS_ROWS, weight.shape[0]], dtype=torch.float32, device=x.device)
    return pstat, _plan_bn_relu_conv2d_out(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding,
                                           dilation, groups, out, pstat, "bn_relu_conv2d_out_stats")[1]


def _check_partials(op: str, partials: Any, count: int) -> None:
    if not isinstance(partials, Tensor) or partials.dim() != 3 or partials.shape[0] != 3 \
            or partials.dtype != torch.float32:
        raise ValueError(f"resfast_triton.{op}: partials must be the float32 [3, S, C] statistics "
                         f"of a bn_relu_conv2d_stats output, got {getattr(partials, 'shape', type(partials).__name__)}")
    if int(count) < 1:
        raise ValueError(f"resfast_triton.{op}: count must be positive, got {count}")


def _plan_bn_stats_merge_out(partials, count, mean, var, invstd, eps):
    _check_partials("bn_stats_merge_out", partials, count)
    partials = partials.contiguous()
    c = partials.shape[2]
    for name, t in (("mean", mean), ("var", var), ("invstd", invstd)):
        if t is None and name == "invstd":
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.dim() != 1 or t.shape[0] != c \
                or t.stride(0) != 1 or t.device != partials.device:
            raise ValueError(f"resfast_triton.bn_stats_merge_out: {name} must be a contiguous float32 vector of the "
                             f"partials' {c} channels on {partials.device}, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    launch = _finalize_launch(partials[0], partials[1], partials[2], mean, var, None, None, 0.0, float(eps), False, c,
                              partials.shape[1], int(count), invstd)
    return None, [launch]


def _plan_bn_relu_conv2d_merge_out(x, partials, count, running_mean, running_var, momentum, eps, weight, bn_weight,
                                   bn_bias, stride, padding, dilation, groups, out, out_mean, out_var, out_invstd,
                                   out_eps):
    """:func:`bn_relu_conv2d_merge_out`'s launches (running statistics as given: contiguous)."""
    (mean, invstd), launches = _plan_bn_stats_merge_update(partials, count, running_mean, running_var, momentum, eps)
    if out_mean is None:
        return (mean, invstd), [*launches, *_plan_bn_relu_conv2d_out(
            x, weight, None, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, out)[1]]
    pstat, conv = _plan_bn_relu_conv2d_out_stats(x, weight, None, bn_weight, bn_bias, mean, invstd, stride, padding,
                                                 dilation, groups, out)
    _, fin = _plan_bn_stats_merge_out(pstat, out.numel() // max(1, out.shape[1]), out_mean, out_var, out_invstd,
                                      out_eps)
    return (mean, invstd), [*launches, *conv, *fin]


def _plan_bn_stats_merge_update(partials, count, running_mean, running_var, momentum, eps):
    _check_partials("bn_stats_merge_update", partials, count)
    partials = partials.contiguous()
    c = partials.shape[2]
    _check_running("bn_stats_merge_update", running_mean, running_var, c, partials)
    f32 = dict(dtype=torch.float32, device=partials.device)
    mean, invstd = torch.empty([c], **f32), torch.empty([c], **f32)
    launch = _finalize_launch(partials[0], partials[1], partials[2], mean, invstd, running_mean, running_var,
                              momentum, eps, True, c, partials.shape[1], int(count))
    return (mean, invstd), [launch]


# ----------------------------------------------------------------------------- planners: conv backward

_BWD_CONFIGS = [
    # 2 programs per SM: its 255 registers hold 2 (with 4 the planner's fill put a second wave
    # on every SM: predicted at stage 1 with triton 3.6, 334 -> 350 us; the H200's autotuner
    # chose this config on 2026-11-29)
    _cfg(4, 1, 2, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=32),
    # 3 programs per SM: what its 166-168 registers (ResNeXt-50's packed groups) let an SM
    # hold; with 4 the planner's fill put a second wave on every SM (predicted at stage 1:
    # 322.1 -> 212.4 us)
    _cfg(4, 1, 3, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32),
    _cfg(8, 1, 2, TILE_H=8, TILE_W=16, BLOCK_N=128, BLOCK_K=32),  # 128 output channels: one merged launch
    # WIDE_K: the weight-gradient launch's channel block where :func:`_wide_k` allows it
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=128, BLOCK_K=32, WIDE_K=64),
]
# The input-gradient launch of a split backward (grad_a alone): as above but the 8 x 8 tile
# takes 64 input channels per program (first: the static choice), so each grad_out tile (all
# of a channel block's output channels, for every tap) is loaded and staged once per 64 input
# channels instead of 32 (this launch holds no weight-gradient accumulators).
_BWD_INPUT_CONFIGS = [
    _cfg(4, 1, 4, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=64),
    _BWD_CONFIGS[0],
    *_BWD_CONFIGS[2:],
]
# The weight-gradient launch of a split backward (grad_weight alone): as above, and an 8-warp
# 64 x 32 channel block whose taps x channels float32 accumulators fit the registers (96 per
# thread for a 3x3 kernel, against 192 for the others on wide convs such as WRN-28-10's,
# which spill there).
_BWD_WEIGHT_CONFIGS = [
    *_BWD_CONFIGS,
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32),
    # 16 output x 64 input channels: a kernel row's stacked output gradient [positions, 4 x 16]
    # is half as wide, and it dominates the loads when the outputs are few (DenseNet's
    # 128 -> 32 3x3 convs; predicted 8.07 -> 7.39 us at 28 x 28, 3.24 -> 2.72 us at 14 x 14)
    _cfg(8, 1, 2, TILE_H=8, TILE_W=16, BLOCK_N=16, BLOCK_K=64),
    _cfg(4, 1, 4, TILE_H=8, TILE_W=16, BLOCK_N=16, BLOCK_K=64),
]
# ... and, for the weight-gradient launch of one group per block (DenseNet-121's 128 -> 32 3x3
# convs), 16 warps on a 16 output x 64 input channel block capped at 64 registers: 2 programs
# (32 warps) per SM, spill-free with triton 3.8 and 3.6, the split count filling both slots
# (``FILL``; PREDICTED at 56 x 56: 124.3 -> 68.4 us, where the WIDE_K config's 196 registers
# hold one 8-warp program per SM). ``NOCAP``: its split count is not capped by the partials'
# bytes (about the bytes the launch reads), so small images fill the SMs too: at DenseNet-121's
# 14 x 14 and 7 x 7 the cap left 104 and 24 programs of 10 and 11 tiles (PREDICTED, weight
# gradient + finalize: 14 x 14 21.2 -> 11.6 us, 7 x 7 17.5 -> 7.2; its more float32 partials
# are priced, and the finalize sums them 64 rows at a time, :func:`_finalize_tile`).
_BWD_WEIGHT_FILL_CONFIGS = [
    _cfg(16, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=16, BLOCK_K=64, MAXNREG=64, FILL=1, NOCAP=1),
]
_BWD_INTERP = _cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16)
# The merged launch (both conv gradients, ``DO_GA`` + ``DO_GW``) of a 1x1 conv where the planner
# runs it anyway (DenseNet-121's 1x1 convs, all 128 output channels per block): 16 warps on a
# 128- or 64-position tile, whose 98-127 registers hold one 16-warp program per SM (the 8-warp
# configs' 181-198 held one 8-warp program), the split count filling the SMs (``FILL``).
# Listed after :data:`_BWD_CONFIGS` (the static choice, the first config, is unchanged), never
# used to decide whether the launch is merged. PREDICTED (triton 3.8 / 3.6): 56 x 56 281.1 ->
# 183.4 / 300.9 -> 198.6 us; a warp's path per tile about halves. docs/notes/triton_kernels.md.
_BWD_MERGED_FILL_CONFIGS = [
    _cfg(16, 1, 1, TILE_H=8, TILE_W=16, BLOCK_N=128, BLOCK_K=32, FILL=1),
    _cfg(16, 1, 1, TILE_H=8, TILE_W=8, BLOCK_N=128, BLOCK_K=32, FILL=1),
]
#: ``False``: the merged launch with :data:`_BWD_CONFIGS` alone (the plan before
#: :data:`_BWD_MERGED_FILL_CONFIGS`).
MERGED_FILL = True
# The weight-gradient launch of a strided backward split by :func:`_strided_split` (one group
# of 16-31 channels per block: ResNeXt-50's stage-3 stride-2 block): the 4-warp 8 x 16 config
# at its 95 registers' 5 programs per SM, the split count filling them (PREDICTED, triton 3.8:
# 51.5 us against the merged launch's 193.6 for both gradients).
_BWD_WEIGHT_STRIDED_CONFIGS = [
    _cfg(4, 1, 5, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=32, FILL=1),
    # ... capped at 80 registers: 6 programs per SM, spill-free with triton 3.8 (3.6: 8-16 bytes
    # outside the tile loops, and the model keeps the uncapped one). PREDICTED (3.8) with the
    # finalize: resnext50_s2_down 82.9 -> 78.4 us, resnext50_s3_down 55.3 -> 48.7.
    _cfg(4, 1, 6, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=32, FILL=1, MAXNREG=80),
]
#: ``False``: a strided backward of one 16-channel group per block in one merged launch (the
#: plan before :func:`_strided_split`).
STRIDED_SPLIT = True
# The weight-gradient launch of a group wider than one tile (:func:`_wide_weight`;
# ``bn_relu_conv_bwd_weight_kernel``, over the output positions): ``BLOCK_N`` output by
# ``BLOCK_K`` input channels per program, one ``[BLOCK_N, 4 * BLOCK_K]`` float32 accumulator
# per kernel row of a 3x3 kernel (96 per thread for these configs; the first, the static
# choice, predicted fastest on WRN-28-10's stride-2 blocks, where a 128-row tile, 4 warps or
# a 64 x 16 block were slower).
_BWD_WEIGHT_WIDE_CONFIGS = [
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=128, BLOCK_K=16),
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32),
]
_BWD_WEIGHT_WIDE_INTERP = _cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16)
# ... at stride 1 (``SPLIT_KW``: ``bn_relu_conv_bwd_weight_s1_kernel``, over the input positions,
# a 3-wide kernel row's taps stacked 2 + 1): ``KH * KW * BLOCK_N * BLOCK_K`` float32
# accumulators, 72 per thread. Listed beside the stacked kernel's configs
# (:data:`_BWD_WEIGHT_CONFIGS`) in one launch: each is faster on some shapes.
_BWD_WEIGHT_S1_CONFIGS = [
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32, SPLIT_KW=1),
    _cfg(8, 1, 2, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=32, SPLIT_KW=1),
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=32, BLOCK_K=64, SPLIT_KW=1, ACC_T=1),
    _cfg(8, 1, 2, TILE_H=8, TILE_W=16, BLOCK_N=32, BLOCK_K=64, SPLIT_KW=1, ACC_T=1),
    # the stacked kernel with 32 output x 64 input channels: a [128, 64] accumulator per
    # kernel row, 96 per thread (on wide groups only: at 128 -> 32 channels its doubled
    # partials cost the finalize more than the kernel gains)
    _cfg(8, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=32, BLOCK_K=64),
    _cfg(8, 1, 2, TILE_H=8, TILE_W=16, BLOCK_N=32, BLOCK_K=64),
]
_BWD_WEIGHT_S1_INTERP = _cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16, SPLIT_KW=1)
# The weight-gradient launch of a wide group from the activations the input-gradient launch
# stored (:func:`_weight_from_a`; ``bn_relu_conv_bwd_weight_tma_kernel``): one program per
# (``BLOCK_N`` output x ``BLOCK_K`` input channels, tap, split), ``grad_out`` and ``a`` by TMA
# tensor descriptors in a ``num_stages``-deep pipelined loop over output tiles, one MMA per step
# straight from shared memory. Only tiles that divide the output are listed (:func:`_a_tiles`).
_BWD_WEIGHT_TMA_CONFIGS = [
    _cfg(4, 3, 5, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=64, A_TMA=1),
    _cfg(4, 2, 5, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=64, A_TMA=1),
    _cfg(4, 2, 3, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=64, A_TMA=1),
    _cfg(4, 3, 5, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32, A_TMA=1),
    _cfg(4, 3, 3, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=128, A_TMA=1),
    _cfg(8, 3, 2, TILE_H=8, TILE_W=8, BLOCK_N=128, BLOCK_K=128, A_TMA=1),
]
_BWD_WEIGHT_TMA_INTERP = _cfg(4, 2, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16, A_TMA=1)
#: ``False``: wide groups' weight gradients as before 2026-12-01 (normalising ``x`` again in
#: the weight kernels, no ``a`` stored by the input gradient).
WGRAD_FROM_A = True
# The input-gradient launch of a group wider than one tile or of 64 input channels or more
# (:func:`_wide_input`; ``bn_relu_conv_bwd_input_kernel``): one flattened, software-pipelined
# loop over (output-channel chunk, tap), ``num_stages`` deep; ``BLOCK_N`` output channels per step (the GEMM's K),
# ``BLOCK_K`` input channels per program (its N), ``TILE_H x TILE_W`` positions (its M).
_BWD_INPUT_WIDE_CONFIGS = [
    _cfg(8, 3, 1, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=128),
    _cfg(4, 4, 1, TILE_H=8, TILE_W=16, BLOCK_N=32, BLOCK_K=64),
    _cfg(8, 3, 1, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=128),
    _cfg(4, 3, 2, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=128),
    _cfg(4, 3, 2, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=64),
    # a 64-row tile by all 128 input channels (DenseNet's 128 -> 32 3x3 convs at 28 x 28:
    # predicted 9.10 -> 8.69 us, the HBM floor)
    _cfg(4, 3, 2, TILE_H=4, TILE_W=16, BLOCK_N=32, BLOCK_K=128),
    # the operands by TMA tensor descriptors (``TMA``, where :func:`_tma_ok` holds; else the
    # masked loads, same tile): no address or mask arithmetic per step, a step's loop 200 -> 110
    # instructions per warp (PREDICTED, WRN-28-10 stage 1: 695.6 -> 389.3 us, spill-free)
    _cfg(8, 3, 1, TILE_H=16, TILE_W=16, BLOCK_N=64, BLOCK_K=64, TMA=1),
    _cfg(8, 3, 1, TILE_H=8, TILE_W=16, BLOCK_N=128, BLOCK_K=128, TMA=1),
    _cfg(8, 3, 1, TILE_H=8, TILE_W=16, BLOCK_N=64, BLOCK_K=128, TMA=1),
    _cfg(8, 3, 1, TILE_H=8, TILE_W=8, BLOCK_N=128, BLOCK_K=128, TMA=1),
    _cfg(8, 3, 1, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=128, TMA=1),
]
_BWD_INPUT_WIDE_INTERP = _cfg(4, 2, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16)
# The input gradient of packed small groups at stride 1 (:func:`_packed_input`;
# ``bn_relu_conv_bwd_input_packed_kernel``: per tap one [positions, 16] x [16, 16] MMA), then the
# weight gradient as its own launch. Its time is one warp's dependent path (PREDICTED), so
# registers decide it. The first two compute the epilogue in the MMA's layout (``MMA_EPI``: the
# BN vectors 4 registers each instead of 8, one layout conversion of x and one of grad_z instead
# of four); the first also keeps the per-position sums as pairs (``PAIRS``: half their registers)
# and caps at 56 registers, 9 programs per SM (spill-free with triton 3.8 and 3.6 except 3.6 at
# ResNeXt-50 stage 2, which takes the second: 64 registers, 8 per SM). ResNeXt-50 stage 1: 86.4 us
# (the third, capped at 80: 6 per SM) -> 61.7 us.
_BWD_INPUT_PACKED_CONFIGS = [
    _cfg(4, 1, 9, TILE_H=8, TILE_W=8, BLOCK_N=16, BLOCK_K=16, MMA_EPI=1, PAIRS=1, MAXNREG=56),
    _cfg(4, 1, 8, TILE_H=8, TILE_W=8, BLOCK_N=16, BLOCK_K=16, MMA_EPI=1, MAXNREG=64),
    _cfg(4, 1, 6, TILE_H=8, TILE_W=8, BLOCK_N=16, BLOCK_K=16, MAXNREG=80),
    _cfg(4, 1, 5, TILE_H=8, TILE_W=8, BLOCK_N=16, BLOCK_K=16),
    _cfg(8, 1, 3, TILE_H=8, TILE_W=16, BLOCK_N=16, BLOCK_K=16, MAXNREG=80),
]
_BWD_INPUT_PACKED_INTERP = _cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16)
#: ``False``: the packed input gradient's configs without ``MMA_EPI`` (the plan before them).
PACKED_INPUT_MMA_EPI = True
# The input gradient of packed small groups at stride 2 (:func:`_packed_input_s2`;
# ``bn_relu_conv_bwd_input_packed_s2_kernel``: the stride-1 kernel's design by parity
# decomposition, one tile loop per residue class with only the taps that reach it), then the
# weight gradient as its own launch (the stacked kernel's ``DO_GW`` class path).
# Configs as the stride-1 kernel's, and ``MMA_EPI`` + ``PAIRS`` capped at 64 (second: spill-free
# with triton 3.6 at ResNeXt-50's stage-2 block, where the 56-register one spills 8 bytes).
# PREDICTED (triton 3.8): resnext50_s2_down 333.8 us (the merged launch, both gradients) -> 79.0
# + 71.5 (the weight gradient), resnext50_s3_down's input gradient 109.6 -> 47.1 us (the split's
# DO_GA pass before); docs/notes/triton_kernels.md.
_BWD_INPUT_PACKED_S2_CONFIGS = [
    _cfg(4, 1, 9, TILE_H=8, TILE_W=8, BLOCK_N=16, BLOCK_K=16, MMA_EPI=1, PAIRS=1, MAXNREG=56),
    _cfg(4, 1, 8, TILE_H=8, TILE_W=8, BLOCK_N=16, BLOCK_K=16, MMA_EPI=1, PAIRS=1, MAXNREG=64),
    _cfg(4, 1, 8, TILE_H=8, TILE_W=8, BLOCK_N=16, BLOCK_K=16, MMA_EPI=1, MAXNREG=64),
    _cfg(4, 1, 6, TILE_H=8, TILE_W=8, BLOCK_N=16, BLOCK_K=16, MAXNREG=80),
    _cfg(4, 1, 5, TILE_H=8, TILE_W=8, BLOCK_N=16, BLOCK_K=16),
]
_BWD_INPUT_PACKED_S2_INTERP = _cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16)
#: ``False``: a strided packed backward as before :func:`_packed_input_s2` (one merged launch).
PACKED_INPUT_S2 = True
# ... and the weight-gradient launch beside it (the stacked kernel, ``DO_GW``), which the merged
# launch never had alone: with packed groups a block is 16 x 16 channels whatever the config's
# BLOCK_N / BLOCK_K, so these differ from :data:`_BWD_WEIGHT_CONFIGS` in warps, tile and
# programs per SM only (their 55-98 registers hold 4-5 per SM; PREDICTED at stage 1: 99.6 ->
# 75.0 us, the 8-warp 8 x 8 one).
_BWD_WEIGHT_PACKED_CONFIGS = [
    # capped at 48 registers: 5 programs per SM, spill-free with triton 3.8 and 3.6 (PREDICTED at
    # stage 1: 75.0 -> 62.1 us; FILL: one 16-channel group per block, stage 3, fills too)
    _cfg(8, 1, 5, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32, MAXNREG=48, FILL=1),
    _cfg(8, 1, 4, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32),
    _cfg(8, 1, 3, TILE_H=8, TILE_W=16, BLOCK_N=16, BLOCK_K=64),
    _cfg(4, 1, 5, TILE_H=8, TILE_W=8, BLOCK_N=64, BLOCK_K=32),
]
# ... and the dedicated packed weight-gradient kernel (``bn_relu_conv_bwd_weight_packed_kernel``,
# ``WGRAD=1``): all three 4-tap stacks of grad_out loaded before the first MMA, 8 warps, 3
# programs per SM (74-78 registers). Listed beside the stacked kernel's configs in one launch
# (each config binds its own kernel). PREDICTED: it was faster only at ResNeXt-50 stage 3 (48.9 ->
# 33.3 us), and since the 48-register stacked config above (22.2 us there) no shape picks it
# (docs/notes/triton_kernels.md); listed still for a GPU's tuner.
_BWD_WEIGHT_PACKED_WG_CONFIGS = [
    _cfg(8, 1, 3, TILE_H=8, TILE_W=8, BLOCK_N=16, BLOCK_K=16, WGRAD=1, CAP=4),
]
_BWD_WEIGHT_PACKED_WG_INTERP = _cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16, WGRAD=1, CAP=4)
#: ``False``: the packed stride-1 weight gradient by the stacked kernel's ``DO_GW`` pass alone.
PACKED_WGRAD = True
# The stride-1 input gradient of one group per block whose output channels fit one chunk
# (:func:`_s1_input`; ``bn_relu_conv_bwd_input_s1_kernel``, ``S1``: the packed kernel's design
# with ``BLOCK_K`` input channels per program and every tap's ``[BLOCK_N, BLOCK_K]`` weights
# loaded once per program), listed beside the configs of the kernel the launch would run
# otherwise: each is faster on some shapes (PREDICTED, triton 3.8 / 3.6: DenseNet-121's
# 128 -> 32 3x3 convs at 56 x 56 149.3 -> 132.4 / 147.6 -> 136.4 us, at 28 x 28 49.1 -> 42.0 /
# 48.5 -> 43.4, at 7 x 7 9.1 -> 7.9 / 9.0 -> 8.0; at 14 x 14 the wide kernel stays faster,
# 13.3 against 15.6). The first takes the taps' addresses from 32-bit offsets (``G32``) and is
# capped at 168 registers: 3 programs per SM, spill-free with both tritons (178 registers
# uncapped without ``G32``; at 128, 4 per SM, it spills). On 7 x 7 images the capped config
# spills, and the uncapped one goes first.
_BWD_INPUT_S1_CONFIGS = [
    _cfg(4, 1, 3, TILE_H=8, TILE_W=8, BLOCK_N=32, BLOCK_K=32, S1=1, G32=1, MAXNREG=168),
    _cfg(4, 1, 2, TILE_H=8, TILE_W=8, BLOCK_N=32, BLOCK_K=32, S1=1),
    _cfg(4, 1, 4, TILE_H=8, TILE_W=8, BLOCK_N=32, BLOCK_K=16, S1=1),
]
_BWD_INPUT_S1_INTERP = _cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16, S1=1, G32=1)
#: ``False``: the plan before :func:`_s1_input` (the wide or stacked input-gradient launch), the
#: plan of the GPU profiles recorded before it (``benchmarks/static_calibrate.py`` binds it).
S1_INPUT = True
#: ``False``: the packed stride-1 backward as before this kernel (one merged ``conv_bwd`` launch
#: for both conv gradients), the plan the GPU profiles before it ran
#: (``benchmarks/static_calibrate.py`` binds it to refit the model) and the static model's
#: before-and-after comparison.
PACKED_INPUT = True
# grad_weight accumulators of one program (taps x BLOCK_N x BLOCK_K float32) above this many
# elements per thread split the backward into two launches (grad_a, then grad_weight).
_MAX_GW_ACC_PER_THREAD = 40
# ... and above this many a weight-gradient launch does not take a config's WIDE_K (they spill).
_MAX_WIDE_GW_ACC_PER_THREAD = 96


def _wide_k(cfg: TileConfig, blk: "_Blocks", wide: "_Blocks", kh: int, kw: int, splits_wide: int, n_gw: int,
            read_bytes: int) -> bool:
    """Whether the weight-gradient launch takes the config's wider channel block ``wide``
    (``WIDE_K`` input channels, not ``BLOCK_K``): each tile of ``grad_out`` (all the taps'
    positions) and ``x`` is then loaded and staged once per ``WIDE_K`` channels, but half the
    channel blocks need twice the splits for the same grid, so twice the float32 partials.
    Taken only where it widens the block, its accumulators fit the registers, and the
    partials (written, then read by the finalize) stay within half the bytes the launch reads."""
    per_thread = kh * _pow2(kw) * wide.block_n * wide.block_k // (32 * cfg.num_warps)
    return (wide.block_k > blk.block_k and per_thread <= _MAX_WIDE_GW_ACC_PER_THREAD
            and 2 * 4 * splits_wide * n_gw <= read_bytes // 2)


def _plan_bn_relu_conv2d_backward(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation,
                                  groups, bias_grad):
    _check_conv("bn_relu_conv2d_backward", x, weight, None, bn_weight, bn_bias, mean, invstd, stride, padding,
                dilation, groups)
    shape = conv_out_shape(x, weight, stride, padding, dilation)
    _check_like("grad_out", grad_out, x, shape)
    n, c, h, w = x.shape
    co, cin_g, kh, kw = weight.shape
    ho, wo = shape[2], shape[3]
    cout_g = co // groups
    khw = kh * kw
    mean, invstd, gamma, beta = _bn_vectors(mean, invstd, bn_weight, bn_bias)
    grad_z = torch.empty_like(x, memory_format=out_memory_format(x))
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=x.device)
    grad_bias = torch.empty([co], dtype=weight.dtype, device=x.device) if bias_grad else weight.new_empty([0])
    sum_dz = torch.empty([c], dtype=torch.float32, device=x.device)
    sum_dz_xhat = torch.empty([c], dtype=torch.float32, device=x.device)
    sums = sum_dz  # a placeholder pointer for buffers a launch does not use
    result = (grad_z, grad_weight, grad_bias, sum_dz, sum_dz_xhat)
    flat = _flat_positions(kh, kw, stride, padding, grad_out, x, grad_z)
    if flat is not None:  # a 1x1 conv over evenly strided positions: one image of all of them
        grad_out, x, grad_z = flat
        n, c, h, w = x.shape
        ho, wo = grad_out.shape[2], grad_out.shape[3]
    hc, wc = _cdiv(h, stride[0]), _cdiv(w, stride[1])  # grid of one residue class
    configs = _prune_tiles(_BWD_CONFIGS, hc, wc, fit=True)
    merged_cfgs = [cfg for cfg in configs if _merged_backward(groups, cin_g, cout_g, kh, kw, cfg)]
    merged = _merged_backward(groups, cin_g, cout_g, kh, kw, _BWD_INTERP) if _interpret() else bool(merged_cfgs)
    strided_split = STRIDED_SPLIT and _strided_split(groups, cin_g, cout_g, stride, kh, kw)
    merged = merged and not strided_split
    if merged and MERGED_FILL and kh * kw == 1:  # more candidates for a launch that is merged anyway
        merged_cfgs += [cfg for cfg in _prune_tiles(_BWD_MERGED_FILL_CONFIGS, hc, wc, fit=True)
                        if _merged_backward(groups, cin_g, cout_g, kh, kw, cfg)]
    elt = x.element_size()
    x_bytes, gy_bytes = x.numel() * elt, grad_out.numel() * elt
    wide_ga = False
    key = ("bwd", *_conv_key(x, weight, stride, padding, dilation, groups, ho, wo), bool(bias_grad))
    # One buffer per launch and config would need the split count before binding; partials
    # are allocated by the binder and recorded here for the finalize launch.
    state: Dict[str, Any] = {}

    def binder(do_ga: bool, do_gw: bool):
        def bind(cfg: TileConfig) -> Bound:
            th, tw = cfg.get("TILE_H"), cfg.get("TILE_W")
            th, tw = _fit_tile(th, tw, hc, wc)  # the tile's positions in the shape that fills the grid best
            blk = _blocks(groups, cin_g, cout_g, cfg.get("BLOCK_K"), cfg.get("BLOCK_N"), cfg.get("PACK", 16))
            nsub = blk.nsub
            ncb = blk.ngb * blk.ksub * (1 if do_ga else nsub)
            tiles_h, tiles_w = _cdiv(hc, th), _cdiv(wc, tw)
            num_tiles = n * stride[0] * stride[1] * tiles_h * tiles_w
            cap = num_tiles
            if do_gw and not cfg.get("NOCAP"):  # float32 weight-gradient partials at most about as large as the tensors read
                cap = max(1, min(cap, (x_bytes + gy_bytes) // (4 * max(1, co * cin_g * khw))))
            splits = _balanced_splits(num_tiles, ncb, x, cfg, cap, partials=do_gw, fill=blk.gp > 1 or bool(cfg.get("FILL")))
            if do_gw and not do_ga and cfg.get("WIDE_K"):
                wide = _blocks(groups, cin_g, cout_g, cfg.get("WIDE_K"), cfg.get("BLOCK_N"), cfg.get("PACK", 16))
                ncb_wide = wide.ngb * wide.ksub * wide.nsub
                splits_wide = _balanced_splits(num_tiles, ncb_wide, x, cfg, cap, partials=True)
                if _wide_k(cfg, blk, wide, kh, kw, splits_wide, co * cin_g * khw, x_bytes + gy_bytes):
                    blk, nsub, ncb, splits = wide, wide.nsub, ncb_wide, splits_wide
            f32 = dict(dtype=torch.float32, device=x.device)
            pgw = torch.empty([splits, co * cin_g * khw], **f32) if do_gw else sums
            pgb = torch.empty([splits, co], **f32) if (do_gw and bias_grad) else sums
            packed = blk.gp > 1 and do_ga
            psum = torch.empty([splits, 2 * c], **f32) if do_ga else sums
            if do_gw:
                state.update(pgw=pgw, pgb=pgb, splits_w=splits)
            if do_ga:
                state.update(psum=psum, splits_s=splits)
            flags = sums  # unused: a packed program's fix-up is decided in the program itself
            args = (grad_out, weight, x, _or(gamma, mean), _or(beta, mean), mean, invstd, grad_z, pgw, pgb, psum,
                    flags,
                    c, h, w, co, ho, wo, cin_g, cout_g, blk.kr, blk.nr, blk.ksub, nsub, ncb, splits, tiles_h,
                    tiles_w, num_tiles, n * ho * wo,
                    *grad_out.stride(), *weight.stride(), *x.stride(), *grad_z.stride(), *stride, *padding,
                    *dilation)
            one_n = bool(do_gw or nsub == 1)
            sh, sw = _class_strides(stride, dilation) if one_n else (0, 0)
            const = dict(KH=kh, KW=kw, KW_P=_pow2(kw), DO_GA=do_ga, DO_GW=do_gw, DO_GB=bool(do_gw and bias_grad),
                         ONE_N=one_n, PACKED=packed, SH=sh, SW=sw,
                         MAGIC=num_tiles * max(tiles_w, tiles_h) < 2 ** 31,  # tile digits by multiply-high
                         HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, DOT_F32=_dot_f32(x),
                         EVEN_K=blk.even_k(c), EVEN_N=blk.even_n(co), TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if cfg.get("MAXNREG"):  # a launch option: registers per thread at most
                const["maxnreg"] = cfg.get("MAXNREG")
            # per-program trips of the kernel's loops in the order of their heads in the code
            if sh:  # the class path: one tile loop per residue class
                loops = {f"tiles_class{q}": _cdiv(num_tiles // (sh * sw), splits) for q in range(sh * sw)}
            else:
                loops = {"tiles": _cdiv(num_tiles, splits)}
            if do_ga and not do_gw and nsub > 1:
                loops.update({f"co_chunks_kh{i}": nsub for i in range(kh)})
            if do_gw and bias_grad:
                loops["bias_rows"] = _cdiv(n * ho * wo, splits * th * tw)
            if packed:  # the exact fix-up runs only in programs that met a grad_a that is not finite
                loops.update(**({"fixup_classes": 0} if sh else {}), fixup_tiles=0, fixup_taps=0, fixup_channels=0)
            fix_depth = 2 if sh else 1
            partial_bytes = 4 * (pgw.numel() if do_gw else 0) + 4 * (psum.numel() if do_ga else 0)
            read = gy_bytes + x_bytes + (x_bytes + _nbytes(weight) if do_ga else 0)  # + grad_z written
            bound = Bound((ncb * splits,), args, const, loops=loops,
                          depths={**{k: 2 for k in loops if k.startswith("co_chunks")}, "fixup_tiles": fix_depth,
                                  "fixup_taps": fix_depth + 1, "fixup_channels": fix_depth + 2},
                          derived=dict(TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, GP=blk.gp, splits=splits,
                                       programs=ncb * splits), hbm_bytes=read + partial_bytes)
            return bound
        return bind

    def wide_input_binder(cfg: TileConfig) -> Bound:
        th, tw = _fit_tile(cfg.get("TILE_H"), cfg.get("TILE_W"), hc, wc)
        blk = _blocks(groups, cin_g, cout_g, cfg.get("BLOCK_K"), cfg.get("BLOCK_N"), cfg.get("PACK", 16))
        ncb = blk.ngb * blk.ksub
        tiles_h, tiles_w = _cdiv(hc, th), _cdiv(wc, tw)
        num_tiles = n * stride[0] * stride[1] * tiles_h * tiles_w
        splits = _balanced_splits(num_tiles, ncb, x, cfg)
        psum = torch.empty([splits, 2 * c], dtype=torch.float32, device=x.device)
        state.update(psum=psum, splits_s=splits)
        steps = [s_ // math.gcd(s_, d_) for s_, d_ in zip(stride, dilation)]
        dsteps = [st * d_ // s_ for st, s_, d_ in zip(steps, stride, dilation)]
        a_buf = state.get("a_buf")  # the activations stored for the weight gradient (WGRAD_FROM_A)
        args = (grad_out, weight, x, _or(gamma, mean), _or(beta, mean), mean, invstd, grad_z, psum,
                sums if a_buf is None else a_buf,
                c, h, w, co, ho, wo, blk.kr, blk.nr, blk.ksub, blk.nsub, ncb, splits, tiles_h, tiles_w, num_tiles,
                n, cin_g,
                *grad_out.stride(), *weight.stride(), *x.stride(), *grad_z.stride(), *stride, *padding, *dilation,
                *steps, *dsteps)
        const = dict(KH=kh, KW=kw, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, DOT_F32=_dot_f32(x),
                     EVEN_K=blk.even_k(c), EVEN_N=blk.even_n(co), STAGES=cfg.num_stages, TILE_H=th, TILE_W=tw,
                     BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                     TMA=bool(cfg.get("TMA")) and _tma_ok(grad_out, weight, groups, blk, co),
                     SAVE_A=a_buf is not None)
        if cfg.get("MAXNREG"):  # a launch option: registers per thread at most
            const["maxnreg"] = cfg.get("MAXNREG")
        # the reduction steps of a tile: output-channel chunks x the taps reaching its residue
        # class, averaged over the classes (every class has as many tiles)
        taps = _class_taps(kh, stride[0], padding[0], dilation[0]) * _class_taps(kw, stride[1], padding[1],
                                                                                 dilation[1])
        steps_per_tile = _cdiv(blk.nsub * taps, stride[0] * stride[1])
        return Bound((ncb * splits,), args, const,
                     loops={"tiles": _cdiv(num_tiles, splits), "steps": steps_per_tile},
                     depths={"steps": 2},
                     derived=dict(TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, GP=blk.gp,
                                  splits=splits, programs=ncb * splits),
                     hbm_bytes=gy_bytes + 2 * x_bytes + _nbytes(weight) + 4 * psum.numel()
                     + (x_bytes if a_buf is not None else 0))

    def a_weight_binder(cfg: TileConfig) -> Bound:
        # bn_relu_conv_bwd_weight_tma_kernel: output tiles that divide the output (_a_tiles)
        th, tw = _fit_tile(cfg.get("TILE_H"), cfg.get("TILE_W"), ho, wo)
        assert ho % th == 0 and wo % tw == 0, (th, tw, ho, wo)
        blk = _blocks(groups, cin_g, cout_g, cfg.get("BLOCK_K"), cfg.get("BLOCK_N"), cfg.get("PACK", 16))
        ncb = blk.ngb * blk.ksub * blk.nsub
        tiles_h, tiles_w = ho // th, wo // tw
        num_tiles = n * tiles_h * tiles_w
        cap = max(1, min(num_tiles, (x_bytes + gy_bytes) // (4 * max(1, co * cin_g * khw))))
        splits = _balanced_splits(num_tiles, ncb * khw, x, cfg, cap, partials=True, fill=True)
        f32 = dict(dtype=torch.float32, device=x.device)
        pgw = torch.empty([splits, co * cin_g * khw], **f32)
        pgb = torch.empty([splits, co], **f32) if bias_grad else sums
        state.update(pgw=pgw, pgb=pgb, splits_w=splits)
        a_buf = state["a_buf"]
        args = (grad_out, a_buf, pgw, pgb, c, co, ho, wo, h // stride[0], w // stride[1], cin_g, blk.kr, blk.nr,
                blk.ksub, blk.nsub, ncb, splits, tiles_h, tiles_w, num_tiles, _cdiv(num_tiles, splits), n,
                grad_out.stride(0), grad_out.stride(2), grad_out.stride(3),
                a_buf.stride(0), stride[0] * a_buf.stride(2), a_buf.stride(2), stride[1] * a_buf.stride(3),
                *padding, *dilation)
        const = dict(KH=kh, KW=kw, SH=stride[0], SW=stride[1], DO_GB=bool(bias_grad), DOT_F32=_dot_f32(x),
                     STAGES=cfg.num_stages, TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages, TMA=True)
        if cfg.get("MAXNREG"):  # a launch option: registers per thread at most
            const["maxnreg"] = cfg.get("MAXNREG")
        return Bound((ncb * khw * splits,), args, const, loops={"tiles": _cdiv(num_tiles, splits)},
                     derived=dict(TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, GP=blk.gp,
                                  splits=splits, programs=ncb * khw * splits),
                     hbm_bytes=gy_bytes + x_bytes + 4 * (pgw.numel() + (pgb.numel() if bias_grad else 0)))

    def wide_weight_binder(cfg: TileConfig) -> Bound:
        # at stride 1 (bn_relu_conv_bwd_weight_s1_kernel) tiles of the input positions, else of the output's
        at_input = max(stride) == 1
        gh, gw_ = (h, w) if at_input else (ho, wo)
        th, tw = _fit_tile(cfg.get("TILE_H"), cfg.get("TILE_W"), gh, gw_)
        blk = _blocks(groups, cin_g, cout_g, cfg.get("BLOCK_K"), cfg.get("BLOCK_N"), cfg.get("PACK", 16))
        ncb = blk.ngb * blk.ksub * blk.nsub
        tiles_h, tiles_w = _cdiv(gh, th), _cdiv(gw_, tw)
        num_tiles = n * tiles_h * tiles_w
        # float32 weight-gradient partials at most about as large as the tensors read
        cap = max(1, min(num_tiles, (x_bytes + gy_bytes) // (4 * max(1, co * cin_g * khw))))
        splits = _balanced_splits(num_tiles, ncb, x, cfg, cap, partials=True)
        f32 = dict(dtype=torch.float32, device=x.device)
        pgw = torch.empty([splits, co * cin_g * khw], **f32)
        pgb = torch.empty([splits, co], **f32) if bias_grad else sums
        state.update(pgw=pgw, pgb=pgb, splits_w=splits)
        const = dict(KH=kh, KW=kw, DO_GB=bool(bias_grad), HAS_GAMMA=gamma is not None,
                     HAS_BETA=beta is not None, DOT_F32=_dot_f32(x), EVEN_K=blk.even_k(c), EVEN_N=blk.even_n(co),
                     TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages)
        if cfg.get("MAXNREG"):  # a launch option: registers per thread at most
            const["maxnreg"] = cfg.get("MAXNREG")
        loops = {"tiles": _cdiv(num_tiles, splits)}
        if at_input:
            kw_a, kw_b = _kw_stacks(kw)
            args = (grad_out, x, _or(gamma, mean), _or(beta, mean), mean, invstd, pgw, pgb,
                    c, h, w, co, ho, wo, cin_g, blk.kr, blk.nr, blk.ksub, blk.nsub, ncb, splits, tiles_h, tiles_w,
                    num_tiles, n * ho * wo, *grad_out.stride(), *x.stride(), *padding, *dilation)
            const.update(KW_A=kw_a, KW_B=kw_b, ACC_T=bool(cfg.get("ACC_T")))
            if bias_grad:
                loops["bias_rows"] = _cdiv(n * ho * wo, splits * th * tw)
        else:
            args = (grad_out, x, _or(gamma, mean), _or(beta, mean), mean, invstd, pgw, pgb,
                    c, h, w, co, ho, wo, cin_g, blk.kr, blk.nr, blk.ksub, blk.nsub, ncb, splits, tiles_h, tiles_w,
                    num_tiles, *grad_out.stride(), *x.stride(), *stride, *padding, *dilation)
            const.update(KW_P=_pow2(kw))
        return Bound((ncb * splits,), args, const, loops=loops,
                     derived=dict(TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, GP=blk.gp,
                                  splits=splits, programs=ncb * splits),
                     hbm_bytes=gy_bytes + x_bytes + 4 * (pgw.numel() + (pgb.numel() if bias_grad else 0)),
                     fn=bn_relu_conv_bwd.bn_relu_conv_bwd_weight_s1_kernel if at_input else None)

    def stride1_tiles(cfg: TileConfig):
        """The stride-1 launches' tiles over the input positions: ``(TILE_H, TILE_W, blocks,
        tiles_h, tiles_w, num_tiles)``."""
        th, tw = _fit_tile(cfg.get("TILE_H"), cfg.get("TILE_W"), h, w)
        blk = _blocks(groups, cin_g, cout_g, cfg.get("BLOCK_K"), cfg.get("BLOCK_N"), cfg.get("PACK", 16))
        tiles_h, tiles_w = _cdiv(h, th), _cdiv(w, tw)
        return th, tw, blk, tiles_h, tiles_w, n * tiles_h * tiles_w

    def packed_input_launch(cfg: TileConfig, blk, th: int, tw: int, tiles_h: int, tiles_w: int, num_tiles: int,
                            **classes: int):
        """The split count, BN-sum partials, arguments and constexprs the packed input-gradient
        kernels share (stride 1 and, with ``SH`` / ``SW``, the stride-2 residue classes)."""
        splits = _balanced_splits(num_tiles, blk.ngb, x, cfg, fill=True)
        psum = torch.empty([splits, 2 * c], dtype=torch.float32, device=x.device)
        state.update(psum=psum, splits_s=splits)
        args = (grad_out, weight, x, _or(gamma, mean), _or(beta, mean), mean, invstd, grad_z, psum,
                c, h, w, co, ho, wo, cin_g, cout_g, blk.kr, blk.nr, tiles_h, tiles_w, num_tiles,
                *_digits(splits, (tiles_w, tiles_h)),
                *grad_out.stride(), *weight.stride(), *x.stride(), *grad_z.stride(), *padding, *dilation)
        const = dict(KH=kh, KW=kw, **classes, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
                     DOT_F32=_dot_f32(x), EVEN_K=blk.even_k(c), EVEN_N=blk.even_n(co), TILE_H=th, TILE_W=tw,
                     BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        for flag in ("MMA_EPI", "PAIRS"):
            if cfg.get(flag):
                const[flag] = True
        if cfg.get("MAXNREG"):  # a launch option: registers per thread at most
            const["maxnreg"] = cfg.get("MAXNREG")
        return splits, psum, args, const

    def packed_input_binder(cfg: TileConfig) -> Bound:
        th, tw, blk, tiles_h, tiles_w, num_tiles = stride1_tiles(cfg)
        ncb = blk.ngb
        splits, psum, args, const = packed_input_launch(cfg, blk, th, tw, tiles_h, tiles_w, num_tiles)
        # the exact fix-up runs only in programs that met a grad_a that is not finite (its loop over
        # a group's output channels is unrolled by 4 with a remainder loop: two SASS loops)
        loops = {"tiles": _cdiv(num_tiles, splits), "fixup_channels": 0, "fixup_tiles": 0, "fixup_taps": 0,
                 "fixup_outputs": 0, "fixup_outputs_rest": 0}
        return Bound((splits, ncb), args, const, loops=loops,
                     depths={"fixup_tiles": 2, "fixup_taps": 3, "fixup_outputs": 4, "fixup_outputs_rest": 4},
                     derived=dict(TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, GP=blk.gp,
                                  splits=splits, programs=ncb * splits),
                     hbm_bytes=gy_bytes + 2 * x_bytes + _nbytes(weight) + 4 * psum.numel())

    def packed_s2_binder(cfg: TileConfig) -> Bound:
        sh_, sw_ = _class_strides(stride, dilation)
        th, tw = _fit_tile(cfg.get("TILE_H"), cfg.get("TILE_W"), hc, wc)
        blk = _blocks(groups, cin_g, cout_g, cfg.get("BLOCK_K"), cfg.get("BLOCK_N"), cfg.get("PACK", 16))
        tiles_h, tiles_w = _cdiv(hc, th), _cdiv(wc, tw)
        num_tiles = n * tiles_h * tiles_w  # of one residue class
        ncb = blk.ngb
        splits, psum, args, const = packed_input_launch(cfg, blk, th, tw, tiles_h, tiles_w, num_tiles, SH=sh_, SW=sw_)
        if cfg.get("ONE_ROUND"):
            const["ONE_ROUND"] = cfg.get("ONE_ROUND")
        # one tile loop per residue class; the exact fix-up runs only in programs that met a grad_a
        # that is not finite (0 trips; its output-channel loop unrolled by 4 with a remainder loop)
        loops = {f"tiles_class{q}": _cdiv(num_tiles, splits) for q in range(sh_ * sw_)}
        loops.update(fixup_channels=0, fixup_classes=0, fixup_tiles=0, fixup_taps=0, fixup_outputs=0,
                     fixup_outputs_rest=0)
        return Bound((splits, ncb), args, const, loops=loops,
                     depths={"fixup_classes": 2, "fixup_tiles": 3, "fixup_taps": 4, "fixup_outputs": 5,
                             "fixup_outputs_rest": 5},
                     derived=dict(TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, GP=blk.gp,
                                  splits=splits, programs=ncb * splits),
                     hbm_bytes=gy_bytes + 2 * x_bytes + _nbytes(weight) + 4 * psum.numel(),
                     fn=bn_relu_conv_bwd.bn_relu_conv_bwd_input_packed_s2_kernel)

    def packed_weight_binder(cfg: TileConfig) -> Bound:
        th, tw, blk, tiles_h, tiles_w, num_tiles = stride1_tiles(cfg)
        ncb = blk.ngb
        # float32 weight-gradient partials at most about as large as the tensors read
        cap = max(1, min(num_tiles, (x_bytes + gy_bytes) // (4 * max(1, co * cin_g * khw))))
        splits = _balanced_splits(num_tiles, ncb, x, cfg, cap, partials=True, fill=True)
        f32 = dict(dtype=torch.float32, device=x.device)
        pgw = torch.empty([splits, co * cin_g * khw], **f32)
        pgb = torch.empty([splits, co], **f32) if bias_grad else sums
        state.update(pgw=pgw, pgb=pgb, splits_w=splits)
        args = (grad_out, x, _or(gamma, mean), _or(beta, mean), mean, invstd, pgw, pgb,
                c, h, w, co, ho, wo, cin_g, cout_g, blk.kr, blk.nr, tiles_h, tiles_w, num_tiles,
                *_digits(splits, (tiles_w, tiles_h)), n * ho * wo,
                *grad_out.stride(), *x.stride(), *padding, *dilation)
        const = dict(KH=kh, KW=kw, CAP=cfg.get("CAP", 4), DO_GB=bool(bias_grad), HAS_GAMMA=gamma is not None,
                     HAS_BETA=beta is not None, DOT_F32=_dot_f32(x), EVEN_K=blk.even_k(c), EVEN_N=blk.even_n(co),
                     TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if cfg.get("MAXNREG"):  # a launch option: registers per thread at most
            const["maxnreg"] = cfg.get("MAXNREG")
        loops = {"tiles": _cdiv(num_tiles, splits)}
        if bias_grad:
            loops["bias_rows"] = _cdiv(n * ho * wo, splits * th * tw)
        return Bound((splits, ncb), args, const, loops=loops,
                     derived=dict(TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, GP=blk.gp,
                                  splits=splits, programs=ncb * splits),
                     hbm_bytes=gy_bytes + x_bytes + 4 * (pgw.numel() + (pgb.numel() if bias_grad else 0)),
                     fn=bn_relu_conv_wgrad.bn_relu_conv_bwd_weight_packed_kernel)

    def s1_input_binder(cfg: TileConfig) -> Bound:
        th, tw, blk, tiles_h, tiles_w, num_tiles = stride1_tiles(cfg)
        ncb = blk.ngb * blk.ksub
        splits = _balanced_splits(num_tiles, ncb, x, cfg, fill=True)
        psum = torch.empty([splits, 2 * c], dtype=torch.float32, device=x.device)
        state.update(psum=psum, splits_s=splits)
        args = (grad_out, weight, x, _or(gamma, mean), _or(beta, mean), mean, invstd, grad_z, psum,
                c, h, w, co, ho, wo, blk.kr, blk.nr, blk.ksub, tiles_h, tiles_w, num_tiles,
                *_digits(splits, (tiles_w, tiles_h)),
                *grad_out.stride(), *weight.stride(), *x.stride(), *grad_z.stride(), *padding, *dilation)
        const = dict(KH=kh, KW=kw, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, DOT_F32=_dot_f32(x),
                     EVEN_K=blk.even_k(c), EVEN_N=blk.even_n(co), NSUB=blk.nsub, G32=bool(cfg.get("G32")),
                     TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages)
        if cfg.get("MAXNREG"):  # a launch option: registers per thread at most
            const["maxnreg"] = cfg.get("MAXNREG")
        return Bound((splits, ncb), args, const, loops={"tiles": _cdiv(num_tiles, splits)},
                     derived=dict(TILE_H=th, TILE_W=tw, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k, GP=blk.gp,
                                  splits=splits, programs=ncb * splits),
                     hbm_bytes=gy_bytes + 2 * x_bytes + _nbytes(weight) + 4 * psum.numel(),
                     fn=bn_relu_conv_bwd.bn_relu_conv_bwd_input_s1_kernel)

    launches = []
    packed_ga = PACKED_INPUT and _packed_input(groups, cin_g, cout_g, stride, kh, kw)
    # the stride-1 input gradient as its own convolution, beside the kernel it would be otherwise
    # (the two gradients then always in launches of their own)
    s1_ga = not packed_ga and S1_INPUT and _s1_input(groups, cin_g, cout_g, stride, kh, kw)
    merged = merged and not s1_ga
    # ... and at stride 2 by parity decomposition (packed groups: a launch of its own)
    packed_s2 = PACKED_INPUT and PACKED_INPUT_S2 and _packed_input_s2(groups, cin_g, cout_g, stride, dilation, kh, kw)
    if packed_s2:
        launches.append(KernelLaunch("conv_bwd_input", bn_relu_conv_bwd.bn_relu_conv_bwd_input_packed_s2_kernel,
                                     _prune_tiles(_BWD_INPUT_PACKED_S2_CONFIGS, hc, wc, fit=True),
                                     _BWD_INPUT_PACKED_S2_INTERP, packed_s2_binder, key + ("ga", "packed_s2"),
                                     hbm_bytes=gy_bytes + x_bytes + x_bytes + _nbytes(weight)))
        merged = False
    elif packed_ga:
        launches.append(KernelLaunch("conv_bwd_input", bn_relu_conv_bwd.bn_relu_conv_bwd_input_packed_kernel,
                                     _prune_tiles([cfg for cfg in _BWD_INPUT_PACKED_CONFIGS
                                                   if PACKED_INPUT_MMA_EPI or not cfg.get("MMA_EPI")], h, w, fit=True),
                                     _BWD_INPUT_PACKED_INTERP, packed_input_binder, key + ("ga", "packed"),
                                     hbm_bytes=gy_bytes + x_bytes + x_bytes + _nbytes(weight)))
        merged = False
    elif merged:
        launches.append(KernelLaunch("conv_bwd", bn_relu_conv_bwd.bn_relu_conv_bwd_kernel, merged_cfgs, _BWD_INTERP,
                                     binder(True, True), key + ("ga+gw",),
                                     hbm_bytes=gy_bytes + x_bytes + x_bytes + _nbytes(weight)))
    elif _wide_input(groups, cin_g, cout_g):
        wide_ga = True
        wide_cfgs = _prune_tiles(_BWD_INPUT_WIDE_CONFIGS, hc, wc, fit=True)
        if hc * wc <= 8 * 8:  # the static choice: small grids the 8 x 8 tile
            wide_cfgs.sort(key=lambda cfg: cfg.get("TILE_H") * cfg.get("TILE_W"))
        launches.append(KernelLaunch("conv_bwd_input", bn_relu_conv_bwd.bn_relu_conv_bwd_input_kernel,
                                     wide_cfgs, _BWD_INPUT_WIDE_INTERP,
                                     wide_input_binder, key + ("ga", "wide"),
                                     hbm_bytes=gy_bytes + x_bytes + x_bytes + _nbytes(weight)))
    else:
        launches.append(KernelLaunch("conv_bwd_input", bn_relu_conv_bwd.bn_relu_conv_bwd_kernel,
                                     _prune_tiles(_BWD_INPUT_CONFIGS, hc, wc, fit=True), _BWD_INTERP,
                                     binder(True, False), key + ("ga",),
                                     hbm_bytes=gy_bytes + x_bytes + x_bytes + _nbytes(weight)))
    if s1_ga:
        other = launches.pop()

        def bind_s1_or_other(cfg: TileConfig) -> Bound:
            return s1_input_binder(cfg) if cfg.get("S1") else other.bind(cfg)

        s1_cfgs = _prune_tiles(_BWD_INPUT_S1_CONFIGS, h, w, fit=True)
        if h * w <= 8 * 8:  # the static choice: one tile per image, the uncapped config (capped, it spills)
            s1_cfgs.sort(key=lambda cfg: bool(cfg.get("MAXNREG")))
        # the static choice at 9-16 positions a side: the other kernel (PREDICTED: DenseNet-121's
        # 3x3 at 14 x 14, 13.3 us against 15.6)
        both = list(other.configs) + s1_cfgs if 8 * 8 < h * w <= 16 * 16 else s1_cfgs + list(other.configs)
        launches.append(KernelLaunch("conv_bwd_input", other.fn, both,
                                     _BWD_INPUT_S1_INTERP, bind_s1_or_other, key + ("ga", "s1"),
                                     hbm_bytes=other.hbm_bytes))
    # the weight gradient from the activations the wide input gradient stores beside grad_z
    a_cfgs = _a_tiles([_BWD_WEIGHT_TMA_INTERP] if _interpret() else _BWD_WEIGHT_TMA_CONFIGS, ho, wo)
    if (WGRAD_FROM_A and wide_ga and not s1_ga and flat is None and a_cfgs and _wide_group(groups, cin_g, cout_g)
            and _weight_from_a(grad_out, x, stride) and grad_z.stride() == _cl_strides(grad_z)):
        state["a_buf"] = torch.empty_like(grad_z)  # grad_z's layout: the input gradient stores both at one offset
        launches.append(KernelLaunch("conv_bwd_weight", bn_relu_conv_wgrad.bn_relu_conv_bwd_weight_tma_kernel,
                                     a_cfgs, _BWD_WEIGHT_TMA_INTERP, a_weight_binder, key + ("gw", "a"),
                                     hbm_bytes=gy_bytes + x_bytes))
    elif not merged and _wide_weight(groups, cin_g, cout_g, stride):
        launches.append(KernelLaunch("conv_bwd_weight", bn_relu_conv_bwd.bn_relu_conv_bwd_weight_kernel,
                                     _prune_tiles(_BWD_WEIGHT_WIDE_CONFIGS, ho, wo, fit=True),
                                     _BWD_WEIGHT_WIDE_INTERP, wide_weight_binder, key + ("gw", "wide"),
                                     hbm_bytes=gy_bytes + x_bytes))
    elif not merged and _wide_group(groups, cin_g, cout_g) and _kw_stacks(kw) is not None:
        # the stacked kernel's configs and the split-stack kernel's, each chosen per config
        stacked = binder(False, True)

        def bind_either(cfg: TileConfig) -> Bound:
            return wide_weight_binder(cfg) if cfg.get("SPLIT_KW") else stacked(cfg)

        launches.append(KernelLaunch("conv_bwd_weight", bn_relu_conv_bwd.bn_relu_conv_bwd_kernel,
                                     _prune_tiles(_BWD_WEIGHT_CONFIGS + _BWD_WEIGHT_S1_CONFIGS, hc, wc, fit=True),
                                     _BWD_WEIGHT_S1_INTERP, bind_either, key + ("gw", "wide"),
                                     hbm_bytes=gy_bytes + x_bytes))
    elif not merged and packed_ga and PACKED_WGRAD:
        # the dedicated packed kernel's configs and the stacked kernel's, each chosen per config
        stacked_gw = binder(False, True)

        def bind_packed(cfg: TileConfig) -> Bound:
            if cfg.get("WGRAD"):
                return packed_weight_binder(cfg)
            return stacked_gw(cfg)

        gw_cfgs = _BWD_WEIGHT_CONFIGS + _BWD_WEIGHT_PACKED_CONFIGS + _BWD_WEIGHT_PACKED_WG_CONFIGS
        launches.append(KernelLaunch("conv_bwd_weight", bn_relu_conv_bwd.bn_relu_conv_bwd_kernel,
                                     _prune_tiles(gw_cfgs, hc, wc, fit=True), _BWD_WEIGHT_PACKED_WG_INTERP,
                                     bind_packed, key + ("gw", "packed"), hbm_bytes=gy_bytes + x_bytes))
    elif not merged:
        gw_cfgs = _BWD_WEIGHT_CONFIGS + (_BWD_WEIGHT_PACKED_CONFIGS if packed_ga or packed_s2
                                         else _BWD_WEIGHT_FILL_CONFIGS)
        if strided_split or packed_s2:
            gw_cfgs = gw_cfgs + _BWD_WEIGHT_STRIDED_CONFIGS
        launches.append(KernelLaunch("conv_bwd_weight", bn_relu_conv_bwd.bn_relu_conv_bwd_kernel,
                                     _prune_tiles(gw_cfgs, hc, wc, fit=True), _BWD_INTERP,
                                     binder(False, True), key + ("gw",),
                                     hbm_bytes=gy_bytes + x_bytes))
    n_gw, n_gb = co * cin_g * khw, (co if bias_grad else 0)
    # NaN over the padded taps of a non-finite grad_out, as eager (the finalize's PAD_NAN)
    pad_nan = any(p > 0 for p in padding)

    def bind_finalize(cfg: TileConfig) -> Bound:
        fin_c, fin_s = _finalize_tile(state["splits_w"], state["splits_s"], n_gw)
        cpb = fin_c  # weight-gradient columns a program
        if pad_nan:
            fin_c, fin_s, cpb = _finalize_units(fin_c, fin_s, n_gw, khw)
        nb_gw = _cdiv(n_gw, cpb)
        nb_gb, nb_c = _cdiv(n_gb, fin_c), _cdiv(c, fin_c)
        total = nb_gw + nb_gb + 2 * nb_c
        partials = 4 * (state["pgw"].numel() + (state["pgb"].numel() if bias_grad else 0) + state["psum"].numel())
        # a program takes one branch: each branch's loop weighted by its share of programs; the
        # padded taps' loops run only where a weight-gradient sum is not finite (planned 0 trips)
        loops = {"rows_gw": _share(state["splits_w"], fin_s, nb_gw, total)}
        if pad_nan:
            loops.update(pad_cos=0, pad_taps=0, pad_rows=0, pad_cols=0)
            if cin_g > 1:  # (one input channel a group: the NaN store's loop has one trip, unrolled)
                loops["pad_store"] = 0
        if bias_grad:
            loops["rows_gb"] = _share(state["splits_w"], fin_s, nb_gb, total)
        loops.update(rows_dz=_share(state["splits_s"], fin_s, nb_c, total),
                     rows_dzx=_share(state["splits_s"], fin_s, nb_c, total))
        return Bound((total,),
                     (state["pgw"], state["pgb"], state["psum"], grad_weight, _or(grad_bias if bias_grad else None,
                                                                                  sums), sum_dz, sum_dz_xhat,
                      n_gw, n_gb, c, state["splits_w"], state["splits_s"], nb_gw, nb_gb, nb_c,
                      grad_out, cin_g, n, h, w, ho, wo, *grad_out.stride(), *stride, *padding, *dilation),
                     dict(HAS_GB=bool(bias_grad), BLOCK_S=fin_s, BLOCK_C=fin_c, PAD_NAN=pad_nan, KH=kh, KW=kw,
                          CPB=cpb, num_warps=cfg.num_warps),
                     loops=loops, depths={"pad_taps": 2, "pad_rows": 3, "pad_cols": 3, "pad_store": 3},
                     hbm_bytes=partials + _nbytes(grad_weight) + 8 * c)

    fixed = _cfg(4, 1)
    launches.append(KernelLaunch("conv_bwd_finalize", bn_relu_conv_bwd.bn_relu_conv_bwd_finalize_kernel, [fixed],
                                 fixed, bind_finalize, hbm_bytes=4 * (n_gw + n_gb + 2 * c) * 2))
    return result, launches


#: The gradient finalize's ``(BLOCK_C, BLOCK_S)`` for every launch, interpreter included (tests;
#: ``(512, 4)``: the fixed tile of before); ``None``: :func:`_finalize_tile`'s choice.
FIN_TILES = None


def _finalize_tile(splits_w: int, splits_s: int, n_gw: int) -> Tuple[int, int]:
    """``(BLOCK_C, BLOCK_S)`` of the gradient finalize. With more than 12 weight-gradient
    splits: 2048 partials per step, as many rows per step as the larger split count needs (up
    to 64), so that each program's fixed-order sum takes few trips, unless that needs more
    programs than one wave of the SMs holds (about 12 of its 4-warp programs per SM): then
    columns as wide as one wave needs, and at 512 the old 512 x 4 tile. With 12 or fewer, 512 x 4
    (one to three trips; the narrower tiles' cross-thread sums cost more there). PREDICTED
    (static model, every shape's configs: never slower): DenseNet-121's 3x3 finalize at 56 x 56,
    66 weight-gradient splits, 8.5 -> 3.4 us (512 x 4: 17 trips per program; 32 x 64: 2);
    ResNeXt-50 stage 1 at 81 splits 11.3 -> 3.4 us."""
    if FIN_TILES is not None:
        return FIN_TILES
    if _interpret():
        return 16, 8
    if splits_w <= 12:  # at most 3 trips of 512 x 4: that tile is as fast or faster (its sum stays in-thread)
        return 512, 4
    rows = min(64, max(4, _pow2(max(splits_w, splits_s))))
    cols = max(2048 // rows, _pow2(_cdiv(n_gw, _FIN_ONE_WAVE)))
    return (512, 4) if cols >= 512 else (cols, 2048 // cols)


#: Programs of the gradient finalize that one wave of the model's 132 SMs holds (12 per SM).
_FIN_ONE_WAVE = 12 * MODEL_SMS


def _finalize_units(block_c: int, block_s: int, n_gw: int, khw: int) -> Tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_S, CPB)`` of the gradient finalize with ``PAD_NAN`` from
    :func:`_finalize_tile`'s tile: each program takes ``CPB`` weight-gradient columns, whole
    ``(co, ci)`` units of ``khw`` taps and a multiple of 4 (16-byte loads: at 27 of 32 columns
    the loads went scalar, 40 -> 64 registers), at most ``BLOCK_C``, widened to hold one such
    unit and further while its programs exceed one wave of the SMs (as :func:`_finalize_tile`'s
    columns: ``resnext50_s3``'s 36 of 64 columns made 2,064 programs, 7.40 us; 108 of 128, 691
    programs, 4.12 us; 3.13 before ``PAD_NAN``, PREDICTED), with the same partials a step."""
    unit = khw * 4 // math.gcd(khw, 4)
    wide = max(block_c, _pow2(unit))
    while wide < 512 and _cdiv(n_gw, wide // unit * unit) > _FIN_ONE_WAVE:
        wide *= 2
    return wide, max(1, block_c * block_s // wide), wide // unit * unit


def _digits(step: int, radices: Sequence[int]) -> Tuple[int, ...]:
    """The digits of ``step`` in a mixed radix, the fastest first, then the rest: how a
    persistent tile loop's step moves each digit of the tile index (see
    :func:`resfast.kernels.triton.bn_relu.tile_digits`)."""
    out = []
    for r in radices:
        out.append(step % r)
        step //= r
    return (*out, step)


def _share(rows: int, step: int, programs: int, total: int) -> int:
    """Expected trips per program of a branch loop of ``rows / step`` trips taken by
    ``programs`` of ``total`` programs (the static model counts every branch of a kernel)."""
    return _cdiv(_cdiv(rows, step) * programs, max(1, total))


def _merged_backward(groups: int, cin_g: int, cout_g: int, kh: int, kw: int, cfg: TileConfig) -> bool:
    """One launch for both conv gradients when a channel block's output channels fit one tile
    and its per-kernel-row weight-gradient accumulators fit the registers."""
    blk = _blocks(groups, cin_g, cout_g, cfg.get("BLOCK_K"), cfg.get("BLOCK_N"), cfg.get("PACK", 16))
    per_thread = kh * _pow2(kw) * blk.block_n * blk.block_k // (32 * cfg.num_warps)
    return blk.nsub == 1 and per_thread <= _MAX_GW_ACC_PER_THREAD


def _strided_split(groups: int, cin_g: int, cout_g: int, stride, kh: int, kw: int) -> bool:
    """Whether a strided backward whose accumulators would fit the merged launch runs the two
    conv gradients in launches of their own anyway: more than one tap, and a block of one group
    of 16 to 31 input and output channels (ResNeXt-50's stage-3 stride-2 block). The merged
    launch's 229 registers hold 2 four-warp programs per SM; split, the input gradient holds 2
    eight-warp programs and the weight gradient 5 four-warp ones (PREDICTED, triton 3.8:
    196.2 -> 164.8 us with the finalize; packed 8-channel groups, stage 2, stay merged: their
    split input gradient is slower). Where :func:`_packed_input_s2` holds (both stages' blocks)
    the input-gradient launch is that kernel instead."""
    blk = _blocks(groups, cin_g, cout_g, 16, 16)
    return (max(stride) > 1 and kh * kw > 1 and blk.gp == 1 and 16 <= cin_g < 32 and 16 <= cout_g < 32)


def _packed_input(groups: int, cin_g: int, cout_g: int, stride, kh: int = 3, kw: int = 3) -> bool:
    """Whether the input gradient runs ``bn_relu_conv_bwd_input_packed_kernel`` (and the weight
    gradient a launch of its own): stride 1, more than one tap, and a group block (packed small
    groups, or one group) of at most 16 input and 16 output channels, one [16, 16] MMA tile per
    tap. Where the static model predicts it faster than the merged launch: ResNeXt-50's stages
    1-3 and depthwise 3x3 (docs/notes/triton_kernels.md); a 1x1 kernel keeps the merged launch
    (one tap: nothing stacked to save)."""
    blk = _blocks(groups, cin_g, cout_g, 16, 16)
    return (max(stride) == 1 and kh * kw > 1 and blk.kr <= blk.block_k == 16
            and blk.nr <= blk.block_n == 16)


def _packed_input_s2(groups: int, cin_g: int, cout_g: int, stride, dilation, kh: int = 3, kw: int = 3) -> bool:
    """Whether the input gradient runs ``bn_relu_conv_bwd_input_packed_s2_kernel`` (and the
    weight gradient a launch of its own): strides of 1 or 2 (not both 1) with an odd dilation
    along a stride of 2 (:func:`_class_strides`), more than one tap, and a group block of at most
    16 input and 16 output channels (ResNeXt-50's stride-2 blocks of stages 2-3)."""
    blk = _blocks(groups, cin_g, cout_g, 16, 16)
    return (_class_strides(stride, dilation) != (0, 0) and kh * kw > 1 and blk.kr <= blk.block_k == 16
            and blk.nr <= blk.block_n == 16)


def _s1_input(groups: int, cin_g: int, cout_g: int, stride, kh: int = 3, kw: int = 3) -> bool:
    """Whether the input-gradient launch lists ``bn_relu_conv_bwd_input_s1_kernel``'s configs
    beside those of the kernel it would run otherwise: stride 1, more than one tap,
    one group per block (no packing: :func:`_packed_input` takes those) whose output channels
    fit one ``BLOCK_N`` chunk of its configs (DenseNet-121's 128 -> 32 3x3 convs, ResNeXt-50's
    32-channel groups; WRN-28-10's 160-640 would need 5-20 chunks of resident weights, and
    spill). Under the interpreter too (its narrower config then runs two chunks: ``NSUB``)."""
    blk = _blocks(groups, cin_g, cout_g, 16, min(cfg.get("BLOCK_N") for cfg in _BWD_INPUT_S1_CONFIGS))
    return max(stride) == 1 and kh * kw > 1 and blk.gp == 1 and blk.nsub == 1


def _wide_group(groups: int, cin_g: int, cout_g: int) -> bool:
    """A block is one group (no packing) whose output channels exceed the narrowest
    ``BLOCK_N`` of :data:`_BWD_INPUT_CONFIGS` (under the interpreter, of its config), so that
    the stacked kernel would loop over output-channel chunks (WRN-28-10)."""
    cfgs = [_BWD_INTERP] if _interpret() else _BWD_INPUT_CONFIGS
    cap_n = min(cfg.get("BLOCK_N") for cfg in cfgs)
    blk = _blocks(groups, cin_g, cout_g, 16, cap_n)
    return blk.gp == 1 and blk.nr > blk.block_n


def _tma_ok(grad_out: Tensor, weight: Tensor, groups: int, blk: "_Blocks", co: int) -> bool:
    """Whether :func:`bn_relu_conv_bwd_input_kernel` may take its operands by TMA tensor
    descriptors (``TMA``): ``grad_out`` and the weights with their channels innermost
    (channels_last), 16-byte aligned bases and strides, no zero stride (an expanded view: a
    descriptor's strides with 0 are untested on a GPU), 2- or 4-byte elements, and every
    output-channel chunk inside its group (one group, whose tail the copy engine zero-fills,
    or chunks that divide the group: a box reaching into the next group would read its
    channels, not zeros)."""
    elt = grad_out.element_size()
    if elt not in (2, 4) or weight.element_size() != elt:
        return False
    if grad_out.stride(1) != 1 or weight.stride(1) != 1:
        return False
    strides = [grad_out.stride(0), grad_out.stride(2), grad_out.stride(3), weight.stride(0), weight.stride(2),
               weight.stride(3)]
    if any((s_ * elt) % 16 for s_ in strides):
        return False
    sizes = [grad_out.shape[0], grad_out.shape[2], grad_out.shape[3], weight.shape[0], weight.shape[2],
             weight.shape[3]]
    if any(s_ <= 0 and n > 1 for s_, n in zip(strides, sizes)):
        return False  # a broadcast (expanded) operand: not known to be valid for the copy engine
    if grad_out.data_ptr() % 16 or weight.data_ptr() % 16:
        return False
    return groups == 1 or blk.nr % blk.block_n == 0


def _a_tiles(configs: Sequence[TileConfig], ho: int, wo: int) -> List[TileConfig]:
    """The configs of ``bn_relu_conv_bwd_weight_tma_kernel`` whose (fitted) tiles divide the
    ``ho x wo`` output: a tile overhanging it would multiply zero-filled ``grad_out`` rows by
    activations that no output position reads (``0 * inf`` where eager has no product)."""
    kept = []
    for cfg in configs:
        th, tw = _fit_tile(cfg.get("TILE_H"), cfg.get("TILE_W"), ho, wo)
        if ho % th == 0 and wo % tw == 0:
            kept.append(cfg)
    return kept


def _cl_strides(t: Tensor) -> Tuple[int, ...]:
    """The strides of a dense channels-last ``[N, C, H, W]`` tensor of ``t``'s shape."""
    n, c, h, w = t.shape
    return (h * w * c, 1, w * c, c)


def _tma_device(x: Tensor) -> bool:
    """Whether launches on ``x``'s device may use TMA tensor descriptors: Hopper or newer, the
    interpreter, or the static model's meta tensors (compiled for sm_90)."""
    if _interpret() or x.device.type == "meta":
        return True
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


def _weight_from_a(grad_out: Tensor, x: Tensor, stride) -> bool:
    """Whether the weight gradient of a wide group may run from the stored activations by TMA
    descriptors (``bn_relu_conv_bwd_weight_tma_kernel``): a TMA device; ``grad_out`` with its
    channels innermost, 16-byte aligned base and strides, no zero stride, 2- or 4-byte
    elements; channels whose row is a multiple of 16 bytes (the stored ``a`` is channels-last,
    seen as ``[N, H / SH, SH, W / SW, SW * C]``) and sizes the stride divides."""
    elt = grad_out.element_size()
    n, c, h, w = x.shape
    if not _tma_device(x) or elt not in (2, 4) or x.element_size() != elt or (c * elt) % 16:
        return False
    if h % stride[0] or w % stride[1] or grad_out.stride(1) != 1:
        return False
    strides = [grad_out.stride(0), grad_out.stride(2), grad_out.stride(3)]
    if any(s_ <= 0 or (s_ * elt) % 16 for s_ in strides) or grad_out.data_ptr() % 16:
        return False
    return True


def _wide_input(groups: int, cin_g: int, cout_g: int) -> bool:
    """Whether the split input gradient runs ``bn_relu_conv_bwd_input_kernel``: a wide group
    (:func:`_wide_group`), or one group per block of at least 64 input channels (DenseNet's
    128 -> 32 3x3 convs: predicted 4.70 -> 2.45 us at 14 x 14; at 32-channel groups its MMA
    tiles are too narrow, ResNeXt-50's stage 4: 6.8 -> 9.2 us)."""
    return _wide_group(groups, cin_g, cout_g) or (_blocks(groups, cin_g, cout_g, 16, 16).gp == 1 and cin_g >= 64)


def _wide_weight(groups: int, cin_g: int, cout_g: int, stride) -> bool:
    """Whether the split weight gradient runs ``bn_relu_conv_bwd_weight_kernel`` (over the
    output positions): a wide group (:func:`_wide_group`) with a stride, where the stacked
    kernel's residue classes would leave most of its stacked taps empty. At stride 1 it is
    slower than the kernels over the input positions (it normalises each activation once per
    kernel row, not once per tile; predicted 159 -> 186 us on WRN-28-10's first stage), which
    normalise once: the stacked kernel and the split-stack one, both in that launch."""
    return _wide_group(groups, cin_g, cout_g) and max(stride) > 1


def _kw_stacks(kw: int) -> Optional[Tuple[int, int]]:
    """A kernel row's ``kw`` taps as two power-of-two stacks ``(a, b)``, ``a + b == kw``
    (3 -> (2, 1), 1 -> (1, 0)), or ``None`` when there are none (7)."""
    a = 1 << (kw.bit_length() - 1)
    b = kw - a
    return (a, b) if b & (b - 1) == 0 else None


def _class_strides(stride: Sequence[int], dilation: Sequence[int]) -> Tuple[int, int]:
    """``(SH, SW)`` of ``bn_relu_conv_bwd_kernel``'s residue-class path (stride, class and tap
    set compile-time): the strides when both are 2 or 1 (not both 1) and the dilation is odd
    along a stride of 2, so each residue class is reached by one compile-time set of taps;
    ``(0, 0)`` (the generic path, runtime stride) otherwise."""
    ok = all(s in (1, 2) and (s == 1 or d % 2 == 1) for s, d in zip(stride, dilation))
    return (int(stride[0]), int(stride[1])) if ok and max(stride) == 2 else (0, 0)


def _class_taps(k: int, stride: int, pad: int, dil: int) -> int:
    """Taps of a ``k``-wide kernel that reach the input positions, summed over their ``stride``
    residue classes ``p``: ``sum_p #{t : (p + pad - t * dil) % stride == 0}`` (``k`` for stride 1)."""
    return sum(1 for p in range(stride) for t in range(k) if (p + pad - t * dil) % stride == 0)


# ----------------------------------------------------------------------------- planners: BN input gradient


def _plan_bn_backward_elemt(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count):
    _check_x("x", x)
    gx = torch.empty_like(x, memory_format=out_memory_format(x))
    return gx, _elemt_launches(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count, False, gx)


def _plan_bn_backward_elemt_out(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count, accumulate, out):
    _check_x("x", x)
    _check_like("out", out, x, list(x.shape))
    # each out element comes from the same element of grad_z and x: out may be one of them (in
    # place), but no shifted view of them, and no per-channel vector (the plan cache's signature
    # decides all of it: replays skip this, as they skip the checks above)
    for name, t in (("grad_z", grad_z), ("x", x)):
        if isinstance(t, Tensor) and overlaps(out, t) and not (
                t.data_ptr() == out.data_ptr() and t.shape == out.shape and t.stride() == out.stride()
                and t.dtype == out.dtype):
            raise RuntimeError(f"resfast_triton.bn_backward_elemt_out: out overlaps {name} without being it: the op "
                               f"would overwrite elements of {name} it has not read yet; pass out = {name} itself (in "
                               "place) or an out that does not overlap it")
    refuse_overlap(out, (("bn_weight", bn_weight), ("mean", mean), ("invstd", invstd), ("sum_dz", sum_dz),
                         ("sum_dz_xhat", sum_dz_xhat)), "resfast_triton.bn_backward_elemt_out")
    return None, _elemt_launches(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count, accumulate, out)


def _elemt_launches(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count, accumulate, out):
    _check_like("grad_z", grad_z, x, list(x.shape))
    c = x.shape[1]
    for name, t in (("bn_weight", bn_weight), ("mean", mean), ("invstd", invstd), ("sum_dz", sum_dz),
                    ("sum_dz_xhat", sum_dz_xhat)):
        _check_vector(name, t, c, x)
    n, _, h, w = x.shape
    p = n * h * w
    if p == 0:
        return []
    if _interpret():
        block_p, block_c = 32, 16
    elif x.stride(1) == 1:
        block_c = min(64, _pow2(c))
        block_p = max(16, 2048 // block_c)
    else:
        block_p, block_c = 256, min(8, _pow2(c))
    mean, invstd, gamma, _ = _bn_vectors(mean, invstd, bn_weight, None)
    sdz, sdzx = (t.to(torch.float32).contiguous() for t in (sum_dz, sum_dz_xhat))
    elt = x.element_size()
    fixed = _cfg(4, 1)

    def bind(cfg: TileConfig) -> Bound:
        return Bound((_cdiv(p, block_p), _cdiv(c, block_c)),
                     (grad_z, x, out, _or(gamma, mean), mean, invstd, sdz, sdzx, float(inv_count), c, h * w, w, p,
                      *grad_z.stride(), *x.stride(), *out.stride()),
                     dict(HAS_GAMMA=gamma is not None, ACCUMULATE=bool(accumulate), BLOCK_P=block_p, BLOCK_C=block_c,
                          num_warps=cfg.num_warps))

    return [KernelLaunch("bn_backward_elemt", bn_elemt.bn_backward_elemt_kernel, [fixed], fixed, bind,
                         hbm_bytes=x.numel() * elt * (4 if accumulate else 3))]


_PLANNERS: Dict[str, Callable[..., Tuple[Any, List[KernelLaunch]]]] = {
    "bn_stats": _plan_bn_stats,
    "bn_stats_update": _plan_bn_stats_update,
    "bn_relu_conv2d": _plan_bn_relu_conv2d,
    "bn_relu_conv2d_out": _plan_bn_relu_conv2d_out,
    "bn_relu_conv2d_backward": _plan_bn_relu_conv2d_backward,
    "bn_backward_elemt": _plan_bn_backward_elemt,
    "bn_backward_elemt_out": _plan_bn_backward_elemt_out,
}
assert set(_PLANNERS) == set(OP_NAMES)
def _plan_bn_relu_conv2d_backward_full(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding,
                                      dilation, groups, bias_grad, grad_x_out, accumulate, weight_grad):
    (grad_z, gw, gb, sum_dz, sum_dz_xhat), launches = _plan_bn_relu_conv2d_backward(
        grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, bias_grad)
    inv_count = 1.0 / (x.numel() // x.shape[1])  # x's own batch statistics: N * H * W positions
    if grad_x_out is None:
        gx, more = _plan_bn_backward_elemt(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count)
    else:
        _, more = _plan_bn_backward_elemt_out(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count,
                                              accumulate, grad_x_out)
        gx = x.new_empty([0])
    return (gx, gw, gb, sum_dz_xhat, sum_dz), [*launches, *more]


def _plan_bn_relu_conv2d_backward_pair(grad_out, x2, w2, g2, b2, mean2, invstd2, stride2, padding2, dilation2,
                                      groups2, x1, w1, g1, b1, mean1, invstd1, stride1, padding1, dilation1, groups1,
                                      grad_x_out, accumulate):
    if x2.shape[0] != x1.shape[0] or x2.shape[1] != w1.shape[0]:
        raise ValueError(f"resfast_triton.bn_relu_conv2d_backward_pair: x2 {tuple(x2.shape)} is not the output of the "
                         f"first conv (x1 {tuple(x1.shape)}, w1 {tuple(w1.shape)})")
    (gx2, gw2, _, sdzx2, sdz2), second = _plan_bn_relu_conv2d_backward_full(
        grad_out, x2, w2, g2, b2, mean2, invstd2, stride2, padding2, dilation2, groups2, False, None, False, True)
    (_, gw1, _, sdzx1, sdz1), first = _plan_bn_relu_conv2d_backward_full(
        gx2, x1, w1, g1, b1, mean1, invstd1, stride1, padding1, dilation1, groups1, False, grad_x_out, accumulate,
        True)
    return (gw2, sdzx2, sdz2, gw1, sdzx1, sdz1), [*second, *first]


_OPTIONAL_PLANNERS: Dict[str, Callable[..., Tuple[Any, List[KernelLaunch]]]] = {
    "bn_relu_conv2d_stats": _plan_bn_relu_conv2d_stats,
    "bn_stats_merge_update": _plan_bn_stats_merge_update,
    "bn_relu_conv2d_train": _plan_bn_relu_conv2d_train,
    "bn_relu_conv2d_out_stats": _plan_bn_relu_conv2d_out_stats,
    "bn_stats_merge_out": _plan_bn_stats_merge_out,
    "bn_relu_conv2d_merge_out": _plan_bn_relu_conv2d_merge_out,
    "bn_relu_conv2d_backward_full": _plan_bn_relu_conv2d_backward_full,
    "bn_relu_conv2d_backward_pair": _plan_bn_relu_conv2d_backward_pair,
}
assert set(_OPTIONAL_PLANNERS) == set(TRITON_OPTIONAL)


# ----------------------------------------------------------------------------- autotuning


class Tuner:
    """Chooses a launch's tile config once per (kernel, bucketed key, GPU, triton version)
    by timing each candidate, and remembers the choice in memory and in a JSON file shared
    across processes. Inside a CUDA-graph capture it never times: it uses the remembered
    choice or the first config."""

    def __init__(self, path: Optional[str] = None):
        self._path = path
        self._choices: Optional[Dict[str, int]] = None
        self._lock = threading.Lock()
        # (name, key, configs, device) -> chosen index: the lookup of every launch after the
        # first of its key, without building the JSON key (tens of microseconds of host time)
        self._memo: Dict[Tuple[Any, ...], int] = {}

    @property
    def path(self) -> str:
        """The cache file, in the project's cache folder (as ``backend="auto"``'s):
        ``$RESFAST_CACHE_DIR/triton-tune.json``, else ``$XDG_CACHE_HOME/resfast/...``, else
        ``~/.cache/resfast/...``."""
        if self._path:
            return self._path
        folder = os.environ.get("RESFAST_CACHE_DIR", "").strip()
        if not folder:
            base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
            folder = os.path.join(base, "resfast")
        return os.path.join(folder, "triton-tune.json")

    def key(self, launch: KernelLaunch) -> str:
        import triton

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        return json.dumps([launch.name, list(map(str, launch.key)), device, triton.__version__,
                           [c.label for c in launch.configs]])

    def choose(self, launch: KernelLaunch) -> TileConfig:
        """The config to launch ``launch`` with (timing the candidates on a first call;
        ``RESFAST_TRITON_AUTOTUNE=0``: always the first, the planner's static choice)."""
        if len(launch.configs) == 1 or os.environ.get("RESFAST_TRITON_AUTOTUNE", "1") == "0":
            return launch.configs[0]
        configs = tuple(launch.configs)
        memo_key = (launch.name, launch.key, configs, torch.cuda.current_device() if torch.cuda.is_available() else -1)
        index = self._memo.get(memo_key)
        if index is not None:
            return configs[index]
        key = self.key(launch)
        choices = self._load()
        if key in choices and 0 <= choices[key] < len(configs):
            self._memo[memo_key] = choices[key]
            return configs[choices[key]]
        if torch.cuda.is_current_stream_capturing():
            return configs[0]
        best = self._time(launch)
        with self._lock:
            choices[key] = best
            self._save(choices)
        self._memo[memo_key] = best
        return configs[best]

    def _time(self, launch: KernelLaunch) -> int:
        times = []
        for cfg in launch.configs:
            try:
                launch.run(cfg)  # compile and warm up
            except Exception:  # a config that does not compile or fit: never chosen
                times.append(float("inf"))
                continue
            if _RECORDING.recorder is not None:
                _RECORDING.recorder.ok = False  # a timing run is no plan to replay
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                launch.run(cfg)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return min(range(len(times)), key=times.__getitem__)

    def _load(self) -> Dict[str, int]:
        if self._choices is None:
            self._choices = {}
            try:
                with open(self.path) as f:
                    self._choices.update(json.load(f))
            except (OSError, ValueError):
                pass
        return self._choices

    def _save(self, choices: Dict[str, int]) -> None:
        path = self.path
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            merged = {}
            with contextlib.suppress(OSError, ValueError), open(path) as f:
                merged.update(json.load(f))  # other processes' choices
            merged.update(choices)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the choices stay in memory


TUNER = Tuner()


# ----------------------------------------------------------------------------- helpers


def _conv_key(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, ho: int, wo: int) -> Tuple:
    """The bucketed autotune key: the code-shaping values exactly (dtype, layout, kernel,
    stride, group widths up to 16), the sizes in power-of-two buckets (channels, positions,
    output height and width), so that DenseNet's many layer widths share a few keys."""
    n, c, h, w = x.shape
    co, cin_g, kh, kw = weight.shape
    width = lambda v: v if v <= 16 else _pow2(v)  # noqa: E731
    return (str(x.dtype).replace("torch.", ""), x.stride(1) == 1, kh, kw, *stride, *padding, *dilation,
            width(cin_g), width(co // groups), _pow2(c), _pow2(co), _pow2(n * ho * wo), _pow2(ho), _pow2(wo))


#: Width of the one-image view of a flattened 1x1 conv (:func:`_flat_positions`).
_FLAT_W = 8


def _flat_positions(kh: int, kw: int, stride, padding, *ts: Tensor) -> Optional[List[Tensor]]:
    """For a 1x1 conv with stride 1 and no padding (each output position reads its own input
    position) whose ``[N, C, H, W]`` tensors ``ts`` all keep their positions evenly strided
    (position ``(n, h, w)`` at ``((n * H + h) * W + w) * stride_w``: channels_last and its
    channel prefixes), the same tensors as one image ``[1, C, N * H * W / 8, 8]`` (views of
    the same memory), so that tiles run across image borders and no tile position is empty
    (14 x 14 images: 196 of four 8 x 8 tiles' 256 positions used); else ``None``. Not for
    images that fit one 8 x 8 tile (each image is one tile then, its positions' offsets fixed
    for every tile, which the compiler hoists out of the tile loop)."""
    if kh != 1 or kw != 1 or list(stride) != [1, 1] or list(padding) != [0, 0]:
        return None
    n, _, h, w = ts[0].shape
    p = n * h * w
    if p % _FLAT_W or n * h == 1 or (h <= 8 and w <= 8):
        return None  # (an image within one 8 x 8 tile: the tile's positions are the same for every image)
    views = []
    for t in ts:
        sn, sc, sh, sw = t.stride()
        if tuple(t.shape[::2]) != (n, h) or t.shape[3] != w or (h > 1 and sh != w * sw) or \
                (n > 1 and sn != h * w * sw):
            return None
        if (p - 1) * sw + (t.shape[1] - 1) * sc >= 2 ** 31:  # the kernels' int32 offsets inside one image
            return None
        views.append(t.as_strided([1, t.shape[1], p // _FLAT_W, _FLAT_W], [p * sw, sc, _FLAT_W * sw, sw]))
    return views


def _used(th: int, tw: int, hh: int, ww: int) -> float:
    """The share of a ``th x tw`` tiling's positions that fall inside an ``hh x ww`` grid."""
    return (hh * ww) / (_cdiv(hh, th) * th * _cdiv(ww, tw) * tw)


@functools.lru_cache(maxsize=4096)
def _fit_tile(th: int, tw: int, hh: int, ww: int) -> Tuple[int, int]:
    """The ``(TILE_H, TILE_W)`` with the same positions per tile as ``th x tw`` that leaves the
    fewest positions of an ``hh x ww`` grid empty (28 x 28: 4 x 32 tiles fill 87.5%, 8 x 16 tiles
    77%); ``th x tw`` itself when it is as good, else the widest such tile. For kernels
    without a halo (the backward), where a tile's cost is its positions whatever its shape."""
    best = _used(th, tw, hh, ww)
    cands = [(th * tw // w, w) for w in (8, 16, 32, 64) if th * tw % w == 0 and th * tw // w >= 2]
    better = [(h, w) for h, w in cands if _used(h, w, hh, ww) > best + 1e-9]
    if not better:
        return th, tw
    top = max(_used(h, w, hh, ww) for h, w in better)
    return max((hw for hw in better if _used(*hw, hh, ww) >= top - 1e-9), key=lambda hw: hw[1])


def _prune_tiles(configs: Sequence[TileConfig], hh: int, ww: int, fit: bool = False) -> List[TileConfig]:
    """Drop tile shapes that leave more than half of their positions empty on an ``hh x ww``
    output (at least one config stays); ``fit``: the shapes :func:`_fit_tile` gives them.
    A new list each call (callers reorder it); the work is memoised."""
    return list(_prune_tiles_memo(tuple(configs), hh, ww, fit))


@functools.lru_cache(maxsize=4096)
def _prune_tiles_memo(configs: Tuple[TileConfig, ...], hh: int, ww: int, fit: bool) -> Tuple[TileConfig, ...]:
    def used(cfg: TileConfig) -> float:
        th, tw = cfg.get("TILE_H"), cfg.get("TILE_W")
        if fit:
            th, tw = _fit_tile(th, tw, hh, ww)
        return _used(th, tw, hh, ww)

    kept = tuple(c for c in configs if used(c) >= 0.5)
    return kept or (max(configs, key=used),)


def _balanced_splits(num_tiles: int, ncb: int, x: Tensor, cfg: TileConfig, cap: Optional[int] = None,
                     partials: bool = False, fill: bool = False) -> int:
    """Programs per channel block of a persistent launch (``ncb`` channel blocks, each with
    ``num_tiles`` tiles), at most ``programs_per_sm`` resident programs per SM and ``cap``:
    the count that makes the busiest SM's tiles fewest, i.e. minimises ``ceil(ncb * s / SMs)
    * ceil(num_tiles / s)``; ties go to more programs (more warps to hide latency).
    ``fill`` (kernels whose ``programs_per_sm`` programs do fit an SM's registers: packed small
    groups): the count the static model predicts fastest instead, :func:`_split_cost`, which
    also weighs one warp's own dependent path and so fills the resident slots.
    With ``partials`` (each program writes a float32 partial of the weight gradient, which the
    finalize reads back) ties go to the fewest programs that still put 8 warps on the busiest
    SM, so the partials' traffic shrinks while the predicted time stays the same."""
    cap = max(1, min(num_tiles, cap if cap is not None else num_tiles))
    if _interpret() or x.device.type == "cpu":
        return min(cap, 3)  # several programs, each walking several tiles: the persistent loop is exercised
    return _balanced_splits_memo(num_tiles, ncb, _num_sms(x), cfg.programs_per_sm, cfg.num_warps, cap, partials,
                                 fill and PLANNER_FILL)


#: ``False``: the planner as it was before 2026-11-30 (no ``fill``, 4 statistics programs per
#: SM, not 5), the grids that a GPU profile of that code ran (``benchmarks/static_calibrate.py``
#: binds them to refit the model).
PLANNER_FILL = True


#: Cycles per instruction on one warp's own path: the static model's fitted ``DEP_CPI``
#: (``resfast/profiling/sm90.py``; the planner's copy, as ``ops`` does not import ``profiling``).
DEP_CPI = 10.7


def _split_cost(num_tiles: int, ncb: int, sms: int, programs_per_sm: int, num_warps: int, s: int,
                fill: bool = True) -> float:
    """The time of a persistent launch with ``s`` programs per channel block, in units of one
    tile's instructions on one warp. Without ``fill``: the busiest SM's tiles. With it, the
    static model's: the busiest SM's issue time (its warps share 4 schedulers,
    :func:`resfast.profiling.static_model.predict`) or one warp's dependent path (``DEP_CPI``
    cycles per instruction, :func:`resfast.profiling.static_model.latency_bound_us`) with
    ``programs_per_sm`` programs resident at a time, whichever is longer. The H200 profile
    showed the conv kernels bound by the second: fewer tiles per program beat a slightly
    busier SM (ResNeXt-50 stage 1's forward: 4 programs of 28 tiles per SM, not 2 of 55)."""
    per_sm = _cdiv(ncb * s, sms)
    tiles = _cdiv(num_tiles, s)
    if not fill:
        return per_sm * tiles
    issue = _cdiv(per_sm * num_warps, 4) * tiles
    path = DEP_CPI * _cdiv(per_sm, max(1, programs_per_sm)) * tiles
    return max(issue, path)


@functools.lru_cache(maxsize=8192)
def _balanced_splits_memo(num_tiles: int, ncb: int, sms: int, programs_per_sm: int, num_warps: int, cap: int,
                          partials: bool, fill: bool = False) -> int:
    limit = max(1, min(cap, _cdiv(sms * programs_per_sm, ncb)))
    best, best_cost, costs = 1, None, {}
    for s in range(1, limit + 1):
        cost = costs[s] = _split_cost(num_tiles, ncb, sms, programs_per_sm, num_warps, s, fill)
        if best_cost is None or cost <= best_cost:
            best, best_cost = s, cost
    if partials:
        # programs on the busiest SM: two warpgroups (8 warps), as the registers of these
        # kernels allow anyway
        enough = min(_cdiv(ncb * best, sms), max(1, 8 // num_warps))
        best = min(s for s, cost in costs.items() if cost == best_cost and _cdiv(ncb * s, sms) >= enough)
    return best


def _persistent_programs(x: Tensor, cfg: TileConfig) -> int:
    if _interpret() or x.device.type == "cpu":
        return 3  # several programs, each walking several work items: the persistent loop is exercised
    return _num_sms(x) * cfg.programs_per_sm


def _num_sms(x: Tensor) -> int:
    if x.is_cuda:
        return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return MODEL_SMS


def _target_programs(x: Tensor) -> int:
    """Programs of the statistics pass: as many as an SM holds at once (95-96 registers x 4
    warps: 5 per SM), each walking its chunk of positions. The static model's dependent path
    (a warp's own chain of loads and sums per tile) falls with fewer tiles per program:
    resnext50_s1 20.8 -> 17.9 us, densenet121_1x1 38.4 -> 32.5 us from 4 to 5 per SM
    (predicted); 10 per SM would run in two waves (21.0 and 35.7 us)."""
    if _interpret() or x.device.type == "cpu":
        return 8
    return (5 if PLANNER_FILL else 4) * _num_sms(x)


def _x_read_bytes(x: Tensor, kh: int, kw: int, stride, dilation, ho: int, wo: int) -> int:
    """Bytes of ``x`` a conv must read: all of it unless the stride skips rows / columns."""
    n, c, h, w = x.shape
    rows = h if (kh - 1) * dilation[0] + 1 >= stride[0] else min(h, ho * kh)
    cols = w if (kw - 1) * dilation[1] + 1 >= stride[1] else min(w, wo * kw)
    return n * c * rows * cols * x.element_size()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _interpret() -> bool:
    return backend_table.triton_interpret()  # looked up at each call (tests patch it)


def _dot_f32(x: Tensor) -> bool:
    # The interpreter's tl.dot on two bfloat16 operands is wrong: multiply in float32.
    return _interpret() and x.dtype == torch.bfloat16


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
    if fmt == torch.channels_last and shape[1] > 1 and shape[2] * shape[3] > 1:
        # new_empty(shape) is then not channels_last-contiguous, and .contiguous(fmt) allocates
        # exactly this: one allocation instead of two (the first, output-sized, thrown away)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
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
    if x.device.type in ("cuda", "meta"):  # meta: launch plans for the static model
        _check_span(name, x)
        return
    if x.device.type == "cpu":
        if not _interpret():
            raise ValueError(f"resfast_triton: {name} is a CPU tensor; Triton kernels need CUDA tensors, or "
                             "TRITON_INTERPRET=1 (set before importing triton) to interpret them on the CPU")
        _check_span(name, x)
        return
    raise ValueError(f"resfast_triton: {name} is on {x.device}; Triton kernels need CUDA tensors")


def _check_span(name: str, t: Tensor) -> None:
    """Kernels address one image with int32 offsets (and a 64-bit base per image), and number
    the batch's positions ``(n, h, w)`` with int32 (the statistics pass's chunks
    ``split * CHUNK``, the BN input gradient's ``program_id * BLOCK_P``): past 2**31 positions
    those wrapped and read other positions (e.g. batch 65536 of 1 x 224 x 224 images)."""
    span = sum((size - 1) * abs(st) for size, st in zip(t.shape[1:], t.stride()[1:]) if size > 0)
    if span >= 2 ** 31:
        raise ValueError(f"resfast_triton: one image of {name} spans {span + 1} elements (shape {tuple(t.shape)}, "
                         f"strides {t.stride()}); the triton kernels need under 2**31 per image (use backend='eager')")
    if t.dim() == 4 and t.shape[0] * t.shape[2] * t.shape[3] >= 2 ** 31:
        raise ValueError(f"resfast_triton: {name} has {t.shape[0] * t.shape[2] * t.shape[3]} positions N*H*W "
                         f"(shape {tuple(t.shape)}); the triton kernels need under 2**31 (split the batch, or use "
                         "backend='native' or 'eager')")


def _check_like(name: str, t, x: Tensor, shape: Sequence[int]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"resfast_triton: {name} must be a torch.Tensor, got {type(t).__name__}")
    if list(t.shape) != list(shape):
        raise ValueError(f"resfast_triton: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"resfast_triton: {name} dtype {t.dtype} does not match x dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"resfast_triton: {name} is on {t.device} but x is on {x.device}")
    _check_span(name, t)


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


def _check_running(op: str, running_mean, running_var, c: int, like: Tensor) -> None:
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(name, t, c, like)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"resfast_triton.{op}: running_mean and running_var must both be given or both be None")


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


# ----------------------------------------------------------------------------- plan cache

# The host code of an op (checks, launch planning, tile-config lookup, argument binding) is a
# pure function of its arguments' shapes, strides, dtypes, devices, storage offsets, pointer
# alignments (16 bytes, which triton specialises on) and which of them share memory, of its
# scalar arguments, and of the interpreter / autotune switches; only the tensors' addresses
# change from call to call. Measured on a GPU (benchmarks/README.md,
# 2026-11-29) that host code took longer than the kernels it launched. So the second call with
# a signature records what the op does, with a TorchDispatchMode that logs every ATen op it runs
# (allocations, views, copies) and a hook that logs each kernel launch and each version bump;
# later calls with the signature replay the log with their own tensors: the same ATen ops on the
# new inputs, the same kernels with the same integers and constexprs. Anything the log cannot
# describe (a tensor that is neither an input nor made by a logged op, a value read from a
# tensor, an autotuning run, a CUDA-graph capture) leaves the signature uncached: it then always
# runs the full host code. RESFAST_TRITON_PLAN_CACHE=0 turns the cache off. A replayed launch
# goes straight to the compiled kernel's launcher (``kernel.run``, with the arguments triton's
# binder gave it on the recorded call, checked equal then), skipping triton's Python launch
# path (about 78 us of a ResNeXt stage-1 step's host time on the development machine,
# ``benchmarks/host_overhead.py --with-launch``); RESFAST_TRITON_DIRECT_LAUNCH=0 keeps that path.

class _RecordingState(threading.local):
    """The recorder of the op being recorded on this thread (``None``: none). A class attribute,
    so threads other than the importing one (autograd's device threads run the backward) see
    ``None`` too."""

    recorder: Optional["_Recorder"] = None


_RECORDING = _RecordingState()
_PLAN_CACHE_MAX = 4096
_PLAN_CACHE: Dict[Tuple[Any, ...], "_Replay"] = {}
_PLAN_SEEN: Dict[Tuple[Any, ...], bool] = {}  # signature -> False once it proved uncacheable
# per op: replays, records, uncacheable, and "full" (calls that ran the whole host code)
_PLAN_STATS_BY_OP: Dict[str, Dict[str, int]] = {}
# ATen ops whose result depends on tensor values the log does not carry: never cached.
_DATA_OPS = ("_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero", "allclose")


def clear_plan_cache() -> None:
    """Forget every recorded plan (tests that patch the planners call it)."""
    _PLAN_CACHE.clear()
    _PLAN_SEEN.clear()


def plan_cache_stats(by_op: bool = False) -> Dict[str, Any]:
    """Counts since import: ``replays`` (calls served from the cache), ``records``, ``uncacheable``.
    ``by_op``: per op name instead, each with ``full`` too (calls that ran the whole host code:
    first calls, uncacheable signatures, calls inside a CUDA-graph capture)."""
    if by_op:
        return {name: dict(counts) for name, counts in _PLAN_STATS_BY_OP.items()}
    total = {k: sum(c[k] for c in _PLAN_STATS_BY_OP.values()) for k in ("replays", "records", "uncacheable")}
    return dict(total, entries=len(_PLAN_CACHE))


def _count(op: str, what: str) -> None:
    counts = _PLAN_STATS_BY_OP.get(op)
    if counts is None:
        counts = _PLAN_STATS_BY_OP[op] = {"replays": 0, "records": 0, "uncacheable": 0, "full": 0}
    counts[what] += 1


def _plan_cache_on() -> bool:
    return os.environ.get("RESFAST_TRITON_PLAN_CACHE", "1") != "0"


def _signature(name: str, args: Sequence[Any]) -> Optional[Tuple[Any, ...]]:
    items: List[Any] = [name, _interpret(), os.environ.get("RESFAST_TRITON_AUTOTUNE", "1")]
    storages: Dict[int, int] = {}
    for a in args:
        if isinstance(a, Tensor):
            if type(a) is not Tensor and type(a) is not torch.nn.Parameter:
                return None  # a tensor subclass: its own dispatch may differ call to call
            ptr = a.data_ptr()
            base = ptr - a.storage_offset() * a.element_size()  # the storage's address
            group = storages.setdefault(base, len(storages))
            # (the pointer's 16-byte alignment: triton specialises its kernels on it)
            items.append((a.shape, a.stride(), a.dtype, a.device, a.storage_offset(), group, ptr % 16 == 0))
        elif isinstance(a, (list, tuple)):
            items.append(tuple(a))
        elif a is None or isinstance(a, (bool, int, float, str)):
            items.append(a)
        else:
            return None
    return tuple(items)


class _Ref:
    """Where a tensor of a recorded op comes from: input ``index`` (``event`` -1), or output
    ``index`` of logged event ``event``."""

    __slots__ = ("event", "index")

    def __init__(self, event: int, index: int):
        self.event, self.index = event, index

    def get(self, args: Sequence[Any], vals: List[Any]) -> Any:
        if self.event < 0:
            return args[self.index]
        v = vals[self.event]
        return v[self.index] if isinstance(v, (list, tuple)) else v


class _CountersRef(_Ref):
    """A launch's ticket counters (:func:`_split_counters`): fetched again at each replay, for
    the replay's device and stream, at least ``n`` of them."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        super().__init__(-2, 0)
        self.n = n

    def get(self, args: Sequence[Any], vals: List[Any]) -> Any:
        x = next(a for a in args if isinstance(a, Tensor))
        return _split_counters(x.device, self.n)


def _subst(spec: Any, args: Sequence[Any], vals: List[Any]) -> Any:
    """``spec`` with every :class:`_Ref` replaced by its tensor (containers rebuilt)."""
    if isinstance(spec, _Ref):
        return spec.get(args, vals)
    if isinstance(spec, list):
        return [_subst(v, args, vals) for v in spec]
    if isinstance(spec, tuple):
        return tuple(_subst(v, args, vals) for v in spec)
    if isinstance(spec, dict):
        return {k: _subst(v, args, vals) for k, v in spec.items()}
    return spec


def _has_ref(spec: Any) -> bool:
    if isinstance(spec, _Ref):
        return True
    if isinstance(spec, (list, tuple)):
        return any(_has_ref(v) for v in spec)
    if isinstance(spec, dict):
        return any(_has_ref(v) for v in spec.values())
    return False


class _Call:
    """A logged call's positional arguments: a template with its top-level tensor slots filled
    in at replay (the whole spec substituted when a tensor sits inside a container)."""

    __slots__ = ("template", "slots", "nested")

    def __init__(self, spec: List[Any]):
        self.template = spec
        self.slots = tuple((i, v) for i, v in enumerate(spec) if isinstance(v, _Ref))
        self.nested = any(isinstance(v, (list, tuple, dict)) and _has_ref(v) for v in spec)

    def build(self, args: Sequence[Any], vals: List[Any]) -> List[Any]:
        if self.nested:
            return _subst(self.template, args, vals)
        out = list(self.template)
        for i, r in self.slots:
            out[i] = r.get(args, vals)
        return out


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Logs an op's ATen ops, kernel launches and version bumps in terms of its inputs."""

    def __init__(self, inputs: Sequence[Any]):
        super().__init__()
        self.refs: Dict[int, _Ref] = {id(a): _Ref(-1, i) for i, a in enumerate(inputs) if isinstance(a, Tensor)}
        self.events: List[Tuple[Any, ...]] = []
        self.keep: List[Any] = list(inputs)  # no id() reused while recording
        self.ok = True

    def ref(self, t: Any) -> Any:
        """``t`` with its tensors as :class:`_Ref` (a tensor from outside makes the log unusable)."""
        if isinstance(t, Tensor):
            r = self.refs.get(id(t))
            if r is None:
                if _COUNTER_BUFFERS.get(id(t)) is t:
                    return _CountersRef(t.numel())
                self.ok = False  # neither an input nor made by a logged op, nor ticket counters
            return r
        if isinstance(t, list):
            return [self.ref(v) for v in t]
        if isinstance(t, tuple):
            return tuple(self.ref(v) for v in t)
        if isinstance(t, dict):
            return {k: self.ref(v) for k, v in t.items()}
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in _DATA_OPS:
            self.ok = False
        call = _Call(self.ref(list(args)))
        kw = self.ref(kwargs)
        out = func(*args, **kwargs)
        if func is torch.ops.aten.detach.default and not args[0].requires_grad and args[0].grad_fn is None:
            # (each factory call made under a mode is followed by a detach): the same tensor
            # for every use here, so its input stands for it and the replay skips it
            self.refs.setdefault(id(out), call.template[0])
            self.keep.append(out)
            return out
        index = len(self.events)
        outs = out if isinstance(out, (list, tuple)) else [out]
        for k, o in enumerate(outs):
            if isinstance(o, Tensor) and id(o) not in self.refs:
                self.refs[id(o)] = _Ref(index, k)
        self.keep.append(out)
        self.events.append(("op", getattr(func, "_op", func), call, kw, _has_ref(kw)))  # _op: the C++ entry
        return out

    def launch(self, fn: Any, b: "Bound") -> None:
        if any(not isinstance(a, (Tensor, bool, int, float)) and a is not None for a in b.args):
            self.ok = False  # nothing else is passed to a kernel today
        self.events.append(("launch", fn, tuple(b.grid), _Call([self.ref(a) for a in b.args]), dict(b.constexprs)))

    def direct(self, fn: Any, b: "Bound", kernel: Any) -> None:
        """Make the launch just logged replay straight into ``kernel`` (the compiled kernel
        ``fn[grid]`` returned) when :func:`_direct_arguments` can rebuild its arguments."""
        full = _direct_arguments(fn, b, kernel)
        if full is None or not self.events or self.events[-1][0] != "launch":
            return
        _, fn_, grid, call, constexprs = self.events[-1]
        grid3 = (tuple(grid) + (1, 1))[:3]
        self.events[-1] = ("direct", kernel, grid3, _Call([self.ref(a) for a in full]), fn_, grid, call, constexprs)

    def bump(self, tensors: Sequence[Tensor]) -> None:
        self.events.append(("bump", _Call([self.ref(t) for t in tensors])))


class _Replay:
    """A recorded op: its events and where its result comes from."""

    def __init__(self, events: List[Tuple[Any, ...]], result: Any):
        self.events = events
        self.result = result

    def __call__(self, args: Sequence[Any]) -> Any:
        vals: List[Any] = []
        x = next(a for a in args if isinstance(a, Tensor))
        with _device(x):
            for ev in self.events:
                kind = ev[0]
                if kind == "op":
                    kw = _subst(ev[3], args, vals) if ev[4] else ev[3]
                    vals.append(ev[1](*ev[2].build(args, vals), **kw))
                elif kind == "launch":
                    vals.append(None)
                    ev[1][ev[2]](*ev[3].build(args, vals), **ev[4])
                elif kind == "direct":
                    vals.append(None)
                    _launch_direct(ev, args, vals)
                else:
                    vals.append(None)
                    torch.autograd.graph.increment_version(ev[1].build(args, vals))
        return _subst(self.result, args, vals)


def _direct_launch_on() -> bool:
    return os.environ.get("RESFAST_TRITON_DIRECT_LAUNCH", "1") != "0"


def _same_arg(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    return type(a) is type(b) and a == b


def _direct_arguments(fn: Any, b: "Bound", kernel: Any) -> Optional[List[Any]]:
    """Every argument of the compiled ``kernel`` in its parameter order (``b.args``, then the
    constexprs and defaults), as triton's ``JITFunction.run`` passes them to
    ``kernel.run``; ``None`` when that cannot be shown equal to what triton's own binder
    makes of this call (then the replay launches through ``fn[grid]``). Triton's Python launch
    path (binder, cache key, checks) costs 8-24 us a launch on the development machine
    (``benchmarks/triton_launch_cost.py``); a replay already knows the kernel and its
    specialisation, as the plan signature fixes every integer and pointer alignment."""
    if _interpret() or not _direct_launch_on() or kernel is None:
        return None
    if not all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
        return None
    try:
        from triton import knobs
        from triton.runtime import driver
        from triton.runtime.jit import compute_cache_key

        params = list(fn.params)
        if len(b.args) > len(params):
            return None
        full = list(b.args)
        for p in params[len(b.args):]:
            if p.name in b.constexprs:
                full.append(b.constexprs[p.name])
            elif p.has_default:
                full.append(p.default)
            else:
                return None
        kernel_cache, key_cache, _, _, binder = fn.device_caches[driver.active.get_current_device()]
        kw = dict(b.constexprs)
        kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
        kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound, specialization, options = binder(*b.args, **kw)
        values = list(bound.values())
        if len(values) != len(full) or not all(_same_arg(v, f) for v, f in zip(values, full)):
            return None
        if kernel_cache.get(compute_cache_key(key_cache, specialization, options)) is not kernel:
            return None
        kernel.function  # noqa: B018 (loads the module if the launch did not)
        return full
    except Exception:  # any triton whose internals differ: the ordinary launch path
        return None


def _no_hooks(hook: Any) -> bool:
    """``None``, or an empty chain of hooks (triton 3.4+: ``knobs.runtime.launch_enter_hook``
    is a ``HookChain``, empty unless a profiler added to it)."""
    return hook is None or getattr(hook, "calls", None) == []


def _launch_direct(ev: Tuple[Any, ...], args: Sequence[Any], vals: List[Any]) -> None:
    """Replay a ``direct`` event: ``kernel.run`` with the rebuilt arguments on the current
    stream, as ``JITFunction.run`` calls it, with no launch metadata and no hooks (the
    launcher skips ``None`` hooks); through ``fn[grid]`` when a launch hook is registered (a
    profiler that wants its callbacks and metadata) or ``RESFAST_TRITON_DIRECT_LAUNCH=0``."""
    _, kernel, grid3, call, fn, grid, fallback, constexprs = ev
    from triton import knobs
    from triton.runtime import driver

    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if not (_no_hooks(enter) and _no_hooks(leave)) or not _direct_launch_on():
        fn[grid](*fallback.build(args, vals), **constexprs)
        return
    active = driver.active
    stream = active.get_current_stream(active.get_current_device())
    kernel.run(grid3[0], grid3[1], grid3[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
               *call.build(args, vals))


def _record(fn: Callable[..., Any], args: Sequence[Any]) -> Tuple[Any, Optional[_Replay]]:
    recorder = _Recorder(args)
    _RECORDING.recorder = recorder
    try:
        with recorder:
            result = fn(*args)
    finally:
        _RECORDING.recorder = None
    spec = recorder.ref(result)
    if not recorder.ok:
        return result, None
    return result, _Replay(recorder.events, spec)


def _plan_cached(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (an op's implementation) served from the plan cache after its second call with
    a signature (see above)."""

    name = fn.__name__
    untracked = name in schemas.UNTRACKED_FORWARD_OPS
    qualified = f"resfast_triton::{name}"

    @functools.wraps(fn)
    def impl(*args: Any) -> Any:
        if untracked:
            schemas.refuse_untracked_grad(qualified, args)
        if _RECORDING.recorder is not None or not _plan_cache_on():
            return fn(*args)
        sig = _signature(name, args)
        if sig is None:
            _count(name, "full")
            return fn(*args)
        replay = _PLAN_CACHE.get(sig)
        if replay is not None:
            _count(name, "replays")
            return replay(args)
        seen = _PLAN_SEEN.get(sig)
        if seen is None:  # a first call: plan (and tune) in full, record on the next
            if len(_PLAN_SEEN) >= _PLAN_CACHE_MAX:
                _PLAN_SEEN.clear()
            _PLAN_SEEN[sig] = True
            _count(name, "full")
            return fn(*args)
        if seen is False or (args[0].is_cuda and torch.cuda.is_current_stream_capturing()):
            _count(name, "full")
            return fn(*args)  # uncacheable, or inside a CUDA-graph capture: never recorded there
        result, replay = _record(fn, args)
        if replay is None:
            _PLAN_SEEN[sig] = False
            _count(name, "uncacheable")
        else:
            if len(_PLAN_CACHE) >= _PLAN_CACHE_MAX:
                _PLAN_CACHE.clear()
            _PLAN_CACHE[sig] = replay
            _count(name, "records")
        return result

    return impl


# ----------------------------------------------------------------------------- registration

lib = schemas.define_library("resfast_triton")
for _name in (*OP_NAMES, *TRITON_OPTIONAL):
    lib.impl(_name, _plan_cached(globals()[_name]), "CUDA")
    lib.impl(_name, _plan_cached(globals()[_name]), "CPU")  # runs only under TRITON_INTERPRET=1; _check_x says so otherwise
schemas.register_fakes("resfast_triton")
OPS = torch.ops.resfast_triton
autograd.register_autograd("resfast_triton", OPS)
