"""The packed stride-1 input gradient's register-light config (``MMA_EPI``:
``bn_relu_conv_bwd_input_packed_kernel`` with its epilogue in the MMA's layout, the BN vectors
placed there by :func:`resfast.kernels.triton.bn_relu.mma_columns`) and its channel-at-a-time
non-finite fix-up (:func:`_packed_fixup`), against the float64 rule: packed 2-, 4- and
8-channel groups, one 16-channel group, depthwise with a partial block, 4 -> 8 channel groups,
two blocks, padding 0, 1 and 2, dilation 2, odd image sizes, 2x2 / 5x5 kernels, NCHW and
channels_last, with and without the BN affine, bfloat16, and a NaN in one ``grad_out`` element
or in one group's input ``x``: NaN must reach exactly the outputs eager's NaN reaches, none of
the packed neighbours'.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py) with tiny shapes;
the interpreter's config is swapped for one with ``MMA_EPI`` for these tests.
"""
from __future__ import annotations

import pytest
import torch

from bwd_harness import DEVICE, TRITON_WHY as _WHY, check as _check, f64 as _f64, inputs as _inputs, out_hw as _out_hw
from reference import assert_rule

pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

if not _WHY:
    from resfast.kernels.triton import bn_relu_conv_bwd
    from resfast.ops import reference, triton_ops


def _interp_config(pairs):
    """The interpreter's config: ``MMA_EPI``, with or without ``PAIRS`` (4 x 4 tiles: 16 rows)."""
    extra = {"PAIRS": 1} if pairs else {}
    return triton_ops._cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16, MMA_EPI=1, **extra)


@pytest.fixture(autouse=True)
def _mma_epi_config(monkeypatch):
    """Every packed input-gradient launch of these tests runs an ``MMA_EPI`` config (the
    interpreter's one, and on CUDA the new configs alone)."""
    monkeypatch.setattr(triton_ops, "_BWD_INPUT_PACKED_INTERP", _interp_config(True))
    monkeypatch.setattr(triton_ops, "_BWD_INPUT_PACKED_CONFIGS",
                        [c for c in triton_ops._BWD_INPUT_PACKED_CONFIGS if c.get("MMA_EPI")])
    triton_ops.clear_plan_cache()
    yield
    triton_ops.clear_plan_cache()


def _input_launch(args):
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    (ga,) = [lp for lp in plan if lp.name == "conv_bwd_input"]
    return ga


def _light_path(args):
    """The packed input-gradient kernel, bound with ``MMA_EPI``."""
    ga = _input_launch(args)
    return (ga.fn is bn_relu_conv_bwd.bn_relu_conv_bwd_input_packed_kernel
            and ga.bind(ga.interp_config if triton_ops._interpret() else ga.configs[0]).constexprs.get("MMA_EPI"))


def test_first_configs_are_the_light_ones(monkeypatch):
    """On a GPU the static choice (the first config) is the ``MMA_EPI`` + ``PAIRS`` one capped at
    56 registers (9 programs per SM), then ``MMA_EPI`` at 64 (8 per SM);
    ``PACKED_INPUT_MMA_EPI = False`` plans the configs before them."""
    monkeypatch.undo()
    first, second = triton_ops._BWD_INPUT_PACKED_CONFIGS[:2]
    assert first.get("MMA_EPI") and first.get("PAIRS") and first.get("MAXNREG") == 56 and first.programs_per_sm == 9
    assert second.get("MMA_EPI") and not second.get("PAIRS") and second.get("MAXNREG") == 64
    x, w, bw, bb, mean, invstd = _inputs(1, 16, 16, 4, (8, 8), (3, 3))
    go = torch.randn(1, 16, 8, 8).to(DEVICE)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 4, False)
    triton_ops.clear_plan_cache()
    assert _input_launch(args).configs[0].get("MMA_EPI")
    monkeypatch.setattr(triton_ops, "PACKED_INPUT_MMA_EPI", False)
    triton_ops.clear_plan_cache()
    assert not any(c.get("MMA_EPI") for c in _input_launch(args).configs)
    triton_ops.clear_plan_cache()


@pytest.mark.parametrize("case", [(2, 16, 16, 4, (9, 7), (3, 3), (1, 1), (1, 1)),
                                  (1, 24, 24, 24, (11, 5), (3, 3), (2, 2), (2, 2))], ids=str)
def test_light_input_gradient_without_pairs(case, monkeypatch):
    """The second config's kernel (``MMA_EPI`` alone: per-position sums of ``[BM, BLOCK_K]``)."""
    monkeypatch.setattr(triton_ops, "_BWD_INPUT_PACKED_INTERP", _interp_config(False))
    triton_ops.clear_plan_cache()
    n, c, co, groups, hw, k, p, d = case
    x, w, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k, seed=2)
    go = torch.randn(n, co, *_out_hw(hw, k, p, d), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], list(p), list(d), groups, True)
    assert _light_path(args)
    _check(args, torch.float32, f"case={case}, no PAIRS")


# (n, C, C_out, groups, H x W, kernel, padding, dilation)
CASES = [
    (2, 16, 16, 4, (9, 7), (3, 3), (1, 1), (1, 1)),     # ResNeXt stage 1: 4-channel groups, 4 per block
    (1, 16, 16, 2, (7, 10), (3, 3), (0, 0), (1, 1)),    # 8-channel groups, padding 0
    (1, 16, 16, 1, (6, 5), (3, 3), (2, 2), (1, 1)),     # one 16-channel group, padding 2
    (1, 32, 32, 16, (9, 9), (3, 3), (2, 2), (2, 2)),    # 2-channel groups, two blocks, dilation 2
    (1, 24, 24, 24, (11, 5), (3, 3), (1, 1), (1, 1)),   # depthwise, a full block and a partial one
    (1, 12, 24, 3, (5, 9), (3, 3), (1, 0), (1, 2)),     # 4 -> 8 channel groups, partial block, mixed pad/dil
    (1, 16, 16, 4, (8, 7), (2, 2), (1, 0), (1, 1)),     # 2x2: asymmetric output
    (1, 16, 16, 8, (9, 10), (5, 5), (2, 2), (1, 1)),    # 5x5, 2-channel groups
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_light_input_gradient_against_eager(case):
    """grad_z, grad_weight, grad_bias and the BN-gradient sums (float32, channels_last)."""
    n, c, co, groups, hw, k, p, d = case
    x, w, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k)
    go = torch.randn(n, co, *_out_hw(hw, k, p, d), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], list(p), list(d), groups, True)
    assert _light_path(args)
    _check(args, torch.float32, f"case={case}")


def test_light_input_gradient_nchw_no_affine():
    """NCHW tensors (channel stride H*W), no BN weight or bias, odd sizes, padding 1."""
    x, w, _, _, mean, invstd = _inputs(1, 16, 16, 4, (7, 9), (3, 3), layout=torch.contiguous_format, seed=5)
    go = torch.randn(1, 16, 7, 9, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    args = (go, x, w, None, None, mean, invstd, [1, 1], [1, 1], [1, 1], 4, False)
    assert _light_path(args)
    _check(args, torch.float32, "NCHW, no affine")


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
def test_light_input_gradient_bf16(layout):
    """bfloat16 operands (the MMA's dtype on a GPU), odd H and W, padding 1."""
    x, w, bw, bb, mean, invstd = _inputs(1, 16, 16, 4, (9, 7), (3, 3), torch.bfloat16, seed=4, layout=layout)
    go = torch.randn(1, 16, 9, 7, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    go = go.contiguous(memory_format=layout)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 4, True)
    assert _light_path(args)
    _check(args, torch.bfloat16, "bf16")


def _nan_check(args, dtype, context):
    """Every output's NaN positions are eager's (float64), the rest held to the rule."""
    got = torch.ops.resfast_triton.bn_relu_conv2d_backward(*args)
    ref64 = reference.bn_relu_conv2d_backward(*[_f64(a) for a in args])
    ref_same = reference.bn_relu_conv2d_backward(*args)
    for i, (a, r64, rs) in enumerate(zip(got, ref64, ref_same)):
        if a is None or r64 is None:
            continue
        a = a.cpu()
        assert torch.equal(torch.isnan(a), torch.isnan(r64)), f"output {i}: NaN positions not eager's ({context})"
        bad = ~torch.isfinite(r64)
        assert torch.equal(torch.isinf(a), torch.isinf(r64)), f"output {i}: infinities differ ({context})"
        a, r64, rs = (t.masked_fill(bad.to(t.device), 0.0) for t in (a, r64, rs))
        assert_rule(f"bn_relu_conv2d_backward[{i}]", a, r64, rs, context, dtype=dtype)
    return got


def test_light_nan_in_one_grad_out_element():
    """A NaN in one ``grad_out`` element: the block-diagonal MMA would carry it into the packed
    neighbours (0 * NaN); the program whose sum of grad_z is not finite recomputes its tiles
    one input channel at a time. NaN reaches exactly eager's outputs (that group's input
    channels near the element, its sums and weight-gradient entries), none of the neighbours'.

    One case for the fix-up after the ``MMA_EPI`` + ``PAIRS`` tile loop (the non-finite sum
    is found in the pairs' layout), 2026-12-01: it was also padding 1 and padding 0 / dilation
    2 / NCHW in float32, which the stride-1 fix-up's own test
    (tests/test_triton_bwd_packed_input.py) and this file's float64-rule cases cover. Kept:
    bfloat16 (the fix-up's activations and grad_z rounded to it), padding 2, 4-channel groups
    four to a block, the NaN in group 1 of the *second* image, its taps inside that image's
    first tile, the second tile of the program that walks it (8 tiles of 4 x 4 on 7 x 8
    images, three programs; 9 x 11 images had 18, and a NaN over four tiles made every
    program recompute)."""
    pad, dil, layout, dtype = 2, 1, torch.channels_last, torch.bfloat16
    c, co, groups, hw = 16, 16, 4, (7, 8)
    x, w, bw, bb, mean, invstd = _inputs(2, c, co, groups, hw, (3, 3), dtype, seed=8, layout=layout)
    ho, wo = _out_hw(hw, (3, 3), (pad, pad), (dil, dil))
    go = torch.randn(2, co, ho, wo, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    go = go.contiguous(memory_format=layout)
    go[1, 6, 3, 3] = float("nan")  # output channel 6 is in group 1 (input channels 4-7): input rows / columns 1-3
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [pad, pad], [dil, dil], groups, True)
    assert _light_path(args)
    gz = _nan_check(args, dtype, f"NaN in grad_out, padding {pad}, dilation {dil}")[0]
    assert torch.isnan(gz[:, 4:8]).any() and not torch.isnan(gz[:, :4]).any() and not torch.isnan(gz[:, 8:]).any()


@pytest.mark.parametrize("groups,channel", [(4, 9), (16, 3)], ids=["g4", "depthwise"])
def test_light_nan_in_one_groups_input(groups, channel):
    """A NaN in one input channel's ``x`` (one group's input): it reaches that channel's
    ``grad_z`` where eager's does (not where the ReLU's mask or the padding stops it), its sums
    and its group's weight gradient; the packed neighbours sharing the MMA keep finite values."""
    c, co, hw = 16, 16, (7, 9)
    x, w, bw, bb, mean, invstd = _inputs(2, c, co, groups, hw, (3, 3), seed=11)
    x[0, channel, 3, 4] = float("nan")
    go = torch.randn(2, co, *hw, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], groups, True)
    assert _light_path(args)
    gz = _nan_check(args, torch.float32, f"NaN in x channel {channel}, {groups} groups")[0]
    others = [k for k in range(c) if k != channel]
    assert not torch.isnan(gz[:, others]).any()
