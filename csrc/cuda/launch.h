// Host launchers of the tiled conv kernels (conv_forward.cu, conv_input_grad.cu,
// conv_weight_grad.cu: one translation unit each, so a parallel build compiles them at once),
// called by the op implementations in ops_cuda.cu. Each returns false when no plan fits the
// conv (or RESFAST_NATIVE_KERNELS=generic): the caller then runs the per-element kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "resfast/host.h"

namespace resfast {

// A plan's dynamic shared memory above the 48 KiB every kernel gets (tiles.h kSmemLimit: up to
// 72 KiB) needs the kernel's opt-in, set before its launch (a host-side attribute, no sync).
template <class Kernel>
inline void allow_smem(Kernel kernel, int bytes) {
  if (bytes > kSmemDefault) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

// Launches prepare_weights_kernel (conv_kernels.cuh) for a plan: the weights in its tile layout,
// and with bn_ss the BN table (tiles.h bn_ss_value) into *bn_ss.
template <typename scalar_t>
at::Tensor prepared_weights_cuda(const ConvPrep& p, const ConvPlan& plan, bool transposed, cudaStream_t stream,
                                 at::Tensor* bn_ss = nullptr);

bool launch_forward_tiled(const at::Tensor& x, const ConvPrep& p, const at::Tensor& bias, const at::Tensor& out);

// grad_z, and the per-channel sums of grad_z and grad_z * xhat into sum_dz / sum_dz_xhat.
bool launch_input_grad_tiled(const at::Tensor& grad_out, const at::Tensor& x, const ConvPrep& p,
                             const at::Tensor& grad_z, at::Tensor& sum_dz, at::Tensor& sum_dz_xhat);

// dL/dweight in x's (the weight's) dtype, shape [Cout, cin_g, KH, KW] (summed in the
// accumulation dtype, rounded once).
bool launch_weight_grad_tiled(const at::Tensor& grad_out, const at::Tensor& x, const ConvPrep& p,
                              at::Tensor& grad_weight);

}  // namespace resfast
