"""Host time of resfast's op layer against plain PyTorch modules, on this machine's CPU.

    python benchmarks/host_op_layer.py [--backends modules,eager,native] [--shape 1,4,2,2] [--calls 300]

One training call (forward and backward) of ``BatchNorm2d -> ReLU -> Conv2d`` (3x3, groups 2,
channels_last) on tensors so small that the arithmetic is negligible, so what is timed is the
host path: ``modules`` is plain PyTorch (``nn.Sequential``), ``eager`` and ``native`` are
:func:`resfast.functional.bn_relu_conv2d` on those backends (argument checks, the op's
autograd, the ``torch.library`` dispatch, the running-statistics update, and the backend's
ops on the CPU). The difference to ``modules`` is what resfast's Python layer adds to a
call. Prints the best of 5 rounds per backend (microseconds per call). The triton backend is
left out: on the CPU it runs under the interpreter (``benchmarks/host_overhead.py`` times its
host code on the CUDA path instead).
"""
from __future__ import annotations

import argparse
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="modules,eager,native",
                        help="comma-separated: modules (plain PyTorch), eager, native")
    parser.add_argument("--shape", default="1,4,2,2", help="batch,channels,size,groups (default 1,4,2,2)")
    parser.add_argument("--calls", type=int, default=300, help="calls per timed round")
    args = parser.parse_args(argv)

    import torch
    from torch import nn

    from resfast.backends import BACKEND_TABLE
    from resfast.functional import bn_relu_conv2d

    torch.manual_seed(0)
    n, c, h, g = (int(v) for v in args.shape.split(","))
    cl = torch.channels_last
    x0 = torch.randn(n, c, h, h).contiguous(memory_format=cl)
    gy = torch.randn(n, c, h, h).contiguous(memory_format=cl)
    bn = nn.BatchNorm2d(c)
    conv = nn.Conv2d(c, c, 3, padding=1, groups=g, bias=False).to(memory_format=cl)
    seq = nn.Sequential(bn, nn.ReLU(), conv)

    def call(backend):
        x = x0.detach().requires_grad_()
        if backend == "modules":
            y = seq(x)
        else:
            y = bn_relu_conv2d(x, conv.weight, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
                               running_var=bn.running_var, training=True, padding=1, groups=g, backend=backend)
        y.backward(gy)

    why = {b.name: b.why_not("cpu") for b in BACKEND_TABLE}
    print(f"one training call (forward + backward), {n}x{c}x{h}x{h}, groups {g}, CPU, best of 5 rounds:")
    for backend in args.backends.split(","):
        if backend != "modules" and why.get(backend):
            print(f"  {backend:8s} skipped: {why[backend]}")
            continue
        for _ in range(20):
            call(backend)
        best = min(timeit.repeat(lambda: call(backend), number=args.calls, repeat=5)) / args.calls * 1e6
        print(f"  {backend:8s} {best:7.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
