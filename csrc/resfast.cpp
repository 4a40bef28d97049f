// The resfast op library: schemas (identical to resfast/ops/registration.py SCHEMAS, which the
// triton backend registers under the resfast_triton namespace) and the Python module resfast._C.
// Kernels are registered per device in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(resfast, m) {
  m.def("bn_stats(Tensor x) -> (Tensor, Tensor)");
  m.def(
      "bn_relu_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor mean, Tensor invstd, int[] stride, int[] padding, int[] dilation, int groups, "
      "bool batch_stats) -> Tensor");
  m.def(
      "bn_relu_conv2d_out(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor mean, Tensor invstd, int[] stride, int[] padding, int[] dilation, int groups, "
      "Tensor(a!) out) -> ()");
  m.def(
      "bn_relu_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bn_weight, "
      "Tensor? bn_bias, Tensor mean, Tensor invstd, int[] stride, int[] padding, int[] dilation, "
      "int groups) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_backward_elemt(Tensor grad_z, Tensor x, Tensor? bn_weight, Tensor mean, Tensor invstd, "
      "Tensor mean_dz, Tensor mean_dz_xhat) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef RESFAST_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
