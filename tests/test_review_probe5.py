"""A fifth new-user trial, mostly on the triton backend (the fourth covered eager and native):
BatchNorm options (``momentum=None``, ``track_running_stats=False``, ``affine=False``) through
the fused op and every block kind, torch.export / torch.compile(fullgraph=True) of a triton
module, a converted timm ResNeXt trained on triton, float64 running statistics beside a float32
input, and conv weights that are strided slices or channels_last. Results are judged against
eager PyTorch by the float64 rule of tests/reference.py; the first two tests and the last once
failed (a rejected call that moved the running statistics or num_batches_tracked, or a call eager
PyTorch refuses that the shared dense block ran)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resfast
from resfast.functional import bn_relu_conv2d
from resfast.nn.blocks import PreActBottleneck, ResNeXtBottleneck, WideBasic
from resfast.nn.dense import DenseBlock, DenseLayer, Transition
from reference import assert_rule, judged_dtype as _dtype, require_backend as _require
from module_judge import assert_unchanged as _assert_unchanged, judge_module as _judge_module, randomize_bn, \
    set_backend as _set_backend, state as _state, unfused as _unfused, with_bn_options as _with_bn_options

BACKENDS = ("eager", "triton", "native")


def _double_running_stats(m: nn.Module, only=None) -> nn.Module:
    """Every BatchNorm2d of ``m`` (or of ``only``) with its running statistics in float64, its
    parameters left as they are (``bn.running_mean = bn.running_mean.double()``)."""
    for bn in (only or m).modules():
        if isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None:
            bn.running_mean = bn.running_mean.double()
            bn.running_var = bn.running_var.double()
    return m


# ------------------------------------------------------------------ finding: float64 running statistics


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_dense_block_refuses_float64_running_statistics_of_a_float32_input(backend, training):
    """nn.BatchNorm2d (and so torchvision's dense block) refuses float64 running statistics
    beside a float32 input, and so does every fused resfast module, but the shared dense block
    ran it on eager and native (train and eval) and on triton in eval, and on triton in training
    raised from inside the kernel after every ``num_batches_tracked`` of the block had moved.
    It now refuses before anything changes, with the message of the fused op, on every backend,
    also for a transition's BatchNorm under forward_with_transition."""
    _require(backend)
    from torchvision.models.densenet import _DenseBlock

    tv = _double_running_stats(_DenseBlock(2, 4, 2, 2, 0.0)).train(training)
    with pytest.raises(RuntimeError, match="expected scalar type"):
        tv(torch.randn(2, 4, 4, 4))

    block = _set_backend(_double_running_stats(DenseBlock(2, 4, 2, 2, memory="shared")), backend).train(training)
    before = _state(block)
    with pytest.raises(TypeError, match="running_mean has dtype torch.float64 but x is torch.float32"):
        block(torch.randn(2, 4, 4, 4))
    _assert_unchanged(block, before, f"{backend} block")

    pair = nn.ModuleDict(dict(block=DenseBlock(2, 4, 2, 2, memory="shared"), trans=Transition(8, 3)))
    pair = _set_backend(pair, backend).train(training)
    _double_running_stats(pair, only=pair["trans"])
    before = _state(pair)
    with pytest.raises(TypeError, match="running_mean has dtype torch.float64 but x is torch.float32"):
        pair["block"].forward_with_transition(torch.randn(2, 4, 4, 4), pair["trans"])
    _assert_unchanged(pair, before, f"{backend} forward_with_transition")


# ------------------------------------------------------------------ finding: checkpointed layer bookkeeping


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointed_dense_layer_rejects_before_touching_running_statistics(backend):
    """DenseLayer(memory="checkpoint") did its BatchNorm bookkeeping (``num_batches_tracked``
    and the running statistics, from per-input statistics) before the fused op checked the
    call: float64 running statistics beside a float32 input, or a float64 input into a float32
    layer, raised TypeError with the statistics already moved. The call is now checked first."""
    _require(backend)
    layer = _set_backend(_double_running_stats(DenseLayer(4, 2, 2, memory="checkpoint")), backend).train()
    before = _state(layer)
    with pytest.raises(TypeError, match="running_mean has dtype torch.float64 but x is torch.float32"):
        layer([torch.randn(2, 2, 4, 4, requires_grad=True), torch.randn(2, 2, 4, 4)])
    _assert_unchanged(layer, before, f"{backend} float64 running statistics")

    layer = _set_backend(DenseLayer(4, 2, 2, memory="checkpoint"), backend).train()
    before = _state(layer)
    with pytest.raises(TypeError, match="weight dtype torch.float32 does not match x dtype torch.float64"):
        layer([torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)])
    _assert_unchanged(layer, before, f"{backend} float64 input")
    with pytest.raises(ValueError, match="spatial"):
        layer([torch.randn(2, 2, 4, 4, requires_grad=True), torch.randn(2, 2, 4, 5)])
    _assert_unchanged(layer, before, f"{backend} mismatched inputs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_modules_refuse_float64_running_statistics_before_anything_moves(backend):
    """The same running statistics through BNReLUConv2d, a ResNeXt bottleneck (the chained
    statistics path), a pre-activation bottleneck (the second reader of bn1) and a pool-first
    transition: a TypeError naming running_mean, raised before anything changed, as eager
    PyTorch refuses them (checked here for nn.BatchNorm2d)."""
    _require(backend)
    bn = _double_running_stats(nn.BatchNorm2d(4))
    with pytest.raises(RuntimeError, match="expected scalar type"):
        bn(torch.randn(2, 4, 4, 4))
    modules = {"BNReLUConv2d": resfast.BNReLUConv2d(4, 3, 3, padding=1, affine=False),
               "ResNeXtBottleneck": ResNeXtBottleneck(4, 1, cardinality=2, base_width=64),
               "PreActBottleneck": PreActBottleneck(4, 2), "Transition": Transition(4, 2)}
    for name, m in modules.items():
        for training in (True, False):
            m = _set_backend(_double_running_stats(m), backend).train(training)
            before = _state(m)
            with pytest.raises(TypeError, match="running_mean has dtype torch.float64 but x is torch.float32"):
                m(torch.randn(2, 4, 4, 4, requires_grad=True))
            _assert_unchanged(m, before, f"{backend} {name} training={training}")


# ------------------------------------------------------------------ verified correct: BatchNorm options on triton

def _resnext(offset):
    def build():
        torch.manual_seed(1)
        ds = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))
        return _with_bn_options(ResNeXtBottleneck(4, 2, downsample=ds, cardinality=2, base_width=64), offset)
    return build


def _dense_with_transition():
    torch.manual_seed(2)
    return _with_bn_options(nn.ModuleDict(dict(block=DenseBlock(2, 4, 2, 2, memory="shared"),
                                               trans=Transition(8, 3))))


def _block_then_transition(m, x):
    if any(bn._forward_hooks for bn in m.modules()):  # the unfused reference
        return m["trans"](m["block"](x))
    return m["block"].forward_with_transition(x, m["trans"])


_MODULES = {
    # name: (build, input shape, call)
    "BNReLUConv2d_momentum_none": (lambda: _with_bn_options(resfast.BNReLUConv2d(4, 3, 3, padding=1, bias=True), 0),
                                   (2, 4, 2, 7), None),
    "BNReLUConv2d_no_running_stats": (lambda: _with_bn_options(resfast.BNReLUConv2d(4, 3, 3, padding=1), 1),
                                      (2, 4, 2, 7), None),
    "BNReLUConv2d_no_affine": (lambda: _with_bn_options(resfast.BNReLUConv2d(4, 3, 3, stride=2), 2),
                               (2, 4, 3, 7), None),
    # bn2 (statistics taken in conv2's epilogue) momentum=None, then track_running_stats=False
    "ResNeXtBottleneck_bn2_momentum_none": (_resnext(2), (2, 4, 2, 7), None),
    "ResNeXtBottleneck_bn2_no_running_stats": (_resnext(0), (2, 4, 2, 7), None),
    "WideBasic_stride2": (lambda: _with_bn_options(WideBasic(4, 3, stride=2)), (2, 4, 2, 7), None),
    "PreActBottleneck": (lambda: _with_bn_options(PreActBottleneck(4, 2), 1), (2, 4, 2, 7), None),
    "DenseLayer_checkpoint": (lambda: _with_bn_options(DenseLayer(4, 2, 2, memory="checkpoint"), 1),
                              (2, 4, 2, 7), None),
    "Transition_pool_first_no_running_stats": (lambda: _with_bn_options(Transition(4, 3), 1), (2, 4, 6, 6), None),
    "DenseBlock_shared_forward_with_transition": (_dense_with_transition, (2, 4, 4, 4), _block_then_transition),
}


@pytest.mark.parametrize("name", list(_MODULES))
def test_batchnorm_options_through_fused_modules_on_triton(name):
    """momentum=None (cumulative average by num_batches_tracked), track_running_stats=False
    (batch statistics in eval too) and affine=False, mixed across the BatchNorms of each
    module, through train / eval / train on triton: outputs, input and parameter gradients,
    running statistics and num_batches_tracked (exactly) as the module run unfused (eager and
    native were probed the same way and agree).

    Inputs of 2 x 7 (3 x 7 for the unpadded stride-2 conv) where they were 5 x 5: the same
    kernel specializations (the backward's 2 x 8 tile, a masked last column; the forward's
    4 x 4 tile masked in rows and columns), a fifth to a quarter fewer programs. The transition (2 x 2 pool
    first) and the dense block keep their sizes: smaller ones change their tiles."""
    _require("triton")
    build, xshape, call = _MODULES[name]
    _judge_module(build, "triton", xshape, call or (lambda m, x: m(x)))


# ------------------------------------------------------------------ verified correct: compile, export on triton


def _compiled_net():
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))
    net = nn.Sequential(ResNeXtBottleneck(4, 2, downsample=ds, cardinality=2, base_width=64),
                        nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)))
    g = torch.Generator().manual_seed(3)
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            randomize_bn(bn, g)
    return net


@pytest.mark.parametrize("training,how", [(True, "export"), (False, "export"), (True, "aot_eager")],
                         ids=["train-export", "eval-export", "train-aot_eager"])
def test_compile_fullgraph_and_export_on_triton_match_the_uncompiled_module(training, how):
    """torch.export.export (then its module; train and eval) and torch.compile(fullgraph=True,
    backend="aot_eager"; train, eval probed the same) of a ResNeXt bottleneck (chained epilogue statistics) and a converted
    BN-ReLU-conv on triton: output, input gradient, parameter gradients (compile) and every
    buffer, num_batches_tracked exactly, as the uncompiled float64 module by the rule."""
    _require("triton")
    base = _compiled_net().train(training)
    ours = copy.deepcopy(base)
    resfast.convert(ours, backend="triton")
    _set_backend(ours, "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref64, same = _unfused(_set_backend(copy.deepcopy(base), "eager")).double(), \
            _unfused(_set_backend(copy.deepcopy(base), "eager"))
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(5))
    xo, xs, x64 = (x.clone().requires_grad_(True), x.clone().requires_grad_(True),
                   x.double().requires_grad_(True))
    if how == "export":
        run = torch.export.export(ours, (x,)).module()
        graph = {str(n.target) for n in run.graph.nodes}
        assert any("resfast_triton.bn_relu_conv2d" in t for t in graph), sorted(graph)
        buffers = run.state_dict
    else:
        torch._dynamo.reset()  # the recompile limit counts other tests' compiles of the same code in this worker
        run = torch.compile(ours, fullgraph=True, backend=how)
        buffers = ours.state_dict
    gy = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ys = [m(t) for m, t in ((run, xo), (same, xs), (ref64, x64))]
    for y in ys:
        (y * gy.to(y.dtype)).sum().backward()
    ctx = f"triton {how} training={training}"
    assert_rule("output", ys[0], ys[2], ys[1], ctx)
    assert_rule("input gradient", xo.grad, x64.grad, xs.grad, ctx)
    if how != "export":  # the exported module holds its own copies of the parameters
        params, p64 = dict(ours.named_parameters()), dict(ref64.named_parameters())
        for k, p in same.named_parameters():
            assert_rule(f"grad {k}", params[k].grad, p64[k].grad, p.grad, ctx)
    got, b64 = buffers(), ref64.state_dict()
    for k, r in same.state_dict().items():
        if r.is_floating_point():
            assert_rule(k, got[k], b64[k], r, ctx)
        else:
            assert torch.equal(got[k], r), f"{k}: {got[k]} != {r} ({ctx})"


# ------------------------------------------------------------------ verified correct: a timm model on triton


@pytest.mark.slow
def test_timm_resnext_trained_on_triton_and_its_state_dict_both_ways():
    """timm's ResNeXt (cardinality 2, one bottleneck per stage, narrow) converted to triton:
    a train and an eval SGD step: loss, output, every parameter's gradient at each step and
    every state_dict entry at the end by the rule against the unconverted model in float64
    (ref_same: unconverted in float32); then the converted model's state_dict loads into a
    fresh timm model and back into a fresh converted one, with the same outputs and buffers."""
    _require("triton")
    timm = pytest.importorskip("timm")

    def build(dtype):
        torch.manual_seed(0)
        m = timm.create_model("resnext50_32x4d", pretrained=False, num_classes=5, layers=(1, 1, 1, 1),
                              channels=(4, 4, 4, 4), cardinality=2, base_width=64, stem_width=8)
        g = torch.Generator().manual_seed(1)
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                randomize_bn(bn, g, bias_scale=0.2, running=False)
        return m.to(dtype)

    def scenario(m, x):
        out = []
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for step, mode in enumerate(("train", "eval")):
            m.train(mode == "train")
            opt.zero_grad()
            y = m(x * (1 + 0.1 * step))
            loss = y.square().mean()
            loss.backward()
            out += [(f"step {step} loss", loss.detach()), (f"step {step} output", y.detach())]
            out += [(f"step {step} grad {k}", p.grad.clone()) for k, p in m.named_parameters()]
            opt.step()
        return out + [(k, v.clone()) for k, v in m.state_dict().items()]

    ours = build(torch.float32)
    report = resfast.convert(ours, backend="triton")
    assert report.fused == 8 and not report.left_alone, str(report)
    assert list(ours.state_dict()) == list(build(torch.float32).state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    got, ref64, same = scenario(ours, x), scenario(build(torch.float64), x.double()), scenario(build(torch.float32), x)
    for (k, a), (_, r), (_, s) in zip(got, ref64, same):
        if r.is_floating_point():
            assert_rule(k, a, r, s, "timm resnext triton")
        else:
            assert torch.equal(a, r), f"{k}: {a} != {r}"

    fresh = build(torch.float32)
    fresh.load_state_dict(ours.state_dict())
    back = build(torch.float32)
    resfast.convert(back, backend="triton")
    back.load_state_dict(fresh.state_dict())
    for training in (False, True):
        ys, states = [], []
        for m in (ours, fresh) if training else (ours, fresh, back):
            m = copy.deepcopy(m).train(training)
            ys.append(m(x))
            states.append(m.state_dict())
        if not training:
            assert torch.equal(ys[2], ys[0]), "converted -> timm -> converted changed the output"
        # the converted model against the timm model that loaded its state_dict: one forward
        # each, within the rule's float32 atol (ref_same = the reference itself)
        ctx = f"converted vs timm after load_state_dict, training={training}"
        assert_rule("output", ys[0], ys[1], ys[1], ctx)
        for k, r in states[1].items():
            if r.is_floating_point():
                assert_rule(k, states[0][k], r, r, ctx)
            else:
                assert torch.equal(states[0][k], r), f"{k} ({ctx})"


# ------------------------------------------------------------------ verified correct: weight views and layouts

_WEIGHTS = {
    # name: (parameter shape, the view of it the op gets; channels_last parameter)
    "input_channels_stride_2": ((3, 8, 3, 3), lambda p: p[:, ::2], False),
    "spatial_crop_of_5x5": ((3, 4, 5, 5), lambda p: p[..., 1:4, :3], False),
    "output_channels_stride_2": ((6, 4, 3, 3), lambda p: p[::2], False),
    "channels_last": ((3, 4, 3, 3), lambda p: p, True),
    "kernel_transposed": ((3, 4, 3, 3), lambda p: p.transpose(2, 3), False),
    "expanded_kernel_column": ((3, 4, 3, 1), lambda p: p.expand(3, 4, 3, 3), False),
}


def _weight_run(backend, dtype, name, training, x64, p64, bn64):
    shape, view, channels_last = _WEIGHTS[name]
    p = p64.detach().clone().to(dtype)
    if channels_last:
        p = p.contiguous(memory_format=torch.channels_last)
    p.requires_grad_(True)
    x, gamma, beta = (t.detach().clone().to(dtype).requires_grad_(True) for t in (x64, *bn64[:2]))
    rm, rv = (t.detach().clone().to(dtype) for t in bn64[2:])
    w = view(p)
    if backend is None:
        y = F.conv2d(F.relu(F.batch_norm(x, rm, rv, gamma, beta, training, 0.1, 1e-5)), w, None, 1, 1)
    else:
        y = bn_relu_conv2d(x, w, None, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv,
                           training=training, padding=1, backend=backend)
    gy = torch.linspace(-1, 1, y.numel(), dtype=dtype).view(y.shape)
    grads = torch.autograd.grad(y, [x, p, gamma, beta], gy)
    return dict(zip(("output", "grad x", "grad parameter", "grad bn_weight", "grad bn_bias"), (y.detach(), *grads)),
                running_mean=rm, running_var=rv)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_weight_views_and_channels_last_weights(backend, training):
    """A conv weight that is a strided slice of a larger Parameter (every other input or
    output channel, a 3x3 crop of a 5x5 kernel), a transposed or expanded view, or a
    channels_last Parameter: output, every gradient (the Parameter's gradient through the
    view, so zeros where the view does not reach and sums where it repeats) and the running
    statistics, by the rule."""
    _require(backend)
    dtype = _dtype(backend)
    for name, (shape, _, _) in _WEIGHTS.items():
        g = torch.Generator().manual_seed(7)
        x = torch.randn(2, 4, 2, 7, generator=g, dtype=torch.float64)  # 5 x 5 before: the same kernels
        p = torch.randn(*shape, generator=g, dtype=torch.float64) / 6
        bn = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5, torch.randn(4, generator=g, dtype=torch.float64) * 0.3,
              torch.randn(4, generator=g, dtype=torch.float64) * 0.2, torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
        x, p, bn = x.to(dtype).double(), p.to(dtype).double(), [t.to(dtype).double() for t in bn]
        got = _weight_run(backend, dtype, name, training, x, p, bn)
        ref64 = _weight_run(None, torch.float64, name, training, x, p, bn)
        same = _weight_run(None, dtype, name, training, x, p, bn)
        for k in ref64:
            assert_rule(k, got[k], ref64[k], same[k], f"{backend} {name} training={training}")


# ------------------------------------------------------------------ finding: input_stats checked late


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_relu_conv_rejects_foreign_input_stats_before_num_batches_tracked_moves(backend):
    """resfast.nn.fused.bn_relu_conv checked ``input_stats`` only inside the op, after the
    BatchNorm's ``num_batches_tracked`` had moved: every rejected call (statistics of another
    tensor, a tensor of the wrong shape) advanced it, so a momentum=None BatchNorm then averaged
    with the wrong factor. input_stats is now checked before anything changes."""
    _require(backend)
    from resfast.nn.fused import bn_relu_conv

    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(4, momentum=None), nn.Conv2d(4, 3, 1, bias=False)
    x, other = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ref_bn = copy.deepcopy(bn)
    _, stats_of_other = bn_relu_conv2d(other, torch.randn(4, 4, 1, 1), bn_weight=None, bn_bias=None,
                                       running_mean=None, running_var=None, training=True, backend=backend,
                                       return_stats=True)
    for bad in (torch.zeros(3, 1, 4), torch.zeros(2, 2), stats_of_other):
        if bad is None:  # eager and native take no statistics in the epilogue
            continue
        with pytest.raises(ValueError, match="input_stats"):
            bn_relu_conv(bn, conv, x, backend, input_stats=bad)
        assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_mean, ref_bn.running_mean)
    # the counter the cumulative average divides by is right, so the next call averages as nn does
    y = bn_relu_conv(bn, conv, x, backend)
    assert bn.num_batches_tracked.item() == 1
    same_bn, same_conv = copy.deepcopy(ref_bn), copy.deepcopy(conv)
    bn64, conv64 = copy.deepcopy(ref_bn).double(), copy.deepcopy(conv).double()
    y_same, y64 = same_conv(F.relu(same_bn(x))), conv64(F.relu(bn64(x.double())))
    for name, got, r64, same in (("output", y, y64, y_same), ("running_mean", bn.running_mean, bn64.running_mean,
                                 same_bn.running_mean), ("running_var", bn.running_var, bn64.running_var,
                                                         same_bn.running_var)):
        assert_rule(name, got, r64, same, backend)
