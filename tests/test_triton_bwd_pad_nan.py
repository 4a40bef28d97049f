"""The gradient finalize's NaN over the padded taps (``bn_relu_conv_bwd_finalize_kernel`` with
``PAD_NAN``): eager's ``grad_weight`` sums ``grad_out * a_padded`` over the zero padding too,
where ``0 * NaN`` and ``0 * inf`` are NaN; the weight-gradient kernels sum over the input
positions only, and the finalize restores eager's NaN pattern (tests/reference.py's float64
rule compares it). Shapes are the smallest that keep each geometry: two images, two groups,
taps two rows into the padding, a unit boundary inside the finalize's tile."""
from __future__ import annotations

import pytest
import torch

from bwd_harness import DEVICE, TRITON_WHY, check, f64, inputs, out_hw
from reference import assert_finite_rule
from resfast.ops import triton_ops

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN and inf, in the interpreter


@pytest.mark.skipif(bool(TRITON_WHY), reason=TRITON_WHY or "triton runs")
@pytest.mark.parametrize("hw,k,stride,padding,dilation,variant", [
    ((6, 7), (3, 3), (1, 1), (1, 1), (1, 1), None),         # stride 1 (a stacked / packed stride-1 weight kernel)
    ((7, 6), (3, 3), (2, 2), (1, 1), (1, 1), None),         # stride 2: the class path
    ((9, 8), (3, 3), (2, 1), (2, 2), (2, 1), None),         # bands of two rows, a dilation, mixed strides
    ((6, 6), (5, 5), (1, 1), (2, 1), (1, 1), None),         # 25 taps: the interpreter's tile widened to 32 columns
    ((8, 7), (3, 3), (3, 3), (2, 2), (1, 1), None),         # stride 3 over padding 2: taps two rows into the padding
    ((6, 7), (3, 3), (1, 1), (1, 1), (1, 1), (512, 4)),     # the GPU's tile: 56 units of 9 columns a program
    ((5, 6), (3, 3), (2, 2), (1, 1), (1, 1), "nchw_bf16"),  # NCHW grad_out strides, bfloat16 grad_weight
], ids=["s1", "s2", "s21_d2_p2", "k5", "s3_p2", "gpu_tile", "nchw_bf16"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nonfinite_grad_out_at_every_border_side(monkeypatch, hw, k, stride, padding, dilation, variant, value):
    """NaN (or +-inf) in ``grad_out`` at outputs on every side and corner of the border (each in
    its own output channel, alternating images), and one inside the image: every output against
    float64, NaN by the float64 rule (eager's NaN pattern exactly), inf by the finiteness rule
    (float64 eager's non-finite entries, NaN against inf not judged: ``grad_z`` mixes both).
    Eager in float32 on the CPU is itself finite at some padded taps (86 non-finite
    ``grad_weight`` entries where float64 has 144 on the stride-1 case): float64 is the truth."""
    dtype = torch.bfloat16 if variant == "nchw_bf16" else torch.float32
    if isinstance(variant, tuple):
        monkeypatch.setattr(triton_ops, "FIN_TILES", variant)  # the finalize tile
    n, c, co, groups = 2, 4, 16 if isinstance(variant, tuple) else 8, 2
    x, w, bw, bb, mean, invstd = inputs(n, c, co, groups, hw, k, dtype=dtype, seed=31)
    ho, wo = out_hw(hw, k, padding, dilation, stride)
    go = torch.randn(n, co, ho, wo, generator=torch.Generator().manual_seed(32))
    spots = [(0, 0), (0, wo - 1), (ho - 1, 0), (ho - 1, wo - 1), (0, wo // 2), (ho // 2, wo - 1), (ho - 1, 1),
             (ho // 2, wo // 2)]
    for ch, (oh, ow) in enumerate(spots):
        go[ch % n, ch, oh, ow] = float("nan") if value == "nan" else (-1) ** ch * float("inf")
    go = go.to(device=DEVICE, dtype=dtype)
    go = go.contiguous() if variant == "nchw_bf16" else go.contiguous(memory_format=torch.channels_last)
    args = (go, x, w, bw, bb, mean, invstd, list(stride), list(padding), list(dilation), groups, True)
    context = f"{value} in grad_out at the border, {hw} {k} s{stride} p{padding} d{dilation}"
    def finite_pattern(name, out, ref64, same):
        assert_finite_rule(name, out, ref64, same, dtype, context)
        # float64's pattern exactly (eager's float32 on the CPU is finite at some padded taps)
        assert torch.equal(torch.isfinite(f64(out)), torch.isfinite(ref64)), f"{name}: ({context})"

    gw = check(args, dtype, context, judge=None if value == "nan" else finite_pattern)[1]
    assert torch.isnan(gw[: len(spots)]).any(dim=(1, 2, 3)).all()  # every marked channel reached (not vacuous)
