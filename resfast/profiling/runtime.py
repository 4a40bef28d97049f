"""Where a measured step runs and where its results go: the device named on a command line,
the autocast context, and a writable output folder.

One copy of each, shared by ``resfast memory``, ``resfast train`` and ``resfast study``.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, Optional

import torch

__all__ = ["AMP_DTYPES", "autocast", "ensure_writable_dir", "resolve_device", "sync"]

#: ``resfast train --amp`` value -> autocast dtype (``None``: no autocast).
AMP_DTYPES: Dict[str, Optional[torch.dtype]] = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """The device ``name`` names: ``auto`` (CUDA when available, else the CPU), ``cpu``,
    ``cuda`` or ``cuda:N``. ``ValueError`` for any other name and for CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here (torch {torch.__version__})")
    return device


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; with ``dtype=None`` autocast is
    disabled inside the block (also when an outer block enabled it)."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ensure_writable_dir(path: str, what: str = "output folder") -> str:
    """Create the folder ``path`` (and its parents) and check that a file can be written in
    it, so that a long run fails before it starts rather than when it saves; ``ValueError``
    naming ``what`` otherwise. Returns ``path``."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".resfast-write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"{what} {path!r} is not a writable folder ({exc.strerror or exc})") from exc
    return path
