"""``get_ops(backend)``: the op set (:class:`resfast.ops.opset.OpSet`) of a concrete backend.

Where each op set lives is the ``opset`` column of :data:`resfast.backends.BACKEND_TABLE`
(``"module"`` or ``"module:attribute"``); loading it registers the backend's ops. The loads
are plain ``import`` statements (not ``importlib``) so that ``torch.compile`` traces through
them without a graph break; a test checks them against the table.
"""
from __future__ import annotations

from resfast.backends import BACKEND_NAMES, BackendUnavailableError

__all__ = ["get_ops"]


def _eager():
    from resfast.ops import reference

    return reference


def _triton():
    from resfast.ops.triton_ops import OPS

    return OPS


def _native():
    from resfast.ops.native_ops import OPS

    return OPS


_LOADERS = {"eager": _eager, "triton": _triton, "native": _native}
assert set(_LOADERS) == set(BACKEND_NAMES)


def get_ops(name: str):
    """The op set of backend ``name`` (``eager``, ``triton`` or ``native``)."""
    if name not in _LOADERS:
        raise ValueError(f"get_ops needs a concrete backend {BACKEND_NAMES}, got {name!r}")
    try:
        return _LOADERS[name]()
    except ImportError as exc:
        raise BackendUnavailableError(f"backend={name!r}: its op set cannot be loaded ({exc})") from exc
