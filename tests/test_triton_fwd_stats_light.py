"""The forward conv's statistics epilogue with per-pair shifted sums (``STATS_PAIRS``, the
configs with ``PAIRS``, ``triton_ops.FWD_STATS_PAIRS``): each pair of tile rows keeps a count,
a shift (its first value in the program's first tile) and the sums of ``x - K`` and
``(x - K)^2``; the program's row of partials is stored right after the tile loop, and a packed
program's non-finite fix-up takes its statistics afresh by a walk of its own over the outputs
it stored.

Against the float64 rule (mean, inverse std, running statistics of the next BatchNorm): packed
4- and 8-channel groups, one 16-channel group per block, 32 -> 32 ungrouped, odd image sizes,
padding 0, 1 and 2, dilation 2, stride 2, NCHW and channels_last, bfloat16, a bias and a mean
far above the spread (the shift keeps the sum of squares from cancelling), and a NaN in one
input channel (NaN statistics in exactly the channels eager's are). The output must be the plain
op's, bit for bit. Runs under the Triton interpreter on the CPU with the interpreter's config
swapped for tiles of 16, 32 and 64 positions (1, 2 and 4 row blocks of pairs), the last the
``FIXUP_FMA`` config.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import assert_rule
from resfast.backends import backend_status

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY = backend_status(DEVICE)["triton"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

if not _WHY:
    from resfast.ops import reference, triton_ops

    OPS = torch.ops.resfast_triton

TILES = {  # the interpreter's forward config
    "4x4": dict(TILE_H=4, TILE_W=4),
    "4x8": dict(TILE_H=4, TILE_W=8),
    "8x8_fixup_fma": dict(TILE_H=8, TILE_W=8, FIXUP_FMA=1),
}

# c, co, groups, k, stride, pad, dil, hw, channels_last, dtype, bias
# Two images whose outputs are 4 rows high and 5-9 wide (the last case's 5 x 4), each image's
# last tile masked at its right edge (the last case's at its bottom): 2 tiles of 4 x 4 an image
# (the 4 x 9 case's 3), so 4 or 6 in all over 3 programs, the first walking two of them, one in
# each image; one tile of 4 x 8 and of 8 x 8 an image (the 4 x 9 case's 2). The interpreter's
# cost is about the tiles' count (these outputs had 5-9 rows: up to twice the tiles).
CASES = {
    "packed4_3x3_cl": (16, 16, 4, 3, 1, 1, 1, (4, 9), True, torch.float32, False),
    "packed8_pad0_nchw_bf16": (16, 16, 2, 3, 1, 0, 1, (6, 7), False, torch.bfloat16, False),
    "group16_pad2_dil2": (32, 32, 2, 3, 1, 2, 2, (4, 5), True, torch.float32, True),
    "dense32_pad1": (32, 32, 1, 3, 1, 1, 1, (4, 7), False, torch.float32, False),
    "packed4_stride2": (16, 16, 4, 3, 2, 1, 1, (7, 11), True, torch.float32, True),
    "dense_stride2_pad0_bf16": (8, 24, 1, 3, 2, 0, 1, (11, 9), False, torch.bfloat16, False),
}


@pytest.fixture(autouse=True)
def _finalize_in_one_step(monkeypatch):
    """The statistics finalize merges the 256 rows of partials in one step of 256 rows (the
    planner's ``(256, 4)`` tile for more than 64 splits), not the interpreter's 64 steps of 4
    (about 0.4-0.7 s a call here): these tests are about the conv's epilogue; the finalize's
    own tiles, the interpreter's included, are tests/test_triton_ops.py's and
    tests/test_epilogue_stats.py's."""
    monkeypatch.setattr(triton_ops, "STATS_FIN_TILE", (256, 4))


def _use(monkeypatch, cfg):
    """Every forward launch runs ``cfg``: the interpreter's config, and on CUDA the only one."""
    monkeypatch.setattr(triton_ops, "_FWD_INTERP", cfg)
    monkeypatch.setattr(triton_ops, "_FWD_CONFIGS", [cfg])
    monkeypatch.setattr(triton_ops, "_FWD_STATS_CONFIGS", [])
    monkeypatch.setattr(triton_ops, "_FWD_STATS_PAIRS_CONFIGS", [])
    triton_ops.clear_plan_cache()


@pytest.fixture(params=sorted(TILES))
def tile(request, monkeypatch):
    _use(monkeypatch, triton_ops._cfg(4, 1, 1, BLOCK_N=16, BLOCK_K=16, STACK=1, PAIRS=1, **TILES[request.param]))
    yield request.param
    triton_ops.clear_plan_cache()


# The cases (grouped, with a bias) whose last group also has its outputs' mean far above their
# spread in test_statistics_match_float64.
FAR = ("packed4_stride2", "group16_pad2_dil2")


def _far_channels(case):
    """The output channels of ``case``'s last group."""
    co, groups = CASES[case][1], CASES[case][2]
    return slice(co - co // groups, co)


def _inputs(case, seed=0, far=False):
    """``far``: a BN shift of 100 before the last group's input channels and a bias of about 300
    (0.3 x 1000) after its output channels, the other groups' as they are."""
    c, co, groups, k, stride, pad, dil, hw, cl, dtype, bias = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, *hw, generator=g) * 1.3 + 0.4
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(co, c // groups, k, k, generator=g) / (c // groups * k * k) ** 0.5
    b = torch.randn(co, generator=g) * 0.3 if bias else None
    bw = torch.rand(c, generator=g) + 0.5
    bb = torch.randn(c, generator=g) * 0.3
    if far:
        bb[c - c // groups:] += 100.0
        b[_far_channels(case)] *= 1000.0
    m = torch.randn(c, generator=g) * 0.3 + 0.2
    iv = torch.rand(c, generator=g) + 0.5
    conv = ([stride] * 2, [pad] * 2, [dil] * 2, groups)
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), bw, bb, m, iv, conv, dtype


def _dev(t):
    return None if t is None else t.to(DEVICE)


def _uses_pairs(args):
    plan = triton_ops.launch_plan("bn_relu_conv2d_stats", *args)
    fwd = [lp for lp in plan if lp.name == "conv_fwd"][0]
    return fwd.bind(fwd.interp_config).constexprs["STATS_PAIRS"]


def _run(case, **kw):
    x, w, b, bw, bb, m, iv, conv, dtype = _inputs(case, **kw)
    args = (_dev(x), _dev(w), _dev(b), _dev(bw), _dev(bb), _dev(m), _dev(iv), *conv, True)
    assert _uses_pairs(args)
    y, partials = OPS.bn_relu_conv2d_stats(*args)
    assert torch.equal(y, OPS.bn_relu_conv2d(*args)), "the output is the plain op's"
    co = w.shape[0]
    rm, rv = torch.zeros(co, device=DEVICE), torch.ones(co, device=DEVICE)
    count = y.numel() // co
    mean, invstd = OPS.bn_stats_merge_update(partials, count, rm, rv, 0.1, 1e-5)
    # float64 of the same math, and eager's statistics of the output in its own dtype
    a64 = torch.relu((x.double() - m.double().view(1, -1, 1, 1)) * iv.double().view(1, -1, 1, 1)
                     * bw.double().view(1, -1, 1, 1) + bb.double().view(1, -1, 1, 1))
    y64 = F.conv2d(a64, w.double(), None if b is None else b.double(), *conv)
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    y_same = reference.bn_relu_conv2d(x, w, b, bw, bb, m, iv, *conv, True)
    var_s, mean_s = torch.var_mean(y_same.float(), dim=(0, 2, 3), correction=0)
    return dict(mean=mean.cpu(), invstd=invstd.cpu(), rm=rm.cpu(), rv=rv.cpu(), mean64=mean64, var64=var64,
                mean_s=mean_s.double(), var_s=var_s.double(), count=count, dtype=dtype)


def _assert_stats(r, ctx, ok=None):
    sel = (lambda t: t) if ok is None else (lambda t: t[ok])
    unbias = r["count"] / (r["count"] - 1)
    dtype = r["dtype"]
    assert_rule("mean", sel(r["mean"]), sel(r["mean64"]), sel(r["mean_s"]), ctx, dtype=dtype)
    assert_rule("invstd", sel(r["invstd"]), sel((r["var64"] + 1e-5).rsqrt()), sel((r["var_s"] + 1e-5).rsqrt()), ctx,
                dtype=dtype)
    assert_rule("running_mean", sel(r["rm"]), sel(0.1 * r["mean64"]), sel(0.1 * r["mean_s"]), ctx, dtype=dtype)
    assert_rule("running_var", sel(r["rv"]), sel(0.9 + 0.1 * r["var64"] * unbias),
                sel(0.9 + 0.1 * r["var_s"] * unbias), ctx, dtype=dtype)


@pytest.mark.parametrize("case", sorted(CASES))
def test_statistics_match_float64(case, tile):
    """The statistics against float64 with the rule. In the FAR cases the last group's outputs
    have their mean far above their spread (a BN shift of 100 and a bias of about 300), where an
    unshifted sum of squares cancels; the other groups' are as in the rest. Each output channel
    is a column of its own in the pairs' sums, so one launch shows both (the far case was once a
    test of its own over every group, launching these convs again)."""
    r = _run(case, far=case in FAR)
    if case in FAR:
        far = _far_channels(case)
        # the median mean over the median standard deviation (padding spreads a shifted input's
        # outputs): 8.9 and 4.8 when every group was shifted, on more rows; here 13.9 and 4.5
        # (the other groups' means: about 0.5-0.8)
        ratio = r["mean64"][far].abs().median() / r["var64"][far].sqrt().median()
        assert ratio > 4, f"the last group's mean must be far above its spread: {ratio}"
    _assert_stats(r, f"{case}, {tile}" + (", last group shifted" if case in FAR else ""))


@pytest.mark.parametrize("case", ["packed4_3x3_cl", "packed8_pad0_nchw_bf16", "dense32_pad1", "packed4_stride2"])
def test_nan_in_one_input_channel(case, tile):
    """A NaN in one input channel: NaN statistics in exactly the channels eager's are (packed:
    that group's; ungrouped: every channel the NaN reaches), the rest held to the rule."""
    x, w, b, bw, bb, m, iv, conv, dtype = _inputs(case)
    x = x.clone()
    x[1, 5, 2, 3] = float("nan")
    args = (_dev(x), _dev(w), _dev(b), _dev(bw), _dev(bb), _dev(m), _dev(iv), *conv, True)
    y, partials = OPS.bn_relu_conv2d_stats(*args)
    y_same = reference.bn_relu_conv2d(x, w, b, bw, bb, m, iv, *conv, True)
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(y_same)), "NaN outputs where eager's are"
    co = w.shape[0]
    mean, invstd = OPS.bn_stats_merge_update(partials, y.numel() // co, None, None, 0.0, 1e-5)
    var_s, mean_s = torch.var_mean(y_same.double(), dim=(0, 2, 3), correction=0)
    nan = torch.isnan(mean_s)
    assert nan.any()
    assert torch.equal(torch.isnan(mean.cpu()), nan) and torch.equal(torch.isnan(invstd.cpu()), nan), f"{case}"
    if not nan.all():
        a64 = torch.relu((x.double() - m.double().view(1, -1, 1, 1)) * iv.double().view(1, -1, 1, 1)
                         * bw.double().view(1, -1, 1, 1) + bb.double().view(1, -1, 1, 1))
        y64 = F.conv2d(a64, w.double(), None if b is None else b.double(), *conv)
        var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
        ok = ~nan
        assert_rule("mean", mean.cpu()[ok], mean64[ok], mean_s[ok], case, dtype=dtype)
        assert_rule("invstd", invstd.cpu()[ok], (var64[ok] + 1e-5).rsqrt(), (var_s[ok] + 1e-5).rsqrt(), case,
                    dtype=dtype)


def test_welford_path_still_matches(monkeypatch):
    """A config without ``PAIRS`` (the per-position Welford accumulators) gives the same
    statistics to float32 rounding."""
    x, w, b, bw, bb, m, iv, conv, dtype = _inputs("packed4_stride2")
    args = (_dev(x), _dev(w), _dev(b), _dev(bw), _dev(bb), _dev(m), _dev(iv), *conv, True)
    got = {}
    try:
        for pairs in (1, 0):
            _use(monkeypatch, triton_ops._cfg(4, 1, 1, TILE_H=4, TILE_W=8, BLOCK_N=16, BLOCK_K=16, STACK=1,
                                              PAIRS=pairs))
            assert _uses_pairs(args) == bool(pairs)
            y, partials = OPS.bn_relu_conv2d_stats(*args)
            got[pairs] = OPS.bn_stats_merge_update(partials, y.numel() // w.shape[0], None, None, 0.0, 1e-5)
        torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-4, atol=1e-5)
    finally:
        triton_ops.clear_plan_cache()
