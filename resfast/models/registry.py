"""Model registry in the style of timm: ``@register_model`` builders, ``create_model``, ``list_models``."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

__all__ = ["ModelInfo", "register_model", "create_model", "list_models", "model_info"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    input_size: Tuple[int, int, int]  # C, H, W at which the model is counted and benchmarked
    dataset: str  # "cifar" or "imagenet"


_REGISTRY: Dict[str, ModelInfo] = {}


def register_model(name: Optional[str] = None, *, input_size: Tuple[int, int, int] = (3, 224, 224),
                   dataset: str = "imagenet"):
    """Decorator registering a builder ``fn(**kwargs) -> nn.Module`` under ``name`` (default: its ``__name__``)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = ModelInfo(key, fn, tuple(input_size), dataset)
        return fn

    return deco


def _ensure_loaded() -> None:
    import resfast.models  # noqa: F401  (importing the package registers every family)


def list_models(pattern: str = "*") -> List[str]:
    """Sorted names of registered models matching the shell-style ``pattern``."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> ModelInfo:
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name}*") if isinstance(name, str) else []
        hint = f"; did you mean one of {sorted(close)[:5]}?" if close else "; see resfast.models.list_models()"
        raise ValueError(f"unknown model name {name!r}{hint}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` go to its builder (``num_classes``, ``backend``, ...)."""
    return model_info(name).builder(**kwargs)
