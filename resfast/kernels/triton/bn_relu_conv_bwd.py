"""Backward of the fused op, recomputing ``a = relu(bn(x))`` from ``x`` instead of storing it.

* :func:`bn_relu_conv_bwd_input_kernel`: ``grad_a`` of the conv input as a gather over the
  transposed conv (rows: input positions ``(n, h, w)``; columns: input channels), times the
  ReLU mask recomputed from ``x``, stored as ``grad_z`` in ``x``'s dtype; the same program
  reduces its rows into per-channel float32 partials of ``sum(grad_z)`` and
  ``sum(grad_z * xhat)`` (one row of ``[m_tiles, C]`` buffers per program row, summed on
  the host: deterministic, no atomics).
* :func:`bn_relu_conv_bwd_weight_kernel`: ``grad_weight`` as an implicit GEMM over the
  ``N * Ho * Wo`` output positions, split into ``SPLITS`` chunks for parallelism (float32
  partials ``[SPLITS, ...]``, summed on the host), the activation recomputed on load; the
  programs of the first ``(kh, kw, ci)`` tile also sum ``grad_out`` into ``grad_bias``.

Both take ``USE_DOT`` as the forward does: ``tl.dot`` for groups of >= 16 channels, a direct
FMA formulation for small groups (no 16-wide matrix tile per 4-channel group).
"""
import triton
import triton.language as tl

from resfast.kernels.triton.bn_relu import bn_params, bn_relu, group_tile, position_rows


@triton.jit
def bn_relu_conv_bwd_input_kernel(
    go_ptr, w_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, gz_ptr, psum_dz_ptr, psum_dzx_ptr,
    M, C, H, W, HO, WO, CIN_G, COUT_G,
    sgn, sgc, sgh, sgw,
    swo, swi, swh, sww,
    sxn, sxc, sxh, sxw,
    szn, szc, szh, szw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m_mask, h_in, w_in, n64 = position_rows(pid_m, M, H, W, BLOCK_M)
    x_ty = gz_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    if USE_DOT:
        g, ci_local, ci_mask, ci = group_tile(pid_n, CIN_G, BLOCK_N)
    else:
        ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ci_mask = ci < C
        g_of_ci = ci // CIN_G
        ci_local = ci % CIN_G
    w_ci = ci_local * swi

    for kh in range(KH):
        th = h_in + pad_h - kh * dil_h
        ho = th // stride_h
        # th >= 0 first: only non-negative th reach the divisibility test
        h_ok = m_mask & (th >= 0) & (th - ho * stride_h == 0) & (ho < HO)
        for kw in range(KW):
            tw = w_in + pad_w - kw * dil_w
            wo = tw // stride_w
            sp_mask = h_ok & (tw >= 0) & (tw - wo * stride_w == 0) & (wo < WO)
            go_row = n64 * sgn + ho * sgh + wo * sgw
            if USE_DOT:
                for k0 in range(0, COUT_G, BLOCK_K):
                    ck = k0 + tl.arange(0, BLOCK_K)
                    k_mask = ck < COUT_G
                    co = (g * COUT_G + ck).to(tl.int64)
                    gov = tl.load(go_ptr + go_row[:, None] + (co * sgc)[None, :],
                                  mask=sp_mask[:, None] & k_mask[None, :], other=0.0)
                    wv = tl.load(w_ptr + (co * swo)[:, None] + (w_ci + kh * swh + kw * sww)[None, :],
                                 mask=k_mask[:, None] & ci_mask[None, :], other=0.0)
                    if DOT_F32:
                        acc = tl.dot(gov.to(tl.float32), wv.to(tl.float32), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(gov, wv, acc, input_precision="ieee")
            else:
                for k in range(0, COUT_G):
                    co = (g_of_ci * COUT_G + k).to(tl.int64)
                    gov = tl.load(go_ptr + go_row[:, None] + (co * sgc)[None, :],
                                  mask=sp_mask[:, None] & ci_mask[None, :], other=0.0).to(tl.float32)
                    wv = tl.load(w_ptr + co * swo + w_ci + (kh * swh + kw * sww), mask=ci_mask,
                                 other=0.0).to(tl.float32)
                    acc += gov * wv[None, :]

    # Epilogue: the ReLU mask from x, grad_z, and this row-tile's share of the BN-gradient sums.
    mask = m_mask[:, None] & ci_mask[None, :]
    ci64 = ci.to(tl.int64)
    xv = tl.load(x_ptr + (n64 * sxn + h_in * sxh + w_in * sxw)[:, None] + (ci64 * sxc)[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    mean, scale, shift = bn_params(ci, ci_mask, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA, HAS_BETA)
    z = (xv - mean[None, :]) * scale[None, :] + shift[None, :]
    # As torch.relu's backward (threshold_backward): zero where relu's input, rounded to x's
    # dtype, is <= 0; a NaN activation passes the gradient through.
    gz = tl.where(z.to(x_ty).to(tl.float32) <= 0.0, 0.0, tl.where(mask, acc, 0.0)).to(x_ty)
    tl.store(gz_ptr + (n64 * szn + h_in * szh + w_in * szw)[:, None] + (ci64 * szc)[None, :], gz, mask=mask)
    gzf = gz.to(tl.float32)
    invstd = tl.load(invstd_ptr + ci, mask=ci_mask, other=0.0)
    xhat = (xv - mean[None, :]) * invstd[None, :]
    part = pid_m * C + ci
    tl.store(psum_dz_ptr + part, tl.sum(gzf, axis=0), mask=ci_mask)
    tl.store(psum_dzx_ptr + part, tl.sum(tl.where(mask, gzf * xhat, 0.0), axis=0), mask=ci_mask)


@triton.jit
def bn_relu_conv_bwd_weight_kernel(
    go_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, pgw_ptr, pgb_ptr,
    P, H, W, CO, HO, WO, CIN_G, COUT_G, CHUNK,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Partial ``grad_weight`` (``[SPLITS, CO, CIN_G, KH, KW]`` float32) and ``grad_bias``
    (``[SPLITS, CO]``) of the positions ``[split * CHUNK, (split + 1) * CHUNK)``.

    With ``USE_DOT`` a program owns a ``BLOCK_CO x BLOCK_CI`` tile of one group's weights at
    one ``(kh, kw)``; otherwise ``BLOCK_CO`` consecutive weight elements ``(co, ci)`` of one
    ``(kh, kw)`` slice, of any groups (``BLOCK_CI`` unused).
    """
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    split = tl.program_id(2)
    khw = pid1 % (KH * KW)
    kh = khw // KW
    kw = khw % KW
    act_ty = go_ptr.dtype.element_ty
    KHW: tl.constexpr = KH * KW

    if USE_DOT:
        g, co_local, co_mask, co = group_tile(pid0, COUT_G, BLOCK_CO)
        ci_local = (pid1 // KHW) * BLOCK_CI + tl.arange(0, BLOCK_CI)
        ci_mask = ci_local < CIN_G
        ci = g * CIN_G + ci_local
        acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=tl.float32)
        first = (pid1 // KHW == 0) & (khw == 0)
    else:
        j = pid0 * BLOCK_CO + tl.arange(0, BLOCK_CO)
        co_mask = j < CO * CIN_G
        co = j // CIN_G
        ci_local = j % CIN_G
        ci = (co // COUT_G) * CIN_G + ci_local
        ci_mask = co_mask
        acc = tl.zeros([BLOCK_CO], dtype=tl.float32)
        first = khw == 0
    bacc = tl.zeros([BLOCK_CO], dtype=tl.float32)
    co64 = co.to(tl.int64)
    ci_off = ci.to(tl.int64) * sxc
    mean, scale, shift = bn_params(ci, ci_mask, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                                   HAS_GAMMA, HAS_BETA)

    p_start = split * CHUNK
    p_end = tl.minimum(p_start + CHUNK, P)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < p_end
        wo = p % WO
        t = p // WO
        ho = t % HO
        n64 = (t // HO).to(tl.int64)
        hi = ho * stride_h - pad_h + kh * dil_h
        wi = wo * stride_w - pad_w + kw * dil_w
        sp_mask = p_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        go_row = n64 * sgn + ho * sgh + wo * sgw
        x_row = n64 * sxn + hi * sxh + wi * sxw
        if USE_DOT:
            gov = tl.load(go_ptr + (co64 * sgc)[:, None] + go_row[None, :], mask=co_mask[:, None] & p_mask[None, :],
                          other=0.0)
            amask = sp_mask[:, None] & ci_mask[None, :]
            xv = tl.load(x_ptr + x_row[:, None] + ci_off[None, :], mask=amask, other=0.0).to(tl.float32)
            a = bn_relu(xv, mean, scale, shift, amask).to(act_ty)
            if DOT_F32:
                acc = tl.dot(gov.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(gov, a, acc, input_precision="ieee")
            bacc += tl.sum(gov.to(tl.float32), axis=1)
        else:
            gov = tl.load(go_ptr + go_row[:, None] + (co64 * sgc)[None, :], mask=p_mask[:, None] & co_mask[None, :],
                          other=0.0).to(tl.float32)
            amask = sp_mask[:, None] & co_mask[None, :]
            xv = tl.load(x_ptr + x_row[:, None] + ci_off[None, :], mask=amask, other=0.0).to(tl.float32)
            a = bn_relu(xv, mean, scale, shift, amask).to(act_ty).to(tl.float32)
            acc += tl.sum(gov * a, axis=0)
            bacc += tl.sum(gov, axis=0)

    base = split.to(tl.int64) * CO * CIN_G * KHW
    if USE_DOT:
        off = base + (co64 * (CIN_G * KHW))[:, None] + (ci_local * KHW + khw)[None, :]
        tl.store(pgw_ptr + off, acc, mask=co_mask[:, None] & ci_mask[None, :])
        tl.store(pgb_ptr + split * CO + co, bacc, mask=co_mask & first)
    else:
        tl.store(pgw_ptr + base + j.to(tl.int64) * KHW + khw, acc, mask=co_mask)
        tl.store(pgb_ptr + split * CO + co, bacc, mask=co_mask & first & (ci_local == 0))


def _configs(names, shapes):
    return [triton.Config(dict(zip(names, s[:3])), num_warps=s[3], num_stages=s[4]) for s in shapes]


_KEY_IN = ["M", "C", "CIN_G", "COUT_G", "HO", "WO", "KH", "KW", "stride_h", "stride_w", "sgc", "sxc"]
_KEY_W = ["P", "CO", "CIN_G", "COUT_G", "H", "W", "KH", "KW", "stride_h", "stride_w", "sgc", "sxc", "CHUNK"]

# BLOCK_M of the input-gradient kernel is fixed by the host (the partial-sum buffers have one
# row per row tile), so only the column / reduction tiles are tuned.
bn_relu_conv_bwd_input_dot = triton.autotune(
    _configs(("BLOCK_N", "BLOCK_K"), [(64, 32, 0, 4, 3), (32, 32, 0, 4, 3), (128, 32, 0, 8, 3),
                                            (64, 64, 0, 4, 3), (32, 64, 0, 4, 4)]),
    key=_KEY_IN)(bn_relu_conv_bwd_input_kernel)
bn_relu_conv_bwd_input_direct = triton.autotune(
    _configs(("BLOCK_N", "BLOCK_K"), [(32, 16, 0, 4, 2), (64, 16, 0, 4, 2), (128, 16, 0, 8, 2),
                                             (16, 16, 0, 4, 2)]),
    key=_KEY_IN)(bn_relu_conv_bwd_input_kernel)
bn_relu_conv_bwd_weight_dot = triton.autotune(
    _configs(("BLOCK_CO", "BLOCK_CI", "BLOCK_P"), [(64, 64, 32, 4, 3), (32, 32, 64, 4, 3), (64, 32, 64, 4, 3),
                                                         (128, 64, 32, 8, 3), (32, 64, 128, 4, 3)]),
    key=_KEY_W)(bn_relu_conv_bwd_weight_kernel)
bn_relu_conv_bwd_weight_direct = triton.autotune(
    _configs(("BLOCK_CO", "BLOCK_CI", "BLOCK_P"), [(64, 16, 64, 4, 2), (128, 16, 32, 4, 2), (32, 16, 128, 4, 2),
                                                          (128, 16, 64, 8, 2)]),
    key=_KEY_W)(bn_relu_conv_bwd_weight_kernel)
