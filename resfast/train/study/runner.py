"""``run_study``: run the chosen sections, write ``study.md``, its figures and the raw numbers."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any, Dict, Optional, Sequence

import torch

from resfast.profiling.runtime import ensure_writable_dir, resolve_device
from resfast.train.study.config import SECTIONS, Scale
from resfast.train.study.report import render_markdown
from resfast.train.study.sections import RUNNERS, Context, NotAvailable

__all__ = ["run_study"]


def run_study(scale: Scale, *, out: str = "docs", device: str = "auto", backend: str = "auto",
              data_dir: Optional[str] = None, sections: Sequence[str] = SECTIONS, seed: int = 0,
              threads: Optional[int] = None) -> Dict[str, Any]:
    """Run the chosen ``sections`` at ``scale``; write ``out/study.md``, ``out/figures/study_*.png``
    and ``out/figures/study_results.json``; return the measurements. ``threads``: CPU threads
    for torch (default: torch's own choice)."""
    from resfast.backends import resolve_backend

    if threads is not None:
        torch.set_num_threads(threads)

    dev = resolve_device(device)
    resolved = resolve_backend(backend, dev)  # a backend that cannot run here fails before anything runs
    ensure_writable_dir(out, "--out")
    fig_dir = ensure_writable_dir(os.path.join(out, "figures"), "the figures folder")
    ctx = Context(scale, dev, backend, data_dir, fig_dir, seed)
    t0 = time.perf_counter()
    results: Dict[str, Any] = {"setup": _setup(scale, dev, backend, resolved), "sections": {}}
    results["setup"]["threads_option"] = threads
    for name in SECTIONS:
        if name not in sections:
            continue
        print(f"study [{scale.name}]: {name}", file=sys.stderr, flush=True)
        s0 = time.perf_counter()
        try:
            section = RUNNERS[name](ctx)
        except NotAvailable as exc:
            section = {"available": False, "reason": str(exc)}
        except Exception as exc:  # one failing section must not lose the others
            traceback.print_exc(file=sys.stderr)
            section = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
        section["time_s"] = time.perf_counter() - s0
        results["sections"][name] = section
    if any(name in sections for name in ("wide_vs_deep", "dropout", "resnext")):
        train_set, test_set = ctx.datasets()
        results["setup"]["train_images"], results["setup"]["test_images"] = len(train_set), len(test_set)
    results["total_time_s"] = time.perf_counter() - t0
    results["setup"]["total_time_s"] = results["total_time_s"]
    _write_atomic(os.path.join(fig_dir, "study_results.json"), json.dumps(results, indent=2, default=str))
    _write_atomic(os.path.join(out, "study.md"), render_markdown(results))
    return results


def _setup(scale: Scale, device: torch.device, backend: str, resolved: str) -> Dict[str, Any]:
    from resfast._version import __version__

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"scale": scale.name, "data": scale.data, "image_size": scale.image_size, "subset": scale.subset,
            "batch_size": scale.batch_size, "learned_acc": scale.learned_acc, "device": str(device),
            "device_name": dev_name, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "backend": backend, "resolved_backend": resolved, "torch": torch.__version__, "resfast": __version__,
            "python": platform.python_version(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
