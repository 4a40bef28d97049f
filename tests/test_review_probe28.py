"""A twenty-eighth new-user trial (focused): the kernel paths that landed on 2026-11-30, forced
where the planner would not pick them on tiny CPU shapes, each judged by the float64 rule of
tests/reference.py (every output of the op: ``grad_z``, ``grad_weight``, ``grad_bias`` and the
two BN-gradient sums; the statistics' mean, variance and running statistics).

* native (the CPU twin runs the CUDA grid's blocks): the residue-class stride-2 input-gradient
  tiles (``RESFAST_NATIVE_RESIDUE_TILES=force``) on the geometries their tests did not take --
  kernels 5x5, 2x2, 3x1 / 1x3, padding 0-3 (also unequal per axis), dilation 3, two and
  three groups of odd widths (20 -> 36, 20 -> 24), float32's SIMT path; and the default plans
  on shapes that take the 72 KiB shared-memory input-gradient plans, residue tiles by cost and
  weight-gradient splits of 4 and more (the static probe, where nvcc is here, asserts the
  plans taken);
* triton (the interpreter): the input gradient's TMA descriptors on a channel slice of a wider
  ``grad_out``, and an expanded view (stride 0 along the batch), which the interpreter read right
  but whose zero stride is untested on a GPU's copy engine: ``_tma_ok`` now refuses it (masked
  loads, judged the same); the gradient
  finalize and the statistics partial / finalize kernels launched directly with the tiles the
  GPU plans use (16-position statistics tiles, one channel and 512 splits per step, 64-row
  gradient tiles) on split counts the interpreter's plans never reach (one, 37 with
  several trips, 700), a single position, N*H*W not a multiple of 16 and a constant offset of
  1000.

Nothing was found wrong (see docs/design.md, "This session's new kernel paths"); these cases pin
what matched.
"""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from reference import assert_rule

from resfast.backends import backend_status, native_info
from resfast.ops import reference

NATIVE = native_info()
needs_native = pytest.mark.skipif(not NATIVE["built"], reason=f"resfast._C is not built: {NATIVE['error']}")
_TRITON_WHY = backend_status("cpu")["triton"]
needs_triton = pytest.mark.skipif(bool(_TRITON_WHY), reason=f"triton cannot run on the CPU: {_TRITON_WHY}")

OUT_NAMES = ("grad_z", "grad_weight", "grad_bias", "sum_dz", "sum_dz_xhat")


def _backward_args(n, c, co, hw, k, stride, padding, dilation, groups, cl, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = k
    x = torch.randn(n, c, *hw, generator=gen) * 1.5 + 0.3
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    weight = (torch.randn(co, c // groups, kh, kw, generator=gen) / math.sqrt(c // groups * kh * kw)).to(dtype)
    gm, bt = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.5
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    ho = (hw[0] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (hw[1] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    go = torch.randn(n, co, ho, wo, generator=gen).to(dtype)
    if cl:
        go = go.contiguous(memory_format=torch.channels_last)
    return (go, x, weight, gm, bt, mean, invstd, list(stride), list(padding), list(dilation), groups, True)


def _judge(got, args, dtype, ctx):
    ref64 = reference.bn_relu_conv2d_backward(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                                else a for a in args])
    ref_same = reference.bn_relu_conv2d_backward(*args)
    for nm, g, r64, rs in zip(OUT_NAMES, got, ref64, ref_same):
        assert (g is None) == (r64 is None), (nm, ctx)
        if g is not None:
            assert_rule(nm, g, r64, rs, ctx, dtype=dtype)


# ---- native: residue-class tiles forced on the geometries their own tests did not take

# (N, C, C_out, (H, W), (KH, KW), padding, dilation, groups, channels_last)
RESIDUE_CASES = {
    "5x5_pad2_odd": (2, 24, 40, (11, 6), (5, 5), (2, 2), (1, 1), 1, True),
    "5x5_pad0_dil3": (1, 24, 40, (13, 14), (5, 5), (0, 0), (3, 3), 1, True),
    "2x2_pad1": (2, 33, 20, (7, 8), (2, 2), (1, 1), (1, 1), 1, True),
    "3x1_pad10": (2, 24, 24, (9, 5), (3, 1), (1, 0), (1, 1), 1, True),
    "1x3_pad03_dil2": (2, 40, 24, (6, 11), (1, 3), (0, 3), (2, 2), 1, False),
    "3x3_pad3_dil3": (2, 72, 24, (10, 9), (3, 3), (3, 3), (3, 3), 1, True),
    "3x3_pad0_tiny": (3, 24, 40, (3, 3), (3, 3), (0, 0), (1, 1), 1, True),
    "3x3_groups2_odd": (2, 40, 72, (9, 9), (3, 3), (1, 1), (1, 1), 2, True),
    "3x3_groups3_nchw": (2, 60, 72, (7, 6), (3, 3), (2, 2), (1, 1), 3, False),
}


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(RESIDUE_CASES))
def test_native_residue_tiles_forced(name, dtype, monkeypatch):
    from resfast.ops.opsets import get_ops

    monkeypatch.setenv("RESFAST_NATIVE_RESIDUE_TILES", "force")
    n, c, co, hw, k, p, d, g, cl = RESIDUE_CASES[name]
    args = _backward_args(n, c, co, hw, k, (2, 2), p, d, g, cl, dtype, seed=sum(map(ord, name)))
    _judge(get_ops("native").bn_relu_conv2d_backward(*args), args, dtype, f"{name} {dtype}")


# ---- native: the default plans on shapes that take the 72 KiB plans and wider weight-gradient splits

# (N, C, C_out, (H, W), k, stride)
PLAN_CASES = {
    "wrn_s2_down_like": (4, 160, 320, (8, 8), 3, 2),
    "wide_s1": (2, 320, 320, (4, 4), 3, 1),
    "odd_s2_batch8": (8, 96, 200, (9, 9), 3, 2),
    "s2_15x15": (16, 64, 72, (15, 15), 3, 2),
}


def _static_plan(args, residue=0):
    from resfast.profiling import static_native as sn

    try:
        probe = sn._probe()
    except sn.NativeModelUnavailable as exc:
        return None, str(exc)
    out = subprocess.run([str(probe.exe), *map(str, [*args, 528, 0, residue])], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout), ""


@needs_native
@pytest.mark.parametrize("name", list(PLAN_CASES))
def test_native_default_plans_wide(name, monkeypatch):
    from resfast.ops.opsets import get_ops

    for var in ("RESFAST_NATIVE_RESIDUE_TILES", "RESFAST_NATIVE_TARGET_BLOCKS", "RESFAST_NATIVE_WHOLE_SAMPLES",
                "RESFAST_NATIVE_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    n, c, co, hw, k, s = PLAN_CASES[name]
    dtype = torch.float16 if n % 3 == 1 else torch.bfloat16
    args = _backward_args(n, c, co, hw, (k, k), (s, s), (k // 2, k // 2), (1, 1), 1, True, dtype, seed=n + c)
    _judge(get_ops("native").bn_relu_conv2d_backward(*args), args, dtype, f"{name} {dtype}")


def test_native_default_plans_take_the_new_paths():
    """Which plans the cases above take on the GPU (the CUDA host code's plans, printed by the
    static probe): together they take the 72 KiB input-gradient plans, the residue tiles by
    cost, and weight-gradient splits of 4 and more; the forced cases above take the residue
    tiles."""
    if not NATIVE["built"]:
        pytest.skip("resfast._C is not built")
    taken = {"smem72": False, "residue": False, "splits4": False}
    for n, c, co, hw, k, s in PLAN_CASES.values():
        plan, why = _static_plan([n, c, hw[0], hw[1], co, k, k, s, s, k // 2, k // 2, 1, 1, 1])
        if plan is None:
            pytest.skip(f"the static probe cannot be compiled here: {why}")
        ig, wg = plan["input_grad"], plan["weight_grad"]
        taken["smem72"] |= ig["smem_bytes"] > 48 * 1024
        taken["residue"] |= ig["tile"]["R"] == 1
        taken["splits4"] |= wg["splits"] >= 4
    assert all(taken.values()), taken
    for name, (n, c, co, hw, k, p, d, g, _) in RESIDUE_CASES.items():  # the forced cases take the residue tiles
        plan, _ = _static_plan([n, c, *hw, co, *k, 2, 2, *p, *d, g], residue=2)
        ig = plan["input_grad"]
        assert ig["ok"] and ig["tile"]["R"] == 1, (name, ig)


# ---- triton: TMA descriptors on views of grad_out


def _tma_setup(monkeypatch):
    from resfast.ops import triton_ops

    monkeypatch.setattr(triton_ops, "S1_INPUT", False)
    monkeypatch.setattr(triton_ops, "_BWD_INPUT_WIDE_INTERP",
                        triton_ops._cfg(4, 2, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=16, TMA=1))
    return triton_ops


GO_VIEWS = {
    # an expanded grad_out (stride 0 along the batch: a loss whose gradient repeats per sample)
    "expanded_batch": lambda g: g[:1].expand(2, -1, -1, -1),
    # the second half of a channels_last tensor of twice the channels (base offset 40 floats)
    "channel_slice": lambda g: torch.cat([g, g.flip(1)], 1)[:, g.shape[1]:],
}


@needs_triton
@pytest.mark.parametrize("view", list(GO_VIEWS))
def test_triton_tma_grad_out_views(view, monkeypatch):
    triton_ops = _tma_setup(monkeypatch)
    from resfast.kernels.triton import bn_relu_conv_bwd

    args = list(_backward_args(2, 24, 40, (4, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1, True, torch.float32, seed=28))
    args[0] = GO_VIEWS[view](args[0])
    args[2] = args[2].contiguous(memory_format=torch.channels_last)  # the descriptors want the channels innermost
    args = tuple(args)
    (launch,) = [la for la in triton_ops.launch_plan("bn_relu_conv2d_backward", *args) if la.name == "conv_bwd_input"]
    assert launch.fn is bn_relu_conv_bwd.bn_relu_conv_bwd_input_kernel
    # the descriptors, not the masked loads -- except for a broadcast grad_out, whose zero stride
    # _tma_ok refuses (the interpreter reads it right; a GPU's copy engine is untested with it)
    assert launch.bind(launch.interp_config).constexprs["TMA"] is (view != "expanded_batch")
    _judge(torch.ops.resfast_triton.bn_relu_conv2d_backward(*args), args, torch.float32, view)


# ---- triton: the finalize kernels launched directly with the GPU's tiles and many splits


def _cdiv(a, b):
    return -(-a // b)


# (splits_w, splits_s, n_gw, n_gb, C, BLOCK_C, BLOCK_S[, CPB: PAD_NAN's columns a program, 3x3 taps])
FIN_CASES = [
    (700, 3, 100, 5, 37, 32, 64),    # hundreds of weight-gradient splits, 64 rows a step, a partial column block
    (1, 1, 50, 3, 20, 16, 128),      # a single split
    (65, 130, 333, 7, 13, 128, 16),  # splits not a multiple of the rows, columns past the last block
    (13, 37, 70, 0, 600, 512, 4),    # no bias, many channels, 10 trips of 4 rows
    (700, 3, 333, 0, 5, 64, 32, 36),  # PAD_NAN: 36 of 64 columns a program (whole 3x3 units), finite sums
]


@needs_triton
@pytest.mark.parametrize("case", FIN_CASES, ids=str)
def test_triton_gradient_finalize_split_counts(case):
    from resfast.kernels.triton import bn_relu_conv_bwd as K

    sw, ss, n_gw, n_gb, c, bc, bs = case[:7]
    cpb = case[7] if len(case) > 7 else bc
    g = torch.Generator().manual_seed(sw + c)
    pgw, pgb = torch.randn(sw, n_gw, generator=g), torch.randn(sw, max(n_gb, 1), generator=g)
    psum = torch.randn(ss, 2 * c, generator=g)
    gw, gb = torch.empty(n_gw, dtype=torch.bfloat16), torch.empty(max(n_gb, 1))
    sdz, sdzx = torch.empty(c), torch.empty(c)
    nb_gw, nb_gb, nb_c = _cdiv(n_gw, cpb), _cdiv(n_gb, bc), _cdiv(c, bc)
    go = torch.zeros(2, 3, 4, 4)  # grad_out: read only on PAD_NAN's cold path (sums not finite)
    K.bn_relu_conv_bwd_finalize_kernel[(nb_gw + nb_gb + 2 * nb_c,)](
        pgw, pgb, psum, gw, gb, sdz, sdzx, n_gw, n_gb, c, sw, ss, nb_gw, nb_gb, nb_c,
        go, 37, 2, 4, 4, 4, 4, *go.stride(), 1, 1, 1, 1, 1, 1,
        HAS_GB=n_gb > 0, BLOCK_S=bs, BLOCK_C=bc, PAD_NAN=cpb != bc, KH=3, KW=3, CPB=cpb, num_warps=4)
    sums = {"grad_weight": (gw, pgw), "sum_dz": (sdz, psum[:, :c]), "sum_dz_xhat": (sdzx, psum[:, c:])}
    if n_gb:
        sums["grad_bias"] = (gb, pgb)
    for nm, (got, parts) in sums.items():
        r64 = parts.double().sum(0)
        assert_rule(nm, got, r64, parts.sum(0).to(got.dtype), str(case), dtype=got.dtype)


# (N, C, H, W, channels_last, offset, target splits, finalize (BLOCK_S, BLOCK_C))
STATS_CASES = {
    "one_position": (1, 3, 1, 1, True, 0.0, 8, (512, 1)),
    "18_positions_offset_1000": (2, 5, 3, 3, True, 1000.0, 8, (512, 1)),
    "105_positions_7_splits": (3, 24, 5, 7, False, 0.0, 700, (512, 1)),
    "289_positions_19_splits_offset_50": (1, 40, 17, 17, True, 50.0, 400, (512, 1)),
    "286_positions_18_splits_4_rows": (2, 17, 13, 11, True, -30.0, 600, (4, 16)),
}


@needs_triton
@pytest.mark.parametrize("name", list(STATS_CASES))
def test_triton_statistics_16_position_tiles(name):
    """The statistics pass with 16-position tiles (the GPU plan at small images) and as many
    splits as the positions allow, then the one-channel, 512-split finalize with the running
    statistics: mean and variance by the float64 rule, the running statistics as eager's
    update of the float64 ones (float32 arithmetic: 1e-5 relative)."""
    from resfast.kernels.triton import bn_stats as S

    n, c, h, w, cl, offset, target, (ms, mc) = STATS_CASES[name]
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(c)) * 0.5 + offset
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    p, bp, bc = n * h * w, 16, 16
    splits = max(1, min(target, _cdiv(p, bp)))
    chunk = _cdiv(_cdiv(p, splits), bp) * bp
    splits = _cdiv(p, chunk)
    pc, pm, pm2 = (torch.empty(splits, c) for _ in range(3))
    sxn, _, sxh, sxw = x.stride()
    dense = (h == 1 or sxh == w * sxw) and (n == 1 or sxn == h * sxh)
    S.bn_stats_partial_kernel[(_cdiv(c, bc), splits)](x, pc, pm, pm2, c, h * w, w, p, chunk, *x.stride(), BLOCK_P=bp,
                                                     BLOCK_C=bc, DENSE_P=dense, num_warps=4)
    mean, var = torch.empty(c), torch.empty(c)
    g = torch.Generator().manual_seed(1)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    S.bn_stats_finalize_kernel[(_cdiv(c, mc),)](pc, pm, pm2, mean, var, rm, rv, var, c, splits, 0.1, 1e-5,
                                                p / max(p - 1, 1), HAS_RUNNING=True, OUT_INVSTD=False,
                                                BLOCK_S=ms, BLOCK_C=mc, num_warps=4)
    v64, m64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    v32, m32 = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    assert_rule("mean", mean, m64, m32, name, dtype=torch.float32)
    assert_rule("var", var, v64, v32, name, dtype=torch.float32)
    rm64 = 0.9 * rm0.double() + 0.1 * m64
    rv64 = 0.9 * rv0.double() + 0.1 * v64 * p / max(p - 1, 1)
    torch.testing.assert_close(rm.double(), rm64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-5, atol=1e-5)
