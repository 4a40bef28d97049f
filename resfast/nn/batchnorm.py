"""The BatchNorm bookkeeping every resfast module shares, in one place.

``nn.BatchNorm2d.forward`` decides, before it normalises, whether to use the batch
statistics, which running statistics to pass (and so update), with which momentum
(``momentum=None`` is the cumulative average ``1 / num_batches_tracked``), and it
increments ``num_batches_tracked``. :func:`bn_call` makes exactly those decisions for a
BatchNorm that resfast fuses into a conv, and returns them as plain tensors and floats for
the op layer, which never sees a module.

A second reader of the same BatchNorm output in the same forward (a pre-activation block's
1x1 shortcut, a checkpoint's recomputation) asks with ``update=False``: the same
statistics, nothing updated, ``num_batches_tracked`` untouched.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resfast.ops.bn_args import BNArgs

__all__ = ["BNArgs", "bn_call", "bn_calls", "require_batchnorm", "sync_group", "uses_batch_stats"]


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether ``bn``'s forward normalises with the batch statistics (``bn_training`` in
    ``nn.BatchNorm2d.forward``)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def require_batchnorm(bn: nn.Module) -> None:
    """``TypeError`` unless ``bn`` is a BatchNorm (``torch.nn.modules.batchnorm._BatchNorm``: the
    BatchNorm and SyncBatchNorm classes and their subclasses), the only norm the fused ops
    reproduce (a GroupNorm swapped into a fused module's norm slot raised an AttributeError
    from deep inside)."""
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"the fused BN-ReLU-conv normalises like a BatchNorm, got a {type(bn).__name__} in its norm "
                        "slot; keep a BatchNorm there, or use the unfused modules (a block built with "
                        "norm_layer=... of another kind runs them)")


def bn_call(bn: nn.Module, update: bool = True) -> BNArgs:
    """The decisions of ``bn``'s forward, as ``nn.BatchNorm2d.forward`` makes them.

    With ``update`` (the first reader of this forward) ``num_batches_tracked`` is incremented
    in training, so call it once per forward and only after the input was validated (a
    rejected call changes nothing). With ``update=False`` the call normalises with the same
    statistics and updates nothing.
    """
    require_batchnorm(bn)
    if _counts(bn, update):
        bn.num_batches_tracked.add_(1)
    return _decisions(bn, update)


def bn_calls(bns: Sequence[nn.Module]) -> List[BNArgs]:
    """:func:`bn_call` (first readers, ``update=True``) for several BatchNorms of one forward,
    e.g. every BatchNorm of a shared dense block: the same decisions, with every
    ``num_batches_tracked`` incremented by one ``torch._foreach_add_`` launch instead of one
    launch per BatchNorm."""
    for bn in bns:
        require_batchnorm(bn)
    counters = [bn.num_batches_tracked for bn in bns if _counts(bn, True)]
    if counters:
        torch._foreach_add_(counters, 1)
    return [_decisions(bn, True) for bn in bns]


def _counts(bn: nn.Module, update: bool) -> bool:
    """Whether this forward of ``bn`` increments its ``num_batches_tracked``."""
    return update and bn.training and bn.track_running_stats and bn.num_batches_tracked is not None


def _decisions(bn: nn.Module, update: bool) -> BNArgs:
    """The decisions of ``bn``'s forward, its ``num_batches_tracked`` already incremented."""
    factor = 0.0 if bn.momentum is None else float(bn.momentum)
    if bn.momentum is None and _counts(bn, update):
        factor = 1.0 / float(bn.num_batches_tracked)
    batch_stats = uses_batch_stats(bn)
    # As nn.BatchNorm2d: the buffers are passed when they are used (eval) or updated (training
    # with track_running_stats). A second reader passes the same buffers with momentum 0, so
    # it runs the same ops (torch.utils.checkpoint compares what the two runs save) and
    # changes nothing.
    track = not bn.training or bn.track_running_stats
    return BNArgs(
        weight=bn.weight, bias=bn.bias,
        running_mean=bn.running_mean if track else None, running_var=bn.running_var if track else None,
        batch_stats=batch_stats, momentum=factor if update else 0.0, eps=float(bn.eps),
        process_group=sync_group(bn) if batch_stats else None,
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
