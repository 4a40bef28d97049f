"""Run by tests/test_plan_cache.py in a subprocess without TRITON_INTERPRET: the plan cache's
direct launches (``kernel.run`` with rebuilt arguments) against triton's own ``JITFunction.run``,
on the CUDA code path with meta tensors, a stand-in driver and compiled kernels that record
their launches instead of running (no GPU). Prints one JSON document.
``PROBE_HOOK=1``: a launch hook is registered before the third call (the replays must then go
through ``fn[grid]``, which calls it)."""
from __future__ import annotations

import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402

import stand_in_triton  # noqa: E402

LOG = []


class Kernel:
    """A compiled kernel whose launcher logs what it was given."""

    def __init__(self, name):
        self.name, self.function, self.packed_metadata = name, 11, ("meta",)

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gx, gy, gz, stream, function, packed, launch_metadata, enter, leave, *args):
        LOG.append({"kernel": self.name, "grid": [gx, gy, gz], "stream": stream, "function": function,
                    "packed": list(packed), "hooks": [type(h).__name__ for h in (launch_metadata, enter, leave)],
                    "args": [("T", list(a.shape), str(a.dtype), list(a.stride())) if isinstance(a, torch.Tensor)
                             else repr(a) for a in args]})


def _hook(metadata):
    return None


def main():
    stand_in_triton.install(lambda fn: Kernel(fn.fn.__name__), stream=77)
    import resfast.ops.triton_ops as T

    T._device = lambda x: contextlib.nullcontext()
    torch.cuda.is_current_stream_capturing = lambda: False
    T.TUNER._time = lambda launch: 0
    T.TUNER._save = lambda choices: None
    T.TUNER._choices = {}
    meta = dict(device="meta")
    cl = torch.channels_last
    n, c, h, g = 8, 128, 14, 32
    x = torch.empty(n, c, h, h, dtype=torch.bfloat16, **meta).contiguous(memory_format=cl)
    w = torch.empty(c, c // g, 3, 3, dtype=torch.bfloat16, **meta).contiguous(memory_format=cl)
    bw, bb, rm, rv, mean, inv, sdz = (torch.empty(c, **meta) for _ in range(7))
    go, gz = torch.empty_like(x), torch.empty_like(x)
    gbuf = torch.empty(n, c + 32, h, h, dtype=torch.bfloat16, **meta).contiguous(memory_format=cl)
    s = [1, 1]
    calls = {
        "bn_stats_update": lambda op: op(x, rm, rv, 0.1, 1e-5),
        "bn_relu_conv2d": lambda op: op(x, w, None, bw, bb, mean, inv, s, s, s, g, True),
        "bn_relu_conv2d_backward": lambda op: op(go, x, w, bw, bb, mean, inv, s, s, s, g, False),
        "bn_backward_elemt": lambda op: op(gz, x, bw, mean, inv, sdz, sdz, 1e-3),
        # the training forward's and backward's one ops (the pairs above in one plan each)
        "bn_relu_conv2d_train": lambda op: op(x, w, None, bw, bb, rm, rv, 0.1, 1e-5, s, s, s, g),
        "bn_relu_conv2d_backward_full": lambda op: op(go, x, w, bw, bb, mean, inv, s, s, s, g, False, gbuf[:, :c],
                                                      True, True),
    }
    out = {"triton": triton.__version__, "ops": {}}
    for name, call in calls.items():
        op = T._plan_cached(getattr(T, name))
        per_call = []
        for i in range(4):  # full, recorded, replayed, replayed
            if i == 2 and os.environ.get("PROBE_HOOK") == "1":  # a profiler's launch hook from here on
                triton.knobs.runtime.launch_enter_hook.add(_hook)
            del LOG[:]
            call(op)
            per_call.append(list(LOG))
        if os.environ.get("PROBE_HOOK") == "1":
            triton.knobs.runtime.launch_enter_hook.remove(_hook)
        out["ops"][name] = {"calls": per_call, "events": _events(T, name)}
    print(json.dumps(out))


def _events(T, name):
    """How many launches the recorded plan of ``name`` replays directly and through ``fn[grid]``."""
    for sig, replay in T._PLAN_CACHE.items():
        if sig[0] == name:
            return {"direct": sum(ev[0] == "direct" for ev in replay.events),
                    "launch": sum(ev[0] == "launch" for ev in replay.events)}
    return None


if __name__ == "__main__":
    main()
