"""Functional interface: ``resfast.functional.bn_relu_conv2d``."""
from resfast.ops.bn_relu_conv2d import bn_relu_conv2d

__all__ = ["bn_relu_conv2d"]
