"""Pieces every residual network here shares: the pooled classifier head and the init."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from resfast.backends import BackendOwner, check_backend_name
from resfast.nn.blocks import check_input, conv3x3

__all__ = ["PooledClassifier", "init_conv_bn", "PreActCifarNet"]


class PooledClassifier(BackendOwner, nn.Module):
    """timm-style split: subclasses define ``forward_features``; global average pooling and
    the linear classifier ``fc`` make the head. ``model.backend = name`` sets every block's
    backend (:class:`resfast.backends.BackendOwner`)."""

    avgpool: nn.Module
    fc: nn.Linear

    def forward_features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool and (unless ``pre_logits``) the classifier."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def init_conv_bn(model: nn.Module, zero_linear_bias: bool = False) -> None:
    """He-normal (fan_out) convs, unit-scale zero-shift BN, as torchvision's ResNet."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif zero_linear_bias and isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0)


class PreActCifarNet(PooledClassifier):
    """The pre-activation CIFAR trunk shared by Wide ResNet and pre-activation ResNet: a 3x3
    stem conv to 16 channels, three stages (stride 1, 2, 2) of ``n`` blocks built by
    ``make_block(in_planes, planes, stride)``, a final BN-ReLU, pooling and ``fc``."""

    def __init__(self, make_block: Callable[[int, int, int], nn.Module], stage_planes: Sequence[int],
                 out_planes: Sequence[int], n: int, num_classes: int, in_chans: int, backend: str,
                 zero_linear_bias: bool = False) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.backend = check_backend_name(backend)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.conv1 = conv3x3(in_chans, 16)
        in_planes = 16
        stages = []
        for planes, out, stride in zip(stage_planes, out_planes, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(make_block(in_planes, planes, stride if i == 0 else 1))
                in_planes = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        init_conv_bn(self, zero_linear_bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem, three stages and the final BN-ReLU."""
        check_input(x, self.in_chans, "the model")
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.relu(self.bn(x))
