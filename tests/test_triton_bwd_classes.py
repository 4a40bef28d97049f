"""The packed backward kernel's residue-class path (``bn_relu_conv_bwd_kernel`` with ``SH, SW``:
stride, residue class and tap set compile-time, each class's taps stacked without a masked-out
tap) against the float64 rule, beside the generic runtime-stride path it replaces at strides of
1 and 2: odd H and W (classes of unequal sizes), padding 0 and 1, odd and even dilation, mixed
strides, 1x1 / 2x2 / 5x5 kernels (a class with no tap, one tap, several chunks), the split
launches (input gradient and weight gradient alone), and a non-finite ``grad_out`` with packed
groups (the in-launch exact fix-up walks the classes' tiles as the first pass did).

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py) with tiny shapes.
"""
from __future__ import annotations

import pytest
import torch

from bwd_harness import DEVICE, TRITON_WHY as _WHY, check as _check, gpu_finalize_tile, inputs as _inputs
from bwd_harness import out_hw as _out_hw

pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

if not _WHY:
    from resfast.ops import triton_ops


@pytest.fixture(autouse=True)
def _merged_plan(monkeypatch):
    """These tests cover the merged launch's class path: packed groups at stride 2 take the
    strided packed input gradient since it exists (``PACKED_INPUT_S2``;
    tests/test_triton_bwd_packed_s2.py), so the plan before it is bound here."""
    if not _WHY:
        monkeypatch.setattr(triton_ops, "PACKED_INPUT_S2", False)



def _class_strides(args):
    """``(SH, SW)`` of every launch of ``bn_relu_conv_bwd_kernel`` the op plans for ``args``."""
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    return [(b.constexprs["SH"], b.constexprs["SW"]) for b in (lp.bind(lp.interp_config) for lp in plan)
            if "SH" in b.constexprs]


# (n, C, C_out, groups, H x W, kernel, stride, padding, dilation, class path expected)
CASES = [
    (2, 16, 16, 4, (7, 9), (3, 3), (2, 2), (1, 1), (1, 1), True),    # ResNeXt's down block, odd H and W
    (1, 12, 12, 3, (9, 7), (3, 3), (2, 2), (0, 0), (1, 1), True),    # padding 0: last row / column unread
    (2, 8, 8, 8, (9, 9), (3, 3), (2, 2), (3, 3), (3, 3), True),      # depthwise, odd dilation 3
    (1, 16, 8, 4, (8, 9), (3, 3), (2, 1), (1, 1), (1, 1), True),     # mixed strides, 4 -> 2 channel groups
    (1, 12, 12, 6, (7, 8), (3, 3), (1, 2), (1, 0), (2, 1), True),    # stride 1 along h, dilation 2 there
    (2, 16, 16, 4, (7, 7), (1, 1), (2, 2), (0, 0), (1, 1), True),    # 1x1 stride 2: three classes with no tap
    (1, 16, 16, 8, (8, 7), (2, 2), (2, 2), (0, 1), (1, 1), True),    # 2x2: one tap per class row
    (1, 8, 8, 4, (9, 10), (5, 5), (2, 2), (2, 2), (1, 1), True),     # 5x5: a class of 9 taps, three chunks
    (1, 16, 16, 4, (9, 9), (3, 3), (2, 2), (2, 2), (2, 2), False),   # even dilation: the generic path
    (1, 12, 12, 3, (10, 8), (3, 3), (3, 3), (1, 1), (1, 1), False),  # stride 3: the generic path
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_packed_backward_residue_classes_against_eager(case):
    """Packed small groups (merged launch: grad_a, grad_weight, grad_bias, BN-gradient sums)."""
    n, c, co, groups, hw, k, s, p, d, cls = case
    x, w, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k)
    go = torch.randn(n, co, *_out_hw(hw, k, p, d, s), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    args = (go, x, w, bw, bb, mean, invstd, list(s), list(p), list(d), groups, True)
    paths = _class_strides(args)
    assert paths and all(path == (tuple(s) if cls else (0, 0)) for path in paths), paths
    _check(args, torch.float32, f"case={case}")


def test_packed_backward_residue_classes_bf16():
    """bfloat16 operands (the MMA's dtype on a GPU) at stride 2, padding 1, odd H and W."""
    x, w, bw, bb, mean, invstd = _inputs(2, 16, 16, 2, (9, 7), (3, 3), torch.bfloat16, seed=4)
    go = torch.randn(2, 16, 5, 4, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    args = (go, x, w, bw, bb, mean, invstd, [2, 2], [1, 1], [1, 1], 2, True)
    assert _class_strides(args) == [(2, 2)]
    _check(args, torch.bfloat16, "bf16 stride 2")


@pytest.mark.usefixtures(gpu_finalize_tile.__name__)  # 64 x 32 x 9 weight-gradient columns: the GPU's finalize tile
def test_split_backward_residue_classes(monkeypatch):
    """The split launches (input gradient alone, weight gradient alone: ResNeXt-50 stage 4's
    32-channel groups on a GPU) on the class path, with a config whose weight-gradient
    accumulators are too many for one merged launch."""
    monkeypatch.setattr(triton_ops, "_BWD_INTERP", triton_ops._cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=32,
                                                                    BLOCK_K=32))
    for hw, p in (((7, 9), 1), ((8, 7), 0)):
        x, w, bw, bb, mean, invstd = _inputs(1, 64, 64, 2, hw, (3, 3), seed=6)  # one image (two until 2026-12-01)
        go = torch.randn(1, 64, *_out_hw(hw, (3, 3), (p, p), (1, 1), (2, 2)),
                         generator=torch.Generator().manual_seed(7)).to(DEVICE)
        args = (go, x, w, bw, bb, mean, invstd, [2, 2], [p, p], [1, 1], 2, True)
        plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
        assert [lp.name for lp in plan] == ["conv_bwd_input", "conv_bwd_weight", "conv_bwd_finalize"]
        assert _class_strides(args) == [(2, 2), (2, 2)]
        _check(args, torch.float32, f"split, {hw}, padding {p}")


def test_packed_nonfinite_grad_out_residue_classes():
    """A NaN in ``grad_out`` with packed groups at stride 2: the program whose sum of grad_z is
    not finite recomputes its tiles of every class exactly, group by group; NaN reaches exactly
    the channels eager gives NaN (the group of the NaN's output channel), all else matches.

    One case (it was padding 1 / dilation 1 and padding 0 / dilation 3, 2026-12-01): padding 1
    along h and 0 along w (the odd and the even residue map), dilation 3 along h, the NaN in
    group 1 of the second image, its taps inside the image."""
    c, co, groups, hw = 16, 16, 4, (9, 11)
    pad, dil = (1, 0), (3, 1)
    x, w, bw, bb, mean, invstd = _inputs(2, c, co, groups, hw, (3, 3), seed=8)
    ho, wo = _out_hw(hw, (3, 3), pad, dil, (2, 2))
    go = torch.randn(2, co, ho, wo, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    go[1, 6, ho // 2, wo // 2] = float("nan")  # output channel 6 is in group 1
    args = (go, x, w, bw, bb, mean, invstd, [2, 2], list(pad), list(dil), groups, True)
    assert _class_strides(args) == [(2, 2)]
    got = _check(args, torch.float32, f"NaN in grad_out, padding {pad}, dilation {dil}")
    gz = got[0]
    assert torch.isnan(gz[:, 4:8]).any() and not torch.isnan(gz[:, :4]).any() and not torch.isnan(gz[:, 8:]).any()


@pytest.mark.usefixtures(gpu_finalize_tile.__name__)  # 64 x 8 x 9 weight-gradient columns: the GPU's finalize tile
def test_weight_gradient_output_chunks_residue_classes(monkeypatch):
    """The weight-gradient launch on the class path with a group's output channels over two
    ``BLOCK_N`` chunks (on a GPU the 16-wide weight configs on ResNeXt-50 stage 4's 32-channel
    groups; under the interpreter such a group is otherwise routed to the wide-group kernels),
    beside the input gradient's generic path (several output chunks: no class path)."""
    monkeypatch.setattr(triton_ops, "_wide_group", lambda *a: False)
    monkeypatch.setattr(triton_ops, "_wide_input", lambda *a: False)
    x, w, bw, bb, mean, invstd = _inputs(1, 16, 64, 2, (7, 9), (3, 3), seed=10)  # one image (two until 2026-12-01)
    go = torch.randn(1, 64, 4, 5, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    args = (go, x, w, bw, bb, mean, invstd, [2, 2], [1, 1], [1, 1], 2, True)
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    assert [lp.name for lp in plan] == ["conv_bwd_input", "conv_bwd_weight", "conv_bwd_finalize"]
    bound = [lp.bind(lp.interp_config) for lp in plan[:2]]
    assert [(b.constexprs["SH"], b.constexprs["ONE_N"]) for b in bound] == [(0, False), (2, True)]
    _check(args, torch.float32, "weight gradient over two output chunks, stride 2")


@pytest.mark.parametrize("stride, cls", [((2, 2), True), ((3, 3), False)], ids=["class", "generic"])
def test_nonfinite_grad_out_at_the_border_padded_taps(stride, cls):
    """A NaN in ``grad_out`` at the corner output element, whose taps reach the zero padding:
    eager's ``grad_weight`` sums ``grad_out * a_padded`` and ``0 * NaN`` is NaN, so every tap of
    the NaN's output channel is NaN (18 entries here), not only the 8 whose input lies inside
    the image (2026-12-01: the kernel gave 8 on both paths; the float64 rule compares the NaN
    pattern). The class path (stride 2) and the generic path (stride 3), merged launch."""
    x, w, bw, bb, mean, invstd = _inputs(1, 8, 8, 4, (5, 7), (3, 3), seed=12)
    go = torch.randn(1, 8, *_out_hw((5, 7), (3, 3), (1, 1), (1, 1), stride),
                     generator=torch.Generator().manual_seed(13)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    go[0, 1, 0, 0] = float("nan")  # output channel 1: group 0 (input channels 0-1)
    args = (go, x, w, bw, bb, mean, invstd, list(stride), [1, 1], [1, 1], 4, True)
    assert _class_strides(args) == [stride if cls else (0, 0)]
    gw = _check(args, torch.float32, f"NaN at the border, stride {stride}")[1]
    assert torch.isnan(gw[1]).all() and int(torch.isnan(gw).sum()) == 18
