"""Forward of the fused op: ``y = conv2d(relu(bn(x)), weight, bias)`` as an implicit GEMM on
tensor cores, any ``groups``.

Grid: axis 1 is the channel block (one group block of ``GP`` small groups packed
block-diagonally into one MMA tile, or one ``BLOCK_N`` slice of a wide group's output
channels; see :mod:`.bn_relu`), so a program's BN parameters and, for a single input chunk,
its weights are loaded once. Axis 0 is persistent: program ``pid`` walks the spatial tiles
``pid, pid + nprog, ...``; a tile is ``TILE_H x TILE_W`` output positions of one image (the
MMA's M), its row / column inside the tile a constexpr shift.

``USE_SCRATCH`` (kernels with more than one tap): per input chunk of ``BLOCK_K`` channels,
the tile's input halo (``HALO_H x HALO_W`` positions) is loaded once, normalised and ReLU'd
once, rounded to the input dtype and written to this program's slot of a small global
scratch buffer, which stays in L2 (the slot is reused by every tile of the program). After a
barrier each kernel row ``kh`` gathers its taps' shifted views ``STACK`` at a time side by
side, ``[TILE_H * TILE_W, STACK * BLOCK_K]`` (column ``(kw % STACK) * BLOCK_K + k``), and
multiplies them with the stacked weights ``[STACK * BLOCK_K, BLOCK_N]``: ``KH * cdiv(KW,
STACK)`` MMAs per tile and chunk (``STACK`` 1: one MMA per tap, no padded tap slot; 4 for a
3-wide kernel: one MMA per row, a quarter of its K padding).
Padded positions of the halo are written as zeros of the *activation* (``0``, not
``bn(0)``). The tile and chunk loops are never software-pipelined (``num_stages=1``): a
prefetch of the next tile's scratch would read it before it is written.

Without it (1x1 kernels) the tile is loaded, normalised and multiplied directly.

``STATS``: the epilogue also takes the per-channel batch statistics of the output (from the
float32 accumulator, before the output is rounded to its dtype; the bias is added to the mean
at the end): each tile is Welford-added to per-position register accumulators (count, mean,
M2; rows outside the image add nothing), merged over the rows once per program after the tile
loops (Chan's formula), and each program
writes its row of the ``[3, S_ROWS, CO]`` float32 partials (count, mean, M2; rows this grid has
no program for are written as zero counts), which the statistics finalize merges for the next
BatchNorm. ``STATS_PAIRS`` (a config's ``PAIRS``): instead, each pair of rows that one thread
holds in the accumulator's layout (rows ``16 b + r`` and ``16 b + r + 8``) keeps a count, a shift
``K`` (its first row's value in the program's first tile) and the sums of ``x - K`` and
``(x - K)^2`` over the program's tiles: three ``[BM / 2, BLOCK_N]`` accumulators instead of two
``[BM, BLOCK_N]``, no division per tile (:func:`_add_pairs`); the rows no program owns are
zeroed before the tile loop and the program's row is stored right after it, so nothing of the
statistics stays live across the cold fix-up, which takes its statistics afresh by a walk of
its own over the outputs it stored, and a packed program's non-finite detector is the pairs'
sums of squares (a stored output that is not finite makes its pair's sum so).

Packed groups (``PACKED``): ``0 * NaN`` in the block-diagonal weights would carry one group's
NaN (or Inf) into its packed neighbours' outputs. Each tile adds ``acc * 0`` (NaN exactly
where ``acc`` is not finite) to a per-program register tile, one FMA per element; a program
that met a non-finite output recomputes all of its tiles exactly, one group at a time, and
takes their statistics afresh. ``flag_ptr`` is unused (kept for the launch signature).
``FIXUP_FMA`` (a config for many resident programs): the detector is a per-row vector (each
tile's ``acc * 0`` summed over its columns, a quarter of the registers) and the fix-up
recomputes a tile by scalar FMAs from the staged halo (:func:`_fixup_fma`), so the cold
fix-up no longer sets the kernel's register count (64 at the 4-warp 8 x 8 tile: 8 programs
per SM).

``SPLIT_K`` (split-K, one group per block, no ``STATS``, not ``PACKED``): grid axis 2 cuts
the block's input chunks into ``SPLIT_K`` equal shares, one per program, so a small image's few
tiles (DenseNet-121's 7 x 7 and 14 x 14 blocks) are spread over more programs with a shorter
chunk loop each. Each program stores its float32 partial tile to ``ws_ptr`` (``[tiles x channel
blocks, SPLIT_K, BM, BLOCK_N]``) and, after a barrier, takes an acquire-release ticket on the
tile's int32 counter in ``cnt_ptr``; the tile's last program reads the ``SPLIT_K`` partials back
in split order (the sum's order, so its bits, never depend on which program came last), resets
the counter to zero (the host zeroes the counters once, when it makes them, not per launch) and
stores the output (:func:`_split_sum`).

``WALK`` (a program with many tiles): the tile loop walks its tiles by their digits (column,
row, image; ``STEP_*`` the digits of the loop's step, from the host), adds and compares per
tile, no runtime division; with few tiles per program the carried digits cost more than the
divisions they save, and each tile's origin is divided out.
"""
import triton
import triton.language as tl

from resfast.kernels.triton.bn_relu import (any_nonfinite, bn_relu, channel_block, dot_acc, tile_digits, tile_next2,
                                            tile_origin)


@triton.jit
def bn_relu_conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, y_ptr, scratch_ptr, flag_ptr, pstat_ptr,
    ws_ptr, cnt_ptr,
    C, H, W, CO, HO, WO, CIN_G, COUT_G, KR, NR, NSUB, TILES_H, TILES_W, NUM_TILES, S_ROWS, STEP_W, STEP_H, STEP_N,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, STACK: tl.constexpr,
    HALO_H: tl.constexpr, HALO_W: tl.constexpr, HALO_B: tl.constexpr,
    USE_SCRATCH: tl.constexpr, ONE_CHUNK: tl.constexpr, PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STATS: tl.constexpr = False, WALK: tl.constexpr = True, FIXUP_FMA: tl.constexpr = False,
    STATS_PAIRS: tl.constexpr = False, SPLIT_K: tl.constexpr = 1,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cb = tl.program_id(1)
    if SPLIT_K > 1:  # this program's share of the input chunks (KR a multiple of SPLIT_K * BLOCK_K)
        ks = tl.program_id(2)
        k_span = KR // SPLIT_K
        kc0 = ks * k_span
    else:
        ks = 0
        k_span = KR
        kc0 = 0
    act_ty = y_ptr.dtype.element_ty
    BM: tl.constexpr = TILE_H * TILE_W
    HALO_NP: tl.constexpr = ((HALO_H * HALO_W + HALO_B - 1) // HALO_B) * HALO_B
    m = tl.arange(0, BM)
    oi = m // TILE_W  # constexpr power-of-two divisor: a shift
    oj = m % TILE_W
    slot = scratch_ptr + ((ks * tl.num_programs(1) + cb) * nprog + pid).to(tl.int64) * (HALO_NP * BLOCK_K)

    gblk = cb // NSUB
    n_loc = (cb % NSUB) * BLOCK_N + tl.arange(0, BLOCK_N)
    co = gblk * NR + n_loc
    if EVEN_N:  # every block full: no column masks
        n_ok = tl.full([BLOCK_N], 1, tl.int1)
    else:
        n_ok = (n_loc < NR) & (co < CO)
    gn = n_loc // COUT_G
    if ONE_CHUNK:
        scale, shift, k_ok, x_c = _chunk(kc0, gblk, KR, C, CIN_G, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, sxc,
                                         HAS_GAMMA, HAS_BETA, EVEN_K, BLOCK_K)
        wt = _weights(w_ptr, kc0, gblk, KR, C, CIN_G, co, gn, n_ok, swo, swi, swh, sww, KH, KW, STACK, BLOCK_K,
                      PACKED, EVEN_K)
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=n_ok, other=0.0).to(tl.float32)
    else:
        bias = 0.0
    if STATS_PAIRS:  # per pair of rows: count, shift, shifted sum and sum of squares (_add_pairs)
        BP: tl.constexpr = BM // 16
        pk = tl.zeros([BP, 8], dtype=tl.float32)
        ps = tl.zeros([BP, 8, BLOCK_N], dtype=tl.float32)
        pq = tl.zeros([BP, 8, BLOCK_N], dtype=tl.float32)
        pK = tl.zeros([BP, 8, BLOCK_N], dtype=tl.float32)
    else:  # per-position Welford accumulators (count per row, mean, M2), merged once per program
        wk = tl.zeros([BM], dtype=tl.float32)
        wm = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
        wq = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    if STATS and STATS_PAIRS:  # first, so that nothing of it stays live across the tiles
        _zero_rows(pstat_ptr, pid, nprog, S_ROWS, CO, co, n_ok, BLOCK_N)
    if WALK:  # the tile's digits (column, row, image), advanced by the step's (STEP_*) per tile
        d_w, d_h, _, _, d_n = tile_digits(pid, TILES_W, TILES_H, 1, 1)
    # 0 where every tile's output so far is finite, NaN once one is not; with STATS_PAIRS the
    # sums of squares are the detector (a stored output that is not finite makes its pair's sum so)
    DETECT: tl.constexpr = PACKED and not (STATS and STATS_PAIRS)
    if DETECT:
        if FIXUP_FMA:  # per row (a sum over the row's columns per tile: a quarter of the registers)
            nonfinite = tl.zeros([BM], dtype=tl.float32)
        else:
            nonfinite = tl.zeros([BM, BLOCK_N], dtype=tl.float32)

    for t in tl.range(pid, NUM_TILES, nprog, num_stages=1):
        if WALK:
            n = d_n
            th0 = d_h * TILE_H
            tw0 = d_w * TILE_W
        else:
            n, th0, tw0 = tile_origin(t, TILES_H, TILES_W, TILE_H, TILE_W)
        ho = th0 + oi
        wo = tw0 + oj
        m_ok = (ho < HO) & (wo < WO)
        acc = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
        xb = x_ptr + n.to(tl.int64) * sxn
        h0 = th0 * stride_h - pad_h
        w0 = tw0 * stride_w - pad_w
        if ONE_CHUNK:
            acc = _chunk_mma(acc, slot, xb, h0, w0, ho, wo, m_ok, oi, oj, H, W, sxh, sxw, x_c, k_ok, scale, shift, wt,
                             stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, 0, CIN_G, act_ty, KH, KW, STACK, HALO_H,
                             HALO_W, HALO_B, HALO_NP, USE_SCRATCH, False, DOT_F32, BLOCK_K)
        else:
            for kc in tl.range(kc0, kc0 + k_span, BLOCK_K, num_stages=1):
                scale, shift, k_ok, x_c = _chunk(kc, gblk, KR, C, CIN_G, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                                                 sxc, HAS_GAMMA, HAS_BETA, EVEN_K, BLOCK_K)
                if USE_SCRATCH:
                    # the halo staged first, the chunk's weights loaded after: they are not live
                    # (in registers) while the halo is normalised (a stride-2 halo is 4x the tile)
                    _stage_halo(slot, xb, h0, w0, H, W, sxh, sxw, x_c, k_ok, scale, shift, act_ty, HALO_H, HALO_W,
                                HALO_B, HALO_NP, BLOCK_K)
                wt = _weights(w_ptr, kc, gblk, KR, C, CIN_G, co, gn, n_ok, swo, swi, swh, sww, KH, KW, STACK,
                              BLOCK_K, PACKED, EVEN_K)
                acc = _chunk_mma(acc, slot, xb, h0, w0, ho, wo, m_ok, oi, oj, H, W, sxh, sxw, x_c, k_ok, scale,
                                 shift, wt, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, 0, CIN_G, act_ty, KH, KW,
                                 STACK, HALO_H, HALO_W, HALO_B, HALO_NP, USE_SCRATCH, False, DOT_F32, BLOCK_K,
                                 STAGED=USE_SCRATCH)
        if DETECT:  # one FMA per element: x * 0 is NaN exactly when x is not finite
            if FIXUP_FMA:
                nonfinite += tl.sum(acc * 0.0, axis=1)
            else:
                nonfinite += acc * 0.0
        if SPLIT_K > 1:  # the tile's last program to finish sums the partials (fixed order) and stores
            acc, last = _split_sum(ws_ptr, cnt_ptr, acc, t * tl.num_programs(1) + cb, ks, m, BM, BLOCK_N, SPLIT_K)
            if last:
                _store_tile(y_ptr, acc, bias, n, ho, wo, m_ok, co, n_ok, syn, syc, syh, syw, act_ty, HAS_BIAS)
        else:
            _store_tile(y_ptr, acc, bias, n, ho, wo, m_ok, co, n_ok, syn, syc, syh, syw, act_ty, HAS_BIAS)
        if STATS:
            if STATS_PAIRS:
                pk, ps, pq, pK = _add_pairs(pk, ps, pq, pK, acc, m_ok, t == pid, BM, BLOCK_N)
            else:
                wk, wm, wq = _add_tile(wk, wm, wq, acc, m_ok)
        if WALK:
            d_w, d_h, d_n = tile_next2(d_w, d_h, d_n, STEP_W, STEP_H, STEP_N, TILES_W, TILES_H)

    if STATS and STATS_PAIRS:  # the program's row now: nothing of it stays live across the fix-up
        if PACKED:
            fix = any_nonfinite(pq)
        st_n, st_mean, st_m2 = _pairs_partial(pk, ps, pq, pK)
        _store_row(pstat_ptr, st_n, st_mean, st_m2, bias, pid, cb, gblk, NR, NSUB, CO, S_ROWS, HAS_BIAS, EVEN_N,
                   BLOCK_N)

    if PACKED:
        # Fix-up: 0 * NaN in the block-diagonal weights carries one group's NaN (or Inf) into
        # its packed neighbours' outputs, which eager never does. A program one of whose tiles
        # was not finite recomputes all of its tiles one group at a time, each group's input
        # masked to its own channels, and takes their statistics afresh. Only programs that
        # met a result that was not finite take this path.
        tl.debug_barrier()
        if DETECT:
            fix = any_nonfinite(nonfinite)
        if fix:
            if STATS:
                if not STATS_PAIRS:
                    wk = tl.zeros([BM], dtype=tl.float32)
                    wm = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
                    wq = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
            for t in tl.range(pid, NUM_TILES, nprog, num_stages=1):
                n, th0, tw0 = tile_origin(t, TILES_H, TILES_W, TILE_H, TILE_W)
                ho = th0 + oi
                wo = tw0 + oj
                m_ok = (ho < HO) & (wo < WO)
                xb = x_ptr + n.to(tl.int64) * sxn
                acc = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
                if USE_SCRATCH and FIXUP_FMA:  # few registers: the fix-up's would set the whole kernel's count
                    acc = _fixup_fma(slot, xb, th0 * stride_h - pad_h, tw0 * stride_w - pad_w, H, W, sxh, sxw, x_c,
                                     k_ok, scale, shift, w_ptr, gblk, KR, NR, C, CIN_G, COUT_G, CO, oi, oj, swo, swi,
                                     swh, sww, stride_h, stride_w, dil_h, dil_w, act_ty, KH, KW, HALO_H, HALO_W,
                                     HALO_B, HALO_NP, BM, BLOCK_N, BLOCK_K)
                else:
                    for g in range(0, (BLOCK_N + COUT_G - 1) // COUT_G):
                        part = _chunk_mma(tl.zeros([BM, BLOCK_N], dtype=tl.float32), slot, xb,
                                          th0 * stride_h - pad_h, tw0 * stride_w - pad_w, ho, wo, m_ok, oi, oj, H, W,
                                          sxh, sxw, x_c, k_ok, scale, shift, wt, stride_h, stride_w, pad_h, pad_w,
                                          dil_h, dil_w, g, CIN_G, act_ty, KH, KW, STACK, HALO_H, HALO_W, HALO_B,
                                          HALO_NP, USE_SCRATCH, True, DOT_F32, BLOCK_K)
                        acc = tl.where((gn == g)[None, :], part, acc)
                _store_tile(y_ptr, acc, bias, n, ho, wo, m_ok, co, n_ok, syn, syc, syh, syw, act_ty, HAS_BIAS)
                if STATS and not STATS_PAIRS:
                    wk, wm, wq = _add_tile(wk, wm, wq, acc, m_ok)
            if STATS and STATS_PAIRS:
                # the row afresh from the outputs just stored (a walk of its own after the fix-up,
                # so that no accumulator is live across the fix-up's registers; cold code)
                tl.debug_barrier()
                st_n = tl.zeros([BLOCK_N], dtype=tl.float32)
                st_mean = tl.zeros([BLOCK_N], dtype=tl.float32)
                st_m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
                for t in tl.range(pid, NUM_TILES, nprog, num_stages=1):
                    n, th0, tw0 = tile_origin(t, TILES_H, TILES_W, TILE_H, TILE_W)
                    ho = th0 + oi
                    wo = tw0 + oj
                    m_ok = (ho < HO) & (wo < WO)
                    y_off = (ho * syh + wo * syw)[:, None] + (co * syc)[None, :]
                    yv = tl.load(y_ptr + n.to(tl.int64) * syn + y_off, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                    st_n, st_mean, st_m2 = _chan_merge(st_n, st_mean, st_m2, *_tile_partial(yv.to(tl.float32), m_ok))
                _store_row(pstat_ptr, st_n, st_mean, st_m2, bias, pid, cb, gblk, NR, NSUB, CO, S_ROWS, False, EVEN_N,
                           BLOCK_N)

    if STATS:
        if not STATS_PAIRS:
            wn = tl.broadcast_to(wk[:, None], [BM, BLOCK_N])
            st_n, st_mean, st_m2 = tl.reduce((wn, wm, wq), 0, _chan_merge)
            if HAS_BIAS:
                st_mean = st_mean + bias
            col = co  # [3, S_ROWS, CO] partials: small enough for int32 offsets
            plane = S_ROWS * CO
            row = pid * CO + col
            tl.store(pstat_ptr + row, st_n, mask=n_ok)
            tl.store(pstat_ptr + plane + row, st_mean, mask=n_ok)
            tl.store(pstat_ptr + 2 * plane + row, st_m2, mask=n_ok)
            _zero_rows(pstat_ptr, pid, nprog, S_ROWS, CO, col, n_ok, BLOCK_N)


@triton.jit
def _split_sum(ws_ptr, cnt_ptr, acc, tile_id, ks, m, BM: tl.constexpr, BLOCK_N: tl.constexpr,
               SPLIT_K: tl.constexpr):
    """Split-K (``SPLIT_K`` programs per tile, each over its share of the input chunks): store
    this program's float32 partial to its slot of the tile's ``[SPLIT_K, BM, BLOCK_N]``
    workspace, then take a ticket on the tile's counter (acquire-release, after a barrier, so
    the partial is visible first). The last of the tile's programs reads all ``SPLIT_K``
    partials back in split order (so the sum's order, and its bits, never depend on which
    program came last), resets the counter to zero for the next launch, and returns ``(sum,
    True)``; the others ``(acc, False)``."""
    nn = tl.arange(0, BLOCK_N)
    tile_sz: tl.constexpr = BM * BLOCK_N
    base = ws_ptr + tile_id.to(tl.int64) * (SPLIT_K * tile_sz)
    off = m[:, None] * BLOCK_N + nn[None, :]
    tl.store(base + ks * tile_sz + off, acc)
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
    last = ticket == SPLIT_K - 1
    if last:
        acc = tl.load(base + off, cache_modifier=".cg")
        for s in tl.static_range(1, SPLIT_K):
            acc += tl.load(base + s * tile_sz + off, cache_modifier=".cg")
        tl.store(cnt_ptr + tile_id, 0)
    return acc, last


@triton.jit
def _row_offsets(pid, cb, gblk, NR, NSUB, CO, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets and mask of program ``pid``'s row of the ``[3, S_ROWS, CO]`` partials (int32:
    small enough), from scalars: no vector of the tile loop stays live for them."""
    c0 = gblk * NR + (cb % NSUB) * BLOCK_N
    nn = tl.arange(0, BLOCK_N)
    if EVEN_N:
        ok = tl.full([BLOCK_N], 1, tl.int1)
    else:
        ok = ((cb % NSUB) * BLOCK_N + nn < NR) & (c0 + nn < CO)
    return pid * CO + c0 + nn, ok


@triton.jit
def _store_row(pstat_ptr, st_n, st_mean, st_m2, bias, pid, cb, gblk, NR, NSUB, CO, S_ROWS, HAS_BIAS: tl.constexpr,
               EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the program's ``(count, mean, M2)`` row (the bias added to the mean)."""
    row, ok = _row_offsets(pid, cb, gblk, NR, NSUB, CO, EVEN_N, BLOCK_N)
    if HAS_BIAS:
        st_mean = st_mean + bias
    plane = S_ROWS * CO
    tl.store(pstat_ptr + row, st_n, mask=ok)
    tl.store(pstat_ptr + plane + row, st_mean, mask=ok)
    tl.store(pstat_ptr + 2 * plane + row, st_m2, mask=ok)


@triton.jit
def _zero_rows(pstat_ptr, pid, nprog, S_ROWS, CO, col, n_ok, BLOCK_N: tl.constexpr):
    """Rows of the ``[3, S_ROWS, CO]`` partials that no program of this grid owns: empty."""
    plane = S_ROWS * CO
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r in range(pid + nprog, S_ROWS, nprog):
        off = r * CO + col
        tl.store(pstat_ptr + off, zero, mask=n_ok)
        tl.store(pstat_ptr + plane + off, zero, mask=n_ok)
        tl.store(pstat_ptr + 2 * plane + off, zero, mask=n_ok)


@triton.jit
def _chan_merge(n_a, m_a, q_a, n_b, m_b, q_b):
    """Chan's merge of two ``(count, mean, M2)`` partials (an empty one changes nothing)."""
    n = n_a + n_b
    d = m_b - m_a
    f = n_b / tl.maximum(n, 1.0)
    return n, m_a + d * f, q_a + q_b + d * d * n_a * f


@triton.jit
def _pairs(v, BM: tl.constexpr):
    """Rows ``16 b + r`` and ``16 b + r + 8`` of ``v`` (``[BM]`` or ``[BM, N]``) as two tensors
    indexed ``[b, r(, n)]``: in the tensor cores' accumulator layout a thread holds both rows of
    a pair in its own registers, so this moves no data."""
    if len(v.shape) == 1:
        a, b = tl.split(tl.permute(tl.reshape(v, [BM // 16, 2, 8]), (0, 2, 1)))
    else:
        a, b = tl.split(tl.permute(tl.reshape(v, [BM // 16, 2, 8, v.shape[1]]), (0, 2, 3, 1)))
    return a, b


@triton.jit
def _add_pairs(pk, ps, pq, pK, acc, ok, first, BM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add one tile of the output (the float32 accumulator, before the bias and the rounding)
    to the program's per-pair accumulators: each pair of rows (:func:`_pairs`) keeps its count,
    a shift ``K`` (its first row's value in the program's first tile, where that row is in the
    image) and the sums of ``x - K`` and ``(x - K)^2`` of its rows' valid values: three
    ``[BM / 2, BLOCK_N]`` tiles instead of the Welford pair's two ``[BM, BLOCK_N]``, no
    division per tile; the shift keeps the sum of squares from cancelling (a value near the
    pair's mean: the error of ``M2`` is about ``eps (1 + (K - mean)^2 / var)``). Rows not
    ``ok`` change nothing (select, never multiply: a skipped row may hold NaN)."""
    a, b = _pairs(acc, BM)
    oa, ob = _pairs(ok, BM)
    pK = tl.where((oa & first)[:, :, None], a, pK)
    da = tl.where(oa[:, :, None], a - pK, 0.0)
    db = tl.where(ob[:, :, None], b - pK, 0.0)
    return pk + oa.to(tl.float32) + ob.to(tl.float32), ps + (da + db), pq + (da * da + db * db), pK


@triton.jit
def _pairs_partial(pk, ps, pq, pK):
    """The program's ``(count, mean, M2)`` per column from :func:`_add_pairs`' accumulators:
    each pair's mean and M2 from its shifted sums, merged with Chan's formula (fixed order)."""
    inv = 1.0 / tl.maximum(pk, 1.0)[:, :, None]
    m2 = pq - ps * ps * inv
    m2 = tl.where(m2 < 0.0, 0.0, m2)  # rounding; NaN stays NaN
    pn = tl.broadcast_to(pk[:, :, None], ps.shape)
    n1, m1, q1 = tl.reduce((pn, pK + ps * inv, m2), 1, _chan_merge)
    return tl.reduce((n1, m1, q1), 0, _chan_merge)


@triton.jit
def _tile_partial(acc, ok):
    """One tile's ``(count, mean, M2)`` per column, two passes (the fix-up's statistics)."""
    okc = ok[:, None]
    cnt = tl.sum(ok.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(okc, acc, 0.0), axis=0) / tl.maximum(cnt, 1.0)
    d = tl.where(okc, acc - mean[None, :], 0.0)
    return tl.zeros_like(mean) + cnt, mean, tl.sum(d * d, axis=0)


@triton.jit
def _add_tile(wk, wm, wq, acc, ok):
    """Welford-add one tile of the output (the float32 accumulator, before the bias and the
    rounding: the bias shifts the mean only) to the program's per-position count, mean and M2;
    rows not ``ok`` change nothing. No sum of squares, so nothing cancels."""
    k = wk + ok.to(tl.float32)
    inv = 1.0 / tl.maximum(k, 1.0)
    d = acc - wm
    new_m = wm + d * inv[:, None]
    keep = ok[:, None]  # select, never multiply: a skipped tile may hold NaN
    return k, tl.where(keep, new_m, wm), tl.where(keep, wq + d * (acc - new_m), wq)


@triton.jit
def _store_tile(y_ptr, acc, bias, n, ho, wo, m_ok, co, n_ok, syn, syc, syh, syw, act_ty: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += bias[None, :]
    y_off = (ho * syh + wo * syw)[:, None] + (co * syc)[None, :]
    tl.store(y_ptr + n.to(tl.int64) * syn + y_off, acc.to(act_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _chunk(kc, gblk, KR, C, CIN_G, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, sxc,
           HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """BN ``(scale, shift)``, validity and ``x`` channel offsets of input chunk ``kc`` of a group block."""
    ci, k_ok, scale, shift = channel_block(kc + tl.arange(0, BLOCK_K), gblk, KR, C, mean_ptr, invstd_ptr, gamma_ptr,
                                           beta_ptr, HAS_GAMMA, HAS_BETA, EVEN_K, BLOCK_K)
    return scale, shift, k_ok, ci * sxc


@triton.jit
def _weights(w_ptr, kc, gblk, KR, C, CIN_G, co, gn, n_ok, swo, swi, swh, sww,
             KH: tl.constexpr, KW: tl.constexpr, STACK: tl.constexpr, BLOCK_K: tl.constexpr,
             PACKED: tl.constexpr = True, EVEN_K: tl.constexpr = False):
    """One ``[STACK * BLOCK_K, BLOCK_N]`` weight tile per ``STACK`` taps of a kernel row (row
    ``(kw % STACK) * BLOCK_K + k`` holds ``w[co, ci_local(k), kh, kw]``), zero off the block
    diagonal and for ``kw >= KW``; ordered ``(kh, kw // STACK)``. Not ``PACKED`` (a block is
    one group): the block's channels are the group's own, no division by the group width and
    no block-diagonal mask; ``EVEN_K``: no channel mask (so a channels_last weight's input
    channels load as vectors)."""
    NKB: tl.constexpr = (KW + STACK - 1) // STACK
    r = tl.arange(0, STACK * BLOCK_K)
    # kc is a multiple of BLOCK_K (the chunk loop's step): runs of BLOCK_K consecutive channels
    k_loc = tl.max_contiguous(tl.multiple_of(kc + r % BLOCK_K, BLOCK_K), BLOCK_K)
    if EVEN_K:
        k_ok = tl.full([STACK * BLOCK_K], 1, tl.int1)
    else:
        k_ok = (k_loc < KR) & (gblk * KR + k_loc < C)
    if PACKED:
        gk = k_loc // CIN_G
        ci_loc = k_loc - gk * CIN_G
    else:
        ci_loc = k_loc
    wt = ()
    for kh in tl.static_range(KH):
        for kb in tl.static_range(NKB):
            if STACK == 1:  # one tap: its offset a scalar, so the channels stay contiguous runs
                off = (co * swo)[None, :] + (ci_loc * swi)[:, None] + kb * sww
                mask = k_ok[:, None] & n_ok[None, :]
            else:
                r_kw = kb * STACK + r // BLOCK_K
                off = (co * swo)[None, :] + (ci_loc * swi + r_kw * sww)[:, None]
                mask = (k_ok & (r_kw < KW))[:, None] & n_ok[None, :]
            if PACKED:
                mask = mask & (gk[:, None] == gn[None, :])
            wt = wt + (tl.load(w_ptr + off + kh * swh, mask=mask, other=0.0),)
    return wt


@triton.jit
def _stage_halo(slot, xb, h0, w0, H, W, sxh, sxw, x_c, k_ok, scale, shift, act_ty: tl.constexpr,
                HALO_H: tl.constexpr, HALO_W: tl.constexpr, HALO_B: tl.constexpr, HALO_NP: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Write one input chunk's halo, normalised and ReLU'd (zeros of the activation where it
    is padding), to the program's scratch slot; then a barrier."""
    kk = tl.arange(0, BLOCK_K)
    for r0 in tl.static_range(0, HALO_NP, HALO_B):
        r = r0 + tl.arange(0, HALO_B)
        hi = h0 + r // HALO_W
        wi = w0 + r % HALO_W
        ok = (r < HALO_H * HALO_W) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        mask = ok[:, None] & k_ok[None, :]
        xv = tl.load(xb + (hi * sxh + wi * sxw)[:, None] + x_c[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        tl.store(slot + (r * BLOCK_K)[:, None] + kk[None, :], bn_relu(xv, scale, shift, mask).to(act_ty))
    tl.debug_barrier()


@triton.jit
def _chunk_mma(acc, slot, xb, h0, w0, ho, wo, m_ok, oi, oj, H, W, sxh, sxw, x_c, k_ok, scale, shift, wt,
               stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, group, CIN_G, act_ty: tl.constexpr,
               KH: tl.constexpr, KW: tl.constexpr, STACK: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
               HALO_B: tl.constexpr, HALO_NP: tl.constexpr, USE_SCRATCH: tl.constexpr, ONE_GROUP: tl.constexpr,
               DOT_F32: tl.constexpr, BLOCK_K: tl.constexpr, STAGED: tl.constexpr = False):
    """``acc + `` the contribution of one input chunk to one tile (``ONE_GROUP``: of the
    block's group ``group`` alone, its other input channels masked to zero); ``STAGED``: the
    chunk's halo is already in the scratch slot (:func:`_stage_halo`)."""
    kk = tl.arange(0, BLOCK_K)
    c = tl.arange(0, STACK * BLOCK_K)
    if USE_SCRATCH:
        if not STAGED:
            _stage_halo(slot, xb, h0, w0, H, W, sxh, sxw, x_c, k_ok, scale, shift, act_ty, HALO_H, HALO_W, HALO_B,
                        HALO_NP, BLOCK_K)
        NKB: tl.constexpr = (KW + STACK - 1) // STACK
        for kh in tl.static_range(KH):
            row = ((oi * stride_h + kh * dil_h) * HALO_W + oj * stride_w) * BLOCK_K
            for kb in tl.static_range(NKB):
                c_kw = kb * STACK + c // BLOCK_K
                c_off = c_kw * (dil_w * BLOCK_K) + c % BLOCK_K
                col_ok = c_kw < KW
                if ONE_GROUP:
                    col_ok = col_ok & ((c % BLOCK_K) // CIN_G == group)
                if (STACK * NKB == KW) and not ONE_GROUP:
                    av = tl.load(slot + row[:, None] + c_off[None, :])
                else:
                    av = tl.load(slot + row[:, None] + c_off[None, :], mask=col_ok[None, :], other=0.0)
                acc = dot_acc(av, wt[kh * NKB + kb], acc, DOT_F32)
        tl.debug_barrier()  # the next chunk or tile overwrites the slot
    else:  # a 1x1 kernel: the tile itself
        hi = ho * stride_h - pad_h
        wi = wo * stride_w - pad_w
        ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        mask = ok[:, None] & k_ok[None, :]
        if ONE_GROUP:
            mask = mask & ((kk // CIN_G) == group)[None, :]
        xv = tl.load(xb + (hi * sxh + wi * sxw)[:, None] + x_c[None, :], mask=mask, other=0.0)
        av = bn_relu(xv.to(tl.float32), scale, shift, mask).to(act_ty)
        acc = dot_acc(av, wt[0], acc, DOT_F32)
    return acc


@triton.jit
def _fixup_fma(slot, xb, h0, w0, H, W, sxh, sxw, x_c, k_ok, scale, shift, w_ptr, gblk, KR, NR, C, CIN_G, COUT_G, CO,
               oi, oj, swo, swi, swh, sww, stride_h, stride_w, dil_h, dil_w, act_ty: tl.constexpr, KH: tl.constexpr,
               KW: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr, HALO_B: tl.constexpr,
               HALO_NP: tl.constexpr, BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of a packed block exactly (the non-finite fix-up of the stacked-tap path): the
    halo staged as in the main loop, then each output channel from its own group's input
    channels only, by float32 FMAs of the staged activation (rounded as the MMA's operand)
    with scalar weights: no tensor-core tile, so no packed neighbour's NaN, and few registers."""
    _stage_halo(slot, xb, h0, w0, H, W, sxh, sxw, x_c, k_ok, scale, shift, act_ty, HALO_H, HALO_W, HALO_B, HALO_NP,
                BLOCK_K)
    nn = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    base = (oi * stride_h * HALO_W + oj * stride_w) * BLOCK_K
    for j in range(0, BLOCK_N):
        co_j = gblk * NR + j  # a packed block is one output chunk
        g = j // COUT_G
        v = tl.zeros([BM], dtype=tl.float32)
        for i in range(0, CIN_G):
            k = g * CIN_G + i
            ok = (j < NR) & (co_j < CO) & (k < KR) & (gblk * KR + k < C)
            for kh in range(0, KH):
                for kw in range(0, KW):
                    wv = tl.load(w_ptr + co_j * swo + i * swi + kh * swh + kw * sww, mask=ok, other=0.0)
                    av = tl.load(slot + base + (kh * dil_h * HALO_W + kw * dil_w) * BLOCK_K + k, mask=ok, other=0.0)
                    v += av.to(tl.float32) * wv.to(tl.float32)
        acc = tl.where((nn == j)[None, :], v[:, None], acc)
    tl.debug_barrier()  # the next tile overwrites the slot
    return acc
