"""Model registry in the style of timm: ``@register_model`` builders, ``create_model``, ``list_models``.

Names with a library prefix, ``torchvision:NAME`` and ``timm:NAME``, build that library's
model (random weights: nothing is downloaded) and convert it in place with
:func:`resfast.convert`; ``backend``, ``memory`` and ``recompute`` go to the conversion
(``memory`` is its ``dense_memory``), every other keyword to the library's builder.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

__all__ = ["ModelInfo", "register_model", "create_model", "list_models", "model_info", "MissingLibraryError"]


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
    """The registered model ``name``, or a library model ``torchvision:NAME`` / ``timm:NAME``."""
    if isinstance(name, str) and ":" in name:
        return _library_model(name)
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name}*") if isinstance(name, str) else []
        hint = f"; did you mean one of {sorted(close)[:5]}?" if close else "; see resfast.models.list_models()"
        raise ValueError(f"unknown model name {name!r}{hint}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` go to its builder (``num_classes``, ``backend``, ...).

    ``torchvision:NAME`` / ``timm:NAME`` build that library's model and convert it with
    :func:`resfast.convert` (``backend``, ``memory``, ``recompute`` map to the conversion).
    A missing library raises :class:`MissingLibraryError` (an ``ImportError`` and a
    ``ValueError``) naming the package to install.
    """
    return model_info(name).builder(**kwargs)


# ----------------------------------------------------------------------------- library models


class MissingLibraryError(ImportError, ValueError):
    """A ``torchvision:`` / ``timm:`` model was asked for but that library is not installed."""


LIBRARIES = ("torchvision", "timm")


def _library_model(name: str) -> ModelInfo:
    library, _, model_name = name.partition(":")
    if library not in LIBRARIES:
        raise ValueError(f"unknown model library {library!r} in {name!r}; use torchvision:NAME or timm:NAME, or a "
                         "registered name (see resfast.models.list_models())")
    if not model_name:
        raise ValueError(f"model name missing after {library + ':'!r}")
    lib = _import_library(library, name)
    if library == "torchvision":
        known = lib.models.list_models()
        input_size = (3, 224, 224)
    else:
        known = lib.list_models()
        input_size = _timm_input_size(lib, model_name)
    if model_name not in known:
        import difflib

        close = difflib.get_close_matches(model_name, known, n=3)
        hint = f"; did you mean {', '.join(library + ':' + c for c in close)}?" if close else ""
        raise ValueError(f"unknown {library} model {model_name!r}{hint}")

    def builder(*, backend: str = "auto", memory: str = "shared", recompute: str = "bn_relu", convert: bool = True,
                **kwargs) -> nn.Module:
        for key in ("weights", "pretrained", "pretrained_cfg", "checkpoint_path"):
            if kwargs.get(key):
                raise ValueError(f"{name}: {key}={kwargs[key]!r} is not supported: library models are built with "
                                 "no pretrained weights (nothing is downloaded); load a state_dict instead")
            kwargs.pop(key, None)
        if library == "torchvision":
            model = lib.models.get_model(model_name, weights=None, **kwargs)
        else:
            model = lib.create_model(model_name, pretrained=False, **kwargs)
        if not convert:  # the library's own modules (resfast memory's "original" mode)
            return model
        from resfast.convert import convert as convert_model

        convert_model(model, backend=backend, dense_memory=memory, recompute=recompute)
        return model

    builder.__name__ = builder.__qualname__ = name.replace(":", "_")
    builder.__doc__ = f"{name} (built by {library}, converted with resfast.convert)"
    return ModelInfo(name, builder, input_size, "imagenet")


def _import_library(library: str, name: str):
    import importlib

    try:
        return importlib.import_module(library)
    except ImportError:
        raise MissingLibraryError(f"{name} needs {library}, which is not installed: pip install {library}") from None


def _timm_input_size(timm, model_name: str) -> Tuple[int, int, int]:
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
        size = tuple(getattr(cfg, "input_size", None) or ())
    except Exception:  # noqa: BLE001 (no default config: ImageNet size)
        size = ()
    return size if len(size) == 3 else (3, 224, 224)
