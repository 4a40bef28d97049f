"""The forward conv's split-K configs (``SPLITK``: ``SPLIT_K`` programs per tile, each over its
share of the input chunks, the tile's last program summing the float32 partials in split order
and storing the output) against the float64 rule: a 3x3 conv on an odd image that overhangs the
tile (one chunk per split and two), a 1x1 conv over flattened positions, two 32-channel groups
with a partial output block, a bias, NCHW and channels_last, bfloat16 with a NaN and an infinity
in ``x`` (NaN and infinities exactly at eager's outputs); the same bits from two launches (the
sum's order does not depend on which program finishes last), the ticket counters back at zero
after every launch, and the planner's rules (no split for packed groups or the statistics
epilogue, the GPU list's configs).

On the CPU the kernels run under ``TRITON_INTERPRET=1`` with the interpreter's config swapped
for a split one (tiny tiles).
"""
from __future__ import annotations

import pytest
import torch

from resfast.backends import backend_status

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY = backend_status(DEVICE)["triton"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"triton backend cannot run on {DEVICE}: {_WHY}")

if not _WHY:
    from resfast.ops import triton_ops
    from test_triton_fwd_fixup_fma import _check, _inputs

    OPS = torch.ops.resfast_triton


def _split_cfg(split_k, block_k=16):
    return triton_ops._cfg(4, 1, 1, TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_K=block_k, STACK=1, SPLITK=split_k)


@pytest.fixture
def split(monkeypatch):
    def use(split_k, block_k=16):
        cfg = _split_cfg(split_k, block_k)
        monkeypatch.setattr(triton_ops, "_FWD_INTERP", cfg)
        monkeypatch.setattr(triton_ops, "_FWD_CONFIGS", [c for c in triton_ops._FWD_CONFIGS if c.get("SPLITK")])
        triton_ops.clear_plan_cache()
        return cfg
    yield use
    triton_ops.clear_plan_cache()


def _bound(args, op="bn_relu_conv2d"):
    fwd = [lp for lp in triton_ops.launch_plan(op, *args) if lp.name == "conv_fwd"][0]
    return fwd.bind(fwd.interp_config)


# (n, C, C_out, groups, H x W, kernel, padding, split, BLOCK_K, layout): chunks per split 1 / 2
CASES = [
    (1, 32, 24, 1, (5, 7), (3, 3), (1, 1), 2, 16, "cl"),    # one chunk per split, partial output block
    (1, 64, 16, 1, (5, 5), (3, 3), (1, 1), 2, 16, "nchw"),  # two chunks per split (the chunk loop)
    (2, 64, 40, 2, (3, 3), (1, 1), (0, 0), 2, 16, "cl"),    # 1x1, two 32-channel groups, flat positions
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_against_eager(split, case):
    n, c, co, groups, hw, k, p, s, bk, layout = case
    split(s, bk)
    x, w, b, bw, bb, mean, invstd = _inputs(n, c, co, groups, hw, k, layout, torch.float32, seed=5)
    args = (x, w, b, bw, bb, mean, invstd, [1, 1], list(p), [1, 1], groups, False)
    bound = _bound(args)
    assert bound.constexprs["SPLIT_K"] == s and bound.grid[2] == s and not bound.constexprs["PACKED"]
    cnt = bound.args[12]
    y = OPS.bn_relu_conv2d(*args)
    _check(y, args, torch.float32, f"case={case}")
    assert int(cnt.count_nonzero()) == 0  # every tile's counter reset by its last program
    if case is CASES[0]:
        assert torch.equal(OPS.bn_relu_conv2d(*args), y)  # same bits again


def test_forward_bfloat16_with_a_nan_and_an_infinity(split):
    split(2)
    x, w, b, bw, bb, mean, invstd = _inputs(2, 32, 16, 1, (5, 6), (3, 3), "cl", torch.bfloat16, seed=7)
    x[0, 3, 2, 4] = float("nan")  # first split's channels
    x[1, 20, 1, 1] = float("inf")  # second split's
    args = (x, w, b, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 1, False)
    assert _bound(args).constexprs["SPLIT_K"] == 2
    _check(OPS.bn_relu_conv2d(*args), args, torch.bfloat16, "bfloat16, NaN and Inf", nan_ok=True)


def test_split_is_not_taken_for_packed_groups_or_the_statistics_epilogue():
    x, w, b, bw, bb, mean, invstd = _inputs(1, 128, 32, 1, (7, 7), (3, 3), "cl", torch.float32)
    args = (x, w, None, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 1, False)
    launch = [lp for lp in triton_ops.launch_plan("bn_relu_conv2d", *args) if lp.name == "conv_fwd"][0]
    assert any(c.get("SPLITK") for c in launch.configs)
    stats = [lp for lp in triton_ops.launch_plan("bn_relu_conv2d_stats", *args) if lp.name == "conv_fwd"][0]
    assert not any(c.get("SPLITK") for c in stats.configs)
    xp, wp, _, bwp, bbp, mp, ip = _inputs(1, 64, 64, 16, (7, 7), (3, 3), "cl", torch.float32)
    packed = [lp for lp in triton_ops.launch_plan("bn_relu_conv2d", xp, wp, None, bwp, bbp, mp, ip, [1, 1], [1, 1],
                                                  [1, 1], 16, False) if lp.name == "conv_fwd"][0]
    assert not any(c.get("SPLITK") for c in packed.configs)


def test_the_gpu_list_carries_the_split_configs():
    """Appended after the older configs (the static choice, the first config, is unchanged); each
    splits the input channels of DenseNet-121's 3x3 conv (128) or of its last 1x1 (1024) evenly."""
    cfgs = [c for c in triton_ops._FWD_CONFIGS if c.get("SPLITK")]
    assert len(cfgs) == 4 and not triton_ops._FWD_CONFIGS[0].get("SPLITK")
    for c in cfgs:
        assert triton_ops._split_k_ok(1, 128, 32, c) or triton_ops._split_k_ok(1, 1024, 128, c)


def test_split_k_keeps_its_workspace_small():
    """A split-K config's workspace holds float32 partials of every tile and split: at
    DenseNet-121's 7x7 at batch 64 the split configs apply, at 56x56 / batch 16384 (probe23's
    launch-limit shapes: 26e9 partials, past the kernel's 32-bit offsets) none does."""
    cfgs = [c for c in triton_ops._FWD_CONFIGS if c.get("SPLITK")]
    assert any(triton_ops._split_k_ok(1, 128, 32, c, 64, 7, 7) for c in cfgs)
    assert not any(triton_ops._split_k_ok(1, ci, co, c, 16384, 56, 56) for c in cfgs for ci, co in ((128, 32), (1024, 128)))


def test_split_k_forward_replays_from_the_plan_cache(split, monkeypatch):
    """The ticket counters are one buffer per device and stream (per thread off CUDA), made
    before the plan cache records a call: the recorder logs them as "the replay's counters"
    (``_CountersRef``), so the op is cached (it was not: a tensor from outside the call made the
    log unusable, and every split-K forward on a GPU planned in full) and its replays give the
    first call's bits, the counters back at zero."""
    monkeypatch.setenv("RESFAST_TRITON_PLAN_CACHE", "1")
    split(2)
    x, w, b, bw, bb, mean, invstd = _inputs(1, 32, 24, 1, (5, 7), (3, 3), "cl", torch.float32, seed=5)
    args = (x, w, b, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 1, False)
    cnt = _bound(args).args[12]
    before = triton_ops.plan_cache_stats()
    ys = [OPS.bn_relu_conv2d(*args) for _ in range(3)]  # plan, record, replay
    after = triton_ops.plan_cache_stats()
    assert {k: after[k] - before[k] for k in ("records", "replays", "uncacheable")} == \
        {"records": 1, "replays": 1, "uncacheable": 0}
    assert torch.equal(ys[1], ys[0]) and torch.equal(ys[2], ys[0])
    assert int(cnt.count_nonzero()) == 0


def test_counters_left_by_an_interrupted_launch_are_not_reused(split):
    """Off CUDA the counters are one reused buffer per thread: an interpreted launch that raised
    part-way leaves tickets taken, and the next launch must not start from them (its tiles'
    last programs would never see their count, and the output would keep the partial sums)."""
    split(2)
    x, w, b, bw, bb, mean, invstd = _inputs(1, 32, 24, 1, (5, 7), (3, 3), "cl", torch.float32, seed=5)
    args = (x, w, b, bw, bb, mean, invstd, [1, 1], [1, 1], [1, 1], 1, False)
    cnt = _bound(args).args[12]
    cnt[:8] = 1  # as an interrupted launch leaves them
    _check(OPS.bn_relu_conv2d(*args), args, torch.float32, "after leftover tickets")
    assert int(cnt.count_nonzero()) == 0


def test_a_graph_capture_takes_counters_of_its_own(monkeypatch):
    """Inside a CUDA-graph capture every split-K launch takes a fresh zeroed buffer (a memset the
    graph replays), not the capture stream's: captures share torch.cuda.graph's side stream, and
    two graphs baking in one buffer would race on it when replayed on two streams at once. The
    capture is simulated (the CPU has none): the rule, not the graph."""
    dev = torch.device(DEVICE)
    shared = triton_ops._split_counters(dev, 16)
    monkeypatch.setattr(triton_ops, "_capturing", lambda device: True)
    a, b = triton_ops._split_counters(dev, 16), triton_ops._split_counters(dev, 16)
    assert a.data_ptr() != b.data_ptr() and shared.data_ptr() not in (a.data_ptr(), b.data_ptr())
    assert a.numel() == 16 and int(a.count_nonzero()) == 0 and a.dtype == torch.int32
    assert triton_ops._COUNTER_BUFFERS.get(id(a)) is a  # the plan cache's recorder knows it
