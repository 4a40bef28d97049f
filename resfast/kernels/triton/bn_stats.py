"""Per-channel batch statistics of a strided ``N x C x H x W`` tensor in one pass.

Each program reads a ``[BLOCK_P, BLOCK_C]`` tile (positions x channels) per step, with any
strides (NCHW, channels_last, a channel-prefix view), and folds the tile's exact mean and
M2 into its running ``(count, mean, M2)`` with Chan's parallel formula; this is stable where
a sum / sum-of-squares pass cancels. A second small kernel merges the per-split partials.
All arithmetic is float32.
"""
import triton
import triton.language as tl


@triton.jit
def bn_stats_partial_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    C, HW, W, P, CHUNK,
    sxn, sxc, sxh, sxw,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial ``(count, mean, M2)`` of channels ``[pid0 * BLOCK_C, ...)`` over positions
    ``[pid1 * CHUNK, (pid1 + 1) * CHUNK)``, written at row ``pid1`` of ``[splits, C]`` buffers."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c_off = c.to(tl.int64) * sxc
    n_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    p_start = split * CHUNK
    p_end = tl.minimum(p_start + CHUNK, P)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < p_end
        n = p // HW
        hw = p % HW
        row = n.to(tl.int64) * sxn + (hw // W) * sxh + (hw % W) * sxw
        mask = p_mask[:, None] & c_mask[None, :]
        xv = tl.load(x_ptr + row[:, None] + c_off[None, :], mask=mask, other=0.0).to(tl.float32)
        cnt = tl.minimum(p_end - p0, BLOCK_P).to(tl.float32)
        t_mean = tl.sum(xv, axis=0) / cnt
        d = tl.where(mask, xv - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        tot = n_acc + cnt
        delta = t_mean - mean
        mean = mean + delta * (cnt / tot)
        m2 = m2 + t_m2 + delta * delta * (n_acc * (cnt / tot))
        n_acc = tot
    out = split * C + c
    tl.store(count_ptr + out, n_acc, mask=c_mask)
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, m2, mask=c_mask)


@triton.jit
def bn_stats_merge_kernel(
    count_ptr, pmean_ptr, pm2_ptr, mean_out_ptr, var_out_ptr, C, SPLITS,
    BLOCK_C: tl.constexpr,
):
    """Chan-merge the ``[SPLITS, C]`` partials into the mean and biased variance ``[C]``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(0, SPLITS):
        cnt = tl.load(count_ptr + s * C + c, mask=c_mask, other=1.0)
        s_mean = tl.load(pmean_ptr + s * C + c, mask=c_mask, other=0.0)
        s_m2 = tl.load(pm2_ptr + s * C + c, mask=c_mask, other=0.0)
        tot = n_acc + cnt
        delta = s_mean - mean
        mean = mean + delta * (cnt / tot)
        m2 = m2 + s_m2 + delta * delta * (n_acc * (cnt / tot))
        n_acc = tot
    tl.store(mean_out_ptr + c, mean, mask=c_mask)
    tl.store(var_out_ptr + c, m2 / n_acc, mask=c_mask)
