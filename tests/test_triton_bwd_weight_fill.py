"""The weight-gradient configs that fill an SM (``triton_ops._BWD_WEIGHT_FILL_CONFIGS``: 16 warps,
16 output x 64 input channels, capped at 64 registers, for one group per block such as
DenseNet-121's 128 -> 32 3x3 convs; and the packed stride-1 launch's 8-warp config capped at 48
registers), run by the stacked kernel's ``DO_GW`` pass with ``FILL`` splits, against the float64
rule: ungrouped convs with two output-channel chunks and partial channel blocks, 32-channel
groups, packed 4- and 8-channel groups, one 16-channel group, depthwise, padding 0, 1 and 2,
dilation 2, stride 2 (the residue-class path), odd image sizes, NCHW and channels_last, bfloat16, and a NaN in one channel's input
or one group's output gradient (it must reach exactly the weight-gradient entries eager's
reaches).

Under the interpreter an op runs each launch's interpreter config; here the weight-gradient
launch runs the config under test instead (the other launches as usual, but for the gradient
finalize on the GPU's 512 x 4 tile; on these small images the launch's own list drops 8 x 8
tiles, which the binder reshapes to fill the grid anyway)."""
from __future__ import annotations

import pytest
import torch

from bwd_harness import DEVICE, TRITON_WHY as _WHY, check as _check, inputs as _inputs, out_hw as _out_hw

pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

if not _WHY:
    from resfast.ops import triton_ops

    UNGROUPED = triton_ops._BWD_WEIGHT_FILL_CONFIGS[0]
    PACKED = triton_ops._BWD_WEIGHT_PACKED_CONFIGS[0]


@pytest.fixture
def weight_config(monkeypatch):
    """Run the weight-gradient launch with the config given to ``use(cfg)``; returns the bound
    launches' constexprs it ran, for the test to inspect."""
    monkeypatch.setenv("RESFAST_TRITON_PLAN_CACHE", "0")  # every call plans (and runs) afresh
    ran, chosen = [], []
    run = triton_ops._run

    def patched(launches, x):
        for launch in launches:
            if launch.name == "conv_bwd_weight" and chosen:
                ran.append(launch.bind(chosen[0]).constexprs)
                run([_Only(launch, chosen[0])], x)
            else:
                run([launch], x)

    monkeypatch.setattr(triton_ops, "_run", patched)
    # the GPU's plan: a group is "wide" (its own weight-gradient launch) only past the narrowest
    # BLOCK_N of the input-gradient configs (64), not the interpreter config's 16
    cap_n = min(cfg.get("BLOCK_N") for cfg in triton_ops._BWD_INPUT_CONFIGS)

    def wide_group(groups, cin_g, cout_g):
        blk = triton_ops._blocks(groups, cin_g, cout_g, 16, cap_n)
        return blk.gp == 1 and blk.nr > blk.block_n

    monkeypatch.setattr(triton_ops, "_wide_group", wide_group)
    # and the GPU's gradient finalize at 12 or fewer weight-gradient splits (512 columns x 4
    # rows: one program sums 512 columns), not the interpreter's 16 x 8: these convs have up to
    # 64 x 32 x 9 weight-gradient columns, and 16-column programs were most of the interpreter's
    # time here (2026-12-01). The 16 x 8 tile runs in every other backward test.
    monkeypatch.setattr(triton_ops, "FIN_TILES", (512, 4))

    def use(cfg):
        chosen.append(cfg)
        return ran
    return use


class _Only:
    """A launch whose interpreter config is ``cfg`` (what ``_run`` runs under the interpreter)."""

    def __init__(self, launch, cfg):
        self._launch, self.interp_config = launch, cfg
        self.name = launch.name

    def run(self, cfg):
        self._launch.run(cfg)


# (n, C, C_out, groups, H x W, kernel, padding, dilation)
UNGROUPED_CASES = [
    (2, 32, 32, 1, (9, 7), (3, 3), (1, 1), (1, 1)),    # DenseNet-like: two 16-wide output chunks
    (1, 40, 24, 1, (7, 10), (3, 3), (0, 0), (1, 1)),   # partial input block (40 = 64 - 24) and output chunk
    (1, 72, 16, 1, (6, 5), (3, 3), (2, 2), (1, 1)),    # two input blocks (the second partial), padding 2
    (1, 32, 32, 1, (9, 9), (3, 3), (2, 2), (2, 2)),    # dilation 2
    (1, 64, 64, 2, (7, 7), (3, 3), (1, 1), (1, 1)),    # ResNeXt-50 stage 4: 32-channel groups
]
PACKED_CASES = [
    (2, 16, 16, 4, (9, 7), (3, 3), (1, 1), (1, 1)),    # stage 1: 4-channel groups, 4 per block
    (1, 32, 32, 4, (7, 10), (3, 3), (0, 0), (1, 1)),   # stage 2: 8-channel groups, padding 0
    (1, 16, 16, 1, (6, 5), (3, 3), (2, 2), (1, 1)),    # stage 3: one 16-channel group (FILL), padding 2
    (1, 32, 32, 16, (9, 9), (3, 3), (2, 2), (2, 2)),   # 2-channel groups, dilation 2
    (1, 24, 24, 24, (11, 5), (3, 3), (1, 1), (1, 1)),  # depthwise, a partial last block
]


def _args(case, dtype=torch.float32, layout=torch.channels_last, affine=True, seed=21):
    n, c, co, groups, hw, k, p, d = case
    x, w, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k, dtype, seed=seed, layout=layout)
    go = torch.randn(n, co, *_out_hw(hw, k, p, d), generator=torch.Generator().manual_seed(seed + 1))
    go = go.to(DEVICE, dtype).contiguous(memory_format=layout)
    if not affine:
        bw = bb = None
    return (go, x, w, bw, bb, mean, invstd, [1, 1], list(p), list(d), groups, True)


def _ran_fill(ran, cfg):
    assert ran, "the weight-gradient launch did not run"
    const = ran[-1]
    assert const["DO_GW"] and not const["DO_GA"], const
    assert const.get("maxnreg") == cfg.get("MAXNREG") and const["num_warps"] == cfg.num_warps, const


@pytest.mark.parametrize("case", UNGROUPED_CASES, ids=str)
def test_ungrouped_fill_config_against_eager(case, weight_config):
    ran = weight_config(UNGROUPED)
    _check(_args(case), torch.float32, f"case={case}")
    _ran_fill(ran, UNGROUPED)


def test_ungrouped_fill_config_stride2_classes(weight_config):
    """ResNeXt-50 stage 4's stride-2 first block takes this config too (the residue-class path,
    two 16-wide output chunks of 32-channel groups): odd sizes, padding 1."""
    ran = weight_config(UNGROUPED)
    go, x, w, bw, bb, mean, invstd, *rest = _args((1, 64, 64, 2, (9, 7), (3, 3), (1, 1), (1, 1)), seed=27)
    go = torch.randn(1, 64, 5, 4, generator=torch.Generator().manual_seed(28)).to(DEVICE)
    go = go.contiguous(memory_format=torch.channels_last)
    _check((go, x, w, bw, bb, mean, invstd, [2, 2], [1, 1], [1, 1], 2, True), torch.float32, "stride 2")
    _ran_fill(ran, UNGROUPED)
    assert ran[-1]["SH"] == 2 and ran[-1]["SW"] == 2


@pytest.mark.parametrize("case", PACKED_CASES, ids=str)
def test_packed_fill_config_against_eager(case, weight_config):
    ran = weight_config(PACKED)
    _check(_args(case), torch.float32, f"case={case}")
    _ran_fill(ran, PACKED)


@pytest.mark.parametrize("which", ["ungrouped", "packed"])
def test_fill_configs_nchw_bf16(which, weight_config):
    """NCHW tensors (channel stride H*W), no BN affine, bfloat16, odd sizes."""
    cfg, case = ((UNGROUPED, (1, 40, 32, 1, (7, 9), (3, 3), (1, 1), (1, 1))) if which == "ungrouped"
                 else (PACKED, (2, 16, 16, 4, (7, 9), (3, 3), (1, 1), (1, 1))))
    ran = weight_config(cfg)
    _check(_args(case, torch.bfloat16, torch.contiguous_format, affine=False, seed=23), torch.bfloat16, which)
    _ran_fill(ran, cfg)


@pytest.mark.parametrize("which", ["ungrouped", "packed"])
@pytest.mark.parametrize("where", ["x", "grad_out"])
def test_fill_configs_nan_reaches_eagers_entries(which, where, weight_config):
    """A NaN in one channel of ``x`` (its statistics, so the whole channel, are NaN) or in one
    element of ``grad_out``: NaN reaches exactly the weight-gradient entries eager's does (the
    float64 rule compares the NaN pattern); with packed groups none of the neighbour groups'.
    On 7 x 8 images (9 x 11 until 2026-12-01): a NaN in ``grad_out`` with packed groups makes
    the input-gradient launch's fix-up recompute its program's tiles (8 tiles over the two
    images, not 18), the interpreter's cost of this test, so the NaN's taps reach one tile
    (rows and columns 1-3: one program's fix-up, not three), inside the image."""
    cfg, groups, c = (UNGROUPED, 1, 32) if which == "ungrouped" else (PACKED, 4, 16)
    ran = weight_config(cfg)
    go, x, w, bw, bb, mean, invstd, *rest = _args((2, c, 16, groups, (7, 8), (3, 3), (1, 1), (1, 1)), seed=25)
    if where == "x":
        x[1, 5, 4, 6] = float("nan")  # input channel 5 (packed: group 1)
        mean = mean.clone()
        mean[5] = float("nan")
    else:
        go[0, 10, 2, 2] = float("nan")  # output channel 10 (packed: group 2)
    got = _check((go, x, w, bw, bb, mean, invstd, *rest), torch.float32, f"{which}: NaN in {where}")
    _ran_fill(ran, cfg)
    gw = got[1]
    if which == "packed":
        rows = slice(4, 8) if where == "x" else slice(8, 12)
        assert torch.isnan(gw[rows]).any()
        others = torch.ones(16, dtype=torch.bool)
        others[rows] = False
        assert not torch.isnan(gw[others]).any()
    elif where == "x":
        assert torch.isnan(gw[:, 5]).all() and not torch.isnan(gw[:, :5]).any()
    else:
        assert torch.isnan(gw[10]).all() and not torch.isnan(gw[:10]).any()


@pytest.mark.parametrize("tiles", [(32, 64), (64, 32), (128, 16)], ids=str)
def test_gradient_finalize_tiles(tiles, monkeypatch):
    """The gradient finalize's tile follows the split count (``triton_ops._finalize_tile``: up to
    64 partial rows per step, narrower columns): more rows per step than the launch has splits
    (masked rows), a last column block only partly used, each sum in its fixed order."""
    monkeypatch.setenv("RESFAST_TRITON_PLAN_CACHE", "0")
    monkeypatch.setattr(triton_ops, "FIN_TILES", tiles)
    # one image (two until 2026-12-01): the finalize sums the same split rows, half the tiles
    _check(_args((1, 40, 24, 1, (7, 9), (3, 3), (1, 1), (1, 1)), seed=31), torch.float32, f"tiles={tiles}")


def test_small_images_plan_more_programs(monkeypatch):
    """The plan on the model's machine (meta tensors: 132 SMs, no compile): at DenseNet-121's
    7 x 7 3x3 conv the statistics pass takes 16-position tiles (392 programs, not 98), the
    16-warp weight-gradient config fills both resident slots of every SM (no cap on its split
    count from the partials' bytes: 256 programs, not 24) and the gradient finalize sums its 64
    splits 32 rows at a time (64 before its columns were widened for whole 3x3 units); at
    14 x 14 the statistics pass takes 16-position tiles too (since 2026-12-01 every
    channels-innermost input with 64 or more channels does: 392 programs)."""
    from resfast.profiling.sm90 import SHAPES
    from resfast.profiling.static_model import training_plan

    monkeypatch.setattr(triton_ops, "_interpret", lambda: False)  # the GPU's plan, not the interpreter's
    plan = training_plan(SHAPES["densenet121_3x3_b4"])
    stats = plan["fwd"][0].bind(plan["fwd"][0].configs[0])
    assert stats.constexprs["BLOCK_P"] == 16 and stats.grid == (2, 196)
    gi, gw, fin = plan["bwd"][0], plan["bwd"][1], plan["bwd"][2]
    assert (gi.name, gw.name, fin.name) == ("conv_bwd_input", "conv_bwd_weight", "conv_bwd_finalize")
    gi.bind(gi.configs[0])
    fill = [cfg for cfg in gw.configs if cfg.get("NOCAP")]
    assert fill and gw.bind(fill[0]).derived["programs"] == 256
    bound = fin.bind(fin.configs[0])
    # 32 x 64 by the split count, widened for the padded taps' NaN (PAD_NAN: whole 3x3 units, a
    # multiple of 4 columns a program, 36 of 64) to 64 x 32, the same partials a step
    assert (bound.constexprs["BLOCK_C"], bound.constexprs["BLOCK_S"], bound.constexprs["CPB"]) == (64, 32, 36)
    plan = training_plan(SHAPES["densenet121_3x3_b3"])
    stats = plan["fwd"][0].bind(plan["fwd"][0].configs[0])
    assert stats.constexprs["BLOCK_P"] == 16 and stats.grid == (2, 392)
