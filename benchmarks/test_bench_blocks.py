"""Whole blocks, forward + backward: ``ResNeXtBottleneck``, ``WideBasic`` and ``DenseBlock``.

Each block is built once per row with ``backend=`` set to the row's backend; the ``compile``
row is ``torch.compile`` of the eager-backend block (CUDA only: on the CPU its C++ compilation
would take most of the suite's time budget). On CUDA under bf16 autocast, channels_last.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import pytest
import torch

from bench_utils import (IMPLS, autocast, compile_or_skip, input_sets, measure, require_fused_backend, resfast_attr,
                         run_or_skip, timed_first_call)


@dataclass(frozen=True)
class BlockSpec:
    cls: str
    kwargs: Dict[str, Any]
    channels: int
    gpu: Tuple[int, int]  # batch, spatial size at the real sizes
    cpu: Tuple[int, int]
    cpu_kwargs: Dict[str, Any] = field(default_factory=dict)  # overrides on the CPU


BLOCKS = {
    # ResNeXt-50 32x4d, a stage-3 block: 1x1 1024 -> 512, grouped 3x3 (32 groups of 16), 1x1 512 -> 1024.
    "resnext50-stage3": BlockSpec("ResNeXtBottleneck", dict(inplanes=1024, planes=256, cardinality=32, base_width=4),
                                  1024, (64, 14), (2, 4)),
    # WRN-28-10, a stage-2 block at width 320 (CIFAR, batch 128).
    "wrn28_10-stage2": BlockSpec("WideBasic", dict(in_planes=320, planes=320), 320, (128, 16), (2, 4)),
    # DenseNet-121's second dense block: 12 layers on 128 input channels, growth 32, shared memory.
    "densenet121-block2": BlockSpec("DenseBlock", dict(num_layers=12, num_input_features=128, bn_size=4,
                                                       growth_rate=32), 128, (64, 28), (2, 7),
                                    cpu_kwargs=dict(num_layers=6)),
}


def _case(block: str, impl: str):
    return pytest.param(block, impl, marks=pytest.mark.bench_priority(10 if impl == "compile" else 6),
                        id=f"{block}-{impl}")


@pytest.mark.parametrize("block_name, impl", [_case(b, i) for b in BLOCKS for i in IMPLS])
def test_block_forward_backward(benchmark, env, block_name, impl):
    spec = BLOCKS[block_name]
    if impl == "compile" and not env.cuda:
        pytest.skip("compile rows of whole blocks run on CUDA only (C++ compilation would take most of the "
                    "CPU suite's time budget); the op benchmarks carry the CPU compile comparison")
    if impl in ("triton", "native"):
        require_fused_backend(impl, env)
    cls = resfast_attr(spec.cls)
    kwargs = dict(spec.kwargs, **({} if env.gpu else spec.cpu_kwargs))
    backend = "eager" if impl in ("eager", "compile") else impl
    block = run_or_skip(lambda: cls(**kwargs, backend=backend), f"{spec.cls}(backend={backend!r})")
    block = block.to(env.device, memory_format=env.memory_format).train()
    model = compile_or_skip(block, env) if impl == "compile" else block

    n, hw = spec.gpu if env.gpu else spec.cpu
    act_dtype = env.dtype  # activations arrive in the autocast dtype from the previous block

    def make_x():
        x = torch.randn(n, spec.channels, hw, hw, device=env.device, dtype=act_dtype)
        return x.contiguous(memory_format=env.memory_format).requires_grad_(True)

    xs = input_sets(make_x, n * spec.channels * hw * hw * torch.finfo(act_dtype).bits // 8, env, max_sets=4)
    with torch.no_grad(), autocast(env):
        y0 = block(xs[0].detach())
    grads = [torch.randn_like(y0) for _ in xs]
    params = [p for p in block.parameters() if p.requires_grad]
    counter = [0]

    def step():
        i = counter[0] % len(xs)
        counter[0] += 1
        with autocast(env):
            y = model(xs[i])
        return torch.autograd.grad(y, [xs[i], *params], grads[i])

    out, once_s = timed_first_call(step, f"{spec.cls} on {impl}", env, benchmark, compiled=impl == "compile")
    assert torch.isfinite(out[0]).all(), f"{spec.cls} {impl}: non-finite input gradient"
    benchmark.group = f"block {block_name} {hw}x{hw}x{spec.channels} N{n} {env.dtype_name}"
    benchmark.extra_info.update({"row": impl, "kind": "block", "baseline": "eager", "family": block_name,
                                 "mode": "fwd+bwd", "block": spec.cls, "kwargs": kwargs,
                                 "shape": [n, spec.channels, hw, hw], **env.describe()})
    measure(benchmark, step, env, once_s=None if impl == "compile" else once_s)
