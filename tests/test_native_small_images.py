"""Issue 16's small images (2026-12-01): K chunks of 256 channels, the whole-sample input
gradient with 8 n8 tiles a warp, the whole-sample forward with 4 n8 tiles and 2 m16 tiles a warp,
and several tiles a block down to 3 blocks an SM.

The planner (``csrc/include/resfast/tiles.h`` ``make_conv_plan``) may stage K in chunks of 256
channels for the tensor-core plans (it took at most 128 before): DenseNet-121's block-4 1x1
forward (992 channels, 4 chunks where it ran 8) is 4.41 -> 3.89 us PREDICTED, 2.03x -> 1.79x of its
HBM floor. The CPU twin runs the CUDA grid's blocks (float16 / bfloat16 through the emulated
tensor-core fragments) against the float64 rule of docs/design.md for 1x1 convs of 300 and 520
channels: chunks of 256 with a last chunk of 8 or 44 channels (the latter not a multiple of 8),
channels_last (the 16-byte staging path) and NCHW (the general one), one tile a block and all of
them in one block (``RESFAST_NATIVE_TARGET_BLOCKS=1``). The whole-sample forward with 4 n8 tiles
a warp (``tiles.h`` ``mt_of(nt, input_grad, whole)``: 2 m16 tiles a warp, tiles of at most 128
pixels) takes ResNeXt-50 stage 4's forward (2 samples x 32 columns a tile, 2 tiles a block:
9.36 -> 7.43 us PREDICTED, 2.33x -> 1.85x); the CPU twin checks it on 4 samples of 7x7 with 2
groups of 32 channels, 2 samples a tile and 2 tiles a block (``tests/test_native_multisample.py``
forces it on more shapes). The static probe (nvcc) checks the plans.
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

# (N, C, C_out, H, W, channels_last)
CASES = {
    "c520_4x4_cl": (1, 520, 64, 4, 4, True),
    "c300_3x5_nchw": (2, 300, 16, 3, 5, False),
}


def _inputs(name, dtype):
    n, c, co, h, w, cl = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn(n, c, h, w, generator=gen) * 1.5 + 0.3
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    weight = (torch.randn(co, c, 1, 1, generator=gen) / math.sqrt(c)).to(dtype)
    bias = torch.randn(co, generator=gen).to(dtype)
    gm, bt = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.5
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    return x, weight, bias, gm, bt, mean, invstd, ([1, 1], [0, 0], [1, 1], 1)


def _refs(fn, *args):
    ref64 = fn(*[a.detach().double() if isinstance(a, torch.Tensor) else a for a in args])
    return ref64, fn(*args)


@pytest.mark.skipif(not NATIVE["built"], reason=f"resfast._C is not built: {NATIVE['error']}")
@pytest.mark.parametrize("target", ["default", "1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_k_chunks_of_256_channels(name, dtype, target, monkeypatch):
    from resfast.ops.opsets import get_ops

    monkeypatch.delenv("RESFAST_NATIVE_KERNELS", raising=False)
    monkeypatch.delenv("RESFAST_NATIVE_WHOLE_SAMPLES", raising=False)
    if target == "1":
        monkeypatch.setenv("RESFAST_NATIVE_TARGET_BLOCKS", "1")
    else:
        monkeypatch.delenv("RESFAST_NATIVE_TARGET_BLOCKS", raising=False)
    ops = get_ops("native")
    x, weight, bias, gm, bt, mean, invstd, conv = _inputs(name, dtype)
    ctx = f"{name} {dtype} target {target}"
    y = ops.bn_relu_conv2d(x, weight, bias, gm, bt, mean, invstd, *conv, True)
    ref64, ref_same = _refs(reference.bn_relu_conv2d, x, weight, bias, gm, bt, mean, invstd, *conv, True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=out_memory_format(x)), ctx
    assert_rule("y", y, ref64, ref_same, ctx)

    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    if x.stride(1) == 1:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    args = (grad_out, x, weight, gm, bt, mean, invstd, *conv, True)
    got = ops.bn_relu_conv2d_backward(*args)
    ref64, ref_same = _refs(reference.bn_relu_conv2d_backward, *args)
    for nm, g, r64, rs in zip(("grad_z", "grad_weight", "grad_bias", "sum_dz", "sum_dz_xhat"), got, ref64, ref_same):
        assert_rule(nm, g, r64, rs, ctx, dtype=dtype)


@pytest.mark.skipif(not NATIVE["built"], reason=f"resfast._C is not built: {NATIVE['error']}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_whole_sample_forward_with_4_n8_tiles(dtype, monkeypatch):
    # 4 samples of 7x7, 64 -> 64 channels in 2 groups, 3x3: with one block for the grid the
    # forward takes 2 samples (98 rows: 7 m16 tiles over the 4 warps' 2) x 32 columns a tile
    # and both tiles of a group in one block (the probe test below checks the plan).
    from resfast.ops.opsets import get_ops

    monkeypatch.delenv("RESFAST_NATIVE_KERNELS", raising=False)
    monkeypatch.delenv("RESFAST_NATIVE_WHOLE_SAMPLES", raising=False)
    monkeypatch.setenv("RESFAST_NATIVE_TARGET_BLOCKS", "1")
    gen = torch.Generator().manual_seed(16)
    x = (torch.randn(4, 64, 7, 7, generator=gen) + 0.2).contiguous(memory_format=torch.channels_last).to(dtype)
    weight = (torch.randn(64, 32, 3, 3, generator=gen) / math.sqrt(32 * 9)).to(dtype)
    gm, bt = torch.rand(64, generator=gen) + 0.5, torch.randn(64, generator=gen) * 0.5
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    conv = ([1, 1], [1, 1], [1, 1], 2)
    y = get_ops("native").bn_relu_conv2d(x, weight, None, gm, bt, mean, invstd, *conv, True)
    ref64, ref_same = _refs(reference.bn_relu_conv2d, x, weight, None, gm, bt, mean, invstd, *conv, True)
    assert_rule("y", y, ref64, ref_same, f"whole nt4 {dtype}")


# ---- the plans (the CUDA host code's, printed by the static probe)


def _plans(probe, n, c, h, w, co, k, target=None, groups=1):
    args = [n, c, h, w, co, k, k, 1, 1, k // 2, k // 2, 1, 1, groups] + ([] if target is None else [target])
    out = subprocess.run([str(probe.exe), *map(str, args)], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_cases_stage_k_in_chunks_of_256(probe):
    # (c300 with one block for the grid takes 2 whole samples a tile and chunks of 128)
    for name, target in [("c520_4x4_cl", None), ("c520_4x4_cl", 1), ("c300_3x5_nchw", None)]:
        n, c, co, h, w, _ = CASES[name]
        fwd = _plans(probe, n, c, h, w, co, 1, target)["forward"]
        assert fwd["ok"] and fwd["BK"] == 256 and fwd["PS"] == 264, (name, target, fwd)
        assert fwd["smem_bytes"] <= 72 * 1024, (name, target, fwd)


def test_densenet_block4_plans(probe):
    # PREDICTED choices for the 7x7 images of DenseNet-121's block 4 (batch 64): the 1x1
    # forward's 992 channels in 4 chunks of 256 (8 of 128 before), the 3x3 input gradient one
    # whole sample x 64 columns a tile (2 samples x 32 columns before).
    fwd = _plans(probe, 64, 992, 7, 7, 128, 1)["forward"]
    assert fwd["BK"] == 256 and fwd["bn"] == 64 and fwd["blocks"] == 128, fwd
    ig = _plans(probe, 64, 128, 7, 7, 32, 3)["input_grad"]
    assert ig["tile"]["S"] == 1 and ig["bn"] == 64 and ig["nt"] == 8 and ig["blocks"] == 128, ig


def test_whole_sample_forward_with_4_n8_tiles_plans(probe):
    # the parity case above: 2 samples x 32 columns a tile, 2 tiles a block, 2 blocks
    fwd = _plans(probe, 4, 64, 7, 7, 64, 3, target=1, groups=2)["forward"]
    assert fwd["nt"] == 4 and fwd["tile"]["S"] == 2 and fwd["tile"]["M"] == 98 and fwd["tpb"] == 2, fwd
    assert fwd["blocks"] == 2, fwd
    # ResNeXt-50 stage 4 (batch 64, 1024 channels in 32 groups, 7x7): the same tiles, 2 a block,
    # 512 blocks (3 an SM resident: the first wave fills every SM); PREDICTED 7.43 us, 1.85x
    rx = _plans(probe, 64, 1024, 7, 7, 1024, 3, groups=32)["forward"]
    assert rx["nt"] == 4 and rx["tile"]["S"] == 2 and rx["tpb"] == 2 and rx["blocks"] == 512, rx
