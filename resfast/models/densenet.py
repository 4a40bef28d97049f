"""DenseNet: ImageNet DenseNet-121/161/169/201/264 with torchvision's parameter names, and the
CIFAR DenseNet-BC models of Huang et al. (2017).

A torchvision ``densenet*`` ``state_dict`` loads into the resfast model of the same name with
``strict=True`` and gives the same outputs. Every model takes ``memory=`` (``"shared"``,
``"checkpoint"`` or ``"naive"``, see :class:`resfast.nn.dense.DenseBlock`), ``recompute=``,
``backend=``, ``num_classes=`` and ``drop_rate=``.

With ``memory="shared"`` the whole network stores little, not only the blocks: each
transition's BN-ReLU-conv1x1 runs inside its block's shared-buffer function, and the
ImageNet stem (conv-BN-ReLU-maxpool) keeps only its pooling's argmax (16-bit) and recomputes
its conv in the backward.
``"naive"`` and ``"checkpoint"`` run the network as torchvision does with
``memory_efficient=False`` / ``True``.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from resfast.backends import BackendOwner, check_backend_name
from resfast.models.registry import register_model
from resfast.nn.dense import DenseBlock, DenseMemoryOwner, Transition
from resfast.nn.unfused import refuse_script
from resfast.nn.batchnorm import bn_call, sync_group
from resfast.nn.fused import conv_pair, conv_padding, parameters_once
from resfast.nn.unfused import hooked_submodules, is_tracing, overridden, replaced_submodules
from resfast.ops.autograd import forward_ad_or_transform
from resfast.ops.bn_relu_conv2d import update_running_stats
from resfast.ops.validation import check_running_stats_no_grad

__all__ = [
    "DenseNet",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_bc100_k12",
    "densenet_bc250_k24",
    "densenet_bc190_k40",
    "densenet_bc",
]


class DenseNet(DenseMemoryOwner, BackendOwner, nn.Module):
    """DenseNet-BC (torchvision's ``DenseNet`` arguments and parameter names).

    Args:
        growth_rate, block_config, num_init_features, bn_size, drop_rate, num_classes,
            memory_efficient: as torchvision (``memory_efficient=True`` means
            ``memory="checkpoint"``).
        memory: ``"shared"`` (default), ``"checkpoint"`` or ``"naive"``; overrides
            ``memory_efficient``.
        recompute: ``"bn_relu"`` or ``"bottleneck"`` (with ``memory="shared"``).
        backend: ``"auto" | "eager" | "triton" | "native"``.
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or ``"cifar"`` (one 3x3
            conv, as in the paper's CIFAR models).
        compression: the transitions' channel factor (0.5 for DenseNet-BC).
        in_chans: input channels.
    """

    __prepare_scriptable__ = refuse_script  # torch.jit.script: a clear refusal

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0, num_classes: int = 1000,
                 memory_efficient: bool = False, *, memory: Optional[str] = None, recompute: str = "bn_relu",
                 backend: str = "auto", stem: str = "imagenet", compression: float = 0.5, in_chans: int = 3) -> None:
        super().__init__()
        # (checked by the properties; no blocks to pass them down to yet)
        self.memory = memory if memory is not None else ("checkpoint" if memory_efficient else "shared")
        self.recompute = recompute
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        if not block_config or any(not isinstance(n, int) or n < 1 for n in block_config):
            raise ValueError(f"block_config must be a non-empty sequence of positive ints, got {block_config!r}")
        self.stem = stem
        self.backend = check_backend_name(backend)
        self.in_chans = in_chans

        if stem == "imagenet":
            layers = [
                ("conv0", nn.Conv2d(in_chans, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        else:
            layers = [("conv0", nn.Conv2d(in_chans, num_init_features, kernel_size=3, stride=1, padding=1,
                                          bias=False))]
        self.features = nn.Sequential(OrderedDict(layers))
        num_features = num_init_features
        self.num_blocks = len(block_config)
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate, memory=self.memory,
                               recompute=self.recompute, backend=backend)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(math.floor(num_features * compression))
                self.features.add_module("transition%d" % (i + 1),
                                         Transition(num_features, out_features, backend=backend))
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.num_features = num_features
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward_features(self, x: Tensor) -> Tensor:
        if not is_tracing() and (not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans):
            raise ValueError(f"x must be an N x {self.in_chans} x H x W tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        f = self.features
        if type(f) is not nn.Sequential or hooked_submodules([("features", f)]) or overridden(f):
            # hooks on ``features`` (a forward hook that reads or changes the features), a class
            # of its own (fully_shard(model.features), FSDP's wrapper) or a forward set on it:
            # called as a module, as torchvision's DenseNet calls it (its children one by one
            # skipped them, trials 21 and 27)
            return f(x)
        x = self._stem(x)
        for i in range(1, self.num_blocks + 1):
            block = getattr(f, "denseblock%d" % i)
            if i < self.num_blocks:
                transition = getattr(f, "transition%d" % i)
                # a wrapped block (FSDP's FullyShardedDataParallel, checkpoint_wrapper) is called as a
                # module: its forward_with_transition, reached through the wrapper, skipped it
                x = block.forward_with_transition(x, transition) if isinstance(block, DenseBlock) \
                    else transition(block(x))
            else:
                x = block(x)
        return f.norm5(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The final ReLU, global average pooling and (unless ``pre_logits``) the classifier, on
        :meth:`forward_features`' output, which it leaves as it was (a ReLU in place zeroed the
        negative entries of the features a caller kept, trial 29)."""
        x = torch.flatten(F.adaptive_avg_pool2d(F.relu(x), (1, 1)), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def _stem(self, x: Tensor) -> Tensor:
        f = self.features
        if self.stem == "cifar":
            return f.conv0(x)
        with parameters_once(f.conv0, f.norm0):  # (read for the decision and for the call: computed once)
            return self._imagenet_stem(f, x)

    def _imagenet_stem(self, f: nn.Module, x: Tensor) -> Tensor:
        stem = [("conv0", f.conv0), ("norm0", f.norm0), ("relu0", f.relu0), ("pool0", f.pool0)]
        recompute = (not is_tracing() and self.memory == "shared" and torch.is_grad_enabled()
                     and f.conv0.weight.requires_grad and sync_group(f.norm0) is None
                     # a conv0 set to another padding_mode (or an uneven 'same') runs as the modules
                     and f.conv0.padding_mode == "zeros" and conv_padding(f.conv0) is not None
                     and not hooked_submodules(stem)
                     # a replaced conv0 / norm0 / relu0 / pool0 (a forward of its own) runs as the modules
                     and not replaced_submodules(stem)
                     # forward AD / torch.func / torch.jit.trace: _CompactStem has no forward-AD
                     # formula and cannot be traced; the modules can
                     and not torch.jit.is_tracing() and not forward_ad_or_transform(x, modules=(f.conv0, f.norm0)))
        if not recompute:
            return f.pool0(f.relu0(f.norm0(f.conv0(x))))
        return _recomputed_stem(f.conv0, f.norm0, f.pool0, x)


def _recomputed_stem(conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: nn.MaxPool2d, x: Tensor) -> Tensor:
    """conv-BN-ReLU-maxpool storing nothing of the stem's full-resolution activations.

    With batch statistics (training) the stem is :class:`_CompactStem`: only the pooling's
    argmax (16-bit where the plane allows) survives the forward, and the backward recomputes
    the conv alone. Otherwise (a BN normalising with its running statistics while gradients
    are wanted) the whole stem is checkpointed. The running statistics are updated once,
    outside, from the statistics the normalising op used."""
    # as eager batch_norm, before num_batches_tracked moves (never a None gradient for them)
    check_running_stats_no_grad(bn.running_mean, bn.running_var)
    call = bn_call(bn)
    if not call.batch_stats:
        # the recomputation normalises with the statistics of this forward (a snapshot), not
        # with what a training forward before the backward may have written into them
        rm, rv = call.running_mean.clone(), call.running_var.clone()
        # and with the conv's weight of this forward (torch.func.functional_call's substituted
        # weights are gone by the backward: conv(inp) there recomputed with the module's own),
        # passed as the checkpoint's arguments, which it saves: an in-place change of a
        # parameter before the backward raises, as through the modules, instead of recomputing
        # the stem with the new values

        def closure(inp: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor],
                    beta: Optional[Tensor]) -> Tensor:
            z = F.batch_norm(conv._conv_forward(inp, weight, bias), rm, rv, gamma, beta, False, 0.0, call.eps)
            return pool(F.relu(z, inplace=True))

        return cp.checkpoint(closure, x, conv.weight, conv.bias, call.weight, call.bias, use_reentrant=False)
    update = call.running_mean is not None and call.momentum != 0.0
    out, mean, invstd = _CompactStem.apply(x, conv.weight, conv.bias, call.weight, call.bias, call.eps,
                                           _conv_args(conv), _pool_args(pool))
    if update:  # (detached, not under no_grad: torch.export.load refuses an exported no_grad region)
        mean, invstd = mean.detach(), invstd.detach()
        acc = torch.float64 if mean.dtype == torch.float64 else torch.float32
        var = invstd.to(acc).pow(-2).sub_(call.eps)
        update_running_stats(call.running_mean, call.running_var, mean.to(acc), var, _positions(conv, x),
                             call.momentum)
    return out


def _autocast_state(device_type: str):
    """``(enabled, dtype)`` of autocast on ``device_type`` now (re-entered by a recomputation)."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):
        return False, torch.get_default_dtype()


def _conv_args(conv: nn.Conv2d):
    # (attributes set after construction: an int, conv.stride = 2, or padding="valid", as F.conv2d takes them)
    padding = conv_padding(conv)
    if conv.padding_mode != "zeros" or padding is None:
        raise ValueError("the shared-memory DenseNet stem needs a conv with zero padding, the same on both sides")
    return list(conv_pair(conv.stride)), list(padding), list(conv_pair(conv.dilation)), conv.groups


def _pool_args(pool: nn.MaxPool2d):
    pair = nn.modules.utils._pair
    return (list(pair(pool.kernel_size)), list(pair(pool.stride or pool.kernel_size)), list(pair(pool.padding)),
            list(pair(pool.dilation)), bool(pool.ceil_mode))


#: Double backward through the compact stem (it does not record its backward).
DOUBLE_BACKWARD_STEM = (
    "double backward (create_graph=True) through the shared-memory DenseNet stem is not supported: its backward "
    "recomputes the conv from compact saved state and does not record a graph; use create_model(..., "
    "memory='naive') or memory='checkpoint' for gradient penalties and other higher-order gradients"
)


class _CompactStem(torch.autograd.Function):
    """``maxpool(relu(batch_norm(conv2d(x))))`` in training mode (batch statistics), returning
    ``(out, mean, invstd)`` (the statistics non-differentiable).

    Saved for the backward: ``x``, the parameters but the BN bias, the statistics, and per output
    element the pooling's argmax within its input plane as int16 (int32 for planes over 32767 elements),
    with ``-1`` where the ReLU passed no gradient (``out <= 0``; a NaN passes, as ReLU's own
    backward lets it). The backward recomputes the conv (under the forward's autocast state),
    scatters the masked gradient with the argmax, and runs the batch-norm and conv backward:
    the gradients are those of the unfused modules, bit for bit the same ops, without the
    recomputation of the batch norm, ReLU and pooling that a checkpoint would repeat."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, eps, conv_args, pool_args):
        stride, padding, dilation, groups = conv_args
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        z, mean, invstd = torch.native_batch_norm(y, gamma, beta, None, None, True, 0.0, eps)
        del y
        a = z.relu_()
        out, idx = torch.ops.aten.max_pool2d_with_indices(a, *pool_args)
        code_dtype = torch.int16 if a.shape[2] * a.shape[3] <= 32767 else torch.int32
        del a, z
        code = idx.masked_fill_(out <= 0, -1).to(code_dtype)
        del idx
        dev = x.device.type
        ctx.autocast = (dev, _autocast_state(dev))
        ctx.args = (eps, conv_args, pool_args)
        ctx.has_bias, ctx.has_beta = bias is not None, beta is not None
        # (beta itself is not saved: the backward does not read it, and the modules' batch norm
        # does not save it either, so an in-place change of it before the backward is harmless)
        ctx.save_for_backward(x, weight, bias, gamma, mean, invstd, code)
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_STEM)
        x, weight, bias, gamma, mean, invstd, code = ctx.saved_tensors
        eps, (stride, padding, dilation, groups), pool_args = ctx.args
        dev, (enabled, dtype) = ctx.autocast
        with torch.autocast(device_type=dev, dtype=dtype) if enabled else contextlib.nullcontext():
            y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        grad_out = grad_out.to(y.dtype).masked_fill(code < 0, 0)
        grad_a = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, y, *pool_args, code.long().clamp_min_(0))
        del grad_out
        grad_y, ggamma, gbeta = torch.ops.aten.native_batch_norm_backward(
            grad_a, y, gamma, None, None, mean, invstd, True, eps,
            [True, gamma is not None and ctx.needs_input_grad[3], ctx.has_beta and ctx.needs_input_grad[4]])
        del grad_a
        xc, wc = x.to(y.dtype), weight.to(y.dtype)
        del y
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_y, xc, wc, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False, [0, 0],
            groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]])
        return (None if gx is None else gx.to(x.dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(bias.dtype), ggamma, gbeta, None, None, None)


def _positions(conv: nn.Conv2d, x: Tensor) -> int:
    """N * H_out * W_out of ``conv`` on ``x``: the element count per channel of its output."""
    h, w = x.shape[2], x.shape[3]
    (kh, kw), (ph, pw), (dh, dw), (sh, sw) = (conv_pair(v) for v in (conv.kernel_size, conv_padding(conv),
                                                                     conv.dilation, conv.stride))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return x.shape[0] * ho * wo


def _build(growth_rate: int, block_config: Sequence[int], num_init_features: int, **kwargs) -> DenseNet:
    return DenseNet(growth_rate, block_config, num_init_features, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def densenet121(**kwargs) -> DenseNet:
    """DenseNet-121 (growth 32, blocks 6-12-24-16): torchvision's ``densenet121``."""
    return _build(32, (6, 12, 24, 16), 64, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def densenet161(**kwargs) -> DenseNet:
    """DenseNet-161 (growth 48, blocks 6-12-36-24, 96-channel stem): torchvision's ``densenet161``."""
    return _build(48, (6, 12, 36, 24), 96, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def densenet169(**kwargs) -> DenseNet:
    """DenseNet-169 (growth 32, blocks 6-12-32-32): torchvision's ``densenet169``."""
    return _build(32, (6, 12, 32, 32), 64, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def densenet201(**kwargs) -> DenseNet:
    """DenseNet-201 (growth 32, blocks 6-12-48-32): torchvision's ``densenet201``."""
    return _build(32, (6, 12, 48, 32), 64, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def densenet264(**kwargs) -> DenseNet:
    """DenseNet-264 (growth 32, blocks 6-12-64-48; in the paper, not in torchvision)."""
    return _build(32, (6, 12, 64, 48), 64, **kwargs)


def densenet_bc(depth: int, growth_rate: int, num_classes: int = 10, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC of ``depth`` = 6n + 4 layers: a ``2k``-channel 3x3 stem, three dense
    blocks of n bottleneck layers (``4k`` bottleneck), transitions with compression 0.5."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n + 4 with n >= 1 for DenseNet-BC, got {depth!r}")
    n = (depth - 4) // 6
    kwargs.setdefault("stem", "cifar")
    return DenseNet(growth_rate, (n, n, n), 2 * growth_rate, 4, num_classes=num_classes, **kwargs)


@register_model(input_size=(3, 32, 32), dataset="cifar")
def densenet_bc100_k12(num_classes: int = 10, **kwargs) -> DenseNet:
    """DenseNet-BC-100, k=12 (0.8M parameters)."""
    return densenet_bc(100, 12, num_classes, **kwargs)


@register_model(input_size=(3, 32, 32), dataset="cifar")
def densenet_bc250_k24(num_classes: int = 10, **kwargs) -> DenseNet:
    """DenseNet-BC-250, k=24 (15.3M parameters)."""
    return densenet_bc(250, 24, num_classes, **kwargs)


@register_model(input_size=(3, 32, 32), dataset="cifar")
def densenet_bc190_k40(num_classes: int = 10, **kwargs) -> DenseNet:
    """DenseNet-BC-190, k=40 (25.6M parameters)."""
    return densenet_bc(190, 40, num_classes, **kwargs)
