"""Triton's launch path without a GPU: a stand-in driver and compiled kernels whose launcher
does nothing (or logs what it is given).

``JITFunction.run`` asks the active driver for the device, the stream and the target, binds
the arguments (specialisation), finds or compiles the kernel and calls its launcher. With
:func:`install`, all of that runs on this machine's CPU except compilation, replaced by
``kernel_factory(jit_function)``, and the launch itself. ``benchmarks/host_overhead.py
--with-launch`` and ``benchmarks/triton_launch_cost.py`` time the Python part of launching
this way; ``tests/direct_launch_probe.py`` checks the plan cache's direct launches against it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["StandInDriver", "NullKernel", "install"]


class StandInDriver:
    """What ``JITFunction.run`` asks of the active driver: device 0, stream ``stream``, sm_90."""

    def __init__(self, stream: int = 0):
        from triton.backends.compiler import GPUTarget

        self.stream, self.target = stream, GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return self.stream

    def get_current_target(self):
        return self.target

    def is_active(self) -> bool:
        return True


class NullKernel:
    """A compiled kernel whose launcher does nothing."""

    function = 0
    packed_metadata: Any = ()

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args) -> None:
        return None


def install(kernel_factory: Optional[Callable[[Any], Any]] = None, stream: int = 0) -> None:
    """Make the stand-in driver active and compile every kernel as ``kernel_factory(fn)``
    (default: a :class:`NullKernel`), stored in the kernel cache as triton stores a compiled one."""
    from triton.runtime import driver, jit

    make = kernel_factory or (lambda fn: NullKernel())

    def compile_stand_in(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = self.device_caches[device][0][key] = make(self)
        return kernel

    driver.set_active(StandInDriver(stream))
    jit.JITFunction._do_compile = compile_stand_in
