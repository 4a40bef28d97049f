"""Which implementation runs an op: ``auto | eager | triton | native``.

One table, :data:`BACKEND_TABLE`, says for each concrete backend what it is, why it cannot
run on a device (empty when it can), where its op set lives and its place in ``auto``'s
static order; the CLI, the benchmarks and the tests read it instead of spelling the names.

``auto`` resolves to the first backend of the static order that can run on the device
(CUDA: ``triton``, then ``native``; elsewhere ``eager``). ``RESFAST_BACKEND`` overrides
``auto``. Asking for a backend that cannot run raises :class:`BackendUnavailableError`
that says why and what to install; nothing ever falls back silently.

This module imports nothing of :mod:`resfast.ops`: the op sets are named by module path
and loaded by :func:`resfast.ops.opsets.get_ops`, so data flows one way (``nn -> ops``).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Optional, Tuple, Union

import torch

__all__ = [
    "Backend",
    "BACKEND_TABLE",
    "BACKEND_NAMES",
    "BACKENDS",
    "BackendUnavailableError",
    "BackendOwner",
    "backend_status",
    "check_backend_name",
    "native_info",
    "resolve_backend",
    "triton_interpret",
]


class BackendUnavailableError(RuntimeError):
    """A backend was named explicitly but cannot run on the given device."""


def triton_interpret() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_IMPORTS: Dict[str, Tuple[Optional[ModuleType], str]] = {}


def _import(name: str, hint: str) -> Tuple[Optional[ModuleType], str]:
    """``(module, "")`` or ``(None, why)``; each module is tried once per process."""
    if name not in _IMPORTS:
        try:
            _IMPORTS[name] = (importlib.import_module(name), "")
        except Exception as exc:  # ImportError, or a broken install raising something else
            _IMPORTS[name] = (None, f"{name} is not importable ({type(exc).__name__}: {exc}); {hint}")
    return _IMPORTS[name]


def _triton_import() -> Tuple[Optional[ModuleType], str]:
    return _import("triton", "install it with `pip install triton`")


def _native_import() -> Tuple[Optional[ModuleType], str]:
    mod, err = _import("resfast._C", "reinstall resfast with a C++ compiler (and nvcc for CUDA): "
                                     "`RESFAST_BUILD_EXT=1 pip install --no-build-isolation -e .`")
    if mod is None:
        err = err.replace("resfast._C is not importable", "the compiled extension resfast._C is not available")
    return mod, err


def _eager_why_not(device_type: str) -> str:
    return ""


def _triton_why_not(device_type: str) -> str:
    _, err = _triton_import()
    if err:
        return err
    if device_type == "cuda":
        return "" if torch.cuda.is_available() else "no CUDA device is available"
    if device_type == "cpu":
        if triton_interpret():
            return ""
        return ("Triton kernels need CUDA tensors; CPU tensors run only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton), or use backend='eager' / 'native'")
    return f"Triton kernels do not run on {device_type} tensors"


def _native_why_not(device_type: str) -> str:
    mod, err = _native_import()
    if mod is None:
        return err
    if device_type == "cpu":
        return ""
    if device_type == "cuda":
        if not getattr(mod, "WITH_CUDA", False):
            return ("resfast._C was built without CUDA kernels (torch without CUDA or nvcc missing at build time); "
                    "rebuild with nvcc on the PATH")
        return "" if torch.cuda.is_available() else "no CUDA device is available"
    return f"resfast._C has no kernels for {device_type} tensors"


@dataclass(frozen=True)
class Backend:
    """One row of the backend table."""

    name: str
    #: What runs, in a few words (``resfast info``, docs).
    description: str
    #: ``"module"`` or ``"module:attribute"`` holding the op set (:class:`resfast.ops.opset.OpSet`).
    opset: str
    #: ``why_not(device_type)``: empty when the backend can run on that device type, else the reason.
    why_not: Callable[[str], str]
    #: Place in ``auto``'s static order on CUDA (lower first); ``None``: never chosen by ``auto`` on CUDA.
    cuda_priority: Optional[int]
    #: Place in ``auto``'s static order on the CPU; ``None``: never chosen by ``auto`` there.
    cpu_priority: Optional[int]


BACKEND_TABLE: Tuple[Backend, ...] = (
    Backend("eager", "plain PyTorch ops (the reference)", "resfast.ops.reference", _eager_why_not,
            cuda_priority=2, cpu_priority=0),
    Backend("triton", "Triton kernels (CUDA; the CPU only under TRITON_INTERPRET=1)", "resfast.ops.triton_ops:OPS",
            _triton_why_not, cuda_priority=0, cpu_priority=None),
    # On the CPU the native C++ kernels are the test twin of the CUDA kernels (the same tile
    # code), not a speed path: auto never picks them there.
    Backend("native", "the compiled extension resfast._C: CUDA kernels on GPUs, their C++ twin on the CPU",
            "resfast.ops.native_ops:OPS", _native_why_not, cuda_priority=1, cpu_priority=None),
)
BACKEND_NAMES: Tuple[str, ...] = tuple(b.name for b in BACKEND_TABLE)
BACKENDS: Tuple[str, ...] = ("auto", *BACKEND_NAMES)
_BY_NAME = {b.name: b for b in BACKEND_TABLE}


def backend(name: str) -> Backend:
    """The table row of a concrete backend."""
    return _BY_NAME[check_backend_name(name)] if name != "auto" else _raise_auto()


def _raise_auto():
    raise ValueError("'auto' is not a concrete backend; resolve it with resolve_backend(name, device)")


def native_info() -> Dict[str, object]:
    """What the compiled extension was built with: ``{"built", "cuda", "cuda_archs", "error"}``."""
    mod, err = _native_import()
    if mod is None:
        return {"built": False, "cuda": False, "cuda_archs": [], "error": err}
    cuda = bool(getattr(mod, "WITH_CUDA", False))
    try:
        from resfast._build_info import CUDA_ARCHS  # written by setup.py

        archs = CUDA_ARCHS if cuda else ""
    except ImportError:
        archs = ""
    return {"built": True, "cuda": cuda, "cuda_archs": [a for a in str(archs).split(";") if a], "error": ""}


def check_backend_name(name: str) -> str:
    """``name`` if it is one of :data:`BACKENDS`, else ``ValueError``."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


class BackendOwner:
    """Mixin of a module whose submodules run the fused ops (the zoo models, ``DenseBlock``):
    ``backend`` is a property, and setting it (``model.backend = "native"``) checks the name
    and sets the same backend on every submodule that has one, so the model then runs on it.
    (As a plain attribute it was read only when the submodules were built: assigning it later
    changed nothing, silently.) The submodules may still be set one by one afterwards; the
    owner's ``backend`` then says what it was last set to."""

    @property
    def backend(self) -> str:
        d = self.__dict__  # (a module pickled before the property kept it as "backend")
        return d["_backend"] if "_backend" in d else d.get("backend", "auto")

    @backend.setter
    def backend(self, name: str) -> None:
        name = check_backend_name(name)
        self.__dict__["_backend"] = name
        for sub in self.modules():  # type: ignore[attr-defined]
            if sub is not self and type(sub).__module__.startswith("resfast.") \
                    and isinstance(getattr(sub, "backend", None), str):
                sub.backend = name


def _device_type(device: Union[torch.device, str, None]) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def backend_status(device: Union[torch.device, str, None] = "cpu") -> Dict[str, str]:
    """``{backend: reason}`` for every concrete backend; an empty reason means it can run."""
    dt = _device_type(device)
    return {b.name: b.why_not(dt) for b in BACKEND_TABLE}


def static_order(device_type: str) -> Tuple[str, ...]:
    """The backends ``auto`` may pick on ``device_type``, in the static order."""
    key = (lambda b: b.cuda_priority) if device_type == "cuda" else (lambda b: b.cpu_priority)
    rows = [b for b in BACKEND_TABLE if key(b) is not None]
    return tuple(b.name for b in sorted(rows, key=key))


def resolve_backend(name: str = "auto", device: Union[torch.device, str, None] = "cpu") -> str:
    """The concrete backend (``eager``, ``triton`` or ``native``) that runs on ``device``.

    Raises :class:`BackendUnavailableError` when ``name`` (or ``RESFAST_BACKEND`` for ``auto``)
    names a backend that cannot run there.
    """
    return _resolve(name, _device_type(device), os.environ.get("RESFAST_BACKEND", "").strip())


@torch.compiler.assume_constant_result
def _resolve(name: str, device_type: str, env: str) -> str:
    # A constant while torch.compile traces: the answer depends only on the arguments and on
    # what is installed, so tracing never steps into the imports behind it.
    check_backend_name(name)
    if name == "auto":
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"RESFAST_BACKEND must be one of {BACKENDS}, got {env!r}")
            name = env
        else:
            for candidate in static_order(device_type):
                if not _BY_NAME[candidate].why_not(device_type):
                    return candidate
            name = "eager"
    why = _BY_NAME[name].why_not(device_type)
    if why:
        raise BackendUnavailableError(f"backend={name!r} cannot run on {device_type} tensors: {why}")
    return name
