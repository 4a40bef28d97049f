// CUDA kernels of the resfast ops (reference semantics: resfast/ops/reference.py) and their
// registration.
//
// The convs come in two forms:
//  * tiled (conv_kernels.cuh, launched from conv_forward.cu, conv_input_grad.cu and
//    conv_weight_grad.cu): implicit GEMMs on tensor cores (float16 / bfloat16; SIMT for
//    float32 / float64), the block programs of resfast/tiles.h that the CPU twin runs too;
//  * generic (here): one thread per output element (or one block per reduced element),
//    reading global memory through the per-element functions of resfast/math.h; any shape,
//    used where no tile plan fits and under RESFAST_NATIVE_KERNELS=generic.
// Reductions write per-block partials that are summed afterwards in a fixed order, so
// results do not depend on scheduling (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "resfast/host.h"
#include "resfast/math.h"
#include "launch.h"

namespace resfast {
namespace {

// Threads of the BN and generic kernels' blocks (the tiled conv kernels use tiles.h's kBlockThreads).
constexpr int kBlockThreads = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks for a grid-stride element-wise loop over `total` elements.
int64_t elementwise_blocks(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kBlockThreads), sm_count() * 32));
}

// Blocks along the reduced dimension (P positions) for `outer` independent reductions:
// enough blocks overall to fill the GPU, at least a few elements per thread.
int64_t reduction_splits(int64_t outer, int64_t P) {
  int64_t s = ceil_div(4 * sm_count(), std::max<int64_t>(outer, 1));
  s = std::min<int64_t>(s, ceil_div(P, kBlockThreads * 4));
  return std::max<int64_t>(1, std::min<int64_t>(s, 65535));
}

void check_cuda(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor for the CUDA kernel, got ", x.device());
}

// Sum of v over the block; the result is valid in thread 0. smem holds kBlockThreads / 32 values.
template <typename T>
__device__ T block_sum(T v, T* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by the previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? smem[lane] : T(0);
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// ---------------------------------------------------------------------------------------
// bn_stats: grid (C, splits); each thread runs Welford over its positions, the block merges
// with Chan's formula, and a second kernel merges the splits of each channel.

template <typename scalar_t, typename acc_t>
__global__ void bn_stats_partial_kernel(const scalar_t* __restrict__ x, Strides4 xs, int64_t H, int64_t W, int64_t P,
                                        int64_t chunk, acc_t* __restrict__ pmean, acc_t* __restrict__ pm2,
                                        int64_t* __restrict__ pn) {
  __shared__ acc_t s_mean[kBlockThreads];
  __shared__ acc_t s_m2[kBlockThreads];
  __shared__ int64_t s_n[kBlockThreads];
  const int64_t c = blockIdx.x, split = blockIdx.y;
  const int64_t begin = split * chunk, end = begin + chunk < P ? begin + chunk : P;
  Welford<acc_t> st = welford_init<acc_t>();
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
    welford_add(st, static_cast<acc_t>(x[channel_offset(p, c, H, W, xs)]));
  }
  s_mean[threadIdx.x] = st.mean;
  s_m2[threadIdx.x] = st.m2;
  s_n[threadIdx.x] = st.n;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      Welford<acc_t> a{s_mean[threadIdx.x], s_m2[threadIdx.x], s_n[threadIdx.x]};
      Welford<acc_t> b{s_mean[threadIdx.x + half], s_m2[threadIdx.x + half], s_n[threadIdx.x + half]};
      const Welford<acc_t> m = welford_merge(a, b);
      s_mean[threadIdx.x] = m.mean;
      s_m2[threadIdx.x] = m.m2;
      s_n[threadIdx.x] = m.n;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int64_t i = c * gridDim.y + split;
    pmean[i] = s_mean[0];
    pm2[i] = s_m2[0];
    pn[i] = s_n[0];
  }
}

// bn_stats for channels-last x, where a channel's elements are C apart: a block of
// 32 x 8 threads covers 32 consecutive channels (threadIdx.x, contiguous in memory) and 8
// position lanes (threadIdx.y); grid (ceil(C/32), splits). Same partial layout as above.
constexpr int kStatsChannels = 32, kStatsLanes = 8;

template <typename scalar_t, typename acc_t>
__global__ void bn_stats_partial_cl_kernel(const scalar_t* __restrict__ x, Strides4 xs, int64_t C, int64_t H,
                                           int64_t W, int64_t P, int64_t chunk, acc_t* __restrict__ pmean,
                                           acc_t* __restrict__ pm2, int64_t* __restrict__ pn) {
  __shared__ acc_t s_mean[kStatsLanes][kStatsChannels];
  __shared__ acc_t s_m2[kStatsLanes][kStatsChannels];
  __shared__ int64_t s_n[kStatsLanes][kStatsChannels];
  const int64_t c = blockIdx.x * int64_t(kStatsChannels) + threadIdx.x, split = blockIdx.y;
  const int64_t begin = split * chunk, end = begin + chunk < P ? begin + chunk : P;
  Welford<acc_t> st = welford_init<acc_t>();
  if (c < C) {
    for (int64_t p = begin + threadIdx.y; p < end; p += kStatsLanes) {
      welford_add(st, static_cast<acc_t>(x[channel_offset(p, c, H, W, xs)]));
    }
  }
  s_mean[threadIdx.y][threadIdx.x] = st.mean;
  s_m2[threadIdx.y][threadIdx.x] = st.m2;
  s_n[threadIdx.y][threadIdx.x] = st.n;
  __syncthreads();
  for (int half = kStatsLanes / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half) {
      const int y = threadIdx.y, x_ = threadIdx.x;
      Welford<acc_t> a{s_mean[y][x_], s_m2[y][x_], s_n[y][x_]};
      Welford<acc_t> b{s_mean[y + half][x_], s_m2[y + half][x_], s_n[y + half][x_]};
      const Welford<acc_t> m = welford_merge(a, b);
      s_mean[y][x_] = m.mean;
      s_m2[y][x_] = m.m2;
      s_n[y][x_] = m.n;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) {
    const int64_t i = c * gridDim.y + split;
    pmean[i] = s_mean[0][threadIdx.x];
    pm2[i] = s_m2[0][threadIdx.x];
    pn[i] = s_n[0][threadIdx.x];
  }
}

// Channel c's Welford state, the per-split partials merged in split order.
template <typename acc_t>
__device__ Welford<acc_t> merge_partials(const acc_t* __restrict__ pmean, const acc_t* __restrict__ pm2,
                                         const int64_t* __restrict__ pn, int64_t c, int64_t splits) {
  Welford<acc_t> st = welford_init<acc_t>();
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t i = c * splits + s;
    st = welford_merge(st, Welford<acc_t>{pmean[i], pm2[i], pn[i]});
  }
  return st;
}

template <typename acc_t>
__global__ void bn_stats_finalize_kernel(const acc_t* __restrict__ pmean, const acc_t* __restrict__ pm2,
                                         const int64_t* __restrict__ pn, int64_t C, int64_t splits,
                                         acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const Welford<acc_t> st = merge_partials(pmean, pm2, pn, c, splits);
  mean[c] = st.mean;
  var[c] = welford_var(st);
}

// bn_stats_update's finalize: the same merge, then math.h bn_finalize_update (invstd, and the
// running statistics moved in place when given).
template <typename acc_t, typename stat_t>
__global__ void bn_stats_finalize_update_kernel(const acc_t* __restrict__ pmean, const acc_t* __restrict__ pm2,
                                                const int64_t* __restrict__ pn, int64_t C, int64_t splits,
                                                double eps, double momentum, double unbias,
                                                acc_t* __restrict__ mean, acc_t* __restrict__ invstd,
                                                RunningPtrs<stat_t> running) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const Welford<acc_t> st = merge_partials(pmean, pm2, pn, c, splits);
  mean[c] = st.mean;
  invstd[c] = bn_finalize_update<acc_t, stat_t>(st.mean, welford_var(st), eps, momentum, unbias, running, c);
}

// The per-split Welford partials of x's channels (one launch); the finalize merges them.
struct StatsPartials {
  at::Tensor pmean, pm2, pn;
  int64_t splits;
};

StatsPartials bn_stats_partials(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t P = N * H * W;
  const auto opts = x.options().dtype(acc_dtype(x));
  const bool cl = is_channels_last(x);
  const int64_t splits = reduction_splits(cl ? ceil_div(C, kStatsChannels) : C, P);
  const int64_t chunk = ceil_div(P, splits);
  StatsPartials r{at::empty({C * splits}, opts), at::empty({C * splits}, opts),
                  at::empty({C * splits}, x.options().dtype(at::kLong)), splits};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (cl) {
      bn_stats_partial_cl_kernel<scalar_t, acc_t>
          <<<dim3(ceil_div(C, kStatsChannels), splits), dim3(kStatsChannels, kStatsLanes), 0, stream>>>(
              x.const_data_ptr<scalar_t>(), strides4(x), C, H, W, P, chunk, r.pmean.data_ptr<acc_t>(),
              r.pm2.data_ptr<acc_t>(), r.pn.data_ptr<int64_t>());
    } else {
      bn_stats_partial_kernel<scalar_t, acc_t><<<dim3(C, splits), kBlockThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), strides4(x), H, W, P, chunk, r.pmean.data_ptr<acc_t>(),
          r.pm2.data_ptr<acc_t>(), r.pn.data_ptr<int64_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return r;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x) {
  const char* op = "resfast::bn_stats";
  check_bn_stats(op, x);
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts);
  if (C == 0) return {mean, var};
  if (N * H * W == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const StatsPartials p = bn_stats_partials(x);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "resfast_bn_stats_finalize_cuda", [&] {
    using acc_t = scalar_t;
    bn_stats_finalize_kernel<acc_t><<<ceil_div(C, kBlockThreads), kBlockThreads, 0, stream>>>(
        p.pmean.const_data_ptr<acc_t>(), p.pm2.const_data_ptr<acc_t>(), p.pn.const_data_ptr<int64_t>(), C, p.splits,
        mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

// The training statistics and the running statistics' update in two launches (the partials,
// then one finalize that merges them, writes mean and invstd and moves the running statistics),
// where composing bn_stats with ATen's in-place ops took nine. The versions of running_mean /
// running_var are bumped by the op's ADInplaceOrView kernel (csrc/resfast.cpp).
std::tuple<at::Tensor, at::Tensor> bn_stats_update_cuda(const at::Tensor& x, const OptTensor& running_mean,
                                                        const OptTensor& running_var, double momentum, double eps) {
  const char* op = "resfast::bn_stats_update";
  check_bn_stats(op, x);
  check_cuda(op, x);
  check_running_stats(op, x, running_mean, running_var);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor mean = at::empty({C}, opts), invstd = at::empty({C}, opts);
  if (C == 0) return {mean, invstd};
  if (N * H * W == 0) {  // no positions: NaN statistics, and NaN moved into the running ones
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    invstd.fill_(std::numeric_limits<double>::quiet_NaN());
    if (running_mean.has_value()) {
      running_mean->fill_(std::numeric_limits<double>::quiet_NaN());
      running_var->fill_(std::numeric_limits<double>::quiet_NaN());
    }
    return {mean, invstd};
  }
  const StatsPartials p = bn_stats_partials(x);
  const double unbias = running_var_unbias(x);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "resfast_bn_stats_update_cuda", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_stats_type(running_mean, mean.scalar_type()),
                                    "resfast_bn_stats_update_cuda_running", [&] {
      bn_stats_finalize_update_kernel<acc_t, scalar_t><<<ceil_div(C, kBlockThreads), kBlockThreads, 0, stream>>>(
          p.pmean.const_data_ptr<acc_t>(), p.pm2.const_data_ptr<acc_t>(), p.pn.const_data_ptr<int64_t>(), C,
          p.splits, eps, momentum, unbias, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
          running_ptrs<scalar_t>(running_mean, running_var));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {mean, invstd};
}

// ---------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, typename acc_t>
__global__ void forward_generic_kernel(const scalar_t* __restrict__ x, Strides4 xs, const scalar_t* __restrict__ w,
                                       BNParams<acc_t> bn, const acc_t* __restrict__ bias, ConvGeom g, bool out_cl,
                                       scalar_t* __restrict__ out, Strides4 os, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const Index4 o = unravel(i, g.Cout, g.Ho, g.Wo, out_cl);
    acc_t acc = conv_forward_point<scalar_t, acc_t>(x, xs, w, bn, g, o.n, o.c, o.h, o.w);
    if (bias != nullptr) acc += bias[o.c];
    out[offset4(o, os)] = static_cast<scalar_t>(acc);
  }
}

void forward_into(const at::Tensor& x, const ConvPrep& p, const at::Tensor& bias, const at::Tensor& out) {
  const ConvGeom g = p.g;
  const int64_t total = g.N * g.Cout * g.Ho * g.Wo;
  if (total == 0) return;
  if (launch_forward_tiled(x, p, bias, out)) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_bn_relu_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* bp = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    const BNParams<acc_t> bn = bn_params<acc_t>(p);
    forward_generic_kernel<scalar_t, acc_t><<<elementwise_blocks(total), kBlockThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), strides4(x), p.weight.const_data_ptr<scalar_t>(), bn, bp, g,
        is_channels_last(out), out.data_ptr<scalar_t>(), strides4(out), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor bn_relu_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                               const OptTensor& bn_weight, const OptTensor& bn_bias, const at::Tensor& mean,
                               const at::Tensor& invstd, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, bool batch_stats) {
  (void)batch_stats;  // only the autograd formula depends on it
  const char* op = "resfast::bn_relu_conv2d";
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  ConvPrep p = prepare_conv(op, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups);
  at::Tensor b = prepare_bias(op, bias, x, p.g.Cout);
  at::Tensor out = at::empty(conv_out_shape(p.g), x.options().memory_format(out_memory_format(x)));
  forward_into(x, p, b, out);
  return out;
}

void bn_relu_conv2d_out_cuda(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                             const OptTensor& bn_weight, const OptTensor& bn_bias, const at::Tensor& mean,
                             const at::Tensor& invstd, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, const at::Tensor& out) {
  const char* op = "resfast::bn_relu_conv2d_out";
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  ConvPrep p = prepare_conv(op, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups);
  at::Tensor b = prepare_bias(op, bias, x, p.g.Cout);
  check_out(op, out, x, p.g, weight, bias, bn_weight, bn_bias, mean, invstd);
  forward_into(x, p, b, out);
}

// ---------------------------------------------------------------------------------------
// Backward

// Generic dL/dz: grid (C, splits); block (c, s) handles a chunk of channel c's positions.
// Partial sums go to [C, splits] buffers.
template <typename scalar_t, typename acc_t>
__global__ void input_grad_generic_kernel(const scalar_t* __restrict__ go, Strides4 gs, const scalar_t* __restrict__ x,
                                          Strides4 xs, const scalar_t* __restrict__ w, BNParams<acc_t> bn, ConvGeom g,
                                          int64_t chunk, scalar_t* __restrict__ grad_z, Strides4 zs,
                                          acc_t* __restrict__ part_dz, acc_t* __restrict__ part_dzx) {
  __shared__ acc_t red[kBlockThreads / 32];
  const int64_t c = blockIdx.x, split = blockIdx.y;
  const int64_t P = g.N * g.H * g.W;
  const int64_t begin = split * chunk, end = begin + chunk < P ? begin + chunk : P;
  acc_t s_dz = acc_t(0), s_dzx = acc_t(0);
  for (int64_t q = begin + threadIdx.x; q < end; q += blockDim.x) {
    const int64_t n = q / (g.H * g.W), r = q % (g.H * g.W), h = r / g.W, wc = r % g.W;
    const acc_t xv = static_cast<acc_t>(x[n * xs.n + c * xs.c + h * xs.h + wc * xs.w]);
    const acc_t ga = conv_input_grad_point<scalar_t, acc_t>(go, gs, w, g, n, c, h, wc);
    const scalar_t gz_t =
        static_cast<scalar_t>(relu_backward(ga, bn_affine(xv, bn.mean[c], bn.invstd[c], bn.gamma[c], bn.beta[c])));
    grad_z[n * zs.n + c * zs.c + h * zs.h + wc * zs.w] = gz_t;
    const acc_t gz = static_cast<acc_t>(gz_t);  // summed as stored, as the reference sums its grad_z
    s_dz += gz;
    s_dzx += gz * bn_xhat(xv, bn.mean[c], bn.invstd[c]);
  }
  s_dz = block_sum(s_dz, red);
  s_dzx = block_sum(s_dzx, red);
  if (threadIdx.x == 0) {
    part_dz[c * gridDim.y + split] = s_dz;
    part_dzx[c * gridDim.y + split] = s_dzx;
  }
}

// Weight gradient, generic: grid (numel(weight), splits); block (e, s) reduces a chunk of
// output positions for weight element e into part[e, s].
template <typename scalar_t, typename acc_t>
__global__ void weight_grad_generic_kernel(const scalar_t* __restrict__ go, Strides4 gs, const scalar_t* __restrict__ x,
                                           Strides4 xs, BNParams<acc_t> bn, ConvGeom g, int64_t chunk,
                                           acc_t* __restrict__ part) {
  __shared__ acc_t red[kBlockThreads / 32];
  const int64_t e = blockIdx.x, split = blockIdx.y;
  const int64_t kw = e % g.KW, kh = (e / g.KW) % g.KH, cil = (e / (g.KW * g.KH)) % g.cin_g,
                co = e / (g.KW * g.KH * g.cin_g);
  const int64_t ci = (co / g.cout_g) * g.cin_g + cil;
  const int64_t P = g.N * g.Ho * g.Wo;
  const int64_t begin = split * chunk, end = begin + chunk < P ? begin + chunk : P;
  acc_t acc = acc_t(0);
  for (int64_t q = begin + threadIdx.x; q < end; q += blockDim.x) {
    acc += conv_weight_grad_term<scalar_t, acc_t>(go, gs, x, xs, bn, g, co, ci, kh, kw, q);
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) part[e * gridDim.y + split] = acc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const OptTensor& bn_weight,
    const OptTensor& bn_bias, const at::Tensor& mean, const at::Tensor& invstd, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool bias_grad) {
  const char* op = "resfast::bn_relu_conv2d_backward";
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  ConvPrep p = prepare_conv(op, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups);
  check_grad_out(op, grad_out, x, p.g);
  const ConvGeom g = p.g;
  const auto acc_opts = x.options().dtype(acc_dtype(x));
  at::Tensor grad_z = at::empty(x.sizes(), x.options().memory_format(out_memory_format(x)));
  at::Tensor sum_dz, sum_dz_xhat, grad_w;  // grad_w: the weight's dtype (tiled) or the accumulation dtype (generic)
  const int64_t P_in = g.N * g.H * g.W, P_out = g.N * g.Ho * g.Wo;
  const int64_t nw = g.Cout * g.cin_g * g.KH * g.KW;
  if (P_in == 0 || P_out == 0) {
    // Nothing to reduce: every gradient is zero.
    grad_z.zero_();
    return {grad_z, at::zeros_like(weight, at::MemoryFormat::Contiguous),
            at::zeros({bias_grad ? g.Cout : 0}, weight.options()), at::zeros({g.C}, acc_opts),
            at::zeros({g.C}, acc_opts)};
  }
  const Strides4 xs = strides4(x), gs = strides4(grad_out), zs = strides4(grad_z);
  auto stream = at::cuda::getCurrentCUDAStream();

  // dL/dz and its per-channel sums.
  if (!launch_input_grad_tiled(grad_out, x, p, grad_z, sum_dz, sum_dz_xhat)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_input_grad_generic", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t splits = reduction_splits(g.C, P_in);
      at::Tensor part_dz = at::empty({g.C, splits}, acc_opts), part_dzx = at::empty({g.C, splits}, acc_opts);
      input_grad_generic_kernel<scalar_t, acc_t><<<dim3(g.C, splits), kBlockThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), gs, x.const_data_ptr<scalar_t>(), xs,
          p.weight.const_data_ptr<scalar_t>(), bn_params<acc_t>(p), g, ceil_div(P_in, splits),
          grad_z.data_ptr<scalar_t>(), zs, part_dz.data_ptr<acc_t>(), part_dzx.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_dz = part_dz.sum(1);
      sum_dz_xhat = part_dzx.sum(1);
    });
  }

  // dL/dweight.
  if (!launch_weight_grad_tiled(grad_out, x, p, grad_w)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_weight_grad_generic", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t splits = reduction_splits(nw, P_out);
      at::Tensor part = at::empty({nw, splits}, acc_opts);
      weight_grad_generic_kernel<scalar_t, acc_t><<<dim3(nw, splits), kBlockThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), gs, x.const_data_ptr<scalar_t>(), xs, bn_params<acc_t>(p), g,
          ceil_div(P_out, splits), part.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_w = part.sum(1).view({g.Cout, g.cin_g, g.KH, g.KW});
    });
  }

  // dL/dbias (only when there is a bias): ATen's reduction reads grad_out coalesced in any layout.
  at::Tensor grad_bias = bias_grad ? grad_out.sum({0, 2, 3}, false, acc_dtype(x)).to(weight.scalar_type())
                                   : at::empty({0}, weight.options());
  return {grad_z, grad_w.to(weight.scalar_type()), grad_bias, sum_dz, sum_dz_xhat};
}

// ---------------------------------------------------------------------------------------
// bn_backward_elemt

template <typename scalar_t, typename acc_t>
__global__ void bn_backward_elemt_kernel(const scalar_t* __restrict__ grad_z, Strides4 zs,
                                         const scalar_t* __restrict__ x, Strides4 xs, const acc_t* __restrict__ mean,
                                         const acc_t* __restrict__ invstd, const acc_t* __restrict__ gamma,
                                         const acc_t* __restrict__ mean_dz, const acc_t* __restrict__ mean_dz_xhat,
                                         int64_t C, int64_t H, int64_t W, bool out_cl, bool accumulate,
                                         scalar_t* __restrict__ out, Strides4 os, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const Index4 e = unravel(i, C, H, W, out_cl);
    const int64_t c = e.c;
    acc_t v = bn_backward_elemt(static_cast<acc_t>(grad_z[offset4(e, zs)]), static_cast<acc_t>(x[offset4(e, xs)]),
                                mean[c], invstd[c], gamma[c], mean_dz[c], mean_dz_xhat[c]);
    if (accumulate) v += static_cast<acc_t>(out[offset4(e, os)]);
    out[offset4(e, os)] = static_cast<scalar_t>(v);
  }
}

// dL/dx into `out` (any strides), or added to it with `accumulate` (summed in acc_t, rounded once).
void bn_backward_elemt_into(const char* op, const at::Tensor& grad_z, const at::Tensor& x, const OptTensor& bn_weight,
                            const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dz,
                            const at::Tensor& sum_dz_xhat, double inv_count, bool accumulate, const at::Tensor& out) {
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  ElemtPrep p = prepare_elemt(op, grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count);
  check_elemt_out(op, out, grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat);
  const int64_t total = x.numel();
  if (total == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_bn_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_backward_elemt_kernel<scalar_t, acc_t><<<elementwise_blocks(total), kBlockThreads, 0, stream>>>(
        grad_z.const_data_ptr<scalar_t>(), strides4(grad_z), x.const_data_ptr<scalar_t>(), strides4(x),
        p.mean.const_data_ptr<acc_t>(), p.invstd.const_data_ptr<acc_t>(), p.gamma.const_data_ptr<acc_t>(),
        p.mean_dz.const_data_ptr<acc_t>(), p.mean_dz_xhat.const_data_ptr<acc_t>(), x.size(1), x.size(2), x.size(3),
        is_channels_last(out), accumulate, out.data_ptr<scalar_t>(), strides4(out), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor bn_backward_elemt_cuda(const at::Tensor& grad_z, const at::Tensor& x, const OptTensor& bn_weight,
                                  const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dz,
                                  const at::Tensor& sum_dz_xhat, double inv_count) {
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(out_memory_format(x)));
  bn_backward_elemt_into("resfast::bn_backward_elemt", grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat,
                         inv_count, false, gx);
  return gx;
}

void bn_backward_elemt_out_cuda(const at::Tensor& grad_z, const at::Tensor& x, const OptTensor& bn_weight,
                                const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dz,
                                const at::Tensor& sum_dz_xhat, double inv_count, bool accumulate,
                                const at::Tensor& out) {
  bn_backward_elemt_into("resfast::bn_backward_elemt_out", grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat,
                         inv_count, accumulate, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_stats_update", &bn_stats_update_cuda);
  m.impl("bn_relu_conv2d", &bn_relu_conv2d_cuda);
  m.impl("bn_relu_conv2d_out", &bn_relu_conv2d_out_cuda);
  m.impl("bn_relu_conv2d_backward", &bn_relu_conv2d_backward_cuda);
  m.impl("bn_backward_elemt", &bn_backward_elemt_cuda);
  m.impl("bn_backward_elemt_out", &bn_backward_elemt_out_cuda);
}

}  // namespace resfast
