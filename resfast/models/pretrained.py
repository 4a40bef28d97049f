"""Pretrained weights: torchvision's ``weights=`` (and timm-style ``pretrained=True``) for the
ImageNet models that keep torchvision's parameter names.

resfast never downloads: the checkpoint file must already be in the local torch hub cache
(``torch.hub.get_dir()/checkpoints``), where torchvision itself puts it
(``torchvision.models.<name>(weights=...)`` on a machine with network access, or a copy of the
file). Otherwise the error says which file to put where.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["load_torchvision_weights", "locate_weights", "resolve_weights", "checkpoint_path"]


def resolve_weights(name: str, weights: Any = None, pretrained: bool = False):
    """torchvision's weights enum member for model ``name``: ``weights`` as an enum member or
    its name (``"DEFAULT"``, ``"IMAGENET1K_V1"``), or the default ones for ``pretrained=True``;
    ``None`` when neither asks for weights."""
    if weights is None and not pretrained:
        return None
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be a bool, got {pretrained!r}")
    try:
        import torchvision.models as tvm
    except ImportError as exc:
        raise ImportError("pretrained weights come from torchvision's weight definitions: pip install torchvision"
                          ) from exc
    try:
        enum = tvm.get_model_weights(name)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"no pretrained weights exist for {name!r} (torchvision has none for it); "
                         "train it, or load a checkpoint of your own with model.load_state_dict") from exc
    if weights is None:
        return enum.DEFAULT
    if isinstance(weights, str):
        try:
            return enum.DEFAULT if weights == "DEFAULT" else enum[weights]
        except KeyError as exc:
            raise ValueError(f"unknown weights {weights!r} for {name!r}; one of "
                             f"{['DEFAULT'] + [w.name for w in enum]}") from exc
    if isinstance(weights, enum):
        return weights
    raise TypeError(f"weights must be None, a {enum.__name__} member or its name, got {weights!r}")


def checkpoint_path(weights) -> str:
    """Where torch.hub keeps the file of ``weights``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def locate_weights(name: str, weights: Any = None, pretrained: bool = False):
    """``(member, path)`` of the asked-for weights, checked before a model is built; ``(None,
    None)`` when none were asked for. ``FileNotFoundError`` says where the file must go."""
    member = resolve_weights(name, weights, pretrained)
    if member is None:
        return None, None
    path = checkpoint_path(member)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the checkpoint of {name} weights={member} is not in the torch hub cache: put "
                                f"{member.url} at {path} (resfast does not download; torchvision.models.{name}"
                                f"(weights={member}) on a machine with network access fetches it there)")
    return member, path


def load_torchvision_weights(model: nn.Module, name: str, weights: Any = None, pretrained: bool = False,
                             ) -> Optional[Any]:
    """Load torchvision's ``weights`` for ``name`` into ``model`` (``strict=True``) from the local
    torch hub cache; returns the weights member, or ``None`` when none were asked for."""
    member, path = locate_weights(name, weights, pretrained)
    if member is None:
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if name.startswith("densenet"):
        state = _densenet_keys(state)
    num_classes = len(member.meta.get("categories") or [])
    head = getattr(model, "fc", None) or getattr(model, "classifier", None)
    if num_classes and isinstance(head, nn.Linear) and head.out_features != num_classes:
        raise ValueError(f"weights={member} have {num_classes} classes but the model was built with "
                         f"num_classes={head.out_features}")
    model.load_state_dict(state, strict=True)
    return member


_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _densenet_keys(state):
    """torchvision's DenseNet checkpoints name ``norm.1.weight`` what the modules call
    ``norm1.weight`` (torchvision renames them on load the same way)."""
    out = {}
    for key, value in state.items():
        m = _OLD_DENSENET_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out
