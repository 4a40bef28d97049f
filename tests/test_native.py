"""The native backend's ops (``torch.ops.resfast.*``, C++ on CPU, CUDA on GPU) against the
eager reference ``resfast.ops.reference`` with the float64 rule of docs/design.md.

Each conv case runs twice on the CPU: with the tiled kernels (the CUDA grid's blocks of
``csrc/include/resfast/tiles.h`` run one by one, float16 / bfloat16 through the emulated
tensor-core fragments, float32 through the SIMT loop) and with ``RESFAST_NATIVE_KERNELS=generic``
(the per-element functions the generic CUDA kernels use), so every code path the GPU has is
checked here. The cases cover each tile plan the kernels choose: packed small groups
(block-diagonal weights), one group per block with 16, 32 and 64 columns, several K chunks,
several column blocks per group, strides, dilation, padding and vector / strided loads. With a
GPU the same cases run on CUDA, plus realistic ResNeXt-50 and DenseNet-121 shapes.
"""
from __future__ import annotations

import math

import pytest
import torch

import resfast
from resfast.backends import native_info
from resfast.ops import reference
from resfast.ops.opset import OP_NAMES
from resfast.ops.schemas import out_memory_format

from pair_checks import assert_block_same_with_and_without_pair, assert_pair_is_two_full_ops
from reference import assert_rule

NATIVE = native_info()
pytestmark = pytest.mark.skipif(not NATIVE["built"], reason=f"resfast._C is not built: {NATIVE['error']}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_CUDA_KERNELS = bool(NATIVE["cuda"]) and torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not HAS_CUDA_KERNELS, reason="no CUDA device, or resfast._C was built without CUDA kernels")])]


def ops():
    from resfast.ops.opsets import get_ops

    return get_ops("native")  # loads resfast._C and registers fakes + autograd


# (N, C, C_out, H, W, k, stride, padding, dilation, groups, channels_last, prefix_view, bias, affine)
CASES = {
    "dense3x3_prefix_N1": (1, 8, 6, 7, 9, 3, 1, 1, 1, 1, False, True, True, True),
    "resnext_g32_cl_prefix": (2, 64, 64, 6, 5, 3, 1, 1, 1, 32, True, True, False, True),
    "depthwise_stride2": (2, 6, 6, 7, 5, 3, 2, 1, 1, 6, False, False, True, False),
    "g2_1x1_cl_odd_channels": (2, 10, 14, 5, 7, 1, 1, 0, 1, 2, True, True, True, True),
    "dilated_stride2_pad0": (1, 5, 3, 11, 13, 3, 2, 0, 2, 1, False, False, False, True),
    "crosses_tiles_g2": (1, 4, 6, 19, 21, 3, 1, 1, 1, 2, False, True, True, True),
    "stride2_cl_crosses_tiles": (1, 4, 4, 35, 18, 3, 2, 1, 1, 4, True, False, True, True),
    # Wide dense convs: the tiled kernels split the channels they accumulate over several
    # blocks (the last one partial) and stage the other side in several chunks.
    "dense_c40_chunks_cl_prefix": (1, 40, 40, 5, 6, 3, 1, 1, 1, 1, True, True, True, True),
    "dense_s2_chunks": (2, 24, 20, 9, 7, 3, 2, 1, 1, 1, False, False, False, True),
    # Tensor-core plans (float16 / bfloat16): 4-channel groups packed four to a block with
    # 16-byte vector loads; a group of 32 per block (n8 tiles 4); 64 columns (n8 tiles 8) with
    # a second, partial column block and two K chunks (the second partial); a strided 1x1.
    "packed_g8_vec_cl": (2, 32, 32, 9, 10, 3, 1, 1, 1, 8, True, False, True, True),
    "group32_nt4_cl": (2, 64, 64, 7, 7, 3, 1, 1, 1, 2, True, False, False, True),
    "wide_nt8_two_chunks_cl_prefix": (1, 80, 72, 5, 6, 3, 1, 1, 1, 1, True, True, True, True),
    "pointwise_s2_vec_cl": (2, 48, 24, 9, 9, 1, 2, 0, 1, 1, True, False, False, True),
    # Wide 1x1s whose weight-gradient warps share their B fragment (64 input channels per
    # block: one column pair per warp): 128 x 64 channels (every warp full), with partial row
    # and column blocks, and 64 x 64 (warps of 4 units).
    "pointwise_wide_b_shared_cl": (2, 72, 80, 5, 6, 1, 1, 0, 1, 1, True, False, False, True),
    "pointwise_b_shared_cl": (2, 64, 48, 5, 6, 1, 1, 0, 1, 1, True, False, False, True),
    # The large weight-gradient kernel with a shared A fragment but partial warps (3x3, 32 x 16
    # channels: 18 units), and with neither fragment shared (1x1, 128 x 32 channels).
    "wgrad_a_shared_partial_cl": (2, 16, 32, 6, 7, 3, 1, 1, 1, 1, True, False, False, True),
    "wgrad_unshared_1x1_cl": (2, 32, 128, 4, 5, 1, 1, 0, 1, 1, True, False, False, True),
    # K chunks of 128 channels (wide 1x1s: half the chunk loops of 64): 200 input channels in a
    # full and a partial chunk forward, 136 output channels the same in the input gradient.
    "pointwise_bk128_two_chunks_cl_prefix": (2, 200, 136, 5, 6, 1, 1, 0, 1, 1, True, True, True, True),
}


def _make_x(n, c, h, w, channels_last, prefix_view, dtype, device):
    extra = 3 if prefix_view else 0
    buf = torch.randn(n, c + extra, h, w, dtype=torch.float32, device=device) * 1.5 + 0.3
    if channels_last:
        buf = buf.contiguous(memory_format=torch.channels_last)
    return buf.to(dtype)[:, :c]  # .to keeps the memory format


def _case(name, dtype, device):
    n, c, co, h, w, k, s, p, d, g, cl, prefix, has_bias, affine = CASES[name]
    x = _make_x(n, c, h, w, cl, prefix, dtype, device)
    weight = (torch.randn(co, c // g, k, k, device=device) / math.sqrt(c // g * k * k)).to(dtype)
    bias = torch.randn(co, device=device).to(dtype) if has_bias else None
    bn_weight = torch.rand(c, device=device) + 0.5 if affine else None
    bn_bias = torch.randn(c, device=device) * 0.5 if affine else None
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    conv = dict(stride=[s, s], padding=[p, p], dilation=[d, d], groups=g)
    return x, weight, bias, bn_weight, bn_bias, mean, invstd, conv


def _f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def _refs(fn, *args, **kwargs):
    """``fn`` on float64 CPU copies (ref64) and on the original dtype (ref_same)."""
    ref64 = fn(*[_f64(a) if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    ref_same = fn(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    return ref64, ref_same


@pytest.fixture(params=["tiled", "generic"])
def kernels(request, monkeypatch):
    if request.param == "generic":
        monkeypatch.setenv("RESFAST_NATIVE_KERNELS", "generic")
    else:
        monkeypatch.delenv("RESFAST_NATIVE_KERNELS", raising=False)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_out(name, dtype, device, kernels):
    x, weight, bias, gm, bt, mean, invstd, conv = _case(name, dtype, device)
    args = (x, weight, bias, gm, bt, mean, invstd, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    ctx = f"{name} {dtype} {device} {kernels}"
    y = ops().bn_relu_conv2d(*args, True)
    ref64, ref_same = _refs(reference.bn_relu_conv2d, *args, True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=out_memory_format(x)), ctx
    assert_rule("y", y, ref64, ref_same, ctx)

    # out=: a channel slice of a NaN-poisoned buffer; the channels around it stay untouched.
    n, co, ho, wo = y.shape
    buf = torch.full((n, co + 5, ho, wo), float("nan"), dtype=dtype, device=device)
    if x.stride(1) == 1:
        buf = buf.contiguous(memory_format=torch.channels_last)
    out = buf[:, 2:2 + co]
    assert ops().bn_relu_conv2d_out(*args, out) is None
    assert_rule("out", out, ref64, ref_same, ctx)
    assert torch.isnan(buf[:, :2]).all() and torch.isnan(buf[:, 2 + co:]).all(), ctx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_backward_and_elemt(name, dtype, device, kernels):
    x, weight, bias, gm, bt, mean, invstd, conv = _case(name, dtype, device)
    ctx = f"{name} {dtype} {device} {kernels}"
    shape = reference.bn_relu_conv2d(x.cpu().float(), weight.cpu().float(), None, None, None, mean.cpu(),
                                      invstd.cpu(), conv["stride"], conv["padding"], conv["dilation"],
                                      conv["groups"], False).shape
    # grad_out as a strided view (every other channel of a bigger tensor).
    grad_out = torch.randn(shape[0], 2 * shape[1], *shape[2:], device=device).to(dtype)[:, ::2]
    args = (grad_out, x, weight, gm, bt, mean, invstd, conv["stride"], conv["padding"], conv["dilation"],
            conv["groups"], True)
    got = ops().bn_relu_conv2d_backward(*args)
    ref64, ref_same = _refs(reference.bn_relu_conv2d_backward, *args)
    names = ("grad_z", "grad_weight", "grad_bias", "sum_dz", "sum_dz_xhat")
    assert got[0].is_contiguous(memory_format=out_memory_format(x)), ctx
    assert got[1].is_contiguous() and got[1].dtype == weight.dtype and got[2].dtype == weight.dtype, ctx
    assert got[3].dtype == torch.float32 and got[4].dtype == torch.float32, ctx
    for nm, g, r64, rs in zip(names, got, ref64, ref_same):
        assert_rule(nm, g, r64, rs, ctx, dtype=dtype)

    count = x.numel() // x.shape[1]
    sum_dz, sum_dz_xhat = ref64[3].float().to(device), ref64[4].float().to(device)
    eargs = (got[0], x, gm, mean, invstd, sum_dz, sum_dz_xhat, 1.0 / count)
    gx = ops().bn_backward_elemt(*eargs)
    r64, rs = _refs(reference.bn_backward_elemt, *eargs)
    assert gx.dtype == dtype and gx.is_contiguous(memory_format=out_memory_format(x)), ctx
    assert_rule("grad_x", gx, r64, rs, ctx)

    # _out into a channel slice of a poisoned buffer, then accumulated onto a random one.
    buf = torch.full((x.shape[0], x.shape[1] + 3, *x.shape[2:]), float("nan"), dtype=dtype, device=device)
    if x.stride(1) == 1:
        buf = buf.contiguous(memory_format=torch.channels_last)
    out = buf[:, 1:1 + x.shape[1]]
    assert ops().bn_backward_elemt_out(*eargs, False, out) is None
    assert_rule("grad_x out", out, r64, rs, ctx)
    assert torch.isnan(buf[:, :1]).all() and torch.isnan(buf[:, 1 + x.shape[1]:]).all(), ctx
    base = torch.randn(x.shape, device=device).to(dtype)
    out.copy_(base)
    ops().bn_backward_elemt_out(*eargs, True, out)
    same = base.clone()
    reference.bn_backward_elemt_out(*eargs, True, same)
    assert_rule("grad_x accumulated", out, r64 + base.double().cpu(), same, ctx)

    # Without a conv bias no bias gradient is computed.
    assert ops().bn_relu_conv2d_backward(*args[:-1], False)[2].numel() == 0, ctx


def _full_reference(go, x, w, bw, bb, mean, invstd, stride, padding, dilation, groups, bias_grad):
    """The composed reference of ``bn_relu_conv2d_backward_full`` (``mean``/``invstd`` x's own
    batch statistics): ``(grad_x, grad_weight, grad_bias, sum_dz_xhat, sum_dz)``."""
    gz, gw, gb, sdz, sdzx = reference.bn_relu_conv2d_backward(go, x, w, bw, bb, mean, invstd, stride, padding,
                                                               dilation, groups, bias_grad)
    gx = reference.bn_backward_elemt(gz, x, bw, mean, invstd, sdz, sdzx, 1.0 / (x.numel() // x.shape[1]))
    return gx, gw, gb, sdzx, sdz


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["resnext_g32_cl_prefix", "depthwise_stride2", "packed_g8_vec_cl"])
@pytest.mark.parametrize("into", [None, "write", "accumulate"])
def test_backward_full(name, dtype, device, into):
    """The training backward in one C++ op (the conv backward, then the BN input gradient with
    x's own statistics: returned, written into a poisoned buffer's channel slice, or added to
    one) against the composed eager ops in float64, every output; grad_x_out's version bumped."""
    x, weight, bias, gm, bt, mean, invstd, conv = _case(name, dtype, device)
    ctx = f"{name} {dtype} {device} {into}"
    shape = reference.bn_relu_conv2d(x.cpu().float(), weight.cpu().float(), None, None, None, mean.cpu(),
                                      invstd.cpu(), conv["stride"], conv["padding"], conv["dilation"],
                                      conv["groups"], False).shape
    grad_out = torch.randn(shape, device=device).to(dtype)
    args = (grad_out, x, weight, gm, bt, mean, invstd, conv["stride"], conv["padding"], conv["dilation"],
            conv["groups"], bias is not None)
    ref64, ref_same = _refs(_full_reference, *args)
    names = ("grad_x", "grad_weight", "grad_bias", "sum_dz_xhat", "sum_dz")
    if into is None:
        got = ops().bn_relu_conv2d_backward_full(*args, None, False, True)
        assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=out_memory_format(x)), ctx
    else:
        buf = torch.full((x.shape[0], x.shape[1] + 3, *x.shape[2:]), float("nan"), dtype=dtype, device=device)
        out = buf[:, 1:1 + x.shape[1]]
        base = torch.randn(x.shape, device=device).to(dtype)
        if into == "accumulate":
            out.copy_(base)
            ref64 = (ref64[0] + base.double().cpu(), *ref64[1:])
            ref_same = (ref_same[0] + base.cpu(), *ref_same[1:])
        version = out._version
        got = ops().bn_relu_conv2d_backward_full(*args, out, into == "accumulate", True)
        assert got[0].numel() == 0 and out._version > version, ctx
        assert torch.isnan(buf[:, :1]).all() and torch.isnan(buf[:, 1 + x.shape[1]:]).all(), ctx
        got = (out, *got[1:])
    for nm, g, r64, rs in zip(names, got, ref64, ref_same):
        assert_rule(nm, g, r64, rs, ctx, dtype=dtype)


# With a grid target of one block, a forward / input-gradient block runs several spatial tiles
# with its weights staged once, and the weight gradient runs every tile in one split: the loops
# that large convs take on the GPU (the plans read RESFAST_NATIVE_TARGET_BLOCKS on both devices).
FEW_BLOCK_CASES = ["packed_g8_vec_cl", "group32_nt4_cl", "crosses_tiles_g2", "stride2_cl_crosses_tiles",
                   "dense_s2_chunks", "resnext_g32_cl_prefix"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", FEW_BLOCK_CASES)
def test_few_blocks_many_tiles_per_block(name, dtype, monkeypatch):
    monkeypatch.setenv("RESFAST_NATIVE_TARGET_BLOCKS", "1")
    monkeypatch.delenv("RESFAST_NATIVE_KERNELS", raising=False)
    test_forward_and_out(name, dtype, "cpu", "tiled")
    test_backward_and_elemt(name, dtype, "cpu", "tiled")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw_prefix", "channels_last_prefix", "contiguous_N1"])
def test_bn_stats(layout, dtype, device):
    if layout == "contiguous_N1":
        x = _make_x(1, 7, 9, 11, False, False, dtype, device)
    else:
        x = _make_x(3, 13, 5, 7, layout.startswith("channels_last"), True, dtype, device)
    x = x + 20.0  # an offset that sum / sum-of-squares would lose precision on
    mean, var = ops().bn_stats(x)
    (m64, v64), (ms, vs) = _refs(reference.bn_stats, x)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == acc and var.dtype == acc and mean.shape == (x.shape[1],)
    assert_rule("mean", mean, m64, ms, f"{layout} {dtype}", dtype=dtype)
    assert_rule("var", var, v64, vs, f"{layout} {dtype}", dtype=dtype)


# ---- autograd through the public functional --------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("groups,channels_last", [(1, False), (2, True)])
def test_gradcheck_functional(training, groups, channels_last):
    torch.manual_seed(1)
    c, co = 4, 4
    x = torch.randn(2, c, 5, 4, dtype=torch.float64) + 0.2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = torch.randn(co, c // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(co, dtype=torch.float64, requires_grad=True)
    gm = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(True)
    bt = (torch.randn(c, dtype=torch.float64) * 0.3).requires_grad_(True)
    rm, rv = torch.randn(c, dtype=torch.float64) * 0.1, torch.rand(c, dtype=torch.float64) + 0.5

    def fn(x, weight, bias, gm, bt):
        return resfast.functional.bn_relu_conv2d(
            x, weight, bias, bn_weight=gm, bn_bias=bt, running_mean=rm.clone(), running_var=rv.clone(),
            training=training, stride=1, padding=1, groups=groups, backend="native")

    y = fn(x, weight, bias, gm, bt)
    assert y.grad_fn is not None
    assert torch.autograd.gradcheck(fn, (x, weight, bias, gm, bt), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_native_functional_matches_eager_running_stats():
    x = torch.randn(2, 6, 5, 5) + 1.0
    w = torch.randn(4, 3, 3, 3)
    results = {}
    for backend in ("eager", "native"):
        rm, rv = torch.zeros(6), torch.ones(6)
        y = resfast.functional.bn_relu_conv2d(x, w, None, bn_weight=None, bn_bias=None, running_mean=rm,
                                              running_var=rv, training=True, padding=1, groups=2, backend=backend)
        results[backend] = (y, rm, rv)
    for a, b in zip(results["native"], results["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- torch.library.opcheck ---------------------------------------------------------------

def _opcheck_samples():
    x, weight, bias, gm, bt, mean, invstd, conv = _case("g2_1x1_cl_odd_channels", torch.float32, "cpu")
    c = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    y = reference.bn_relu_conv2d(x, weight, bias, gm, bt, mean, invstd, *c, True)
    grad_out = torch.randn_like(y)
    out = torch.empty(y.shape[0], y.shape[1] + 3, *y.shape[2:])[:, 1:1 + y.shape[1]]
    gz = torch.randn_like(x)
    return {
        "bn_stats": (x,),
        "bn_relu_conv2d": (x.detach().clone().requires_grad_(True), weight.clone().requires_grad_(True), bias, gm, bt,
                           mean, invstd, *c, True),
        "bn_relu_conv2d_out": (x, weight, bias, gm, bt, mean, invstd, *c, out),
        "bn_stats_update": (x, torch.randn(x.shape[1]), torch.rand(x.shape[1]) + 0.5, 0.1, 1e-5),
        "bn_relu_conv2d_backward": (grad_out, x, weight, gm, bt, mean, invstd, *c, True),
        "bn_backward_elemt": (gz, x, gm, mean, invstd, torch.randn(x.shape[1]), torch.randn(x.shape[1]), 0.01),
        "bn_backward_elemt_out": (gz, x, gm, mean, invstd, torch.randn(x.shape[1]), torch.randn(x.shape[1]), 0.01,
                                  True, torch.randn_like(x)),
        "bn_relu_conv2d_train": (x, weight, bias, gm, bt, torch.randn(x.shape[1]), torch.rand(x.shape[1]) + 0.5, 0.1,
                                 1e-5, *c),
        "bn_relu_conv2d_backward_full": (grad_out, x, weight, gm, bt, mean, invstd, *c, True, None, False, True),
        "bn_relu_conv2d_backward_full_out": (grad_out, x, weight, gm, bt, mean, invstd, *c, False,
                                             torch.randn(x.shape[0], x.shape[1] + 2, *x.shape[2:])[:, 1:-1], True,
                                             True),
        # y = conv(x) chained into a 3x3 conv of its own batch statistics
        "bn_relu_conv2d_backward_pair": (torch.randn(y.shape[0], 3, *y.shape[2:]), y,
                                         torch.randn(3, y.shape[1], 3, 3) / 9, torch.rand(y.shape[1]) + 0.5,
                                         torch.randn(y.shape[1]), *reference.bn_stats_update(y, None, None, 0.1, 1e-5),
                                         [1, 1], [1, 1], [1, 1], 1, x, weight, gm, bt, mean, invstd, *c,
                                         torch.randn(x.shape[0], x.shape[1] + 2, *x.shape[2:])[:, 1:-1], True),
    }


@pytest.mark.parametrize("op", [*OP_NAMES, "bn_relu_conv2d_train", "bn_relu_conv2d_backward_full",
                                "bn_relu_conv2d_backward_full_out", "bn_relu_conv2d_backward_pair"])
def test_opcheck(op):
    ops()
    name = op[:-len("_out")] if op.endswith("_full_out") else op
    torch.library.opcheck(getattr(torch.ops.resfast, name).default, _opcheck_samples()[op])


# ---- the C++ schemas are the Python ones ------------------------------------------------------

@pytest.mark.parametrize("op", list(OP_NAMES))
def test_registered_schema_equals_python(op):
    from resfast.ops.schemas import SCHEMAS

    ops()
    registered = getattr(torch.ops.resfast, op).default._schema
    assert registered == torch._C.parse_schema("resfast::" + SCHEMAS[op]), f"{registered} != {SCHEMAS[op]}"


@pytest.mark.parametrize("name", ["bn_relu_conv2d_train", "bn_relu_conv2d_backward_full", "bn_relu_conv2d_backward_pair"])
def test_registered_optional_schema_equals_python(name):
    """The native op set's optional ops, the training forward and backward in one op each,
    have the triton op set's schemas."""
    from resfast.ops.schemas import OPTIONAL_SCHEMAS

    ops()
    registered = getattr(torch.ops.resfast, name).default._schema
    assert registered == torch._C.parse_schema("resfast::" + OPTIONAL_SCHEMAS[name]), str(registered)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["resnext_g32_cl_prefix", "depthwise_stride2"])
def test_train_forward_in_one_op(name, dtype):
    """``bn_relu_conv2d_train`` (C++ composite): equal to ``bn_stats_update`` then
    ``bn_relu_conv2d``, outputs and running statistics, the latter's versions bumped."""
    x, weight, bias, gm, bt, _, _, conv = _case(name, dtype, "cpu")
    c = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    rm, rv = torch.randn(x.shape[1]), torch.rand(x.shape[1]) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    v0, v1 = rm._version, rv._version
    y, mean, invstd = ops().bn_relu_conv2d_train(x, weight, bias, gm, bt, rm, rv, 0.1, 1e-5, *c)
    assert rm._version > v0 and rv._version > v1
    m2, i2 = ops().bn_stats_update(x, rm2, rv2, 0.1, 1e-5)
    assert torch.equal(mean, m2) and torch.equal(invstd, i2) and torch.equal(rm, rm2) and torch.equal(rv, rv2)
    assert torch.equal(y, ops().bn_relu_conv2d(x, weight, bias, gm, bt, m2, i2, *c, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdt, sdt", [(torch.float32, torch.float32), (torch.float32, torch.float64),
                                      (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=["f32", "f32_f64_running", "bf16_f32_running", "f16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_bn_stats_update_finalizes_in_its_kernel(device, xdt, sdt, channels_last):
    """``bn_stats_update`` (one device kernel pass and one finalize, no ATen arithmetic): the
    statistics, invstd and the running statistics of any float dtype, here strided views of
    larger buffers, updated in place (their other elements untouched, their versions bumped),
    by the float64 rule against the reference op set."""
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(3, 6, 5, 4, generator=g, dtype=torch.float64) * 2 + 1
    x = x64.to(xdt).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    buf_m = torch.randn(12, generator=g, dtype=torch.float64)
    buf_v = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
    bm, bv = buf_m.to(sdt).to(device).clone(), buf_v.to(sdt).to(device).clone()
    rm, rv = bm[::2], bv[1::2]
    others = (bm[1::2].clone(), bv[::2].clone())
    v0 = (rm._version, rv._version)
    mean, invstd = ops().bn_stats_update(x, rm, rv, 0.3, 1e-3)
    assert rm._version > v0[0] and rv._version > v0[1]
    assert torch.equal(bm[1::2], others[0]) and torch.equal(bv[::2], others[1])
    r64 = (buf_m[::2].clone(), buf_v[1::2].clone())
    m64, i64 = reference.bn_stats_update(x.double().cpu(), *r64, 0.3, 1e-3)
    rs = (buf_m[::2].to(sdt), buf_v[1::2].to(sdt))  # copies: the same-precision reference's own
    ms, is_ = reference.bn_stats_update(x.cpu(), *rs, 0.3, 1e-3)
    ctx = f"{device} x {xdt} running {sdt} cl={channels_last}"
    for name, got, ref64, same in (("mean", mean, m64, ms), ("invstd", invstd, i64, is_),
                                   ("running_mean", rm, r64[0], rs[0]), ("running_var", rv, r64[1], rs[1])):
        assert got.dtype == same.dtype, (name, got.dtype, same.dtype)
        # float64 running statistics of a float32 input hold float32 statistics: judged in float32
        assert_rule(name, got.cpu(), ref64, same, ctx, dtype=torch.float32 if same.dtype == torch.float64 else None)


@pytest.mark.parametrize("device", DEVICES)
def test_native_training_forward_launches(device):
    """The native training forward's statistics are one op that runs no ATen arithmetic (the
    statistics, the running-statistics update and invstd in the extension's own kernels): on
    CUDA, two kernel launches (partials, finalize) where composing ATen in-place ops took nine.
    Counted with torch.profiler (the ATen ops inside the op on the CPU, kernels on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(2, 8, 6, 5, device=device)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    ops().bn_stats_update(x, rm, rv, 0.1, 1e-5)  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        ops().bn_stats_update(x, rm, rv, 0.1, 1e-5)
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    inside = [e.name for e in events if e.name.startswith("aten::") and e.cpu_parent is not None
              and e.cpu_parent.name == "resfast::bn_stats_update"]
    assert set(inside) <= {"aten::empty", "aten::empty_strided"}, inside
    if device == "cuda":
        kernels = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and "Memcpy" not in e.name and "Memset" not in e.name]
        assert len(kernels) == 2, kernels


@pytest.mark.parametrize("device", DEVICES)
def test_native_training_backward_launches(device):
    """The native backward's tiled path finalizes its partial tables in its own kernels: the two
    per-channel sums in one launch, the weight gradient summed over the splits, permuted and
    rounded to the weight's dtype in another (no ATen sum / permute / copy / cast inside the op);
    on CUDA a bfloat16 call is 6 kernels (weights prepared, input gradient, sums, weight
    gradient, its finalize, the BN input gradient) where ATen's reductions made it 9."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 9, 10, generator=g).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn(32, 4, 3, 3, generator=g) / 6).to(device=device, dtype=torch.bfloat16)
    mean, invstd = ops().bn_stats_update(x, None, None, 0.1, 1e-5)
    go = torch.randn(2, 32, 9, 10, generator=g).to(device=device, dtype=torch.bfloat16)
    args = (go, x, w, None, None, mean, invstd, [1, 1], [1, 1], [1, 1], 8, False, None, False, True)
    ops().bn_relu_conv2d_backward_full(*args)  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        ops().bn_relu_conv2d_backward_full(*args)
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    inside = {e.name for e in events if e.name.startswith("aten::") and e.cpu_parent is not None
              and e.cpu_parent.name == "resfast::bn_relu_conv2d_backward"}
    assert not inside & {"aten::sum", "aten::permute", "aten::contiguous", "aten::copy_", "aten::_to_copy"}, inside
    if device == "cuda":
        kernels = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and "Memcpy" not in e.name and "Memset" not in e.name]
        assert len(kernels) == 6, kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_pair_is_the_two_backward_ops_in_one(dtype, monkeypatch):
    """``bn_relu_conv2d_backward_pair`` (C++ composite; a dense layer's two convs' backward):
    bit for bit two ``bn_relu_conv2d_backward_full`` calls in a row (added and written), and the
    native shared dense block gives the same with and without it (tests/pair_checks.py)."""
    for accumulate in (True, False):
        assert_pair_is_two_full_ops(ops(), "cpu", dtype, accumulate)
    assert_block_same_with_and_without_pair("native", "cpu", dtype, "bn_relu", monkeypatch)


# ---- bad input: RuntimeError from C++ naming the argument --------------------------------

def _good():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 2, 3, 3)
    return dict(x=x, weight=w, bias=None, bn_weight=None, bn_bias=None, mean=torch.zeros(4), invstd=torch.ones(4),
                stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=2)


def _call(**over):
    a = {**_good(), **over}
    return ops().bn_relu_conv2d(a["x"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"], a["mean"], a["invstd"],
                                a["stride"], a["padding"], a["dilation"], a["groups"], False)


@pytest.mark.parametrize("over,match", [
    (dict(x=torch.randn(4, 5, 5)), r"x must be a 4-D tensor .*got 3 dims"),
    (dict(x=torch.randn(2, 4, 5, 5).to(torch.int32)), r"x has unsupported dtype Int"),
    (dict(weight=torch.randn(6, 2, 3, 3, dtype=torch.float64)), r"weight has dtype Double but x has dtype Float"),
    (dict(groups=3), r"groups=3 does not divide the input channels C=4"),
    (dict(weight=torch.randn(5, 2, 3, 3)), r"groups=2 does not divide the output channels C_out=5"),
    (dict(weight=torch.randn(6, 4, 3, 3)), r"channel mismatch: x has C=4 .*expects 8"),
    (dict(mean=torch.zeros(3)), r"mean must have shape \[4\] .*got shape \[3\]"),
    (dict(bn_weight=torch.ones(5)), r"bn_weight must have shape \[4\]"),
    (dict(bias=torch.zeros(4)), r"bias must have shape \[6\]"),
    (dict(stride=[1, 1, 1]), r"stride must have 2 values .*got 3"),
    (dict(padding=[-1, 0]), r"padding must be >= 0, got \[-1, 0\]"),
    (dict(dilation=[0, 1]), r"dilation must be >= 1"),
    (dict(groups=0), r"groups must be >= 1, got 0"),
    (dict(x=torch.randn(2, 4, 1, 1), padding=[0, 0]), r"the conv output would be empty"),
])
def test_bad_input_raises_from_cpp(over, match):
    with pytest.raises(RuntimeError, match=match):
        _call(**over)


def test_bad_out_and_grad_shapes_raise():
    a = _good()
    conv = (a["stride"], a["padding"], a["dilation"], a["groups"])
    base = (a["x"], a["weight"], None, None, None, a["mean"], a["invstd"])
    with pytest.raises(RuntimeError, match=r"out must have shape \[2, 6, 5, 5\] .*got \[2, 6, 4, 5\]"):
        ops().bn_relu_conv2d_out(*base, *conv, torch.empty(2, 6, 4, 5))
    with pytest.raises(RuntimeError, match=r"out has dtype Half but x has dtype Float"):
        ops().bn_relu_conv2d_out(*base, *conv, torch.empty(2, 6, 5, 5, dtype=torch.half))
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[2, 6, 5, 5\]"):
        ops().bn_relu_conv2d_backward(torch.randn(2, 6, 3, 5), a["x"], a["weight"], None, None, a["mean"],
                                      a["invstd"], *conv, False)
    with pytest.raises(RuntimeError, match=r"grad_z must have shape \[2, 4, 5, 5\]"):
        ops().bn_backward_elemt(torch.randn(2, 4, 5, 4), a["x"], None, a["mean"], a["invstd"], torch.zeros(4),
                                torch.zeros(4), 0.02)
    with pytest.raises(RuntimeError, match=r"sum_dz_xhat must have shape \[4\]"):
        ops().bn_backward_elemt(torch.randn(2, 4, 5, 5), a["x"], None, a["mean"], a["invstd"], torch.zeros(4),
                                torch.zeros(2), 0.02)
    with pytest.raises(RuntimeError, match=r"out must have shape \[2, 4, 5, 5\]"):
        ops().bn_backward_elemt_out(torch.randn(2, 4, 5, 5), a["x"], None, a["mean"], a["invstd"], torch.zeros(4),
                                    torch.zeros(4), 0.02, False, torch.empty(2, 4, 5, 4))
    with pytest.raises(RuntimeError, match=r"x must be a 4-D tensor"):
        ops().bn_stats(torch.randn(3, 4))


# ---- NaN follows torch: relu passes it on, its backward zeroes only where the input <= 0 ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels_env", ["", "generic"])
def test_nan_in_x_follows_eager(kernels_env, dtype, monkeypatch):
    # groups=2 with 2 input / 3 output channels per group: the tensor-core kernels pack both
    # groups into one block, which must then keep the NaN inside its own group.
    monkeypatch.setenv("RESFAST_NATIVE_KERNELS", kernels_env)
    x = torch.randn(2, 4, 6, 5)
    x[1, 0, 3, 2] = float("nan")
    x = x.to(dtype)
    w, gm, bt = torch.randn(6, 2, 3, 3).to(dtype), torch.rand(4) + 0.5, torch.randn(4)
    conv = ([1, 1], [1, 1], [1, 1], 2)
    for mean in (torch.zeros(4), ops().bn_stats(x)[0]):  # eval-like, and batch stats (NaN mean)
        invstd = torch.rand(4) + 0.5
        y = ops().bn_relu_conv2d(x, w, None, gm, bt, mean, invstd, *conv, False)
        r64, rs = _refs(reference.bn_relu_conv2d, x, w, None, gm, bt, mean, invstd, *conv, False)
        assert torch.isnan(y).any() and not torch.isnan(y).all()
        assert_rule("y", y, r64, rs, f"nan {dtype}")
        go = torch.randn_like(y)
        got = ops().bn_relu_conv2d_backward(go, x, w, gm, bt, mean, invstd, *conv, True)
        r64, rs = _refs(reference.bn_relu_conv2d_backward, go, x, w, gm, bt, mean, invstd, *conv, True)
        for nm, g, a, b in zip(("grad_z", "grad_weight", "grad_bias", "sum_dz", "sum_dz_xhat"), got, r64, rs):
            assert_rule(nm, g, a, b, f"nan {dtype}", dtype=dtype)
        zero = torch.zeros(4)
        gx = ops().bn_backward_elemt(got[0], x, gm, mean, invstd, zero, zero, 0.0)
        r64, rs = _refs(reference.bn_backward_elemt, got[0], x, gm, mean, invstd, zero, zero, 0.0)
        assert_rule("grad_x", gx, r64, rs, f"nan {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_in_grad_out_stays_in_its_group(dtype):
    # A NaN in one output channel's gradient reaches the input gradient of its own group only,
    # also where the input-gradient kernel packs both groups into one block.
    x = torch.randn(2, 4, 6, 5).to(dtype)
    w, gm, bt = torch.randn(6, 2, 3, 3).to(dtype), torch.rand(4) + 0.5, torch.randn(4)
    mean, invstd = torch.randn(4) * 0.1, torch.rand(4) + 0.5
    conv = ([1, 1], [1, 1], [1, 1], 2)
    go = torch.randn(2, 6, 6, 5).to(dtype)
    go[0, 4, 2, 2] = float("nan")  # group 1
    got = ops().bn_relu_conv2d_backward(go, x, w, gm, bt, mean, invstd, *conv, False)
    r64, rs = _refs(reference.bn_relu_conv2d_backward, go, x, w, gm, bt, mean, invstd, *conv, False)
    assert not torch.isnan(got[0][:, :2]).any() and torch.isnan(got[0][:, 2:]).any()
    for nm, g, a, b in zip(("grad_z", "grad_weight", "grad_bias", "sum_dz", "sum_dz_xhat"), got, r64, rs):
        assert_rule(nm, g, a, b, f"nan grad_out {dtype}", dtype=dtype)


# ---- CUDA: realistic shapes on the tensor-core kernels ---------------------------------------

# (N, C, C_out, H, W, k, stride, padding, groups): ResNeXt-50's grouped 3x3 convs (stages 1
# and 4, and stage 2's stride-2 first block) and DenseNet-121's bottleneck 1x1 and growth 3x3,
# with their channels and sizes at small batches (the float64 reference runs on the CPU). They
# take the tensor-core plans of the real sizes: packed 4-channel groups with several tiles per
# block, a 32-channel group per block, strided taps, a 64-column block with K in chunks.
CUDA_SHAPES = {
    "resnext50_s1": (8, 128, 128, 56, 56, 3, 1, 1, 32),
    "resnext50_s4": (8, 1024, 1024, 7, 7, 3, 1, 1, 32),
    "resnext50_s2_stride2": (2, 256, 256, 56, 56, 3, 2, 1, 32),
    "densenet121_1x1": (4, 512, 128, 28, 28, 1, 1, 0, 1),
    "densenet121_3x3": (4, 128, 32, 28, 28, 3, 1, 1, 1),
}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="no CUDA device, or resfast._C was built without CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CUDA_SHAPES))
def test_cuda_realistic_shapes(name, dtype):
    n, c, co, h, w, k, s, p, g = CUDA_SHAPES[name]
    torch.manual_seed(3)
    dev = "cuda"
    x = (torch.randn(n, c, h, w, device=dev) * 1.5 + 0.3).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(co, c // g, k, k, device=dev) / math.sqrt(c // g * k * k)).to(dtype)
    gm, bt = torch.rand(c, device=dev) + 0.5, torch.randn(c, device=dev) * 0.5
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    conv = ([s, s], [p, p], [1, 1], g)
    args = (x, weight, None, gm, bt, mean, invstd, *conv)
    y = ops().bn_relu_conv2d(*args, True)
    ref64 = reference.bn_relu_conv2d(*[_f64(a) if isinstance(a, torch.Tensor) else a for a in args], True)
    ref_same = reference.bn_relu_conv2d(*args, True)  # eager on the GPU in the same dtype
    assert_rule("y", y, ref64, ref_same, name)
    grad_out = torch.randn_like(y)
    bargs = (grad_out, x, weight, gm, bt, mean, invstd, *conv, False)
    got = ops().bn_relu_conv2d_backward(*bargs)
    ref64 = reference.bn_relu_conv2d_backward(*[_f64(a) if isinstance(a, torch.Tensor) else a for a in bargs])
    ref_same = reference.bn_relu_conv2d_backward(*bargs)
    for nm, gt, r64, rs in zip(("grad_z", "grad_weight", "grad_bias", "sum_dz", "sum_dz_xhat"), got, ref64, ref_same):
        assert_rule(nm, gt, r64, rs, name, dtype=dtype)
