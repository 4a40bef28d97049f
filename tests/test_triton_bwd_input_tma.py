"""The input gradient of wide groups with its operands by TMA tensor descriptors (``TMA``:
``bn_relu_conv_bwd_input_kernel`` reading ``grad_out`` and the weights through device-side
descriptors, the copy engine zero-filling what lies outside the image and the channel blocks)
against the float64 rule, under the interpreter's config swapped for a ``TMA`` one; and the
layouts where the planner falls back to the masked loads."""
from __future__ import annotations

import pytest
import torch

from bwd_harness import gpu_finalize_tile
from test_triton_ops import DEVICE, _conv_inputs, _rule, pytestmark  # noqa: F401  (the backend's skip)

from resfast.ops import reference


@pytest.fixture(autouse=True)
def _gpu_finalize(gpu_finalize_tile):  # noqa: F811
    """The gradient finalize on the GPU's tile (:func:`bwd_harness.gpu_finalize_tile`): these
    wide groups' weight gradients have up to 64 x 32 x 9 columns."""

OPS = torch.ops.resfast_triton

TMA_CASES = [
    # (C, C_out, groups, k, stride, padding, dilation, dtype, tma)
    (20, 40, 1, 3, 2, 1, 1, torch.float32, True),     # stride 2: residue classes; partial input / output chunks
    (16, 24, 1, 3, 1, 2, 2, torch.bfloat16, True),    # dilation 2, padding 2, a partial output chunk
]


def _setup(monkeypatch, case, hw=(4, 6)):
    from resfast.kernels.triton import bn_relu_conv_bwd
    from resfast.ops import triton_ops

    monkeypatch.setattr(triton_ops, "S1_INPUT", False)
    monkeypatch.setattr(triton_ops, "_BWD_INPUT_WIDE_INTERP",
                        triton_ops._cfg(4, 2, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16, TMA=1))
    c, co, groups, k, s, p, d, dtype, tma = case
    x, w, _, bw, bb, mean, invstd = _conv_inputs(c, co, groups, k, "cl", dtype, hw=hw, seed=c + co)
    w = w.contiguous(memory_format=torch.channels_last)  # the descriptors want the channels innermost
    ho, wo = (hw[0] + 2 * p - d * (k - 1) - 1) // s + 1, (hw[1] + 2 * p - d * (k - 1) - 1) // s + 1
    go = torch.randn(2, co, ho, wo, generator=torch.Generator().manual_seed(co)).to(device=DEVICE, dtype=dtype)
    go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, [s, s], [p, p], [d, d], groups, True)
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    (launch,) = [launch for launch in plan if launch.name == "conv_bwd_input"]
    assert launch.fn is bn_relu_conv_bwd.bn_relu_conv_bwd_input_kernel  # the path under test
    assert launch.bind(launch.interp_config).constexprs["TMA"] is tma
    return args, dtype


@pytest.mark.parametrize("case", TMA_CASES, ids=str)
def test_wide_input_tma_against_eager(case, monkeypatch):
    args, dtype = _setup(monkeypatch, case)
    _rule("bn_relu_conv2d_backward", OPS.bn_relu_conv2d_backward(*args), reference.bn_relu_conv2d_backward, args,
          dtype, f"TMA input gradient case={case}")


def test_wide_input_tma_nan_propagates(monkeypatch):
    """Stride 1, two full output chunks, with a NaN in one ``grad_out`` element: NaN at exactly
    the input-gradient positions eager's has (through the copy engine's boxes, as through the
    masked loads). (Its float64-rule pass without the NaN was dropped, 2026-12-01: the stride-1
    path is :data:`TMA_CASES`' second case.)"""
    case = (16, 32, 1, 3, 1, 1, 1, torch.float32, True)
    args, dtype = _setup(monkeypatch, case)
    go = args[0].clone()
    go[1, 5, 2, 3] = float("nan")
    args = (go,) + args[1:]
    got = OPS.bn_relu_conv2d_backward(*args)
    ref = reference.bn_relu_conv2d_backward(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                              else a for a in args])
    assert torch.equal(torch.isnan(got[0]).cpu(), torch.isnan(ref[0]).cpu())


def test_wide_input_tma_falls_back(monkeypatch):
    """Two groups of 18 output channels: a 16-wide box would reach into the next group, so the
    planner keeps the masked loads (``TMA`` off) for the same config."""
    _setup(monkeypatch, (18, 36, 2, 3, 2, 1, 1, torch.float32, False))


def test_tma_ok_layouts():
    """The planner's condition: channels innermost, 16-byte strides, chunks inside a group."""
    from resfast.ops import triton_ops

    cl = torch.channels_last
    go = torch.empty(2, 32, 5, 6).contiguous(memory_format=cl)
    w = torch.empty(32, 16, 3, 3).contiguous(memory_format=cl)
    blk = triton_ops._blocks(1, 16, 32, 16, 16)
    assert triton_ops._tma_ok(go, w, 1, blk, 32)
    assert not triton_ops._tma_ok(go.contiguous(), w, 1, blk, 32)  # NCHW grad_out
    assert not triton_ops._tma_ok(go, w.contiguous(), 1, blk, 32)  # the weights' channels not innermost
    odd = torch.empty(2, 36, 5, 6).contiguous(memory_format=cl)[:, :30]  # a stride of 36 floats is 16-byte
    assert triton_ops._tma_ok(odd, torch.empty(30, 16, 3, 3).contiguous(memory_format=cl), 1,
                              triton_ops._blocks(1, 16, 30, 16, 16), 30)
    g3 = torch.empty(2, 6, 5, 6, dtype=torch.bfloat16).contiguous(memory_format=cl)  # 12-byte position stride
    assert not triton_ops._tma_ok(g3, torch.empty(6, 16, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=cl),
                                  1, triton_ops._blocks(1, 16, 6, 16, 16), 6)


# The weight gradient from the activations the input gradient stores (``SAVE_A``), both operands
# by TMA descriptors (``bn_relu_conv_bwd_weight_tma_kernel``; the interpreter's 4 x 4 tiles must
# divide the output, else the planner keeps the masked kernels).
A_CASES = [
    # (C, C_out, groups, k, stride, padding, dilation, dtype, hw)
    (24, 40, 1, 3, 2, 1, 1, torch.bfloat16, (8, 8)),   # stride 2 (residue boxes), partial channel blocks
    (16, 32, 1, 3, 1, 2, 2, torch.float32, (4, 8)),    # dilation 2, padding 2, grad_bias
    (32, 64, 2, 3, 1, 1, 1, torch.float32, (4, 4)),    # two wide groups: boxes past a group stay unstored
]


def _a_setup(monkeypatch, case, path=True):
    from resfast.kernels.triton import bn_relu_conv_wgrad
    from resfast.ops import triton_ops

    monkeypatch.setattr(triton_ops, "S1_INPUT", False)
    c, co, groups, k, s, p, d, dtype, hw = case
    x, w, _, bw, bb, mean, invstd = _conv_inputs(c, co, groups, k, "cl", dtype, hw=hw, seed=c + co)
    ho, wo = (hw[0] + 2 * p - d * (k - 1) - 1) // s + 1, (hw[1] + 2 * p - d * (k - 1) - 1) // s + 1
    go = torch.randn(2, co, ho, wo, generator=torch.Generator().manual_seed(co)).to(device=DEVICE, dtype=dtype)
    go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, [s, s], [p, p], [d, d], groups, True)
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    (launch,) = [launch for launch in plan if launch.name == "conv_bwd_weight"]
    assert (launch.fn is bn_relu_conv_wgrad.bn_relu_conv_bwd_weight_tma_kernel) is path
    (ga,) = [launch for launch in plan if launch.name == "conv_bwd_input"]
    assert ga.bind(ga.interp_config).constexprs["SAVE_A"] is path
    return args, dtype


@pytest.mark.parametrize("case", A_CASES, ids=str)
def test_weight_from_a_against_eager(case, monkeypatch):
    args, dtype = _a_setup(monkeypatch, case)
    _rule("bn_relu_conv2d_backward", OPS.bn_relu_conv2d_backward(*args), reference.bn_relu_conv2d_backward, args,
          dtype, f"weight gradient from a, case={case}")


def test_weight_from_a_nan_propagates(monkeypatch):
    """A NaN in one input element and an infinity in one ``grad_out`` element: NaN at exactly
    the weight-gradient entries eager's has (the stored ``a`` carries the NaN; zero-filled
    padding times the infinity is NaN, as in eager's products)."""
    args, dtype = _a_setup(monkeypatch, (16, 32, 1, 3, 1, 1, 1, torch.float32, (4, 8)))
    x, go = args[1].clone(), args[0].clone()
    x[1, 3, 2, 5] = float("nan")
    go[0, 7, 0, 3] = float("inf")
    args = (go, x) + args[2:]
    got = OPS.bn_relu_conv2d_backward(*args)
    ref = reference.bn_relu_conv2d_backward(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                              else a for a in args])
    assert torch.isnan(ref[1]).any() and not torch.isnan(ref[1]).all()
    assert torch.equal(torch.isnan(got[1]).cpu(), torch.isnan(ref[1]).cpu())


def test_weight_from_a_falls_back(monkeypatch):
    """Output tiles that would overhang the output (6 x 6 under 4 x 4 tiles) and an odd height
    at stride 2: the masked weight kernels, no ``a`` stored; and ``_weight_from_a``'s layouts."""
    from resfast.ops import triton_ops

    _a_setup(monkeypatch, (16, 32, 1, 3, 1, 1, 1, torch.float32, (6, 6)), path=False)
    cl = torch.channels_last
    x = torch.empty(2, 16, 8, 8).contiguous(memory_format=cl)
    go = torch.empty(2, 32, 4, 4).contiguous(memory_format=cl)
    assert triton_ops._weight_from_a(go, x, [2, 2])
    assert not triton_ops._weight_from_a(go.contiguous(), x, [2, 2])  # NCHW grad_out
    assert not triton_ops._weight_from_a(go, torch.empty(2, 16, 7, 8).contiguous(memory_format=cl), [2, 2])
    assert not triton_ops._weight_from_a(go, torch.empty(2, 6, 8, 8, dtype=torch.bfloat16), [2, 2])  # 12-byte rows


# The forward of wide groups from stored activations (``FWD_FROM_A``): a BN-ReLU pass writes ``a``,
# ``bn_relu_conv_fwd_tma_kernel`` reads it and the channels-last weights by TMA descriptors.
FWD_A_CASES = [
    # (C, C_out, groups, k, stride, padding, dilation, dtype, hw, swap): tiles overhanging the
    # output, partial output channel blocks; the weights as one 2-D view (W2D) in both
    (32, 40, 1, 3, 2, 1, 1, torch.bfloat16, (6, 10), True),  # stride 2 (residue boxes), bias, SWAP
    (32, 48, 2, 3, 1, 2, 2, torch.float32, (5, 6), False),   # two wide groups (a block past one unstored), dilation 2
]


def _fwd_a_setup(case, monkeypatch):
    from resfast.kernels.triton import bn_relu_conv_fwd_tma
    from resfast.ops import triton_ops

    c, co, groups, k, s, p, d, dtype, hw, swap = case
    monkeypatch.setattr(triton_ops, "_FWD_TMA_INTERP", triton_ops._cfg(4, 2, 1, TILE_H=4, TILE_W=4, BLOCK_N=16,
                                                                       BLOCK_K=16, SWAP=int(swap)))
    x, w, b, bw, bb, mean, invstd = _conv_inputs(c, co, groups, k, "cl", dtype, hw=hw, seed=c + co)
    w = w.contiguous(memory_format=torch.channels_last)  # the descriptors want the channels innermost
    args = (x, w, b, bw, bb, mean, invstd, [s, s], [p, p], [d, d], groups, True)
    plan = triton_ops.launch_plan("bn_relu_conv2d", *args)
    assert [launch.fn for launch in plan] == [bn_relu_conv_fwd_tma.bn_relu_store_kernel,
                                              bn_relu_conv_fwd_tma.bn_relu_conv_fwd_tma_kernel]
    const = plan[1].bind(plan[1].interp_config).constexprs
    assert (const["SWAP"], const["W2D"]) == (swap, True)
    # the fallbacks to the masked kernel: NCHW x or weights; partial input chunks at a width stride
    for xx, ww in ((x.contiguous(), w), (x, w.contiguous())):
        (old,) = triton_ops.launch_plan("bn_relu_conv2d", xx, ww, *args[2:])
        assert old.fn is not bn_relu_conv_fwd_tma.bn_relu_conv_fwd_tma_kernel
    assert not triton_ops._fwd_a_configs(1, 24, 40, [2, 2]) and triton_ops._fwd_a_configs(1, 24, 40, [1, 1])
    return args, dtype


@pytest.mark.parametrize("case", FWD_A_CASES, ids=str)
def test_forward_from_a_against_eager(case, monkeypatch):
    """Against the float64 rule; then a NaN in one input element and an infinity in one weight:
    non-finite outputs at exactly eager's positions (the zero fill is the padding: ``0 * inf``
    NaN where eager's padded products are)."""
    args, dtype = _fwd_a_setup(case, monkeypatch)
    _rule("bn_relu_conv2d", OPS.bn_relu_conv2d(*args), reference.bn_relu_conv2d, args, dtype,
          f"forward from a, case={case}")
    x, w = args[0].clone(), args[1].clone()
    x[1, 3, 2, 5] = float("nan")
    w[5, 1, 0, 2] = float("inf")
    args = (x, w) + args[2:]
    got = OPS.bn_relu_conv2d(*args)
    ref = reference.bn_relu_conv2d(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                     for a in args])
    assert torch.equal(torch.isnan(got).cpu(), torch.isnan(ref).cpu())
    assert torch.equal(torch.isinf(got).cpu(), torch.isinf(ref).cpu())
