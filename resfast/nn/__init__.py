"""nn.Module blocks: thin wrappers holding parameters and calling into resfast.ops."""
from resfast.nn.fused import BNReLUConv2d, bn_relu_conv

__all__ = ["BNReLUConv2d", "bn_relu_conv"]
