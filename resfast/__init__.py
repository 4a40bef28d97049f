"""resfast: fused Triton / CUDA kernels for ResNet, Wide ResNet, ResNeXt and DenseNet training.

Blocks take ``backend="auto" | "eager" | "triton" | "native"``; the eager backend is plain
PyTorch and is the reference every kernel matches.
"""
from __future__ import annotations

import importlib
from typing import Any

from resfast._version import __version__

from resfast import backends, functional  # noqa: E402
from resfast.backends import BackendUnavailableError, resolve_backend  # noqa: E402
from resfast.nn.fused import BNReLUConv2d  # noqa: E402

_LAZY = {
    "BasicBlock": "resfast.nn.blocks",
    "Bottleneck": "resfast.nn.blocks",
    "WideBasic": "resfast.nn.blocks",
    "ResNeXtBottleneck": "resfast.nn.blocks",
    "PreActBottleneck": "resfast.nn.blocks",
    "SEModule": "resfast.nn.blocks",
    "DenseLayer": "resfast.nn.dense",
    "DenseBlock": "resfast.nn.dense",
    "Transition": "resfast.nn.dense",
    "models": "resfast.models",
    "create_model": "resfast.models",
    "list_models": "resfast.models",
    "convert": "resfast.convert", "ConversionReport": "resfast.convert",
}

__all__ = [
    "__version__", "backends", "functional", "BackendUnavailableError", "resolve_backend", "BNReLUConv2d",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    # Blocks and models load on first use so `import resfast` stays cheap.
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name])
        value = mod if name == "models" else getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resfast' has no attribute {name!r}")
