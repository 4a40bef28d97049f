"""The merged conv backward's filling configs for 1x1 convs (``triton_ops._BWD_MERGED_FILL_CONFIGS``:
16 warps on a 128- or 64-position tile with all 128 output channels, DenseNet-121's 1x1 convs)
and the strided split
(``triton_ops._strided_split``: one 16-channel group per block at stride 2 runs its input and
weight gradients in launches of their own, the weight gradient with
``_BWD_WEIGHT_STRIDED_CONFIGS``), against the float64 rule: 1x1 convs with partial channel
blocks (40 -> 24, 72 -> 16), all 128 output channels, stride 2, padding 0, 1 and 2, dilation 2,
odd image sizes, NCHW and channels_last, bfloat16, no BN affine, and a NaN in one ``grad_out``
element or one input channel (it must reach exactly eager's positions).

Under the interpreter the merged launch runs its interpreter config (``_BWD_INTERP``, whose
16 output channels would split a 1x1 conv of more); here that config is the one under test, so
the planner merges as on the GPU and the kernel runs the config's tile and channel blocks. The
strided split's weight-gradient launch runs the config under test the same way."""
from __future__ import annotations

import pytest
import torch

from bwd_harness import DEVICE, TRITON_WHY as _WHY, check as _check, gpu_finalize_tile, inputs as _inputs
from bwd_harness import out_hw as _out_hw

# the finalize on the GPU's tile: up to 128 x 48 weight-gradient columns here, whose 16-column
# programs under the interpreter's 16 x 8 tile were much of this file's time (bwd_harness)
pytestmark = [pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}"),
              pytest.mark.usefixtures(gpu_finalize_tile.__name__)]

if not _WHY:
    from resfast.ops import triton_ops

    DENSE = triton_ops._BWD_MERGED_FILL_CONFIGS
    STRIDED_W = triton_ops._BWD_WEIGHT_STRIDED_CONFIGS[0]


@pytest.fixture
def merged_config(monkeypatch):
    """The merged launch's interpreter config set to ``use(cfg)``'s; returns the constexprs of
    every conv launch that ran, by launch name."""
    monkeypatch.setenv("RESFAST_TRITON_PLAN_CACHE", "0")  # every call plans (and runs) afresh
    ran = []
    run = triton_ops._run

    def patched(launches, x):
        for launch in launches:
            if launch.name.startswith("conv_bwd") and launch.name != "conv_bwd_finalize":
                ran.append((launch.name, launch.bind(launch.interp_config).constexprs))
            run([launch], x)

    monkeypatch.setattr(triton_ops, "_run", patched)

    def use(cfg):
        monkeypatch.setattr(triton_ops, "_BWD_INTERP", cfg)
        return ran
    return use


def _args(n, c, co, groups, hw, k, p, d, s=(1, 1), dtype=torch.float32, layout=torch.channels_last,
          affine=True, seed=31):
    x, w, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k, dtype, seed=seed, layout=layout)
    go = torch.randn(n, co, *_out_hw(hw, k, p, d, s), generator=torch.Generator().manual_seed(seed + 1))
    go = go.to(DEVICE, dtype).contiguous(memory_format=layout)
    if not affine:
        bw = bb = None
    return [go, x, w, bw, bb, mean, invstd, list(s), list(p), list(d), groups, True]


def _merged_ran(ran, cfg):
    assert [name for name, _ in ran] == ["conv_bwd"], ran
    const = ran[0][1]
    assert const["DO_GA"] and const["DO_GW"], const
    assert const["num_warps"] == cfg.num_warps and const.get("maxnreg", 0) == cfg.get("MAXNREG"), const
    assert const["BLOCK_N"] <= cfg.get("BLOCK_N") and const["BLOCK_K"] <= cfg.get("BLOCK_K"), const


# (n, C, C_out, H x W, padding, dilation, stride)
CASES_1X1 = [
    (2, 40, 24, (9, 7), (0, 0), (1, 1), (1, 1)),     # partial input block (40 = 32 + 8) and output block
    (1, 72, 16, (6, 5), (0, 0), (1, 1), (1, 1)),     # three input blocks, the last partial
    (1, 48, 128, (7, 9), (0, 0), (1, 1), (1, 1)),    # all 128 output channels in one block
    (1, 40, 24, (9, 7), (1, 1), (1, 1), (1, 1)),     # padding 1 (outputs on the border see zeros)
    (1, 72, 16, (5, 6), (2, 2), (2, 2), (1, 1)),     # padding 2, dilation 2
    (2, 40, 24, (9, 7), (0, 0), (1, 1), (2, 2)),     # stride 2 (evenly strided positions)
    (1, 40, 24, (10, 7), (1, 1), (1, 1), (2, 2)),    # stride 2, padding 1
]


@pytest.mark.parametrize("cfg", range(2), ids=["8x16", "8x8"])
@pytest.mark.parametrize("case", CASES_1X1, ids=str)
def test_dense1x1_merged_fill_against_eager(case, cfg, merged_config):
    cfg = DENSE[cfg]
    ran = merged_config(cfg)
    n, c, co, hw, p, d, s = case
    _check(_args(n, c, co, 1, hw, (1, 1), p, d, s), torch.float32, f"case={case} cfg={cfg.label}")
    _merged_ran(ran, cfg)


@pytest.mark.parametrize("cfg", range(2), ids=["8x16", "8x8"])
def test_dense1x1_merged_fill_nchw_bf16(cfg, merged_config):
    """NCHW tensors (channel stride H*W), no BN affine, bfloat16, odd sizes."""
    cfg = DENSE[cfg]
    ran = merged_config(cfg)
    args = _args(1, 72, 24, 1, (7, 9), (1, 1), (0, 0), (1, 1), dtype=torch.bfloat16,
                 layout=torch.contiguous_format, affine=False, seed=33)
    _check(args, torch.bfloat16, f"nchw bf16 {cfg.label}")
    _merged_ran(ran, cfg)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
@pytest.mark.parametrize("where", ["x", "grad_out"])
def test_dense1x1_nan_reaches_eagers_positions(where, layout, merged_config):
    """A NaN in one input channel of ``x`` (its statistics too, so the whole channel) or in one
    ``grad_out`` element: NaN reaches exactly eager's positions in every output (the float64
    rule compares the NaN pattern)."""
    cfg = DENSE[0]
    ran = merged_config(cfg)
    args = _args(2, 40, 24, 1, (9, 7), (1, 1), (0, 0), (1, 1), layout=layout, seed=35)
    if where == "x":
        args[1][1, 5, 4, 6] = float("nan")
        args[5] = args[5].clone()
        args[5][5] = float("nan")
    else:
        args[0][0, 10, 3, 3] = float("nan")
    got = _check(args, torch.float32, f"NaN in {where}")
    _merged_ran(ran, cfg)
    gz, gw = got[0], got[1]
    if where == "x":
        assert torch.isnan(gw[:, 5]).all() and not torch.isnan(gw[:, :5]).any()
    else:
        assert torch.isnan(gw[10]).any() and not torch.isnan(gw[:10]).any()
        assert torch.isnan(gz[0, :, 3, 3]).any() and not torch.isnan(gz[1]).any()


@pytest.fixture
def strided_weight(monkeypatch):
    """The split weight-gradient launch run with ``STRIDED_W``; records every conv launch."""
    monkeypatch.setenv("RESFAST_TRITON_PLAN_CACHE", "0")
    ran = []
    run = triton_ops._run

    class _Only:
        def __init__(self, launch, cfg):
            self._launch, self.interp_config, self.name = launch, cfg, launch.name

        def run(self, cfg):
            self._launch.run(cfg)

    def patched(launches, x):
        for launch in launches:
            if launch.name == "conv_bwd_weight":
                ran.append((launch.name, launch.bind(STRIDED_W).constexprs))
                run([_Only(launch, STRIDED_W)], x)
            else:
                if launch.name.startswith("conv_bwd") and launch.name != "conv_bwd_finalize":
                    ran.append((launch.name, launch.bind(launch.interp_config).constexprs))
                run([launch], x)

    monkeypatch.setattr(triton_ops, "_run", patched)
    return ran


# (n, C, C_out, groups, H x W, padding, dilation) at stride 2, one 16-channel group per block
CASES_STRIDED = [
    (1, 32, 32, 2, (9, 7), (1, 1), (1, 1)),     # ResNeXt-50 stage 3's stride-2 block: 16-channel groups
    (2, 16, 16, 1, (10, 11), (0, 0), (1, 1)),   # one group, padding 0, odd width
    (1, 32, 32, 2, (11, 9), (2, 2), (2, 2)),    # padding 2, dilation 2
]


@pytest.mark.parametrize("case", CASES_STRIDED, ids=str)
def test_strided_split_against_eager(case, strided_weight):
    n, c, co, groups, hw, p, d = case
    _check(_args(n, c, co, groups, hw, (3, 3), p, d, (2, 2)), torch.float32, f"case={case}")
    names = [name for name, _ in strided_weight]
    assert names == ["conv_bwd_input", "conv_bwd_weight"], names
    const = strided_weight[1][1]
    assert const["DO_GW"] and not const["DO_GA"] and const["num_warps"] == STRIDED_W.num_warps


def test_strided_split_nchw_bf16_and_nan(strided_weight):
    """NCHW, no affine, bfloat16; then a NaN in one ``grad_out`` element and one input channel."""
    args = _args(1, 32, 32, 2, (9, 7), (1, 1), (1, 1), (2, 2), dtype=torch.bfloat16,
                 layout=torch.contiguous_format, affine=False, seed=37)
    _check(args, torch.bfloat16, "nchw bf16")
    args = _args(1, 32, 32, 2, (9, 7), (1, 1), (1, 1), (2, 2), seed=39)
    args[0][0, 20, 2, 1] = float("nan")  # output channel 20: group 1
    args[1][0, 3, 4, 4] = float("nan")  # input channel 3: group 0
    args[5] = args[5].clone()
    args[5][3] = float("nan")
    got = _check(args, torch.float32, "NaN")
    gw = got[1]
    assert torch.isnan(gw[20]).any() and torch.isnan(gw[:16, 3]).all()
    assert not torch.isnan(gw[16:20]).any() and not torch.isnan(gw[:16, :3]).any()


def test_planner_choices():
    """Which shapes split and which list the filling configs (the GPU's rules, no interpreter)."""
    assert triton_ops._strided_split(32, 16, 16, [2, 2], 3, 3)        # ResNeXt-50 stage 3's stride-2 block
    assert not triton_ops._strided_split(32, 8, 8, [2, 2], 3, 3)      # stage 2's: packed groups, merged
    assert not triton_ops._strided_split(32, 32, 32, [2, 2], 3, 3)    # stage 4's: split already
    assert not triton_ops._strided_split(32, 16, 16, [1, 1], 3, 3)    # stride 1: the packed input kernel
    assert not triton_ops._strided_split(1, 16, 16, [2, 2], 1, 1)     # a 1x1 conv
    for cfg in DENSE:
        assert triton_ops._merged_backward(1, 224, 128, 1, 1, cfg)   # DenseNet-121's 1x1 convs
