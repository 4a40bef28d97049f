"""Parameter and multiply-accumulate counts.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (which counts convolutions and
matrix products as 2 FLOPs per multiply-accumulate), so ``MACs = FLOPs / 2``; BN, ReLU,
pooling and additions are not counted, as in the papers' tables. The count is the
architecture's: a DenseNet transition (which resfast computes pool first, its 1x1 conv on a
quarter of the positions and the 2x2 averaging as a depthwise conv) is counted as built, conv
over every position and the pooling left out, so the figures equal torchvision's and the
papers'. Counting runs one image on
the ``meta`` device where the model allows it, so no memory is allocated and no arithmetic
is done: every registered model is counted in seconds.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "model_counts", "build_for_counting"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def count_params(model: nn.Module, *, trainable_only: bool = False, include_norm: bool = True) -> int:
    """Number of parameters of ``model`` (each shared parameter once).

    ``include_norm=False`` leaves out the affine parameters of normalisation layers (BN's
    gamma and beta): some papers' tables (pre-activation ResNet-1001's 10.2M) count only the
    conv and linear weights.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    skip = set()
    if not include_norm:
        skip = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def count_macs(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``batch_size`` images of
    ``input_size`` (``C, H, W``), divided by ``batch_size``: MACs per image.

    The input is made on the model's device with its dtype (a model built under
    ``torch.device("meta")`` is counted without any arithmetic). The model runs in eval
    mode under ``torch.no_grad()`` and is put back in its previous mode. Transitions are
    counted conv first, as the architecture is defined (see the module docstring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    size = tuple(input_size)
    if len(size) != 3 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"input_size must be (C, H, W) of positive ints, got {input_size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.zeros((batch_size, *size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), _conv_first_transitions(model), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // batch_size


@contextlib.contextmanager
def _conv_first_transitions(model: nn.Module) -> Iterator[None]:
    """Every :class:`resfast.Transition` of ``model`` runs conv first (``pool(conv(relu(bn(x))))``,
    torchvision's order) inside the block: the MACs of the architecture, not of the pool-first
    computation (which does 3/4 fewer in the 1x1 conv and counts its averaging)."""
    from resfast.nn.dense import Transition

    patched = [m for m in model.modules() if isinstance(m, Transition) and "pool_first" not in m.__dict__]
    try:
        for m in patched:
            m.__dict__["pool_first"] = _false
        yield
    finally:
        for m in patched:
            m.__dict__.pop("pool_first", None)


def _false() -> bool:
    return False


def model_counts(name: str) -> Dict[str, Union[str, int, Tuple[int, int, int]]]:
    """``{"name", "params", "macs", "input_size"}`` of the registered model ``name`` at its
    default input size, built with default arguments on the eager backend.

    Built on the ``meta`` device; a model whose forward cannot run on ``meta`` is built and
    counted on the CPU with one image instead.
    """
    from resfast.models import model_info

    info = model_info(name)
    try:
        with torch.device("meta"):
            model = build_for_counting(name)
        macs = count_macs(model, info.input_size)
    except (RuntimeError, NotImplementedError):
        model = build_for_counting(name)
        macs = count_macs(model, info.input_size)
    return {"name": name, "params": count_params(model), "macs": macs, "input_size": list(info.input_size)}


def build_for_counting(name: str) -> nn.Module:
    """The registered model ``name`` with default arguments on the eager backend, in the
    quickest memory mode where its family has one.

    A dense-block memory mode changes neither parameters nor MACs, and the plain
    concatenating block (``memory="naive"``) is the quickest to trace (the shared-buffer block
    runs many small ops).
    """
    from resfast.models import create_model, model_options

    options = model_options(name)
    kwargs = {options[k]: v for k, v in (("backend", "eager"), ("memory", "naive")) if k in options}
    return create_model(name, **kwargs)
