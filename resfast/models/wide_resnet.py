"""Wide Residual Networks for CIFAR (Zagoruyko & Komodakis 2016): WRN-d-k.

``d = 6n + 4``: a 3x3 stem conv to 16 channels, three stages of ``n`` pre-activation
:class:`resfast.nn.blocks.WideBasic` blocks of widths ``16k``, ``32k``, ``64k`` (stride 1,
2, 2), a final BN-ReLU, global average pooling and a linear classifier. Dropout (the
paper's 0.3 on CIFAR) sits between the two convs of every block.
"""
from __future__ import annotations

from resfast.models._common import PreActCifarNet
from resfast.models.registry import register_model
from resfast.nn.blocks import WideBasic

__all__ = ["WideResNet", "wide_resnet", "wrn28_10", "wrn40_4", "wrn16_8", "wrn16_4", "wrn16_2"]


class WideResNet(PreActCifarNet):
    """WRN-``depth``-``width``; see the module docstring. Raises ``ValueError`` unless
    ``depth = 6n + 4`` with ``n >= 1``."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, dropout: float = 0.0, *,
                 in_chans: int = 3, backend: str = "auto") -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got depth={depth!r}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"width must be a positive int (the widening factor k), got width={width!r}")
        super().__init__(
            lambda i, o, stride: WideBasic(i, o, stride, dropout, backend=backend),
            [16 * width, 32 * width, 64 * width], [16 * width, 32 * width, 64 * width], (depth - 4) // 6,
            num_classes, in_chans, backend, zero_linear_bias=True,
        )
        self.depth, self.width = depth, width


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
