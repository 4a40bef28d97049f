"""``@triton.jit`` helpers shared by the conv kernels: the BN-ReLU applied in registers, the
2-D spatial tiles, and the channel blocks that pack several small groups into one MMA tile.

Channel vectors always run along a tile's second axis (columns); activation tiles are laid
out as ``[positions, channels]``.

Channel blocks (the packing of small groups): a *group block* is ``GP`` consecutive groups
(``GP > 1`` only when groups are narrower than one MMA tile). Its input channels are the
``KR = GP * CIN_G`` channels ``[gb * KR, (gb + 1) * KR)`` and its output channels the
``NR = GP * COUT_G`` channels ``[gb * NR, (gb + 1) * NR)``; a weight tile of a group block is
block-diagonal (element ``(k, n)`` is zero unless ``k // CIN_G == n // COUT_G``), so one MMA
covers ``GP`` groups and each input element is loaded and normalised once per tile.
"""
import triton
import triton.language as tl


@triton.jit
def bn_params(ci, ci_mask, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
              HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """Per-channel float32 ``(scale, shift)`` with ``z = x * scale + shift`` =
    ``(x - mean) * invstd * gamma + beta``: one FMA per element in the kernels."""
    mean = tl.load(mean_ptr + ci, mask=ci_mask, other=0.0).to(tl.float32)
    scale = tl.load(invstd_ptr + ci, mask=ci_mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + ci, mask=ci_mask, other=0.0).to(tl.float32)
    if HAS_BETA:
        shift = tl.load(beta_ptr + ci, mask=ci_mask, other=0.0).to(tl.float32) - mean * scale
    else:
        shift = -mean * scale
    return scale, shift


@triton.jit
def channel_block(k_loc, gblk, KR, C, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA: tl.constexpr,
                  HAS_BETA: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The input channels ``ci`` of group block ``gblk``'s local channels ``k_loc`` (``KR``
    per block), their validity (``EVEN_K``: every block full, no masks) and BN
    ``(scale, shift)``: ``(ci, k_ok, scale, shift)``."""
    ci = gblk * KR + k_loc
    if EVEN_K:
        k_ok = tl.full([BLOCK_K], 1, tl.int1)
    else:
        k_ok = (k_loc < KR) & (ci < C)
    scale, shift = bn_params(ci, k_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_GAMMA, HAS_BETA)
    return ci, k_ok, scale, shift


@triton.jit
def bn_relu(xv, scale, shift, valid):
    """``relu(x * scale + shift)`` of a float32 ``[rows, channels]`` tile, zero where ``valid``
    is false: conv padding is zeros of the *activation*, not ``bn(0)``. The ReLU propagates
    NaN as ``torch.relu`` does."""
    a = tl.maximum(xv * scale[None, :] + shift[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(valid, a, 0.0)


@triton.jit
def tile_origin(t, TILES_H, TILES_W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Spatial tile ``t`` (image-major, then rows, then columns) of ``TILE_H x TILE_W``
    positions: ``(n, first row, first column)``. Positions inside a tile come from
    ``m // TILE_W`` and ``m % TILE_W`` with a constexpr power-of-two divisor (shifts), never a
    per-element runtime div/mod.

    Offsets convention of the conv kernels: a scalar int64 base pointer per image
    (``ptr + n.to(tl.int64) * stride_n``) and int32 offsets inside it (the host checks that
    one image's span fits int32), so the per-element address arithmetic stays 32-bit."""
    tw = t % TILES_W
    rest = t // TILES_W
    th = rest % TILES_H
    return rest // TILES_H, th * TILE_H, tw * TILE_W


@triton.jit
def tile_digits(t, R0, R1, R2, R3):
    """The digits of tile ``t`` in the mixed radix ``(R3, R2, R1, R0)`` (``R0`` the fastest:
    ``t = (((d4 * R3 + d3) * R2 + d2) * R1 + d1) * R0 + d0``): ``(d0, d1, d2, d3, d4)``. A
    persistent tile loop takes them once per program and then advances with
    :func:`tile_next` (adds and compares, a radix of 1 folds away), the step's digits
    computed on the host (:func:`resfast.ops.triton_ops._digits`)."""
    d0 = t % R0
    r = t // R0
    d1 = r % R1
    r = r // R1
    d2 = r % R2
    r = r // R2
    return d0, d1, d2, r % R3, r // R3


@triton.jit
def _digit_add(d, s, carry, R):
    # a radix of 1 (a constant when the runtime specialises it) makes the digit a constant 0
    d = d + tl.where(R == 1, 0, s) + carry
    c = d >= R
    return tl.where(c, d - R, d), c.to(tl.int32)


@triton.jit
def tile_next(d0, d1, d2, d3, d4, s0, s1, s2, s3, s4, R0, R1, R2, R3):
    """The digits of the tile ``step`` after ``(d0, .., d4)`` (see :func:`tile_digits`): each
    digit is below its radix and each step digit too, so one conditional subtract per digit."""
    d0, c = _digit_add(d0, s0, 0, R0)
    d1, c = _digit_add(d1, s1, c, R1)
    d2, c = _digit_add(d2, s2, c, R2)
    d3, c = _digit_add(d3, s3, c, R3)
    return d0, d1, d2, d3, d4 + s4 + c


@triton.jit
def tile_next2(d0, d1, d2, s0, s1, s2, R0, R1):
    """:func:`tile_next` of a radix ``(R1, R0)`` walk (digits ``d0, d1`` and the rest ``d2``)."""
    d0, c = _digit_add(d0, s0, 0, R0)
    d1, c = _digit_add(d1, s1, c, R1)
    return d0, d1, d2 + s2 + c


@triton.jit
def tap_residue(k, dil, pad, S):
    """Where kernel tap ``k`` reads, in a stride-``S`` axis seen as ``[size / S, S]`` (the TMA
    views of a stored ``a``): output position ``o`` reads input ``o * S + k * dil - pad =
    (o + q) * S + r``; returns ``(q, r)``, ``0 <= r < S`` (floor division kept off negatives)."""
    off = k * dil - pad
    q = (off + S * (pad + 1)) // S - (pad + 1)
    return q, off - q * S


@triton.jit
def dot_acc(a, b, acc, DOT_F32: tl.constexpr):
    """``acc + a @ b`` on tensor cores for 16-bit operands, exact float32 FMAs for float32
    operands; ``DOT_F32`` multiplies (already rounded) 16-bit values in float32, for the CPU
    interpreter whose bfloat16 dot is wrong."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def any_nonfinite(acc):
    """Whether a tile holds a NaN or an infinity (``x - x`` is NaN exactly then). Packed
    small groups share one MMA, where ``0 * NaN`` would carry one group's NaN into its
    neighbours' outputs; a tile that shows one is recomputed group by group."""
    return tl.sum(((acc - acc) != 0.0).to(tl.int32)) > 0


@triton.jit
def mma_columns(v, a_like, b_like, DOT_F32: tl.constexpr):
    """``v``, a float32 per-channel vector of an MMA's N columns, bit for bit, placed in the
    column layout of the MMA's result (``a_like @ b_like``, only their shapes and types read):
    OR-ed with the zero bits of the column sums of one MMA of zeros. Compiled, layout
    propagation then keeps an epilogue that mixes the result with ``v`` in the MMA's layout,
    and converts a loaded ``[positions, channels]`` tile to it once, instead of computing in
    the load's layout (each thread holding twice the channels of these vectors) and
    converting both ways through shared memory. Once per program; the values are unchanged."""
    zero = dot_acc(tl.zeros(a_like.shape, a_like.dtype), tl.zeros(b_like.shape, b_like.dtype),
                   tl.zeros([a_like.shape[0], b_like.shape[1]], tl.float32), DOT_F32)
    return (v.to(tl.int32, bitcast=True) | tl.sum(zero, axis=0).to(tl.int32, bitcast=True)).to(tl.float32,
                                                                                               bitcast=True)
