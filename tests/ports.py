"""Helpers for the tests that spawn ``torch.distributed`` (gloo) ranks: a free local TCP port,
spawning the ranks with a deadline, and leaving a rank without the interpreter's teardown."""
import os
import socket
import sys
import time

import pytest
import torch.multiprocessing as mp

#: Seconds the ranks of one test get before they are killed and the test fails.
DEADLINE_S = 300


def free_port() -> int:
    """A port on 127.0.0.1 that no one is listening on now (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, args, nprocs: int, deadline_s: float = DEADLINE_S) -> None:
    """``torch.multiprocessing.spawn(worker, args, nprocs)``, joined with a deadline: a rank
    that raises fails the test with its traceback, ranks still running after ``deadline_s``
    are killed and the test fails saying so (instead of the suite waiting forever)."""
    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=2):  # raises if a rank raised or died
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {nprocs} distributed ranks did not finish within {deadline_s:.0f} s (killed)")


def leave_rank() -> None:
    """End a rank that finished its work (process group destroyed, results written) at once:
    under torch 2.11 a gloo process group's destructor can deadlock at interpreter exit (its
    runloop thread waits for the GIL that the exiting main thread holds while joining it),
    which once left a rank, and with it the test suite, waiting forever."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
