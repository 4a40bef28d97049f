"""Dense-block memory modes: naive, checkpoint, shared, shared_bottleneck — time and peak bytes.

One training step (forward, loss, backward) of ``densenet121`` and of one dense block per
mode and backend. The peak and activation bytes come from
``resfast.profiling.memory.measure_training_step`` (exact live-tensor bytes from PyTorch's
memory tracker on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA), measured once
before timing and put into ``extra_info``; the conftest adds the ratios to ``naive/eager``
(issue 4: on CUDA, ``shared`` at least 1.3x faster than naive eager and 1.5x faster than
checkpoint, in far less memory). On CUDA: densenet121 at batch 64, 224x224, bf16 autocast,
channels_last.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from bench_utils import autocast, measure, require_fused_backend, run_or_skip, timed_first_call

# (mode, backend): naive and checkpoint on eager PyTorch are what the published
# implementations do; shared runs on each backend.
ROWS = [
    ("naive", "eager"), ("checkpoint", "eager"), ("shared", "eager"), ("shared_bottleneck", "eager"),
    ("shared", "triton"), ("shared_bottleneck", "triton"), ("shared", "native"),
]
# target -> ((batch, resolution) on CUDA, on the CPU)
SIZES = {
    "densenet121": ((64, 224), (2, 32)),
    # DenseNet-121's third dense block (24 layers on 256 channels at 14x14); 8 layers on the CPU.
    "denseblock3": ((64, 14), (2, 8)),
}
BLOCK = dict(num_layers=24, num_input_features=256, bn_size=4, growth_rate=32)
BLOCK_CPU = dict(BLOCK, num_layers=8)


def _build(target: str, memory: str, recompute: str, backend: str, env):
    if target == "densenet121":
        from resfast.models import create_model

        return create_model("densenet121", memory=memory, recompute=recompute, backend=backend)
    from bench_utils import resfast_attr

    cls = resfast_attr("DenseBlock")
    return cls(**(BLOCK if env.gpu else BLOCK_CPU), memory=memory, recompute=recompute, backend=backend)


# The rows of issue 4's GPU target run early under a time budget (see conftest.py).
TARGET_ROWS = {("densenet121", "naive", "eager"), ("densenet121", "checkpoint", "eager"),
               ("densenet121", "shared", "triton")}
CASES = [pytest.param(target, mode, backend, id=f"{mode}-{backend}-{target}",
                      marks=pytest.mark.bench_priority(1 if (target, mode, backend) in TARGET_ROWS else 4))
         for target in SIZES for mode, backend in ROWS]


@pytest.mark.parametrize("target, mode, backend", CASES)
def test_dense_memory_mode(benchmark, env, target, mode, backend):
    if backend != "eager":
        require_fused_backend(backend, env)
    memory_mod = run_or_skip(lambda: importlib.import_module("resfast.profiling.memory"), "resfast.profiling.memory")
    memory, recompute = memory_mod.MODES[mode]
    torch.manual_seed(0)
    model = run_or_skip(lambda: _build(target, memory, recompute, backend, env),
                        f"{target}(memory={memory!r}, backend={backend!r})")
    model = model.to(env.device, memory_format=env.memory_format).train()
    n, hw = SIZES[target][0 if env.gpu else 1]
    channels = 3 if target == "densenet121" else (BLOCK if env.gpu else BLOCK_CPU)["num_input_features"]
    x = torch.randn(n, channels, hw, hw, device=env.device).contiguous(memory_format=env.memory_format)
    if target != "densenet121":
        x = x.to(env.dtype).requires_grad_(True)

    peak = run_or_skip(
        lambda: memory_mod.measure_training_step(model, x, env.device, timed=False, launches=True,
                                                 autocast_dtype=env.dtype if env.cuda else None),
        "measure_training_step")

    def step():
        model.zero_grad(set_to_none=True)
        with autocast(env):
            out = model(x)
        loss = out.float().square().mean()
        loss.backward()
        return loss.detach()

    loss, once_s = timed_first_call(step, f"{target} {mode} on {backend}", env, benchmark)
    assert torch.isfinite(loss), f"{target} {mode}/{backend}: non-finite loss {loss}"
    benchmark.group = f"memory {target} {hw}x{hw}x{channels} N{n} {env.dtype_name}"
    benchmark.extra_info.update({
        "row": f"{mode}/{backend}", "kind": "memory", "baseline": "naive/eager", "family": target,
        "mode": "train-step", "memory_mode": mode, "backend": backend, "batch": n, "resolution": hw,
        "peak_bytes": int(peak["peak_bytes"]), "activation_bytes": int(peak["activation_bytes"]),
        "launches": int(peak["launches"]),
        "memory_source": "torch.cuda.max_memory_allocated" if env.cuda else "MemTracker", **env.describe(),
    })
    measure(benchmark, step, env, once_s=once_s, budget_s=1.0 if env.cuda else 0.3)
