"""pytest-benchmark suites of resfast, side by side: eager PyTorch, torch.compile, triton, native.

    pytest benchmarks --benchmark-only              # CPU, small sizes (within 5 minutes on 2 cores)
    pytest benchmarks --benchmark-disable           # smoke: each benchmark body once, untimed
    pytest benchmarks --benchmark-only --gpu-sizes  # CUDA, the real sizes (or RESFAST_BENCH_SIZES=gpu)

Each group's rows get their speedup over eager (and over torch.compile), achieved GB/s and the
fraction of the HBM bound (memory-bound rows) and memory ratios in ``extra_info`` (saved with
``--benchmark-json``), and a side-by-side table is printed at the end of the run.

``RESFAST_BENCH_BUDGET_S`` bounds the wall time of the run: once it is spent, the remaining
benchmarks are skipped (so a run under ``timeout`` still writes its JSON). Default: 240 s on
the CPU sizes (75 s with ``--benchmark-disable``), none with the GPU sizes; 0 turns it off.
"""
from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_START = time.monotonic()


def pytest_addoption(parser):
    group = parser.getgroup("resfast benchmarks")
    group.addoption("--gpu-sizes", action="store_true", default=False,
                    help="benchmark the real sizes (batch 64 ResNeXt-50 shapes, ...) on CUDA; "
                         "same as RESFAST_BENCH_SIZES=gpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_priority(n): run order of a benchmark (lower first)")
    if config.getoption("--gpu-sizes", default=False):
        os.environ["RESFAST_BENCH_SIZES"] = "gpu"
    from bench_utils import bench_env, gpu_sizes

    _budget_s(config)  # a malformed RESFAST_BENCH_BUDGET_S is a usage error before anything runs
    if gpu_sizes() and not bench_env().cuda:
        raise pytest.UsageError("--gpu-sizes / RESFAST_BENCH_SIZES=gpu needs a CUDA device (none is available, "
                                "or RESFAST_BENCH_DEVICE selects another)")
    if not bench_env().cuda:
        import torch

        # One intra-op thread by default: with more, a CPU shared with other work makes OpenMP
        # wait on descheduled threads and times jump tenfold (seen on the 2-core build machine).
        torch.set_num_threads(int(os.environ.get("RESFAST_BENCH_THREADS", "1")))


def pytest_report_header(config):
    from bench_utils import bench_env

    env = bench_env()
    budget = _budget_s(config)
    import torch

    return [f"resfast benchmarks: {env.describe()}, {torch.get_num_threads()} CPU thread(s), "
            f"torch.compile mode {env.compile_mode!r}, "
            f"time budget {'none' if budget is None else f'{budget:.0f}s'}"]


def _budget_s(config):
    raw = os.environ.get("RESFAST_BENCH_BUDGET_S", "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise pytest.UsageError(f"RESFAST_BENCH_BUDGET_S must be a number of seconds, got {raw!r}") from None
        return value if value > 0 else None
    from bench_utils import gpu_sizes

    if gpu_sizes():
        return None
    return 75.0 if config.getoption("benchmark_disable", default=False) else 240.0


def pytest_collection_modifyitems(config, items):
    # Most important rows first, so that a time budget cuts the least important ones.
    def priority(item):
        marker = item.get_closest_marker("bench_priority")
        return marker.args[0] if marker else 5

    items.sort(key=priority)  # stable: file and parameter order within a priority
    from bench_utils import bench_env, cuda_sync_timer

    if bench_env().cuda:
        for item in items:
            if "benchmark" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.benchmark(timer=cuda_sync_timer))


def pytest_runtest_setup(item):
    budget = _budget_s(item.config)
    if budget is not None and time.monotonic() - _START > budget:
        pytest.skip(f"the run's time budget of {budget:.0f}s is spent (RESFAST_BENCH_BUDGET_S)")


@pytest.fixture(scope="session")
def env():
    """Device, dtype, layout and torch.compile mode of this run (see bench_utils.BenchEnv)."""
    from bench_utils import bench_env

    return bench_env()


@pytest.fixture(autouse=True)
def _seed_and_free():
    import torch

    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _entries(config):
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return []
    return [(bench, bench.as_dict(include_data=False)) for bench in session.benchmarks if bench]


def _peak_bandwidth():
    from bench_utils import bench_env
    from gpu_report import peak_bandwidth

    env = bench_env()
    if not env.cuda:
        return None
    import torch

    return peak_bandwidth(torch.cuda.get_device_name(env.device))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # Before pytest-benchmark's own sessionfinish writes --benchmark-json: the ratios go into it.
    try:
        from gpu_report import add_ratios

        pairs = _entries(session.config)
        if pairs:
            add_ratios([d for _, d in pairs], _peak_bandwidth())
            for bench, d in pairs:
                bench.extra_info.update(d["extra_info"])
    except Exception as exc:  # a report problem must not hide the benchmark results
        print(f"resfast benchmarks: could not add ratios: {type(exc).__name__}: {exc}", file=sys.stderr)
    yield


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from gpu_report import render_bench_table

    pairs = _entries(config)
    terminalreporter.section("resfast: side by side")
    if not pairs:
        disabled = config.getoption("benchmark_disable", default=False)
        terminalreporter.write_line("no benchmark was timed" + (" (--benchmark-disable)" if disabled else ""))
        return
    terminalreporter.write_line(render_bench_table([d for _, d in pairs]))
