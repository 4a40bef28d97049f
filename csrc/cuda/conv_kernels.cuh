// The tiled conv kernels: one CUDA block runs one block program of resfast/tiles.h.
//
// This header needs only the c10 scalar types (no ATen), so resfast/profiling/static_native.py
// compiles it on its own for sm_90 and reads the kernels' SASS.
#pragma once

#include "resfast/tiles.h"

namespace resfast {

// Forward (kInputGrad = false) or input gradient; NT n8 tiles per warp (tensor cores) or 0 (SIMT).
// Launch bounds: at least 3 (forward / input grad) or 2 (weight grad, with its larger
// accumulator sets) resident blocks per SM, i.e. at most 168 / 255 registers; ptxas otherwise
// picks its own cap and may spill.
template <typename T, bool kInputGrad, int NT>
__global__ void __launch_bounds__(kThreads, 3) conv_tile_kernel(const __grid_constant__ ConvArgs<T> a, const __grid_constant__ ConvPlan p) {
  extern __shared__ __align__(16) unsigned char smem[];
  conv_block<DeviceBlock, T, kInputGrad, NT>(DeviceBlock{}, a, p, int64_t(blockIdx.x), smem);
}

// Weight gradient; UPW units per warp (tensor cores) or 0 (SIMT); kAShared as wgrad_block.
template <typename T, int UPW, bool kAShared>
__global__ void __launch_bounds__(kThreads, 2) wgrad_tile_kernel(const __grid_constant__ ConvArgs<T> a,
                                                               const __grid_constant__ WgradPlan p) {
  extern __shared__ __align__(16) unsigned char smem[];
  wgrad_block<DeviceBlock, T, UPW, kAShared>(DeviceBlock{}, a, p, int64_t(blockIdx.x), smem);
}

// The weights in a plan's tile layout (tiles.h prepared_weight), one element per thread.
template <typename T>
__global__ void __launch_bounds__(256) prepare_weights_kernel(const T* __restrict__ w, const __grid_constant__ ConvGeom g,
                                                              const __grid_constant__ ConvPlan p, bool transposed,
                                                              T* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.w_prep; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = prepared_weight(w, g, p, transposed, i);
  }
}

}  // namespace resfast
