"""A training step (forward, cross-entropy, backward, SGD update) of whole models per backend.

``resnext50_32x4d`` and ``densenet121`` at batch 64, 224x224, and ``wrn28_10`` at batch 128,
32x32, on CUDA under bf16 autocast, channels_last; on the CPU batch 2 at a tiny resolution
(the suite must finish within minutes on 2 cores). The ``compile`` row (``torch.compile`` of
the eager-backend model, default mode: max-autotune on a whole model takes many minutes) runs
on CUDA only, late; the ``triton_graphs`` row (the triton-backend model under
``torch.compile(mode="reduce-overhead")``: its forward and backward in CUDA graphs, no host time
per launch; what ``resfast train --compile reduce-overhead`` runs) on CUDA only, last.
"""
from __future__ import annotations

import pytest
import torch

from bench_utils import IMPLS, compile_or_skip, measure, require_fused_backend, run_or_skip, timed_first_call, \
    training_step

# name -> (batch, resolution) on CUDA and on the CPU
MODELS = {
    "resnext50_32x4d": ((64, 224), (2, 32)),
    "densenet121": ((64, 224), (2, 32)),
    # 4x4 on the CPU: WRN-28-10's 640-channel 3x3 convs dominate the CPU suite's time otherwise.
    "wrn28_10": ((128, 32), (2, 4)),
}


GRAPHS = "triton_graphs"  # the triton-backend model under torch.compile(mode="reduce-overhead")


def _case(model: str, impl: str):
    priority = {"compile": 9, GRAPHS: 10}.get(impl, 5)
    return pytest.param(model, impl, marks=pytest.mark.bench_priority(priority), id=f"{model}-{impl}")


@pytest.mark.parametrize("model_name, impl", [_case(m, i) for m in MODELS for i in (*IMPLS, GRAPHS)])
def test_training_step(benchmark, env, model_name, impl):
    if impl in ("compile", GRAPHS) and not env.cuda:
        pytest.skip(f"{impl} rows of whole models run on CUDA only (compiling a whole model on the CPU takes "
                    "minutes of C++ compilation, and CUDA graphs need a GPU)")
    if impl in ("triton", "native", GRAPHS):
        require_fused_backend("triton" if impl == GRAPHS else impl, env)
    from resfast.models import create_model, model_info

    backend = {"compile": "eager", GRAPHS: "triton"}.get(impl, impl)
    model = run_or_skip(lambda: create_model(model_name, backend=backend), f"{model_name}(backend={backend!r})")
    info = model_info(model_name)
    (n, hw) = MODELS[model_name][0 if env.gpu else 1]
    classes = 1000 if info.dataset == "imagenet" else 10
    model = model.to(env.device, memory_format=env.memory_format)
    if impl == "compile":
        model = compile_or_skip(model, env, mode="default")
    elif impl == GRAPHS:
        model = compile_or_skip(model, env, mode="reduce-overhead")
    x = torch.randn(n, info.input_size[0], hw, hw, device=env.device).contiguous(memory_format=env.memory_format)
    target = torch.randint(0, classes, (n,), device=env.device)
    step = training_step(model, x, target, env)
    if impl == GRAPHS:
        graphed_step = step

        def step():  # a new iteration for the CUDA-graph trees (the last step's outputs may be overwritten)
            torch.compiler.cudagraph_mark_step_begin()
            return graphed_step()

    compiled = impl in ("compile", GRAPHS)
    loss, once_s = timed_first_call(step, f"{model_name} on {impl}", env, benchmark, compiled=compiled)
    assert torch.isfinite(loss), f"{model_name} {impl}: non-finite loss {loss}"
    benchmark.group = f"model {model_name} {hw}x{hw} N{n} {env.dtype_name}"
    benchmark.extra_info.update({"row": impl, "kind": "model", "baseline": "eager", "family": model_name,
                                 "mode": "train-step", "batch": n, "resolution": hw, **env.describe()})
    if compiled:
        benchmark.extra_info["compile_mode"] = "default" if impl == "compile" else "reduce-overhead"
    measure(benchmark, step, env, once_s=None if compiled else once_s, budget_s=1.0 if env.cuda else 0.3)
