"""Shared checks of the optional op ``bn_relu_conv2d_backward_pair`` (a dense layer's two convs'
backward in one op), run on the triton op set (tests/test_epilogue_stats.py) and the native one
(tests/test_native.py). ``assert_run_same_with_and_without_pair`` takes the block's run from the
caller, so that tests/test_epilogue_stats.py checks it on runs it makes anyway (each run of the
block costs the Triton interpreter seconds)."""
from __future__ import annotations

import dataclasses

import torch


def assert_pair_is_two_full_ops(ops, device, dtype: torch.dtype, accumulate: bool) -> None:
    """``ops.bn_relu_conv2d_backward_pair`` gives bit for bit what two
    ``bn_relu_conv2d_backward_full`` calls give in a row (the conv3x3's, then the conv1x1's into
    a channel slice of a gradient buffer, added or written): the weight gradients, the BN sums
    and the buffer, whose other channels stay untouched."""
    g = torch.Generator().manual_seed(4)
    x1 = (torch.randn(2, 12, 7, 6, generator=g) * 1.2 + 0.3).to(device, dtype)
    x1 = x1.contiguous(memory_format=torch.channels_last)
    w1 = (torch.randn(16, 10, 1, 1, generator=g) / 3).to(device, dtype)
    w2 = (torch.randn(8, 16, 3, 3, generator=g) / 12).to(device, dtype)
    g1, b1 = (torch.rand(10, generator=g) + 0.5).to(device), (torch.randn(10, generator=g) * 0.2).to(device)
    g2, b2 = (torch.rand(16, generator=g) + 0.5).to(device), (torch.randn(16, generator=g) * 0.2).to(device)
    prefix = x1[:, :10]
    c1, c2 = ([1, 1], [0, 0], [1, 1], 1), ([1, 1], [1, 1], [1, 1], 1)
    m1, i1 = ops.bn_stats_update(prefix, None, None, 0.1, 1e-5)
    x2 = ops.bn_relu_conv2d(prefix, w1, None, g1, b1, m1, i1, *c1, True)
    m2, i2 = ops.bn_stats_update(x2, None, None, 0.1, 1e-5)
    go = torch.randn(2, 8, 7, 6, generator=g).to(device, dtype)

    def run(pair):
        buf = torch.full((2, 12, 7, 6), float("nan"), dtype=dtype, device=device)
        buf[:, :10] = torch.randn(2, 10, 7, 6, generator=torch.Generator().manual_seed(9)).to(device, dtype)
        buf = buf.contiguous(memory_format=torch.channels_last)
        if pair:
            got = ops.bn_relu_conv2d_backward_pair(go, x2, w2, g2, b2, m2, i2, *c2, prefix, w1, g1, b1, m1, i1, *c1,
                                                   buf[:, :10], accumulate)
        else:
            gx2, gw2, _, sx2, s2 = ops.bn_relu_conv2d_backward_full(go, x2, w2, g2, b2, m2, i2, *c2, False, None,
                                                                    False, True)
            _, gw1, _, sx1, s1 = ops.bn_relu_conv2d_backward_full(gx2, prefix, w1, g1, b1, m1, i1, *c1, False,
                                                                  buf[:, :10], accumulate, True)
            got = (gw2, sx2, s2, gw1, sx1, s1)
        return [*got, buf]

    names = ("grad_w2", "sum_dz_xhat2", "sum_dz2", "grad_w1", "sum_dz_xhat1", "sum_dz1", "buffer")
    one, two = run(True), run(False)
    for name, a, b in zip(names, one, two):
        assert torch.equal(torch.nan_to_num(a, 7.0), torch.nan_to_num(b, 7.0)), (name, accumulate)
    assert torch.isnan(one[-1][:, 10:]).all() and not torch.isnan(one[-1][:, :10]).any()


def assert_block_same_with_and_without_pair(backend: str, device, dtype: torch.dtype, recompute: str,
                                            monkeypatch) -> None:
    """The shared dense block takes the pair op, and gives bit for bit what it gives without it:
    output, every gradient and the running statistics."""
    from resfast.nn.dense import DenseBlock

    def run():
        torch.manual_seed(0)
        block = DenseBlock(3, 6, 2, 4, memory="shared", backend=backend, recompute=recompute).to(device, dtype)
        x = (torch.randn(2, 6, 5, 4, device=device) * 1.4 + 0.3).to(dtype).requires_grad_()
        y = block(x)
        y.backward(torch.randn_like(y))
        return {"y": y.detach(), "x": x.grad, **{n: p.grad for n, p in block.named_parameters()},
                **dict(block.named_buffers())}

    assert_run_same_with_and_without_pair(run, monkeypatch, (backend, recompute))


def assert_run_same_with_and_without_pair(run, monkeypatch, context=()) -> dict:
    """``run()`` (a shared dense block's forward and backward, returning a dict of its output,
    gradients and buffers) takes the pair op in every block it builds, and gives bit for bit
    what it gives without it. Returns the first run's (with the pair op) dict, so that a caller
    can check it further (tests/test_epilogue_stats.py) instead of running the block again."""
    from resfast.ops import dense_block as db

    real = db._Config.build
    used = []
    with monkeypatch.context() as m:
        def spy(*a, **k):
            cfg = real(*a, **k)
            used.append(cfg.pair_op is not None)
            return cfg

        m.setattr(db._Config, "build", staticmethod(spy))
        merged = run()
    assert used and all(used), "the block did not take the one-op backward"
    with monkeypatch.context() as m:
        m.setattr(db._Config, "build", staticmethod(lambda *a, **k: dataclasses.replace(real(*a, **k), pair_op=None)))
        apart = run()
    for key in merged:
        assert torch.equal(merged[key], apart[key]), (*context, key)
    return merged
