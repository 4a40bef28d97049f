"""The native input gradient's residue-class tiles (``csrc/include/resfast/tiles.h``:
``SpatialTile::R``): with strides 2 x 2 a tile's input pixels are ordered by their (row, col)
parities, warp c holding class c, and each warp runs only the taps that reach its class (the
plan's ``rw_*`` walk tables, the prepared weights' taps in class order: ``tap_of``). The CPU twin
runs the CUDA grid's blocks (float16 / bfloat16 through the emulated tensor-core fragments) with
``RESFAST_NATIVE_RESIDUE_TILES=force`` against the float64 rule of docs/design.md: the input
gradient with its ReLU mask and channel sums (and the forward and weight gradient of the same
call), odd sizes whose tiles hit the masks, padding 0 / 1 / 2, dilation 1 / 2 (a class no tap
reaches), a 1x1 stride-2 conv, NCHW and channels_last, several tiles a block
(``RESFAST_NATIVE_TARGET_BLOCKS=1``), a NaN in grad_out. The static probe (nvcc) checks that the
cases take the tiles meant, and WRN-28-10's stride-2 shapes by themselves.
"""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from resfast.backends import native_info
from resfast.ops import reference

from reference import assert_rule

NATIVE = native_info()
pytestmark = pytest.mark.skipif(not NATIVE["built"], reason=f"resfast._C is not built: {NATIVE['error']}")

# (N, C, C_out, H, W, k, stride, padding, dilation, channels_last[, groups])
CASES = {
    "n2_9x9_pad1_cl": (2, 40, 24, 9, 9, 3, 2, 1, 1, True),
    "n1_6x11_pad0_nchw": (1, 33, 20, 6, 11, 3, 2, 0, 1, False),
    "n2_8x8_1x1_cl": (2, 32, 16, 8, 8, 1, 2, 0, 1, True),
    "n1_7x10_dil2_pad2_cl": (1, 48, 32, 7, 10, 3, 2, 2, 2, True),
    # grouped: 16 input channels a group (2 n8 tiles, unpacked), and packed groups of 8 and 4
    # (two / four groups a 16-column block: block-diagonal weights, the per-group fallback)
    "n1_9x7_g2_cin16_nchw": (1, 32, 16, 9, 7, 3, 2, 1, 1, False, 2),
    "n2_10x10_g4_cin8_cl": (2, 32, 32, 10, 10, 3, 2, 1, 1, True, 4),
    "n2_8x9_g8_cin4_pad0_cl": (2, 32, 16, 8, 9, 3, 2, 0, 1, True, 8),
}
# the packed ones: (name, groups a block)
PACKED = {"n2_10x10_g4_cin8_cl": 2, "n2_8x9_g8_cin4_pad0_cl": 4}


def _case(name):
    n, c, co, h, w, k, s, p, d, cl, *rest = CASES[name]
    return n, c, co, h, w, k, s, p, d, cl, (rest[0] if rest else 1)


def ops():
    from resfast.ops.opsets import get_ops

    return get_ops("native")


def _inputs(name, dtype):
    n, c, co, h, w, k, s, p, d, cl, groups = _case(name)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn(n, c, h, w, generator=gen) * 1.5 + 0.3
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    weight = (torch.randn(co, c // groups, k, k, generator=gen) / math.sqrt(c // groups * k * k)).to(dtype)
    gm, bt = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.5
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    return x, weight, gm, bt, mean, invstd, ([s, s], [p, p], [d, d], groups)


def _refs(fn, *args):
    ref64 = fn(*[a.detach().double() if isinstance(a, torch.Tensor) else a for a in args])
    return ref64, fn(*args)


def _grad_out(name, x, weight, conv, dtype):
    n, _, co, h, w, k, s, p, d, _, _ = _case(name)
    ho, wo = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    g = torch.randn(n, co, ho, wo, generator=torch.Generator().manual_seed(7)).to(dtype)
    return g.contiguous(memory_format=torch.channels_last) if x.stride(1) == 1 else g


@pytest.fixture(params=["default", "target1"])
def residue(request, monkeypatch):
    monkeypatch.setenv("RESFAST_NATIVE_RESIDUE_TILES", "force")
    monkeypatch.delenv("RESFAST_NATIVE_KERNELS", raising=False)
    monkeypatch.delenv("RESFAST_NATIVE_WHOLE_SAMPLES", raising=False)
    if request.param == "target1":
        monkeypatch.setenv("RESFAST_NATIVE_TARGET_BLOCKS", "1")
    else:
        monkeypatch.delenv("RESFAST_NATIVE_TARGET_BLOCKS", raising=False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_residue_tiles_backward(name, dtype, residue):
    x, weight, gm, bt, mean, invstd, conv = _inputs(name, dtype)
    ctx = f"{name} {dtype} {residue}"
    grad_out = _grad_out(name, x, weight, conv, dtype)
    args = (grad_out, x, weight, gm, bt, mean, invstd, *conv, True)
    got = ops().bn_relu_conv2d_backward(*args)
    ref64, ref_same = _refs(reference.bn_relu_conv2d_backward, *args)
    for nm, g, r64, rs in zip(("grad_z", "grad_weight", "grad_bias", "sum_dz", "sum_dz_xhat"), got, ref64, ref_same):
        assert_rule(nm, g, r64, rs, ctx, dtype=dtype)


def test_residue_tiles_nan_in_grad_out_reaches_its_pixels_only(monkeypatch):
    # Each class reads only the output rows its taps reach: a NaN of grad_out reaches exactly the
    # input pixels eager's conv backward gives it (the others' classes never read it).
    monkeypatch.setenv("RESFAST_NATIVE_RESIDUE_TILES", "force")
    name, dtype = "n2_9x9_pad1_cl", torch.bfloat16
    x, weight, gm, bt, mean, invstd, conv = _inputs(name, dtype)
    grad_out = _grad_out(name, x, weight, conv, dtype).clone()
    grad_out[1, 3, 2, 3] = float("nan")
    args = (grad_out, x, weight, gm, bt, mean, invstd, *conv, False)
    grad_z = ops().bn_relu_conv2d_backward(*args)[0]
    r64 = reference.bn_relu_conv2d_backward(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])[0]
    assert torch.isnan(grad_z).any()
    assert torch.equal(torch.isnan(grad_z), torch.isnan(r64))


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_residue_tiles_nan_in_grad_out_falls_back_in_class_order(name, monkeypatch):
    # A packed block holding a non-finite value runs the per-group SIMT fallback (block-diagonal
    # weights would carry NaN x 0 into the other groups' columns), which walks the residue-class
    # tile in class order and the weights' taps in class order: the NaN reaches exactly eager's
    # pixels and channels, and every other value of the block keeps the float64 rule.
    monkeypatch.setenv("RESFAST_NATIVE_RESIDUE_TILES", "force")
    dtype = torch.bfloat16
    x, weight, gm, bt, mean, invstd, conv = _inputs(name, dtype)
    grad_out = _grad_out(name, x, weight, conv, dtype).clone()
    grad_out[1, 5, 2, 3] = float("nan")  # group 5 // (C_out / groups): one group of its block
    args = (grad_out, x, weight, gm, bt, mean, invstd, *conv, False)
    grad_z = ops().bn_relu_conv2d_backward(*args)[0]
    r64, rs = _refs(lambda *a: reference.bn_relu_conv2d_backward(*a)[0], *args)
    nan = torch.isnan(r64)
    assert nan.any() and torch.equal(torch.isnan(grad_z), nan)
    # the block's other group(s) and the pixels the NaN does not reach: the float64 rule
    assert_rule("grad_z", grad_z.masked_fill(nan, 0), r64.masked_fill(nan, 0), rs.masked_fill(nan, 0),
                f"{name} nan", dtype=dtype)


# ---- which tiles the cases take (the plans of the CUDA host code, printed by the static probe)


def _plans(probe, args, target=528, residue=0):
    out = subprocess.run([str(probe.exe), *map(str, [*args, target, 0, residue])], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", list(CASES))
def test_cases_take_residue_tiles(probe, name):
    n, c, co, h, w, k, s, p, d, _, groups = _case(name)
    args = [n, c, h, w, co, k, k, s, s, p, p, d, d, groups]
    for target in (528, 1):
        plan = _plans(probe, args, target, 2)["input_grad"]
        t = plan["tile"]
        assert plan["ok"] and t["R"] == 1 and plan["nt"] in (2, 4) and plan["P"] == PACKED.get(name, 1), (name, plan)
        if groups > 1:  # 16 input channels a block, one group or several packed
            assert plan["nt"] == 2, (name, plan)
        assert t["M"] == t["MP"] == 64 * t["cmt"] and t["TH"] * t["TW"] == t["M"], plan
        assert _plans(probe, args, target, 1)["input_grad"]["tile"]["R"] == 0


def test_wrn_stride2_input_gradients_take_residue_tiles(probe):
    # WRN-28-10's stride-2 3x3 convs (batch 128) by themselves; unit strides never.
    for c, h, co in [(160, 32, 320), (320, 16, 640)]:
        plans = _plans(probe, [128, c, h, h, co, 3, 3, 2, 2, 1, 1, 1, 1, 1])
        assert plans["input_grad"]["tile"]["R"] == 1 and plans["forward"]["tile"]["R"] == 0, plans
    plans = _plans(probe, [128, 320, 16, 16, 320, 3, 3, 1, 1, 1, 1, 1, 1, 1], residue=2)
    assert plans["input_grad"]["tile"]["R"] == 0
