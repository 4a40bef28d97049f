// Warp-level tensor-core primitives (ldmatrix, mma.sync m16n8k16 with fp32 accumulation) and
// their emulation on the CPU.
//
// The tile code in tiles.h is written once for both devices. On the GPU a warp function runs
// in each of the 32 lanes (NL = 1: every per-lane array has one entry, this lane's); on the
// CPU one call runs the whole warp (NL = 32: entry s is lane s). Only the two collective
// instructions differ: on the GPU they are the PTX instructions, on the CPU they gather and
// scatter the lanes' registers with the fragment layouts of the PTX ISA (ldmatrix: "Warp-level
// matrix load instruction"; mma.m16n8k16: "Matrix Fragments for mma.m16n8k16 with
// floating point type"). The CPU tests therefore check the lane addressing, the shared-memory
// layouts and the fragment-to-element mapping that the GPU uses.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "resfast/math.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace resfast {

// 16-bit floating-point types the tensor-core path takes; their bits are in `.x`.
template <typename T>
struct IsMmaType : std::false_type {};
template <>
struct IsMmaType<c10::Half> : std::true_type {};
template <>
struct IsMmaType<c10::BFloat16> : std::true_type {};

RESFAST_HD uint32_t pack_bits(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

template <typename T>
RESFAST_HD float bits_to_float(uint16_t b) {
  return static_cast<float>(T(b, T::from_bits()));
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8j..8j+7 give the addresses of the
// eight 16-byte rows of matrix j; register j of lane l receives matrix j's elements
// (row l/4, cols 2(l%4), 2(l%4)+1), or with Trans (rows 2(l%4), 2(l%4)+1, col l/4).
template <int NL, bool Trans>
RESFAST_HD void ldsm_x4(uint32_t (&r)[NL][4], const uint16_t* const (&addr)[NL]) {
#if defined(__CUDA_ARCH__)
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(addr[0]));
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0][0]), "=r"(r[0][1]), "=r"(r[0][2]), "=r"(r[0][3])
                 : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0][0]), "=r"(r[0][1]), "=r"(r[0][2]), "=r"(r[0][3])
                 : "r"(a));
  }
#else
  if constexpr (NL == 32) {
    for (int l = 0; l < 32; ++l) {
      for (int j = 0; j < 4; ++j) {
        uint16_t lo, hi;
        if constexpr (Trans) {
          lo = addr[j * 8 + 2 * (l % 4)][l / 4];
          hi = addr[j * 8 + 2 * (l % 4) + 1][l / 4];
        } else {
          lo = addr[j * 8 + l / 4][2 * (l % 4)];
          hi = addr[j * 8 + l / 4][2 * (l % 4) + 1];
        }
        r[l][j] = pack_bits(lo, hi);
      }
    }
  }
#endif
}

// A 16-bit element of shared memory as the MMA loops address it: on the GPU its 32-bit
// shared-window byte address (offsets are one 32-bit add, no generic-to-shared conversion in
// the loop), on the CPU a pointer. `r + e` is the element e places further.
struct SmemPtr {
#if defined(__CUDA_ARCH__)
  uint32_t a;
#else
  const uint16_t* a;
#endif
  RESFAST_HD SmemPtr operator+(int e) const {
#if defined(__CUDA_ARCH__)
    return SmemPtr{a + 2u * uint32_t(e)};
#else
    return SmemPtr{a + e};
#endif
  }
};

RESFAST_HD SmemPtr smem_ptr(const void* p) {
#if defined(__CUDA_ARCH__)
  return SmemPtr{static_cast<uint32_t>(__cvta_generic_to_shared(p))};
#else
  return SmemPtr{static_cast<const uint16_t*>(p)};
#endif
}

// ldsm_x4 from SmemPtr row addresses.
template <int NL, bool Trans>
RESFAST_HD void ldsm_x4(uint32_t (&r)[NL][4], const SmemPtr (&addr)[NL]) {
#if defined(__CUDA_ARCH__)
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0][0]), "=r"(r[0][1]), "=r"(r[0][2]), "=r"(r[0][3])
                 : "r"(addr[0].a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0][0]), "=r"(r[0][1]), "=r"(r[0][2]), "=r"(r[0][3])
                 : "r"(addr[0].a));
  }
#else
  const uint16_t* p[NL];
  for (int s = 0; s < NL; ++s) p[s] = addr[s].a;
  ldsm_x4<NL, Trans>(r, p);
#endif
}

// d += a * b for one m16n8k16 tile: a (16 x 16, row), b (16 x 8, col), fp32 d. Lane l
// (g = l/4, t = l%4) holds a: {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)},
// b: {(k 2t..2t+1, n g), (k 2t+8.., n g)}, d: {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
// The CPU sums the products (exact in fp32 for 16-bit inputs) in k order.
template <typename T, int NL>
RESFAST_HD void mma_16816(float (&d)[NL][4], const uint32_t (&a)[NL][4], const uint32_t (&b)[NL][2]) {
  static_assert(IsMmaType<T>::value, "mma_16816 takes c10::Half or c10::BFloat16");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])
        : "r"(a[0][0]), "r"(a[0][1]), "r"(a[0][2]), "r"(a[0][3]), "r"(b[0][0]), "r"(b[0][1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])
        : "r"(a[0][0]), "r"(a[0][1]), "r"(a[0][2]), "r"(a[0][3]), "r"(b[0][0]), "r"(b[0][1]));
  }
#else
  if constexpr (NL == 32) {
    float A[16][16], B[16][8], D[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int j = 0; j < 4; ++j) {
        A[ar[j]][ac[j]] = bits_to_float<T>(uint16_t(a[l][j] & 0xffffu));
        A[ar[j]][ac[j] + 1] = bits_to_float<T>(uint16_t(a[l][j] >> 16));
      }
      for (int j = 0; j < 2; ++j) {
        B[2 * t + 8 * j][g] = bits_to_float<T>(uint16_t(b[l][j] & 0xffffu));
        B[2 * t + 8 * j + 1][g] = bits_to_float<T>(uint16_t(b[l][j] >> 16));
      }
      D[g][2 * t] = d[l][0];
      D[g][2 * t + 1] = d[l][1];
      D[g + 8][2 * t] = d[l][2];
      D[g + 8][2 * t + 1] = d[l][3];
    }
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        float s = D[i][j];
        for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][j];
        D[i][j] = s;
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      d[l][0] = D[g][2 * t];
      d[l][1] = D[g][2 * t + 1];
      d[l][2] = D[g + 8][2 * t];
      d[l][3] = D[g + 8][2 * t + 1];
    }
  }
#endif
}

// 16 bytes moved as one vector (LDG.128 / LDS.128 / STS.128 on the GPU).
struct alignas(16) Vec16 {
  uint32_t w[4];
};

// 16 bytes from / to global memory: a read-only (non-coherent) 16-byte load and a 16-byte store.
RESFAST_HD Vec16 ld_global16(const void* p) {
  Vec16 v;
#if defined(__CUDA_ARCH__)
  const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
  v.w[0] = q.x;
  v.w[1] = q.y;
  v.w[2] = q.z;
  v.w[3] = q.w;
#else
  std::memcpy(&v, p, sizeof(v));
#endif
  return v;
}

RESFAST_HD void st_global16(void* p, const Vec16& v) {
#if defined(__CUDA_ARCH__)
  __stwb(reinterpret_cast<uint4*>(p), make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]));
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

// Whether any lane of the warp has v (a warp vote on the GPU; the CPU holds all 32 lanes' v).
template <int NL>
RESFAST_HD bool warp_any(const bool (&v)[NL]) {
#if defined(__CUDA_ARCH__)
  return __any_sync(0xffffffffu, v[0]) != 0;
#else
  bool any = false;
  for (int s = 0; s < NL; ++s) any |= v[s];
  return any;
#endif
}

// Asynchronous 16-byte global -> shared copy (cp.async.cg, LDGSTS on the GPU); completed by
// cp_async_wait_all before the block barrier that publishes the tile.
RESFAST_HD void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__)
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(gmem_src));
#else
  std::memcpy(smem_dst, gmem_src, 16);
#endif
}

RESFAST_HD void cp_async_wait_all() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

// A 16-byte shared-memory store (STS.128; the address must be 16-byte aligned).
RESFAST_HD void st_shared16(void* smem_dst, const Vec16& v) {
#if defined(__CUDA_ARCH__)
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(d), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]),
               "r"(v.w[3]));
#else
  std::memcpy(smem_dst, &v, sizeof(v));
#endif
}

// A read-only global scalar (LDG.CONSTANT on the GPU).
template <typename T>
RESFAST_HD T ld_global(const T* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 2) {
    const unsigned short b = __ldg(reinterpret_cast<const unsigned short*>(p));
    T v;
    std::memcpy(&v, &b, 2);
    return v;
  } else {
    return __ldg(p);
  }
#else
  return *p;
#endif
}

// Two 16-bit floats in one 32-bit word (low half first) to / from two floats, rounding to
// nearest even (one F2FP instruction per pair on the GPU).
template <typename T>
RESFAST_HD void unpack2(uint32_t w, float& lo, float& hi) {
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
#if defined(__CUDA_ARCH__)
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
#else
    lo = bits_to_float<T>(uint16_t(w & 0xffffu));
    hi = bits_to_float<T>(uint16_t(w >> 16));
#endif
  } else {
    lo = bits_to_float<T>(uint16_t(w & 0xffffu));
    hi = bits_to_float<T>(uint16_t(w >> 16));
  }
}

template <typename T>
RESFAST_HD uint32_t pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
#else
  return pack_bits(T(lo).x, T(hi).x);
#endif
}

// relu(lo), relu(hi) rounded to T and packed (low half first): one F2FP.RELU instruction on
// the GPU (cvt.rn.relu: negative -> 0, NaN stays NaN, as torch.relu); relu commutes with the
// rounding, so the CPU rounds relu's result.
template <typename T>
RESFAST_HD uint32_t pack2_relu(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    asm("cvt.rn.relu.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.relu.f16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  }
  return d;
#else
  return pack_bits(T(relu(lo)).x, T(relu(hi)).x);
#endif
}

// Per 16-bit half, the larger of a and b as unsigned integers (one VIMNMX on sm_90).
RESFAST_HD uint32_t max_u16x2(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __vmaxu2(a, b);
#else
  const uint32_t lo = (a & 0xffffu) > (b & 0xffffu) ? (a & 0xffffu) : (b & 0xffffu);
  const uint32_t hi = (a >> 16) > (b >> 16) ? (a >> 16) : (b >> 16);
  return lo | (hi << 16);
#endif
}

// Whether a running max_u16x2 of 16-bit floats' magnitude bits (sign cleared) saw an Inf or
// NaN: all of those are at least the Inf pattern, every finite value below it.
template <typename T>
RESFAST_HD bool nonfinite_max16(uint32_t m) {
  constexpr uint32_t inf = std::is_same<T, c10::BFloat16>::value ? 0x7f80u : 0x7c00u;
  return (m & 0xffffu) >= inf || (m >> 16) >= inf;
}

// Copies 8 elements between 16-byte aligned addresses with 16-byte vector accesses.
template <typename T>
RESFAST_HD void copy8_vec(T* dst, const T* src) {
  constexpr int kWords = int(sizeof(T)) * 8 / 16;
#if defined(__CUDA_ARCH__)
  const Vec16* s = reinterpret_cast<const Vec16*>(src);
  Vec16* d = reinterpret_cast<Vec16*>(dst);
#pragma unroll
  for (int i = 0; i < kWords; ++i) d[i] = s[i];
#else
  std::memcpy(dst, src, sizeof(Vec16) * kWords);
#endif
}

}  // namespace resfast
