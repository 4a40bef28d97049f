"""Counting kernel launches: aten ops that do work, and Triton kernel launches.

``with LaunchCounter() as c, c.triton_hook(): ...`` counts

* every aten op that does work (a ``TorchDispatchMode``; allocations, views and metadata
  queries launch no kernel and are not counted);
* every Triton kernel launch (a hook on the launch method of triton's kernel objects,
  compiled or interpreted). The ``resfast_triton`` ops are opaque to a dispatch mode, so their
  Python bodies run under the mode, which then sees the aten ops and launches inside them;
* each call of a native op (``torch.ops.resfast.*``) as one launch: its C++ body is not
  visible from Python, so for the native backend the count is a lower bound.

The count depends only on the program, not on the machine's load, so tests may assert it.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Callable, Dict, Iterator

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchCounter", "count_launches", "FREE_ATEN_OPS"]

#: aten ops that launch no kernel: allocation, views, metadata.
FREE_ATEN_OPS = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "view",
    "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
    "lift_fresh", "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "size", "stride", "dim", "_reshape_alias", "reshape", "split", "split_with_sizes",
    "unbind", "chunk", "narrow", "view_as", "expand_as", "_to_copy_view", "unfold", "diagonal",
})


class LaunchCounter(TorchDispatchMode):
    """Counts aten compute ops, native op calls and Triton launches inside ``with counter:``."""

    def __init__(self) -> None:
        super().__init__()
        self.aten: collections.Counter = collections.Counter()
        self.native: collections.Counter = collections.Counter()
        self.triton: collections.Counter = collections.Counter()
        self._in_launch = 0  # the interpreter moves a launch's tensors with aten ops of its own

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns == "resfast_triton":
            from resfast.ops import triton_ops

            with self:  # run the op's Python body where this mode sees its aten ops
                return getattr(triton_ops, func._opname)(*args, **kwargs)
        name = func._opname
        if ns == "resfast":
            self.native[name] += 1
        elif ns == "aten" and name not in FREE_ATEN_OPS and not getattr(func, "is_view", False) \
                and not self._in_launch:
            self.aten[name] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def triton_hook(self) -> Iterator["LaunchCounter"]:
        """Count launches of every Triton kernel object (compiled or interpreted); a no-op
        when triton is not installed."""
        try:
            import triton.runtime.interpreter as interp
            import triton.runtime.jit as jit
        except ImportError:
            yield self
            return
        patched = []
        for cls in (jit.JITFunction, interp.InterpretedFunction):
            orig = cls.run

            def run(kernel, *a, _orig=orig, **k):
                name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
                self.triton[str(name)] += 1
                self._in_launch += 1
                try:
                    return _orig(kernel, *a, **k)
                finally:
                    self._in_launch -= 1

            cls.run = run
            patched.append((cls, orig))
        try:
            yield self
        finally:
            for cls, orig in patched:
                cls.run = orig

    @property
    def total(self) -> int:
        """All counted launches."""
        return sum(self.aten.values()) + sum(self.native.values()) + sum(self.triton.values())

    def as_dict(self) -> Dict[str, int]:
        """``{"total", "aten", "native", "triton"}`` counts."""
        return {"total": self.total, "aten": sum(self.aten.values()), "native": sum(self.native.values()),
                "triton": sum(self.triton.values())}


def count_launches(fn: Callable[[], object]) -> Dict[str, int]:
    """The launches of one call of ``fn`` (see :class:`LaunchCounter`)."""
    counter = LaunchCounter()
    with counter.triton_hook(), counter:
        fn()
    return counter.as_dict()
