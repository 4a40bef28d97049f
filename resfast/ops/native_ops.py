"""The native op set ``torch.ops.resfast``: kernels of the compiled extension ``resfast._C``
(CUDA kernels for CUDA tensors, their C++ twin for CPU tensors). The schemas are registered
by ``csrc/resfast.cpp`` (equal to :data:`resfast.ops.schemas.SCHEMAS`, and the optional
``bn_relu_conv2d_backward_full`` to its entry in ``OPTIONAL_SCHEMAS``, which tests check);
this module adds the fake implementations, the autograd formula and the version bumps of the
arguments the ops write in place."""
from __future__ import annotations

import torch

import resfast._C  # noqa: F401  (loads TORCH_LIBRARY(resfast, m))
from resfast.ops import autograd, schemas

__all__ = ["OPS"]

OPS = torch.ops.resfast
schemas.register_fakes("resfast")
# bn_stats_update's running statistics are bumped by its ADInplaceOrView kernel in C++
# (csrc/resfast.cpp); the _out kernels write through raw pointers: their out is bumped here. (The
# one-op backward's C++ composite writes grad_x_out through bn_backward_elemt_out, which the
# dispatcher reaches with its ADInplaceOrView kernel, so that bump covers it; a second one of its
# own would cost another ~12 us of Python per call.)
schemas.register_version_bumps("resfast", ("bn_relu_conv2d_out", "bn_backward_elemt_out"))
autograd.register_autograd("resfast", OPS)
