"""ResNeXt-29 for CIFAR (Xie et al. 2017, section 5.3).

A 3x3 stem conv with 64 filters (BN-ReLU), three stages of ``n`` ResNeXt bottlenecks
(``depth = 9n + 2``; 29 gives 3 blocks per stage) with outputs 256, 512, 1024 (stride 1, 2,
2) and grouped widths ``C x d``, ``2 C x d``, ``4 C x d``; 1x1-conv + BN projection
shortcuts where the shape changes; global average pooling and a linear classifier.
"""
from __future__ import annotations

from torch import Tensor, nn

from resfast.backends import check_backend_name
from resfast.models._common import PooledClassifier, init_conv_bn
from resfast.models.registry import register_model
from resfast.nn.blocks import ResNeXtBottleneck, check_input, conv1x1, conv3x3

__all__ = ["CifarResNeXt", "resnext29_8x64d", "resnext29_16x64d"]


class CifarResNeXt(PooledClassifier):
    """ResNeXt-``depth`` ``cardinality`` x ``base_width``d for 32x32 input; parameter names as
    torchvision's ResNet (``conv1``, ``bn1``, ``layerN.i.conv1`` ..., ``downsample.0/1``, ``fc``)."""

    def __init__(self, depth: int = 29, cardinality: int = 8, base_width: int = 64, num_classes: int = 10, *,
                 in_chans: int = 3, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 11 or (depth - 2) % 9:
            raise ValueError(f"depth must be 9n+2 with n >= 1 (11, 20, 29, ...), got depth={depth!r}")
        for name, v in (("cardinality", cardinality), ("base_width", base_width), ("num_classes", num_classes)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.backend = check_backend_name(backend)
        self.in_chans, self.num_classes, self.cardinality, self.base_width = in_chans, num_classes, cardinality, base_width
        n = (depth - 2) // 9
        self.conv1 = conv3x3(in_chans, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 64
        self.layer1 = self._make_layer(64, n, 1)
        self.layer2 = self._make_layer(128, n, 2)
        self.layer3 = self._make_layer(256, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = self.inplanes
        self.fc = nn.Linear(self.inplanes, num_classes)

        init_conv_bn(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * ResNeXtBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out))
        layers = [ResNeXtBottleneck(self.inplanes, planes, stride, downsample, self.cardinality, self.base_width,
                                    backend=self.backend)]
        self.inplanes = out
        for _ in range(1, blocks):
            layers.append(ResNeXtBottleneck(out, planes, cardinality=self.cardinality, base_width=self.base_width,
                                            backend=self.backend))
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and three stages: ``N x 1024 x H/4 x W/4``."""
        check_input(x, self.in_chans, "the model")
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


@register_model(input_size=(3, 32, 32), dataset="cifar")
def resnext29_8x64d(*, num_classes: int = 10, backend: str = "auto", **kwargs) -> CifarResNeXt:
    """ResNeXt-29 8x64d: 34.4M parameters (the paper's Table 7)."""
    return CifarResNeXt(29, 8, 64, num_classes, backend=backend, **kwargs)


@register_model(input_size=(3, 32, 32), dataset="cifar")
def resnext29_16x64d(*, num_classes: int = 10, backend: str = "auto", **kwargs) -> CifarResNeXt:
    """ResNeXt-29 16x64d: 68.1M parameters (the paper's Table 7)."""
    return CifarResNeXt(29, 16, 64, num_classes, backend=backend, **kwargs)
