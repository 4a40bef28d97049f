"""The fused op ``resfast.functional.bn_relu_conv2d`` against eager ``BatchNorm2d -> ReLU -> Conv2d``.

Shapes: the four grouped 3x3 convs of ResNeXt-50 32x4d (issue 3's target), the 3x3 convs of
WRN-28-10's blocks and DenseNet-121's bottleneck 1x1 convs (the last layer of each dense
block, which reads the most channels). Training mode (batch statistics, running statistics
updated) in both modes: ``fwd`` (no autograd graph; memory-bound, so GB/s is reported against
the bound of reading ``x`` once and writing ``y`` once) and ``fwd+bwd`` (every gradient: x,
conv weight, BN weight and bias).

Rows: ``eager`` (the three nn modules, ReLU in place as torchvision has it), ``compile``
(torch.compile of the same three modules: max-autotune's kernel autotuning on CUDA, without
its CUDA graphs, see ``bench_utils.BenchEnv``; default mode on the CPU),
and resfast's ``triton`` and ``native`` backends where they run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import pytest
import torch
from torch import nn

from bench_utils import IMPLS, compile_or_skip, input_sets, measure, require_fused_backend, timed_first_call


@dataclass(frozen=True)
class OpShape:
    family: str
    channels: int
    out_channels: int
    kernel: int
    groups: int
    gpu: Tuple[int, int]  # batch, spatial size at the real sizes
    cpu: Tuple[int, int]  # batch, spatial size of the CPU suite

    @property
    def padding(self) -> int:
        return self.kernel // 2


SHAPES = {
    # ResNeXt-50 32x4d conv2 of each stage: width 128..1024, 32 groups of 4..32 channels.
    "resnext-s1": OpShape("resnext", 128, 128, 3, 32, (64, 56), (2, 14)),
    "resnext-s2": OpShape("resnext", 256, 256, 3, 32, (64, 28), (2, 7)),
    "resnext-s3": OpShape("resnext", 512, 512, 3, 32, (64, 14), (2, 4)),
    "resnext-s4": OpShape("resnext", 1024, 1024, 3, 32, (64, 7), (2, 2)),
    # WRN-28-10 (CIFAR, batch 128): the 3x3 convs of each stage's blocks.
    "wrn-s1": OpShape("wrn28_10", 160, 160, 3, 1, (128, 32), (2, 8)),
    "wrn-s2": OpShape("wrn28_10", 320, 320, 3, 1, (128, 16), (2, 4)),
    "wrn-s3": OpShape("wrn28_10", 640, 640, 3, 1, (128, 8), (2, 4)),
    # DenseNet-121 BN-ReLU-conv1x1 (4k = 128 outputs) of each block's last layer.
    "densenet-b1": OpShape("densenet121", 224, 128, 1, 1, (64, 56), (2, 14)),
    "densenet-b2": OpShape("densenet121", 480, 128, 1, 1, (64, 28), (2, 7)),
    "densenet-b3": OpShape("densenet121", 992, 128, 1, 1, (64, 14), (2, 4)),
    "densenet-b4": OpShape("densenet121", 992, 128, 1, 1, (64, 7), (2, 2)),
}
# torch.compile on the CPU spends tens of seconds in the C++ compiler per graph: the CPU suite
# compiles only this shape; --gpu-sizes compiles every shape.
CPU_COMPILE_SHAPES = ("resnext-s1",)


def _case(shape: str, mode: str, impl: str):
    resnext = shape.startswith("resnext")
    # Run order under a time budget (see conftest.py): issue 3's ResNeXt rows first (their
    # compile rows after issue 4's memory rows, compiling is slow), the other shapes later.
    priority = (2 if resnext else 8) if impl == "compile" else (0 if resnext else 3)
    return pytest.param(shape, mode, impl, marks=pytest.mark.bench_priority(priority), id=f"{shape}-{mode}-{impl}")


CASES = [_case(shape, mode, impl) for shape in SHAPES for mode in ("fwd", "fwd+bwd") for impl in IMPLS]


@pytest.mark.parametrize("shape_name, mode, impl", CASES)
def test_bn_relu_conv2d(benchmark, env, shape_name, mode, impl):
    shape = SHAPES[shape_name]
    if impl == "compile" and not env.gpu and shape_name not in CPU_COMPILE_SHAPES:
        pytest.skip(f"the CPU suite compiles only {CPU_COMPILE_SHAPES} (C++ compilation per shape); "
                    "--gpu-sizes compiles every shape")
    if impl in ("triton", "native"):
        require_fused_backend(impl, env)
    n, hw = shape.gpu if env.gpu else shape.cpu
    c = shape.channels
    device, dtype = env.device, env.dtype

    bn = nn.BatchNorm2d(c).to(device)  # float32 parameters, as under autocast
    conv = nn.Conv2d(c, shape.out_channels, shape.kernel, padding=shape.padding, groups=shape.groups,
                     bias=False).to(device=device, dtype=dtype, memory_format=env.memory_format)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    backward = mode == "fwd+bwd"

    def make_x():
        x = torch.randn(n, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=env.memory_format)
        return x.requires_grad_(backward)

    out_hw = hw  # stride 1, "same" padding
    x_bytes = n * c * hw * hw * torch.finfo(dtype).bits // 8
    y_bytes = n * shape.out_channels * out_hw * out_hw * torch.finfo(dtype).bits // 8
    xs = input_sets(make_x, x_bytes + (y_bytes if backward else 0), env)
    grads = [torch.randn(n, shape.out_channels, out_hw, out_hw, device=device, dtype=dtype)
             .contiguous(memory_format=env.memory_format) for _ in xs] if backward else []

    if impl == "eager":
        op = nn.Sequential(bn, nn.ReLU(inplace=True), conv)
    elif impl == "compile":
        op = compile_or_skip(nn.Sequential(bn, nn.ReLU(), conv), env)
    else:
        from resfast.functional import bn_relu_conv2d

        def op(x):
            return bn_relu_conv2d(
                x, conv.weight, conv.bias, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
                running_var=bn.running_var, training=True, momentum=0.1, eps=bn.eps, stride=1,
                padding=shape.padding, groups=shape.groups, backend=impl)

    params = [conv.weight, bn.weight, bn.bias]
    counter = [0]

    def step():
        i = counter[0] % len(xs)
        counter[0] += 1
        if backward:
            y = op(xs[i])
            return torch.autograd.grad(y, [xs[i], *params], grads[i])
        with torch.no_grad():
            return op(xs[i])

    out, once_s = timed_first_call(step, f"{impl} on {shape_name}", env, benchmark, compiled=impl == "compile")
    y = out[0] if backward else out
    assert torch.isfinite(y).all(), f"{impl} produced non-finite values on {shape_name} {mode}"

    benchmark.group = (f"op {mode} {shape.family} {hw}x{hw}x{c}"
                       f"{f' g{shape.groups}' if shape.groups > 1 else ''} k{shape.kernel} N{n} {env.dtype_name}")
    benchmark.extra_info.update({
        "row": impl, "kind": "op", "baseline": "eager", "family": shape.family, "mode": mode,
        "shape": [n, c, hw, hw], "out_channels": shape.out_channels, "kernel": shape.kernel,
        "groups": shape.groups, "input_sets": len(xs), **env.describe(),
    })
    if impl == "compile":
        benchmark.extra_info["compile_mode"] = env.compile_mode
    if not backward and env.cuda:
        # The bound of issue 3: x read once, y written once (GB/s and % of HBM bound in the table).
        benchmark.extra_info["bytes_moved"] = x_bytes + y_bytes
    measure(benchmark, step, env, once_s=None if impl == "compile" else once_s)
