// The fused BN-ReLU-conv as implicit GEMMs on tiles, written once for the GPU and its CPU twin.
//
// Three GEMMs (pixels are (n, h, w) positions of one sample's spatial tile):
//   forward       out[pix, co]    = sum_{tap, ci} a[pix + tap, ci]  * w[co, ci, tap]
//   input grad    da[pix, ci]     = sum_{tap, co} go[pix - tap, co] * w[co, ci, tap]
//   weight grad   dw[co, ci, tap] = sum_{pix}     go[pix, co]       * a[pix + tap, ci]
// with a = relu(bn(x)) computed while x is staged (once per staged element; the conv's zero
// padding is zero *after* BN). A thread block (kThreads threads, kWarps warps) owns a spatial
// tile and a block of channels. It stages its operands in shared memory as [pixel][channel]
// rows (channels contiguous, 16-byte aligned) and multiplies them with tensor-core MMAs
// (mma.sync m16n8k16, bf16/fp16 in, fp32 accumulation); every A/B fragment row is fetched
// with ldmatrix from a per-lane row address, which is how the taps, strides, dilation and
// padding of the conv are applied (a tap shifts the row address; a tap that hits no output
// row of the input gradient points at a zero row). float32 and float64 run the same blocks
// with a SIMT inner loop instead of the MMAs.
//
// Small groups (ResNeXt's 4 channels per group, depthwise) are packed: one block holds
// several whole groups, and the staged weight tile is block-diagonal (zero between groups),
// so a 16-wide MMA tile serves four 4-channel groups at once. 0 * NaN is NaN, so a packed
// block whose staged activation (forward) or grad_out (input grad) holds a non-finite value
// recomputes that block with the SIMT loop restricted to each column's own group; the weight
// gradient never mixes groups within one MMA output element and needs no such care.
//
// Everything below is a phase of a block: a loop over the block's threads (fill, epilogue)
// or over its warps (MMA), separated by block barriers. `DeviceBlock` runs a phase in the
// CUDA thread (one call per thread / per lane), `HostBlock` runs the whole block on the CPU
// (a loop over threads, a loop over warps whose MMA instructions are emulated, mma.h). Per-
// thread and per-warp state is an array with one entry per copy (`kThreadCopies`,
// `kWarpCopies`: 1 on the GPU, every thread / warp on the CPU). The block decode (which work
// block b does) and the plans (tile sizes, packing) are in here as well, so the CPU twin runs
// the grid-to-work mapping the GPU runs.
#pragma once

#include <cstdint>
#include <type_traits>

#include "resfast/math.h"
#include "resfast/mma.h"

#if defined(__CUDACC__)
#define RESFAST_UNROLL _Pragma("unroll")
#define RESFAST_NO_UNROLL _Pragma("unroll 1")
#define RESFAST_HD_NOINLINE __host__ __device__ __noinline__
#else
#define RESFAST_UNROLL
#define RESFAST_NO_UNROLL
#define RESFAST_HD_NOINLINE inline
#endif

namespace resfast {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxPixels = 256;     // GEMM rows (pixels) of one spatial tile
constexpr int kMaxK = 8;            // kernel height / width the tap tables cover
// m16 tiles per warp of the forward / input-grad MMAs: 4 (tiles of up to 256 pixels), or 2
// with 8 n8 tiles (the accumulators of 2 x 8 tiles take 64 registers already).
RESFAST_HD constexpr int mt_of(int nt) { return nt == 8 ? 2 : 4; }
// ... of a kernel: the whole-sample forward with 4 n8 tiles a warp takes 2 (tiles of at most 128
// pixels), so that its accumulators are the nt-2 kernel's 32 registers: with 4 m16 tiles (64
// accumulators) ptxas spilled (2026-11-30; whole_kernel).
RESFAST_HD constexpr int mt_of(int nt, bool input_grad, bool whole) { return !input_grad && whole && nt == 4 ? 2 : mt_of(nt); }
// Pixels of a spatial tile: the warps' m16 tiles, or one per thread for the SIMT loop (nt = 0).
constexpr int kSimtCols = 16;       // columns of the SIMT loop (one accumulator each)
constexpr int kSimtWgrad = 18;      // weight-gradient elements one SIMT thread accumulates
// Dynamic shared memory of a block: 72 KiB, the most that keeps three blocks resident on an
// sm_90 SM (3 x (72 + 1 reserved) KiB of its 228), the residency the register cap of the
// forward / input-gradient kernels' __launch_bounds__(kThreads, 3) sets anyway (the weight
// gradient's, two blocks, is set by its registers). Above 48 KiB a kernel needs the opt-in
// (launch.h allow_smem); the wide groups' 3x3 plans (WRN-28-10) take it for K chunks of 32-64
// channels and larger tiles.
constexpr int kSmemLimit = 72 * 1024;
constexpr int kSmemDefault = 48 * 1024;  // what a kernel gets without the opt-in
constexpr int kMaxTilesPerBlock = 8;   // spatial tiles one block runs with its weights staged once
// Blocks a grid aims at (four per SM of an H100 / H200). A constant, not the device's SM
// count, so that the CPU twin cuts a conv into exactly the blocks the GPU runs.
constexpr int64_t kTargetBlocks = 528;
// Weight-gradient units per warp the tensor-core kernels are compiled for, and the blocks a
// weight-gradient grid aims at (two per SM: each split adds a row of partial sums).
constexpr int kWgradUpwSmall = 3, kWgradUpwLarge = 9;
// ... and the B-shared kernel for full warps of 8 units (a 1x1 conv's 128 x 64 channels).
constexpr int kWgradUpwFullB = 8;
constexpr int64_t kWgradTargetBlocks = 264;
// SMs of an H100 / H200 SXM: the planners weigh a grid by its busiest SM, ceil(blocks / SMs)
// blocks, the SMs being a plan's target blocks over the blocks per SM it aims at (a constant
// machine, like kTargetBlocks, so the CPU twin plans exactly as the GPU; a test's smaller
// target, RESFAST_NATIVE_TARGET_BLOCKS, plans for a smaller machine).
constexpr int64_t kSMs = 132;
static_assert(kTargetBlocks == 4 * kSMs && kWgradTargetBlocks == 2 * kSMs, "targets: four / two blocks per SM");
// Clocks an SM's tensor cores take for one m16n8k16 HMMA (2048 MACs at 1024 MACs per clock).
constexpr double kHmmaClocks = 2.0;
// Warp-instructions an SM issues per clock (4 schedulers).
constexpr double kIssuePerClock = 4.0;
// HBM bytes per SM clock (3.35 TB/s at 1.755 GHz, an H100 SXM).
constexpr double kHbmBytesPerClock = 3.35e12 / 1.755e9;
RESFAST_HD constexpr int max_pixels(int nt) { return nt == 0 ? kThreads : kWarps * 16 * mt_of(nt); }
static_assert(max_pixels(2) == kMaxPixels, "the warps' m16 tiles cover the largest pixel tile");

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;

// ---------------------------------------------------------------------------------------
// Executing a block's phases

#if defined(__CUDACC__)
struct DeviceBlock {
  static constexpr int kLanes = 1, kThreadCopies = 1, kWarpCopies = 1;
  template <class F>
  __device__ __forceinline__ void threads(F&& f) const {
    f(int(threadIdx.x), 0);
  }
  template <class F>
  __device__ __forceinline__ void warps(F&& f) const {
    f(int(threadIdx.x) >> 5, int(threadIdx.x) & 31, 0);
  }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ bool sync_or(bool v) const { return __syncthreads_or(v ? 1 : 0) != 0; }
};
#endif

struct HostBlock {
  static constexpr int kLanes = 32, kThreadCopies = kThreads, kWarpCopies = kWarps;
  template <class F>
  void threads(F&& f) const {
    for (int t = 0; t < kThreads; ++t) f(t, t);
  }
  template <class F>
  void warps(F&& f) const {
    for (int w = 0; w < kWarps; ++w) f(w, 0, w);
  }
  void sync() const {}
  bool sync_or(bool v) const { return v; }
};

// log2 of a power of two.
RESFAST_HD int log2_pow2(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}

// n / d for 0 <= n < 2^16 and 2 <= d < 2^16 with a multiply-high: m = ceil(2^32 / d) makes
// (n * m) >> 32 exact there (the error n * (m - 2^32 / d) / 2^32 < 2^-16 < 1 / d).
RESFAST_HD uint32_t div_magic(uint32_t d) { return 0xffffffffu / d + 1u; }
RESFAST_HD int div_small(int n, uint32_t magic) {
#if defined(__CUDA_ARCH__)
  return int(__umulhi(uint32_t(n), magic));
#else
  return int((uint64_t(uint32_t(n)) * magic) >> 32);
#endif
}

// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 with a multiply-high, an add and a shift (the
// round-up method: l = ceil(log2 d), m = floor(2^32 (2^l - d) / d) + 1, q = (mulhi(n, m) + n) >> l).
struct FastDiv {
  uint32_t m;
  int l;
};
RESFAST_HD FastDiv make_fastdiv(int64_t d) {
  FastDiv f;
  f.l = 0;
  while ((int64_t(1) << f.l) < d) ++f.l;
  f.m = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << f.l) - uint64_t(d))) / uint64_t(d) + 1);
  return f;
}
RESFAST_HD int fast_div(int n, const FastDiv& f) {
#if defined(__CUDA_ARCH__)
  const uint32_t hi = __umulhi(uint32_t(n), f.m);
#else
  const uint32_t hi = uint32_t((uint64_t(uint32_t(n)) * f.m) >> 32);
#endif
  return int((hi + uint32_t(n)) >> f.l);
}

// ---------------------------------------------------------------------------------------
// Plans: how a conv is cut into blocks (host), and the block decode (both devices)

// A spatial tile of TH x TW positions (TW a power of two: position r of the tile is row
// r >> lw, col r & (TW - 1)); M = TH * TW GEMM rows, MP = M rounded up to 16. IH x IW is the
// staged halo: the input positions an output tile reads (forward, weight grad) or the output
// positions that read an input tile (input grad).
//
// Whole-sample tiles (S > 0): a tile is S whole samples of PH x PW pixels each (the output
// for the forward, the input for the input grad), pixel r of the tile being sample r / (PH*PW),
// row and col of r % (PH*PW) in flat order (no padding columns), so a small image's tile is not
// a mostly idle 16-row MMA tile and its per-tile code serves S samples. Each sample has its own
// staged halo of IH x IW rows, sample s's at s * IH * IW: a tap's row offset is the same for
// every sample. Tile t holds samples [t * S, t * S + S) (the last ones missing past N).
struct SpatialTile {
  int TH, TW, lw, M, MP, IH, IW;
  int64_t tiles_h, tiles_w;
  uint32_t iw_magic;            // div_magic(IW): staged row p is halo row div_small(p, iw_magic)
  FastDiv per_sample, tiles_wd; // division by tiles_h * tiles_w and by tiles_w (decode_tile)
  int S;                        // whole-sample tiles: samples per tile (0: TH x TW spatial tiles)
  int PH, PW;                   // whole-sample tiles: a sample's pixel rows / cols
  uint32_t pw_magic, pp_magic, ihw_magic;  // div_magic of PW, PH * PW, IH * IW (S > 0)
  // Residue-class tiles (R = 1; the input gradient with strides 2 x 2): the TH x TW input pixels
  // are ordered by their residue class, (row, col) modulo 2: class c = (c >> 1, c & 1) is warp
  // c's rows [c << lcp, (c + 1) << lcp), QH x QW pixels (QW = 1 << lqw, QH * QW = 1 << lcp = 16 *
  // cmt), so every warp runs only the taps that reach its class (a quarter of the HMMAs of a
  // tile that runs every tap and reads zero rows where a tap misses).
  int R, lcp, lqw, cmt;
};

// Pixel r of a residue-class tile: row and col from the tile's origin.
RESFAST_HD void residue_pixel(const SpatialTile& st, int r, int& hl, int& wl) {
  const int c = r >> st.lcp, q = r & ((1 << st.lcp) - 1);
  hl = ((q >> st.lqw) << 1) + (c >> 1);
  wl = ((q & ((1 << st.lqw) - 1)) << 1) + (c & 1);
}

// Rows a block stages for one tile: the halo, of each sample of a whole-sample tile.
RESFAST_HD int staged_rows(const SpatialTile& s) { return (s.S > 0 ? s.S : 1) * s.IH * s.IW; }

// Pixel r of a whole-sample tile: its sample in the tile, row and col in the sample.
RESFAST_HD void whole_pixel(const SpatialTile& st, int r, int& smp, int& h, int& w) {
  smp = div_small(r, st.pp_magic);
  const int q = r - smp * (st.PH * st.PW);
  h = div_small(q, st.pw_magic);
  w = q - h * st.PW;
}

// Channel blocks along the GEMM's column channels ("cols", cg_cols per group) and the
// channels it sums over ("k", cg_k per group). P > 1: a block holds P whole groups (packed,
// block-diagonal weights; then P * cg_k fits one K chunk). P == 1: a group is split into
// bpg blocks of bn column channels.
struct ChannelTiling {
  int P, bn, bpg;
  int64_t blocks;
  FastDiv bpg_div, blocks_div;  // division by bpg and by blocks (the block decode)
};

struct ChannelRange {
  int col0, ncols;  // column channels [col0, col0 + ncols)
  int k0, nk;       // channels summed over [k0, k0 + nk)
  bool multi;       // the block spans more than one group
};

RESFAST_HD ChannelRange decode_channels(const ChannelTiling& t, int64_t groups, int cg_cols, int cg_k, int64_t j) {
  ChannelRange r;  // j < blocks < 2^31
  if (t.P > 1) {
    const int64_t g0 = j * t.P;
    const int ng = int(groups - g0 < t.P ? groups - g0 : t.P);
    r.col0 = int(g0 * cg_cols);
    r.ncols = ng * cg_cols;
    r.k0 = int(g0 * cg_k);
    r.nk = ng * cg_k;
    r.multi = ng > 1;
  } else {
    const int64_t g = fast_div(int(j), t.bpg_div);
    const int s = int(j - g * t.bpg);
    r.col0 = int(g * cg_cols) + s * t.bn;
    r.ncols = cg_cols - s * t.bn < t.bn ? cg_cols - s * t.bn : t.bn;
    r.k0 = int(g * cg_k);
    r.nk = cg_k;
    r.multi = false;
  }
  return r;
}

struct TilePos {
  int64_t n;
  int h0, w0;  // first row / col of the tile (output positions, or input positions for the input grad)
};

// (32-bit divisions: a grid has fewer than 2^31 spatial tiles.)
RESFAST_HD TilePos decode_tile(const SpatialTile& s, int64_t spatial) {
  const int per_sample = int(s.tiles_h * s.tiles_w), tw = int(s.tiles_w);
  const int sp = int(spatial);
  TilePos p;
  const int n = fast_div(sp, s.per_sample);
  const int t = sp - n * per_sample;
  const int th = fast_div(t, s.tiles_wd);
  p.n = n;
  p.h0 = th * s.TH;
  p.w0 = (t - th * tw) * s.TW;
  return p;
}

// Block b of a forward / input-grad grid: channel block b % ch.blocks, spatial tiles
// [tpb * t, tpb * t + tpb) for t = b / ch.blocks. The channel block varies fastest, so the
// blocks of one spatial tile run together and share its input through L2; a block stages its
// weights once for all its tiles when K fits one chunk.
struct ConvBlock {
  ChannelRange ch;
  int64_t jb;     // channel block
  int64_t tile0;  // first spatial tile (sample-major: n * tiles_h * tiles_w + row * tiles_w + col)
  int ntiles;
};

// Forward / input-grad plan. The weight gradient has its own (WgradPlan).
struct ConvPlan {
  SpatialTile s;
  ChannelTiling ch;
  int BK, lbk;     // K chunk (channels staged at once; a power of two >= 16, or >= 8 for SIMT), log2
  int PS;          // shared-memory elements per staged pixel row (>= BK)
  int CS;          // accumulator-tile row pitch (elements of acc_t)
  int OHB, OWB;    // input grad: output rows / cols staged (== s.IH, s.IW)
  int stage_offset;  // byte offset of the staged rows (after the weights)
  int w_elems;     // taps * bn * PS
  int red_offset;  // input grad: byte offset of the per-thread channel sums
  int fb_offset;   // packed tensor-core plans: byte offset of the fallback's result tile (float)
  int smem_bytes;
  int nt;          // n8 MMA tiles per warp (bn / 8); 0 = SIMT loop
  int tpb;         // spatial tiles per block
  int chunks;      // K chunks of a block
  int64_t w_prep;  // elements of the prepared weights: blocks x chunks x taps x bn x BK
  int64_t spatial; // spatial tiles (N * tiles_h * tiles_w)
  int64_t blocks;
  // input grad, per tap row / col: (kh * dh) = qk * stride + rk (one entry past the last tap)
  int qk_h[kMaxK + 1], rk_h[kMaxK + 1], qk_w[kMaxK + 1], rk_w[kMaxK + 1];
  FastDiv sh_div, sw_div;  // division by the strides
  // input grad: the staged output rows start at floor((h0 + ph - (KH-1)*dh) / sh), computed as
  // (h0 + lo_h) / sh - lo_hq with lo_h = ph - (KH-1)*dh + bias >= 0 (bias a multiple of sh)
  int lo_h, lo_hq, lo_w, lo_wq;
  int lks;         // log2 of the k16 steps of a chunk (BK / 16)
  // Residue-class tiles (s.R): warp c's walk over its class's taps, which the prepared weights
  // hold consecutively (tap_of: the tap at each position of their tap order, else the identity):
  // its first tap's staged-row and weight offsets, the offset changes along a kernel row and to
  // the next row (as conv_mma_chunk's a_col / a_row, without the k steps), its taps per row and
  // its k16 steps.
  int rw_aoff[kWarps], rw_woff[kWarps], rw_acol[kWarps], rw_arow[kWarps], rw_nkw[kWarps], rw_steps[kWarps];
  unsigned char tap_of[kMaxK * kMaxK];
  unsigned char pos_of[kMaxK * kMaxK];  // its inverse: the position of tap kh * KW + kw
  bool ok;
};

RESFAST_HD ConvBlock decode_conv_block(const ConvPlan& p, const ConvGeom& g, bool input_grad, int64_t b) {
  ConvBlock cb;
  const int q = fast_div(int(b), p.ch.blocks_div);  // a grid has fewer than 2^31 blocks
  const int64_t j = b - int64_t(q) * p.ch.blocks;
  cb.jb = j;
  cb.tile0 = int64_t(q) * p.tpb;
  cb.ntiles = int(p.spatial - cb.tile0 < p.tpb ? p.spatial - cb.tile0 : p.tpb);
  cb.ch = input_grad ? decode_channels(p.ch, g.groups, int(g.cin_g), int(g.cout_g), j)
                     : decode_channels(p.ch, g.groups, int(g.cout_g), int(g.cin_g), j);
  return cb;
}

struct WgradPlan {
  SpatialTile s;
  int P;            // groups per block (packed) or 1
  int bm, bn;       // output (row) / input (column) channels per block
  int bpg_m, bpg_n; // row / column blocks per group (P == 1)
  int PSm, PSn;     // smem pitch of grad_out rows / activation rows
  int go_elems, act_elems;  // staged grad_out (MP rows), activation (halo + zero rows)
  int zero_rows;            // zero rows after the activation (MMA: the taps' span, plus one)
  int units;        // MMA: (tap, m16 tile, 16-column pair) units; SIMT: weight elements
  int upw;          // units per warp (MMA) / elements per thread (SIMT)
  bool a_shared;    // MMA: a warp's units share their A fragment (WgradUnits)
  bool b_shared;    // MMA: a warp's units share their B fragment (one tap, npairs == kWarps)
  int share;        // the kernel's kShare: 1 A shared, 2 B shared (kWgradUpwLarge only), 3 A shared
                    // and every warp full (kWgradUpwLarge units), 4 B shared and every warp full
                    // (kWgradUpwFullB units), 0 neither
  int lnp, lmt;     // MMA: log2 of the 16-column pairs / m16 tiles of a block
  FastDiv kw_div, cout_div, cin_div;  // division by KW, cout_g, cin_g
  FastDiv cblocks_div, per_group_div, bpg_n_div;  // the block decode's divisions
  int smem_bytes;
  bool mma;
  int64_t cblocks, splits, items;
  bool ok;
};

struct WgradBlock {
  int co0, nrows, ci0, ncols;
  bool multi;
  int64_t split;
};

RESFAST_HD WgradBlock decode_wgrad_block(const WgradPlan& p, const ConvGeom& g, int64_t b) {
  WgradBlock w;
  const int q = fast_div(int(b), p.cblocks_div);  // a grid has fewer than 2^31 blocks
  const int64_t j = b - int64_t(q) * p.cblocks;
  w.split = q;
  if (p.P > 1) {
    const int64_t g0 = j * p.P;
    const int ng = int(g.groups - g0 < p.P ? g.groups - g0 : p.P);
    w.co0 = int(g0 * g.cout_g);
    w.nrows = ng * int(g.cout_g);
    w.ci0 = int(g0 * g.cin_g);
    w.ncols = ng * int(g.cin_g);
    w.multi = ng > 1;
  } else {
    const int64_t per_group = int64_t(p.bpg_m) * p.bpg_n;
    const int64_t grp = fast_div(int(j), p.per_group_div);
    const int r = int(j - grp * per_group);
    const int im = fast_div(r, p.bpg_n_div), in = r - im * p.bpg_n;
    w.co0 = int(grp * g.cout_g) + im * p.bm;
    w.nrows = int(g.cout_g) - im * p.bm < p.bm ? int(g.cout_g) - im * p.bm : p.bm;
    w.ci0 = int(grp * g.cin_g) + in * p.bn;
    w.ncols = int(g.cin_g) - in * p.bn < p.bn ? int(g.cin_g) - in * p.bn : p.bn;
    w.multi = false;
  }
  return w;
}

// ---- host-side plan construction ----

RESFAST_HD int round_up(int64_t v, int m) { return int((v + m - 1) / m * m); }
RESFAST_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
RESFAST_HD int align16(int64_t bytes) { return round_up(bytes, 16); }

// Halo extent of `t` tile positions through a kernel of k taps (forward: input positions an
// output tile reads; input grad: output positions reading an input tile, bounded).
inline int halo_forward(int t, int64_t k, int64_t stride, int64_t dil) { return int((t - 1) * stride + (k - 1) * dil + 1); }
inline int halo_input_grad(int t, int64_t k, int64_t stride, int64_t dil) {
  return int((t - 1 + (k - 1) * dil) / stride + 2);
}

// The spatial tile of at most max_px pixels with the least cost(tile) (a cost < 0: the tile
// does not fit); best.M == 0 when none fits.
// A rectangular TH x TW tile's derived fields: its staged halo, the tile counts over OH x OW
// positions and their division magics.
inline void set_tile_extent(SpatialTile& s, int64_t OH, int64_t OW, int64_t KH, int64_t KW, int64_t sh, int64_t sw,
                            int64_t dh, int64_t dw, bool input_grad) {
  s.IH = input_grad ? halo_input_grad(s.TH, KH, sh, dh) : halo_forward(s.TH, KH, sh, dh);
  s.IW = input_grad ? halo_input_grad(s.TW, KW, sw, dw) : halo_forward(s.TW, KW, sw, dw);
  s.tiles_h = cdiv(OH, s.TH);
  s.tiles_w = cdiv(OW, s.TW);
  s.iw_magic = div_magic(uint32_t(s.IW));
  s.per_sample = make_fastdiv(s.tiles_h * s.tiles_w);
  s.tiles_wd = make_fastdiv(s.tiles_w);
}

// Keeps the candidate s as best when it fits (cost >= 0) and costs less than best (best.M == 0:
// none yet).
template <class Cost>
inline void keep_cheapest(SpatialTile& best, double& best_cost, const SpatialTile& s, Cost& cost) {
  const double c = cost(s);
  if (c < 0) return;
  if (best.M == 0 || c < best_cost) {
    best = s;
    best_cost = c;
  }
}

template <class Cost>
inline SpatialTile choose_tile(int64_t OH, int64_t OW, int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t dh,
                               int64_t dw, bool input_grad, int max_px, Cost cost, double* best_cost_out = nullptr) {
  SpatialTile best{};
  best.M = 0;
  double best_cost = 0;
  for (int lw = 2; lw <= 5; ++lw) {
    const int TW = 1 << lw;
    for (int TH = max_px / TW; TH >= 1; --TH) {
      SpatialTile s{};
      s.TH = TH;
      s.TW = TW;
      s.lw = lw;
      s.M = TH * TW;
      s.MP = round_up(s.M, 16);
      set_tile_extent(s, OH, OW, KH, KW, sh, sw, dh, dw, input_grad);
      keep_cheapest(best, best_cost, s, cost);
    }
  }
  if (best_cost_out != nullptr) *best_cost_out = best_cost;
  return best;
}

// As choose_tile, among residue-class tiles (SpatialTile::R) of the input gradient with strides
// 2 x 2: TH x TW = 2 QH x 2 QW input pixels, QW a power of two, each class's QH x QW pixels 16,
// 32 or 64 rows (whole m16 tiles, at most a warp's max_cmt).
template <class Cost>
inline SpatialTile choose_residue_tile(const ConvGeom& g, int max_cmt, Cost cost, double* best_cost_out = nullptr) {
  SpatialTile best{};
  best.M = 0;
  double best_cost = 0;
  for (int lcp = 4; lcp <= 6 && (1 << (lcp - 4)) <= max_cmt; ++lcp) {
    for (int lqw = 1; lqw <= lcp; ++lqw) {
      const int QW = 1 << lqw, QH = 1 << (lcp - lqw);
      SpatialTile s{};
      s.TH = 2 * QH;
      s.TW = 2 * QW;
      s.lw = lqw + 1;
      s.M = 4 << lcp;
      s.MP = s.M;
      set_tile_extent(s, g.H, g.W, g.KH, g.KW, g.sh, g.sw, g.dh, g.dw, true);
      s.R = 1;
      s.lcp = lcp;
      s.lqw = lqw;
      s.cmt = 1 << (lcp - 4);
      keep_cheapest(best, best_cost, s, cost);
    }
  }
  if (best_cost_out != nullptr) *best_cost_out = best_cost;
  return best;
}

// The residue-class kernels built: the tensor-core input gradient with 2 or 4 n8 tiles a warp.
RESFAST_HD constexpr bool residue_kernel(bool input_grad, int nt) { return input_grad && (nt == 2 || nt == 4); }

// The whole-sample kernels built: the input gradient for every n8 tile count, the forward for
// 2 and 4 (tensor cores; SIMT, nt 0, both), the latter with 2 m16 tiles a warp (mt_of: tiles of
// at most 128 pixels; 2026-12-01, issue 16: ResNeXt-50 stage 4's forward, 2 samples x 32
// columns a tile). Not the forward with 8 n8 tiles a warp: ptxas spilled 42 bytes (a plan that
// 72 KiB of shared memory made WRN-28-10's stride-2 stage-3 forward choose); nor with 4 and 4
// m16 tiles a warp (18-50 bytes).
RESFAST_HD constexpr bool whole_kernel(bool input_grad, int nt) { return input_grad || nt == 0 || nt == 2 || nt == 4; }

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Spatial tiles of a conv of N samples (whole-sample tiles: ceil(N / S)).
RESFAST_HD int64_t tile_count(const SpatialTile& s, int64_t N) {
  return s.S > 0 ? (N + s.S - 1) / s.S : N * s.tiles_h * s.tiles_w;
}

// As choose_tile, among whole-sample tiles of S = 1, 2, ... samples (at most max_px pixels and N
// samples; samples of at least 2 columns and staged halos of at least 2 columns). The staged
// halo of a sample: forward (and weight grad) the input rows / cols its output reads; input
// grad exactly the output rows / cols its input pixels read through some tap (the first of
// them floor((pad - (K-1) * dil) / stride), as the kernels' h_lo).
template <class Cost>
inline SpatialTile choose_whole_tile(const ConvGeom& g, bool input_grad, int max_px, Cost cost,
                                     double* best_cost_out = nullptr) {
  SpatialTile best{};
  best.M = 0;
  double best_cost = 0;
  const int64_t PH = input_grad ? g.H : g.Ho, PW = input_grad ? g.W : g.Wo;
  int64_t IH, IW;
  if (input_grad) {
    IH = floor_div(g.H - 1 + g.ph, g.sh) - floor_div(g.ph - (g.KH - 1) * g.dh, g.sh) + 1;
    IW = floor_div(g.W - 1 + g.pw, g.sw) - floor_div(g.pw - (g.KW - 1) * g.dw, g.sw) + 1;
  } else {
    IH = halo_forward(int(PH), g.KH, g.sh, g.dh);
    IW = halo_forward(int(PW), g.KW, g.sw, g.dw);
  }
  if (PW < 2 || IW < 2 || PH < 1 || PH * PW > max_px || IH * IW >= (1 << 16)) {
    if (best_cost_out != nullptr) *best_cost_out = 0;
    return best;
  }
  for (int S = 1; S * PH * PW <= max_px && S <= g.N; ++S) {
    SpatialTile s{};
    s.S = S;
    s.PH = int(PH);
    s.PW = int(PW);
    s.TH = int(PH);
    s.TW = int(PW);
    s.lw = 0;
    s.M = int(S * PH * PW);
    s.MP = round_up(s.M, 16);
    s.IH = int(IH);
    s.IW = int(IW);
    s.tiles_h = 1;
    s.tiles_w = 1;
    s.iw_magic = div_magic(uint32_t(IW));
    s.pw_magic = div_magic(uint32_t(PW));
    s.pp_magic = div_magic(uint32_t(PH * PW));
    s.ihw_magic = div_magic(uint32_t(IH * IW));
    s.per_sample = make_fastdiv(1);
    s.tiles_wd = make_fastdiv(1);
    keep_cheapest(best, best_cost, s, cost);
  }
  if (best_cost_out != nullptr) *best_cost_out = best_cost;
  return best;
}

// Warp-instructions the tensor-core blocks issue per unit of work, as the SASS of the sm_90
// kernels has them (resfast/profiling/static_native.py reads them; [0] forward, [1] input
// grad): an HMMA with its fragment loads, an 8-channel vector staged (with BN-ReLU in the
// forward), a 16-byte weight copy, an 8-channel output vector (the input grad's with its ReLU
// mask and channel sums), and the code around a K chunk, a tile and a block (all warps). The
// planner weighs channel blocks, tile sizes and K chunks with them.
// An HMMA's share of its fragment loads shrinks with the n8 tiles a warp holds (nt 2, 4, 8:
// kCostHmmaNt[ig][0..2]).
constexpr double kCostHmmaNt[2][3] = {{5.1, 3.4, 3.45}, {7.2, 4.6, 4.0}};
inline constexpr double cost_hmma(int ig, int nt) { return kCostHmmaNt[ig][nt <= 2 ? 0 : (nt <= 4 ? 1 : 2)]; }
constexpr double kCostStage[2] = {1.9, 1.25}, kCostWeight = 0.6,
                 kCostStore[2] = {1.1, 3.1}, kCostChunk[2] = {1150.0, 1000.0}, kCostTile[2] = {1100.0, 2000.0},
                 kCostBlock = 700.0;
// Whole-sample tiles (SpatialTile::S > 0): a staged vector and an output vector cost a little
// more (the pixel's sample, a division), the K chunk's code too; the input gradient's fragment
// rows move from the tile's code to the block's.
constexpr double kCostStageWhole[2] = {2.05, 1.4}, kCostStoreWhole[2] = {1.35, 3.5},
                 kCostChunkWhole[2] = {1250.0, 1120.0}, kCostTileWhole[2] = {1200.0, 1550.0},
                 kCostBlockWhole[2] = {700.0, 1150.0};
// ... less for the whole-sample input gradient with 8 n8 tiles a warp (its SASS: 327 against 368
// warp-instructions of tile code a warp, 202 against 265 outside the loops; 2026-12-01): with
// the nt-4 figures the planner gave DenseNet-121's block-4 3x3 input gradient 2 samples x 32
// columns a tile where 1 sample x 64 columns is 4% faster (PREDICTED).
constexpr double kCostTileWholeIg8 = 1400.0, kCostBlockWholeIg8 = 900.0;
// The whole-sample forward with 4 n8 tiles and 2 m16 tiles a warp: 39 warp-instructions per 8
// HMMAs in its SASS (2026-12-01; its A fragments serve 4 n8 tiles, but half the m16 tiles carry
// the tap walk), against 3.4 per HMMA of the spatial nt-4 loop.
constexpr double kCostHmmaWholeFwd4 = 4.9;
// The weight gradient: an HMMA with its fragment loads, a staged vector, a tile, a block.
constexpr double kCostWgradHmma = 4.2, kCostWgradStage = 1.4, kCostWgradTile = 700.0, kCostWgradBlock = 6000.0;

// The smallest power of two >= v, from lo, at most cap.
inline int pow2_at_least(int64_t v, int lo, int cap) {
  int b = lo;
  while (b < v && b < cap) b *= 2;
  return b;
}

inline ChannelTiling tile_channels(int64_t groups, int64_t cg_cols, int64_t cg_k, int max_bn, int max_k_packed) {
  ChannelTiling t;
  if (cg_cols < 16) {
    int64_t P = 16 / cg_cols;
    const int64_t by_k = max_k_packed / cg_k;
    if (by_k < P) P = by_k;
    if (groups < P) P = groups;
    if (P > 1) {
      t.P = int(P);
      t.bn = 16;
      t.bpg = 1;
      t.blocks = cdiv(groups, P);
      t.bpg_div = make_fastdiv(1);
      t.blocks_div = make_fastdiv(t.blocks);
      return t;
    }
  }
  t.P = 1;
  t.bn = pow2_at_least(cg_cols, 16, max_bn);
  t.bpg = int(cdiv(cg_cols, t.bn));
  t.blocks = groups * t.bpg;
  t.bpg_div = make_fastdiv(t.bpg);
  t.blocks_div = make_fastdiv(t.blocks);
  return t;
}

// Forward (input_grad = false) or input-gradient plan. mma: the 16-bit tensor-core kernels
// (elem_bytes 2); otherwise the SIMT loop (bn = 16). ok = false: no tile fits (very large
// kernels): the host runs the per-element kernels of math.h instead. target_blocks: the grid
// size below which a block takes a single spatial tile.
// whole: 0 weighs whole-sample tiles beside the spatial ones, 1 never takes them, 2 takes them
// whenever one fits (RESFAST_NATIVE_WHOLE_SAMPLES, for tests). residue: the same for the input
// gradient's residue-class tiles (strides 2 x 2; RESFAST_NATIVE_RESIDUE_TILES).
inline ConvPlan make_conv_plan(const ConvGeom& g, bool input_grad, bool mma, int elem_bytes, int acc_bytes,
                               int64_t target_blocks = kTargetBlocks, int whole = 0, int residue = 0) {
  ConvPlan p{};
  p.ok = false;
  if (g.KH > kMaxK || g.KW > kMaxK) return p;
  const int64_t cg_cols = input_grad ? g.cin_g : g.cout_g, cg_k = input_grad ? g.cout_g : g.cin_g;
  const ChannelTiling widest = tile_channels(g.groups, cg_cols, cg_k, mma ? 64 : kSimtCols, 64);
  const int64_t k_range = widest.P > 1 ? widest.P * cg_k : cg_k;
  const int64_t taps = g.KH * g.KW;
  const int min_bk = mma ? 16 : 8;  // an MMA k-step is 16 channels; the fills move 8 at once
  const int ig = input_grad ? 1 : 0;
  if (target_blocks < 1) target_blocks = 1;
  const int64_t sms = target_blocks >= 4 ? target_blocks / 4 : 1;
  double best = -1;
  // Channel blocks of bn columns: the widest (fewest re-stagings of the summed side) or, for
  // tensor cores, narrower ones (smaller weight tiles: larger K chunks and spatial tiles).
  for (int bn_try = widest.bn; bn_try >= 16 || bn_try == widest.bn; bn_try /= 2) {
    ChannelTiling ct = widest;
    if (bn_try != widest.bn) {
      if (!mma || widest.P > 1) break;
      ct.bn = bn_try;
      ct.bpg = int(cdiv(cg_cols, bn_try));
      ct.blocks = g.groups * ct.bpg;
      ct.bpg_div = make_fastdiv(ct.bpg);
      ct.blocks_div = make_fastdiv(ct.blocks);
    }
    const int bn = ct.bn;
    const int nt = mma ? bn / 8 : 0;
    const int max_px = max_pixels(nt);
    // K chunks of up to 256 channels for tensor cores (128 before 2026-12-01): each chunk costs
    // ~1,000 warp-instructions of its own (barriers, the fills' and the MMA walk's set-up), which
    // a wide 1x1 of few pixels pays per 56-64 rows: DenseNet-121's block-4 1x1 forward (992
    // channels at 7x7, 128 blocks) 8 -> 4 chunks, 4.41 -> 3.89 us PREDICTED (2.03x -> 1.79x of
    // its HBM floor), its 56x56 1x1 forward 56.0 -> 52.4 us. 72 KiB bounds the chunk with the
    // tile (a 3x3 with 256 channels a chunk does not fit).
    for (int bk = mma ? 256 : 64; bk >= min_bk; bk /= 2) {
      if (bk > min_bk && bk / 2 >= k_range) continue;  // a smaller chunk holds all of K
      if (ct.P > 1 && bk < k_range) continue;          // packed groups must fit one chunk
      const int BK = bk;
      const int PS = mma ? BK + 8 : BK + 1;
      const int CS = mma ? bn + 4 : bn + 1;
      const int64_t w_bytes = align16(taps * bn * PS * elem_bytes);
      const bool fallback = mma && ct.P > 1;  // packed blocks keep a tile for the per-group fallback
      const int64_t chunks = cdiv(k_range, BK);
      auto bytes_before_fallback = [&](const SpatialTile& s) {
        const int staged = staged_rows(s) + (input_grad ? 1 : 0);
        const int64_t stage = align16(int64_t(staged) * PS * elem_bytes);
        const int64_t acc_tile = align16(int64_t(s.MP) * CS * acc_bytes) + (input_grad ? kThreads * 16 * acc_bytes : 0);
        return w_bytes + (stage > acc_tile ? stage : acc_tile);
      };
      auto bytes = [&](const SpatialTile& s) {
        return bytes_before_fallback(s) + (fallback ? align16(int64_t(s.MP) * CS * 4) : 0);
      };
      const double w_copy = taps * bn * BK / 8.0 * kCostWeight;
      // The tiles per block and the clocks of the busiest SM (ceil(blocks / SMs) blocks of tpb
      // tiles each: its warp-instructions, kCost*, over the issue rate). Several tiles per block
      // only when the weights stay staged (K in one chunk): the count (at most
      // kMaxTilesPerBlock, at least 3/4 of target_blocks blocks in the grid) that makes the
      // busiest SM's work the least (fewer tiles per block on ties). 3/4: the three blocks an SM
      // holds at once (__launch_bounds__(kThreads, 3), at most 72 KiB each), so that the first
      // wave still fills every SM; it was all of target_blocks (four an SM) before 2026-12-01,
      // which left ResNeXt-50 stage 4's forward one 2-sample tile a block (1,024 blocks, 8 on
      // the busiest SM) where 2 tiles a block (512) spare each SM 4 blocks' own code: 8.09 ->
      // 7.43 us PREDICTED (none measured; the GPU check would show whether 3 blocks an SM hide
      // the loads' latency as 4 did).
      struct Choice {
        int64_t tpb;
        double clocks;
      };
      auto plan_blocks = [&](const SpatialTile& s) -> Choice {
        const int64_t spatial = tile_count(s, g.N);
        // (residue-class tiles: every tap reaches one class, whose warp runs cmt m16 tiles)
        const double hmma = double(taps) * (BK / 16.0) * (bn / 8.0) * (s.R ? double(s.cmt) : s.MP / 16.0);
        double per_tile, per_block;
        if (!mma) {  // the SIMT loop: its own weights (one column block: bn = 16)
          const double per_chunk = hmma * 10.0 + staged_rows(s) * (BK / 8.0) * 3.2 +
                                   (chunks > 1 ? taps * bn * BK / 8.0 * 0.5 : 0.0) + 1600.0;
          per_tile = chunks * per_chunk + s.M * (bn / 8.0) * 1.5;
          per_block = 0.0;
        } else {
          const bool wh = s.S > 0;
          const double per_chunk = hmma * (wh && !ig && nt == 4 ? kCostHmmaWholeFwd4 : cost_hmma(ig, nt)) +
                                   staged_rows(s) * (BK / 8.0) * (wh ? kCostStageWhole[ig] : kCostStage[ig]) +
                                   (chunks > 1 ? w_copy : 0.0) + (wh ? kCostChunkWhole[ig] : kCostChunk[ig]);
          per_tile = chunks * per_chunk + s.M * (bn / 8.0) * (wh ? kCostStoreWhole[ig] : kCostStore[ig]) +
                     (wh ? (ig && nt == 8 ? kCostTileWholeIg8 : kCostTileWhole[ig]) : kCostTile[ig]);
          per_block = (wh ? (ig && nt == 8 ? kCostBlockWholeIg8 : kCostBlockWhole[ig]) : kCostBlock) +
                      (chunks > 1 ? 0.0 : w_copy);
        }
        auto clocks = [&](int64_t tpb) {
          return double(cdiv(ct.blocks * cdiv(spatial, tpb), sms)) * (tpb * per_tile + per_block) / kIssuePerClock;
        };
        Choice best_c{1, clocks(1)};
        if (k_range <= BK) {
          const int64_t resident = target_blocks * 3 / 4 > 0 ? target_blocks * 3 / 4 : 1;
          int64_t most = spatial * ct.blocks / resident;
          most = most > kMaxTilesPerBlock ? kMaxTilesPerBlock : most;
          for (int64_t t = 2; t <= most; ++t) {
            const double c = clocks(t);
            if (c < best_c.clocks) best_c = {t, c};
          }
        }
        return best_c;
      };
      auto cost = [&](const SpatialTile& s) -> double {
        if (bytes(s) > kSmemLimit) return -1;
        return plan_blocks(s).clocks;
      };
      double c = 0, cw = 0;
      SpatialTile s{}, sw{};
      // (not the forward with 4 n8 tiles a warp: its accumulators, A rows and BN map leave the
      // whole-sample staging too few registers, and ptxas spills: whole_kernel)
      if (whole != 1 && whole_kernel(input_grad, nt)) {
        const int whole_px = mma ? kWarps * 16 * mt_of(nt, input_grad, true) : max_px;
        sw = choose_whole_tile(g, input_grad, whole_px, cost, &cw);
      }
      if (whole != 2 || sw.M == 0) {
        s = input_grad ? choose_tile(g.H, g.W, g.KH, g.KW, g.sh, g.sw, g.dh, g.dw, true, max_px, cost, &c)
                       : choose_tile(g.Ho, g.Wo, g.KH, g.KW, g.sh, g.sw, g.dh, g.dw, false, max_px, cost, &c);
      }
      // whole-sample tiles where they cost less (forced: before any spatial tile, where one fits)
      if (sw.M > 0 && (whole == 2 || s.M == 0 || cw < c)) {
        s = sw;
        c = whole == 2 ? cw - 1e30 : cw;
      }
      // residue-class tiles likewise (strides 2 x 2; packed groups too, 2 n8 tiles: their
      // fallback for a non-finite value walks the tile in class order)
      if (residue != 1 && whole != 2 && input_grad && mma && residue_kernel(input_grad, nt) &&
          (ct.P == 1 || nt == 2) && g.sh == 2 && g.sw == 2) {
        double cr = 0;
        const SpatialTile sr = choose_residue_tile(g, mt_of(nt), cost, &cr);
        if (sr.M > 0 && (residue == 2 || s.M == 0 || cr < c)) {
          s = sr;
          c = residue == 2 ? cr - 1e30 : cr;
        }
      }
      if (s.M == 0 || (p.ok && c >= best)) continue;
      best = c;
      p.ch = ct;
      p.nt = nt;
      p.s = s;
      p.BK = BK;
      p.lbk = log2_pow2(BK);
      p.lks = BK >= 16 ? log2_pow2(BK / 16) : 0;
      p.PS = PS;
      p.CS = CS;
      p.OHB = s.IH;
      p.OWB = s.IW;
      p.w_elems = int(taps) * bn * PS;
      p.stage_offset = int(w_bytes);
      p.red_offset = int(w_bytes) + align16(int64_t(s.MP) * CS * acc_bytes);
      p.fb_offset = int(bytes_before_fallback(s));
      p.smem_bytes = int(bytes(s));
      p.spatial = tile_count(s, g.N);
      p.tpb = int(plan_blocks(s).tpb);  // the count its cost was taken with
      p.chunks = int(chunks);
      p.w_prep = p.ch.blocks * p.chunks * taps * bn * BK;
      p.blocks = p.ch.blocks * cdiv(p.spatial, p.tpb);
      p.ok = true;
    }
    if (!mma) break;
  }
  if (!p.ok) return p;
  for (int k = 0; k <= kMaxK; ++k) {
    const int64_t kdh = k * g.dh, kdw = k * g.dw;
    p.qk_h[k] = int(kdh / g.sh);
    p.rk_h[k] = int(kdh % g.sh);
    p.qk_w[k] = int(kdw / g.sw);
    p.rk_w[k] = int(kdw % g.sw);
  }
  p.sh_div = make_fastdiv(g.sh);
  p.sw_div = make_fastdiv(g.sw);
  for (int t = 0; t < kMaxK * kMaxK; ++t) p.tap_of[t] = static_cast<unsigned char>(t);
  if (p.s.R) {
    // class c = (c >> 1, c & 1), the parities of a pixel's row and col in the tile (whose
    // origin is even): its taps are those with (k * dilation) % 2 == (parity + pad) % 2
    int pos = 0;
    const int KW = int(g.KW);
    for (int c = 0; c < kWarps; ++c) {
      const int rh = int((c >> 1) + g.ph) & 1, rw = int((c & 1) + g.pw) & 1;
      int khs[kMaxK], kws[kMaxK], nkh = 0, nkw = 0;
      for (int k = 0; k < g.KH; ++k)
        if (p.rk_h[k] == rh) khs[nkh++] = k;
      for (int k = 0; k < g.KW; ++k)
        if (p.rk_w[k] == rw) kws[nkw++] = k;
      const int OWB = p.OWB, PS = p.PS;
      p.rw_woff[c] = pos * p.ch.bn * PS;
      p.rw_nkw[c] = nkw;
      p.rw_steps[c] = (nkh * nkw) << p.lks;
      p.rw_aoff[c] = nkh && nkw ? -(p.qk_h[khs[0]] * OWB + p.qk_w[kws[0]]) * PS : 0;
      p.rw_acol[c] = nkw > 1 ? -(p.qk_w[kws[1]] - p.qk_w[kws[0]]) * PS : 0;
      p.rw_arow[c] = nkh > 1 && nkw ? -((p.qk_h[khs[1]] - p.qk_h[khs[0]]) * OWB + p.qk_w[kws[0]] - p.qk_w[kws[nkw - 1]]) * PS : 0;
      for (int i = 0; i < nkh; ++i)
        for (int j = 0; j < nkw; ++j) p.tap_of[pos++] = static_cast<unsigned char>(khs[i] * KW + kws[j]);
    }
  }
  for (int t = 0; t < kMaxK * kMaxK; ++t) p.pos_of[p.tap_of[t]] = static_cast<unsigned char>(t);
  const int64_t bias_h = cdiv((g.KH - 1) * g.dh, g.sh) * g.sh, bias_w = cdiv((g.KW - 1) * g.dw, g.sw) * g.sw;
  p.lo_h = int(g.ph - (g.KH - 1) * g.dh + bias_h);
  p.lo_hq = int(bias_h / g.sh);
  p.lo_w = int(g.pw - (g.KW - 1) * g.dw + bias_w);
  p.lo_wq = int(bias_w / g.sw);
  return p;
}

// Weight-gradient plan. `target_blocks`: blocks wanted in the grid (the CUDA host asks for
// about two per SM); the pixel tiles are split over that many blocks per channel block.
inline WgradPlan make_wgrad_plan(const ConvGeom& g, bool mma, int elem_bytes, int acc_bytes, int64_t target_blocks,
                                 int mma_upw) {
  WgradPlan p{};
  p.ok = false;
  p.mma = mma;
  if (g.KH > kMaxK || g.KW > kMaxK) return p;
  if (g.Cout * g.cin_g * g.KH * g.KW >= (int64_t(1) << 31)) return p;  // 32-bit partial offsets
  const int64_t taps = g.KH * g.KW;
  // Channel blocks: whole small groups packed, or a group cut into bm x bn blocks.
  int64_t P = 1;
  if (g.cout_g < 16 && g.cin_g < 16) {
    P = 16 / (g.cout_g > g.cin_g ? g.cout_g : g.cin_g);
    if (g.groups < P) P = g.groups;
  }
  auto fits = [&](int bm, int bn) {
    if (mma) return taps * (bm / 16) * (bn / 16) <= int64_t(kWarps) * mma_upw;
    return taps * bm * bn <= int64_t(kThreads) * kSimtWgrad;
  };
  int bm = 16, bn = 16;
  if (P > 1) {
    bm = bn = 16;
    if (!fits(bm, bn)) P = 1;
  }
  if (P == 1) {
    // powers of two: a block is whole m16 tiles and 16-column pairs (tensor cores), halved
    // until its units fit the warps' accumulators
    const int lo = mma ? 16 : 1;
    bm = pow2_at_least(g.cout_g, lo, mma ? 128 : 16);
    bn = pow2_at_least(g.cin_g, lo, mma ? 64 : 16);
    while (!fits(bm, bn) && (bm > lo || bn > lo)) {
      if (bm >= bn && bm > lo) bm /= 2; else bn /= 2;
    }
    if (!fits(bm, bn)) return p;
  }
  p.P = int(P);
  p.bm = bm;
  p.bn = bn;
  p.bpg_m = P > 1 ? 1 : int(cdiv(g.cout_g, bm));
  p.bpg_n = P > 1 ? 1 : int(cdiv(g.cin_g, bn));
  p.cblocks = P > 1 ? cdiv(g.groups, P) : g.groups * p.bpg_m * p.bpg_n;
  p.cblocks_div = make_fastdiv(p.cblocks);
  p.per_group_div = make_fastdiv(int64_t(p.bpg_m) * p.bpg_n);
  p.bpg_n_div = make_fastdiv(p.bpg_n);
  p.PSm = mma ? bm + 8 : bm + 1;
  p.PSn = mma ? bn + 8 : bn + 1;
  p.units = mma ? int(taps * (bm / 16) * (bn / 16)) : int(taps * bm * bn);
  p.upw = mma ? int(cdiv(p.units, kWarps)) : int(cdiv(p.units, kThreads));
  p.a_shared = mma && kWarps % ((bm / 16) * (bn / 16)) == 0;
  // unit w + kWarps * u of warp w has column pair (w + kWarps * u) % npairs: w's when npairs ==
  // kWarps, and with one tap the same B rows for all of the warp's units
  p.b_shared = mma && taps == 1 && bn / 16 == kWarps;
  p.share = p.a_shared ? 1 : (p.b_shared && p.upw > kWgradUpwSmall ? 2 : 0);
  if (p.share == 1 && p.units == kWarps * kWgradUpwLarge) p.share = 3;  // e.g. 3x3, 32 x 32 channels
  if (p.share == 2 && p.units == kWarps * kWgradUpwFullB) p.share = 4;   // 1x1, 128 x 64 channels
  p.lnp = mma ? log2_pow2(bn / 16) : 0;
  p.lmt = mma ? log2_pow2(bm / 16) : 0;
  p.kw_div = make_fastdiv(g.KW);
  p.cout_div = make_fastdiv(g.cout_g);
  p.cin_div = make_fastdiv(g.cin_g);
  // zero rows after the staged activation: the MMA kernels point a pixel outside the output at
  // them, so every tap of it reads zeros (the span of the taps' row offsets, plus one row)
  auto zero_rows = [&](const SpatialTile& s) {
    return mma ? int((g.KH - 1) * g.dh * s.IW + (g.KW - 1) * g.dw + 1) : 1;
  };
  auto bytes = [&](const SpatialTile& s) {
    return int64_t(align16(int64_t(s.MP) * p.PSm * elem_bytes)) +
           align16(int64_t(s.IH * s.IW + zero_rows(s)) * p.PSn * elem_bytes);
  };
  // per tile: the MMAs (2 per unit and k16 step), the two staged tiles, the code around them
  auto cost = [&](const SpatialTile& s) -> double {
    if (bytes(s) > kSmemLimit) return -1;
    const double tiles = double(g.N) * double(s.tiles_h) * double(s.tiles_w);
    if (!mma) {
      const double hmma = s.M * p.units / 32.0;
      return tiles * (hmma * 5.0 + s.MP * (bm / 8.0) * 1.6 + s.IH * s.IW * (bn / 8.0) * 3.2 + 800.0);
    }
    const double hmma = (s.MP / 16.0) * p.units * 2.0;
    return tiles * (hmma * kCostWgradHmma + (s.MP * (bm / 8.0) + s.IH * s.IW * (bn / 8.0)) * kCostWgradStage +
                    kCostWgradTile);
  };
  const SpatialTile s = choose_tile(g.Ho, g.Wo, g.KH, g.KW, g.sh, g.sw, g.dh, g.dw, false, mma ? kMaxPixels : kThreads,
                                    cost);
  if (s.M == 0) return p;
  p.s = s;
  p.go_elems = s.MP * p.PSm;
  p.zero_rows = zero_rows(s);
  p.act_elems = (s.IH * s.IW + p.zero_rows) * p.PSn;
  p.smem_bytes = int(bytes(s));
  p.items = g.N * s.tiles_h * s.tiles_w;
  // About target_blocks blocks; but a split of a single tile mostly runs the block's fixed code
  // (its partial sums, its set-up): with few tiles, two tiles per split down to half the grid.
  int64_t splits = cdiv(target_blocks, p.cblocks);
  if (splits > p.items) splits = p.items;
  if (mma && p.items < 2 * splits) {
    const int64_t fewer = cdiv(p.items, 2), floor_splits = cdiv(target_blocks / 2, p.cblocks);
    splits = fewer > floor_splits ? fewer : floor_splits;
    if (splits > p.items) splits = p.items;
  }
  splits = splits < 1 ? 1 : splits;
  if (mma) {
    // No more splits than that (each adds a row of partial sums), but the count that makes the
    // busiest SM's work the least: ceil(blocks / SMs) blocks of ceil(items / splits) tiles, each
    // the larger of its warp-instructions over the issue rate and its HMMAs over the MMA rate.
    const int64_t sms = target_blocks >= 2 ? target_blocks / 2 : 1;
    const double tile_issue = cost(s) / double(p.items), tile_hmma = (s.MP / 16.0) * p.units * 2.0;
    // ... and never below the kernel's HBM time (its activation and grad_out read once), so
    // that a memory-bound kernel keeps its splits (the blocks that hide the loads' latency).
    const double floor_clocks = double(g.N * g.C * g.H * g.W + g.N * g.Cout * g.Ho * g.Wo) * elem_bytes /
                                kHbmBytesPerClock;
    auto busiest = [&](int64_t t) {
      const double tiles = double(cdiv(p.items, t));
      const double issue = (tiles * tile_issue + kCostWgradBlock) / kIssuePerClock;
      const double tensor = tiles * tile_hmma * kHmmaClocks;
      const double sm = double(cdiv(p.cblocks * t, sms)) * (issue > tensor ? issue : tensor);
      return sm > floor_clocks ? sm : floor_clocks;
    };
    int64_t best_t = splits;
    double best_c = busiest(splits);
    for (int64_t t = splits - 1; t >= 1; --t) {
      const double c = busiest(t);
      if (c < best_c) {
        best_c = c;
        best_t = t;
      }
    }
    // Up to 4x as many splits where they balance the SMs' waves (a grid of channel blocks alone
    // that leaves the last wave part-empty, WRN-28-10's 100-400 blocks of 32 x 32 channels):
    // taken only when the busiest SM's work drops by a tenth or more, its partial sums (written
    // once, read once by the finalize) counted with the HBM time.
    const double part_clocks = double(g.Cout * g.cin_g * taps) * acc_bytes * 2.0 / kHbmBytesPerClock;
    const int64_t most = splits * 4 < p.items / 2 ? splits * 4 : p.items / 2;
    for (int64_t t = splits + 1; t <= most; ++t) {
      double c = busiest(t);
      const double mem = floor_clocks + double(t) * part_clocks;
      c = c > mem ? c : mem;
      if (c < 0.9 * best_c) {
        best_c = c;
        best_t = t;
      }
    }
    splits = best_t;
  }
  p.splits = splits;
  p.ok = true;
  return p;
}

// ---------------------------------------------------------------------------------------
// Operands

// Everything the conv blocks read and write (raw pointers, strides, geometry).
template <typename T>
struct ConvArgs {
  using A = acc_of<T>;
  const T* x;
  Strides4 xs;
  const T* w;   // contiguous [Cout][cin_g][KH][KW]
  const T* wp;  // forward / input grad: the weights prepared for the plan (prepared_weight)
  const T* go;
  Strides4 gs;
  BNParams<A> bn;
  const A* bias;  // forward: conv bias or nullptr
  T* out;         // forward: y; input grad: grad_z
  Strides4 os;
  const A* bn_ss;  // forward / input grad, 16-bit types: the BN table (bn_ss_value), or nullptr
  A* part0;  // input grad: per-block sums of grad_z; weight grad: per-split partial weight gradients
  A* part1;  // input grad: per-block sums of grad_z * xhat
  ConvGeom g;
  // 8 consecutive channels of x / grad_out / out are one aligned 16-byte vector (channels_last,
  // strides multiples of 8, aligned base): fills and stores move 16 bytes at once.
  bool x_vec, go_vec, out_vec;
};

// Loads 8 channels [c, c + nv) of one position into v (zeros beyond nv).
template <typename T, typename A>
RESFAST_HD void load8(const T* p, int64_t cstride, int nv, bool vec, A (&v)[8]) {
  if (vec && nv == 8) {
    alignas(16) T t[8];
    copy8_vec(t, p);
    RESFAST_UNROLL
    for (int i = 0; i < 8; ++i) v[i] = static_cast<A>(t[i]);
  } else {
    RESFAST_UNROLL
    for (int i = 0; i < 8; ++i) v[i] = i < nv ? static_cast<A>(p[i * cstride]) : A(0);
  }
}

// Stores 8 values (the first nv) to channels [c, c + nv) of one position.
template <typename T, typename A>
RESFAST_HD void store8(T* p, int64_t cstride, int nv, bool vec, const A (&v)[8]) {
  if (vec && nv == 8) {
    alignas(16) T t[8];
    RESFAST_UNROLL
    for (int i = 0; i < 8; ++i) t[i] = static_cast<T>(v[i]);
    copy8_vec(p, t);
  } else {
    RESFAST_UNROLL
    for (int i = 0; i < 8; ++i) {
      if (i < nv) p[i * cstride] = static_cast<T>(v[i]);
    }
  }
}

template <typename T>
RESFAST_HD bool finite_value(T v) {
  const float f = static_cast<float>(v);
  return f - f == 0.0f;
}
template <>
RESFAST_HD bool finite_value<double>(double v) {
  return v - v == 0.0;
}

// ---------------------------------------------------------------------------------------
// Fill phases (every thread of the block; element vectors of 8 channels)

// A float from its bits.
RESFAST_HD float word_float(uint32_t w) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(w);
#else
  float f;
  std::memcpy(&f, &w, 4);
  return f;
#endif
}

// Eight floats to shared memory (32-byte aligned) as two 16-byte stores.
template <typename A>
RESFAST_HD void sts_f8(A* p, const A (&f)[8]) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<A, float>::value) {
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
  } else {
    for (int i = 0; i < 8; ++i) p[i] = f[i];
  }
#else
  for (int i = 0; i < 8; ++i) p[i] = f[i];
#endif
}

// Eight consecutive floats of shared memory (32-byte aligned) as two 16-byte loads.
RESFAST_HD void lds_f8(const float* p, float (&f)[8]) {
  const Vec16 a = reinterpret_cast<const Vec16*>(p)[0], b = reinterpret_cast<const Vec16*>(p)[1];
  RESFAST_UNROLL
  for (int i = 0; i < 4; ++i) {
    f[i] = word_float(a.w[i]);
    f[4 + i] = word_float(b.w[i]);
  }
}

// The BN affine map of a 16-bit input as one FMA, z = x * scale + shift (scale = invstd * gamma,
// shift = beta - mean * scale); exact to float rounding, far below the input's own 8 / 11 bits.
// float32 / float64 keep the reference's (x - mean) * invstd * gamma + beta.
template <typename T, typename A>
struct BNChannel8 {
  A mean[8], invstd[8], gamma[8], beta[8], scale[8], shift[8];
  RESFAST_HD void load(const BNParams<A>& bn, int c, int nv) {
    RESFAST_UNROLL
    for (int i = 0; i < 8; ++i) {
      const bool ok = i < nv;
      mean[i] = ok ? ld_global(bn.mean + c + i) : A(0);
      invstd[i] = ok ? ld_global(bn.invstd + c + i) : A(0);
      gamma[i] = ok ? ld_global(bn.gamma + c + i) : A(0);
      beta[i] = ok ? ld_global(bn.beta + c + i) : A(0);
      scale[i] = invstd[i] * gamma[i];
      shift[i] = beta[i] - mean[i] * scale[i];
    }
  }
  RESFAST_HD A z(int i, A x) const {
    if constexpr (IsMmaType<T>::value) {
      return x * scale[i] + shift[i];
    } else {
      return bn_affine(x, mean[i], invstd[i], gamma[i], beta[i]);
    }
  }
};

// Stages rows [0, rows) of a [pixel][channel] tile: pixel p < IH * IW is position
// (h0 + p / IW, w0 + p % IW) of sample n, channels [c0, c0 + BK) of which [c0, c_end) exist;
// with kBN the value is relu(bn(x)), else the plain value. Positions outside [0, H) x [0, W),
// missing channels and rows p >= IH * IW are zero. With check, returns whether a staged value
// is not finite (check). This is the general path (any strides, any dtype); out of line, as the
// tensor-core kernels take the 16-byte path below for channels_last tensors.
template <bool kBN, typename T, typename A>
RESFAST_HD_NOINLINE bool fill_rows_general(int tid, const T* src, Strides4 ss, const BNParams<A>& bn, int64_t n,
                                           int h0, int w0, int IH, int IW, int rows, int64_t H, int64_t W, int c0,
                                           int c_end, int BK, int PS, bool smem_vec, bool check, T* dst) {
  const int U = BK / 8 > 0 ? BK / 8 : 1;  // 8-channel units per row (BK < 8 only for SIMT)
  const int lu = log2_pow2(U);
  const int v = tid & (U - 1);            // fixed per thread: kThreads is a multiple of U
  const int c = c0 + 8 * v;
  const int nv = c_end - c < 0 ? 0 : (c_end - c > 8 ? 8 : c_end - c);
  const int nst = BK - 8 * v < 8 ? BK - 8 * v : 8;  // channels of the unit inside the chunk
  const uint32_t iw_magic = div_magic(uint32_t(IW < 2 ? 2 : IW));
  BNChannel8<T, A> bc;
  if constexpr (kBN) bc.load(bn, c, nv);
  const T* base = src + n * ss.n + int64_t(c) * ss.c;
  bool bad = false;
  for (int e = tid; e < rows << lu; e += kThreads) {
    const int p = e >> lu;
    const int r = IW < 2 ? p : div_small(p, iw_magic);
    const int64_t h = h0 + r, w = w0 + (p - r * IW);
    A val[8];
    RESFAST_UNROLL
    for (int i = 0; i < 8; ++i) val[i] = A(0);
    if (p < IH * IW && h >= 0 && h < H && w >= 0 && w < W && nv > 0) {
      load8(base + h * ss.h + w * ss.w, ss.c, nv, false, val);
      if constexpr (kBN) {
        RESFAST_UNROLL
        for (int i = 0; i < 8; ++i) val[i] = i < nv ? relu(bc.z(i, val[i])) : A(0);
      }
      if (check) {
        RESFAST_UNROLL
        for (int i = 0; i < 8; ++i) bad |= !finite_value(static_cast<T>(val[i]));
      }
    }
    store8(dst + p * PS + 8 * v, 1, nst, smem_vec, val);
  }
  return bad;
}

// The BN map of the 8 channels a thread stages, z = x * scale + shift (16-bit inputs), loaded
// once for all the tiles a block stages with the same channels.
struct BNScaleShift8 {
  float scale[8], shift[8];
};

template <typename A>
RESFAST_HD BNScaleShift8 bn_scale_shift(const BNParams<A>& bn, int c, int nv) {
  BNScaleShift8 r;
  RESFAST_UNROLL
  for (int i = 0; i < 8; ++i) {
    const bool ok = i < nv;
    const float sc = ok ? float(ld_global(bn.invstd + c + i) * ld_global(bn.gamma + c + i)) : 0.0f;
    r.scale[i] = sc;
    r.shift[i] = ok ? float(ld_global(bn.beta + c + i) - ld_global(bn.mean + c + i) * sc) : 0.0f;
  }
  return r;
}

// The BN map as a table, prepared once per call with the weights: for channels [8q, 8q + 8),
// elements 32q + i, 32q + 8 + i, 32q + 16 + i and 32q + 24 + i hold scale = invstd * gamma,
// shift = beta - mean * scale, invstd and -mean * invstd of channel 8q + i (zero past C), so
// a thread loads its 8 channels' map with 16-byte loads (the forward per K chunk, the input
// gradient's epilogue per tile: z = x * scale + shift, xhat = x * invstd - mean * invstd).
inline int64_t bn_ss_size(int64_t C) { return cdiv(C, 8) * 32; }
template <typename A>
RESFAST_HD A bn_ss_value(const BNParams<A>& bn, int64_t C, int64_t i) {
  const int64_t c = (i >> 5) * 8 + (i & 7);
  if (c >= C) return A(0);
  const A sc = bn.invstd[c] * bn.gamma[c];
  switch ((i >> 3) & 3) {
    case 0: return sc;
    case 1: return bn.beta[c] - bn.mean[c] * sc;
    case 2: return bn.invstd[c];
    default: return -bn.mean[c] * bn.invstd[c];
  }
}
// Eight floats of a table (32-byte aligned) as two 16-byte loads.
RESFAST_HD void ldg_f8(const float* q, float (&f)[8]) {
  const Vec16 a = ld_global16(q), b = ld_global16(q + 4);
  RESFAST_UNROLL
  for (int i = 0; i < 4; ++i) {
    f[i] = word_float(a.w[i]);
    f[4 + i] = word_float(b.w[i]);
  }
}
RESFAST_HD BNScaleShift8 load_bn_ss8(const float* ss, int c) {  // c a multiple of 8 below C
  BNScaleShift8 r;
  const float* q = ss + (c >> 3) * 32;
  RESFAST_UNROLL
  for (int h = 0; h < 2; ++h) {
    const Vec16 a = ld_global16(q + 4 * h), b = ld_global16(q + 8 + 4 * h);
    RESFAST_UNROLL
    for (int i = 0; i < 4; ++i) {
      r.scale[4 * h + i] = word_float(a.w[i]);
      r.shift[4 * h + i] = word_float(b.w[i]);
    }
  }
  return r;
}

// The channel a thread's 8-channel unit starts at when a tile of BK channels from c0 is staged.
RESFAST_HD int staged_channel(int tid, int c0, int BK) { return c0 + 8 * (tid & (BK / 8 - 1)); }

// As fill_rows_general; float16 / bfloat16 with 16-byte aligned channel
// vectors (channels_last, in-sample offsets below 2^31: host.h channel_vectors) take 16-byte
// loads and stores with 32-bit offsets, the BN map `pre` (loaded for the thread's channels)
// and one F2FP.RELU per packed pair. iw_magic = div_magic(IW) (IW >= 2: every tile is at
// least 4 wide).
template <bool kBN, typename T, typename A>
RESFAST_HD bool fill_rows(int tid, const T* src, const Strides4& ss, bool vec, const BNParams<A>& bn, int64_t n,
                          int h0, int w0, int IH, int IW, uint32_t iw_magic, int rows, int64_t H, int64_t W, int c0,
                          int c_end, int BK, int PS, bool smem_vec, bool check, T* dst,
                          const BNScaleShift8* pre = nullptr) {
  if constexpr (IsMmaType<T>::value) {
    const int lu = log2_pow2(BK / 8);
    const int v = tid & ((1 << lu) - 1);
    const int c = c0 + 8 * v;
    if (vec && smem_vec && (c & 7) == 0 && c + 8 <= c_end && (!kBN || pre != nullptr)) {
      BNScaleShift8 bc;
      if constexpr (kBN) bc = *pre;
      const T* base = src + n * ss.n + c;  // ss.c == 1
      const int sh = int(ss.h), sw = int(ss.w), Hi = int(H), Wi = int(W), staged = IH * IW;
      const int end = rows << lu;
      uint32_t bad = 0;
      T* dst_v = dst + 8 * v;
      RESFAST_NO_UNROLL
      for (int e = tid; e < end; e += kThreads) {
        const int p = e >> lu;
        const int r = div_small(p, iw_magic);
        const int h = h0 + r, w = w0 + (p - r * IW);
        Vec16 q{{0u, 0u, 0u, 0u}};
        if (p < staged && uint32_t(h) < uint32_t(Hi) && uint32_t(w) < uint32_t(Wi)) {
          q = ld_global16(base + uint32_t(h * sh + w * sw));  // in bounds: >= 0
          if constexpr (kBN) {
            RESFAST_UNROLL
            for (int i = 0; i < 4; ++i) {
              float lo, hi;
              unpack2<T>(q.w[i], lo, hi);
              q.w[i] = pack2_relu<T>(lo * bc.scale[2 * i] + bc.shift[2 * i], hi * bc.scale[2 * i + 1] + bc.shift[2 * i + 1]);
            }
          }
          if (check) {  // after the ReLU no sign bit is set (a -0 only costs the fallback)
            RESFAST_UNROLL
            for (int i = 0; i < 4; ++i) bad = max_u16x2(bad, kBN ? q.w[i] : q.w[i] & 0x7fff7fffu);
          }
        }
        st_shared16(dst_v + p * PS, q);
      }
      return nonfinite_max16<T>(bad);
    }
  }
  return fill_rows_general<kBN>(tid, src, ss, bn, n, h0, w0, IH, IW, rows, H, W, c0, c_end, BK, PS, smem_vec, check,
                                dst);
}

// fill_rows_general for each sample of a whole-sample tile (those past the conv's nleft
// samples zero); out of line as fill_rows_general.
template <bool kBN, typename T, typename A>
RESFAST_HD_NOINLINE bool fill_rows_whole_general(int tid, const T* src, Strides4 ss, const BNParams<A>& bn, int64_t n0,
                                                 int nleft, int h0, int w0, const SpatialTile& st, int64_t H, int64_t W,
                                                 int c0, int c_end, int BK, int PS, bool smem_vec, bool check, T* dst) {
  const int IHW = st.IH * st.IW;
  bool bad = false;
  for (int smp = 0; smp < st.S; ++smp) {
    const bool here = smp < nleft;
    bad |= fill_rows_general<kBN>(tid, src, ss, bn, here ? n0 + smp : n0, h0, w0, st.IH, st.IW, IHW, here ? H : 0, W,
                                  c0, c_end, BK, PS, smem_vec, check, dst + smp * IHW * PS);
  }
  return bad;
}

// As fill_rows for the samples [n0, n0 + S) of a whole-sample tile, sample n0 + s's halo of
// IH x IW rows from (h0, w0) at rows [s * IH * IW, (s + 1) * IH * IW); samples from nleft on
// (past N) stage zeros. The 16-byte path in one loop over all of the tile's rows (32-bit offsets from the
// tile's first sample), the general path sample by sample.
template <bool kBN, typename T, typename A>
RESFAST_HD bool fill_rows_whole(int tid, const T* src, const Strides4& ss, bool vec, const BNParams<A>& bn, int64_t n0,
                                int nleft, bool off32, int h0, int w0, const SpatialTile& st, int64_t H, int64_t W,
                                int c0, int c_end, int BK, int PS, bool smem_vec, bool check, T* dst,
                                const BNScaleShift8* pre = nullptr) {
  const int IW = st.IW, IHW = st.IH * st.IW;
  if constexpr (IsMmaType<T>::value) {
    const int lu = log2_pow2(BK / 8);
    const int v = tid & ((1 << lu) - 1);
    const int c = c0 + 8 * v;
    // (and off32: a tile's samples' offsets below 2^31 too, 32-bit offsets from its first sample)
    if (vec && off32 && smem_vec && (c & 7) == 0 && c + 8 <= c_end && (!kBN || pre != nullptr)) {
      BNScaleShift8 bc;
      if constexpr (kBN) bc = *pre;
      const T* base = src + n0 * ss.n + c;  // ss.c == 1
      const int sn = int(ss.n), sh = int(ss.h), sw = int(ss.w), Hi = int(H), Wi = int(W);
      // the rows of the samples inside the conv; those of the missing ones (the last tile) zero
      const int end = (nleft * IHW) << lu, zero_end = (st.S * IHW) << lu;
      const uint32_t ihw_magic = st.ihw_magic, iw_magic = st.iw_magic;
      uint32_t bad = 0;
      T* dst_v = dst + 8 * v;
      RESFAST_NO_UNROLL
      for (int e = tid; e < end; e += kThreads) {
        const int p = e >> lu;
        const int smp = div_small(p, ihw_magic), q = p - smp * IHW;
        const int r = div_small(q, iw_magic);
        const int h = h0 + r, w = w0 + (q - r * IW);
        Vec16 val{{0u, 0u, 0u, 0u}};
        if (uint32_t(h) < uint32_t(Hi) && uint32_t(w) < uint32_t(Wi)) {
          val = ld_global16(base + uint32_t(smp * sn + h * sh + w * sw));  // in bounds: >= 0
          if constexpr (kBN) {
            RESFAST_UNROLL
            for (int i = 0; i < 4; ++i) {
              float lo, hi;
              unpack2<T>(val.w[i], lo, hi);
              val.w[i] = pack2_relu<T>(lo * bc.scale[2 * i] + bc.shift[2 * i],
                                       hi * bc.scale[2 * i + 1] + bc.shift[2 * i + 1]);
            }
          }
          if (check) {
            RESFAST_UNROLL
            for (int i = 0; i < 4; ++i) bad = max_u16x2(bad, kBN ? val.w[i] : val.w[i] & 0x7fff7fffu);
          }
        }
        st_shared16(dst_v + p * PS, val);
      }
      RESFAST_NO_UNROLL
      for (int e = end + tid; e < zero_end; e += kThreads) st_shared16(dst_v + (e >> lu) * PS, Vec16{{0u, 0u, 0u, 0u}});
      return nonfinite_max16<T>(bad);
    }
  }
  return fill_rows_whole_general<kBN>(tid, src, ss, bn, n0, nleft, h0, w0, st, H, W, c0, c_end, BK, PS, smem_vec, check,
                                      dst);
}

// The weights in the tiles' own layout, prepared once per call: element
// ((((jb * chunks + chunk) * taps + t) * bn + j) * BK + k) is the weight of column channel
// col0 + j against summed channel k0 + chunk * BK + k of channel block jb (forward: columns
// are output channels and k input channels; input grad, transposed: columns are input
// channels and k output channels), zero where either is missing or where they belong to
// different groups (the block-diagonal packing of small groups), for tap p.tap_of[t] (residue-
// class plans order the taps by class, else t itself). A block then stages each
// chunk's [tap][j][k] tile with plain 16-byte copies.
template <typename T>
RESFAST_HD T prepared_weight(const T* w, const ConvGeom& g, const ConvPlan& p, bool transposed, int64_t idx) {
  const int taps = int(g.KH * g.KW), bn = p.ch.bn, BK = p.BK;
  const int k = int(idx % BK);
  int64_t r = idx / BK;
  const int j = int(r % bn);
  r /= bn;
  const int tap = int(r % taps);
  r /= taps;
  const int chunk = int(r % p.chunks);
  const int64_t jb = r / p.chunks;
  const int cin_g = int(g.cin_g), cout_g = int(g.cout_g);
  const ChannelRange cr = transposed ? decode_channels(p.ch, g.groups, cin_g, cout_g, jb)
                                     : decode_channels(p.ch, g.groups, cout_g, cin_g, jb);
  const int kk = chunk * BK + k;
  if (j >= cr.ncols || kk >= cr.nk) return T(0);
  const int col = cr.col0 + j, kg = cr.k0 + kk;
  const int co = transposed ? kg : col, ci = transposed ? col : kg;
  const int grp = co / cout_g;
  if (ci / cin_g != grp) return T(0);
  return w[(int64_t(co) * cin_g + (ci - grp * cin_g)) * taps + p.tap_of[tap]];
}

// Copies chunk `chunk` of channel block jb of the prepared weights to w_s[(tap * bn + j) * PS + k]:
// 16-byte asynchronous copies for the 16-bit types (waited for before the block barrier),
// element copies for float32 / float64 (whose SIMT rows are not 16-byte aligned).
template <typename T>
RESFAST_HD void fill_weight_tile(int tid, const T* wp, const ConvPlan& p, int taps, int64_t jb, int chunk, T* w_s) {
  const int bn = p.ch.bn, BK = p.BK, rows = taps * bn;
  const T* src = wp + (jb * p.chunks + chunk) * int64_t(rows) * BK;
  if constexpr (IsMmaType<T>::value) {
    // a thread copies vector v of rows r0, r0 + rstep, ... (pointers advanced by additions)
    const int lu = p.lbk - 3;  // 8-element vectors per row
    const int v = tid & ((1 << lu) - 1), r0 = tid >> lu, rstep = kThreads >> lu;
    T* dst = w_s + r0 * p.PS + 8 * v;
    const T* s = src + r0 * BK + 8 * v;
    const int dstep = rstep * p.PS, sstep = rstep * BK;
    RESFAST_NO_UNROLL
    for (int row = r0; row < rows; row += rstep, dst += dstep, s += sstep) cp_async16(dst, s);
    cp_async_wait_all();
  } else {
    for (int e = tid; e < rows * BK; e += kThreads) {
      const int row = e >> p.lbk, k = e & (BK - 1);
      w_s[row * p.PS + k] = src[e];
    }
  }
}

template <typename T>
RESFAST_HD void fill_zero(int tid, T* dst, int count) {
  for (int e = tid; e < count; e += kThreads) dst[e] = T(0);
}

// ---------------------------------------------------------------------------------------
// Forward and input gradient: MMA phase (one warp; rows = tile pixels, columns = channels)

template <int NL, int MT, int NT>
struct MmaAcc {
  float c[MT][NT][NL][4];
};

template <int NL, int MT, int NT>
RESFAST_HD void zero_acc(MmaAcc<NL, MT, NT>& a) {
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n)
      for (int s = 0; s < NL; ++s)
        for (int i = 0; i < 4; ++i) a.c[m][n][s][i] = 0.0f;
}

// B fragment bases of a warp's lanes: row (n) np * 16 + (lane & 7) + (lane >> 4) * 8 of a
// [n][k] tile, k half ((lane >> 3) & 1) * 8; ldmatrix matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
// (n 8-15, k 0-7), ... per 16 columns.
RESFAST_HD int b_frag_row(int lane, int PS) { return ((lane & 7) + (lane >> 4) * 8) * PS + ((lane >> 3) & 1) * 8; }

// B fragments of NT n8 tiles at element offset `off` of the lanes' bases (one column pair np
// every 16 rows of PS elements).
template <int NL, int NT>
RESFAST_HD void load_b_frags(const SmemPtr (&bbase)[NL], int off, int np_stride, uint32_t (&b)[NT][NL][2]) {
  RESFAST_UNROLL
  for (int np = 0; np < NT / 2; ++np) {
    SmemPtr addr[NL];
    for (int s = 0; s < NL; ++s) addr[s] = bbase[s] + (off + np * np_stride);
    uint32_t r[NL][4];
    ldsm_x4<NL, false>(r, addr);
    for (int s = 0; s < NL; ++s) {
      b[2 * np][s][0] = r[s][0];
      b[2 * np][s][1] = r[s][1];
      b[2 * np + 1][s][0] = r[s][2];
      b[2 * np + 1][s][1] = r[s][3];
    }
  }
}

// The (tap, k16 step) walk of a K chunk: steps run k16 steps within a tap, then taps along a
// kernel row, then rows; the staged-operand and weight offsets advance by additions only.
struct TapWalk {
  int ks, kw, kh, KS, KW;
  RESFAST_HD bool next() {  // true when the step moved to another tap
    if (++ks < KS) return false;
    ks = 0;
    if (++kw == KW) {
      kw = 0;
      ++kh;
    }
    return true;
  }
};

// A warp's per-lane fragment row bases for the forward / input-gradient MMAs: the A rows of
// its m-tiles in the staged tile (forward: the tile's pixels; input grad: the output row a
// pixel reads through tap 0, with the pixel's stride remainders rr), the zero row, the B rows
// of the weights. The forward's depend on the tile shape only (once per block), the input
// gradient's on the tile's position modulo the strides (once per tile), never on the K chunk.
template <int NL, int MT>
struct MmaRows {
  SmemPtr a[NL][MT], z[NL], b[NL];
  int rr[NL][MT];
};

template <int NL, int MT, bool kWhole = false>
RESFAST_HD void forward_rows(int warp, int lane0, const ConvGeom& g, const ConvPlan& p, const void* act_s,
                             const void* w_s, MmaRows<NL, MT>& rows) {
  const SpatialTile& st = p.s;
  const int sh = int(g.sh), sw = int(g.sw), PS = p.PS;
  const SmemPtr act = smem_ptr(act_s), wt = smem_ptr(w_s);
  for (int s = 0; s < NL; ++s) {
    const int lane = NL == 1 ? lane0 : s;
    rows.b[s] = wt + b_frag_row(lane, PS);
    rows.z[s] = act;
    RESFAST_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      int r = (warp * MT + mt) * 16 + (lane & 15);
      r = r < st.M ? r : st.M - 1;
      if constexpr (kWhole) {  // the pixel's sample has its own halo
        int smp, h, w;
        whole_pixel(st, r, smp, h, w);
        rows.a[s][mt] = act + (((smp * st.IH + h * sh) * st.IW + w * sw) * PS + (lane >> 4) * 8);
      } else {
        rows.a[s][mt] = act + (((r >> st.lw) * sh * st.IW + (r & (st.TW - 1)) * sw) * PS + (lane >> 4) * 8);
      }
      rows.rr[s][mt] = 0;
    }
  }
}

// Input gradient: for input row ih and tap kh the output row is (ih + ph - kh*dh) / sh when
// that divides: with ih + ph = qh*sh + rh and kh*dh = qk*sh + rk (plan tables) it is qh - qk
// when rh == rk. rows.a = output row qh, col qw of the staged tile; rr = rh * sw + rw.
//
// kRes (residue-class tiles): warp c's m-tiles are its class's cmt tiles, rows [c << lcp, ...).
template <int NL, int MT, bool kWhole = false, bool kRes = false>
RESFAST_HD void input_grad_rows(int warp, int lane0, const ConvGeom& g, const ConvPlan& p, int ih0, int iw0,
                                int oh_lo, int ow_lo, const void* go_s, const void* zero_s, const void* w_s,
                                MmaRows<NL, MT>& rows) {
  const SpatialTile& st = p.s;
  const int sh = int(g.sh), sw = int(g.sw), PS = p.PS;
  const SmemPtr go = smem_ptr(go_s), wt = smem_ptr(w_s);
  for (int s = 0; s < NL; ++s) {
    const int lane = NL == 1 ? lane0 : s;
    const int kofs = (lane >> 4) * 8;
    rows.z[s] = smem_ptr(zero_s) + kofs;
    rows.b[s] = wt + b_frag_row(lane, PS);
    RESFAST_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      int r = (warp * (kRes ? st.cmt : MT) + mt) * 16 + (lane & 15);
      r = r < st.M ? r : st.M - 1;
      int smp = 0, hl, wl;  // whole-sample tiles: the pixel's sample has its own staged rows
      if constexpr (kWhole) {
        whole_pixel(st, r, smp, hl, wl);
      } else if constexpr (kRes) {
        residue_pixel(st, r, hl, wl);
      } else {
        hl = r >> st.lw;
        wl = r & (st.TW - 1);
      }
      const int th = ih0 + hl + int(g.ph), tw = iw0 + wl + int(g.pw);
      const int qh = fast_div(th, p.sh_div), qw = fast_div(tw, p.sw_div);
      rows.rr[s][mt] = (th - qh * sh) * sw + (tw - qw * sw);
      rows.a[s][mt] = go + (((smp * p.OHB + qh - oh_lo) * p.OWB + (qw - ow_lo)) * PS + kofs);
    }
  }
}

// One K chunk of the forward (kInputGrad = false: acc[mt][nt] += act(the warp's m-tile rows
// shifted by each tap) x w_s) or of the input gradient (acc += go(the output row each tap
// reads, or the zero row) x w_s, the weights transposed). The A row of lane l in m-tile mt is
// tile pixel (warp*MT + mt)*16 + l%16 (rows past the tile repeat its last pixel; their results
// are never stored), k half (l/16)*8. Steps walk (tap, k16 step) with offsets advanced by
// additions; an input-gradient tap moves the rows by -(qk_h * OWB + qk_w) when its remainders
// (rk_h, rk_w) are the lane's.
//
// kInputGrad with unit strides: every tap reads a staged output row (qk = k * dilation, no
// remainders), so the input gradient walks its rows like the forward, by -dilation per tap
// (kSelect = false: no zero-row selection).
//
// kRes (residue-class tiles, strides 2 x 2): warp c walks only its class's taps (the plan's
// rw_* tables: the taps whose remainders are the class's, consecutive in the weights) over its
// class's cmt m-tiles, the unit-stride walk with the class's offsets.
template <bool kInputGrad, int NL, typename T, int NT, bool kSelect = kInputGrad, bool kRes = false, int MT = mt_of(NT)>
RESFAST_HD void conv_mma_chunk(int warp, const ConvGeom& g, const ConvPlan& p, const MmaRows<NL, MT>& rows,
                               MmaAcc<NL, MT, NT>& acc) {
  static_assert(kInputGrad || !kSelect, "the forward never selects a zero row");
  static_assert(!kRes || (kInputGrad && !kSelect), "residue-class tiles: the input gradient's unit walk");
  constexpr int kFwdMT = MT;
  const SpatialTile& st = p.s;
  const int mtiles_left = kRes ? st.cmt : st.MP / 16 - warp * kFwdMT;
  if (mtiles_left <= 0) return;
  const int sw = int(g.sw), PS = p.PS, bn = p.ch.bn;
  const int KS = 1 << p.lks, KW = kRes ? p.rw_nkw[warp] : int(g.KW);
  // offset changes at a tap change: along a kernel row, to the next kernel row (forward; the
  // unit-stride input gradient walks backwards), weights
  const int sgn = kInputGrad ? -1 : 1;
  const int a_col = (kRes ? p.rw_acol[warp] : sgn * int(g.dw) * PS) - KS * 16;
  const int a_row = (kRes ? p.rw_arow[warp] : sgn * (int(g.dh) * st.IW * PS - (KW - 1) * int(g.dw) * PS)) - KS * 16;
  const int w_tap = bn * PS - KS * 16;
  const int np_stride = 16 * PS;
  const int steps = kRes ? p.rw_steps[warp] : int(g.KH * g.KW) << p.lks;
  TapWalk tw{0, 0, 0, KS, KW};
  int woff = kRes ? p.rw_woff[warp] : 0, koff = 0;  // weights; input grad: k within the tap
  int aoff = kSelect ? -(p.qk_h[0] * p.OWB + p.qk_w[0]) * PS : (kRes ? p.rw_aoff[warp] : 0);
  int trr = kSelect ? p.rk_h[0] * sw + p.rk_w[0] : 0;
  RESFAST_NO_UNROLL
  for (int step = 0; step < steps; ++step) {
    uint32_t b[NT][NL][2];
    load_b_frags<NL, NT>(rows.b, woff, np_stride, b);
    RESFAST_UNROLL
    for (int mt = 0; mt < kFwdMT; ++mt) {
      if (mt < mtiles_left) {
        SmemPtr addr[NL];
        for (int s = 0; s < NL; ++s) {
          if constexpr (kSelect) {
            addr[s] = rows.rr[s][mt] == trr ? rows.a[s][mt] + (aoff + koff) : rows.z[s] + koff;
          } else {
            addr[s] = rows.a[s][mt] + aoff;
          }
        }
        uint32_t a[NL][4];
        ldsm_x4<NL, false>(a, addr);
        RESFAST_UNROLL
        for (int nt = 0; nt < NT; ++nt) mma_16816<T, NL>(acc.c[mt][nt], a, b[nt]);
      }
    }
    woff += 16;
    if constexpr (kSelect) {
      koff += 16;
    } else {
      aoff += 16;
    }
    if (tw.next()) {
      woff += w_tap;
      if constexpr (kSelect) {
        koff = 0;
        aoff = -(p.qk_h[tw.kh] * p.OWB + p.qk_w[tw.kw]) * PS;
        trr = p.rk_h[tw.kh] * sw + p.rk_w[tw.kw];
      } else {
        aoff += tw.kw == 0 ? a_row : a_col;
      }
    }
  }
}

// Two adjacent values (8-byte aligned floats: one 8-byte store on the GPU).
template <typename A>
RESFAST_HD void st_pair(A* p, A v0, A v1) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<A, float>::value) {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
    return;
  }
#endif
  p[0] = v0;
  p[1] = v1;
}

// Accumulator fragments -> c_s[row * CS + col] (lane l holds rows l/4 (+8), cols 2(l%4) (+1)).
// (kRes: warp c's m-tiles are its class's cmt tiles.)
template <int NL, int NT, typename A, bool kRes = false, int MT = mt_of(NT)>
RESFAST_HD void store_acc_tile(int warp, int lane0, const ConvPlan& p, const MmaAcc<NL, MT, NT>& acc, A* c_s) {
  constexpr int kFwdMT = MT;
  const int wmt = kRes ? p.s.cmt : kFwdMT;
  const int mtiles_left = kRes ? wmt : p.s.MP / 16 - warp * kFwdMT;
  for (int s = 0; s < NL; ++s) {
    const int lane = NL == 1 ? lane0 : s;
    const int gq = lane >> 2, t = lane & 3;
    RESFAST_UNROLL
    for (int mt = 0; mt < kFwdMT; ++mt) {
      if (mt < mtiles_left) {
        const int r = (warp * wmt + mt) * 16 + gq;
        RESFAST_UNROLL
        for (int nt = 0; nt < NT; ++nt) {
          const int col = nt * 8 + 2 * t;
          const float* d = acc.c[mt][nt][s];
          st_pair(c_s + r * p.CS + col, A(d[0]), A(d[1]));
          st_pair(c_s + (r + 8) * p.CS + col, A(d[2]), A(d[3]));
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward and input gradient: SIMT phase (thread tid owns tile pixel tid, all columns)

// Column j's summed channels within the chunk: all of them, or in a packed block only those
// of j's own group (so a non-finite value of one group cannot reach another's result).
RESFAST_HD void column_k_range(const ChannelRange& cr, int j, int cg_cols, int cg_k, int kc, int kb, int& lo,
                               int& hi) {
  lo = 0;
  hi = kb;
  if (cr.multi) {
    const int gj = j / cg_cols;
    const int a = gj * cg_k - kc, b = (gj + 1) * cg_k - kc;
    lo = a > 0 ? a : 0;
    hi = b < kb ? b : kb;
  }
}

template <bool kWhole, typename T, typename A>
RESFAST_HD void forward_simt_chunk(int tid, const ConvGeom& g, const ConvPlan& p, const ChannelRange& cr, int kc,
                                   const T* act_s, const T* w_s, A (&acc)[kSimtCols]) {
  const SpatialTile& st = p.s;
  if (tid >= st.M) return;
  int smp = 0, hl, wl;
  if constexpr (kWhole) {
    whole_pixel(st, tid, smp, hl, wl);
  } else {
    hl = tid >> st.lw;
    wl = tid & (st.TW - 1);
  }
  const T* a0 = act_s + ((smp * st.IH + hl * int(g.sh)) * st.IW + wl * int(g.sw)) * p.PS;
  const int kb = cr.nk - kc < p.BK ? cr.nk - kc : p.BK;
  const int KH = int(g.KH), KW = int(g.KW), bn = p.ch.bn;
  RESFAST_UNROLL
  for (int j = 0; j < kSimtCols; ++j) {
    if (j < cr.ncols && j < bn) {
      int lo, hi;
      column_k_range(cr, j, int(g.cout_g), int(g.cin_g), kc, kb, lo, hi);
      A sum = acc[j];
      for (int kh = 0; kh < KH; ++kh) {
        for (int kw = 0; kw < KW; ++kw) {
          const T* ap = a0 + (kh * int(g.dh) * st.IW + kw * int(g.dw)) * p.PS;
          const T* wp = w_s + ((kh * KW + kw) * bn + j) * p.PS;
          for (int k = lo; k < hi; ++k) sum += static_cast<A>(ap[k]) * static_cast<A>(wp[k]);
        }
      }
      acc[j] = sum;
    }
  }
}

// (kRes: tile row tid is pixel residue_pixel(tid), and the weights' taps are in class order.)
template <bool kWhole, typename T, typename A, bool kRes = false>
RESFAST_HD void input_grad_simt_chunk(int tid, const ConvGeom& g, const ConvPlan& p, const ChannelRange& cr, int kc,
                                      int ih0, int iw0, int oh_lo, int ow_lo, const T* go_s, const T* w_s,
                                      A (&acc)[kSimtCols]) {
  const SpatialTile& st = p.s;
  if (tid >= st.M) return;
  int smp = 0, hl, wl;  // whole-sample tiles: the pixel's sample has its own staged rows
  if constexpr (kWhole) {
    whole_pixel(st, tid, smp, hl, wl);
  } else if constexpr (kRes) {
    residue_pixel(st, tid, hl, wl);
  } else {
    hl = tid >> st.lw;
    wl = tid & (st.TW - 1);
  }
  const int th = ih0 + hl + int(g.ph), tw = iw0 + wl + int(g.pw);
  const int sh = int(g.sh), sw = int(g.sw);
  const int qh = smp * p.OHB + th / sh - oh_lo, rh = th - (th / sh) * sh, qw = tw / sw - ow_lo, rw = tw - (tw / sw) * sw;
  const int kb = cr.nk - kc < p.BK ? cr.nk - kc : p.BK;
  const int KH = int(g.KH), KW = int(g.KW), bn = p.ch.bn;
  RESFAST_UNROLL
  for (int j = 0; j < kSimtCols; ++j) {
    if (j < cr.ncols && j < bn) {
      int lo, hi;
      column_k_range(cr, j, int(g.cin_g), int(g.cout_g), kc, kb, lo, hi);
      A sum = acc[j];
      for (int kh = 0; kh < KH; ++kh) {
        if (rh != p.rk_h[kh]) continue;
        for (int kw = 0; kw < KW; ++kw) {
          if (rw != p.rk_w[kw]) continue;
          const T* gp = go_s + ((qh - p.qk_h[kh]) * p.OWB + (qw - p.qk_w[kw])) * p.PS;
          const T* wp = w_s + (p.pos_of[kh * KW + kw] * bn + j) * p.PS;
          for (int k = lo; k < hi; ++k) sum += static_cast<A>(gp[k]) * static_cast<A>(wp[k]);
        }
      }
      acc[j] = sum;
    }
  }
}

// The tensor-core kernels' fallback for a packed block holding a non-finite value: the SIMT
// loop, each column over its own group's channels, into fb_s (the accumulator-tile layout).
// Out of line: it is rare, and inlined it would be most of the kernel's code.
template <bool kInputGrad, bool kWhole, typename T, bool kRes = false>
RESFAST_HD_NOINLINE void packed_block_fallback(int tid, const ConvGeom& g, const ConvPlan& p, const ChannelRange& ch,
                                               int h0, int w0, int h_lo, int w_lo, const T* stage_s, const T* w_s,
                                               float* fb_s) {
  for (int r = tid; r < p.s.MP; r += kThreads) {  // a tile may have more pixels than threads
    float acc[kSimtCols];
    for (int j = 0; j < kSimtCols; ++j) acc[j] = 0.0f;
    if constexpr (kInputGrad) {
      input_grad_simt_chunk<kWhole, T, float, kRes>(r, g, p, ch, 0, h0, w0, h_lo, w_lo, stage_s, w_s, acc);
    } else {
      forward_simt_chunk<kWhole>(r, g, p, ch, 0, stage_s, w_s, acc);
    }
    for (int j = 0; j < kSimtCols && j < p.ch.bn; ++j) fb_s[r * p.CS + j] = acc[j];
  }
}

template <typename A>
RESFAST_HD void store_simt_tile(int tid, const ConvPlan& p, const A (&acc)[kSimtCols], A* c_s) {
  if (tid >= p.s.MP) return;
  RESFAST_UNROLL
  for (int j = 0; j < kSimtCols; ++j) {
    if (j < p.ch.bn) c_s[tid * p.CS + j] = acc[j];
  }
}

// ---------------------------------------------------------------------------------------
// Epilogues (every thread; units of 8 channels of one tile pixel)

// Pixel r of a tile: its sample (from the tile's first), row and col (from the tile's origin);
// false where it lies outside the conv (rows / cols left from the origin, samples left from
// the tile's first).
template <bool kWhole, bool kRes = false>
RESFAST_HD bool tile_pixel(const SpatialTile& st, int r, int rows, int cols, int nleft, int& smp, int& h, int& w) {
  if constexpr (kWhole) {
    whole_pixel(st, r, smp, h, w);
    return smp < nleft;
  } else if constexpr (kRes) {
    smp = 0;
    residue_pixel(st, r, h, w);
    return h < rows && w < cols;
  } else {
    smp = 0;
    h = r >> st.lw;
    w = r & (st.TW - 1);
    return h < rows && w < cols;
  }
}

// Forward: out[n, col0 + j, oh, ow] = c_s[r][j] (+ bias); the general path (any strides, any
// dtype), out of line as fill_rows_general.
template <bool kWhole, typename T, typename A>
RESFAST_HD_NOINLINE void forward_epilogue_general(int tid, const ConvArgs<T>& a, const ConvPlan& p, ChannelRange ch,
                                                  TilePos pos, const A* c_s) {
  const ConvGeom& g = a.g;
  const SpatialTile& st = p.s;
  const int U = p.ch.bn / 8, lu = log2_pow2(U);
  const int v = tid & (U - 1);
  const int co = ch.col0 + 8 * v;
  const int nv = ch.ncols - 8 * v < 0 ? 0 : (ch.ncols - 8 * v > 8 ? 8 : ch.ncols - 8 * v);
  if (nv == 0) return;
  A bias[8];
  RESFAST_UNROLL
  for (int i = 0; i < 8; ++i) bias[i] = (a.bias != nullptr && i < nv) ? a.bias[co + i] : A(0);
  T* out = a.out + pos.n * a.os.n + int64_t(co) * a.os.c;
  const int nleft = int(g.N - pos.n < p.s.S ? g.N - pos.n : p.s.S);
  for (int e = tid; e < st.M << lu; e += kThreads) {
    const int r = e >> lu;
    int smp, hl, wl;
    if (!tile_pixel<kWhole>(st, r, int(g.Ho - pos.h0), int(g.Wo - pos.w0), nleft, smp, hl, wl)) continue;
    const int64_t oh = pos.h0 + hl, ow = pos.w0 + wl;
    A val[8];
    RESFAST_UNROLL
    for (int i = 0; i < 8; ++i) val[i] = c_s[r * p.CS + 8 * v + i] + bias[i];
    store8(out + smp * a.os.n + oh * a.os.h + ow * a.os.w, a.os.c, nv, false, val);
  }
}

// As forward_epilogue_general; 16-bit channels_last outputs take 16-byte stores.
template <bool kWhole, typename T, typename A>
RESFAST_HD void forward_epilogue(int tid, const ConvArgs<T>& a, const ConvPlan& p, const ChannelRange& ch,
                                 const TilePos& pos, const A* c_s) {
  if constexpr (IsMmaType<T>::value) {
    const int U = p.ch.bn / 8, lu = log2_pow2(U);
    const int v = tid & (U - 1);
    const int co = ch.col0 + 8 * v;
    if (a.out_vec && (co & 7) == 0 && 8 * v + 8 <= ch.ncols) {
      const ConvGeom& g = a.g;
      const SpatialTile& st = p.s;
      float bias[8];
      RESFAST_UNROLL
      for (int i = 0; i < 8; ++i) bias[i] = a.bias != nullptr ? ld_global(a.bias + co + i) : 0.0f;
      T* out = a.out + pos.n * a.os.n + co;  // os.c == 1, in-sample offsets < 2^31
      const int osh = int(a.os.h), osw = int(a.os.w), rows = int(g.Ho) - pos.h0, cols = int(g.Wo) - pos.w0;
      const int end = st.M << lu;
      const A* c_v = c_s + 8 * v;
      if constexpr (kWhole) {  // the sample's offset in 64 bits, the in-sample offset in 32
        const int nleft = int(g.N - pos.n < st.S ? g.N - pos.n : st.S);
        const int64_t osn = a.os.n;
        RESFAST_NO_UNROLL
        for (int e = tid; e < end; e += kThreads) {
          const int r = e >> lu;
          int smp, oh, ow;
          whole_pixel(st, r, smp, oh, ow);
          if (smp >= nleft) continue;
          float f[8];
          lds_f8(c_v + r * p.CS, f);
          Vec16 q;
          RESFAST_UNROLL
          for (int i = 0; i < 4; ++i) q.w[i] = pack2<T>(f[2 * i] + bias[2 * i], f[2 * i + 1] + bias[2 * i + 1]);
          st_global16(out + smp * osn + uint32_t(oh * osh + ow * osw), q);
        }
      } else {
      RESFAST_NO_UNROLL
      for (int e = tid; e < end; e += kThreads) {
        const int r = e >> lu;
        const int oh = r >> st.lw, ow = r & (st.TW - 1);
        if (oh >= rows || ow >= cols) continue;
        float f[8];
        lds_f8(c_v + r * p.CS, f);
        Vec16 q;
        RESFAST_UNROLL
        for (int i = 0; i < 4; ++i) q.w[i] = pack2<T>(f[2 * i] + bias[2 * i], f[2 * i + 1] + bias[2 * i + 1]);
        st_global16(out + uint32_t((pos.h0 + oh) * osh + (pos.w0 + ow) * osw), q);
      }
      }
      return;
    }
  }
  forward_epilogue_general<kWhole>(tid, a, p, ch, pos, c_s);
}

// Input gradient: grad_z = relu_backward(da, bn(x)) for the tile's pixels and the block's
// input channels, written out; the thread's per-channel sums of grad_z and grad_z * xhat go
// to red[tid][0..16). The sums use grad_z as stored (rounded to T), as the reference sums its
// grad_z. The general path (any strides, any dtype), out of line as fill_rows_general.
template <bool kWhole, typename T, typename A, bool kRes = false>
RESFAST_HD_NOINLINE void input_grad_epilogue_general(int tid, const ConvArgs<T>& a, const ConvPlan& p, ChannelRange ch,
                                                     TilePos pos, const A* c_s, A* red) {
  const ConvGeom& g = a.g;
  const SpatialTile& st = p.s;
  const int U = p.ch.bn / 8, lu = log2_pow2(U);
  const int v = tid & (U - 1);
  const int c = ch.col0 + 8 * v;
  const int nv = ch.ncols - 8 * v < 0 ? 0 : (ch.ncols - 8 * v > 8 ? 8 : ch.ncols - 8 * v);
  A s_dz[8], s_dzx[8];
  BNChannel8<T, A> bc;
  bc.load(a.bn, c, nv);
  RESFAST_UNROLL
  for (int i = 0; i < 8; ++i) {
    s_dz[i] = A(0);
    s_dzx[i] = A(0);
  }
  const T* x = a.x + pos.n * a.xs.n + int64_t(c) * a.xs.c;
  T* out = a.out + pos.n * a.os.n + int64_t(c) * a.os.c;
  const int nleft = int(g.N - pos.n < p.s.S ? g.N - pos.n : p.s.S);
  for (int e = tid; nv > 0 && e < st.M << lu; e += kThreads) {
    const int r = e >> lu;
    int smp, hl, wl;
    if (!tile_pixel<kWhole, kRes>(st, r, int(g.H - pos.h0), int(g.W - pos.w0), nleft, smp, hl, wl)) continue;
    const int64_t h = pos.h0 + hl, w = pos.w0 + wl;
    A xv[8], gz[8];
    load8(x + smp * a.xs.n + h * a.xs.h + w * a.xs.w, a.xs.c, nv, false, xv);
    RESFAST_UNROLL
    for (int i = 0; i < 8; ++i) {
      gz[i] = i < nv ? static_cast<A>(static_cast<T>(relu_backward(c_s[r * p.CS + 8 * v + i], bc.z(i, xv[i])))) : A(0);
      s_dz[i] += gz[i];
      s_dzx[i] += i < nv ? gz[i] * bn_xhat(xv[i], bc.mean[i], bc.invstd[i]) : A(0);
    }
    store8(out + smp * a.os.n + h * a.os.h + w * a.os.w, a.os.c, nv, false, gz);
  }
  RESFAST_UNROLL
  for (int i = 0; i < 8; ++i) {
    red[tid * 16 + i] = s_dz[i];
    red[tid * 16 + 8 + i] = s_dzx[i];
  }
}

// As input_grad_epilogue_general; 16-bit channels_last x and grad_z take 16-byte accesses.
template <bool kWhole, typename T, typename A, bool kRes = false>
RESFAST_HD void input_grad_epilogue(int tid, const ConvArgs<T>& a, const ConvPlan& p, const ChannelRange& ch,
                                    const TilePos& pos, const A* c_s, A* red) {
  if constexpr (IsMmaType<T>::value) {
    const int U = p.ch.bn / 8, lu = log2_pow2(U);
    const int v = tid & (U - 1);
    const int c = ch.col0 + 8 * v;
    if (a.x_vec && a.out_vec && (c & 7) == 0 && 8 * v + 8 <= ch.ncols) {
      const ConvGeom& g = a.g;
      const SpatialTile& st = p.s;
      // the BN map of the 8 channels from the table: z = x * scale + shift, xhat = x * invstd + nb
      float s_dz[8], s_dzx[8], scale[8], shift[8], invstd[8], nb[8];
      const float* q = a.bn_ss + (c >> 3) * 32;
      ldg_f8(q, scale);
      ldg_f8(q + 8, shift);
      ldg_f8(q + 16, invstd);
      ldg_f8(q + 24, nb);
      RESFAST_UNROLL
      for (int i = 0; i < 8; ++i) {
        s_dz[i] = 0.0f;
        s_dzx[i] = 0.0f;
      }
      const T* x = a.x + pos.n * a.xs.n + c;  // xs.c == os.c == 1, in-sample offsets < 2^31
      T* out = a.out + pos.n * a.os.n + c;
      const int xsh = int(a.xs.h), xsw = int(a.xs.w), osh = int(a.os.h), osw = int(a.os.w);
      const int rows = int(g.H) - pos.h0, cols = int(g.W) - pos.w0, end = st.M << lu;
      const A* c_v = c_s + 8 * v;
      // whole-sample tiles: the sample's offset in 64 bits, the in-sample offset in 32
      const int nleft = kWhole ? int(g.N - pos.n < st.S ? g.N - pos.n : st.S) : 1;
      const int64_t xsn = a.xs.n, osn = a.os.n;
      RESFAST_NO_UNROLL
      for (int e = tid; e < end; e += kThreads) {
        const int r = e >> lu;
        int smp = 0, h, w;
        if constexpr (kWhole) {
          whole_pixel(st, r, smp, h, w);
          if (smp >= nleft) continue;
        } else {
          int hl, wl;
          if constexpr (kRes) {
            residue_pixel(st, r, hl, wl);
          } else {
            hl = r >> st.lw;
            wl = r & (st.TW - 1);
          }
          if (hl >= rows || wl >= cols) continue;
          h = pos.h0 + hl;
          w = pos.w0 + wl;
        }
        const Vec16 xq = ld_global16(x + smp * xsn + uint32_t(h * xsh + w * xsw));
        float da[8];
        lds_f8(c_v + r * p.CS, da);
        Vec16 gq;
        RESFAST_UNROLL
        for (int i = 0; i < 4; ++i) {
          float x0, x1, g0, g1;
          unpack2<T>(xq.w[i], x0, x1);
          gq.w[i] = pack2<T>(relu_backward(da[2 * i], x0 * scale[2 * i] + shift[2 * i]),
                             relu_backward(da[2 * i + 1], x1 * scale[2 * i + 1] + shift[2 * i + 1]));
          unpack2<T>(gq.w[i], g0, g1);
          s_dz[2 * i] += g0;
          s_dz[2 * i + 1] += g1;
          s_dzx[2 * i] += g0 * (x0 * invstd[2 * i] + nb[2 * i]);
          s_dzx[2 * i + 1] += g1 * (x1 * invstd[2 * i + 1] + nb[2 * i + 1]);
        }
        st_global16(out + smp * osn + uint32_t(h * osh + w * osw), gq);
      }
      sts_f8(red + tid * 16, s_dz);  // 16-byte stores
      sts_f8(red + tid * 16 + 8, s_dzx);
      return;
    }
  }
  input_grad_epilogue_general<kWhole, T, A, kRes>(tid, a, p, ch, pos, c_s, red);
}

// Per-channel sums of one tile (fixed order: threads v, v + U, ...) -> part[spatial tile][channel].
template <typename T, typename A>
RESFAST_HD void input_grad_tile_sums(int tid, const ConvArgs<T>& a, const ConvPlan& p, const ChannelRange& ch,
                                     int64_t spatial, const A* red) {
  const int bn = p.ch.bn, U = bn / 8;
  if (tid >= 2 * bn) return;
  const int which = tid / bn, j = tid - which * bn;
  if (j >= ch.ncols) return;
  const int v = j / 8, i = j - v * 8;
  A s = A(0);
  for (int t = v; t < kThreads; t += U) s += red[t * 16 + which * 8 + i];
  A* part = which == 0 ? a.part0 : a.part1;
  part[spatial * a.g.C + ch.col0 + j] = s;
}

// ---------------------------------------------------------------------------------------
// Forward and input-gradient blocks

// Shared memory: [weights][staged rows (+ zero row)]; after a tile's K loop the accumulator
// tile (and the input grad's per-thread sums) reuse the staged rows, never the weights.
//
// kWhole: the plan's tiles are whole samples (SpatialTile::S > 0): tile t is samples [t * S,
// t * S + S) from row and col 0, and the input gradient's fragment rows, like the forward's,
// are the same for every tile (computed once per block).
//
// kRes: the input gradient's residue-class tiles (SpatialTile::R).
template <class X, typename T, bool kInputGrad, int NT, bool kWhole = false, bool kRes = false>
RESFAST_HD void conv_block(const X& ex, const ConvArgs<T>& a, const ConvPlan& p, int64_t block, unsigned char* smem) {
  using A = acc_of<T>;
  constexpr bool kMMA = NT > 0;
  constexpr int kNT = NT > 0 ? NT : 2;
  const ConvGeom& g = a.g;
  const ConvBlock b = decode_conv_block(p, g, kInputGrad, block);
  const ChannelRange& ch = b.ch;
  T* w_s = reinterpret_cast<T*>(smem);
  T* stage_s = reinterpret_cast<T*>(smem + p.stage_offset);  // activation (forward) / grad_out (input grad)
  T* zero_s = stage_s + (kWhole ? staged_rows(p.s) : p.s.IH * p.s.IW) * p.PS;  // input grad: one zero row
  A* c_s = reinterpret_cast<A*>(smem + p.stage_offset);      // accumulator tile (after the K loop)
  A* red = reinterpret_cast<A*>(smem + p.red_offset);
  float* fb_s = reinterpret_cast<float*>(smem + p.fb_offset);  // packed blocks' fallback tile
  const bool one_chunk = ch.nk <= p.BK;
  // (packed blocks hold 16 columns: the 4-n8 residue-class kernel, WRN's, never checks)
  const bool check = kMMA && ch.multi && (!kRes || kNT == 2);
  // whole-sample tiles: the staged tensor's offsets over a tile's samples fit 32 bits (the
  // 16-byte staging path)
  [[maybe_unused]] const bool off32 = !kWhole || int64_t(p.s.S) * (kInputGrad ? a.gs.n : a.xs.n) < (int64_t(1) << 31);
  // The forward's BN map of the thread's 8 channels (the 16-byte staging path), loaded once
  // when every tile stages the same channels (one chunk), else per chunk.
  BNScaleShift8 bnc[kMMA && !kInputGrad ? X::kThreadCopies : 1];
  auto load_bnc = [&](int tid, int c, int kc) {
    if constexpr (kMMA && !kInputGrad) {
      const int c0 = staged_channel(tid, ch.k0 + kc, p.BK);
      if ((c0 & 7) == 0 && c0 + 8 <= ch.k0 + ch.nk) bnc[c] = load_bn_ss8(a.bn_ss, c0);
    }
  };
  if (one_chunk) ex.threads([&](int tid, int c) { load_bnc(tid, c, 0); });

  constexpr int kMT = mt_of(kNT, kInputGrad, kWhole);  // m16 tiles a warp
  MmaAcc<X::kLanes, kMT, kNT> acc[kMMA ? X::kWarpCopies : 1];
  MmaRows<X::kLanes, kMT> rows[kMMA ? X::kWarpCopies : 1];
  if constexpr (kMMA && !kInputGrad) {  // the forward's rows depend on the tile shape only
    ex.warps([&](int warp, int lane, int c) {
      forward_rows<X::kLanes, kMT, kWhole>(warp, lane, g, p, stage_s, w_s, rows[c]);
    });
  }
  if constexpr (kMMA && kInputGrad && kWhole) {  // so do the input gradient's, for whole samples
    const int h_lo = fast_div(p.lo_h, p.sh_div) - p.lo_hq, w_lo = fast_div(p.lo_w, p.sw_div) - p.lo_wq;
    ex.warps([&](int warp, int lane, int c) {
      input_grad_rows<X::kLanes, kMT, true>(warp, lane, g, p, 0, 0, h_lo, w_lo, stage_s, zero_s, w_s, rows[c]);
    });
  }
  A sacc[kMMA ? 1 : X::kThreadCopies][kSimtCols];
  for (int t = 0; t < b.ntiles; ++t) {
    const int64_t spatial = b.tile0 + t;
    TilePos pos;
    if constexpr (kWhole) {
      pos.n = spatial * p.s.S;
      pos.h0 = 0;
      pos.w0 = 0;
    } else {
      pos = decode_tile(p.s, spatial);
    }
    // whole-sample tiles: the tile's samples inside the conv
    [[maybe_unused]] const int nleft = kWhole ? int(g.N - pos.n < p.s.S ? g.N - pos.n : p.s.S) : 0;
    // Staged tile origin: forward: the input rows / cols the output tile reads; input grad:
    // the output rows / cols that read the input tile.
    const int h_lo = kInputGrad ? fast_div(pos.h0 + p.lo_h, p.sh_div) - p.lo_hq : pos.h0 * int(g.sh) - int(g.ph);
    const int w_lo = kInputGrad ? fast_div(pos.w0 + p.lo_w, p.sw_div) - p.lo_wq : pos.w0 * int(g.sw) - int(g.pw);
    if constexpr (kMMA) {
      ex.warps([&](int warp, int lane, int c) {
        zero_acc(acc[c]);
        if constexpr (kInputGrad && !kWhole) {
          input_grad_rows<X::kLanes, kMT, false, kRes>(warp, lane, g, p, pos.h0, pos.w0, h_lo, w_lo, stage_s,
                                                                zero_s, w_s, rows[c]);
        }
      });
    } else {
      ex.threads([&](int, int c) {
        for (int j = 0; j < kSimtCols; ++j) sacc[c][j] = A(0);
      });
    }
    bool simt = !kMMA;
    for (int kc = 0; kc < ch.nk; kc += p.BK) {
      ex.sync();  // the previous chunk / tile is no longer read
      bool bad = false;
      ex.threads([&](int tid, int c) {
        const int c0 = ch.k0 + kc, c_end = ch.k0 + ch.nk, rows = p.s.IH * p.s.IW;
        // The source (grad_out for the input grad, x and BN-ReLU for the forward); a packed
        // block also checks what it stages for non-finite values.
        if constexpr (kWhole) {
          if constexpr (kInputGrad) {
            bad |= fill_rows_whole<false>(tid, a.go, a.gs, a.go_vec, a.bn, pos.n, nleft, off32, h_lo, w_lo, p.s, g.Ho,
                                          g.Wo, c0, c_end, p.BK, p.PS, kMMA, check, stage_s);
          } else {
            if (!one_chunk) load_bnc(tid, c, kc);
            bad |= fill_rows_whole<true>(tid, a.x, a.xs, a.x_vec, a.bn, pos.n, nleft, off32, h_lo, w_lo, p.s, g.H, g.W,
                                         c0, c_end, p.BK, p.PS, kMMA, check, stage_s,
                                         kMMA ? &bnc[kMMA ? c : 0] : nullptr);
          }
        } else if constexpr (kInputGrad) {
          bad |= fill_rows<false>(tid, a.go, a.gs, a.go_vec, a.bn, pos.n, h_lo, w_lo, p.s.IH, p.s.IW, p.s.iw_magic,
                                  rows, g.Ho, g.Wo, c0, c_end, p.BK, p.PS, kMMA, check, stage_s);
        } else {
          if (!one_chunk) load_bnc(tid, c, kc);  // each chunk stages other channels
          bad |= fill_rows<true>(tid, a.x, a.xs, a.x_vec, a.bn, pos.n, h_lo, w_lo, p.s.IH, p.s.IW, p.s.iw_magic, rows,
                                 g.H, g.W, c0, c_end, p.BK, p.PS, kMMA, check, stage_s,
                                 kMMA ? &bnc[kMMA ? c : 0] : nullptr);
        }
        if (kInputGrad) fill_zero(tid, zero_s, p.PS);
        if (t == 0 || !one_chunk) fill_weight_tile(tid, a.wp, p, int(g.KH * g.KW), b.jb, kc >> p.lbk, w_s);
      });
      const bool nonfinite = ex.sync_or(bad);
      if (kMMA && !(check && nonfinite)) {
        if constexpr (kMMA) {
          ex.warps([&](int warp, int lane, int c) {
            if constexpr (kRes) {
              conv_mma_chunk<kInputGrad, X::kLanes, T, kNT, false, true>(warp, g, p, rows[c], acc[c]);
            } else if (kInputGrad && g.sh == 1 && g.sw == 1) {
              conv_mma_chunk<kInputGrad, X::kLanes, T, kNT, false>(warp, g, p, rows[c], acc[c]);
            } else {
              conv_mma_chunk<kInputGrad, X::kLanes, T, kNT>(warp, g, p, rows[c], acc[c]);
            }
          });
        }
      } else if constexpr (kMMA) {
        simt = true;  // a packed block holding a non-finite value (one chunk)
        ex.threads([&](int tid, int) {
          packed_block_fallback<kInputGrad, kWhole, T, kRes>(tid, g, p, ch, pos.h0, pos.w0, h_lo, w_lo, stage_s, w_s,
                                                             fb_s);
        });
      } else {
        ex.threads([&](int tid, int c) {
          if constexpr (kInputGrad) {
            input_grad_simt_chunk<kWhole>(tid, g, p, ch, kc, pos.h0, pos.w0, h_lo, w_lo, stage_s, w_s, sacc[c]);
          } else {
            forward_simt_chunk<kWhole>(tid, g, p, ch, kc, stage_s, w_s, sacc[c]);
          }
        });
      }
    }
    ex.sync();  // the staged rows are no longer read: the accumulator tile reuses them
    const A* c_read = c_s;
    if constexpr (kMMA) {
      if (simt) {
        c_read = fb_s;
      } else {
        ex.warps([&](int warp, int lane, int c) { store_acc_tile<X::kLanes, kNT, A, kRes>(warp, lane, p, acc[c], c_s); });
      }
    } else {
      ex.threads([&](int tid, int c) { store_simt_tile(tid, p, sacc[c], c_s); });
    }
    ex.sync();
    if constexpr (kInputGrad) {
      ex.threads([&](int tid, int) { input_grad_epilogue<kWhole, T, A, kRes>(tid, a, p, ch, pos, c_read, red); });
      ex.sync();
      ex.threads([&](int tid, int) { input_grad_tile_sums(tid, a, p, ch, spatial, red); });
    } else {
      ex.threads([&](int tid, int) { forward_epilogue<kWhole>(tid, a, p, ch, pos, c_read); });
    }
  }
}

// ---------------------------------------------------------------------------------------
// Weight gradient: rows = output channels, columns = input channels, K = tile pixels

template <int NL, int UPW>
struct WgradAcc {
  float c[UPW][2][NL][4];
};

// A warp's units (tap, m16 tile, 16-column pair): unit u of warp w is w + kWarps * u =
// ((tap * mtiles) + mt) * npairs + np. Their shared-memory offsets are computed once per block.
// When mtiles * npairs divides kWarps every unit of a warp has the same (mt, np), so the A
// fragment (grad_out, which does not depend on the tap) is loaded once per k16 step; with one
// tap and npairs == kWarps every unit has the warp's np, so the B fragment is (WgradPlan::share).
template <int UPW>
struct WgradUnits {
  int a[UPW], tapnp[UPW];  // A column offset (m16 tile), B row offset (tap) + column pair
  int n;                   // the warp's units
};

// Unit `unit` of a plan: its 16-column pair np, m16 tile mt and tap (powers of two: no divisions).
RESFAST_HD void wgrad_unit(const WgradPlan& p, int unit, int& np, int& mt, int& tap) {
  np = unit & ((1 << p.lnp) - 1);
  const int rest = unit >> p.lnp;
  mt = rest & ((1 << p.lmt) - 1);
  tap = rest >> p.lmt;
}

template <int UPW>
RESFAST_HD WgradUnits<UPW> wgrad_units(int warp, const ConvGeom& g, const WgradPlan& p) {
  WgradUnits<UPW> un;
  RESFAST_UNROLL
  for (int u = 0; u < UPW; ++u) {
    int np, mt, tap;
    wgrad_unit(p, warp + kWarps * u, np, mt, tap);
    const int kh = fast_div(tap, p.kw_div), kw = tap - kh * int(g.KW);
    un.a[u] = mt * 16;
    un.tapnp[u] = (kh * int(g.dh) * p.s.IW + kw * int(g.dw)) * p.PSn + np * 16;
  }
  un.n = (p.units - warp + kWarps - 1) / kWarps;
  return un;
}

// One tile's contribution: for each of the warp's units, over the tile's pixels in k16 steps:
// A = go_s rows (pixels) -> [co][pix] via ldmatrix.trans, B = act_s rows of the pixels shifted
// by the tap -> [pix][ci] via ldmatrix.trans. A pixel outside the output (tile row >=
// rows_valid or col >= cols_valid, or past the tile) has a zero grad_out row, but its
// activation rows may hold a non-finite value (0 * NaN = NaN): its B rows start at the zero
// rows instead, which span every tap's offset.
template <int NL, typename T, int UPW, int kShare>
RESFAST_HD void wgrad_mma_tile(int warp, int lane0, const ConvGeom& g, const WgradPlan& p, int rows_valid,
                               int cols_valid, const T* go_s, const T* act_s, const T* zero_s,
                               const WgradUnits<UPW>& un, WgradAcc<NL, UPW>& acc) {
  const SpatialTile& st = p.s;
  const SmemPtr act = smem_ptr(act_s), zero = smem_ptr(zero_s);
  const int rstride = int(g.sh) * st.IW * p.PSn, cstride = int(g.sw) * p.PSn, astep = 16 * p.PSm;
  SmemPtr arow[NL];
  int lp[NL], bofs[NL];
  for (int s = 0; s < NL; ++s) {
    const int lane = NL == 1 ? lane0 : s;
    arow[s] = smem_ptr(go_s) + (((lane & 7) + (lane >> 4) * 8) * p.PSm + ((lane >> 3) & 1) * 8);
    lp[s] = (lane & 7) + ((lane >> 3) & 1) * 8;
    bofs[s] = (lane >> 4) * 8;
  }
  int aoff = 0;
  RESFAST_NO_UNROLL
  for (int k0 = 0; k0 < st.MP; k0 += 16, aoff += astep) {
    SmemPtr bb[NL];
    for (int s = 0; s < NL; ++s) {
      const int r = k0 + lp[s], rh = r >> st.lw, rc = r & (st.TW - 1);
      const bool outside = rh >= rows_valid || rc >= cols_valid;
      bb[s] = (outside ? zero : act + (rh * rstride + rc * cstride)) + bofs[s];
    }
    uint32_t af[NL][4], bf[NL][4];
    constexpr bool kA = kShare == 1 || kShare == 3, kB = kShare == 2 || kShare == 4;  // shared A / B
    constexpr bool kFull = kShare == 3 || kShare == 4;                               // UPW units
    if constexpr (kA) {
      SmemPtr aaddr[NL];
      for (int s = 0; s < NL; ++s) aaddr[s] = arow[s] + (aoff + un.a[0]);
      ldsm_x4<NL, true>(af, aaddr);
    }
    if constexpr (kB) {
      SmemPtr baddr[NL];
      for (int s = 0; s < NL; ++s) baddr[s] = bb[s] + un.tapnp[0];
      ldsm_x4<NL, true>(bf, baddr);
    }
    RESFAST_UNROLL
    for (int u = 0; u < UPW; ++u) {
      if (kFull || u < un.n) {
        if constexpr (!kA) {
          // B shared (npairs == kWarps, one tap): unit w + kWarps * u is m16 tile u
          const int a_u = kB ? 16 * u : un.a[u];
          SmemPtr aaddr[NL];
          for (int s = 0; s < NL; ++s) aaddr[s] = arow[s] + (aoff + a_u);
          ldsm_x4<NL, true>(af, aaddr);
        }
        if constexpr (!kB) {
          SmemPtr baddr[NL];
          for (int s = 0; s < NL; ++s) baddr[s] = bb[s] + un.tapnp[u];
          ldsm_x4<NL, true>(bf, baddr);
        }
        uint32_t b0[NL][2], b1[NL][2];
        for (int s = 0; s < NL; ++s) {
          b0[s][0] = bf[s][0];
          b0[s][1] = bf[s][1];
          b1[s][0] = bf[s][2];
          b1[s][1] = bf[s][3];
        }
        mma_16816<T, NL>(acc.c[u][0], af, b0);
        mma_16816<T, NL>(acc.c[u][1], af, b1);
      }
    }
  }
}

// The per-split partial weight gradients are laid out [split][co][tap][ci - group * cin_g]
// (input channels innermost: a lane's two adjacent columns are one 8-byte store); the host
// sums the splits and permutes to [Cout][cin_g][KH][KW].
RESFAST_HD int64_t wgrad_part_index(const ConvGeom& g, int co, int tap, int ci_local) {
  return (int64_t(co) * (g.KH * g.KW) + tap) * g.cin_g + ci_local;
}

// ---- finalizing the tiled backward's partial tables (the CPU twin and the CUDA kernels
// ---- call these same functions; the CUDA kernels: conv_input_grad.cu, conv_weight_grad.cu)

// Lanes of the column sums: lane l sums rows l, l + kSumLanes, ... of a column; the lanes
// are then combined by halving (column_sum_combine), the order the CUDA block reduces in.
constexpr int kSumLanes = 16;

// The lane's sum is compensated (Kahan): a lane adds rows / kSumLanes partials, thousands at
// 10^7 positions per channel, and the plain float32 sum lost digits there (the BN bias gradient
// 0.05 off at 1024 x 1 x 100 x 100, 18x the float64 rule). The compensation is kept only while
// the sum is finite (u - u == 0), so an Inf or NaN partial gives the plain sum's Inf / NaN.
template <typename acc_t>
RESFAST_HD acc_t column_lane_sum(const acc_t* t, int64_t rows, int64_t C, int64_t c, int lane) {
  acc_t s = acc_t(0), comp = acc_t(0);
  for (int64_t r = lane; r < rows; r += kSumLanes) {
    const acc_t y = t[r * C + c] - comp;
    const acc_t u = s + y;
    comp = (u - u == acc_t(0)) ? (u - s) - y : acc_t(0);
    s = u;
  }
  return s;
}

// v[0..kSumLanes) -> their sum in v[0], by halving: v[i] += v[i + half] for half = 8, 4, 2, 1.
template <typename acc_t>
RESFAST_HD void column_sum_combine(acc_t* v) {
  for (int half = kSumLanes / 2; half > 0; half >>= 1) {
    for (int i = 0; i < half; ++i) v[i] += v[i + half];
  }
}

// Element i of the weight gradient [Cout, cin_g, KH, KW] (row-major) from the split partials
// [split][co][tap][ci] (wgrad_part_index), summed over the splits in order.
template <typename acc_t>
RESFAST_HD acc_t wgrad_finalize_element(const acc_t* part, int64_t splits, const ConvGeom& g, int64_t i) {
  const int64_t nw = int64_t(g.Cout) * g.cin_g * g.KH * g.KW;
  const int64_t kw = i % g.KW;
  int64_t r = i / g.KW;
  const int64_t kh = r % g.KH;
  r /= g.KH;
  const int64_t ci = r % g.cin_g, co = r / g.cin_g;
  const int64_t j = wgrad_part_index(g, static_cast<int>(co), static_cast<int>(kh * g.KW + kw), static_cast<int>(ci));
  acc_t s = acc_t(0);
  for (int64_t sp = 0; sp < splits; ++sp) s += part[sp * nw + j];
  return s;
}

// Writes the warp's units to part[split] for the (co, ci) pairs of one group (a block of one
// group: every pair; a packed block: the diagonal blocks). 32-bit offsets within a split (the
// planner refuses weights of 2^31 elements or more).
// A-shared kernels (kShare 1, 3): a warp's units have one (m16 tile, column pair) and taps
// tap0 + u * (kWarps / (mtiles * npairs)), so the rows, columns and their tests are the same for
// all of them (computed once) and unit u's elements sit u * tap step * cin_g further.
template <int NL, typename T, int UPW, int kShare = 0>
RESFAST_HD void wgrad_mma_store(int warp, int lane0, const ConvArgs<T>& a, const WgradPlan& p, const WgradBlock& b,
                                const WgradAcc<NL, UPW>& acc) {
  using A = acc_of<T>;
  constexpr bool kA = kShare == 1 || kShare == 3;
  const ConvGeom& g = a.g;
  const int cin_g = int(g.cin_g), ld_co = int(g.KH * g.KW) * cin_g;
  const int64_t nw = g.Cout * g.cin_g * g.KH * g.KW;
  const int nunits = (p.units - warp + kWarps - 1) / kWarps;
  const int g0 = fast_div(b.co0, p.cout_div);  // the block's (first) group
  const int ustride = kA ? (kWarps >> (p.lnp + p.lmt)) * cin_g : 0;  // kA: elements from unit u to u + 1
  A* part = a.part0 + b.split * nw;
  for (int s = 0; s < NL; ++s) {
    const int lane = NL == 1 ? lane0 : s;
    const int gq = lane >> 2, t = lane & 3;
    int np = 0, mt = 0, tap = 0;
    A* dst[2] = {part, part};
    bool ok[2][2][2] = {};
    RESFAST_UNROLL
    for (int u = 0; u < UPW; ++u) {
      if (u >= nunits) break;
      if (!kA || u == 0) {
        wgrad_unit(p, warp + kWarps * u, np, mt, tap);
        const int c0 = np * 16 + 2 * t;  // the lane's first column
        RESFAST_UNROLL
        for (int rr = 0; rr < 2; ++rr) {
          const int row = mt * 16 + gq + rr * 8, co = b.co0 + row;
          const int grp = b.multi ? fast_div(co, p.cout_div) : g0;
          const int cl0 = b.ci0 - grp * cin_g;  // local input channel of column 0
          // the row's columns: [lo, hi) = [0, ncols) within the row's group (none past nrows)
          const int lo = cl0 < 0 ? -cl0 : 0;
          int hi = cin_g - cl0 < b.ncols ? cin_g - cl0 : b.ncols;
          hi = row < b.nrows ? hi : lo;
          dst[rr] = part + (co * ld_co + tap * cin_g + cl0 + c0);
          RESFAST_UNROLL
          for (int half = 0; half < 2; ++half) {
            RESFAST_UNROLL
            for (int j = 0; j < 2; ++j) ok[rr][half][j] = uint32_t(c0 + half * 8 + j - lo) < uint32_t(hi - lo);
          }
        }
      }
      RESFAST_UNROLL
      for (int rr = 0; rr < 2; ++rr) {
        A* d = dst[rr] + (kA ? u * ustride : 0);
        RESFAST_UNROLL
        for (int half = 0; half < 2; ++half) {
          RESFAST_UNROLL
          for (int j = 0; j < 2; ++j) {
            if (ok[rr][half][j]) d[half * 8 + j] = A(acc.c[u][half][s][2 * rr + j]);
          }
        }
      }
    }
  }
}

// SIMT: thread tid accumulates the block's elements e = tid + kThreads * i, e = (tap * bm + m) * bn + n.
template <typename T, typename A>
RESFAST_HD void wgrad_simt_tile(int tid, const ConvGeom& g, const WgradPlan& p, int oh0, int ow0, const T* go_s,
                                const T* act_s, A (&acc)[kSimtWgrad]) {
  const SpatialTile& st = p.s;
  int goff[kSimtWgrad], aoff[kSimtWgrad];
  RESFAST_UNROLL
  for (int i = 0; i < kSimtWgrad; ++i) {
    const int e = tid + kThreads * i;
    const int n = e % p.bn, rest = e / p.bn;
    const int m = rest % p.bm, tap = rest / p.bm;
    const int kh = tap / int(g.KW), kw = tap - kh * int(g.KW);
    const bool ok = i < p.upw && e < p.units;
    goff[i] = ok ? m : -1;
    aoff[i] = (kh * int(g.dh) * st.IW + kw * int(g.dw)) * p.PSn + n;
  }
  for (int r = 0; r < st.M; ++r) {
    const int oh_l = r >> st.lw, ow_l = r & (st.TW - 1);
    if (oh0 + oh_l >= g.Ho || ow0 + ow_l >= g.Wo) continue;
    const T* gp = go_s + r * p.PSm;
    const T* ap = act_s + (oh_l * int(g.sh) * st.IW + ow_l * int(g.sw)) * p.PSn;
    RESFAST_UNROLL
    for (int i = 0; i < kSimtWgrad; ++i) {
      if (goff[i] >= 0) acc[i] += static_cast<A>(gp[goff[i]]) * static_cast<A>(ap[aoff[i]]);
    }
  }
}

template <typename T, typename A>
RESFAST_HD void wgrad_simt_store(int tid, const ConvArgs<T>& a, const WgradPlan& p, const WgradBlock& b,
                                 const A (&acc)[kSimtWgrad]) {
  const ConvGeom& g = a.g;
  const int taps = int(g.KH * g.KW), cin_g = int(g.cin_g), cout_g = int(g.cout_g);
  const int64_t nw = g.Cout * g.cin_g * taps;
  for (int i = 0; i < kSimtWgrad && i < p.upw; ++i) {
    const int e = tid + kThreads * i;
    if (e >= p.units) break;
    const int n = e % p.bn, rest = e / p.bn;
    const int m = rest % p.bm, tap = rest / p.bm;
    if (m >= b.nrows || n >= b.ncols) continue;
    const int co = b.co0 + m, ci = b.ci0 + n;
    const int grp = co / cout_g;
    if (ci / cin_g != grp) continue;
    a.part0[b.split * nw + wgrad_part_index(g, co, tap, ci - grp * cin_g)] = acc[i];
  }
}

// UPW: units per warp (tensor cores; 0 = SIMT). kShare: every unit of a warp has the same A
// (1; 3: and every warp has UPW units) or B (2; 4: and every warp has UPW units) fragment,
// which the plan knows (WgradPlan::share).
template <class X, typename T, int UPW, int kShare>
RESFAST_HD void wgrad_block(const X& ex, const ConvArgs<T>& a, const WgradPlan& p, int64_t block,
                            unsigned char* smem) {
  using A = acc_of<T>;
  constexpr bool kMMA = UPW > 0;
  constexpr int kUPW = UPW > 0 ? UPW : 1;
  const ConvGeom& g = a.g;
  const WgradBlock b = decode_wgrad_block(p, g, block);
  T* go_s = reinterpret_cast<T*>(smem);
  T* act_s = reinterpret_cast<T*>(smem + align16(int64_t(p.go_elems) * sizeof(T)));
  T* zero_s = act_s + p.s.IH * p.s.IW * p.PSn;
  WgradAcc<X::kLanes, kUPW> acc[kMMA ? X::kWarpCopies : 1];
  A sacc[kMMA ? 1 : X::kThreadCopies][kSimtWgrad];
  if constexpr (kMMA) {
    ex.warps([&](int, int, int c) {
      for (int u = 0; u < kUPW; ++u)
        for (int h = 0; h < 2; ++h)
          for (int s = 0; s < X::kLanes; ++s)
            for (int i = 0; i < 4; ++i) acc[c].c[u][h][s][i] = 0.0f;
    });
  } else {
    ex.threads([&](int, int c) {
      for (int i = 0; i < kSimtWgrad; ++i) sacc[c][i] = A(0);
    });
  }
  ex.threads([&](int tid, int) { fill_zero(tid, zero_s, p.zero_rows * p.PSn); });
  WgradUnits<kUPW> units[kMMA ? X::kWarpCopies : 1];
  BNScaleShift8 bnc[kMMA ? X::kThreadCopies : 1];  // the staged activation's BN map, for every tile
  if constexpr (kMMA) {
    ex.warps([&](int warp, int, int c) { units[c] = wgrad_units<kUPW>(warp, g, p); });
    ex.threads([&](int tid, int c) {
      const int c0 = staged_channel(tid, b.ci0, p.bn), left = b.ci0 + b.ncols - c0;
      bnc[c] = bn_scale_shift(a.bn, c0, left < 0 ? 0 : (left > 8 ? 8 : left));
    });
  }
  for (int64_t item = b.split; item < p.items; item += p.splits) {
    const TilePos pos = decode_tile(p.s, item);
    ex.sync();  // the previous tile is no longer read
    ex.threads([&](int tid, int c) {
      // grad_out rows = tile pixels (TW wide, so p / TW is the tile row)
      fill_rows<false>(tid, a.go, a.gs, a.go_vec, a.bn, pos.n, pos.h0, pos.w0, p.s.TH, p.s.TW,
                       1u << (32 - p.s.lw), p.s.MP, g.Ho, g.Wo, b.co0, b.co0 + b.nrows, p.bm, p.PSm, kMMA, false,
                       go_s);
      fill_rows<true>(tid, a.x, a.xs, a.x_vec, a.bn, pos.n, pos.h0 * int(g.sh) - int(g.ph),
                      pos.w0 * int(g.sw) - int(g.pw), p.s.IH, p.s.IW, p.s.iw_magic, p.s.IH * p.s.IW, g.H, g.W, b.ci0,
                      b.ci0 + b.ncols, p.bn, p.PSn, kMMA, false, act_s, kMMA ? &bnc[kMMA ? c : 0] : nullptr);
    });
    ex.sync();
    if constexpr (kMMA) {
      // the tile's pixels inside the output (rows past the tile count as outside: rh >= TH)
      const int rows_valid = int(g.Ho) - pos.h0 < p.s.TH ? int(g.Ho) - pos.h0 : p.s.TH;
      const int cols_valid = int(g.Wo) - pos.w0;
      ex.warps([&](int warp, int lane, int c) {
        wgrad_mma_tile<X::kLanes, T, kUPW, kShare>(warp, lane, g, p, rows_valid, cols_valid, go_s, act_s, zero_s,
                                                      units[c], acc[c]);
      });
    } else {
      ex.threads([&](int tid, int c) { wgrad_simt_tile(tid, g, p, pos.h0, pos.w0, go_s, act_s, sacc[c]); });
    }
  }
  if constexpr (kMMA) {
    ex.warps([&](int warp, int lane, int c) {
      wgrad_mma_store<X::kLanes, T, kUPW, kShare>(warp, lane, a, p, b, acc[c]);
    });
  } else {
    ex.threads([&](int tid, int c) { wgrad_simt_store(tid, a, p, b, sacc[c]); });
  }
}

}  // namespace resfast
