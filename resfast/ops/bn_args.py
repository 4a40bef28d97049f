"""``BNArgs``: what one BatchNorm contributes to a fused op call, as tensors and floats.

The module side (:func:`resfast.nn.batchnorm.bn_call`) fills it with the decisions
``nn.BatchNorm2d.forward`` makes; the op layer only reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

__all__ = ["BNArgs"]


@dataclass
class BNArgs:
    """The arguments of ``F.batch_norm`` for one call, plus the SyncBN process group."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    #: The running statistics the call normalises with (eval) or updates (training); ``None``
    #: when it does neither.
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    #: Normalise with the batch statistics (``F.batch_norm``'s ``training``).
    batch_stats: bool
    momentum: float
    eps: float
    #: SyncBN: the group to synchronise the batch statistics over, else ``None``.
    process_group: object = None
