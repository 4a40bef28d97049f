"""A tenth new-user trial: the model zoo end to end, ``backend="auto"`` and switching backends
mid-training, ``torch.compile`` of whole models, gradients used in less common ways, and the
command line.

What was tried and matched eager PyTorch by the float64 rule of tests/reference.py (no test
here): every family at a tiny size (WRN with and without dropout, pre-activation ResNet,
CIFAR ResNeXt, ResNet basic / bottleneck with ``zero_init_residual``, SE, dilation and a
``functools.partial`` norm layer, DenseNet with either stem, every memory mode, dropout and
compression) trained 3 steps with SGD momentum + weight decay on native against eager
(parameters, running statistics, momentum buffers, an eval output after); ``auto`` measuring
eager against native per call (the choices mixed, the RNG stream and the running statistics
as eager's); ``torch.compile`` (default and ``reduce-overhead`` on the CPU) of WRN, ResNeXt,
pre-activation ResNet and DenseNets on native over train / eval toggles (dynamo recompiles
when a block's backend changes); ``torch.autograd.grad`` of features captured by forward
hooks, ``retain_graph`` then a second loss, ``backward(inputs=...)`` and gradient penalties
(``create_graph=True``) through whole models against the unfused modules (the shared dense
block refuses, saying why); ``resfast models`` parameter and MAC counts against
``torch.utils.flop_counter`` and torchvision.

What failed, each a test here that failed before its fix:

* a BatchNorm running statistic with ``requires_grad=True`` (gradients "w.r.t. the running
  mean"): eager PyTorch refuses it ("native_batch_norm is not differentiable with respect to
  argument 'running_mean'"); the fused ops (native, triton, and every backend's shared dense
  block and DenseNet stem) returned a ``None`` gradient, read as zero, although in eval mode
  the output depends on it;
* ``model.backend = "native"`` on a zoo model (or on a ``DenseBlock`` in ``"naive"`` /
  ``"checkpoint"`` memory) changed nothing: every block kept the backend it was built with;
* ``resfast.convert`` a second time with another backend left every module on the first
  backend, and its report listed nothing;
* ``resfast memory --help`` cut its description off mid-sentence ("... (or of a").
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resfast
from resfast.models import create_model
from resfast.models.densenet import DenseNet
from resfast.models.resnext import CifarResNeXt
from resfast.models.wide_resnet import wide_resnet
from resfast.nn.dense import DenseBlock
from reference import assert_rule, judged_dtype, require_backend


class _OpNamespaces(TorchDispatchMode):
    """The op namespaces a forward dispatches to (``aten``, ``resfast``, ``resfast_triton``)."""

    def __init__(self):
        super().__init__()
        self.namespaces = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- running statistics and autograd

_MODELS = {
    "wrn": lambda backend: wide_resnet(10, 1, num_classes=3, backend=backend),
    "resnext": lambda backend: CifarResNeXt(11, 2, 4, 3, backend=backend),
    "densenet_shared": lambda backend: DenseNet(4, (2, 2), 8, 2, num_classes=3, backend=backend),
    "densenet_naive": lambda backend: DenseNet(4, (2, 2), 8, 2, num_classes=3, backend=backend, memory="naive"),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend,model", [("native", m) for m in _MODELS] + [("eager", "densenet_shared")])
def test_running_statistics_that_require_grad_are_refused_as_eager_refuses_them(backend, model, training):
    """Every fused BatchNorm of the model, its ``running_mean`` or ``running_var`` made to
    require grad: the forward raises as eager PyTorch's ``batch_norm`` does, before anything
    changes in that BatchNorm (it gave a ``None`` gradient instead: in eval mode a silent zero for a quantity the
    output depends on). Under ``no_grad`` it runs, as eager does."""
    require_backend(backend)
    dtype = judged_dtype(backend)
    torch.manual_seed(0)
    m = _MODELS[model](backend).to(dtype).train(training)
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    bns = [(n, b) for n, b in m.named_modules() if isinstance(b, nn.BatchNorm2d)]
    # the stem's (DenseNet: the compact stem), the first block's fused ones, and a late one
    picks = sorted({0, 1, 2, len(bns) - 2})
    for i in picks:
        name, bn = bns[i]
        for stat in ("running_mean", "running_var"):
            before = (bn.running_mean.clone(), bn.running_var.clone())
            getattr(bn, stat).requires_grad_(True)
            with pytest.raises(RuntimeError, match="not differentiable"):
                out = m(x)
                torch.autograd.grad(out.square().sum(), getattr(bn, stat), allow_unused=True)
            # (the modules before it ran, as in eager PyTorch; its own statistics did not move)
            assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1]), name
            with torch.no_grad():
                m(x)
            getattr(bn, stat).requires_grad_(False)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("block", ["WideBasic", "DenseBlock"])
def test_running_statistics_that_require_grad_are_refused_on_triton(block, training):
    """The same on triton (a block at a tiny size: the interpreter is slow)."""
    require_backend("triton")
    from resfast.nn.blocks import WideBasic

    torch.manual_seed(0)
    m = (WideBasic(4, 4, backend="triton") if block == "WideBasic"
         else DenseBlock(2, 4, 2, 4, backend="triton")).train(training)
    bn = next(b for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    bn.running_var.requires_grad_(True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(m(torch.randn(2, 4, 4, 4)).sum(), bn.running_var, allow_unused=True)


# ----------------------------------------------------------------------------- switching backends


@pytest.mark.parametrize("name", ["wrn16_2", "preact_resnet164", "resnext29_8x64d", "resnet50", "densenet121"])
def test_model_backend_assignment_reaches_every_block(name):
    """``model.backend = "native"`` on a zoo model sets every block's (and dense layer's)
    backend; it was a plain attribute read only while the blocks were built."""
    with torch.device("meta"):
        m = create_model(name, backend="eager")
    m.backend = "native"
    subs = {n: s.backend for n, s in m.named_modules() if isinstance(getattr(s, "backend", None), str)}
    assert len(subs) > 1 and set(subs.values()) == {"native"}, {n: b for n, b in subs.items() if b != "native"}
    assert copy.deepcopy(m).backend == "native"
    with pytest.raises(ValueError, match="backend must be one of"):
        m.backend = "cuda"


@pytest.mark.parametrize("memory", ["naive", "checkpoint"])
def test_dense_block_backend_assignment_runs_on_it_and_matches(memory):
    """A ``DenseBlock`` trained a step on eager, then ``block.backend = "native"`` and trained
    on: the second step runs native ops (in ``"naive"`` / ``"checkpoint"`` memory it stayed on
    eager: the layers kept their own backend; ``"shared"`` reads the block's) and matches the
    block kept on eager."""
    require_backend("native")
    torch.manual_seed(0)
    base = DenseBlock(2, 4, 2, 4, memory=memory, backend="eager").double()
    ref, got = copy.deepcopy(base), copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    for step, x in enumerate(xs):
        if step == 1:
            got.backend = "native"
        outs = []
        for m in (ref, got):
            with _OpNamespaces() as log:
                y = m(x)
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            outs.append((y, log.namespaces))
        assert ("resfast" in outs[1][1]) == (step == 1), (step, outs[1][1])
        assert_rule(f"step {step} output", outs[1][0], outs[0][0], outs[0][0], memory, dtype=torch.float64)
    for (k, a), (_, r) in zip(sorted(got.state_dict().items()), sorted(ref.state_dict().items())):
        if r.is_floating_point():
            assert_rule(k, a, r, r, memory, dtype=torch.float64)
        else:
            assert torch.equal(a, r), k
    for (k, a), (_, r) in zip(sorted(got.named_parameters()), sorted(ref.named_parameters())):
        assert_rule(f"grad {k}", a.grad, r.grad, r.grad, memory, dtype=torch.float64)


class _Own(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c1 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.c1(torch.relu(self.bn(self.c0(x))))


@pytest.mark.parametrize("case", ["torchvision_resnet", "torchvision_densenet", "own_module"])
def test_second_convert_with_another_backend_switches_and_says_so(case):
    """``resfast.convert(model, backend="eager")`` then ``convert(model, backend="native")``:
    every converted module (blocks, dense layers, transitions, a traced module of one's own)
    now runs on native, the report lists it, and the outputs still match the unconverted
    model. (The second call used to change nothing and report nothing.)"""
    require_backend("native")
    torch.manual_seed(0)
    model = {"torchvision_resnet": lambda: torchvision.models.resnet18(num_classes=3),
             "torchvision_densenet": lambda: torchvision.models.DenseNet(4, (2, 2), 8, 2, num_classes=3),
             "own_module": _Own}[case]().double()
    ref = copy.deepcopy(model)
    resfast.convert(model, backend="eager")
    report = resfast.convert(model, backend="native")
    assert report.converted and all("backend set to 'native'" in e.detail for e in report.converted), str(report)
    backends = {getattr(s, "backend", None) or s.__dict__.get("_resfast_backend") for s in model.modules()} - {None}
    assert backends == {"native"}, backends
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for training in (True, False):
        model.train(training)
        ref.train(training)
        with _OpNamespaces() as log:
            got = model(x)
        assert "resfast" in log.namespaces
        want = ref(x)
        assert_rule(f"output ({'train' if training else 'eval'})", got, want, want, case, dtype=torch.float64)
    again = resfast.convert(model, backend="native")
    assert not again.converted and not again.left_alone, str(again)


def test_second_convert_reports_a_dense_memory_mode_it_keeps():
    """A dense block converted with ``dense_memory="naive"``, then converted again asking for
    ``"shared"``: kept as it is, and the report says so (it said nothing)."""
    model = torchvision.models.DenseNet(4, (2, 2), 8, 2, num_classes=3)
    resfast.convert(model, backend="eager", dense_memory="naive")
    report = resfast.convert(model, backend="eager", dense_memory="shared")
    kept = [e.path for e in report.left_alone if "memory='naive'" in e.detail]
    assert kept == ["features.denseblock1", "features.denseblock2"], str(report)


# ----------------------------------------------------------------------------- the command line


def test_subcommand_help_descriptions_are_whole_sentences(capsys):
    """Each subcommand's ``--help`` description is its docstring's whole first paragraph
    (``resfast memory``'s stopped at "(or of a", the end of its first line)."""
    from resfast.cli import SUBCOMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in SUBCOMMANDS:
        if name not in sub.choices:
            continue
        desc = sub.choices[name].description
        assert desc.rstrip().endswith((".", ")", ":")) or desc.rstrip().endswith("."), (name, desc)
        assert desc.count("(") == desc.count(")"), (name, desc)
    assert "converted by resfast.convert" in sub.choices["memory"].description
