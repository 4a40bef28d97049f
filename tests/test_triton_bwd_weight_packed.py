"""The packed weight gradient at stride 1 (``bn_relu_conv_bwd_weight_packed_kernel``: per tile
``a = relu(bn(x))`` once, every 4-tap stack of ``grad_out`` loaded before the first MMA, one
``[4 taps x 16, positions] x [positions, 16]`` MMA per stack, float32 partials summed by the
finalize) against the float64 rule: packed 2-, 4- and 8-channel groups, one 16-channel group,
depthwise, a partial last block, padding 0, 1 and 2, dilation 2, odd image sizes, 2x2 / 5x5
kernels, NCHW and channels_last, bfloat16, a bias, and a NaN in one group's input or output
gradient (it must reach exactly the weight-gradient entries eager's NaN reaches).

Under the interpreter the op runs the launch's interpreter config, this kernel; on a GPU the
tuner picks among it and the stacked kernel's configs."""
from __future__ import annotations

import pytest
import torch

from bwd_harness import DEVICE, TRITON_WHY as _WHY, check as _check, inputs as _inputs, out_hw as _out_hw

pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

if not _WHY:
    from resfast.kernels.triton import bn_relu_conv_wgrad
    from resfast.ops import triton_ops


def _weight_kernel(args):
    (launch,) = [lp for lp in triton_ops.launch_plan("bn_relu_conv2d_backward", *args) if lp.name == "conv_bwd_weight"]
    return launch.bind(launch.interp_config).fn


# (n, C, C_out, groups, H x W, kernel, padding, dilation). Until 2026-12-01 this list also held
# ResNeXt stage 1's 4-channel groups (2, 16, 16, 4, 9 x 7), stage 3's one 16-channel group
# (6 x 5, padding 2), 2-channel groups with dilation 2 (32 channels, 9 x 9), 4 -> 8 channel groups
# with mixed padding / dilation (5 x 9), 2x2 (8 x 7) and 5x5 (9 x 10, 25 taps, 7 stacks): the
# same shapes run this launch, the same kernel and interpreter config, in
# tests/test_triton_bwd_packed_input.py's test_packed_input_gradient_against_eager, whose check
# holds every output (grad_weight and grad_bias among them) to the same float64 rule.
CASES = [
    (1, 32, 32, 4, (7, 10), (3, 3), (0, 0), (1, 1)),    # stage 2: 8-channel groups, two blocks, padding 0
    (1, 24, 24, 24, (11, 5), (3, 3), (1, 1), (1, 1)),   # depthwise, a partial last block of 8 channels
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_packed_weight_gradient_against_eager(case):
    """grad_weight, grad_bias (and the other outputs) against float64, channels_last float32."""
    n, c, co, groups, hw, k, p, d = case
    x, w, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k, seed=11)
    go = torch.randn(n, co, *_out_hw(hw, k, p, d), generator=torch.Generator().manual_seed(12)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], list(p), list(d), groups, True)
    assert _weight_kernel(args) is bn_relu_conv_wgrad.bn_relu_conv_bwd_weight_packed_kernel
    _check(args, torch.float32, f"case={case}")


def test_packed_weight_gradient_nchw_bf16():
    """NCHW tensors (channel stride H*W), no BN affine, bfloat16, odd sizes."""
    x, w, _, _, mean, invstd = _inputs(2, 16, 16, 4, (7, 9), (3, 3), torch.bfloat16, seed=13,
                                       layout=torch.contiguous_format)
    go = torch.randn(2, 16, 7, 9, generator=torch.Generator().manual_seed(14)).to(DEVICE, torch.bfloat16)
    args = (go, x, w, None, None, mean, invstd, [1, 1], [1, 1], [1, 1], 4, False)
    assert _weight_kernel(args) is bn_relu_conv_wgrad.bn_relu_conv_bwd_weight_packed_kernel
    _check(args, torch.bfloat16, "NCHW bf16")


@pytest.mark.parametrize("where", ["x", "grad_out"])
def test_packed_weight_gradient_nan_stays_in_its_group(where):
    """A NaN in one channel of ``x`` (its statistics, so the whole channel, are NaN) or in one
    element of ``grad_out``: NaN reaches exactly the weight-gradient entries eager's does (the
    float64 rule compares the NaN pattern), none of the packed neighbour groups'. On 7 x 8
    images (8 tiles of 4 x 4 over two images, three programs; 9 x 11 until 2026-12-01, 18
    tiles): the NaN in ``grad_out`` makes the input-gradient launch's fix-up recompute its
    program's tiles, the interpreter's cost of this test, so its taps reach the first tile
    alone (rows and columns 1-3: one program's fix-up, not three), inside the image."""
    c, co, groups, hw = 16, 16, 4, (7, 8)
    x, w, bw, bb, mean, invstd = _inputs(2, c, co, groups, hw, (3, 3), seed=15)
    go = torch.randn(2, co, *hw, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    if where == "x":
        x[1, 5, 4, 6] = float("nan")  # input channel 5: group 1
        mean = mean.clone()
        mean[5] = float("nan")
    else:
        go[0, 10, 2, 2] = float("nan")  # output channel 10: group 2
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], groups, True)
    assert _weight_kernel(args) is bn_relu_conv_wgrad.bn_relu_conv_bwd_weight_packed_kernel
    got = _check(args, torch.float32, f"NaN in {where}")
    gw = got[1]
    rows = slice(4, 8) if where == "x" else slice(8, 12)
    assert torch.isnan(gw[rows]).any()
    others = torch.ones(co, dtype=torch.bool)
    others[rows] = False
    assert not torch.isnan(gw[others]).any()


def test_packed_weight_gradient_nan_at_the_border():
    """A NaN in ``grad_out`` at the corner output element, whose taps reach the zero padding:
    eager's ``grad_weight`` sums ``grad_out * a_padded`` and ``0 * NaN`` is NaN, so all 9 taps
    of the NaN's output channel are NaN (18 entries), not only the 4 inside the image
    (2026-12-01: the kernel gave 8; the float64 rule compares the NaN pattern)."""
    x, w, bw, bb, mean, invstd = _inputs(1, 8, 8, 4, (4, 5), (3, 3), seed=17)
    go = torch.randn(1, 8, 4, 5, generator=torch.Generator().manual_seed(18)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    go[0, 1, 0, 0] = float("nan")  # output channel 1: group 0 (input channels 0-1)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 4, True)
    assert _weight_kernel(args) is bn_relu_conv_wgrad.bn_relu_conv_bwd_weight_packed_kernel
    gw = _check(args, torch.float32, "NaN at the border")[1]
    assert torch.isnan(gw[1]).all() and int(torch.isnan(gw).sum()) == 18
