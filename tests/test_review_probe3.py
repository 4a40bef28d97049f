"""A third new-user trial: standard PyTorch machinery (forward-mode AD, torch.func transforms,
gradient accumulation, serialisation, AMP, the CLI, ...) pointed at resfast's ops, blocks and
converted models. Every case here once gave a plausible wrong number (or a misleading error)
on some backend, or is a behaviour no other test file checked; each is judged against eager
PyTorch / torchvision by the float64 rule of tests/reference.py."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import resfast
from resfast.backends import backend_status
from resfast.functional import bn_relu_conv2d
from reference import assert_rule

BACKENDS = ("eager", "triton", "native")


def _require(backend: str) -> None:
    why = backend_status("cpu")[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on cpu: {why}")


def _dtype(backend: str) -> torch.dtype:
    """The dtype a backend is judged in here: float64 where it runs it, else float32 (triton)."""
    return torch.float32 if backend == "triton" else torch.float64


def _fw_jvp(fn, primals, tangents):
    """``(out, tangent)`` of ``fn`` by torch.autograd.forward_ad (inputs that do not require grad)."""
    with fwAD.dual_level():
        o = fn(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        p, t = fwAD.unpack_dual(o)
        return p.detach().clone(), (torch.zeros_like(p) if t is None else t.detach().clone())


def _func_jvp(fn, primals, tangents):
    return torch.func.jvp(fn, tuple(primals), tuple(tangents))


JVPS = {"fwAD": _fw_jvp, "func.jvp": _func_jvp}


# ------------------------------------------------------------------ forward-mode AD, torch.func


def _op_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    gamma = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(3, generator=g, dtype=torch.float64)
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, gamma)]
    return [t.to(dtype) for t in (x, w, gamma)], [t.to(dtype) for t in tangents], beta.to(dtype)


def _op(backend, training, beta):
    def f(x, w, gamma):
        rm = torch.full((3,), 0.1, dtype=x.dtype)
        rv = torch.full((3,), 1.2, dtype=x.dtype)
        return bn_relu_conv2d(x, w, None, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv,
                              training=training, padding=1, backend=backend)
    return f


@pytest.mark.parametrize("how", sorted(JVPS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_through_the_fused_op_is_exact(backend, training, how):
    """jvp through the fused op: triton/native once returned a zero tangent (the registered
    ops have no forward-AD formula and dropped it) with the right primal."""
    _require(backend)
    dt = _dtype(backend)
    jvp = JVPS[how]
    primals, tangents, beta = _op_inputs(dt)
    out, tan = jvp(_op(backend, training, beta), primals, tangents)
    p64, t64, b64 = _op_inputs(torch.float64)
    ref64 = jvp(_op("eager", training, b64), p64, t64)
    ref_same = jvp(_op("eager", training, beta), primals, tangents)
    assert tan.abs().max() > 0.1
    assert_rule("primal", out, ref64[0], ref_same[0], f"{backend} {how}")
    assert_rule("tangent", tan, ref64[1], ref_same[1], f"{backend} {how}")


@pytest.mark.parametrize("backend", ("triton", "native"))
def test_torch_func_grad_and_jacrev_through_the_fused_op(backend):
    """torch.func.grad / jacrev / hessian through the fused op once raised PyTorch's generic
    'must override the setup_context staticmethod' error on triton and native."""
    _require(backend)
    dt = _dtype(backend)
    (x, w, gamma), _, beta = _op_inputs(dt)
    (x64, w64, g64), _, b64 = _op_inputs(torch.float64)

    def loss(backend, beta):
        return lambda x, w, gamma: _op(backend, True, beta)(x, w, gamma).square().sum()

    got = torch.func.grad(loss(backend, beta), argnums=(0, 1, 2))(x, w, gamma)
    ref64 = torch.func.grad(loss("eager", b64), argnums=(0, 1, 2))(x64, w64, g64)
    same = torch.func.grad(loss("eager", beta), argnums=(0, 1, 2))(x, w, gamma)
    for name, a, r, s in zip(("x", "weight", "bn_weight"), got, ref64, same):
        assert_rule(f"grad {name}", a, r, s, backend)
    xs = x[:, :, :2, :2].contiguous()
    jac = torch.func.jacrev(lambda x: _op(backend, True, beta)(x, w, gamma))(xs)
    jac_same = torch.func.jacrev(lambda x: _op("eager", True, beta)(x, w, gamma))(xs)
    jac64 = torch.func.jacrev(lambda x: _op("eager", True, b64)(x, w64, g64))(xs.double())
    assert_rule("jacrev", jac, jac64, jac_same, backend)


def _tv_blocks(dtype):
    from torchvision.models.densenet import _DenseBlock
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    blocks = {"basic": (BasicBlock(4, 4), (2, 4, 5, 5)), "dense": (_DenseBlock(2, 4, 2, 3, 0.0), (2, 4, 4, 4))}
    for m, _ in blocks.values():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                with torch.no_grad():
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.normal_()
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.5, 1.5)
        m.to(dtype)  # after the draws: every dtype gets the same values
    return blocks


@pytest.mark.parametrize("how", sorted(JVPS))
@pytest.mark.parametrize("mode", ["eval", "train", "eval_frozen"])
@pytest.mark.parametrize("block", ["basic", "dense"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_through_converted_blocks(backend, block, mode, how):
    """jvp of converted torchvision blocks (the dense one in memory='shared'): eval, training
    (torch.func.replace_all_batch_norm_modules_, as functorch asks) and eval with frozen
    parameters. Before: a zero or partial tangent on triton/native, and the shared dense block
    raised 'You must implement the jvp function' on every backend."""
    _require(backend)
    dt = _dtype(backend)
    tv, shape = _tv_blocks(dt)[block]
    tv64 = _tv_blocks(torch.float64)[block][0]
    for m in (tv, tv64):
        m.train(mode == "train")
        if mode == "train":
            torch.func.replace_all_batch_norm_modules_(m)
        m.requires_grad_(mode != "eval_frozen")
    ours = copy.deepcopy(tv)
    resfast.convert(ours, backend=backend, dense_memory="shared")
    assert any(type(m).__module__.startswith("resfast") for m in ours.modules())
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    t64 = torch.randn(shape, generator=g, dtype=torch.float64)
    x, t = x64.to(dt), t64.to(dt)
    jvp = JVPS[how]
    out, tan = jvp(ours, [x], [t])
    ref64 = jvp(tv64, [x64], [t64])
    same = jvp(tv, [x], [t])
    assert ref64[1].abs().max() > 0.1
    assert_rule("primal", out, ref64[0], same[0], f"{backend} {block} {mode} {how}")
    assert_rule("tangent", tan, ref64[1], same[1], f"{backend} {block} {mode} {how}")


@pytest.mark.parametrize("backend", ("eager", "native"))
def test_forward_mode_ad_through_a_shared_densenet_in_training(backend):
    """A resfast DenseNet (shared blocks, the compact ImageNet stem, the fused transition tail)
    in training under forward AD: the tangent, output and running statistics are
    torchvision's (before: the stem's and the block's Functions raised)."""
    _require(backend)
    from torchvision.models.densenet import DenseNet as TVDenseNet

    from resfast.models.densenet import DenseNet

    torch.manual_seed(0)
    kw = dict(growth_rate=2, block_config=(2, 2), num_init_features=4, bn_size=2, num_classes=3)
    tv = TVDenseNet(**kw).double()
    ours = DenseNet(**kw, backend=backend).double()
    ours.load_state_dict(tv.state_dict())
    x, t = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out, tan = _fw_jvp(ours, [x], [t])
    ref = _fw_jvp(tv, [x], [t])
    assert ref[1].abs().max() > 0.01
    torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(tan, ref[1], rtol=0, atol=1e-10)
    for (k, a), b in zip(ours.state_dict().items(), tv.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=k)


def test_shared_dense_block_function_refuses_forward_ad():
    """The op-level shared block (its autograd works in place) says what to use instead."""
    from resfast.nn.dense import DenseBlock
    from resfast.ops.dense_block import shared_dense_block

    block = DenseBlock(2, 4, 2, 3, backend="eager").double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="memory='naive'"):
            shared_dense_block(xd, block._layer_args(), backend="eager")


# ------------------------------------------------------------------ grad modes


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_forward_under_inference_mode(backend):
    """A training-mode forward under torch.inference_mode (running statistics move, as in
    eager) through a converted grouped bottleneck: the triton ResNeXt chain (conv2 -> bn2
    statistics in the epilogue) once raised 'Inference tensors do not track version counter'
    tagging the statistics it returns; outputs and running statistics are torchvision's."""
    _require(backend)
    from torchvision.models.resnet import Bottleneck

    dt = _dtype(backend)
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    tv = Bottleneck(4, 2, stride=2, downsample=ds, groups=2, base_width=64).to(dt).train()
    ours = copy.deepcopy(tv)
    resfast.convert(ours, backend=backend)
    assert type(ours).__module__.startswith("resfast")
    x = torch.randn(2, 4, 5, 5, dtype=dt)
    with torch.inference_mode():
        got = [ours(x), ours(x * 0.5 + 0.1)]
        ref = [tv(x), tv(x * 0.5 + 0.1)]
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    for (k, a), r in zip(ours.state_dict().items(), tv.state_dict().values()):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=k)
