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
