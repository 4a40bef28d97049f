"""The harness the triton backward-kernel tests share (tests/test_triton_bwd_*.py): seeded
inputs of a fused conv, its output size, and the check of every output of the triton
``bn_relu_conv2d_backward`` against the float64 rule of tests/reference.py."""
from __future__ import annotations

import pytest
import torch

from reference import assert_rule
from resfast.backends import backend_status
from resfast.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Why the triton backend cannot run here ("" when it can): the files' skip reason.
TRITON_WHY = backend_status(DEVICE)["triton"]


def inputs(n, c, co, groups, hw, k, dtype=torch.float32, seed=0, layout=torch.channels_last):
    """``(x, weight, bn_weight, bn_bias, mean, invstd)``: ``x`` shifted and scaled, the weight
    scaled by its fan-in, the BN statistics ``x``'s own."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, *hw, generator=g) * 1.3 + 0.4).to(dtype=dtype, device=DEVICE)
    x = x.contiguous(memory_format=layout)
    kh, kw = k
    w = (torch.randn(co, c // groups, kh, kw, generator=g) / (c // groups * kh * kw) ** 0.5).to(dtype=dtype,
                                                                                                  device=DEVICE)
    bw = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    bb = (torch.randn(c, generator=g) * 0.3).to(DEVICE)
    mean, var = reference.bn_stats(x)
    return x, w, bw, bb, mean, torch.rsqrt(var + 1e-5)


@pytest.fixture
def gpu_finalize_tile(monkeypatch):
    """The gradient finalize on the GPU's tile at 12 or fewer weight-gradient splits (512
    columns x 4 rows, ``triton_ops._finalize_tile``) instead of the interpreter's 16 x 8, for
    tests whose subject is another launch: a conv with C x C_out x 9 weight-gradient columns
    makes C x C_out x 9 / 16 finalize programs, most of the interpreter's time on 32 - 64
    channels (2026-12-01). The 16 x 8 tile still runs in the other backward tests, and
    tests/test_triton_bwd_weight_fill.py::test_gradient_finalize_tiles runs three more."""
    from resfast.ops import triton_ops

    monkeypatch.setattr(triton_ops, "FIN_TILES", (512, 4))


def out_hw(hw, k, p, d, s=(1, 1)):
    """The conv's output height and width."""
    return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def f64(t):
    return t.detach().to(device="cpu", dtype=torch.float64) if isinstance(t, torch.Tensor) else t


def check(args, dtype, context, judge=None):
    """The triton backward of ``args`` against the float64 and same-dtype references, every output,
    by the float64 rule (or ``judge(name, out, ref64, ref_same)``)."""
    from resfast.ops import triton_ops  # noqa: F401  (registers torch.ops.resfast_triton)

    got = torch.ops.resfast_triton.bn_relu_conv2d_backward(*args)
    ref64 = reference.bn_relu_conv2d_backward(*[f64(a) for a in args])
    ref_same = reference.bn_relu_conv2d_backward(*args)
    for i, (a, r64, rs) in enumerate(zip(got, ref64, ref_same)):
        if judge is None:
            assert_rule(f"bn_relu_conv2d_backward[{i}]", a, r64, rs, context, dtype=dtype)
        else:
            judge(f"bn_relu_conv2d_backward[{i}]", a, r64, rs)
    return got
