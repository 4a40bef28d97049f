// The resfast op library: schemas and the Python module resfast._C.
//
// The schemas are the same strings as resfast/ops/schemas.py SCHEMAS (the one source, which
// the triton backend registers under the resfast_triton namespace); tests/test_native.py
// asserts that every schema registered here equals the Python one. Kernels are registered per
// device in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA), bn_stats_update's version bumps
// here (its ADInplaceOrView kernel); the optional bn_relu_conv2d_train and
// bn_relu_conv2d_backward_full are composed here from the statistics and the conv, and from the
// conv backward and the BN input gradient, and bn_relu_conv2d_backward_pair from two of the latter.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>

#include <optional>
#include <tuple>

namespace resfast {
namespace {

#define RESFAST_CONV "int[] stride, int[] padding, int[] dilation, int groups"
#define RESFAST_BN "Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor invstd"
#define RESFAST_ELEMT                                                                                     \
  "Tensor grad_z, Tensor x, Tensor? bn_weight, Tensor mean, Tensor invstd, Tensor sum_dz, Tensor sum_dz_xhat, " \
  "float inv_count"

using Stats2 = std::tuple<at::Tensor, at::Tensor>;
using BnStatsUpdateFn = Stats2(const at::Tensor&, const std::optional<at::Tensor>&,
                               const std::optional<at::Tensor>&, double, double);

c10::TypedOperatorHandle<BnStatsUpdateFn>& bn_stats_update_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resfast::bn_stats_update", "")
                       .typed<BnStatsUpdateFn>();
  return op;
}

// bn_stats_update's ADInplaceOrView kernel: the device kernels (csrc/cpu, csrc/cuda) write the
// running statistics through raw pointers, so their autograd versions are bumped here, as ATen's
// in-place ops bump theirs (a graph that saved them then refuses to run backward).
Stats2 bn_stats_update_inplace_view(c10::DispatchKeySet ks, const at::Tensor& x,
                                    const std::optional<at::Tensor>& running_mean,
                                    const std::optional<at::Tensor>& running_var, double momentum, double eps) {
  auto out = bn_stats_update_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, x, running_mean, running_var,
                                             momentum, eps);
  if (running_mean.has_value()) torch::autograd::increment_version(*running_mean);
  if (running_var.has_value()) torch::autograd::increment_version(*running_var);
  return out;
}

// The training forward in one op (the triton op set has the same op): bn_stats_update of x,
// then the fused conv with those statistics. Returns (y, mean, invstd). One call from Python
// instead of two.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_conv2d_train(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static auto conv = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("resfast::bn_relu_conv2d", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                           const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                           at::IntArrayRef, int64_t, bool)>();
  auto [mean, invstd] = bn_stats_update_op().call(x, running_mean, running_var, momentum, eps);
  at::Tensor y = conv.call(x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, true);
  return {y, mean, invstd};
}

using Grads5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The whole training backward when mean/invstd are x's own batch statistics (the triton op set
// has the same op; resfast/ops/reference.py defines it): the conv and ReLU backward, then the
// BN input gradient with the coupling terms over N*H*W positions, returned or written into
// (accumulate: added to) grad_x_out, an empty tensor then returned for it. One call from
// Python instead of two; the weight gradient is computed whatever weight_grad says (the
// kernel takes it in the same pass). Returns (grad_x, grad_weight, grad_bias or [0],
// sum_dz_xhat, sum_dz).
Grads5 bn_relu_conv2d_backward_full(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bn_weight,
                                    const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean,
                                    const at::Tensor& invstd, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, bool bias_grad,
                                    const std::optional<at::Tensor>& grad_x_out, bool accumulate, bool weight_grad) {
  (void)weight_grad;
  static auto backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resfast::bn_relu_conv2d_backward", "")
          .typed<Grads5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                        at::IntArrayRef, at::IntArrayRef, int64_t, bool)>();
  static auto elemt = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("resfast::bn_backward_elemt", "")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, double)>();
  static auto elemt_out =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resfast::bn_backward_elemt_out", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool, const at::Tensor&)>();
  TORCH_CHECK(x.dim() == 4 && x.size(1) > 0, "resfast::bn_relu_conv2d_backward_full: x must be N x C x H x W with C > 0");
  auto [grad_z, grad_w, grad_b, sum_dz, sum_dz_xhat] =
      backward.call(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, bias_grad);
  const int64_t count = x.numel() / x.size(1);
  const double inv_count = count > 0 ? 1.0 / static_cast<double>(count) : 0.0;
  at::Tensor grad_x;
  if (grad_x_out.has_value()) {
    elemt_out.call(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count, accumulate, *grad_x_out);
    grad_x = x.new_empty({0});
  } else {
    grad_x = elemt.call(grad_z, x, bn_weight, mean, invstd, sum_dz, sum_dz_xhat, inv_count);
  }
  return {grad_x, grad_w, grad_b, sum_dz_xhat, sum_dz};
}

using Grads6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Two chained fused convs' training backward (the triton op set has the same op; a dense
// layer's conv3x3, then its conv1x1 into the block's gradient buffer): bn_relu_conv2d_backward_full
// of the second conv (dL/dx2 returned), then of the first with dL/dx1 written into (accumulate:
// added to) grad_x_out. Returns (grad_w2, sum_dz_xhat2, sum_dz2, grad_w1, sum_dz_xhat1, sum_dz1).
Grads6 bn_relu_conv2d_backward_pair(const at::Tensor& grad_out, const at::Tensor& x2, const at::Tensor& w2,
                                    const std::optional<at::Tensor>& g2, const std::optional<at::Tensor>& b2,
                                    const at::Tensor& mean2, const at::Tensor& invstd2, at::IntArrayRef stride2,
                                    at::IntArrayRef padding2, at::IntArrayRef dilation2, int64_t groups2,
                                    const at::Tensor& x1, const at::Tensor& w1, const std::optional<at::Tensor>& g1,
                                    const std::optional<at::Tensor>& b1, const at::Tensor& mean1,
                                    const at::Tensor& invstd1, at::IntArrayRef stride1, at::IntArrayRef padding1,
                                    at::IntArrayRef dilation1, int64_t groups1, const at::Tensor& grad_x_out,
                                    bool accumulate) {
  TORCH_CHECK(x2.dim() == 4 && x1.dim() == 4 && w1.dim() == 4 && x2.size(0) == x1.size(0) && x2.size(1) == w1.size(0),
              "resfast::bn_relu_conv2d_backward_pair: x2 is not the output of the first conv");
  auto [gx2, gw2, gb2, sdzx2, sdz2] = bn_relu_conv2d_backward_full(grad_out, x2, w2, g2, b2, mean2, invstd2, stride2,
                                                                   padding2, dilation2, groups2, false, std::nullopt,
                                                                   false, true);
  (void)gb2;
  auto [gx1, gw1, gb1, sdzx1, sdz1] = bn_relu_conv2d_backward_full(gx2, x1, w1, g1, b1, mean1, invstd1, stride1,
                                                                   padding1, dilation1, groups1, false, grad_x_out,
                                                                   accumulate, true);
  (void)gx1;
  (void)gb1;
  return {gw2, sdzx2, sdz2, gw1, sdzx1, sdz1};
}

}  // namespace
}  // namespace resfast

TORCH_LIBRARY(resfast, m) {
  m.def("bn_stats(Tensor x) -> (Tensor, Tensor)");
  m.def(
      "bn_stats_update(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
      "float eps) -> (Tensor, Tensor)");
  m.def("bn_relu_conv2d(Tensor x, Tensor weight, Tensor? bias, " RESFAST_BN ", " RESFAST_CONV
        ", bool batch_stats) -> Tensor");
  m.def("bn_relu_conv2d_out(Tensor x, Tensor weight, Tensor? bias, " RESFAST_BN ", " RESFAST_CONV
        ", Tensor(a!) out) -> ()");
  m.def("bn_relu_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, " RESFAST_BN ", " RESFAST_CONV
        ", bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_backward_elemt(" RESFAST_ELEMT ") -> Tensor");
  m.def("bn_backward_elemt_out(" RESFAST_ELEMT ", bool accumulate, Tensor(a!) out) -> ()");
  // optional (resfast/ops/schemas.py OPTIONAL_SCHEMAS): the training forward and backward in one op each
  m.def("bn_relu_conv2d_train(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, " RESFAST_CONV
        ") -> (Tensor, Tensor, Tensor)");
  m.def("bn_relu_conv2d_backward_full(Tensor grad_out, Tensor x, Tensor weight, " RESFAST_BN ", " RESFAST_CONV
        ", bool bias_grad, Tensor(a!)? grad_x_out, bool accumulate, bool weight_grad) -> (Tensor, Tensor, Tensor, "
        "Tensor, Tensor)");
  m.def("bn_relu_conv2d_backward_pair(Tensor grad_out, Tensor x2, Tensor w2, Tensor? g2, Tensor? b2, Tensor mean2, "
        "Tensor invstd2, int[] stride2, int[] padding2, int[] dilation2, int groups2, Tensor x1, Tensor w1, "
        "Tensor? g1, Tensor? b1, Tensor mean1, Tensor invstd1, int[] stride1, int[] padding1, int[] dilation1, "
        "int groups1, Tensor(a!) grad_x_out, bool accumulate) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(resfast, ADInplaceOrView, m) {
  m.impl("bn_stats_update", TORCH_FN(resfast::bn_stats_update_inplace_view));
}

TORCH_LIBRARY_IMPL(resfast, CompositeExplicitAutograd, m) {
  m.impl("bn_relu_conv2d_train", &resfast::bn_relu_conv2d_train);
  m.impl("bn_relu_conv2d_backward_full", &resfast::bn_relu_conv2d_backward_full);
  m.impl("bn_relu_conv2d_backward_pair", &resfast::bn_relu_conv2d_backward_pair);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef RESFAST_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
