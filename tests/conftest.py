import atexit
import os
import shutil
import sys
import tempfile

import pytest

# Triton kernels run on CPU tensors only through the interpreter, which must be chosen
# before triton is first imported. With a GPU the same tests run compiled.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

sys.path.insert(0, os.path.dirname(__file__))

# The Triton interpreter checks every 8/16/32-bit integer add, sub and mul of a kernel for
# overflow (InterpreterOptions.sanitize_overflow; compiled kernels check nothing unless built
# with debug=True): about 30% of the interpreter's time on the suite's kernels, whose tensors are
# far too small for a 32-bit offset to overflow (where real sizes could, the launch-limit tests
# check the offsets: tests/test_review_probe23.py). Off here; RESFAST_SANITIZE_OVERFLOW=1 turns it
# back on (`make test-device-env`'s interpreter run does).
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("RESFAST_SANITIZE_OVERFLOW") != "1":
    try:
        import triton.runtime.interpreter as _interp

        _interp.interpreter_builder.options = _interp.InterpreterOptions(sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):  # no triton, or one without the option
        pass

# backend="auto" measures each new call signature and remembers the winner in a cache file.
# The session gets its own cache folder (never the user's), and measuring is off unless the
# environment sets RESFAST_AUTOTUNE=1: auto then follows the static order (eager on the CPU),
# so every test sees the backend it was written for, deterministically and without measuring
# time. tests/test_autotune.py turns measuring on where it tests it.
os.environ["RESFAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="resfast-test-cache-")
atexit.register(shutil.rmtree, os.environ["RESFAST_CACHE_DIR"], True)
os.environ.setdefault("RESFAST_AUTOTUNE", "0")

# `make test` runs the suite in two pytest-xdist workers (one per core of a 2-core CI
# machine). Each worker keeps to one intra-op thread, so the two never oversubscribe the
# cores (torch's OpenMP threads spin-wait), and so do the processes the tests start
# (OMP_NUM_THREADS: autotune's cache key names the thread count, and a child must see the
# parent's). xdist's variables are taken out of the environment those children inherit:
# a child pytest would take itself for a worker (pytest-benchmark then refuses to run).
XDIST_WORKER = os.environ.pop("PYTEST_XDIST_WORKER", None)
if XDIST_WORKER:
    for _name in ("PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        os.environ.pop(_name, None)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch as _torch

        _torch.set_num_threads(1)
    except ImportError:
        pass


def pytest_report_header(config):
    import torch

    from resfast.backends import backend_status

    status = backend_status("cpu")
    runs = [k for k, v in status.items() if not v]
    return [f"torch {torch.__version__}; backends that run on cpu here: {runs}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}; cuda={torch.cuda.is_available()}"]


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_triton_plans():
    """Each test starts with an empty triton plan cache: tests patch the planners' configs and
    helpers, and a plan recorded by an earlier test would replay the unpatched launch."""
    mod = sys.modules.get("resfast.ops.triton_ops")
    if mod is not None:
        mod.clear_plan_cache()
    yield


# Kernel coverage, for trimming the suite without losing a kernel path: with
# RESFAST_RECORD_KERNELS=DIR, every Triton launch under the interpreter is recorded as its
# specialization (kernel name, constexpr values, tensor argument dtypes) against the test that
# made it; each process writes DIR/kernels-<pid>.json ({test node id: [keys]}) at exit, and
# DIR/cost-<pid>.json ({test node id: [CPU seconds, interpreted programs]}): the CPU time a test
# took (setup, call and teardown) and how many kernel programs the interpreter ran for it, two
# measures of a test's cost that, unlike its wall time, hardly move with the machine's load.
# `python tests/kernel_coverage.py DIR_BEFORE DIR_AFTER` compares two recordings.
_RECORD_DIR = os.environ.get("RESFAST_RECORD_KERNELS")
_RECORDED: dict = {}
_CURRENT_TEST = ["<collection>"]
_COST: dict = {}

if _RECORD_DIR and os.environ.get("TRITON_INTERPRET") == "1":
    import inspect
    import json

    try:
        from triton.runtime.interpreter import InterpretedFunction as _IF
    except ImportError:  # no triton: nothing to record
        _IF = None
    if _IF is not None:
        _orig_run = _IF.run

        def _recording_run(self, *args, grid, warmup, **kwargs):
            if not warmup:
                sig = inspect.signature(self.fn)
                bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
                parts = [self.fn.__name__]
                for name, value in bound.arguments.items():
                    ann = sig.parameters[name].annotation
                    if "constexpr" in str(ann):
                        parts.append(f"{name}={value!r}")
                    elif hasattr(value, "dtype") and hasattr(value, "data_ptr"):
                        parts.append(f"{name}:{str(value.dtype).replace('torch.', '')}")
                    elif hasattr(value, "base") and hasattr(value, "block_shape"):
                        parts.append(f"{name}:desc{list(value.block_shape)}")
                _RECORDED.setdefault(_CURRENT_TEST[0], set()).add(" ".join(parts))
                g = grid(bound.arguments) if callable(grid) else grid
                g = tuple(g) + (1, 1, 1)
                cost = _COST.setdefault(_CURRENT_TEST[0], [0.0, 0])
                cost[1] += int(g[0]) * int(g[1]) * int(g[2])
            return _orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)

        _IF.run = _recording_run

        def _write_recording():
            os.makedirs(_RECORD_DIR, exist_ok=True)
            path = os.path.join(_RECORD_DIR, f"kernels-{os.getpid()}.json")
            with open(path, "w") as f:
                json.dump({k: sorted(v) for k, v in _RECORDED.items()}, f)
            with open(os.path.join(_RECORD_DIR, f"cost-{os.getpid()}.json"), "w") as f:
                json.dump(_COST, f)

        atexit.register(_write_recording)


@pytest.fixture(autouse=True)
def _name_the_test_for_the_kernel_recording(request):
    _CURRENT_TEST[0] = request.node.nodeid
    if not _RECORD_DIR:
        yield
        return
    import time

    t0 = time.process_time()
    yield
    _COST.setdefault(request.node.nodeid, [0.0, 0])[0] += time.process_time() - t0


@pytest.fixture(scope="module")
def probe():
    """The native static probe (``resfast.profiling.static_native._probe``: the CUDA host code's
    plans, compiled with nvcc for sm_90 once a module), for the tests of which tiles a case takes
    (tests/test_native_multisample.py, _residue.py, _small_images.py); skips where it cannot be
    compiled."""
    from resfast.profiling import static_native as sn

    try:
        return sn._probe()
    except sn.NativeModelUnavailable as exc:
        pytest.skip(f"the static probe cannot be compiled here: {exc}")
