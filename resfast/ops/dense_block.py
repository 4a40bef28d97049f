"""The shared-buffer dense block: one autograd Function over the op set of any backend.

Kernel 2 of DESIGN.md. Per forward, one buffer ``N x (C0 + L*k) x H x W`` (in ``x``'s
memory format) holds every feature of the block:

* ``x`` is copied into channels ``[0, C0)``;
* layer ``l``'s BN-ReLU-conv1x1 reads the channel prefix ``[0, C0 + l*k)`` of the buffer in
  place (``ops.bn_relu_conv2d`` on a prefix view), and its BN-ReLU-conv3x3 writes its ``k``
  new channels straight into ``[C0 + l*k, C0 + (l+1)*k)`` (``ops.bn_relu_conv2d_out``);
  there is no ``torch.cat`` anywhere;
* a channel's batch statistics are computed once, when the channel is written
  (``ops.bn_stats`` on the new slice), and reused by every later layer: only gamma and beta
  differ from layer to layer, so the statistics cost is linear in depth;
* each BatchNorm's running statistics are updated exactly once per forward.

The backward recomputes the normalised features through the op set
(``ops.bn_relu_conv2d_backward`` for every BN-ReLU-conv, ``ops.bn_backward_elemt`` for
every BN) and accumulates the input gradient of every layer into ONE gradient buffer of
the block's size (no per-layer copies of the concatenation's gradient).

``recompute="bn_relu"`` keeps each layer's conv1x1 output (the bottleneck) for the
backward; ``recompute="bottleneck"`` recomputes it as well, for the smallest memory.

Dropout (``drop_rate > 0``, training) draws its mask exactly as ``F.dropout`` does on the
CPU and keeps it as a ``bool`` tensor (1 byte per element of the new features) for the
backward, so no RNG state has to be replayed.

On the eager backend (plain PyTorch ops that materialise their intermediates) every
backward BN-ReLU-conv over a prefix (and the bottleneck recomputation) is split into chunks of ``growth_rate`` input channels (the
conv is linear in its input channels: partial outputs add up, and the input-gradient of a
chunk only needs the weight columns of that chunk), so the temporaries of one call stay
the size of one layer's new features. Triton and native kernels never materialise the
normalised input, and take the whole prefix in one call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from resfast.backends import get_ops, resolve_backend
from resfast.ops.bn_relu_conv2d import batch_norm_stats, update_running_stats
from resfast.ops.registration import out_memory_format

__all__ = ["shared_dense_block", "RECOMPUTE_MODES"]

RECOMPUTE_MODES = ("bn_relu", "bottleneck")
_LOW = (torch.float16, torch.bfloat16)


def shared_dense_block(
    x: Tensor,
    layers: Sequence[nn.Module],
    *,
    backend: str = "auto",
    recompute: str = "bn_relu",
    tail: Optional[Tuple[nn.Module, nn.Conv2d]] = None,
) -> Tensor:
    """Run a dense block on one shared feature buffer.

    Args:
        x: block input ``N x C0 x H x W`` (NCHW or channels_last).
        layers: the block's layers, each with ``norm1``, ``conv1`` (1x1), ``norm2``,
            ``conv2`` and ``drop_rate`` (as :class:`resfast.nn.dense.DenseLayer` and
            torchvision's ``_DenseLayer``).
        backend: ``"auto" | "eager" | "triton" | "native"``.
        recompute: ``"bn_relu"`` (keep the bottleneck outputs) or ``"bottleneck"``
            (recompute them in the backward too).
        tail: optional ``(norm, conv)`` of a following transition: the function then returns
            ``conv(relu(norm(features)))`` (normalised with the block's shared statistics),
            and the block's features are never a separate output, so no second gradient
            buffer of the block's size is needed.

    Returns:
        All features ``N x (C0 + L*k) x H x W`` (a drop-in for ``torch.cat(features, 1)``),
        or the tail conv's output when ``tail`` is given.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if len(layers) == 0:
        raise ValueError("layers must hold at least one dense layer, got none")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    c0 = layers[0].norm1.num_features
    if x.shape[1] != c0:
        raise ValueError(f"channel mismatch: x has {x.shape[1]} channels (shape {tuple(x.shape)}) but the dense "
                         f"block expects num_input_features={c0}")
    name = resolve_backend(backend, x.device)
    cfg = _Config.build(layers, tail, x, name, recompute)

    device_type = x.device.type
    dtype = _compute_dtype(x)
    x_c = x if x.dtype == dtype else x.to(dtype)
    tensors: List[Optional[Tensor]] = []
    for layer in layers:
        tensors += [_cast(layer.conv1.weight, dtype), layer.norm1.weight, layer.norm1.bias,
                    _cast(layer.conv2.weight, dtype), layer.norm2.weight, layer.norm2.bias]
    if tail is not None:
        tensors += [_cast(tail[1].weight, dtype), tail[0].weight, tail[0].bias]
    # Every BN's momentum (and num_batches_tracked) is decided once here, after validation.
    cfg.momenta = [_bn_momentum(bn) for bn in cfg.norms]

    needs_grad = torch.is_grad_enabled() and (x_c.requires_grad or any(t is not None and t.requires_grad
                                                                       for t in tensors))
    with _autocast_off(device_type):
        if not needs_grad:
            return _forward(cfg, x_c, tensors, None)[0]
        return _SharedDenseBlockFunction.apply(cfg, x_c, *tensors)


# ----------------------------------------------------------------------------------------


@dataclass
class _Config:
    """Everything the Function needs that is not a differentiable tensor."""

    ops: object
    backend: str
    recompute: str
    c0: int
    growth: int
    num_layers: int
    has_tail: bool
    norms: List[nn.Module]  # norm1, norm2 per layer, then the tail norm
    convs: List[nn.Conv2d]  # conv1, conv2 per layer, then the tail conv
    drop_rates: List[float]
    training: bool
    fine_chunks: bool
    group: object = None
    norm2_groups: List[object] = field(default_factory=list)
    momenta: List[Tuple[bool, float]] = field(default_factory=list)

    @staticmethod
    def build(layers, tail, x: Tensor, backend: str, recompute: str) -> "_Config":
        from resfast.nn.fused import sync_group

        norms, convs, drops = [], [], []
        c = layers[0].norm1.num_features
        growth = layers[0].conv2.out_channels
        for i, layer in enumerate(layers):
            n1, c1, n2, c2 = layer.norm1, layer.conv1, layer.norm2, layer.conv2
            if n1.num_features != c or c1.in_channels != c:
                raise ValueError(f"layer {i} expects {n1.num_features} input channels, but the block holds {c} "
                                 f"channels at that point")
            if c2.out_channels != growth:
                raise ValueError(f"layer {i} has growth rate {c2.out_channels}, layer 0 has {growth}; a shared "
                                 f"dense block needs one growth rate")
            _check_conv(c1, f"layer {i} conv1", kernel_one=True)
            _check_conv(c2, f"layer {i} conv2", kernel_one=False)
            if n2.num_features != c1.out_channels or c2.in_channels != c1.out_channels:
                raise ValueError(f"layer {i}: norm2/conv2 expect {c2.in_channels} channels, conv1 gives "
                                 f"{c1.out_channels}")
            norms += [n1, n2]
            convs += [c1, c2]
            drops.append(float(getattr(layer, "drop_rate", 0.0)) if layer.training else 0.0)
            c += growth
        if tail is not None:
            tn, tc = tail
            if tn.num_features != c or tc.in_channels != c:
                raise ValueError(f"the transition expects {tn.num_features} channels, the block gives {c}")
            _check_conv(tc, "transition conv", kernel_one=True)
            norms.append(tn)
            convs.append(tc)
        for bn in norms:
            if bn.training and not bn.track_running_stats and bn.running_mean is not None:
                raise ValueError("a BatchNorm with track_running_stats=False but running buffers is not supported")
        training = any(bn.training for bn in norms)
        readers = [norms[2 * i] for i in range(len(layers))] + ([norms[-1]] if tail is not None else [])
        groups = {id(sync_group(bn)): sync_group(bn) for bn in readers}
        if len(groups) > 1:
            raise ValueError("every norm1 of a shared dense block (and its transition's norm) must synchronise over "
                             "the same process group, since they share the channels' batch statistics")
        return _Config(
            ops=get_ops(backend), backend=backend, recompute=recompute, c0=layers[0].norm1.num_features,
            growth=growth, num_layers=len(layers), has_tail=tail is not None, norms=norms, convs=convs,
            drop_rates=drops, training=training, fine_chunks=backend == "eager",
            group=next(iter(groups.values())), norm2_groups=[sync_group(layer.norm2) for layer in layers],
        )


def _check_conv(conv: nn.Conv2d, what: str, kernel_one: bool) -> None:
    if conv.bias is not None:
        raise ValueError(f"{what} must have bias=False in a shared dense block")
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"{what} must be an ungrouped conv with numeric zero padding, got groups={conv.groups}, "
                         f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
    if kernel_one and (tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1)):
        raise ValueError(f"{what} must be a stride-1 1x1 conv, got kernel_size={conv.kernel_size}, "
                         f"stride={conv.stride}")
    if not kernel_one and tuple(conv.stride) != (1, 1):
        raise ValueError(f"{what} must keep the spatial size (stride 1), got stride={conv.stride}")


def _bn_momentum(bn: nn.Module) -> Tuple[bool, float]:
    from resfast.nn.fused import bn_momentum

    return bn_momentum(bn)


def _compute_dtype(x: Tensor) -> torch.dtype:
    dt = x.device.type
    try:
        enabled = torch.is_autocast_enabled(dt)
    except TypeError:
        enabled = torch.is_autocast_cpu_enabled() if dt == "cpu" else torch.is_autocast_enabled()
    if not enabled or not x.is_floating_point():
        return x.dtype
    try:
        return torch.get_autocast_dtype(dt)
    except (AttributeError, TypeError):
        return torch.get_autocast_cpu_dtype() if dt == "cpu" else torch.get_autocast_gpu_dtype()


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _autocast_off:
    """Run the block's ops in the dtype chosen up front (autocast would re-cast them one by one)."""

    def __init__(self, device_type: str):
        self.ctx = torch.autocast(device_type=device_type, enabled=False) if device_type in ("cpu", "cuda") else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(lo: int, hi: int, size: int, boundaries: Sequence[int] = ()) -> List[Tuple[int, int]]:
    """``[lo, hi)`` cut at ``boundaries`` and into pieces of at most ``size`` channels."""
    cuts = sorted({lo, hi, *[b for b in boundaries if lo < b < hi]})
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out += [(s, min(s + size, b)) for s in range(a, b, size)]
    return out


def _sl(t: Optional[Tensor], a: int, b: int) -> Optional[Tensor]:
    return None if t is None else t[a:b]


def _conv_args(conv: nn.Conv2d):
    return [list(conv.stride), list(conv.padding), list(conv.dilation), 1]


def _prefix_bn_relu_conv(ops, x: Tensor, w: Tensor, g, b, mean, invstd, conv_args, chunks) -> Tensor:
    """``conv(relu(bn(x)))`` as a sum over input-channel chunks (one call when ``chunks`` has one)."""
    if len(chunks) == 1:
        return ops.bn_relu_conv2d(x, w, None, g, b, mean, invstd, *conv_args, False)
    out = None
    for a, c in chunks:
        part = ops.bn_relu_conv2d(x[:, a:c], w[:, a:c].contiguous(), None, _sl(g, a, c), _sl(b, a, c), mean[a:c],
                                  invstd[a:c], *conv_args, False)
        if out is None:
            # Low-precision partial sums are added in float32, as a single conv would accumulate them.
            out = part.float() if part.dtype in _LOW else part
        else:
            out.add_(part)
        del part
    return out.to(x.dtype)


def _stats(ops, t: Tensor, group) -> Tuple[Tensor, Tensor, int]:
    return batch_norm_stats(ops, t, group)


def _norm_params(bn, use_batch: bool, mean_b: Optional[Tensor], var_b: Optional[Tensor], acc):
    """mean and invstd a BN normalises with: the (shared) batch statistics or its running ones."""
    if use_batch:
        return mean_b, torch.rsqrt(var_b + bn.eps)
    return bn.running_mean.to(acc), torch.rsqrt(bn.running_var.to(acc) + bn.eps)


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
    """The block forward; fills ``saved`` for the backward when given. Returns ``(buf or tail_out)``
    and, through ``saved``, what the backward needs."""
    ops, k, c0, n_layers = cfg.ops, cfg.growth, cfg.c0, cfg.num_layers
    n, _, h, w = x.shape
    c_tot = c0 + n_layers * k
    acc = _acc(x.dtype)
    buf = torch.empty((n, c_tot, h, w), dtype=x.dtype, device=x.device, memory_format=out_memory_format(x))
    buf[:, :c0].copy_(x)
    use_batch = [m[0] for m in cfg.momenta]
    readers_batch = any(use_batch[2 * i] for i in range(n_layers)) or (cfg.has_tail and use_batch[-1])
    mean_all = var_all = None
    count = 1
    if readers_batch:
        mean_all = torch.empty(c_tot, dtype=acc, device=x.device)
        var_all = torch.empty_like(mean_all)
        m, v, count = _stats(ops, buf[:, :c0], cfg.group)
        mean_all[:c0], var_all[:c0] = m, v

    for i in range(n_layers):
        c = c0 + i * k
        n1, n2 = cfg.norms[2 * i], cfg.norms[2 * i + 1]
        conv1, conv2 = cfg.convs[2 * i], cfg.convs[2 * i + 1]
        w1, g1, b1, w2, g2, b2 = tensors[6 * i: 6 * i + 6]
        ub1, mom1 = cfg.momenta[2 * i]
        ub2, mom2 = cfg.momenta[2 * i + 1]
        if ub1:
            update_running_stats(n1.running_mean, n1.running_var, mean_all[:c], var_all[:c], count, mom1)
        mean1, invstd1 = _norm_params(n1, ub1, None if mean_all is None else mean_all[:c],
                                      None if var_all is None else var_all[:c], acc)
        # One call in the forward: its temporaries come while little is stored yet; the
        # backward, when the block's stores are all alive, works in chunks.
        bott = _prefix_bn_relu_conv(ops, buf[:, :c], w1, g1, b1, mean1, invstd1, _conv_args(conv1), [(0, c)])
        count2 = 1
        if ub2:
            m2, v2, count2 = _stats(ops, bott, cfg.norm2_groups[i])
            update_running_stats(n2.running_mean, n2.running_var, m2, v2, count2, mom2)
            mean2, invstd2 = m2, torch.rsqrt(v2 + n2.eps)
        else:
            mean2, invstd2 = _norm_params(n2, False, None, None, acc)
        new = buf[:, c:c + k]
        ops.bn_relu_conv2d_out(bott, w2, None, g2, b2, mean2, invstd2, *_conv_args(conv2), new)
        p = cfg.drop_rates[i]
        mask = None
        if p > 0:
            mask = _dropout_(new, p)
        if readers_batch and (i < n_layers - 1 or cfg.has_tail):
            m, v, _ = _stats(ops, new, cfg.group)
            mean_all[c:c + k], var_all[c:c + k] = m, v
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
        return buf, buf, mean_all
    tn, tconv = cfg.norms[-1], cfg.convs[-1]
    wt, gt, bt = tensors[6 * n_layers: 6 * n_layers + 3]
    ubt, momt = cfg.momenta[-1]
    if ubt:
        update_running_stats(tn.running_mean, tn.running_var, mean_all, var_all, count, momt)
    mean_t, invstd_t = _norm_params(tn, ubt, mean_all, var_all, acc)
    out = _prefix_bn_relu_conv(ops, buf, wt, gt, bt, mean_t, invstd_t, _conv_args(tconv), [(0, c_tot)])
    if saved is not None:
        saved.mean_t, saved.invstd_t = mean_t, invstd_t
    return out, buf, mean_all


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
        out, buf, mean_all = _forward(cfg, x, list(tensors), saved)
        n = cfg.num_layers
        # Large tensors go through save_for_backward: autograd frees them after the backward
        # (and keeps them for a second one with retain_graph=True).
        ctx.save_for_backward(buf, mean_all, *tensors, *saved.bottlenecks, *saved.masks)
        saved.bottlenecks, saved.masks = [None] * n, [None] * n
        ctx.cfg, ctx.saved, ctx.num_tensors = cfg, saved, len(tensors)
        ctx.x_shape = tuple(x.shape)
        ctx.x_format = out_memory_format(x)
        ctx.device_type = x.device.type
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with _autocast_off(ctx.device_type):
            return (None, *_backward(ctx, grad_out))


def _allreduce_(t: Tensor, group) -> Tensor:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
    return t


def _backward(ctx, grad_out: Tensor):
    cfg: _Config = ctx.cfg
    saved: _Saved = ctx.saved
    buf, mean_all, *rest = ctx.saved_tensors
    n_t, n_l = ctx.num_tensors, cfg.num_layers
    tensors, bottlenecks, masks = rest[:n_t], list(rest[n_t:n_t + n_l]), rest[n_t + n_l:]
    del rest
    ops, k, c0, n_layers = cfg.ops, cfg.growth, cfg.c0, cfg.num_layers
    c_tot = buf.shape[1]
    acc = _acc(buf.dtype)
    dev = buf.device
    boundaries = [c0 + i * k for i in range(n_layers + 1)]
    use_batch = [m[0] for m in cfg.momenta]
    grads: List[Optional[Tensor]] = [None] * len(tensors)
    group = cfg.group
    grad_out = grad_out.to(buf.dtype)

    if cfg.has_tail:
        gbuf = torch.empty_like(buf)
        tconv = cfg.convs[-1]
        wt, gt, bt = tensors[6 * n_layers: 6 * n_layers + 3]
        chunks = _chunks(0, c_tot, k, boundaries) if cfg.fine_chunks else [(0, c_tot)]
        grads[6 * n_layers: 6 * n_layers + 3] = _reader_backward(
            ops, grad_out, buf, gbuf, wt, gt, bt, saved.mean_t, saved.invstd_t, _conv_args(tconv), chunks,
            use_batch[-1], saved.count, group, assign=True)
    else:
        gbuf = torch.empty_like(buf)
        gbuf.copy_(grad_out)
    del grad_out

    for i in reversed(range(n_layers)):
        c = c0 + i * k
        conv1, conv2 = cfg.convs[2 * i], cfg.convs[2 * i + 1]
        w1, g1, b1, w2, g2, b2 = tensors[6 * i: 6 * i + 6]
        ub1, ub2 = use_batch[2 * i], use_batch[2 * i + 1]
        # The new channels have received every later reader's contribution by now.
        g_new = gbuf[:, c:c + k]
        mask = masks[i]
        if mask is not None:
            p = cfg.drop_rates[i]
            g_new = g_new * mask.to(g_new.dtype).div_(1 - p)
        mean1, invstd1 = saved.mean1[i], saved.invstd1[i]
        chunks1 = _chunks(0, c, k, boundaries) if cfg.fine_chunks else [(0, c)]
        bott = bottlenecks[i]
        bottlenecks[i] = None
        if bott is None:
            bott = _prefix_bn_relu_conv(ops, buf[:, :c], w1, g1, b1, mean1, invstd1, _conv_args(conv1), chunks1)

        # conv3x3 backward, then the bottleneck BN's full backward (its statistics are its own).
        c_mid = bott.shape[1]
        chunks2 = _chunks(0, c_mid, k) if cfg.fine_chunks else [(0, c_mid)]
        g_bott = torch.empty_like(bott)
        gw2 = torch.empty_like(w2)
        gg2 = torch.empty(c_mid, dtype=acc, device=dev)
        gb2 = torch.empty(c_mid, dtype=acc, device=dev)
        mean2, invstd2 = saved.mean2[i], saved.invstd2[i]
        for a, e in chunks2:
            w2c = w2[:, a:e].contiguous() if (a, e) != (0, c_mid) else w2
            gz, gw, _, sdz, sdzx = ops.bn_relu_conv2d_backward(
                g_new, bott[:, a:e], w2c, _sl(g2, a, e), _sl(b2, a, e), mean2[a:e], invstd2[a:e],
                *_conv_args(conv2))
            gw2[:, a:e] = gw
            gg2[a:e], gb2[a:e] = sdzx, sdz
            mdz, mdzx = _mean_dz(sdz, sdzx, ub2, saved.count2[i], cfg.norm2_groups[i])
            g_bott[:, a:e] = ops.bn_backward_elemt(gz, bott[:, a:e], _sl(g2, a, e), mean2[a:e], invstd2[a:e],
                                                   mdz, mdzx)
            del gz
        del g_new, bott

        # conv1x1 backward over the prefix, accumulated into the shared gradient buffer.
        grads[6 * i: 6 * i + 3] = _reader_backward(
            ops, g_bott, buf[:, :c], gbuf[:, :c], w1, g1, b1, mean1, invstd1, _conv_args(conv1), chunks1, ub1,
            saved.count, group, assign=False)
        del g_bott
        grads[6 * i + 3: 6 * i + 6] = [gw2, _param_grad(gg2, g2), _param_grad(gb2, b2)]

    grad_x = torch.empty(ctx.x_shape, dtype=buf.dtype, device=dev, memory_format=ctx.x_format)
    grad_x.copy_(gbuf[:, :c0])
    del gbuf
    return (grad_x, *grads)


def _reader_backward(ops, grad_y, x, gx_buf, w, g, b, mean, invstd, conv_args, chunks, use_batch, count, group,
                     assign: bool):
    """Backward of ``y = conv1x1(relu(bn(x)))`` for one reader of the buffer prefix ``x``.

    Adds dL/dx into ``gx_buf`` (writes it when ``assign``), chunk by chunk of channels (a
    chunk's BN sums are complete since chunks partition the channels); returns the grads
    of ``(w, gamma, beta)``."""
    c = x.shape[1]
    acc = _acc(x.dtype)
    gw = torch.empty_like(w)
    gg = torch.empty(c, dtype=acc, device=x.device)
    gb = torch.empty(c, dtype=acc, device=x.device)
    for a, e in chunks:
        wc = w[:, a:e].contiguous() if (a, e) != (0, c) else w
        xc, gc, mc, ic = x[:, a:e], _sl(g, a, e), mean[a:e], invstd[a:e]
        gz, gwc, _, sdz, sdzx = ops.bn_relu_conv2d_backward(grad_y, xc, wc, gc, _sl(b, a, e), mc, ic, *conv_args)
        gw[:, a:e] = gwc
        gg[a:e], gb[a:e] = sdzx, sdz
        mdz, mdzx = _mean_dz(sdz, sdzx, use_batch, count, group)
        gx = ops.bn_backward_elemt(gz, xc, gc, mc, ic, mdz, mdzx)
        del gz
        if assign:
            gx_buf[:, a:e].copy_(gx)
        else:
            gx_buf[:, a:e].add_(gx)
        del gx
    return [gw, _param_grad(gg, g), _param_grad(gb, b)]


def _mean_dz(sdz: Tensor, sdzx: Tensor, use_batch: bool, count: int, group):
    """Per-channel means of dL/dz and dL/dz * xhat over the batch (all ranks of ``group``), or
    zeros when the BN normalised with running statistics."""
    if not use_batch:
        z = torch.zeros_like(sdz)
        return z, z
    tot = _allreduce_(torch.stack([sdz, sdzx]), group) / count
    return tot[0], tot[1]


def _param_grad(g: Tensor, param: Optional[Tensor]) -> Optional[Tensor]:
    return None if param is None else g.to(param.dtype)
