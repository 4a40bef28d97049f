"""Where a training call's host time goes: forward and backward apart, the autograd thread, the
Python functions, hidden device synchronisations.

The H200 runs found the triton backend host-bound: at ResNeXt-50 stage 3 a forward + backward
took 1577 us called normally and 160 us replayed from a CUDA graph, and its forward alone 319
against 55 us, so about 1.2 ms of host time sat in the backward, where this machine's CPU
(launches stubbed, ``benchmarks/host_overhead.py``) accounts for about 0.25 ms. These helpers
take that call apart where it runs (``gpu_kernels_check.py``'s ``host`` phase uses them on
the GPU; the tests run them on the CPU):

* :func:`host_split`: host seconds of the forward and of ``.backward()`` per call, medians,
  with the GPU idle at each call's start, with autograd's device threads (as training runs)
  or with the backward on the calling thread;
* :func:`top_functions`: ``cProfile`` of the same call with the backward on the calling
  thread (``cProfile`` sees one thread), the functions with the most self time per call;
* :func:`sync_warnings`: ``torch.cuda.set_sync_debug_mode("warn")`` around two calls: every
  operation that makes the host wait for the GPU.
"""
from __future__ import annotations

import contextlib
import cProfile
import os
import pstats
import statistics
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["host_split", "top_functions", "sync_warnings", "short_path"]


def _no_sync() -> None:
    return None


def _thread_context(threads: bool):
    return contextlib.nullcontext() if threads else torch.autograd.set_multithreading_enabled(False)


def host_split(op: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, grad_out: torch.Tensor, calls: int = 20,
               sync: Callable[[], None] = _no_sync, threads: bool = True) -> Dict[str, float]:
    """Median host microseconds of ``op(x)`` (``fwd_us``) and of ``y.backward(grad_out)``
    (``bwd_us``) over ``calls`` calls after three warm-up calls, each call on a fresh leaf
    ``x`` and started with the device idle (``sync``, e.g. ``torch.cuda.synchronize``), so
    a synchronisation inside the call costs only the call's own device work. ``threads=False``:
    the backward runs on the calling thread (``torch.autograd.set_multithreading_enabled``)
    rather than on autograd's device thread."""
    if calls < 1:
        raise ValueError(f"host_split: calls must be >= 1, got {calls}")
    fwd: List[float] = []
    bwd: List[float] = []
    with _thread_context(threads):
        for i in range(calls + 3):
            x = x0.detach().requires_grad_(True)
            sync()
            t0 = time.perf_counter()
            y = op(x)
            t1 = time.perf_counter()
            y.backward(grad_out)
            t2 = time.perf_counter()
            if i >= 3:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
        sync()
    return {"fwd_us": statistics.median(fwd) * 1e6, "bwd_us": statistics.median(bwd) * 1e6, "calls": calls}


def short_path(path: str, root: Optional[str] = None) -> str:
    """A source path without the machine's own folders: from the package folder on under
    ``site-packages``, else relative to ``root`` (the checkout) when under it, else the file
    name."""
    marker = os.sep + "site-packages" + os.sep
    if marker in path:
        return path.split(marker, 1)[1]
    if root and path.startswith(os.path.join(root, "")):
        return os.path.relpath(path, root)
    return os.path.basename(path) if os.sep in path else path


def top_functions(step: Callable[[], Any], calls: int = 10, top: int = 25,
                  root: Optional[str] = None, threads: bool = False) -> List[Dict[str, Any]]:
    """``cProfile`` of ``calls`` calls of ``step`` (a whole training call) with the backward
    on the calling thread: the ``top`` functions by self time, per call (``self_us``,
    ``cum_us``, ``calls_per_step``); built-in functions appear under their own names.
    ``threads=True``: the backward on autograd's device thread, as training runs it; from
    Python 3.12 ``cProfile`` sees every thread (it uses ``sys.monitoring``), before that only
    the calling one."""
    if calls < 1:
        raise ValueError(f"top_functions: calls must be >= 1, got {calls}")
    profiler = cProfile.Profile()
    with _thread_context(threads):
        step()  # warm
        profiler.enable()
        try:
            for _ in range(calls):
                step()
        finally:
            profiler.disable()
    rows = []
    for (path, line, name), (_, ncalls, self_s, cum_s, _) in pstats.Stats(profiler).stats.items():
        where = f"{short_path(path, root)}:{line}({name})" if path != "~" else name
        rows.append({"function": where, "calls_per_step": ncalls / calls, "self_us": self_s / calls * 1e6,
                     "cum_us": cum_s / calls * 1e6})
    rows.sort(key=lambda r: -r["self_us"])
    return rows[:top]


def sync_warnings(step: Callable[[], Any], calls: int = 2) -> List[str]:
    """The distinct warnings PyTorch's CUDA sync debug mode raises over ``calls`` calls of
    ``step`` (backward on the calling thread, so its warnings reach this thread): each is an
    operation that blocked the host until the GPU caught up. Empty: no synchronisation."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught, _thread_context(False):
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sorted({str(w.message).strip().splitlines()[0][:240] for w in caught
                   if "synchroniz" in str(w.message).lower()})
