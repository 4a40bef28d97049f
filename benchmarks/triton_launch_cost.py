"""Triton's own host cost per kernel launch, without a GPU.

    python benchmarks/triton_launch_cost.py [--shape resnext50_s1] [--calls 2000]

``fn[grid](*args, **constexprs)`` of each launch of one fused training step (the static
model's shapes, :data:`resfast.profiling.sm90.SHAPES`; each launch's first config), through
triton's real ``JITFunction.run``: the argument binder (specialisation of every integer and
pointer), the kernel-cache key, the global-value check and the launch-metadata call. A
stand-in driver answers the device and stream queries and the compiled kernel's ``run`` (the
C launcher, which needs a GPU) does nothing, so what is timed is the Python part of a launch
on this machine's CPU; the C launcher's argument packing and ``cuLaunchKernelEx`` come on top
on a GPU. Prints the best of 5 rounds per launch (microseconds) and the step's sum.
"""
from __future__ import annotations

import argparse
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)  # the JIT path, not the interpreter


def main(argv=None) -> int:
    from resfast.profiling import sm90

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(sm90.SHAPES), default="resnext50_s1")
    parser.add_argument("--calls", type=int, default=2000, help="launches per timed round")
    args = parser.parse_args(argv)

    import triton
    from triton.runtime import jit

    from resfast.profiling.static_model import training_plan

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import stand_in_triton

    stand_in_triton.install()
    plan = training_plan(sm90.SHAPES[args.shape])
    print(f"{args.shape}: triton {triton.__version__} JITFunction.run per launch (C launcher stubbed), best of 5:")
    total = {}
    for phase in ("fwd", "bwd"):
        for launch in plan[phase]:
            bound = launch.bind(launch.configs[0])
            fn = getattr(bound, "fn", None) or launch.fn
            kernel_cache, key_cache, _, _, binder = fn.device_caches[0]
            extra = dict(debug=False, instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
            _, specialization, options = binder(*bound.args, **bound.constexprs, **extra)
            kernel_cache[jit.compute_cache_key(key_cache, specialization, options)] = stand_in_triton.NullKernel()

            def call(fn=fn, bound=bound):
                fn[bound.grid](*bound.args, **bound.constexprs)

            call()
            us = min(timeit.repeat(call, number=args.calls, repeat=5)) / args.calls * 1e6
            total[phase] = total.get(phase, 0.0) + us
            print(f"  {phase:4s} {launch.name:22s} {len(bound.args):3d} args {us:7.1f} us")
    print(f"  one training step: {sum(total.values()):.1f} us (forward {total['fwd']:.1f}, backward {total['bwd']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
