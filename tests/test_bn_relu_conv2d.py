"""Parity suite of ``resfast.functional.bn_relu_conv2d`` on every backend.

Each case runs the backend, eager PyTorch in the case dtype on the case device
(``ref_same``) and eager PyTorch in float64 on the CPU (``ref64``) from the same inputs, and
judges the output, every gradient (x, conv weight, conv bias, BN weight, BN bias) and the
updated running statistics with the float64 rule of docs/design.md (``tests/reference.py``).

A backend that cannot run here is skipped with the reason ``resfast.backends`` gives. On
the CPU the triton backend runs under ``TRITON_INTERPRET=1`` with tiny shapes; with a CUDA
device the same tests run on CUDA, plus realistic ResNeXt / DenseNet shapes.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F

import resfast
import resfast.backends
from resfast.backends import BackendUnavailableError, backend_status
from resfast.functional import bn_relu_conv2d
from reference import assert_rule

BACKENDS = ("eager", "triton", "native")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MOMENTUM, EPS = 0.1, 1e-5


def _require(backend: str, device: str = DEVICE) -> None:
    why = backend_status(device)[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on {device}: {why}")


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    c: int
    h: int
    w: int
    co: int
    k: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    channels_last: bool = False
    prefix: int = 0  # x is ``buffer[:, :c]`` of a buffer with ``prefix`` more channels
    out_slice: bool = False  # out= is a channel slice of a larger NaN-poisoned buffer

    def __str__(self) -> str:
        return self.name


# Tiny shapes (the interpreter is slow); together they cover every case the correctness rule of docs/design.md lists.
# Groups of >= 16 channels take the tl.dot path of the triton kernels, smaller ones the direct one.
CPU_CASES = [
    Case("n1_odd_pad1", n=1, c=5, h=7, w=5, co=6, bias=True),
    Case("stride2_pad0_g2_cl", n=2, c=6, h=7, w=7, co=4, stride=2, padding=0, groups=2, channels_last=True),
    Case("g2_1x1_prefix", n=2, c=6, h=5, w=5, co=8, k=1, padding=0, groups=2, prefix=4),
    Case("g32_cl", n=1, c=64, h=3, w=3, co=64, groups=32, channels_last=True, bias=True),
    Case("depthwise_s2_prefix_cl", n=2, c=7, h=5, w=6, co=7, stride=2, groups=7, channels_last=True, prefix=3),
    Case("dilation2_out_slice", n=2, c=4, h=6, w=5, co=5, padding=2, dilation=2, out_slice=True),
    Case("dot_g2_cl_prefix_out", n=2, c=32, h=5, w=5, co=48, groups=2, channels_last=True, prefix=5,
         out_slice=True),
    Case("dot_1x1_s2_bias_out", n=2, c=20, h=5, w=7, co=18, k=1, padding=0, stride=2, bias=True, out_slice=True),
]
# ResNeXt-50 32x4d grouped 3x3 convs and a DenseNet-121 layer at batch 8 (GPU only).
GPU_CASES = [
    Case("resnext50_s1_g32_56", n=8, c=128, h=56, w=56, co=128, groups=32, channels_last=True),
    Case("resnext50_s2_g32_28", n=8, c=256, h=56, w=56, co=256, stride=2, groups=32, channels_last=True),
    Case("resnext50_g32_14_nchw", n=8, c=512, h=14, w=14, co=512, groups=32),
    Case("densenet_1x1_prefix", n=8, c=256, h=28, w=28, co=128, k=1, padding=0, prefix=256, channels_last=True),
    Case("densenet_3x3_out_slice", n=8, c=128, h=28, w=28, co=32, out_slice=True, channels_last=True),
]
CASES = CPU_CASES + (GPU_CASES if CUDA else [])
BASE = CPU_CASES[1]  # a small grouped, strided, channels_last case for the dtype/mode variants
DOT = CPU_CASES[6]  # the same for the tl.dot path
# ... and its one-image copy for the variants (eval, 16-bit, no grad): the same kernels, each
# launch with half the tiles (on the CPU the interpreter's cost); two images in test_shapes_train
DOT1 = replace(DOT, name="dot_g2_cl_prefix_out_n1", n=1) if not CUDA else DOT


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _out_hw(case: Case):
    eff = case.dilation * (case.k - 1) + 1
    return ((case.h + 2 * case.padding - eff) // case.stride + 1, (case.w + 2 * case.padding - eff) // case.stride + 1)


def _make_inputs(case: Case, seed: int, affine: bool = True, track: bool = True) -> Dict[str, Optional[torch.Tensor]]:
    """float32 CPU inputs; each run casts / moves its own copies."""
    g = torch.Generator().manual_seed(seed)
    ho, wo = _out_hw(case)
    fan_in = case.c // case.groups * case.k * case.k
    return {
        "x": torch.randn(case.n, case.c + case.prefix, case.h, case.w, generator=g) * 1.5 + 0.3,
        "weight": torch.randn(case.co, case.c // case.groups, case.k, case.k, generator=g) / math.sqrt(fan_in),
        "bias": torch.randn(case.co, generator=g) * 0.2 if case.bias else None,
        "bn_weight": 1.0 + 0.3 * torch.randn(case.c, generator=g) if affine else None,
        "bn_bias": 0.3 * torch.randn(case.c, generator=g) if affine else None,
        "running_mean": 0.2 * torch.randn(case.c, generator=g) if track else None,
        "running_var": 0.5 + torch.rand(case.c, generator=g) if track else None,
        "grad_out": torch.randn(case.n, case.co, ho, wo, generator=g),
    }


_GRAD_NAMES = ("x", "weight", "bias", "bn_weight", "bn_bias")


def _run(case: Case, inp, backend: Optional[str], dtype, device, training: bool, grad: bool = True,
         autocast: Optional[torch.dtype] = None):
    """Forward (+ backward) of one implementation. ``backend=None``: the eager expression itself.

    Returns ``{"out", "grad_<name>", "running_mean", "running_var"}`` (CPU tensors)."""
    conv_dtype = dtype if autocast is None else torch.float32
    t = {}
    for name, v in inp.items():
        if v is None:
            t[name] = None
        elif name in ("x", "weight", "bias", "grad_out"):
            t[name] = v.to(device=device, dtype=conv_dtype)
        else:  # BN parameters and running statistics stay float32 (float64 for the reference)
            t[name] = v.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if case.channels_last:
        t["x"] = t["x"].contiguous(memory_format=torch.channels_last)
    leaves = {}
    if grad:
        for name in _GRAD_NAMES:
            if t[name] is not None:
                t[name] = leaves[name] = t[name].detach().requires_grad_(True)
    x = t["x"][:, : case.c]
    conv = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    result = {}
    with torch.autocast(device_type=torch.device(device).type, dtype=autocast, enabled=autocast is not None):
        if backend is None:
            y = F.conv2d(F.relu(F.batch_norm(x, t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"],
                                             training, MOMENTUM, EPS)), t["weight"], t["bias"], **conv)
        else:
            out = None
            if case.out_slice:
                ho, wo = _out_hw(case)
                out_dtype = dtype if autocast is None else autocast
                obuf = torch.full((case.n, case.co + 5, ho, wo), float("nan"), dtype=out_dtype, device=device)
                if case.channels_last:
                    obuf = obuf.contiguous(memory_format=torch.channels_last)
                out = obuf[:, 2 : 2 + case.co]
            y = bn_relu_conv2d(x, t["weight"], t["bias"], bn_weight=t["bn_weight"], bn_bias=t["bn_bias"],
                               running_mean=t["running_mean"], running_var=t["running_var"], training=training,
                               momentum=MOMENTUM, eps=EPS, backend=backend, out=out, **conv)
            if out is not None:
                assert y is out
                assert torch.isnan(obuf[:, :2]).all() and torch.isnan(obuf[:, 2 + case.co :]).all(), \
                    "out= wrote outside its channel slice"
    result["out"] = y.detach().cpu()
    if grad:
        names = list(leaves)
        grads = torch.autograd.grad(y, [leaves[k] for k in names], t["grad_out"].to(y.dtype))
        for name, gr in zip(names, grads):
            result["grad_" + name] = (gr[:, : case.c] if name == "x" else gr).detach().cpu()
        if "x" in leaves and case.prefix:
            assert not grads[names.index("x")][:, case.c :].any(), "gradient leaked into the channels x does not view"
    for name in ("running_mean", "running_var"):
        if t[name] is not None:
            result[name] = t[name].detach().cpu()
    return result


def _check(case: Case, backend: str, dtype, training: bool, *, affine=True, track=True, grad=True, autocast=None,
           inputs=None, seed=None):
    _require(backend)
    seed = _seed(case, dtype, training, affine, track, autocast) if seed is None else seed
    inp = inputs if inputs is not None else _make_inputs(case, seed, affine, track)
    if inputs is None and autocast is None and dtype != torch.float32:
        # every implementation sees the same low-precision values
        inp = {k: (v.to(dtype).float() if v is not None and k in ("x", "weight", "bias", "grad_out") else v)
               for k, v in inp.items()}
    ref64 = _run(case, inp, None, torch.float64, "cpu", training, grad)
    ref_same = _run(case, inp, None, dtype, DEVICE, training, grad, autocast)
    got = _run(case, inp, backend, dtype, DEVICE, training, grad, autocast)
    context = f"case={case} backend={backend} dtype={dtype} training={training} affine={affine} track={track} " \
              f"autocast={autocast} seed={seed}"
    rule_dtype = autocast or dtype
    assert set(got) == set(ref64), f"results {sorted(got)} != reference {sorted(ref64)} ({context})"
    for name in ref64:
        assert_rule(name, got[name], ref64[name], ref_same[name], context, dtype=rule_dtype)
    return got


# ----------------------------------------------------------------------------- shapes, modes


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_train(backend, case):
    _check(case, backend, torch.float32, training=True)


@pytest.mark.parametrize("case", [CPU_CASES[0], CPU_CASES[3], DOT1] + (GPU_CASES[:1] if CUDA else []), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_eval(backend, case):
    _check(case, backend, torch.float32, training=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [BASE, DOT1], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision(backend, case, dtype):
    _check(case, backend, dtype, training=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_false(backend, training):
    _check(BASE, backend, torch.float32, training=training, affine=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_track_running_stats_false(backend):
    got = _check(CPU_CASES[0], backend, torch.float32, training=True, track=False)
    assert "running_mean" not in got


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast(backend):
    # CPU autocast runs bf16, CUDA autocast fp16; x and the conv weight stay float32 leaves
    dtype = torch.float16 if CUDA else torch.bfloat16
    got = _check(BASE, backend, torch.float32, training=True, autocast=dtype)
    assert got["out"].dtype == dtype and got["grad_x"].dtype == torch.float32


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_without_grad(backend, training):
    """No grad needed: backends write ``out`` directly (``bn_relu_conv2d_out``)."""
    case = replace(CPU_CASES[5], name="out_no_grad", groups=1, channels_last=True, prefix=2)
    for c in (case, replace(DOT1, name="dot_out_no_grad")):
        with torch.no_grad():
            _check(c, backend, torch.float32, training=training, grad=False)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend, training):
    case = replace(BASE, name="nan", stride=1, padding=1)
    inp = _make_inputs(case, _seed("nan", training))
    inp["x"][1, 0, 3, 2] = float("nan")  # channel 0 belongs to group 0 only
    got = _check(case, backend, torch.float32, training=training, inputs=inp, seed=0)
    assert torch.isnan(got["out"]).any() and not torch.isnan(got["out"]).all()


# ----------------------------------------------------------------------------- gradcheck


def _small_gradcheck_inputs():
    g = torch.Generator().manual_seed(7)
    d = dict(dtype=torch.float64)
    x = (torch.randn(2, 4, 4, 3, generator=g, **d) + 0.2).requires_grad_()
    w = (torch.randn(4, 2, 3, 3, generator=g, **d) * 0.3).requires_grad_()
    b = torch.randn(4, generator=g, **d).requires_grad_()
    bw = (1 + 0.3 * torch.randn(4, generator=g, **d)).requires_grad_()
    bb = (0.3 * torch.randn(4, generator=g, **d)).requires_grad_()
    rm, rv = 0.1 * torch.randn(4, generator=g, **d), 0.5 + torch.rand(4, generator=g, **d)
    return (x, w, b, bw, bb), (rm, rv)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["eager", "native"])
def test_gradcheck(backend, training):
    _require(backend, "cpu")
    (x, w, b, bw, bb), (rm, rv) = _small_gradcheck_inputs()

    def f(x, w, b, bw, bb):
        # fresh running-stat copies: gradcheck calls f many times
        return bn_relu_conv2d(x, w, b, bn_weight=bw, bn_bias=bb, running_mean=None if training else rm.clone(),
                              running_var=None if training else rv.clone(), training=training, stride=2, padding=1,
                              groups=2, backend=backend)

    assert torch.autograd.gradcheck(f, (x, w, b, bw, bb), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_autograd_function_over_eager_ops(training):
    """The one backward (autograd.BNReLUConv2dFunction) over the eager op set."""
    from resfast.ops import reference
    from resfast.ops.autograd import BNReLUConv2dFunction

    (x, w, b, bw, bb), (rm, rv) = _small_gradcheck_inputs()

    def f(x, w, b, bw, bb):
        if training:
            # the function treats the batch statistics as functions of x (as the functional passes
            # them, detached); recomputing them from the perturbed x lets the numerical Jacobian see that
            mean, var = reference.bn_stats(x.detach())
        else:
            mean, var = rm, rv
        invstd = torch.rsqrt(var + EPS)
        count = x.numel() // x.shape[1]
        return BNReLUConv2dFunction.apply(reference, None, count, x, w, b, bw, bb, mean, invstd, [1, 1], [1, 1],
                                          [1, 1], 2, training)

    assert torch.autograd.gradcheck(f, (x, w, b, bw, bb), eps=1e-6, atol=1e-5, fast_mode=True)


# ----------------------------------------------------------------------------- bad input


def _bad_inputs(device="cpu"):
    g = torch.Generator().manual_seed(3)
    a = dict(
        x=torch.randn(2, 6, 5, 5, generator=g), weight=torch.randn(4, 3, 3, 3, generator=g), bias=None,
        bn_weight=torch.rand(6, generator=g) + 0.5, bn_bias=torch.randn(6, generator=g),
        running_mean=torch.randn(6, generator=g), running_var=torch.rand(6, generator=g) + 0.5,
    )
    return {k: None if v is None else v.to(device) for k, v in a.items()}


def _call(backend, a, **over):
    a = {**a, **over}
    return bn_relu_conv2d(a["x"], a["weight"], a["bias"], bn_weight=a["bn_weight"], bn_bias=a["bn_bias"],
                          running_mean=a["running_mean"], running_var=a["running_var"], training=True,
                          padding=1, groups=over.get("groups", 2), backend=backend)


BAD = [
    ("channel_mismatch", lambda a: dict(weight=torch.randn(4, 2, 3, 3)), ValueError,
     r"channel mismatch: x has C=6 channels but weight of shape \(4, 2, 3, 3\) with groups=2 expects 4"),
    ("groups_not_dividing", lambda a: dict(groups=4), ValueError,
     r"groups=4 does not divide the input channels C=6"),
    ("mixed_dtypes", lambda a: dict(weight=a["weight"].half()), TypeError,
     r"weight dtype torch.float16 does not match x dtype torch.float32"),
    ("mixed_devices", lambda a: dict(bn_weight=a["bn_weight"].to("meta")), ValueError,
     r"bn_weight is on meta but x is on " + str(torch.device(DEVICE))),
    ("unsupported_dtype", lambda a: dict(x=a["x"].to(torch.int32), weight=a["weight"].to(torch.int32)), TypeError,
     r"x has unsupported dtype torch.int32"),
]


@pytest.mark.parametrize("name,change,exc,message", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend, name, change, exc, message):
    _require(backend)
    a = _bad_inputs(DEVICE)
    before = (a["running_mean"].clone(), a["running_var"].clone())
    with pytest.raises(exc, match=message):
        _call(backend, a, **change(a))
    assert torch.equal(a["running_mean"], before[0]) and torch.equal(a["running_var"], before[1])


def test_triton_rejects_float64():
    _require("triton")
    a = {k: (v.double() if v is not None else None) for k, v in _bad_inputs(DEVICE).items()}
    before = (a["running_mean"].clone(), a["running_var"].clone())
    with pytest.raises(TypeError, match=r"x has dtype torch.float64; the triton backend supports float32, float16"):
        _call("triton", a)
    assert torch.equal(a["running_mean"], before[0]) and torch.equal(a["running_var"], before[1])


def test_triton_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setattr(resfast.backends, "triton_interpret", lambda: False)
    a = _bad_inputs()
    before = (a["running_mean"].clone(), a["running_var"].clone())
    with pytest.raises(BackendUnavailableError,
                       match=r"backend='triton' cannot run on cpu tensors: .*TRITON_INTERPRET=1"):
        _call("triton", a)
    assert torch.equal(a["running_mean"], before[0]) and torch.equal(a["running_var"], before[1])
