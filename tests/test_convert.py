"""resfast.convert: a model the user already has (torchvision, timm, their own) converted in
place, checked against the unconverted model in float64: logits, every parameter gradient,
every BN buffer after SGD steps with momentum (the optimizer built before the conversion),
``state_dict`` keys and tensors, and ``id()`` of every parameter."""
from __future__ import annotations

import collections
import copy
import io
import json
import pickle
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

import resfast
from resfast.backends import backend_status
from resfast.convert import ConversionReport, convert
from reference import assert_rule

tvm = pytest.importorskip("torchvision.models", reason="torchvision is needed for the torchvision conversions")

try:
    import timm
except ImportError:  # the dev extra installs it
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (pip install timm)")


# ----------------------------------------------------------------------------- helpers


def _randomise_bn(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BN affine parameters and running statistics (a fresh model has 1, 0, 0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _step(model, opt, x, g):
    """One SGD step on ``sum(out * gout)`` with ``gout`` drawn from ``g``; returns the
    logits and every parameter gradient."""
    opt.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return out.detach(), grads


def _compare(name, got, ref, context):
    """float64 against float64: the pass rule with the reference as its own same-dtype run."""
    assert_rule(name, got, ref, ref, context)


def check_conversion(ref: nn.Module, x: torch.Tensor, *, steps: int = 2, eval_too: bool = True, **convert_kwargs):
    """Convert a copy of ``ref`` with an SGD+momentum optimizer built before the call, then
    compare with ``ref`` over ``steps`` training steps (logits, every gradient, every
    parameter and buffer after each step) and one eval forward. Returns the report."""
    ref = ref.double()
    _randomise_bn(ref)
    model = copy.deepcopy(ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ids = [id(p) for p in model.parameters()]
    sd_before = model.state_dict()
    ptrs = {k: v.data_ptr() for k, v in sd_before.items()}
    report = convert(model, **convert_kwargs)
    assert report.converted, f"nothing converted: {report}"
    assert [id(p) for p in model.parameters()] == ids, "conversion replaced Parameter objects"
    sd_after = model.state_dict()
    assert list(sd_after) == list(sd_before), "state_dict keys changed"
    for k, v in sd_after.items():
        assert v.data_ptr() == ptrs[k] and torch.equal(v, sd_before[k]), f"state_dict tensor {k} changed"
    ctx = f"{type(ref).__name__}, {convert_kwargs}"
    for step in range(steps):
        out_ref, grads_ref = _step(ref, opt_ref, x, torch.Generator().manual_seed(step))
        out, grads = _step(model, opt, x, torch.Generator().manual_seed(step))
        _compare("logits", out, out_ref, f"{ctx}, step {step}")
        assert set(grads) == set(grads_ref), "different parameters received gradients"
        for n in grads_ref:
            _compare(f"grad {n}", grads[n], grads_ref[n], f"{ctx}, step {step}")
        for (n, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
            _compare(f"param {n}", p.detach(), p_ref.detach(), f"{ctx}, after step {step}")
        # A converted module may add non-persistent buffers (constants, not in the state_dict).
        buffers = dict(model.named_buffers())
        assert set(ref.state_dict()) == set(model.state_dict())
        for n, b_ref in ref.named_buffers():
            b = buffers[n]
            if b.is_floating_point():
                _compare(f"buffer {n}", b, b_ref, f"{ctx}, after step {step}")
            else:
                assert torch.equal(b, b_ref), f"buffer {n}: {b} != {b_ref}"
    if eval_too:
        model.eval()
        ref.eval()
        with torch.no_grad():
            _compare("eval logits", model(x), ref(x), ctx)
    return report, model


def _assert_converted_counts(report: ConversionReport, expected: dict, name: str) -> None:
    """``expected``: resfast class name -> how many modules the report says became one."""
    counts = collections.Counter(e.new.rsplit(".", 1)[1] for e in report.converted)
    for cls, n in expected.items():
        assert counts.get(cls) == n, f"{name}: expected {n} {cls}, report:\n{report}"


# ----------------------------------------------------------------------------- torchvision


# Input sizes: the ResNets run at 16x16 (1x1 from layer3 on; their converted blocks use the
# eager fused op, whose float64 results equal torchvision's bit for bit, so small BN batches
# are harmless and the float64 convs stay quick). DenseNet-121 runs at 64x64 so its
# last block sees 2x2 (8 values per channel at batch 2): at 1x1 (2 values) BatchNorm is
# ill-conditioned (variances below eps, each BN multiplies rounding by up to 1/sqrt(eps)) and
# the shared-buffer block's float64 rounding, amplified through 16 layers, reaches 1e-8.
@pytest.mark.slow
@pytest.mark.parametrize("name,size,expected", [
    ("resnet50", 16, {"Bottleneck": 16}),
    ("resnext50_32x4d", 16, {"ResNeXtBottleneck": 16}),
    ("wide_resnet50_2", 16, {"Bottleneck": 16}),
    ("densenet121", 64, {"DenseBlock": 4, "Transition": 3}),
])
def test_torchvision_models_match_after_sgd_step(name, size, expected):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    report, model = check_conversion(getattr(tvm, name)(num_classes=10), x, backend="eager", steps=1)
    _assert_converted_counts(report, expected, name)
    assert not report.left_alone, str(report)
    if name == "densenet121":
        assert report.fused == 2 * (6 + 12 + 24 + 16) + 3
        assert model.features.denseblock1.memory == "shared"


def test_torchvision_densenet_memory_modes_and_checkpointed_original():
    """dense_memory picks the blocks' memory mode; a memory_efficient=True original (whose
    checkpoint updates norm1's statistics twice) converts to once-per-step statistics,
    equal to the non-checkpointed original's."""
    kw = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5)
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    for memory in ("checkpoint", "naive"):
        torch.manual_seed(0)
        report, model = check_conversion(tvm.DenseNet(**kw), x, backend="eager", dense_memory=memory)
        assert {b.memory for b in model.modules() if isinstance(b, resfast.DenseBlock)} == {memory}
    torch.manual_seed(0)
    plain = tvm.DenseNet(**kw).double()
    _randomise_bn(plain)
    efficient = tvm.DenseNet(memory_efficient=True, **kw).double()
    efficient.load_state_dict(plain.state_dict())
    report = convert(efficient, backend="eager")
    assert "twice" in str(report)
    xr = x.clone().requires_grad_(True)
    out, out_ref = efficient(xr), plain(xr)
    out.sum().backward()
    out_ref.sum().backward()
    _compare("logits", out, out_ref, "memory_efficient original")
    buffers = dict(efficient.named_buffers())
    for n, b_ref in plain.named_buffers():
        if b_ref.is_floating_point():
            _compare(n, buffers[n], b_ref, "memory_efficient original")
        else:
            assert torch.equal(buffers[n], b_ref), n


def test_state_dict_loads_both_ways_and_optimizer_state_stays_valid():
    torch.manual_seed(0)
    tv = tvm.resnet18(num_classes=7)
    model = copy.deepcopy(tv)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state_before = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
    convert(model, backend="eager")
    assert isinstance(model.layer1[0], resfast.BasicBlock)
    model.load_state_dict(tv.state_dict(), strict=True)
    tv.load_state_dict(model.state_dict(), strict=True)
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], state_before[k])
    assert set(opt.state) == set(model.parameters())


def test_root_block_converts_in_place():
    """The model itself may be a recognised block: the same object becomes the resfast class."""
    blk = tvm.resnet.Bottleneck(8, 2, downsample=None).double()
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    ref = copy.deepcopy(blk)
    ident = id(blk)
    report = convert(blk, backend="eager")
    assert id(blk) == ident and isinstance(blk, resfast.Bottleneck)
    assert report.converted[0].path == "" and "(model)" in str(report)
    _compare("block output", blk(x), ref(x), "root block")


# ----------------------------------------------------------------------------- timm


@pytest.mark.slow
@needs_timm
@pytest.mark.parametrize("name,size,expected", [
    ("resnext50_32x4d", 16, {"ResNeXtBottleneck": 16}),
    ("seresnext26d_32x4d", 16, {"ResNeXtBottleneck": 8}),
    ("densenet121", 64, {"DenseBlock": 4, "Transition": 3}),
])
def test_timm_models_match_after_sgd_step(name, size, expected):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    ref = timm.create_model(name, pretrained=False, num_classes=10)
    report, model = check_conversion(ref, x, backend="eager", steps=1)
    _assert_converted_counts(report, expected, name)
    if name.startswith("se"):
        blk = model.layer1[0]
        assert blk.se is not None and type(blk.se).__module__.startswith("timm."), "the SE module was kept as is"
        assert "conv1" in {e.path for e in report.converted}, "the deep stem's BN-ReLU-conv pairs were not fused"
    assert not report.left_alone, str(report)


@needs_timm
def test_timm_block_with_other_activation_or_drop_path_is_reported():
    from timm.models.resnet import Bottleneck as TimmBottleneck
    blk = TimmBottleneck(16, 4, act_layer=nn.SiLU)
    report = convert(nn.Sequential(blk), backend="eager")
    assert type(blk) is TimmBottleneck
    assert any("SiLU" in e.detail for e in report.left_alone), str(report)


@needs_timm
def test_timm_modules_get_what_the_resfast_classes_read_without_new_state_dict_entries():
    """timm has no ReLU modules where torchvision has them (BatchNormAct2d applies it; its
    ResNet blocks name them act1..act3): the resfast classes' module-by-module path (hooks,
    FX tracing) finds plain, unregistered ReLUs; the module tree and state_dict are unchanged."""
    from timm.models.densenet import DenseNet as TimmDenseNet
    from timm.models.resnet import Bottleneck as TimmBottleneck

    torch.manual_seed(0)
    model = nn.Sequential(TimmDenseNet(growth_rate=4, block_config=(2, 2), bn_size=2,
                                       num_classes=3)).double()
    names, keys = [n for n, _ in model.named_modules()], list(model.state_dict())
    report = convert(model, backend="eager")
    assert [n for n, _ in model.named_modules()] == names and list(model.state_dict()) == keys, str(report)
    net = model[0]
    assert isinstance(net.features.transition1, resfast.Transition) and isinstance(net.features.transition1.relu,
                                                                                    nn.ReLU)
    assert isinstance(net.features.denseblock1.denselayer1.relu2, nn.ReLU)
    blk = TimmBottleneck(16, 4, attn_layer="se").double()
    _randomise_bn(blk)
    ref = copy.deepcopy(blk)
    convert(blk, backend="eager")
    assert isinstance(blk, resfast.Bottleneck) and isinstance(blk.relu, nn.ReLU) and "relu" not in blk._modules
    assert blk.se is blk._modules["se"] and "se" not in blk.__dict__, "timm's SE module must stay the one that runs"
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    _compare("SE bottleneck", blk(x), ref(x), "timm Bottleneck with SE")


# ----------------------------------------------------------------------------- models of one's own


def _bn_function_factory(norm, relu, conv):
    def bn_function(*inputs):
        concated_features = torch.cat(inputs, 1)
        return conv(relu(norm(concated_features)))

    return bn_function


class CifarDenseLayer(nn.Module):
    """A dense layer as in the common memory-efficient CIFAR DenseNet implementations:
    ``forward(*prev_features)``."""

    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate=0.0, efficient=False):
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(num_input_features))
        self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module("conv1", nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False))
        self.add_module("norm2", nn.BatchNorm2d(bn_size * growth_rate))
        self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module("conv2", nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False))
        self.drop_rate = drop_rate
        self.efficient = efficient

    def forward(self, *prev_features):
        bn_function = _bn_function_factory(self.norm1, self.relu1, self.conv1)
        if self.efficient and any(f.requires_grad for f in prev_features):
            bottleneck_output = cp.checkpoint(bn_function, *prev_features, use_reentrant=False)
        else:
            bottleneck_output = bn_function(*prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class CifarTransition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class CifarDenseBlock(nn.Module):
    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate=0.0, efficient=False):
        super().__init__()
        for i in range(num_layers):
            self.add_module("denselayer%d" % (i + 1), CifarDenseLayer(num_input_features + i * growth_rate,
                                                                     growth_rate, bn_size, drop_rate, efficient))

    def forward(self, init_features):
        features = [init_features]
        for name, layer in self.named_children():
            features.append(layer(*features))
        return torch.cat(features, 1)


class CifarDenseNet(nn.Module):
    def __init__(self, growth_rate=4, block_config=(3, 3), compression=0.5, num_init_features=8, bn_size=2,
                 num_classes=10, efficient=False):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, padding=1, bias=False))]))
        n = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module("denseblock%d" % (i + 1),
                                     CifarDenseBlock(num_layers, n, bn_size, growth_rate, efficient=efficient))
            n += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module("transition%d" % (i + 1), CifarTransition(n, int(n * compression)))
                n = int(n * compression)
        self.features.add_module("norm_final", nn.BatchNorm2d(n))
        self.classifier = nn.Linear(n, num_classes)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


def test_independent_cifar_densenet_converts_and_matches():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    report, model = check_conversion(CifarDenseNet(), x, backend="eager")
    blocks = [m for m in model.modules() if isinstance(m, resfast.DenseBlock)]
    assert len(blocks) == 2 and all(b.memory == "shared" for b in blocks), str(report)
    assert isinstance(model.features.transition1, resfast.Transition)
    assert report.fused == 2 * 6 + 1
    assert any("joined" in e.detail for e in report.converted), "block + transition were not joined"


def test_independent_densenet_with_checkpointing_is_left_alone_with_reason():
    """Its forward branches on requires_grad (checkpointing): it cannot be traced, so the
    blocks stay as they were and the report says why."""
    model = CifarDenseNet(efficient=True).double()
    ref = copy.deepcopy(model)
    report = convert(model, backend="eager")
    assert type(model.features.denseblock1) is CifarDenseBlock
    assert any(e.path == "features.denseblock1" and "traced" in e.detail for e in report.left_alone), str(report)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _compare("logits", model(x), ref(x), "checkpointed CIFAR DenseNet")


class PreActBlock(nn.Module):
    """Pre-activation block as in the common CIFAR implementations: the 1x1 shortcut (an
    nn.Sequential) reads the same relu(bn1(x)) as conv1."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class WideBlock(nn.Module):
    """Wide ResNet block as in the common CIFAR implementation (equalInOut, dropout)."""

    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False, groups=2)
        self.drop_rate = drop_rate
        self.equal = in_planes == out_planes
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return (x if self.equal else self.shortcut(x)) + out


class PreActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(PreActBlock(8, 8), PreActBlock(8, 12, stride=2), WideBlock(12, 12, 1),
                                    WideBlock(12, 16, 2), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 6, 1))
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.conv(x)), 1).flatten(1))


def test_preactivation_blocks_and_sequential_are_fused_and_match():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    report, model = check_conversion(PreActNet(), x, backend="eager")
    by_path = {e.path: e for e in report.converted}
    assert by_path["blocks.0"].fused == 2
    assert by_path["blocks.1"].fused == 3, "the Sequential shortcut reading relu(bn1(x)) was not fused"
    assert by_path["blocks.2"].fused == 2 and by_path["blocks.3"].fused == 3
    assert by_path["blocks"].fused == 1, "the nn.Sequential's BatchNorm2d -> ReLU -> Conv2d was not fused"
    assert isinstance(model.blocks[0], PreActBlock), "a traced block keeps its class"
    assert model.blocks[1:3][0] is model.blocks[1], "slicing a converted nn.Sequential still works"
    # A block with dropout between the ReLU and conv2: that pair stays eager, the rest is fused.
    torch.manual_seed(0)
    net = nn.Sequential(WideBlock(6, 8, 1, drop_rate=0.3)).double()
    convert(net, backend="eager")
    assert isinstance(net[0], WideBlock) and net[0].__dict__.get("_resfast_plan") is not None


def test_traced_modules_survive_deepcopy_and_pickle():
    torch.manual_seed(0)
    model = PreActNet().double().eval()
    convert(model, backend="eager")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.blocks[0]) is type(model.blocks[0])
        assert clone.blocks[0].__dict__.get("_resfast_plan") is not None
        _compare("copy", clone(x), want, "deepcopy / pickle")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    _compare("torch.load", torch.load(buf, weights_only=False)(x), want, "torch.save of the whole model")


def test_bn_without_running_stats_converts_exactly_in_train_and_eval():
    """track_running_stats=False: nn.BatchNorm2d normalises with the batch statistics in
    eval too; the fused op does the same, so this is converted (and matches)."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, track_running_stats=False), nn.ReLU(),
                        nn.Conv2d(6, 4, 3, padding=1, stride=2, dilation=2), nn.BatchNorm2d(4, affine=False),
                        nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1, groups=2, bias=True), nn.Flatten())
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    report, model = check_conversion(ref, x, backend="eager")
    assert report.converted[0].fused == 2 and not report.left_alone, str(report)
    model.eval()
    ref.eval()
    with torch.no_grad():
        _compare("eval", model(x), ref.double()(x), "track_running_stats=False in eval")


class CustomBlock(nn.Module):
    """Data-dependent control flow: cannot be traced."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(F.relu(self.bn(x)))
        return self.conv(F.relu(self.bn(-x)))


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv1(F.relu(self.bn(x))) + self.conv2(F.relu(self.bn(x * 2)))


def test_unconvertible_patterns_are_reported_not_mangled():
    torch.manual_seed(0)
    shared = nn.BatchNorm2d(4)
    hooked = nn.BatchNorm2d(4)
    hooked.register_forward_hook(lambda m, i, o: None)
    model = nn.ModuleDict({
        "elu": nn.Sequential(nn.BatchNorm2d(4), nn.ELU(), nn.Conv2d(4, 4, 1)),
        "custom": CustomBlock(),
        "shared_call": SharedBN(),
        "shared_a": nn.Sequential(shared, nn.ReLU(), nn.Conv2d(4, 4, 1)),
        "shared_b": nn.Sequential(shared, nn.ReLU(), nn.Conv2d(4, 4, 1)),
        "hooked": nn.Sequential(hooked, nn.ReLU(), nn.Conv2d(4, 4, 1)),
        "frozen": nn.Sequential(__import__("torchvision").ops.misc.FrozenBatchNorm2d(4), nn.ReLU(),
                                nn.Conv2d(4, 4, 1)),
        "relu_read_twice": nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(4), relu=nn.ReLU())),
    }).double()
    ref = copy.deepcopy(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    report = convert(model, backend="eager")
    assert not report.converted, str(report)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    reasons = {e.path: e.detail for e in report.left_alone}
    assert "ELU" in reasons["elu.0"]
    assert "cannot be traced" in reasons["custom"]
    assert "called 2 times" in reasons["shared_call.bn"]
    assert "2 places" in reasons["shared_a.0"]
    assert "hooks" in reasons["hooked.0"]
    assert "FrozenBatchNorm2d" in reasons["frozen.0"]
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for name in model:
        _compare(name, model[name](x), ref[name](x), "left alone")


def test_other_readers_of_the_relu_output_keep_it_eager():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            a = F.relu(self.bn(x))
            return self.conv(a) + a

    m = TwoReaders()
    report = convert(m, backend="eager")
    assert not report.converted and "also read by" in report.left_alone[0].detail


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # PyTorch's own, on the left-alone conv
@pytest.mark.parametrize("backend", ["eager", "native"])
def test_string_padding_converts_and_matches(backend):
    """``padding="valid"`` / ``"same"`` (odd kernels, dilation included) are zero paddings the
    fused op takes as numbers; ``"same"`` with an even kernel pads one side more: left alone,
    with the reason; so are reflect and circular padding."""
    if backend_status("cpu")[backend]:
        pytest.skip(f"backend {backend!r}: {backend_status('cpu')[backend]}")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding="same"),
        nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=2),
        nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3, padding="valid"),
        nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, (1, 5), padding="same"))
    report, _ = check_conversion(model, torch.randn(2, 4, 9, 9, dtype=torch.float64), backend=backend)
    assert report.converted[0].fused == 4 and not report.left_alone, str(report)

    left = nn.ModuleDict({
        "even": nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 2, padding="same")),
        "reflect": nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")),
    }).double()
    ref = copy.deepcopy(left)
    report = convert(left, backend=backend)
    reasons = {e.path: e.detail for e in report.left_alone}
    assert not report.converted, str(report)
    assert "pads one side more" in reasons["even.0"], str(report)
    assert "reflect" in reasons["reflect.0"], str(report)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for name in left:
        _compare(name, left[name](x), ref[name](x), "left alone")


def test_forward_arguments_with_defaults_fall_back_to_the_original_forward():
    class WithFlag(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x, scale=None):
            out = self.conv(F.relu(self.bn(x)))
            return out if scale is None else out * scale

    torch.manual_seed(0)
    m = WithFlag().double()
    ref = copy.deepcopy(m)
    assert convert(m, backend="eager").fused == 1
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    _compare("default", m(x), ref(x), "scale=None")
    _compare("other value", m(x, scale=3.0), ref(x, 3.0), "scale=3 (original forward)")


# ----------------------------------------------------------------------------- backends


def _backend_reason(name):
    reason = backend_status("cpu")[name]
    return pytest.mark.skipif(bool(reason), reason=reason or "runs")


@_backend_reason("native")
def test_native_backend_matches_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    check_conversion(tvm.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                  num_classes=5), x, backend="native")
    torch.manual_seed(0)
    check_conversion(tvm.ResNet(tvm.resnet.Bottleneck, [1, 1, 1, 1], num_classes=5, groups=4, width_per_group=4),
                     x, backend="native", steps=1)


@_backend_reason("triton")
def test_triton_backend_tiny_models_float32():
    """Under the Triton interpreter: a tiny DenseNet and a ResNeXt bottleneck in float32,
    judged by the float64 rule against the unconverted model."""
    cases = [
        (tvm.DenseNet(growth_rate=2, block_config=(2,), num_init_features=4, bn_size=2, num_classes=3),
         (2, 3, 12, 12)),
        (tvm.resnet.Bottleneck(8, 2, groups=2, base_width=64), (2, 8, 5, 5)),
    ]
    for i, (ref, shape) in enumerate(cases):
        torch.manual_seed(i)
        _randomise_bn(ref)
        ref64 = copy.deepcopy(ref).double()
        ref32 = copy.deepcopy(ref)
        model = copy.deepcopy(ref)
        report = convert(model, backend="triton")
        assert report.fused >= 2
        x = torch.randn(*shape)
        outs = []
        for m, dtype in ((ref64, torch.float64), (ref32, torch.float32), (model, torch.float32)):
            xx = x.to(dtype).requires_grad_(True)
            y = m(xx)
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), xx.grad, {n: p.grad for n, p in m.named_parameters()},
                         dict(m.named_buffers())))
        (y64, gx64, g64, b64), (y32, gx32, g32, b32), (y, gx, g, b) = outs
        ctx = f"triton case {i}"
        assert_rule("out", y, y64, y32, ctx)
        assert_rule("grad x", gx, gx64, gx32, ctx)
        for n in g64:
            assert_rule(f"grad {n}", g[n], g64[n], g32[n], ctx)
        for n in b64:
            if b64[n].is_floating_point():
                assert_rule(f"buffer {n}", b[n], b64[n], b32[n], ctx)


# ----------------------------------------------------------------------------- wrappers, compile, report


def test_compiled_model_is_refused_with_advice():
    model = torch.compile(tvm.resnet18())
    with pytest.raises(TypeError, match="before compiling"):
        convert(model)


def _compiled_training_step(model, size, backend="aot_eager"):
    """One SGD step of ``torch.compile(model, fullgraph=False)`` on the CPU against the same
    step of an uncompiled copy: loss, a gradient, the running statistics (float64: AOT
    autograd decomposes BatchNorm, whose rounding the small images' few values per channel
    amplify)."""
    model.double()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=False, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = compiled(x).square().mean()
    loss.backward()
    opt.step()
    loss_ref = ref(x).square().mean()
    loss_ref.backward()
    assert torch.isfinite(loss) and abs(loss.item() - loss_ref.item()) <= 1e-9 * max(1.0, abs(loss_ref.item()))
    name = "features.denseblock1.denselayer1.conv1.weight"
    g, g_ref = model.get_parameter(name).grad, ref.get_parameter(name).grad
    assert g is not None and (g - g_ref).abs().max() <= 1e-9 * max(1.0, g_ref.abs().max().item())
    rm, rm_ref = model.features.norm5.running_mean, ref.features.norm5.running_mean
    assert (rm - rm_ref).abs().max() <= 1e-9 * max(1.0, rm_ref.abs().max().item())


def test_compile_of_converted_torchvision_densenet_runs_a_training_step():
    """torch.compile(fullgraph=False) (Dynamo + AOT autograd) of a converted torchvision
    DenseNet (two blocks, shared memory, joined block + transition): one training step."""
    torch.manual_seed(0)
    model = tvm.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5)
    convert(model, backend="eager")
    _compiled_training_step(model, 32)


@pytest.mark.slow  # about 20 s on a 2-core CPU (Dynamo traces densenet121's 58 converted layers)
def test_compile_of_converted_densenet121_runs_a_training_step():
    """Dynamo over the whole converted densenet121 (every block shared, every transition
    joined): one training step. Dynamo's ``eager`` backend: AOT autograd over the whole model
    took about 3 minutes of the suite's 30-minute CI budget; it runs on the two-block DenseNet
    of the test above, whose blocks take the same paths."""
    torch.manual_seed(0)
    model = tvm.densenet121(num_classes=10)
    convert(model, backend="eager")
    _compiled_training_step(model, 64, backend="eager")


def test_ddp_wrapped_before_or_after_conversion(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        base = tvm.resnet18(num_classes=4).double()
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        want = copy.deepcopy(base)(x)
        after = DDP(copy.deepcopy(base))
        report = convert(after, backend="eager")
        assert report.converted[0].path.startswith("module.")
        assert isinstance(after.module.layer1[0], resfast.BasicBlock)
        before = copy.deepcopy(base)
        convert(before, backend="eager")
        before = DDP(before)
        for m in (after, before):
            out = m(x)
            _compare("ddp logits", out, want, "DDP")
            out.sum().backward()
    finally:
        if own:
            dist.destroy_process_group()


def test_report_table_and_dict():
    model = tvm.densenet121()
    model.features.add_module("extra", nn.Sequential(nn.BatchNorm2d(1024), nn.ELU(), nn.Conv2d(1024, 4, 1)))
    report = convert(model, backend="eager", dense_memory="checkpoint", recompute="bottleneck")
    text = str(report)
    assert text.splitlines()[0].startswith("resfast.convert: 7 modules converted (119 BN-ReLU-conv pairs fused), "
                                           "1 left alone")
    assert "features.denseblock1" in text and "resfast.DenseBlock" in text and "left alone" in text
    d = json.loads(json.dumps(report.as_dict()))
    assert d["options"] == {"backend": "eager", "dense_memory": "checkpoint", "recompute": "bottleneck"}
    assert d["left_alone"][0]["path"] == "features.extra.0" and "ELU" in d["left_alone"][0]["reason"]
    assert d["fused"] == report.fused == sum(e["fused"] for e in d["converted"])


def test_inplace_false_converts_a_copy():
    model = tvm.resnet18()
    report = convert(model, backend="eager", inplace=False)
    assert type(model.layer1[0]) is tvm.resnet.BasicBlock
    assert isinstance(report.model.layer1[0], resfast.BasicBlock) and report.model is not model


def test_second_conversion_and_resfast_models_change_nothing():
    model = tvm.densenet121()
    convert(model, backend="eager")
    again = convert(model, backend="eager")
    assert not again.converted and not again.left_alone
    own = resfast.create_model("densenet_bc100_k12", backend="eager")
    report = convert(own, backend="eager")
    assert not report.converted and not report.left_alone, str(report)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        convert("resnet18")
    with pytest.raises(ValueError, match="dense_memory"):
        convert(nn.Linear(1, 1), dense_memory="fast")
    with pytest.raises(ValueError, match="recompute"):
        convert(nn.Linear(1, 1), recompute="all")
    with pytest.raises(ValueError, match="backend"):
        convert(nn.Linear(1, 1), backend="cuda")


def test_package_attribute_is_callable_however_imported():
    import resfast.convert as module

    assert callable(resfast.convert) and callable(module)
    assert resfast.ConversionReport is ConversionReport
    assert module(nn.Sequential(nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1))).fused == 1


# ----------------------------------------------------------------------------- create_model / CLI


def test_create_model_from_torchvision_and_timm():
    from resfast.models import create_model, model_info

    model = create_model("torchvision:densenet121", num_classes=10, memory="naive", backend="eager")
    assert isinstance(model.features.denseblock1, resfast.DenseBlock)
    assert model.features.denseblock1.memory == "naive" and model.classifier.out_features == 10
    assert model_info("torchvision:resnet18").input_size == (3, 224, 224)
    if timm is not None:
        m = create_model("timm:resnext50_32x4d", num_classes=3, backend="eager")
        assert isinstance(m.layer1[0], resfast.ResNeXtBottleneck)


def test_create_model_errors(monkeypatch):
    from resfast.models import create_model

    with pytest.raises(ValueError, match="unknown torchvision model 'resnet19'"):
        create_model("torchvision:resnet19")
    with pytest.raises(ValueError, match="library"):
        create_model("keras:resnet50")
    with pytest.raises(ValueError, match="no pretrained"):
        create_model("torchvision:resnet18", weights="DEFAULT")
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm") as info:
        create_model("timm:resnet18")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_cli_train_and_memory_take_a_torchvision_model(tmp_path, capsys):
    from resfast.cli import main

    rc = main(["train", "--model", "torchvision:resnet18", "--epochs", "1", "--subset", "8", "--batch-size", "8",
               "--backend", "eager", "--no-progress", "--json", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert json.loads(out)["model"] == "torchvision:resnet18"
    rc = main(["memory", "--model", "torchvision:densenet121", "--batch-size", "2", "--image-size", "32",
               "--modes", "shared", "--backend", "eager", "--json", "--repeat", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(out)
    assert [r["mode"] for r in doc["results"]] == ["shared"] and doc["model"] == "torchvision:densenet121"
