"""The triton kernels on a GPU in about four minutes: parity on realistic shapes, then timings.

    python benchmarks/gpu_kernels_check.py OUTDIR [--budget-s 230] [--no-compile] [--quick]

Phases, each within what is left of the budget (a phase that does not fit is skipped and says so):

1. ``parity``: the fused op on the triton backend against the float64 reference with the
   project's rule (``tests/reference.py``) - output, grad x, grad conv weight, grad BN weight
   and bias, running mean and var - on ResNeXt-50 stages 1-4 and a stride-2 first block,
   DenseNet-121's 1x1 and 3x3 convs, a depthwise 3x3 and a WRN 3x3; batch 8, bf16,
   channels_last, realistic channels and sizes; the plan cache's replays (direct launches)
   bit for bit against the first call on three shapes; plus NaN placement in packed groups.
2. ``timing``: ResNeXt-50 stages 1-4 (batch 64, bf16, channels_last, training): eager
   (``BatchNorm2d -> ReLU(inplace) -> Conv2d``), triton and, while the budget allows,
   ``torch.compile(mode="max-autotune-no-cudagraphs")`` of the same modules, and native where
   its compiled extension is built (run after ``gpu_check.sh``, which builds it); then each
   with the step captured in a CUDA graph (``eager_graph``, ``triton_graph``,
   ``native_graph``: no host time per replay; the 2026-11-29 run found both backends' steps
   host-bound), and at stage 1 ``torch.compile(mode="reduce-overhead")`` of the triton
   fused op and of the eager modules (``triton_ro``, ``compile_ro``: CUDA graphs the way a
   user gets them, fwd+bwd only); ``fwd`` and ``fwd+bwd``; CUDA-event medians after warm-up. The first call of each row (compilation,
   autotuning) is timed separately: autotuning runs once per bucketed shape and its choice
   is cached on disk (``triton-tune.json`` in ``RESFAST_CACHE_DIR``, here OUTDIR).
3. ``host``: where a training call's host time goes at ResNeXt-50 stage 3 (host-bound on the
   H200), per backend: forward and backward host time apart, with autograd's device thread
   and with the backward on the calling thread, the Python functions with the most self time
   (``cProfile``), every operation that synchronises with the GPU, the triton plan cache's
   replays (``benchmarks/host_profile.py``).
4. ``chain``: statistics in the epilogue, measured: ResNeXt-50 stage 1's bn1-relu-conv2
   (grouped 3x3) -> bn2-relu-conv3 (1x1) pair, training forward + backward on triton, chained
   (conv2 takes bn2's statistics in its epilogue) against two statistics passes.
5. ``profile``: the triton kernels of one training step (``torch.profiler``) of each of
   ResNeXt-50 stages 1-4 and DenseNet-121's 1x1 and 3x3 convs (batch 64) while the budget
   allows, with the tile config the autotuner chose for each launch and each kernel's grid,
   block, registers and shared memory as the device ran it: measured beside the
   static model's per-kernel predictions, and the data ``benchmarks/static_calibrate.py``
   fits the model's latency constants to (``profiles``; ``profile`` is the first shape's).
6. ``candidates``: configs outside the lists (register caps that buy occupancy but spill, which
   the static model does not price), each timed beside its launch's listed configs.

Writes ``OUTDIR/gpu_kernels.json`` (schema ``resfast-gpu-kernels/1``) and prints a summary.
Exit status 0 when every parity check that ran passed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # host_profile, static_calibrate

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# (name, N for parity, C, H, C_out, k, stride, groups)
PARITY = [
    ("resnext50_s1", 8, 128, 56, 128, 3, 1, 32),
    ("resnext50_s2", 8, 256, 28, 256, 3, 1, 32),
    ("resnext50_s3", 8, 512, 14, 512, 3, 1, 32),
    ("resnext50_s4", 8, 1024, 7, 1024, 3, 1, 32),
    ("resnext50_s2_down", 8, 256, 56, 256, 3, 2, 32),
    ("densenet121_1x1", 8, 224, 56, 128, 1, 1, 1),
    ("densenet121_3x3", 8, 128, 28, 32, 3, 1, 1),
    ("depthwise_3x3", 8, 64, 28, 64, 3, 1, 64),
    ("wrn28_10_s2", 8, 320, 16, 320, 3, 1, 1),
]
# (name, C, H, groups): ResNeXt-50 32x4d conv2, batch 64, stride 1, 3x3
TIMING = [("resnext50_s1", 128, 56, 32), ("resnext50_s2", 256, 28, 32), ("resnext50_s3", 512, 14, 32),
          ("resnext50_s4", 1024, 7, 32)]
HBM = {"H100": 3.35e12, "H200": 4.8e12}


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _log(msg: str) -> None:
    print(msg, flush=True)


def _inputs(n, c, h, co, k, groups, dtype, seed, requires_grad=True, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    cl = torch.channels_last
    x = (torch.randn(n, c, h, h, generator=g) * 1.1 + 0.2).to(device, dtype).contiguous(memory_format=cl)
    w = (torch.randn(co, c // groups, k, k, generator=g) / math.sqrt(c // groups * k * k)).to(device, dtype)
    w = w.contiguous(memory_format=cl)
    bw = (torch.rand(c, generator=g) + 0.5).to(device)
    bb = (torch.randn(c, generator=g) * 0.3).to(device)
    return x, w, bw, bb


def _step(backend, x, w, bw, bb, stride, groups, go, dtype_out=None):
    """One training forward + backward; returns outputs, gradients and running statistics."""
    from resfast.functional import bn_relu_conv2d

    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    bw = bw.detach().clone().requires_grad_(True)
    bb = bb.detach().clone().requires_grad_(True)
    rm = torch.zeros(x.shape[1], device=x.device, dtype=bw.dtype)
    rv = torch.ones(x.shape[1], device=x.device, dtype=bw.dtype)
    k = w.shape[-1]
    y = bn_relu_conv2d(x, w, bn_weight=bw, bn_bias=bb, running_mean=rm, running_var=rv, training=True,
                       stride=stride, padding=k // 2, groups=groups, backend=backend)
    y.backward(go.to(y.dtype))
    return {"out": y.detach(), "grad_x": x.grad, "grad_weight": w.grad, "grad_bn_weight": bw.grad,
            "grad_bn_bias": bb.grad, "running_mean": rm, "running_var": rv}


# shapes whose training step is replayed from the plan cache and compared with its first call
REPLAY = ("resnext50_s1", "densenet121_3x3", "resnext50_s2_down")


def replay_parity(device: str = "cuda", shapes=REPLAY, n: int = 8) -> dict:
    """The plan cache's replays, on this device: one training step of each shape called four
    times on the same inputs (full host code, recorded, replayed twice; on CUDA the replays
    launch the compiled kernels directly) gives bit for bit the first call's output and
    gradients. Records the plan cache's counts per op and how many replayed launches go
    straight to the launcher."""
    from resfast.ops import triton_ops

    triton_ops.clear_plan_cache()
    before = triton_ops.plan_cache_stats(by_op=True)
    t0 = time.monotonic()
    try:
        diffs = {}
        for shape in shapes:  # a name of PARITY, or a row like PARITY's
            name, _, c, h, co, k, stride, groups = shape if isinstance(shape, tuple) else next(
                p for p in PARITY if p[0] == shape)
            x, w, bw, bb = _inputs(n, c, h, co, k, groups, torch.bfloat16, seed=7, device=device)
            ho = (h + 2 * (k // 2) - k) // stride + 1
            go = torch.randn(n, co, ho, ho, device=device).contiguous(memory_format=torch.channels_last)
            runs = [_step("triton", x, w, bw, bb, stride, groups, go) for _ in range(4)]
            diffs[name] = sorted(key for key in runs[0] for r in runs[1:] if not torch.equal(r[key], runs[0][key]))
        after = triton_ops.plan_cache_stats(by_op=True)
        counts = {op: {k: v - before.get(op, {}).get(k, 0) for k, v in c.items()} for op, c in after.items()}
        direct = sum(ev[0] == "direct" for r in triton_ops._PLAN_CACHE.values() for ev in r.events)
        launches = sum(ev[0] in ("direct", "launch") for r in triton_ops._PLAN_CACHE.values() for ev in r.events)
        replays = sum(c.get("replays", 0) for c in counts.values())
        ok = all(not d for d in diffs.values()) and replays > 0
        _log(f"parity plan-cache replays: {'pass' if ok else 'FAIL'} (differing: {diffs}; {replays} replays; "
             f"{direct} of {launches} recorded launches direct)")
        return {"shape": "plan_cache_replay", "pass": bool(ok), "differing": diffs, "plan_cache": counts,
                "direct_launches": direct, "recorded_launches": launches, "seconds": time.monotonic() - t0}
    except Exception as exc:
        _log(f"parity plan-cache replays: ERROR {type(exc).__name__}: {exc}")
        return {"shape": "plan_cache_replay", "pass": False, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-2000:]}


def phase_parity(budget: Budget):
    from reference import rule_error

    results = []
    for name, n, c, h, co, k, stride, groups in PARITY:
        if budget.left() < 20:
            results.append({"shape": name, "skipped": "budget"})
            continue
        t0 = time.monotonic()
        try:
            x, w, bw, bb = _inputs(n, c, h, co, k, groups, torch.bfloat16, seed=sum(map(ord, name)))
            ho = (h + 2 * (k // 2) - k) // stride + 1
            go = torch.randn(n, co, ho, ho, device="cuda").contiguous(memory_format=torch.channels_last)
            got = _step("triton", x, w, bw, bb, stride, groups, go)
            same = _step("eager", x, w, bw, bb, stride, groups, go)
            ref = _step("eager", x.double(), w.double(), bw.double(), bb.double(), stride, groups, go.double())
            rows = {}
            ok = True
            for key in ref:
                err, allowed = rule_error(got[key], ref[key], same[key], torch.bfloat16)
                rows[key] = {"err": err, "allowed": allowed, "pass": bool(err <= allowed)}
                ok &= err <= allowed
            results.append({"shape": name, "pass": bool(ok), "outputs": rows, "seconds": time.monotonic() - t0})
            _log(f"parity {name}: {'pass' if ok else 'FAIL'} ({time.monotonic() - t0:.1f} s)"
                 + ("" if ok else f" {json.dumps({k_: v for k_, v in rows.items() if not v['pass']})}"))
        except Exception as exc:  # a failure is a result, the check goes on
            results.append({"shape": name, "pass": False, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-2000:]})
            _log(f"parity {name}: ERROR {type(exc).__name__}: {exc}")
    if budget.left() >= 15:
        results.append(replay_parity())
    # NaN placement: packed groups keep a NaN in its own group (forward, running statistics)
    try:
        x, w, bw, bb = _inputs(2, 128, 14, 128, 3, 32, torch.bfloat16, seed=5)
        x[1, 5, 3, 3] = float("nan")  # channel 5 belongs to group 1 (4 channels per group)
        from resfast.functional import bn_relu_conv2d

        rm, rv = torch.zeros(128, device="cuda"), torch.ones(128, device="cuda")
        y = bn_relu_conv2d(x, w, bn_weight=bw, bn_bias=bb, running_mean=rm, running_var=rv, training=False,
                           padding=1, groups=32, backend="triton")
        nan_groups = sorted({int(c) // 4 for c in torch.nonzero(torch.isnan(y).any(dim=(0, 2, 3))).flatten()})
        results.append({"shape": "nan_in_packed_group", "pass": nan_groups == [1], "nan_groups": nan_groups})
        _log(f"parity nan_in_packed_group: NaN in output groups {nan_groups} (expected [1])")
    except Exception as exc:
        results.append({"shape": "nan_in_packed_group", "pass": False, "error": f"{type(exc).__name__}: {exc}"})
    return results


def _time_cuda(fn, reps: int, groups: int = 5) -> float:
    """Median over ``groups`` of the mean of ``reps`` calls, CUDA events (seconds)."""
    times = []
    for _ in range(groups):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    times.sort()
    return times[len(times) // 2]


def _graphed(op, x, go, mode: str):
    """``op``'s step (``fwd`` under no_grad, or ``fwd+bwd``) on static inputs, captured in a
    CUDA graph after a warm-up on a side stream (as PyTorch's CUDA-graph docs do): returns the
    graph's ``replay``. Gradients accumulate in place on every replay (timing only)."""
    x = x.detach().clone().requires_grad_(mode != "fwd")

    def body():
        if mode == "fwd":
            with torch.no_grad():
                op(x)
        else:
            op(x).backward(go)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay


# shapes with torch.compile(mode="reduce-overhead") rows (each costs two compilations, 10-20 s
# apiece: one shape keeps the phases after timing within the budget)
REDUCE_OVERHEAD = ("resnext50_s1",)


class _FusedModule(nn.Module):
    """``bn_relu_conv2d`` on ``backend`` with ``bn``'s and ``conv``'s parameters, as a module
    (what ``torch.compile`` takes)."""

    def __init__(self, bn, conv, groups, backend):
        super().__init__()
        self.bn, self.conv, self.groups, self.backend = bn, conv, groups, backend

    def forward(self, x):
        from resfast.functional import bn_relu_conv2d

        return bn_relu_conv2d(x, self.conv.weight, bn_weight=self.bn.weight, bn_bias=self.bn.bias,
                              running_mean=self.bn.running_mean, running_var=self.bn.running_var, training=True,
                              padding=1, groups=self.groups, backend=self.backend)


def _reduce_overhead(module):
    compiled = torch.compile(module, mode="reduce-overhead")

    def call(x):
        torch.compiler.cudagraph_mark_step_begin()  # a new training step: the last step's outputs may be overwritten
        return compiled(x)

    return call


def phase_timing(budget: Budget, with_compile: bool):
    from resfast.functional import bn_relu_conv2d

    rows = []
    n = 64
    for name, c, h, groups in TIMING:
        sets = 4  # cycle inputs so repeated calls do not hit L2
        xs = [torch.randn(n, c, h, h, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
              for _ in range(sets)]
        gos = [torch.randn_like(xs[0]) for _ in range(sets)]
        bn = nn.BatchNorm2d(c).cuda()
        conv = nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False).cuda().to(torch.bfloat16).to(
            memory_format=torch.channels_last)
        impls = {"eager": nn.Sequential(bn, nn.ReLU(inplace=True), conv)}

        def fused(backend, bn=bn, conv=conv, groups=groups):
            return lambda x: bn_relu_conv2d(x, conv.weight, bn_weight=bn.weight, bn_bias=bn.bias,
                                            running_mean=bn.running_mean, running_var=bn.running_var,
                                            training=True, padding=1, groups=groups, backend=backend)

        impls["triton"] = fused("triton")
        from resfast.backends import BACKEND_TABLE

        native_why = next(b.why_not("cuda") for b in BACKEND_TABLE if b.name == "native")
        if not native_why:  # the compiled extension is there (benchmarks/gpu_check.sh builds it)
            impls["native"] = fused("native")
        elif name == TIMING[0][0]:
            _log(f"timing: no native rows ({native_why})")
        if with_compile and budget.left() > 40:
            impls["compile"] = torch.compile(nn.Sequential(bn, nn.ReLU(), conv), mode="max-autotune-no-cudagraphs")
        if with_compile and name in REDUCE_OVERHEAD and budget.left() > 60:
            # torch.compile(mode="reduce-overhead"): the step in CUDA graphs the way a user gets
            # them without capturing by hand (fwd+bwd rows only; inputs are copied into the
            # graphs' static buffers on each call, which these rows pay)
            impls["triton_ro"] = _reduce_overhead(_FusedModule(bn, conv, groups, "triton"))
            impls["compile_ro"] = _reduce_overhead(nn.Sequential(bn, nn.ReLU(), conv))
        x_bytes = xs[0].numel() * 2
        for mode in ("fwd", "fwd+bwd"):
            for impl, op in impls.items():
                if mode == "fwd" and impl.endswith("_ro"):
                    continue
                if budget.left() < 15:
                    rows.append({"shape": name, "mode": mode, "impl": impl, "skipped": "budget"})
                    continue
                counter = [0]

                def call(op=op, mode=mode):
                    i = counter[0] % sets
                    counter[0] += 1
                    if mode == "fwd":
                        with torch.no_grad():
                            op(xs[i])
                    else:
                        x = xs[i].detach().requires_grad_(True)
                        op(x).backward(gos[i])

                try:
                    t0 = time.monotonic()
                    call()
                    torch.cuda.synchronize()
                    first = time.monotonic() - t0
                    for _ in range(3):
                        call()
                    torch.cuda.synchronize()
                    med = _time_cuda(call, reps=10)
                    row = {"shape": name, "mode": mode, "impl": impl, "median_s": med, "first_call_s": first,
                           "x_bytes": x_bytes}
                    if mode == "fwd":
                        row["achieved_gbps_x_plus_y"] = 2 * x_bytes / med / 1e9
                    rows.append(row)
                    _log(f"timing {name} {mode:8s} {impl:8s} {med * 1e6:9.1f} us (first call {first:.1f} s)")
                except Exception as exc:
                    rows.append({"shape": name, "mode": mode, "impl": impl, "error": f"{type(exc).__name__}: {exc}"})
                    _log(f"timing {name} {mode} {impl}: ERROR {type(exc).__name__}: {exc}")
            # the same step captured in a CUDA graph: no host time per replay (what
            # torch.compile(mode="reduce-overhead") or a hand-captured training step gets)
            for impl in [i for i in ("eager", "triton", "native") if i in impls]:
                if budget.left() < 15:
                    rows.append({"shape": name, "mode": mode, "impl": impl + "_graph", "skipped": "budget"})
                    continue
                try:
                    med = _time_cuda(_graphed(impls[impl], xs[0], gos[0], mode), reps=10)
                    rows.append({"shape": name, "mode": mode, "impl": impl + "_graph", "median_s": med,
                                 "x_bytes": x_bytes, "note": "one input set (replays may hit L2)"})
                    _log(f"timing {name} {mode:8s} {impl + '_graph':13s} {med * 1e6:9.1f} us")
                except Exception as exc:
                    rows.append({"shape": name, "mode": mode, "impl": impl + "_graph",
                                 "error": f"{type(exc).__name__}: {exc}"})
                    _log(f"timing {name} {mode} {impl}_graph: ERROR {type(exc).__name__}: {exc}")
        del xs, gos
        torch.cuda.empty_cache()
    # ratios to eager and compile
    by = {(r["shape"], r["mode"], r["impl"]): r.get("median_s") for r in rows}
    for r in rows:
        e = by.get((r["shape"], r["mode"], "eager"))
        cpl = by.get((r["shape"], r["mode"], "compile"))
        eg = by.get((r["shape"], r["mode"], "eager_graph"))
        if r.get("median_s"):
            if e:
                r["speedup_vs_eager"] = e / r["median_s"]
            if cpl:
                r["speedup_vs_compile"] = cpl / r["median_s"]
            if eg and r["impl"].endswith("_graph"):
                r["speedup_vs_eager_graph"] = eg / r["median_s"]
    return rows


def phase_chain(budget: Budget):
    """Statistics in the epilogue, measured: ResNeXt-50's bottleneck middle, bn1-relu-conv2
    (grouped 3x3) -> bn2-relu-conv3 (1x1 to 2x the channels), training forward + backward on
    triton, with conv2 taking bn2's statistics in its epilogue (chained) and without (two
    statistics passes). The static model predicts the epilogue costs about what it saves."""
    from resfast.functional import bn_relu_conv2d

    rows = []
    n = 64
    for name, c, h, groups in TIMING[:1]:  # stage 1 (stage 2 too until 2026-11-29: 20 s more for the same answer)
        if budget.left() < 30:
            rows.append({"shape": name, "skipped": "budget"})
            continue
        xs = [torch.randn(n, c, h, h, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
              for _ in range(4)]
        bn1, bn2 = nn.BatchNorm2d(c).cuda(), nn.BatchNorm2d(c).cuda()
        w2 = (torch.randn(c, c // groups, 3, 3, device="cuda") / (9 * c // groups) ** 0.5).to(torch.bfloat16)
        w3 = (torch.randn(2 * c, c, 1, 1, device="cuda") / c ** 0.5).to(torch.bfloat16)
        w2 = w2.contiguous(memory_format=torch.channels_last).requires_grad_()
        w3 = w3.contiguous(memory_format=torch.channels_last).requires_grad_()
        gos = [torch.randn(n, 2 * c, h, h, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last) for _ in range(4)]
        counter = [0]

        def pair(chained: bool):
            i = counter[0] % 4
            counter[0] += 1
            x = xs[i].detach().requires_grad_(True)
            kw = dict(training=True, backend="triton")
            y = bn_relu_conv2d(x, w2, bn_weight=bn1.weight, bn_bias=bn1.bias, running_mean=bn1.running_mean,
                               running_var=bn1.running_var, padding=1, groups=groups, return_stats=chained, **kw)
            y, stats = y if chained else (y, None)
            out = bn_relu_conv2d(y, w3, bn_weight=bn2.weight, bn_bias=bn2.bias, running_mean=bn2.running_mean,
                                 running_var=bn2.running_var, input_stats=stats, **kw)
            out.backward(gos[i])

        for chained in (False, True):
            try:
                for _ in range(3):
                    pair(chained)
                torch.cuda.synchronize()
                med = _time_cuda(lambda: pair(chained), reps=10)
                rows.append({"shape": name, "chained": chained, "median_s": med})
                _log(f"chain {name} {'chained' if chained else 'two passes':10s} {med * 1e6:9.1f} us")
            except Exception as exc:
                rows.append({"shape": name, "chained": chained, "error": f"{type(exc).__name__}: {exc}"})
                _log(f"chain {name} chained={chained}: ERROR {type(exc).__name__}: {exc}")
        del xs, gos
        torch.cuda.empty_cache()
    return rows


# Host-time diagnosis: a host-bound shape (the H200 runs: triton fwd+bwd 1577 us called
# normally, 160 us from a CUDA graph), batch 64 as in the timing phase
HOST_SHAPE = ("resnext50_s3", 512, 14, 32)


def phase_host(budget: Budget, device: str = "cuda", shape=HOST_SHAPE, n: int = 64, calls: int = 20):
    """Where a training call's host time goes, per backend (``benchmarks/host_profile.py``):
    forward and backward host time apart, with autograd's device thread and with the backward
    on the calling thread; the Python functions with the most self time (``cProfile``); every
    operation that synchronises with the GPU; and the triton plan cache's counts over the
    phase (replays should be all but the first calls). ``device="cpu"`` (the tests) leaves out
    the synchronisation check, which needs CUDA."""
    import host_profile as hp

    from resfast.backends import BACKEND_TABLE
    from resfast.functional import bn_relu_conv2d
    from resfast.ops import triton_ops

    name, c, h, groups = shape
    cl = torch.channels_last
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    x0 = torch.randn(n, c, h, h, device=device, dtype=dtype).contiguous(memory_format=cl)
    go = torch.randn_like(x0)
    bn = nn.BatchNorm2d(c).to(device)
    conv = nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False).to(device, dtype).to(memory_format=cl)
    ops = {"eager_modules": nn.Sequential(bn, nn.ReLU(inplace=True), conv)}
    backends = [b.name for b in BACKEND_TABLE if b.name in ("eager", "triton", "native") and not b.why_not(device)]
    for backend in backends:
        ops[backend] = (lambda x, backend=backend: bn_relu_conv2d(
            x, conv.weight, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
            running_var=bn.running_var, training=True, padding=1, groups=groups, backend=backend))
    rows = []
    stats0 = triton_ops.plan_cache_stats(by_op=True)
    for impl, op in ops.items():
        if budget.left() < 8:
            rows.append({"shape": name, "impl": impl, "skipped": "budget"})
            continue

        def step(op=op):
            x = x0.detach().requires_grad_(True)
            op(x).backward(go)

        row: dict = {"shape": name, "impl": impl}
        try:
            row["threads"] = hp.host_split(op, x0, go, calls=calls, sync=sync, threads=True)
            row["one_thread"] = hp.host_split(op, x0, go, calls=calls, sync=sync, threads=False)
            row["syncs"] = hp.sync_warnings(step) if cuda else []
            sync()
            row["top"] = hp.top_functions(step, calls=max(1, calls // 2), top=25, root=ROOT)
            sync()
            if cuda and sys.version_info >= (3, 12):  # cProfile sees the device thread too
                row["top_device_thread"] = hp.top_functions(step, calls=max(1, calls // 2), top=25, root=ROOT,
                                                            threads=True)
                sync()
            t, o = row["threads"], row["one_thread"]
            _log(f"host {name} {impl:14s} fwd {t['fwd_us']:7.1f} us  bwd {t['bwd_us']:7.1f} us  (backward on the "
                 f"calling thread: {o['bwd_us']:7.1f} us); syncs: {len(row['syncs'])}; top: "
                 + ", ".join(f"{r['function'].rsplit('/', 1)[-1]} {r['self_us']:.0f} us" for r in row["top"][:4]))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            _log(f"host {name} {impl}: ERROR {row['error']}")
        rows.append(row)
    stats1 = triton_ops.plan_cache_stats(by_op=True)
    # per op: a backward never served from the cache would show as "full" calls here
    plan = {op: {k: v - stats0.get(op, {}).get(k, 0) for k, v in counts.items()} for op, counts in stats1.items()}
    plan = {op: counts for op, counts in plan.items() if any(counts.values())}
    _log(f"host: triton plan cache over the phase: {plan}")
    return {"rows": rows, "plan_cache": plan}


# The static model's shapes (resfast/profiling/sm90.py SHAPES) profiled, in this order
PROFILE = ("resnext50_s1", "resnext50_s2", "resnext50_s3", "resnext50_s4", "densenet121_1x1", "densenet121_3x3")


def _profile_shape(name):
    """The triton kernels of one training step of the fused op on the static model's shape
    ``name`` (bf16, channels_last): ``torch.profiler`` device time per call, and the tile
    config the autotuner chose for each launch (the static model's launch names)."""
    from torch.profiler import ProfilerActivity, profile

    from resfast.functional import bn_relu_conv2d
    from resfast.ops import triton_ops
    from resfast.profiling.sm90 import SHAPES

    s = SHAPES[name]
    assert s.stride == 1 and s.h == s.w and s.pad == s.k // 2, s  # what the step below runs
    n, c, h, co, k, groups = s.n, s.c, s.h, s.co, s.k, s.groups
    x = torch.randn(n, c, h, h, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    go = torch.randn(n, co, h, h, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    bn = nn.BatchNorm2d(c).cuda()
    w = torch.randn(co, c // groups, k, k, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)

    def step():
        xx = x.detach().requires_grad_(True)
        y = bn_relu_conv2d(xx, w, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
                           running_var=bn.running_var, training=True, padding=k // 2, groups=groups,
                           backend="triton")
        y.backward(go)

    chosen = {}
    choose = triton_ops.TUNER.choose

    def recording_choose(launch):
        cfg = choose(launch)
        chosen[launch.name] = cfg.label
        return cfg

    triton_ops.TUNER.choose = recording_choose
    # the timing phase's calls may have left this signature in the plan cache, whose replays
    # skip the tuner: forget them, so the first call below asks the tuner and is recorded
    triton_ops.clear_plan_cache()
    try:
        for _ in range(3):  # tunes (or reads the tuning cache), then the plan cache records and replays
            step()
    finally:
        triton_ops.TUNER.choose = choose
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0.0)
        if cuda_us and evt.count:
            kernels[evt.key] = {"count": evt.count, "mean_us": cuda_us}
    _log(f"profile {name} training step (triton), per-kernel mean us: "
         + ", ".join(f"{kn[:40]}={v['mean_us']:.1f}" for kn, v in sorted(kernels.items(),
                                                                      key=lambda kv: -kv[1]['mean_us'])[:8]))
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            trace_path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(trace_path)
            with open(trace_path) as f:
                launches = kernel_launches(json.load(f))
    except Exception as exc:  # the launch details are extra: never lose the profile for them
        launches = {"error": f"{type(exc).__name__}: {exc}"}
    return {"shape": name, "kernels": kernels, "configs": chosen, "launches": launches}


def kernel_launches(trace: dict) -> dict:
    """Per kernel name of a ``torch.profiler`` chrome trace: the launch as the device ran it
    (grid, block, registers per thread, shared memory, the profiler's estimated occupancy),
    the distinct launches of a name in order (the static model binds its kernels with the
    grids and registers it expects; these say what ran)."""
    out: dict = {}
    for e in trace.get("traceEvents", []):
        if e.get("cat") != "kernel":
            continue
        a = e.get("args") or {}
        launch = {"grid": a.get("grid"), "block": a.get("block"), "registers": a.get("registers per thread"),
                  "smem_bytes": a.get("shared memory"), "occupancy_pct": a.get("est. achieved occupancy %")}
        seen = out.setdefault(e.get("name", "?"), [])
        if launch not in seen:
            seen.append(launch)
    return out


def phase_profile(budget: Budget):
    """Per-kernel profiles of :data:`PROFILE`'s shapes while the budget allows (a shape not
    yet tuned by the timing phase tunes here first). Returns the list of per-shape records."""
    out = []
    for name in PROFILE:
        if budget.left() < 20:
            out.append({"shape": name, "skipped": "budget"})
            continue
        try:
            out.append(_profile_shape(name))
        except Exception as exc:
            out.append({"shape": name, "error": f"{type(exc).__name__}: {exc}"})
        torch.cuda.empty_cache()
    return out


# Configs outside the lists, timed beside the lists' own on the GPU: register caps that let more
# programs share an SM (the static model predicts them faster: its latency bound falls with
# residency) but spill, which the model does not price. (shape, phase, launch, config label)
CANDIDATES = (
    # the packed input gradient (stride 1) at 7 and 8 programs per SM: PREDICTED 86.6 -> 78.2 and
    # 68.9 us, spills 20 and 52 bytes (triton 3.8)
    ("resnext50_s1", "bwd", "conv_bwd_input", "TILE_H=8,TILE_W=8,BLOCK_N=16,BLOCK_K=16,MAXNREG=72,w4,s1,p7"),
    ("resnext50_s1", "bwd", "conv_bwd_input", "TILE_H=8,TILE_W=8,BLOCK_N=16,BLOCK_K=16,MAXNREG=64,w4,s1,p8"),
    # the register-light config (MMA_EPI + PAIRS, listed first at 56 registers: 9 per SM, 61.7 us)
    # capped at 48: 10 per SM, PREDICTED 58.1 us, spills 28 bytes (triton 3.8)
    ("resnext50_s1", "bwd", "conv_bwd_input",
     "TILE_H=8,TILE_W=8,BLOCK_N=16,BLOCK_K=16,MMA_EPI=1,PAIRS=1,MAXNREG=48,w4,s1,p10"),
    # PREDICTED 51.8 -> 41.5 us, spills 64 bytes (triton 3.8; the same cap at stage 2)
    ("resnext50_s2", "bwd", "conv_bwd_input", "TILE_H=8,TILE_W=8,BLOCK_N=16,BLOCK_K=16,MAXNREG=64,w4,s1,p8"),
    # PREDICTED 149.2 -> 101.2 us, spills 116 bytes (triton 3.8): DenseNet's 3x3 input gradient,
    # the 8-warp config capped to hold 2 programs per SM
    ("densenet121_3x3", "bwd", "conv_bwd_input", "TILE_H=8,TILE_W=8,BLOCK_N=64,BLOCK_K=128,MAXNREG=128,w8,s3,p2"),
    # PREDICTED 281.1 -> 169.2 us, spills 12 bytes (16 under triton 3.6)
    ("densenet121_1x1", "bwd", "conv_bwd", "TILE_H=8,TILE_W=8,BLOCK_N=128,BLOCK_K=32,WIDE_K=64,MAXNREG=128,w8,s1,p2"),
    # PREDICTED 281.1 -> 165.4 us, spills 296 bytes
    ("densenet121_1x1", "bwd", "conv_bwd", "TILE_H=8,TILE_W=16,BLOCK_N=128,BLOCK_K=32,MAXNREG=128,w8,s1,p2"),
)


def _time_launch(launch, cfg, reps: int = 10) -> float:
    """Mean microseconds of ``launch`` run with ``cfg`` (after a warm-up that compiles it),
    CUDA events around ``reps`` launches."""
    launch.run(cfg)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        launch.run(cfg)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def phase_candidates(budget: Budget, candidates=CANDIDATES):
    """Each candidate config timed on this GPU beside every config of its launch's own list
    (the same inputs, one kernel at a time): whether the occupancy a register cap buys beats
    the spills it costs."""
    from static_calibrate import config_from_label

    from resfast.profiling import static_model as sm

    rows = []
    for shape, phase, name, label in candidates:
        if budget.left() < 15:
            rows.append({"shape": shape, "launch": name, "candidate": label, "skipped": "budget"})
            continue
        try:
            launch = next(ln for ln in sm.training_plan(sm.SHAPES[shape], device="cuda")[phase] if ln.name == name)
            times = {cfg.label: _time_launch(launch, cfg) for cfg in launch.configs}
            best = min(times, key=times.get)
            times[label] = _time_launch(launch, config_from_label(label))
            rows.append({"shape": shape, "launch": name, "candidate": label, "us": times, "best_listed": best,
                         "candidate_vs_best": times[best] / times[label]})
            _log(f"candidate {shape} {name}: {times[label]:.1f} us against the list's best {times[best]:.1f} us "
                 f"({best})")
        except Exception as exc:
            rows.append({"shape": shape, "launch": name, "candidate": label, "error": f"{type(exc).__name__}: {exc}"})
            _log(f"candidate {shape} {name} {label}: ERROR {type(exc).__name__}: {exc}")
        torch.cuda.empty_cache()
    return rows


def environment():
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"gpu": props.name, "sm": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "commit": os.environ.get("RESFAST_GIT_COMMIT") or commit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir")
    p.add_argument("--budget-s", type=float, default=230.0, help="total seconds (default 230)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--skip-parity", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels_check: no CUDA device", file=sys.stderr)
        return 2
    os.makedirs(args.outdir, exist_ok=True)
    os.environ.setdefault("RESFAST_CACHE_DIR", args.outdir)  # the kernel-config tuning cache lands there
    budget = Budget(args.budget_s)
    doc = {"schema": "resfast-gpu-kernels/1", "environment": environment(), "phases": {}}
    _log(f"gpu_kernels_check on {doc['environment']['gpu']}, torch {torch.__version__}, "
         f"budget {args.budget_s:.0f} s")
    t0 = time.monotonic()
    # parity checks the first (static) config of each kernel: no autotuning compile time there
    os.environ["RESFAST_TRITON_AUTOTUNE"] = "0"
    doc["parity"] = [] if args.skip_parity else phase_parity(Budget(min(budget.left() * 0.4, 100)))
    os.environ.pop("RESFAST_TRITON_AUTOTUNE", None)
    doc["phases"]["parity_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    doc["timing"] = phase_timing(Budget(budget.left() - 90), not args.no_compile)
    doc["phases"]["timing_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    try:
        doc["host"] = phase_host(Budget(min(30.0, budget.left() - 60)))
    except Exception as exc:
        doc["host"] = {"error": f"{type(exc).__name__}: {exc}"}
        _log(f"host: ERROR {doc['host']['error']}")
    doc["phases"]["host_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    try:
        doc["chain"] = phase_chain(Budget(budget.left() - 25))
    except Exception as exc:
        doc["chain"] = {"error": f"{type(exc).__name__}: {exc}"}
    doc["phases"]["chain_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    doc["profiles"] = phase_profile(Budget(budget.left() - 20))
    # "profile": the first shape's record alone, as files before 2026-11-30 had it
    doc["profile"] = doc["profiles"][0] if doc["profiles"] else {"skipped": "budget"}
    doc["phases"]["profile_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    try:
        doc["candidates"] = phase_candidates(budget)
    except Exception as exc:
        doc["candidates"] = [{"error": f"{type(exc).__name__}: {exc}"}]
    doc["phases"]["candidates_s"] = time.monotonic() - t0
    hbm = next((v for k, v in HBM.items() if k in doc["environment"]["gpu"]), None)
    if hbm:
        for r in doc["timing"]:
            if r.get("mode") == "fwd" and r.get("median_s"):
                r["fraction_of_hbm_bound"] = 2 * r["x_bytes"] / r["median_s"] / hbm
    path = os.path.join(args.outdir, "gpu_kernels.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    failed = [r["shape"] for r in doc["parity"] if r.get("pass") is False]
    _log(f"wrote {path}; parity failures: {failed or 'none'}")
    _log("summary (measured, median): " + "; ".join(
        f"{r['shape']} {r['mode']} {r['impl']} {r['median_s'] * 1e6:.0f} us"
        + (f" ({r['speedup_vs_eager']:.2f}x eager)" if "speedup_vs_eager" in r else "")
        for r in doc["timing"] if r.get("median_s")))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
