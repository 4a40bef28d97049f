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
``(h % s, w % s)``. Spatial tiles are 2-D (``TILE_H x TILE_W`` positions of a class of one
image); the row / column inside a tile come from constexpr shifts. Two paths:

* the *class path* (constexpr ``SH, SW``: the host's choice when both strides are 1 or 2, at
  least one 2, the dilation odd along a stride of 2, and the output channels one chunk per
  program): stride, class and tap set are compile-time. Class ``(qh, qw)`` is reached by
  exactly the taps ``kh = qh + SH * j``, ``kw = qw + SW * j'`` (odd dilation makes the map
  from tap residue to input residue one-to-one); a program walks its tiles class by class,
  one tile loop per class, and the class's taps side by side, in power-of-two chunks of at
  most 64 / ``BLOCK_N`` taps, are the stacked axis of one ``[positions, taps * BLOCK_N]`` load
  of the output gradient and of its MMAs: no masked-out tap is loaded or multiplied, no
  runtime division (3x3, stride 2: 4, 2, 2 and 1 taps for the four classes, against 3 rows x
  4 stacked slots for every class on the generic path);
* the *generic path* (any stride, runtime values): per kernel row a runtime test whether it
  reaches the tile's class, and the row's ``KW`` taps stacked ``KW_P`` wide with the taps that
  do not reach the class masked.

Programs are persistent: program ``pid`` owns channel block ``pid % NCB`` and walks the
tiles ``split, split + SPLITS, ...`` (``split = pid // NCB``; on the class path those of
every class in turn) in a fixed order, then writes its float32 partials to row ``split`` of
``[SPLITS, ...]`` buffers that
:func:`bn_relu_conv_bwd_finalize_kernel` sums in a fixed order: deterministic, no atomics.

Packed small groups: ``0 * NaN`` in the block-diagonal weights carries one group's non-finite
``grad_out`` into its neighbours' ``grad_a``; where that reaches ``grad_z`` it makes the
program's ``sum(grad_z)`` NaN, and such a program then recomputes all of its tiles exactly,
one group at a time, in the same launch (normally never: no per-tile check, no extra launch);
on the class path it walks the same tiles as its first pass, class by class.

A non-finite ``grad_out`` at a border output: eager's weight gradient also sums over the zero
padding, where ``0 * NaN`` is NaN, which no weight-gradient kernel here visits (they run over
the input positions). The finalize restores eager's NaN over those taps, only in a program one
of whose sums is not finite (:func:`_reduce_weight_rows`); the kernels pay nothing.

Packed small groups at stride 1 (ResNeXt-50 stages 1-3, depthwise) take the input gradient
from :func:`bn_relu_conv_bwd_input_packed_kernel` (``grad_out`` convolved with the flipped,
transposed block-diagonal weights, one MMA per tap, the same epilogue and partials) and the
weight gradient from this kernel with ``DO_GW`` alone.

One group per block at stride 1 whose output channels fit one 32-wide chunk (DenseNet-121's
128 -> 32 3x3 convs, ResNeXt-50's 32-channel groups) may take the input gradient from
:func:`bn_relu_conv_bwd_input_s1_kernel` (the same design, ``BLOCK_K`` input channels per
program, no fix-up: no packed neighbours), listed beside the kernel it would run otherwise.

Groups wider than one tile (WRN-28-10's dense 3x3 convs: compute-bound, their time the MMA
time) have kernels of their own, with the same partials and finalize:
:func:`bn_relu_conv_bwd_input_kernel` (``grad_a`` by one flattened, software-pipelined loop
over output-channel chunks and the taps of each residue class, its operands copied
asynchronously into shared memory), :func:`bn_relu_conv_bwd_weight_s1_kernel` (stride 1: over
the input positions, a kernel row's taps stacked 2 + 1 so no MMA row is a padded tap) and
:func:`bn_relu_conv_bwd_weight_kernel` (a stride: over the output positions, so no tap is
evaluated where it cannot contribute).
"""
import triton
import triton.language as tl

from resfast.kernels.triton.bn_relu import (any_nonfinite, bn_params, bn_relu, channel_block, dot_acc, mma_columns,
                                           tile_digits,
                                            tile_next2, tile_origin)


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
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SH: tl.constexpr = 0, SW: tl.constexpr = 0, MAGIC: tl.constexpr = False,
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
    ci, k_ok, scale, shift = channel_block(k_loc, gblk, KR, C, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA,
                                           HAS_BETA, EVEN_K, BLOCK_K)
    gk = k_loc // CIN_G
    ci_loc = k_loc - gk * CIN_G
    mean = tl.load(mean_ptr + ci, mask=k_ok, other=0.0)
    invstd = tl.load(invstd_ptr + ci, mask=k_ok, other=0.0)
    x_c = ci * sxc
    z_c = ci * szc
    if DO_GA:  # per-position partial sums, reduced across positions once after the tiles
        sdz = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
        sdzx = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
    if SH > 0:
        # The residue-class path (the host's choice for strides of 1 or 2 whose dilation is odd,
        # ONE_N): stride, class and tap set are compile-time. Class (qh, qw) holds the input
        # positions h = ii * SH + ph, w = jj * SW + pw reached by exactly the taps
        # kh = qh + SH * j, kw = qw + SW * j', and its taps (j, j') side by side, in power-of-two
        # chunks of at most TAP_CAP taps, are the stacked axis of one [BM, taps * BLOCK_N] load
        # of the output gradient: no masked-out tap is loaded or multiplied, no runtime division.
        TAP_CAP: tl.constexpr = _tap_cap(BLOCK_N)
        if DO_GA:  # the block-diagonal weights of every chunk, loaded once per program
            wts = ()
            for qh in tl.static_range(SH):
                for qw in tl.static_range(SW):
                    for i in tl.static_range(_nchunks(_ntaps(KH, SH, qh) * _ntaps(KW, SW, qw), TAP_CAP)):
                        wq = _class_chunk(qh, qw, i, nc0, gblk, NR, CO, COUT_G, gk, ci_loc, k_ok, pad_h, pad_w, dil_h,
                                          dil_w, swo, swi, swh, sww, KH, KW, SH, SW, EVEN_N, BLOCK_N, TAP_CAP)
                        wts = wts + (tl.load(w_ptr + wq[3], mask=wq[2], other=0.0),)
        if DO_GW:
            gws = ()
            for qh in tl.static_range(SH):
                for qw in tl.static_range(SW):
                    for i in tl.static_range(_nchunks(_ntaps(KH, SH, qh) * _ntaps(KW, SW, qw), TAP_CAP)):
                        gws = gws + (tl.zeros([_chunk_size(_ntaps(KH, SH, qh) * _ntaps(KW, SW, qw), TAP_CAP, i)
                                               * BLOCK_N, BLOCK_K], dtype=tl.float32),)
        TILES_C = NUM_TILES // (SH * SW)  # tiles of one class
        for qh in tl.static_range(SH):
            ph = (qh * dil_h + (SH - 1) * pad_h) % SH
            for qw in tl.static_range(SW):
                pw = (qw * dil_w + (SW - 1) * pad_w) % SW
                for t in range(split, TILES_C, SPLITS):
                    n, th0, tw0 = tile_origin(t, TILES_H, TILES_W, TILE_H, TILE_W)
                    n64 = n.to(tl.int64)
                    ii = th0 + oi  # position in the class's grid
                    jj = tw0 + oj
                    h = ii * SH + ph
                    w = jj * SW + pw
                    m_ok = (h < H) & (w < W)
                    mask = m_ok[:, None] & k_ok[None, :]
                    xv = tl.load(x_ptr + n64 * sxn + (h * sxh + w * sxw)[:, None] + x_c[None, :], mask=mask,
                                 other=0.0).to(tl.float32)
                    a = bn_relu(xv, scale, shift, mask).to(act_ty)
                    gyb = go_ptr + n64 * sgn
                    g_row = ii * sgh + jj * sgw
                    acc = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
                    for i in tl.static_range(_nchunks(_ntaps(KH, SH, qh) * _ntaps(KW, SW, qw), TAP_CAP)):
                        co_q, n_ok_q, keep_q, w_off_q, kh_q, kw_q, dh_q, dw_q = _class_chunk(
                            qh, qw, i, nc0, gblk, NR, CO, COUT_G, gk, ci_loc, k_ok, pad_h, pad_w, dil_h, dil_w, swo, swi,
                            swh, sww, KH, KW, SH, SW, EVEN_N, BLOCK_N, TAP_CAP)
                        # the output position of each (position, tap): row ii + dh, column jj + dw
                        gi = ii[:, None] + dh_q[None, :]
                        gj = jj[:, None] + dw_q[None, :]
                        g_mask = m_ok[:, None] & (gi >= 0) & (gi < HO) & (gj >= 0) & (gj < WO) & n_ok_q[None, :]
                        gy = tl.load(gyb + g_row[:, None] + (dh_q * sgh + dw_q * sgw + co_q * sgc)[None, :],
                                     mask=g_mask, other=0.0)
                        if DO_GA:
                            acc = dot_acc(gy, wts[_chunk_index(KH, KW, SH, SW, TAP_CAP, qh, qw, i)], acc, DOT_F32)
                        if DO_GW:
                            gws = _put(gws, _chunk_index(KH, KW, SH, SW, TAP_CAP, qh, qw, i), tl.trans(gy), a,
                                       DOT_F32)
                    if DO_GA:
                        sdz, sdzx = _epilogue(acc, a, xv, mask, mean, invstd, gz_ptr, n64, h, w, szn, szh, szw, z_c,
                                              sdz, sdzx, act_ty)
        if DO_GW:
            # row (tap, co) and column ci of a chunk -> grad_weight[co, ci_local, kh, kw]
            base = split.to(tl.int64) * (CO * CIN_G * KHW)
            for qh in tl.static_range(SH):
                for qw in tl.static_range(SW):
                    for i in tl.static_range(_nchunks(_ntaps(KH, SH, qh) * _ntaps(KW, SW, qw), TAP_CAP)):
                        sq = _class_chunk(qh, qw, i, nc0, gblk, NR, CO, COUT_G, gk, ci_loc, k_ok, pad_h, pad_w, dil_h,
                                          dil_w, swo, swi, swh, sww, KH, KW, SH, SW, EVEN_N, BLOCK_N, TAP_CAP)
                        col = (sq[0].to(tl.int64) * (CIN_G * KHW) + sq[4] * KW + sq[5])[:, None] + \
                            (ci_loc * KHW)[None, :]
                        tl.store(pgw_ptr + base + col, gws[_chunk_index(KH, KW, SH, SW, TAP_CAP, qh, qw, i)],
                                 mask=sq[2])
    else:  # the generic path: runtime stride, a kernel row's kw taps stacked (KW_P wide)
        if ONE_N:
            co_c, n_ok_c, gn_c, keep, w_off = _stacked(nc0, gblk, NR, CO, COUT_G, CIN_G, c_kw, c_n, gk, ci_loc, k_ok,
                                                       swo, swi, sww, KW, EVEN_N, BLOCK_N)
            if DO_GA:
                wt = ()
                for kh in tl.static_range(KH):
                    wt = wt + (tl.load(w_ptr + w_off + kh * swh, mask=keep, other=0.0),)
        if DO_GW:
            gw = (tl.zeros([GN, BLOCK_K], dtype=tl.float32),) * KH

        # the tile's digits (column, row, residue column, residue row, image), divided per tile
        # (carried across the loop instead they cost this kernel more in registers than they
        # save); with MAGIC (the host's choice when NUM_TILES * max(TILES_W, TILES_H) < 2**31) the
        # two tile-grid divisions by a multiply-high with this program's magic numbers
        if MAGIC:
            mag_w = _magic(TILES_W)
            mag_h = _magic(TILES_H)
        for t in range(split, NUM_TILES, SPLITS):
            if MAGIC:
                d_w, d_h, d_pw, d_ph, d_n = _tile_digits_magic(t, TILES_W, mag_w, TILES_H, mag_h, stride_w,
                                                               stride_h)
            else:
                d_w, d_h, d_pw, d_ph, d_n = tile_digits(t, TILES_W, TILES_H, stride_w, stride_h)
            n64, ph, pw, ii, jj, h, w, m_ok, mask, xv, a, col_ok, col_off = _tile(
                d_n, d_ph, d_pw, d_h * TILE_H, d_w * TILE_W, x_ptr, sxn, sxh, sxw, sgw, x_c, k_ok, scale, shift, oi, oj,
                H, W, WO, stride_h, stride_w, pad_w, dil_w, c_kw, act_ty, KW)
            gyb = go_ptr + n64 * sgn  # this image's base pointer; int32 offsets inside it
            if ONE_N and DO_GA:  # the kernel rows' offsets differ by a scalar: one per-element offset for all
                g_off = (ii * sgh)[:, None] + col_off + (co_c * sgc)[None, :]
                col_ok_n = col_ok & n_ok_c[None, :]
            acc = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
            for kh in tl.static_range(KH):
                oh = ph + pad_h - kh * dil_h + stride_h * ((KH - 1) * dil_h)
                if oh % stride_h == 0:
                    dho = oh // stride_h - (KH - 1) * dil_h  # output row = ii + dho
                    gho = ii + dho
                    row_ok = m_ok & (gho >= 0) & (gho < HO)
                    g_mask = row_ok[:, None] & col_ok
                    if ONE_N:
                        # [BM, KW_P * BLOCK_N]: the output gradient at the kw taps' positions, side by side
                        if DO_GA:
                            gy = tl.load(gyb + dho * sgh + g_off, mask=row_ok[:, None] & col_ok_n, other=0.0)
                        else:
                            gy = tl.load(gyb + ((gho * sgh)[:, None] + col_off) + (co_c * sgc)[None, :],
                                         mask=g_mask & n_ok_c[None, :], other=0.0)
                        if DO_GA:
                            acc = dot_acc(gy, wt[kh], acc, DOT_F32)
                        if DO_GW:
                            gw = gw[:kh] + (dot_acc(tl.trans(gy), a, gw[kh], DOT_F32),) + gw[kh + 1:]
                    else:  # grad_a of a wide group: every output-channel chunk
                        for nc in range(0, NSUB):
                            co_n, n_ok_n, gn_n, keep_n, w_off_n = _stacked(nc, gblk, NR, CO, COUT_G, CIN_G, c_kw, c_n, gk,
                                                                           ci_loc, k_ok, swo, swi, sww, KW, EVEN_N,
                                                                           BLOCK_N)
                            gy = tl.load(gyb + ((gho * sgh)[:, None] + col_off) + (co_n * sgc)[None, :],
                                         mask=g_mask & n_ok_n[None, :], other=0.0)
                            wv = tl.load(w_ptr + w_off_n + kh * swh, mask=keep_n, other=0.0)
                            acc = dot_acc(gy, wv, acc, DOT_F32)
            if DO_GA:
                sdz, sdzx = _epilogue(acc, a, xv, mask, mean, invstd, gz_ptr, n64, h, w, szn, szh, szw, z_c, sdz, sdzx,
                                      act_ty)

        if DO_GW:
            # row (kw, co) and column ci of kernel row kh -> grad_weight[co, ci_local, kh, kw]
            base = split.to(tl.int64) * (CO * CIN_G * KHW)
            col = (co_c.to(tl.int64) * (CIN_G * KHW) + c_kw)[:, None] + (ci_loc * KHW)[None, :]
            for kh in tl.static_range(KH):
                tl.store(pgw_ptr + base + col + kh * KW, gw[kh], mask=keep)
    if DO_GW and DO_GB:
        if ksub == 0:
            _bias_partials(go_ptr, pgb_ptr, nc0, gblk, NR, CO, HO, WO, P_OUT, split, SPLITS, m, sgn, sgc,
                           sgh, sgw, BM, BLOCK_N)

    if PACKED:
        # The fix-up (packed groups only): 0 * NaN in the block-diagonal weights carries one
        # group's non-finite grad_out into its packed neighbours' grad_a, which eager never
        # does. Such a NaN matters only where the ReLU passes the gradient (elsewhere grad_z is
        # 0 either way), and there it makes grad_z, hence this program's sum of grad_z, NaN: a
        # program whose sum is not finite recomputes all of its tiles one group at a time
        # (grad_z stored again, the BN-gradient sums taken afresh), no per-tile check. The
        # weight gradient needs no fix-up: its off-block-diagonal entries are never stored.
        tl.debug_barrier()  # the first pass's grad_z stores come before the fix-up's
        if any_nonfinite(sdz):
            sdz = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
            sdzx = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
            if SH > 0:  # the same tiles in the same order as the class path's first pass
                for q in tl.range(0, SH * SW, num_stages=1):
                    f_ph = ((q // SW) * dil_h + (SH - 1) * pad_h) % SH
                    f_pw = ((q % SW) * dil_w + (SW - 1) * pad_w) % SW
                    for t in tl.range(split, NUM_TILES // (SH * SW), SPLITS, num_stages=1):
                        f_n, f_h0, f_w0 = tile_origin(t, TILES_H, TILES_W, TILE_H, TILE_W)
                        sdz, sdzx = _fixup_tile(
                            f_n, f_ph, f_pw, f_h0, f_w0, go_ptr, w_ptr, x_ptr, gz_ptr, sgn, sgc, sgh, sgw, swo, swi, swh,
                            sww, sxn, sxh, sxw, szn, szh, szw, x_c, z_c, k_ok, scale, shift, mean, invstd, gblk, gk,
                            ci_loc, NR, CO, COUT_G, H, W, HO, WO, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, oi,
                            oj, c_kw, sdz, sdzx, act_ty, KH, KW)
            else:
                for t in tl.range(split, NUM_TILES, SPLITS, num_stages=1):
                    f_w, f_h, f_pw, f_ph, f_n = tile_digits(t, TILES_W, TILES_H, stride_w, stride_h)
                    sdz, sdzx = _fixup_tile(
                        f_n, f_ph, f_pw, f_h * TILE_H, f_w * TILE_W, go_ptr, w_ptr, x_ptr, gz_ptr, sgn, sgc, sgh, sgw,
                        swo, swi, swh, sww, sxn, sxh, sxw, szn, szh, szw, x_c, z_c, k_ok, scale, shift, mean, invstd,
                        gblk, gk, ci_loc, NR, CO, COUT_G, H, W, HO, WO, stride_h, stride_w, pad_h, pad_w, dil_h,
                        dil_w, oi, oj, c_kw, sdz, sdzx, act_ty, KH, KW)

    if DO_GA:
        row = split.to(tl.int64) * (2 * C)
        tl.store(psum_ptr + row + ci, tl.sum(sdz, axis=0), mask=k_ok)
        tl.store(psum_ptr + row + C + ci, tl.sum(sdzx, axis=0), mask=k_ok)


@triton.jit
def bn_relu_conv_bwd_input_packed_kernel(
    go_ptr, w_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, gz_ptr, psum_ptr,
    C, H, W, CO, HO, WO, CIN_G, COUT_G, KR, NR, TILES_H, TILES_W, NUM_TILES, STEP_W, STEP_H, STEP_N,
    sgn, sgc, sgh, sgw,
    swo, swi, swh, sww,
    sxn, sxc, sxh, sxw,
    szn, szc, szh, szw,
    pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, MMA_EPI: tl.constexpr = False, PAIRS: tl.constexpr = False,
):
    """``grad_a`` of packed small groups at stride 1 as the convolution it is: ``grad_out``
    (zero-padded, no prologue) with the flipped, transposed weights. Per tile of input
    positions and per tap one masked ``[positions, BLOCK_N]`` load of ``grad_out`` at the tap's
    shifted positions (a kernel row's loads issued together) and one MMA with the tap's
    block-diagonal ``[BLOCK_N, BLOCK_K]`` weights (loaded once per program: the flip and the
    transpose are the gather's index arithmetic); then the epilogue of
    :func:`bn_relu_conv_bwd_kernel` (``grad_z`` and the BN-gradient partials). Grid
    ``(splits, group blocks)``; program ``(split, gb)`` walks tiles ``split, split + splits,
    ...`` by their digits (``STEP_*``, from the host).

    Non-finite values: ``0 * NaN`` in the block-diagonal weights carries one group's
    non-finite ``grad_out`` into its packed neighbours' ``grad_a``; where that reaches
    ``grad_z`` it makes the program's ``sum(grad_z)`` NaN, and such a program recomputes its
    tiles exactly in the same launch, one input channel at a time over all of them from its
    own group's output channels (:func:`_packed_fixup`: FMAs on vectors over the positions,
    the tile loop's sums dead by then, so this cold path never needs more registers than the
    tile loop; a fix-up through the MMAs took the kernel from 80 to 117-255 registers).

    Registers (they decide its time: PREDICTED, docs/notes/triton_kernels.md): ``MMA_EPI``
    computes the epilogue in the MMA's layout (:func:`mma_columns`: x converted once, grad_z
    once, the BN vectors 4 registers each instead of 8); ``PAIRS`` keeps the per-position sums
    as ``[BM / 16, 8, BLOCK_K]`` (the two rows one thread holds added first).

    Selected by the host (``triton_ops._packed_input``) at stride 1 for a group block of at
    most 16 input and output channels and more than one tap; the weight gradient is then its
    own launch (:func:`bn_relu_conv_bwd_kernel` with ``DO_GW`` alone)."""
    split = tl.program_id(0)
    splits = tl.num_programs(0)
    gblk = tl.program_id(1)
    act_ty = gz_ptr.dtype.element_ty
    # per-position sums of grad_z and grad_z * (x - mean), reduced once at the end (invstd
    # applied then: sum(grad_z * (x - mean)) * invstd); SUM_PAIRS: rows m and m + 8 of each
    # 16-row slab (one thread's pair in the MMA's layout) added first, half the registers
    SUM_PAIRS: tl.constexpr = PAIRS and (TILE_H * TILE_W) % 16 == 0
    oi, oj, ci, k_ok, scale, shift, mean, x_c, z_c, n_ok, g_c, wt, sdz, sdzx = _packed_prologue(
        gblk, go_ptr, w_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, C, CO, CIN_G, COUT_G, KR, NR, sgc, swo, swi,
        swh, sww, sxc, szc, KH, KW, HAS_GAMMA, HAS_BETA, DOT_F32, EVEN_K, EVEN_N, TILE_H, TILE_W, BLOCK_N, BLOCK_K,
        MMA_EPI, SUM_PAIRS)
    d_w, d_h, _, _, d_n = tile_digits(split, TILES_W, TILES_H, 1, 1)
    for t in tl.range(split, NUM_TILES, splits, num_stages=1):
        sdz, sdzx = _packed_tile(d_n, d_h, d_w, go_ptr, x_ptr, gz_ptr, g_c, n_ok, x_c, z_c, k_ok, wt, scale, shift,
                                 mean, sdz, sdzx, oi, oj, H, W, HO, WO, sgn, sgh, sgw, sxn, sxh, sxw, szn, szh, szw,
                                 pad_h, pad_w, dil_h, dil_w, act_ty, KH, KW, TILE_H, TILE_W, BLOCK_K, DOT_F32,
                                 SUM_PAIRS)
        d_w, d_h, d_n = tile_next2(d_w, d_h, d_n, STEP_W, STEP_H, STEP_N, TILES_W, TILES_H)

    tl.debug_barrier()  # the first pass's grad_z stores come before the fix-up's
    row = split.to(tl.int64) * (2 * C)
    if any_nonfinite(sdz):
        # the same tiles again, each input channel's grad_a from its own group's output channels
        # (one channel at a time over all the program's tiles, its sums stored by the fix-up)
        _packed_fixup(split, splits, gblk, oi, oj, go_ptr, w_ptr, x_ptr, gz_ptr, mean_ptr, invstd_ptr, gamma_ptr,
                      beta_ptr, psum_ptr + row, C, H, W, CO, HO, WO, CIN_G, COUT_G, KR, NR, TILES_H, TILES_W,
                      NUM_TILES, sgn, sgc, sgh, sgw, swo, swi, swh, sww, sxn, sxc, sxh, sxw, szn, szc, szh, szw,
                      pad_h, pad_w, dil_h, dil_w, HAS_GAMMA, HAS_BETA, KH, KW, TILE_H, TILE_W)
    else:
        _packed_sums_store(psum_ptr, row, C, ci, k_ok, invstd_ptr, sdz, sdzx, SUM_PAIRS)


@triton.jit
def _packed_prologue(gblk, go_ptr, w_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, C, CO, CIN_G, COUT_G, KR, NR, sgc,
                     swo, swi, swh, sww, sxc, szc, KH: tl.constexpr, KW: tl.constexpr, HAS_GAMMA: tl.constexpr,
                     HAS_BETA: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                     TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     MMA_EPI: tl.constexpr, SUM_PAIRS: tl.constexpr):
    """What the packed input-gradient kernels (stride 1 and the strided one) set up once per
    program of group block ``gblk``: a tile's rows and columns ``(oi, oj)``, the block's input
    channels ``ci``, their validity ``k_ok`` and BN vectors ``(scale, shift, mean)`` (in the MMA's
    column layout with ``MMA_EPI``, :func:`mma_columns`), the channel offsets ``x_c``, ``z_c`` and
    ``g_c``, the output channels' validity ``n_ok``, the taps' block-diagonal, flipped and
    transposed weights ``wt`` (``[BLOCK_N, BLOCK_K]`` each: row n, output channel co, column k,
    input channel ci, holds ``w[co, ci_local, kh, kw]`` within one group, else 0) and the zeroed
    per-position sums ``(sdz, sdzx)`` (``[BM / 16, 8, BLOCK_K]`` with ``SUM_PAIRS``)."""
    BM: tl.constexpr = TILE_H * TILE_W
    kk = tl.arange(0, BLOCK_K)
    m = tl.arange(0, BM)
    oi = m // TILE_W
    oj = m % TILE_W
    ci, k_ok, scale, shift = channel_block(kk, gblk, KR, C, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA,
                                           HAS_BETA, EVEN_K, BLOCK_K)
    gk = kk // CIN_G
    ci_loc = kk - gk * CIN_G
    mean = tl.load(mean_ptr + ci, mask=k_ok, other=0.0)
    x_c = ci * sxc
    z_c = ci * szc
    nn = tl.arange(0, BLOCK_N)
    co = gblk * NR + nn
    if EVEN_N:
        n_ok = tl.full([BLOCK_N], 1, tl.int1)
    else:
        n_ok = (nn < NR) & (co < CO)
    keep = ((nn // COUT_G)[:, None] == gk[None, :]) & n_ok[:, None] & k_ok[None, :]
    w_off = (co * swo)[:, None] + (ci_loc * swi)[None, :]
    wt = ()
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            wt = wt + (tl.load(w_ptr + w_off + (kh * swh + kw * sww), mask=keep, other=0.0),)
    if MMA_EPI:  # the epilogue in the MMA's layout (:func:`mma_columns`): 4 registers a vector, not 8
        a_like = tl.zeros([BM, BLOCK_N], dtype=go_ptr.dtype.element_ty)
        scale = mma_columns(scale, a_like, wt[0], DOT_F32)
        shift = mma_columns(shift, a_like, wt[0], DOT_F32)
        mean = mma_columns(mean, a_like, wt[0], DOT_F32)
    g_c = co * sgc
    if SUM_PAIRS:
        sdz = tl.zeros([BM // 16, 8, BLOCK_K], dtype=tl.float32)
        sdzx = tl.zeros([BM // 16, 8, BLOCK_K], dtype=tl.float32)
    else:
        sdz = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
        sdzx = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
    return oi, oj, ci, k_ok, scale, shift, mean, x_c, z_c, n_ok, g_c, wt, sdz, sdzx


@triton.jit
def _packed_sums_store(psum_ptr, row, C, ci, k_ok, invstd_ptr, sdz, sdzx, SUM_PAIRS: tl.constexpr):
    """A packed input-gradient program's two BN-gradient partials, its per-position sums reduced:
    ``sum(grad_z)`` at ``psum_ptr + row + ci`` and ``sum(grad_z * (x - mean)) * invstd`` at
    ``psum_ptr + row + C + ci``."""
    invstd = tl.load(invstd_ptr + ci, mask=k_ok, other=0.0)
    if SUM_PAIRS:
        tl.store(psum_ptr + row + ci, tl.sum(tl.sum(sdz, axis=0), axis=0), mask=k_ok)
        tl.store(psum_ptr + row + C + ci, tl.sum(tl.sum(sdzx, axis=0), axis=0) * invstd, mask=k_ok)
    else:
        tl.store(psum_ptr + row + ci, tl.sum(sdz, axis=0), mask=k_ok)
        tl.store(psum_ptr + row + C + ci, tl.sum(sdzx, axis=0) * invstd, mask=k_ok)


@triton.jit
def _packed_tile(d_n, d_h, d_w, go_ptr, x_ptr, gz_ptr, g_c, n_ok, x_c, z_c, k_ok, wt, scale, shift, mean, sdz, sdzx,
                 oi, oj, H, W, HO, WO, sgn, sgh, sgw, sxn, sxh, sxw, szn, szh, szw, pad_h, pad_w, dil_h, dil_w,
                 act_ty: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, SUM_PAIRS: tl.constexpr = False):
    """One tile (image ``d_n``, tile row ``d_h``, column ``d_w``) of the packed input-gradient
    kernel: ``grad_a``, ``grad_z`` stored, its sums accumulated."""
    ii = d_h * TILE_H + oi
    jj = d_w * TILE_W + oj
    n64 = d_n.to(tl.int64)
    mask = ((ii < H) & (jj < W))[:, None] & k_ok[None, :]
    acc, xv = _packed_taps(go_ptr + n64 * sgn, ii, jj, g_c, n_ok, wt, HO, WO, sgh, sgw, pad_h, pad_w, dil_h, dil_w,
                           x_ptr + n64 * sxn + (ii * sxh + jj * sxw)[:, None] + x_c[None, :], mask, KH, KW, BLOCK_K,
                           DOT_F32)
    return _packed_epilogue(acc, xv, mask, scale, shift, mean, gz_ptr, n64, ii, jj, szn, szh, szw, z_c, sdz, sdzx,
                            act_ty, SUM_PAIRS)


@triton.jit
def bn_relu_conv_bwd_input_s1_kernel(
    go_ptr, w_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, gz_ptr, psum_ptr,
    C, H, W, CO, HO, WO, KR, NR, KSUB, TILES_H, TILES_W, NUM_TILES, STEP_W, STEP_H, STEP_N,
    sgn, sgc, sgh, sgw,
    swo, swi, swh, sww,
    sxn, sxc, sxh, sxw,
    szn, szc, szh, szw,
    pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, NSUB: tl.constexpr, G32: tl.constexpr, TILE_H: tl.constexpr,
    TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``grad_a`` of one group per block (no packing) at stride 1 whose output channels fit
    ``NSUB`` chunks of ``BLOCK_N``, as the convolution it is (the packed kernel's design,
    :func:`bn_relu_conv_bwd_input_packed_kernel`, for input sides wider than 16): per program
    ``BLOCK_K`` input channels (one of a group's ``KSUB`` chunks) and all of the group's
    output channels, whose ``[BLOCK_N, BLOCK_K]`` weight tiles (every chunk, every tap; the
    flip and the transpose in the gather's index arithmetic) are loaded once per program. Per
    tile of input positions, per kernel row the row's ``NSUB * KW`` masked loads of
    ``grad_out`` (zero-padded: no prologue) issued together, then one MMA per tap and chunk;
    then the epilogue (``grad_z`` stored, the BN-gradient partials per position across the
    tiles, reduced once at the end; reducing them per tile instead costs more instructions
    than the registers it frees). No packed neighbours share an
    MMA, so a non-finite ``grad_out`` reaches exactly the ``grad_a`` eager's reaches: no
    fix-up. Grid ``(splits, group blocks * KSUB)``; program ``(split, cb)`` walks tiles
    ``split, split + splits, ...`` by their digits (``STEP_*``, from the host)."""
    split = tl.program_id(0)
    splits = tl.num_programs(0)
    cb = tl.program_id(1)
    gblk = cb // KSUB
    act_ty = gz_ptr.dtype.element_ty
    BM: tl.constexpr = TILE_H * TILE_W
    kk = tl.arange(0, BLOCK_K)
    m = tl.arange(0, BM)
    oi = m // TILE_W
    oj = m % TILE_W
    k_loc = (cb % KSUB) * BLOCK_K + kk  # the group's own input channels (no packing)
    ci, k_ok, scale, shift = channel_block(k_loc, gblk, KR, C, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA,
                                           HAS_BETA, EVEN_K, BLOCK_K)
    mean = tl.load(mean_ptr + ci, mask=k_ok, other=0.0)
    x_c = ci * sxc
    z_c = ci * szc
    nn = tl.arange(0, BLOCK_N)
    co0 = gblk * NR
    g_c = (co0 + nn) * sgc
    # the weights of chunk nc, tap (kh, kw): row n (output channel co0 + nc * BLOCK_N + n),
    # column k (input channel k_loc) holds w[co, k_loc, kh, kw]
    wt = ()
    for nc in tl.static_range(NSUB):
        n_loc = nc * BLOCK_N + nn
        if EVEN_N:
            keep = k_ok[None, :]
        else:
            keep = ((n_loc < NR) & (co0 + n_loc < CO))[:, None] & k_ok[None, :]
        w_off = ((co0 + n_loc) * swo)[:, None] + (k_loc * swi)[None, :]
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                wt = wt + (tl.load(w_ptr + w_off + (kh * swh + kw * sww), mask=keep, other=0.0),)
    sdz = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
    sdzx = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
    d_w, d_h, _, _, d_n = tile_digits(split, TILES_W, TILES_H, 1, 1)
    for t in tl.range(split, NUM_TILES, splits, num_stages=1):
        ii = d_h * TILE_H + oi
        jj = d_w * TILE_W + oj
        n64 = d_n.to(tl.int64)
        mask = ((ii < H) & (jj < W))[:, None] & k_ok[None, :]
        acc, xv = _s1_taps(go_ptr + n64 * sgn, ii, jj, g_c, nn, co0, NR, CO, wt, HO, WO, sgc, sgh, sgw, pad_h, pad_w,
                           dil_h, dil_w, x_ptr + n64 * sxn + (ii * sxh + jj * sxw)[:, None] + x_c[None, :], mask, KH,
                           KW, NSUB, EVEN_N, BLOCK_N, BLOCK_K, DOT_F32, G32)
        sdz, sdzx = _packed_epilogue(acc, xv, mask, scale, shift, mean, gz_ptr, n64, ii, jj, szn, szh, szw, z_c,
                                     sdz, sdzx, act_ty)
        d_w, d_h, d_n = tile_next2(d_w, d_h, d_n, STEP_W, STEP_H, STEP_N, TILES_W, TILES_H)
    invstd = tl.load(invstd_ptr + ci, mask=k_ok, other=0.0)
    row = split.to(tl.int64) * (2 * C)
    tl.store(psum_ptr + row + ci, tl.sum(sdz, axis=0), mask=k_ok)
    tl.store(psum_ptr + row + C + ci, tl.sum(sdzx, axis=0) * invstd, mask=k_ok)


@triton.jit
def _s1_taps(gyb, ii, jj, g_c, nn, co0, NR, CO, wt, HO, WO, sgc, sgh, sgw, pad_h, pad_w, dil_h, dil_w, x_ptrs, x_mask,
             KH: tl.constexpr, KW: tl.constexpr, NSUB: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, G32: tl.constexpr):
    """:func:`_packed_taps` over ``NSUB`` output-channel chunks (weights ``wt[(nc * KH + kh) *
    KW + kw]``): per kernel row the ``NSUB * KW`` loads, then their MMAs; ``x`` with the last
    row's loads: ``(grad_a, x)``. ``G32``: each tap's addresses from a 32-bit offset tensor
    added to the image's pointer at the load (fewer registers: 162 against 178 uncapped at
    DenseNet's 56 x 56 with triton 3.8), else from one pointer tensor per tile."""
    g_off = (ii * sgh + jj * sgw)[:, None] + g_c[None, :]  # once per tile; each tap adds a scalar
    if not G32:
        g_ptr = gyb + g_off
    acc = tl.zeros([ii.shape[0], BLOCK_K], dtype=tl.float32)
    for kh in tl.static_range(KH):
        r_ok = (ii + (pad_h - kh * dil_h)).to(tl.uint32, bitcast=True) < HO.to(tl.uint32, bitcast=True)
        gys = ()
        for nc in tl.static_range(NSUB):
            if not EVEN_N:
                n_ok = (nc * BLOCK_N + nn < NR) & (co0 + nc * BLOCK_N + nn < CO)
            for kw in tl.static_range(KW):
                c_ok = (jj + (pad_w - kw * dil_w)).to(tl.uint32, bitcast=True) < WO.to(tl.uint32, bitcast=True)
                if EVEN_N:
                    g_mask = (r_ok & c_ok)[:, None]
                else:
                    g_mask = (r_ok & c_ok)[:, None] & n_ok[None, :]
                d_off = (pad_h - kh * dil_h) * sgh + (pad_w - kw * dil_w) * sgw + nc * BLOCK_N * sgc
                if G32:
                    gys = gys + (tl.load(gyb + (g_off + d_off), mask=g_mask, other=0.0),)
                else:
                    gys = gys + (tl.load(g_ptr + d_off, mask=g_mask, other=0.0),)
        if kh == KH - 1:
            xv = tl.load(x_ptrs, mask=x_mask, other=0.0)
        for nc in tl.static_range(NSUB):
            for kw in tl.static_range(KW):
                acc = dot_acc(gys[nc * KW + kw], wt[(nc * KH + kh) * KW + kw], acc, DOT_F32)
    return acc, xv


@triton.jit
def _fixup_channel(gblk, k, KR, C, CIN_G, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA: tl.constexpr,
                   HAS_BETA: tl.constexpr):
    """Local input channel ``k`` of group block ``gblk`` in the packed fix-ups (:func:`_packed_fixup`,
    :func:`_packed_fixup_s2`): ``(ci, c_ok, its group g, its index in the group, mean, invstd,
    scale, shift)``, the BN scalars in float32 (channel 0's where ``ci`` is past ``C``)."""
    ci = gblk * KR + k
    c_ok = ci < C
    g = k // CIN_G
    ci_loc = k - g * CIN_G
    c_m = tl.where(c_ok, ci, 0)
    mean = tl.load(mean_ptr + c_m).to(tl.float32)
    invstd = tl.load(invstd_ptr + c_m).to(tl.float32)
    scale = invstd
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + c_m).to(tl.float32)
    if HAS_BETA:
        shift = tl.load(beta_ptr + c_m).to(tl.float32) - mean * scale
    else:
        shift = -mean * scale
    return ci, c_ok, g, ci_loc, mean, invstd, scale, shift


@triton.jit
def _fixup_group_taps(acc, g_ptrs, t_ok, w_ptr, w_ci, w_kh, w_kw, c_ok, co0, COUT_G, CO, swo, sgc):
    """One tap of a packed fix-up: ``acc`` plus, over the group's output channels ``co0 + j``,
    ``grad_out`` at ``g_ptrs`` (where ``t_ok``) times the scalar weight ``w[co, ci_local, kh, kw]``
    (at ``w_ptr + co * swo + w_ci + w_kh + w_kw``), float32 FMAs on position vectors."""
    for j in range(0, COUT_G):
        co = co0 + j
        wv = tl.load(w_ptr + co * swo + w_ci + w_kh + w_kw, mask=c_ok & (co < CO), other=0.0).to(tl.float32)
        gv = tl.load(g_ptrs + co * sgc, mask=t_ok & (co < CO), other=0.0).to(tl.float32)
        acc += gv * wv
    return acc


@triton.jit
def _fixup_epilogue(acc, ii, jj, c_ok, H, W, n64, ci, x_ptr, sxn, sxh, sxw, sxc, gz_ptr, szn, szh, szw, szc, scale,
                    shift, mean, s_dz, s_dzx):
    """A packed fix-up's epilogue on input channel ``ci`` at rows ``ii``, columns ``jj`` of image
    ``n64``: ``a = relu(bn(x))`` rounded to ``x``'s dtype, ``grad_z = grad_a`` (``acc``) where
    ``a > 0`` (or NaN) stored inside the image, and the channel's sums of ``grad_z`` and
    ``grad_z * (x - mean)`` accumulated."""
    ok = (ii < H) & (jj < W) & c_ok
    xv = tl.load(x_ptr + n64 * sxn + ii * sxh + jj * sxw + ci * sxc, mask=ok, other=0.0)
    xf = xv.to(tl.float32)
    a = tl.where(ok, tl.maximum(xf * scale + shift, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0).to(xv.dtype)
    gzv = tl.where(a.to(tl.float32) <= 0.0, 0.0, acc).to(xv.dtype)
    tl.store(gz_ptr + n64 * szn + ii * szh + jj * szw + ci * szc, gzv, mask=ok)
    gzf = gzv.to(tl.float32)
    s_dz += gzf
    s_dzx += gzf * (xf - mean)
    return s_dz, s_dzx


@triton.jit
def _packed_fixup(split, splits, gblk, oi, oj, go_ptr, w_ptr, x_ptr, gz_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                  psum_row, C, H, W, CO, HO, WO, CIN_G, COUT_G, KR, NR, TILES_H, TILES_W, NUM_TILES, sgn, sgc, sgh,
                  sgw, swo, swi, swh, sww, sxn, sxc, sxh, sxw, szn, szc, szh, szw, pad_h, pad_w, dil_h, dil_w,
                  HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """The packed input-gradient kernel's exact fix-up of program ``split``'s tiles: one input
    channel at a time over all of them, ``grad_a`` from the channel's own group's output
    channels only (one FMA per tap and output channel of the group), ``grad_z`` stored again,
    and the channel's two BN-gradient sums stored at ``psum_row`` (columns ``ci`` and
    ``C + ci``). Vectors over the positions only, and the tile loop's per-position sums dead
    by then, so this cold path needs fewer registers than the tile loop."""
    for k in range(0, KR):
        ci, c_ok, g, ci_loc, mean, invstd, scale, shift = _fixup_channel(gblk, k, KR, C, CIN_G, mean_ptr, invstd_ptr,
                                                                         gamma_ptr, beta_ptr, HAS_GAMMA, HAS_BETA)
        s_dz = tl.zeros(oi.shape, dtype=tl.float32)
        s_dzx = tl.zeros(oi.shape, dtype=tl.float32)
        for t in range(split, NUM_TILES, splits):
            f_w, f_h, _, _, f_n = tile_digits(t, TILES_W, TILES_H, 1, 1)
            n64 = f_n.to(tl.int64)
            ii = f_h * TILE_H + oi
            jj = f_w * TILE_W + oj
            gyb = go_ptr + n64 * sgn
            acc = tl.zeros(ii.shape, dtype=tl.float32)
            for tap in range(0, KH * KW):
                fh = tap // KW
                fw = tap - fh * KW
                gi = ii + (pad_h - fh * dil_h)
                gj = jj + (pad_w - fw * dil_w)
                t_ok = (gi >= 0) & (gi < HO) & (gj >= 0) & (gj < WO) & c_ok
                acc = _fixup_group_taps(acc, gyb + gi * sgh + gj * sgw, t_ok, w_ptr, ci_loc * swi, fh * swh, fw * sww,
                                        c_ok, gblk * NR + g * COUT_G, COUT_G, CO, swo, sgc)
            s_dz, s_dzx = _fixup_epilogue(acc, ii, jj, c_ok, H, W, n64, ci, x_ptr, sxn, sxh, sxw, sxc, gz_ptr, szn, szh,
                                          szw, szc, scale, shift, mean, s_dz, s_dzx)
        tl.store(psum_row + ci, tl.sum(s_dz, axis=0), mask=c_ok)
        tl.store(psum_row + C + ci, tl.sum(s_dzx, axis=0) * invstd, mask=c_ok)


@triton.jit
def _packed_taps(gyb, ii, jj, g_c, n_ok, wt, HO, WO, sgh, sgw, pad_h, pad_w, dil_h, dil_w, x_ptrs, x_mask,
                 KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """``grad_a`` of one tile (input rows ``ii``, columns ``jj`` of the image at ``gyb``) at
    stride 1: per tap ``grad_out`` at row ``ii + pad_h - kh * dil_h``, column ``jj + pad_w -
    kw * dil_w`` (zero outside the image and where ``n_ok`` is false) times the tap's weights
    ``wt[kh * KW + kw]``; a kernel row's loads are issued before its MMAs, and ``x`` (at
    ``x_ptrs``) with the last row's: ``(grad_a, x)``."""
    g_ptr = gyb + ((ii * sgh + jj * sgw)[:, None] + g_c[None, :])  # once per tile; each tap adds a scalar
    acc = tl.zeros([ii.shape[0], BLOCK_K], dtype=tl.float32)
    for kh in tl.static_range(KH):
        # 0 <= row < HO as one unsigned compare
        r_ok = (ii + (pad_h - kh * dil_h)).to(tl.uint32, bitcast=True) < HO.to(tl.uint32, bitcast=True)
        gys = ()
        for kw in tl.static_range(KW):
            c_ok = (jj + (pad_w - kw * dil_w)).to(tl.uint32, bitcast=True) < WO.to(tl.uint32, bitcast=True)
            g_mask = (r_ok & c_ok)[:, None] & n_ok[None, :]
            d_off = (pad_h - kh * dil_h) * sgh + (pad_w - kw * dil_w) * sgw
            gys = gys + (tl.load(g_ptr + d_off, mask=g_mask, other=0.0),)
        if kh == KH - 1:
            xv = tl.load(x_ptrs, mask=x_mask, other=0.0)
        for kw in tl.static_range(KW):
            acc = dot_acc(gys[kw], wt[kh * KW + kw], acc, DOT_F32)
    return acc, xv


@triton.jit
def _packed_epilogue(acc, xv, mask, scale, shift, mean, gz_ptr, n64, h, w, szn, szh, szw, z_c, sdz, sdzx,
                     act_ty: tl.constexpr, SUM_PAIRS: tl.constexpr = False):
    """:func:`_epilogue` of the packed input-gradient kernel: ``a = relu(bn(x))`` rounded to
    ``x``'s dtype, ``grad_z = grad_a`` where ``a > 0`` (or NaN) else 0, stored; the sums of
    ``grad_z`` and ``grad_z * (x - mean)`` accumulated per position (the subtraction first,
    as the reference; ``invstd`` is applied to the reduced sum)."""
    xf = xv.to(tl.float32)
    a = bn_relu(xf, scale, shift, mask).to(act_ty)
    gzv = tl.where(a <= 0.0, 0.0, acc.to(act_ty))
    tl.store(gz_ptr + n64 * szn + (h * szh + w * szw)[:, None] + z_c[None, :], gzv, mask=mask)
    gzf = gzv.to(tl.float32)
    if SUM_PAIRS:  # rows m and m + 8 of each 16-row slab added first (sums of shape [BM / 16, 8, channels])
        sdz = sdz + tl.sum(gzf.reshape([gzf.shape[0] // 16, 2, 8, gzf.shape[1]]), axis=1)
        sdzx = sdzx + tl.sum((gzf * (xf - mean[None, :])).reshape([gzf.shape[0] // 16, 2, 8, gzf.shape[1]]), axis=1)
    else:
        sdz = sdz + gzf
        sdzx = sdzx + gzf * (xf - mean[None, :])
    return sdz, sdzx


@triton.jit
def bn_relu_conv_bwd_input_packed_s2_kernel(
    go_ptr, w_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, gz_ptr, psum_ptr,
    C, H, W, CO, HO, WO, CIN_G, COUT_G, KR, NR, TILES_H, TILES_W, NUM_TILES, STEP_W, STEP_H, STEP_N,
    sgn, sgc, sgh, sgw,
    swo, swi, swh, sww,
    sxn, sxc, sxh, sxw,
    szn, szc, szh, szw,
    pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, MMA_EPI: tl.constexpr = False, PAIRS: tl.constexpr = False,
    ONE_ROUND: tl.constexpr = 4,
):
    """``grad_a`` of packed small groups at stride ``(SH, SW)`` (1 or 2 each, not both 1; the
    dilation odd along a stride of 2) as a convolution of its own, by parity decomposition:
    the input positions are tiled per residue class, and the class of tap residue ``(qh, qw)``
    (compile-time: one tile loop per class) is reached by exactly the taps ``kh = qh + SH * j``,
    ``kw = qw + SW * j'`` (3x3, stride 2: 4, 2, 2 and 1 of the 9), each the ``grad_out`` tile at
    a class-position shift (the class's input residue and the shift are scalars per class, no
    runtime division per tile). Per tap one masked ``[positions, BLOCK_N]`` load of
    ``grad_out`` and one MMA with the tap's block-diagonal ``[BLOCK_N, BLOCK_K]`` weights
    (loaded once per program, flipped and transposed by the gather's index arithmetic); a
    class's loads are issued together when it has at most ``ONE_ROUND`` taps (else a kernel
    row's), ``x`` with the last; then :func:`bn_relu_conv_bwd_input_packed_kernel`'s epilogue
    (``MMA_EPI``, ``PAIRS``). Grid ``(splits, group blocks)``; in each class program
    ``(split, gb)`` walks tiles ``split, split + splits, ...`` of the class grid (``TILES_H x
    TILES_W`` tiles of ``ceil(H / SH) x ceil(W / SW)`` class positions per image).

    Non-finite values: as the stride-1 kernel, a program whose ``sum(grad_z)`` is not finite
    recomputes its tiles exactly in the same launch (:func:`_packed_fixup_s2`)."""
    split = tl.program_id(0)
    splits = tl.num_programs(0)
    gblk = tl.program_id(1)
    act_ty = gz_ptr.dtype.element_ty
    SUM_PAIRS: tl.constexpr = PAIRS and (TILE_H * TILE_W) % 16 == 0
    oi, oj, ci, k_ok, scale, shift, mean, x_c, z_c, n_ok, g_c, wt, sdz, sdzx = _packed_prologue(
        gblk, go_ptr, w_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, C, CO, CIN_G, COUT_G, KR, NR, sgc, swo, swi,
        swh, sww, sxc, szc, KH, KW, HAS_GAMMA, HAS_BETA, DOT_F32, EVEN_K, EVEN_N, TILE_H, TILE_W, BLOCK_N, BLOCK_K,
        MMA_EPI, SUM_PAIRS)
    for QH in tl.static_range(SH):
        for QW in tl.static_range(SW):
            # the class's input residue (odd dilation: one per tap residue; SH is 1 or 2, so
            # (qh * dil + pad) % 2 is (qh * dil - pad) mod 2 without a negative operand) and the
            # shift from its class coordinates to the output row of its first tap (exact)
            rh = (QH * dil_h + (SH - 1) * pad_h) % SH
            rw = (QW * dil_w + (SW - 1) * pad_w) % SW
            oh0 = (rh + pad_h - QH * dil_h) // SH
            ow0 = (rw + pad_w - QW * dil_w) // SW
            d_w, d_h, _, _, d_n = tile_digits(split, TILES_W, TILES_H, 1, 1)
            for t in tl.range(split, NUM_TILES, splits, num_stages=1):
                ii = d_h * TILE_H + oi
                jj = d_w * TILE_W + oj
                hh = ii * SH + rh
                ww = jj * SW + rw
                n64 = d_n.to(tl.int64)
                mask = ((hh < H) & (ww < W))[:, None] & k_ok[None, :]
                acc, xv = _class_taps(go_ptr + n64 * sgn, ii, jj, oh0, ow0, g_c, n_ok, wt, HO, WO, sgh, sgw, dil_h,
                                      dil_w, x_ptr + n64 * sxn + (hh * sxh + ww * sxw)[:, None] + x_c[None, :], mask,
                                      QH, QW, KH, KW, SH, SW, BLOCK_K, DOT_F32, ONE_ROUND)
                sdz, sdzx = _packed_epilogue(acc, xv, mask, scale, shift, mean, gz_ptr, n64, hh, ww, szn, szh, szw,
                                             z_c, sdz, sdzx, act_ty, SUM_PAIRS)
                d_w, d_h, d_n = tile_next2(d_w, d_h, d_n, STEP_W, STEP_H, STEP_N, TILES_W, TILES_H)

    tl.debug_barrier()  # the first pass's grad_z stores come before the fix-up's
    row = split.to(tl.int64) * (2 * C)
    if any_nonfinite(sdz):
        _packed_fixup_s2(split, splits, gblk, oi, oj, go_ptr, w_ptr, x_ptr, gz_ptr, mean_ptr, invstd_ptr, gamma_ptr,
                         beta_ptr, psum_ptr + row, C, H, W, CO, HO, WO, CIN_G, COUT_G, KR, NR, TILES_H, TILES_W,
                         NUM_TILES, sgn, sgc, sgh, sgw, swo, swi, swh, sww, sxn, sxc, sxh, sxw, szn, szc, szh, szw,
                         pad_h, pad_w, dil_h, dil_w, HAS_GAMMA, HAS_BETA, KH, KW, SH, SW, TILE_H, TILE_W)
    else:
        _packed_sums_store(psum_ptr, row, C, ci, k_ok, invstd_ptr, sdz, sdzx, SUM_PAIRS)


@triton.jit
def _class_taps(gyb, ii, jj, oh0, ow0, g_c, n_ok, wt, HO, WO, sgh, sgw, dil_h, dil_w, x_ptrs, x_mask,
                QH: tl.constexpr, QW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,
                SW: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, ONE_ROUND: tl.constexpr):
    """``grad_a`` of one tile of residue class ``(QH, QW)`` (class rows ``ii``, columns ``jj``):
    per tap ``kh = QH + SH * a``, ``kw = QW + SW * b`` the ``grad_out`` tile at row ``ii + oh0 -
    a * dil_h``, column ``jj + ow0 - b * dil_w`` (zero outside) times ``wt[kh * KW + kw]``; the
    class's loads issued together when it has at most ``ONE_ROUND`` taps, else a kernel row's,
    and ``x`` with the last: ``(grad_a, x)``."""
    NTH: tl.constexpr = _ntaps(KH, SH, QH)
    NTW: tl.constexpr = _ntaps(KW, SW, QW)
    g_ptr = gyb + ((ii * sgh + jj * sgw)[:, None] + g_c[None, :])  # once per tile; each tap adds a scalar
    acc = tl.zeros([ii.shape[0], BLOCK_K], dtype=tl.float32)
    if NTH * NTW == 0:  # no tap reaches this class: grad_a is 0
        xv = tl.load(x_ptrs, mask=x_mask, other=0.0)
    elif NTH * NTW <= ONE_ROUND:  # every load of the class in one round, then its MMAs
        gys = ()
        for a in tl.static_range(NTH):
            r_ok = (ii + (oh0 - a * dil_h)).to(tl.uint32, bitcast=True) < HO.to(tl.uint32, bitcast=True)
            for b in tl.static_range(NTW):
                c_ok = (jj + (ow0 - b * dil_w)).to(tl.uint32, bitcast=True) < WO.to(tl.uint32, bitcast=True)
                g_mask = (r_ok & c_ok)[:, None] & n_ok[None, :]
                gys = gys + (tl.load(g_ptr + ((oh0 - a * dil_h) * sgh + (ow0 - b * dil_w) * sgw), mask=g_mask,
                                     other=0.0),)
        xv = tl.load(x_ptrs, mask=x_mask, other=0.0)
        for a in tl.static_range(NTH):
            for b in tl.static_range(NTW):
                acc = dot_acc(gys[a * NTW + b], wt[(QH + SH * a) * KW + QW + SW * b], acc, DOT_F32)
    else:  # a kernel row's loads, then its MMAs
        for a in tl.static_range(NTH):
            r_ok = (ii + (oh0 - a * dil_h)).to(tl.uint32, bitcast=True) < HO.to(tl.uint32, bitcast=True)
            gys = ()
            for b in tl.static_range(NTW):
                c_ok = (jj + (ow0 - b * dil_w)).to(tl.uint32, bitcast=True) < WO.to(tl.uint32, bitcast=True)
                g_mask = (r_ok & c_ok)[:, None] & n_ok[None, :]
                gys = gys + (tl.load(g_ptr + ((oh0 - a * dil_h) * sgh + (ow0 - b * dil_w) * sgw), mask=g_mask,
                                     other=0.0),)
            if a == NTH - 1:
                xv = tl.load(x_ptrs, mask=x_mask, other=0.0)
            for b in tl.static_range(NTW):
                acc = dot_acc(gys[b], wt[(QH + SH * a) * KW + QW + SW * b], acc, DOT_F32)
    return acc, xv


@triton.jit
def _packed_fixup_s2(split, splits, gblk, oi, oj, go_ptr, w_ptr, x_ptr, gz_ptr, mean_ptr, invstd_ptr, gamma_ptr,
                     beta_ptr, psum_row, C, H, W, CO, HO, WO, CIN_G, COUT_G, KR, NR, TILES_H, TILES_W, NUM_TILES,
                     sgn, sgc, sgh, sgw, swo, swi, swh, sww, sxn, sxc, sxh, sxw, szn, szc, szh, szw, pad_h, pad_w,
                     dil_h, dil_w, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, KH: tl.constexpr,
                     KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, TILE_H: tl.constexpr,
                     TILE_W: tl.constexpr):
    """:func:`_packed_fixup` of the strided packed input-gradient kernel: program ``split``'s
    tiles of every residue class, one input channel at a time, ``grad_a`` from the channel's own
    group's output channels only (each tap where it reaches the position: ``h + pad - kh * dil``
    a multiple of the stride), ``grad_z`` stored again and the channel's two sums stored at
    ``psum_row``. Cold (0 trips in the static model), register-light."""
    for k in range(0, KR):
        ci, c_ok, g, ci_loc, mean, invstd, scale, shift = _fixup_channel(gblk, k, KR, C, CIN_G, mean_ptr, invstd_ptr,
                                                                         gamma_ptr, beta_ptr, HAS_GAMMA, HAS_BETA)
        s_dz = tl.zeros(oi.shape, dtype=tl.float32)
        s_dzx = tl.zeros(oi.shape, dtype=tl.float32)
        for q in range(0, SH * SW):
            qh = q // SW
            qw = q - qh * SW
            rh = (qh * dil_h + (SH - 1) * pad_h) % SH
            rw = (qw * dil_w + (SW - 1) * pad_w) % SW
            for t in range(split, NUM_TILES, splits):
                f_w, f_h, _, _, f_n = tile_digits(t, TILES_W, TILES_H, 1, 1)
                n64 = f_n.to(tl.int64)
                ii = (f_h * TILE_H + oi) * SH + rh
                jj = (f_w * TILE_W + oj) * SW + rw
                gyb = go_ptr + n64 * sgn
                acc = tl.zeros(ii.shape, dtype=tl.float32)
                for tap in range(0, KH * KW):
                    fh = tap // KW
                    fw = tap - fh * KW
                    nh = ii + (pad_h - fh * dil_h)
                    nw = jj + (pad_w - fw * dil_w)
                    t_ok = (nh >= 0) & (nw >= 0) & (nh % SH == 0) & (nw % SW == 0) & c_ok
                    gi = nh // SH
                    gj = nw // SW
                    t_ok = t_ok & (gi < HO) & (gj < WO)
                    acc = _fixup_group_taps(acc, gyb + gi * sgh + gj * sgw, t_ok, w_ptr, ci_loc * swi, fh * swh,
                                            fw * sww, c_ok, gblk * NR + g * COUT_G, COUT_G, CO, swo, sgc)
                s_dz, s_dzx = _fixup_epilogue(acc, ii, jj, c_ok, H, W, n64, ci, x_ptr, sxn, sxh, sxw, sxc, gz_ptr, szn,
                                              szh, szw, szc, scale, shift, mean, s_dz, s_dzx)
        tl.store(psum_row + ci, tl.sum(s_dz, axis=0), mask=c_ok)
        tl.store(psum_row + C + ci, tl.sum(s_dzx, axis=0) * invstd, mask=c_ok)


@triton.jit
def _fixup_tile(n, ph, pw, th0, tw0, go_ptr, w_ptr, x_ptr, gz_ptr, sgn, sgc, sgh, sgw, swo, swi, swh, sww, sxn, sxh,
                sxw, szn, szh, szw, x_c, z_c, k_ok, scale, shift, mean, invstd, gblk, gk, ci_loc, NR, CO, COUT_G, H,
                W, HO, WO, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, oi, oj, c_kw, sdz, sdzx,
                act_ty: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr):
    """The packed kernel's exact fix-up of one tile (image ``n``, residue class ``(ph, pw)``,
    first row and column ``th0``, ``tw0`` in the class's grid): ``grad_a`` with each input
    channel seeing only its own group's output channels, one FMA per (tap, output channel of
    the group), runtime stride; ``grad_z`` stored again and the BN-gradient sums accumulated."""
    KHW: tl.constexpr = KH * KW
    n64, ph, pw, ii, jj, h, w, m_ok, mask, xv, a, col_ok, col_off = _tile(
        n, ph, pw, th0, tw0, x_ptr, sxn, sxh, sxw, sgw, x_c, k_ok, scale, shift, oi, oj, H, W, WO, stride_h,
        stride_w, pad_w, dil_w, c_kw, act_ty, KW)
    gyb = go_ptr + n64 * sgn
    acc = tl.zeros(xv.shape, dtype=tl.float32)
    for tap in range(0, KHW):
        fh = tap // KW
        fw = tap - fh * KW
        oh = ph + pad_h - fh * dil_h + stride_h * ((KH - 1) * dil_h)
        ow = pw + pad_w - fw * dil_w + stride_w * ((KW - 1) * dil_w)
        fho = ii + (oh // stride_h - (KH - 1) * dil_h)
        fwo = jj + (ow // stride_w - (KW - 1) * dil_w)
        t_ok = m_ok & (oh % stride_h == 0) & (ow % stride_w == 0) & (fho >= 0) & (fho < HO) & (fwo >= 0) & \
            (fwo < WO)
        for j in range(0, COUT_G):
            co = gblk * NR + gk * COUT_G + j
            co_ok = k_ok & (co < CO)
            gyf = tl.load(gyb + (fho * sgh + fwo * sgw)[:, None] + (co * sgc)[None, :],
                          mask=t_ok[:, None] & co_ok[None, :], other=0.0).to(tl.float32)
            wf = tl.load(w_ptr + co * swo + ci_loc * swi + fh * swh + fw * sww, mask=co_ok, other=0.0).to(tl.float32)
            acc += gyf * wf[None, :]
    return _epilogue(acc, a, xv, mask, mean, invstd, gz_ptr, n64, h, w, szn, szh, szw, z_c, sdz, sdzx, act_ty)


@triton.jit
def _magic(d):
    """``ceil(2**31 / d)`` as uint32, for :func:`_divmod_magic` by ``d >= 1``."""
    return tl.cast(2147483647, tl.uint32) // tl.cast(d, tl.uint32) + 1  # one 32-bit division per program


@triton.jit
def _divmod_magic(t, d, mag):
    """``(t // d, t % d)`` for ``0 <= t`` and ``t * d < 2**31`` (the host checks the tile grid):
    ``mag = ceil(2**31 / d) = (2**31 + e) / d`` with ``0 <= e < d``, so ``2 t mag / 2**32 = t / d
    + t e / (d 2**31)`` and the error term stays below the ``1 / d`` gap to the next integer.
    One multiply-high and one multiply-add instead of a runtime division's about twenty
    instructions."""
    q = tl.where(d == 1, t, tl.umulhi(tl.cast(t, tl.uint32) * 2, mag).to(tl.int32))  # folds when d is a constant 1
    return q, t - q * d


@triton.jit
def _tile_digits_magic(t, R0, M0, R1, M1, R2, R3):
    """:func:`resfast.kernels.triton.bn_relu.tile_digits` with the divisions by ``R0`` and ``R1``
    (the tile grid) by :func:`_divmod_magic` (``M0 = _magic(R0)``, ``M1 = _magic(R1)``)."""
    r, d0 = _divmod_magic(t, R0, M0)
    r, d1 = _divmod_magic(r, R1, M1)
    d2 = r % R2
    r = r // R2
    return d0, d1, d2, r % R3, r // R3


@triton.jit
def _put(tup, i: tl.constexpr, u, v, DOT_F32: tl.constexpr):
    """``tup`` with its element ``i`` (an accumulator) plus ``u @ v``."""
    return tup[:i] + (dot_acc(u, v, tup[i], DOT_F32),) + tup[i + 1:]


@triton.constexpr_function
def _ntaps(k, s, q):
    """Taps ``t = q + s * j`` of a ``k``-wide kernel (residue ``q`` of stride ``s``)."""
    return max(0, (k - q + s - 1) // s)


@triton.constexpr_function
def _tap_cap(block_n):
    """Taps per chunk of the class path: a ``[positions, taps * BLOCK_N]`` output-gradient load
    at most 64 channels wide."""
    return max(1, 64 // block_n)


@triton.constexpr_function
def _chunks(n, cap):
    """``[(first tap, taps)]``: ``n`` taps cut into powers of two, the largest first, at most ``cap``."""
    out, start = [], 0
    while start < n:
        size = 1
        while size * 2 <= min(n - start, cap):
            size *= 2
        out.append((start, size))
        start += size
    return out


@triton.constexpr_function
def _nchunks(n, cap):
    """Chunks of ``n`` taps: powers of two, the largest first, at most ``cap`` each."""
    return len(_chunks(n, cap))


@triton.constexpr_function
def _chunk_size(n, cap, i):
    return _chunks(n, cap)[i][1]


@triton.constexpr_function
def _chunk_start(n, cap, i):
    return _chunks(n, cap)[i][0]


@triton.constexpr_function
def _chunk_index(kh, kw, sh, sw, cap, qh, qw, i):
    """Index of class ``(qh, qw)``'s chunk ``i`` among all classes' chunks (classes row-major)."""
    return i + sum(len(_chunks(_ntaps(kh, sh, a) * _ntaps(kw, sw, b), cap))
                   for a in range(sh) for b in range(sw) if (a, b) < (qh, qw))


@triton.jit
def _class_chunk(qh: tl.constexpr, qw: tl.constexpr, i: tl.constexpr, nc, gblk, NR, CO, COUT_G, gk, ci_loc, k_ok, pad_h,
                 pad_w, dil_h, dil_w, swo, swi, swh, sww, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,
                 SW: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, TAP_CAP: tl.constexpr):
    """Chunk ``i`` of residue class ``(qh, qw)``'s taps (``kh = qh + SH * j``, ``kw = qw + SW * j'``,
    ``(j, j')`` row-major), stacked with output-channel chunk ``nc``'s channels: per row ``(tap, co)`` of the
    ``[taps * BLOCK_N, BLOCK_K]`` weight tile its channel, validity, the block-diagonal mask,
    the weight offsets, the tap, and the shift from an input position's class coordinates
    ``(ii, jj)`` to the output position the tap reaches (``(h + pad - kh * dil) / SH``, exact)."""
    NWQ: tl.constexpr = _ntaps(KW, SW, qw)
    NT: tl.constexpr = _ntaps(KH, SH, qh) * NWQ
    P: tl.constexpr = _chunk_size(NT, TAP_CAP, i)
    T0: tl.constexpr = _chunk_start(NT, TAP_CAP, i)
    c = tl.arange(0, P * BLOCK_N)
    tap = T0 + c // BLOCK_N
    jh = tap // NWQ
    jw = tap - jh * NWQ
    kh = qh + SH * jh
    kw = qw + SW * jw
    n_loc = nc * BLOCK_N + c % BLOCK_N
    co = gblk * NR + n_loc
    if EVEN_N:
        n_ok = tl.full([P * BLOCK_N], 1, tl.int1)
    else:
        n_ok = (n_loc < NR) & (co < CO)
    keep = ((n_loc // COUT_G)[:, None] == gk[None, :]) & n_ok[:, None] & k_ok[None, :]
    w_off = (co * swo + kh * swh + kw * sww)[:, None] + (ci_loc * swi)[None, :]
    ph = (qh * dil_h + (SH - 1) * pad_h) % SH
    pw = (qw * dil_w + (SW - 1) * pad_w) % SW
    dh = (ph + pad_h - qh * dil_h) // SH - jh * dil_h
    dw = (pw + pad_w - qw * dil_w) // SW - jw * dil_w
    return co, n_ok, keep, w_off, kh, kw, dh, dw


@triton.jit
def bn_relu_conv_bwd_input_kernel(
    go_ptr, w_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, gz_ptr, psum_ptr, a_ptr,
    C, H, W, CO, HO, WO, KR, NR, KSUB, NSUB, NCB, SPLITS, TILES_H, TILES_W, NUM_TILES, NB, CIN_G,
    sgn, sgc, sgh, sgw,
    swo, swi, swh, sww,
    sxn, sxc, sxh, sxw,
    szn, szc, szh, szw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, step_h, step_w, dstep_h, dstep_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, STAGES: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr = False, SAVE_A: tl.constexpr = False,
):
    """``grad_a`` of a group wider than one tile (one group per block, no packing), then the
    epilogue of :func:`bn_relu_conv_bwd_kernel` (``grad_z`` and the BN-gradient partials).

    The reduction over ``(output-channel chunk, kernel row, kernel column)`` is one flattened,
    software-pipelined loop (``STAGES``): each step multiplies the output gradient at one tap's
    shifted positions ``[TILE_H * TILE_W, BLOCK_N]`` by that tap's weights ``[BLOCK_N,
    BLOCK_K]``, both loaded asynchronously into shared memory ahead of their MMA, so the
    weights are never staged through registers and the next steps' loads overlap this one's
    MMA. A tile of residue class ``(h % stride, w % stride)`` walks only the taps that reach it
    (``kh = kh0 + j * step_h``; ``step = stride / gcd(stride, dilation)``, which moves the
    output row by ``dstep = step * dilation / stride``). The BN-gradient sums
    are reduced over each tile's rows (1-D accumulators), not kept per position: the
    accumulator of a 128 x 128 tile already takes 64 registers per thread. ``SAVE_A``: the
    activations ``a = relu(bn(x))`` its epilogue forms for ``dReLU`` are also stored
    (``a_ptr``, laid out as ``grad_z``: channels-last) for the weight
    gradient's TMA path (:func:`resfast.kernels.triton.bn_relu_conv_wgrad.bn_relu_conv_bwd_weight_tma_kernel`)."""
    pid = tl.program_id(0)
    cb = pid % NCB
    split = pid // NCB
    act_ty = gz_ptr.dtype.element_ty
    BM: tl.constexpr = TILE_H * TILE_W
    kk = tl.arange(0, BLOCK_K)
    nn = tl.arange(0, BLOCK_N)
    m = tl.arange(0, BM)
    oi = m // TILE_W
    oj = m % TILE_W

    gblk = cb // KSUB
    k_loc = (cb % KSUB) * BLOCK_K + kk  # a group's own input channels (no packing: CIN_G == KR)
    ci, k_ok, scale, shift = channel_block(k_loc, gblk, KR, C, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA,
                                           HAS_BETA, EVEN_K, BLOCK_K)
    mean = tl.load(mean_ptr + ci, mask=k_ok, other=0.0)
    invstd = tl.load(invstd_ptr + ci, mask=k_ok, other=0.0)
    w_k = k_loc * swi
    co0 = gblk * NR
    sdz = tl.zeros([BLOCK_K], dtype=tl.float32)
    sdzx = tl.zeros([BLOCK_K], dtype=tl.float32)
    if TMA:  # the operands by the copy engine: what lies outside the tensors is zero-filled
        gy_desc = tl.make_tensor_descriptor(go_ptr, shape=[NB, HO, WO, CO], strides=[sgn, sgh, sgw, 1],
                                            block_shape=[1, TILE_H, TILE_W, BLOCK_N])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[CO, KH, KW, CIN_G], strides=[swo, swh, sww, 1],
                                           block_shape=[BLOCK_N, 1, 1, BLOCK_K])
        k0 = (cb % KSUB) * BLOCK_K

    for t in tl.range(split, NUM_TILES, SPLITS, num_stages=1):
        rest, th0, tw0 = tile_origin(t, TILES_H, TILES_W, TILE_H, TILE_W)
        pw = rest % stride_w
        rest = rest // stride_w
        ph = rest % stride_h
        n64 = (rest // stride_h).to(tl.int64)
        ii = th0 + oi
        jj = tw0 + oj
        # the first kernel row / column that reaches this residue class (KH / KW: none), and
        # how many do (every step-th after it)
        kh0 = _first_tap(ph, pad_h, dil_h, stride_h, KH)
        kw0 = _first_tap(pw, pad_w, dil_w, stride_w, KW)
        nkh = tl.where(kh0 < KH, (KH - 1 - kh0) // step_h + 1, 0)
        nkw = tl.where(kw0 < KW, (KW - 1 - kw0) // step_w + 1, 0)
        # output row of input row h = ii * stride + ph under kernel row kh:
        # (h + pad - kh * dil) / stride, exact for a tap of this class (offsets kept
        # non-negative so // is exact); each next tap of the class moves it by dstep
        dh0 = (ph + pad_h - kh0 * dil_h + stride_h * (KH * dil_h)) // stride_h - KH * dil_h
        dw0 = (pw + pad_w - kw0 * dil_w + stride_w * (KW * dil_w)) // stride_w - KW * dil_w
        gyb = go_ptr + n64 * sgn
        acc = tl.zeros([BM, BLOCK_K], dtype=tl.float32)
        # (chunk, kernel row, kernel column) of a step: counters carried across the steps (the
        # class's tap counts are runtime values: no division per step)
        nc = 0
        j = 0
        i = 0
        for it in tl.range(0, NSUB * nkh * nkw, num_stages=STAGES):
            kh = kh0 + j * step_h
            kw = kw0 + i * step_w
            dh = dh0 - j * dstep_h
            dw = dw0 - i * dstep_w
            if TMA:
                gy = gy_desc.load([(rest // stride_h), th0 + dh, tw0 + dw, co0 + nc * BLOCK_N]).reshape(BM, BLOCK_N)
                wv = w_desc.load([co0 + nc * BLOCK_N, kh, kw, k0]).reshape(BLOCK_N, BLOCK_K)
                acc = dot_acc(gy, wv, acc, DOT_F32)
            else:
                acc = _wide_step(acc, gyb, w_ptr, ii, jj, dh, dw, kh, kw, nc, nn, co0, w_k, k_ok, NR, CO, HO, WO, sgc,
                                 sgh, sgw, swo, swh, sww, EVEN_N, DOT_F32, BLOCK_N)
            i += 1
            wrap = i == nkw
            i = tl.where(wrap, 0, i)
            j = tl.where(wrap, j + 1, j)
            wrap = j == nkh
            j = tl.where(wrap, 0, j)
            nc = tl.where(wrap, nc + 1, nc)
        h = ii * stride_h + ph
        w = jj * stride_w + pw
        m_ok = (h < H) & (w < W)
        mask = m_ok[:, None] & k_ok[None, :]
        xv = tl.load(x_ptr + n64 * sxn + (h * sxh + w * sxw)[:, None] + (ci * sxc)[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        a = bn_relu(xv, scale, shift, mask).to(act_ty)
        z_off = n64 * szn + (h * szh + w * szw)[:, None] + (ci * szc)[None, :]
        if SAVE_A:  # a buffer laid out as grad_z: the same offsets
            tl.store(a_ptr + z_off, a, mask=mask)
        gzv = tl.where(a.to(tl.float32) <= 0.0, 0.0, acc).to(act_ty)
        tl.store(gz_ptr + z_off, gzv, mask=mask)
        gzf = tl.where(mask, gzv.to(tl.float32), 0.0)
        sdz += tl.sum(gzf, axis=0)
        sdzx += tl.sum(gzf * ((xv - mean[None, :]) * invstd[None, :]), axis=0)

    row = split.to(tl.int64) * (2 * C)
    tl.store(psum_ptr + row + ci, sdz, mask=k_ok)
    tl.store(psum_ptr + row + C + ci, sdzx, mask=k_ok)


@triton.jit
def _wide_step(acc, gyb, w_ptr, ii, jj, dh, dw, kh, kw, nc, nn, co0, w_k, k_ok, NR, CO, HO, WO, sgc, sgh, sgw, swo, swh,
               sww, EVEN_N: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr):
    """One step of :func:`bn_relu_conv_bwd_input_kernel`'s loop by masked loads: ``acc +`` the
    output gradient at the tap's shifted positions times the tap's weights (chunk ``nc``)."""
    gho = ii + dh
    gwo = jj + dw
    row_ok = (gho >= 0) & (gho < HO) & (gwo >= 0) & (gwo < WO)
    n_loc = nc * BLOCK_N + nn
    co = co0 + n_loc
    if EVEN_N:
        g_mask = row_ok[:, None]
        w_mask = k_ok[None, :]
    else:
        n_ok = (n_loc < NR) & (co < CO)
        g_mask = row_ok[:, None] & n_ok[None, :]
        w_mask = n_ok[:, None] & k_ok[None, :]
    gy = tl.load(gyb + (gho * sgh + gwo * sgw)[:, None] + (co * sgc)[None, :], mask=g_mask, other=0.0)
    wv = tl.load(w_ptr + (co * swo + kh * swh + kw * sww)[:, None] + w_k[None, :], mask=w_mask, other=0.0)
    return dot_acc(gy, wv, acc, DOT_F32)


@triton.jit
def bn_relu_conv_bwd_weight_kernel(
    go_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, pgw_ptr, pgb_ptr,
    C, H, W, CO, HO, WO, CIN_G, KR, NR, KSUB, NSUB, NCB, SPLITS, TILES_H, TILES_W, NUM_TILES,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, KW_P: tl.constexpr, DO_GB: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``grad_weight`` (and ``grad_bias``) partials of a group wider than one tile, over the
    *output* positions, any stride: each output tile's gradient ``[TILE_H * TILE_W, BLOCK_N]``
    is loaded once and, for each kernel row ``kh``, multiplies the activations its ``KW``
    taps read, side by side (``[positions, KW_P * BLOCK_K]``, normalised and ReLU'd on the
    fly), into one ``[BLOCK_N, KW_P * BLOCK_K]`` accumulator per kernel row that lives across
    the program's tiles. With a stride every tap of every output position is a real product:
    nothing is spent on the taps that do not reach an input residue class. Programs are
    persistent as in :func:`bn_relu_conv_bwd_kernel`; row ``split`` of the float32 partials."""
    pid = tl.program_id(0)
    cb = pid % NCB
    split = pid // NCB
    act_ty = go_ptr.dtype.element_ty
    BM: tl.constexpr = TILE_H * TILE_W
    GK: tl.constexpr = KW_P * BLOCK_K  # the stacked (kw, input channel) axis of one kernel row
    KHW: tl.constexpr = KH * KW
    m = tl.arange(0, BM)
    oi = m // TILE_W
    oj = m % TILE_W
    nn = tl.arange(0, BLOCK_N)
    c = tl.arange(0, GK)
    c_kw = c // BLOCK_K
    c_k = c % BLOCK_K

    gblk = cb // (KSUB * NSUB)
    ksub = (cb // NSUB) % KSUB
    nc = cb % NSUB
    k_loc = ksub * BLOCK_K + c_k  # a group's own input channels (no packing: CIN_G == KR)
    ci = gblk * KR + k_loc
    if EVEN_K:
        kc_ok = c_kw < KW
    else:
        kc_ok = (k_loc < KR) & (ci < C) & (c_kw < KW)
    scale, shift = bn_params(ci, kc_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA, HAS_BETA)
    n_loc = nc * BLOCK_N + nn
    co = gblk * NR + n_loc
    if EVEN_N:
        n_ok = tl.full([BLOCK_N], 1, tl.int1)
    else:
        n_ok = (n_loc < NR) & (co < CO)
    x_c = (ci * sxc)[None, :]
    wi_c = (c_kw * dil_w)[None, :]
    gw = (tl.zeros([BLOCK_N, GK], dtype=tl.float32),) * KH
    gb = tl.zeros([BLOCK_N], dtype=tl.float32)

    for t in tl.range(split, NUM_TILES, SPLITS, num_stages=1):
        n, th0, tw0 = tile_origin(t, TILES_H, TILES_W, TILE_H, TILE_W)
        n64 = n.to(tl.int64)
        ho = th0 + oi
        wo = tw0 + oj
        m_ok = (ho < HO) & (wo < WO)
        gy = tl.load(go_ptr + n64 * sgn + (ho * sgh + wo * sgw)[:, None] + (co * sgc)[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if DO_GB:
            gb += tl.sum(gy.to(tl.float32), axis=0)
        gyt = tl.trans(gy)
        wi = (wo * stride_w - pad_w)[:, None] + wi_c
        col_ok = m_ok[:, None] & (wi >= 0) & (wi < W) & kc_ok[None, :]
        xb = x_ptr + n64 * sxn
        col_off = wi * sxw + x_c
        for kh in tl.static_range(KH):
            hi = ho * stride_h + (kh * dil_h - pad_h)
            mask = col_ok & ((hi >= 0) & (hi < H))[:, None]
            xv = tl.load(xb + (hi * sxh)[:, None] + col_off, mask=mask, other=0.0).to(tl.float32)
            a = bn_relu(xv, scale, shift, mask).to(act_ty)
            gw = gw[:kh] + (dot_acc(gyt, a, gw[kh], DOT_F32),) + gw[kh + 1:]

    # row co and column (kw, ci) of kernel row kh -> grad_weight[co, ci_local, kh, kw]
    base = split.to(tl.int64) * (CO * CIN_G * KHW)
    col = (co.to(tl.int64) * (CIN_G * KHW))[:, None] + (k_loc * KHW + c_kw)[None, :]
    keep = n_ok[:, None] & kc_ok[None, :]
    for kh in tl.static_range(KH):
        tl.store(pgw_ptr + base + col + kh * KW, gw[kh], mask=keep)
    if DO_GB:
        if ksub == 0:
            tl.store(pgb_ptr + split * CO + co, gb, mask=n_ok)


@triton.jit
def bn_relu_conv_bwd_weight_s1_kernel(
    go_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, pgw_ptr, pgb_ptr,
    C, H, W, CO, HO, WO, CIN_G, KR, NR, KSUB, NSUB, NCB, SPLITS, TILES_H, TILES_W, NUM_TILES, P_OUT,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, KW_A: tl.constexpr, KW_B: tl.constexpr, DO_GB: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_T: tl.constexpr = False,
):
    """``grad_weight`` (and ``grad_bias``) partials of a group wider than one tile at stride 1,
    over the *input* positions: each input tile's activations ``[TILE_H * TILE_W, BLOCK_K]``
    are normalised once and, for each kernel row ``kh``, multiplied by the output gradient at
    the positions its taps reach, the taps side by side. The ``KW`` taps of a row are cut into
    two power-of-two stacks, ``KW_A`` and ``KW_B`` (3 = 2 + 1), so no MMA row is spent on a
    padded fourth tap: accumulators ``[KW_A * BLOCK_N, BLOCK_K]`` and ``[KW_B * BLOCK_N,
    BLOCK_K]`` per kernel row, living across the program's tiles; ``ACC_T``: transposed,
    ``[BLOCK_K, KW_A * BLOCK_N]`` (the input channels the MMA's M, the stacked taps its N, which
    needs no padding to 64 rows: 32 output channels stack 64 + 32 wide). Programs are
    persistent as in :func:`bn_relu_conv_bwd_kernel`; row ``split`` of the float32 partials."""
    pid = tl.program_id(0)
    cb = pid % NCB
    split = pid // NCB
    act_ty = go_ptr.dtype.element_ty
    BM: tl.constexpr = TILE_H * TILE_W
    KHW: tl.constexpr = KH * KW
    m = tl.arange(0, BM)
    oi = m // TILE_W
    oj = m % TILE_W
    kk = tl.arange(0, BLOCK_K)

    gblk = cb // (KSUB * NSUB)
    ksub = (cb // NSUB) % KSUB
    nc = cb % NSUB
    k_loc = ksub * BLOCK_K + kk  # a group's own input channels (no packing: CIN_G == KR)
    ci, k_ok, scale, shift = channel_block(k_loc, gblk, KR, C, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA,
                                           HAS_BETA, EVEN_K, BLOCK_K)
    x_c = ci * sxc
    co_a, ok_a, kw_a = _tap_stack(0, KW_A, gblk, nc, NR, CO, EVEN_N, BLOCK_N)
    if ACC_T:
        gw_a = (tl.zeros([BLOCK_K, KW_A * BLOCK_N], dtype=tl.float32),) * KH
    else:
        gw_a = (tl.zeros([KW_A * BLOCK_N, BLOCK_K], dtype=tl.float32),) * KH
    if KW_B > 0:
        co_b, ok_b, kw_b = _tap_stack(KW_A, KW_B, gblk, nc, NR, CO, EVEN_N, BLOCK_N)
        if ACC_T:
            gw_b = (tl.zeros([BLOCK_K, KW_B * BLOCK_N], dtype=tl.float32),) * KH
        else:
            gw_b = (tl.zeros([KW_B * BLOCK_N, BLOCK_K], dtype=tl.float32),) * KH

    for t in tl.range(split, NUM_TILES, SPLITS, num_stages=1):
        n, th0, tw0 = tile_origin(t, TILES_H, TILES_W, TILE_H, TILE_W)
        n64 = n.to(tl.int64)
        h = th0 + oi
        w = tw0 + oj
        m_ok = (h < H) & (w < W)
        mask = m_ok[:, None] & k_ok[None, :]
        xv = tl.load(x_ptr + n64 * sxn + (h * sxh + w * sxw)[:, None] + x_c[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        a = bn_relu(xv, scale, shift, mask).to(act_ty)
        gyb = go_ptr + n64 * sgn
        # output column of input column w under tap kw: w + pad - kw * dil
        wo_a = w[:, None] + (pad_w - kw_a * dil_w)[None, :]
        col_a = m_ok[:, None] & (wo_a >= 0) & (wo_a < WO) & ok_a[None, :]
        off_a = wo_a * sgw + (co_a * sgc)[None, :]
        if KW_B > 0:
            wo_b = w[:, None] + (pad_w - kw_b * dil_w)[None, :]
            col_b = m_ok[:, None] & (wo_b >= 0) & (wo_b < WO) & ok_b[None, :]
            off_b = wo_b * sgw + (co_b * sgc)[None, :]
        for kh in tl.static_range(KH):
            ho = h + (pad_h - kh * dil_h)
            row_ok = ((ho >= 0) & (ho < HO))[:, None]
            row = (ho * sgh)[:, None]
            gy = tl.load(gyb + row + off_a, mask=col_a & row_ok, other=0.0)
            if ACC_T:
                gw_a = gw_a[:kh] + (dot_acc(tl.trans(a), gy, gw_a[kh], DOT_F32),) + gw_a[kh + 1:]
            else:
                gw_a = gw_a[:kh] + (dot_acc(tl.trans(gy), a, gw_a[kh], DOT_F32),) + gw_a[kh + 1:]
            if KW_B > 0:
                gy = tl.load(gyb + row + off_b, mask=col_b & row_ok, other=0.0)
                if ACC_T:
                    gw_b = gw_b[:kh] + (dot_acc(tl.trans(a), gy, gw_b[kh], DOT_F32),) + gw_b[kh + 1:]
                else:
                    gw_b = gw_b[:kh] + (dot_acc(tl.trans(gy), a, gw_b[kh], DOT_F32),) + gw_b[kh + 1:]

    # row (kw, co) and column ci of kernel row kh -> grad_weight[co, ci_local, kh, kw]
    base = split.to(tl.int64) * (CO * CIN_G * KHW)
    _store_stack(pgw_ptr + base, gw_a, co_a, ok_a, kw_a, k_loc, k_ok, CIN_G, KH, KW, ACC_T)
    if KW_B > 0:
        _store_stack(pgw_ptr + base, gw_b, co_b, ok_b, kw_b, k_loc, k_ok, CIN_G, KH, KW, ACC_T)
    if DO_GB:
        if ksub == 0:
            _bias_partials(go_ptr, pgb_ptr, nc, gblk, NR, CO, HO, WO, P_OUT, split, SPLITS, m, sgn, sgc, sgh, sgw,
                           BM, BLOCK_N)


@triton.jit
def _bias_partials(go_ptr, pgb_ptr, nc, gblk, NR, CO, HO, WO, P_OUT, split, SPLITS, m, sgn, sgc, sgh, sgw,
                   BM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split ``split``'s float32 partial of ``grad_bias`` (the sum of ``grad_out`` over the
    output positions, flat rows of ``m``'s width) for output-channel chunk ``nc`` of group
    block ``gblk``, into row ``split`` of ``pgb`` (``m = arange(0, BM)``)."""
    n_loc = nc * BLOCK_N + tl.arange(0, BLOCK_N)
    co = gblk * NR + n_loc
    n_ok = (n_loc < NR) & (co < CO)
    gb = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(split * BM, P_OUT, SPLITS * BM):
        r = r0 + m
        wo_ = r % WO
        q = r // WO
        row_off = (q // HO).to(tl.int64) * sgn + (q % HO) * sgh + wo_ * sgw
        gyr = tl.load(go_ptr + row_off[:, None] + (co.to(tl.int64) * sgc)[None, :],
                      mask=(r < P_OUT)[:, None] & n_ok[None, :], other=0.0)
        gb += tl.sum(gyr.to(tl.float32), axis=0)
    tl.store(pgb_ptr + split * CO + co, gb, mask=n_ok)


@triton.jit
def _store_stack(pgw_ptr, gw, co, ok, kw, k_loc, k_ok, CIN_G, KH: tl.constexpr, KW: tl.constexpr,
                 ACC_T: tl.constexpr):
    """Store one tap stack's accumulators (one per kernel row ``kh``; rows ``(kw, co)`` and
    columns ``ci``, or transposed with ``ACC_T``) to ``grad_weight[co, ci_local, kh, kw]``."""
    KHW: tl.constexpr = KH * KW
    if ACC_T:
        col = (k_loc * KHW)[:, None] + (co.to(tl.int64) * (CIN_G * KHW) + kw)[None, :]
        keep = k_ok[:, None] & ok[None, :]
    else:
        col = (co.to(tl.int64) * (CIN_G * KHW) + kw)[:, None] + (k_loc * KHW)[None, :]
        keep = ok[:, None] & k_ok[None, :]
    for kh in tl.static_range(KH):
        tl.store(pgw_ptr + col + kh * KW, gw[kh], mask=keep)


@triton.jit
def _tap_stack(kw0, NKW: tl.constexpr, gblk, nc, NR, CO, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr):
    """The stacked ``(kw, output channel)`` axis of taps ``kw0 .. kw0 + NKW - 1`` and output
    chunk ``nc``: channel, validity and tap of each of its ``NKW * BLOCK_N`` rows."""
    r = tl.arange(0, NKW * BLOCK_N)
    n_loc = nc * BLOCK_N + r % BLOCK_N
    co = gblk * NR + n_loc
    if EVEN_N:
        ok = tl.full([NKW * BLOCK_N], 1, tl.int1)
    else:
        ok = (n_loc < NR) & (co < CO)
    return co, ok, kw0 + r // BLOCK_N


@triton.jit
def _first_tap(p, pad, dil, stride, K: tl.constexpr):
    """The first ``k`` in ``[0, K)`` with ``(p + pad - k * dil) % stride == 0`` (``K`` if none):
    the first kernel row (column) that reaches input residue ``p``."""
    first = K
    for k in tl.static_range(K - 1, -1, -1):
        hit = (p + pad - k * dil + stride * (K * dil)) % stride == 0
        first = tl.where(hit, k, first)
    return first


@triton.jit
def _tile(n, ph, pw, th0, tw0, x_ptr, sxn, sxh, sxw, sgw, x_c, k_ok, scale, shift, oi, oj, H, W, WO, stride_h, stride_w,
          pad_w, dil_w, c_kw, act_ty: tl.constexpr, KW: tl.constexpr):
    """The tile of image ``n``'s residue class ``(ph, pw)`` (``h % stride``, ``w % stride``)
    whose first row and column in the class's grid are ``th0``, ``tw0``: its positions, ``x``
    and ``a = relu(bn(x))`` (rounded to ``x``'s dtype), and the stacked ``kw`` columns'
    validity and ``grad_out`` column offsets."""
    n64 = n.to(tl.int64)
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
    gradient through), stored; the BN-gradient sums accumulated element-wise, ``xhat = (x -
    mean) * invstd``: the subtraction first, as the reference, since ``x * invstd - mean *
    invstd`` cancels ``|mean| / std`` times the rounding of ``x * invstd`` (a channel at
    mean 1e4, std 1 lost ``sum(grad_z * xhat)`` to 80x the float64 rule). ``a`` is 0 wherever
    ``mask`` is false (:func:`bn_relu`), so ``grad_z`` is too: no second mask for the sums."""
    gzv = tl.where(a.to(tl.float32) <= 0.0, 0.0, acc).to(act_ty)
    tl.store(gz_ptr + n64 * szn + (h * szh + w * szw)[:, None] + z_c[None, :], gzv, mask=mask)
    gzf = gzv.to(tl.float32)
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
    go_ptr, CIN_G, NIMG, H, W, HO, WO, sgn, sgc, sgh, sgw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_GB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    PAD_NAN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, CPB: tl.constexpr,
):
    """Sum the float32 partials over their ``SPLITS`` rows in a fixed order. Program ranges:
    ``[0, NB_GW)`` ``grad_weight`` (written in its dtype), then ``NB_GB`` programs
    ``grad_bias``, then ``NB_C`` each for ``sum(grad_z)`` and ``sum(grad_z * xhat)`` (the two
    halves of the ``[SPLITS, 2C]`` partials).

    ``PAD_NAN`` (a conv with padding): each ``grad_weight`` program takes ``CPB`` columns, whole
    ``(co, ci)`` units of ``KH * KW`` taps (a multiple of 4 too: 16-byte loads) and, only when
    one of its sums is not finite, stores NaN wherever eager's sum over the zero padding meets a
    non-finite ``grad_out`` (see :func:`_reduce_weight_rows`); the weight-gradient kernels never
    visit the padding."""
    pid = tl.program_id(0)
    if pid < NB_GW:
        if PAD_NAN:
            _reduce_weight_rows(pgw_ptr, gw_ptr, pid, N_GW, SPLITS_W, go_ptr, CIN_G, NIMG, H, W, HO, WO, sgn, sgc,
                                sgh, sgw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, BLOCK_S, BLOCK_C, KH, KW,
                                CPB)
        else:
            _reduce_rows(pgw_ptr, gw_ptr, pid, N_GW, N_GW, SPLITS_W, BLOCK_S, BLOCK_C)
    elif pid < NB_GW + NB_GB:
        if HAS_GB:
            _reduce_rows(pgb_ptr, gb_ptr, pid - NB_GW, N_GB, N_GB, SPLITS_W, BLOCK_S, BLOCK_C)
    elif pid < NB_GW + NB_GB + NB_C:
        _reduce_rows(psum_ptr, sdz_ptr, pid - NB_GW - NB_GB, C, 2 * C, SPLITS_S, BLOCK_S, BLOCK_C)
    else:
        _reduce_rows(psum_ptr + C, sdzx_ptr, pid - NB_GW - NB_GB - NB_C, C, 2 * C, SPLITS_S, BLOCK_S, BLOCK_C)


@triton.jit
def _reduce_weight_rows(pgw_ptr, gw_ptr, blk, N_GW, SPLITS, go_ptr, CIN_G, NIMG, H, W, HO, WO, sgn, sgc, sgh, sgw,
                        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                        CPB: tl.constexpr):
    """:func:`_reduce_rows` of ``grad_weight`` (flat ``[co, ci_local, kh, kw]``) over whole
    ``(co, ci)`` units: program ``blk`` sums columns ``blk * CPB ..`` (``CPB``: whole units of
    ``KH * KW`` columns, a multiple of 4 so that the loads stay 16-byte vectors, at most
    ``BLOCK_C``; with 27 columns of 32 the loads were scalar, 40 -> 64 registers), then NaN over
    the padded taps of a non-finite ``grad_out``, as eager.

    Eager's ``grad_weight[co, ci, kh, kw]`` sums ``grad_out[n, co, p] * a_padded[n, ci, p + tap]``
    over the output positions ``p``, the zero padding included, where ``0 * NaN`` (or ``0 *
    inf``) is NaN; the weight-gradient kernels sum over the input positions only. A non-finite
    ``grad_out[n, co, p]`` with a tap inside the image makes that tap's sum, in the same unit as
    every padded tap of ``(co, ci)``, not finite; so only a program holding a sum that is not
    finite can owe a NaN (the finite path pays one reduction). That program (cold,
    :func:`_pad_nan_columns`) tests every output position whose tap reads the padding and
    stores NaN where ``grad_out`` is not finite there: exactly eager's NaN pattern. Not
    covered: a non-finite ``grad_out`` at an output none of whose taps is inside the image
    (padding at least the kernel's extent), which reaches no sum."""
    j = tl.arange(0, BLOCK_C)
    cols = blk * CPB + j
    c_ok = (j < CPB) & (cols < N_GW)
    tot = _sum_rows(pgw_ptr, cols, c_ok, N_GW, SPLITS, BLOCK_S, BLOCK_C)
    tl.store(gw_ptr + cols, tot.to(gw_ptr.dtype.element_ty), mask=c_ok)
    if tl.max(((tot - tot) != 0.0).to(tl.int32), axis=0) != 0:  # a sum that is not finite (masked: 0)
        _pad_nan_columns(gw_ptr, blk * CPB, tl.minimum(blk * CPB + CPB, N_GW), go_ptr, CIN_G, NIMG, H, W, HO, WO,
                         sgn, sgc, sgh, sgw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW)


@triton.jit
def _pad_nan_columns(gw_ptr, first, end, go_ptr, CIN_G, NIMG, H, W, HO, WO, sgn, sgc, sgh, sgw, stride_h, stride_w,
                     pad_h, pad_w, dil_h, dil_w, KH: tl.constexpr, KW: tl.constexpr):
    """Cold: NaN stored over ``grad_weight``'s flat columns ``[first, end)`` (already stored by
    this program) at ``[co, ci, kh, kw]`` wherever ``grad_out[., co]`` is not finite at an output
    position whose tap ``(kh, kw)`` reads the zero padding. Per output channel of the columns and
    per tap, one pass over that tap's padded positions only (:func:`_tap_band`: its top and
    bottom rows, then between them its left and right columns), 128 positions a step: scalar
    bounds and one position a thread, so this code does not raise the finalize's registers."""
    KHW: tl.constexpr = KH * KW
    PB: tl.constexpr = 128
    tl.debug_barrier()  # the sums' stores (other threads') before these NaN
    unit = CIN_G * KHW
    m = tl.arange(0, PB)
    for co in tl.range(first // unit, (end - 1) // unit + 1, num_stages=1):
        go_c = go_ptr + tl.cast(co, tl.int64) * sgc
        for t in tl.range(0, KHW, num_stages=1):
            top, bot, left, right = _tap_band(t // KW, t % KW, H, W, HO, WO, stride_h, stride_w, pad_h, pad_w,
                                              dil_h, dil_w)
            nrow = top + HO - bot  # padded rows: [0, top) and [bot, HO), every column
            n1 = NIMG * nrow * WO
            hit = tl.zeros([PB], dtype=tl.int32)
            for q0 in tl.range(0, n1, PB, num_stages=1):
                q = q0 + m
                rr = (q // WO) % nrow
                oh = tl.where(rr < top, rr, bot + (rr - top))
                hit = hit | _nonfinite_at(go_c, q // (WO * nrow), oh, q % WO, q < n1, sgn, sgh, sgw)
            mid = bot - top  # rows [top, bot): padded columns [0, left) and [right, WO)
            ncol = left + WO - right
            n2 = NIMG * mid * ncol
            for q0 in tl.range(0, n2, PB, num_stages=1):
                q = q0 + m
                cc = q % ncol
                ow = tl.where(cc < left, cc, right + (cc - left))
                hit = hit | _nonfinite_at(go_c, q // (ncol * mid), top + (q // ncol) % mid, ow, q < n2, sgn, sgh,
                                          sgw)
            if tl.max(hit, axis=0) != 0:  # NaN at [co, ci, t] for every ci whose column is the program's
                for ci0 in tl.range(0, CIN_G, PB, num_stages=1):
                    col = co * unit + (ci0 + m) * KHW + t
                    tl.store(gw_ptr + col, tl.full([PB], float("nan"), tl.float32).to(gw_ptr.dtype.element_ty),
                             mask=(ci0 + m < CIN_G) & (col >= first) & (col < end))


@triton.jit
def _tap_band(kh, kw, H, W, HO, WO, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w):
    """Tap ``(kh, kw)`` reads the padding at output rows ``[0, top)`` and ``[bot, HO)`` and, on
    the rows between, at columns ``[0, left)`` and ``[right, WO)`` (``top <= bot``, ``left <=
    right``; numerators kept non-negative: integer division then rounds the same way compiled
    and interpreted)."""
    e = kh * dil_h - pad_h  # input row = output row * stride_h + e
    f = kw * dil_w - pad_w
    top = tl.minimum((tl.maximum(-e, 0) + stride_h - 1) // stride_h, HO)
    bot = tl.minimum(tl.maximum((tl.maximum(H - e, 0) + stride_h - 1) // stride_h, top), HO)
    left = tl.minimum((tl.maximum(-f, 0) + stride_w - 1) // stride_w, WO)
    right = tl.minimum(tl.maximum((tl.maximum(W - f, 0) + stride_w - 1) // stride_w, left), WO)
    return top, bot, left, right


@triton.jit
def _nonfinite_at(go_c, n, oh, ow, ok, sgn, sgh, sgw):
    """1 where ``grad_out[n, co, oh, ow]`` (``go_c``: channel ``co``'s base) is not finite, for
    the positions ``ok``; else 0."""
    g = tl.load(go_c + n.to(tl.int64) * sgn + oh * sgh + ow * sgw, mask=ok, other=0.0).to(tl.float32)
    return ((g - g) != 0.0).to(tl.int32)


@triton.jit
def _reduce_rows(src_ptr, dst_ptr, blk, COLS, ROW_STRIDE, ROWS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < COLS
    tot = _sum_rows(src_ptr, cols, c_ok, ROW_STRIDE, ROWS, BLOCK_S, BLOCK_C)
    tl.store(dst_ptr + cols, tot.to(dst_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _sum_rows(src_ptr, cols, c_ok, ROW_STRIDE, ROWS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The float32 sum over ``ROWS`` partial rows of columns ``cols`` (``c_ok``), ``BLOCK_S``
    rows a step, in a fixed order."""
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_S):
        r = r0 + tl.arange(0, BLOCK_S)
        acc += tl.load(src_ptr + (r * ROW_STRIDE)[:, None] + cols[None, :],
                       mask=(r < ROWS)[:, None] & c_ok[None, :], other=0.0)
    return tl.sum(acc, axis=0)
