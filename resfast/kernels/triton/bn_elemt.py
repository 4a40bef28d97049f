"""The elementwise BN input gradient ``gamma * invstd * (grad_z - mean_dz - xhat * mean_dz_xhat)``,
with ``mean_dz = sum_dz * inv_count`` and ``mean_dz_xhat = sum_dz_xhat * inv_count``, written
into ``out`` or (``ACCUMULATE``) added to it in float32 and rounded once.

Tiles are ``[BLOCK_P, BLOCK_C]`` (positions x channels) so both NCHW and channels_last
strides read coalesced along one axis; every tensor has its own strides.
"""
import triton
import triton.language as tl


@triton.jit
def bn_backward_elemt_kernel(
    gz_ptr, x_ptr, gx_ptr, gamma_ptr, mean_ptr, invstd_ptr, sdz_ptr, sdzx_ptr, inv_count,
    C, HW, W, P,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    HAS_GAMMA: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < P
    c_mask = c < C
    mask = p_mask[:, None] & c_mask[None, :]
    n = (p // HW).to(tl.int64)
    hw = p % HW
    h = hw // W
    w = hw % W
    c64 = c.to(tl.int64)
    gz = tl.load(gz_ptr + (n * sgn + h * sgh + w * sgw)[:, None] + (c64 * sgc)[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + (c64 * sxc)[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    # inv_count 0 (running statistics): no coupling at all, so a NaN sum does not become NaN * 0.
    coupled = c_mask & (inv_count != 0.0)
    mdz = tl.load(sdz_ptr + c, mask=coupled, other=0.0) * inv_count
    mdzx = tl.load(sdzx_ptr + c, mask=coupled, other=0.0) * inv_count
    scale = invstd
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    xhat = (xv - mean[None, :]) * invstd[None, :]
    # A zero mean_dz_xhat (running statistics) drops the xhat term outright, so a NaN in x
    # gives a NaN gradient only where eager's batch-norm backward gives one.
    xterm = tl.where(mdzx[None, :] == 0.0, 0.0, xhat * mdzx[None, :])
    gx = scale[None, :] * (gz - mdz[None, :] - xterm)
    out = gx_ptr + (n * son + h * soh + w * sow)[:, None] + (c64 * soc)[None, :]
    if ACCUMULATE:
        gx += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, gx.to(gx_ptr.dtype.element_ty), mask=mask)
