"""The packed input gradient at stride 2 by parity decomposition
(``bn_relu_conv_bwd_input_packed_s2_kernel``: one tile loop per residue class of the input
positions, only the taps that reach the class, one ``[positions, 16] x [16, 16]`` MMA per tap,
then the epilogue's ``grad_z`` and BN-gradient sums), with the weight gradient as its own launch,
against the float64 rule: packed 4- and 8-channel groups, one 16-channel group, stride 2 with
padding 0, 1 and 2, odd and even input sizes (the last row / column's class), odd dilation (1, 3),
strides (2, 1) / (1, 2) with dilation 2 along the stride-1 axis, 2x2, 1x3 (classes without a
tap) and 5x5 (a class of 9 taps, loaded per kernel row) kernels, NCHW and channels_last,
bfloat16, the ``MMA_EPI`` + ``PAIRS`` and one-round configs, and a NaN in one ``grad_out``
element and in one input channel (the in-launch exact fix-up: NaN exactly at eager's positions,
none in the packed neighbours). Even dilation along a stride of 2 keeps the merged launch.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py) with tiny shapes.
"""
from __future__ import annotations

import pytest
import torch

from bwd_harness import DEVICE, TRITON_WHY as _WHY, check as _check, f64, gpu_finalize_tile, inputs as _inputs
from bwd_harness import out_hw as _out_hw

# the finalize on the GPU's tile (bwd_harness.gpu_finalize_tile): its 16 x 8 programs were a
# tenth of this file's interpreter time, beside the launches under test
pytestmark = [pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}"),
              pytest.mark.usefixtures(gpu_finalize_tile.__name__)]

if not _WHY:
    from resfast.kernels.triton import bn_relu_conv_bwd
    from resfast.ops import reference, triton_ops


def _launches(args):
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    return [(lp.name, lp.fn) for lp in plan]


def _s2_path(args):
    return _launches(args) == [("conv_bwd_input", bn_relu_conv_bwd.bn_relu_conv_bwd_input_packed_s2_kernel),
                               ("conv_bwd_weight", bn_relu_conv_bwd.bn_relu_conv_bwd_kernel),
                               ("conv_bwd_finalize", bn_relu_conv_bwd.bn_relu_conv_bwd_finalize_kernel)]


def _args(n, c, co, groups, hw, k, p, d, s, dtype=torch.float32, layout=torch.channels_last, seed=0, affine=True):
    x, w, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k, dtype, seed=seed, layout=layout)
    go = torch.randn(n, co, *_out_hw(hw, k, p, d, s), generator=torch.Generator().manual_seed(seed + 3))
    go = go.to(DEVICE, dtype).contiguous(memory_format=layout)
    if not affine:
        bw = bb = None
    return (go, x, w, bw, bb, mean, invstd, list(s), list(p), list(d), groups, affine)


# (n, C, C_out, groups, H x W, kernel, padding, dilation, stride)
CASES = [
    (2, 16, 16, 4, (9, 7), (3, 3), (1, 1), (1, 1), (2, 2)),     # 4-channel groups, odd sizes
    (1, 16, 16, 2, (8, 10), (3, 3), (1, 1), (1, 1), (2, 2)),    # 8-channel groups (s2_down), even sizes
    (1, 16, 16, 2, (9, 8), (3, 3), (0, 0), (1, 1), (2, 2)),     # padding 0
    (1, 16, 16, 1, (7, 9), (3, 3), (2, 2), (1, 1), (2, 2)),     # one 16-channel group, padding 2
    (2, 32, 32, 4, (11, 9), (3, 3), (1, 2), (3, 1), (2, 2)),    # two blocks, dilation 3, mixed padding
    (1, 16, 16, 4, (9, 9), (3, 3), (1, 1), (1, 2), (2, 1)),     # stride (2, 1), dilation 2 along the 1
    (1, 16, 16, 2, (6, 9), (3, 3), (1, 1), (2, 1), (1, 2)),     # stride (1, 2)
    (1, 16, 16, 4, (8, 7), (2, 2), (1, 0), (1, 1), (2, 2)),     # 2x2
    (1, 16, 16, 2, (7, 8), (1, 3), (0, 1), (1, 1), (2, 2)),     # 1x3: classes without a tap
    (1, 16, 16, 2, (11, 10), (5, 5), (2, 2), (1, 1), (2, 2)),   # 5x5: a 9-tap class, per kernel row
    (1, 12, 24, 3, (7, 9), (3, 3), (1, 1), (1, 1), (2, 2)),     # 4 -> 8 channel groups, partial block
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_packed_s2_input_gradient_against_eager(case):
    """grad_z, grad_weight, grad_bias and the BN-gradient sums (float32, channels_last)."""
    args = _args(*case)
    assert _s2_path(args), _launches(args)
    _check(args, torch.float32, f"case={case}")


# The configs' cases: 4-channel groups on 4 x 4 tiles (two images), two blocks of 32 channels
# with dilation 3 and mixed padding on the 2 x 8 tiles their class grid takes (one image: the
# tile shape and the blocks are what differ from the first case; the against-eager test runs
# it on two), and 5x5 (a 9-tap class). CASES[1] (8-channel groups) bound the same
# specializations as CASES[0] here (2026-12-01).
CONFIG_CASES = [CASES[0], (1,) + CASES[4][1:], CASES[9]]


@pytest.mark.parametrize("cfg", ["mma_epi_pairs", "mma_epi", "one_round_1"])
@pytest.mark.parametrize("case", CONFIG_CASES, ids=str)
def test_packed_s2_configs(monkeypatch, cfg, case):
    """The GPU's configs' constexprs under the interpreter: the epilogue in the MMA's layout,
    the sums as pairs, and every class loaded per kernel row (``ONE_ROUND=1``)."""
    meta = {"mma_epi_pairs": dict(MMA_EPI=1, PAIRS=1), "mma_epi": dict(MMA_EPI=1),
            "one_round_1": dict(ONE_ROUND=1)}[cfg]
    monkeypatch.setattr(triton_ops, "_BWD_INPUT_PACKED_S2_INTERP",
                        triton_ops._cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16, **meta))
    args = _args(*case, seed=7)
    assert _s2_path(args), _launches(args)
    _check(args, torch.float32, f"{cfg} case={case}")


def test_packed_s2_nchw_no_affine():
    args = _args(2, 16, 16, 2, (9, 11), (3, 3), (1, 1), (1, 1), (2, 2), layout=torch.contiguous_format, seed=5,
                 affine=False)
    assert _s2_path(args), _launches(args)
    _check(args, torch.float32, "NCHW, no affine")


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
def test_packed_s2_bf16(layout):
    args = _args(2, 16, 16, 2, (9, 8), (3, 3), (1, 1), (1, 1), (2, 2), torch.bfloat16, layout=layout, seed=4)
    assert _s2_path(args), _launches(args)
    _check(args, torch.bfloat16, f"bf16 {layout}")


def test_even_dilation_keeps_the_merged_launch():
    """Dilation 2 along a stride of 2 reaches one input residue with every tap: not the class path."""
    args = _args(1, 16, 16, 2, (9, 9), (3, 3), (2, 2), (2, 2), (2, 2))
    assert not _s2_path(args)
    assert not triton_ops._packed_input_s2(2, 8, 8, [2, 2], [2, 2])
    assert triton_ops._packed_input_s2(32, 8, 8, [2, 2], [1, 1]) and triton_ops._packed_input_s2(16, 16, 16, [2, 2], [1, 1])
    assert not triton_ops._packed_input_s2(8, 32, 32, [2, 2], [1, 1])  # stage 4's 32-channel groups
    assert not triton_ops._packed_input_s2(32, 8, 8, [2, 2], [1, 1], 1, 1)  # 1x1
    assert not triton_ops._packed_input_s2(32, 8, 8, [1, 1], [1, 1])  # stride 1: the stride-1 kernel
    _check(args, torch.float32, "dilation 2 at stride 2")


def _nan_positions(args):
    ref = reference.bn_relu_conv2d_backward(*[f64(a) for a in args])
    return [torch.isnan(r) for r in ref]


def test_packed_s2_nonfinite_grad_out():
    """A NaN in one grad_out element of one group: NaN exactly where eager's is (that group's
    input channels at the positions its taps reach), the packed neighbours finite.

    One case for the fix-up path (it was three paddings / dtypes, 2026-12-01; bfloat16 and
    padding 2 keep their own float64-rule tests): 2-channel groups, four packed in one block,
    the NaN in group 1's output channel 2 (neighbours on both sides: input channels 0-1 and
    4-7), in the *second* image, at the output element whose taps reach the last row and the
    last column (masked edges) and both tiles of its class grids (4 x 5 positions: two tiles
    per image, four per class, three programs), so one program meets it in its *second* tile;
    padding 1 along h and 2 along w (both residue maps of the fix-up: odd and even padding),
    dilation 3 along h, NCHW strides. Eight channels instead of 16 halve the fix-up's
    per-channel loop, the interpreter's cost of this test. (No tap reaches the padding: there
    eager's weight gradient is NaN, ``0 * NaN``, where this launch's stays finite.)"""
    hw = (8, 9)
    args = _args(2, 8, 8, 4, hw, (3, 3), (1, 2), (3, 1), (2, 2), layout=torch.contiguous_format, seed=8)
    go = args[0]
    # output (1, 4): input rows 1, 4, 7 and columns 6, 7, 8, all inside the image
    go[1, 2, 1, 4] = float("nan")  # output channel 2: group 1 (input channels 2-3)
    assert _s2_path(args), _launches(args)
    got = _check(args, torch.float32, "NaN in grad_out, padding (1, 2), dilation (3, 1)")
    for g, m in zip(got, _nan_positions(args)):
        assert torch.equal(torch.isnan(g.detach().cpu()), m)
    gz = got[0]
    assert torch.isnan(gz[:, 2:4]).any() and not torch.isnan(gz[:, :2]).any() and not torch.isnan(gz[:, 4:]).any()


def test_packed_s2_nonfinite_input_channel():
    """A NaN in one input channel of x (4-channel groups): eager's NaN pattern exactly."""
    args = _args(2, 16, 16, 4, (9, 10), (3, 3), (1, 1), (1, 1), (2, 2), seed=9)
    args[1][0, 5, 3, 4] = float("nan")
    assert _s2_path(args), _launches(args)
    got = _check(args, torch.float32, "NaN in x")
    for g, m in zip(got, _nan_positions(args)):
        assert torch.equal(torch.isnan(g.detach().cpu()), m)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_packed_s2_weight_gradient_strided_configs(monkeypatch, case):
    """The weight-gradient launch beside it with the strided configs the model picks on a GPU
    (``_BWD_WEIGHT_STRIDED_CONFIGS``: 8 x 16 tiles, 64 x 32 channel blocks, ``FILL``, capped at
    80 registers) swapped into the interpreter's config."""
    monkeypatch.setattr(triton_ops, "_BWD_INTERP", triton_ops._BWD_WEIGHT_STRIDED_CONFIGS[-1])
    args = _args(*case, seed=11)
    assert _s2_path(args), _launches(args)
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    const = plan[1].bind(plan[1].interp_config).constexprs
    assert const["DO_GW"] and not const["DO_GA"] and (const["SH"], const["SW"]) == (2, 2)
    _check(args, torch.float32, f"strided weight config, case={case}")


def test_packed_s2_weight_gradient_nan_at_the_border():
    """A NaN in ``grad_out`` at the last output element, whose taps reach the bottom and right
    zero padding (7 x 9, padding 1: input row 7 and column 9): eager's ``grad_weight`` is a sum
    of ``grad_out * a_padded`` and ``0 * NaN`` is NaN, so all 9 taps of the NaN's output
    channel are NaN, not only the 4 inside the image (2026-12-01: the weight launch, the
    stacked kernel's class path with ``DO_GW`` alone, gave 8 NaN entries against eager's 18)."""
    args = _args(1, 8, 8, 4, (7, 9), (3, 3), (1, 1), (1, 1), (2, 2), seed=20)
    go = args[0]
    go[0, 1, -1, -1] = float("nan")  # output channel 1: group 0 (input channels 0-1)
    assert _s2_path(args), _launches(args)
    gw = _check(args, torch.float32, "NaN at the border")[1]
    assert torch.isnan(gw[1]).all() and int(torch.isnan(gw).sum()) == 18
