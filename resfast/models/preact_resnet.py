"""Pre-activation ResNet-164 and -1001 for CIFAR (He et al. 2016, "Identity Mappings in Deep Residual Networks").

``depth = 9n + 2``: a 3x3 stem conv to 16 channels, three stages of ``n`` pre-activation
bottlenecks (:class:`resfast.nn.blocks.PreActBottleneck`, bottleneck widths 16, 32, 64,
outputs 64, 128, 256; stride 1, 2, 2) with 1x1 projection shortcuts on the pre-activation
where the shape changes, a final BN-ReLU, global average pooling and a linear classifier.
"""
from __future__ import annotations

from resfast.models._common import PreActCifarNet
from resfast.models.registry import register_model
from resfast.nn.blocks import PreActBottleneck

__all__ = ["PreActResNet", "preact_resnet164", "preact_resnet1001"]


class PreActResNet(PreActCifarNet):
    """Pre-activation bottleneck ResNet-``depth`` for 32x32 input; ``ValueError`` unless ``depth = 9n + 2``."""

    def __init__(self, depth: int = 164, num_classes: int = 10, *, in_chans: int = 3, backend: str = "auto") -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 11 or (depth - 2) % 9:
            raise ValueError(f"depth must be 9n+2 with n >= 1 (11, 164, 1001, ...), got depth={depth!r}")
        e = PreActBottleneck.expansion
        super().__init__(
            lambda i, o, stride: PreActBottleneck(i, o, stride, backend=backend),
            [16, 32, 64], [16 * e, 32 * e, 64 * e], (depth - 2) // 9, num_classes, in_chans, backend,
        )
        self.depth = depth


@register_model(input_size=(3, 32, 32), dataset="cifar")
def preact_resnet164(*, num_classes: int = 10, backend: str = "auto", **kwargs) -> PreActResNet:
    """Pre-activation ResNet-164 (18 bottlenecks per stage): 1.7M parameters."""
    return PreActResNet(164, num_classes, backend=backend, **kwargs)


@register_model(input_size=(3, 32, 32), dataset="cifar")
def preact_resnet1001(*, num_classes: int = 10, backend: str = "auto", **kwargs) -> PreActResNet:
    """Pre-activation ResNet-1001 (111 bottlenecks per stage): 10.2M parameters."""
    return PreActResNet(1001, num_classes, backend=backend, **kwargs)
