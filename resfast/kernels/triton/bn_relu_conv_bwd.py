"""Backward of the fused op, recomputing ``a = relu(bn(x))`` from ``x`` instead of storing it.

:func:`bn_relu_conv_bwd_kernel` computes, in one pass over the *input* positions, whichever
of these its constexpr flags ask for:

* ``DO_GA``: ``grad_a`` of the conv input (a transposed conv: for each kernel row the
  output gradient at the ``KW`` shifted positions side by side times the row's stacked
  weights, the ``(kw, output channel)`` reduction on tensor cores), then in the epilogue the ReLU mask recomputed from ``x``,
  ``grad_z`` stored in ``x``'s dtype, and this program's float32 partials of the two
  BN-gradient sums ``sum(grad_z)`` and ``sum(grad_z * xhat)``;
* ``DO_GW``: ``grad_weight`` for *all* taps at once: the activation tile of the input
  positions is normalised once, and for each kernel row ``kh`` the output gradient at the
  ``KW`` shifted positions, side by side (``[positions, KW_P * BLOCK_N]``) and transposed,
  multiplies it on tensor cores (positions are the reduction axis), into one accumulator
  per kernel row that lives across the program's tiles;
* ``DO_GB``: ``grad_bias`` partials (a plain sum of the output gradient).

With both ``DO_GA`` and ``DO_GW`` one launch reads ``grad_out`` and ``x`` once for both
gradients (the packed small-group case, where a channel block's output channels fit one
tile); otherwise the host launches the kernel twice, once per flag.

Stride ``s > 1`` by parity decomposition: the input positions are tiled per residue class
``(h % s, w % s)``, and a class visits only the taps that reach it, so no tap is evaluated
where it cannot contribute. Spatial tiles are 2-D (``TILE_H x TILE_W`` positions of a class
of one image); the row / column inside a tile come from constexpr shifts.

Programs are persistent: program ``pid`` owns channel block ``pid % NCB`` and walks the
tiles ``split, split + SPLITS, ...`` (``split = pid // NCB``) in a fixed order, then writes
its float32 partials to row ``split`` of ``[SPLITS, ...]`` buffers that
:func:`bn_relu_conv_bwd_finalize_kernel` sums in a fixed order: deterministic, no atomics.
"""
import triton
import triton.language as tl

from resfast.kernels.triton.bn_relu import any_nonfinite, bn_params, bn_relu, dot_acc, tile_origin


@triton.jit
def bn_relu_conv_bwd_kernel(
    go_ptr, w_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, gz_ptr, pgw_ptr, pgb_ptr, psum_ptr, flag_ptr,
    C, H, W, CO, HO, WO, CIN_G, COUT_G, KR, NR, KSUB, NSUB, NCB, SPLITS, TILES_H, TILES_W, NUM_TILES, P_OUT,
    sgn, sgc, sgh, sgw,
    swo, swi, swh, sww,
    sxn, sxc, sxh, sxw,
    szn, szc, szh, szw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, KW_P: tl.constexpr,
    DO_GA: tl.constexpr, DO_GW: tl.constexpr, DO_GB: tl.constexpr, ONE_N: tl.constexpr, PACKED: tl.constexpr,
    FIXUP: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    cb = pid % NCB
    split = pid // NCB
    act_ty = gz_ptr.dtype.element_ty
    BM: tl.constexpr = TILE_H * TILE_W
    KHW: tl.constexpr = KH * KW
    GN: tl.constexpr = KW_P * BLOCK_N  # the stacked (kw, output channel) axis of one kernel row
    kk = tl.arange(0, BLOCK_K)
    m = tl.arange(0, BM)
    oi = m // TILE_W
    oj = m % TILE_W
    c = tl.arange(0, GN)
    c_kw = c // BLOCK_N
    c_n = c % BLOCK_N

    # channel block: input channels ci (K of grad_a's GEMM, N of grad_weight's) and the
    # output-channel chunk(s) of BLOCK_N (all of the group block's with DO_GA)
    if DO_GA:
        gblk = cb // KSUB
        ksub = cb % KSUB
        nc0 = 0
    else:
        gblk = cb // (KSUB * NSUB)
        ksub = (cb // NSUB) % KSUB
        nc0 = cb % NSUB
    k_loc = ksub * BLOCK_K + kk
    ci = gblk * KR + k_loc
    if EVEN_K:  # every block full: no channel masks
        k_ok = tl.full([BLOCK_K], 1, tl.int1)
    else:
        k_ok = (k_loc < KR) & (ci < C)
    gk = k_loc // CIN_G
    ci_loc = k_loc - gk * CIN_G
    scale, shift = bn_params(ci, k_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA, HAS_BETA)
    mean = tl.load(mean_ptr + ci, mask=k_ok, other=0.0)
    invstd = tl.load(invstd_ptr + ci, mask=k_ok, other=0.0)
    x_c = ci * sxc
    z_c = ci * szc
    if ONE_N:
        co_c, n_ok_c, gn_c, keep, w_off = _stacked(nc0, gblk, NR, CO, COUT_G, CIN_G, c_kw, c_n, gk, ci_loc, k_ok,
                                                   swo, swi, sww, KW, EVEN_N, BLOCK_N)
        if DO_GA:
            wt = ()
            for kh in tl.static_range(KH):
                wt = wt + (tl.load(w_ptr + w_off + kh * swh, mask=keep, other=0.0),)
    if DO_GA:  # per-position partial sums, reduced across positions once after the tiles
        sdz = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
        sdzx = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
    if DO_GW:
        gw = (tl.zeros([GN, BLOCK_K], dtype=tl.float32),) * KH

    if not FIXUP:
        for t in range(split, NUM_TILES, SPLITS):
            n64, ph, pw, ii, jj, h, w, m_ok, mask, xv, a, col_ok, col_off = _tile(
                t, x_ptr, sxn, sxh, sxw, sgw, x_c, k_ok, scale, shift, oi, oj, H, W, WO, TILES_H, TILES_W, stride_h, stride_w,
                pad_w, dil_w, c_kw, act_ty, KW, TILE_H, TILE_W)
            gyb = go_ptr + n64 * sgn  # this image's base pointer; int32 offsets inside it
            acc = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
            for kh in tl.static_range(KH):
                oh = ph + pad_h - kh * dil_h + stride_h * ((KH - 1) * dil_h)
                if oh % stride_h == 0:
                    gho = ii + (oh // stride_h - (KH - 1) * dil_h)
                    row_ok = m_ok & (gho >= 0) & (gho < HO)
                    g_base = (gho * sgh)[:, None] + col_off
                    g_mask = row_ok[:, None] & col_ok
                    if ONE_N:
                        # [BM, KW_P * BLOCK_N]: the output gradient at the kw taps' positions, side by side
                        gy = tl.load(gyb + g_base + (co_c * sgc)[None, :], mask=g_mask & n_ok_c[None, :], other=0.0)
                        if DO_GA:
                            acc = dot_acc(gy, wt[kh], acc, DOT_F32)
                        if DO_GW:
                            gw = gw[:kh] + (dot_acc(tl.trans(gy), a, gw[kh], DOT_F32),) + gw[kh + 1:]
                    else:  # grad_a of a wide group: every output-channel chunk
                        for nc in range(0, NSUB):
                            co_n, n_ok_n, gn_n, keep_n, w_off_n = _stacked(nc, gblk, NR, CO, COUT_G, CIN_G, c_kw, c_n, gk,
                                                                           ci_loc, k_ok, swo, swi, sww, KW, EVEN_N,
                                                                           BLOCK_N)
                            gy = tl.load(gyb + g_base + (co_n * sgc)[None, :], mask=g_mask & n_ok_n[None, :], other=0.0)
                            wv = tl.load(w_ptr + w_off_n + kh * swh, mask=keep_n, other=0.0)
                            acc = dot_acc(gy, wv, acc, DOT_F32)
            if DO_GA:
                if PACKED:
                    # 0 * NaN in the block-diagonal weights carries one group's NaN (or Inf) into its
                    # packed neighbours; a tile that is not finite is finished by the fix-up loop
                    bad = any_nonfinite(acc)
                    tl.store(flag_ptr + cb * NUM_TILES + t, bad.to(tl.int8))
                    if bad.to(tl.int32) == 0:
                        sdz, sdzx = _epilogue(acc, a, xv, mask, mean, invstd, gz_ptr, n64, h, w, szn, szh, szw, z_c,
                                              sdz, sdzx, act_ty)
                else:
                    sdz, sdzx = _epilogue(acc, a, xv, mask, mean, invstd, gz_ptr, n64, h, w, szn, szh, szw, z_c, sdz, sdzx,
                                          act_ty)

        if DO_GW:
            # row (kw, co) and column ci of kernel row kh -> grad_weight[co, ci_local, kh, kw]
            base = split.to(tl.int64) * (CO * CIN_G * KHW)
            col = (co_c.to(tl.int64) * (CIN_G * KHW) + c_kw)[:, None] + (ci_loc * KHW)[None, :]
            for kh in tl.static_range(KH):
                tl.store(pgw_ptr + base + col + kh * KW, gw[kh], mask=keep)
            if DO_GB:
                if ksub == 0:
                    # grad_bias = sum of grad_out over the output positions, flat rows
                    co = gblk * NR + nc0 * BLOCK_N + tl.arange(0, BLOCK_N)
                    n_ok = (nc0 * BLOCK_N + tl.arange(0, BLOCK_N) < NR) & (co < CO)
                    gb = tl.zeros([BLOCK_N], dtype=tl.float32)
                    for r0 in range(split * BM, P_OUT, SPLITS * BM):
                        r = r0 + m
                        wo_ = r % WO
                        q = r // WO
                        row_off = (q // HO).to(tl.int64) * sgn + (q % HO) * sgh + wo_ * sgw
                        gyb = tl.load(go_ptr + row_off[:, None] + (co.to(tl.int64) * sgc)[None, :],
                                      mask=(r < P_OUT)[:, None] & n_ok[None, :], other=0.0)
                        gb += tl.sum(gyb.to(tl.float32), axis=0)
                    tl.store(pgb_ptr + split * CO + co, gb, mask=n_ok)
    else:
        # The fix-up launch (packed groups only): 0 * NaN in the block-diagonal weights carries
        # one group's non-finite grad_out into its packed neighbours' grad_a, which eager never
        # does. The main launch flags such tiles and skips their epilogue; here they are
        # recomputed one group at a time. Normally no tile is flagged: one scan of the flags.
        n_bad = 0
        for t in range(split, NUM_TILES, SPLITS):
            n_bad += tl.load(flag_ptr + cb * NUM_TILES + t).to(tl.int32)
        if n_bad > 0:
            for t in tl.range(split, NUM_TILES, SPLITS, num_stages=1):
                if tl.load(flag_ptr + cb * NUM_TILES + t) != 0:
                    n64, ph, pw, ii, jj, h, w, m_ok, mask, xv, a, col_ok, col_off = _tile(
                        t, x_ptr, sxn, sxh, sxw, sgw, x_c, k_ok, scale, shift, oi, oj, H, W, WO, TILES_H, TILES_W, stride_h,
                        stride_w, pad_w, dil_w, c_kw, act_ty, KW, TILE_H, TILE_W)
                    gyb = go_ptr + n64 * sgn
                    # exact and cold: each input channel sees only its own group's output
                    # channels, one FMA per (tap, output channel of the group)
                    acc = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
                    for tap in range(0, KHW):
                        fh = tap // KW
                        fw = tap - fh * KW
                        oh = ph + pad_h - fh * dil_h + stride_h * ((KH - 1) * dil_h)
                        ow = pw + pad_w - fw * dil_w + stride_w * ((KW - 1) * dil_w)
                        fho = ii + (oh // stride_h - (KH - 1) * dil_h)
                        fwo = jj + (ow // stride_w - (KW - 1) * dil_w)
                        t_ok = m_ok & (oh % stride_h == 0) & (ow % stride_w == 0) & (fho >= 0) & (fho < HO) & \
                            (fwo >= 0) & (fwo < WO)
                        for j in range(0, COUT_G):
                            co = gblk * NR + gk * COUT_G + j
                            co_ok = k_ok & (co < CO)
                            gyf = tl.load(gyb + (fho * sgh + fwo * sgw)[:, None] + (co * sgc)[None, :],
                                         mask=t_ok[:, None] & co_ok[None, :], other=0.0).to(tl.float32)
                            wf = tl.load(w_ptr + co * swo + ci_loc * swi + fh * swh + fw * sww, mask=co_ok,
                                         other=0.0).to(tl.float32)
                            acc += gyf * wf[None, :]
                    sdz, sdzx = _epilogue(acc, a, xv, mask, mean, invstd, gz_ptr, n64, h, w, szn, szh, szw, z_c, sdz, sdzx,
                                          act_ty)

    if DO_GA:  # the fix-up launch writes rows [SPLITS, 2 * SPLITS)
        if FIXUP:
            row = (split + SPLITS).to(tl.int64) * (2 * C)
        else:
            row = split.to(tl.int64) * (2 * C)
        tl.store(psum_ptr + row + ci, tl.sum(sdz, axis=0), mask=k_ok)
        tl.store(psum_ptr + row + C + ci, tl.sum(sdzx, axis=0), mask=k_ok)


@triton.jit
def _tile(t, x_ptr, sxn, sxh, sxw, sgw, x_c, k_ok, scale, shift, oi, oj, H, W, WO, TILES_H, TILES_W, stride_h, stride_w,
          pad_w, dil_w, c_kw, act_ty: tl.constexpr, KW: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Tile ``t`` of the input positions (a residue class ``(h % stride, w % stride)`` of one
    image): its positions, ``x`` and ``a = relu(bn(x))`` (rounded to ``x``'s dtype), and the
    stacked ``kw`` columns' validity and ``grad_out`` column offsets."""
    rest, th0, tw0 = tile_origin(t, TILES_H, TILES_W, TILE_H, TILE_W)
    pw = rest % stride_w
    rest = rest // stride_w
    ph = rest % stride_h
    n64 = (rest // stride_h).to(tl.int64)
    ii = th0 + oi  # position in the residue class's grid
    jj = tw0 + oj
    h = ii * stride_h + ph
    w = jj * stride_w + pw
    m_ok = (h < H) & (w < W)
    mask = m_ok[:, None] & k_ok[None, :]
    xv = tl.load(x_ptr + n64 * sxn + (h * sxh + w * sxw)[:, None] + x_c[None, :], mask=mask, other=0.0).to(tl.float32)
    a = bn_relu(xv, scale, shift, mask).to(act_ty)
    # the kw taps that reach this residue class, and their output columns:
    # wo * stride = w + pad - kw * dil, offsets kept non-negative so % and // are exact
    ow = pw + pad_w - c_kw * dil_w + stride_w * ((KW - 1) * dil_w)
    kw_ok = (c_kw < KW) & (ow % stride_w == 0)
    gwo = jj[:, None] + (ow // stride_w - (KW - 1) * dil_w)[None, :]
    col_ok = kw_ok[None, :] & (gwo >= 0) & (gwo < WO)
    return n64, ph, pw, ii, jj, h, w, m_ok, mask, xv, a, col_ok, gwo * sgw


@triton.jit
def _epilogue(acc, a, xv, mask, mean, invstd, gz_ptr, n64, h, w, szn, szh, szw, z_c, sdz, sdzx,
              act_ty: tl.constexpr):
    """``grad_z`` from ``grad_a`` (the ReLU mask as torch.relu's backward, threshold_backward:
    zero where the activation, rounded to ``x``'s dtype, is <= 0; a NaN activation passes the
    gradient through), stored; the BN-gradient sums accumulated element-wise."""
    gzv = tl.where(a.to(tl.float32) <= 0.0, 0.0, acc).to(act_ty)
    tl.store(gz_ptr + n64 * szn + (h * szh + w * szw)[:, None] + z_c[None, :], gzv, mask=mask)
    gzf = tl.where(mask, gzv.to(tl.float32), 0.0)
    return sdz + gzf, sdzx + gzf * ((xv - mean[None, :]) * invstd[None, :])


@triton.jit
def _stacked(nc, gblk, NR, CO, COUT_G, CIN_G, c_kw, c_n, gk, ci_loc, k_ok, swo, swi, sww,
             KW: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr):
    """The stacked ``(kw, output channel)`` axis of output-channel chunk ``nc``: channel,
    validity, group within the block, the block-diagonal mask against the input channels and the weight offsets
    ``w[co, ci_local, 0, kw]`` of a ``[KW_P * BLOCK_N, BLOCK_K]`` tile."""
    n_loc = nc * BLOCK_N + c_n
    co = gblk * NR + n_loc
    if EVEN_N:
        n_ok = c_kw < KW
    else:
        n_ok = (n_loc < NR) & (co < CO) & (c_kw < KW)
    gn = n_loc // COUT_G
    keep = (gn[:, None] == gk[None, :]) & n_ok[:, None] & k_ok[None, :]
    w_off = (co * swo + c_kw * sww)[:, None] + (ci_loc * swi)[None, :]
    return co, n_ok, gn, keep, w_off


@triton.jit
def bn_relu_conv_bwd_finalize_kernel(
    pgw_ptr, pgb_ptr, psum_ptr, gw_ptr, gb_ptr, sdz_ptr, sdzx_ptr,
    N_GW, N_GB, C, SPLITS_W, SPLITS_S, NB_GW, NB_GB, NB_C,
    HAS_GB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the float32 partials over their ``SPLITS`` rows in a fixed order. Program ranges:
    ``[0, NB_GW)`` ``grad_weight`` (written in its dtype), then ``NB_GB`` programs
    ``grad_bias``, then ``NB_C`` each for ``sum(grad_z)`` and ``sum(grad_z * xhat)`` (the two
    halves of the ``[SPLITS, 2C]`` partials)."""
    pid = tl.program_id(0)
    if pid < NB_GW:
        _reduce_rows(pgw_ptr, gw_ptr, pid, N_GW, N_GW, SPLITS_W, BLOCK_S, BLOCK_C)
    elif pid < NB_GW + NB_GB:
        if HAS_GB:
            _reduce_rows(pgb_ptr, gb_ptr, pid - NB_GW, N_GB, N_GB, SPLITS_W, BLOCK_S, BLOCK_C)
    elif pid < NB_GW + NB_GB + NB_C:
        _reduce_rows(psum_ptr, sdz_ptr, pid - NB_GW - NB_GB, C, 2 * C, SPLITS_S, BLOCK_S, BLOCK_C)
    else:
        _reduce_rows(psum_ptr + C, sdzx_ptr, pid - NB_GW - NB_GB - NB_C, C, 2 * C, SPLITS_S, BLOCK_S, BLOCK_C)


@triton.jit
def _reduce_rows(src_ptr, dst_ptr, blk, COLS, ROW_STRIDE, ROWS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < COLS
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_S):
        r = r0 + tl.arange(0, BLOCK_S)
        acc += tl.load(src_ptr + (r * ROW_STRIDE)[:, None] + cols[None, :],
                       mask=(r < ROWS)[:, None] & c_ok[None, :], other=0.0)
    tl.store(dst_ptr + cols, tl.sum(acc, axis=0).to(dst_ptr.dtype.element_ty), mask=c_ok)
