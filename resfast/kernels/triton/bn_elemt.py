"""The elementwise BN input gradient ``gamma * invstd * (grad_z - mean_dz - xhat * mean_dz_xhat)``.

Tiles are ``[BLOCK_P, BLOCK_C]`` (positions x channels) so both NCHW and channels_last
strides read coalesced along one axis; every tensor has its own strides.
"""
import triton
import triton.language as tl


@triton.jit
def bn_backward_elemt_kernel(
    gz_ptr, x_ptr, gx_ptr, gamma_ptr, mean_ptr, invstd_ptr, mdz_ptr, mdzx_ptr,
    C, HW, W, P,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    HAS_GAMMA: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
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
    mdz = tl.load(mdz_ptr + c, mask=c_mask, other=0.0)
    mdzx = tl.load(mdzx_ptr + c, mask=c_mask, other=0.0)
    scale = invstd
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    xhat = (xv - mean[None, :]) * invstd[None, :]
    # A zero mean_dz_xhat (running statistics) drops the xhat term outright, so a NaN in x
    # gives a NaN gradient only where eager's batch-norm backward gives one.
    xterm = tl.where(mdzx[None, :] == 0.0, 0.0, xhat * mdzx[None, :])
    gx = scale[None, :] * (gz - mdz[None, :] - xterm)
    tl.store(gx_ptr + (n * son + h * soh + w * sow)[:, None] + (c64 * soc)[None, :],
             gx.to(gx_ptr.dtype.element_ty), mask=mask)
