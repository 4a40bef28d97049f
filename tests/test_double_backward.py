"""Double backward (``create_graph=True``): exact on every backend, or refused with a message.

Found by a new-user trial: a gradient penalty through the fused op returned a zero conv
weight gradient on native and triton, and whole-model parameter gradients were 100% off.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resfast
from resfast.backends import backend_status
from resfast.functional import bn_relu_conv2d
from resfast.ops.autograd import DOUBLE_BACKWARD_SYNC_BN
from resfast.ops.dense_block import DOUBLE_BACKWARD_SHARED
from reference import assert_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


def _require(backend: str, device: str = "cpu") -> None:
    why = backend_status(device)[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on {device}: {why}")


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 4, 5, 5, generator=g) * 1.2 + 0.3).to(dtype)
    w = (torch.randn(6, 2, 3, 3, generator=g) * 0.4).to(dtype)
    b = (torch.randn(6, generator=g) * 0.1).to(dtype)
    bw = (torch.rand(4, generator=g) + 0.5).to(dtype)
    bb = (torch.randn(4, generator=g) * 0.2).to(dtype)
    rm = (torch.randn(4, generator=g) * 0.1).to(dtype)
    rv = (torch.rand(4, generator=g) + 0.5).to(dtype)
    return [t.requires_grad_(True) for t in (x, w, b, bw, bb)], (rm, rv)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["eager", "native"])
def test_gradgradcheck_float64(backend, training):
    _require(backend)
    (x, w, b, bw, bb), (rm, rv) = _inputs()

    def f(x, w, b, bw, bb):
        return bn_relu_conv2d(x, w, b, bn_weight=bw, bn_bias=bb, running_mean=None if training else rm.clone(),
                              running_var=None if training else rv.clone(), training=training, stride=1, padding=1,
                              groups=2, backend=backend)

    assert torch.autograd.gradgradcheck(f, (x, w, b, bw, bb), eps=1e-6, atol=1e-5, rtol=1e-4)


def _penalty_grads(backend: str, dtype: torch.dtype, device: str, training: bool):
    """The new user's gradient penalty on ``BNReLUConv2d``: grads of ``|d sum(y^2) / dx|^2``."""
    torch.manual_seed(0)
    m = resfast.BNReLUConv2d(8, 8, 3, padding=1, groups=2, bias=True, backend=backend)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.normal_(0, 0.2)
    m = m.to(device=device, dtype=dtype).train(training)
    x = (torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1)) + 0.2).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    g, = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    return [x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gradient_penalty_matches_eager(backend, training):
    """The trial's reproduction: every gradient of a gradient penalty, against eager in float64
    by the float64 rule of docs/design.md (float32 on triton, which has no float64 kernels)."""
    _require(backend, DEVICE)
    dtype = torch.float32
    got = _penalty_grads(backend, dtype, DEVICE, training)
    ref64 = _penalty_grads("eager", torch.float64, "cpu", training)
    same = _penalty_grads("eager", dtype, DEVICE, training)
    names = ["x", "norm.weight", "norm.bias", "conv.weight", "conv.bias"]
    for name, a, r, s in zip(names, got, ref64, same):
        assert a is not None, f"{name}: no gradient"
        assert a.abs().sum() > 0 or r.abs().sum() == 0, f"{name}: gradient is silently zero"
        assert_rule(name, a, r, s, f"backend={backend} training={training}")


def test_wrn_gradient_penalty_native_matches_eager():
    """A gradient penalty on a whole model (wrn16_2) with the native backend."""
    _require("native")

    def grads(backend):
        torch.manual_seed(0)
        model = resfast.create_model("wrn16_2", num_classes=3, backend=backend).double()
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        g, = torch.autograd.grad(model(x).logsumexp(1).sum(), x, create_graph=True)
        (g.pow(2).sum()).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    got, ref = grads("native"), grads("eager")
    assert set(got) == set(ref)
    for n in ref:
        assert got[n] is not None, n
        torch.testing.assert_close(got[n], ref[n], rtol=1e-7, atol=1e-9, msg=n)


def _dense_block(memory: str, backend: str = "eager") -> resfast.DenseBlock:
    torch.manual_seed(0)
    return resfast.DenseBlock(3, 4, 2, 3, memory=memory, backend=backend).double()


@pytest.mark.parametrize("memory", ["naive", "checkpoint"])
def test_dense_block_gradient_penalty_matches_torchvision(memory):
    """Naive and checkpoint dense blocks give torchvision's (plain PyTorch) second-order gradients."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.densenet import _DenseBlock

    block = _dense_block(memory)
    ref = _DenseBlock(3, 4, 2, 3, drop_rate=0.0, memory_efficient=False).double()
    ref.load_state_dict(block.state_dict())

    def grads(m):
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        g, = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
        return [x.grad] + [p.grad for p in m.parameters()]

    for a, r in zip(grads(block), grads(ref)):
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-9)
    assert torchvision is not None


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_shared_dense_block_refuses_double_backward(backend):
    """The shared block's backward works in place on one gradient buffer: create_graph=True
    raises an error that says so and names the memory modes that support it."""
    _require(backend)
    block = _dense_block("shared", backend)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward .* shared dense block is not supported") as info:
        torch.autograd.grad(block(x).pow(2).sum(), x, create_graph=True)
    assert str(info.value) == DOUBLE_BACKWARD_SHARED
    assert "memory='naive'" in str(info.value)
    # A plain backward still works.
    block(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_sync_bn_double_backward_is_refused():
    """Over a SyncBN process group the statistics' cross-rank dependence is not differentiable
    here: double backward raises (checked without a second rank: the Function is the same)."""
    from resfast.ops import reference
    from resfast.ops.autograd import BNReLUConv2dFunction

    (x, w, b, bw, bb), _ = _inputs()
    mean, var = reference.bn_stats(x.detach())
    invstd = torch.rsqrt(var + EPS)
    y = BNReLUConv2dFunction.apply(reference, object(), 50, x, w, b, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 2,
                                   True)
    with pytest.raises(RuntimeError) as info:
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    assert str(info.value) == DOUBLE_BACKWARD_SYNC_BN


def test_eager_double_backward_is_pytorchs_own():
    """The eager backend without a process group runs the unfused PyTorch expression itself."""
    (x, w, b, bw, bb), (rm, rv) = _inputs()
    y = bn_relu_conv2d(x, w, b, bn_weight=bw, bn_bias=bb, running_mean=None, running_var=None, training=True,
                       padding=1, groups=2, backend="eager")
    ref = F.conv2d(F.relu(F.batch_norm(x, None, None, bw, bb, True, 0.1, EPS)), w, b, 1, 1, 1, 2)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_chained_resnext_block_gradient_penalty_matches_eager():
    """A gradient penalty through a ResNeXt bottleneck on triton, whose conv2 hands bn2 its
    statistics from the epilogue (bn_relu_conv2d_stats -> input_stats): every parameter gradient
    against eager in float64 by the rule, none silently zero."""
    _require("triton", DEVICE)
    from resfast.nn.blocks import ResNeXtBottleneck

    def grads(backend, dtype, device):
        torch.manual_seed(0)
        block = ResNeXtBottleneck(16, 4, 1, None, cardinality=2, base_width=32, backend=backend)
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
        block = block.to(device=device, dtype=dtype)
        x = (torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(1)) + 0.2).to(device=device, dtype=dtype)
        x.requires_grad_(True)
        g, = torch.autograd.grad(block(x).pow(2).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
        return [x.grad] + [p.grad for p in block.parameters()], [n for n, _ in block.named_parameters()]

    got, names = grads("triton", torch.float32, DEVICE)
    ref64, _ = grads("eager", torch.float64, "cpu")
    same, _ = grads("eager", torch.float32, "cpu")
    for name, a, r, s in zip(["x"] + names, got, ref64, same):
        assert a is not None, f"{name}: no gradient"
        assert a.abs().sum() > 0 or r.abs().sum() == 0, f"{name}: gradient is silently zero"
        assert_rule(name, a, r, s, "chained resnext, gradient penalty")
