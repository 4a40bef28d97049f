"""Inputs a new user can pass that the other tests did not cover, each of which once gave a
plausible wrong number (or wrote wrong state) on some backend: every one now gives the
float64-rule answer or raises a clear error, before anything is modified."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resfast
from resfast.backends import backend_status
from resfast.functional import bn_relu_conv2d
from reference import assert_rule

BACKENDS = ("eager", "triton", "native")
C = 4


def _require(backend: str) -> None:
    why = backend_status("cpu")[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on cpu: {why}")


def _eager(x, w, b, rm, rv, training, padding=1):
    return F.conv2d(F.relu(F.batch_norm(x, rm, rv, None, None, training, 0.1, 1e-5)), w, b, 1, padding)


# ------------------------------------------------------------------ strided per-channel vectors


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_running_statistics_are_updated_in_place(backend):
    """Running statistics that are strided views (every other element of a larger tensor):
    triton's finalize wrote them as if contiguous (running_var off by 2e-2, and the elements
    between them overwritten)."""
    _require(backend)
    x, w = torch.randn(2, C, 5, 5), torch.randn(6, C, 3, 3)
    rm_base, rv_base = torch.full((2 * C,), 7.0), torch.full((2 * C,), 9.0)
    rm_base[::2], rv_base[::2] = 0.1 * torch.randn(C), torch.rand(C) + 0.5
    rm, rv = rm_base[::2], rv_base[::2]
    rm64, rv64 = rm.double().clone(), rv.double().clone()
    rm32, rv32 = rm.clone(), rv.clone()
    y = bn_relu_conv2d(x, w, bn_weight=None, bn_bias=None, running_mean=rm, running_var=rv, training=True, padding=1,
                       backend=backend)
    y64 = _eager(x.double(), w.double(), None, rm64, rv64, True)
    y32 = _eager(x, w, None, rm32, rv32, True)
    assert_rule("y", y, y64, y32, backend)
    assert_rule("running_mean", rm, rm64, rm32, backend)
    assert_rule("running_var", rv, rv64, rv32, backend)
    assert torch.equal(rm_base[1::2], torch.full((C,), 7.0)), "elements between the strided running_mean changed"
    assert torch.equal(rv_base[1::2], torch.full((C,), 9.0)), "elements between the strided running_var changed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_strided_conv_bias(backend, training):
    """A conv bias that is a strided view: triton read it as contiguous (output off by 1.9)."""
    _require(backend)
    x, w = torch.randn(2, C, 5, 5), torch.randn(6, C, 3, 3)
    b = torch.randn(12)[::2]
    rm, rv = 0.1 * torch.randn(C), torch.rand(C) + 0.5
    y = bn_relu_conv2d(x, w, b, bn_weight=None, bn_bias=None, running_mean=rm.clone(), running_var=rv.clone(),
                       training=training, padding=1, backend=backend)
    y64 = _eager(x.double(), w.double(), b.double(), rm.double(), rv.double(), training)
    y32 = _eager(x, w, b, rm.clone(), rv.clone(), training)
    assert_rule("y", y, y64, y32, f"{backend} training={training}")


# ------------------------------------------------------------------ autocast and float64


@pytest.mark.parametrize("backend", ["eager", "native"])  # triton has no float64 kernels
def test_autocast_leaves_float64_alone(backend):
    """Autocast casts only float32 (float16 / bfloat16) tensors, never float64: the fused op
    under autocast with float64 inputs runs in float64, as the eager expression does (it
    cast them to bfloat16 and then refused its own float64 running statistics)."""
    _require(backend)
    x, w = torch.randn(2, C, 5, 5, dtype=torch.float64), torch.randn(6, C, 3, 3, dtype=torch.float64)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _eager(x, w, None, rm_ref, rv_ref, True)
        y = bn_relu_conv2d(x, w, bn_weight=None, bn_bias=None, running_mean=rm, running_var=rv, training=True,
                           padding=1, backend=backend)
    assert ref.dtype == y.dtype == torch.float64
    assert_rule("y", y, ref, ref, backend)
    assert_rule("running_var", rv, rv_ref, rv_ref, backend)


@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("memory", ["shared", "naive", "checkpoint"])
def test_float64_dense_block_under_autocast_stays_float64(memory, backend):
    """A float64 dense block under autocast: torchvision's runs in float64; the shared block
    ran in bfloat16 and returned float64 (error 7.6e-3), the naive one raised."""
    _require(backend)
    tv = pytest.importorskip("torchvision.models.densenet")
    block = resfast.DenseBlock(2, 4, 2, 3, memory=memory, backend=backend).double()
    ref = tv._DenseBlock(2, 4, 2, 3, drop_rate=0.0).double()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = block(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.float64
    assert_rule("y", y, y_ref, y_ref, f"{memory} {backend}", dtype=torch.float64)


# ------------------------------------------------------------------ empty spatial extent, no channels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_zero_spatial_extent_is_refused(backend, training):
    """N > 0 but H == 0: PyTorch's conv2d refuses it ("Only zero batch or zero channel inputs
    are supported"); native returned an output and wrote NaN into running_var. Every backend
    now raises before anything changes."""
    _require(backend)
    x, w, b = torch.randn(2, C, 0, 5), torch.randn(6, C, 1, 1), torch.randn(6)
    rm, rv = torch.zeros(C), torch.ones(C)
    with pytest.raises(RuntimeError):
        _eager(x, w, b, rm.clone(), rv.clone(), training)
    with pytest.raises(ValueError, match="no positions"):
        bn_relu_conv2d(x, w, b, bn_weight=None, bn_bias=None, running_mean=rm, running_var=rv, training=training,
                       padding=1, backend=backend)
    assert torch.equal(rm, torch.zeros(C)) and torch.equal(rv, torch.ones(C))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_zero_channels_is_refused(backend, training):
    """x with no channels: PyTorch's conv2d returns an output with no channels (not C_out of
    bias); resfast refuses it with a clear error (it divided by zero on triton / native)."""
    _require(backend)
    x, w = torch.randn(2, 0, 5, 5), torch.randn(6, 0, 1, 1)
    with pytest.raises(ValueError, match="no channels"):
        bn_relu_conv2d(x, w, torch.ones(6), bn_weight=None, bn_bias=None, running_mean=torch.zeros(0),
                       running_var=torch.ones(0), training=training, backend=backend)


# ------------------------------------------------------------------ convert: traced forwards


class _OwnBlock(nn.Module):
    """A block of one's own whose forward reads plain attributes and a ReLU module."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(C)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.scale = 1.0
        self.residual = True

    def forward(self, x):
        y = self.conv(self.relu(self.bn(x))) * self.scale
        if self.residual:
            y = y + x
        return y


@pytest.mark.parametrize("change", ["float", "flag", "module"])
def test_traced_forward_follows_changes_made_after_convert(change):
    """convert() traces a module's own forward once: the plain attributes it read (a scale, a
    flag) and the modules it fused were frozen in the trace, so changing them afterwards was
    silently ignored (error 4.2). The traced forward now runs only while they are unchanged;
    otherwise the original forward runs (and says so once)."""
    torch.manual_seed(0)
    model = _OwnBlock()
    ref = copy.deepcopy(model)
    report = resfast.convert(model, backend="eager")
    assert "1 BN-ReLU-conv fused" in str(report)
    x = torch.randn(2, C, 5, 5)
    assert_rule("before", model(x), ref.double()(x.double()), ref.float()(x))
    for m in (model, ref):
        if change == "float":
            m.scale = 3.0
        elif change == "flag":
            m.residual = False
        else:
            m.relu = nn.GELU()
    with pytest.warns(UserWarning, match="changed since resfast.convert"):
        y = model(x)
    assert_rule("after", y, ref.double()(x.double()), ref.float()(x), change)
    y.sum().backward()  # and it still trains
    assert model.conv.weight.grad is not None


# ------------------------------------------------------------------ int32 offsets (triton)


def test_triton_refuses_an_output_image_beyond_int32_offsets():
    """The triton kernels address one image with int32 offsets; the host checked x, grad_out
    and out= but not the output it allocates, which a channel-expanding conv makes larger than
    its input (here x: 2**30 elements per image, y: 2**32). Planned on meta tensors (nothing
    allocated): it must raise, not wrap around."""
    pytest.importorskip("triton")
    from resfast.ops.triton_ops import launch_plan

    x = torch.empty(1, 4, 2 ** 14, 2 ** 14, device="meta")
    w = torch.empty(16, 4, 1, 1, device="meta")
    mean, invstd = torch.empty(4, device="meta"), torch.empty(4, device="meta")
    args = (x, w, None, None, None, mean, invstd, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        launch_plan("bn_relu_conv2d", *args, True)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        launch_plan("bn_relu_conv2d_stats", *args, True)
    small = torch.empty(1, 4, 2 ** 12, 2 ** 12, device="meta")  # y: 2**28 per image: planned
    assert launch_plan("bn_relu_conv2d", small, *args[1:], True)
