"""Host time of the triton backend's op implementations, without a GPU.

    python benchmarks/host_overhead.py [--shape resnext50_s1] [--no-plan-cache] [--with-launch]

What one fused training step (the forward in one op: statistics and conv; the backward in one
op: conv backward and BN input gradient) spends in
Python before its kernels run: checks, launch planning, the tile-config lookup, argument
binding, or with the plan cache its replay. Runs the CUDA code path (132 SMs, autotuned
launches, the plan cache) on ``meta`` tensors with every kernel launch stubbed out, so it
measures this machine's CPU, not a GPU; it leaves out the dispatcher and autograd around the
ops and triton's own launch cost. On an H200 (2026-11-29, benchmarks/README.md) the host code
of a ResNeXt-50 stage-1 step took longer than its kernels (1749 us per step against 499 us of
kernel time): this is the figure to drive down. Prints the best of 5 rounds per op.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import timeit

os.environ.pop("TRITON_INTERPRET", None)  # the CUDA code path, not the interpreter's

import torch  # noqa: E402

SHAPES = {  # batch, channels, spatial size, groups (bf16, channels_last, 3x3, stride 1)
    "resnext50_s1": (64, 128, 56, 32),
    "resnext50_s2": (64, 256, 28, 32),
    "resnext50_s3": (64, 512, 14, 32),
    "resnext50_s4": (64, 1024, 7, 32),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="resnext50_s1")
    parser.add_argument("--no-plan-cache", action="store_true", help="the full host code on every call")
    parser.add_argument("--rounds", type=int, default=300, help="calls per timed round")
    parser.add_argument("--with-launch", action="store_true",
                        help="keep triton's own launch path (a stand-in driver, compiled kernels whose launcher does "
                             "nothing) instead of stubbing each launch out: what the plan cache's direct launches "
                             "save (RESFAST_TRITON_DIRECT_LAUNCH=0 turns them off)")
    args = parser.parse_args(argv)

    import triton.runtime.jit as jit

    import resfast.ops.triton_ops as T

    # no GPU here: launches do nothing, the tuner is told config 0 was fastest, no capture
    if args.with_launch:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import stand_in_triton

        stand_in_triton.install()
    else:
        jit.JITFunction.__getitem__ = lambda self, grid: (lambda *a, **k: None)
    T._device = lambda x: contextlib.nullcontext()
    torch.cuda.is_current_stream_capturing = lambda: False
    T.TUNER._time = lambda launch: 0
    T.TUNER._save = lambda choices: None
    T.TUNER._choices = {}

    n, c, h, g = SHAPES[args.shape]
    meta = dict(device="meta")
    cl = torch.channels_last
    x = torch.empty(n, c, h, h, dtype=torch.bfloat16, **meta).contiguous(memory_format=cl)
    w = torch.empty(c, c // g, 3, 3, dtype=torch.bfloat16, **meta).contiguous(memory_format=cl)
    bw, bb, rm, rv, mean, inv, sdz = (torch.empty(c, **meta) for _ in range(7))
    go, gz = torch.empty_like(x), torch.empty_like(x)
    s = [1, 1]
    wrap = (lambda f: f) if args.no_plan_cache else T._plan_cached
    ops = {name: wrap(getattr(T, name)) for name in
           ("bn_relu_conv2d_train", "bn_relu_conv2d_backward_full", "bn_stats_update", "bn_relu_conv2d",
            "bn_relu_conv2d_backward", "bn_backward_elemt")}
    # A training step: the forward in one op (statistics and conv), the backward in one op (conv
    # backward and BN input gradient); the ops they compose (what a SyncBN call runs, with the
    # all-reduces between them) are timed after them.
    calls = {
        "bn_relu_conv2d_train": lambda: ops["bn_relu_conv2d_train"](x, w, None, bw, bb, rm, rv, 0.1, 1e-5, s, s, s,
                                                                    g),
        "bn_relu_conv2d_backward_full": lambda: ops["bn_relu_conv2d_backward_full"](
            go, x, w, bw, bb, mean, inv, s, s, s, g, False, None, False, True),
        "bn_stats_update": lambda: ops["bn_stats_update"](x, rm, rv, 0.1, 1e-5),
        "bn_relu_conv2d": lambda: ops["bn_relu_conv2d"](x, w, None, bw, bb, mean, inv, s, s, s, g, True),
        "bn_relu_conv2d_backward": lambda: ops["bn_relu_conv2d_backward"](go, x, w, bw, bb, mean, inv, s, s, s, g,
                                                                          False),
        "bn_backward_elemt": lambda: ops["bn_backward_elemt"](gz, x, bw, mean, inv, sdz, sdz, 1e-3),
    }
    in_step = ("bn_relu_conv2d_train", "bn_relu_conv2d_backward_full")
    total = 0.0
    how = ("triton's launch path kept, direct launches " + ("off" if os.environ.get("RESFAST_TRITON_DIRECT_LAUNCH") == "0"
                                                             else "on")) if args.with_launch else "launches stubbed"
    print(f"{args.shape}: host time per call, {how} ({'no plan cache' if args.no_plan_cache else 'plan cache'})")
    for name, f in calls.items():
        for _ in range(3):  # plan, record, replay
            f()
        best = min(timeit.repeat(f, number=args.rounds, repeat=5)) / args.rounds * 1e6
        if name in in_step:
            total += best
            print(f"  {name:30s} {best:7.1f} us")
        else:
            print(f"  {name:30s} {best:7.1f} us  (composed, as a SyncBN call runs: not in the step)")
        if name == in_step[-1]:
            print(f"  {'one training step':30s} {total:7.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
