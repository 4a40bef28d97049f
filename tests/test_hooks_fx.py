"""Hooks and FX: a fused op or the shared dense block replaces submodule calls, so blocks run
their submodules one by one under FX symbolic tracing and while hooks are registered on those
submodules (with a warning, once). Found by a new-user trial: hooks never fired, silently, and
``torch.fx.symbolic_trace`` / ``create_feature_extractor`` failed on the zoo's backbones."""
from __future__ import annotations

import warnings

import pytest
import torch

import resfast
from resfast.backends import backend_status

torchvision = pytest.importorskip("torchvision")
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

BACKENDS = ("eager", "native", "triton")


def _require(backend: str) -> None:
    why = backend_status("cpu")[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on cpu: {why}")


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64), ("densenet121", 64),
                                       ("densenet_bc100_k12", 32)])
def test_symbolic_trace_runs_the_same_function(name, size):
    torch.manual_seed(0)
    model = resfast.create_model(name, backend="eager")
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, size, size)
    for train in (False, True):  # BatchNorm's train/eval switch stays dynamic in the traced graph
        model.train(train)
        traced.train(train)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,nodes", [
    ("resnet18", ["layer2", "layer4"]),
    ("resnet50", ["layer1", "layer3"]),
    ("densenet121", ["features.denseblock2", "features.transition3"]),
])
def test_feature_extractor_matches_torchvision(name, nodes):
    torch.manual_seed(0)
    model = resfast.create_model(name, backend="eager").eval()
    tv = getattr(torchvision.models, name)().eval()
    tv.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    got, ref = create_feature_extractor(model, nodes)(x), create_feature_extractor(tv, nodes)(x)
    for k in nodes:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


def _count(module, calls, key):
    return module.register_forward_hook(lambda m, i, o: calls.__setitem__(key, calls.get(key, 0) + 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_inside_a_fused_bottleneck_fires(backend):
    _require(backend)
    torch.manual_seed(0)
    block = resfast.Bottleneck(16, 4, groups=2, backend=backend)  # 16 -> 16, identity shortcut
    x = torch.randn(2, 16, 5, 5)
    y_fused = block(x)
    calls = {}
    handles = [_count(block.bn1, calls, "bn1"), _count(block.relu, calls, "relu"), _count(block.conv2, calls, "conv2")]
    with pytest.warns(UserWarning, match=r"Bottleneck: hooks are registered on bn1, relu, conv2, .* the hooks fire"):
        y = block(x)
    assert calls == {"bn1": 1, "relu": 3, "conv2": 1}  # relu runs after bn1, bn2 and the sum, as torchvision
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per block
        block(x)
    for h in handles:
        h.remove()
    calls.clear()
    block(x)
    assert calls == {}  # fused again
    assert y.shape == y_fused.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_on_a_layer_of_a_shared_dense_block_fires(backend):
    _require(backend)
    torch.manual_seed(0)
    block = resfast.DenseBlock(2, 4, 2, 3, memory="shared", backend=backend)
    ref = resfast.DenseBlock(2, 4, 2, 3, memory="naive", backend="eager")
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 5, 5)
    calls = {}
    _count(block.denselayer2.conv2, calls, "conv2")
    _count(block.denselayer1, calls, "layer1")
    with pytest.warns(UserWarning, match=r"DenseBlock: hooks are registered on denselayer1, denselayer2.conv2"):
        y = block(x)
    assert calls == {"conv2": 1, "layer1": 1}
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)


def test_hook_on_the_transition_inside_a_shared_densenet_fires():
    torch.manual_seed(0)
    model = resfast.create_model("densenet_bc100_k12", backend="eager")
    calls = {}
    _count(model.features.transition1.conv, calls, "conv")
    _count(model.features.transition2, calls, "transition2")
    with pytest.warns(UserWarning, match="hooks are registered"):
        model(torch.randn(2, 3, 32, 32))
    assert calls == {"conv": 1, "transition2": 1}


def test_fused_module_hook_fires():
    m = resfast.BNReLUConv2d(4, 4, 3, padding=1)
    calls = {}
    _count(m.norm, calls, "norm")
    with pytest.warns(UserWarning, match="BNReLUConv2d: hooks are registered on norm"):
        m(torch.randn(2, 4, 5, 5))
    assert calls == {"norm": 1}
