"""The forward conv's ``FIXUP_FMA`` config (``bn_relu_conv_fwd_kernel``): packed small groups
whose non-finite fix-up recomputes a tile by scalar FMAs (:func:`_fixup_fma`), with a per-row
non-finite detector, against the float64 rule: packed 2-, 4- and 8-channel groups, one
16-channel group, depthwise, 4 -> 8 channel groups with a partial block, two blocks, padding 0,
1 and 2, dilation 2, odd image sizes, 2x2 / 5x5 kernels, NCHW and channels_last, bfloat16, and
a NaN or an infinity in one channel of ``x`` (NaN must reach exactly the outputs eager's NaN
reaches), with and without the statistics epilogue.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py) with tiny shapes;
the interpreter's config is swapped for one with ``FIXUP_FMA`` for these tests.
"""
from __future__ import annotations

import pytest
import torch

from resfast.backends import backend_status
from reference import assert_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY = backend_status(DEVICE)["triton"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

if not _WHY:
    from resfast.ops import reference, triton_ops

    OPS = torch.ops.resfast_triton


@pytest.fixture(autouse=True)
def _fixup_fma_config(monkeypatch):
    """Every forward launch of these tests runs a ``FIXUP_FMA`` config (the interpreter's one,
    and on CUDA the new config alone)."""
    cfg = triton_ops._cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16, STACK=1, FIXUP_FMA=1)
    monkeypatch.setattr(triton_ops, "_FWD_INTERP", cfg)
    monkeypatch.setattr(triton_ops, "_FWD_CONFIGS", [c for c in triton_ops._FWD_CONFIGS if c.get("FIXUP_FMA")])
    triton_ops.clear_plan_cache()
    yield
    triton_ops.clear_plan_cache()


def _f64(t):
    return t.detach().to(device="cpu", dtype=torch.float64)


def _inputs(n, c, co, groups, hw, k, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    kh, kw = k
    x = (torch.randn(n, c, *hw, generator=g) * 1.3 + 0.4).to(dtype)
    w = (torch.randn(co, c // groups, kh, kw, generator=g) / (c // groups * kh * kw) ** 0.5).to(dtype)
    b = (torch.randn(co, generator=g) * 0.3).to(dtype)
    bw = torch.rand(c, generator=g) + 0.5
    bb = torch.randn(c, generator=g) * 0.3
    mean = torch.randn(c, generator=g) * 0.3 + 0.2
    invstd = torch.rand(c, generator=g) + 0.5
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return [t.to(DEVICE) for t in (x, w, b, bw, bb, mean, invstd)]


def _uses_fixup_fma(args):
    plan = triton_ops.launch_plan("bn_relu_conv2d", *args)
    fwd = [lp for lp in plan if lp.name == "conv_fwd"][0]
    b = fwd.bind(fwd.interp_config)
    return b.constexprs["FIXUP_FMA"] and b.constexprs["PACKED"]


def _check(got, args, dtype, context, nan_ok=False):
    """``got`` against eager in float64 and in ``dtype``; with ``nan_ok`` the NaN and infinite
    outputs must be eager's own (same positions, same infinities), the rest held to the rule."""
    ref64 = reference.bn_relu_conv2d(*[_f64(a) if isinstance(a, torch.Tensor) else a for a in args])
    ref_same = reference.bn_relu_conv2d(*args).cpu()
    got = got.cpu()
    if nan_ok:
        bad = ~torch.isfinite(ref64)
        assert bad.any(), context
        assert torch.equal(torch.isnan(got), torch.isnan(ref64)), f"NaN positions differ from eager's ({context})"
        inf = torch.isinf(ref64)
        assert torch.equal(got[inf].double(), ref64[inf]), f"infinities differ from eager's ({context})"
        got, ref64, ref_same = (t.masked_fill(bad, 0.0) for t in (got, ref64, ref_same))
    assert_rule("bn_relu_conv2d", got, ref64, ref_same, context, dtype=dtype)


# (n, C, C_out, groups, H x W, kernel, padding, dilation)
CASES = [
    (2, 16, 16, 4, (9, 7), (3, 3), (1, 1), (1, 1)),     # ResNeXt stage 1: 4-channel groups, 4 per block
    (1, 16, 16, 2, (7, 10), (3, 3), (0, 0), (1, 1)),    # 8-channel groups, padding 0
    (1, 32, 32, 16, (9, 9), (3, 3), (2, 2), (2, 2)),    # 2-channel groups, two blocks, dilation 2
    (1, 8, 8, 8, (11, 5), (3, 3), (1, 1), (1, 1)),      # depthwise, one partial block of 8 channels
    (1, 12, 24, 3, (5, 9), (3, 3), (1, 0), (1, 2)),     # 4 -> 8 channel groups, partial block, mixed pad/dil
    (1, 16, 16, 4, (8, 7), (2, 2), (1, 0), (1, 1)),     # 2x2: asymmetric output
    (1, 16, 16, 8, (9, 10), (5, 5), (2, 2), (1, 1)),    # 5x5, 2-channel groups
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_forward_against_eager(case, layout):
    n, c, co, groups, hw, k, p, d = case
    x, w, b, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k, layout, torch.float32)
    args = (x, w, b, bw, bb, mean, invstd, [1, 1], list(p), list(d), groups, False)
    assert _uses_fixup_fma(args)
    _check(OPS.bn_relu_conv2d(*args), args, torch.float32, f"case={case}, {layout}")


def test_forward_bfloat16():
    x, w, b, bw, bb, mean, invstd = _inputs(2, 16, 16, 4, (9, 7), (3, 3), "cl", torch.bfloat16)
    args = (x, w, b, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 4, False)
    assert _uses_fixup_fma(args)
    _check(OPS.bn_relu_conv2d(*args), args, torch.bfloat16, "bfloat16")


# A program that meets a result that is not finite recomputes every tile it walks with the
# scalar-FMA fix-up (under the interpreter 3 programs per channel block, tiles dealt round-robin),
# so a case's cost is the fixed programs' tiles x BLOCK_N x C_in per group x the kernel's taps.
# The shapes keep each case's structure with few tiles in the fixed programs.
NAN_CASES = [
    # (case, layout, dtype, channel, position, value)
    # group 2 of the block only; one image of 2 x 2 tiles (the second row and column masked): the
    # NaN's outputs around (4, 3) straddle all four, so every program fixes up, program 0 two tiles
    ((1, 16, 16, 4, (5, 7), (3, 3), (1, 1), (1, 1)), "cl", torch.float32, 9, (0, 4, 3), float("nan")),
    # padding 0, at the corner: output (0, 0) alone, tile 0 of the 2 (the second masked)
    ((1, 16, 16, 2, (7, 6), (3, 3), (0, 0), (1, 1)), "nchw", torch.float32, 3, (0, 0, 0), float("nan")),
    # second block, dilation 2, Inf, in the second image's last position (4 x 9: 3 tiles an image);
    # the Inf reaches tiles 4 and 5, so programs 1 and 2 of block 1 fix up, and their tiles of image 0
    ((2, 32, 32, 16, (4, 9), (3, 3), (2, 2), (2, 2)), "nchw", torch.float32, 17, (1, 3, 8), float("inf")),
    (CASES[4], "cl", torch.bfloat16, 5, (0, 2, 8), float("nan")),      # partial block, bfloat16
    # 5x5, 2-channel groups: 4 x 10 outputs, the NaN reaches tiles 0 and 1 (programs 0 and 1), not 2
    ((1, 16, 16, 8, (4, 10), (5, 5), (2, 2), (1, 1)), "cl", torch.float32, 3, (0, 2, 5), float("nan")),
]


@pytest.mark.parametrize("nan_case", NAN_CASES, ids=str)
def test_nonfinite_stays_in_its_group(nan_case):
    case, layout, dtype, ch, pos, value = nan_case
    n, c, co, groups, hw, k, p, d = case
    x, w, b, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k, layout, dtype, seed=4)
    x[pos[0], ch, pos[1], pos[2]] = value
    args = (x, w, b, bw, bb, mean, invstd, [1, 1], list(p), list(d), groups, False)
    assert _uses_fixup_fma(args)
    y = OPS.bn_relu_conv2d(*args)
    _check(y, args, dtype, f"{value} in channel {ch}, case={case}, {layout}", nan_ok=True)


def test_statistics_epilogue_with_a_nan():
    """The statistics epilogue of the same config: a NaN's group gets NaN statistics, every
    other channel the statistics of eager's output. One image of 3 x 2 tiles (CASES[0]'s shape,
    n = 1): the NaN at (1, 1) reaches tile 0 only, so program 0 fixes up its tiles 0 and 3 (the
    second finite, its last column masked at the image's edge) and takes their statistics
    afresh, while programs 1 and 2 keep the main loop's."""
    n, c, co, groups, hw, k, p, d = (1,) + CASES[0][1:]
    x, w, b, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k, "cl", torch.float32, seed=6)
    x[0, 5, 1, 1] = float("nan")  # channel 5: group 1, output channels 4..7
    args = (x, w, b, bw, bb, mean, invstd, [1, 1], list(p), list(d), groups, False)
    y, partials = OPS.bn_relu_conv2d_stats(*args)
    _check(y, args, torch.float32, "statistics epilogue, NaN", nan_ok=True)
    m, iv = OPS.bn_stats_merge_update(partials, y.numel() // co, None, None, 0.0, 1e-5)
    ref = reference.bn_relu_conv2d(*[_f64(a) if isinstance(a, torch.Tensor) else a for a in args])
    var_s, mean_s = torch.var_mean(ref, dim=(0, 2, 3), correction=0)
    assert torch.equal(torch.isnan(m.cpu()), torch.isnan(mean_s)) and torch.isnan(mean_s).sum() == 4
    ok = ~torch.isnan(mean_s)
    assert (m.cpu().double()[ok] - mean_s[ok]).abs().max() < 1e-4
    assert (iv.cpu().double()[ok] - (var_s[ok] + 1e-5).rsqrt()).abs().max() < 1e-3
