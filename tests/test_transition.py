"""The pool-first transition: ``conv1x1(avgpool2x2(relu(bn(x))))`` in ``resfast.Transition`` and in
the shared dense block's tail, on every backend, against torchvision's ``_Transition`` (conv
first) by the float64 rule: output, every gradient, the running statistics."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import resfast
from resfast.backends import backend_status
from reference import assert_rule

tv_densenet = pytest.importorskip("torchvision.models.densenet")
BACKENDS = ("eager", "native", "triton")


def _require(backend: str) -> None:
    why = backend_status("cpu")[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on cpu: {why}")


def _dtype(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else torch.float64  # triton has no float64 kernels


def _step(module, x, go):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(go)
    buffers = [b.clone() for b in module.buffers() if b.is_floating_point()]
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()] + buffers


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)], ids=["even", "odd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_transition_matches_torchvision(backend, hw):
    _require(backend)
    dtype = _dtype(backend)
    torch.manual_seed(0)
    t = resfast.Transition(12, 6, backend=backend)
    ref = tv_densenet._Transition(12, 6)
    with torch.no_grad():
        t.norm.weight.uniform_(0.5, 1.5)
        t.norm.bias.normal_(0, 0.3)
    init = {k: v.clone() for k, v in t.state_dict().items()}
    ref.load_state_dict(init)
    assert t.state_dict().keys() == ref.state_dict().keys()  # pool_weight is not persistent
    x = torch.randn(3, 12, *hw) * 1.3 + 0.2
    go = torch.randn(3, 6, hw[0] // 2, hw[1] // 2)
    got = _step(t.to(dtype), x.to(dtype), go.to(dtype))
    ref64 = _step(ref.double(), x.double(), go.double())
    ref_same = tv_densenet._Transition(12, 6)
    ref_same.load_state_dict(init)
    same = _step(ref_same.to(dtype), x.to(dtype), go.to(dtype))
    names = ["y", "grad_x", "norm.weight", "norm.bias", "conv.weight", "running_mean", "running_var"]
    for name, a, r, s in zip(names, got, ref64, same):
        assert_rule(name, a, r, s, f"backend={backend} hw={hw}")


def test_transition_conv_does_a_quarter_of_the_multiply_adds():
    t = resfast.Transition(64, 32, backend="eager")
    ref = tv_densenet._Transition(64, 32)
    x = torch.randn(2, 64, 16, 16)

    def flops(m):
        with FlopCounterMode(display=False) as counter:
            m(x)
        return counter.get_total_flops()

    conv_flops = 2 * 2 * 32 * 64 * 16 * 16  # torchvision's 1x1 conv over every position
    assert flops(ref) == conv_flops
    # The 1x1 conv on a quarter of the positions, plus the 2x2 averaging (4 MACs per pooled value).
    assert flops(t) == conv_flops // 4 + 2 * 2 * 64 * 4 * 8 * 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_block_with_pool_first_tail_matches_torchvision(backend):
    _require(backend)
    dtype = _dtype(backend)
    torch.manual_seed(1)
    block = resfast.DenseBlock(3, 4, 2, 3, memory="shared", backend=backend)
    trans = resfast.Transition(13, 6, backend=backend)
    ref_block = tv_densenet._DenseBlock(3, 4, 2, 3, drop_rate=0.0)
    ref_trans = tv_densenet._Transition(13, 6)
    ref_block.load_state_dict(block.state_dict())
    ref_trans.load_state_dict(trans.state_dict())

    class Pair(torch.nn.Module):
        def __init__(self, b, t, fused):
            super().__init__()
            self.b, self.t, self.fused = b, t, fused

        def forward(self, x):
            return self.b.forward_with_transition(x, self.t) if self.fused else self.t(self.b(x))

    x = torch.randn(2, 4, 6, 6) + 0.3
    go = torch.randn(2, 6, 3, 3)
    init = Pair(ref_block, ref_trans, False).state_dict()
    got = _step(Pair(block, trans, True).to(dtype), x.to(dtype), go.to(dtype))
    ref64 = _step(Pair(ref_block, ref_trans, False).double(), x.double(), go.double())
    same_pair = Pair(tv_densenet._DenseBlock(3, 4, 2, 3, drop_rate=0.0), tv_densenet._Transition(13, 6), False)
    same_pair.load_state_dict(init)
    same = _step(same_pair.to(dtype), x.to(dtype), go.to(dtype))
    assert len(got) == len(ref64) == len(same)
    for i, (a, r, s) in enumerate(zip(got, ref64, same)):
        assert_rule(f"tensor {i}", a, r, s, f"backend={backend}")


def test_converted_densenet_buffers_are_torchvisions():
    """``named_buffers()`` of a converted torchvision DenseNet (and of ``Transition``) names what
    torchvision's does, each one in ``state_dict()``: the pooling weight was a non-persistent buffer,
    and FixMatch-pytorch's ``ModelEMA`` (every ``named_buffers()`` name looked up in
    ``state_dict()``) raised KeyError on it. That EMA update, run on both models for two steps,
    leaves the same EMA state (float64 rule)."""
    import copy

    kw = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)
    torch.manual_seed(0)
    ref = tv_densenet.DenseNet(**kw).double()
    conv = copy.deepcopy(ref)
    resfast.convert(conv, backend="eager")
    names = [n for n, _ in ref.named_buffers()]
    assert [n for n, _ in conv.named_buffers()] == names
    assert set(names) <= set(conv.state_dict())
    assert [n for n, _ in resfast.Transition(6, 3).named_buffers()] == \
        [n for n, _ in tv_densenet._Transition(6, 3).named_buffers()]

    def ema_run(model):  # FixMatch-pytorch's ModelEMA.update, after a training forward each step
        ema = copy.deepcopy(model).eval()
        param_keys = [k for k, _ in ema.named_parameters()]
        buffer_keys = [k for k, _ in ema.named_buffers()]
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            model.train()(torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64))
            with torch.no_grad():
                msd, esd = model.state_dict(), ema.state_dict()
                for k in param_keys:
                    esd[k].copy_(esd[k] * 0.9 + 0.1 * msd[k].detach())
                for k in buffer_keys:
                    esd[k].copy_(msd[k])
        return ema.state_dict()

    got, want = ema_run(conv), ema_run(ref)
    assert got.keys() == want.keys()
    for k in want:
        if want[k].is_floating_point():
            assert_rule(k, got[k], want[k], want[k], "ModelEMA")
        else:
            assert torch.equal(got[k], want[k]), k
