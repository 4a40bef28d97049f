"""The static model of the native CUDA kernels (``resfast.profiling.static_native``): the tiled
conv kernels compiled for sm_90 with nvcc and read from their SASS, on a subset of the shape
set. The figures asserted are static facts of the compiled code (tensor-core instructions, no
spills, the record format, the roofline arithmetic), never a time.
"""
from __future__ import annotations

import math

import pytest

from resfast.profiling import static_native as sn

KEYS = {"backend", "shape", "kernel", "phase", "config", "regs", "spills", "smem_bytes", "occupancy", "mma",
        "issue_us", "mma_us", "floor_us", "predicted_us"}
SUBSET = ["resnext50_s1", "resnext50_s4", "densenet121_1x1_b2"]


@pytest.fixture(scope="module")
def records():
    try:
        return sn.native_kernels(SUBSET)
    except sn.NativeModelUnavailable as exc:
        pytest.skip(f"the native static model cannot compile the kernels here: {exc}")


def test_records_cover_each_kernel_of_each_shape(records):
    assert {(r["shape"], r["kernel"]) for r in records} == {(s, k) for s in SUBSET for k in sn.KERNELS}
    for r in records:
        assert set(r) == KEYS, r
        assert r["backend"] == "native"


def test_every_conv_kernel_runs_on_tensor_cores_without_spills(records):
    for r in records:
        assert r["mma"] in ("mma.sync", "wgmma"), r
        assert r["spills"] == 0, r
        assert 0 < r["regs"] <= 255, r
        # up to 72 KiB (the opt-in), which keeps the 3 blocks per SM the register cap allows
        assert 0 < r["smem_bytes"] <= 72 * 1024, r
        assert 0 < r["occupancy"] <= 1, r
        if r["kernel"] != "weight_grad":
            assert r["occupancy"] >= 12 / 64, r


def test_prediction_is_the_roofline_of_issue_mma_and_floor(records):
    for r in records:
        assert r["issue_us"] > 0 and r["mma_us"] > 0 and r["floor_us"] > 0, r
        assert r["predicted_us"] == pytest.approx(max(r["issue_us"], r["mma_us"], r["floor_us"]), abs=0.01), r
        assert r["phase"] == ("fwd" if r["kernel"] == "forward" else "bwd"), r


def test_hbm_floor_counts_each_tensor_once(records):
    # ResNeXt-50 stage 1 forward, bf16: x and y of 64 x 128 x 56 x 56, weights 128 x 4 x 3 x 3.
    fwd = next(r for r in records if r["shape"] == "resnext50_s1" and r["kernel"] == "forward")
    nbytes = 2 * (2 * 64 * 128 * 56 * 56 + 128 * 4 * 9)
    assert fwd["floor_us"] == pytest.approx(nbytes / 3.35e12 * 1e6, abs=0.01)


def test_wrn_stride2_input_gradient_runs_a_quarter_of_the_taps():
    # WRN-28-10's stride-2 stage-3 conv (batch 128, 320 -> 640, 16x16 -> 8x8): residue-class tiles
    # run each tap on the one pixel class it reaches, so the busiest SM's HMMAs are those of the
    # forward (PREDICTED 65.64 us; 262.56 when every tap ran on every pixel, reading zero rows).
    from resfast.profiling.sm90 import SHAPES

    try:
        recs = {r["kernel"]: r for r in sn.native_kernels({"wrn28_10_s3_down": SHAPES["wrn28_10_s3_down"]})}
    except sn.NativeModelUnavailable as exc:
        pytest.skip(f"the native static model cannot compile the kernels here: {exc}")
    ig, fwd = recs["input_grad"], recs["forward"]
    assert "residue-class" in ig["config"] and ig["spills"] == 0, ig
    assert ig["mma_us"] == pytest.approx(fwd["mma_us"], rel=0.01), (ig, fwd)
    assert ig["predicted_us"] < 100, ig
    # its weight gradient's 200 channel blocks take 3 splits (600 blocks: the last wave fuller)
    assert "200 channel blocks x 3 splits" in recs["weight_grad"]["config"], recs["weight_grad"]


@pytest.mark.parametrize("name, groups_a_block", [("resnext50_s2_down", 2), ("resnext50_s3_down", 1)])
def test_resnext_stride2_input_gradients_take_residue_class_tiles(name, groups_a_block):
    # ResNeXt-50's stride-2 grouped 3x3 convs (8 / 16 channels a group: 2 n8 tiles, the first
    # packed two groups a block): residue-class tiles run each tap on the class it reaches where
    # the zero-row select loop ran all 9 taps on every pixel. PREDICTED 107.18 -> 81.35 us
    # (1.55x -> 1.18x of the HBM floor) and 60.55 -> 45.85 us (1.75x -> 1.33x).
    from resfast.profiling.sm90 import SHAPES

    try:
        ig = next(r for r in sn.native_kernels({name: SHAPES[name]}) if r["kernel"] == "input_grad")
    except sn.NativeModelUnavailable as exc:
        pytest.skip(f"the native static model cannot compile the kernels here: {exc}")
    assert "nt=2: residue-class" in ig["config"] and f"{groups_a_block} group(s) per block" in ig["config"], ig
    assert ig["spills"] == 0 and ig["occupancy"] >= 12 / 64, ig
    assert ig["predicted_us"] <= 1.4 * ig["floor_us"], ig


def test_resnext_stage4_forward_within_twice_its_floor(records):
    # ResNeXt-50 stage 4's forward (7x7): whole-sample tiles of 2 samples x 32 columns (4 n8 and
    # 2 m16 tiles a warp), 2 a block: PREDICTED 9.36 -> 7.43 us, 2.33x -> 1.85x of its HBM floor.
    fwd = next(r for r in records if r["shape"] == "resnext50_s4" and r["kernel"] == "forward")
    assert "nt=4: tile of 2 whole sample(s)" in fwd["config"] and fwd["spills"] == 0, fwd
    assert fwd["predicted_us"] <= 2 * fwd["floor_us"], fwd


def test_densenet_block4_1x1_forward_within_twice_its_floor():
    # DenseNet-121's block-4 1x1 forward (batch 64, 992 -> 128 channels, 7x7): K in 4 chunks of
    # 256 channels (8 of 128 before): PREDICTED 4.41 -> 3.89 us, 2.03x -> 1.79x of its HBM floor.
    from resfast.profiling.sm90 import SHAPES

    try:
        recs = {r["kernel"]: r for r in sn.native_kernels({"densenet121_1x1_b4": SHAPES["densenet121_1x1_b4"]})}
    except sn.NativeModelUnavailable as exc:
        pytest.skip(f"the native static model cannot compile the kernels here: {exc}")
    fwd = recs["forward"]
    assert "BK=256" in fwd["config"] and fwd["spills"] == 0 and fwd["mma"] == "mma.sync", fwd
    assert fwd["predicted_us"] <= 2 * fwd["floor_us"], fwd


def test_unknown_shape_is_refused():
    with pytest.raises(KeyError, match="unknown shape"):
        sn.native_kernels(["resnext50_s9"])


def test_shapes_of_the_triton_model_are_accepted(records):
    # resfast.profiling.static_model passes its own shape objects (padding None: k // 2).
    class Shape:
        name, n, c, h, w, co, k, stride, groups, padding = "resnext50_s1", 64, 128, 56, 56, 128, 3, 1, 32, None

    got = sn.native_kernels([Shape()])
    same = [r for r in records if r["shape"] == "resnext50_s1"]
    assert [(r["kernel"], r["predicted_us"]) for r in got] == [(r["kernel"], r["predicted_us"]) for r in same]


SASS = """
        Function : _Z6kernelv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   LDS.128 R4, [R0] ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0040*/                   HMMA.16816.F32.BF16 R12, R4, R6, R12 ;
        /*0050*/               @P0 BRA 0x20 ;
        /*0060*/                   STG.E.128 [R2.64], R8 ;
        /*0070*/               @P1 BRA 0x20 ;
        /*0080*/                   EXIT ;
"""


def test_sass_loops_nest_by_backward_branch():
    f = sn._parse_sass(SASS)["_Z6kernelv"]
    assert len(f.instrs) == 9
    loops = sn._loops(f)
    # both branches go back to 0x20: one loop from 0x20 to the last of them
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0x70)]
    assert loops[0].count("HMMA") == 2 and loops[0].count("STG") == 1
    assert sn._classify(loops[0]) == ("hmma", 2)


def test_an_mma_loop_reading_constant_memory_is_the_select_loop():
    # the strided input gradient's zero-row select loop reads its per-tap row tables with LDC
    text = SASS.replace("LDS.128 R4, [R0] ;", "LDC R3, c[0x0][R0+0x210] ;")
    f = sn._parse_sass(text)["_Z6kernelv"]
    assert sn._classify(sn._loops(f)[0]) == ("hmma_select", 2)


@pytest.mark.parametrize("stride", [1, 3])
def test_input_gradient_counts_only_the_mma_loop_its_stride_runs(stride):
    # The input-gradient kernel holds two MMA loops (the zero-row select loop of strided convs,
    # the unit-stride loop): the model charges the block's HMMAs at the cost of the one it runs.
    # (A ResNeXt-like grouped 3x3; stride 3 because stride 2 takes residue-class tiles, whose
    # kernel has one MMA loop.)
    from resfast.profiling.sm90 import ConvShape

    s = ConvShape(f"grouped_s{stride}", 64, 128, 42, 42, 128, 3, stride, 32)
    try:
        probe = sn._probe()
        plans = probe.plans(s)
    except sn.NativeModelUnavailable as exc:
        pytest.skip(f"the native static model cannot compile the kernels here: {exc}")
    plan = plans["input_grad"]
    f = probe.kernel("input_grad", plan)
    kinds = [sn._classify(lp)[0] for lp in sn._loops(f)]
    assert kinds.count("hmma") == 1 and kinds.count("hmma_select") == 1, kinds
    parts = sn._block_instructions(f, s, "input_grad", plan, plans)
    ran, idle = ("hmma", "hmma_select") if stride == 1 else ("hmma_select", "hmma")
    assert parts[ran] > 0 and parts[idle] == 0, parts
    assert parts["hmma_count"] > 0


def test_occupancy_from_registers_and_shared_memory():
    # 128 threads: 128 registers -> 4 blocks of 4 warps (16 / 64); 48 KiB of shared memory -> 4 blocks.
    assert sn._occupancy(128, 1024, 128) == pytest.approx(16 / 64)
    assert sn._occupancy(64, 48 * 1024, 128) == pytest.approx(16 / 64)
    assert math.isclose(sn._occupancy(32, 1024, 128), 1.0)
