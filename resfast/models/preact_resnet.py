"""Pre-activation ResNet-164 and -1001 for CIFAR (He et al. 2016, "Identity Mappings in Deep Residual Networks").

``depth = 9n + 2``: a 3x3 stem conv to 16 channels, three stages of ``n`` pre-activation
bottlenecks (:class:`resfast.nn.blocks.PreActBottleneck`, bottleneck widths 16, 32, 64,
outputs 64, 128, 256; stride 1, 2, 2) with 1x1 projection shortcuts on the pre-activation
where the shape changes, a final BN-ReLU, global average pooling and a linear classifier.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from resfast.backends import check_backend_name
from resfast.models.registry import register_model
from resfast.nn.blocks import PreActBottleneck, check_input, conv3x3

__all__ = ["PreActResNet", "preact_resnet164", "preact_resnet1001"]


class PreActResNet(nn.Module):
    """Pre-activation bottleneck ResNet-``depth`` for 32x32 input; ``ValueError`` unless ``depth = 9n + 2``."""

    def __init__(self, depth: int = 164, num_classes: int = 10, *, in_chans: int = 3, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 11 or (depth - 2) % 9:
            raise ValueError(f"depth must be 9n+2 with n >= 1 (11, 164, 1001, ...), got depth={depth!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.backend = check_backend_name(backend)
        self.depth, self.in_chans, self.num_classes = depth, in_chans, num_classes
        n = (depth - 2) // 9
        self.conv1 = conv3x3(in_chans, 16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(PreActBottleneck(in_planes, planes, stride if i == 0 else 1, backend=backend))
                in_planes = planes * PreActBottleneck.expansion
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

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem, three stages and the final BN-ReLU: ``N x 256 x H/4 x W/4``."""
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


@register_model(input_size=(3, 32, 32), dataset="cifar")
def preact_resnet164(*, num_classes: int = 10, backend: str = "auto", **kwargs) -> PreActResNet:
    """Pre-activation ResNet-164 (18 bottlenecks per stage): 1.7M parameters."""
    return PreActResNet(164, num_classes, backend=backend, **kwargs)


@register_model(input_size=(3, 32, 32), dataset="cifar")
def preact_resnet1001(*, num_classes: int = 10, backend: str = "auto", **kwargs) -> PreActResNet:
    """Pre-activation ResNet-1001 (111 bottlenecks per stage): 10.2M parameters."""
    return PreActResNet(1001, num_classes, backend=backend, **kwargs)
