"""The native kernels' whole-sample tiles (``csrc/include/resfast/tiles.h``: ``SpatialTile::S``):
forward and input-gradient tiles of one or several whole samples in flat pixel order, each
sample with its own staged halo, the last tile's samples missing past N. The CPU twin runs the
CUDA grid's blocks (float16 / bfloat16 through the emulated tensor-core fragments, float32
through the SIMT loop) with ``RESFAST_NATIVE_WHOLE_SAMPLES=force`` (whole-sample tiles wherever
one fits) against the float64 rule of docs/design.md: forward, input gradient (with its ReLU
mask and channel sums) and weight gradient, NCHW and channels_last, odd sizes, padding 0 / 1,
strides 1 / 2, groups 1 / 2 / 32 and 1-5 samples. ``RESFAST_NATIVE_TARGET_BLOCKS=1`` makes the
plans put several samples in a tile and several tiles in a block; the static probe (nvcc) checks
that the cases take the tiles they are meant to.
"""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from resfast.backends import native_info
from resfast.ops import reference
from resfast.ops.schemas import out_memory_format

from reference import assert_rule

NATIVE = native_info()
pytestmark = pytest.mark.skipif(not NATIVE["built"], reason=f"resfast._C is not built: {NATIVE['error']}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (N, C, C_out, H, W, k, stride, padding, groups, channels_last)
CASES = {
    "n1_5x5_pad1_cl": (1, 8, 8, 5, 5, 3, 1, 1, 1, True),
    "n2_7x7_g2_nt4_cl": (2, 64, 64, 7, 7, 3, 1, 1, 2, True),
    "n3_7x7_g32_packed_cl": (3, 64, 64, 7, 7, 3, 1, 1, 32, True),
    "n4_3x9_stride2_nchw": (4, 12, 10, 3, 9, 3, 2, 1, 1, False),
    "n5_5x5_1x1_pad0_cl": (5, 16, 24, 5, 5, 1, 1, 0, 1, True),
    "n5_7x7_stride2_pad0_g2_nchw": (5, 8, 8, 7, 7, 3, 2, 0, 2, False),
    "n3_3x9_wide_cl": (3, 40, 72, 3, 9, 3, 1, 1, 1, True),
    "n2_5x5_g32_nchw": (2, 32, 32, 5, 5, 3, 1, 1, 32, False),
}


def ops():
    from resfast.ops.opsets import get_ops

    return get_ops("native")


def _inputs(name, dtype):
    n, c, co, h, w, k, s, p, g, cl = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn(n, c, h, w, generator=gen) * 1.5 + 0.3
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    weight = (torch.randn(co, c // g, k, k, generator=gen) / math.sqrt(c // g * k * k)).to(dtype)
    bias = torch.randn(co, generator=gen).to(dtype)
    gm, bt = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.5
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    return x, weight, bias, gm, bt, mean, invstd, ([s, s], [p, p], [1, 1], g)


def _refs(fn, *args):
    ref64 = fn(*[a.detach().double() if isinstance(a, torch.Tensor) else a for a in args])
    return ref64, fn(*args)


@pytest.fixture(params=["default", "target1"])
def whole(request, monkeypatch):
    monkeypatch.setenv("RESFAST_NATIVE_WHOLE_SAMPLES", "force")
    monkeypatch.delenv("RESFAST_NATIVE_KERNELS", raising=False)
    if request.param == "target1":
        monkeypatch.setenv("RESFAST_NATIVE_TARGET_BLOCKS", "1")
    else:
        monkeypatch.delenv("RESFAST_NATIVE_TARGET_BLOCKS", raising=False)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_whole_sample_tiles_forward_and_backward(name, dtype, whole):
    x, weight, bias, gm, bt, mean, invstd, conv = _inputs(name, dtype)
    ctx = f"{name} {dtype} {whole}"
    y = ops().bn_relu_conv2d(x, weight, bias, gm, bt, mean, invstd, *conv, True)
    ref64, ref_same = _refs(reference.bn_relu_conv2d, x, weight, bias, gm, bt, mean, invstd, *conv, True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=out_memory_format(x)), ctx
    assert_rule("y", y, ref64, ref_same, ctx)

    gen = torch.Generator().manual_seed(7)
    grad_out = torch.randn(y.shape, generator=gen).to(dtype)
    if x.stride(1) == 1:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    args = (grad_out, x, weight, gm, bt, mean, invstd, *conv, True)
    got = ops().bn_relu_conv2d_backward(*args)
    ref64, ref_same = _refs(reference.bn_relu_conv2d_backward, *args)
    for nm, g, r64, rs in zip(("grad_z", "grad_weight", "grad_bias", "sum_dz", "sum_dz_xhat"), got, ref64, ref_same):
        assert_rule(nm, g, r64, rs, ctx, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_whole_sample_tiles_keep_a_nan_in_its_group_and_sample(dtype, monkeypatch):
    # A packed (groups of 2 channels) whole-sample tile holding a NaN recomputes its block with
    # the per-group SIMT fallback: the NaN reaches its own sample and group only.
    monkeypatch.setenv("RESFAST_NATIVE_WHOLE_SAMPLES", "force")
    monkeypatch.setenv("RESFAST_NATIVE_TARGET_BLOCKS", "1")
    x, weight, _, gm, bt, _, invstd, conv = _inputs("n3_7x7_g32_packed_cl", dtype)
    x = x.clone()
    x[1, 5, 3, 2] = float("nan")  # sample 1, group 2
    mean = torch.zeros(x.shape[1])
    y = ops().bn_relu_conv2d(x, weight, None, gm, bt, mean, invstd, *conv, False)
    r64, rs = _refs(reference.bn_relu_conv2d, x, weight, None, gm, bt, mean, invstd, *conv, False)
    assert torch.isnan(y[1, 4:6]).any() and not torch.isnan(y[0]).any() and not torch.isnan(y[2]).any()
    assert not torch.isnan(y[1, :4]).any() and not torch.isnan(y[1, 6:]).any()
    assert_rule("y", y, r64, rs, f"nan {dtype}")


# ---- which tiles the cases take (the plans of the CUDA host code, printed by the static probe)


def _plans(probe, name, target, whole_mode):
    n, c, co, h, w, k, s, p, g, _ = CASES[name]
    args = [n, c, h, w, co, k, k, s, s, p, p, 1, 1, g, target, whole_mode]
    out = subprocess.run([str(probe.exe), *map(str, args)], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", list(CASES))
def test_cases_take_whole_sample_tiles(probe, name):
    n = CASES[name][0]
    for target, kernel in [(528, "forward"), (528, "input_grad"), (1, "forward"), (1, "input_grad")]:
        plan = _plans(probe, name, target, 2)[kernel]
        tile = plan["tile"]
        assert plan["ok"] and tile["S"] >= 1, (name, target, kernel, plan)
        assert plan["spatial"] == -(-n // tile["S"]) and tile["M"] == tile["S"] * tile["TH"] * tile["TW"], plan
        assert tile["staged"] == tile["S"] * tile["IH"] * tile["IW"], plan
        never = _plans(probe, name, target, 1)[kernel]["tile"]
        assert never["S"] == 0, (name, never)
    if n >= 2:  # one block holding every tile: tiles of several samples
        assert _plans(probe, name, 1, 2)["forward"]["tile"]["S"] >= 2, name


def test_small_image_shapes_take_whole_sample_tiles_unforced(probe):
    # The model's shapes of 7x7 images: ResNeXt-50 stage 4 forward and input gradient, and
    # DenseNet-121's block-4 1x1 input gradient take tiles of several samples by themselves.
    def plans(n, c, h, co, k, g):
        out = subprocess.run([str(probe.exe), *map(str, [n, c, h, h, co, k, k, 1, 1, k // 2, k // 2, 1, 1, g])],
                             capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)

    rx = plans(64, 1024, 7, 1024, 3, 32)
    assert rx["forward"]["tile"]["S"] >= 2 and rx["input_grad"]["tile"]["S"] >= 2
    dn = plans(64, 992, 7, 128, 1, 1)
    assert dn["input_grad"]["tile"]["S"] >= 2
    big = plans(64, 128, 56, 128, 3, 32)  # 56x56 images: spatial tiles
    assert big["forward"]["tile"]["S"] == 0 and big["input_grad"]["tile"]["S"] == 0
