"""The ``torch.ops.resfast_triton`` op library: ``opcheck``, each op against the eager op set
(:mod:`resfast.ops.reference`) on strided inputs and outputs, the ops' own argument checks,
and ``torch.compile(fullgraph=True)`` of a module that runs on them.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py) with tiny shapes.
The interpreter's cost is a launch's programs times their tile trips: the op-level tests
(forward / backward / training ops against eager) take two images, the tests of one forced
config or kernel path (thin tiles, wide groups, ``ACC_T``, ``WIDE_K``, DenseNet's configs) one.
"""
from __future__ import annotations

import pytest
import torch

import resfast
import resfast.backends
from resfast.backends import backend_status
from resfast.ops.opset import OP_NAMES
from reference import assert_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY = backend_status(DEVICE)["triton"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

if not _WHY:
    from resfast.ops import reference, triton_ops  # noqa: F401  (registers torch.ops.resfast_triton)

    OPS = torch.ops.resfast_triton

    import triton
    import triton.language as tl

    from resfast.kernels.triton.bn_relu import tile_digits, tile_next, tile_next2

    @triton.jit
    def _walk(out_ptr, out2_ptr, NUM, STEP, R0, R1, R2, R3, S0, S1, S2, S3, S4, T0, T1, T2):
        pid = tl.program_id(0)
        d0, d1, d2, d3, d4 = tile_digits(pid, R0, R1, R2, R3)
        e0, e1, _, _, e2 = tile_digits(pid, R0, R1, 1, 1)
        for t in range(pid, NUM, STEP):
            tl.store(out_ptr + t * 5, d0)
            tl.store(out_ptr + t * 5 + 1, d1)
            tl.store(out_ptr + t * 5 + 2, d2)
            tl.store(out_ptr + t * 5 + 3, d3)
            tl.store(out_ptr + t * 5 + 4, d4)
            tl.store(out2_ptr + t * 3, e0)
            tl.store(out2_ptr + t * 3 + 1, e1)
            tl.store(out2_ptr + t * 3 + 2, e2)
            d0, d1, d2, d3, d4 = tile_next(d0, d1, d2, d3, d4, S0, S1, S2, S3, S4, R0, R1, R2, R3)
            e0, e1, e2 = tile_next2(e0, e1, e2, T0, T1, T2, R0, R1)


def _x(shape, layout, dtype=torch.float32, extra=3, seed=0):
    """A random input in ``layout``: "nchw", "cl" (channels_last), or a channel-prefix view of a
    larger NCHW ("prefix") or channels_last ("prefix_cl") buffer."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    big = layout.startswith("prefix")
    t = torch.randn(n, c + (extra if big else 0), h, w, generator=g) * 1.3 + 0.4
    t = t.to(dtype=dtype, device=DEVICE)
    if layout in ("cl", "prefix_cl"):
        t = t.contiguous(memory_format=torch.channels_last)
    return t[:, :c] if big else t


def _vec(c, seed, lo=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(c, generator=g) + lo if lo is not None else torch.randn(c, generator=g) * 0.3
    return v.to(dtype=dtype, device=DEVICE)


def _conv_inputs(c, co, groups, k, layout, dtype=torch.float32, bias=True, affine=True, n=2, hw=(5, 6), seed=0):
    x = _x((n, c, *hw), layout, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(co, c // groups, k, k, generator=g) / (c // groups * k * k) ** 0.5).to(dtype=dtype, device=DEVICE)
    b = _vec(co, seed + 2, dtype=dtype) if bias else None
    bw = _vec(c, seed + 3, lo=0.5) if affine else None
    bb = _vec(c, seed + 4) if affine else None
    mean, var = reference.bn_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    return x, w, b, bw, bb, mean, invstd


def _f64(t):
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def _rule(name, got, fn, args, dtype, context):
    """``got`` against ``fn`` (a reference op) run in float64 on the CPU and in ``dtype`` on the device."""
    ref64 = fn(*[_f64(a) if isinstance(a, torch.Tensor) else a for a in args])
    ref_same = fn(*args)
    if isinstance(got, torch.Tensor):
        got, ref64, ref_same = (got,), (ref64,), (ref_same,)
    for i, (a, r64, rs) in enumerate(zip(got, ref64, ref_same)):
        assert_rule(f"{name}[{i}]", a, r64, rs, context, dtype=dtype)


CONV_CASES = [
    # (C, C_out, groups, k, stride, padding, dilation)
    (6, 4, 2, 3, 1, 1, 1),       # packed small groups (3 -> 2 channels), odd widths
    (8, 8, 8, 3, 2, 1, 1),       # depthwise, stride 2 (parity classes in the backward)
    (5, 7, 1, 1, 1, 0, 1),       # 1x1, channel counts no block divides
    (4, 6, 2, 3, 1, 2, 2),       # dilation 2, padding 2
    (32, 48, 2, 3, 1, 1, 1),     # wide groups: output channels over several tiles, split backward
    (20, 18, 1, 1, 2, 0, 1),     # 1x1 stride 2, two input chunks
    (64, 64, 32, 3, 1, 1, 1),    # 32 groups of 2: several packed blocks
    (40, 8, 1, 3, 1, 1, 1),      # a 3x3 over three input chunks (scratch refilled per chunk)
]
LAYOUTS = ["nchw", "cl", "prefix", "prefix_cl"]
# Each conv case in one layout per op (a layout changes the strides, never the kernel path): the
# forward takes NCHW for even cases and a channels_last prefix view for odd ones, the backward
# channels_last for even ones and an NCHW prefix view for odd ones, so each case runs both
# memory formats and a prefix view, and each layout half the cases (the interpreter's cost).
FWD_CASES = [(case, ["nchw", "prefix_cl"][i % 2]) for i, case in enumerate(CONV_CASES)]
BWD_CASES = [(case, ["cl", "prefix"][i % 2]) for i, case in enumerate(CONV_CASES)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bn_stats_against_eager(dtype, layout):
    # a large common offset: a sum / sum-of-squares pass would lose the variance to cancellation
    x = _x((2, 10, 7, 7), layout, dtype) + 100.0
    got = OPS.bn_stats(x)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    _rule("bn_stats", got, reference.bn_stats, (x,), dtype, f"layout={layout}")


@pytest.mark.parametrize("tile", [(512, 1), (2, 1), (4, 16)], ids=str)
def test_bn_stats_finalize_tiles(tile, monkeypatch):
    """The statistics finalize with the one-channel tile the planner takes on the GPU for up to
    512 splits (``(BLOCK_S, BLOCK_C) = (512, 1)``; under the interpreter forced by
    ``STATS_FIN_TILE``), a one-channel tile walking its 4 splits in two trips, and the
    interpreter's own; the running statistics updated too."""
    monkeypatch.setenv("RESFAST_TRITON_PLAN_CACHE", "0")
    monkeypatch.setattr(triton_ops, "STATS_FIN_TILE", tile)
    x = _x((2, 10, 7, 7), "cl", torch.float32) + 100.0
    _rule("bn_stats", OPS.bn_stats(x), reference.bn_stats, (x,), torch.float32, f"tile={tile}")
    rm, rv = torch.zeros(10, device=DEVICE), torch.ones(10, device=DEVICE)
    mean, invstd = OPS.bn_stats_update(x, rm, rv, 0.1, 1e-5)
    m64, v64 = reference.bn_stats(x.double())
    torch.testing.assert_close(mean.double(), m64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(invstd.double(), 1.0 / torch.sqrt(v64 + 1e-5), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rm.double(), 0.1 * m64, rtol=1e-5, atol=1e-5)


def test_bn_stats_small_tiles(monkeypatch):
    """The statistics pass with the GPU planner's tile for 64 or more channels (``(BLOCK_C,
    BLOCK_P) = (64, 16)``: one 16-byte vector a thread; under the interpreter forced by
    ``STATS_TILE``): a partial channel tile (70 channels), chunks of two tiles (the peeled
    first one and one loop trip), a partial last tile, a large mean against the spread."""
    monkeypatch.setenv("RESFAST_TRITON_PLAN_CACHE", "0")
    monkeypatch.setattr(triton_ops, "STATS_TILE", (64, 16))
    x = _x((3, 70, 5, 7), "cl", torch.float32) + 100.0
    _rule("bn_stats", OPS.bn_stats(x), reference.bn_stats, (x,), torch.float32, "tile=(64, 16)")


@pytest.mark.parametrize("case,layout", FWD_CASES, ids=str)
def test_forward_against_eager(case, layout):
    c, co, groups, k, s, p, d = case
    x, w, b, bw, bb, mean, invstd = _conv_inputs(c, co, groups, k, layout)
    args = (x, w, b, bw, bb, mean, invstd, [s, s], [p, p], [d, d], groups)
    y = OPS.bn_relu_conv2d(*args, True)
    ctx = f"case={case} layout={layout}"
    _rule("bn_relu_conv2d", y, reference.bn_relu_conv2d, (*args, True), torch.float32, ctx)
    assert y.is_contiguous(memory_format=resfast.ops.schemas.out_memory_format(x))

    # out= a channel slice of a NaN-poisoned buffer, in the other memory format
    buf = torch.full((x.shape[0], co + 4, *y.shape[2:]), float("nan"), device=DEVICE)
    if layout == "nchw":
        buf = buf.contiguous(memory_format=torch.channels_last)
    out = buf[:, 1 : 1 + co]
    assert OPS.bn_relu_conv2d_out(*args, out) is None
    _rule("bn_relu_conv2d_out", out, reference.bn_relu_conv2d, (*args, True), torch.float32, ctx)
    assert torch.isnan(buf[:, :1]).all() and torch.isnan(buf[:, 1 + co :]).all()


@pytest.mark.parametrize("variant", ["no_bias_no_affine", "bf16", "fp16"])
def test_forward_variants_against_eager(variant):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(variant, torch.float32)
    plain = variant == "no_bias_no_affine"
    for c, co, groups in ((6, 4, 2), (32, 32, 2)):
        x, w, b, bw, bb, mean, invstd = _conv_inputs(c, co, groups, 3, "cl", dtype, bias=not plain, affine=not plain)
        args = (x, w, b, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], groups, False)
        _rule("bn_relu_conv2d", OPS.bn_relu_conv2d(*args), reference.bn_relu_conv2d, args, dtype,
              f"variant={variant} groups={groups}")


@pytest.mark.parametrize("case,layout", BWD_CASES, ids=str)
def test_backward_against_eager(case, layout):
    c, co, groups, k, s, p, d = case
    x, w, _, bw, bb, mean, invstd = _conv_inputs(c, co, groups, k, layout)
    y = reference.bn_relu_conv2d(x, w, None, bw, bb, mean, invstd, [s, s], [p, p], [d, d], groups, True)
    # grad_out with its own odd strides: a channel slice of a larger tensor
    go = torch.randn(y.shape[0], co + 3, *y.shape[2:], device=DEVICE)[:, 3:]
    args = (go, x, w, bw, bb, mean, invstd, [s, s], [p, p], [d, d], groups, True)
    got = OPS.bn_relu_conv2d_backward(*args)
    assert got[0].dtype == x.dtype and got[3].dtype == torch.float32
    _rule("bn_relu_conv2d_backward", got, reference.bn_relu_conv2d_backward, args, torch.float32,
          f"case={case} layout={layout}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_low_precision_against_eager(dtype):
    for c, co, groups in ((6, 4, 2), (32, 32, 2)):
        x, w, _, bw, bb, mean, invstd = _conv_inputs(c, co, groups, 3, "nchw", dtype, n=1)
        go = torch.randn(1, co, 5, 6, device=DEVICE).to(dtype)
        args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], groups, True)
        _rule("bn_relu_conv2d_backward", OPS.bn_relu_conv2d_backward(*args), reference.bn_relu_conv2d_backward,
              args, dtype, f"dtype={dtype} groups={groups}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_bn_backward_elemt_against_eager(layout, affine):
    x = _x((2, 6, 5, 3), layout)
    gz = _x((2, 6, 5, 3), "prefix_cl" if layout == "nchw" else "nchw", seed=1)
    mean, var = reference.bn_stats(x)
    args = (gz, x, _vec(6, 2, lo=0.5) if affine else None, mean, torch.rsqrt(var + 1e-5), _vec(6, 3), _vec(6, 4),
            1.0 / 30)
    gx = OPS.bn_backward_elemt(*args)
    assert gx.is_contiguous(memory_format=resfast.ops.schemas.out_memory_format(x))
    _rule("bn_backward_elemt", gx, reference.bn_backward_elemt, args, torch.float32, f"layout={layout}")
    # _out into a channel slice of a poisoned buffer, then accumulated onto what is there.
    buf = torch.full((2, 9, 5, 3), float("nan"), device=DEVICE)
    out = buf[:, 2:8]
    assert OPS.bn_backward_elemt_out(*args, False, out) is None
    _rule("bn_backward_elemt_out", out, reference.bn_backward_elemt, args, torch.float32, f"layout={layout}")
    assert torch.isnan(buf[:, :2]).all() and torch.isnan(buf[:, 8:]).all()
    base = torch.randn(2, 6, 5, 3, device=DEVICE)
    out.copy_(base)
    OPS.bn_backward_elemt_out(*args, True, out)

    def accumulated(*a):
        return reference.bn_backward_elemt(*a) + base.to(a[1].dtype).cpu()

    _rule("bn_backward_elemt_out accumulate", out, accumulated, args, torch.float32, f"layout={layout}")


def test_n1_odd_stride2_padding0_against_eager():
    """N=1, odd H and W, stride 2 with padding 0 (the last row / column of x is never read)."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(1, 12, 7, 5, generator=g) + 0.3).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(12, 4, 3, 3, generator=g) * 0.3).to(DEVICE)
    mean, var = reference.bn_stats(x)
    args = (x, w, None, _vec(12, 1, lo=0.5), _vec(12, 2), mean, torch.rsqrt(var + 1e-5), [2, 2], [0, 0], [1, 1], 3)
    _rule("bn_relu_conv2d", OPS.bn_relu_conv2d(*args, True), reference.bn_relu_conv2d, (*args, True), torch.float32,
          "N=1 7x5 stride 2 padding 0")
    go = torch.randn(1, 12, 3, 2, generator=g).to(DEVICE)
    bargs = (go, x, w, *args[3:], True)
    _rule("bn_relu_conv2d_backward", OPS.bn_relu_conv2d_backward(*bargs), reference.bn_relu_conv2d_backward, bargs,
          torch.float32, "N=1 7x5 stride 2 padding 0")


def test_forward_stacked_taps_against_eager(monkeypatch):
    """The forward with several taps per MMA (``STACK``: the kw taps of a kernel row side by
    side, the padded fourth slot masked), which the default interpreter config does not take."""
    from resfast.ops import triton_ops

    monkeypatch.setattr(triton_ops, "_FWD_INTERP", triton_ops._cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16,
                                                                    BLOCK_K=16, STACK=4))
    for c, co, groups in ((6, 4, 2), (20, 16, 1)):
        x, w, b, bw, bb, mean, invstd = _conv_inputs(c, co, groups, 3, "cl")
        args = (x, w, b, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], groups, True)
        _rule("bn_relu_conv2d", OPS.bn_relu_conv2d(*args), reference.bn_relu_conv2d, args, torch.float32,
              f"STACK=4 groups={groups}")


def test_backward_thin_tiles_against_eager(monkeypatch):
    """The backward with a 2 x 8 tile (on a GPU :func:`_fit_tile` reshapes the backward's
    tiles to fill the grid, e.g. 2 x 32 on 28 x 28), which the default interpreter config
    does not take: packed groups, a split wide-group backward (stride 1 and 2), stride 2."""
    from resfast.ops import triton_ops

    thin = dict(TILE_H=2, TILE_W=8, BLOCK_N=16, BLOCK_K=16)
    monkeypatch.setattr(triton_ops, "_BWD_INTERP", triton_ops._cfg(4, 1, 1, **thin))
    # the wide-group kernels: input gradient, weight gradient at stride 1 and with a stride
    monkeypatch.setattr(triton_ops, "_BWD_INPUT_WIDE_INTERP", triton_ops._cfg(4, 2, 1, **thin))
    monkeypatch.setattr(triton_ops, "_BWD_WEIGHT_S1_INTERP", triton_ops._cfg(4, 1, 1, SPLIT_KW=1, **thin))
    monkeypatch.setattr(triton_ops, "_BWD_WEIGHT_WIDE_INTERP", triton_ops._cfg(4, 1, 1, **thin))
    for c, co, groups, s in ((6, 4, 2, 1), (32, 48, 2, 1), (8, 8, 8, 2), (20, 36, 1, 2)):
        x, w, _, bw, bb, mean, invstd = _conv_inputs(c, co, groups, 3, "cl", n=1, hw=(7, 9))
        ho, wo = (7 + 2 - 3) // s + 1, (9 + 2 - 3) // s + 1
        go = torch.randn(1, co, ho, wo, device=DEVICE)
        args = (go, x, w, bw, bb, mean, invstd, [s, s], [1, 1], [1, 1], groups, True)
        _rule("bn_relu_conv2d_backward", OPS.bn_relu_conv2d_backward(*args), reference.bn_relu_conv2d_backward,
              args, torch.float32, f"TILE 2x8 groups={groups} stride={s}")


def test_flattened_1x1_against_eager():
    """A 1x1 conv over channels_last positions runs as one image of all positions (tiles
    across image borders): forward, the statistics epilogue, and the backward (merged and
    split) against float64. Two 3 x 12 images: one image of 9 rows of 8 positions, each
    image 4.5 of them, so a tile (2 x 8 here, as on 45 rows) crosses the border mid-row.
    channels_last for the merged backward's case, its channel prefix view for the split one's
    (both flatten alike: the same kernels)."""
    from resfast.ops import triton_ops

    for c, co, groups, layout in ((12, 8, 1, "cl"), (32, 48, 2, "prefix_cl")):
        x, w, b, bw, bb, mean, invstd = _conv_inputs(c, co, groups, 1, layout, n=2, hw=(3, 12))
        fwd = (x, w, b, bw, bb, mean, invstd, [1, 1], [0, 0], [1, 1], groups, True)
        go = torch.randn(2, co, 3, 12, device=DEVICE).contiguous(memory_format=torch.channels_last)
        assert triton_ops._flat_positions(1, 1, [1, 1], [0, 0], go, x) is not None  # the path under test
        _rule("bn_relu_conv2d", OPS.bn_relu_conv2d(*fwd), reference.bn_relu_conv2d, fwd, torch.float32,
              f"flat 1x1 {layout} groups={groups}")
        # the statistics epilogue: against float64 of the same math and the output's own statistics
        y, partials = OPS.bn_relu_conv2d_stats(*fwd)
        got_mean, got_invstd = OPS.bn_stats_merge_update(partials, 2 * 3 * 12, None, None, 0.1, 1e-5)
        y64 = reference.bn_relu_conv2d(*[_f64(a) if isinstance(a, torch.Tensor) else a for a in fwd])
        var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
        var_s, mean_s = torch.var_mean(y.float().cpu(), dim=(0, 2, 3), correction=0)
        ctx = f"flat 1x1 statistics {layout} groups={groups}"
        assert_rule("mean", got_mean, mean64, mean_s, ctx, dtype=torch.float32)
        assert_rule("invstd", got_invstd, (var64 + 1e-5).rsqrt(), (var_s + 1e-5).rsqrt(), ctx, dtype=torch.float32)
        bwd = (go, x, w, bw, bb, mean, invstd, [1, 1], [0, 0], [1, 1], groups, True)
        _rule("bn_relu_conv2d_backward", OPS.bn_relu_conv2d_backward(*bwd), reference.bn_relu_conv2d_backward, bwd,
              torch.float32, f"flat 1x1 {layout} groups={groups}")


def test_backward_wide_weight_block_against_eager(monkeypatch):
    """The weight-gradient launch with a config's wider channel block (``WIDE_K``, taken on a
    GPU where :func:`_wide_k` allows it; forced here) against float64, ragged in the last block."""
    from resfast.ops import triton_ops

    monkeypatch.setattr(triton_ops, "_BWD_INTERP", triton_ops._cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16,
                                                                    BLOCK_K=16, WIDE_K=32))
    # the stacked kernel's config in the wide-group launch, not the split-stack kernel's
    monkeypatch.setattr(triton_ops, "_BWD_WEIGHT_S1_INTERP", triton_ops._BWD_INTERP)
    monkeypatch.setattr(triton_ops, "_wide_k", lambda *a: True)
    x, w, _, bw, bb, mean, invstd = _conv_inputs(40, 24, 1, 3, "cl", n=1)
    go = torch.randn(1, 24, 5, 6, device=DEVICE)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 1, True)
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    weight = [launch for launch in plan if launch.name == "conv_bwd_weight"]
    assert weight and weight[0].bind(weight[0].interp_config).derived["BLOCK_K"] == 32
    _rule("bn_relu_conv2d_backward", OPS.bn_relu_conv2d_backward(*args), reference.bn_relu_conv2d_backward, args,
          torch.float32, "WIDE_K=32")


WIDE_GROUP_CASES = [
    # (C, C_out, groups, k, stride, padding, dilation, layout, dtype)
    (16, 32, 1, 3, 1, 1, 1, "cl", torch.float32),         # full channel blocks (no channel masks)
    (20, 40, 1, 3, 2, 1, 1, "prefix", torch.float32),     # stride 2: residue classes of 1, 2 and 4 taps
    (18, 36, 2, 3, 2, 0, 1, "nchw", torch.float32),       # two wide groups, padding 0
    (16, 20, 1, 3, 1, 2, 2, "prefix_cl", torch.float32),  # dilation 2
    (12, 34, 1, 1, 2, 0, 1, "cl", torch.float32),         # 1x1 stride 2: three classes with no tap
    (12, 34, 1, 3, 3, 1, 2, "cl", torch.float32),         # stride 3, dilation 2: one tap per class row
    (20, 24, 1, 3, 1, 1, 1, "cl", torch.bfloat16),
]


@pytest.mark.parametrize("case", WIDE_GROUP_CASES, ids=str)
def test_backward_wide_groups_against_eager(case, monkeypatch):
    """The gradients of groups wider than one tile against float64: the input gradient
    (``bn_relu_conv_bwd_input_kernel``: the flattened, pipelined chunk x tap loop over the taps
    of each residue class) and the weight gradient with the bias gradient: with a stride over
    the output positions (``bn_relu_conv_bwd_weight_kernel``), at stride 1 over the input
    positions with the taps stacked 2 + 1 (``bn_relu_conv_bwd_weight_s1_kernel``). (Stride-1
    cases with up to 32 output channels would run ``bn_relu_conv_bwd_input_s1_kernel`` under
    the interpreter, tested in test_triton_bwd_s1_input.py; here the wide kernel is.)"""
    from resfast.kernels.triton import bn_relu_conv_bwd
    from resfast.ops import triton_ops

    monkeypatch.setattr(triton_ops, "S1_INPUT", False)

    c, co, groups, k, s, p, d, layout, dtype = case
    x, w, _, bw, bb, mean, invstd = _conv_inputs(c, co, groups, k, layout, dtype, n=1, hw=(7, 9), seed=c + co)
    ho, wo = (7 + 2 * p - d * (k - 1) - 1) // s + 1, (9 + 2 * p - d * (k - 1) - 1) // s + 1
    go = torch.randn(1, co, ho, wo, generator=torch.Generator().manual_seed(co)).to(device=DEVICE, dtype=dtype)
    args = (go, x, w, bw, bb, mean, invstd, [s, s], [p, p], [d, d], groups, True)
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    kernels = {launch.name: launch.bind(launch.interp_config).fn or launch.fn for launch in plan}
    assert kernels["conv_bwd_input"] is bn_relu_conv_bwd.bn_relu_conv_bwd_input_kernel  # the paths under test
    assert kernels["conv_bwd_weight"] is (bn_relu_conv_bwd.bn_relu_conv_bwd_weight_kernel if s > 1 else
                                          bn_relu_conv_bwd.bn_relu_conv_bwd_weight_s1_kernel)
    _rule("bn_relu_conv2d_backward", OPS.bn_relu_conv2d_backward(*args), reference.bn_relu_conv2d_backward, args,
          dtype, f"wide input case={case}")


@pytest.mark.parametrize("case", [(20, 24, 1, "cl"), (16, 32, 1, "prefix"), (18, 36, 2, "nchw")], ids=str)
def test_backward_wide_weight_transposed_against_eager(case, monkeypatch):
    """The stride-1 weight gradient of wide groups with its accumulators transposed (``ACC_T``:
    input channels x stacked taps), which the default interpreter config does not take."""
    from resfast.kernels.triton import bn_relu_conv_bwd
    from resfast.ops import triton_ops

    monkeypatch.setattr(triton_ops, "_BWD_WEIGHT_S1_INTERP", triton_ops._cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16,
                                                                              BLOCK_K=16, SPLIT_KW=1, ACC_T=1))
    c, co, groups, layout = case
    x, w, _, bw, bb, mean, invstd = _conv_inputs(c, co, groups, 3, layout, n=1, hw=(6, 7), seed=c)
    go = torch.randn(1, co, 6, 7, generator=torch.Generator().manual_seed(co)).to(DEVICE)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], groups, True)
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    (launch,) = [launch for launch in plan if launch.name == "conv_bwd_weight"]
    bound = launch.bind(launch.interp_config)
    assert bound.fn is bn_relu_conv_bwd.bn_relu_conv_bwd_weight_s1_kernel and bound.constexprs["ACC_T"]
    _rule("bn_relu_conv2d_backward", OPS.bn_relu_conv2d_backward(*args), reference.bn_relu_conv2d_backward, args,
          torch.float32, f"ACC_T case={case}")



def test_backward_wide_weight_s1_nan_at_the_border(monkeypatch):
    """The stride-1 weight gradient of a wide group (``bn_relu_conv_bwd_weight_s1_kernel``) with
    a NaN in ``grad_out`` at the corner output element, whose taps reach the zero padding:
    eager's ``grad_weight`` sums ``grad_out * a_padded`` and ``0 * NaN`` is NaN, so all 9 taps
    of the NaN's output channel are NaN (72 entries), not only the 4 inside the image
    (2026-12-01: the kernel gave 32; the float64 rule compares the NaN pattern)."""
    from bwd_harness import check, inputs
    from resfast.kernels.triton import bn_relu_conv_bwd
    from resfast.ops import triton_ops

    monkeypatch.setattr(triton_ops, "S1_INPUT", False)
    x, w, bw, bb, mean, invstd = inputs(1, 8, 24, 1, (4, 5), (3, 3), seed=21)
    go = torch.randn(1, 24, 4, 5, generator=torch.Generator().manual_seed(22)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    go[0, 1, 0, 0] = float("nan")
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 1, True)
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    (launch,) = [launch for launch in plan if launch.name == "conv_bwd_weight"]
    assert launch.bind(launch.interp_config).fn is bn_relu_conv_bwd.bn_relu_conv_bwd_weight_s1_kernel
    gw = check(args, torch.float32, "NaN at the border")[1]
    assert torch.isnan(gw[1]).all() and int(torch.isnan(gw).sum()) == 72

def test_backward_wide_input_one_chunk_against_eager(monkeypatch):
    """The input-gradient kernel of wide groups also takes a group of 64 or more input channels
    whose output channels fit one chunk (DenseNet's 128 -> 32 3x3 convs, split on a GPU; the
    interpreter's config would merge them, so the split is forced here) against float64."""
    from resfast.kernels.triton import bn_relu_conv_bwd
    from resfast.ops import triton_ops

    monkeypatch.setattr(triton_ops, "_merged_backward", lambda *a: False)
    x, w, _, bw, bb, mean, invstd = _conv_inputs(64, 12, 1, 3, "cl", n=1, hw=(5, 7), seed=5)
    go = torch.randn(1, 12, 5, 7, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    args = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 1, True)
    plan = triton_ops.launch_plan("bn_relu_conv2d_backward", *args)
    (launch,) = [launch for launch in plan if launch.name == "conv_bwd_input"]
    assert launch.fn is bn_relu_conv_bwd.bn_relu_conv_bwd_input_kernel  # the path under test
    assert launch.bind(launch.interp_config).derived["BLOCK_N"] >= 12  # one output-channel chunk
    _rule("bn_relu_conv2d_backward", OPS.bn_relu_conv2d_backward(*args), reference.bn_relu_conv2d_backward, args,
          torch.float32, "wide input, one chunk")



# The GPU tile configs added for DenseNet's 128 -> 32 3x3 convs (the interpreter normally runs
# its own small config, so these are forced here): the forward's 4 x 16 tile over one
# 128-channel chunk, the input gradient's 4 x 16 tile by 128 input channels, and the weight
# gradient's 16 output x 64 input channel block.
_DENSE_FWD_CFG = dict(TILE_H=4, TILE_W=16, BLOCK_N=32, BLOCK_K=128, STACK=1)
_DENSE_BWD_INPUT_CFG = dict(TILE_H=4, TILE_W=16, BLOCK_N=32, BLOCK_K=128)
_DENSE_BWD_WEIGHT_CFG = dict(TILE_H=8, TILE_W=16, BLOCK_N=16, BLOCK_K=64)


def _listed(configs, meta):
    """The first config of ``configs`` with exactly these tile sizes (it must be listed; warps
    and stages do not change the interpreter's result)."""
    found = [cfg for cfg in configs if dict(cfg.meta) == meta]
    assert found, f"no config with {meta}"
    return found[0]


def test_wide_1x1_forward_config_against_eager():
    """The forward config for wide 1x1 convs (8 x 8 tile, all 128 output channels a block, 64 input
    channels a chunk: the static choice at DenseNet-121's 28 x 28 and 14 x 14 1x1 convs) on a
    small uneven case: 72 input channels (a full chunk and a masked one), 136 output channels (a
    full 128-wide block and one of 8), 2 x 5 x 7 channels_last positions (flattened: an 8 x 8
    tile that overhangs); the output NaN-poisoned first, against float64."""
    from resfast.ops import triton_ops as T

    x, w, b, bw, bb, mean, invstd = _conv_inputs(72, 136, 1, 1, "cl", n=2, hw=(5, 7), seed=21)
    fwd_args = (x, w, b, bw, bb, mean, invstd, [1, 1], [0, 0], [1, 1], 1)
    y, (launch,) = T._PLANNERS["bn_relu_conv2d"](*fwd_args, True)
    cfg = _listed(T._FWD_CONFIGS, dict(TILE_H=8, TILE_W=8, BLOCK_N=128, BLOCK_K=64, STACK=1))
    const = launch.bind(cfg).constexprs
    assert (const["TILE_H"], const["TILE_W"], const["BLOCK_N"], const["BLOCK_K"]) == (8, 8, 128, 64), const
    y.fill_(float("nan"))
    with T._device(x):
        launch.run(cfg)
    _rule("bn_relu_conv2d", y, reference.bn_relu_conv2d, (*fwd_args, True), torch.float32, "wide 1x1")


@pytest.mark.parametrize("stride", [1, 2])
def test_dense_narrow_output_configs_against_eager(stride, monkeypatch):
    """The forward and both conv gradients run with the configs for few output channels
    (:data:`_DENSE_FWD_CFG` and the two backward ones) on a small uneven case: 72 input
    channels (one masked 128-wide chunk, a 64 + 8 split for the weight gradient), 20 output
    channels (16 + 4: two uneven output blocks), a 5 x 7 image (a 7 x 7-like grid that no tile
    fills), stride 1 and 2; every output NaN-poisoned first, all against float64."""
    from resfast.kernels.triton import bn_relu_conv_bwd
    from resfast.ops import triton_ops as T

    # 20 output channels are a wide group for the interpreter's 16-wide config, not for the
    # GPU's (which takes the stacked weight-gradient kernel up to 64): as on the GPU here
    monkeypatch.setattr(T, "_wide_group", lambda *a: False)
    c, co = 72, 20
    x, w, b, bw, bb, mean, invstd = _conv_inputs(c, co, 1, 3, "cl", n=1, hw=(5, 7), seed=11)
    conv = ([stride, stride], [1, 1], [1, 1], 1)
    fwd_args = (x, w, b, bw, bb, mean, invstd, *conv)
    y, (launch,) = T._PLANNERS["bn_relu_conv2d"](*fwd_args, True)
    cfg = _listed(T._FWD_CONFIGS, _DENSE_FWD_CFG)
    assert launch.bind(cfg).constexprs["ONE_CHUNK"]  # all 72 channels in one masked chunk
    y.fill_(float("nan"))
    with T._device(x):
        launch.run(cfg)
    _rule("bn_relu_conv2d", y, reference.bn_relu_conv2d, (*fwd_args, True), torch.float32, f"stride={stride}")

    go = torch.randn(*y.shape, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    args = (go, x, w, bw, bb, mean, invstd, *conv, True)
    result, launches = T._PLANNERS["bn_relu_conv2d_backward"](*args)
    names = [launch.name for launch in launches]
    assert names == ["conv_bwd_input", "conv_bwd_weight", "conv_bwd_finalize"], names
    for t in result:
        t.fill_(float("nan"))
    chosen = {"conv_bwd_input": _listed(T._BWD_INPUT_WIDE_CONFIGS, _DENSE_BWD_INPUT_CFG),
              "conv_bwd_weight": _listed(T._BWD_WEIGHT_CONFIGS, _DENSE_BWD_WEIGHT_CFG)}
    assert launches[0].fn is bn_relu_conv_bwd.bn_relu_conv_bwd_input_kernel
    bound = launches[1].bind(chosen["conv_bwd_weight"])
    assert (bound.fn or launches[1].fn) is bn_relu_conv_bwd.bn_relu_conv_bwd_kernel
    assert bound.derived["BLOCK_N"] == 16 and bound.derived["BLOCK_K"] == 64  # 2 x 2 uneven channel blocks
    with T._device(x):
        for launch in launches:  # in plan order: the finalize reads the partials the weight launch's config made
            launch.run(chosen.get(launch.name, launch.configs[0]))
    _rule("bn_relu_conv2d_backward", result, reference.bn_relu_conv2d_backward, args, torch.float32,
          f"dense narrow-output configs, stride={stride}")

def test_fit_tile():
    """Backward tiles keep their positions and take the shape that leaves the fewest empty."""
    from resfast.ops.triton_ops import _fit_tile

    assert _fit_tile(8, 16, 28, 28) == (4, 32)   # 87.5% of 4 x 32 tiles used, 77% of 8 x 16
    assert _fit_tile(8, 8, 28, 28) == (2, 32)    # 4 x 16 and 2 x 32 tie: the wider
    assert _fit_tile(8, 16, 56, 56) == (8, 16)   # as good as any: kept
    assert _fit_tile(8, 8, 7, 7) == (8, 8)
    assert _fit_tile(8, 8, 14, 14) == (8, 8)


def test_packed_groups_keep_nonfinite_values_in_their_group():
    """Packed small groups share one block-diagonal MMA, where 0 * NaN = NaN would carry one
    group's NaN into its neighbours. A NaN in x (forward, running statistics) and a NaN in
    grad_out (backward) must reach exactly the outputs eager gives NaN, no others."""
    c, co, groups = 16, 16, 8  # 8 groups of 2: one block of 8 packed groups
    x, w, b, bw, bb, _, _ = _conv_inputs(c, co, groups, 3, "cl", seed=3)
    mean, invstd = _vec(c, 5) + 0.2, _vec(c, 6, lo=0.5)
    x[1, 2, 3, 4] = float("nan")  # channel 2 is in group 1 only
    args = (x, w, b, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], groups, False)
    y = OPS.bn_relu_conv2d(*args)
    assert torch.isnan(y).any() and not torch.isnan(y[:, 4:]).any()  # groups 2..7 untouched
    _rule("bn_relu_conv2d", y, reference.bn_relu_conv2d, args, torch.float32, "NaN in x")

    x = x.nan_to_num()
    go = torch.randn(2, co, 5, 6, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    go[0, 5, 2, 2] = float("nan")  # output channel 5 is in group 2
    bargs = (go, x, w, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], groups, False)
    got = OPS.bn_relu_conv2d_backward(*bargs)
    gz = got[0]
    assert torch.isnan(gz[:, 4:6]).any() and not torch.isnan(gz[:, :4]).any() and not torch.isnan(gz[:, 6:]).any()
    _rule("bn_relu_conv2d_backward", got, reference.bn_relu_conv2d_backward, bargs, torch.float32, "NaN in grad_out")


# (case, layout, a mode): each case in both layouts, each mode in both layouts
def _case_layout_modes(modes):
    cases = [("packed", CONV_CASES[0]), ("depthwise_s2", CONV_CASES[1]), ("wide", CONV_CASES[4])]
    return [pytest.param(case, ["cl", "prefix"][(i + j) % 2], mode, id=f"{mode}-{['cl', 'prefix'][(i + j) % 2]}-{name}")
            for i, (name, case) in enumerate(cases) for j, mode in enumerate(modes)]


@pytest.mark.parametrize("case,layout,running", _case_layout_modes([True, False]))
def test_train_forward_in_one_op_against_eager(case, layout, running):
    """``bn_relu_conv2d_train``: x's batch statistics, the running statistics updated in place
    and the fused conv with them, in one op: each output and running statistic against the
    eager composition (statistics, then the fused op) in float64 with the rule, and equal to
    the two triton ops it replaces."""
    c, co, groups, k, stride, padding, dilation = case
    x, w, b, bw, bb, _, _ = _conv_inputs(c, co, groups, k, layout)
    conv = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    rm, rv = (_vec(c, 11), _vec(c, 12, lo=0.5)) if running else (None, None)
    rm0, rv0 = (None, None) if rm is None else (rm.clone(), rv.clone())
    y, mean, invstd = OPS.bn_relu_conv2d_train(x, w, b, bw, bb, rm, rv, 0.1, 1e-5, *conv)

    def reference_train(x, w, b, bw, bb, rm, rv):
        m, i = reference.bn_stats_update(x, rm, rv, 0.1, 1e-5)
        return reference.bn_relu_conv2d(x, w, b, bw, bb, m, i, *conv, True), m, i, rm, rv

    ctx = f"case={case}, layout={layout}, running={running}"
    r64 = reference_train(*[_f64(t) for t in (x, w, b, bw, bb, rm0, rv0)])
    rs = reference_train(x, w, b, bw, bb, *(None if t is None else t.clone() for t in (rm0, rv0)))
    for name, got, ref64, same in zip(("y", "mean", "invstd", "running_mean", "running_var"),
                                      (y, mean, invstd, rm, rv), r64, rs):
        if got is not None:
            assert_rule(name, got, ref64, same, ctx, dtype=torch.float32)
    rm2, rv2 = (None, None) if rm0 is None else (rm0.clone(), rv0.clone())
    m2, i2 = OPS.bn_stats_update(x, rm2, rv2, 0.1, 1e-5)
    assert torch.equal(mean, m2) and torch.equal(invstd, i2)
    assert torch.equal(y, OPS.bn_relu_conv2d(x, w, b, bw, bb, m2, i2, *conv, True))
    if running:
        assert torch.equal(rm, rm2) and torch.equal(rv, rv2)


def _full_reference(go, x, w, bw, bb, mean, invstd, stride, padding, dilation, groups, bias_grad):
    """The composed reference of ``bn_relu_conv2d_backward_full``: ``(grad_x, grad_weight,
    grad_bias, sum_dz_xhat, sum_dz)`` with ``mean``/``invstd`` x's own batch statistics."""
    gz, gw, gb, sdz, sdzx = reference.bn_relu_conv2d_backward(go, x, w, bw, bb, mean, invstd, stride, padding,
                                                               dilation, groups, bias_grad)
    gx = reference.bn_backward_elemt(gz, x, bw, mean, invstd, sdz, sdzx, 1.0 / (x.numel() // x.shape[1]))
    return gx, gw, gb, sdzx, sdz


@pytest.mark.parametrize("case,layout,into", _case_layout_modes([None, "write", "accumulate"]))
def test_backward_full_against_eager(case, layout, into):
    """The training backward in one op (conv backward, then the BN input gradient with the
    coupling terms of x's own statistics) against the composed eager ops in float64, every
    output: returned, written into a channel slice of a poisoned buffer, or added to one."""
    c, co, groups, k, stride, padding, dilation = case
    x, w, b, bw, bb, mean, invstd = _conv_inputs(c, co, groups, k, layout)
    conv = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    ho = (x.shape[2] + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (x.shape[3] + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    go = _x((2, co, ho, wo), "nchw", seed=5)
    args = (go, x, w, bw, bb, mean, invstd, *conv, True)
    ctx = f"case={case}, layout={layout}, into={into}"
    if into is None:
        got = OPS.bn_relu_conv2d_backward_full(*args, None, False, True)
        _rule("bn_relu_conv2d_backward_full", got, _full_reference, args, torch.float32, ctx)
        return
    buf = torch.full((2, c + 3, *x.shape[2:]), float("nan"), device=DEVICE)
    out = buf[:, 1:1 + c]
    base = torch.randn(out.shape, device=DEVICE)
    if into == "accumulate":
        out.copy_(base)
    version = out._version
    got = OPS.bn_relu_conv2d_backward_full(*args, out, into == "accumulate", True)
    assert got[0].numel() == 0 and out._version > version
    assert torch.isnan(buf[:, :1]).all() and torch.isnan(buf[:, 1 + c:]).all()

    def expected(*a):
        gx, *rest = _full_reference(*a)
        return (gx + base.to(gx.dtype).cpu() if into == "accumulate" else gx, *rest)

    _rule("bn_relu_conv2d_backward_full", (out, *got[1:]), expected, args, torch.float32, ctx)


# ----------------------------------------------------------------------------- opcheck


def _opcheck_samples():
    x, w, b, bw, bb, mean, invstd = _conv_inputs(4, 6, 2, 3, "cl", n=2, hw=(3, 3))
    conv = ([1, 1], [1, 1], [1, 1], 2)
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    go = torch.randn(2, 6, 3, 3, device=DEVICE)
    out = torch.full((2, 9, 3, 3), float("nan"), device=DEVICE)[:, 1:7]
    return {
        "bn_stats": (x,),
        "bn_relu_conv2d": (leaf(x), leaf(w), leaf(b), leaf(bw), leaf(bb), mean, invstd, *conv, True),
        "bn_relu_conv2d_out": (x, w, b, bw, bb, mean, invstd, *conv, out),
        "bn_stats_update": (x, _vec(4, 7), _vec(4, 8, lo=0.5), 0.1, 1e-5),
        "bn_relu_conv2d_backward": (go, x, w, bw, bb, mean, invstd, *conv, True),
        "bn_backward_elemt": (go[:, :4], x, bw, mean, invstd, _vec(4, 5), _vec(4, 6), 1.0 / 18),
        "bn_backward_elemt_out": (go[:, :4], x, bw, mean, invstd, _vec(4, 5), _vec(4, 6), 1.0 / 18, True,
                                  torch.randn(2, 4, 3, 3, device=DEVICE)),
        "bn_relu_conv2d_train": (x, w, b, bw, bb, _vec(4, 7), _vec(4, 8, lo=0.5), 0.1, 1e-5, *conv),
        "bn_relu_conv2d_out_stats": (x, w, b, bw, bb, mean, invstd, *conv, out),
        "bn_relu_conv2d_merge_out": (x, torch.rand(3, 256, 4, device=DEVICE) + 0.5, 18, _vec(4, 7),
                                     _vec(4, 8, lo=0.5), 0.1, 1e-5, w, bw, bb, *conv, out,
                                     torch.empty(9, device=DEVICE)[1:7], torch.empty(6, device=DEVICE),
                                     torch.empty(6, device=DEVICE), 1e-5),
        "bn_stats_merge_out": (torch.rand(3, 256, 6, device=DEVICE) + 0.5, 18, torch.empty(9, device=DEVICE)[2:8],
                               torch.empty(6, device=DEVICE), torch.empty(7, device=DEVICE)[1:], 1e-5),
        "bn_relu_conv2d_backward_full": (go, x, w, bw, bb, mean, invstd, *conv, True, None, False, True),
        "bn_relu_conv2d_backward_full_out": (go, x, w, bw, bb, mean, invstd, *conv, False,
                                             torch.randn(2, 5, 3, 3, device=DEVICE)[:, 1:], True, True),
        # (x2 = conv1x1(x): 6 channels; y = conv3x3(x2) of 6 groups of 1 -> 3 channels... any
        # shapes that chain: here the conv of this sample set as the second, a 1x1 as the first)
        "bn_relu_conv2d_backward_pair": (go, torch.randn(2, 4, 3, 3, device=DEVICE), w, bw, bb, mean, invstd, *conv,
                                         torch.randn(2, 5, 3, 3, device=DEVICE), torch.randn(4, 5, 1, 1, device=DEVICE),
                                         _vec(5, 9, lo=0.5), _vec(5, 10), _vec(5, 11), _vec(5, 12, lo=0.5),
                                         [1, 1], [0, 0], [1, 1], 1, torch.randn(2, 7, 3, 3, device=DEVICE)[:, 2:],
                                         True),
    }


@pytest.mark.parametrize("name", [*OP_NAMES, "bn_relu_conv2d_train", "bn_relu_conv2d_out_stats", "bn_stats_merge_out",
                                  "bn_relu_conv2d_merge_out",
                                  "bn_relu_conv2d_backward_full", "bn_relu_conv2d_backward_full_out",
                                  "bn_relu_conv2d_backward_pair"])
def test_opcheck(name):
    op = name[:-len("_out")] if name.endswith("_full_out") else name
    torch.library.opcheck(getattr(OPS, op).default, _opcheck_samples()[name])


# ----------------------------------------------------------------------------- argument checks


def test_ops_reject_bad_arguments(monkeypatch):
    x, w, b, bw, bb, mean, invstd = _conv_inputs(6, 4, 2, 3, "nchw")
    conv = ([1, 1], [1, 1], [1, 1])
    with pytest.raises(TypeError, match=r"x has dtype torch.float64; the triton backend supports float32"):
        OPS.bn_stats(x.double())
    with pytest.raises(ValueError, match=r"channel mismatch: x has C=6, weight has shape \(4, 3, 3, 3\), groups=3"):
        OPS.bn_relu_conv2d(x, w, b, bw, bb, mean, invstd, *conv, 3, True)
    with pytest.raises(TypeError, match=r"weight dtype torch.float16 does not match x dtype torch.float32"):
        OPS.bn_relu_conv2d(x, w.half(), b, bw, bb, mean, invstd, *conv, 2, True)
    with pytest.raises(ValueError, match=r"mean must have shape \(6,\), got \(5,\)"):
        OPS.bn_relu_conv2d(x, w, b, bw, bb, mean[:5], invstd, *conv, 2, True)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 4, 5, 6\), got \(2, 4, 5, 5\)"):
        OPS.bn_relu_conv2d_out(x, w, b, bw, bb, mean, invstd, *conv, 2, torch.empty(2, 4, 5, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"grad_out must have shape \(2, 4, 5, 6\)"):
        OPS.bn_relu_conv2d_backward(torch.empty(2, 4, 5, 5, device=DEVICE), x, w, bw, bb, mean, invstd, *conv, 2,
                                    False)
    if DEVICE == "cpu":
        monkeypatch.setattr(resfast.backends, "triton_interpret", lambda: False)
        with pytest.raises(ValueError,
                           match=r"x is a CPU tensor; Triton kernels need CUDA tensors, or TRITON_INTERPRET=1"):
            OPS.bn_stats(x)


# ----------------------------------------------------------------------------- torch.compile


class _Net(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.a = resfast.BNReLUConv2d(8, 8, 3, padding=1, groups=4, backend=backend)
        self.b = resfast.BNReLUConv2d(8, 4, 1, bias=True, backend=backend)

    def forward(self, x):
        return self.b(self.a(x))


def _train_step(model, x, go):
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.backward(go)
    strip = lambda k: k.replace("_orig_mod.", "")  # noqa: E731  (torch.compile's wrapper prefix)
    grads = {strip(n): p.grad for n, p in model.named_parameters()}
    return y.detach(), x.grad, grads, {strip(k): v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    """One training step of a compiled two-layer model on the triton backend against eager,
    judged by the float64 rule: output, every gradient, running statistics, batch counters."""
    torch.manual_seed(0)
    ref = _Net("eager").to(DEVICE)
    initial = {k: v.clone() for k, v in ref.state_dict().items()}
    net = _Net("triton").to(DEVICE)
    net.load_state_dict(initial)
    ref64 = _Net("eager").double()
    ref64.load_state_dict({k: v.cpu() for k, v in initial.items()})
    x = torch.randn(2, 8, 5, 5, device=DEVICE) + 0.2
    go = torch.randn(2, 4, 5, 5, device=DEVICE)
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(compiler)
    got = _train_step(torch.compile(net, backend=counter, fullgraph=True), x, go)
    assert counter.frame_count == 1
    assert "resfast_triton.bn_relu_conv2d" in counter.graphs[0].code, "the traced graph does not call the triton op"
    same = _train_step(ref, x, go)
    exp = _train_step(ref64, x.double().cpu(), go.double().cpu())
    ctx = f"compiler={compiler}"
    assert_rule("out", got[0], exp[0], same[0], ctx)
    assert_rule("grad_x", got[1], exp[1], same[1], ctx)
    assert set(got[2]) == set(exp[2])
    for k in exp[2]:
        assert_rule("grad_" + k, got[2][k], exp[2][k], same[2][k], ctx)
    for k in exp[3]:
        if exp[3][k].is_floating_point():
            assert_rule(k, got[3][k], exp[3][k], same[3][k], ctx)
        else:
            assert torch.equal(got[3][k].cpu(), same[3][k].cpu()), k


# ----------------------------------------------------------------------------- autotuning


def test_tune_keys_are_bucketed():
    """DenseNet-121's 58 BN-ReLU-conv1x1 layers (64 + 32 i input channels, four resolutions)
    share a handful of autotune keys, so a first training step does not tune per layer."""
    from resfast.ops import triton_ops

    keys = set()
    for block, (layers, c0, hw) in enumerate(((6, 64, 56), (12, 128, 28), (24, 256, 14), (16, 512, 7))):
        for i in range(layers):
            c = c0 + 32 * i
            x = torch.empty(64, c, hw, hw, dtype=torch.bfloat16, device="meta").contiguous(
                memory_format=torch.channels_last)
            w = torch.empty(128, c, 1, 1, dtype=torch.bfloat16, device="meta")
            keys.add(triton_ops._conv_key(x, w, [1, 1], [0, 0], [1, 1], 1, hw, hw))
    assert len(keys) <= 12, len(keys)


def test_tuner_persists_and_never_times_in_a_capture(tmp_path, monkeypatch):
    from resfast.ops import triton_ops

    path = tmp_path / "tune.json"
    x = torch.empty(2, 16, 8, 8, device="meta")
    launch = triton_ops.launch_plan("bn_relu_conv2d", x, torch.empty(16, 4, 3, 3, device="meta"), None, None, None,
                                    torch.empty(16, device="meta"), torch.empty(16, device="meta"), [1, 1], [1, 1],
                                    [1, 1], 4, True)[0]
    assert len(launch.configs) >= 2
    timed = []
    monkeypatch.setattr(triton_ops.Tuner, "_time", lambda self, l: timed.append(l.name) or 1)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    tuner = triton_ops.Tuner(str(path))
    assert tuner.choose(launch) is launch.configs[0] and not timed and not path.exists()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert tuner.choose(launch) is launch.configs[1] and timed == ["conv_fwd"]
    # another process (a new tuner on the same file) reuses the choice without timing
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert triton_ops.Tuner(str(path)).choose(launch) is launch.configs[1] and timed == ["conv_fwd"]
    monkeypatch.setenv("RESFAST_TRITON_AUTOTUNE", "0")
    assert triton_ops.Tuner(str(tmp_path / "other.json")).choose(launch) is launch.configs[0]


# ----------------------------------------------------------------------------- GPU compilation

_COMPILE_SCRIPT = r'''
import json, sys
import torch
from resfast.ops import triton_ops as T
from resfast.profiling.static_model import CONV_MMA_KERNELS, compile_for_sm90

def meta(shape, dtype, cl, extra=0):
    n, c, h, w = shape
    t = torch.empty(n, c + extra, h, w, dtype=dtype, device="meta")
    if cl:
        t = t.contiguous(memory_format=torch.channels_last)
    return t[:, :c] if extra else t

def vec(c, dtype=torch.float32):
    return torch.empty(c, dtype=dtype, device="meta")

# (x shape, C_out, groups, k, stride, padding, dilation, dtype, channels_last, prefix extra, bias, affine)
CASES = [
    ((2, 64, 9, 11), 64, 16, 3, 1, 1, 1, torch.bfloat16, True, 0, True, True),    # packed 4-channel groups
    ((1, 48, 7, 9), 48, 6, 3, 2, 1, 1, torch.bfloat16, True, 0, False, True),     # 8-channel groups, stride 2
    ((2, 30, 5, 7), 40, 1, 3, 1, 2, 2, torch.float16, True, 10, True, False),     # prefix view, wide, dilated
    ((2, 20, 6, 6), 18, 1, 1, 2, 0, 1, torch.float32, False, 0, False, True),     # NCHW fp32 1x1 stride 2
    ((2, 32, 8, 8), 32, 32, 3, 1, 1, 1, torch.bfloat16, True, 0, False, True),    # depthwise
    ((2, 80, 6, 6), 96, 1, 3, 1, 1, 1, torch.bfloat16, True, 0, True, True),      # wide group
    ((2, 48, 9, 9), 80, 1, 3, 2, 1, 1, torch.bfloat16, True, 0, True, True),      # wide group, stride 2
    ((2, 128, 7, 7), 32, 1, 3, 1, 1, 1, torch.bfloat16, True, 0, False, True),    # DenseNet 128 -> 32, 7 x 7
]
seen, compiled, tensor_core = set(), 0, []
for (shape, co, groups, k, s, p, d, dtype, cl, extra, bias, affine) in CASES:
    x = meta(shape, dtype, cl, extra)
    c = shape[1]
    w = torch.empty(co, c // groups, k, k, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last)
    b = vec(co, dtype) if bias else None
    bw, bb = (vec(c), vec(c)) if affine else (None, None)
    conv = ([s, s], [p, p], [d, d], groups)
    ho = (shape[2] + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (shape[3] + 2 * p - d * (k - 1) - 1) // s + 1
    gy = meta((shape[0], co, ho, wo), dtype, cl)
    out = meta((shape[0], co, ho, wo), dtype, not cl, extra=3)
    plans = [
        T.launch_plan("bn_stats", x),
        T.launch_plan("bn_stats_update", x, vec(c), vec(c), 0.1, 1e-5),
        T.launch_plan("bn_relu_conv2d", x, w, b, bw, bb, vec(c), vec(c), *conv, True),
        T.launch_plan("bn_relu_conv2d_out", x, w, b, bw, bb, vec(c), vec(c), *conv, out),
        T.launch_plan("bn_relu_conv2d_backward", gy, x, w, bw, bb, vec(c), vec(c), *conv, bias),
        T.launch_plan("bn_backward_elemt", x, x, bw, vec(c), vec(c), vec(c), vec(c), 0.5),
        T.launch_plan("bn_backward_elemt_out", x, x, bw, vec(c), vec(c), vec(c), vec(c), 0.5, True, meta(shape, dtype, not cl)),
    ]
    for plan in plans:
        for launch in plan:
            for cfg in launch.configs:  # every config, bound exactly as the host launches it
                bound = launch.bind(cfg)
                fn = bound.fn or launch.fn  # a config may launch another kernel than the launch's own
                key = (fn.__name__, repr([(type(a).__name__, getattr(a, "dtype", a), getattr(a, "shape", None))
                                                 for a in bound.args]), repr(sorted(bound.constexprs.items())))
                if key in seen:
                    continue
                seen.add(key)
                kernel = compile_for_sm90(fn, bound.args, bound.constexprs)
                compiled += 1
                if launch.name in CONV_MMA_KERNELS and dtype != torch.float32:
                    ptx = kernel.asm["ptx"]
                    tensor_core.append([launch.name, cfg.label, "wgmma" in ptx or "mma.sync" in ptx])
print(json.dumps({"compiled": compiled, "tensor_core": tensor_core}))
'''


@pytest.mark.slow  # every config of every launch compiled for sm_90: 170 s warm, minutes more from a cold cache
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the other tests compile and run every kernel")
def test_kernels_compile_for_sm90():
    """Without a GPU the interpreter never compiles the kernels: compile every launch of every
    op, with every tile config, for sm_90 exactly as the host code launches them (the launch
    plan bound to meta tensors, the runtime binder's specialisation), over packed small
    groups, stride 2, a dilated channel-prefix view, NCHW float32, depthwise and wide groups
    (stride 1 and 2); every 16-bit
    conv kernel must use tensor cores."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=1200)
    if run.returncode != 0 and ("ptxas" in run.stderr and "not found" in run.stderr):
        pytest.skip(f"triton cannot compile for sm_90 here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(run.stdout.strip().splitlines()[-1])
    assert doc["compiled"] >= 20
    assert doc["tensor_core"] and all(ok for _, _, ok in doc["tensor_core"]), doc["tensor_core"]


def test_tile_walk_digits_match_division():
    """The conv kernels' persistent tile loops take a tile's digits (column, row, residue
    column, residue row, image) once per program and then advance them by the step's digits
    (computed on the host by ``_digits``) with adds and compares; every visited tile's digits
    must be those of integer division. Two images (the image digit carries too; a walk costs
    the interpreter one trip per tile), steps from 1 (every carry, one program) to one less
    than the tile count (the largest digit in every radix: a program per tile)."""
    for radices, step in [((3, 5, 2, 2), st) for st in (1, 7, 13, 31, 119)] + [((1, 4, 1, 3), st) for st in (5, 11)]:
        num = radices[0] * radices[1] * radices[2] * radices[3] * 2
        out = torch.full((num, 5), -1, dtype=torch.int32, device=DEVICE)
        out2 = torch.full((num, 3), -1, dtype=torch.int32, device=DEVICE)
        _walk[(step,)](out, out2, num, step, *radices, *triton_ops._digits(step, radices),
                      *triton_ops._digits(step, radices[:2]))
        want, want2 = [], []
        for t in range(num):
            r, digits = t, []
            for rad in radices:
                digits.append(r % rad)
                r //= rad
            want.append(digits + [r])
            want2.append([t % radices[0], (t // radices[0]) % radices[1], t // (radices[0] * radices[1])])
        assert out.cpu().tolist() == want, f"radices {radices}, step {step}"
        assert out2.cpu().tolist() == want2, f"radices {radices}, step {step}"


@pytest.mark.parametrize("layout,dtype,n", [("cl", torch.float32, 2), ("nchw", torch.bfloat16, 1)])
def test_packed_groups_nonfinite_at_stride_2(layout, dtype, n):
    """The packed fix-up (a program whose sum of grad_z, or whose forward output, is not
    finite recomputes all of its tiles group by group) at stride 2 over several residue
    classes and tiles per program, NCHW and channels_last: NaN reaches exactly the outputs
    eager gives NaN, and everything matches the float64 reference.

    The backward's fix-up costs the interpreter one pass per tile of its program over every
    input channel, tap and output channel of the group: the float32 channels_last case keeps
    two images (in each residue class 6 tiles of 2 x 8, 3 programs of 2 tiles, one in each
    image; NaN in the second image's grad_out), the bfloat16 NCHW one a single image (a
    program's 4 tiles one per residue class; the forward's program 0 still walks 2 tiles)."""
    c, co, groups = 16, 16, 4  # 4 groups of 4: one block of 4 packed groups
    x, w, b, bw, bb, _, _ = _conv_inputs(c, co, groups, 3, layout, dtype=dtype, n=n, hw=(9, 11), seed=5)
    mean, invstd = _vec(c, 5) + 0.2, _vec(c, 6, lo=0.5)
    x[0, 9, 6, 7] = float("nan")  # channel 9 is in group 2 only
    args = (x, w, b, bw, bb, mean, invstd, [2, 2], [1, 1], [1, 1], groups, False)
    y = OPS.bn_relu_conv2d(*args)
    assert torch.isnan(y[:, 8:12]).any() and not torch.isnan(y[:, :8]).any() and not torch.isnan(y[:, 12:]).any()
    _rule("bn_relu_conv2d", y, reference.bn_relu_conv2d, args, dtype, f"NaN in x, stride 2, {layout}")

    x = x.nan_to_num()
    go = torch.randn(n, co, 5, 6, generator=torch.Generator().manual_seed(11)).to(dtype=dtype, device=DEVICE)
    if layout == "cl":
        go = go.contiguous(memory_format=torch.channels_last)
    go[n - 1, 2, 3, 4] = float("nan")  # output channel 2 is in group 0
    bargs = (go, x, w, bw, bb, mean, invstd, [2, 2], [1, 1], [1, 1], groups, False)
    got = OPS.bn_relu_conv2d_backward(*bargs)
    gz = got[0]
    assert torch.isnan(gz[:, :4]).any() and not torch.isnan(gz[:, 4:]).any()
    _rule("bn_relu_conv2d_backward", got, reference.bn_relu_conv2d_backward, bargs, dtype,
          f"NaN in grad_out, stride 2, {layout}")
