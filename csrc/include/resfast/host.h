// Host-side preparation shared by the CPU and CUDA implementations: both devices hand their
// kernels the same ConvGeom / BNParams / ConvArgs and pick the same plan (tiles.h).
//
// The user-facing validator is resfast/ops/validation.py (the public functional op calls it
// before any backend). The checks here are only those that keep the kernels' own memory
// accesses in bounds when an op is called directly (torch.ops.resfast.*): ranks, dtypes and
// devices of what the kernels read and write, shapes that size their loops, and a non-empty
// output. They raise RuntimeError naming the argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <optional>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "resfast/math.h"
#include "resfast/tiles.h"

namespace resfast {

using OptTensor = std::optional<at::Tensor>;

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation / statistics dtype: float64 for float64 input, float32 otherwise.
inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The memory format of tensors the ops allocate for input x; mirrors
// resfast/ops/schemas.py::out_memory_format, which the fake implementations use.
inline at::MemoryFormat out_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && x.size(1) > 1 && x.stride(1) == 1) return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.size(1) > 1 && t.stride(1) == 1;
}

inline Strides4 strides4(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline void check_4d(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D tensor (N, C, H, W), got ", t.dim(), " dims (shape ",
              t.sizes(), ")");
}

inline void check_float(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), op, ": ", name, " has unsupported dtype ", t.scalar_type(),
              "; supported: float32, float64, float16, bfloat16");
}

inline void check_same_dtype(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; they must match");
}

inline void check_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must be on one device");
}

// A per-channel vector (mean, invstd, bn_weight, ...): floating point, shape [C], x's device.
inline void check_channel_vector(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  const int64_t C = x.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape [", C,
              "] (one value per channel of x), got shape ", t.sizes());
  check_float(op, t, name);
  check_device(op, t, name, x);
}

inline void check_same_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef expected,
                             const char* what) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, " (", what, "), got ",
              t.sizes());
}

inline std::vector<int64_t> conv_out_shape(const ConvGeom& g) { return {g.N, g.Cout, g.Ho, g.Wo}; }

// Everything a conv kernel needs besides the data tensors: checked geometry, the weight
// made contiguous, and the BN parameters as contiguous accumulation-type vectors.
struct ConvPrep {
  ConvGeom g;
  at::Tensor weight;  // contiguous, x's dtype
  at::Tensor mean, invstd, gamma, beta;  // [C], acc dtype, contiguous
};

inline void check_int_pair(const char* op, at::IntArrayRef v, const char* name, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 values (height, width), got ", v.size(), " (", v, ")");
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, op, ": ", name, " must be >= ", minimum, ", got ", v);
}

inline at::Tensor acc_vector(const at::Tensor& t, const at::Tensor& x) {
  return t.to(x.options().dtype(acc_dtype(x))).contiguous();
}

inline ConvPrep prepare_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, const OptTensor& bn_weight,
                             const OptTensor& bn_bias, const at::Tensor& mean, const at::Tensor& invstd,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             int64_t groups) {
  check_4d(op, x, "x");
  check_4d(op, weight, "weight");
  check_float(op, x, "x");
  check_same_dtype(op, weight, "weight", x);
  check_device(op, weight, "weight", x);
  check_int_pair(op, stride, "stride", 1);
  check_int_pair(op, padding, "padding", 0);
  check_int_pair(op, dilation, "dilation", 1);
  const int64_t C = x.size(1), Cout = weight.size(0);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(C % groups == 0, op, ": groups=", groups, " does not divide the input channels C=", C, " of x");
  TORCH_CHECK(Cout % groups == 0, op, ": groups=", groups, " does not divide the output channels C_out=", Cout,
              " of weight");
  TORCH_CHECK(weight.size(1) * groups == C, op, ": channel mismatch: x has C=", C, " channels but weight of shape ",
              weight.sizes(), " with groups=", groups, " expects ", weight.size(1) * groups);
  check_channel_vector(op, mean, "mean", x);
  check_channel_vector(op, invstd, "invstd", x);
  if (bn_weight.has_value()) check_channel_vector(op, *bn_weight, "bn_weight", x);
  if (bn_bias.has_value()) check_channel_vector(op, *bn_bias, "bn_bias", x);

  ConvPrep p;
  ConvGeom& g = p.g;
  g.N = x.size(0);
  g.C = C;
  g.H = x.size(2);
  g.W = x.size(3);
  g.Cout = Cout;
  g.KH = weight.size(2);
  g.KW = weight.size(3);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.groups = groups;
  g.cin_g = C / groups;
  g.cout_g = Cout / groups;
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  const int64_t eff_h = g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1, eff_w = g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1;
  TORCH_CHECK(eff_h >= 0 && eff_w >= 0 && g.Ho >= 1 && g.Wo >= 1, op,
              ": the conv output would be empty: x of shape ", x.sizes(), ", weight of shape ", weight.sizes(),
              ", stride=", stride, ", padding=", padding, ", dilation=", dilation);

  p.weight = weight.contiguous();
  p.mean = acc_vector(mean, x);
  p.invstd = acc_vector(invstd, x);
  const auto acc_opts = x.options().dtype(acc_dtype(x));
  p.gamma = bn_weight.has_value() ? acc_vector(*bn_weight, x) : at::ones({C}, acc_opts);
  p.beta = bn_bias.has_value() ? acc_vector(*bn_bias, x) : at::zeros({C}, acc_opts);
  return p;
}

template <typename acc_t>
inline BNParams<acc_t> bn_params(const ConvPrep& p) {
  return BNParams<acc_t>{p.mean.data_ptr<acc_t>(), p.invstd.data_ptr<acc_t>(), p.gamma.data_ptr<acc_t>(),
                         p.beta.data_ptr<acc_t>()};
}

// Conv bias as a contiguous acc-type vector, or an undefined tensor.
inline at::Tensor prepare_bias(const char* op, const OptTensor& bias, const at::Tensor& x, int64_t Cout) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Cout, op, ": bias must have shape [", Cout,
              "] (one value per output channel of weight), got shape ", bias->sizes());
  check_float(op, *bias, "bias");
  check_device(op, *bias, "bias", x);
  return acc_vector(*bias, x);
}

// Whether a and b may share a memory location: exact for different storages, disjoint byte
// ranges and two boxes of one non-overlapping layout that differ in at most one dimension (two
// channel slices of one buffer, as the shared dense block writes a layer's output beside its
// input), conservatively true for anything else that shares bytes (resfast.ops.validation.overlaps
// is the Python twin).
inline bool non_overlapping_layout(const std::vector<int64_t>& sizes, at::IntArrayRef strides) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, size) of the dims that step
  for (size_t d = 0; d < sizes.size(); ++d)
    if (sizes[d] > 1) dims.emplace_back(std::abs(strides[d]), sizes[d]);
  std::sort(dims.begin(), dims.end());
  int64_t span = 1;
  for (const auto& [st, sz] : dims) {
    if (st < span) return false;
    span = st * sz;
  }
  return true;
}

inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage()) return false;
  if (a.device() != b.device() || a.storage().data() != b.storage().data()) return false;
  auto byte_range = [](const at::Tensor& t) {
    int64_t lo = t.storage_offset(), hi = t.storage_offset();
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t step = (t.size(d) - 1) * t.stride(d);
      if (step >= 0) hi += step; else lo += step;
    }
    return std::make_pair(lo * int64_t(t.element_size()), (hi + 1) * int64_t(t.element_size()));
  };
  const auto [lo_a, hi_a] = byte_range(a);
  const auto [lo_b, hi_b] = byte_range(b);
  if (hi_a <= lo_b || hi_b <= lo_a) return false;
  if (a.scalar_type() == b.scalar_type() && a.dim() == b.dim() && a.strides() == b.strides()) {
    std::vector<int64_t> differing;
    for (int64_t d = 0; d < a.dim(); ++d)
      if (a.size(d) != b.size(d)) differing.push_back(d);
    const int64_t delta = b.storage_offset() - a.storage_offset();
    for (int64_t d = 0; d < a.dim(); ++d) {
      const int64_t st = a.stride(d);
      if (st == 0 || delta % st != 0) continue;
      bool others = false;
      for (int64_t dd : differing) others |= dd != d;
      if (others) continue;
      const int64_t shift = delta / st;
      std::vector<int64_t> sizes(a.sizes().begin(), a.sizes().end());
      sizes[d] = std::max(a.size(d), shift + b.size(d)) - std::min<int64_t>(0, shift);
      if (!non_overlapping_layout(sizes, a.strides())) continue;
      // both views are boxes of one injective layout: they meet iff their ranges along d do
      return shift < a.size(d) && 0 < shift + b.size(d);
    }
  }
  return true;
}

// out= of a conv: no memory shared with a tensor the op reads (it would overwrite its own input
// while reading it), as PyTorch's out= ops and resfast.ops.validation.check_out refuse.
inline void check_out_disjoint(const char* op, const at::Tensor& out,
                               std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK(t == nullptr || !t->defined() || !may_overlap(out, *t), op, ": out shares memory with ", name,
                ": the op would overwrite its own input while reading it; pass an out that does not overlap ",
                name, " (e.g. a fresh tensor or another slice)");
  }
}

// out= of a conv: the shape, dtype and device, and no memory shared with what the op reads.
inline void check_out(const char* op, const at::Tensor& out, const at::Tensor& x, const ConvGeom& g,
                      const at::Tensor& weight, const OptTensor& bias, const OptTensor& bn_weight,
                      const OptTensor& bn_bias, const at::Tensor& mean, const at::Tensor& invstd) {
  check_4d(op, out, "out");
  check_same_dtype(op, out, "out", x);
  check_device(op, out, "out", x);
  const auto shape = conv_out_shape(g);
  check_same_shape(op, out, "out", shape, "the conv output shape");
  check_out_disjoint(op, out,
                     {{"x", &x}, {"weight", &weight}, {"bias", bias.has_value() ? &*bias : nullptr},
                      {"bn_weight", bn_weight.has_value() ? &*bn_weight : nullptr},
                      {"bn_bias", bn_bias.has_value() ? &*bn_bias : nullptr}, {"mean", &mean}, {"invstd", &invstd}});
}

// out= of the elementwise BN backward: each element of out comes from the same element of grad_z
// and x, so out may be one of them exactly (in place), but no other overlap with them (a shifted
// slice would overwrite elements not yet read) and none with the per-channel vectors.
inline void check_elemt_out_disjoint(const char* op, const at::Tensor& out,
                                     std::initializer_list<std::pair<const char*, const at::Tensor*>> elementwise,
                                     std::initializer_list<std::pair<const char*, const at::Tensor*>> vectors) {
  for (const auto& [name, t] : elementwise) {
    const bool same_view = t->data_ptr() == out.data_ptr() && t->sizes() == out.sizes() &&
                           t->strides() == out.strides() && t->scalar_type() == out.scalar_type();
    TORCH_CHECK(same_view || !may_overlap(out, *t), op, ": out overlaps ", name,
                " without being it: the op would overwrite elements of ", name,
                " it has not read yet; pass out = ", name, " itself (in place) or an out that does not overlap it");
  }
  check_out_disjoint(op, out, vectors);
}

// bn_backward_elemt's arguments, checked; returns prepared acc-type vectors. The op takes the
// per-channel sums and 1 / count (0 for running statistics: no coupling term); the kernels
// take the means.
struct ElemtPrep {
  at::Tensor mean, invstd, gamma, mean_dz, mean_dz_xhat;
};

inline ElemtPrep prepare_elemt(const char* op, const at::Tensor& grad_z, const at::Tensor& x,
                               const OptTensor& bn_weight, const at::Tensor& mean, const at::Tensor& invstd,
                               const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat, double inv_count) {
  check_4d(op, x, "x");
  check_float(op, x, "x");
  check_4d(op, grad_z, "grad_z");
  check_same_dtype(op, grad_z, "grad_z", x);
  check_device(op, grad_z, "grad_z", x);
  check_same_shape(op, grad_z, "grad_z", x.sizes(), "the shape of x");
  check_channel_vector(op, mean, "mean", x);
  check_channel_vector(op, invstd, "invstd", x);
  check_channel_vector(op, sum_dz, "sum_dz", x);
  check_channel_vector(op, sum_dz_xhat, "sum_dz_xhat", x);
  if (bn_weight.has_value()) check_channel_vector(op, *bn_weight, "bn_weight", x);
  ElemtPrep p;
  p.mean = acc_vector(mean, x);
  p.invstd = acc_vector(invstd, x);
  p.gamma = bn_weight.has_value() ? acc_vector(*bn_weight, x) : at::ones({x.size(1)}, x.options().dtype(acc_dtype(x)));
  if (inv_count == 0.0) {
    // Running statistics: no coupling term at all (a NaN sum must not become NaN * 0).
    p.mean_dz = at::zeros({x.size(1)}, x.options().dtype(acc_dtype(x)));
    p.mean_dz_xhat = p.mean_dz;
  } else {
    p.mean_dz = acc_vector(sum_dz, x).mul(inv_count);
    p.mean_dz_xhat = acc_vector(sum_dz_xhat, x).mul(inv_count);
  }
  return p;
}

inline void check_elemt_out(const char* op, const at::Tensor& out, const at::Tensor& grad_z, const at::Tensor& x,
                            const OptTensor& bn_weight, const at::Tensor& mean, const at::Tensor& invstd,
                            const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat) {
  check_4d(op, out, "out");
  check_same_dtype(op, out, "out", x);
  check_device(op, out, "out", x);
  check_same_shape(op, out, "out", x.sizes(), "the shape of x");
  check_elemt_out_disjoint(op, out, {{"grad_z", &grad_z}, {"x", &x}},
                           {{"bn_weight", bn_weight.has_value() ? &*bn_weight : nullptr}, {"mean", &mean},
                            {"invstd", &invstd}, {"sum_dz", &sum_dz}, {"sum_dz_xhat", &sum_dz_xhat}});
}

inline void check_bn_stats(const char* op, const at::Tensor& x) {
  check_4d(op, x, "x");
  check_float(op, x, "x");
}

// bn_stats_update's running statistics: both or neither; each a [C] vector on x's device, of
// one floating dtype (the kernels update them through raw pointers, any stride).
inline void check_running_stats(const char* op, const at::Tensor& x, const OptTensor& running_mean,
                                const OptTensor& running_var) {
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must both be tensors or both be None");
  if (!running_mean.has_value()) return;
  check_channel_vector(op, *running_mean, "running_mean", x);
  check_channel_vector(op, *running_var, "running_var", x);
  TORCH_CHECK(running_mean->scalar_type() == running_var->scalar_type(), op, ": running_mean has dtype ",
              running_mean->scalar_type(), " but running_var has dtype ", running_var->scalar_type(),
              "; they must match");
}

// The dtype the finalize moves the running statistics in (``fallback`` without them).
inline at::ScalarType running_stats_type(const OptTensor& running_mean, at::ScalarType fallback) {
  return running_mean.has_value() ? running_mean->scalar_type() : fallback;
}

// The kernels' view of the running statistics (checked by check_running_stats).
template <typename stat_t>
inline RunningPtrs<stat_t> running_ptrs(const OptTensor& running_mean, const OptTensor& running_var) {
  if (!running_mean.has_value()) return {nullptr, 0, nullptr, 0};
  return {running_mean->data_ptr<stat_t>(), running_mean->stride(0), running_var->data_ptr<stat_t>(),
          running_var->stride(0)};
}

// The unbiasing factor of the running variance, count / (count - 1), for x's N*H*W positions.
inline double running_var_unbias(const at::Tensor& x) {
  const int64_t count = x.numel() / std::max<int64_t>(x.size(1), 1);
  return static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
}

inline void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const ConvGeom& g) {
  check_4d(op, grad_out, "grad_out");
  check_same_dtype(op, grad_out, "grad_out", x);
  check_device(op, grad_out, "grad_out", x);
  const auto shape = conv_out_shape(g);
  check_same_shape(op, grad_out, "grad_out", shape, "the conv output shape");
}

}  // namespace resfast

namespace resfast {

// RESFAST_NATIVE_KERNELS=generic forces the per-element kernels (math.h) even where the tiled
// ones fit, so tests can check both paths; anything else (or unset) picks the tiled kernels
// (tiles.h) wherever a plan fits in shared memory.
inline bool force_generic_kernels() {
  const char* v = std::getenv("RESFAST_NATIVE_KERNELS");
  return v != nullptr && std::string(v) == "generic";
}

// Eight consecutive channels of t (from a channel that is a multiple of 8) form one 16-byte
// aligned vector: channels innermost and every other stride (of a dimension longer than 1)
// and the base address multiples of 8 elements / 16 bytes.
// The tiled kernels address such vectors with 32-bit offsets within a sample, so the largest
// in-sample offset must stay below 2^31 as well.
inline bool channel_vectors(const at::Tensor& t) {
  if (!t.defined() || t.dim() != 4 || t.stride(1) != 1) return false;
  for (int d : {0, 2, 3}) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  const int64_t last = (t.size(1) - 1) + (t.size(2) - 1) * t.stride(2) + (t.size(3) - 1) * t.stride(3);
  if (t.stride(2) < 0 || t.stride(3) < 0 || last >= (int64_t(1) << 31)) return false;
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// The tiled kernels' operands. grad_out / out / parts may be undefined where a kernel does
// not use them.
template <typename scalar_t>
inline ConvArgs<scalar_t> conv_args(const at::Tensor& x, const ConvPrep& p, const at::Tensor& bias,
                                    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& part0,
                                    const at::Tensor& part1) {
  using A = acc_of<scalar_t>;
  ConvArgs<scalar_t> a{};
  a.x = x.const_data_ptr<scalar_t>();
  a.xs = strides4(x);
  a.w = p.weight.const_data_ptr<scalar_t>();
  a.go = grad_out.defined() ? grad_out.const_data_ptr<scalar_t>() : nullptr;
  a.gs = grad_out.defined() ? strides4(grad_out) : Strides4{0, 0, 0, 0};
  a.bn = bn_params<A>(p);
  a.bias = bias.defined() ? bias.const_data_ptr<A>() : nullptr;
  a.out = out.defined() ? out.data_ptr<scalar_t>() : nullptr;
  a.os = out.defined() ? strides4(out) : Strides4{0, 0, 0, 0};
  a.part0 = part0.defined() ? part0.data_ptr<A>() : nullptr;
  a.part1 = part1.defined() ? part1.data_ptr<A>() : nullptr;
  a.g = p.g;
  a.x_vec = channel_vectors(x);
  a.go_vec = channel_vectors(grad_out);
  a.out_vec = channel_vectors(out);
  return a;
}

// Calls f(std::integral_constant<int, NT>, std::integral_constant<bool, kWhole>,
// std::integral_constant<bool, kRes>) for a forward / input-gradient plan: its n8 tiles (the
// 16-bit types run the tensor-core blocks, NT = 2, 4, 8, float32 / float64 the SIMT blocks,
// NT = 0), whether its tiles are whole samples, whether they are residue classes.
template <typename scalar_t, class F>
inline void dispatch_nt(int nt, F&& f);
template <typename scalar_t, bool kInputGrad, class F>
inline void dispatch_conv(const ConvPlan& p, F&& f) {
  dispatch_nt<scalar_t>(p.nt, [&](auto nt) {
    if constexpr (whole_kernel(kInputGrad, decltype(nt)::value)) {
      if (p.s.S > 0) {
        f(nt, std::true_type{}, std::false_type{});
        return;
      }
    }
    if constexpr (residue_kernel(kInputGrad, decltype(nt)::value)) {
      if (p.s.R) {
        f(nt, std::false_type{}, std::true_type{});
        return;
      }
    }
    TORCH_CHECK(p.s.S == 0 && !p.s.R, "resfast: no whole-sample / residue-class conv kernel for ", p.nt, " n8 tiles");
    f(nt, std::false_type{}, std::false_type{});
  });
}

// Calls f(std::integral_constant<int, NT>) for the n8 tiles of a plan: the 16-bit types run
// the tensor-core blocks (NT = 2, 4, 8), float32 / float64 the SIMT blocks (NT = 0).
template <typename scalar_t, class F>
inline void dispatch_nt(int nt, F&& f) {
  if constexpr (IsMmaType<scalar_t>::value) {
    switch (nt) {
      case 2: f(std::integral_constant<int, 2>{}); break;
      case 4: f(std::integral_constant<int, 4>{}); break;
      case 8: f(std::integral_constant<int, 8>{}); break;
      default: TORCH_CHECK(false, "resfast: no tensor-core conv kernel for ", nt, " n8 tiles");
    }
  } else {
    TORCH_CHECK(nt == 0, "resfast: float32 / float64 convs run the SIMT kernels");
    f(std::integral_constant<int, 0>{});
  }
}

// Calls f(std::integral_constant<int, UPW>, std::integral_constant<int, share>) for a weight-gradient
// plan: the tensor-core kernels are compiled for kWgradUpwSmall and kWgradUpwLarge units per
// warp (tiles.h), with a shared A fragment, without, and (kWgradUpwLarge) with a shared B
// fragment or a shared A fragment and full warps, and with kWgradUpwFullB units a shared B
// fragment and full warps (WgradPlan::share); 0 = SIMT.
template <typename scalar_t, class F>
inline void dispatch_upw(const WgradPlan& p, F&& f) {
  using Share0 = std::integral_constant<int, 0>;
  using Share1 = std::integral_constant<int, 1>;
  using Share2 = std::integral_constant<int, 2>;
  using Share3 = std::integral_constant<int, 3>;
  if constexpr (IsMmaType<scalar_t>::value) {
    if (p.share == 4) {
      f(std::integral_constant<int, kWgradUpwFullB>{}, std::integral_constant<int, 4>{});
    } else if (p.upw <= kWgradUpwSmall) {
      const std::integral_constant<int, kWgradUpwSmall> upw;
      if (p.share == 1) {
        f(upw, Share1{});
      } else {
        f(upw, Share0{});
      }
    } else {
      TORCH_CHECK(p.upw <= kWgradUpwLarge, "resfast: weight-gradient plan needs ", p.upw, " units per warp");
      const std::integral_constant<int, kWgradUpwLarge> upw;
      if (p.share == 1) {
        f(upw, Share1{});
      } else if (p.share == 2) {
        f(upw, Share2{});
      } else if (p.share == 3) {
        f(upw, Share3{});
      } else {
        f(upw, Share0{});
      }
    }
  } else {
    f(std::integral_constant<int, 0>{}, Share0{});
  }
}

// Grid size the plans aim at: tiles.h's constant, or RESFAST_NATIVE_TARGET_BLOCKS (tests set
// it low so that small CPU cases take several tiles per block and single-split weight
// gradients, the loops large convs take on the GPU). Both devices read it alike.
inline int64_t target_blocks(int64_t dflt) {
  const char* v = std::getenv("RESFAST_NATIVE_TARGET_BLOCKS");
  if (v == nullptr || *v == '\0') return dflt;
  const long long t = std::atoll(v);
  return t < 1 ? 1 : t;
}

template <typename scalar_t>
inline WgradPlan wgrad_plan(const ConvGeom& g) {
  return make_wgrad_plan(g, IsMmaType<scalar_t>::value, sizeof(scalar_t), sizeof(acc_of<scalar_t>),
                         target_blocks(kWgradTargetBlocks), kWgradUpwLarge);
}

// Whole-sample tiles (tiles.h make_conv_plan's `whole`): RESFAST_NATIVE_WHOLE_SAMPLES=0 never
// takes them, =force wherever one fits (tests), unset / anything else where they cost less.
// Both devices read it alike.
inline int whole_sample_tiles() {
  const char* v = std::getenv("RESFAST_NATIVE_WHOLE_SAMPLES");
  if (v == nullptr) return 0;
  if (std::string(v) == "0") return 1;
  if (std::string(v) == "force") return 2;
  return 0;
}

// Residue-class tiles of the input gradient (tiles.h make_conv_plan's `residue`):
// RESFAST_NATIVE_RESIDUE_TILES=0 never takes them, =force wherever one fits (tests), unset /
// anything else where they cost less. Both devices read it alike.
inline int residue_tiles() {
  const char* v = std::getenv("RESFAST_NATIVE_RESIDUE_TILES");
  if (v == nullptr) return 0;
  if (std::string(v) == "0") return 1;
  if (std::string(v) == "force") return 2;
  return 0;
}

template <typename scalar_t>
inline ConvPlan conv_plan(const ConvGeom& g, bool input_grad) {
  return make_conv_plan(g, input_grad, IsMmaType<scalar_t>::value, sizeof(scalar_t), sizeof(acc_of<scalar_t>),
                        target_blocks(kTargetBlocks), whole_sample_tiles(), residue_tiles());
}

}  // namespace resfast
