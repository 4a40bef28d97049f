// Arithmetic shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels of the resfast ops.
//
// Every formula is written once here as an inline function that both compilers see: nvcc
// compiles them as __host__ __device__, the plain C++ compiler as ordinary inline functions.
// The CPU tests therefore exercise the same index math and the same per-element formulas the
// GPU runs; the kernels only decide which thread computes which element.
//
// Accumulation type `acc_t` is float for float/half/bfloat16 and double for double
// (at::opmath_type). Indices are 64-bit throughout: a tensor may exceed 2^31 elements.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RESFAST_HD __host__ __device__ __forceinline__
#else
#define RESFAST_HD inline
#endif

namespace resfast {

// Strides (in elements) of a 4-D tensor in logical N, C, H, W order; any layout, any view.
struct Strides4 {
  int64_t n, c, h, w;
};

// Shape of one 2-D convolution: input N x C x H x W, weight Cout x (C/groups) x KH x KW,
// output N x Cout x Ho x Wo.
struct ConvGeom {
  int64_t N, C, H, W;
  int64_t Cout, Ho, Wo;
  int64_t KH, KW;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t groups, cin_g, cout_g;
};

// Per-channel batch-norm parameters in the accumulation type, all of length C and contiguous.
// gamma / beta are filled with 1 / 0 by the host when the op got bn_weight / bn_bias = None,
// so the formula below needs no branches.
template <typename acc_t>
struct BNParams {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* gamma;
  const acc_t* beta;
};

// ---------------------------------------------------------------------------------------
// Batch norm + ReLU

// z = (x - mean) * invstd * gamma + beta: the BN output before the ReLU, in the order the
// eager reference (resfast/ops/eager_impl.py::bn_relu) evaluates it.
template <typename acc_t>
RESFAST_HD acc_t bn_affine(acc_t x, acc_t mean, acc_t invstd, acc_t gamma, acc_t beta) {
  return (x - mean) * invstd * gamma + beta;
}

// NaN passes through, as torch.relu lets it.
template <typename acc_t>
RESFAST_HD acc_t relu(acc_t z) {
  return z < acc_t(0) ? acc_t(0) : z;
}

// As torch.relu's backward (threshold_backward): zero where the input was <= 0, so a NaN
// input passes its gradient through.
template <typename acc_t>
RESFAST_HD acc_t relu_backward(acc_t grad_a, acc_t z) {
  return z <= acc_t(0) ? acc_t(0) : grad_a;
}

template <typename acc_t>
RESFAST_HD acc_t bn_xhat(acc_t x, acc_t mean, acc_t invstd) {
  return (x - mean) * invstd;
}

// dL/dx = gamma * invstd * (grad_z - mean_dz - xhat * mean_dz_xhat); with running statistics
// the two means are zero and this is grad_z * gamma * invstd. A zero mean_dz_xhat drops the
// coupling term altogether (eager BN's eval backward has none), so a NaN x does not turn
// into NaN * 0 there.
template <typename acc_t>
RESFAST_HD acc_t bn_backward_elemt(acc_t grad_z, acc_t x, acc_t mean, acc_t invstd, acc_t gamma, acc_t mean_dz,
                                   acc_t mean_dz_xhat) {
  const acc_t coupling = mean_dz_xhat == acc_t(0) ? acc_t(0) : bn_xhat(x, mean, invstd) * mean_dz_xhat;
  return invstd * gamma * (grad_z - mean_dz - coupling);
}

// ---------------------------------------------------------------------------------------
// Welford's running mean / M2, and Chan's pairwise merge of two partial states. A thread (or
// a CPU chunk) accumulates with welford_add, partial states combine with welford_merge; the
// result does not lose precision on large channels the way sum / sum-of-squares does.

template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;
  int64_t n;
};

template <typename acc_t>
RESFAST_HD Welford<acc_t> welford_init() {
  Welford<acc_t> s;
  s.mean = acc_t(0);
  s.m2 = acc_t(0);
  s.n = 0;
  return s;
}

template <typename acc_t>
RESFAST_HD void welford_add(Welford<acc_t>& s, acc_t v) {
  s.n += 1;
  const acc_t d = v - s.mean;
  s.mean += d / acc_t(s.n);
  s.m2 += d * (v - s.mean);
}

template <typename acc_t>
RESFAST_HD Welford<acc_t> welford_merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  Welford<acc_t> r;
  r.n = a.n + b.n;
  const acc_t d = b.mean - a.mean;
  const acc_t fb = acc_t(b.n) / acc_t(r.n);
  r.mean = a.mean + d * fb;
  r.m2 = a.m2 + b.m2 + d * d * acc_t(a.n) * fb;
  return r;
}

// Biased variance, as BN's batch statistics use.
template <typename acc_t>
RESFAST_HD acc_t welford_var(const Welford<acc_t>& s) {
  return s.m2 / acc_t(s.n);
}

// bn_stats_update's running statistics as the kernels see them: pointers (null: none) and
// element strides (any stride: a view of a larger buffer is updated in place).
template <typename stat_t>
struct RunningPtrs {
  stat_t* mean;
  int64_t mean_stride;
  stat_t* var;
  int64_t var_stride;
};

// bn_stats_update's finalize of channel c: returns invstd = 1 / sqrt(var + eps) from the
// biased batch variance and, when running statistics are given, moves them as F.batch_norm
// does: running = (1 - momentum) * running + momentum * batch, the variance unbiased
// (unbias = count / (count - 1)). In double whatever the dtypes: one channel's worth.
template <typename acc_t, typename stat_t>
RESFAST_HD acc_t bn_finalize_update(acc_t mean, acc_t var, double eps, double momentum, double unbias,
                                    const RunningPtrs<stat_t>& running, int64_t c) {
  if (running.mean != nullptr) {
    stat_t* rm = running.mean + c * running.mean_stride;
    stat_t* rv = running.var + c * running.var_stride;
    *rm = static_cast<stat_t>((1.0 - momentum) * static_cast<double>(*rm) + momentum * static_cast<double>(mean));
    *rv = static_cast<stat_t>((1.0 - momentum) * static_cast<double>(*rv) + momentum * static_cast<double>(var) * unbias);
  }
  return static_cast<acc_t>(1.0 / sqrt(static_cast<double>(var) + eps));
}

// ---------------------------------------------------------------------------------------
// Index math

// Element offset of position p in [0, N*H*W) of channel c (p runs n-major, then h, then w).
RESFAST_HD int64_t channel_offset(int64_t p, int64_t c, int64_t H, int64_t W, const Strides4& s) {
  const int64_t hw = H * W;
  const int64_t n = p / hw;
  const int64_t r = p - n * hw;
  const int64_t h = r / W;
  const int64_t w = r - h * W;
  return n * s.n + c * s.c + h * s.h + w * s.w;
}

struct Index4 {
  int64_t n, c, h, w;
};

// Logical (n, c, h, w) of the i-th element of an N x C x H x W tensor, enumerated in memory
// order of an NCHW-contiguous tensor or, with channels_last, of an NHWC one; consecutive GPU
// threads then touch consecutive addresses of the output.
RESFAST_HD Index4 unravel(int64_t i, int64_t C, int64_t H, int64_t W, bool channels_last) {
  Index4 r;
  if (channels_last) {
    r.c = i % C;
    i /= C;
    r.w = i % W;
    i /= W;
    r.h = i % H;
    r.n = i / H;
  } else {
    r.w = i % W;
    i /= W;
    r.h = i % H;
    i /= H;
    r.c = i % C;
    r.n = i / C;
  }
  return r;
}

RESFAST_HD int64_t offset4(const Index4& i, const Strides4& s) {
  return i.n * s.n + i.c * s.c + i.h * s.h + i.w * s.w;
}

// Input coordinate read by output coordinate o through kernel tap k.
RESFAST_HD int64_t conv_in_coord(int64_t o, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return o * stride - pad + k * dil;
}

// Output coordinate that reads input coordinate i through kernel tap k, or -1 if none does.
RESFAST_HD int64_t conv_out_coord(int64_t i, int64_t k, int64_t stride, int64_t pad, int64_t dil, int64_t out_size) {
  const int64_t t = i + pad - k * dil;
  if (t < 0 || t % stride != 0) return -1;
  const int64_t o = t / stride;
  return o < out_size ? o : -1;
}

// Offset of weight element (co, cil, kh, kw) of a contiguous Cout x cin_g x KH x KW weight.
RESFAST_HD int64_t weight_offset(const ConvGeom& g, int64_t co, int64_t cil, int64_t kh, int64_t kw) {
  return ((co * g.cin_g + cil) * g.KH + kh) * g.KW + kw;
}

// ---------------------------------------------------------------------------------------
// Convolution points: each returns one element of a result, computed the same way on both
// devices. BN + ReLU are applied to x as it is loaded; the activation is never stored.

// Forward: sum over the group's input channels and the kernel taps of relu(bn(x)) * w, at
// output (n, co, oh, ow), without the conv bias.
template <typename scalar_t, typename acc_t>
RESFAST_HD acc_t conv_forward_point(const scalar_t* x, const Strides4& xs, const scalar_t* w,
                                    const BNParams<acc_t>& bn, const ConvGeom& g, int64_t n, int64_t co, int64_t oh,
                                    int64_t ow) {
  const int64_t group = co / g.cout_g;
  acc_t acc = acc_t(0);
  for (int64_t cil = 0; cil < g.cin_g; ++cil) {
    const int64_t ci = group * g.cin_g + cil;
    const acc_t mean = bn.mean[ci], invstd = bn.invstd[ci], gamma = bn.gamma[ci], beta = bn.beta[ci];
    const scalar_t* xc = x + n * xs.n + ci * xs.c;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = conv_in_coord(oh, kh, g.sh, g.ph, g.dh);
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t iw = conv_in_coord(ow, kw, g.sw, g.pw, g.dw);
        if (iw < 0 || iw >= g.W) continue;
        const acc_t a = relu(bn_affine(static_cast<acc_t>(xc[ih * xs.h + iw * xs.w]), mean, invstd, gamma, beta));
        acc += a * static_cast<acc_t>(w[weight_offset(g, co, cil, kh, kw)]);
      }
    }
  }
  return acc;
}

// Backward to the conv input: dL/da at input (n, ci, ih, iw), summed over the group's output
// channels and every tap through which an output reads that input.
template <typename scalar_t, typename acc_t>
RESFAST_HD acc_t conv_input_grad_point(const scalar_t* grad_out, const Strides4& gs, const scalar_t* w,
                                       const ConvGeom& g, int64_t n, int64_t ci, int64_t ih, int64_t iw) {
  const int64_t group = ci / g.cin_g;
  const int64_t cil = ci - group * g.cin_g;
  acc_t acc = acc_t(0);
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    const int64_t oh = conv_out_coord(ih, kh, g.sh, g.ph, g.dh, g.Ho);
    if (oh < 0) continue;
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const int64_t ow = conv_out_coord(iw, kw, g.sw, g.pw, g.dw, g.Wo);
      if (ow < 0) continue;
      const scalar_t* go = grad_out + n * gs.n + oh * gs.h + ow * gs.w;
      for (int64_t col = 0; col < g.cout_g; ++col) {
        const int64_t co = group * g.cout_g + col;
        acc += static_cast<acc_t>(go[co * gs.c]) * static_cast<acc_t>(w[weight_offset(g, co, cil, kh, kw)]);
      }
    }
  }
  return acc;
}

// Backward to the weight: the term of dL/dw[co, cil, kh, kw] contributed by output position
// p in [0, N*Ho*Wo), i.e. grad_out[n, co, oh, ow] * relu(bn(x[n, ci, ih, iw])).
template <typename scalar_t, typename acc_t>
RESFAST_HD acc_t conv_weight_grad_term(const scalar_t* grad_out, const Strides4& gs, const scalar_t* x,
                                       const Strides4& xs, const BNParams<acc_t>& bn, const ConvGeom& g, int64_t co,
                                       int64_t ci, int64_t kh, int64_t kw, int64_t p) {
  const int64_t hw = g.Ho * g.Wo;
  const int64_t n = p / hw;
  const int64_t r = p - n * hw;
  const int64_t oh = r / g.Wo;
  const int64_t ow = r - oh * g.Wo;
  const int64_t ih = conv_in_coord(oh, kh, g.sh, g.ph, g.dh);
  const int64_t iw = conv_in_coord(ow, kw, g.sw, g.pw, g.dw);
  if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return acc_t(0);
  const acc_t a = relu(bn_affine(static_cast<acc_t>(x[n * xs.n + ci * xs.c + ih * xs.h + iw * xs.w]), bn.mean[ci],
                                 bn.invstd[ci], bn.gamma[ci], bn.beta[ci]));
  return a * static_cast<acc_t>(grad_out[n * gs.n + co * gs.c + oh * gs.h + ow * gs.w]);
}

}  // namespace resfast
