"""Forward of the fused op: ``y = conv2d(relu(bn(x)), weight, bias)`` as an implicit GEMM.

Rows of the GEMM are output positions ``(n, ho, wo)``; columns are output channels. Each
input tile is loaded with ``x``'s own strides, normalised and ReLU'd in registers (the
activation is never written to memory), and zeroed where the conv reads padding.

Two formulations, chosen by the ``USE_DOT`` constexpr:

* ``USE_DOT`` (groups with >= 16 input and output channels): a program owns a tile of one
  group's output channels and reduces over ``(kh, kw, ci)`` with ``tl.dot``.
* direct (small groups: ResNeXt's 4 channels per group, depthwise, a 3-channel stem): a
  program owns any ``BLOCK_N`` output channels, possibly of many groups, and accumulates
  ``a[m, ci(co)] * w[co, k]`` with FMAs, so no 16-wide matrix tile is spent on a 4-wide group.
"""
import triton
import triton.language as tl

from resfast.kernels.triton.bn_relu import bn_params, bn_relu, group_tile, position_rows


@triton.jit
def bn_relu_conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, y_ptr,
    M, H, W, CO, HO, WO, CIN_G, COUT_G,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m_mask, ho, wo, n64 = position_rows(pid_m, M, HO, WO, BLOCK_M)
    act_ty = y_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    if USE_DOT:
        g, co_local, co_mask, co = group_tile(pid_n, COUT_G, BLOCK_N)
    else:
        co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        co_mask = co < CO
        g_of_co = co // COUT_G
    w_co = co.to(tl.int64) * swo

    for kh in range(KH):
        hi = ho * stride_h - pad_h + kh * dil_h
        h_ok = m_mask & (hi >= 0) & (hi < H)
        for kw in range(KW):
            wi = wo * stride_w - pad_w + kw * dil_w
            sp_mask = h_ok & (wi >= 0) & (wi < W)
            x_row = n64 * sxn + hi * sxh + wi * sxw
            if USE_DOT:
                for k0 in range(0, CIN_G, BLOCK_K):
                    ck = k0 + tl.arange(0, BLOCK_K)
                    k_mask = ck < CIN_G
                    ci = g * CIN_G + ck
                    mean, scale, shift = bn_params(ci, k_mask, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                                                   HAS_GAMMA, HAS_BETA)
                    mask = sp_mask[:, None] & k_mask[None, :]
                    xv = tl.load(x_ptr + x_row[:, None] + (ci.to(tl.int64) * sxc)[None, :], mask=mask,
                                 other=0.0).to(tl.float32)
                    a = bn_relu(xv, mean, scale, shift, mask).to(act_ty)
                    wv = tl.load(w_ptr + w_co[None, :] + (ck * swi + kh * swh + kw * sww)[:, None],
                                 mask=k_mask[:, None] & co_mask[None, :], other=0.0)
                    if DOT_F32:
                        # the interpreter's bf16 dot is wrong: multiply the (rounded) bf16 values in fp32
                        acc = tl.dot(a.to(tl.float32), wv.to(tl.float32), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(a, wv, acc, input_precision="ieee")
            else:
                for k in range(0, CIN_G):
                    ci = g_of_co * CIN_G + k
                    mean, scale, shift = bn_params(ci, co_mask, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                                                   HAS_GAMMA, HAS_BETA)
                    mask = sp_mask[:, None] & co_mask[None, :]
                    xv = tl.load(x_ptr + x_row[:, None] + (ci.to(tl.int64) * sxc)[None, :], mask=mask,
                                 other=0.0).to(tl.float32)
                    # round the activation to the input dtype as the unfused conv sees it
                    a = bn_relu(xv, mean, scale, shift, mask).to(act_ty).to(tl.float32)
                    wv = tl.load(w_ptr + w_co + (k * swi + kh * swh + kw * sww), mask=co_mask,
                                 other=0.0).to(tl.float32)
                    acc += a * wv[None, :]

    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
    y_off = (n64 * syn + ho * syh + wo * syw)[:, None] + (co.to(tl.int64) * syc)[None, :]
    tl.store(y_ptr + y_off, acc.to(act_ty), mask=m_mask[:, None] & co_mask[None, :])


def _configs(dot: bool):
    if dot:
        shapes = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 128, 64, 4, 3),
                  (128, 32, 64, 4, 4), (64, 32, 32, 4, 4)]
    else:
        shapes = [(64, 32, 16, 4, 2), (128, 32, 16, 4, 2), (64, 64, 16, 4, 2), (128, 64, 16, 8, 2),
                  (256, 32, 16, 8, 2), (32, 128, 16, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


_KEY = ["M", "CO", "CIN_G", "COUT_G", "H", "W", "KH", "KW", "stride_h", "stride_w", "sxc", "syc"]

# CUDA entry points: a handful of tile shapes benchmarked once per shape key. The interpreter
# calls ``bn_relu_conv_fwd_kernel`` directly with one small tile (autotune would run them all).
bn_relu_conv_fwd_dot = triton.autotune(_configs(True), key=_KEY)(bn_relu_conv_fwd_kernel)
bn_relu_conv_fwd_direct = triton.autotune(_configs(False), key=_KEY)(bn_relu_conv_fwd_kernel)
