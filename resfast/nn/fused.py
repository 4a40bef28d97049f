"""Module form of the fused op, and the BatchNorm bookkeeping every block shares."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from resfast.backends import check_backend_name
from resfast.ops.bn_relu_conv2d import bn_relu_conv2d

__all__ = ["BNReLUConv2d", "bn_relu_conv", "bn_momentum", "sync_group"]


def bn_momentum(bn: nn.BatchNorm2d) -> Tuple[bool, float]:
    """``(use_batch_stats, momentum)`` exactly as ``nn.BatchNorm2d.forward`` decides them.

    Increments ``num_batches_tracked`` in training (so call it once per forward);
    ``momentum=None`` becomes the cumulative-average factor ``1 / num_batches_tracked``.
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    return use_batch, factor


def bn_relu_conv(
    bn: nn.BatchNorm2d, conv: nn.Conv2d, x: Tensor, backend: str = "auto", out: Optional[Tensor] = None,
    process_group=None,
) -> Tensor:
    """``conv(relu(bn(x)))`` through :func:`resfast.functional.bn_relu_conv2d`, with ``bn``'s
    running statistics and ``num_batches_tracked`` updated exactly as ``nn.BatchNorm2d`` does."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"only padding_mode='zeros' is supported, got {conv.padding_mode!r}")
    if isinstance(conv.padding, str):
        raise ValueError(f"conv padding must be numeric, got {conv.padding!r}")
    use_batch, momentum = _checked_momentum(bn, x)
    track = not bn.training or bn.track_running_stats
    if process_group is None and use_batch:
        process_group = sync_group(bn)
    return bn_relu_conv2d(
        x, conv.weight, conv.bias,
        bn_weight=bn.weight, bn_bias=bn.bias,
        running_mean=bn.running_mean if track else None,
        running_var=bn.running_var if track else None,
        training=use_batch, momentum=momentum, eps=bn.eps,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        backend=backend, out=out, process_group=process_group,
    )


def sync_group(bn: nn.Module):
    """The process group to synchronise ``bn``'s batch statistics over, or ``None``.

    A BN converted by ``nn.SyncBatchNorm.convert_sync_batchnorm`` keeps synchronising when it
    is fused into a conv: its group (``WORLD`` when unset) is used while training in an
    initialised ``torch.distributed`` job with more than one rank, as ``nn.SyncBatchNorm`` does.
    """
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _checked_momentum(bn: nn.BatchNorm2d, x: Tensor) -> Tuple[bool, float]:
    # Reject bad input before num_batches_tracked moves: nothing changes on a rejected call.
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[1] != bn.num_features:
        raise ValueError(f"channel mismatch: the input has {x.shape[1]} channels, the block expects {bn.num_features}")
    return bn_momentum(bn)


class BNReLUConv2d(nn.Module):
    """``Conv2d(ReLU(BatchNorm2d(x)))`` as one fused op on the chosen backend.

    Parameters and buffers are those of an ``nn.BatchNorm2d`` named ``norm`` and an
    ``nn.Conv2d`` named ``conv``, so the ``state_dict`` is the same on every backend.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int]] = 1,
        stride: Union[int, Tuple[int, int]] = 1,
        padding: Union[int, Tuple[int, int]] = 0,
        dilation: Union[int, Tuple[int, int]] = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_channels(in_channels, out_channels, groups)
        self.backend = check_backend_name(backend)
        self.norm = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum, affine=affine,
                                   track_running_stats=track_running_stats)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)

    def forward(self, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        return bn_relu_conv(self.norm, self.conv, x, self.backend, out=out)


def _check_channels(in_channels: int, out_channels: int, groups: int) -> None:
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
