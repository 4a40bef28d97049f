"""Helpers shared by the benchmark suites: sizes, device, timing, and skipping rows that cannot run.

A row that cannot run here (a backend not built or not written yet, triton on the CPU, a model
not registered yet) is skipped with the reason; a row that runs and breaks fails.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch

__all__ = [
    "IMPLS",
    "BenchEnv",
    "autocast",
    "bench_env",
    "compile_or_skip",
    "cuda_sync_timer",
    "first_call",
    "gpu_sizes",
    "input_sets",
    "measure",
    "missing_reason",
    "require_fused_backend",
    "resfast_attr",
    "run_or_skip",
    "synchronize",
    "timed_first_call",
    "training_step",
]

# Row labels: the plain PyTorch modules, torch.compile of them, and resfast's kernel backends.
IMPLS = ("eager", "compile", "triton", "native")
TRITON_ON_CPU = ("triton runs on CPU tensors only under TRITON_INTERPRET=1, a NumPy interpreter that is "
                 "not a speed measurement; benchmarked on CUDA only")


def gpu_sizes() -> bool:
    """True when the real (GPU) sizes were asked for: ``--gpu-sizes`` or ``RESFAST_BENCH_SIZES=gpu``."""
    return os.environ.get("RESFAST_BENCH_SIZES", "").strip().lower() == "gpu"


class BenchEnv:
    """Device, dtype and layout the suite runs with (bf16 + channels_last on CUDA, float32 on the CPU)."""

    def __init__(self) -> None:
        wanted = os.environ.get("RESFAST_BENCH_DEVICE", "").strip()
        self.device = torch.device(wanted or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.gpu = gpu_sizes()
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.memory_format = torch.channels_last
        # Issue 3 compares against max-autotune. Its CUDA graphs copy every new input into the
        # graph's static buffer before a replay: for one op timed alone that copy costs about as
        # much as the op (a copy the op never makes inside a model), so the default keeps
        # max-autotune's kernel autotuning without CUDA graphs. RESFAST_BENCH_COMPILE_MODE picks
        # another mode. On the CPU max-autotune would only add minutes of C++ compilation.
        default_mode = "max-autotune-no-cudagraphs" if self.cuda else "default"
        self.compile_mode = os.environ.get("RESFAST_BENCH_COMPILE_MODE", "").strip() or default_mode
        self.l2_bytes = 50 * 2**20
        if self.cuda:
            prop = torch.cuda.get_device_properties(self.device)
            self.l2_bytes = int(getattr(prop, "L2_cache_size", 0) or self.l2_bytes)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")

    def describe(self) -> Dict[str, Any]:
        return {"device": self.device.type, "dtype": self.dtype_name, "sizes": "gpu" if self.gpu else "cpu",
                "memory_format": "channels_last"}


_ENV: Optional[BenchEnv] = None


def bench_env() -> BenchEnv:
    global _ENV
    if _ENV is None:
        _ENV = BenchEnv()
    return _ENV


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_sync_timer() -> float:
    """``time.perf_counter`` after ``torch.cuda.synchronize()``: the timer of every CUDA benchmark.

    pytest-benchmark reads it before and after each round of ``iterations`` calls, so a round's
    time covers the GPU work of all its calls (queued asynchronously) and nothing before it.
    """
    torch.cuda.synchronize()
    return time.perf_counter()


def input_sets(make: Callable[[], Any], bytes_per_set: int, env: BenchEnv, max_sets: int = 8) -> List[Any]:
    """Enough independent input sets that cycling through them does not run from the L2 cache.

    On CUDA the sets together are at least 3x the L2 cache (at most ``max_sets``); on the CPU one set.
    """
    n = 1
    if env.cuda and bytes_per_set > 0:
        n = max(1, min(max_sets, math.ceil(3 * env.l2_bytes / bytes_per_set)))
    return [make() for _ in range(n)]


def measure(benchmark, fn: Callable[[], Any], env: BenchEnv, *, once_s: Optional[float] = None,
            budget_s: Optional[float] = None, warmup: Optional[int] = None, max_iterations: int = 1000) -> None:
    """Time ``fn`` with pytest-benchmark after a warm-up, sizing rounds and iterations to a time budget.

    Warm-up calls keep compilation, autotuning and cuDNN's algorithm search out of the numbers.
    On CUDA each round runs ``iterations`` queued calls between two synchronising clock reads
    (``cuda_sync_timer``, installed by conftest.py), so launches overlap as in training and
    small kernels are not dominated by a synchronisation per call. With ``--benchmark-disable``
    ``fn`` runs once, untimed.

    ``once_s``: on the CPU, the time of a call already made (the row's first call, which then
    served as the warm-up); it saves a call, which matters for the slow rows of the CPU suite.
    """
    if benchmark.disabled:
        if not getattr(benchmark, "_resfast_ran_once", False):
            benchmark.pedantic(fn, rounds=1, iterations=1)
        return
    if budget_s is None:
        # Medians of >= 2 rounds of batched calls are stable well within this; the GPU check
        # has about 3 minutes for every row.
        budget_s = 0.4 if env.cuda else 0.3
    if env.cuda or once_s is None:
        for _ in range(3 if warmup is None and env.cuda else (1 if warmup is None else warmup)):
            fn()
        synchronize(env.device)
        start = time.perf_counter()
        fn()
        synchronize(env.device)
        once_s = time.perf_counter() - start
    once = max(once_s, 1e-7)
    # Rounds of >= ~5 ms (CUDA) / 20 ms (CPU) keep timer and synchronisation overhead small.
    target_round = 5e-3 if env.cuda else 2e-2
    iterations = int(max(1, min(max_iterations, target_round // once)))
    # A call slower than the whole budget gets one round (the CPU suite's slowest rows).
    min_rounds = 1 if once > budget_s else 2
    rounds = int(max(min_rounds, min(100, budget_s // (once * iterations))))
    benchmark.extra_info["rounds_x_iterations"] = f"{rounds}x{iterations}"
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1 if env.cuda else 0)


def timed_first_call(fn: Callable[[], Any], what: str, env: BenchEnv, benchmark=None, compiled: bool = False):
    """``(result, seconds)`` of the row's first call (see :func:`first_call`).

    With ``--benchmark-disable`` the call goes through ``benchmark.pedantic`` and is the row's
    only one (``measure`` then returns at once): the smoke run executes each body once.
    """
    start = time.perf_counter()
    if benchmark is not None and benchmark.disabled:
        out = benchmark.pedantic(lambda: first_call(fn, what, compiled=compiled), rounds=1, iterations=1)
        benchmark._resfast_ran_once = True
    else:
        out = first_call(fn, what, compiled=compiled)
    synchronize(env.device)
    return out, time.perf_counter() - start


def autocast(env: BenchEnv):
    """bf16 autocast on CUDA (mixed-precision training as it is run); nothing on the CPU (float32)."""
    if env.cuda:
        return torch.autocast("cuda", dtype=env.dtype)
    import contextlib

    return contextlib.nullcontext()


def training_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, env: BenchEnv) -> Callable[[], Any]:
    """One SGD training step of ``model`` on ``(x, target)``: forward, cross-entropy, backward, update."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(env):
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), target)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


# --------------------------------------------------------------------------- skipping

_NOT_THERE = (ImportError, NotImplementedError)


def missing_reason(exc: BaseException) -> Optional[str]:
    """The skip reason when ``exc`` says a backend, module or model is not there; ``None`` for real errors."""
    from resfast.backends import BackendUnavailableError

    if isinstance(exc, BackendUnavailableError):
        return str(exc)
    if isinstance(exc, _NOT_THERE):
        return f"not available yet: {type(exc).__name__}: {exc}"
    if isinstance(exc, ValueError) and "unknown model name" in str(exc):
        return f"model not registered yet: {exc}"
    return None


def run_or_skip(fn: Callable[[], Any], what: str) -> Any:
    """Call ``fn`` once; skip the row if it says something is not there, re-raise anything else."""
    try:
        return fn()
    except Exception as exc:
        reason = missing_reason(exc)
        if reason is None:
            raise
        pytest.skip(f"{what}: {reason}")


def resfast_attr(name: str):
    """``resfast.<name>`` (a block class), or skip when its module is not written yet."""
    import resfast

    try:
        return getattr(resfast, name)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"resfast.{name} is not available yet ({type(exc).__name__}: {exc})")


def require_fused_backend(impl: str, env: BenchEnv) -> None:
    """Skip unless resfast's backend ``impl`` (``triton`` / ``native``) can run on ``env.device``."""
    if impl == "triton" and not env.cuda:
        pytest.skip(TRITON_ON_CPU)
    from resfast.backends import backend_status
    from resfast.ops.opsets import get_ops

    why = backend_status(env.device)[impl]
    if why:
        pytest.skip(f"backend {impl!r} cannot run on {env.device.type}: {why}")
    run_or_skip(lambda: get_ops(impl), f"backend {impl!r}")


def compile_or_skip(module: torch.nn.Module, env: BenchEnv, mode: Optional[str] = None):
    """``torch.compile(module)`` with static shapes, after clearing Dynamo's caches.

    Every row compiles a fresh module of one shape: without the reset, Dynamo would mark the
    shapes dynamic after the second one and stop compiling after its cache size limit.
    """
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile needs torch >= 2.0")
    torch._dynamo.reset()
    return torch.compile(module, mode=mode or env.compile_mode, dynamic=False)


def first_call(fn: Callable[[], Any], what: str, compiled: bool = False) -> Any:
    """Run ``fn`` once before timing. For a compiled row, a compiler that cannot run here
    (no C++ compiler for Inductor's CPU code, say) skips the row with its message."""
    if not compiled:
        return run_or_skip(fn, what)
    try:
        return fn()
    except Exception as exc:
        if missing_reason(exc) is not None:
            pytest.skip(f"{what}: {missing_reason(exc)}")
        name = type(exc).__name__
        if "Compil" in name or "Backend" in name or "Inductor" in name or "dynamo" in type(exc).__module__:
            pytest.skip(f"{what}: torch.compile cannot compile here: {name}: {str(exc).splitlines()[0][:300]}")
        raise
