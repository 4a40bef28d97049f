"""Which implementation runs an op: ``auto | eager | triton | native``.

``eager``  plain PyTorch ops, the reference, anywhere.
``triton`` Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``native`` the compiled extension ``resfast._C``: CUDA kernels for CUDA tensors (if it was
           built with CUDA), C++ kernels for CPU tensors.
``auto``   ``triton`` on CUDA when available, else ``native`` on CUDA, else ``eager``.
           ``RESFAST_BACKEND`` overrides ``auto``.

Asking for a backend that cannot run raises :class:`BackendUnavailableError` that says why
and what to install; nothing ever falls back silently.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Dict, Optional, Tuple, Union

import torch

BACKENDS = ("auto", "eager", "triton", "native")

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend_status",
    "check_backend_name",
    "get_ops",
    "native_info",
    "resolve_backend",
    "triton_interpret",
]


class BackendUnavailableError(RuntimeError):
    """A backend was named explicitly but cannot run on the given device."""


def triton_interpret() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import() -> Tuple[Optional[ModuleType], str]:
    try:
        import triton  # noqa: F401

        return triton, ""
    except Exception as exc:  # ImportError, or a broken install raising something else
        return None, f"triton is not importable ({type(exc).__name__}: {exc}); install it with `pip install triton`"


@functools.lru_cache(maxsize=None)
def _native_import() -> Tuple[Optional[ModuleType], str]:
    try:
        mod = importlib.import_module("resfast._C")
        return mod, ""
    except Exception as exc:
        return None, (
            f"the compiled extension resfast._C is not available ({type(exc).__name__}: {exc}); "
            "reinstall resfast with a C++ compiler (and nvcc for CUDA): "
            "`RESFAST_BUILD_EXT=1 pip install --no-build-isolation -e .`"
        )


def native_info() -> Dict[str, object]:
    """What the compiled extension was built with: ``{"built", "cuda", "cuda_archs", "error"}``."""
    mod, err = _native_import()
    if mod is None:
        return {"built": False, "cuda": False, "cuda_archs": [], "error": err}
    cuda = bool(getattr(mod, "WITH_CUDA", False))
    try:
        from resfast import _build_info  # written by setup.py

        archs = _build_info.CUDA_ARCHS if cuda else ""
    except ImportError:
        archs = ""
    return {"built": True, "cuda": cuda, "cuda_archs": [a for a in str(archs).split(";") if a], "error": ""}


def check_backend_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def _device_type(device: Union[torch.device, str, None]) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def _why_not(name: str, device_type: str) -> str:
    """Empty string when backend ``name`` can run on ``device_type``; otherwise the reason."""
    if name == "eager":
        return ""
    if name == "triton":
        _, err = _triton_import()
        if err:
            return err
        if device_type == "cuda":
            return "" if torch.cuda.is_available() else "no CUDA device is available"
        if device_type == "cpu":
            if triton_interpret():
                return ""
            return (
                "Triton kernels need CUDA tensors; CPU tensors run only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton), or use backend='eager' / 'native'"
            )
        return f"Triton kernels do not run on {device_type} tensors"
    if name == "native":
        mod, err = _native_import()
        if mod is None:
            return err
        if device_type == "cpu":
            return ""
        if device_type == "cuda":
            if not getattr(mod, "WITH_CUDA", False):
                return (
                    "resfast._C was built without CUDA kernels (torch without CUDA or nvcc missing at "
                    "build time); rebuild with nvcc on the PATH"
                )
            return "" if torch.cuda.is_available() else "no CUDA device is available"
        return f"resfast._C has no kernels for {device_type} tensors"
    raise AssertionError(name)


def backend_status(device: Union[torch.device, str, None] = "cpu") -> Dict[str, str]:
    """``{backend: reason}`` for eager/triton/native; an empty reason means it can run."""
    dt = _device_type(device)
    return {name: _why_not(name, dt) for name in ("eager", "triton", "native")}


def resolve_backend(name: str = "auto", device: Union[torch.device, str, None] = "cpu") -> str:
    """The concrete backend (``eager``, ``triton`` or ``native``) that runs on ``device``.

    Raises :class:`BackendUnavailableError` when ``name`` (or ``RESFAST_BACKEND`` for ``auto``)
    names a backend that cannot run there.
    """
    check_backend_name(name)
    dt = _device_type(device)
    if name == "auto":
        env = os.environ.get("RESFAST_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"RESFAST_BACKEND must be one of {BACKENDS}, got {env!r}")
            name = env
        else:
            if dt == "cuda":
                for candidate in ("triton", "native"):
                    if not _why_not(candidate, dt):
                        return candidate
            return "eager"
    why = _why_not(name, dt)
    if why:
        raise BackendUnavailableError(f"backend={name!r} cannot run on {dt} tensors: {why}")
    return name


def get_ops(backend: str):
    """The op set of a concrete backend.

    Every backend provides the same five ops with the same signatures (see
    :mod:`resfast.ops.eager_impl` for the reference semantics): ``bn_stats``,
    ``bn_relu_conv2d``, ``bn_relu_conv2d_out``, ``bn_relu_conv2d_backward`` and
    ``bn_backward_elemt``.
    """
    if backend == "eager":
        from resfast.ops import eager_impl

        return eager_impl
    if backend == "triton":
        from resfast.ops import triton_ops  # registers torch.ops.resfast_triton

        return torch.ops.resfast_triton
    if backend == "native":
        mod, err = _native_import()
        if mod is None:
            raise BackendUnavailableError(f"backend='native': {err}")
        from resfast.ops import registration

        registration.register_native()
        return torch.ops.resfast
    raise ValueError(f"get_ops needs a concrete backend (eager, triton, native), got {backend!r}")
