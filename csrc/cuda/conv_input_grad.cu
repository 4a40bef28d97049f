// Launcher of the tiled input-gradient kernel (dL/dz with the ReLU mask and its per-channel sums).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "conv_kernels.cuh"
#include "launch.h"

namespace resfast {
namespace {

// The two per-channel sums of the input gradient's partial tables ([rows, C] each) in one
// launch: a block of 32 channels x kSumLanes lanes, each lane summing every kSumLanes-th row
// (coalesced across the channels), the lanes combined by halving in shared memory
// (tiles.h column_lane_sum / column_sum_combine: the CPU twin's arithmetic).
template <typename acc_t>
__global__ void column_sums2_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t rows,
                                    int64_t C, acc_t* __restrict__ sum_a, acc_t* __restrict__ sum_b) {
  __shared__ acc_t ra[kSumLanes][32];
  __shared__ acc_t rb[kSumLanes][32];
  const int64_t c = blockIdx.x * int64_t(32) + threadIdx.x;
  const int lane = threadIdx.y;
  ra[lane][threadIdx.x] = c < C ? column_lane_sum(a, rows, C, c, lane) : acc_t(0);
  rb[lane][threadIdx.x] = c < C ? column_lane_sum(b, rows, C, c, lane) : acc_t(0);
  __syncthreads();
  for (int half = kSumLanes / 2; half > 0; half >>= 1) {
    if (lane < half) {
      ra[lane][threadIdx.x] += ra[lane + half][threadIdx.x];
      rb[lane][threadIdx.x] += rb[lane + half][threadIdx.x];
    }
    __syncthreads();
  }
  if (lane == 0 && c < C) {
    sum_a[c] = ra[0][threadIdx.x];
    sum_b[c] = rb[0][threadIdx.x];
  }
}

}  // namespace

bool launch_input_grad_tiled(const at::Tensor& grad_out, const at::Tensor& x, const ConvPrep& p,
                             const at::Tensor& grad_z, at::Tensor& sum_dz, at::Tensor& sum_dz_xhat) {
  if (force_generic_kernels()) return false;
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfast_conv_input_grad_tiled", [&] {
    const ConvPlan plan = conv_plan<scalar_t>(p.g, true);
    if (!plan.ok) return;
    const int64_t rows = plan.spatial;
    const auto acc_opts = x.options().dtype(acc_dtype(x));
    // One row of per-channel sums per spatial tile; every row is written by the blocks.
    at::Tensor part_dz = at::empty({rows, p.g.C}, acc_opts), part_dzx = at::empty({rows, p.g.C}, acc_opts);
    ConvArgs<scalar_t> args = conv_args<scalar_t>(x, p, at::Tensor(), grad_out, grad_z, part_dz, part_dzx);
    auto stream = at::cuda::getCurrentCUDAStream();
    at::Tensor bn_ss;
    const at::Tensor wp = prepared_weights_cuda<scalar_t>(p, plan, true, stream, &bn_ss);
    args.wp = wp.const_data_ptr<scalar_t>();
    args.bn_ss = bn_ss.const_data_ptr<acc_of<scalar_t>>();
    dispatch_conv<scalar_t, true>(plan, [&](auto nt, auto whole, auto res) {
      const auto kernel = conv_tile_kernel<scalar_t, true, decltype(nt)::value, decltype(whole)::value,
                                         decltype(res)::value>;
      allow_smem(kernel, plan.smem_bytes);
      kernel
          <<<static_cast<unsigned>(plan.blocks), kThreads, plan.smem_bytes, stream>>>(args, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    using acc_t = acc_of<scalar_t>;
    sum_dz = at::empty({p.g.C}, acc_opts);
    sum_dz_xhat = at::empty({p.g.C}, acc_opts);
    column_sums2_kernel<acc_t><<<static_cast<unsigned>((p.g.C + 31) / 32), dim3(32, kSumLanes), 0, stream>>>(
        part_dz.const_data_ptr<acc_t>(), part_dzx.const_data_ptr<acc_t>(), rows, p.g.C, sum_dz.data_ptr<acc_t>(),
        sum_dz_xhat.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launched = true;
  });
  return launched;
}

}  // namespace resfast
