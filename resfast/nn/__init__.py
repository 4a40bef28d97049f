"""nn.Module blocks: thin wrappers holding parameters and calling into :mod:`resfast.ops`."""
from resfast.nn.blocks import (BasicBlock, Bottleneck, PreActBottleneck, ResNeXtBottleneck, SEModule, WideBasic,
                               conv1x1, conv3x3)
from resfast.nn.dense import DenseBlock, DenseLayer, Transition
from resfast.nn.fused import BNReLUConv2d, bn_relu_conv

__all__ = ["BNReLUConv2d", "bn_relu_conv", "BasicBlock", "Bottleneck", "ResNeXtBottleneck", "WideBasic",
           "PreActBottleneck", "SEModule", "DenseLayer", "DenseBlock", "Transition", "conv1x1", "conv3x3"]
