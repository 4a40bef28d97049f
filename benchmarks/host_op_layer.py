"""Host time of resfast's op layer against plain PyTorch modules, on this machine's CPU.

    python benchmarks/host_op_layer.py [--backends modules,eager,native,triton-stub] [--shape 1,4,2,2]
                                       [--calls 300] [--split] [--top N]

One training call (forward and backward) of ``BatchNorm2d -> ReLU -> Conv2d`` (3x3, groups 2,
channels_last) on tensors so small that the arithmetic is negligible, so what is timed is the
host path: ``modules`` is plain PyTorch (``nn.Sequential``), ``eager`` and ``native`` are
:func:`resfast.functional.bn_relu_conv2d` on those backends (argument checks, the op's
autograd, the ``torch.library`` dispatch, the running-statistics update, and the backend's
ops on the CPU). The difference to ``modules`` is what resfast's Python layer adds to a
call. Prints the best of 5 rounds per backend (microseconds per call).

``triton-stub``: the triton backend's whole host path (the op layer, autograd, the plan
cache's replay) with every kernel launch stubbed out; on the CPU it runs under the
interpreter, so this sets ``TRITON_INTERPRET=1`` and leaves out triton's own launch cost
(``benchmarks/host_overhead.py`` times the ops' host code on the CUDA code path instead).
``--split``: also the forward and the backward apart (medians, ``benchmarks/host_profile.py``);
``--top N``: the N functions with the most self time per call (``cProfile``).
"""
from __future__ import annotations

import argparse
import os
import sys
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="modules,eager,native",
                        help="comma-separated: modules (plain PyTorch), eager, native, triton-stub")
    parser.add_argument("--shape", default="1,4,2,2", help="batch,channels,size,groups (default 1,4,2,2)")
    parser.add_argument("--calls", type=int, default=300, help="calls per timed round")
    parser.add_argument("--split", action="store_true", help="also time the forward and the backward apart")
    parser.add_argument("--top", type=int, default=0, metavar="N", help="print the N functions with the most self time")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - {"modules", "eager", "native", "triton-stub"})
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; choose from modules, eager, native, triton-stub")
    if "triton-stub" in backends:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: on the CPU triton runs interpreted

    import torch
    from torch import nn

    import host_profile
    from resfast.backends import BACKEND_TABLE
    from resfast.functional import bn_relu_conv2d

    if "triton-stub" in backends:
        try:
            import triton.runtime.interpreter as interpreter
        except ImportError:
            interpreter = None
        if interpreter is not None:  # every launch does nothing: the host path alone
            interpreter.InterpretedFunction.__getitem__ = lambda self, grid: (lambda *a, **k: None)

    torch.manual_seed(0)
    n, c, h, g = (int(v) for v in args.shape.split(","))
    cl = torch.channels_last
    x0 = torch.randn(n, c, h, h).contiguous(memory_format=cl)
    gy = torch.randn(n, c, h, h).contiguous(memory_format=cl)
    bn = nn.BatchNorm2d(c)
    conv = nn.Conv2d(c, c, 3, padding=1, groups=g, bias=False).to(memory_format=cl)
    seq = nn.Sequential(bn, nn.ReLU(), conv)

    def forward(backend, x):
        if backend == "modules":
            return seq(x)
        return bn_relu_conv2d(x, conv.weight, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
                              running_var=bn.running_var, training=True, padding=1, groups=g,
                              backend=backend.replace("-stub", ""))

    def call(backend):
        forward(backend, x0.detach().requires_grad_()).backward(gy)

    why = {b.name: b.why_not("cpu") for b in BACKEND_TABLE}
    print(f"one training call (forward + backward), {n}x{c}x{h}x{h}, groups {g}, CPU, best of 5 rounds:")
    for backend in backends:
        reason = why.get(backend.replace("-stub", "")) if backend != "modules" else None
        if reason:
            print(f"  {backend:11s} skipped: {reason}")
            continue
        for _ in range(20):
            call(backend)
        best = min(timeit.repeat(lambda: call(backend), number=args.calls, repeat=5)) / args.calls * 1e6
        line = f"  {backend:11s} {best:7.1f} us"
        if args.split:
            split = host_profile.host_split(lambda x, b=backend: forward(b, x), x0, gy, calls=max(args.calls, 5))
            line += f"  (forward {split['fwd_us']:.1f} us, backward {split['bwd_us']:.1f} us, medians)"
        print(line)
        if args.top > 0:
            for r in host_profile.top_functions(lambda b=backend: call(b), calls=max(args.calls // 10, 5), top=args.top,
                                                root=ROOT):
                print(f"      {r['self_us']:7.1f} us self {r['cum_us']:8.1f} us cum  {r['calls_per_step']:5.1f}x  "
                      f"{r['function']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
