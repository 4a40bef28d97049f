"""ImageNet ResNet, Wide ResNet-50/101-2, ResNeXt and SE-ResNeXt with torchvision's parameter names.

A torchvision model's ``state_dict`` loads into the resfast model of the same name with
``strict=True`` and gives the same outputs; the BN-ReLU-conv pairs inside the blocks run
fused on the chosen ``backend``. ``forward_features`` / ``forward_head`` split the network
as timm does.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Type, Union

from torch import Tensor, nn

from resfast.backends import check_backend_name
from resfast.models._common import PooledClassifier
from resfast.models.registry import register_model
from resfast.nn.blocks import BasicBlock, Bottleneck, check_input, conv1x1

__all__ = [
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "seresnext50_32x4d",
]

Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(PooledClassifier):
    """torchvision's ``ResNet`` (same constructor arguments and parameter names) on resfast blocks.

    Extra keyword arguments: ``se`` (squeeze-and-excitation in every bottleneck, as
    SE-ResNeXt), ``in_chans`` and ``backend``.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[List[bool]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        se: bool = False,
        in_chans: int = 3,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck) and not (isinstance(block, type) and issubclass(block, Bottleneck)):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive ints, got {layers!r}")
        _check_classes(num_classes)
        if se and block is BasicBlock:
            raise ValueError("se=True needs a Bottleneck block, got BasicBlock")
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(f"replace_stride_with_dilation should be None or a 3-element tuple, got "
                             f"{replace_stride_with_dilation!r}")
        self.backend = check_backend_name(backend)
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self._se = se
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.inplanes = 64
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group

        self.conv1 = nn.Conv2d(in_chans, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        extra = {"backend": self.backend, **({"se": True} if self._se else {})}
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        norm_layer, **extra)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer, **extra))
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and the four stages: ``N x num_features x H/32 x W/32``."""
        check_input(x, self.in_chans, "the model")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def _check_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _resnet(block: Block, layers: Sequence[int], num_classes: int, backend: str, **kwargs) -> ResNet:
    return ResNet(block, layers, num_classes=num_classes, backend=backend, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def resnet18(*, num_classes: int = 1000, backend: str = "auto", **kwargs) -> ResNet:
    """ResNet-18 (He et al. 2016); torchvision's ``resnet18`` layout, 11.7M parameters."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, backend, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def resnet34(*, num_classes: int = 1000, backend: str = "auto", **kwargs) -> ResNet:
    """ResNet-34; torchvision's ``resnet34`` layout, 21.8M parameters."""
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, backend, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def resnet50(*, num_classes: int = 1000, backend: str = "auto", **kwargs) -> ResNet:
    """ResNet-50 (v1.5: stride on the 3x3); torchvision's ``resnet50`` layout, 25.6M parameters."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, backend, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def resnet101(*, num_classes: int = 1000, backend: str = "auto", **kwargs) -> ResNet:
    """ResNet-101; torchvision's ``resnet101`` layout, 44.5M parameters."""
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes, backend, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def resnet152(*, num_classes: int = 1000, backend: str = "auto", **kwargs) -> ResNet:
    """ResNet-152; torchvision's ``resnet152`` layout, 60.2M parameters."""
    return _resnet(Bottleneck, [3, 8, 36, 3], num_classes, backend, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def wide_resnet50_2(*, num_classes: int = 1000, backend: str = "auto", **kwargs) -> ResNet:
    """Wide ResNet-50-2 (bottleneck width doubled); torchvision's layout, 68.9M parameters."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, backend, width_per_group=128, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def wide_resnet101_2(*, num_classes: int = 1000, backend: str = "auto", **kwargs) -> ResNet:
    """Wide ResNet-101-2; torchvision's layout, 126.9M parameters."""
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes, backend, width_per_group=128, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def resnext50_32x4d(*, num_classes: int = 1000, backend: str = "auto", **kwargs) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al. 2017); torchvision's layout, 25.0M parameters."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, backend, groups=32, width_per_group=4, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def resnext101_32x8d(*, num_classes: int = 1000, backend: str = "auto", **kwargs) -> ResNet:
    """ResNeXt-101 32x8d; torchvision's layout, 88.8M parameters."""
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes, backend, groups=32, width_per_group=8, **kwargs)


@register_model(input_size=(3, 224, 224), dataset="imagenet")
def seresnext50_32x4d(*, num_classes: int = 1000, backend: str = "auto", **kwargs) -> ResNet:
    """SE-ResNeXt-50 32x4d (Hu et al. 2018): ResNeXt-50 32x4d with squeeze-and-excitation
    (reduction 16) after each bottleneck's ``bn3``; timm's ``seresnext50_32x4d`` layout
    (``layerN.i.se.fc1`` / ``se.fc2``), 27.6M parameters."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, backend, groups=32, width_per_group=4, se=True, **kwargs)
