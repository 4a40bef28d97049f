"""``bn_relu_conv2d``: ``conv2d(relu(batch_norm(x)), weight, bias)`` in one op, any ``groups``.

The public entry point checks its arguments, resolves the backend, computes the batch
statistics and updates the running statistics exactly as ``F.batch_norm`` does, then runs
the fused op of the chosen backend (whose autograd recomputes ``relu(bn(x))`` from ``x``
and the saved mean / inverse std instead of storing it).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from resfast.backends import get_ops, resolve_backend
from resfast.ops.registration import BNReLUConv2dFunction, conv_out_shape

__all__ = ["bn_relu_conv2d", "batch_norm_stats", "check_bn_relu_conv2d_args", "update_running_stats"]

IntPair = Union[int, Sequence[int]]
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
) -> Tensor:
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
        training: use (and update with) the batch statistics.
        momentum: running-average factor, a float as in ``F.batch_norm``.
        backend: ``"auto" | "eager" | "triton" | "native"``.
        out: optional output tensor (may be a channel slice of a larger tensor); returned.
        process_group: a ``torch.distributed`` group to synchronise the batch statistics
            over, as ``nn.SyncBatchNorm`` does; ``None`` for per-process statistics.

    Raises:
        ValueError / TypeError: on bad shapes, dtypes, devices or arguments (nothing is modified).
        resfast.backends.BackendUnavailableError: if ``backend`` cannot run on ``x``'s device.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding", 0), _pair(dilation, "dilation")
    if isinstance(x, Tensor) and isinstance(weight, Tensor) and _autocast_enabled(x.device.type):
        x, weight, bias = _autocast_inputs(x, weight, bias)
    check_bn_relu_conv2d_args(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, eps, stride, padding, dilation,
        groups, out,
    )
    name = resolve_backend(backend, x.device)
    if name == "eager" and process_group is None:
        y = F.conv2d(
            F.relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)),
            weight, bias, stride, padding, dilation, groups,
        )
        return _finish(y, out)

    ops = get_ops(name)
    if training:
        mean, var, count = batch_norm_stats(ops, x, process_group)
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
        invstd = torch.rsqrt(var + eps)
    else:
        mean = running_mean.to(torch.float32 if x.dtype != torch.float64 else torch.float64)
        invstd = torch.rsqrt(running_var.to(mean.dtype) + eps)

    if out is not None and not _needs_grad(x, weight, bias, bn_weight, bn_bias) and process_group is None:
        ops.bn_relu_conv2d_out(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups,
                               out)
        return out
    if name == "eager" or process_group is not None:
        y = BNReLUConv2dFunction.apply(ops, process_group, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride,
                                       padding, dilation, groups, training)
    else:
        y = ops.bn_relu_conv2d(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups,
                               training)
    return _finish(y, out)


def batch_norm_stats(ops, x: Tensor, process_group=None) -> Tuple[Tensor, Tensor, int]:
    """Per-channel batch mean and biased variance of ``x`` (float32), and the element count
    per channel; over all ranks of ``process_group`` when given (Chan's parallel combination)."""
    count = x.numel() // x.shape[1]
    mean, var = ops.bn_stats(x.detach())
    if process_group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(process_group)
        local = torch.cat([mean, var, mean.new_tensor([float(count)])])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=process_group)
        stacked = torch.stack(gathered)
        c = mean.numel()
        means, vars_, counts = stacked[:, :c], stacked[:, c : 2 * c], stacked[:, 2 * c : 2 * c + 1]
        total = counts.sum()
        mean = (means * counts).sum(0) / total
        var = ((vars_ + (means - mean) ** 2) * counts).sum(0) / total
        count = int(total.item())
    return mean, var, count


@torch.no_grad()
def update_running_stats(
    running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor, var: Tensor, count: int,
    momentum: float,
) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, unbiased variance, as ``F.batch_norm``."""
    if running_mean is None:
        return
    unbiased = var * (count / max(count - 1, 1))
    running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def check_bn_relu_conv2d_args(
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, eps, stride, padding, dilation, groups,
    out,
) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the bad argument; modifies nothing."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in/groups, kH, kW), got shape {tuple(weight.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x has unsupported dtype {x.dtype}; supported: float32, float16, bfloat16, float64")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
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
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var (got None)")
    if training and x.numel() // max(c_in, 1) <= 1:
        raise ValueError(f"expected more than 1 value per channel when training, got x of shape {tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    tensors = {"x": x, "weight": weight, "bias": bias, "out": out, **{k: v for k, (v, _) in named.items()}}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")
    if any(s < 1 for s in stride) or any(d < 1 for d in dilation) or any(p < 0 for p in padding):
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    shape = conv_out_shape(x, weight, stride, padding, dilation)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"the conv output would be empty: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if list(out.shape) != shape:
            raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
        if out.dtype != x.dtype:
            raise TypeError(f"out dtype {out.dtype} does not match x dtype {x.dtype}")


def _pair(v: IntPair, name: str, minimum: int = 1) -> List[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return [int(v[0]), int(v[1])]
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def _needs_grad(*ts: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _finish(y: Tensor, out: Optional[Tensor]) -> Tensor:
    if out is None:
        return y
    out.copy_(y)
    return out


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older spelling
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def _autocast_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Cast like autocast casts ``conv2d``'s inputs; the BN parameters stay in their dtype."""
    try:
        dtype = torch.get_autocast_dtype(x.device.type)
    except (AttributeError, TypeError):
        dtype = torch.get_autocast_gpu_dtype() if x.is_cuda else torch.get_autocast_cpu_dtype()
    cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
    return cast(x), cast(weight), cast(bias)
