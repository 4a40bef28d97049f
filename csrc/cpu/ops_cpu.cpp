// C++ CPU kernels of the resfast ops (reference semantics: resfast/ops/reference.py).
//
// The CPU twin of csrc/cuda: the convs run the CUDA grid's blocks (tiles.h) one after another
// through HostBlock (a block's threads in a loop, its warps with the tensor-core instructions
// emulated), with the same plans and the same block decode, so the CPU tests check the
// indexing and the fragment math the GPU runs; convs no plan fits, and
// RESFAST_NATIVE_KERNELS=generic, take the per-element functions of math.h that the generic
// CUDA kernels use. Blocks run in parallel with at::parallel_for. Every sum is accumulated in
// a fixed order, so results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "resfast/host.h"
#include "resfast/math.h"
#include "resfast/tiles.h"

namespace resfast {
namespace {

// Positions per parallel_for task for the cheap element-wise loops; conv points cost
// cin_g*KH*KW multiply-adds each, so they use a smaller grain.
constexpr int64_t kElemGrain = 4096;

int64_t conv_grain(const ConvGeom& g) {
  const int64_t work = g.cin_g * g.KH * g.KW;
  return std::max<int64_t>(1, 2048 / std::max<int64_t>(work, 1));
}

void check_cpu(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor for the CPU kernel, got ", x.device());
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x) {
  const char* op = "resfast::bn_stats";
  check_bn_stats(op, x);
  check_cpu(op, x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts);
  const Strides4 xs = strides4(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    const int64_t P = N * H * W;
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        // One Welford state per block of kStatsBlock positions, the blocks merged pairwise
        // with Chan's formula (a binary counter: level l holds the merge of 2^l blocks), as the
        // GPU merges its per-thread states in a tree, and in double, as eager PyTorch's CPU
        // var_mean / batch norm accumulate. Merging each row into one float32 running total
        // instead lost digits on long channels: at 10^7 values per channel (1024 x 1 x 100 x
        // 100) the variance was 1.9e-4 off (19x the float64 rule), and the mean's error flipped
        // ReLU masks, an input gradient 0.24 off (2.5 at mean 1e3, std 0.1).
        constexpr int64_t kStatsBlock = 256;
        Welford<double> level[64];
        bool full[64] = {};
        for (int64_t q0 = 0; q0 < P; q0 += kStatsBlock) {
          Welford<double> s = welford_init<double>();
          const int64_t q1 = std::min(q0 + kStatsBlock, P);
          for (int64_t q = q0; q < q1; ++q) welford_add(s, static_cast<double>(xp[channel_offset(q, c, H, W, xs)]));
          int l = 0;
          for (; full[l]; ++l) {
            s = welford_merge(level[l], s);
            full[l] = false;
          }
          level[l] = s;
          full[l] = true;
        }
        Welford<double> total = welford_init<double>();
        for (int l = 0; l < 64; ++l) {
          if (full[l]) total = welford_merge(level[l], total);
        }
        mp[c] = static_cast<acc_t>(total.mean);
        vp[c] = total.n > 0 ? static_cast<acc_t>(welford_var(total)) : std::numeric_limits<acc_t>::quiet_NaN();
      }
    });
  });
  return {mean, var};
}

// The training statistics (mean, invstd) of x and the running statistics updated in place
// (math.h bn_finalize_update): the statistics pass of bn_stats, then one loop over the
// channels, as the CUDA kernel's finalize does. The versions of running_mean / running_var are
// bumped by the op's ADInplaceOrView kernel (csrc/resfast.cpp).
std::tuple<at::Tensor, at::Tensor> bn_stats_update_cpu(const at::Tensor& x, const OptTensor& running_mean,
                                                       const OptTensor& running_var, double momentum, double eps) {
  const char* op = "resfast::bn_stats_update";
  check_bn_stats(op, x);
  check_cpu(op, x);
  check_running_stats(op, x, running_mean, running_var);
  auto [mean, var] = bn_stats_cpu(x);
  at::Tensor invstd = var;  // the biased variance becomes 1 / sqrt(var + eps) in place
  const int64_t C = x.size(1);
  const double unbias = running_var_unbias(x);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "resfast_bn_stats_update_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_stats_type(running_mean, mean.scalar_type()),
                                    "resfast_bn_stats_update_cpu_running", [&] {
      const RunningPtrs<scalar_t> running = running_ptrs<scalar_t>(running_mean, running_var);
      for (int64_t c = 0; c < C; ++c) {
        ip[c] = bn_finalize_update<acc_t, scalar_t>(mp[c], ip[c], eps, momentum, unbias, running, c);
      }
    });
  });
  return {mean, invstd};
}

// Runs blocks [0, blocks) of a tiled grid, each with its own shared-memory buffer.
template <class F>
void run_blocks(int64_t blocks, int smem_bytes, F&& block) {
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<Vec16> smem(static_cast<size_t>(smem_bytes) / sizeof(Vec16) + 1);
    for (int64_t b = b0; b < b1; ++b) block(b, reinterpret_cast<unsigned char*>(smem.data()));
  });
}

// The weights in a plan's tile layout (tiles.h prepared_weight), and with bn_ss the BN table
// (tiles.h bn_ss_value) into *bn_ss.
template <typename scalar_t>
at::Tensor prepared_weights(const ConvPrep& p, const ConvPlan& plan, bool transposed, at::Tensor* bn_ss = nullptr) {
  using acc_t = acc_of<scalar_t>;
  at::Tensor wp = at::empty({plan.w_prep}, p.weight.options());
  const scalar_t* w = p.weight.const_data_ptr<scalar_t>();
  scalar_t* out = wp.data_ptr<scalar_t>();
  at::parallel_for(0, plan.w_prep, kElemGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = prepared_weight(w, p.g, plan, transposed, i);
  });
  if (bn_ss != nullptr) {
    *bn_ss = at::empty({bn_ss_size(p.g.C)}, p.mean.options());
    const BNParams<acc_t> bn = bn_params<acc_t>(p);
    acc_t* ss = bn_ss->data_ptr<acc_t>();
    for (int64_t i = 0; i < bn_ss->numel(); ++i) ss[i] = bn_ss_value(bn, p.g.C, i);
  }
  return wp;
}

// Writes conv(relu(bn(x))) + bias into out (any strides).
void forward_into(const at::Tensor& x, const ConvPrep& p, const at::Tensor& bias, const at::Tensor& out) {
  const ConvGeom g = p.g;
  const int64_t total = g.N * g.Cout * g.Ho * g.Wo;
  if (total == 0) return;
  const Strides4 xs = strides4(x), os = strides4(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_bn_relu_conv2d_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const ConvPlan plan = conv_plan<scalar_t>(g, false);
    if (!force_generic_kernels() && plan.ok) {
      ConvArgs<scalar_t> args = conv_args<scalar_t>(x, p, bias, at::Tensor(), out, at::Tensor(), at::Tensor());
      at::Tensor bn_ss;
      const at::Tensor wp = prepared_weights<scalar_t>(p, plan, false, &bn_ss);
      args.wp = wp.const_data_ptr<scalar_t>();
      args.bn_ss = bn_ss.const_data_ptr<acc_t>();
      dispatch_conv<scalar_t, false>(plan, [&](auto nt, auto whole, auto res) {
        run_blocks(plan.blocks, plan.smem_bytes, [&](int64_t b, unsigned char* smem) {
          conv_block<HostBlock, scalar_t, false, decltype(nt)::value, decltype(whole)::value,
                     decltype(res)::value>(HostBlock{}, args, plan, b, smem);
        });
      });
      return;
    }
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = p.weight.const_data_ptr<scalar_t>();
    const acc_t* bp = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const BNParams<acc_t> bn = bn_params<acc_t>(p);
    at::parallel_for(0, total, conv_grain(g), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Index4 o = unravel(i, g.Cout, g.Ho, g.Wo, false);
        acc_t acc = conv_forward_point<scalar_t, acc_t>(xp, xs, wp, bn, g, o.n, o.c, o.h, o.w);
        if (bp != nullptr) acc += bp[o.c];
        op_[offset4(o, os)] = static_cast<scalar_t>(acc);
      }
    });
  });
}

at::Tensor bn_relu_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                              const OptTensor& bn_weight, const OptTensor& bn_bias, const at::Tensor& mean,
                              const at::Tensor& invstd, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, bool batch_stats) {
  (void)batch_stats;  // only the autograd formula depends on it
  const char* op = "resfast::bn_relu_conv2d";
  ConvPrep p = prepare_conv(op, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups);
  check_cpu(op, x);
  at::Tensor b = prepare_bias(op, bias, x, p.g.Cout);
  at::Tensor out = at::empty(conv_out_shape(p.g), x.options().memory_format(out_memory_format(x)));
  forward_into(x, p, b, out);
  return out;
}

void bn_relu_conv2d_out_cpu(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                            const OptTensor& bn_weight, const OptTensor& bn_bias, const at::Tensor& mean,
                            const at::Tensor& invstd, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, const at::Tensor& out) {
  const char* op = "resfast::bn_relu_conv2d_out";
  ConvPrep p = prepare_conv(op, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups);
  check_cpu(op, x);
  at::Tensor b = prepare_bias(op, bias, x, p.g.Cout);
  check_out(op, out, x, p.g, weight, bias, bn_weight, bn_bias, mean, invstd);
  forward_into(x, p, b, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const OptTensor& bn_weight,
    const OptTensor& bn_bias, const at::Tensor& mean, const at::Tensor& invstd, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool bias_grad) {
  const char* op = "resfast::bn_relu_conv2d_backward";
  ConvPrep p = prepare_conv(op, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups);
  check_cpu(op, x);
  check_grad_out(op, grad_out, x, p.g);
  const ConvGeom g = p.g;
  const auto acc_opts = x.options().dtype(acc_dtype(x));
  at::Tensor grad_z = at::empty(x.sizes(), x.options().memory_format(out_memory_format(x)));
  at::Tensor sum_dz = at::zeros({g.C}, acc_opts), sum_dz_xhat = at::zeros({g.C}, acc_opts);
  at::Tensor gw_acc = at::zeros({g.Cout, g.cin_g, g.KH, g.KW}, acc_opts);
  const Strides4 xs = strides4(x), gs = strides4(grad_out), zs = strides4(grad_z);
  const int64_t P_in = g.N * g.H * g.W, P_out = g.N * g.Ho * g.Wo;
  const bool generic = force_generic_kernels();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_bn_relu_conv2d_backward_cpu",
                                  [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* wp = p.weight.const_data_ptr<scalar_t>();
    scalar_t* zp = grad_z.data_ptr<scalar_t>();
    const BNParams<acc_t> bn = bn_params<acc_t>(p);
    if (P_in == 0 || P_out == 0) {
      grad_z.zero_();
      return;
    }

    // dL/dz with the ReLU mask, and its two per-channel sums.
    const ConvPlan iplan = conv_plan<scalar_t>(g, true);
    if (!generic && iplan.ok) {
      const int64_t rows = iplan.spatial;
      at::Tensor part_dz = at::empty({rows, g.C}, acc_opts), part_dzx = at::empty({rows, g.C}, acc_opts);
      ConvArgs<scalar_t> args = conv_args<scalar_t>(x, p, at::Tensor(), grad_out, grad_z, part_dz, part_dzx);
      at::Tensor bn_ss;
      const at::Tensor wp = prepared_weights<scalar_t>(p, iplan, true, &bn_ss);
      args.wp = wp.const_data_ptr<scalar_t>();
      args.bn_ss = bn_ss.const_data_ptr<acc_t>();
      dispatch_conv<scalar_t, true>(iplan, [&](auto nt, auto whole, auto res) {
        run_blocks(iplan.blocks, iplan.smem_bytes, [&](int64_t b, unsigned char* smem) {
          conv_block<HostBlock, scalar_t, true, decltype(nt)::value, decltype(whole)::value,
                     decltype(res)::value>(HostBlock{}, args, iplan, b, smem);
        });
      });
      // the CUDA finalize's arithmetic (tiles.h column_lane_sum, column_sum_combine)
      const acc_t* pdz = part_dz.const_data_ptr<acc_t>();
      const acc_t* pdzx = part_dzx.const_data_ptr<acc_t>();
      acc_t* sdz = sum_dz.data_ptr<acc_t>();
      acc_t* sdzx = sum_dz_xhat.data_ptr<acc_t>();
      at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          acc_t va[kSumLanes], vb[kSumLanes];
          for (int l = 0; l < kSumLanes; ++l) {
            va[l] = column_lane_sum(pdz, rows, g.C, c, l);
            vb[l] = column_lane_sum(pdzx, rows, g.C, c, l);
          }
          column_sum_combine(va);
          column_sum_combine(vb);
          sdz[c] = va[0];
          sdzx[c] = vb[0];
        }
      });
    } else {
      acc_t* sdz = sum_dz.data_ptr<acc_t>();
      acc_t* sdzx = sum_dz_xhat.data_ptr<acc_t>();
      at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          acc_t s_dz = acc_t(0), s_dzx = acc_t(0);
          for (int64_t q = 0; q < P_in; ++q) {
            const int64_t n = q / (g.H * g.W), r = q % (g.H * g.W), h = r / g.W, w = r % g.W;
            const acc_t xv = static_cast<acc_t>(xp[n * xs.n + c * xs.c + h * xs.h + w * xs.w]);
            const acc_t ga = conv_input_grad_point<scalar_t, acc_t>(gp, gs, wp, g, n, c, h, w);
            const acc_t z = bn_affine(xv, bn.mean[c], bn.invstd[c], bn.gamma[c], bn.beta[c]);
            const scalar_t gz_t = static_cast<scalar_t>(relu_backward(ga, z));
            zp[n * zs.n + c * zs.c + h * zs.h + w * zs.w] = gz_t;
            const acc_t gz = static_cast<acc_t>(gz_t);
            s_dz += gz;
            s_dzx += gz * bn_xhat(xv, bn.mean[c], bn.invstd[c]);
          }
          sdz[c] = s_dz;
          sdzx[c] = s_dzx;
        }
      });
    }

    // dL/dweight.
    const WgradPlan wplan = wgrad_plan<scalar_t>(g);
    if (!generic && wplan.ok) {
      const int64_t nw = gw_acc.numel();
      at::Tensor part = at::empty({wplan.splits, nw}, acc_opts);
      const ConvArgs<scalar_t> args = conv_args<scalar_t>(x, p, at::Tensor(), grad_out, at::Tensor(), part,
                                                          at::Tensor());
      dispatch_upw<scalar_t>(wplan, [&](auto upw, auto share) {
        run_blocks(wplan.cblocks * wplan.splits, wplan.smem_bytes, [&](int64_t b, unsigned char* smem) {
          wgrad_block<HostBlock, scalar_t, decltype(upw)::value, decltype(share)::value>(HostBlock{}, args, wplan, b,
                                                                                            smem);
        });
      });
      // partials are [split][co][tap][ci]: the CUDA finalize's arithmetic (tiles.h wgrad_finalize_element)
      const acc_t* pp = part.const_data_ptr<acc_t>();
      acc_t* gwp = gw_acc.data_ptr<acc_t>();
      const int64_t splits = wplan.splits;
      at::parallel_for(0, nw, kElemGrain, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) gwp[e] = wgrad_finalize_element(pp, splits, g, e);
      });
    } else {
      acc_t* gwp = gw_acc.data_ptr<acc_t>();
      at::parallel_for(0, gw_acc.numel(), 1, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t kw = e % g.KW, kh = (e / g.KW) % g.KH, cil = (e / (g.KW * g.KH)) % g.cin_g,
                        co = e / (g.KW * g.KH * g.cin_g);
          const int64_t ci = (co / g.cout_g) * g.cin_g + cil;
          acc_t acc = acc_t(0);
          for (int64_t q = 0; q < P_out; ++q) {
            acc += conv_weight_grad_term<scalar_t, acc_t>(gp, gs, xp, xs, bn, g, co, ci, kh, kw, q);
          }
          gwp[e] = acc;
        }
      });
    }
  });
  // dL/dbias (only when there is a bias): per output channel sum of grad_out.
  at::Tensor grad_bias = bias_grad ? grad_out.sum({0, 2, 3}, false, acc_dtype(x)).to(weight.scalar_type())
                                   : at::empty({0}, weight.options());
  return {grad_z, gw_acc.to(weight.scalar_type()), grad_bias, sum_dz, sum_dz_xhat};
}

// dL/dx into `out` (any strides), or added to it with `accumulate` (summed in acc_t, rounded once).
void bn_backward_elemt_into(const char* op, const at::Tensor& grad_z, const at::Tensor& x, const OptTensor& bn_weight,
                            const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dz,
                            const at::Tensor& sum_dz_xhat, double inv_count, bool accumulate, const at::Tensor& out) {
  ElemtPrep p = prepare_elemt(op, grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count);
  check_cpu(op, x);
  check_elemt_out(op, out, grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat);
  const int64_t total = x.numel();
  if (total == 0) return;
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  const bool cl = is_channels_last(out);
  const Strides4 xs = strides4(x), zs = strides4(grad_z), os = strides4(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_bn_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* zp = grad_z.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const acc_t* m = p.mean.const_data_ptr<acc_t>();
    const acc_t* is = p.invstd.const_data_ptr<acc_t>();
    const acc_t* ga = p.gamma.const_data_ptr<acc_t>();
    const acc_t* mdz = p.mean_dz.const_data_ptr<acc_t>();
    const acc_t* mdzx = p.mean_dz_xhat.const_data_ptr<acc_t>();
    at::parallel_for(0, total, kElemGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Index4 e = unravel(i, C, H, W, cl);
        const int64_t c = e.c;
        acc_t v = bn_backward_elemt(static_cast<acc_t>(zp[offset4(e, zs)]), static_cast<acc_t>(xp[offset4(e, xs)]),
                                    m[c], is[c], ga[c], mdz[c], mdzx[c]);
        if (accumulate) v += static_cast<acc_t>(op_[offset4(e, os)]);
        op_[offset4(e, os)] = static_cast<scalar_t>(v);
      }
    });
  });
}

at::Tensor bn_backward_elemt_cpu(const at::Tensor& grad_z, const at::Tensor& x, const OptTensor& bn_weight,
                                 const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dz,
                                 const at::Tensor& sum_dz_xhat, double inv_count) {
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(out_memory_format(x)));
  bn_backward_elemt_into("resfast::bn_backward_elemt", grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat,
                         inv_count, false, gx);
  return gx;
}

void bn_backward_elemt_out_cpu(const at::Tensor& grad_z, const at::Tensor& x, const OptTensor& bn_weight,
                               const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dz,
                               const at::Tensor& sum_dz_xhat, double inv_count, bool accumulate,
                               const at::Tensor& out) {
  bn_backward_elemt_into("resfast::bn_backward_elemt_out", grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat,
                         inv_count, accumulate, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_stats_update", &bn_stats_update_cpu);
  m.impl("bn_relu_conv2d", &bn_relu_conv2d_cpu);
  m.impl("bn_relu_conv2d_out", &bn_relu_conv2d_out_cpu);
  m.impl("bn_relu_conv2d_backward", &bn_relu_conv2d_backward_cpu);
  m.impl("bn_backward_elemt", &bn_backward_elemt_cpu);
  m.impl("bn_backward_elemt_out", &bn_backward_elemt_out_cpu);
}

}  // namespace resfast
