// Launcher of the tiled forward kernel (tensor cores for float16 / bfloat16, SIMT otherwise).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "conv_kernels.cuh"
#include "launch.h"

namespace resfast {

template <typename scalar_t>
at::Tensor prepared_weights_cuda(const ConvPrep& p, const ConvPlan& plan, bool transposed, cudaStream_t stream,
                                 at::Tensor* bn_ss) {
  using acc_t = acc_of<scalar_t>;
  at::Tensor wp = at::empty({plan.w_prep}, p.weight.options());
  const int64_t n_ss = bn_ss != nullptr ? bn_ss_size(p.g.C) : 0;
  if (bn_ss != nullptr) *bn_ss = at::empty({n_ss}, p.mean.options());
  const int64_t n = std::max(plan.w_prep, n_ss);
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
  prepare_weights_kernel<scalar_t><<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), 256, 0, stream>>>(
      p.weight.const_data_ptr<scalar_t>(), p.g, plan, transposed, wp.data_ptr<scalar_t>(), bn_params<acc_t>(p),
      bn_ss != nullptr ? bn_ss->data_ptr<acc_t>() : nullptr, n_ss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return wp;
}

template at::Tensor prepared_weights_cuda<float>(const ConvPrep&, const ConvPlan&, bool, cudaStream_t, at::Tensor*);
template at::Tensor prepared_weights_cuda<double>(const ConvPrep&, const ConvPlan&, bool, cudaStream_t, at::Tensor*);
template at::Tensor prepared_weights_cuda<c10::Half>(const ConvPrep&, const ConvPlan&, bool, cudaStream_t,
                                                     at::Tensor*);
template at::Tensor prepared_weights_cuda<c10::BFloat16>(const ConvPrep&, const ConvPlan&, bool, cudaStream_t,
                                                         at::Tensor*);

bool launch_forward_tiled(const at::Tensor& x, const ConvPrep& p, const at::Tensor& bias, const at::Tensor& out) {
  if (force_generic_kernels()) return false;
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_conv_forward_tiled", [&] {
    const ConvPlan plan = conv_plan<scalar_t>(p.g, false);
    if (!plan.ok) return;
    ConvArgs<scalar_t> args = conv_args<scalar_t>(x, p, bias, at::Tensor(), out, at::Tensor(), at::Tensor());
    auto stream = at::cuda::getCurrentCUDAStream();
    at::Tensor bn_ss;
    const at::Tensor wp = prepared_weights_cuda<scalar_t>(p, plan, false, stream, &bn_ss);
    args.wp = wp.const_data_ptr<scalar_t>();
    args.bn_ss = bn_ss.const_data_ptr<acc_of<scalar_t>>();
    dispatch_conv<scalar_t, false>(plan, [&](auto nt, auto whole, auto res) {
      const auto kernel = conv_tile_kernel<scalar_t, false, decltype(nt)::value, decltype(whole)::value,
                                         decltype(res)::value>;
      allow_smem(kernel, plan.smem_bytes);
      kernel
          <<<static_cast<unsigned>(plan.blocks), kThreads, plan.smem_bytes, stream>>>(args, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    launched = true;
  });
  return launched;
}

}  // namespace resfast
