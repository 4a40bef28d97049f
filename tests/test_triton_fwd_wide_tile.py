"""The forward conv's ``FIXUP_FMA`` config on a wide tile (``TILE_H=4, TILE_W=16`` on a GPU:
28 x 28 and 14 x 14 images are cut into 4-row strips with less padding waste than 8 x 8 tiles)
against the float64 rule: packed 4- and 8-channel groups, two blocks, odd image sizes that
overhang the tile in both directions, padding 0, 1 and 2, dilation 2, NCHW and channels_last,
bfloat16, and a NaN in one channel of ``x`` (NaN exactly at eager's outputs).

On the CPU the kernels run under ``TRITON_INTERPRET=1`` with the interpreter's config swapped
for a ``TILE_H=2, TILE_W=8`` ``FIXUP_FMA`` one (a tile four times as wide as it is high, as on
the GPU, small enough for the interpreter).
"""
from __future__ import annotations

import pytest
import torch

from resfast.backends import backend_status

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY = backend_status(DEVICE)["triton"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

if not _WHY:
    from resfast.ops import triton_ops
    from test_triton_fwd_fixup_fma import _check, _inputs

    OPS = torch.ops.resfast_triton
    GPU_FWD_CONFIGS = list(triton_ops._FWD_CONFIGS)  # before the fixture below narrows the list


@pytest.fixture(autouse=True)
def _wide_tile_config(monkeypatch):
    cfg = triton_ops._cfg(4, 1, 1, TILE_H=2, TILE_W=8, BLOCK_N=16, BLOCK_K=16, STACK=1, FIXUP_FMA=1)
    monkeypatch.setattr(triton_ops, "_FWD_INTERP", cfg)
    monkeypatch.setattr(triton_ops, "_FWD_CONFIGS", [c for c in triton_ops._FWD_CONFIGS
                                                     if c.get("FIXUP_FMA") and c.get("TILE_W") == 16
                                                     and c.get("TILE_H") == 4])
    triton_ops.clear_plan_cache()
    yield
    triton_ops.clear_plan_cache()


def _bound(args):
    plan = triton_ops.launch_plan("bn_relu_conv2d", *args)
    fwd = [lp for lp in plan if lp.name == "conv_fwd"][0]
    return fwd.bind(fwd.interp_config).constexprs


# (n, C, C_out, groups, H x W, kernel, padding, dilation)
CASES = [
    (2, 16, 16, 4, (7, 11), (3, 3), (1, 1), (1, 1)),    # 4-channel groups: the strip overhangs both ways
    (1, 32, 32, 4, (5, 9), (3, 3), (0, 2), (1, 2)),     # 8-channel groups, two blocks, mixed pad / dilation
]


# one layout per case (both layouts covered; the interpreter's runs are CI's slowest budget)
@pytest.mark.parametrize("case,layout", list(zip(CASES, ["cl", "nchw"])), ids=str)
def test_forward_against_eager(case, layout):
    n, c, co, groups, hw, k, p, d = case
    x, w, b, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k, layout, torch.float32)
    args = (x, w, b, bw, bb, mean, invstd, [1, 1], list(p), list(d), groups, False)
    const = _bound(args)
    assert const["FIXUP_FMA"] and const["PACKED"] and (const["TILE_H"], const["TILE_W"]) == (2, 8)
    _check(OPS.bn_relu_conv2d(*args), args, torch.float32, f"case={case}, {layout}")


def test_forward_bfloat16_with_a_nan():
    """A program that met a NaN recomputes all its tiles by scalar FMAs (the interpreter's
    costliest path, a cost per tile of the program). One 5 x 9 image (overhanging the 2 x 8
    tile both ways): 6 tiles, 3 programs of 2 tiles each; the NaN's outputs (rows 0-1, columns
    2-4) fall in tile 0, so its program recomputes tiles 0 and 3 (one with no NaN)."""
    x, w, b, bw, bb, mean, invstd = _inputs(1, 16, 16, 4, (5, 9), (3, 3), "cl", torch.bfloat16, seed=3)
    x[0, 6, 0, 3] = float("nan")  # group 1 of the block only
    args = (x, w, b, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 4, False)
    assert _bound(args)["FIXUP_FMA"]
    _check(OPS.bn_relu_conv2d(*args), args, torch.bfloat16, "bfloat16, NaN in channel 6", nan_ok=True)


def test_the_static_plan_lists_the_wide_tile():
    """The GPU config list (as the module has it, not the fixture's narrowed one) carries the 4 x 16
    ``FIXUP_FMA`` tile once (64 registers, 8 per SM), after the 8 x 8 ``FIXUP_FMA`` one, not first
    (the static choice, the first config, is not it)."""
    cfgs = [c for c in GPU_FWD_CONFIGS if c.get("TILE_H") == 4 and c.get("TILE_W") == 16 and c.get("FIXUP_FMA")]
    assert len(cfgs) == 1 and cfgs[0].get("MAXNREG") == 64 and cfgs[0].programs_per_sm == 8
    fma_8x8 = [i for i, c in enumerate(GPU_FWD_CONFIGS) if c.get("FIXUP_FMA") and c.get("TILE_W") == 8]
    assert len(fma_8x8) == 1 and GPU_FWD_CONFIGS.index(cfgs[0]) > fma_8x8[0] > 0
