"""Full networks and the model registry.

Importing this package registers every model family. CIFAR models default to
``num_classes=10`` and 32x32 input; ImageNet models keep torchvision's parameter names.
"""
import importlib as _importlib

from resfast.models import registry as _registry
from resfast.models.registry import list_models, model_info, register_model

__all__ = ["create_model", "list_models", "model_info", "register_model", "FAMILY_OPTIONS", "model_options"]

# The options each family's builders take: resfast's name for the option (`resfast train
# --backend / --dropout / --memory`) -> the builder's keyword. `registry` holds the
# torchvision: / timm: models, which take the conversion's options.
FAMILY_OPTIONS = {
    "resnet": {"backend": "backend"},
    "wide_resnet": {"backend": "backend", "dropout": "dropout"},
    "resnext": {"backend": "backend"},
    "preact_resnet": {"backend": "backend"},
    "densenet": {"backend": "backend", "dropout": "drop_rate", "memory": "memory", "recompute": "recompute"},
    "registry": {"backend": "backend", "memory": "memory", "recompute": "recompute"},
}


def model_options(model) -> dict:
    """``{option: builder keyword}`` for a registered model name or a family's builder
    function (``wide_resnet``, ``densenet_bc``, ...): the options its family declares."""
    builder = model if callable(model) else model_info(model).builder
    return dict(FAMILY_OPTIONS.get(builder.__module__.rpartition(".")[2], {}))


# Each family module registers its models on import and exports its builders. (Imported by
# name because `wide_resnet` is both a module and the builder it exports.)
for _family in ("resnet", "wide_resnet", "resnext", "preact_resnet", "densenet"):
    _mod = _importlib.import_module(f"resfast.models.{_family}")
    for _name in _mod.__all__:
        globals()[_name] = getattr(_mod, _name)
    __all__ += list(_mod.__all__)
del _family, _mod, _name


def create_model(name: str, *, weights=None, pretrained: bool = False, **kwargs):
    """Build the registered model ``name``; ``kwargs`` go to its builder (``num_classes``,
    ``backend``, ``memory``, ...).

    ``weights`` (torchvision's weights enum member or its name, e.g. ``"DEFAULT"``) or
    ``pretrained=True`` load torchvision's ImageNet weights for the ImageNet models that
    keep torchvision's names, from the local torch hub cache (never downloaded; the error says
    where to put the file). Models torchvision has no weights for raise ``ValueError``.
    """
    if weights is None and not pretrained:
        return _registry.create_model(name, **kwargs)
    if ":" in name:  # a library model ("torchvision:...", "timm:..."): its builder refuses weights, saying why
        return _registry.create_model(name, weights=weights, pretrained=pretrained, **kwargs)
    from resfast.models.pretrained import load_torchvision_weights, locate_weights

    locate_weights(name, weights, pretrained)  # a missing file or unknown weights fail before building
    model = _registry.create_model(name, **kwargs)
    load_torchvision_weights(model, name, weights, pretrained)
    return model
