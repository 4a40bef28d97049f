// The tiled conv kernels: one CUDA block runs one block program of resfast/tiles.h.
//
// This header needs only the c10 scalar types (no ATen), so resfast/profiling/static_native.py
// compiles it on its own for sm_90 and reads the kernels' SASS.
#pragma once

#include "resfast/tiles.h"

namespace resfast {

// Forward (kInputGrad = false) or input gradient; NT n8 tiles per warp (tensor cores) or 0 (SIMT);
// kWhole: the plan's tiles are whole samples (SpatialTile::S > 0); kRes: residue-class tiles
// (SpatialTile::R, the input gradient with strides 2 x 2).
// Launch bounds: at least 3 (forward / input grad) or 2 (weight grad, with its larger
// accumulator sets) resident blocks per SM, i.e. at most 168 / 255 registers; ptxas otherwise
// picks its own cap and may spill.
template <typename T, bool kInputGrad, int NT, bool kWhole, bool kRes>
__global__ void __launch_bounds__(kThreads, 3) conv_tile_kernel(const __grid_constant__ ConvArgs<T> a, const __grid_constant__ ConvPlan p) {
  extern __shared__ __align__(16) unsigned char smem[];
  conv_block<DeviceBlock, T, kInputGrad, NT, kWhole, kRes>(DeviceBlock{}, a, p, int64_t(blockIdx.x), smem);
}

// Weight gradient; UPW units per warp (tensor cores) or 0 (SIMT); kShare as wgrad_block.
template <typename T, int UPW, int kShare>
__global__ void __launch_bounds__(kThreads, 2) wgrad_tile_kernel(const __grid_constant__ ConvArgs<T> a,
                                                               const __grid_constant__ WgradPlan p) {
  extern __shared__ __align__(16) unsigned char smem[];
  wgrad_block<DeviceBlock, T, UPW, kShare>(DeviceBlock{}, a, p, int64_t(blockIdx.x), smem);
}

// The weights in a plan's tile layout (tiles.h prepared_weight), one element per thread, and
// (ss != nullptr) the BN table (bn_ss_value, n_ss elements).
template <typename T>
__global__ void __launch_bounds__(256) prepare_weights_kernel(const T* __restrict__ w, const __grid_constant__ ConvGeom g,
                                                              const __grid_constant__ ConvPlan p, bool transposed,
                                                              T* __restrict__ out, const __grid_constant__ BNParams<acc_of<T>> bn,
                                                              acc_of<T>* __restrict__ ss, int64_t n_ss) {
  const int64_t n = p.w_prep > n_ss ? p.w_prep : n_ss;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (i < p.w_prep) out[i] = prepared_weight(w, g, p, transposed, i);
    if (i < n_ss) ss[i] = bn_ss_value(bn, g.C, i);
  }
}

}  // namespace resfast
