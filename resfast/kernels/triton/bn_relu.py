"""``@triton.jit`` helpers shared by the conv kernels: tile indexing and the BN-ReLU applied
in registers.

Channel vectors always run along the tile's second axis (columns); every kernel lays its
activation tiles out as ``[positions, channels]``.
"""
import triton
import triton.language as tl


@triton.jit
def bn_params(ci, ci_mask, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
              HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """Per-channel ``(mean, scale, shift)`` in float32 so that ``z = (x - mean) * scale + shift``."""
    mean = tl.load(mean_ptr + ci, mask=ci_mask, other=0.0).to(tl.float32)
    scale = tl.load(invstd_ptr + ci, mask=ci_mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + ci, mask=ci_mask, other=0.0).to(tl.float32)
    if HAS_BETA:
        shift = tl.load(beta_ptr + ci, mask=ci_mask, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros_like(mean)
    return mean, scale, shift


@triton.jit
def bn_relu(xv, mean, scale, shift, valid):
    """``relu((x - mean) * scale + shift)`` of a float32 ``[rows, channels]`` tile, zero where
    ``valid`` is false: conv padding is zeros of the *activation*, not ``bn(0)``.

    ``z < 0 ? 0 : z`` (not ``maximum``) so a NaN propagates as ``torch.relu`` propagates it.
    """
    z = (xv - mean[None, :]) * scale[None, :] + shift[None, :]
    a = tl.where(z < 0.0, 0.0, z)
    return tl.where(valid, a, 0.0)


@triton.jit
def position_rows(pid, M, HH, WW, BLOCK_M: tl.constexpr):
    """Rows ``pid * BLOCK_M + [0, BLOCK_M)`` of the ``N x HH x WW`` positions: ``(mask, h, w, n)``,
    with ``n`` as int64 so batch offsets cannot overflow."""
    offs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    w = offs % WW
    t = offs // WW
    return offs < M, t % HH, w, (t // HH).to(tl.int64)


@triton.jit
def group_tile(pid, C_G, BLOCK: tl.constexpr):
    """The channel tile of program ``pid`` when tiles never straddle groups: tile
    ``pid % tiles`` of group ``pid // tiles``. Returns ``(group, local, mask, channel)``."""
    tiles_per_group = tl.cdiv(C_G, BLOCK)
    g = pid // tiles_per_group
    local = (pid % tiles_per_group) * BLOCK + tl.arange(0, BLOCK)
    return g, local, local < C_G, g * C_G + local
