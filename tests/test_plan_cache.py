"""The triton backend's plan cache (``resfast.ops.triton_ops``, "plan cache"): from the third
call with one signature an op replays the ATen ops, kernel launches and version bumps its
second call recorded, with the new call's tensors. The replay must be exactly what the full
host code would have done: the tests run the same calls with the cache off and on and compare
every output, gradient and running statistic bit for bit (the kernels are deterministic), and
check that a changed signature (shape, layout, a view into shared memory) is planned afresh.
Skipped where triton cannot run (no GPU and no interpreter)."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from reference import require_backend
from resfast.functional import bn_relu_conv2d


@pytest.fixture(autouse=True)
def _triton():
    require_backend("triton")


def _ops():
    import resfast.ops.triton_ops as T

    return T


def _cache(monkeypatch, cache: str):
    """The plan cache on ("1") or off ("0"), emptied; the triton op module."""
    T = _ops()
    monkeypatch.setenv("RESFAST_TRITON_PLAN_CACHE", cache)
    T.clear_plan_cache()
    return T


def _layer(c=8, groups=2):
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    w = nn.Parameter(torch.randn(c, c // groups, 3, 3) * 0.3)
    return bn, w


def _steps(monkeypatch, cache: str, xs, gos, groups=2, **kw):
    """Training steps of the fused op (forward + backward) on fresh copies of one layer:
    every output, gradient and running statistic of each step, and the plan-cache counts."""
    T = _cache(monkeypatch, cache)
    before = T.plan_cache_stats()
    bn, w = _layer(xs[0].shape[1], groups)
    got = []
    for x, go in zip(xs, gos):
        x = x.detach().requires_grad_(True)
        for p in (w, bn.weight, bn.bias):
            p.grad = None
        y = bn_relu_conv2d(x, w, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
                           running_var=bn.running_var, training=True, padding=1, groups=groups, backend="triton",
                           **kw)
        y.backward(go)
        got.append([t.detach().clone() for t in (y, x.grad, w.grad, bn.weight.grad, bn.bias.grad,
                                                 bn.running_mean, bn.running_var)])
    after = T.plan_cache_stats()
    return got, {k: after[k] - before[k] for k in ("replays", "records", "uncacheable")}


# The steps' input: 2 x 8 x 2 x 5 plans the same kernels as a 2 x 8 x 5 x 6 one (the packed
# grouped backward's 2 x 8 tiles, a masked edge in W, two images) at about half the
# interpreter's time; what the plan cache replays is the host code, whatever the size.
SHAPE = (2, 8, 2, 5)


def _inputs(k, shape, channels_last=False):
    torch.manual_seed(7)
    xs = [torch.randn(shape) * 2 + 1 for _ in range(k)]
    gos = [torch.randn(shape[0], shape[1], shape[2], shape[3]) for _ in range(k)]
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    return xs, gos


_REFERENCE: dict = {}


def _reference(monkeypatch, channels_last=False):
    """The four steps on ``SHAPE`` with the cache off (the reference every cached run here is
    compared with), computed once per process: deterministic kernels, so the same numbers as
    running them again in each test."""
    if channels_last not in _REFERENCE:
        xs, gos = _inputs(4, SHAPE, channels_last)
        ref, off = _steps(monkeypatch, "0", xs, gos)
        assert off == {"replays": 0, "records": 0, "uncacheable": 0}
        _REFERENCE[channels_last] = (xs, gos, ref)
    return _REFERENCE[channels_last]


@pytest.mark.parametrize("channels_last", [False, True])
def test_replay_is_bit_exact(monkeypatch, channels_last):
    xs, gos, ref = _reference(monkeypatch, channels_last)
    got, on = _steps(monkeypatch, "1", xs, gos)
    # 2 ops a step (the forward: statistics and conv in one op; the backward: conv backward and
    # BN input gradient in one op): step 1 plans, step 2 records, steps 3 and 4 replay
    assert on == {"replays": 4, "records": 2, "uncacheable": 0}
    for step, (a, b) in enumerate(zip(ref, got)):
        for name, p, q in zip(("y", "grad_x", "grad_w", "grad_bn_w", "grad_bn_b", "running_mean", "running_var"),
                              a, b):
            assert torch.equal(p, q), f"step {step}: {name} differs with the plan cache"


def test_changed_signature_is_planned_again(monkeypatch):
    """A new shape, a new layout or an input that now shares memory with another is a new
    signature: planned in full, never served another signature's plan."""
    T = _cache(monkeypatch, "1")
    bn, w = _layer()
    kw = dict(bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var,
              training=True, padding=1, groups=2, backend="triton")
    torch.manual_seed(3)
    buf = torch.randn(2, 16, 2, 5)
    cases = [torch.randn(2, 8, 2, 5), torch.randn(2, 8, 2, 5).contiguous(memory_format=torch.channels_last),
             torch.randn(2, 8, 2, 4), buf[:, :8]]
    with torch.no_grad():
        for x in cases:
            for _ in range(3):  # plan, record, replay
                y = bn_relu_conv2d(x, w, **kw)
            # the reference: the same call with the cache off
            monkeypatch.setenv("RESFAST_TRITON_PLAN_CACHE", "0")
            rm, rv = bn.running_mean.clone(), bn.running_var.clone()
            y_ref = bn_relu_conv2d(x, w, **kw)
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
            monkeypatch.setenv("RESFAST_TRITON_PLAN_CACHE", "1")
            assert y.shape == y_ref.shape and y.stride() == y_ref.stride()
            assert torch.equal(y, y_ref)
    stats = T.plan_cache_stats()
    assert stats["entries"] == 2 * len(cases)  # statistics + conv per signature


def test_out_into_a_shared_buffer_replays_exactly(monkeypatch):
    """``out=`` a channel slice of a buffer whose other slice is the input (the dense block's
    layout): the replay writes the same slice, the input slice untouched."""
    bn, w = _layer()
    kw = dict(bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var,
              training=False, padding=1, groups=2, backend="triton")
    results = {}
    for cache in ("0", "1"):
        _cache(monkeypatch, cache)
        torch.manual_seed(5)
        outs = []
        for _ in range(4):
            buf = torch.randn(2, 16, 3, 3)
            keep = buf[:, :8].clone()
            with torch.no_grad():
                bn_relu_conv2d(buf[:, :8], w, out=buf[:, 8:], **kw)
            assert torch.equal(buf[:, :8], keep)
            outs.append(buf.clone())
        results[cache] = outs
    for a, b in zip(results["0"], results["1"]):
        assert torch.equal(a, b)


def test_replay_bumps_versions_like_the_full_path(monkeypatch):
    """The kernels write the running statistics through raw pointers; the replay must bump
    their autograd version exactly as the full host code does, so a graph that saved them
    still raises "modified by an inplace operation". Three calls: plan, record, replay (a second
    replay is checked in test_replay_is_bit_exact)."""
    xs, gos = _inputs(3, SHAPE)
    versions = {}
    for cache in ("0", "1"):
        _cache(monkeypatch, cache)
        bn, w = _layer()
        seen = []
        with torch.no_grad():
            for x in xs:
                bn_relu_conv2d(x, w, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
                               running_var=bn.running_var, training=True, padding=1, groups=2, backend="triton")
                seen.append((bn.running_mean._version, bn.running_var._version))
        versions[cache] = seen
    assert versions["0"] == versions["1"]
    assert versions["1"][-1][0] > versions["1"][0][0]


def test_statistics_in_the_epilogue_replay(monkeypatch):
    """The chained pair (return_stats -> input_stats) from its cache, as without it. Three steps:
    plan, record, replay (a second replay is checked in test_replay_is_bit_exact)."""
    xs, gos = _inputs(3, SHAPE)
    results = {}
    for cache in ("0", "1"):
        _cache(monkeypatch, cache)
        bn1, w1 = _layer()
        bn2, w2 = _layer()
        outs = []
        for x, go in zip(xs, gos):
            x = x.detach().requires_grad_(True)
            y, stats = bn_relu_conv2d(x, w1, bn_weight=bn1.weight, bn_bias=bn1.bias, running_mean=bn1.running_mean,
                                      running_var=bn1.running_var, training=True, padding=1, groups=2,
                                      backend="triton", return_stats=True)
            z = bn_relu_conv2d(y, w2, bn_weight=bn2.weight, bn_bias=bn2.bias, running_mean=bn2.running_mean,
                               running_var=bn2.running_var, training=True, padding=1, groups=2, backend="triton",
                               input_stats=stats)
            z.backward(go)
            outs.append([z.detach().clone(), x.grad.clone(), bn2.running_mean.clone(), bn2.running_var.clone()])
        results[cache] = outs
    for a, b in zip(results["0"], results["1"]):
        for p, q in zip(a, b):
            assert torch.equal(p, q)


def test_a_log_with_an_outside_tensor_is_not_cached():
    """A call whose host code uses a tensor that is neither an input nor made during the call
    cannot be replayed from its inputs: the recorder says so, and nothing is cached."""
    T = _ops()
    outside = torch.ones(3)

    def op(x):
        y = torch.empty_like(x)
        y.copy_(outside)
        return y

    result, replay = T._record(op, (torch.zeros(3),))
    assert replay is None
    assert torch.equal(result, outside)

    def clean(x):
        y = torch.empty_like(x)
        y.copy_(x)
        return y.add_(1)

    result, replay = T._record(clean, (torch.zeros(3),))
    assert replay is not None
    x2 = torch.arange(3.0)
    assert torch.equal(replay((x2,)), x2 + 1)


def test_replay_from_another_thread(monkeypatch):
    """Autograd runs a CUDA backward on its own device thread: the cache (recording state
    included) works from any thread, with the same results."""
    import threading

    xs, gos, ref = _reference(monkeypatch)
    box = {}

    def work():
        try:
            box["got"] = _steps(monkeypatch, "1", xs, gos)
        except BaseException as exc:  # re-raised below, in the test's thread
            box["error"] = exc

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    got, counts = box["got"]
    assert counts["replays"] == 4  # steps 3 and 4: the one forward op and the one backward op
    for a, b in zip(ref, got):
        for p, q in zip(a, b):
            assert torch.equal(p, q)


def _direct_probe(env_extra, pythonpath=None):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RESFAST_TRITON_DIRECT_LAUNCH")}
    env.update(env_extra)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "direct_launch_probe.py")], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _tritons():
    """This environment's triton, and the GPU machine's (3.6) where the Makefile provides it."""
    out = [None]
    device = os.environ.get("RESFAST_DEVICE_TRITON")
    if device and os.path.isdir(device):
        out.append(device)
    return out


@pytest.mark.parametrize("pythonpath", _tritons(), ids=lambda p: "device-triton" if p else "this-triton")
def test_replays_launch_compiled_kernels_directly_with_what_triton_would_pass(pythonpath):
    """The plan cache's direct launches (no GPU needed: CUDA code path on meta tensors, a
    stand-in driver, compiled kernels that log their launches): every launch of the six
    ops' recorded plans replays straight into ``kernel.run``, with the grid, stream, function,
    packed metadata and every argument that triton's own ``JITFunction.run`` passed on the
    recorded call, and no hooks (an empty hook chain is skipped)."""
    pytest.importorskip("triton")
    doc = _direct_probe({}, pythonpath)
    assert set(doc["ops"]) == {"bn_stats_update", "bn_relu_conv2d", "bn_relu_conv2d_backward", "bn_backward_elemt",
                               "bn_relu_conv2d_backward_full", "bn_relu_conv2d_train"}
    for name, r in doc["ops"].items():
        full, recorded, replay1, replay2 = r["calls"]
        assert r["events"] == {"direct": len(recorded), "launch": 0}, (doc["triton"], name, r["events"])
        assert len(full) == len(recorded) == len(replay1) >= 1
        assert replay1 == replay2
        for rec, rep in zip(recorded, replay1):
            assert {k: v for k, v in rec.items() if k != "hooks"} == {k: v for k, v in rep.items() if k != "hooks"}
            assert rep["hooks"] == ["NoneType", "NoneType", "NoneType"] and rep["stream"] == 77


def test_direct_launches_step_aside_for_a_launch_hook_and_the_switch():
    """With a launch hook registered (a profiler) the replays go through ``fn[grid]``, which
    calls it; ``RESFAST_TRITON_DIRECT_LAUNCH=0`` records plain launches."""
    pytest.importorskip("triton")
    hooked = _direct_probe({"PROBE_HOOK": "1"})
    for name, r in hooked["ops"].items():
        assert r["events"]["direct"] >= 1
        assert all(rep["hooks"][1] == "HookChain" for rep in r["calls"][2]), name
    off = _direct_probe({"RESFAST_TRITON_DIRECT_LAUNCH": "0"})
    for name, r in off["ops"].items():
        assert r["events"]["direct"] == 0 and r["events"]["launch"] >= 1, name
        assert r["calls"][1] == r["calls"][2]
