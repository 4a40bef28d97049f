"""Full networks and the model registry.

Importing this package registers every model family. CIFAR models default to
``num_classes=10`` and 32x32 input; ImageNet models keep torchvision's parameter names.
"""
import importlib as _importlib

from resfast.models.registry import create_model, list_models, model_info, register_model

__all__ = ["create_model", "list_models", "model_info", "register_model"]

# Each family module registers its models on import and exports its builders. (Imported by
# name because `wide_resnet` is both a module and the builder it exports.)
for _family in ("resnet", "wide_resnet", "resnext", "preact_resnet", "densenet"):
    _mod = _importlib.import_module(f"resfast.models.{_family}")
    for _name in _mod.__all__:
        globals()[_name] = getattr(_mod, _name)
    __all__ += list(_mod.__all__)
del _family, _mod, _name
