"""Models: parameter counts against closed forms and the papers, shapes, torchvision
compatibility, the registry, MAC counting and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from resfast.backends import BackendUnavailableError
from resfast.models import create_model, list_models, model_info, wide_resnet
from resfast.models.preact_resnet import PreActResNet
from resfast.models.resnet import ResNet
from resfast.models.resnext import CifarResNeXt
from resfast.models.wide_resnet import WideResNet
from resfast.nn.blocks import BasicBlock, Bottleneck
from resfast.profiling import count_macs, count_params

MINE_CIFAR = ["wrn28_10", "wrn40_4", "wrn16_8", "wrn16_4", "wrn16_2", "resnext29_8x64d", "resnext29_16x64d",
              "preact_resnet164", "preact_resnet1001"]
MINE_IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                 "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "seresnext50_32x4d"]


def _meta(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kw)


# --------------------------------------------------------------- closed-form parameter counts
# Written from the papers' layer lists, independently of the model code: conv weights
# (no conv biases), BN gamma + beta (2 per channel), linear weight + bias.

def bn(c):
    return 2 * c


def conv(cin, cout, k, groups=1):
    return cin // groups * cout * k * k


def wrn_count(depth, k, nc=10, with_bn=True):
    n = (depth - 4) // 6
    b = bn if with_bn else (lambda c: 0)
    total = conv(3, 16, 3)
    cin = 16
    for i, w in enumerate((16 * k, 32 * k, 64 * k)):
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            total += b(cin) + conv(cin, w, 3) + b(w) + conv(w, w, 3)
            if cin != w or stride != 1:
                total += conv(cin, w, 1)
            cin = w
    return total + b(cin) + cin * nc + nc


def resnext29_count(C, d, nc=10, with_bn=True):
    b = bn if with_bn else (lambda c: 0)
    total = conv(3, 64, 3) + b(64)
    cin = 64
    for i, planes in enumerate((64, 128, 256)):  # widths C*d, 2C*d, 4C*d; outputs 256, 512, 1024
        width, out = C * d * planes // 64, 4 * planes
        for j in range(3):
            total += conv(cin, width, 1) + b(width) + conv(width, width, 3, C) + b(width) + conv(width, out, 1) + b(out)
            if j == 0:
                total += conv(cin, out, 1) + b(out)
            cin = out
    return total + cin * nc + nc


def preact_count(depth, nc=10, with_bn=True):
    n = (depth - 2) // 9
    b = bn if with_bn else (lambda c: 0)
    total = conv(3, 16, 3)
    cin = 16
    for i, p in enumerate((16, 32, 64)):
        for j in range(n):
            total += b(cin) + conv(cin, p, 1) + b(p) + conv(p, p, 3) + b(p) + conv(p, 4 * p, 1)
            if j == 0:
                total += conv(cin, 4 * p, 1)
            cin = 4 * p
    return total + b(cin) + cin * nc + nc


def imagenet_count(kind, layers, groups=1, wpg=64, se=False, nc=1000):
    total = conv(3, 64, 7) + bn(64)
    cin = 64
    for i, (p, n) in enumerate(zip((64, 128, 256, 512), layers)):
        for j in range(n):
            first = j == 0
            if kind == "basic":
                out = p
                total += conv(cin, p, 3) + bn(p) + conv(p, p, 3) + bn(p)
            else:
                w, out = (p * wpg // 64) * groups, 4 * p
                total += conv(cin, w, 1) + bn(w) + conv(w, w, 3, groups) + bn(w) + conv(w, out, 1) + bn(out)
                if se:
                    r = out // 16  # timm: make_divisible(out / 16, 8) == out / 16 for these widths
                    total += out * r + r + r * out + out
            if first and (i > 0 or cin != out):
                total += conv(cin, out, 1) + bn(out)
            cin = out
    return total + cin * nc + nc


CLOSED_FORM = {
    "wrn28_10": lambda **k: wrn_count(28, 10, **k), "wrn40_4": lambda **k: wrn_count(40, 4, **k),
    "wrn16_8": lambda **k: wrn_count(16, 8, **k), "wrn16_4": lambda **k: wrn_count(16, 4, **k),
    "wrn16_2": lambda **k: wrn_count(16, 2, **k),
    "resnext29_8x64d": lambda **k: resnext29_count(8, 64, **k),
    "resnext29_16x64d": lambda **k: resnext29_count(16, 64, **k),
    "preact_resnet164": lambda **k: preact_count(164, **k), "preact_resnet1001": lambda **k: preact_count(1001, **k),
    "resnet18": lambda: imagenet_count("basic", [2, 2, 2, 2]),
    "resnet34": lambda: imagenet_count("basic", [3, 4, 6, 3]),
    "resnet50": lambda: imagenet_count("bottleneck", [3, 4, 6, 3]),
    "resnet101": lambda: imagenet_count("bottleneck", [3, 4, 23, 3]),
    "resnet152": lambda: imagenet_count("bottleneck", [3, 8, 36, 3]),
    "wide_resnet50_2": lambda: imagenet_count("bottleneck", [3, 4, 6, 3], wpg=128),
    "wide_resnet101_2": lambda: imagenet_count("bottleneck", [3, 4, 23, 3], wpg=128),
    "resnext50_32x4d": lambda: imagenet_count("bottleneck", [3, 4, 6, 3], groups=32, wpg=4),
    "resnext101_32x8d": lambda: imagenet_count("bottleneck", [3, 4, 23, 3], groups=32, wpg=8),
    "seresnext50_32x4d": lambda: imagenet_count("bottleneck", [3, 4, 6, 3], groups=32, wpg=4, se=True),
}

# Millions, as printed in the papers' tables (CIFAR) and in torchvision's / timm's model docs.
# The CIFAR papers count conv and linear weights without BN's gamma / beta: with them
# pre-act ResNet-1001 has 10.3M and ResNeXt-29 16x64d 68.2M (10.2M and 68.1M without).
PUBLISHED_M = {
    "wrn28_10": 36.5, "wrn40_4": 8.9, "wrn16_8": 11.0, "wrn16_4": 2.7,
    "resnext29_8x64d": 34.4, "resnext29_16x64d": 68.1, "preact_resnet164": 1.7, "preact_resnet1001": 10.2,
    "resnet18": 11.7, "resnet34": 21.8, "resnet50": 25.6, "resnet101": 44.5, "resnet152": 60.2,
    "wide_resnet50_2": 68.9, "wide_resnet101_2": 126.9, "resnext50_32x4d": 25.0, "resnext101_32x8d": 88.8,
    "seresnext50_32x4d": 27.6,
}


@pytest.mark.parametrize("name", MINE_CIFAR)
def test_cifar_param_counts_match_closed_form_and_paper(name):
    m = _meta(name)
    assert count_params(m) == CLOSED_FORM[name](), name
    weights_only = count_params(m, include_norm=False)
    assert weights_only == CLOSED_FORM[name](with_bn=False)
    if name in PUBLISHED_M:
        assert round(weights_only / 1e6, 1) == PUBLISHED_M[name]


@pytest.mark.parametrize("name", MINE_IMAGENET)
def test_imagenet_param_counts_match_closed_form_published_and_torchvision(name):
    m = _meta(name)
    n = count_params(m)
    assert n == CLOSED_FORM[name](), name
    assert round(n / 1e6, 1) == PUBLISHED_M[name]
    tvm = pytest.importorskip("torchvision.models", reason="torchvision is not installed")
    if name.startswith("se"):
        return  # no torchvision counterpart (timm's seresnext50_32x4d: 27,559,896, the closed form above)
    with torch.device("meta"):
        ref = getattr(tvm, name)()
    assert n == sum(p.numel() for p in ref.parameters())


def test_other_num_classes_changes_only_the_classifier():
    assert count_params(_meta("wrn16_2", num_classes=100)) == wrn_count(16, 2, nc=100)
    assert count_params(_meta("preact_resnet164", num_classes=100)) == preact_count(164, nc=100)


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", MINE_CIFAR + MINE_IMAGENET)
def test_model_output_and_feature_shapes_on_meta(name):
    info = model_info(name)
    m = _meta(name, num_classes=7).eval()
    c, h, w = info.input_size
    x = torch.empty(2, c, h, w, device="meta")
    # One forward (preact_resnet1001's took 5 s on the meta device): the features are what
    # the model's own forward_features returns inside m(x).
    seen = []
    forward_features = m.forward_features
    m.forward_features = lambda t: seen.append(forward_features(t)) or seen[-1]
    with torch.no_grad():
        y = m(x)
    assert len(seen) == 1, "forward does not go through forward_features"
    feats = seen[0]
    stride = 32 if info.dataset == "imagenet" else 4
    assert tuple(feats.shape) == (2, m.num_features, h // stride, w // stride)
    assert tuple(m.forward_head(feats, pre_logits=True).shape) == (2, m.num_features)
    assert tuple(y.shape) == (2, 7)
    expect_features = {"wrn": 64 * (int(name.split("_")[1]) if name.startswith("wrn") else 1),
                       "resnext29": 1024, "preact": 256}
    for prefix, nf in expect_features.items():
        if name.startswith(prefix):
            assert m.num_features == nf


def test_registry_metadata():
    names = list_models()
    for n in MINE_CIFAR:
        assert n in names
        assert model_info(n).input_size == (3, 32, 32) and model_info(n).dataset == "cifar"
    for n in MINE_IMAGENET:
        assert n in names
        assert model_info(n).input_size == (3, 224, 224) and model_info(n).dataset == "imagenet"
    assert list_models("wrn16_*") == ["wrn16_2", "wrn16_4", "wrn16_8"]


@pytest.mark.parametrize("model", [
    lambda: WideResNet(10, 1, dropout=0.3),
    lambda: wide_resnet(10, 2, num_classes=5),
    lambda: CifarResNeXt(11, 2, 8),
    lambda: PreActResNet(11),
    lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4),
    lambda: ResNet(Bottleneck, [1, 1, 1, 1], num_classes=4, groups=4, width_per_group=4, se=True),
], ids=["wrn10_1_dropout", "wide_resnet_builder", "resnext11_2x8d", "preact11", "resnet_basic", "seresnext_small"])
def test_small_models_train_step_on_cpu(model):
    """A real forward and backward on the CPU: finite logits, every parameter gets a gradient."""
    m = model()
    x = torch.randn(2, 3, 32, 32)
    y = m(x)
    assert y.shape == (2, m.num_classes) and torch.isfinite(y).all()
    y.square().mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))


def test_wide_resnet_builder_and_dropout_reach_blocks():
    m = wide_resnet(22, 3, num_classes=100, dropout=0.3)
    blocks = [b for b in m.modules() if type(b).__name__ == "WideBasic"]
    assert len(blocks) == 3 * 3 and all(b.dropout == 0.3 for b in blocks)
    assert m.fc.out_features == 100 and m.layer3[0].conv2.out_channels == 64 * 3


def test_seresnext_has_se_in_every_bottleneck_with_timm_names():
    m = _meta("seresnext50_32x4d")
    blocks = [b for b in m.modules() if isinstance(b, Bottleneck)]
    assert len(blocks) == 16 and all(b.se is not None for b in blocks)
    keys = m.state_dict().keys()
    assert "layer1.0.se.fc1.weight" in keys and "layer4.2.se.fc2.bias" in keys
    assert m.layer4[2].se.fc1.out_channels == 128 and m.layer1[0].conv2.groups == 32


# ---------------------------------------------------------------------------- torchvision


def test_torchvision_state_dicts_load_strict_for_every_imagenet_model():
    tvm = pytest.importorskip("torchvision.models", reason="torchvision is not installed")
    for name in MINE_IMAGENET:
        if name.startswith("se"):
            continue
        with torch.device("meta"):
            ref = getattr(tvm, name)()
            ours = create_model(name)
        sd = ref.state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        ours.load_state_dict(sd, strict=True, assign=True)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_torchvision_weights_give_the_same_outputs(name):
    tvm = pytest.importorskip("torchvision.models", reason="torchvision is not installed")
    torch.manual_seed(0)
    ref = getattr(tvm, name)()
    with torch.no_grad():  # non-trivial BN state so eval mode exercises it
        for mod in ref.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5), mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1), mod.running_var.uniform_(0.5, 1.5)
    ours = create_model(name, backend="eager")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    ref.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    # training mode: batch statistics and the running-statistic updates agree too
    ref.train(), ours.train()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------- MACs


def test_count_macs_matches_closed_form_and_torchvision_figures():
    # one 3x3 conv, no padding: MACs = C_in * C_out * 9 * H_out * W_out; BN/ReLU not counted
    net = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU())
    assert count_macs(net, (3, 10, 12)) == 3 * 5 * 9 * 8 * 10
    assert net.training  # mode restored
    # torchvision's documented GFLOPS (multiply-adds): resnet18 1.81, resnet50 4.09, resnext50_32x4d 4.23
    for name, g in (("resnet18", 1.81), ("resnet50", 4.09), ("resnext50_32x4d", 4.23)):
        assert round(count_macs(_meta(name), (3, 224, 224)) / 1e9, 2) == g, name
    # paper figures: WRN-28-10 5.25 G (Zagoruyko & Komodakis), ResNeXt-29 8x64d 5.4 G (Xie et al.)
    assert round(count_macs(_meta("wrn28_10"), (3, 32, 32)) / 1e9, 1) == 5.2
    assert round(count_macs(_meta("resnext29_8x64d"), (3, 32, 32)) / 1e9, 1) == 5.4


def test_counting_bad_input():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        count_params("resnet50")
    with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\)"):
        count_macs(nn.Conv2d(3, 3, 1), (32, 32))


# ---------------------------------------------------------------------------- bad input


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model name 'resnet51'"):
        create_model("resnet51")


@pytest.mark.parametrize("depth", [27, 8, 0])
def test_wrn_depth_must_be_6n_plus_4(depth):
    with pytest.raises(ValueError, match=rf"depth must be 6n\+4 .*got depth={depth}"):
        wide_resnet(depth, 2)


def test_other_bad_model_arguments():
    with pytest.raises(ValueError, match=r"depth must be 9n\+2 .*got depth=30"):
        PreActResNet(30)
    with pytest.raises(ValueError, match=r"depth must be 9n\+2 .*got depth=28"):
        CifarResNeXt(28)
    with pytest.raises(ValueError, match=r"width must be a positive int .*got width=0"):
        wide_resnet(16, 0)
    with pytest.raises(ValueError, match=r"num_classes must be a positive int, got 0"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'gpu'"):
        create_model("wrn16_2", backend="gpu")
    with pytest.raises(ValueError, match=r"dropout must be a probability"):
        create_model("wrn16_2", dropout=-0.1)


@pytest.mark.parametrize("name", ["wrn16_2", "resnet18"])
def test_wrong_input_channels(name):
    m = _meta(name)
    with pytest.raises(ValueError, match=r"x has 1 channels .*in_channels=3"):
        m(torch.empty(2, 1, 32, 32, device="meta"))


def test_model_with_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = WideResNet(10, 1, backend="triton")
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(BackendUnavailableError, match=r"backend='triton' cannot run on cpu tensors: .*TRITON_INTERPRET"):
        m(torch.randn(2, 3, 8, 8))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected call"
