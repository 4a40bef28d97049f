"""The packed input gradient at stride 1 (``bn_relu_conv_bwd_input_packed_kernel``: ``grad_out``
convolved with the flipped, transposed block-diagonal weights, one ``[positions, 16] x [16, 16]``
MMA per tap, then the epilogue's ``grad_z`` and BN-gradient sums), with the weight gradient as
its own launch, against the float64 rule: packed 2-, 4- and 8-channel groups, one 16-channel
group, one group narrower than 16, depthwise, output groups wider than input groups, a partial
last block, padding 0, 1 and 2, dilation 2, odd image sizes, 2x2 / 5x5 kernels, NCHW and
channels_last, bfloat16, and a NaN in one group's ``grad_out`` (the in-launch exact fix-up).

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py) with tiny shapes.
"""
from __future__ import annotations

import pytest
import torch

from bwd_harness import DEVICE, TRITON_WHY as _WHY, check as _check, inputs as _inputs, out_hw as _out_hw

pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

if not _WHY:
    from resfast.kernels.triton import bn_relu_conv_bwd
    from resfast.ops import triton_ops



def _launches(args):
    """``(name, kernel)`` of each launch the op plans for ``args``."""
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    return [(lp.name, lp.fn) for lp in plan]


def _packed_path(args):
    return _launches(args)[:2] == [("conv_bwd_input", bn_relu_conv_bwd.bn_relu_conv_bwd_input_packed_kernel),
                                   ("conv_bwd_weight", bn_relu_conv_bwd.bn_relu_conv_bwd_kernel)]


# (n, C, C_out, groups, H x W, kernel, padding, dilation)
CASES = [
    (2, 16, 16, 4, (9, 7), (3, 3), (1, 1), (1, 1)),     # ResNeXt stage 1: 4-channel groups, 4 per block
    (1, 16, 16, 2, (7, 10), (3, 3), (0, 0), (1, 1)),    # 8-channel groups, padding 0
    (1, 16, 16, 1, (6, 5), (3, 3), (2, 2), (1, 1)),     # one 16-channel group, padding 2
    (1, 32, 32, 16, (9, 9), (3, 3), (2, 2), (2, 2)),    # 2-channel groups, two blocks, dilation 2
    (1, 8, 8, 8, (11, 5), (3, 3), (1, 1), (1, 1)),      # depthwise, one partial block of 8 channels
    (1, 12, 24, 3, (5, 9), (3, 3), (1, 0), (1, 2)),     # 4 -> 8 channel groups, partial block, mixed pad/dil
    (1, 8, 8, 1, (7, 7), (3, 3), (1, 1), (1, 1)),       # one group narrower than 16
    (1, 16, 16, 4, (8, 7), (2, 2), (1, 0), (1, 1)),     # 2x2: asymmetric output
    (1, 16, 16, 8, (9, 10), (5, 5), (2, 2), (1, 1)),    # 5x5, 2-channel groups
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_packed_input_gradient_against_eager(case):
    """grad_z, grad_weight, grad_bias and the BN-gradient sums (float32, channels_last)."""
    n, c, co, groups, hw, k, p, d = case
    x, w, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k)
    go = torch.randn(n, co, *_out_hw(hw, k, p, d), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], list(p), list(d), groups, True)
    assert _packed_path(args), _launches(args)
    _check(args, torch.float32, f"case={case}")


def test_packed_input_gradient_nchw_no_affine():
    """NCHW tensors (channel stride H*W: the gathers' scalar column), no BN weight or bias."""
    x, w, _, _, mean, invstd = _inputs(2, 16, 16, 4, (7, 9), (3, 3), layout=torch.contiguous_format, seed=5)
    go = torch.randn(2, 16, 7, 9, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    args = (go, x, w, None, None, mean, invstd, [1, 1], [1, 1], [1, 1], 4, False)
    assert _packed_path(args), _launches(args)
    _check(args, torch.float32, "NCHW, no affine")


def test_packed_input_gradient_bf16():
    """bfloat16 operands (the MMA's dtype on a GPU), odd H and W, padding 1."""
    x, w, bw, bb, mean, invstd = _inputs(2, 16, 16, 4, (9, 7), (3, 3), torch.bfloat16, seed=4)
    go = torch.randn(2, 16, 9, 7, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 4, True)
    assert _packed_path(args), _launches(args)
    _check(args, torch.bfloat16, "bf16")


def test_not_taken_elsewhere():
    """Stride 2, 1x1 kernels, 32-channel groups and dense convs keep their kernels."""
    x, w, bw, bb, mean, invstd = _inputs(1, 16, 16, 4, (8, 8), (3, 3))
    go = torch.randn(1, 16, 4, 4).to(DEVICE)
    assert not _packed_path((go, x, w, bw, bb, mean, invstd, [2, 2], [1, 1], [1, 1], 4, False))
    x, w, bw, bb, mean, invstd = _inputs(1, 16, 16, 4, (5, 6), (1, 1))
    go = torch.randn(1, 16, 5, 6).to(DEVICE)
    assert not _packed_path((go, x, w, bw, bb, mean, invstd, [1, 1], [0, 0], [1, 1], 4, False))
    x, w, bw, bb, mean, invstd = _inputs(1, 64, 64, 2, (5, 5), (3, 3))
    go = torch.randn(1, 64, 5, 5).to(DEVICE)
    assert not _packed_path((go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 2, False))
    assert not triton_ops._packed_input(2, 32, 32, [1, 1]) and not triton_ops._packed_input(1, 128, 32, [1, 1])
    assert not triton_ops._packed_input(32, 4, 4, [1, 1], 1, 1)
    assert triton_ops._packed_input(32, 4, 4, [1, 1]) and triton_ops._packed_input(128, 1, 1, [1, 1])


def test_packed_input_gradient_nonfinite_grad_out():
    """A NaN in one group's ``grad_out``: the block-diagonal MMA would carry it into the packed
    neighbours (0 * NaN); the program whose sum of grad_z is not finite recomputes its tiles
    exactly, one input channel at a time. NaN reaches exactly the channels eager gives NaN (the
    group of the NaN's output channel), everything else matches the float64 reference.

    One case for the fix-up (it was padding 1 and padding 0 / dilation 2 / NCHW, 2026-12-01):
    padding 0, dilation 2, NCHW strides; 2-channel groups, four packed in one block, the NaN in
    group 1's output channel 2 (neighbours on both sides: input channels 0-1 and 4-7) of the
    *second* image, whose tiles are every program's third and fourth (12 tiles of 4 x 4, three
    programs), its taps over two tile rows and columns. Eight channels instead of 16 halve the
    fix-up's per-channel loop, and 7 x 9 images instead of 9 x 11 a third of its tiles."""
    c, co, groups, hw, pad, dil = 8, 8, 4, (7, 9), 0, 2
    layout = torch.contiguous_format
    x, w, bw, bb, mean, invstd = _inputs(2, c, co, groups, hw, (3, 3), seed=8, layout=layout)
    ho, wo = _out_hw(hw, (3, 3), (pad, pad), (dil, dil))
    go = torch.randn(2, co, ho, wo, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    go = go.contiguous(memory_format=layout)
    go[1, 2, ho // 2, wo // 2] = float("nan")  # output channel 2 is in group 1 (input channels 2-3)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [pad, pad], [dil, dil], groups, True)
    assert _packed_path(args), _launches(args)
    got = _check(args, torch.float32, f"NaN in grad_out, padding {pad}, dilation {dil}")
    gz = got[0]
    assert torch.isnan(gz[:, 2:4]).any() and not torch.isnan(gz[:, :2]).any() and not torch.isnan(gz[:, 4:]).any()
