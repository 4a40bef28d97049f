"""Wide Residual Networks for CIFAR (Zagoruyko & Komodakis 2016): WRN-d-k.

``d = 6n + 4``: a 3x3 stem conv to 16 channels, three stages of ``n`` pre-activation
:class:`resfast.nn.blocks.WideBasic` blocks of widths ``16k``, ``32k``, ``64k`` (stride 1,
2, 2), a final BN-ReLU, global average pooling and a linear classifier. Dropout (the
paper's 0.3 on CIFAR) sits between the two convs of every block.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from resfast.backends import check_backend_name
from resfast.models.registry import register_model
from resfast.nn.blocks import WideBasic, check_input, conv3x3

__all__ = ["WideResNet", "wide_resnet", "wrn28_10", "wrn40_4", "wrn16_8", "wrn16_4", "wrn16_2"]


class WideResNet(nn.Module):
    """WRN-``depth``-``width``; see the module docstring. Raises ``ValueError`` unless
    ``depth = 6n + 4`` with ``n >= 1``."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, dropout: float = 0.0, *,
                 in_chans: int = 3, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got depth={depth!r}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"width must be a positive int (the widening factor k), got width={width!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.backend = check_backend_name(backend)
        self.depth, self.width, self.in_chans, self.num_classes = depth, width, in_chans, num_classes
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = conv3x3(in_chans, 16)
        in_planes = 16
        stages = []
        for planes, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(WideBasic(in_planes, planes, stride if i == 0 else 1, dropout, backend=backend))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem, three stages and the final BN-ReLU: ``N x 64k x H/4 x W/4``."""
        check_input(x, self.in_chans, "the model")
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.relu(self.bn(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool and (unless ``pre_logits``) the classifier."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def wide_resnet(depth: int, width: int, num_classes: int = 10, dropout: float = 0.0, backend: str = "auto",
                **kwargs) -> WideResNet:
    """Build WRN-``depth``-``width`` for 32x32 input (``depth = 6n + 4``, else ``ValueError``)."""
    return WideResNet(depth, width, num_classes, dropout, backend=backend, **kwargs)


@register_model(input_size=(3, 32, 32), dataset="cifar")
def wrn28_10(*, num_classes: int = 10, dropout: float = 0.0, backend: str = "auto", **kwargs) -> WideResNet:
    """WRN-28-10: 36.5M parameters (the paper's Table 1 / 4)."""
    return wide_resnet(28, 10, num_classes, dropout, backend, **kwargs)


@register_model(input_size=(3, 32, 32), dataset="cifar")
def wrn40_4(*, num_classes: int = 10, dropout: float = 0.0, backend: str = "auto", **kwargs) -> WideResNet:
    """WRN-40-4: 8.9M parameters."""
    return wide_resnet(40, 4, num_classes, dropout, backend, **kwargs)


@register_model(input_size=(3, 32, 32), dataset="cifar")
def wrn16_8(*, num_classes: int = 10, dropout: float = 0.0, backend: str = "auto", **kwargs) -> WideResNet:
    """WRN-16-8: 11.0M parameters."""
    return wide_resnet(16, 8, num_classes, dropout, backend, **kwargs)


@register_model(input_size=(3, 32, 32), dataset="cifar")
def wrn16_4(*, num_classes: int = 10, dropout: float = 0.0, backend: str = "auto", **kwargs) -> WideResNet:
    """WRN-16-4: 2.7M parameters."""
    return wide_resnet(16, 4, num_classes, dropout, backend, **kwargs)


@register_model(input_size=(3, 32, 32), dataset="cifar")
def wrn16_2(*, num_classes: int = 10, dropout: float = 0.0, backend: str = "auto", **kwargs) -> WideResNet:
    """WRN-16-2: 0.7M parameters, small enough to train on a CPU."""
    return wide_resnet(16, 2, num_classes, dropout, backend, **kwargs)
