"""The stride-1 input gradient of one group per block as its own convolution
(``bn_relu_conv_bwd_input_s1_kernel``: ``grad_out`` convolved with the flipped, transposed
weights, resident per program, one MMA per tap and output-channel chunk, then the epilogue's
``grad_z`` and BN-gradient sums), against the float64 rule: DenseNet-121's 128 -> 32 3x3 conv
scaled down (input channels wider than one block, output channels in one or several chunks,
partial chunks), ungrouped and grouped, padding 0/1/2, dilation 2, odd image sizes, NCHW and
channels_last, bfloat16, and a NaN in one channel of ``grad_out`` (it must
reach exactly the positions eager's NaN reaches).

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py) with tiny shapes.
"""
from __future__ import annotations

import pytest
import torch

from bwd_harness import DEVICE, TRITON_WHY as _WHY, check as _check, f64 as _f64, gpu_finalize_tile, inputs as _inputs
from bwd_harness import out_hw as _out_hw

# the finalize on the GPU's tile: these convs' 32 - 64 channels made the interpreter's 16 x 8
# finalize most of this file's time (bwd_harness.gpu_finalize_tile)
pytestmark = [pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}"),
              pytest.mark.usefixtures(gpu_finalize_tile.__name__)]

if not _WHY:
    from resfast.kernels.triton import bn_relu_conv_bwd
    from resfast.ops import reference, triton_ops

    OPS = torch.ops.resfast_triton


def _s1_path(args):
    """The plan's input-gradient launch lists the stride-1 kernel's configs beside those of the
    kernel it would run otherwise; the interpreter runs the stride-1 kernel."""
    first = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)[0]
    s1 = [bool(cfg.get("S1")) for cfg in first.configs]
    return (first.name == "conv_bwd_input" and bool(first.interp_config.get("S1")) and any(s1) and not all(s1)
            and first.bind(first.interp_config).fn is bn_relu_conv_bwd.bn_relu_conv_bwd_input_s1_kernel)


# (n, C, C_out, groups, H x W, kernel, padding, dilation); under the interpreter BLOCK_N =
# BLOCK_K = 16, so 32 input channels are two programs' chunks and 24 output channels two chunks
CASES = [
    (2, 32, 16, 1, (9, 7), (3, 3), (1, 1), (1, 1)),     # DenseNet's 3x3 scaled: C -> C/2, two input chunks
    (1, 40, 24, 1, (7, 10), (3, 3), (0, 0), (1, 1)),    # partial input and output chunks, padding 0
    (1, 16, 32, 1, (6, 5), (3, 3), (2, 2), (1, 1)),     # two output chunks, padding 2
    (1, 32, 16, 1, (9, 9), (3, 3), (2, 2), (2, 2)),     # dilation 2 (one image since 2026-12-01)
    (1, 64, 32, 2, (5, 9), (3, 3), (1, 0), (1, 2)),     # two 32 -> 16 groups, mixed pad/dil
    (1, 20, 16, 1, (8, 7), (2, 2), (1, 0), (1, 1)),     # 2x2: asymmetric output
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_s1_input_gradient_against_eager(case):
    """grad_z, grad_weight, grad_bias and the BN-gradient sums (float32, channels_last)."""
    n, c, co, groups, hw, k, p, d = case
    x, w, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k)
    go = torch.randn(n, co, *_out_hw(hw, k, p, d), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], list(p), list(d), groups, True)
    assert _s1_path(args)
    _check(args, torch.float32, f"case={case}")


def test_s1_input_gradient_nchw_no_affine():
    x, w, _, _, mean, invstd = _inputs(1, 32, 16, 1, (7, 9), (3, 3), layout=torch.contiguous_format, seed=5)
    go = torch.randn(1, 16, 7, 9, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    args = (go, x, w, None, None, mean, invstd, [1, 1], [1, 1], [1, 1], 1, False)
    assert _s1_path(args)
    _check(args, torch.float32, "NCHW, no affine")


def test_s1_input_gradient_pointer_tensor(monkeypatch):
    """The taps' addresses from one pointer tensor per tile (``G32`` off: the uncapped configs)."""
    monkeypatch.setattr(triton_ops, "_BWD_INPUT_S1_INTERP", triton_ops._cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16,
                                                                             BLOCK_K=16, S1=1))
    x, w, bw, bb, mean, invstd = _inputs(1, 32, 24, 1, (9, 7), (3, 3), seed=7)
    go = torch.randn(1, 24, 7, 5, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [0, 0], [1, 1], 1, True)
    assert _s1_path(args)
    _check(args, torch.float32, "pointer tensor")


def test_s1_input_gradient_bf16():
    x, w, bw, bb, mean, invstd = _inputs(1, 32, 16, 1, (9, 7), (3, 3), torch.bfloat16, seed=4)
    go = torch.randn(1, 16, 9, 7, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 1, True)
    assert _s1_path(args)
    _check(args, torch.bfloat16, "bf16")


def test_s1_input_gradient_nonfinite_grad_out():
    """A NaN in one output channel of ``grad_out`` reaches every input channel's ``grad_a`` at
    the positions its taps reach, exactly as eager's (no packed neighbours: no fix-up).
    Padding 0, dilation 2, NCHW (the channels-last padding-1 case was dropped, 2026-12-01: the
    same kernel and loads, no fix-up to reach)."""
    pad, dil, layout = 0, 2, torch.contiguous_format
    c, co, hw = 32, 16, (9, 11)
    x, w, bw, bb, mean, invstd = _inputs(2, c, co, 1, hw, (3, 3), seed=8, layout=layout)
    ho, wo = _out_hw(hw, (3, 3), (pad, pad), (dil, dil))
    go = torch.randn(2, co, ho, wo, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    go = go.contiguous(memory_format=layout)
    go[1, 6, ho // 2, wo // 2] = float("nan")
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [pad, pad], [dil, dil], 1, True)
    assert _s1_path(args)
    got = OPS.bn_relu_conv2d_backward(*args)
    ref = reference.bn_relu_conv2d_backward(*[_f64(a) for a in args])
    gz, gz_ref = _f64(got[0]), ref[0]
    assert torch.equal(torch.isnan(gz), torch.isnan(gz_ref))
    ok = ~torch.isnan(gz_ref)
    assert torch.isnan(gz).any()
    torch.testing.assert_close(gz[ok], gz_ref[ok], rtol=1e-4, atol=1e-4)


def test_not_taken_elsewhere():
    """Stride 2, 1x1 kernels, packed groups and wide outputs keep their kernels."""
    assert triton_ops._s1_input(1, 128, 32, [1, 1]) and triton_ops._s1_input(32, 32, 32, [1, 1])
    assert not triton_ops._s1_input(1, 160, 160, [1, 1])  # WRN-28-10: output channels in several chunks
    assert not triton_ops._s1_input(1, 128, 32, [2, 2]) and not triton_ops._s1_input(1, 128, 32, [1, 1], 1, 1)
    assert not triton_ops._s1_input(32, 4, 4, [1, 1])


def test_s1_input_gradient_compiles_for_sm90_without_spills():
    """DenseNet-121's 128 -> 32 3x3 conv at 56 x 56: the input-gradient launch's first config
    (the static choice) is the stride-1 kernel, on wgmma, spill-free under its 168-register cap
    (3 programs per SM; 178 registers uncapped would hold 2), every SASS loop matched to the
    plan's, and predicted faster than the wide kernel it is listed before (PREDICTED: 131.5
    against 149.3 us)."""
    from test_static_model import _packed_backward_rows

    (row,) = _packed_backward_rows("densenet121_3x3", launch="conv_bwd_input")
    assert row["kernel"] == "bn_relu_conv_bwd_input_s1_kernel", row
    assert row["loops_matched"] and row["mma"] == "wgmma" and row["spills"] == 0, row
    assert row["blocks_per_sm"] >= 3 and row["predicted_us"] < 140.0, row
