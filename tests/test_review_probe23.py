"""A 23rd new-user trial: scale -- large reductions, huge batches and images, 32-bit index and
launch-grid limits, many channels / groups and extreme shapes. Each case is judged against the
same modules run unfused (eager PyTorch) by the float64 rule of tests/reference.py, or must
raise a clear error.

Found (the first three tests failed before the fixes):

* **Native (C++ CPU) batch statistics of long channels.** ``bn_stats`` merged one Welford state
  per row into a single float32 running total, one merge per row: at 10^7 values per channel
  (1024 x 1 x 100 x 100, float32, mean 0, std 1) the variance was 1.9e-4 off (19x the rule),
  at 256 x 2 x 56 x 56 1.2e-5 off (1.2x); the mean's error flipped ReLU masks where the
  activation is within rounding of 0, so a BNReLUConv2d training step's input gradient was
  0.24 off (23711x the rule) at 1024 x 1 x 100 x 100, 0.20 off (17483x) at 4 x 2 x 512 x 512,
  mean 100, std 1, 2.5 off (96166x) at mean 1e3, std 0.1; outputs 3-15x, the BN parameters'
  gradients up to 486x. Now blocks of 256 positions merged pairwise (a binary counter), in
  double as eager PyTorch's CPU batch norm accumulates (csrc/cpu/ops_cpu.cpp).
* **Native BN-gradient sums** (``sum_dz``, ``sum_dz_xhat``; the CUDA finalize and the CPU twin
  share tiles.h ``column_lane_sum``): each of 16 lanes added rows / 16 tile partials in plain
  float32 (thousands at 10^7 positions). With the statistics fixed, a training step at
  1024 x 1 x 100 x 100 still had the BN weight / bias gradients 0.11 / 0.053 off (15x / 18x);
  the lane sum is now compensated (Kahan, kept only while the sum is finite, so Inf / NaN
  partials still give the plain sum's Inf / NaN). Measured once in a scratch run (the native
  backward at 10^7 positions takes 45 s here): every output, gradient and running statistic
  within the rule at 256 x 2 x 56 x 56, 1024 x 1 x 100 x 100 and 4 x 2 x 512 x 512, mean 0 /
  1e2 / 1e3, std 1 / 1 / 0.1; the suite pins the 4 x 2 x 512 x 512 step.
* **Triton positions past 2**31.** The host checked each image's span (int32 offsets per image)
  but not the batch's positions N*H*W, which the statistics pass (``split * CHUNK``) and the
  BN input gradient (``program_id * BLOCK_P``) number with int32: batch 65536 of 1 x 224 x 224
  images (3.3e9 positions, 6.6 GB in bfloat16: fits an H200) was planned, and its chunks would
  wrap. Now refused with a ValueError naming the limit (triton_ops._check_span).

Matched (pinned compactly below, or measured once where too slow for the suite):

* statistics on eager and native at 10^6-10^7 values per channel, float32 / bfloat16 / float16,
  mean 0-1e4 with std 1e-3-1 (native float32 at mean 1e4, std 1 -- 10^4 standard deviations,
  the known limit of docs/design.md -- is now within the rule too); triton's ``bn_stats`` under
  the interpreter at 64 x 2 x 128 x 128 (10^6 per channel), float32 and float16, mean 0 / 1e2 /
  1e3: within the rule (100-200 s a case here, not in the suite; the GPU's plan has 660 chunks,
  the interpreter's 8, so a lane there sums ~40x fewer values);
* past 2**31 elements: native ``bn_stats`` of a float16 2 x 1 x 32768 x 32769 tensor
  (2147549184 elements, two non-zero values at its last positions) gave mean 2.32823538e-07 and
  variance 5.8205886e-04 against the exact 2.32823538e-07 and 5.8205885e-04 (18 s, one scratch
  run; the CPU twin's loops and element-wise indices are int64, by reading; its BN input
  gradient at that size needed more memory than this machine had free);
* launch grids on the CUDA code path (meta tensors): every launch of a training step's plan, for
  every static-model shape and batch 1-16384, DenseNet-121's block widths up to 4096 channels,
  2048 -> 2048 1x1 on 1x1 images, 2048 x 3x3 at 7x7 and 4096 x 3x3 at 2x2, depthwise at 2048
  groups, 1 x 4096 rows and 2048 x 2048 images up to batch 65536: axis 0 below 2**31 - 1, axes
  1 and 2 at most 65535, every float32 partial table under 2**31 elements (the weight-gradient
  reduce indexes its rows with int32). The native launchers, read: statistics grid
  ``(C, splits)`` with splits capped at 65535 (``reduction_splits``), the convs' 1-D
  ``plan.blocks`` (tiles.h decodes them in 32 bits: fewer than 2**31 tiles, which needs more
  than 2**31 positions first), element-wise kernels grid-stride with int64 indices, the weight
  gradient refused past 2**31 partial offsets (tiles.h ``wgrad_plan``);
* extreme shapes, train and eval: a 3x3 conv on 1 x W and H x 1 images (every backend), batch
  1 training at 2 x 2, 64 -> 64 1x1 convs on 1x1 images (ResNet's last stage at small inputs),
  depthwise at 64 groups, a 5x5 kernel on a padded 1x1 image (eager and native; all of them on
  triton too in a scratch run, 1-5 s each); a shared dense block whose concatenation passes
  1024 channels (eager and native); a kernel larger than the padded input is refused up front on
  every backend, as eager refuses it, running statistics untouched (pinned in
  tests/test_native.py).

Seen, not fixed: the CUDA statistics kernel (native) still accumulates each thread's Welford
state in float32 (as CUDA eager does); untested here (no GPU). Emulated on the CPU in float32
(DenseNet-121 block 4 at batch 16384: 802816 values per channel, channels_last, 16 splits x 8
lanes of 6272 sequential Welford steps, lanes merged in a tree, splits in order): mean errors
2e-10 / 3.9e-6 / 3.1e-5 and variance errors 3.9e-7 / 1.1e-7 / 9.8e-7 at mean 0 / 1e2 / 1e3, std
1 / 1 / 0.1 -- within the rule's statistics atol; a mean half an ulp off can still flip the odd
ReLU mask of a value within rounding of zero, as CUDA eager's float32 statistics can.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

from module_judge import judge_module
from reference import assert_rule, require_backend
from test_review_probe4 import _inputs, _run

# ------------------------------------------------------------------ finding: native statistics


@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("offset,std", [(0.0, 1.0), (1e2, 1.0)])
def test_statistics_of_a_channel_of_ten_million_values(backend, offset, std):
    """``bn_stats`` and ``bn_stats_update`` over 10^7 float32 values per channel: the mean,
    variance, inverse std and running statistics by the rule. Native's variance was 1.9e-4
    off (19x the rule) at mean 0, 1.7e-4 (17x) at mean 100 before its blocks merged pairwise."""
    require_backend(backend)
    from resfast.ops.opsets import get_ops

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1024, 1, 100, 100, generator=g, dtype=torch.float64) * std + offset).float()
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    ops, ref = get_ops(backend), get_ops("eager")
    mean, var = ops.bn_stats(x)
    mean_s, var_s = ref.bn_stats(x)
    ctx = f"{backend} mean {offset:g} std {std:g}"
    assert_rule("mean", mean, mean64, mean_s, ctx)
    assert_rule("var", var, var64, var_s, ctx)
    rm, rv = torch.zeros(1), torch.ones(1)
    rm_s, rv_s = rm.clone(), rv.clone()
    _, invstd = ops.bn_stats_update(x, rm, rv, 0.1, 1e-5)
    _, invstd_s = ref.bn_stats_update(x, rm_s, rv_s, 0.1, 1e-5)
    count = x.numel()
    assert_rule("invstd", invstd, (var64 + 1e-5).rsqrt(), invstd_s, ctx)
    assert_rule("running_mean", rm, 0.1 * mean64, rm_s, ctx)
    assert_rule("running_var", rv, 0.9 + 0.1 * var64 * count / (count - 1), rv_s, ctx)


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_training_step_over_a_million_values_per_channel(backend):
    """A BN-ReLU-conv1x1 training step in float32 on 4 x 2 x 512 x 512 (2^20 values per
    channel), mean 100, std 1: output, every gradient and the running statistics by the rule.
    Native's statistics were off enough to flip ReLU masks: its input gradient was 0.20 off
    (17483x the rule), the BN gradients 5-7x."""
    require_backend(backend)
    dt = torch.float32
    inputs = [None if t is None else t.to(dt).double() for t in _inputs(4, 2, 512, 512, 2, 1, 1, std=1.0,
                                                                          offset=1e2, seed=1)]
    got = _run(backend, dt, inputs, True)
    ref64 = _run(None, torch.float64, inputs, True)
    same = _run(None, dt, inputs, True)
    assert got.keys() == ref64.keys()
    for k in ref64:
        assert_rule(k, got[k], ref64[k], same[k], f"{backend} 4x2x512x512 mean 100 std 1")


# ------------------------------------------------------------------ finding: triton positions


def _meta_conv(n, c, h, w, co=4):
    x = torch.empty(n, c, h, w, device="meta", dtype=torch.bfloat16)
    wt = torch.empty(co, c, 1, 1, device="meta", dtype=torch.bfloat16)
    vec = [torch.empty(c, device="meta") for _ in range(4)]
    return x, wt, vec


@pytest.mark.parametrize("n,h,w", [(65536, 224, 224), (2, 32768, 32768)])
def test_triton_refuses_batches_past_int32_positions(n, h, w):
    """Batch 65536 of 1 x 224 x 224 images (3.3e9 positions, under 2**31 per image) and 2
    images of 32768^2: the triton statistics pass numbers positions ``split * CHUNK`` and the BN
    input gradient ``program_id * BLOCK_P`` in int32. Planned on meta tensors (nothing
    allocated): it must raise naming the limit, as it did not before."""
    pytest.importorskip("triton")
    from resfast.ops.triton_ops import launch_plan

    x, wt, (mean, invstd, rm, rv) = _meta_conv(n, 1, h, w)
    with pytest.raises(ValueError, match=r"positions N\*H\*W.*2\*\*31"):
        launch_plan("bn_stats_update", x, rm, rv, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"2\*\*31"):
        launch_plan("bn_backward_elemt", x, x, None, mean, invstd, mean, invstd, 1e-9)
    with pytest.raises(ValueError, match=r"2\*\*31"):
        launch_plan("bn_relu_conv2d", x, wt, None, None, None, mean, invstd, [1, 1], [0, 0], [1, 1], 1, True)
    under = torch.empty(2 ** 31 // (h * w) - 1, 1, h, w, device="meta", dtype=torch.bfloat16)
    assert launch_plan("bn_stats_update", under, rm, rv, 0.1, 1e-5)  # one batch under the limit: planned


# ------------------------------------------------------------------ verified: launch grids


_EXTREME = [  # (name, c, h, w, co, k, groups): shapes past the static model's
    ("c2048_1x1_img1", 2048, 1, 1, 2048, 1, 1), ("c2048_3x3_img7", 2048, 7, 7, 2048, 3, 1),
    ("c4096_3x3_img2", 4096, 2, 2, 4096, 3, 1), ("dw2048", 2048, 7, 7, 2048, 3, 2048),
    ("dense4096_1x1", 4096, 7, 7, 128, 1, 1), ("row1xW", 16, 1, 4096, 16, 3, 1),
]


@pytest.mark.parametrize("batch", [1, 16384])
def test_launch_grids_on_the_cuda_path_stay_within_cuda_limits(monkeypatch, batch):
    """Every launch (every candidate config) of a training step's plan, computed on the CUDA
    code path with meta tensors: grid axis 0 below 2**31, axes 1-2 at most 65535, and every
    partial table (a tensor argument that is not an image) under 2**31 elements. The
    static-model shapes and the extreme ones above; batch 1 and 16384 (the sweep over 1-65536
    is in the module docstring)."""
    pytest.importorskip("triton")
    import resfast.backends as backend_table
    from resfast.profiling.sm90 import SHAPES, ConvShape
    from resfast.profiling.static_model import training_plan

    monkeypatch.setattr(backend_table, "triton_interpret", lambda: False)
    shapes = [dataclasses.replace(s, n=batch) for s in SHAPES.values()]
    shapes += [ConvShape(nm, batch, c, h, w, co, k, 1, g) for nm, c, h, w, co, k, g in _EXTREME]
    limits = (2 ** 31 - 1, 65535, 65535)
    checked = 0
    for s in shapes:
        for part, launches in training_plan(s).items():
            for launch in launches:
                for cfg in launch.configs:
                    b = launch.bind(cfg)
                    assert all(0 <= g <= lim for g, lim in zip(b.grid, limits)), (s.name, part, launch.name, b.grid)
                    for a in b.args:
                        if isinstance(a, torch.Tensor) and a.dim() != 4:
                            assert a.numel() < 2 ** 31, (s.name, launch.name, tuple(a.shape))
                    checked += 1
    assert checked > 500, checked  # 938 binds at the time of writing


# ------------------------------------------------------------------ verified: extreme shapes

_SHAPES = {
    # name: (n, c, h, w, co, kh, kw, conv kwargs)
    "3x3_on_1xW": (2, 4, 1, 9, 5, 3, 3, dict(padding=1)),
    "3x3_on_Hx1": (2, 4, 9, 1, 5, 3, 3, dict(padding=1)),
    "batch1_train_2x2": (1, 4, 2, 2, 3, 3, 3, dict(padding=1)),
    "1x1_64_on_1x1_images": (3, 64, 1, 1, 64, 1, 1, dict()),
    "depthwise_64": (2, 64, 4, 4, 64, 3, 3, dict(padding=1, groups=64)),
    "5x5_on_padded_1x1": (2, 4, 1, 1, 3, 5, 5, dict(padding=2)),
}
_TRITON_SHAPES = ("3x3_on_1xW", "3x3_on_Hx1")  # (the interpreter: 1.5-5 s a shape)
_EAGER_SKIPS = ("depthwise_64",)  # PyTorch's float64 CPU depthwise conv: 9 s here


@pytest.mark.parametrize("backend,shape", [(b, s) for b in ("eager", "native", "triton") for s in _SHAPES
                                           if (b != "triton" or s in _TRITON_SHAPES)
                                           and (b != "eager" or s not in _EAGER_SKIPS)])
def test_extreme_conv_shapes_train_and_eval(backend, shape):
    """Output, gradients and running statistics of a training and an eval call by the rule."""
    require_backend(backend)
    from test_review_probe4 import _judge

    n, c, h, w, co, kh, kw, conv = _SHAPES[shape]
    inputs = _inputs(n, c, h, w, co, kh, kw, groups=conv.get("groups", 1), seed=3)
    for training in (True, False):
        _judge(backend, inputs, training, shape, **conv)


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_shared_dense_block_past_1024_channels(backend):
    """A DenseBlock(memory="shared") whose buffer grows from 1000 to 1032 channels (the
    statistics and partial tables scale with them), 2 x 4 x 4 images: train, eval, train
    against the same block unfused."""
    require_backend(backend)
    from resfast.nn.dense import DenseBlock

    def build():
        torch.manual_seed(0)
        return DenseBlock(1, 1000, bn_size=1, growth_rate=32, memory="shared")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        judge_module(build, backend, (2, 1000, 4, 4))


def test_shared_dense_block_launch_grids_at_batch_16384(monkeypatch):
    """DenseNet-121's shared dense block at batch 16384 (block 1: 256-channel buffer at 56 x 56;
    block 4: 1024 channels at 7 x 7), its last layer's three triton op calls (conv1x1 with
    epilogue statistics on the buffer's channel prefix, the merge-and-conv3x3 into the buffer's
    slice, the pair backward into the gradient buffer's prefix), planned on the CUDA code path
    with meta tensors: every grid axis and partial table within its limit."""
    pytest.importorskip("triton")
    import resfast.backends as backend_table
    from resfast.ops import triton_ops as T
    from resfast.ops.schemas import STATS_ROWS

    monkeypatch.setattr(backend_table, "triton_interpret", lambda: False)
    meta, cl, bf = dict(device="meta"), torch.channels_last, torch.bfloat16
    n, limits = 16384, (2 ** 31 - 1, 65535, 65535)

    def t(*shape):
        return torch.empty(*shape, dtype=bf, **meta).contiguous(memory_format=cl)

    def v(k):
        return torch.empty(k, **meta)

    one, three = ([1, 1], [0, 0], [1, 1], 1), ([1, 1], [1, 1], [1, 1], 1)
    for c0, layers, hw in ((64, 6, 56), (512, 16, 7)):
        buf, c = t(n, c0 + 32 * layers, hw, hw), c0 + 32 * (layers - 1)
        x1, w1, x2, w2, gy = buf[:, :c], t(128, c, 1, 1), t(n, 128, hw, hw), t(32, 128, 3, 3), t(n, 32, hw, hw)
        plans = T.launch_plan("bn_relu_conv2d_stats", x1, w1, None, v(c), v(c), v(c), v(c), *one, True)
        plans += T.launch_plan("bn_relu_conv2d_merge_out", x2, torch.empty(3, STATS_ROWS, 128, **meta), n * hw * hw,
                               v(128), v(128), 0.1, 1e-5, w2, v(128), v(128), *three, buf[:, c:], v(32), v(32),
                               v(32), 1e-5)
        plans += T.launch_plan("bn_relu_conv2d_backward_pair", gy, x2, w2, v(128), v(128), v(128), v(128), *three,
                               x1, w1, v(c), v(c), v(c), v(c), *one, torch.empty_like(buf)[:, :c], True)
        assert len(plans) >= 6
        for launch in plans:
            for cfg in launch.configs:
                b = launch.bind(cfg)
                assert all(0 <= g <= lim for g, lim in zip(b.grid, limits)), (c0, launch.name, b.grid)
                assert all(a.numel() < 2 ** 31 for a in b.args if isinstance(a, torch.Tensor) and a.dim() != 4)
