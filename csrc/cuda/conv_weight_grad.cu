// Launcher of the tiled weight-gradient kernel (per-split partial sums, reduced in a fixed order).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "conv_kernels.cuh"
#include "launch.h"

namespace resfast {

bool launch_weight_grad_tiled(const at::Tensor& grad_out, const at::Tensor& x, const ConvPrep& p,
                              at::Tensor& grad_weight_acc) {
  if (force_generic_kernels()) return false;
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_conv_weight_grad_tiled", [&] {
    const WgradPlan plan = wgrad_plan<scalar_t>(p.g);
    if (!plan.ok) return;
    const ConvGeom& g = p.g;
    const int64_t nw = g.Cout * g.cin_g * g.KH * g.KW;
    // One row of partial weight gradients per split; every element is written by one block.
    at::Tensor part = at::empty({plan.splits, nw}, x.options().dtype(acc_dtype(x)));
    const ConvArgs<scalar_t> args = conv_args<scalar_t>(x, p, at::Tensor(), grad_out, at::Tensor(), part,
                                                        at::Tensor());
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_upw<scalar_t>(plan, [&](auto upw, auto share) {
      wgrad_tile_kernel<scalar_t, decltype(upw)::value, decltype(share)::value>
          <<<static_cast<unsigned>(plan.cblocks * plan.splits), kThreads, plan.smem_bytes, stream>>>(args, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // partials are [split][co][tap][ci] (tiles.h wgrad_part_index)
    grad_weight_acc = part.sum(0).view({g.Cout, g.KH, g.KW, g.cin_g}).permute({0, 3, 1, 2}).contiguous();
    launched = true;
  });
  return launched;
}

}  // namespace resfast
