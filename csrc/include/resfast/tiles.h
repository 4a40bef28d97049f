// Tiled direct convolution, written as the phases of a thread block.
//
// A "block" owns a 16 x 16 tile of pixels of one sample and one conv group. It first fills
// a shared-memory tile (the BN-ReLU activation of the input rows/cols the tile reads, the
// group's weights, or a grad_out tile), then every "thread" tid in [0, 256) computes its
// pixel from shared memory. BN + ReLU are applied once per loaded element instead of once
// per (output channel, tap) as in the per-element functions of math.h.
//
// The CUDA kernels run these phases with __syncthreads() between them; the CPU kernels run
// the same phases one block at a time, the threads of a phase in a loop. The CPU tests
// therefore check the tile indexing the GPU uses. Which path runs is decided by the host
// (tile_fits_*): grouped and depthwise convs with small groups fit; wide dense convs do not.
#pragma once

#include <cstdint>

#include "resfast/math.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RESFAST_UNROLL _Pragma("unroll")
#else
#define RESFAST_UNROLL
#endif

namespace resfast {

constexpr int64_t kTile = 16;
constexpr int64_t kTileThreads = kTile * kTile;
// Weight-gradient elements one thread of the weight-gradient kernel may own (registers).
constexpr int64_t kMaxWeightPerThread = 4;
// Output channels one forward block computes (accumulators per thread); a group with more
// output channels is split over several blocks.
constexpr int64_t kCoBlock = 8;
// Dynamic shared memory a tiled block may use: under the 48 KiB a kernel gets without
// opting in to more, leaving room for the kernels' small static reduction buffers.
constexpr int64_t kTileSmemBytes = 46 * 1024;

struct TileGeom {
  int64_t IH, IW;              // input rows / cols read by one output tile
  int64_t OHB, OWB;            // bound on the output rows / cols that read one input tile
  int64_t tiles_h, tiles_w;    // output tiles
  int64_t itiles_h, itiles_w;  // input tiles
};

RESFAST_HD int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

inline TileGeom make_tile_geom(const ConvGeom& g) {
  TileGeom t;
  t.IH = (kTile - 1) * g.sh + (g.KH - 1) * g.dh + 1;
  t.IW = (kTile - 1) * g.sw + (g.KW - 1) * g.dw + 1;
  // oh - floor_div(ih0 + ph - (KH-1)*dh, sh) <= (kTile - 1 + (KH-1)*dh) / sh + 1 for every
  // output row oh that reads an input row of the tile starting at ih0.
  t.OHB = (kTile - 1 + (g.KH - 1) * g.dh) / g.sh + 2;
  t.OWB = (kTile - 1 + (g.KW - 1) * g.dw) / g.sw + 2;
  t.tiles_h = (g.Ho + kTile - 1) / kTile;
  t.tiles_w = (g.Wo + kTile - 1) / kTile;
  t.itiles_h = (g.H + kTile - 1) / kTile;
  t.itiles_w = (g.W + kTile - 1) / kTile;
  return t;
}

// How the tiled forward splits a group: output channels in blocks of nco (co_blocks blocks
// per group), input channels in chunks of cb staged in shared memory one after another.
// cb == 0 means not even one channel fits: use the generic kernel.
struct ForwardBlocking {
  int64_t nco, co_blocks, cb;
};

inline ForwardBlocking forward_blocking(const ConvGeom& g, const TileGeom& t, int64_t acc_bytes) {
  ForwardBlocking b;
  b.nco = g.cout_g < kCoBlock ? g.cout_g : kCoBlock;
  b.co_blocks = (g.cout_g + b.nco - 1) / b.nco;
  const int64_t per_channel = t.IH * t.IW + b.nco * g.KH * g.KW;
  const int64_t fit = (kTileSmemBytes / acc_bytes) / per_channel;
  b.cb = g.cin_g < fit ? g.cin_g : fit;
  return b;
}

// Shared-memory elements (of acc_t) each tiled kernel needs.
inline int64_t forward_smem_elems(const ConvGeom& g, const TileGeom& t, const ForwardBlocking& b) {
  return b.cb * (t.IH * t.IW + b.nco * g.KH * g.KW);
}
// How the tiled input-gradient kernel splits a group: input channels in blocks of nci
// (accumulators per thread; ci_blocks blocks per group), output channels staged in chunks of
// cbo. cbo == 0: use the generic kernel.
struct InputGradBlocking {
  int64_t nci, ci_blocks, cbo;
};

inline InputGradBlocking input_grad_blocking(const ConvGeom& g, const TileGeom& t, int64_t acc_bytes) {
  InputGradBlocking b;
  b.nci = g.cin_g < kCoBlock ? g.cin_g : kCoBlock;
  b.ci_blocks = (g.cin_g + b.nci - 1) / b.nci;
  const int64_t per_co = t.OHB * t.OWB + b.nci * g.KH * g.KW;
  const int64_t fit = (kTileSmemBytes / acc_bytes) / per_co;
  b.cbo = g.cout_g < fit ? g.cout_g : fit;
  return b;
}

inline int64_t input_grad_smem_elems(const ConvGeom& g, const TileGeom& t, const InputGradBlocking& b) {
  return b.cbo * (t.OHB * t.OWB + b.nci * g.KH * g.KW);
}

// How the tiled weight-gradient kernel splits a group: a block owns the weights of nco output
// x nci input channels (at most kMaxWeightPerThread per thread). nci == 0: generic kernel.
struct WeightGradBlocking {
  int64_t nco, co_blocks, nci, ci_blocks;
};

inline WeightGradBlocking weight_grad_blocking(const ConvGeom& g, const TileGeom& t, int64_t acc_bytes) {
  WeightGradBlocking b;
  b.nco = g.cout_g < kCoBlock ? g.cout_g : kCoBlock;
  b.co_blocks = (g.cout_g + b.nco - 1) / b.nco;
  const int64_t by_threads = (kMaxWeightPerThread * kTileThreads) / (b.nco * g.KH * g.KW);
  const int64_t smem_left = kTileSmemBytes / acc_bytes - b.nco * kTileThreads;
  const int64_t by_smem = smem_left > 0 ? smem_left / (t.IH * t.IW) : 0;
  int64_t nci = g.cin_g;
  if (by_threads < nci) nci = by_threads;
  if (by_smem < nci) nci = by_smem;
  b.nci = nci;
  b.ci_blocks = nci > 0 ? (g.cin_g + nci - 1) / nci : 0;
  return b;
}

inline int64_t weight_grad_smem_elems(const ConvGeom& g, const TileGeom& t, const WeightGradBlocking& b) {
  return b.nco * kTileThreads + b.nci * t.IH * t.IW;
}

// ---- fill phases (any thread count; element e goes to thread e % nthreads) ----

// relu(bn(x)) of the group's input channels [cil0, cil0+cb) over rows [ih0, ih0+IH) and cols
// [iw0, iw0+IW) of sample n, zero outside the image (the conv zero-pads the activation).
// channel_inner enumerates channels fastest, matching a channels-last x in memory.
template <typename scalar_t, typename acc_t>
RESFAST_HD void fill_activation_tile(int64_t tid, int64_t nthreads, const scalar_t* x, const Strides4& xs,
                                     const BNParams<acc_t>& bn, const ConvGeom& g, const TileGeom& t, int64_t n,
                                     int64_t group, int64_t cil0, int64_t cb, int64_t ih0, int64_t iw0,
                                     bool channel_inner, acc_t* a_s) {
  const int64_t plane = t.IH * t.IW;
  const int64_t total = cb * plane;
  for (int64_t e = tid; e < total; e += nthreads) {
    int64_t k, pix;
    if (channel_inner) {
      k = e % cb;
      pix = e / cb;
    } else {
      k = e / plane;
      pix = e - k * plane;
    }
    const int64_t r = pix / t.IW, c = pix - (pix / t.IW) * t.IW;
    const int64_t ih = ih0 + r, iw = iw0 + c;
    const int64_t ci = group * g.cin_g + cil0 + k;
    acc_t v = acc_t(0);
    if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
      v = relu(bn_affine(static_cast<acc_t>(x[n * xs.n + ci * xs.c + ih * xs.h + iw * xs.w]), bn.mean[ci],
                         bn.invstd[ci], bn.gamma[ci], bn.beta[ci]));
    }
    a_s[k * plane + pix] = v;
  }
}

// Weights of the group's output channels [col0, col0+nco) and input channels [cil0, cil0+cb)
// as w_s[(j*cb + k)*KH*KW + tap]; with the whole group this is its [cout_g][cin_g][KH][KW].
template <typename scalar_t, typename acc_t>
RESFAST_HD void fill_weight_tile(int64_t tid, int64_t nthreads, const scalar_t* w, const ConvGeom& g, int64_t group,
                                 int64_t col0, int64_t nco, int64_t cil0, int64_t cb, acc_t* w_s) {
  const int64_t kk = g.KH * g.KW;
  const int64_t total = nco * cb * kk;
  for (int64_t e = tid; e < total; e += nthreads) {
    const int64_t j = e / (cb * kk), rem = e - (e / (cb * kk)) * (cb * kk);
    const int64_t k = rem / kk, tap = rem - (rem / kk) * kk;
    const int64_t co = group * g.cout_g + col0 + j;
    w_s[e] = static_cast<acc_t>(w[(co * g.cin_g + cil0 + k) * kk + tap]);
  }
}

// grad_out of the group's output channels [col0, col0+nco) over rows [oh0, oh0+rows), cols
// [ow0, ow0+cols), zero outside the output; go_s[j*rows*cols + pix].
template <typename scalar_t, typename acc_t>
RESFAST_HD void fill_grad_out_tile(int64_t tid, int64_t nthreads, const scalar_t* go, const Strides4& gs,
                                   const ConvGeom& g, int64_t n, int64_t group, int64_t col0, int64_t nco, int64_t oh0,
                                   int64_t ow0, int64_t rows, int64_t cols, bool channel_inner, acc_t* go_s) {
  const int64_t plane = rows * cols;
  const int64_t total = nco * plane;
  for (int64_t e = tid; e < total; e += nthreads) {
    int64_t j, pix;
    if (channel_inner) {
      j = e % nco;
      pix = e / nco;
    } else {
      j = e / plane;
      pix = e - j * plane;
    }
    const int64_t r = pix / cols, c = pix - (pix / cols) * cols;
    const int64_t oh = oh0 + r, ow = ow0 + c;
    const int64_t co = group * g.cout_g + col0 + j;
    acc_t v = acc_t(0);
    if (oh >= 0 && oh < g.Ho && ow >= 0 && ow < g.Wo) {
      v = static_cast<acc_t>(go[n * gs.n + co * gs.c + oh * gs.h + ow * gs.w]);
    }
    go_s[j * plane + pix] = v;
  }
}

// ---- compute phases (thread tid owns pixel (tid / kTile, tid % kTile) of the tile) ----

// Forward, one input-channel chunk: adds the chunk's contribution to the nco outputs of
// output pixel (r, c) = (tid / kTile, tid % kTile) of the tile into acc[0..nco).
template <typename acc_t>
RESFAST_HD void forward_tile_accumulate(int64_t tid, const ConvGeom& g, const TileGeom& t, int64_t nco, int64_t cb,
                                        const acc_t* a_s, const acc_t* w_s, acc_t* acc) {
  const int64_t r = tid / kTile, c = tid - (tid / kTile) * kTile;
  const int64_t plane = t.IH * t.IW, kk = g.KH * g.KW;
  const acc_t* a0 = a_s + (r * g.sh) * t.IW + c * g.sw;
  // A fixed trip count with a guard (not a break) lets nvcc unroll the loop and keep acc[]
  // in registers.
  RESFAST_UNROLL
  for (int64_t j = 0; j < kCoBlock; ++j) {
    if (j < nco) {
      acc_t sum = acc[j];
      for (int64_t k = 0; k < cb; ++k) {
        const acc_t* ap = a0 + k * plane;
        const acc_t* wp = w_s + (j * cb + k) * kk;
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          for (int64_t kw = 0; kw < g.KW; ++kw) sum += ap[kh * g.dh * t.IW + kw * g.dw] * wp[kh * g.KW + kw];
        }
      }
      acc[j] = sum;
    }
  }
}

// Forward: writes acc[0..nco) (+ bias) to output channels group*cout_g + col0 + j of output
// pixel (oh0 + r, ow0 + c), if that pixel is inside the output.
template <typename scalar_t, typename acc_t>
RESFAST_HD void forward_tile_store(int64_t tid, const ConvGeom& g, int64_t n, int64_t group, int64_t oh0, int64_t ow0,
                                   int64_t col0, int64_t nco, const acc_t* acc, const acc_t* bias, scalar_t* out,
                                   const Strides4& os) {
  const int64_t oh = oh0 + tid / kTile, ow = ow0 + (tid - (tid / kTile) * kTile);
  if (oh >= g.Ho || ow >= g.Wo) return;
  RESFAST_UNROLL
  for (int64_t j = 0; j < kCoBlock; ++j) {
    if (j < nco) {
      const int64_t co = group * g.cout_g + col0 + j;
      const acc_t v = bias != nullptr ? acc[j] + bias[co] : acc[j];
      out[n * os.n + co * os.c + oh * os.h + ow * os.w] = static_cast<scalar_t>(v);
    }
  }
}

// First output row / col whose taps can reach the input tile starting at i0 (may be below
// the first one that really does, or negative: fill_grad_out_tile zero-fills those).
RESFAST_HD int64_t input_tile_out_origin(int64_t i0, int64_t pad, int64_t k, int64_t dil, int64_t stride) {
  return floor_div(i0 + pad - (k - 1) * dil, stride);
}

// Input gradient, one output-channel chunk: adds to acc[k] (k < nci) the chunk's part of
// dL/da at input pixel (ih, iw) of input channel cil0 + k of the group. go_s holds the
// chunk's grad_out tile (origin oh_lo, ow_lo, OHB x OWB), w_s the weights
// [(j*nci + k)*KH*KW + tap] of the chunk's nco output channels.
template <typename acc_t>
RESFAST_HD void input_grad_tile_accumulate(const ConvGeom& g, const TileGeom& t, int64_t ih, int64_t iw,
                                           int64_t oh_lo, int64_t ow_lo, int64_t nci, int64_t nco,
                                           const acc_t* go_s, const acc_t* w_s, acc_t* acc) {
  const int64_t plane = t.OHB * t.OWB, kk = g.KH * g.KW;
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    const int64_t oh = conv_out_coord(ih, kh, g.sh, g.ph, g.dh, g.Ho);
    if (oh < 0) continue;
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const int64_t ow = conv_out_coord(iw, kw, g.sw, g.pw, g.dw, g.Wo);
      if (ow < 0) continue;
      const acc_t* gp = go_s + (oh - oh_lo) * t.OWB + (ow - ow_lo);
      const acc_t* wp = w_s + kh * g.KW + kw;
      RESFAST_UNROLL
      for (int64_t k = 0; k < kCoBlock; ++k) {
        if (k < nci) {
          acc_t sum = acc[k];
          for (int64_t j = 0; j < nco; ++j) sum += gp[j * plane] * wp[(j * nci + k) * kk];
          acc[k] = sum;
        }
      }
    }
  }
}

// Weight gradient: the contribution of one output tile (go_s: nco x kTile x kTile, a_s: the
// activation tile of nci input channels) to the block's weight element
// e = ((j*nci + k)*KH + kh)*KW + kw, i.e. output channel col0 + j, input channel cil0 + k.
template <typename acc_t>
RESFAST_HD acc_t weight_grad_tile_term(const ConvGeom& g, const TileGeom& t, int64_t e, int64_t nci, const acc_t* go_s,
                                       const acc_t* a_s) {
  const int64_t kw = e % g.KW, kh = (e / g.KW) % g.KH, k = (e / (g.KW * g.KH)) % nci, j = e / (g.KW * g.KH * nci);
  const acc_t* gp = go_s + j * kTileThreads;
  const acc_t* ap = a_s + k * t.IH * t.IW + kh * g.dh * t.IW + kw * g.dw;
  acc_t acc = acc_t(0);
  for (int64_t r = 0; r < kTile; ++r) {
    const acc_t* arow = ap + r * g.sh * t.IW;
    for (int64_t c = 0; c < kTile; ++c) acc += gp[r * kTile + c] * arow[c * g.sw];
  }
  return acc;
}

// Index in the whole weight tensor of the block's weight element e (see weight_grad_tile_term).
RESFAST_HD int64_t weight_grad_tile_index(const ConvGeom& g, int64_t group, int64_t col0, int64_t cil0, int64_t nci,
                                          int64_t e) {
  const int64_t kk = g.KH * g.KW;
  const int64_t tap = e % kk, k = (e / kk) % nci, j = e / (kk * nci);
  const int64_t co = group * g.cout_g + col0 + j;
  return (co * g.cin_g + cil0 + k) * kk + tap;
}

}  // namespace resfast
