"""Weight gradient of packed small groups at stride 1 (ResNeXt-50 stages 1-3, depthwise).

:func:`bn_relu_conv_bwd_weight_packed_kernel` computes ``grad_weight`` (and, with ``DO_GB``,
``grad_bias``) of a group block of at most 16 input and 16 output channels, the launch after
:func:`resfast.kernels.triton.bn_relu_conv_bwd.bn_relu_conv_bwd_input_packed_kernel`. Per tile
of input positions: ``a = relu(bn(x))`` once; ``grad_out`` at every tap's shifted positions,
``CAP`` taps side by side per stack (one ``[positions, CAP * BLOCK_N]`` load per stack, column
``j * BLOCK_N + n`` for tap ``s * CAP + j`` and output channel ``n``; the padded taps of the
last stack masked), every stack loaded before the first MMA; each stack multiplied transposed,
positions the reduction axis: ``[CAP * BLOCK_N, positions] x [positions, BLOCK_K]`` into one
float32 accumulator per stack that lives across the program's tiles (3x3: 3 stacks of 4 taps,
``m64n16`` wgmma). Grid ``(splits, group blocks)``; program ``(split, gb)`` walks tiles
``split, split + splits, ...`` by their digits (``STEP_*``, from the host) and writes row
``split`` of the ``[splits, C_out * C_in/groups * KH * KW]`` float32 partials that
``bn_relu_conv_bwd_finalize_kernel`` sums in a fixed order (deterministic).

Non-finite values: an accumulator entry (tap and output channel ``co``, input channel ``ci``)
is a sum over positions of ``grad_out[., co]`` times ``a[., ci]`` alone, and only the
block-diagonal entries (``co`` and ``ci`` in one group) are stored, so a NaN of one group never
reaches another group's gradient (as in eager). Eager's sum also runs over the zero padding
(``0 * NaN`` is NaN there), which the input positions never reach: the finalize restores those
NaN (``bn_relu_conv_bwd._reduce_weight_rows``, cold; nothing here).
"""
import triton
import triton.language as tl

from resfast.kernels.triton.bn_relu import bn_relu, channel_block, dot_acc, tap_residue, tile_digits, tile_next2
from resfast.kernels.triton.bn_relu_conv_bwd import _bias_partials


@triton.jit
def bn_relu_conv_bwd_weight_packed_kernel(
    go_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, pgw_ptr, pgb_ptr,
    C, H, W, CO, HO, WO, CIN_G, COUT_G, KR, NR, TILES_H, TILES_W, NUM_TILES, STEP_W, STEP_H, STEP_N, P_OUT,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, CAP: tl.constexpr, DO_GB: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    split = tl.program_id(0)
    splits = tl.num_programs(0)
    gblk = tl.program_id(1)
    act_ty = go_ptr.dtype.element_ty
    BM: tl.constexpr = TILE_H * TILE_W
    KHW: tl.constexpr = KH * KW
    NS: tl.constexpr = (KHW + CAP - 1) // CAP  # tap stacks
    kk = tl.arange(0, BLOCK_K)
    m = tl.arange(0, BM)
    oi = m // TILE_W
    oj = m % TILE_W
    ci, k_ok, scale, shift = channel_block(kk, gblk, KR, C, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA,
                                           HAS_BETA, EVEN_K, BLOCK_K)
    x_c = ci * sxc
    gws = (tl.zeros([CAP * BLOCK_N, BLOCK_K], dtype=tl.float32),) * NS
    d_w, d_h, _, _, d_n = tile_digits(split, TILES_W, TILES_H, 1, 1)
    for t in tl.range(split, NUM_TILES, splits, num_stages=1):
        ii = d_h * TILE_H + oi
        jj = d_w * TILE_W + oj
        n64 = d_n.to(tl.int64)
        g_row = go_ptr + n64 * sgn + (ii * sgh + jj * sgw)[:, None]
        gst = ()
        for s in tl.static_range(NS):  # every stack's loads before the first MMA
            gst = gst + (_stack_load(g_row, ii, jj, s, gblk, NR, CO, HO, WO, sgc, sgh, sgw, pad_h, pad_w, dil_h,
                                     dil_w, KHW, KW, CAP, EVEN_N, BLOCK_N),)
        x_mask = ((ii < H) & (jj < W))[:, None] & k_ok[None, :]
        xv = tl.load(x_ptr + n64 * sxn + (ii * sxh + jj * sxw)[:, None] + x_c[None, :], mask=x_mask,
                     other=0.0).to(tl.float32)
        a = bn_relu(xv, scale, shift, x_mask).to(act_ty)
        for s in tl.static_range(NS):
            gws = gws[:s] + (dot_acc(tl.trans(gst[s]), a, gws[s], DOT_F32),) + gws[s + 1:]
        d_w, d_h, d_n = tile_next2(d_w, d_h, d_n, STEP_W, STEP_H, STEP_N, TILES_W, TILES_H)

    # row j * BLOCK_N + n (tap s * CAP + j of stack s, output channel n), column k (input
    # channel) -> grad_weight[co, ci_local, kh, kw], block-diagonal entries only
    gk = kk // CIN_G
    ci_loc = kk - gk * CIN_G
    r = tl.arange(0, CAP * BLOCK_N)
    r_n = r % BLOCK_N
    r_t = r // BLOCK_N
    r_co = gblk * NR + r_n
    if EVEN_N:
        r_ok = tl.full([CAP * BLOCK_N], 1, tl.int1)
    else:
        r_ok = (r_n < NR) & (r_co < CO)
    keep = ((r_n // COUT_G)[:, None] == gk[None, :]) & r_ok[:, None] & k_ok[None, :]
    base = split.to(tl.int64) * (CO * CIN_G * KHW)
    col = (r_co.to(tl.int64) * (CIN_G * KHW) + r_t)[:, None] + (ci_loc * KHW)[None, :]
    for s in tl.static_range(NS):
        tap_ok = (s * CAP + r_t) < KHW
        tl.store(pgw_ptr + base + col + s * CAP, gws[s], mask=keep & tap_ok[:, None])
    if DO_GB:
        _bias_partials(go_ptr, pgb_ptr, 0, gblk, NR, CO, HO, WO, P_OUT, split, splits, m, sgn, sgc, sgh, sgw, BM,
                       BLOCK_N)


@triton.jit
def _stack_load(g_row, ii, jj, s: tl.constexpr, gblk, NR, CO, HO, WO, sgc, sgh, sgw, pad_h, pad_w, dil_h, dil_w,
                KHW: tl.constexpr, KW: tl.constexpr, CAP: tl.constexpr, EVEN_N: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """``grad_out`` of stack ``s``'s taps side by side, ``[positions, CAP * BLOCK_N]``: column
    ``j * BLOCK_N + n`` is output channel ``gblk * NR + n`` at output row ``ii + pad_h - kh *
    dil_h``, column ``jj + pad_w - kw * dil_w`` of tap ``s * CAP + j = kh * KW + kw`` (``g_row``:
    the rows' pointers), zero outside the output, past the last tap and outside the block."""
    c = tl.arange(0, CAP * BLOCK_N)
    tap = s * CAP + c // BLOCK_N
    n = c % BLOCK_N
    dh = pad_h - (tap // KW) * dil_h
    dw = pad_w - (tap % KW) * dil_w
    ok = tap < KHW
    if not EVEN_N:
        ok = ok & (n < NR) & (gblk * NR + n < CO)
    # 0 <= row < HO and 0 <= column < WO, each as one unsigned compare
    r_ok = (ii[:, None] + dh[None, :]).to(tl.uint32, bitcast=True) < HO.to(tl.uint32, bitcast=True)
    c_ok = (jj[:, None] + dw[None, :]).to(tl.uint32, bitcast=True) < WO.to(tl.uint32, bitcast=True)
    off = dh * sgh + dw * sgw + (gblk * NR + n) * sgc
    return tl.load(g_row + off[None, :], mask=r_ok & c_ok & ok[None, :], other=0.0)


@triton.jit
def bn_relu_conv_bwd_weight_tma_kernel(
    go_ptr, a_ptr, pgw_ptr, pgb_ptr,
    C, CO, HO, WO, HQ, WQ, CIN_G, KR, NR, KSUB, NSUB, NCB, SPLITS, TILES_H, TILES_W, NUM_TILES, TPP, NB,
    sgn, sgh, sgw, san, sah, sar, saw,
    pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DO_GB: tl.constexpr,
    DOT_F32: tl.constexpr, STAGES: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr = True,
):
    """``grad_weight`` (and ``grad_bias``) partials of a group wider than one tile from the
    activations ``a = relu(bn(x))`` that the input-gradient launch wrote beside ``grad_z``
    (``a_ptr``, channels-last ``[N, H, W, C]`` seen as ``[N, H / SH, SH, W / SW, SW * C]``, so
    a stride's residue class is a box): one program per (output-channel block, input-channel
    block, tap, split) walks the split's output tiles in a software-pipelined loop
    (``STAGES``), both operands by TMA tensor descriptors (the copy engine zero-fills what lies
    outside the image: the conv's padding, exactly ``a``'s zeros there), one
    ``[BLOCK_N, positions] x [positions, BLOCK_K]`` MMA per step straight from shared memory
    into a ``[BLOCK_N, BLOCK_K]`` float32 accumulator. No normalisation, no masks, no
    addresses per step. A box reaching past its group's channels reads other channels (or the
    next residue class's) into rows and columns that are never stored: the reduction is over
    positions only, so nothing leaks into a stored entry. The host takes this path only where
    the tiles cover the output exactly (a tile overhanging the output would multiply its
    zero-filled ``grad_out`` rows by activations eager never reads: ``0 * inf``). ``TMA`` is
    always set (the launcher's cue for triton's descriptor scratch allocator)."""
    pid = tl.program_id(0)
    KHW: tl.constexpr = KH * KW
    BM: tl.constexpr = TILE_H * TILE_W
    cb = pid % NCB
    rest = pid // NCB
    tap = rest % KHW
    split = rest // KHW
    kh = tap // KW
    kw = tap % KW
    gblk = cb // (KSUB * NSUB)
    ksub = (cb // NSUB) % KSUB
    nc = cb % NSUB
    n0 = nc * BLOCK_N
    k0 = ksub * BLOCK_K
    qh, rh = tap_residue(kh, dil_h, pad_h, SH)
    qw, rw = tap_residue(kw, dil_w, pad_w, SW)
    gy_desc = tl.make_tensor_descriptor(go_ptr, shape=[NB, HO, WO, CO], strides=[sgn, sgh, sgw, 1],
                                        block_shape=[1, TILE_H, TILE_W, BLOCK_N])
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[NB, HQ, SH, WQ, SW * C], strides=[san, sah, sar, saw, 1],
                                       block_shape=[1, TILE_H, 1, TILE_W, BLOCK_K])
    co0 = gblk * NR + n0
    c0 = rw * C + gblk * KR + k0
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    gb = tl.zeros([BLOCK_N], dtype=tl.float32)
    # the split's tiles are a contiguous run, their (image, row, column) digits carried across
    # the steps (no division per step)
    t0 = split * TPP
    t1 = tl.minimum(t0 + TPP, NUM_TILES)
    tw = t0 % TILES_W
    r = t0 // TILES_W
    th = r % TILES_H
    n = r // TILES_H
    for _t in tl.range(t0, t1, num_stages=STAGES):
        th0 = th * TILE_H
        tw0 = tw * TILE_W
        gy = gy_desc.load([n, th0, tw0, co0]).reshape(BM, BLOCK_N)
        av = a_desc.load([n, th0 + qh, rh, tw0 + qw, c0]).reshape(BM, BLOCK_K)
        acc = dot_acc(tl.trans(gy), av, acc, DOT_F32)
        if DO_GB:
            gb += tl.sum(gy.to(tl.float32), axis=0)
        tw += 1
        wrap = tw == TILES_W
        tw = tl.where(wrap, 0, tw)
        th = tl.where(wrap, th + 1, th)
        wrap = th == TILES_H
        th = tl.where(wrap, 0, th)
        n = tl.where(wrap, n + 1, n)

    n_loc = n0 + tl.arange(0, BLOCK_N)
    k_loc = k0 + tl.arange(0, BLOCK_K)
    co = gblk * NR + n_loc
    n_ok = (n_loc < NR) & (co < CO)
    k_ok = k_loc < KR
    base = split.to(tl.int64) * (CO * CIN_G * KHW)
    col = (co.to(tl.int64) * (CIN_G * KHW))[:, None] + (k_loc * KHW + tap)[None, :]
    tl.store(pgw_ptr + base + col, acc, mask=n_ok[:, None] & k_ok[None, :])
    if DO_GB:
        if (tap == 0) & (ksub == 0):
            tl.store(pgb_ptr + split * CO + co, gb, mask=n_ok)
