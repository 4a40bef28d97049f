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
