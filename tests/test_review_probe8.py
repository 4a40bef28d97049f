"""An eighth new-user trial, on ``resfast.convert`` and the model zoo with what users bring
(torchvision / timm constructor options, frozen and synchronised BatchNorms, feature
extractors, meta-device initialisation, copies and pickles, torch.compile). Conversions matched
the unconverted models by the float64 rule except for three cases, each a test here that once
failed: a converted ``fx.GraphModule`` (torchvision's ``create_feature_extractor``) recursed
forever after ``eval()`` / ``deepcopy`` and could not be saved; a DenseNet built on the meta
device, converted, ``to_empty``-ed and loaded strictly pooled its transitions with
uninitialised weights (a plausible wrong output, no warning); a library model asked for
weights got a message that named the wrong reason; and a timm norm with a non-ReLU activation
feeding a conv was left out of the conversion report."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import resfast
from resfast.models import create_model
from resfast.nn.dense import Transition
from reference import assert_rule


def test_converted_feature_extractor_survives_eval_copies_and_saving():
    """A torchvision feature extractor (an ``fx.GraphModule``) is left as it is, with a reason
    in the report, and stays usable: ``eval()``, ``deepcopy``, ``torch.save`` / ``load``."""
    torch.manual_seed(0)
    fe = create_feature_extractor(torchvision.models.resnet18(num_classes=5), {"layer4": "f4"}).double()
    ref = copy.deepcopy(fe)
    report = resfast.convert(fe, backend="eager")
    assert any("GraphModule" in e.detail for e in report.left_alone), report.left_alone
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(fe(x)["f4"], ref(x)["f4"])
    fe.eval()
    ref.eval()
    assert torch.equal(fe(x)["f4"], ref(x)["f4"])
    # (torchvision's own deepcopy of an extractor in eval mode comes back in train mode: the
    # converted one's copy is judged against the unconverted one's copy)
    assert torch.equal(copy.deepcopy(fe)(x)["f4"], copy.deepcopy(ref)(x)["f4"])
    buf = io.BytesIO()
    torch.save(fe, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x)["f4"], ref(x)["f4"])


def test_transition_pool_weight_after_meta_device_init():
    """Built on the meta device and ``to_empty``-ed (the usual large-model initialisation),
    a transition's constant pooling weight is 1/4 again, whatever memory ``to_empty`` gave it."""
    with torch.device("meta"):
        t = Transition(6, 3, backend="eager")
    t.to_empty(device="cpu")
    assert torch.equal(t.pool_weight, torch.full((6, 1, 2, 2), 0.25))


@pytest.mark.parametrize("source", ["torchvision", "zoo"])
def test_densenet_built_on_meta_then_loaded_matches(source):
    """A DenseNet built under ``torch.device("meta")`` (converted, for torchvision's), then
    ``to_empty`` and a strict ``load_state_dict``: the same output as the model it was loaded
    from, by the float64 rule (it was off by up to 1.8e20: garbage pooling weights)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    if source == "torchvision":
        kw = dict(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, bn_size=2, num_classes=5)
        src = torchvision.models.DenseNet(**kw).double().eval()
        with torch.device("meta"):
            m = torchvision.models.DenseNet(**kw)
        resfast.convert(m, backend="eager")
    else:
        src = create_model("densenet_bc100_k12", num_classes=5, backend="eager").double().eval()
        with torch.device("meta"):
            m = create_model("densenet_bc100_k12", num_classes=5, backend="eager")
    m.to_empty(device="cpu")
    m.load_state_dict(src.state_dict(), strict=True)
    m = m.double().eval()
    with torch.no_grad():
        ref64 = src(x)
        got = m(x)
        same = src.float()(x.float())
    assert_rule("output", got, ref64, same, source, dtype=torch.float32)


@pytest.mark.parametrize("kwargs", [dict(weights="DEFAULT"), dict(pretrained=True)], ids=["weights", "pretrained"])
def test_library_model_with_weights_says_the_rule(kwargs):
    """``create_model("torchvision:...")`` asked for weights refuses with the rule (library
    models are built without pretrained weights), not "torchvision has none for it"."""
    with pytest.raises(ValueError, match="library models are built with no pretrained weights"):
        create_model("torchvision:resnet18", **kwargs)


@pytest.mark.parametrize("act", ["ReLU6", "SiLU"])
def test_norm_with_another_activation_is_reported(act):
    """timm's ``BatchNormAct2d`` with an activation other than ReLU, feeding a conv: left alone
    (the fused op applies ReLU), and the report says so, as it does for ``BatchNorm2d ->
    ReLU6 -> Conv2d`` (it was in neither list)."""
    timm_layers = pytest.importorskip("timm.layers", reason="timm is not installed")
    from torch import nn

    m = nn.Sequential(nn.Conv2d(3, 6, 3), timm_layers.BatchNormAct2d(6, act_layer=getattr(nn, act)),
                      nn.Conv2d(6, 4, 3))
    report = resfast.convert(m, backend="eager")
    assert not report.converted
    assert [(e.path, act in e.detail) for e in report.left_alone] == [("1", True)], report.left_alone
