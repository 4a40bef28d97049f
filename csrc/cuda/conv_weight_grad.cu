// Launcher of the tiled weight-gradient kernel (per-split partial sums, reduced in a fixed order).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "conv_kernels.cuh"
#include "launch.h"

namespace resfast {
namespace {

// The weight gradient from the split partials, summed over the splits, permuted from
// [co][tap][ci] to [co][ci][kh][kw] and rounded to the weight's dtype in one launch
// (tiles.h wgrad_finalize_element: the CPU twin's arithmetic).
template <typename scalar_t, typename acc_t>
__global__ void wgrad_finalize_kernel(const acc_t* __restrict__ part, int64_t splits, ConvGeom g, int64_t nw,
                                      scalar_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nw; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = static_cast<scalar_t>(wgrad_finalize_element(part, splits, g, i));
  }
}

}  // namespace

bool launch_weight_grad_tiled(const at::Tensor& grad_out, const at::Tensor& x, const ConvPrep& p,
                              at::Tensor& grad_weight) {
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
      const auto kernel = wgrad_tile_kernel<scalar_t, decltype(upw)::value, decltype(share)::value>;
      allow_smem(kernel, plan.smem_bytes);
      kernel
          <<<static_cast<unsigned>(plan.cblocks * plan.splits), kThreads, plan.smem_bytes, stream>>>(args, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // partials are [split][co][tap][ci] (tiles.h wgrad_part_index); summed, permuted and cast in one launch
    using acc_t = acc_of<scalar_t>;
    grad_weight = at::empty({g.Cout, g.cin_g, g.KH, g.KW}, x.options());
    const int64_t blocks = std::min<int64_t>((nw + 255) / 256, 4096);
    wgrad_finalize_kernel<scalar_t, acc_t><<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), 256, 0, stream>>>(
        part.const_data_ptr<acc_t>(), plan.splits, g, nw, grad_weight.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launched = true;
  });
  return launched;
}

}  // namespace resfast
