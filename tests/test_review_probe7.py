"""A seventh new-user trial, on the paths the tenth session added (the one-op training forward
``bn_relu_conv2d_train``, the one-op backward, the shared dense block's merged ops): through
the public API (the functional op, the modules, ``DenseBlock``) every output, gradient and
running statistic matched eager PyTorch by the float64 rule. What failed was calling the op
sets' forward ops directly, as a user of ``torch.ops.resfast_triton`` / ``torch.ops.resfast``
may: the ops without an autograd formula returned values that carry no gradient (the first
test once failed: ``x.grad`` and ``weight.grad`` stayed None, only PyTorch's generic warning
said so), a ``running_mean`` sharing memory with ``running_var`` was accepted, and an input
made under ``torch.inference_mode`` could not be trained where eager PyTorch trains it (the
last two tests once failed)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resfast.functional import bn_relu_conv2d
from resfast.ops import reference
from resfast.ops.schemas import UNTRACKED_FORWARD_OPS
from reference import assert_rule, judged_dtype, require_backend


def _ops(backend):
    from resfast.ops.opsets import get_ops

    return get_ops(backend)


def _case(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=dtype) * 1.3 + 0.2
    w = torch.randn(6, 2, 3, 3, generator=g, dtype=dtype) / 4
    gm = torch.rand(4, generator=g, dtype=dtype) + 0.5
    bt = torch.randn(4, generator=g, dtype=dtype) * 0.3
    return x, w, gm, bt


CONV = ([1, 1], [1, 1], [1, 1], 2)


def _args(name, x, w, gm, bt):
    """Arguments of the op ``name`` (the statistics are x's own batch statistics)."""
    mean = x.detach().mean((0, 2, 3))
    invstd = (x.detach().var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()
    out = torch.empty(2, 6, 5, 5, dtype=x.dtype)
    if name in ("bn_relu_conv2d_out", "bn_relu_conv2d_out_stats"):
        return (x, w, None, gm, bt, mean, invstd, *CONV, out)
    if name == "bn_relu_conv2d_train":
        return (x, w, None, gm, bt, torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype), 0.1, 1e-5, *CONV)
    assert name == "bn_relu_conv2d_merge_out", name
    partials = torch.zeros(3, 4, 1, dtype=torch.float32)
    return (x, partials, 50, None, None, 0.1, 1e-5, w, gm, bt, *CONV, out, None, None, None, 1e-5)


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("name", UNTRACKED_FORWARD_OPS)
def test_forward_ops_without_autograd_refuse_tensors_that_require_grad(backend, name):
    """Each forward op with no autograd formula (``out=`` forms, the one-op forwards), called
    directly while gradients are recorded with an argument that requires grad, raises a clear
    error instead of returning a result with no gradient; nothing it would write is written."""
    require_backend(backend)
    ops = _ops(backend)
    if not hasattr(ops, name) or (backend == "native" and name == "bn_relu_conv2d_train"):
        pytest.skip(f"{backend} has no {name} without autograd (native's bn_relu_conv2d_train is a differentiable "
                    f"C++ composite, tested below)")
    dt = judged_dtype(backend)
    x, w, gm, bt = _case(dt)
    x.requires_grad_()
    args = _args(name, x, w, gm, bt)
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(RuntimeError, match="no autograd formula"):
        getattr(ops, name)(*args)
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(b, a) or (b.isnan() == a.isnan()).all() for b, a in zip(before, after))


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_out_op_without_gradients_still_runs(backend):
    """Under ``torch.no_grad`` (how resfast's own autograd Functions call it) the ``out=`` op
    runs and equals the eager op set's result by the float64 rule."""
    require_backend(backend)
    ops = _ops(backend)
    dt = judged_dtype(backend)
    x, w, gm, bt = _case(dt)
    x.requires_grad_()
    args = _args("bn_relu_conv2d_out", x, w, gm, bt)
    with torch.no_grad():
        ops.bn_relu_conv2d_out(*args)
    out = args[-1]
    x64, w64, gm64, bt64 = _case(torch.float64)
    ref64 = _args("bn_relu_conv2d_out", x64, w64, gm64, bt64)
    reference.bn_relu_conv2d_out(*ref64)
    same = _args("bn_relu_conv2d_out", *_case(dt))
    reference.bn_relu_conv2d_out(*same)
    assert_rule("out", out, ref64[-1], same[-1], backend)


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_train_op_gradients_where_it_has_them(backend):
    """``bn_relu_conv2d_train`` called directly: native's (a C++ composite of differentiable
    ops) gives eager's gradients by the float64 rule; triton's refuses (above) and, under
    ``no_grad``, gives eager's output and running statistics."""
    require_backend(backend)
    op = _ops(backend).bn_relu_conv2d_train
    dt = judged_dtype(backend)

    def eager(x, w, gm, bt, rm, rv):
        z = F.batch_norm(x, rm, rv, gm, bt, training=True, momentum=0.1, eps=1e-5)
        return F.conv2d(F.relu(z), w, None, 1, 1, 1, 2)

    def run(fn, dtype, grad):
        x, w, gm, bt = (t.requires_grad_(grad) for t in _case(dtype))
        rm, rv = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
        with torch.set_grad_enabled(grad):
            y = fn(x, w, gm, bt, rm, rv)
            if grad:
                y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y))
        return [y.detach(), rm, rv] + ([x.grad, w.grad, gm.grad, bt.grad] if grad else [])

    grad = backend == "native"
    got = run(lambda x, w, gm, bt, rm, rv: op(x, w, None, gm, bt, rm, rv, 0.1, 1e-5, *CONV)[0], dt, grad)
    ref64 = run(eager, torch.float64, grad)
    same = run(eager, dt, grad)
    names = ["y", "running_mean", "running_var", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias"]
    for n, a, r, s in zip(names, got, ref64, same):
        assert a is not None, n
        assert_rule(n, a, r, s, backend)


@pytest.mark.parametrize("backend", ["eager", "triton", "native"])
@pytest.mark.parametrize("alias", ["same_tensor", "overlapping_views"])
def test_running_stats_sharing_memory_refused(backend, alias):
    """``running_mean`` and ``running_var`` that share memory: eager PyTorch's result depends on
    the order of its two updates (triton's running statistics differed from it by 0.15), so
    every backend refuses, before anything is written."""
    require_backend(backend)
    dt = judged_dtype(backend)
    x, w, gm, bt = _case(dt)
    if alias == "same_tensor":
        rm = rv = torch.ones(4, dtype=dt)
    else:
        buf = torch.ones(6, dtype=dt)
        rm, rv = buf[:4], buf[2:]
    before = (rm.clone(), rv.clone())
    with pytest.raises(ValueError, match="share memory"):
        bn_relu_conv2d(x, w, bn_weight=gm, bn_bias=bt, running_mean=rm, running_var=rv, training=True, padding=1,
                       groups=2, backend=backend)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("backend", ["eager", "triton", "native"])
def test_training_on_an_inference_mode_input(backend):
    """An ``x`` made under ``torch.inference_mode`` trained outside it with a frozen BatchNorm
    (only the conv weight needs a gradient): eager PyTorch trains it (it saves the ReLU output);
    triton and native once raised "Inference tensors cannot be saved for backward" (their
    autograd saves ``x``; it now saves a copy of such an ``x``). The weight gradient and the
    running statistics by the float64 rule."""
    require_backend(backend)
    dt = judged_dtype(backend)

    def run(fn, dtype):
        x, w, gm, bt = _case(dtype)
        with torch.inference_mode():
            xi = x.clone()
        w.requires_grad_()
        rm, rv = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
        y = fn(xi, w, gm, bt, rm, rv)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y))
        return y.detach(), w.grad, rm, rv

    def eager(x, w, gm, bt, rm, rv):
        return F.conv2d(F.relu(F.batch_norm(x, rm, rv, gm, bt, training=True)), w, None, 1, 1, 1, 2)

    got = run(lambda x, w, gm, bt, rm, rv: bn_relu_conv2d(x, w, bn_weight=gm, bn_bias=bt, running_mean=rm,
                                                         running_var=rv, training=True, padding=1, groups=2,
                                                         backend=backend), dt)
    ref64, same = run(eager, torch.float64), run(eager, dt)
    for n, a, r, s in zip(("y", "grad_weight", "running_mean", "running_var"), got, ref64, same):
        assert_rule(n, a, r, s, backend)
