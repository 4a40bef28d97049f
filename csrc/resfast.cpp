// The resfast op library: schemas and the Python module resfast._C.
//
// The schemas are the same strings as resfast/ops/schemas.py SCHEMAS (the one source, which
// the triton backend registers under the resfast_triton namespace); tests/test_native.py
// asserts that every schema registered here equals the Python one. Kernels are registered per
// device in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); the device-independent
// bn_stats_update is composed here from bn_stats.
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace resfast {
namespace {

#define RESFAST_CONV "int[] stride, int[] padding, int[] dilation, int groups"
#define RESFAST_BN "Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor invstd"
#define RESFAST_ELEMT                                                                                     \
  "Tensor grad_z, Tensor x, Tensor? bn_weight, Tensor mean, Tensor invstd, Tensor sum_dz, Tensor sum_dz_xhat, " \
  "float inv_count"

// Training statistics (mean, invstd) of x, and the running statistics updated in place as
// F.batch_norm does (unbiased variance).
std::tuple<at::Tensor, at::Tensor> bn_stats_update(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                                                   const std::optional<at::Tensor>& running_var, double momentum,
                                                   double eps) {
  static auto bn_stats = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resfast::bn_stats", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "resfast::bn_stats_update: running_mean and running_var must both be tensors or both be None");
  auto [mean, var] = bn_stats.call(x);
  if (running_mean.has_value()) {
    const int64_t count = x.numel() / std::max<int64_t>(x.size(1), 1);
    const double unbias = static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
    at::NoGradGuard no_grad;
    running_mean->mul_(1.0 - momentum).add_(mean.to(running_mean->scalar_type()), momentum);
    running_var->mul_(1.0 - momentum).add_(var.mul(unbias).to(running_var->scalar_type()), momentum);
  }
  return {mean, at::rsqrt(var + eps)};
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
}

TORCH_LIBRARY_IMPL(resfast, CompositeExplicitAutograd, m) {
  m.impl("bn_stats_update", &resfast::bn_stats_update);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef RESFAST_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
