// Launcher of the tiled input-gradient kernel (dL/dz with the ReLU mask and its per-channel sums).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "conv_kernels.cuh"
#include "launch.h"

namespace resfast {

bool launch_input_grad_tiled(const at::Tensor& grad_out, const at::Tensor& x, const ConvPrep& p,
                             const at::Tensor& grad_z, at::Tensor& sum_dz, at::Tensor& sum_dz_xhat) {
  if (force_generic_kernels()) return false;
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_conv_input_grad_tiled", [&] {
    const ConvPlan plan = conv_plan<scalar_t>(p.g, true);
    if (!plan.ok) return;
    const int64_t rows = p.g.N * plan.s.tiles_h * plan.s.tiles_w;
    const auto acc_opts = x.options().dtype(acc_dtype(x));
    // One row of per-channel sums per spatial tile; every row is written by the blocks.
    at::Tensor part_dz = at::empty({rows, p.g.C}, acc_opts), part_dzx = at::empty({rows, p.g.C}, acc_opts);
    ConvArgs<scalar_t> args = conv_args<scalar_t>(x, p, at::Tensor(), grad_out, grad_z, part_dz, part_dzx);
    auto stream = at::cuda::getCurrentCUDAStream();
    at::Tensor bn_ss;
    const at::Tensor wp = prepared_weights_cuda<scalar_t>(p, plan, true, stream, &bn_ss);
    args.wp = wp.const_data_ptr<scalar_t>();
    args.bn_ss = bn_ss.const_data_ptr<acc_of<scalar_t>>();
    dispatch_nt<scalar_t>(plan.nt, [&](auto nt) {
      conv_tile_kernel<scalar_t, true, decltype(nt)::value>
          <<<static_cast<unsigned>(plan.blocks), kThreads, plan.smem_bytes, stream>>>(args, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    sum_dz = part_dz.sum(0);
    sum_dz_xhat = part_dzx.sum(0);
    launched = true;
  });
  return launched;
}

}  // namespace resfast
