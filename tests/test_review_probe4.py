"""A fourth new-user trial: numerics (a large common offset, exact zeros into the ReLU, NaN in a
conv weight), conv shapes no other file runs (non-square kernels, stride 3, 1x1 images, groups
whose input and output widths differ), BatchNorm options through the dense blocks,
torch.compile(fullgraph=True) / torch.export, and timm models trained with train/eval toggles
and frozen BatchNorm parameters. Each is judged against eager PyTorch by the float64 rule of
tests/reference.py; the first test once failed it."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resfast
from resfast.functional import bn_relu_conv2d
from module_judge import randomize_bns
from reference import assert_rule, judged_dtype as _dtype, require_backend as _require

BACKENDS = ("eager", "triton", "native")


def _inputs(n, c, h, w, co, kh, kw, groups=1, bias=False, seed=0, std=1.0, offset=0.0):
    """float64 ``(x, weight, bias, bn_weight, bn_bias, running_mean, running_var)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * std + offset
    wt = torch.randn(co, c // groups, kh, kw, generator=g, dtype=torch.float64) / math.sqrt(c // groups * kh * kw)
    b = torch.randn(co, generator=g, dtype=torch.float64) * 0.2 if bias else None
    gamma = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(c, generator=g, dtype=torch.float64) * 0.3
    rm = torch.randn(c, generator=g, dtype=torch.float64) * 0.2 * std + offset
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5) * std ** 2
    return [x, wt, b, gamma, beta, rm, rv]


_NAMES = ("x", "weight", "bias", "bn_weight", "bn_bias")


def _run(backend, dtype, inputs, training, **conv):
    """Output, gradients of every input and the running statistics of one call;
    ``backend=None``: the eager expression itself (F.batch_norm, F.relu, F.conv2d)."""
    x, w, b, g, bb, rm, rv = (None if t is None else t.detach().clone().to(dtype) for t in inputs)
    leaves = {k: t.requires_grad_(True) for k, t in zip(_NAMES, (x, w, b, g, bb)) if t is not None}
    if backend is None:
        y = F.conv2d(F.relu(F.batch_norm(x, rm, rv, g, bb, training, 0.1, 1e-5)), w, b, conv.get("stride", 1),
                     conv.get("padding", 0), conv.get("dilation", 1), conv.get("groups", 1))
    else:
        y = bn_relu_conv2d(x, w, b, bn_weight=g, bn_bias=bb, running_mean=rm, running_var=rv, training=training,
                           backend=backend, **conv)
    gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape).to(dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), gy)
    res = {"out": y.detach()}
    res.update({f"grad {k}": t for k, t in zip(leaves, grads)})
    if rm is not None:
        res.update(running_mean=rm, running_var=rv)
    return res


def _judge(backend, inputs, training, context, keys=None, **conv):
    """Every result of ``backend`` against the float64 eager reference by the rule."""
    dt = _dtype(backend)
    inputs = [None if t is None else t.to(dt).double() for t in inputs]  # what the kernel reads, exactly
    got = _run(backend, dt, inputs, training, **conv)
    ref64 = _run(None, torch.float64, inputs, training, **conv)
    same = _run(None, dt, inputs, training, **conv)
    assert got.keys() == ref64.keys()
    for k in keys or ref64:
        assert_rule(k, got[k], ref64[k], same[k], f"{backend} {context} training={training}")
    return got, ref64


# ------------------------------------------------------------------ finding: xhat by one FMA


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_weight_gradient_of_a_channel_far_from_zero(backend):
    """The triton backward took ``xhat = x * invstd + (-mean * invstd)`` by one FMA for the BN
    weight's gradient ``sum(grad_z * xhat)``: at mean 1e4, std 1 the two terms cancel and
    ``x * invstd``'s rounding (1e4 x float32's) is left, 80x the float64 rule in eval (28x at
    mean 1e3, std 1e-2; 2.6x at mean 300, std 1). It now subtracts first, as the reference.
    (The output and the conv weight's gradient are left out: at such offsets triton's
    activation ``relu(x * scale + shift)`` loses the same way, 2.4x and 1.8x the rule at
    mean 1e3, std 1e-2, not fixed here; nor is training, whose batch statistics lose more.)"""
    _require(backend)
    for offset, std in ((1e4, 1.0), (1e3, 1e-2)):
        inputs = _inputs(2, 5, 5, 5, 4, 3, 3, std=std, offset=offset, seed=1)
        _judge(backend, inputs, False, f"mean {offset:g} std {std:g}", keys=("grad bn_weight", "grad bn_bias",
                                                                          "grad x"), padding=1)


# ------------------------------------------------------------------ verified correct: conv shapes

_SHAPES = {
    # name: (n, c, h, w, co, kh, kw, groups, bias, conv kwargs)
    "1x3_pad_0_1": (2, 5, 4, 5, 3, 1, 3, 1, False, dict(padding=(0, 1))),
    "3x1_stride_2_1": (2, 5, 5, 4, 3, 3, 1, 1, True, dict(padding=(1, 0), stride=(2, 1))),
    "3x3_stride_3_pad_0": (2, 3, 7, 8, 5, 3, 3, 1, False, dict(stride=3)),
    "dilation_1_2_pad_2_0": (2, 4, 5, 6, 3, 3, 3, 1, False, dict(padding=(2, 0), dilation=(1, 2), stride=(1, 2))),
    "groups_cin3_cout5_bias": (2, 6, 4, 4, 10, 3, 3, 2, True, dict(padding=1, groups=2)),
    "1x1_image_3x3_pad_1": (3, 5, 1, 1, 4, 3, 3, 1, False, dict(padding=1)),
    "c17_bias_n1": (1, 17, 3, 4, 17, 3, 3, 1, True, dict(padding=1)),
}
_TRITON_SHAPES = ("1x3_pad_0_1", "3x1_stride_2_1", "groups_cin3_cout5_bias", "1x1_image_3x3_pad_1")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend,shape", [(b, s) for b in BACKENDS for s in _SHAPES
                                           if b != "triton" or s in _TRITON_SHAPES])
def test_conv_shapes_other_files_do_not_run(backend, shape, training):
    """Non-square kernels with per-axis padding / stride / dilation, stride 3 without padding,
    groups whose input and output widths differ, 1x1 images under a padded 3x3 kernel, 17
    channels at batch 1: output, every gradient and the running statistics."""
    _require(backend)
    n, c, h, w, co, kh, kw, groups, bias, conv = _SHAPES[shape]
    _judge(backend, _inputs(n, c, h, w, co, kh, kw, groups, bias, seed=2), training, shape, **conv)


# ------------------------------------------------------------------ verified correct: numerics


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_gradient_at_exact_zero_of_constant_channels(backend):
    """A dead (all-zero) and a constant channel with ``bn_bias`` 0 (its default) normalise to
    exact zeros in training; ``relu``'s gradient there is 0 (threshold_backward), so those
    channels' BN gradients are 0 as in eager: a kernel that computes the activation as ``x *
    scale + shift`` or masks with ``>= 0`` lets a gradient through."""
    _require(backend)
    inputs = _inputs(2, 5, 4, 4, 4, 3, 3, seed=3)
    inputs[0][:, 1] = 0.0
    inputs[0][:, 2] = 0.75
    inputs[4][1:3] = 0.0
    got, ref64 = _judge(backend, inputs, True, "constant channels", padding=1)
    assert ref64["grad bn_bias"][1:3].abs().max() == 0 and ref64["grad bn_bias"].abs().max() > 0.1
    assert got["grad bn_bias"][1:3].abs().max() == 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_the_conv_weight_reaches_outputs_whose_activations_are_zero(backend, training):
    """relu(bn(x)) is mostly 0 here (bn_bias -5), and 0 * NaN is NaN in eager's conv: a kernel
    that skipped zero activations would drop the NaN. The rule compares the NaN patterns."""
    _require(backend)
    inputs = _inputs(2, 5, 4, 4, 4, 3, 3, seed=4)
    inputs[1][1, 2, 1, 1] = float("nan")
    inputs[4][:] = -5.0
    got, _ = _judge(backend, inputs, training, "NaN weight", keys=("out",), padding=1)
    assert torch.isnan(got["out"][:, 1]).all() and not torch.isnan(got["out"][:, 0]).any()


# ------------------------------------------------------------------ verified correct: dense blocks


def _bn_variant(m: nn.Module, variant: str) -> nn.Module:
    """Every BatchNorm2d of ``m`` replaced by one built with ``variant``'s option."""
    kw = {"momentum_none": dict(momentum=None), "no_running_stats": dict(track_running_stats=False)}[variant]
    for mod in list(m.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                bn = nn.BatchNorm2d(child.num_features, **kw)
                with torch.no_grad():
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.normal_()
                setattr(mod, name, bn)
    return m


def _toggle_scenario(m: nn.Module, dtype):
    """train, train, eval, train: outputs, input gradients, parameter gradients and buffers by name."""
    out = []
    for step, mode in enumerate(("train", "train", "eval", "train")):
        m.train(mode == "train")
        x = torch.randn(2, 4, 5, 5, dtype=dtype, generator=torch.Generator().manual_seed(step)).requires_grad_(True)
        y = m(x)
        y.square().sum().backward()
        out += [y.detach(), x.grad]
    params = dict(m.named_parameters())
    return out + [params[k].grad for k in sorted(params)] + [v for _, v in sorted(m.state_dict().items())]


@pytest.mark.parametrize("memory", ["shared", "checkpoint", "naive"])
@pytest.mark.parametrize("variant", ["momentum_none", "no_running_stats"])
@pytest.mark.parametrize("backend", ("eager", "native"))
def test_dense_block_and_transition_with_batchnorm_options(backend, variant, memory):
    """A torchvision dense block and transition whose BatchNorms use ``momentum=None``
    (cumulative average, by ``num_batches_tracked``), ``track_running_stats=False`` (batch
    statistics in eval too), converted in each memory mode, through a
    train / eval toggle: everything as torchvision, ``num_batches_tracked`` exactly."""
    _require(backend)
    from torchvision.models.densenet import _DenseBlock, _Transition

    torch.manual_seed(0)
    tv = _bn_variant(nn.Sequential(_DenseBlock(2, 4, 2, 3, 0.0), _Transition(10, 5)), variant).double()
    ours = copy.deepcopy(tv)
    report = resfast.convert(ours, backend=backend, dense_memory=memory)
    assert report.fused == 5, str(report)
    got, ref = _toggle_scenario(ours, torch.float64), _toggle_scenario(tv, torch.float64)
    assert len(got) == len(ref)
    for i, (a, r) in enumerate(zip(got, ref)):
        if r.is_floating_point():
            assert_rule(f"tensor {i}", a, r, r, f"{backend} {variant} {memory}")
        else:
            assert torch.equal(a, r), f"num_batches_tracked {i}: {a} != {r}"


# ------------------------------------------------------------------ verified correct: compile, export


def _net(dtype):
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    net = nn.Sequential(BasicBlock(4, 4), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)))
    randomize_bns(net)
    return net.to(dtype)


@pytest.mark.parametrize("how", ["export", "eager", "aot_eager"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ("eager", "native"))
def test_compile_fullgraph_and_export_match_the_uncompiled_module(backend, training, how):
    """torch.export.export (then its module) and torch.compile(fullgraph=True) with the
    "eager" / "aot_eager" backends of a converted block + fused BN-ReLU-conv: output, input
    and parameter gradients and the buffers (num_batches_tracked exactly) as torchvision's."""
    _require(backend)
    tv = _net(torch.float64).train(training)
    ours = copy.deepcopy(tv)
    resfast.convert(ours, backend=backend)
    assert type(ours[0]).__module__.startswith("resfast")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    if how == "export":
        run = torch.export.export(ours, (x,)).module()
        buffers = run.state_dict
    else:
        torch._dynamo.reset()  # the recompile limit counts other tests' compiles of the same code in this worker
        run = torch.compile(ours, fullgraph=True, backend=how)
        buffers = ours.state_dict
    y, yr = run(xo), tv(xr)
    y.square().sum().backward()
    yr.square().sum().backward()
    ctx = f"{backend} {how} training={training}"
    assert_rule("output", y, yr, yr, ctx)
    assert_rule("input gradient", xo.grad, xr.grad, xr.grad, ctx)
    if how != "export":  # the exported module holds its own copies of the parameters
        params = dict(ours.named_parameters())
        for k, p in tv.named_parameters():
            assert_rule(f"grad {k}", params[k].grad, p.grad, p.grad, ctx)
    got = buffers()
    for k, r in tv.state_dict().items():
        if r.is_floating_point():
            assert_rule(k, got[k], r, r, ctx)
        else:
            assert torch.equal(got[k], r), f"{k}: {got[k]} != {r} ({ctx})"


# ------------------------------------------------------------------ verified correct: timm models


@pytest.mark.parametrize("backend", ("eager", "native"))
def test_timm_resnet_trained_through_train_eval_toggles_and_frozen_bn_parameters(backend):
    """timm's resnet10t (deep stem, avg-pool downsample), converted: three SGD steps (train,
    eval, then train with every BatchNorm's weight and bias frozen by
    ``requires_grad_(False)``), the state_dict keys unchanged. Outputs and every state_dict
    entry are judged by the rule with, in place of a float32 run, the reference re-run on an
    input 1e-15 off (40x40 gives the last stage 2x2 positions, off the 1x1 ill-conditioning
    that amplifies such a change to 4e-4 at 32x32)."""
    _require(backend)
    timm = pytest.importorskip("timm")

    def build():
        torch.manual_seed(0)
        m = timm.create_model("resnet10t", pretrained=False, num_classes=5).double()
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                with torch.no_grad():
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.normal_(0, 0.2)
        return m

    def scenario(m, x):
        outs = []
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for step, mode in enumerate(("train", "eval", "frozen")):
            if mode == "frozen":
                for bn in m.modules():
                    if isinstance(bn, nn.BatchNorm2d):
                        bn.weight.requires_grad_(False)
                        bn.bias.requires_grad_(False)
            m.train(mode != "eval")
            opt.zero_grad()
            y = m(x * (1 + 0.1 * step))
            y.square().mean().backward()
            opt.step()
            outs.append(y.detach())
        return outs + [v.clone() for v in m.state_dict().values()]

    ref, ours, perturbed = build(), build(), build()
    report = resfast.convert(ours, backend=backend)
    assert report.fused >= 4 and not report.left_alone, str(report)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    got, want, near = scenario(ours, x), scenario(ref, x), scenario(perturbed, x * (1 + 1e-15))
    for i, (a, r, s) in enumerate(zip(got, want, near)):
        if r.is_floating_point():
            assert_rule(f"tensor {i}", a, r, s, backend)
        else:
            assert torch.equal(a, r), f"tensor {i}"
