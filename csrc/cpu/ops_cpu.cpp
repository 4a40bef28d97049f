// C++ CPU kernels of the resfast ops (reference semantics: resfast/ops/eager_impl.py).
//
// Parallelised with at::parallel_for. The arithmetic comes from resfast/math.h and
// resfast/tiles.h, the same functions the CUDA kernels call: where a conv tile fits, the
// CPU runs the CUDA kernels' thread-block phases one block at a time (tiles.h), otherwise
// the per-element functions the generic CUDA kernels use (math.h). The CPU tests therefore
// check the index math the GPU runs. Every sum is accumulated in a fixed order, so results
// are deterministic.
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
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        // One Welford state per row (n, h) merged with Chan's formula, as the GPU merges its
        // per-thread states; keeps long channels accurate.
        Welford<acc_t> total = welford_init<acc_t>();
        for (int64_t row = 0; row < N * H; ++row) {
          Welford<acc_t> s = welford_init<acc_t>();
          for (int64_t w = 0; w < W; ++w) {
            welford_add(s, static_cast<acc_t>(xp[channel_offset(row * W + w, c, H, W, xs)]));
          }
          total = welford_merge(total, s);
        }
        mp[c] = total.mean;
        vp[c] = total.n > 0 ? welford_var(total) : std::numeric_limits<acc_t>::quiet_NaN();
      }
    });
  });
  return {mean, var};
}

// Writes conv(relu(bn(x))) + bias into out (any strides).
void forward_into(const at::Tensor& x, const ConvPrep& p, const at::Tensor& bias, const at::Tensor& out) {
  const ConvGeom g = p.g;
  const int64_t total = g.N * g.Cout * g.Ho * g.Wo;
  if (total == 0) return;
  const Strides4 xs = strides4(x), os = strides4(out);
  const TileGeom t = make_tile_geom(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_bn_relu_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = p.weight.const_data_ptr<scalar_t>();
    const acc_t* bp = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const BNParams<acc_t> bn = bn_params<acc_t>(p);
    const ForwardBlocking fb = forward_blocking(g, t, sizeof(acc_t));
    if (!force_generic_kernels() && fb.cb > 0) {
      // The CUDA tiled forward's blocks: (sample, output tile, group, output-channel block),
      // each staging its input channels chunk by chunk.
      const int64_t tiles = t.tiles_h * t.tiles_w, gblocks = g.groups * fb.co_blocks;
      const bool x_cl = is_channels_last(x);
      at::parallel_for(0, g.N * tiles * gblocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> shared(forward_smem_elems(g, t, fb));
        std::vector<acc_t> acc(kTileThreads * kCoBlock);
        acc_t* a_s = shared.data();
        acc_t* w_s = a_s + fb.cb * t.IH * t.IW;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t gb = b % gblocks, tile = (b / gblocks) % tiles, n = b / (gblocks * tiles);
          const int64_t group = gb / fb.co_blocks, col0 = (gb % fb.co_blocks) * fb.nco;
          const int64_t nco = std::min(fb.nco, g.cout_g - col0);
          const int64_t oh0 = (tile / t.tiles_w) * kTile, ow0 = (tile % t.tiles_w) * kTile;
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t cil0 = 0; cil0 < g.cin_g; cil0 += fb.cb) {
            const int64_t cb = std::min(fb.cb, g.cin_g - cil0);
            fill_activation_tile(0, 1, xp, xs, bn, g, t, n, group, cil0, cb, oh0 * g.sh - g.ph, ow0 * g.sw - g.pw,
                                 x_cl, a_s);
            fill_weight_tile(0, 1, wp, g, group, col0, nco, cil0, cb, w_s);
            for (int64_t tid = 0; tid < kTileThreads; ++tid) {
              forward_tile_accumulate(tid, g, t, nco, cb, a_s, w_s, acc.data() + tid * kCoBlock);
            }
          }
          for (int64_t tid = 0; tid < kTileThreads; ++tid) {
            forward_tile_store(tid, g, n, group, oh0, ow0, col0, nco, acc.data() + tid * kCoBlock, bp, op_, os);
          }
        }
      });
      return;
    }
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
  check_out(op, out, x, p.g);
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
  at::Tensor gb_acc = at::zeros({g.Cout}, acc_opts);
  const Strides4 xs = strides4(x), gs = strides4(grad_out), zs = strides4(grad_z);
  const int64_t P_in = g.N * g.H * g.W, P_out = g.N * g.Ho * g.Wo;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_bn_relu_conv2d_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* wp = p.weight.const_data_ptr<scalar_t>();
    scalar_t* zp = grad_z.data_ptr<scalar_t>();
    acc_t* sdz = sum_dz.data_ptr<acc_t>();
    acc_t* sdzx = sum_dz_xhat.data_ptr<acc_t>();
    const BNParams<acc_t> bn = bn_params<acc_t>(p);

    const TileGeom t = make_tile_geom(g);
    const bool generic = force_generic_kernels();
    const bool x_cl = is_channels_last(x), go_cl = is_channels_last(grad_out);
    const InputGradBlocking ib = input_grad_blocking(g, t, sizeof(acc_t));
    if (!generic && ib.cbo > 0) {
      // The CUDA tiled input-gradient kernel's blocks: (sample, input tile, group, input-
      // channel block), staging the output channels chunk by chunk; each writes its partial
      // channel sums to row (sample, tile) of a [N*tiles, C] buffer.
      const int64_t tiles = t.itiles_h * t.itiles_w, gblocks = g.groups * ib.ci_blocks;
      at::Tensor part_dz = at::empty({g.N * tiles, g.C}, acc_opts), part_dzx = at::empty({g.N * tiles, g.C}, acc_opts);
      acc_t* pdz = part_dz.data_ptr<acc_t>();
      acc_t* pdzx = part_dzx.data_ptr<acc_t>();
      at::parallel_for(0, g.N * tiles * gblocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> shared(input_grad_smem_elems(g, t, ib));
        std::vector<acc_t> acc(kTileThreads * kCoBlock);
        acc_t* go_s = shared.data();
        acc_t* w_s = go_s + ib.cbo * t.OHB * t.OWB;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t gb = b % gblocks, tile = (b / gblocks) % tiles, n = b / (gblocks * tiles);
          const int64_t group = gb / ib.ci_blocks, cil0 = (gb % ib.ci_blocks) * ib.nci;
          const int64_t nci = std::min(ib.nci, g.cin_g - cil0);
          const int64_t ih0 = (tile / t.itiles_w) * kTile, iw0 = (tile % t.itiles_w) * kTile;
          const int64_t oh_lo = input_tile_out_origin(ih0, g.ph, g.KH, g.dh, g.sh);
          const int64_t ow_lo = input_tile_out_origin(iw0, g.pw, g.KW, g.dw, g.sw);
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t col0 = 0; col0 < g.cout_g; col0 += ib.cbo) {
            const int64_t nco = std::min(ib.cbo, g.cout_g - col0);
            fill_grad_out_tile(0, 1, gp, gs, g, n, group, col0, nco, oh_lo, ow_lo, t.OHB, t.OWB, go_cl, go_s);
            fill_weight_tile(0, 1, wp, g, group, col0, nco, cil0, nci, w_s);
            for (int64_t tid = 0; tid < kTileThreads; ++tid) {
              const int64_t h = ih0 + tid / kTile, w = iw0 + tid % kTile;
              if (h >= g.H || w >= g.W) continue;
              input_grad_tile_accumulate(g, t, h, w, oh_lo, ow_lo, nci, nco, go_s, w_s, acc.data() + tid * kCoBlock);
            }
          }
          for (int64_t k = 0; k < nci; ++k) {
            const int64_t c = group * g.cin_g + cil0 + k;
            acc_t s_dz = acc_t(0), s_dzx = acc_t(0);
            for (int64_t tid = 0; tid < kTileThreads; ++tid) {
              const int64_t h = ih0 + tid / kTile, w = iw0 + tid % kTile;
              if (h >= g.H || w >= g.W) continue;
              const acc_t ga = acc[tid * kCoBlock + k];
              const acc_t xv = static_cast<acc_t>(xp[n * xs.n + c * xs.c + h * xs.h + w * xs.w]);
              const acc_t gz = relu_backward(ga, bn_affine(xv, bn.mean[c], bn.invstd[c], bn.gamma[c], bn.beta[c]));
              zp[n * zs.n + c * zs.c + h * zs.h + w * zs.w] = static_cast<scalar_t>(gz);
              s_dz += gz;
              s_dzx += gz * bn_xhat(xv, bn.mean[c], bn.invstd[c]);
            }
            pdz[(n * tiles + tile) * g.C + c] = s_dz;
            pdzx[(n * tiles + tile) * g.C + c] = s_dzx;
          }
        }
      });
      sum_dz.copy_(part_dz.sum(0));
      sum_dz_xhat.copy_(part_dzx.sum(0));
    } else {
      // dL/dz with the ReLU mask, and its two per-channel sums: one task per input channel.
      at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          acc_t s_dz = acc_t(0), s_dzx = acc_t(0);
          for (int64_t q = 0; q < P_in; ++q) {
            const int64_t n = q / (g.H * g.W), r = q % (g.H * g.W), h = r / g.W, w = r % g.W;
            const acc_t xv = static_cast<acc_t>(xp[n * xs.n + c * xs.c + h * xs.h + w * xs.w]);
            const acc_t ga = conv_input_grad_point<scalar_t, acc_t>(gp, gs, wp, g, n, c, h, w);
            const acc_t z = bn_affine(xv, bn.mean[c], bn.invstd[c], bn.gamma[c], bn.beta[c]);
            const acc_t gz = relu_backward(ga, z);
            zp[n * zs.n + c * zs.c + h * zs.h + w * zs.w] = static_cast<scalar_t>(gz);
            s_dz += gz;
            s_dzx += gz * bn_xhat(xv, bn.mean[c], bn.invstd[c]);
          }
          sdz[c] = s_dz;
          sdzx[c] = s_dzx;
        }
      });
    }

    // dL/dweight.
    acc_t* gwp = gw_acc.data_ptr<acc_t>();
    const int64_t nw = gw_acc.numel();
    const WeightGradBlocking wb = weight_grad_blocking(g, t, sizeof(acc_t));
    if (!generic && wb.nci > 0) {
      // The CUDA tiled weight-gradient kernel's blocks: (split, group, output-channel block,
      // input-channel block); split s sums the output tiles s, s + splits, ... of every
      // sample into row s of a [splits, nw] buffer.
      const int64_t tiles = t.tiles_h * t.tiles_w, items = g.N * tiles;
      const int64_t splits = std::min<int64_t>(items, 16);
      const int64_t gblocks = g.groups * wb.co_blocks * wb.ci_blocks;
      at::Tensor part = at::empty({splits, nw}, acc_opts);
      acc_t* pp = part.data_ptr<acc_t>();
      at::parallel_for(0, splits * gblocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> shared(weight_grad_smem_elems(g, t, wb));
        std::vector<acc_t> acc(kMaxWeightPerThread * kTileThreads);
        acc_t* go_s = shared.data();
        acc_t* a_s = go_s + wb.nco * kTileThreads;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t gb = b % gblocks, s = b / gblocks;
          const int64_t cib = gb % wb.ci_blocks, cob = (gb / wb.ci_blocks) % wb.co_blocks;
          const int64_t group = gb / (wb.ci_blocks * wb.co_blocks);
          const int64_t col0 = cob * wb.nco, cil0 = cib * wb.nci;
          const int64_t nco = std::min(wb.nco, g.cout_g - col0), nci = std::min(wb.nci, g.cin_g - cil0);
          const int64_t ne = nco * nci * g.KH * g.KW;
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t item = s; item < items; item += splits) {
            const int64_t n = item / tiles, tile = item % tiles;
            const int64_t oh0 = (tile / t.tiles_w) * kTile, ow0 = (tile % t.tiles_w) * kTile;
            fill_grad_out_tile(0, 1, gp, gs, g, n, group, col0, nco, oh0, ow0, kTile, kTile, go_cl, go_s);
            fill_activation_tile(0, 1, xp, xs, bn, g, t, n, group, cil0, nci, oh0 * g.sh - g.ph, ow0 * g.sw - g.pw,
                                 x_cl, a_s);
            for (int64_t e = 0; e < ne; ++e) acc[e] += weight_grad_tile_term(g, t, e, nci, go_s, a_s);
          }
          for (int64_t e = 0; e < ne; ++e) pp[s * nw + weight_grad_tile_index(g, group, col0, cil0, nci, e)] = acc[e];
        }
      });
      gw_acc.copy_(part.sum(0).view(gw_acc.sizes()));
    } else {
      at::parallel_for(0, nw, 1, [&](int64_t e0, int64_t e1) {
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

    // dL/dbias: per output channel sum of grad_out (only when there is a bias).
    if (!bias_grad) return;
    acc_t* gbp = gb_acc.data_ptr<acc_t>();
    at::parallel_for(0, g.Cout, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t co = c0; co < c1; ++co) {
        acc_t acc = acc_t(0);
        for (int64_t q = 0; q < P_out; ++q) {
          acc += static_cast<acc_t>(gp[channel_offset(q, co, g.Ho, g.Wo, gs)]);
        }
        gbp[co] = acc;
      }
    });
  });
  at::Tensor grad_bias = bias_grad ? gb_acc.to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {grad_z, gw_acc.to(weight.scalar_type()), grad_bias, sum_dz, sum_dz_xhat};
}

// dL/dx into `out` (any strides), or added to it with `accumulate` (summed in acc_t, rounded once).
void bn_backward_elemt_into(const char* op, const at::Tensor& grad_z, const at::Tensor& x, const OptTensor& bn_weight,
                            const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dz,
                            const at::Tensor& sum_dz_xhat, double inv_count, bool accumulate, const at::Tensor& out) {
  ElemtPrep p = prepare_elemt(op, grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count);
  check_cpu(op, x);
  check_elemt_out(op, out, x);
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
  m.impl("bn_relu_conv2d", &bn_relu_conv2d_cpu);
  m.impl("bn_relu_conv2d_out", &bn_relu_conv2d_out_cpu);
  m.impl("bn_relu_conv2d_backward", &bn_relu_conv2d_backward_cpu);
  m.impl("bn_backward_elemt", &bn_backward_elemt_cpu);
  m.impl("bn_backward_elemt_out", &bn_backward_elemt_out_cpu);
}

}  // namespace resfast
