"""The eager op set's optional ops and the eager shared dense block's bookkeeping.

* ``reference.bn_train_relu_conv2d`` and ``reference.bn_relu_conv2d_backward_full``
  (``resfast.ops.opset.OPTIONAL_OPS``) against the float64 reference with the rule, on dense
  tensors and on channel-prefix views, writing into and accumulating onto channel slices, in
  float32 (PyTorch's batch-norm ops) and bfloat16 (the composed path);
* the eager backward's channel chunks (a partition of the prefix, within the memory budget);
* ``bn_calls``: one launch counts every BatchNorm of a block, with the same decisions as
  ``bn_call`` (``momentum=None`` included);
* a second backward over the same graph (``retain_graph=True``) recomputes the bottlenecks the
  first one dropped, and gives the same gradients;
* launches of a DenseNet-121 training step on the eager backend: shared at most naive's.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import assert_rule
from resfast.ops import reference
from resfast.ops.opset import OPTIONAL_OPS
from resfast.ops.opsets import get_ops
from resfast.backends import backend_status


def _case(dtype, seed=0, prefix_view=False, n=2, c=6, co=5, hw=(5, 4)):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, c + 3, *hw, generator=g) * 1.4 + 0.5
    x = full[:, :c] if prefix_view else full[:, :c].contiguous()
    w = torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5
    gamma = torch.rand(c, generator=g) + 0.5
    beta = torch.randn(c, generator=g) * 0.3
    gy = torch.randn(n, co, *hw, generator=g)
    if dtype == torch.float64:  # a float64 model has float64 BatchNorm parameters
        gamma, beta = gamma.double(), beta.double()
    return x.to(dtype), w.to(dtype), gamma, beta, gy.to(dtype)


def _eager(x, w, gamma, beta, rm=None, rv=None, momentum=0.1, eps=1e-5):
    """The unfused expression in x's dtype (batch statistics)."""
    z = F.batch_norm(x, rm, rv, gamma.to(x.dtype) if x.dtype == torch.float64 else gamma,
                     beta.to(x.dtype) if x.dtype == torch.float64 else beta, True, momentum, eps)
    return F.conv2d(torch.relu(z), w, None, 1, 1)


def _grads(x, w, gamma, beta, gy, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, gamma, beta)]
    y = _eager(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, gy.to(dtype))]


EAGER_OPTIONAL = ("bn_train_relu_conv2d", "bn_relu_conv2d_backward_full")


# the eager optional ops a kernel op set has as well (a registered op of its own)
KERNEL_OPTIONAL = {"triton": ("bn_relu_conv2d_backward_full",), "native": ("bn_relu_conv2d_backward_full",)}
# ... and the training forward in one op (its own name: see resfast/ops/schemas.py)
KERNEL_TRAIN_OP = "bn_relu_conv2d_train"


def test_the_eager_op_set_has_its_optional_ops_and_kernel_op_sets_only_theirs():
    from resfast.ops.schemas import TRITON_OPTIONAL

    assert set(EAGER_OPTIONAL) <= set(OPTIONAL_OPS) and set(TRITON_OPTIONAL) <= set(OPTIONAL_OPS)
    for name in EAGER_OPTIONAL:
        assert callable(getattr(reference, name, None)), name
    for backend in ("triton", "native"):
        if backend_status("cpu")[backend]:
            continue
        ops = get_ops(backend)
        has = {name for name in EAGER_OPTIONAL if hasattr(ops, name)}
        assert has == set(KERNEL_OPTIONAL[backend]), backend
        assert hasattr(ops, KERNEL_TRAIN_OP), backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix_view", [False, True])
def test_bn_train_relu_conv2d_matches_float64(dtype, prefix_view):
    x, w, gamma, beta, _ = _case(dtype, prefix_view=prefix_view)
    rm, rv = torch.zeros(6), torch.ones(6)
    rm64, rv64 = rm.double(), rv.double()
    y, mean, invstd = reference.bn_train_relu_conv2d(x, w, None, gamma, beta, rm, rv, 0.1, 1e-5, [1, 1], [1, 1],
                                                     [1, 1], 1)
    ref64 = _eager(x.double(), w.double(), gamma.double(), beta.double(), rm64, rv64)
    ref_same = _eager(x, w, gamma, beta, torch.zeros(6), torch.ones(6))
    assert_rule("output", y, ref64, ref_same, f"{dtype}, prefix_view={prefix_view}", dtype=dtype)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert mean.dtype == torch.float32 and invstd.dtype == torch.float32
    assert_rule("mean", mean, mean64, mean64.float(), "", dtype=dtype)
    inv64 = (var64 + 1e-5).rsqrt()
    assert_rule("invstd", invstd, inv64, inv64.float(), "", dtype=dtype)
    assert_rule("running_mean", rm, rm64, rm64.float(), "", dtype=dtype)
    assert_rule("running_var", rv, rv64, rv64.float(), "", dtype=dtype)
    # out=: written into a channel slice of a larger buffer, None returned for y.
    buf = torch.full((2, 9, 5, 4), 7.0, dtype=dtype)
    got, _, _ = reference.bn_train_relu_conv2d(x, w, None, gamma, beta, torch.zeros(6), torch.ones(6), 0.1, 1e-5,
                                               [1, 1], [1, 1], [1, 1], 1, buf[:, 2:7])
    assert got is None
    assert torch.equal(buf[:, 2:7], y) and (buf[:, :2] == 7).all() and (buf[:, 7:] == 7).all()


@pytest.mark.parametrize("running", [False, True])
def test_bn_stats_update_of_bfloat16_keeps_float32_statistics(running):
    """Without running statistics PyTorch's fused statistics op returns them in the input's
    dtype; the eager op set takes them in float32 either way."""
    x, *_ = _case(torch.bfloat16, seed=3)
    rm, rv = (torch.zeros(6), torch.ones(6)) if running else (None, None)
    mean, invstd = reference.bn_stats_update(x, rm, rv, 0.1, 1e-5)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert mean.dtype == torch.float32 and invstd.dtype == torch.float32
    assert (mean.double() - mean64).abs().max().item() < 1e-5
    assert (invstd.double() - (var64 + 1e-5).rsqrt()).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("prefix_view", [False, True])
def test_backward_full_matches_float64(dtype, prefix_view):
    """The eager backward through the one entry point (``autograd.bn_relu_conv2d_backward``):
    float32/float64 take ``bn_relu_conv2d_backward_full``, float16/bfloat16 (for which the
    optional op returns None) compose the two ops."""
    from resfast.ops.autograd import bn_relu_conv2d_backward

    x, w, gamma, beta, gy = _case(dtype, seed=1, prefix_view=prefix_view)
    var, mean = torch.var_mean(x.to(reference.acc_dtype(x)), dim=(0, 2, 3), correction=0)
    invstd = (var + 1e-5).rsqrt()
    conv = ([1, 1], [1, 1], [1, 1], 1)
    count = x.numel() // x.shape[1]

    def backward(**kw):
        return bn_relu_conv2d_backward(reference, gy, x, w, gamma, beta, mean, invstd, conv, True, count, **kw)

    full = reference.bn_relu_conv2d_backward_full(gy, x, w, gamma, beta, mean, invstd, *conv, False)
    gx, gw, gb, ggamma, gbeta = backward()
    assert gb is None
    if dtype in (torch.float16, torch.bfloat16):
        assert full is None, "low precision composes the two ops (the accumulated gradient is rounded once)"
    else:
        assert full[2].numel() == 0
        for got, want in zip((full[0], full[1], full[3], full[4]), (gx, gw, ggamma, gbeta)):
            assert torch.equal(got.to(want.dtype), want)  # the entry point casts to the parameters' dtype
    ref64 = _grads(x, w, gamma, beta, gy, torch.float64)
    ref_same = _grads(x, w, gamma, beta, gy, dtype)
    ctx = f"{dtype}, prefix_view={prefix_view}"
    for name, got, i in (("grad_x", gx, 1), ("grad_weight", gw, 2), ("grad_gamma", ggamma, 3), ("grad_beta", gbeta, 4)):
        assert_rule(name, got, ref64[i], ref_same[i], ctx, dtype=dtype)
    # Into a channel slice of a gradient buffer, then accumulated onto it.
    gbuf = torch.full((2, 9, 5, 4), 0.25, dtype=dtype)
    out = backward(grad_x_out=gbuf[:, 1:7], accumulate=False)
    assert out[0] is None
    assert_rule("grad_x written", gbuf[:, 1:7], ref64[1], ref_same[1], ctx, dtype=dtype)
    assert (gbuf[:, :1] == 0.25).all() and (gbuf[:, 7:] == 0.25).all()
    backward(grad_x_out=gbuf[:, 1:7], accumulate=True)
    assert_rule("grad_x accumulated", gbuf[:, 1:7], 2 * ref64[1], 2 * ref_same[1], ctx, dtype=dtype)
    # Without the weight gradient: None for it, the rest unchanged.
    gx2, gw2, _, ggamma2, gbeta2 = backward(weight_grad=False)
    assert gw2 is None
    for got, want in ((gx2, gx), (ggamma2, ggamma), (gbeta2, gbeta)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("c, budget", [(5, 0), (7, 100), (224, 1024), (224, 256), (11, 14), (992, 1024), (1, 2)])
def test_eager_chunks_partition_the_prefix_within_the_budget(c, budget):
    from resfast.ops.dense_block import _TEMPS_PER_CALL, _chunks

    pieces = _chunks(c, budget)
    assert pieces[0][0] == 0 and pieces[-1][1] == c
    assert all(a < e for a, e in pieces) and all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
    if budget == 0 or _TEMPS_PER_CALL * c <= budget:
        assert pieces == [(0, c)]
    else:
        widest = max(e - a for a, e in pieces)
        assert _TEMPS_PER_CALL * widest <= budget + _TEMPS_PER_CALL, (pieces, budget)
        # the fewest pieces: one fewer would not fit
        assert _TEMPS_PER_CALL * -(-c // (len(pieces) - 1)) > budget if len(pieces) > 1 else True


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_calls_count_every_batchnorm_once_with_bn_calls_decisions(momentum):
    from resfast.nn.batchnorm import bn_call, bn_calls

    def make():
        bns = [torch.nn.BatchNorm2d(3, momentum=momentum) for _ in range(3)]
        bns[1].eval()
        bns[2].track_running_stats = False
        for bn in bns:
            bn.num_batches_tracked.fill_(4)
        return bns

    one, many = make(), make()
    expected = [bn_call(bn) for bn in one]
    got = bn_calls(many)
    assert [bn.num_batches_tracked.item() for bn in many] == [5, 4, 4]
    assert [bn.num_batches_tracked.item() for bn in one] == [5, 4, 4]
    for a, b in zip(expected, got):
        assert (a.batch_stats, a.momentum, a.eps) == (b.batch_stats, b.momentum, b.eps)
        assert (a.running_mean is None) == (b.running_mean is None)
    if momentum is None:
        assert got[0].momentum == pytest.approx(1 / 5)


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
def test_second_backward_over_the_graph_recomputes_the_dropped_bottlenecks(recompute):
    from resfast import DenseBlock

    torch.manual_seed(0)
    block = DenseBlock(3, 5, 2, 3, 0.0, memory="shared", recompute=recompute, backend="eager").double()
    x = (torch.randn(2, 5, 4, 5, dtype=torch.float64) + 0.2).requires_grad_()
    gy = torch.randn(2, 14, 4, 5, dtype=torch.float64)
    y = block(x)
    first = torch.autograd.grad(y, [x, *block.parameters()], gy, retain_graph=True)
    second = torch.autograd.grad(y, [x, *block.parameters()], gy)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_shared_densenet121_step_launches_at_most_naive():
    """One training step of densenet121 on the eager backend (batch 1, 64x64: the launch count
    does not depend on the image size): the shared block launches no more than naive."""
    import resfast
    from resfast.profiling.launches import count_launches

    counts = {}
    for memory in ("naive", "shared"):
        torch.manual_seed(0)
        model = resfast.create_model("densenet121", memory=memory, backend="eager")
        x = torch.randn(1, 3, 64, 64)

        def step():
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()

        step()
        model.zero_grad(set_to_none=True)
        counts[memory] = count_launches(step)["total"]
    assert counts["shared"] <= counts["naive"], counts


# ----------------------------------------------------------------------------- 1x1 convs as products


def _conv_case(dtype, bias, n=3, c=7, co=5, hw=(6, 5), seed=3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, c, *hw, generator=g).relu_()
    w = torch.randn(co, c, 1, 1, generator=g) / c ** 0.5
    b = torch.randn(co, generator=g) if bias else None
    # grad_out as a channel slice of a larger buffer (the shared block's gradient buffer)
    gbuf = torch.randn(n, co + 4, *hw, generator=g)
    return a.to(dtype), w.to(dtype), None if b is None else b.to(dtype), gbuf[:, 2:2 + co].to(dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_1x1_conv_as_matrix_products_matches_the_convolution(dtype, bias):
    """``reference.conv2d`` / ``conv2d_backward`` run a CPU 1x1 conv as batched matrix products
    (``bmm`` / ``addbmm``, no convolution op at all); forward and the three gradients against
    float64 with the rule (float32), exactly-as-accurate in float64."""
    from resfast.profiling.launches import LaunchCounter

    a, w, b, gy = _conv_case(dtype, bias)
    args = ([1, 1], [0, 0], [1, 1], 1)
    with LaunchCounter() as cnt:
        y = reference.conv2d(a, w, b, *args)
        ga, gw, gb = reference.conv2d_backward(gy, a, w, *args, [True, True, bias])
    assert "convolution" not in cnt.aten and "convolution_backward" not in cnt.aten, cnt.aten
    assert cnt.aten["bmm"] == 2 and cnt.aten["addbmm"] == 1, cnt.aten
    a64, w64, b64, gy64 = (None if t is None else t.double() for t in (a, w, b, gy))
    same = (F.conv2d(a, w, b), *torch.ops.aten.convolution_backward(
        gy, a, w, [w.shape[0]] if bias else None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, bias]))
    ref = (F.conv2d(a64, w64, b64), *torch.ops.aten.convolution_backward(
        gy64, a64, w64, [w.shape[0]] if bias else None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [True, True, bias]))
    for name, out, r64, r in zip(["y", "grad_a", "grad_w", "grad_b"], (y, ga, gw, gb), ref, same):
        if r is None:
            assert out is None, name
            continue
        assert out.shape == r.shape and out.dtype == r.dtype, name
        assert_rule(name, out, r64, r, str(dtype))


@pytest.mark.parametrize("variant", ["channels_last", "stride 2", "3x3", "groups", "bfloat16"])
def test_other_convs_keep_the_convolution_op(variant):
    """Only NCHW-contiguous float32/float64 1x1 stride-1 single-group convs take the products;
    the rest call PyTorch's convolution, with the same results."""
    from resfast.profiling.launches import LaunchCounter

    a, w, _, gy = _conv_case(torch.float32, False, c=8, co=4)
    args = [[1, 1], [0, 0], [1, 1], 1]
    if variant == "channels_last":
        a = a.contiguous(memory_format=torch.channels_last)
    elif variant == "stride 2":
        args[0] = [2, 2]
        gy = gy[:, :, ::2, ::2]
    elif variant == "3x3":
        w = torch.randn(4, 8, 3, 3)
        args[1] = [1, 1]
    elif variant == "groups":
        w = w[:, :4].contiguous()
        args[3] = 2
    else:
        a, w, gy = a.bfloat16(), w.bfloat16(), gy.bfloat16()
    with LaunchCounter() as cnt:
        y = reference.conv2d(a, w, None, *args)
        ga, gw, _ = reference.conv2d_backward(gy, a, w, *args, [True, True, False])
    assert cnt.aten["convolution"] == 1 and cnt.aten["convolution_backward"] == 1, cnt.aten
    assert "bmm" not in cnt.aten
    ref = torch.ops.aten.convolution_backward(gy, a, w, None, args[0], args[1], args[2], False, [0, 0], args[3],
                                              [True, True, False])
    torch.testing.assert_close(y, F.conv2d(a, w, None, *args))
    torch.testing.assert_close(ga, ref[0])
    torch.testing.assert_close(gw, ref[1])
