"""Every BatchNorm2d / Conv2d option a user's model may carry, through ``resfast.convert`` on
each backend: two training steps (outputs, input and parameter gradients, running statistics,
``num_batches_tracked``) and an eval step, against the unconverted modules under the float64
rule (``tests/reference.py``).

Under the Triton interpreter (CPU) the triton cases take a smaller input, 2 x 8 x 5 x 4 instead
of 3 x 8 x 7 x 7: still two images (the batch statistics and the weight gradient's sum over
images), two tiles of 4 x 4 an image (4 tiles in all, 3 programs, the first walking two), the
second masked at the image's bottom edge, and the same tile shapes for the backward's kernels
(which fit their tiles to the image: 5 x 5 would take 2 x 8 tiles there, other kernel
specializations), at a third of the tiles."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import resfast
from resfast.backends import backend_status
from reference import assert_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

VARIANTS = {
    "momentum_none": (dict(padding=1), dict(momentum=None)),  # cumulative moving average
    "no_running_stats": (dict(padding=1), dict(track_running_stats=False)),
    "no_affine": (dict(padding=1), dict(affine=False)),
    "eps_0.1": (dict(padding=1), dict(eps=0.1)),
    "momentum_0.5": (dict(padding=1), dict(momentum=0.5)),
    "dilation_2": (dict(padding=2, dilation=2), {}),
    "stride_3_pad_0": (dict(padding=0, stride=3), {}),
    "kernel_5": (dict(padding=2, kernel_size=5), {}),
    "no_bias_groups_4": (dict(padding=1, groups=4, bias=False), {}),
}


# The conv-shape variants reach triton's kernels through test_triton_ops.py (dilation, stride,
# groups, kernel sizes); under the interpreter here only the BatchNorm-side ones and one conv
# variant run (each new shape costs the interpreter seconds).
TRITON_VARIANTS = ("momentum_none", "no_running_stats", "no_affine", "eps_0.1", "momentum_0.5", "dilation_2")


def _dtype(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else torch.float64


def _model(conv_kw: dict, bn_kw: dict) -> nn.Module:
    conv_kw = dict(conv_kw)
    k = conv_kw.pop("kernel_size", 3)
    torch.manual_seed(0)
    m = nn.Sequential(nn.BatchNorm2d(8, **bn_kw), nn.ReLU(), nn.Conv2d(8, 8, k, **conv_kw)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-1, 1)
        for b in m.buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)
    return m.to(DEVICE)


def _run(m: nn.Module, x0: torch.Tensor, training: bool):
    """Two steps in ``training`` mode (the second sees the running statistics and
    ``num_batches_tracked`` the first updated: ``momentum=None``'s cumulative average), one in
    eval mode (which changes no state, so a second eval step would repeat the first): the last
    output and the gradients of the steps summed."""
    m.train(training)
    x = x0.clone().requires_grad_(True)
    for _ in range(2 if training else 1):
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    return y, x.grad


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend,variant", [
    (b, v) for b in ("eager", "native", "triton") for v in VARIANTS
    if b != "triton" or DEVICE != "cpu" or v in TRITON_VARIANTS])
def test_bn_conv_options_match_eager(backend, variant, training):
    why = backend_status(DEVICE)[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on {DEVICE} here: {why}")
    dtype = _dtype(backend)
    ref64 = _model(*VARIANTS[variant])
    same = copy.deepcopy(ref64).to(dtype)
    ours = copy.deepcopy(ref64).to(dtype)
    report = resfast.convert(ours, backend=backend)
    assert report.converted and report.converted[0].fused == 1, str(report)
    # the interpreter's cost is its programs' work: the triton cases take a smaller input there
    shape = (2, 8, 5, 4) if backend == "triton" and DEVICE == "cpu" else (3, 8, 7, 7)
    x0 = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y64, gx64 = _run(ref64, x0, training)
    ys, gxs = _run(same, x0.to(dtype), training)
    y, gx = _run(ours, x0.to(dtype), training)
    ctx = f"{variant}, {backend}, {'train' if training else 'eval'}"
    assert_rule("output", y, y64, ys, ctx)
    assert_rule("input gradient", gx, gx64, gxs, ctx)
    for (n, p64), (_, ps), (_, p) in zip(ref64.named_parameters(), same.named_parameters(), ours.named_parameters()):
        assert_rule(f"grad {n}", p.grad, p64.grad, ps.grad, ctx)
    for (n, b64), (_, bs), (_, b) in zip(ref64.named_buffers(), same.named_buffers(), ours.named_buffers()):
        if b64.is_floating_point():
            assert_rule(n, b, b64, bs, ctx)
        else:
            assert torch.equal(b.cpu(), b64.cpu()), f"{n}: {b} != {b64} ({ctx})"
