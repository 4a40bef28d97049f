"""Residual blocks: ResNet (post-activation), Wide ResNet and pre-activation (BN-ReLU-conv), ResNeXt, SE.

Every block keeps ordinary ``nn.BatchNorm2d`` / ``nn.Conv2d`` submodules named as in
torchvision (``conv1``, ``bn1``, ..., ``downsample.0`` / ``downsample.1``), so a
``state_dict`` never depends on the backend, and calls
:func:`resfast.nn.fused.bn_relu_conv` for each BN-ReLU-conv pair it can fuse:

* post-activation blocks (``BasicBlock``, ``Bottleneck``, ``ResNeXtBottleneck``): the
  BN-ReLU of ``conv1``'s output runs inside ``conv2`` (and, in bottlenecks, the BN-ReLU of
  ``conv2``'s output inside ``conv3``); the last BN, the residual add and the final ReLU
  stay eager because the sum, not a conv, consumes them;
* pre-activation blocks (``WideBasic``, ``PreActBottleneck``): every BN-ReLU-conv is fused.
  Where the 1x1 shortcut reads the same ``relu(bn1(x))`` as ``conv1``, it is a second fused
  call that normalises with the same batch statistics but leaves ``bn1``'s running
  statistics alone, so they are updated exactly once per forward, and the gradients of
  both paths add up in ``x``, ``bn1.weight`` and ``bn1.bias``.

``backend`` is ``"auto" | "eager" | "triton" | "native"``; a named backend that cannot run
on the input's device raises :class:`resfast.backends.BackendUnavailableError` before
anything (running statistics included) is modified.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resfast.backends import check_backend_name, resolve_backend
from resfast.nn.fused import bn_relu_conv, parameters_once
from resfast.nn.unfused import is_tracing, original_forward, refuse_script, run_unfused

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNeXtBottleneck",
    "WideBasic",
    "PreActBottleneck",
    "SEModule",
    "conv1x1",
    "conv3x3",
    "check_input",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (torchvision's helper)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (torchvision's helper)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def check_input(x: Tensor, channels: int, what: str = "the block") -> None:
    """Raise ``TypeError`` / ``ValueError`` unless ``x`` is an ``N x channels x H x W`` tensor
    (nothing to check on an FX proxy while tracing)."""
    if is_tracing():
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"x has {x.shape[1]} channels (shape {tuple(x.shape)}) but {what} expects "
                         f"in_channels={channels}")


class SEModule(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``.

    Laid out as timm's ``SEModule`` (biased 1x1 convs ``fc1`` / ``fc2``; the reduced width is
    ``channels / reduction`` rounded to a multiple of ``rd_divisor``), so timm's SE-ResNeXt
    weights load by name.
    """

    def __init__(self, channels: int, reduction: int = 16, rd_channels: Optional[int] = None, rd_divisor: int = 8):
        super().__init__()
        _positive_ints(channels=channels, reduction=reduction, rd_divisor=rd_divisor)
        if rd_channels is None:
            rd_channels = _make_divisible(channels / reduction, rd_divisor)
        _positive_ints(rd_channels=rd_channels)
        self.channels = channels
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, channels, H, W) rescaled per channel by its squeeze-and-excitation gate; same shape."""
        check_input(x, self.channels, "SEModule")
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(self.act(self.fc1(s)))
        return x * torch.sigmoid(s)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs), torchvision's arguments and parameter names.

    ``conv1 -> bn1 -> relu -> conv2 -> bn2 -> (+ shortcut) -> relu``; ``bn1``-ReLU-``conv2``
    is one fused op.
    """

    expansion: int = 1

    __prepare_scriptable__ = refuse_script  # torch.jit.script: a clear refusal

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _positive_ints(inplanes=inplanes, planes=planes, stride=stride, dilation=dilation)
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock only supports groups=1 and base_width=64, got groups={groups!r}, "
                             f"base_width={base_width!r}")
        if dilation > 1:
            raise ValueError(f"BasicBlock does not support dilation > 1, got dilation={dilation}")
        _check_downsample(inplanes, planes * self.expansion, stride, downsample)
        norm_layer = norm_layer or nn.BatchNorm2d
        self.backend = check_backend_name(backend)
        self.inplanes = inplanes
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        _check_fusable(self.backend, self.bn1)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, inplanes, H, W) -> (N, planes, H / stride, W / stride). ``bn1``-ReLU-``conv2`` runs as one fused op
        on ``self.backend`` (eagerly where a hook, a replaced submodule or a transform asks for it)."""
        _check_block_input(x, self.inplanes, self.backend, "BasicBlock")
        if run_unfused(self, [("bn1", self.bn1), ("relu", self.relu), ("conv2", self.conv2)], "one fused op"):
            return self._forward_unfused(x)
        identity = x if self.downsample is None else self.downsample(x)
        out = _bn_relu_conv(self.bn1, self.conv2, self.conv1(x), self.backend)
        out = self.bn2(out)
        return torch.relu(out + identity)

    def _forward_unfused(self, x: Tensor) -> Tensor:
        original = original_forward(self)
        if original is not None:  # converted from timm's block: its forward runs act1, act2, ...
            return original(x)
        # torchvision's BasicBlock.forward, module by module.
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3 with ``groups``, 1x1 to ``4 * planes``), torchvision's
    arguments and parameter names (stride on the 3x3, as ResNet v1.5).

    The grouped width is ``int(planes * base_width / 64) * groups`` unless ``width`` is
    given. ``bn1``-ReLU-``conv2`` and ``bn2``-ReLU-``conv3`` are fused ops; ``se=True`` adds a
    squeeze-and-excitation module ``se`` after ``bn3`` (as in SE-ResNet / SE-ResNeXt).
    """

    expansion: int = 4

    __prepare_scriptable__ = refuse_script  # torch.jit.script: a clear refusal

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        width: Optional[int] = None,
        se: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _positive_ints(inplanes=inplanes, planes=planes, stride=stride, groups=groups, base_width=base_width,
                       dilation=dilation)
        if width is None:
            per_group = int(planes * (base_width / 64.0))
            if per_group < 1:
                raise ValueError(f"planes={planes} with base_width={base_width} gives int(planes * base_width / 64) "
                                 f"= {per_group} channels per group; need at least 1")
            width = per_group * groups
        _positive_ints(width=width)
        if width % groups:
            raise ValueError(f"groups={groups} does not divide the grouped conv's channels width={width}")
        _check_downsample(inplanes, planes * self.expansion, stride, downsample)
        norm_layer = norm_layer or nn.BatchNorm2d
        self.backend = check_backend_name(backend)
        self.inplanes = inplanes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.se = SEModule(planes * self.expansion) if se else None
        self.downsample = downsample
        self.stride = stride
        _check_fusable(self.backend, self.bn1, self.bn2)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, inplanes, H, W) -> (N, 4 * planes, H / stride, W / stride). ``bn1``-ReLU-``conv2`` and
        ``bn2``-ReLU-``conv3`` run as fused ops on ``self.backend`` (eagerly where a hook, a replaced submodule or a
        transform asks for it)."""
        _check_block_input(x, self.inplanes, self.backend, type(self).__name__)
        fused = [("bn1", self.bn1), ("relu", self.relu), ("conv2", self.conv2), ("bn2", self.bn2),
                 ("conv3", self.conv3)]
        if run_unfused(self, fused, "two fused ops"):
            return self._forward_unfused(x)
        identity = x if self.downsample is None else self.downsample(x)
        if self.conv2.groups > 1:
            # ResNeXt: the grouped conv2 takes bn2's statistics in its epilogue (triton; the static
            # model predicts it costs the conv less than the statistics pass over its output that
            # it saves; not for dense 3x3 convs, docs/notes/triton_kernels.md v8)
            out, stats = _bn_relu_conv(self.bn1, self.conv2, self.conv1(x), self.backend, return_stats=True)
            out = _bn_relu_conv(self.bn2, self.conv3, out, self.backend, input_stats=stats)
        else:
            out = _bn_relu_conv(self.bn1, self.conv2, self.conv1(x), self.backend)
            out = _bn_relu_conv(self.bn2, self.conv3, out, self.backend)
        out = self.bn3(out)
        if self.se is not None:
            out = self.se(out)
        return torch.relu(out + identity)

    def _forward_unfused(self, x: Tensor) -> Tensor:
        original = original_forward(self)
        if original is not None:  # converted from timm's block: its forward runs act1, ..., act3
            return original(x)
        # torchvision's Bottleneck.forward, module by module (SE after bn3, as timm).
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        out += identity
        return self.relu(out)


class ResNeXtBottleneck(Bottleneck):
    """ResNeXt bottleneck (Xie et al. 2017, form (c)): ``cardinality`` groups of ``d`` channels
    in the grouped 3x3, ``d = int(planes * base_width / 64)``; ``C x d`` is the width.

    A :class:`Bottleneck` with ``groups=cardinality`` (same parameter names as torchvision's
    ResNeXt); ``width`` overrides ``C x d`` and must be divisible by ``cardinality``.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        cardinality: int = 32,
        base_width: int = 4,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        width: Optional[int] = None,
        se: bool = False,
        backend: str = "auto",
    ) -> None:
        _positive_ints(cardinality=cardinality)
        if width is not None and isinstance(width, int) and width % cardinality:
            raise ValueError(f"cardinality={cardinality} does not divide width={width}")
        super().__init__(inplanes, planes, stride, downsample, cardinality, base_width, dilation, norm_layer,
                         width=width, se=se, backend=backend)
        self.cardinality = cardinality


class WideBasic(nn.Module):
    """Wide ResNet block (Zagoruyko & Komodakis 2016), pre-activation:
    ``bn1 -> relu -> conv1 -> bn2 -> relu -> dropout -> conv2`` plus the shortcut.

    The shortcut is ``x`` when widths and stride match, else a 1x1 conv ``shortcut`` on the
    pre-activation ``relu(bn1(x))``. ``bn1``-ReLU-``conv1`` (and the shortcut) and
    ``bn2``-ReLU-``conv2`` are fused ops; with ``dropout > 0`` in training the dropout sits
    between ReLU and ``conv2``, so ``bn2 -> relu -> dropout -> conv2`` then runs unfused
    (eager PyTorch) on every backend. In eval mode dropout is the identity and it is fused.
    """

    expansion: int = 1

    __prepare_scriptable__ = refuse_script  # torch.jit.script: a clear refusal

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0, *,
                 backend: str = "auto") -> None:
        super().__init__()
        _positive_ints(in_planes=in_planes, planes=planes, stride=stride)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.backend = check_backend_name(backend)
        self.in_planes = in_planes
        self.dropout = float(dropout)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = conv1x1(in_planes, planes, stride) if stride != 1 or in_planes != planes else None

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, in_planes, H, W) -> (N, planes, H / stride, W / stride). Both BN-ReLU-conv pairs run as fused ops on
        ``self.backend`` (eagerly where a hook, a replaced submodule or a transform asks for it)."""
        _check_block_input(x, self.in_planes, self.backend, "WideBasic")
        fused = [("bn1", self.bn1), ("conv1", self.conv1), ("shortcut", self.shortcut), ("bn2", self.bn2),
                 ("conv2", self.conv2)]
        if run_unfused(self, fused, "fused ops"):
            a = torch.relu(self.bn1(x))
            out = self.conv1(a)
            shortcut = x if self.shortcut is None else self.shortcut(a)
            out = self.conv2(F.dropout(torch.relu(self.bn2(out)), self.dropout, training=self.training))
            return out + shortcut
        with parameters_once(self.bn1, self.conv1, self.shortcut):  # (the modules' order; bn1 read twice here)
            out = bn_relu_conv(self.bn1, self.conv1, x, self.backend)
            shortcut = x if self.shortcut is None else _preact_shortcut(self.bn1, self.shortcut, x, self.backend)
        if self.dropout > 0 and self.training:
            out = self.conv2(F.dropout(torch.relu(self.bn2(out)), self.dropout, training=True))
        else:
            out = bn_relu_conv(self.bn2, self.conv2, out, self.backend)
        return out + shortcut

    def extra_repr(self) -> str:
        """The dropout rate and the backend, beside the submodules in ``repr``."""
        return f"dropout={self.dropout}, backend={self.backend!r}"


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al. 2016, "Identity Mappings"), for pre-act ResNet-164/1001:
    ``bn1-relu-conv1(1x1) -> bn2-relu-conv2(3x3, stride) -> bn3-relu-conv3(1x1 to 4 * planes)``.

    The shortcut is ``x`` when widths and stride match, else a 1x1 conv ``shortcut`` on the
    pre-activation ``relu(bn1(x))``. All three BN-ReLU-conv pairs are fused ops.
    """

    expansion: int = 4

    __prepare_scriptable__ = refuse_script  # torch.jit.script: a clear refusal

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, backend: str = "auto") -> None:
        super().__init__()
        _positive_ints(in_planes=in_planes, planes=planes, stride=stride)
        self.backend = check_backend_name(backend)
        self.in_planes = in_planes
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv1x1(in_planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.shortcut = conv1x1(in_planes, out_planes, stride) if stride != 1 or in_planes != out_planes else None

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, in_planes, H, W) -> (N, 4 * planes, H / stride, W / stride). The three BN-ReLU-conv triples run as
        fused ops on ``self.backend`` (eagerly where a hook, a replaced submodule or a transform asks for it)."""
        _check_block_input(x, self.in_planes, self.backend, "PreActBottleneck")
        fused = [("bn1", self.bn1), ("conv1", self.conv1), ("shortcut", self.shortcut), ("bn2", self.bn2),
                 ("conv2", self.conv2), ("bn3", self.bn3), ("conv3", self.conv3)]
        if run_unfused(self, fused, "fused ops"):
            a = torch.relu(self.bn1(x))
            shortcut = x if self.shortcut is None else self.shortcut(a)
            out = self.conv1(a)
            out = self.conv2(torch.relu(self.bn2(out)))
            out = self.conv3(torch.relu(self.bn3(out)))
            return out + shortcut
        with parameters_once(self.bn1, self.shortcut, self.conv1):  # (the modules' order; bn1 read twice here)
            out = bn_relu_conv(self.bn1, self.conv1, x, self.backend)
            shortcut = x if self.shortcut is None else _preact_shortcut(self.bn1, self.shortcut, x, self.backend)
        out = bn_relu_conv(self.bn2, self.conv2, out, self.backend)
        out = bn_relu_conv(self.bn3, self.conv3, out, self.backend)
        return out + shortcut


# ----------------------------------------------------------------------------- helpers


def _preact_shortcut(bn: nn.BatchNorm2d, conv: nn.Conv2d, x: Tensor, backend: str) -> Tensor:
    """``conv(relu(bn(x)))`` for a second consumer of ``bn``'s output in the same forward:
    ``bn_relu_conv(bn, conv1, x)`` already updated the running statistics; this call
    normalises with the same statistics and updates nothing. Autograd sees the batch
    statistics as a function of ``x`` in both calls, so the gradients of the two consumers add."""
    return bn_relu_conv(bn, conv, x, backend, update=False)


def _bn_relu_conv(norm: nn.Module, conv: nn.Conv2d, x: Tensor, backend: str, *, input_stats=None,
                  return_stats: bool = False):
    # A custom norm_layer that is not a BatchNorm (GroupNorm, frozen BN, ...) has no fused
    # form; it runs unfused, which _check_fusable allows only for backend "auto" / "eager".
    if isinstance(norm, _BatchNorm):
        return bn_relu_conv(norm, conv, x, backend, input_stats=input_stats, return_stats=return_stats)
    y = conv(torch.relu(norm(x)))
    return (y, None) if return_stats else y


def _check_fusable(backend: str, *norms: nn.Module) -> None:
    if backend in ("auto", "eager"):
        return
    for norm in norms:
        if not isinstance(norm, _BatchNorm):
            raise ValueError(f"backend={backend!r} fuses BatchNorm into the conv, but norm_layer built a "
                             f"{type(norm).__name__}; use backend='auto' or 'eager' with this norm_layer")


def _check_downsample(inplanes: int, out: int, stride: int, downsample: Optional[nn.Module]) -> None:
    if downsample is None and (inplanes != out or stride != 1):
        raise ValueError(f"inplanes={inplanes}, planes * expansion={out}, stride={stride}: the identity shortcut "
                         "cannot add up; pass a downsample module (e.g. 1x1 conv + BN)")


def _check_block_input(x: Tensor, channels: int, backend: str, what: str) -> None:
    # Resolve the backend first so an unavailable one is reported before any BN running
    # statistics move (nothing is modified by a rejected call).
    if is_tracing():
        return  # an FX proxy: no shape to check; the traced graph runs the submodules
    check_input(x, channels, what)
    resolve_backend(backend, x.device)


def _positive_ints(**values: object) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _make_divisible(v: float, divisor: int) -> int:
    # timm's make_divisible with round_limit=0: nearest multiple of divisor, at least divisor.
    return max(divisor, int(v + divisor / 2) // divisor * divisor)
