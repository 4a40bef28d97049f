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
