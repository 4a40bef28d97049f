"""The shared-buffer dense block: one autograd Function over the op set of any backend.

Per forward, one buffer ``N x (C0 + L*k) x H x W`` (in ``x``'s memory format) holds every
feature of the block:

* ``x`` is copied into channels ``[0, C0)``;
* layer ``l``'s BN-ReLU-conv1x1 reads the channel prefix ``[0, C0 + l*k)`` of the buffer in
  place (``ops.bn_relu_conv2d`` on a prefix view), and its BN-ReLU-conv3x3 writes its ``k``
  new channels straight into ``[C0 + l*k, C0 + (l+1)*k)`` (``ops.bn_relu_conv2d_out``);
  there is no ``torch.cat`` anywhere;
* a channel's batch statistics are computed once, when the channel is written
  (``ops.bn_stats`` on the new slice), and reused by every later layer: only gamma and beta
  differ from layer to layer, so the statistics cost is linear in depth (the kernel backends;
  the eager one, see below, takes them where it normalises);
* each BatchNorm's running statistics are updated exactly once per forward.

The backward recomputes the normalised features through the op set (the one BN-ReLU-conv
backward, :func:`resfast.ops.autograd.bn_relu_conv2d_backward`, for every BN-ReLU-conv) and
accumulates the input gradient of every layer into ONE gradient buffer of the block's size
(``ops.bn_backward_elemt_out`` adds each reader's share in place: no per-layer copies of the
concatenation's gradient).

``recompute="bn_relu"`` keeps each layer's conv1x1 output (the bottleneck) for the
backward; ``recompute="bottleneck"`` recomputes it as well, for the smallest memory.

Dropout (``drop_rate > 0``) draws its mask exactly as ``F.dropout`` does on the CPU and keeps
it as a ``bool`` tensor (1 byte per element of the new features) for the backward.

On the eager backend (plain PyTorch ops) the block launches about what the unfused modules
launch (a densenet121 training step: 1,376 aten ops against naive's 1,459), through the eager
op set's optional ops (:data:`resfast.ops.opset.OPTIONAL_OPS`): each reader's BatchNorm takes
its own statistics in the op that normalises (PyTorch's batch-norm computes them in the same
pass, so sharing them would only add launches), and the backward's BN input gradient comes out
of PyTorch's batch-norm backward with the two sums. A backward call over a prefix is split
into channel chunks (the conv is linear in its input channels: partial outputs add up, and the
input gradient of a chunk only needs the weight columns of that chunk) only where its
temporaries would exceed what the block keeps stored for its backward; with
``recompute="bottleneck"`` that is the wider prefixes. Triton and native kernels never
materialise the normalised input, take the whole prefix in one call and share the statistics.

The per-channel bookkeeping is batched: every prefix reader's running-statistics update is
applied once per block forward with ``torch._foreach_*`` ops (shared statistics), and the
modules count every BatchNorm of a block with one launch (:func:`resfast.nn.batchnorm.bn_calls`).

This module takes tensors, floats and process groups only (:class:`DenseLayerArgs`,
:class:`resfast.ops.bn_args.BNArgs`); the modules' BatchNorm bookkeeping happens in
:mod:`resfast.nn`.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from resfast.backends import resolve_backend
from resfast.ops.autograd import (bn_param_grad, bn_relu_conv2d_backward, clone_on_mutate_suspended,
                                  forward_ad_or_transform)
from resfast.ops.autotune import (PROBE_CHANNELS, PROBE_POSITIONS, Runner, Signature, as_pair, autocast_dtype,
                                  autotune_enabled, pick_backend, probe_batch, scratch, scratch_param,
                                  static_choice, static_dims, strides_class, training_runner)
from resfast.ops.bn_args import BNArgs
from resfast.ops.bn_relu_conv2d import (autocast_enabled, autocast_param, autocast_target_dtype, normalize_with,
                                        sync_batch_stats, update_running_stats)
from resfast.ops.opsets import get_ops
from resfast.ops.reference import acc_dtype, conv2d, conv2d_backward, unbiased_var
from resfast.ops.schemas import out_memory_format

__all__ = ["shared_dense_block", "DenseLayerArgs", "RECOMPUTE_MODES", "DOUBLE_BACKWARD_SHARED"]

RECOMPUTE_MODES = ("bn_relu", "bottleneck")
DOUBLE_BACKWARD_SHARED = (
    "double backward (create_graph=True) through a shared dense block is not supported: its backward works in place "
    "on one gradient buffer and does not record a graph; for gradient penalties and other higher-order gradients use "
    "memory='naive' or memory='checkpoint': DenseBlock(memory='naive'), create_model(..., memory='naive'), "
    "resfast.convert(model, dense_memory='naive'), or on a built model block.memory = 'naive' (a zoo DenseNet's "
    "model.memory sets every block's)"
)
_LOW = (torch.float16, torch.bfloat16)
_ONE = [1, 1]
_ZERO = [0, 0]


@dataclass
class DenseLayerArgs:
    """One dense layer: ``BN-ReLU-conv1x1 -> BN-ReLU-conv3x3 -> dropout``, as tensors and floats."""

    norm1: BNArgs
    conv1_weight: Tensor  # [bottleneck, C_in, 1, 1]
    norm2: BNArgs
    conv2_weight: Tensor  # [growth, bottleneck, kH, kW]
    conv2_padding: List[int]
    conv2_dilation: List[int]
    drop_rate: float = 0.0  # 0 unless training


#: The shared block's Function works in place on one buffer and has no forward-AD formula.
FORWARD_AD_SHARED_BLOCK = (
    "forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) and torch.func transforms are not "
    "supported by shared_dense_block (its autograd works in place on one feature buffer); DenseBlock(memory="
    "'shared') runs its layers one by one under them, or use memory='naive' / 'checkpoint'"
)


def shared_dense_block(
    x: Tensor,
    layers: Sequence[DenseLayerArgs],
    *,
    backend: str = "auto",
    recompute: str = "bn_relu",
    tail: Optional[Tuple[BNArgs, Tensor, Optional[Tensor]]] = None,
) -> Tensor:
    """Run a dense block on one shared feature buffer.

    Args:
        x: block input ``N x C0 x H x W`` (NCHW or channels_last).
        layers: the block's layers (:class:`DenseLayerArgs`); every ``norm1`` (and the tail's
            norm) must synchronise over the same process group, since they share the
            channels' batch statistics.
        backend: ``"auto" | "eager" | "triton" | "native"``.
        recompute: ``"bn_relu"`` (keep the bottleneck outputs) or ``"bottleneck"``
            (recompute them in the backward too).
        tail: optional ``(norm, conv_weight, pool_weight)`` of a following transition: the
            function then returns ``conv(relu(norm(features)))`` (normalised with the block's
            shared statistics), or, with a ``pool_weight`` (the ``C x 1 x 2 x 2`` averaging
            weight), the transition's whole output pool first, ``conv(avgpool2x2(relu(norm(features))))``:
            the BN-ReLU-pool is one fused depthwise op and the 1x1 conv runs on a quarter of the
            positions. The block's features are never a separate output, so no second gradient
            buffer of the block's size is needed.

    Returns:
        All features ``N x (C0 + L*k) x H x W`` (a drop-in for ``torch.cat(features, 1)``; in
        the dtype ``torch.cat`` would give under autocast), or the tail conv's output.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if len(layers) == 0:
        raise ValueError("layers must hold at least one dense layer, got none")
    name = dense_block_backend(backend, x, layers, recompute=recompute, tail=tail)
    if (recompute == "bn_relu" and name == "eager" and x.device.type == "cpu" and torch.compiler.is_compiling()
            and not static_dims(*x.shape[2:])):
        # Inductor lowers the eager 1x1 conv on the CPU to a bmm whose output is a view, and a
        # kept bottleneck (a graph output) of dynamic height and width fails its stride
        # ordering ("cannot determine truth value of Relational") when a new image size
        # recompiles the block. Recomputing it instead gives the same numbers, in less memory.
        recompute = "bottleneck"
    cfg = _Config.build(layers, tail, x, name, recompute)
    # The block computes in x's dtype, also under autocast: eager PyTorch's batch norm is not
    # autocast (torchvision's block normalises the concatenation of x and the new features in
    # the promoted dtype, x's when it is float32), autocast casts only the convs' inputs, which
    # are normalised activations; casting x first would take the statistics of a rounded x. (An
    # x already in the autocast dtype, the output of an autocast conv, is the usual case.)
    # The conv weights go through the autocast dtype as autocast's convs cast them
    # (autocast_param): with a float32 x their gradients keep float16's rounding and overflow,
    # so a GradScaler skips the steps eager skips.
    dtype = x.dtype
    target = autocast_target_dtype(x.device) if autocast_enabled(x.device.type) else None
    tensors: List[Optional[Tensor]] = []
    for layer in layers:
        tensors += [_cast(layer.conv1_weight, dtype, target), layer.norm1.weight, layer.norm1.bias,
                    _cast(layer.conv2_weight, dtype, target), layer.norm2.weight, layer.norm2.bias]
    if tail is not None:
        tensors += [_cast(tail[1], dtype, target), tail[0].weight, tail[0].bias]
        cfg.pool_weight = None if tail[2] is None else _cast(tail[2], dtype)
    # The buffer comes back in x's dtype, as torch.cat of x and the new features; a tail's
    # output is its conv's: in the autocast dtype under autocast (never for float64).
    cfg.out_dtype = autocast_target_dtype(x.device) if tail is not None and dtype != torch.float64 \
        and autocast_enabled(x.device.type) else dtype
    if forward_ad_or_transform(x, *tensors):
        raise RuntimeError(FORWARD_AD_SHARED_BLOCK)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad
                                                                     for t in tensors))
    with _autocast_off(x.device.type), clone_on_mutate_suspended():
        if not needs_grad:
            out = _forward(cfg, x, tensors, None)[0]
            return out if out.dtype == cfg.out_dtype else out.to(cfg.out_dtype)
        return _SharedDenseBlockFunction.apply(cfg, x, *tensors)


# ----------------------------------------------------------------------------------------


@dataclass
class _Config:
    """Everything the Function needs that is not a differentiable tensor."""

    ops: object
    recompute: str
    c0: int
    growth: int
    num_layers: int
    has_tail: bool
    norms: List[BNArgs]  # norm1, norm2 per layer, then the tail norm
    conv2_args: List[List]  # (stride, padding, dilation, groups) of each conv3x3
    drop_rates: List[float]
    #: Eager backend: the memory budget of one backward call over a prefix, in channels of the
    #: block's positions (what the block keeps for its backward anyway: the feature buffer, plus
    #: the bottlenecks with ``recompute="bn_relu"``); a call is split into channel chunks only
    #: where its temporaries would exceed it. 0 = the whole prefix in one call (kernels that
    #: never materialise the normalised input).
    chunk_budget: int
    group: object = None  # the norm1s' (and tail norm's) SyncBN group
    pool_weight: Optional[Tensor] = None  # the pool-first tail's 2x2 averaging weight (a constant)
    #: The op set's optional ``bn_train_relu_conv2d`` (eager), used when no reader synchronises
    #: over a process group: each reader then takes its own statistics in the op that normalises.
    train_op: object = None
    #: The op set's optional ``(bn_relu_conv2d_stats, bn_stats_merge_update)`` (triton): each
    #: layer's conv1x1 takes its bottleneck's batch statistics in its epilogue, so norm2 needs no
    #: statistics pass over the bottleneck (one launch instead of two, no read of it).
    stats_ops: Optional[Tuple[object, object]] = None
    #: The op set's optional ``(bn_relu_conv2d_out_stats, bn_stats_merge_out)`` (triton): each
    #: layer's conv3x3 takes its new channels' batch statistics in its epilogue and the finalize
    #: writes them into the block's per-channel statistics (one launch instead of a statistics
    #: pass over the new channels and two copies), where no dropout follows it and no reader
    #: synchronises over a process group.
    out_stats_ops: Optional[Tuple[object, object]] = None
    #: The op set's optional ``bn_relu_conv2d_merge_out`` (triton): norm2's finalize, the conv3x3
    #: into the buffer and (with ``out_stats_ops``' conditions) the new channels' statistics in
    #: one call.
    merge_out_op: object = None
    #: The op set's optional ``bn_relu_conv2d_backward_pair`` (triton, native): a layer's two convs'
    #: backward (the conv3x3's, then the conv1x1's into the gradient buffer) in one call, where
    #: both norms take batch statistics without a process group and the prefix is one chunk.
    pair_op: object = None
    out_dtype: torch.dtype = torch.float32

    @staticmethod
    def build(layers: Sequence[DenseLayerArgs], tail, x: Tensor, backend: str, recompute: str) -> "_Config":
        if x.dim() != 4:
            raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        c = x.shape[1]
        growth = layers[0].conv2_weight.shape[0]
        norms: List[BNArgs] = []
        for i, layer in enumerate(layers):
            w1, w2 = layer.conv1_weight, layer.conv2_weight
            if w1.dim() != 4 or w1.shape[1] != c or tuple(w1.shape[2:]) != (1, 1):
                raise ValueError(f"layer {i}: conv1 must be a 1x1 conv over the {c} channels the block holds at that "
                                 f"point, got weight of shape {tuple(w1.shape)}")
            if w2.dim() != 4 or w2.shape[1] != w1.shape[0]:
                raise ValueError(f"layer {i}: conv2 expects {w2.shape[1]} channels, conv1 gives {w1.shape[0]}")
            if w2.shape[0] != growth:
                raise ValueError(f"layer {i} has growth rate {w2.shape[0]}, layer 0 has {growth}; a shared dense "
                                 "block needs one growth rate")
            kh, kw = w2.shape[2:]
            pad, dil = list(layer.conv2_padding), list(layer.conv2_dilation)
            if any(2 * p != d * (k - 1) for p, d, k in zip(pad, dil, (kh, kw))):
                raise ValueError(f"layer {i}: conv2 must keep the spatial size (stride 1, 'same' padding), got kernel "
                                 f"{(kh, kw)}, padding={pad}, dilation={dil}")
            norms += [layer.norm1, layer.norm2]
            c += growth
        if tail is not None:
            wt = tail[1]
            if wt.dim() != 4 or wt.shape[1] != c or tuple(wt.shape[2:]) != (1, 1):
                raise ValueError(f"the transition conv must be a 1x1 conv over the block's {c} channels, got weight "
                                 f"of shape {tuple(wt.shape)}")
            norms.append(tail[0])
        readers = [layer.norm1 for layer in layers] + ([tail[0]] if tail is not None else [])
        groups: List[Any] = []  # distinct by identity (not id(): torch 2.11's dynamo cannot trace id(None))
        for r in readers:
            if r.batch_stats and not any(g is r.process_group for g in groups):
                groups.append(r.process_group)
        if len(groups) > 1:
            raise ValueError("every norm1 of a shared dense block (and its transition's norm) must synchronise over "
                             "the same process group, since they share the channels' batch statistics")
        ops = get_ops(backend)
        group = groups[0] if groups else None
        return _Config(
            ops=ops, recompute=recompute, c0=x.shape[1], growth=growth, num_layers=len(layers),
            has_tail=tail is not None, norms=norms,
            conv2_args=[[_ONE, list(layer.conv2_padding), list(layer.conv2_dilation), 1] for layer in layers],
            drop_rates=[float(layer.drop_rate) for layer in layers],
            chunk_budget=_chunk_budget(layers, c, recompute) if backend == "eager" else 0,
            group=group,
            train_op=getattr(ops, "bn_train_relu_conv2d", None) if group is None else None,
            stats_ops=_stats_ops(ops) if _chains(ops) else None,
            out_stats_ops=_stats_ops(ops, ("bn_relu_conv2d_out_stats", "bn_stats_merge_out")) if _chains(ops) else None,
            merge_out_op=_merge_out_op(ops),
            pair_op=getattr(ops, "bn_relu_conv2d_backward_pair", None),
        )


_CONV1 = [_ONE, _ZERO, _ONE, 1]


def _chains(ops) -> bool:
    """Whether the block takes a layer's statistics in its convs' epilogues (where the op set
    has the ops: triton): by the planner's rule for a producer conv
    (:func:`resfast.ops.triton_ops.stats_epilogue_pays`; a dense layer's convs are ungrouped),
    unless ``triton_ops.DENSE_CHAIN`` says otherwise."""
    if getattr(ops, "bn_relu_conv2d_stats", None) is None:
        return False
    from resfast.ops import triton_ops

    if triton_ops.DENSE_CHAIN is not None:
        return bool(triton_ops.DENSE_CHAIN)
    return triton_ops.stats_epilogue_pays(1)


def _merge_out_op(ops):
    return getattr(ops, "bn_relu_conv2d_merge_out", None)


def _stats_ops(ops, names=("bn_relu_conv2d_stats", "bn_stats_merge_update")) -> Optional[Tuple[object, object]]:
    stats, merge = (getattr(ops, name, None) for name in names)
    return (stats, merge) if stats is not None and merge is not None else None


def _chunk_budget(layers: Sequence[DenseLayerArgs], c_total: int, recompute: str) -> int:
    """The eager backward's memory budget per call over a prefix, in channels: what the block
    keeps stored for its backward (its ``c_total`` features, and each layer's bottleneck with
    ``recompute="bn_relu"``), so the temporaries of a call never more than double it.
    (densenet121's blocks keep their bottlenecks, so no call is split; with
    ``recompute="bottleneck"``, the smallest-memory mode, a call over more than a third of the
    block's channels is split.)"""
    kept = sum(layer.conv1_weight.shape[0] for layer in layers) if recompute == "bn_relu" else 0
    return c_total + kept


def _cast(t: Tensor, dtype: torch.dtype, target: Optional[torch.dtype] = None) -> Tensor:
    """``t`` in ``dtype``; with autocast's ``target`` dtype, through it first where ``dtype`` is
    another (:func:`resfast.ops.bn_relu_conv2d.autocast_param`)."""
    if target is not None:
        t = autocast_param(t, dtype, target)
    return t if t.dtype == dtype else t.to(dtype)


def _autocast_off(device_type: str):
    """Run the block's ops in the dtype chosen up front (autocast would re-cast them one by one).
    Only where autocast is on: an ``autocast(enabled=False)`` region that changes nothing still
    becomes a ``wrap_with_autocast`` node under ``torch.export``, which ``torch.export.save``
    writes but ``torch.export.load`` refuses ("Node.meta wrap_with_autocast is missing val
    field"): an exported eval model with a shared dense block could not be loaded."""
    if device_type in ("cpu", "cuda") and autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


#: Prefix-sized temporaries alive at once in one eager backward call over a prefix (a dense
#: copy of a prefix view, the activation and its gradient; then the ReLU and input gradients).
_TEMPS_PER_CALL = 3
#: ... and in the recomputation of a bottleneck (the dense copy, then the activation).
_TEMPS_PER_RECOMPUTE = 2


def _chunks(c: int, budget: int, temps: int = _TEMPS_PER_CALL) -> List[Tuple[int, int]]:
    """``[0, c)`` in the fewest equal pieces whose temporaries (``temps`` copies of a piece)
    fit in ``budget`` channels; one piece when ``budget`` is 0."""
    pieces = -(-temps * c // budget) if budget else 1
    if pieces <= 1:
        return [(0, c)]
    size = -(-c // pieces)
    return [(a, min(a + size, c)) for a in range(0, c, size)]


def _channels(t: Optional[Tensor], a: int, b: int) -> Optional[Tensor]:
    return None if t is None else t[a:b]


def _prefix_bn_relu_conv(ops, x: Tensor, w: Tensor, gamma, beta, mean, invstd, chunks) -> Tensor:
    """``conv1x1(relu(bn(x)))`` as a sum over input-channel chunks (one call when ``chunks`` has one)."""
    if len(chunks) == 1:
        return ops.bn_relu_conv2d(x, w, None, gamma, beta, mean, invstd, *_CONV1, False)
    out = None
    for a, c in chunks:
        part = ops.bn_relu_conv2d(x[:, a:c], w[:, a:c], None, _channels(gamma, a, c),
                                  _channels(beta, a, c), mean[a:c], invstd[a:c], *_CONV1, False)
        if out is None:
            # Low-precision partial sums are added in float32, as a single conv would accumulate them.
            out = part.float() if part.dtype in _LOW else part
        else:
            out.add_(part)
        del part
    return out.to(x.dtype)


def _layer_stats(ops, t: Tensor, bn: BNArgs, snapshot: bool) -> Tuple[Tensor, Tensor, int]:
    """``(mean, invstd, count)`` of a BN reading all of ``t``; the running statistics updated
    when the BN uses batch statistics, else its running statistics normalise (copied when
    ``snapshot``: the backward must see the forward's statistics)."""
    if not bn.batch_stats:
        mean, invstd = normalize_with(bn.running_mean, bn.running_var, bn.eps, acc_dtype(t), snapshot)
        return mean, invstd, 1
    if bn.process_group is not None:
        mean, var, count = sync_batch_stats(ops, t, bn.process_group)
        update_running_stats(bn.running_mean, bn.running_var, mean, var, count, bn.momentum)
        return mean, torch.rsqrt(var + bn.eps), count
    mean, invstd = ops.bn_stats_update(t, bn.running_mean, bn.running_var, bn.momentum, bn.eps)
    return mean, invstd, t.numel() // t.shape[1]


def _channel_stats(ops, t: Tensor, group) -> Tuple[Tensor, Tensor, int]:
    if group is not None:
        return sync_batch_stats(ops, t, group)
    mean, var = ops.bn_stats(t)
    return mean, var, t.numel() // t.shape[1]


def _reader_params(bn: BNArgs, mean_all, var_all, c: int, acc, pending: List[Tuple[BNArgs, int]],
                   snapshot: bool, invstd_all: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """mean and invstd a prefix reader (norm1 or the tail's norm) normalises its ``c`` channels
    with; its running-statistics update (from the shared batch statistics) is queued in ``pending``.
    ``invstd_all``: the channels' inverse std with the eps every reader shares, kept as their
    statistics are written (triton), so a reader takes a view instead of two launches."""
    if not bn.batch_stats:
        return normalize_with(bn.running_mean, bn.running_var, bn.eps, acc, snapshot)
    if bn.running_mean is not None and bn.momentum != 0.0:
        pending.append((bn, c))
    if invstd_all is not None:
        return mean_all[:c], invstd_all[:c]
    return mean_all[:c], torch.rsqrt(var_all[:c] + bn.eps)


def _shared_eps(readers: Sequence[BNArgs]) -> Optional[float]:
    """The eps every reader that normalises with batch statistics uses, or None if they differ."""
    eps = {float(r.eps) for r in readers if r.batch_stats}
    return eps.pop() if len(eps) == 1 else None


def _apply_running_updates(pending: List[Tuple[BNArgs, int]], mean_all: Tensor, var_all: Tensor,
                           count: int) -> None:
    """The running-statistics updates of the block's prefix readers, applied together once the
    block's statistics are complete: a handful of ``torch._foreach_*`` launches for the whole
    block instead of several per layer. (In training every reader normalises with the batch
    statistics, so no forward computation reads a running statistic before it is updated.)
    The statistics are detached instead of a ``no_grad`` region (the running buffers never
    require grad): under ``torch.export`` a ``no_grad`` region, even an empty one, becomes a
    ``wrap_with_set_grad_enabled`` node that ``torch.export.save`` writes and
    ``torch.export.load`` refuses ("Node.meta wrap_with_set_grad_enabled is missing val
    field"), so an exported model with a shared dense block could not be loaded."""
    if not pending:
        return
    mean_all, var_all = mean_all.detach(), var_all.detach()
    unbiased = unbiased_var(var_all, count)
    rms = [bn.running_mean for bn, _ in pending]
    rvs = [bn.running_var for bn, _ in pending]
    keep = [1.0 - bn.momentum for bn, _ in pending]
    moms = [bn.momentum for bn, _ in pending]
    means = [mean_all[:c].to(bn.running_mean.dtype) for bn, c in pending]
    varis = [unbiased[:c].to(bn.running_var.dtype) for bn, c in pending]
    torch._foreach_mul_(rms, keep)
    torch._foreach_add_(rms, torch._foreach_mul(means, moms))
    torch._foreach_mul_(rvs, keep)
    torch._foreach_add_(rvs, torch._foreach_mul(varis, moms))


@dataclass
class _Saved:
    """What the backward needs besides the feature buffer (small except the bottlenecks and masks)."""

    mean1: List[Tensor] = field(default_factory=list)
    invstd1: List[Tensor] = field(default_factory=list)
    mean2: List[Tensor] = field(default_factory=list)
    invstd2: List[Tensor] = field(default_factory=list)
    bottlenecks: List[Optional[Tensor]] = field(default_factory=list)
    masks: List[Optional[Tensor]] = field(default_factory=list)
    count: int = 1
    count2: List[int] = field(default_factory=list)
    mean_t: Optional[Tensor] = None
    invstd_t: Optional[Tensor] = None


def _forward(cfg: _Config, x: Tensor, tensors: List[Optional[Tensor]], saved: Optional[_Saved]):
    """The block forward; fills ``saved`` for the backward when given. Returns
    ``(buf or tail_out, buf)``."""
    ops, k, c0, n_layers = cfg.ops, cfg.growth, cfg.c0, cfg.num_layers
    n, _, h, w = x.shape
    c_tot = c0 + n_layers * k
    acc = acc_dtype(x)
    keep = saved is not None  # a backward will run: eval statistics are snapshots, not aliases
    buf = torch.empty((n, c_tot, h, w), dtype=x.dtype, device=x.device, memory_format=out_memory_format(x))
    buf[:, :c0].copy_(x)
    readers = [cfg.norms[2 * i] for i in range(n_layers)] + ([cfg.norms[-1]] if cfg.has_tail else [])
    train_op = cfg.train_op
    # Without an op that takes its own statistics, a channel's statistics are taken once, when
    # it is written, and shared by every later reader.
    shared_stats = any(r.batch_stats for r in readers) and train_op is None
    mean_all = var_all = invstd_all = None
    count = n * h * w if train_op is not None else 1
    pending: List[Tuple[BNArgs, int]] = []
    eps = _shared_eps(readers)
    if shared_stats:
        mean_all = torch.empty(c_tot, dtype=acc, device=x.device)
        var_all = torch.empty_like(mean_all)
        m, v, count = _channel_stats(ops, buf[:, :c0], cfg.group)
        mean_all[:c0], var_all[:c0] = m, v
        if eps is not None and cfg.out_stats_ops is not None and acc == torch.float32:
            # the readers' inverse std, kept with the statistics (the finalize writes the new
            # channels'): each reader takes a view, not an add and an rsqrt over its prefix
            invstd_all = torch.empty_like(mean_all)
            invstd_all[:c0] = torch.rsqrt(v + eps)

    for i in range(n_layers):
        c = c0 + i * k
        norm1, norm2 = cfg.norms[2 * i], cfg.norms[2 * i + 1]
        w1, g1, b1, w2, g2, b2 = tensors[6 * i: 6 * i + 6]
        # One call in the forward: its temporaries come while little is stored yet; the
        # backward, when the block's stores are all alive, works in chunks where memory asks.
        partials = None  # norm2's statistics from conv1's epilogue (triton)
        if train_op is not None and norm1.batch_stats:
            bott, mean1, invstd1 = _train_call(train_op, norm1, buf[:, :c], w1, g1, b1, _CONV1)
        else:
            mean1, invstd1 = _reader_params(norm1, mean_all, var_all, c, acc, pending, keep, invstd_all)
            if cfg.stats_ops is not None and norm2.batch_stats and norm2.process_group is None:
                bott, partials = cfg.stats_ops[0](buf[:, :c], w1, None, g1, b1, mean1, invstd1, *_CONV1, False)
            else:
                bott = _prefix_bn_relu_conv(ops, buf[:, :c], w1, g1, b1, mean1, invstd1, [(0, c)])
        new = buf[:, c:c + k]
        p = cfg.drop_rates[i]
        read_later = shared_stats and (i < n_layers - 1 or cfg.has_tail)  # a later reader normalises new
        # new's statistics from conv3x3's epilogue (triton), written where the readers find them
        new_partials = None
        new_stats_in_epilogue = (read_later and p == 0 and cfg.group is None and cfg.out_stats_ops is not None
                                 and mean_all.dtype == torch.float32)
        new_stats_done = False
        if train_op is not None and norm2.batch_stats and norm2.process_group is None:
            _, mean2, invstd2 = _train_call(train_op, norm2, bott, w2, g2, b2, cfg.conv2_args[i], out=new)
            count2 = bott.numel() // bott.shape[1]
        elif partials is not None and cfg.merge_out_op is not None:
            # (triton) norm2's finalize, the conv3x3 into the buffer and the new channels'
            # statistics in one call
            count2 = bott.numel() // bott.shape[1]
            into = (mean_all[c:c + k], var_all[c:c + k], None if invstd_all is None else invstd_all[c:c + k]) \
                if new_stats_in_epilogue else (None, None, None)
            mean2, invstd2 = cfg.merge_out_op(bott, partials, count2, norm2.running_mean, norm2.running_var,
                                              norm2.momentum, norm2.eps, w2, g2, b2, *cfg.conv2_args[i], new, *into,
                                              0.0 if eps is None else eps)
            new_stats_done = new_stats_in_epilogue
            del partials
        else:
            if partials is not None:
                count2 = bott.numel() // bott.shape[1]
                mean2, invstd2 = cfg.stats_ops[1](partials, count2, norm2.running_mean, norm2.running_var,
                                                  norm2.momentum, norm2.eps)
                del partials
            else:
                mean2, invstd2, count2 = _layer_stats(ops, bott, norm2, keep)
            if new_stats_in_epilogue:
                new_partials = cfg.out_stats_ops[0](bott, w2, None, g2, b2, mean2, invstd2, *cfg.conv2_args[i], new)
            else:
                ops.bn_relu_conv2d_out(bott, w2, None, g2, b2, mean2, invstd2, *cfg.conv2_args[i], new)
        mask = _dropout_(new, p) if p > 0 else None
        if new_partials is not None:
            cfg.out_stats_ops[1](new_partials, n * h * w, mean_all[c:c + k], var_all[c:c + k],
                                 None if invstd_all is None else invstd_all[c:c + k], 0.0 if eps is None else eps)
            del new_partials
        elif read_later and not new_stats_done:
            m, v, _ = _channel_stats(ops, new, cfg.group)
            mean_all[c:c + k], var_all[c:c + k] = m, v
            if invstd_all is not None:
                invstd_all[c:c + k] = torch.rsqrt(v + eps)
        if saved is not None:
            saved.mean1.append(mean1)
            saved.invstd1.append(invstd1)
            saved.mean2.append(mean2)
            saved.invstd2.append(invstd2)
            saved.count2.append(count2)
            saved.bottlenecks.append(bott if cfg.recompute == "bn_relu" else None)
            saved.masks.append(mask)
        del bott

    if saved is not None:
        saved.count = count
    if not cfg.has_tail:
        _apply_running_updates(pending, mean_all, var_all, count)
        return buf, buf
    wt, gt, bt = tensors[6 * n_layers: 6 * n_layers + 3]
    norm_t = cfg.norms[-1]
    # the tail's fused op: the 1x1 conv itself, or the BN-ReLU-pool before the 1x1 conv
    if train_op is not None and norm_t.batch_stats:
        w_fused, args = (wt, _CONV1) if cfg.pool_weight is None else (cfg.pool_weight, _pool_args(c_tot))
        out, mean_t, invstd_t = _train_call(train_op, norm_t, buf, w_fused, gt, bt, args)
    else:
        mean_t, invstd_t = _reader_params(norm_t, mean_all, var_all, c_tot, acc, pending, keep, invstd_all)
        _apply_running_updates(pending, mean_all, var_all, count)
        if cfg.pool_weight is None:
            out = _prefix_bn_relu_conv(ops, buf, wt, gt, bt, mean_t, invstd_t, [(0, c_tot)])
        else:
            out = _pooled(ops, cfg, buf, gt, bt, mean_t, invstd_t)
    if cfg.pool_weight is not None:
        out = conv2d(out, wt, None, _ONE, _ZERO, _ONE, 1)
    if saved is not None:
        saved.mean_t, saved.invstd_t = mean_t, invstd_t
    return out, buf


def _train_call(train_op, bn: BNArgs, x: Tensor, w: Tensor, gamma, beta, conv_args, out: Optional[Tensor] = None):
    """``conv(relu(bn(x)))`` with ``x``'s own batch statistics through the op set's optional
    ``bn_train_relu_conv2d`` (running statistics updated): ``(y or None, mean, invstd)``."""
    return train_op(x, w, None, gamma, beta, bn.running_mean, bn.running_var, bn.momentum, bn.eps, *conv_args, out)


def _pool_args(c: int) -> List:
    return [[2, 2], _ZERO, _ONE, c]


def _pooled(ops, cfg: "_Config", buf: Tensor, gamma, beta, mean, invstd) -> Tensor:
    """``avgpool2x2(relu(bn(buf)))`` as one fused depthwise 2x2 stride-2 op (weights 1/4)."""
    return ops.bn_relu_conv2d(buf, cfg.pool_weight, None, gamma, beta, mean, invstd, *_pool_args(buf.shape[1]), False)


def _dropout_(new: Tensor, p: float) -> Tensor:
    """In-place dropout of ``new`` drawn exactly as ``F.dropout`` draws it on the CPU
    (``bernoulli_(1 - p)`` on a tensor like the conv output, then ``/(1 - p)``); returns the
    keep-mask as ``bool`` for the backward."""
    if p >= 1:
        new.zero_()
        return torch.zeros(new.shape, dtype=torch.bool, device=new.device)
    noise = torch.empty(new.shape, dtype=new.dtype, device=new.device,
                        memory_format=out_memory_format(new)).bernoulli_(1 - p)
    mask = noise.bool()
    new.mul_(noise.div_(1 - p))
    return mask


class _SharedDenseBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Config, x: Tensor, *tensors):
        saved = _Saved()
        out, buf = _forward(cfg, x, list(tensors), saved)
        n = cfg.num_layers
        # The buffer, parameters and masks go through save_for_backward: autograd frees them
        # after the backward (and keeps them for a second one with retain_graph=True). The
        # bottlenecks stay on ctx: the backward drops each one as soon as its layer is done
        # (the block's backward peak then holds one fewer), and a second backward over the same
        # graph recomputes them from the buffer. Under saved-tensor hooks (save_on_cpu,
        # activation offloading or compression, a checkpoint around the block) they are saved
        # like the buffer instead, so the hooks see everything the block keeps (on ctx they
        # stayed on the device, the larger part of the block's store).
        hooked = _saved_tensor_hooks_active()
        kept = [b for b in saved.bottlenecks if b is not None] if hooked else []
        ctx.save_for_backward(buf, *tensors, *saved.masks, *kept)
        if kept:
            saved.bottlenecks = [None] * n
        saved.masks = [None] * n
        ctx.cfg, ctx.saved, ctx.num_tensors, ctx.num_kept = cfg, saved, len(tensors), len(kept)
        # The buffer is the block's output, which its backward reads: changed in place before
        # the backward (y.relu_(), y += skip) autograd raises its generic version error, and
        # under saved-tensor hooks (which autograd does not check) with a hook that keeps the
        # tensor itself the backward would read the changed features (silently wrong
        # gradients). The backward checks it first, with a message that says why and what to
        # do (_check_buffer).
        # (not while torch.compile traces: autograd checks a compiled graph's saved tensors)
        ctx.buf_ref = None if torch.compiler.is_compiling() else (weakref.ref(buf), buf._version)
        ctx.buf_hooked = hooked
        ctx.x_shape = tuple(x.shape)
        ctx.x_format = out_memory_format(x)
        ctx.device_type = x.device.type
        return out if out.dtype == cfg.out_dtype else out.to(cfg.out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_SHARED)
        with _autocast_off(ctx.device_type), clone_on_mutate_suspended():
            return (None, *_backward(ctx, grad_out))


def _backward(ctx, grad_out: Tensor):
    cfg: _Config = ctx.cfg
    saved: _Saved = ctx.saved
    if not ctx.buf_hooked:
        _check_buffer(ctx)  # before autograd's own check, which unpacking the saved buffer runs
    buf, *rest = ctx.saved_tensors
    if ctx.buf_hooked:
        _check_buffer(ctx, buf)  # (autograd does not check under the hooks)
    num_tensors, n_layers = ctx.num_tensors, cfg.num_layers
    tensors = rest[:num_tensors]
    bottlenecks = list(saved.bottlenecks)
    if ctx.num_kept:  # saved through the hooks (recompute="bn_relu" only: one per layer)
        bottlenecks = list(rest[len(rest) - ctx.num_kept:])
        rest = rest[:len(rest) - ctx.num_kept]
    # Each bottleneck is dropped from ctx once its layer is done (a second backward recomputes
    # it); not while torch.compile traces, which may not mutate what the forward left on ctx.
    release = not torch.compiler.is_compiling()
    masks = rest[num_tensors:]
    del rest
    ops, k, c0 = cfg.ops, cfg.growth, cfg.c0
    c_tot = buf.shape[1]
    grads: List[Optional[Tensor]] = [None] * len(tensors)
    grad_out = grad_out.to(buf.dtype)

    gbuf = torch.empty_like(buf)
    if cfg.has_tail:
        wt, gt, bt = tensors[6 * n_layers: 6 * n_layers + 3]
        chunks = _chunks(c_tot, cfg.chunk_budget)
        if cfg.pool_weight is None:
            grads[6 * n_layers: 6 * n_layers + 3] = _reader_backward(
                ops, grad_out, buf, gbuf, wt, gt, bt, saved.mean_t, saved.invstd_t, chunks,
                cfg.norms[-1].batch_stats, saved.count, cfg.group, accumulate=False)
        else:
            # The 1x1 conv's backward on the pooled activation (recomputed: nothing of it was
            # kept), then the fused BN-ReLU-pool's backward into the gradient buffer.
            pooled = _pooled(ops, cfg, buf, gt, bt, saved.mean_t, saved.invstd_t)
            grad_pooled, grad_wt, _ = conv2d_backward(grad_out, pooled, wt, _ONE, _ZERO, _ONE, 1, [True, True, False])
            del pooled
            _, ggt, gbt = _reader_backward(
                ops, grad_pooled, buf, gbuf, cfg.pool_weight, gt, bt, saved.mean_t, saved.invstd_t, chunks,
                cfg.norms[-1].batch_stats, saved.count, cfg.group, accumulate=False, depthwise_pool=True)
            grads[6 * n_layers: 6 * n_layers + 3] = [grad_wt, ggt, gbt]
            del grad_pooled
    else:
        gbuf.copy_(grad_out)
    del grad_out

    for i in reversed(range(n_layers)):
        c = c0 + i * k
        norm1, norm2 = cfg.norms[2 * i], cfg.norms[2 * i + 1]
        w1, g1, b1, w2, g2, b2 = tensors[6 * i: 6 * i + 6]
        # The new channels have received every later reader's contribution by now.
        grad_new = gbuf[:, c:c + k]
        if masks[i] is not None:
            grad_new = grad_new * masks[i].to(grad_new.dtype).div_(1 - cfg.drop_rates[i])
        mean1, invstd1 = saved.mean1[i], saved.invstd1[i]
        chunks1 = _chunks(c, cfg.chunk_budget)
        bott = bottlenecks[i]
        bottlenecks[i] = None
        if release:
            saved.bottlenecks[i] = None
        if bott is None:
            bott = _prefix_bn_relu_conv(ops, buf[:, :c], w1, g1, b1, mean1, invstd1,
                                        _chunks(c, cfg.chunk_budget, _TEMPS_PER_RECOMPUTE))

        if cfg.pair_op is not None and norm1.batch_stats and norm2.batch_stats and norm1.process_group is None \
                and norm2.process_group is None and len(chunks1) == 1 \
                and saved.count2[i] == saved.count == bott.numel() // bott.shape[1]:
            # both convs' backward in one op (the same launches as the two calls below)
            gw2, sdzx2, sdz2, gw1, sdzx1, sdz1 = cfg.pair_op(
                grad_new, bott, w2, g2, b2, saved.mean2[i], saved.invstd2[i], *cfg.conv2_args[i], buf[:, :c], w1,
                g1, b1, mean1, invstd1, *_CONV1, gbuf[:, :c], True)
            del grad_new, bott
            grads[6 * i: 6 * i + 6] = [gw1, bn_param_grad(sdzx1, g1), bn_param_grad(sdz1, b1),
                                       gw2, bn_param_grad(sdzx2, g2), bn_param_grad(sdz2, b2)]
            continue

        # conv3x3 backward, then the bottleneck BN's full backward (its statistics are its own).
        # One call: its temporaries are the size of the bottleneck, a tensor the forward held.
        grad_bott, gw2, _, ggamma2, gbeta2 = bn_relu_conv2d_backward(
            ops, grad_new, bott, w2, g2, b2, saved.mean2[i], saved.invstd2[i], cfg.conv2_args[i], norm2.batch_stats,
            saved.count2[i], norm2.process_group)
        del grad_new, bott

        # conv1x1 backward over the prefix, accumulated into the shared gradient buffer.
        grads[6 * i: 6 * i + 3] = _reader_backward(
            ops, grad_bott, buf[:, :c], gbuf[:, :c], w1, g1, b1, mean1, invstd1, chunks1, norm1.batch_stats,
            saved.count, cfg.group, accumulate=True)
        del grad_bott
        grads[6 * i + 3: 6 * i + 6] = [gw2, ggamma2, gbeta2]

    grad_x = torch.empty(ctx.x_shape, dtype=buf.dtype, device=buf.device, memory_format=ctx.x_format)
    grad_x.copy_(gbuf[:, :c0])
    del gbuf
    return (grad_x, *grads)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``, ``save_on_cpu``,
    a checkpoint) are in effect for tensors saved now (not asked while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _check_buffer(ctx, buf: Optional[Tensor] = None) -> None:
    """Raise when the block's output (its feature buffer, which the backward reads) was changed
    in place since the forward: ``buf`` None, before the saved tensors are unpacked (autograd
    would raise its generic version error there); else the buffer saved-tensor hooks gave back,
    when it is the forward's buffer itself or a view of it (a hook that kept a copy made at pack
    time gives the forward's values: no error)."""
    if getattr(ctx, "buf_ref", None) is None:
        return
    ref, version = ctx.buf_ref
    orig = ref()
    if orig is None or orig._version == version:
        return
    if buf is not None and buf.untyped_storage().data_ptr() != orig.untyped_storage().data_ptr():
        return
    raise RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace operation: the "
        f"shared dense block's output (its feature buffer, {tuple(orig.shape)}) is at version {orig._version}; "
        f"expected version {version}. DenseBlock(memory='shared') keeps its output for the backward (that is how "
        "it saves memory), so an in-place change of it (y.relu_(), y += skip, F.relu(y, inplace=True)) before "
        "the backward is refused. Change a copy (y = y.clone(), or an out-of-place op such as torch.relu(y) or "
        "y = y + skip), or use DenseBlock(memory='naive') or memory='checkpoint', whose output the backward does "
        "not read")


def _reader_backward(ops, grad_y, x, gx_buf, w, gamma, beta, mean, invstd, chunks, batch_stats, count, group,
                     accumulate: bool, depthwise_pool: bool = False):
    """Backward of ``y = conv1x1(relu(bn(x)))`` (or, ``depthwise_pool``, of the fused 2x2
    average pool ``y = avgpool(relu(bn(x)))``) for one reader of the buffer prefix ``x``:
    dL/dx written into (``accumulate``: added to) ``gx_buf`` chunk by chunk of channels (a
    chunk's BN sums are complete since chunks partition the channels); returns the grads of
    ``(w, gamma, beta)``."""
    gws, ggs, gbs = [], [], []
    for a, e in chunks:
        if depthwise_pool:
            args, w_chunk, gy = _pool_args(e - a), w[a:e], grad_y[:, a:e]
        else:
            args, w_chunk, gy = _CONV1, w[:, a:e], grad_y
        _, gw, _, gg, gb = bn_relu_conv2d_backward(
            ops, gy, x[:, a:e], w_chunk, _channels(gamma, a, e), _channels(beta, a, e), mean[a:e],
            invstd[a:e], args, batch_stats, count, group, grad_x_out=gx_buf[:, a:e], accumulate=accumulate,
            weight_grad=not depthwise_pool)
        gws.append(gw)
        ggs.append(gg)
        gbs.append(gb)
    return [_join(gws, 0 if depthwise_pool else 1), _join(ggs, 0), _join(gbs, 0)]


def _join(parts: List[Optional[Tensor]], dim: int) -> Optional[Tensor]:
    if parts[0] is None:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def dense_block_backend(requested: str, x: Tensor, layers: Sequence, *, recompute: str, tail=None) -> str:
    """The backend :func:`resfast.ops.dense_block.shared_dense_block` runs a block on; one
    choice per block (its whole forward and backward measured as one call).

    The signature: dtype, autocast dtype, strides class, N, C0, H, W, number of layers,
    growth rate, bottleneck width, conv3x3 kernel / padding / dilation, training (batch
    statistics), whether gradients are needed, recompute mode, the transition conv's output
    channels (0 without one) and whether it pools first, affine and dropout. The runner runs
    the block with the candidate backend on scratch input; the parameters are used read-only
    through detached leaves, the BatchNorms without running statistics (scratch copies in
    eval mode), gradients by ``torch.autograd.grad``. The probe's small call: a block of at
    most 2 layers on batch 1, at most 2 x 2 positions, at most 32 input channels, growth 8 and
    bottleneck 32, with scratch parameters and no transition tail.
    """
    if requested != "auto" or not autotune_enabled():
        return resolve_backend(requested, x.device)
    if not isinstance(x, Tensor) or x.dim() != 4 or len(layers) == 0:
        return static_choice(x.device if isinstance(x, Tensor) else "cpu")
    n, c0, h, w = x.shape
    first = layers[0]
    growth, _, kh, kw = first.conv2_weight.shape
    bottleneck = first.conv1_weight.shape[0]
    c_tail = tail[1].shape[0] if tail is not None else 0
    if torch.compiler.is_compiling() and not static_dims(n, c0, h, w, growth, kh, kw, bottleneck, c_tail):
        return static_choice(x.device)
    if n == 0:
        return static_choice(x.device)
    params = [t for layer in layers for t in (layer.conv1_weight, layer.norm1.weight, layer.norm1.bias,
                                              layer.conv2_weight, layer.norm2.weight, layer.norm2.bias)]
    if tail is not None:
        params += [tail[1], tail[0].weight, tail[0].bias]
    grad = torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in params))
    signature: Signature = (
        ("dtype", str(x.dtype).replace("torch.", "")), ("autocast", autocast_dtype(x)),
        ("layout", strides_class(x)), ("N", n), ("C", c0), ("H", h), ("W", w), ("layers", len(layers)),
        ("growth", growth), ("bottleneck", bottleneck), ("kernel", (kh, kw)),
        ("padding", as_pair(first.conv2_padding)), ("dilation", as_pair(first.conv2_dilation)),
        ("training", bool(first.norm1.batch_stats)), ("grad", bool(grad)), ("recompute", recompute),
        ("tail", c_tail), ("tail_pool", tail is not None and len(tail) > 2 and tail[2] is not None),
        ("affine", first.norm1.weight is not None),
        ("dropout", any(float(layer.drop_rate) > 0 for layer in layers)),
    )

    def make_runner(name: str, small: bool) -> Runner:
        leaves: List[Tensor] = []

        def p(t: Optional[Tensor], shape=None) -> Optional[Tensor]:
            """The parameter itself, detached (read-only); a scratch one of ``shape`` for the probe."""
            if t is None:
                return None
            if shape is not None:
                d = scratch_param(t, shape, grad)
            else:
                d = t.detach()
                d.requires_grad_(grad and t.requires_grad)
            if d.requires_grad:
                leaves.append(d)
            return d

        def bn(a, c=None) -> BNArgs:
            keep = not a.batch_stats
            if c is None:
                return BNArgs(p(a.weight), p(a.bias), a.running_mean.clone() if keep else None,
                              a.running_var.clone() if keep else None, a.batch_stats, a.momentum, a.eps, None)
            rm = a.running_mean.new_zeros(c) if keep else None
            rv = a.running_var.new_ones(c) if keep else None
            return BNArgs(p(a.weight, (c,)), p(a.bias, (c,)), rm, rv, a.batch_stats, a.momentum, a.eps, None)

        if small:
            hp, wp = min(h, PROBE_POSITIONS), min(w, PROBE_POSITIONS)
            cp, kp, bp = min(c0, PROBE_CHANNELS), min(growth, 8), min(bottleneck, PROBE_CHANNELS)
            sx = scratch(x, (probe_batch(n, hp * wp, first.norm1.batch_stats), cp, hp, wp))
            slayers = [DenseLayerArgs(bn(layer.norm1, cp + i * kp), p(layer.conv1_weight, (bp, cp + i * kp, 1, 1)),
                                      bn(layer.norm2, bp), p(layer.conv2_weight, (kp, bp, kh, kw)),
                                      list(layer.conv2_padding), list(layer.conv2_dilation), float(layer.drop_rate))
                       for i, layer in enumerate(layers[:2])]
            stail = None
        else:
            sx = scratch(x)
            slayers = [DenseLayerArgs(bn(layer.norm1), p(layer.conv1_weight), bn(layer.norm2), p(layer.conv2_weight),
                                      list(layer.conv2_padding), list(layer.conv2_dilation), float(layer.drop_rate))
                       for layer in layers]
            # The tail: (norm, conv weight[, constant pooling weight, passed as it is]).
            stail = (bn(tail[0]), p(tail[1]), *tail[2:]) if tail is not None else None
        if grad and x.requires_grad:
            sx.requires_grad_(True)
            leaves.append(sx)
        return training_runner(lambda: shared_dense_block(sx, slayers, backend=name, recompute=recompute, tail=stail),
                               leaves, grad)

    return pick_backend(requested, x.device, "shared_dense_block", signature, make_runner)
