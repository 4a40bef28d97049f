"""DDP plumbing for ``torchrun --nproc_per_node=N -m resfast.train ...``.

Everything is plain ``torch.distributed``: the process group comes from the environment
``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), the
model is wrapped in ``DistributedDataParallel`` and each rank reads its shard through a
``DistributedSampler``. ``--sync-bn`` converts BatchNorm layers with
``nn.SyncBatchNorm.convert_sync_batchnorm``; resfast's fused BN-ReLU-conv ops see the
converted norm (``resfast.nn.fused.sync_group``) and all-reduce their per-channel sums too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistInfo", "init_distributed", "cleanup", "prepare_model", "wrap_model", "convert_sync_bn",
           "all_reduce_sum", "shard_indices", "unwrap"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job (``world_size == 1`` outside ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process group was created by init_distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, backend: Optional[str] = None) -> DistInfo:
    """Join the process group described by the ``torchrun`` environment, if there is one.

    Uses NCCL for CUDA devices and gloo otherwise. A process group that is already
    initialised (e.g. by a test) is used as it is. On CUDA the current device becomes
    ``cuda:LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build of PyTorch")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def cleanup(info: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` created it (one made by the caller stays)."""
    if info.owns_group and dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing the run files; nobody leaves before it is done
        dist.destroy_process_group()


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm``: BN statistics (and, in resfast's fused
    BN-ReLU-conv ops, the backward's per-channel sums) are all-reduced over the ranks."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def prepare_model(model: nn.Module, info: DistInfo, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """Wrap ``model`` (already on ``device``) for the job: DDP on several ranks, with its
    BatchNorm layers converted to ``nn.SyncBatchNorm`` when ``sync_bn``.

    On CUDA the conversion happens before wrapping, as usual. DDP refuses CPU modules holding
    ``nn.SyncBatchNorm`` (whose own forward is CUDA-only), but resfast's fused BN-ReLU-conv ops
    synchronise over gloo on the CPU; so on the CPU the BNs are converted inside the wrapper.
    ``convert_sync_batchnorm`` keeps the very same parameter and buffer tensors, so DDP's
    gradient hooks and buffer broadcast still cover them. A BN that is not fused into a conv
    then fails at its forward with PyTorch's "SyncBatchNorm expected input tensor to be on
    GPU" error.
    """
    if not info.distributed:
        return model
    if sync_bn and device.type == "cuda":
        model = convert_sync_bn(model)
    ddp = wrap_model(model, info, device)
    if sync_bn and device.type != "cuda":
        for name, child in list(ddp.module.named_children()):
            ddp.module.add_module(name, convert_sync_bn(child))
    return ddp


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` when running on several ranks, else ``model``."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda":
        return DDP(model, device_ids=[device.index if device.index is not None else info.local_rank])
    return DDP(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (whose ``state_dict`` has no ``module.`` prefix)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """Sum ``t`` over the ranks (in place); the identity on one process."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard_indices(n: int, info: DistInfo) -> range:
    """This rank's share of ``range(n)`` for evaluation: strided, no padding, so every test
    image is counted exactly once when the per-rank counts are summed."""
    return range(info.rank, n, info.world_size)
