"""Forward of a wide group's fused op from stored activations: a BN-ReLU pass writes ``a =
relu(bn(x))`` (channels-last, the activation dtype, a temporary of the forward only), then a
convolution reads ``a`` and the weights through TMA tensor descriptors.

:func:`bn_relu_store_kernel`: ``a = relu(x * scale + shift)`` of a dense channels-last ``x``
seen as ``[P, C]`` rows; grid ``(row programs, channel blocks)``, each program walking row
blocks ``pid, pid + nprog, ...`` with its channel block's ``(scale, shift)`` loaded once. The
ReLU propagates NaN as ``torch.relu`` does.

:func:`bn_relu_conv_fwd_tma_kernel`: one program per (output tile, output-channel block), a
``num_stages``-deep pipelined loop over (tap, input chunk): per step ``a``'s
``[1, TILE_H, 1, TILE_W, BLOCK_K]`` box at the tap's shifted origin (``a`` seen as
``[N, H / SH, SH, W / SW, SW * C]``, so a stride's residue class is a box) and the weights'
``[BLOCK_N, 1, 1, BLOCK_K]`` box (the weights seen as ``[CO, KH, KW, CIN_G]``), one
``[positions, BLOCK_K] x [BLOCK_K, BLOCK_N]`` MMA from shared memory. No normalisation, masks
or addresses in the loop: the copy engine's zero fill outside the image is exactly the conv's
padding (``a``'s zeros: padding applies after the ReLU). A box past the input channels reads
zeros (one group, stride 1 along the width: the view's last axis ends there) or, where the
host guarantees it never happens (groups or a width stride: input chunks that divide the
group), another group's or residue class's channels. Rows of an overhanging tile and channels
past the block are computed from whatever the boxes hold and never stored.
"""
import triton
import triton.language as tl

from resfast.kernels.triton.bn_relu import bn_params, bn_relu, dot_acc, tap_residue
from resfast.kernels.triton.bn_relu_conv_fwd import _store_tile


@triton.jit
def bn_relu_store_kernel(x_ptr, a_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, C, P, NUM_PB,
                         HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, EVEN: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``a[p, c] = relu(x[p, c] * scale[c] + shift[c])`` over a dense channels-last ``[P, C]``
    (``EVEN``: ``P`` a multiple of ``BLOCK_P`` and ``C`` of ``BLOCK_C``: no masks)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if EVEN:
        c_ok = tl.full([BLOCK_C], 1, tl.int1)
    else:
        c_ok = c < C
    scale, shift = bn_params(c, c_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA, HAS_BETA)
    rows = tl.arange(0, BLOCK_P)
    off = (rows * C)[:, None] + c[None, :]
    for pb in tl.range(pid, NUM_PB, nprog, num_stages=1):
        base = tl.cast(pb, tl.int64) * (BLOCK_P * C)
        if EVEN:
            xv = tl.load(x_ptr + base + off)
            tl.store(a_ptr + base + off, bn_relu(xv.to(tl.float32), scale, shift, True).to(a_ptr.dtype.element_ty))
        else:
            ok = (pb * BLOCK_P + rows < P)[:, None] & c_ok[None, :]
            xv = tl.load(x_ptr + base + off, mask=ok, other=0.0)
            tl.store(a_ptr + base + off, bn_relu(xv.to(tl.float32), scale, shift, ok).to(a_ptr.dtype.element_ty),
                     mask=ok)


@triton.jit
def bn_relu_conv_fwd_tma_kernel(
    a_ptr, w_ptr, b_ptr, y_ptr,
    C, CO, HO, WO, HQ, WQ, CIN_G, KR, NR, NSUB, TILES_H, TILES_W, NB,
    san, sah, sar, saw,
    swo, swh, sww,
    syn, syc, syh, syw,
    pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, KSUB: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, STAGES: tl.constexpr, SWAP: tl.constexpr, W2D: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr = True,
):
    """``y = conv2d(a, weight, bias)`` of one ``TILE_H x TILE_W`` output tile and one
    ``BLOCK_N`` block of a group's output channels (``KSUB`` input chunks of ``BLOCK_K`` per
    tap). ``TMA`` is always set (the launcher's cue for triton's descriptor scratch
    allocator)."""
    t = tl.program_id(0)
    cb = tl.program_id(1)
    act_ty = y_ptr.dtype.element_ty
    BM: tl.constexpr = TILE_H * TILE_W
    gblk = cb // NSUB
    n0 = (cb % NSUB) * BLOCK_N
    tw = t % TILES_W
    r = t // TILES_W
    th = r % TILES_H
    n = r // TILES_H
    th0 = th * TILE_H
    tw0 = tw * TILE_W
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[NB, HQ, SH, WQ, SW * C], strides=[san, sah, sar, saw, 1],
                                       block_shape=[1, TILE_H, 1, TILE_W, BLOCK_K])
    if W2D:  # dense channels-last weights, chunks dividing the group: [CO, KH * KW * CIN_G], a 2-D box
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[CO, KH * KW * CIN_G], strides=[swo, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[CO, KH, KW, CIN_G], strides=[swo, swh, sww, 1],
                                           block_shape=[BLOCK_N, 1, 1, BLOCK_K])
    co0 = gblk * NR + n0
    k_base = gblk * KR
    if SWAP:
        acc = tl.zeros([BLOCK_N, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    for s in tl.range(0, KH * KW * KSUB, num_stages=STAGES):
        tap = s // KSUB  # constexpr divisors: multiplies and shifts
        kc = s - tap * KSUB
        kh = tap // KW
        kw = tap - kh * KW
        qh, rh = tap_residue(kh, dil_h, pad_h, SH)
        qw, rw = tap_residue(kw, dil_w, pad_w, SW)
        av = a_desc.load([n, th0 + qh, rh, tw0 + qw, rw * C + k_base + kc * BLOCK_K]).reshape(BM, BLOCK_K)
        if W2D:
            wv = w_desc.load([co0, tap * CIN_G + kc * BLOCK_K])
        else:
            wv = w_desc.load([co0, kh, kw, kc * BLOCK_K]).reshape(BLOCK_N, BLOCK_K)
        if SWAP:  # the weights as the MMA's A operand, a straight from shared memory as its B
            acc = dot_acc(wv, tl.trans(av), acc, DOT_F32)
        else:
            acc = dot_acc(av, tl.trans(wv), acc, DOT_F32)

    m = tl.arange(0, BM)
    ho = th0 + m // TILE_W
    wo = tw0 + m % TILE_W
    m_ok = (ho < HO) & (wo < WO)
    n_loc = n0 + tl.arange(0, BLOCK_N)
    co = gblk * NR + n_loc
    n_ok = (n_loc < NR) & (co < CO)
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=n_ok, other=0.0).to(tl.float32)
    else:
        bias = 0.0
    if SWAP:
        if HAS_BIAS:
            acc += bias[:, None]
        y_off = (co * syc)[:, None] + (ho * syh + wo * syw)[None, :]
        tl.store(y_ptr + n.to(tl.int64) * syn + y_off, acc.to(act_ty), mask=n_ok[:, None] & m_ok[None, :])
    else:
        _store_tile(y_ptr, acc, bias, n, ho, wo, m_ok, co, n_ok, syn, syc, syh, syw, act_ty, HAS_BIAS)
