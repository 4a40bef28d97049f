"""Per-channel batch statistics of a strided ``N x C x H x W`` tensor: two launches.

:func:`bn_stats_partial_kernel`: each program owns a channel tile and a chunk of positions
and reads ``[BLOCK_P, BLOCK_C]`` tiles (positions x channels) with any strides (NCHW,
channels_last, a channel-prefix view). It accumulates, element-wise in a 2-D register tile
(one cross-thread reduction per program, not per step), the sums of ``x - K`` and
``(x - K)^2`` around a per-channel shift ``K``, the mean of the chunk's first tile: shifted
sums do not cancel the way plain sum / sum-of-squares do when the mean is large against the
spread (nor the way a shift by the chunk's first value did when that value was an outlier).
It writes the chunk's ``(count, mean, M2)``.

:func:`bn_stats_finalize_kernel` merges the per-chunk partials exactly (the total mean,
then ``M2 = sum(M2_s + n_s * (mean_s - mean)^2)``), vectorised over chunks, writes the mean
and the variance or the inverse std, and updates the running statistics: the whole of
``bn_stats_update`` is two launches. All arithmetic is float32.
"""
import triton
import triton.language as tl


@triton.jit
def bn_stats_partial_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    C, HW, W, P, CHUNK,
    sxn, sxc, sxh, sxw,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, DENSE_P: tl.constexpr = False,
):
    """Partial ``(count, mean, M2)`` of channels ``[pid0 * BLOCK_C, ...)`` over positions
    ``[pid1 * CHUNK, (pid1 + 1) * CHUNK)``, written at row ``pid1`` of ``[splits, C]`` buffers.
    ``DENSE_P``: position ``p`` is at ``p * sxw`` (``sxh == W * sxw`` and ``sxn == H * sxh``,
    e.g. channels_last or a channel prefix of it), so no position is split into
    ``(n, h, w)`` by division."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c_off = c.to(tl.int64) * sxc
    p_start = split * CHUNK
    p_end = tl.minimum(p_start + CHUNK, P)
    n0 = p_start // HW
    hw0 = p_start % HW
    first = tl.load(x_ptr + n0.to(tl.int64) * sxn + (hw0 // W) * sxh + (hw0 % W) * sxw + c_off, mask=c_mask,
                    other=0.0).to(tl.float32)
    # The shift: the mean of the chunk's first tile (the chunk's first value where that mean is
    # not finite, so infinities propagate as before). The shifted sums lose about
    # (mean - shift)^2 / var of float32's precision: with the first value as the shift, a
    # post-ReLU channel whose first value was an outlier lost 40x (var off by 1.8e-5).
    p = p_start + tl.arange(0, BLOCK_P)
    if DENSE_P:
        row = p.to(tl.int64) * sxw
    else:
        row = (p // HW).to(tl.int64) * sxn + ((p % HW) // W) * sxh + ((p % HW) % W) * sxw
    mask = (p < p_end)[:, None] & c_mask[None, :]
    v0 = tl.load(x_ptr + row[:, None] + c_off[None, :], mask=mask, other=0.0).to(tl.float32)
    n0_f = tl.maximum(tl.minimum(p_end - p_start, BLOCK_P).to(tl.float32), 1.0)
    tile_mean = tl.sum(tl.where(mask, v0, 0.0), axis=0) / n0_f
    shift = tl.where(tl.abs(tile_mean) < float("inf"), tile_mean, first)
    # the first tile, already loaded, is the accumulation's first step
    s1 = tl.where(mask, v0 - shift[None, :], 0.0)
    s2 = s1 * s1
    for p0 in range(p_start + BLOCK_P, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        if DENSE_P:
            row = p.to(tl.int64) * sxw
        else:
            n = p // HW
            hw = p % HW
            row = n.to(tl.int64) * sxn + (hw // W) * sxh + (hw % W) * sxw
        mask = (p < p_end)[:, None] & c_mask[None, :]
        d = tl.load(x_ptr + row[:, None] + c_off[None, :], mask=mask, other=0.0).to(tl.float32) - shift[None, :]
        d = tl.where(mask, d, 0.0)
        s1 += d
        s2 += d * d
    cnt = (p_end - p_start).to(tl.float32)
    t1 = tl.sum(s1, axis=0)
    t2 = tl.sum(s2, axis=0)
    out = split * C + c
    tl.store(count_ptr + out, tl.zeros([BLOCK_C], dtype=tl.float32) + cnt, mask=c_mask)
    inv = 1.0 / tl.maximum(cnt, 1.0)  # an empty split: count 0, mean = shift, M2 0 (never NaN)
    tl.store(mean_ptr + out, shift + t1 * inv, mask=c_mask)
    tl.store(m2_ptr + out, tl.maximum(t2 - t1 * (t1 * inv), 0.0), mask=c_mask)


@triton.jit
def bn_stats_finalize_kernel(
    count_ptr, pmean_ptr, pm2_ptr, mean_out_ptr, var_out_ptr, rmean_ptr, rvar_ptr, invstd_out_ptr,
    C, SPLITS, momentum, eps, unbias,
    HAS_RUNNING: tl.constexpr, OUT_INVSTD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ALSO_INVSTD: tl.constexpr = False,
):
    """Merge the ``[SPLITS, C]`` partials into the mean and the biased variance (or,
    ``OUT_INVSTD``, ``1 / sqrt(var + eps)``), and with ``HAS_RUNNING`` update the running
    statistics in place as ``F.batch_norm`` does: ``(1 - momentum) * running + momentum *
    batch`` with the unbiased variance (``unbias = count / (count - 1)``), in float32,
    stored in the running statistics' own dtype. ``ALSO_INVSTD`` (with the variance written):
    ``1 / sqrt(var + eps)`` stored into ``invstd_out_ptr`` as well."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    tot = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        off = (s * C)[:, None] + c[None, :]
        mask = (s < SPLITS)[:, None] & c_mask[None, :]
        cnt = tl.load(count_ptr + off, mask=mask, other=0.0)
        tot += cnt
        wsum += cnt * tl.load(pmean_ptr + off, mask=mask, other=0.0)
    n_all = tl.maximum(tl.sum(tot, axis=0), 1.0)  # >= 1 for every real channel; 1 in masked lanes
    mean = tl.sum(wsum, axis=0) / n_all
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        off = (s * C)[:, None] + c[None, :]
        mask = (s < SPLITS)[:, None] & c_mask[None, :]
        cnt = tl.load(count_ptr + off, mask=mask, other=0.0)
        dm = tl.load(pmean_ptr + off, mask=mask, other=0.0) - mean[None, :]
        m2 += tl.load(pm2_ptr + off, mask=mask, other=0.0) + cnt * dm * dm
    var = tl.sum(m2, axis=0) / n_all
    tl.store(mean_out_ptr + c, mean, mask=c_mask)
    if OUT_INVSTD:
        tl.store(var_out_ptr + c, 1.0 / tl.sqrt_rn(var + eps), mask=c_mask)
    else:
        tl.store(var_out_ptr + c, var, mask=c_mask)
        if ALSO_INVSTD:
            tl.store(invstd_out_ptr + c, 1.0 / tl.sqrt_rn(var + eps), mask=c_mask)
    if HAS_RUNNING:
        rm = tl.load(rmean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        rm = rm * (1.0 - momentum) + mean * momentum
        rv = rv * (1.0 - momentum) + (var * unbias) * momentum
        tl.store(rmean_ptr + c, rm.to(rmean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(rvar_ptr + c, rv.to(rvar_ptr.dtype.element_ty), mask=c_mask)
