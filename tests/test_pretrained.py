"""``create_model(name, weights=...)`` / ``pretrained=True``: torchvision's weights from the local
torch hub cache (never downloaded), or a clear error saying where the file goes."""
from __future__ import annotations

import os

import pytest
import torch

import resfast

tvm = pytest.importorskip("torchvision.models")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    return tmp_path / "checkpoints"


def _put(hub, member, state):
    torch.save(state, hub / os.path.basename(member.url))


def test_weights_load_from_the_hub_cache(hub):
    torch.manual_seed(0)
    member = tvm.ResNet18_Weights.IMAGENET1K_V1
    _put(hub, member, tvm.resnet18().state_dict())
    ref = torch.load(hub / os.path.basename(member.url))
    for kwargs in (dict(weights=member), dict(weights="DEFAULT"), dict(weights="IMAGENET1K_V1"),
                   dict(pretrained=True)):
        model = resfast.create_model("resnet18", backend="eager", **kwargs)
        got = model.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), kwargs


def test_densenet_checkpoint_key_names_are_renamed(hub):
    """torchvision's DenseNet files name ``norm.1.weight`` what the modules call ``norm1.weight``."""
    torch.manual_seed(0)
    member = tvm.DenseNet121_Weights.IMAGENET1K_V1
    state = tvm.densenet121().state_dict()
    # The files predate num_batches_tracked; BatchNorm's loader fills it in.
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.") if "denselayer" in k else k: v
           for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert old.keys() != state.keys()
    _put(hub, member, old)
    model = resfast.create_model("densenet121", weights="DEFAULT", backend="eager")
    got = model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_missing_file_says_where_to_put_it(hub):
    with pytest.raises(FileNotFoundError, match=r"put https://download.pytorch.org/models/resnet50-.*\.pth at .*"
                                                r"checkpoints"):
        resfast.create_model("resnet50", pretrained=True)


def test_models_without_weights_and_bad_names_are_clear_errors(hub):
    with pytest.raises(ValueError, match="no pretrained weights exist for 'wrn16_2'"):
        resfast.create_model("wrn16_2", weights="DEFAULT")
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET9K' for 'resnet18'; one of"):
        resfast.create_model("resnet18", weights="IMAGENET9K")
    with pytest.raises(TypeError, match="weights must be None, a ResNet18_Weights member or its name"):
        resfast.create_model("resnet18", weights=tvm.ResNet50_Weights.DEFAULT)
