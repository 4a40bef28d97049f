"""Launches per training call of ``resfast.functional.bn_relu_conv2d(..., backend="triton")``.

Counted by :class:`resfast.profiling.launches.LaunchCounter` (the counter ``resfast memory``
uses): every Triton kernel launch (a hook on the launch method of triton's kernel objects,
compiled or interpreted) and every aten op that does work (a ``TorchDispatchMode``; tensor
allocation and views are not work). The ``resfast_triton`` ops are opaque to a dispatch mode,
so their Python implementations run under the mode, which then sees the aten ops inside.

Target (issue 12): a training forward is at most 3 launches (statistics, their finalize with
the running-statistics update, the conv), a backward at most 4. The outputs are checked
against the float64 reference too, so the count is of a call that computed the right thing.
"""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

from resfast.backends import backend_status
from resfast.profiling.launches import LaunchCounter
from reference import assert_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY = backend_status(DEVICE)["triton"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

def _inputs(c, co, groups, k, seed=0):
    # 2 x 5 positions (two images, a masked edge in W): the same kernels and launches as larger
    # inputs, at a fraction of the interpreter's time
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, c, 2, 5, generator=g) * 1.2 + 0.3).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(co, c // groups, k, k, generator=g) / (c // groups * k * k) ** 0.5).to(DEVICE)
    bw = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    bb = (torch.randn(c, generator=g) * 0.3).to(DEVICE)
    return x, w, bw, bb


def _step(x, w, bw, bb, groups, k, backend, counter=None):
    from resfast.functional import bn_relu_conv2d

    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    bw = bw.detach().clone().requires_grad_(True)
    bb = bb.detach().clone().requires_grad_(True)
    rm = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
    rv = torch.ones(x.shape[1], device=x.device, dtype=x.dtype)
    go = torch.randn(x.shape[0], w.shape[0], x.shape[2], x.shape[3], generator=torch.Generator().manual_seed(5),
                     dtype=x.dtype).to(x.device)
    ctx = counter if counter is not None else contextlib.nullcontext()
    hook = counter.triton_hook() if counter is not None else contextlib.nullcontext()
    with hook:
        with ctx:
            y = bn_relu_conv2d(x, w, bn_weight=bw, bn_bias=bb, running_mean=rm, running_var=rv, training=True,
                               padding=k // 2, groups=groups, backend=backend)
        fwd = (collections.Counter(counter.aten), collections.Counter(counter.triton)) if counter else None
        if counter is not None:
            counter.aten.clear()
            counter.triton.clear()
        with ctx:
            y.backward(go)
    bwd = (counter.aten, counter.triton) if counter else None
    return (y.detach(), x.grad, w.grad, bw.grad, bb.grad, rm, rv), fwd, bwd


@pytest.mark.parametrize("case, expect_bwd", [
    # packed small groups at stride 1: the input gradient (its non-finite fix-up for the
    # block-diagonal MMAs inside it), the weight gradient, the gradient finalize, the BN input
    # gradient
    ((16, 16, 4, 3), 4),
    ((8, 40, 1, 3), 4),    # output channels wider than one tile: grad_a and grad_weight launched apart
    ((12, 8, 1, 1), 3),    # a 1x1 conv: conv backward, finalize, BN input gradient
], ids=["packed_3x3", "wide_3x3", "dense_1x1"])
def test_training_call_launches(case, expect_bwd):
    c, co, groups, k = case
    x, w, bw, bb = _inputs(c, co, groups, k)
    if DEVICE == "cuda":  # warm-up: compilation and tuning are not counted (the interpreter has neither)
        _step(x, w, bw, bb, groups, k, "triton")
    counter = LaunchCounter()
    got, fwd, bwd = _step(x, w, bw, bb, groups, k, "triton", counter)
    fwd_aten, fwd_triton = fwd
    bwd_aten, bwd_triton = bwd
    n_fwd = sum(fwd_aten.values()) + sum(fwd_triton.values())
    n_bwd = sum(bwd_aten.values()) + sum(bwd_triton.values())
    detail = f"forward aten {dict(fwd_aten)} triton {dict(fwd_triton)}; backward aten {dict(bwd_aten)} " \
             f"triton {dict(bwd_triton)}"
    assert n_fwd <= 3, detail
    assert n_bwd <= 4, detail
    assert not fwd_aten and not bwd_aten, detail
    assert (n_fwd, n_bwd) == (3, expect_bwd), detail

    # and the counted call computed the right thing (float64 rule)
    ref64, _, _ = _step(*(t.double().cpu() for t in (x, w, bw, bb)), groups, k, "eager")
    same, _, _ = _step(x, w, bw, bb, groups, k, "eager")
    names = ("out", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias", "running_mean", "running_var")
    for name, a, r64, rs in zip(names, got, ref64, same):
        assert_rule(name, a, r64, rs, f"case={case}")


def test_counter_sees_aten_compute():
    """The counter itself: an eager BN-ReLU-conv forward is several aten compute ops."""
    x, w, bw, bb = _inputs(8, 8, 2, 3)
    counter = LaunchCounter()
    with counter.triton_hook(), counter:
        torch.nn.functional.conv2d(torch.relu(torch.nn.functional.batch_norm(x, None, None, bw, bb, True)), w,
                                   padding=1, groups=2)
    assert sum(counter.aten.values()) >= 3 and not counter.triton, dict(counter.aten)
