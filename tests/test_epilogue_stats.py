"""Statistics in the epilogue (triton): ``bn_relu_conv2d_stats`` takes the batch statistics of
its output in the conv's epilogue, ``bn_stats_merge_update`` turns them into the next
BatchNorm's mean, inverse std and running-statistics update, and the functional op chains them
(``return_stats=True`` -> ``input_stats=``).

Checked against float64 with the rule of docs/design.md (statistics, running statistics, and a
chained pair's outputs and every gradient), packed small groups with a NaN (the exact fix-up
keeps it in its group's statistics), and launch counts: a chained consumer's forward is two
launches (the finalize and the conv) instead of three. Runs under the Triton interpreter on
the CPU (tiny shapes).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from pair_checks import assert_pair_is_two_full_ops, assert_run_same_with_and_without_pair
from reference import assert_rule
from resfast.backends import backend_status
from resfast.functional import bn_relu_conv2d
from resfast.profiling.launches import LaunchCounter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY = backend_status(DEVICE)["triton"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

CASES = {  # c, co, groups, k, stride, bias, channels_last, dtype
    "packed_3x3": (16, 16, 4, 3, 1, False, True, torch.float32),
    "dense_1x1_bias": (12, 8, 1, 1, 1, True, False, torch.float32),
    "wide_3x3_s2_bf16": (8, 40, 1, 3, 2, False, True, torch.bfloat16),
}


def _ops():
    from resfast.ops.triton_ops import OPS

    return OPS


def _inputs(c, co, groups, k, bias, channels_last, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, 7, 6, generator=g) * 1.3 + 0.4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(co, c // groups, k, k, generator=g) / (c // groups * k * k) ** 0.5
    b = torch.randn(co, generator=g) * 0.2 if bias else None
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


@functools.lru_cache(maxsize=None)
def _stats_case(case):
    """A case's inputs on the device, x's own statistics ``m``, ``iv``, the conv arguments, and
    ``bn_relu_conv2d_stats``' ``(y, partials)``: taken once per case and shared by the two tests
    that read them (neither writes into them)."""
    c, co, groups, k, stride, bias, cl, dtype = CASES[case]
    x, w, b = _inputs(c, co, groups, k, bias, cl, dtype)
    xd = x.to(DEVICE)
    m = xd.float().mean((0, 2, 3))
    iv = torch.rsqrt(xd.float().var((0, 2, 3), correction=0) + 1e-5)
    conv = ([stride] * 2, [k // 2] * 2, [1, 1], groups)
    bd = None if b is None else b.to(DEVICE)
    y, partials = _ops().bn_relu_conv2d_stats(xd, w.to(DEVICE), bd, None, None, m, iv, *conv, True)
    return x, w, b, xd, m, iv, conv, bd, y, partials


@pytest.mark.parametrize("case", sorted(CASES))
def test_epilogue_statistics_match_float64(case):
    co, dtype = CASES[case][1], CASES[case][7]
    x, w, b, xd, m, iv, conv, bd, y, partials = _stats_case(case)
    assert partials.dtype == torch.float32 and tuple(partials.shape[::2]) == (3, co)
    # the output itself is the plain op's
    assert torch.equal(y, _ops().bn_relu_conv2d(xd, w.to(DEVICE), bd, None, None, m, iv, *conv, True))
    rm, rv = torch.zeros(co, device=DEVICE), torch.ones(co, device=DEVICE)
    count = y.numel() // co
    mean, invstd = _ops().bn_stats_merge_update(partials, count, rm, rv, 0.1, 1e-5)
    # references: float64 of the same math, and eager's statistics of the output in its own dtype
    a64 = torch.relu((x.double() - m.double().cpu().view(1, -1, 1, 1)) * iv.double().cpu().view(1, -1, 1, 1))
    y64 = F.conv2d(a64, w.double(), None if b is None else b.double(), *conv)
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    var_s, mean_s = torch.var_mean(y.float().cpu(), dim=(0, 2, 3), correction=0)
    ctx = f"{case}"
    assert_rule("mean", mean, mean64, mean_s, ctx, dtype=dtype)
    assert_rule("invstd", invstd, (var64 + 1e-5).rsqrt(), (var_s + 1e-5).rsqrt(), ctx, dtype=dtype)
    unbias = count / (count - 1)
    assert_rule("running_mean", rm, 0.1 * mean64, 0.1 * mean_s, ctx, dtype=dtype)
    assert_rule("running_var", rv, 0.9 + 0.1 * var64 * unbias, 0.9 + 0.1 * var_s * unbias, ctx, dtype=dtype)


@pytest.mark.parametrize("case", sorted(CASES))
def test_out_forms_write_the_output_and_statistics_where_asked(case):
    """``bn_relu_conv2d_out_stats`` writes the op's output into a channel slice of a poisoned
    buffer and returns the same partials; ``bn_stats_merge_out`` writes their mean and biased
    variance into slices of larger vectors (the shared dense block's per-channel statistics),
    checked against float64 with the rule, the neighbours untouched and the versions bumped."""
    co, cl, dtype = CASES[case][1], CASES[case][6], CASES[case][7]
    x, w, b, xd, m, iv, conv, bd, y, partials = _stats_case(case)
    n, _, ho, wo = y.shape
    buf = torch.full((n, co + 5, ho, wo), float("nan"), dtype=dtype, device=DEVICE)
    if cl:
        buf = buf.contiguous(memory_format=torch.channels_last)
    out = buf[:, 2:2 + co]
    version = out._version
    got = _ops().bn_relu_conv2d_out_stats(xd, w.to(DEVICE), bd, None, None, m, iv, *conv, out)
    assert out._version > version
    assert torch.equal(out, y) and torch.equal(got, partials)
    assert torch.isnan(buf[:, :2]).all() and torch.isnan(buf[:, 2 + co:]).all()

    mean_all, var_all, invstd_all = (torch.full((co + 3,), float("nan"), device=DEVICE) for _ in range(3))
    mean, var, invstd = mean_all[1:1 + co], var_all[1:1 + co], invstd_all[1:1 + co]
    v0, v1, v2 = mean._version, var._version, invstd._version
    assert _ops().bn_stats_merge_out(got, y.numel() // co, mean, var, invstd, 1e-3) is None
    assert mean._version > v0 and var._version > v1 and invstd._version > v2
    for t in (mean_all, var_all, invstd_all):
        assert torch.isnan(t[0]) and torch.isnan(t[1 + co:]).all()
    # without invstd: mean and var only
    mean2, var2 = torch.empty(co, device=DEVICE), torch.empty(co, device=DEVICE)
    _ops().bn_stats_merge_out(got, y.numel() // co, mean2, var2, None, 0.0)
    assert torch.equal(mean2, mean) and torch.equal(var2, var)
    a64 = torch.relu((x.double() - m.double().cpu().view(1, -1, 1, 1)) * iv.double().cpu().view(1, -1, 1, 1))
    y64 = F.conv2d(a64, w.double(), None if b is None else b.double(), *conv)
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    var_s, mean_s = torch.var_mean(y.float().cpu(), dim=(0, 2, 3), correction=0)
    assert_rule("mean", mean, mean64, mean_s, case, dtype=dtype)
    assert_rule("var", var, var64, var_s, case, dtype=dtype)
    assert_rule("invstd", invstd, (var64 + 1e-3).rsqrt(), (var_s + 1e-3).rsqrt(), case, dtype=dtype)


@pytest.mark.parametrize("with_out_stats", [True, False])
def test_merge_out_is_the_three_ops_in_one(with_out_stats):
    """``bn_relu_conv2d_merge_out`` (a dense layer's second half): bit for bit what
    ``bn_stats_merge_update``, ``bn_relu_conv2d_out_stats`` (or ``_out``) and
    ``bn_stats_merge_out`` give in a row: the statistics it returns, the running statistics,
    the output written into a slice, the output's statistics written into slices."""
    x, w, _ = _inputs(16, 8, 1, 3, False, True, torch.float32)
    xd = x.to(DEVICE)
    m, iv = xd.mean((0, 2, 3)), torch.rsqrt(xd.var((0, 2, 3), correction=0) + 1e-5)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    w1 = torch.randn(16, 16, 1, 1).to(DEVICE) / 4
    bott, partials = _ops().bn_relu_conv2d_stats(xd, w1, None, None, None, m, iv, [1, 1], [0, 0], [1, 1], 1, True)
    count = bott.numel() // 16
    g2, b2 = torch.rand(16, device=DEVICE) + 0.5, torch.randn(16, device=DEVICE) * 0.2
    wd = w.to(DEVICE)

    def run(merged):
        rm, rv = torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)
        buf = torch.full((2, 12, 7, 6), float("nan"), device=DEVICE).contiguous(memory_format=torch.channels_last)
        vecs = [torch.full((12,), float("nan"), device=DEVICE) for _ in range(3)]
        into = [v[2:10] for v in vecs] if with_out_stats else [None, None, None]
        if merged:
            mean, invstd = _ops().bn_relu_conv2d_merge_out(bott, partials, count, rm, rv, 0.1, 1e-5, wd, g2, b2, *conv,
                                                           buf[:, 2:10], *into, 1e-3)
        else:
            mean, invstd = _ops().bn_stats_merge_update(partials, count, rm, rv, 0.1, 1e-5)
            if with_out_stats:
                p = _ops().bn_relu_conv2d_out_stats(bott, wd, None, g2, b2, mean, invstd, *conv, buf[:, 2:10])
                _ops().bn_stats_merge_out(p, 2 * 7 * 6, *into, 1e-3)
            else:
                _ops().bn_relu_conv2d_out(bott, wd, None, g2, b2, mean, invstd, *conv, buf[:, 2:10])
        return [mean, invstd, rm, rv, buf, *vecs]

    merged = run(True)
    for name, a, b in zip(("mean", "invstd", "running_mean", "running_var", "buffer", "out mean", "out var",
                           "out invstd"), merged, run(False)):
        assert torch.equal(torch.nan_to_num(a, 7.0), torch.nan_to_num(b, 7.0)), name
    if with_out_stats:
        assert not torch.isnan(merged[5][2:10]).any()


@pytest.mark.parametrize("accumulate", [True, False])
def test_backward_pair_is_the_two_backward_ops_in_one(accumulate):
    """``bn_relu_conv2d_backward_pair`` (a dense layer's two convs' backward): bit for bit two
    ``bn_relu_conv2d_backward_full`` calls in a row (tests/pair_checks.py)."""
    assert_pair_is_two_full_ops(_ops(), DEVICE, torch.float32, accumulate)


def test_merge_out_rejects_vectors_it_cannot_write():
    x, w, _ = _inputs(16, 16, 4, 3, False, True, torch.float32)
    xd = x.to(DEVICE)
    m, iv = torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)
    _, partials = _ops().bn_relu_conv2d_stats(xd, w.to(DEVICE), None, None, None, m, iv, [1, 1], [1, 1], [1, 1], 4,
                                              True)
    good = torch.empty(16, device=DEVICE)
    for bad in (torch.empty(32, device=DEVICE)[::2], torch.empty(15, device=DEVICE),
                torch.empty(16, device=DEVICE, dtype=torch.float64)):
        with pytest.raises(ValueError, match="contiguous float32 vector"):
            _ops().bn_stats_merge_out(partials, 10, good, bad, None, 1e-5)
        with pytest.raises(ValueError, match="invstd must be a contiguous float32 vector"):
            _ops().bn_stats_merge_out(partials, 10, good, good.clone(), bad, 1e-5)
    with pytest.raises(ValueError, match="partials must be the float32"):
        _ops().bn_stats_merge_out(partials[0], 10, good, good.clone(), None, 1e-5)


def test_nan_stays_in_its_groups_statistics():
    """Packed small groups: 0 * NaN in the block-diagonal weights would spread one group's NaN;
    the fix-up recomputes that tile exactly, and its statistics come from the fix-up."""
    x, w, _ = _inputs(16, 16, 4, 3, False, False, torch.float32)
    x[1, 5, 2, 3] = float("nan")
    xd = x.to(DEVICE)
    m, iv = torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)
    y, partials = _ops().bn_relu_conv2d_stats(xd, w.to(DEVICE), None, None, None, m, iv, [1, 1], [1, 1], [1, 1], 4,
                                              True)
    mean, invstd = _ops().bn_stats_merge_update(partials, y.numel() // 16, None, None, 0.0, 1e-5)
    var_s, mean_s = torch.var_mean(y.double().cpu(), dim=(0, 2, 3), correction=0)
    assert torch.equal(torch.isnan(mean.cpu()), torch.isnan(mean_s)) and torch.isnan(mean_s).sum() == 4
    ok = ~torch.isnan(mean_s)
    assert (mean.cpu().double()[ok] - mean_s[ok]).abs().max() < 1e-5
    assert (invstd.cpu().double()[ok] - (var_s[ok] + 1e-5).rsqrt()).abs().max() < 1e-4


def _chain(x, w1, w2, p, backend, counter=None):
    """bn1-relu-conv1 -> bn2-relu-conv2 (conv2 3x3, groups 2), training, with statistics in the
    epilogue when the backend takes them; returns outputs, gradients and running statistics."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, *p)]
    x, w1, w2, g1, b1, g2, b2 = leaves
    rm1, rv1 = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device), torch.ones(x.shape[1], device=x.device)
    rm2, rv2 = torch.zeros(w1.shape[0], device=x.device), torch.ones(w1.shape[0], device=x.device)
    if x.dtype == torch.float64:
        rm1, rv1, rm2, rv2 = (t.double() for t in (rm1, rv1, rm2, rv2))
    h, stats = bn_relu_conv2d(x, w1, bn_weight=g1, bn_bias=b1, running_mean=rm1, running_var=rv1, training=True,
                              backend=backend, return_stats=True)
    launches = None
    if counter is not None:
        with counter.triton_hook(), counter:
            y = bn_relu_conv2d(h, w2, bn_weight=g2, bn_bias=b2, running_mean=rm2, running_var=rv2, training=True,
                               padding=1, groups=2, backend=backend, input_stats=stats)
        launches = sum(counter.aten.values()) + sum(counter.triton.values())
    else:
        y = bn_relu_conv2d(h, w2, bn_weight=g2, bn_bias=b2, running_mean=rm2, running_var=rv2, training=True,
                           padding=1, groups=2, backend=backend, input_stats=stats)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(y)
    grads = torch.autograd.grad(y, leaves, gy)
    return y.detach(), grads, (rm1, rv1, rm2, rv2), stats, launches


def test_chained_pair_matches_float64_and_launches_two_for_the_consumer():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 5, 7, generator=g) * 1.2 + 0.5
    w1 = torch.randn(8, 6, 1, 1, generator=g) / 6 ** 0.5
    w2 = torch.randn(8, 4, 3, 3, generator=g) / 6
    p = [torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g) * 0.2,
         torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g) * 0.2]
    counter = LaunchCounter()
    got = _chain(x.to(DEVICE), w1.to(DEVICE), w2.to(DEVICE), [t.to(DEVICE) for t in p], "triton", counter)
    ref64 = _chain(x.double(), w1.double(), w2.double(), [t.double() for t in p], "eager")
    ref32 = _chain(x, w1, w2, p, "eager")
    assert got[3] is not None and not got[3].requires_grad, "triton takes the statistics; they carry no gradient"
    assert ref32[3] is None, "eager takes its own statistics in the next op"
    assert got[4] == 2, f"the chained consumer's forward: finalize + conv, got {got[4]} launches"
    assert_rule("output", got[0], ref64[0], ref32[0], "chained")
    for name, a, b64, b32 in zip(("x", "w1", "w2", "g1", "b1", "g2", "b2"), got[1], ref64[1], ref32[1]):
        assert_rule(f"grad {name}", a, b64, b32, "chained")
    for name, a, b64, b32 in zip(("rm1", "rv1", "rm2", "rv2"), got[2], ref64[2], ref32[2]):
        assert_rule(name, a, b64, b32, "chained")


def test_input_stats_of_the_wrong_shape_are_rejected():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="input_stats must be the float32"):
        bn_relu_conv2d(x, torch.randn(4, 6, 1, 1), bn_weight=None, bn_bias=None, running_mean=None,
                       running_var=None, training=True, backend="eager", input_stats=torch.zeros(3, 4, 5))


def test_resnext_block_takes_bn2_statistics_in_conv2s_epilogue():
    """A grouped bottleneck (ResNeXt) on triton: one statistics pass in the training forward
    (bn1's), bn2's statistics come from conv2's epilogue (a finalize, no pass over the tensor);
    the block's numbers against float64 are tests/test_blocks.py's."""
    from resfast.nn.blocks import ResNeXtBottleneck

    torch.manual_seed(0)
    block = ResNeXtBottleneck(16, 4, 1, None, cardinality=2, base_width=32, backend="triton").to(DEVICE)
    assert block.conv2.groups == 2
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    counter = LaunchCounter()
    with counter.triton_hook(), counter:
        block(x)
    assert counter.triton["bn_stats_partial_kernel"] == 1, dict(counter.triton)
    assert counter.triton["bn_stats_finalize_kernel"] == 2, dict(counter.triton)


def test_a_large_bias_does_not_cancel_in_the_variance():
    """The epilogue sums the accumulator without the bias (added to the mean at the end), so a
    bias far above the output's spread costs the variance no precision."""
    x, w, _ = _inputs(12, 8, 1, 1, False, False, torch.float32, seed=4)
    b = torch.full((8,), 300.0)
    xd = x.to(DEVICE)
    m = xd.mean((0, 2, 3))
    iv = torch.rsqrt(xd.var((0, 2, 3), correction=0) + 1e-5)
    y, partials = _ops().bn_relu_conv2d_stats(xd, w.to(DEVICE), b.to(DEVICE), None, None, m, iv, [1, 1], [0, 0],
                                              [1, 1], 1, True)
    mean, invstd = _ops().bn_stats_merge_update(partials, y.numel() // 8, None, None, 0.0, 1e-5)
    a64 = torch.relu((x.double() - m.double().cpu().view(1, -1, 1, 1)) * iv.double().cpu().view(1, -1, 1, 1))
    var64, mean64 = torch.var_mean(F.conv2d(a64, w.double(), b.double()), dim=(0, 2, 3), correction=0)
    var_s, mean_s = torch.var_mean(y.cpu(), dim=(0, 2, 3), correction=0)
    assert_rule("mean", mean, mean64, mean_s, "bias 300")
    assert_rule("invstd", invstd, (var64 + 1e-5).rsqrt(), (var_s + 1e-5).rsqrt(), "bias 300")


def test_an_output_mean_far_above_its_spread_keeps_its_variance():
    """A BN shift of 100 before positive weights: the output's mean is hundreds of times its
    spread. The epilogue's per-position Welford accumulators do not cancel (a sum of squares
    would lose the variance)."""
    x, w, _ = _inputs(12, 8, 1, 1, False, False, torch.float32, seed=5)
    w = w.abs()
    beta = torch.full((12,), 100.0)
    xd = x.to(DEVICE)
    m = xd.mean((0, 2, 3))
    iv = torch.rsqrt(xd.var((0, 2, 3), correction=0) + 1e-5)
    y, partials = _ops().bn_relu_conv2d_stats(xd, w.to(DEVICE), None, None, beta.to(DEVICE), m, iv, [1, 1], [0, 0],
                                              [1, 1], 1, True)
    mean, invstd = _ops().bn_stats_merge_update(partials, y.numel() // 8, None, None, 0.0, 1e-5)
    z64 = (x.double() - m.double().cpu().view(1, -1, 1, 1)) * iv.double().cpu().view(1, -1, 1, 1) + 100.0
    var64, mean64 = torch.var_mean(F.conv2d(torch.relu(z64), w.double()), dim=(0, 2, 3), correction=0)
    assert (mean64.abs() / var64.sqrt()).min() > 50, "the case must have its mean far above its spread"
    var_s, mean_s = torch.var_mean(y.cpu(), dim=(0, 2, 3), correction=0)
    assert_rule("mean", mean, mean64, mean_s, "mean >> std")
    assert_rule("invstd", invstd, (var64 + 1e-5).rsqrt(), (var_s + 1e-5).rsqrt(), "mean >> std")


# The shared dense blocks of these tests: LAYERS layers over 6 input channels, a bottleneck of
# 2 x 4 channels, growth 4, on 2 x 6 x 5 x 4 inputs. Two layers keep every structure the
# checks need (a layer whose new channels a later layer reads, the last layer whose are not,
# readers with different eps) with a third fewer launches than three; every conv's shape is
# one that three layers run (layer 3's 14-channel prefix adds no kernel specialization).
LAYERS = 2
C_OUT = 6 + 4 * LAYERS


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
def test_shared_dense_block_takes_norm2_statistics_in_conv1s_epilogue(recompute, monkeypatch):
    """The shared dense block on triton: each layer's norm2 takes its statistics from conv1's
    epilogue (a finalize over the partials, no statistics pass over the bottleneck), and the
    new channels a later layer reads take theirs from conv3x3's (a finalize into the block's
    per-channel statistics): one statistics pass fewer per epilogue; output, input and parameter
    gradients and the running statistics against the float64 eager block with the rule, the
    unchained triton block as ``ref_same`` for the rule's slack. (Chaining forced: by the
    planner's rule the block's ungrouped convs run unchained, below.)

    The same runs show two one-op forms bit for bit what their ops give apart (each once
    was a test of its own, with two runs of the block):

    - ``bn_relu_conv2d_merge_out`` (norm2's finalize, the conv3x3 and the new channels'
      statistics in one call): the chained block against the chained block without it (the
      three ops); a forward-only op, so shown with ``recompute="bn_relu"`` only;
    - ``bn_relu_conv2d_backward_pair`` (a layer's two convs' backward in one call): the
      unchained block (the planner's default for these convs) against the unchained block
      without it (tests/pair_checks.py), in both recompute modes.

    Conv1's epilogue alone (the new channels' statistics by a statistics pass) changes the
    forward only, so it is held to the rule with ``recompute="bn_relu"`` (the bottleneck mode
    recomputes the bottleneck with the plain forward, whatever gave the statistics)."""
    from resfast.nn.dense import DenseBlock
    from resfast.ops import dense_block as db
    from resfast.ops import triton_ops

    monkeypatch.setattr(triton_ops, "DENSE_CHAIN", True)

    def make(backend, dtype=torch.float32):
        torch.manual_seed(0)
        block = DenseBlock(LAYERS, 6, 2, 4, memory="shared", recompute=recompute, backend=backend)
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
        return block.to(DEVICE, dtype)

    x = torch.randn(2, 6, 5, 4, device=DEVICE) * 1.4 + 0.3
    grad = torch.randn(2, C_OUT, 5, 4, device=DEVICE)
    launches = {}

    def step(block, dtype=torch.float32, name=None):
        xi = x.detach().to(dtype).clone().requires_grad_()
        counter = LaunchCounter()
        with counter.triton_hook(), counter:
            y = block(xi)
        y.backward(grad.to(dtype))
        res = {"output": y.detach(), "grad x": xi.grad}
        res.update({f"grad {n}": p.grad for n, p in block.named_parameters()})
        res.update({n: b for n, b in block.named_buffers()})
        if name is not None:
            launches.setdefault(name, counter.triton)
        return res

    def floating(res):
        return {k: v for k, v in res.items() if v.is_floating_point()}

    chained = step(make("triton"), name="chained")
    if recompute == "bn_relu":
        with monkeypatch.context() as m:
            m.setattr(db, "_merge_out_op", lambda ops: None)
            apart = step(make("triton"))
        for key in chained:
            assert torch.equal(chained[key], apart[key]), f"merge_out against the three ops: {key}"
    ref64 = floating(step(make("eager", torch.float64), torch.float64))
    stats_ops = db._stats_ops
    if recompute == "bn_relu":
        # without the conv3x3 epilogue (the new channels' statistics by a statistics pass)
        with monkeypatch.context() as m:
            m.setattr(db, "_stats_ops", lambda ops, names=("bn_relu_conv2d_stats", "bn_stats_merge_update"):
                      stats_ops(ops, names) if names[0] == "bn_relu_conv2d_stats" else None)
            conv1_only = floating(step(make("triton"), name="conv1_only"))
    # without either epilogue (the unchained block), with and without the one-op layer backward
    monkeypatch.setattr(db, "_stats_ops", lambda ops, names=None: None)
    same = floating(assert_run_same_with_and_without_pair(lambda: step(make("triton"), name="unchained"),
                                                          monkeypatch, ("triton", recompute)))
    unchained = launches["unchained"]
    # norm2's statistics from conv1's epilogue: LAYERS statistics passes fewer (one per layer);
    # the new channels' from conv3x3's: LAYERS - 1 fewer (every layer but the last writes channels
    # a later layer reads)
    assert launches["chained"]["bn_stats_partial_kernel"] == \
        unchained["bn_stats_partial_kernel"] - LAYERS - (LAYERS - 1), dict(launches["chained"])
    assert launches["chained"]["bn_stats_finalize_kernel"] == unchained["bn_stats_finalize_kernel"], \
        dict(launches["chained"])
    chained = floating(chained)
    for key in ref64:
        assert_rule(key, chained[key], ref64[key], same[key], f"recompute={recompute}")
    if recompute == "bn_relu":
        counts = launches["conv1_only"]
        assert counts["bn_stats_partial_kernel"] == unchained["bn_stats_partial_kernel"] - LAYERS, dict(counts)
        assert counts["bn_stats_finalize_kernel"] == unchained["bn_stats_finalize_kernel"], dict(counts)
        for key in ref64:
            assert_rule(key, conv1_only[key], ref64[key], same[key], f"recompute={recompute}, conv1 epilogue only")


@pytest.mark.parametrize("chain", [None, False, True])
def test_shared_dense_block_chains_by_the_planners_rule(chain, monkeypatch):
    """The shared block takes its layers' statistics in the convs' epilogues only where the
    planner's rule says the epilogue pays (``stats_epilogue_pays``: grouped convs; a dense
    layer's are not, so by default the block runs unchained), or as ``DENSE_CHAIN`` forces;
    the static model's chained consumer is then the plain forward (3 launches)."""
    from resfast.ops import dense_block as db
    from resfast.ops import triton_ops
    from resfast.profiling.sm90 import SHAPES
    from resfast.profiling.static_model import training_plan

    assert triton_ops.stats_epilogue_pays(32) and not triton_ops.stats_epilogue_pays(1)
    monkeypatch.setattr(triton_ops, "DENSE_CHAIN", chain)
    assert db._chains(_ops()) is bool(chain)
    assert not db._chains(torch.ops.aten)  # an op set without the epilogue ops never chains
    if chain is None:
        shapes = SHAPES
        for name, chained in (("densenet121_3x3_b4", False), ("densenet121_1x1_b3", False),
                              ("resnext50_s4", True)):
            plan = training_plan(shapes[name])
            names = [launch.name for launch in plan["fwd_consumer"]]
            assert names == ([k.name for k in plan["fwd"]][1:] if chained else [k.name for k in plan["fwd"]]), names


@pytest.mark.parametrize("variant", ["readers_eps_differ", "dropout"])
def test_shared_dense_block_where_the_new_channels_inverse_std_cannot_be_shared(variant):
    """Where the block's readers normalise with different eps (the inverse std is then each
    reader's own) or a dropout follows a conv3x3 (its channels' statistics are those of the
    dropped-out output, so a statistics pass), the triton shared block still matches the float64
    eager block with the rule: output, every gradient and the running statistics."""
    from resfast.nn.dense import DenseBlock

    drop = 0.3 if variant == "dropout" else 0.0

    def make(backend, dtype=torch.float32):
        torch.manual_seed(0)
        block = DenseBlock(LAYERS, 6, 2, 4, drop, memory="shared", backend=backend)
        for i, m in enumerate(block.modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
                if variant == "readers_eps_differ":
                    m.eps = 0.5 if i % 3 == 0 else 1e-5
        return block.to(DEVICE, dtype)

    x = torch.randn(2, 6, 5, 4, device=DEVICE) * 1.4 + 0.3
    grad = torch.randn(2, C_OUT, 5, 4, device=DEVICE)

    def step(block, dtype=torch.float32):
        xi = x.detach().to(dtype).clone().requires_grad_()
        torch.manual_seed(7)  # the same dropout masks on both backends
        y = block(xi)
        y.backward(grad.to(dtype))
        res = {"output": y.detach(), "grad x": xi.grad}
        res.update({f"grad {n}": p.grad for n, p in block.named_parameters()})
        res.update({n: b for n, b in block.named_buffers() if b.is_floating_point()})
        return res

    got = step(make("triton"))
    ref64 = step(make("eager", torch.float64), torch.float64)
    same = step(make("eager"))
    for key in ref64:
        assert_rule(key, got[key], ref64[key], same[key], variant)


def _producer(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 8, 5, 6, generator=g) * 1.2 + 0.3).to(DEVICE)
    w = (torch.randn(8, 2, 3, 3, generator=g) / 4).to(DEVICE)
    y, stats = bn_relu_conv2d(x, w, bn_weight=None, bn_bias=None, running_mean=None, running_var=None,
                              training=True, padding=1, groups=4, backend="triton", return_stats=True)
    assert stats is not None
    return y, stats


def _consume(x, stats):
    w = torch.randn(4, 8, 1, 1, generator=torch.Generator().manual_seed(5)).to(x)
    return bn_relu_conv2d(x, w, bn_weight=None, bn_bias=None, running_mean=None, running_var=None,
                          training=True, backend="triton", input_stats=stats)


def test_input_stats_are_refused_for_any_tensor_but_their_own():
    """Statistics describe one tensor as it was: another tensor of the same shape, the same
    tensor after an in-place change, or a copy of the statistics (which cannot be checked)
    would normalise with the wrong mean and variance; each raises before anything runs."""
    y, stats = _producer()
    other = y.clone()  # another tensor of the same shape (and values: the statistics name a tensor)
    ref = _consume(y, None)
    assert_rule("chained output", _consume(y, stats), ref.double(), ref, "own statistics")
    with pytest.raises(ValueError, match="another tensor"):
        _consume(other, stats)
    with pytest.raises(ValueError, match="copy or a tensor built elsewhere"):
        _consume(y, stats.clone())
    y.add_(1.0)
    with pytest.raises(ValueError, match="modified in place"):
        _consume(y, stats)
