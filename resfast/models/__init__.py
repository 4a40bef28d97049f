"""Full networks and the model registry.

Importing this package registers every model family. CIFAR models default to
``num_classes=10`` and 32x32 input; ImageNet models keep torchvision's parameter names.
"""
from resfast.models.registry import create_model, list_models, model_info, register_model

__all__ = ["create_model", "list_models", "model_info", "register_model"]

# Each family module registers its models on import; a family not yet written is skipped.
import importlib as _importlib

for _family in ("resnet", "wide_resnet", "resnext", "preact_resnet", "densenet"):
    try:
        _mod = _importlib.import_module(f"resfast.models.{_family}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"resfast.models.{_family}":
            raise
        continue
    for _name in getattr(_mod, "__all__", []):
        globals()[_name] = getattr(_mod, _name)
        __all__.append(_name)
