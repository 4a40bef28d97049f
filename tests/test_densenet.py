"""DenseNet models: parameter counts against an independent closed form, torchvision compatibility."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from reference import assert_rule
from resfast.models import create_model, list_models

IMAGENET = {  # name: (growth, blocks, stem channels)
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
    "densenet264": (32, (6, 12, 64, 48), 64),
}
CIFAR = {"densenet_bc100_k12": (100, 12), "densenet_bc250_k24": (250, 24), "densenet_bc190_k40": (190, 40)}


def closed_form_params(growth, blocks, c0, stem, num_classes, bn_size=4):
    """Count by formula: BN has 2 parameters per channel, convs have no bias."""
    total = (3 * c0 * 49 + 2 * c0) if stem == "imagenet" else 3 * c0 * 9
    c = c0
    for i, n in enumerate(blocks):
        for _ in range(n):
            mid = bn_size * growth
            total += 2 * c + c * mid + 2 * mid + mid * growth * 9
            c += growth
        if i < len(blocks) - 1:
            out = c // 2
            total += 2 * c + c * out
            c = out
    return total + 2 * c + c * num_classes + num_classes


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(IMAGENET))
def test_imagenet_param_counts(name):
    growth, blocks, c0 = IMAGENET[name]
    assert _count(create_model(name)) == closed_form_params(growth, blocks, c0, "imagenet", 1000)


@pytest.mark.parametrize("name", list(CIFAR))
def test_cifar_param_counts(name):
    depth, k = CIFAR[name]
    n = (depth - 4) // 6
    assert _count(create_model(name)) == closed_form_params(k, (n, n, n), 2 * k, "cifar", 10)


def test_cifar_param_counts_match_the_paper():
    # Huang et al. 2017, Table 2: 0.8M, 15.3M, 25.6M.
    assert _count(create_model("densenet_bc100_k12")) == 769_162
    assert round(_count(create_model("densenet_bc250_k24")) / 1e6, 1) == 15.3
    assert round(_count(create_model("densenet_bc190_k40")) / 1e6, 1) == 25.6


def test_registered_and_exported():
    import resfast.models as models

    for name in list(IMAGENET) + list(CIFAR):
        assert name in list_models("densenet*")
        assert callable(getattr(models, name))


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_torchvision_state_dict_loads_strict(name):
    tvm = pytest.importorskip("torchvision.models")
    tv = getattr(tvm, name)()
    ours = create_model(name)
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert _count(ours) == _count(tv)


@pytest.mark.parametrize("memory,recompute", [("naive", "bn_relu"), ("shared", "bn_relu")])
def test_torchvision_densenet121_same_outputs_and_grads(memory, recompute):
    """torchvision's weights in resfast's densenet121: outputs (eval: the float64 rule of docs/design.md in
    float32), and in float64 the training-step outputs, input and parameter gradients and
    running statistics (see tests/test_dense.py for why the whole network is compared in
    float64)."""
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    tv = tvm.densenet121(num_classes=5)
    ours = create_model("densenet121", num_classes=5, memory=memory, recompute=recompute, backend="eager")
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv64 = copy.deepcopy(tv).double()
    x = torch.randn(2, 3, 64, 64)
    for m in (tv, tv64, ours):
        m.eval()
    with torch.no_grad():
        assert_rule("eval output", ours(x), tv64(x.double()), tv(x), memory)
    ours.double()
    g = torch.randn(2, 5, dtype=torch.float64)
    results = []
    for m in (tv64, ours):
        m.train()
        xi = x.double().requires_grad_()
        y = m(xi)
        y.backward(g)
        # persistent buffers only: a pool-first Transition holds a non-persistent constant pool weight
        buffers = {n: b for n, b in m.state_dict().items() if n not in dict(m.named_parameters())}
        results.append([("output", y.detach()), ("grad x", xi.grad)]
                       + [(f"grad {n}", p.grad) for n, p in m.named_parameters()]
                       + sorted((n, b.detach()) for n, b in buffers.items()))
    assert [n for n, _ in results[0]] == [n for n, _ in results[1]]
    for (name, r), (_, o) in zip(*results):
        scale = max(1.0, r.abs().max().item())
        assert (o - r).abs().max().item() <= 1e-6 * scale, name


def test_cifar_forward_shapes_and_kwargs():
    m = create_model("densenet_bc100_k12", num_classes=100, drop_rate=0.2, memory="shared", recompute="bottleneck",
                     backend="eager")
    assert m.classifier.out_features == 100
    assert m.features.denseblock1.denselayer1.drop_rate == 0.2
    assert m.features.conv0.kernel_size == (3, 3) and m.features.conv0.out_channels == 24
    assert [getattr(m.features, f"transition{i}").conv.out_channels for i in (1, 2)] == [108, 150]
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 100)
    assert math.isfinite(y.sum().item())


def test_bad_arguments():
    with pytest.raises(ValueError, match="memory must be one of .* got 'tiny'"):
        create_model("densenet121", memory="tiny")
    with pytest.raises(ValueError, match=r"depth must be 6n \+ 4 .* got 101"):
        from resfast.models.densenet import densenet_bc

        densenet_bc(101, 12)
    m = create_model("densenet_bc100_k12", backend="eager")
    with pytest.raises(ValueError, match=r"x must be an N x 3 x H x W tensor, got \(2, 4, 32, 32\)"):
        m(torch.randn(2, 4, 32, 32))


# ----------------------------------------------------------------------------- the compact stem
# (on CUDA when there is one: benchmarks/gpu_check.sh runs this file there)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _stem_modules(c0=8, dtype=torch.float32):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, c0, 7, 2, 3, bias=False).to(dtype)
    bn = torch.nn.BatchNorm2d(c0).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    pool = torch.nn.MaxPool2d(3, 2, 1)
    return conv.to(DEVICE), bn.to(DEVICE), pool


def _stem_step(stem, conv, bn, pool, x, grad):
    from resfast.models import densenet as D

    conv, bn = copy.deepcopy(conv), copy.deepcopy(bn)
    xi = x.to(DEVICE).clone().requires_grad_()
    grad = grad.to(DEVICE)
    out = D._recomputed_stem(conv, bn, pool, xi) if stem == "compact" else pool(torch.relu(bn(conv(xi))))
    out.backward(grad.to(out.dtype))
    return {"output": out.detach(), "grad x": xi.grad, "grad conv": conv.weight.grad, "grad gamma": bn.weight.grad,
            "grad beta": bn.bias.grad, "running_mean": bn.running_mean, "running_var": bn.running_var}


@pytest.mark.parametrize("case", ["random", "positive ties", "nan"])
def test_compact_stem_matches_unfused_modules(case):
    """The shared-memory DenseNet stem (conv-BN-ReLU-maxpool storing only the pooling's argmax)
    against the unfused modules: float32 under the float64 rule, including windows whose
    maximum is a positive value repeated (a constant image region: the first index wins, as in
    PyTorch's pooling) and a NaN pixel (every result NaN where the modules' is)."""
    conv, bn, pool = _stem_modules()
    x = torch.randn(2, 3, 30, 30)
    if case == "positive ties":
        x[:, :, 4:20, 4:20] = 0.7
    grad = torch.randn(2, 8, 8, 8)
    if case == "nan":
        x[1, 0, 3, 3] = float("nan")
    ours = _stem_step("compact", conv, bn, pool, x, grad)
    same = _stem_step("modules", conv, bn, pool, x, grad)
    ref64 = _stem_step("modules", conv.double(), bn.double(), pool, x.double(), grad.double())
    for key in ours:
        if case == "nan":
            assert torch.equal(torch.isnan(ours[key]), torch.isnan(same[key])), key
            continue
        assert_rule(key, ours[key], ref64[key], same[key], case)


def test_compact_stem_saves_no_full_resolution_tensor():
    """What the stem keeps for its backward: the input, the parameters, two statistics vectors
    and one 16-bit code per pooled element; nothing of the conv's full-resolution output."""
    from resfast.models import densenet as D

    conv, bn, pool = _stem_modules()
    x = torch.randn(2, 3, 64, 64, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = D._recomputed_stem(conv, bn, pool, x)
    shapes = [tuple(t.shape) for t in saved]
    assert (2, 8, 32, 32) not in shapes, shapes
    others = sum(t.numel() * t.element_size() for t in saved if tuple(t.shape) != (2, 3, 64, 64))
    # the 16-bit codes, the conv weight, gamma and the two statistics vectors (not beta: the
    # backward does not read it)
    assert others == 2 * 8 * 16 * 16 * 2 + conv.weight.numel() * 4 + 3 * 8 * 4, shapes
    codes = [t for t in saved if not t.is_floating_point()]
    assert len(codes) == 1 and codes[0].dtype == torch.int16 and codes[0].shape == out.shape


def test_compact_stem_large_plane_uses_int32_codes():
    """A conv output plane over 32767 elements (185 x 185) keeps 32-bit argmax codes, and the
    gradients still match the modules."""
    conv, bn, pool = _stem_modules(c0=2)
    x = torch.randn(1, 3, 370, 370)
    grad = torch.randn(1, 2, 93, 93)
    ours = _stem_step("compact", conv, bn, pool, x, grad)
    same = _stem_step("modules", conv, bn, pool, x, grad)
    ref64 = _stem_step("modules", conv.double(), bn.double(), pool, x.double(), grad.double())
    for key in ("grad x", "grad conv", "grad gamma"):
        assert_rule(key, ours[key], ref64[key], same[key], "int32 codes")


def test_compact_stem_autocast_bfloat16_matches_modules():
    conv, bn, pool = _stem_modules()
    x = torch.randn(2, 3, 30, 30)
    grad = torch.randn(2, 8, 8, 8)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ours = _stem_step("compact", conv, bn, pool, x, grad)
        same = _stem_step("modules", conv, bn, pool, x, grad)
    ref64 = _stem_step("modules", conv.double(), bn.double(), pool, x.double(), grad.double())
    assert ours["output"].dtype == same["output"].dtype
    for key in ours:
        assert_rule(key, ours[key], ref64[key], same[key], "autocast bf16", dtype=torch.bfloat16)


def test_compact_stem_refuses_double_backward():
    from resfast.models import densenet as D

    conv, bn, pool = _stem_modules()
    x = torch.randn(2, 3, 30, 30, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = D._recomputed_stem(conv.double(), bn.double(), pool, x)
    with pytest.raises(RuntimeError, match="double backward .* DenseNet stem is not supported"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
