// Probe of the tiled conv kernels for the static performance model
// (resfast/profiling/static_native.py); not part of the extension (setup.py builds csrc/*.cpp,
// csrc/cpu/*.cpp and csrc/cuda/*.cu only).
//
// nvcc compiles this file into a host program that embeds the sm_90 code of the bfloat16
// tensor-core kernels (the model reads their SASS with cuobjdump). Run with a conv geometry
// it prints, as one JSON object, the plans the CUDA host code launches for it: the same
// tiles.h functions, so the model's grid, tiles and trip counts are the kernels' own. It runs
// no GPU code.
//
//   static_probe N C H W C_out KH KW stride_h stride_w pad_h pad_w dil_h dil_w groups [target_blocks [whole [residue]]]
//
// target_blocks (default kTargetBlocks) and whole (make_conv_plan's: 0 weighs whole-sample
// tiles, 1 never, 2 forced) are what RESFAST_NATIVE_TARGET_BLOCKS and
// RESFAST_NATIVE_WHOLE_SAMPLES give the host code, residue (make_conv_plan's: 0 weighs
// residue-class tiles, 1 never, 2 forced) RESFAST_NATIVE_RESIDUE_TILES (the tests ask which
// tiles a case takes).
#include <cstdio>
#include <cstdlib>

#include "../cuda/conv_kernels.cuh"

namespace resfast {

template __global__ void conv_tile_kernel<c10::BFloat16, false, 2, false, false>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, false, 4, false, false>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, false, 8, false, false>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, true, 2, false, false>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, true, 4, false, false>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, true, 8, false, false>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, false, 2, true, false>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, false, 4, true, false>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, true, 2, true, false>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, true, 4, true, false>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, true, 8, true, false>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, true, 2, false, true>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void conv_tile_kernel<c10::BFloat16, true, 4, false, true>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ ConvPlan);
template __global__ void wgrad_tile_kernel<c10::BFloat16, kWgradUpwSmall, 0>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ WgradPlan);
template __global__ void wgrad_tile_kernel<c10::BFloat16, kWgradUpwSmall, 1>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ WgradPlan);
template __global__ void wgrad_tile_kernel<c10::BFloat16, kWgradUpwLarge, 0>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ WgradPlan);
template __global__ void wgrad_tile_kernel<c10::BFloat16, kWgradUpwLarge, 1>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ WgradPlan);
template __global__ void wgrad_tile_kernel<c10::BFloat16, kWgradUpwLarge, 2>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ WgradPlan);
template __global__ void wgrad_tile_kernel<c10::BFloat16, kWgradUpwLarge, 3>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ WgradPlan);
template __global__ void wgrad_tile_kernel<c10::BFloat16, kWgradUpwFullB, 4>(
    const __grid_constant__ ConvArgs<c10::BFloat16>, const __grid_constant__ WgradPlan);

namespace {

void print_tile(const SpatialTile& s) {
  std::printf("\"tile\": {\"TH\": %d, \"TW\": %d, \"M\": %d, \"MP\": %d, \"IH\": %d, \"IW\": %d, \"tiles_h\": %lld, "
              "\"tiles_w\": %lld, \"S\": %d, \"staged\": %d, \"R\": %d, \"cmt\": %d}",
              s.TH, s.TW, s.M, s.MP, s.IH, s.IW, static_cast<long long>(s.tiles_h), static_cast<long long>(s.tiles_w), s.S,
              staged_rows(s), s.R, s.cmt);
}

void print_conv(const char* name, const ConvPlan& p) {
  std::printf("\"%s\": {\"ok\": %s, ", name, p.ok ? "true" : "false");
  print_tile(p.s);
  std::printf(", \"P\": %d, \"bn\": %d, \"bpg\": %d, \"cblocks\": %lld, \"BK\": %d, \"PS\": %d, \"CS\": %d, "
              "\"smem_bytes\": %d, \"nt\": %d, \"tpb\": %d, \"spatial\": %lld, \"blocks\": %lld}",
              p.ch.P, p.ch.bn, p.ch.bpg, static_cast<long long>(p.ch.blocks), p.BK, p.PS, p.CS, p.smem_bytes, p.nt,
              p.tpb, static_cast<long long>(p.spatial), static_cast<long long>(p.blocks));
}

void print_wgrad(const char* name, const WgradPlan& p) {
  std::printf("\"%s\": {\"ok\": %s, ", name, p.ok ? "true" : "false");
  print_tile(p.s);
  std::printf(", \"P\": %d, \"bm\": %d, \"bn\": %d, \"bpg_m\": %d, \"bpg_n\": %d, \"PSm\": %d, \"PSn\": %d, "
              "\"units\": %d, \"upw\": %d, \"a_shared\": %s, \"share\": %d, \"smem_bytes\": %d, \"cblocks\": %lld, "
              "\"splits\": %lld, "
              "\"items\": %lld, "
              "\"blocks\": %lld}",
              p.P, p.bm, p.bn, p.bpg_m, p.bpg_n, p.PSm, p.PSn, p.units, p.upw, p.a_shared ? "true" : "false", p.share,
              p.smem_bytes,
              static_cast<long long>(p.cblocks), static_cast<long long>(p.splits), static_cast<long long>(p.items),
              static_cast<long long>(p.cblocks * p.splits));
}

}  // namespace
}  // namespace resfast

int main(int argc, char** argv) {
  using namespace resfast;
  if (argc < 15 || argc > 18) {
    std::fprintf(stderr, "usage: %s N C H W C_out KH KW stride_h stride_w pad_h pad_w dil_h dil_w groups "
                 "[target_blocks [whole [residue]]]\n", argv[0]);
    return 2;
  }
  const int64_t target = argc > 15 ? std::atoll(argv[15]) : kTargetBlocks;
  const int whole = argc > 16 ? std::atoi(argv[16]) : 0;
  const int residue = argc > 17 ? std::atoi(argv[17]) : 0;
  int64_t v[14];
  for (int i = 0; i < 14; ++i) v[i] = std::atoll(argv[i + 1]);
  ConvGeom g{};
  g.N = v[0];
  g.C = v[1];
  g.H = v[2];
  g.W = v[3];
  g.Cout = v[4];
  g.KH = v[5];
  g.KW = v[6];
  g.sh = v[7];
  g.sw = v[8];
  g.ph = v[9];
  g.pw = v[10];
  g.dh = v[11];
  g.dw = v[12];
  g.groups = v[13];
  g.cin_g = g.C / g.groups;
  g.cout_g = g.Cout / g.groups;
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  // bfloat16 operands, float32 accumulation: what the CUDA host code plans for them.
  const ConvPlan fwd = make_conv_plan(g, false, true, 2, 4, target, whole, residue);
  const ConvPlan igrad = make_conv_plan(g, true, true, 2, 4, target, whole, residue);
  const WgradPlan wgrad = make_wgrad_plan(g, true, 2, 4, kWgradTargetBlocks, kWgradUpwLarge);
  std::printf("{\"Ho\": %lld, \"Wo\": %lld, \"threads\": %d, \"warps\": %d, \"wgrad_upw_small\": %d, "
              "\"wgrad_upw_large\": %d, ",
              static_cast<long long>(g.Ho), static_cast<long long>(g.Wo), kThreads, kWarps, kWgradUpwSmall,
              kWgradUpwLarge);
  print_conv("forward", fwd);
  std::printf(", ");
  print_conv("input_grad", igrad);
  std::printf(", ");
  print_wgrad("weight_grad", wgrad);
  std::printf("}\n");
  return 0;
}
