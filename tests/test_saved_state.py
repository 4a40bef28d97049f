"""State a backward depends on, changed between the forward and the backward.

Found by a review: a network run in eval mode with gradients (an input gradient, an
adversarial example), then a training-mode forward of the same modules (which updates the
running statistics in place), then the first graph's backward. The fused op's backward
recomputes ``relu(bn(x))``: it read the running statistics as they were at backward time,
so the triton backend returned a gradient 0.6 off (ReLU mask and scale both wrong), the
shared and checkpointed dense blocks 0.15 off, with no error. (Eager PyTorch itself is
off by 0.02 here: its eval batch norm saves the running statistics by reference and its
in-place update does not bump their version.)

Two rules, checked here on every backend:

* a forward that normalises with running statistics keeps a snapshot of them for its
  backward (grad mode only), so the backward is the gradient of the forward that ran;
* every op that writes a tensor in place (running statistics, ``out=``) bumps its autograd
  version counter, so a graph that saved the old value raises instead of reading the new one.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import resfast
from resfast.backends import backend_status
from resfast.functional import bn_relu_conv2d
from resfast.models.densenet import _recomputed_stem
from resfast.ops.opsets import get_ops
from reference import assert_rule


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # benchmarks/gpu_check.sh runs this file on a GPU


def _require(backend: str) -> None:
    why = backend_status(DEVICE)[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on {DEVICE} here: {why}")


def _dtype(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else torch.float64


# 2 x 8 x 2 x 5: two images, a masked edge in W, the same kernels as larger inputs; the bug's
# structure (an eval forward, a training forward that moves the running statistics, then the
# eval graph's backward) does not depend on the size.
def _x(seed: int, shape=(2, 8, 2, 5)) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5 + 0.3
            ).to(DEVICE)


def _eval_then_train_grad(model: nn.Module, x: torch.Tensor, x_train: torch.Tensor) -> torch.Tensor:
    """d sum(sin(model(x))) / dx with model in eval mode, after a training forward ran in between."""
    x = x.clone().requires_grad_(True)
    model.eval()
    y = model(x)
    model.train()
    model(x_train)  # updates the running statistics in place
    y.sin().sum().backward()
    return x.grad


def _true_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gradient of the same eval forward with nothing changed before its backward."""
    x = x.clone().requires_grad_(True)
    model.eval()
    model(x).sin().sum().backward()
    return x.grad


def _check(name: str, make, backend: str, shape=(2, 8, 2, 5)) -> None:
    """``make(dtype, backend)`` builds the module under test; its eager twin in float64 and in
    the backend's dtype are the references (the float64 rule)."""
    dtype = _dtype(backend)
    ours, ref64, same = (make(d, b).to(DEVICE) for d, b in ((dtype, backend), (torch.float64, "eager"),
                                                             (dtype, "eager")))
    for m in (ours, ref64, same):
        m.train()
        m(_x(5, shape).to(next(m.parameters()).dtype) * 2 + 1)  # running statistics away from (0, 1)
    x, x_train = _x(3, shape), _x(4, shape)
    want64 = _true_grad(copy.deepcopy(ref64), x)
    want_same = _true_grad(copy.deepcopy(same), x.to(dtype))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    got = _eval_then_train_grad(ours, x.to(dtype), x_train.to(dtype))
    changed = [k for k, v in ours.state_dict().items() if "running" in k and not torch.equal(v, before[k])]
    assert changed, "the training forward in between must have changed the running statistics"
    assert_rule(f"{name}: input gradient of the eval forward", got, want64, want_same)


def _seq():
    def make(dtype, backend):
        torch.manual_seed(1)
        m = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).to(dtype)
        with torch.no_grad():
            m[0].weight.uniform_(0.5, 1.5)
            m[0].bias.uniform_(-0.5, 0.5)
        if backend != "eager":
            resfast.convert(m, backend=backend)
        return m
    return make


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_fused_op_eval_backward_uses_the_forward_statistics(backend):
    _require(backend)
    _check(f"convert(backend={backend!r})", _seq(), backend)


@pytest.mark.parametrize("memory", ["shared", "checkpoint"])
@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
def test_dense_block_eval_backward_uses_the_forward_statistics(backend, memory):
    _require(backend)

    def make(dtype, backend):
        torch.manual_seed(1)
        return resfast.DenseBlock(num_layers=2, num_input_features=8, bn_size=2, growth_rate=4, memory=memory,
                                  backend=backend).to(dtype)

    _check(f"DenseBlock(memory={memory!r}, backend={backend!r})", make, backend)


class _Stem(nn.Module):
    """conv-BN-ReLU-maxpool: the shared DenseNet's recomputed stem, or (``eager``) the modules."""

    def __init__(self, recomputed: bool) -> None:
        super().__init__()
        self.recomputed = recomputed
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):
        if self.recomputed:
            return _recomputed_stem(self.conv, self.bn, self.pool, x)
        return self.pool(torch.relu(self.bn(self.conv(x))))


def test_densenet_stem_eval_backward_uses_the_forward_statistics():
    """The shared DenseNet's ImageNet stem checkpoints itself when its BN uses running
    statistics; the recomputation must normalise with the forward's statistics."""

    def make(dtype, backend):
        torch.manual_seed(1)
        return _Stem(recomputed=backend != "eager").to(dtype)

    # "native" only names the module under test here (the stem is plain PyTorch on every backend)
    _check("DenseNet stem", make, "native", shape=(2, 3, 16, 16))


@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
def test_mutating_ops_bump_versions(backend):
    """Running statistics and ``out=`` written by an op: their autograd versions move."""
    _require(backend)
    ops = get_ops(backend)
    dt, dev = torch.float32, DEVICE
    x = torch.randn(2, 4, 5, 5, dtype=dt, device=dev)
    rm, rv = torch.zeros(4, dtype=dt, device=dev), torch.ones(4, dtype=dt, device=dev)
    v0 = (rm._version, rv._version)
    mean, invstd = ops.bn_stats_update(x, rm, rv, 0.1, 1e-5)
    assert rm._version > v0[0] and rv._version > v0[1], "bn_stats_update must bump the running statistics' versions"
    w = torch.randn(4, 4, 3, 3, dtype=dt, device=dev)
    out = torch.empty(2, 4, 5, 5, dtype=dt, device=dev)
    v = out._version
    ops.bn_relu_conv2d_out(x, w, None, None, None, mean, invstd, [1, 1], [1, 1], [1, 1], 1, out)
    assert out._version > v, "bn_relu_conv2d_out must bump out's version"
    gz = torch.randn(2, 4, 5, 5, dtype=dt, device=dev)
    out2 = torch.zeros(2, 4, 5, 5, dtype=dt, device=dev)
    v = out2._version
    sums = torch.zeros(4, dtype=torch.float32, device=dev)
    ops.bn_backward_elemt_out(gz, x, None, mean, invstd, sums, sums, 0.0, True, out2)
    assert out2._version > v, "bn_backward_elemt_out must bump out's version"
    merge = getattr(ops, "bn_stats_merge_update", None)
    if merge is not None:
        _, stats = ops.bn_relu_conv2d_stats(x, w, None, None, None, mean, invstd, [1, 1], [1, 1], [1, 1], 1, True)
        v = (rm._version, rv._version)
        merge(stats, x.numel() // 4, rm, rv, 0.1, 1e-5)
        assert rm._version > v[0] and rv._version > v[1], "bn_stats_merge_update must bump the versions"


@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
def test_saved_alias_of_running_stats_raises(backend):
    """A graph that saved the running mean (here an eval ``F.batch_norm``'s own saved tensor is
    not checked by PyTorch, so a plain multiply saves it) sees the update and raises."""
    _require(backend)
    ops = get_ops(backend)
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    p = torch.randn(4, device=DEVICE, requires_grad=True)
    y = (p * rm).sum()  # saves rm for p's gradient
    ops.bn_stats_update(x, rm, rv, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_eval_inference_keeps_no_copies():
    """Under ``torch.no_grad`` the eval op normalises straight from the running statistics
    (no snapshot: nothing will read them later)."""
    from resfast.ops.bn_relu_conv2d import normalize_with

    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    with torch.no_grad():
        mean, _ = normalize_with(rm, rv, 1e-5, torch.float32)
    assert mean.data_ptr() == rm.data_ptr()
    mean, invstd = normalize_with(rm, rv, 1e-5, torch.float32)
    assert mean.data_ptr() != rm.data_ptr()
    rm.add_(1.0)
    assert not torch.equal(mean, rm), "the grad-mode snapshot must not follow later changes"
    torch.testing.assert_close(invstd, torch.rsqrt(rv + 1e-5))


def test_functional_eval_snapshot_matches_eager_reference():
    """The functional op with ``training=False``: change the running statistics after the
    forward; the backward is the gradient of the forward that ran (float64 rule)."""
    _require("native")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64).to(DEVICE)
    w = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64).to(DEVICE)
    rm = (torch.randn(4, generator=g, dtype=torch.float64) * 0.3).to(DEVICE)
    rv = (torch.rand(4, generator=g, dtype=torch.float64) + .5).to(DEVICE)
    want = None
    for backend in ("eager", "native"):
        xx = x.clone().requires_grad_(True)
        rmb, rvb = rm.clone(), rv.clone()
        y = bn_relu_conv2d(xx, w, bn_weight=None, bn_bias=None, running_mean=rmb, running_var=rvb, training=False, padding=1, backend=backend)
        if backend == "native":
            with torch.no_grad():
                rmb.add_(1.0)
                rvb.mul_(3.0)
        y.sin().sum().backward()
        if want is None:
            want = xx.grad
        else:
            assert_rule("native eval input gradient", xx.grad, want, want)
