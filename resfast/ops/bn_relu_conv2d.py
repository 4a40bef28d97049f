"""``bn_relu_conv2d``: ``conv2d(relu(batch_norm(x)), weight, bias)`` in one op, any ``groups``.

The public entry point validates its arguments (:mod:`resfast.ops.validation`, before
anything is modified), resolves the backend, computes the batch statistics and updates the
running statistics exactly as ``F.batch_norm`` does, then runs the fused op of the chosen
backend, whose autograd (:mod:`resfast.ops.autograd`) recomputes ``relu(bn(x))`` from ``x``
and the saved mean / inverse std instead of storing it.

Which path a call takes:

* ``eager`` without a process group: the unfused PyTorch expression itself;
* ``triton`` / ``native`` without a process group: ``ops.bn_stats_update`` (statistics,
  running-statistics update and inverse std), then the registered op
  ``torch.ops.<lib>.bn_relu_conv2d`` with its registered autograd;
* any backend with a SyncBN process group: per-rank ``ops.bn_stats``, an all-gather and
  Chan's merge, then :class:`resfast.ops.autograd.BNReLUConv2dFunction`, whose backward
  all-reduces the two per-channel gradient sums.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from resfast.backends import resolve_backend
from resfast.ops.autograd import (DOUBLE_BACKWARD_SYNC_BN, FORWARD_AD_SYNC_BN, BNReLUConv2dFunction,
                                  BNReLUConv2dStatsFunction, BNTrainReLUConv2dFunction, clone_on_mutate_suspended,
                                  forward_ad_or_transform)
from resfast.ops.autotune import (PROBE_CHANNELS, Runner, Signature, as_pair, autotune_enabled, conv_out,
                                  pick_backend, probe_batch, probe_extent, scratch, scratch_param, static_choice,
                                  static_dims, strides_class, training_runner)
from resfast.ops.opsets import get_ops
from resfast.ops.reference import acc_dtype, unbiased_var
from resfast.ops.schemas import dense_vector
from resfast.ops.validation import check_bn_relu_conv2d_args

__all__ = ["bn_relu_conv2d", "sync_batch_stats", "update_running_stats", "normalize_with", "autocast_enabled",
           "autocast_inputs", "autocast_param", "autocast_target_dtype"]

IntPair = Union[int, Sequence[int]]


def bn_relu_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    backend: str = "auto",
    out: Optional[Tensor] = None,
    process_group=None,
    input_stats: Optional[Tensor] = None,
    return_stats: bool = False,
):
    """Fused ``F.conv2d(F.relu(F.batch_norm(x, ...)), weight, bias, stride, padding, dilation, groups)``.

    Same result as the eager expression, running statistics included: in training mode the
    batch statistics normalise ``x`` and ``running_mean`` / ``running_var`` are updated in
    place with ``momentum`` (unbiased variance), as ``F.batch_norm`` does.

    Args:
        x: input ``N x C x H x W``, NCHW or channels_last, or a channel-prefix view of a
            larger tensor (``buffer[:, :C]``).
        weight: conv weight ``C_out x C/groups x kH x kW``.
        bias: optional conv bias ``[C_out]``.
        bn_weight, bn_bias: BN affine parameters ``[C]``, or ``None`` (``affine=False``).
        running_mean, running_var: ``[C]`` running statistics, or ``None``
            (``track_running_stats=False``; then ``training`` must be True).
        training: normalise with (and update the running statistics from) the batch statistics.
        momentum: running-average factor, a float in ``[0, 1]`` as in ``F.batch_norm``
            (the modules turn ``momentum=None`` into the cumulative-average factor).
        backend: ``"auto" | "eager" | "triton" | "native"``.
        out: optional output tensor (may be a channel slice of a larger tensor); returned. It
            must not require grad, share memory with an input, or be expanded.
        process_group: a ``torch.distributed`` group to synchronise the batch statistics
            over, as ``nn.SyncBatchNorm`` does; ``None`` for per-process statistics.
        input_stats: the batch statistics of ``x`` as a previous call with
            ``return_stats=True`` returned them for its output ``x`` (statistics in the
            epilogue): in training, without a process group, the BatchNorm takes its mean,
            inverse std and running-statistics update from them instead of a pass over ``x``.
            Ignored where they do not apply (eval, a process group, the eager backend).
            Checked (outside ``torch.compile``): statistics returned for another tensor, a
            copy of them, the statistics changed in place, or ``x`` changed in place since they
            were taken raise ``ValueError``.
        return_stats: also return the batch statistics of the output, for the next fused
            op's ``input_stats``: ``(y, stats)``, ``stats`` ``None`` where the backend does not
            take them in the conv's epilogue (only triton does; eager and native leave the
            next call to take its own), with ``out``, through a process group, or for an
            inference tensor (``torch.inference_mode``: no version counter to check it by).

    Double backward (``create_graph=True``) is exact on every backend, except through a
    SyncBN process group, where it raises.

    Raises:
        ValueError / TypeError / RuntimeError (``out``): on bad shapes, dtypes, devices or
            arguments, before anything is modified.
        resfast.backends.BackendUnavailableError: if ``backend`` cannot run on ``x``'s device.
    """
    cast_out = None  # the dtype autocast's conv would return, where the op computes in another
    if isinstance(x, Tensor) and isinstance(weight, Tensor) and autocast_enabled(x.device.type):
        x, weight, bias = autocast_inputs(x, weight, bias, out)
        target = autocast_target_dtype(x.device)
        cast_out = target if out is None and x.dtype not in (target, torch.float64) else None
    stride, padding, dilation, momentum = check_bn_relu_conv2d_args(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride, padding,
        dilation, groups, out,
    )
    _check_input_stats(input_stats, x)
    name = bn_relu_conv2d_backend(backend, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training,
                                  momentum, eps, stride, padding, dilation, groups, out)
    with clone_on_mutate_suspended(out is None):
        y, stats = _bn_relu_conv2d(name, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training,
                                   momentum, eps, stride, padding, dilation, groups, out, process_group, input_stats,
                                   return_stats)
    if cast_out is not None:  # (statistics of y before the cast describe no tensor the caller has)
        y, stats = y.to(cast_out), None
    if stats is not None and not torch.compiler.is_compiling():
        if y.is_inference():
            # an inference tensor has no version counter: an in-place change of y before the
            # next op could not be detected, so the next op takes its own statistics
            stats = None
        else:
            _tag_stats(stats, y)
    return (y, stats) if return_stats else y


def _tag_stats(stats: Tensor, y: Tensor) -> None:
    """Remember which tensor ``stats`` describe (and its version, and the statistics' own):
    :func:`_check_stats_source` refuses them for any other input, for ``y`` after an in-place
    change, or after an in-place change of the statistics themselves."""
    stats._resfast_stats_of = (weakref.ref(y), y.data_ptr(), tuple(y.shape), y.stride(), y._version,
                               stats._version)


def _check_stats_source(input_stats: Tensor, x: Tensor) -> None:
    """``input_stats`` must describe ``x`` as it is now: statistics of another tensor (or of
    ``x`` before an in-place change) would normalise it with the wrong mean and variance."""
    tag = getattr(input_stats, "_resfast_stats_of", None)
    if tag is None:
        raise ValueError("input_stats must be the statistics a call with return_stats=True returned, unchanged "
                         "(a copy or a tensor built elsewhere cannot be checked against x)")
    ref, ptr, shape, stride, version, stats_version = tag
    if input_stats._version != stats_version:
        # (e.g. all-reduced or rescaled: Chan partials summed over ranks describe no batch)
        raise ValueError("input_stats were modified in place after the call returned them; they no longer describe "
                         "x (pass them unchanged, or input_stats=None)")
    y = ref()
    same = y is x or (y is not None and x.data_ptr() == ptr and tuple(x.shape) == shape and x.stride() == stride)
    if not same:
        raise ValueError("input_stats were returned for another tensor than x: pass the output they came with")
    if x._version != version:
        raise ValueError("x was modified in place after the call that returned input_stats took its statistics; "
                         "they no longer describe it (take new ones, or pass input_stats=None)")


def _check_input_stats(input_stats: Optional[Tensor], x: Tensor) -> None:
    if input_stats is None:
        return
    if not isinstance(input_stats, Tensor) or input_stats.dim() != 3 or input_stats.shape[0] != 3 \
            or input_stats.shape[2] != x.shape[1] or input_stats.dtype != torch.float32:
        raise ValueError("input_stats must be the float32 [3, S, C] statistics a previous call with "
                         f"return_stats=True returned for x (C={x.shape[1]}), got "
                         f"{getattr(input_stats, 'shape', type(input_stats).__name__)}")
    if input_stats.device != x.device:
        raise ValueError(f"input_stats is on {input_stats.device} but x is on {x.device}")
    if not torch.compiler.is_compiling():
        _check_stats_source(input_stats, x)


def _bn_relu_conv2d(name, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                    stride, padding, dilation, groups, out, process_group, input_stats, return_stats):
    """The fused op on backend ``name``, arguments checked: ``(y, output statistics or None)``."""
    if x.shape[0] == 0:
        if training and process_group is not None:
            # This rank has no images but the others synchronise: join their all-gather (count 0)
            # and update the running statistics with the group's, as nn.SyncBatchNorm does; the
            # backward joins their all-reduce of the two gradient sums.
            mean, var, count = sync_batch_stats(get_ops(name), x, process_group)
            update_running_stats(running_mean, running_var, mean, var, count, momentum)
            y = _EmptySyncBN.apply(process_group, mean, x, weight, bias, bn_weight, bn_bias, stride, padding,
                                   dilation, groups)
            return _finish(y, out), None
        # An empty batch: an empty output, nothing updated, as F.batch_norm on an empty input,
        # whose output still depends on the BN weight and bias: they get zero gradients, not
        # None (an optimizer skips a parameter whose grad is None, but momentum and weight
        # decay move one whose grad is zero, as they do in eager PyTorch).
        y = F.conv2d(F.relu(_empty_affine(x, bn_weight, bn_bias)), weight, bias, stride, padding, dilation, groups)
        return _finish(y, out), None
    transformed = forward_ad_or_transform(x, weight, bias, bn_weight, bn_bias)
    if transformed and process_group is not None:
        raise RuntimeError(FORWARD_AD_SYNC_BN)
    if (name == "eager" or transformed) and process_group is None:
        # eager, or forward AD / a torch.func transform (the registered ops have no forward-AD
        # formula and no functorch support): the expression PyTorch differentiates exactly
        if not training and running_mean is not None and torch.is_grad_enabled():
            # F.batch_norm saves the running statistics by reference for its backward and a
            # training forward before that backward would change them: normalise with a copy
            # (contiguous: see below)
            running_mean, running_var = (t.clone(memory_format=torch.contiguous_format)
                                         for t in (running_mean, running_var))
        # PyTorch's CPU batch-norm backward reads a strided weight or bias (and, in eval, running
        # statistics) as contiguous when x and its gradient are channels_last: dL/dx wrong, no
        # error (trial 20: 5.0 off of 5.0), e.g. for a weight kept as one column of a [C, 2]
        # tensor: hand it contiguous copies
        bn_weight, bn_bias = dense_vector(bn_weight), dense_vector(bn_bias)
        y = F.conv2d(
            F.relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)),
            weight, bias, stride, padding, dilation, groups,
        )
        return _finish(y, out), None

    ops = get_ops(name)
    count = x.numel() // x.shape[1]
    eager_autograd = (_needs_grad(x, weight, bias, bn_weight, bn_bias) and not torch.compiler.is_compiling()
                      and not torch.jit.is_tracing())
    train_op = getattr(ops, "bn_relu_conv2d_train", None)
    if (train_op is not None and training and eager_autograd and process_group is None and input_stats is None
            and out is None and not return_stats):
        # (triton, native) the statistics, the running-statistics update and the conv in one op
        keep = momentum == 0.0  # a second reader of the same statistics: nothing to update
        rm, rv = (None, None) if keep else (running_mean, running_var)
        y = BNTrainReLUConv2dFunction.apply(ops, count, x, weight, bias, bn_weight, bn_bias, rm, rv, momentum, eps,
                                            stride, padding, dilation, groups)
        return y, None
    merge = getattr(ops, "bn_stats_merge_update", None)
    if training and process_group is not None:
        mean, var, count = sync_batch_stats(ops, x, process_group)
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
        invstd = torch.rsqrt(var + eps)
    elif training:
        keep = momentum == 0.0  # a second reader of the same statistics: nothing to update
        rm, rv = (None, None) if keep else (running_mean, running_var)
        if input_stats is not None and merge is not None:
            # x's statistics were taken in the epilogue of the op that wrote x: one finalize.
            mean, invstd = merge(input_stats, count, rm, rv, momentum, eps)
        else:
            mean, invstd = ops.bn_stats_update(x.detach(), rm, rv, momentum, eps)
    else:
        mean, invstd = normalize_with(running_mean, running_var, eps, acc_dtype(x))

    if out is not None and not _needs_grad(x, weight, bias, bn_weight, bn_bias):
        ops.bn_relu_conv2d_out(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups,
                               out)
        return out, None
    with_stats = getattr(ops, "bn_relu_conv2d_stats", None) if return_stats and out is None else None
    if with_stats is not None and eager_autograd and process_group is None:
        y, stats = BNReLUConv2dStatsFunction.apply(ops, None, count, x, weight, bias, bn_weight, bn_bias, mean, invstd,
                                                   stride, padding, dilation, groups, training)
        return y, stats
    if process_group is not None or name == "eager" or (eager_autograd and with_stats is None):
        # Called eagerly with gradients, the registered op's own autograd (torch.library's
        # Python wrapper, whose argument filling walks the schema once per argument) is replaced
        # by this Function over the same op with the same backward: about 45 us less host time
        # per training call on the development machine (benchmarks/host_op_layer.py). Under
        # torch.compile and torch.jit.trace the registered op is traced as before.
        y = BNReLUConv2dFunction.apply(ops, process_group, count, x, weight, bias, bn_weight, bn_bias, mean, invstd,
                                       stride, padding, dilation, groups, training)
        return _finish(y, out), None
    if with_stats is not None:
        y, stats = with_stats(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups,
                              training)
        return y, stats
    y = ops.bn_relu_conv2d(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups,
                           training)
    return _finish(y, out), None


def normalize_with(running_mean: Tensor, running_var: Tensor, eps: float, acc: torch.dtype,
                   snapshot: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """``(mean, invstd)`` of running statistics, in ``acc``.

    With ``snapshot`` (default: in grad mode) both are new tensors: a backward that
    recomputes ``relu(bn(x))`` from them must see the statistics of its forward even if a
    training forward updates the running statistics in place before it runs. Otherwise the
    mean may alias ``running_mean`` (nothing reads it later)."""
    mean = running_mean.to(acc, copy=torch.is_grad_enabled() if snapshot is None else snapshot)
    return mean, torch.rsqrt(running_var.to(acc) + eps)


def sync_batch_stats(ops, x: Tensor, process_group) -> Tuple[Tensor, Tensor, int]:
    """Per-channel batch mean and biased variance of ``x`` over all ranks of ``process_group``
    (per-rank ``ops.bn_stats``, an all-gather, Chan's parallel combination), and the element
    count per channel over all ranks."""
    import torch.distributed as dist

    count = x.numel() // x.shape[1]
    if count == 0:  # a rank with no images takes part with a count of 0
        mean = var = torch.zeros(x.shape[1], dtype=acc_dtype(x), device=x.device)
    else:
        mean, var = ops.bn_stats(x.detach())
    world = dist.get_world_size(process_group)
    local = torch.cat([mean, var, mean.new_tensor([float(count)])])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=process_group)
    stacked = torch.stack(gathered)
    c = mean.numel()
    means, vars_, counts = stacked[:, :c], stacked[:, c: 2 * c], stacked[:, 2 * c: 2 * c + 1]
    total = counts.sum()
    if total.item() == 0:
        raise ValueError("no rank of the SyncBN process group has any images: there are no batch statistics")
    mean = (means * counts).sum(0) / total
    var = ((vars_ + (means - mean) ** 2) * counts).sum(0) / total
    return mean, var, int(total.item())


def _empty_affine(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]) -> Tensor:
    """``x`` (an empty batch) times the BN weight plus the BN bias: an empty tensor whose graph
    reaches both parameters, so each gets a zero gradient, as through ``F.batch_norm``."""
    if bn_weight is not None:
        x = x * bn_weight.to(x.dtype).view(1, -1, 1, 1)
    if bn_bias is not None:
        x = x + bn_bias.to(x.dtype).view(1, -1, 1, 1)
    return x


class _EmptySyncBN(torch.autograd.Function):
    """The fused op of a rank with an empty batch in a SyncBN group: an empty output whose
    backward joins the other ranks' all-reduce of the two per-channel gradient sums (with
    zeros) and gives zero gradients (this rank's share of them is nothing)."""

    @staticmethod
    def forward(ctx, process_group, mean, x, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups):
        ctx.process_group, ctx.mean_like = process_group, mean
        ctx.save_for_backward(x)  # unpacked first in the backward: a checkpoint recomputes (and all-gathers) as the others do
        ctx.shapes = [None if t is None else (t.shape, t.dtype) for t in (x, weight, bias, bn_weight, bn_bias)]
        return F.conv2d(x.detach(), weight.detach(), None if bias is None else bias.detach(), stride, padding,
                        dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        import torch.distributed as dist

        if torch.is_grad_enabled():  # refused as the other ranks' fused ops refuse it
            raise RuntimeError(DOUBLE_BACKWARD_SYNC_BN)
        ctx.saved_tensors  # noqa: B018 (see forward)
        dist.all_reduce(torch.zeros((2, *ctx.mean_like.shape), dtype=ctx.mean_like.dtype,
                                    device=ctx.mean_like.device), group=ctx.process_group)
        grads = [None if (sd is None or not need) else torch.zeros(sd[0], dtype=sd[1], device=grad_out.device)
                 for sd, need in zip(ctx.shapes, ctx.needs_input_grad[2:7])]
        return (None, None, *grads, None, None, None, None)


def update_running_stats(
    running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor, var: Tensor, count: int,
    momentum: float,
) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, unbiased variance, as ``F.batch_norm``.
    ``mean`` / ``var`` are detached instead of a ``no_grad`` region (running statistics never
    require grad: the modules refuse them, ``check_running_stats_no_grad``): under ``torch.export`` a ``no_grad``
    region becomes a ``wrap_with_set_grad_enabled`` node that ``torch.export.load`` refuses
    ("missing val field"), so an exported training model could not be loaded."""
    if running_mean is None or momentum == 0.0:
        return
    mean, var = mean.detach(), var.detach()
    unbiased = unbiased_var(var, count)
    running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def _needs_grad(*ts: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _finish(y: Tensor, out: Optional[Tensor]) -> Tensor:
    if out is None:
        return y
    out.copy_(y)
    return out


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older spelling
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def autocast_target_dtype(device: torch.device) -> torch.dtype:
    """The dtype autocast casts a conv's inputs to on ``device`` (whether or not it is on)."""
    try:
        return torch.get_autocast_dtype(device.type)
    except (AttributeError, TypeError):
        return torch.get_autocast_gpu_dtype() if device.type == "cuda" else torch.get_autocast_cpu_dtype()


def autocast_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None):
    """The dtypes the fused op computes in under autocast (the BN parameters stay in theirs).

    Eager PyTorch's batch norm is not autocast: it normalises ``x`` in ``x``'s own dtype, and
    autocast casts the conv's input, ``relu(bn(x))``, and its weight and bias. So where ``x``
    already is in the autocast dtype (the usual case: the output of an autocast conv), the
    weight and bias are cast to it. Where it is not (float32 under bfloat16 autocast), casting
    ``x`` first would take the batch statistics of a rounded ``x`` (at a mean of 40 standard
    deviations bfloat16 keeps none of its digits): the op computes in ``x``'s dtype instead
    (weight and bias cast to it, through the autocast dtype: :func:`autocast_param`) and
    :func:`bn_relu_conv2d` returns its output in the autocast dtype, as autocast's conv does.
    With ``out=`` the op writes in the autocast dtype: ``x`` is cast to it. float64 tensors are
    never cast (autocast never casts them)."""
    target = autocast_target_dtype(x.device)
    dtype = target
    if out is None and x.is_floating_point() and x.dtype != torch.float64:
        dtype = x.dtype
    cast_x = x if x.dtype == dtype or not x.is_floating_point() or x.dtype == torch.float64 else x.to(dtype)
    return cast_x, autocast_param(weight, dtype, target), autocast_param(bias, dtype, target)


def autocast_param(t: Optional[Tensor], dtype: torch.dtype, target: torch.dtype) -> Optional[Tensor]:
    """A conv weight or bias ``t`` as an op computing in ``dtype`` under autocast reads it.

    Where ``dtype`` is autocast's own ``target`` this is ``t.to(dtype)``. Where the op computes
    in another dtype (a float32 ``x`` under float16 / bfloat16 autocast), ``t`` goes through
    ``target`` first, ``t.to(target).to(dtype)``, as autocast's conv casts it: the conv reads the
    values eager's reads, and autograd hands the gradient back through ``target`` too, so a
    weight gradient beyond float16's range is ``inf`` as eager's float16 one is (a GradScaler then
    skips the step where eager's does; kept in float32 it stayed finite and the scaler stepped).
    float64 tensors are never cast, nor is anything when ``dtype`` is float64."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    if dtype not in (target, torch.float64) and t.dtype != target:
        t = t.to(target)
    return t if t.dtype == dtype else t.to(dtype)


def bn_relu_conv2d_backend(requested: str, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                           bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], training: bool, momentum: float, eps: float, stride,
                           padding, dilation, groups: int, out: Optional[Tensor] = None) -> str:
    """The backend :func:`resfast.ops.bn_relu_conv2d.bn_relu_conv2d` runs a (validated) call on.

    The signature: dtype, strides class (``nchw`` / ``channels_last`` / ``strided``), N, C,
    H, W, C_out, kernel, stride, padding, dilation, groups, training, whether gradients are
    needed, bias, affine, and whether ``out=`` is given. The runner calls the op itself with
    the candidate backend on scratch tensors of that shape and strides class (scratch
    parameters and running statistics), gradients by ``torch.autograd.grad`` to scratch
    leaves. The probe's small call: batch 1, at most 2 x 2 output positions, at most 32 input
    and output channels per group and 32 channels in all (fewer groups).
    """
    if requested != "auto" or not autotune_enabled():
        return resolve_backend(requested, x.device)
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    if torch.compiler.is_compiling() and not static_dims(n, c, h, w, c_out, kh, kw):
        return static_choice(x.device)
    if x.numel() == 0:
        return static_choice(x.device)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias, bn_weight, bn_bias))
    st, pd, dl = as_pair(stride), as_pair(padding), as_pair(dilation)
    signature: Signature = (
        ("dtype", str(x.dtype).replace("torch.", "")), ("layout", strides_class(x)),
        ("N", n), ("C", c), ("H", h), ("W", w), ("C_out", c_out), ("kernel", (kh, kw)),
        ("stride", st), ("padding", pd), ("dilation", dl),
        ("groups", int(groups)), ("training", bool(training)), ("grad", bool(grad)), ("bias", bias is not None),
        ("affine", bn_weight is not None), ("out", out is not None),
    )

    def make_runner(name: str, small: bool) -> Runner:
        if small:
            cin_g, cout_g = min(c // groups, PROBE_CHANNELS), min(c_out // groups, PROBE_CHANNELS)
            g = max(1, min(groups, PROBE_CHANNELS // max(cin_g, cout_g)))
            hp, wp = probe_extent(h, kh, st[0], pd[0], dl[0]), probe_extent(w, kw, st[1], pd[1], dl[1])
            xs, cs, cos = (probe_batch(n, hp * wp, training), g * cin_g, hp, wp), g * cin_g, g * cout_g
        else:
            g, xs, cs, cos = groups, tuple(x.shape), c, c_out
        sx = scratch(x, xs).requires_grad_(grad and x.requires_grad)
        sw = scratch_param(weight, (cos, cs // g, kh, kw), grad)
        sb, sg, sbb = scratch_param(bias, (cos,), grad), scratch_param(bn_weight, (cs,), grad), scratch_param(bn_bias, (cs,), grad)
        rm = rv = None
        if running_mean is not None:
            rm = running_mean.new_empty(cs).normal_().mul_(0.1)
            rv = running_var.new_empty(cs).uniform_(0.5, 1.5)
        sout = None
        if out is not None:
            sout = scratch(out, (xs[0], cos, *(conv_out(e, k, a, b, d) for e, k, a, b, d in
                                                zip(xs[2:], (kh, kw), st, pd, dl))))
        leaves = [t for t in (sx, sw, sb, sg, sbb) if t is not None and t.requires_grad]
        return training_runner(
            lambda: bn_relu_conv2d(sx, sw, sb, bn_weight=sg, bn_bias=sbb, running_mean=rm, running_var=rv,
                                   training=training, momentum=momentum, eps=eps, stride=st, padding=pd,
                                   dilation=dl, groups=g, backend=name, out=sout),
            leaves, grad)

    return pick_backend(requested, x.device, "bn_relu_conv2d", signature, make_runner)
