"""The static sm_90 performance model (``resfast profile --static``): the CI subset compiles
for sm_90 without a GPU, and its static figures (which do not depend on machine load) meet
the design's targets: tensor-core MMA in every conv kernel, no spills, 3 launches forward and
at most 4 backward. Also the model's pure parts: SASS loop parsing, byte floors, occupancy."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from resfast.profiling import static_model as sm


def _run_model(*args: str):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "resfast", "profile", "--static", *args], env=env,
                          capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def ci_report():
    pytest.importorskip("triton")
    run = _run_model("--shapes", "ci", "--first-config", "--json")
    if run.returncode != 0 and ("not found" in run.stderr or "FileNotFoundError" in run.stderr):
        pytest.skip(f"triton's NVIDIA tools are not available here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)  # exactly one JSON document on stdout


def test_report_schema(ci_report):
    keys = {"shape", "kernel", "config", "regs", "spills", "smem_bytes", "occupancy", "mma", "issue_us", "floor_us",
            "predicted_us", "backend"}
    assert {k["shape"] for k in ci_report["kernels"]} == set(sm.CI_SHAPES)
    for k in ci_report["kernels"]:
        assert keys <= set(k), sorted(keys - set(k))
        assert k["mma"] in ("wgmma", "mma.sync", "none")
        assert k["predicted_us"] >= max(k["issue_us"], k["floor_us"]) - 1e-6
        assert "error" not in k or k["error"] is None, k
    for op in ci_report["ops"]:
        assert {"shape", "fused_us", "eager_floor_us", "ratio"} <= set(op)
        assert op["ratio"] == pytest.approx(op["eager_floor_us"] / op["fused_us"], rel=1e-2)


def test_static_targets(ci_report):
    """Every conv kernel on tensor cores (4-channel groups included), zero spills, and the
    launch counts of a training call."""
    for k in ci_report["kernels"]:
        if k["kernel"] in ("conv_fwd", "conv_bwd", "conv_bwd_input", "conv_bwd_weight"):
            assert k["mma"] in ("wgmma", "mma.sync"), k
        assert k["spills"] == 0, k
    for op in ci_report["ops"]:
        assert op["launches_fwd"] == 3, op
        assert op["launches_bwd"] <= 4, op


# Shapes whose kernels cover every code path: packed 4-channel groups, the stride-2 residue-class
# backward, WRN's wide-group kernels, the flat 1x1 conv, DenseNet's split backward.
DEVICE_SHAPES = "resnext50_s1,resnext50_s2_down,wrn28_10_s2_down,densenet121_1x1,densenet121_3x3_b3"
CONV_KERNELS = ("conv_fwd", "conv_bwd", "conv_bwd_input", "conv_bwd_weight")


def test_kernels_compile_with_the_gpu_machines_triton():
    """Every tile config of every kernel of :data:`DEVICE_SHAPES` compiles for sm_90 with the
    triton of the GPU machine that benchmarks/gpu_check.sh runs on (``make test`` installs it
    beside the venv's newer triton): no compile error, tensor-core MMA in every conv kernel's
    every config, and a spill-free config for every kernel. The autotuner there compiles every config, so one a newer triton alone accepts
    would fail there first."""
    path, want = os.environ.get("RESFAST_DEVICE_TRITON"), os.environ.get("RESFAST_DEVICE_TRITON_VERSION")
    if not path or not os.path.isdir(os.path.join(path, "triton")):
        pytest.skip("the GPU machine's triton is not given here (`make test-device-triton` installs it into "
                    ".venv/device-triton-<version> and sets RESFAST_DEVICE_TRITON)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([path, os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    run = subprocess.run([sys.executable, "-m", "resfast", "profile", "--static", "--shapes", DEVICE_SHAPES,
                          "--json"], env=env, capture_output=True, text=True, timeout=1500)
    if run.returncode != 0 and ("not found" in run.stderr or "FileNotFoundError" in run.stderr):
        pytest.skip(f"triton's NVIDIA tools are not available here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(run.stdout)
    assert doc["model"]["triton"] == want, (doc["model"]["triton"], want)
    triton_kernels = [k for k in doc["kernels"] if k["backend"] == "triton"]
    assert {k["shape"] for k in triton_kernels} == set(DEVICE_SHAPES.split(","))
    for k in triton_kernels:
        assert k["configs"], k
        for c in k["configs"]:
            assert c["error"] is None, (k["shape"], k["kernel"], c["config"], c["error"])
            if k["kernel"] in CONV_KERNELS:
                assert c["mma"] == "wgmma", (k["shape"], k["kernel"], c["config"], c["mma"])
        assert k["spills"] == 0, k  # the config the model takes (some others spill, as with the newer triton)


def test_eager_and_fused_floors():
    s = sm.SHAPES["resnext50_s1"]
    x = 64 * 128 * 56 * 56 * 2
    wb = 128 * 4 * 9 * 2
    eager, fused = sm.eager_floor_bytes(s), sm.fused_floor_bytes(s)
    assert eager["total"] == 16 * x + 3 * x + 3 * wb  # y is as large as x at stride 1
    assert fused["total"] == 7 * x + 2 * x
    down = sm.SHAPES["resnext50_s2_down"]
    assert down.out_hw == (28, 28)


def test_sass_loop_parsing():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_2:
        /*0020*/                   HGMMA.64x16x16.F32.BF16 gdesc[UR4], RZ, !UPT ;
        /*0030*/                   ISETP.GE.AND P0, PT, R2, 0x10, PT ;
        /*0040*/              @!P0 BRA `(.L_x_2) ;
        /*0050*/              @!P1 BRA `(.L_x_1) ;
        /*0060*/                   EXIT ;
.L_x_3:
        /*0070*/                   BRA `(.L_x_3);
"""
    instrs, loops, depth = sm.sass_loops(sass)
    assert [(lp["depth"], lp["instructions"]) for lp in loops] == [(1, 5), (2, 3)]
    assert depth == [0, 1, 2, 2, 2, 1, 0, 0]
    assert sm._mma_macs("HGMMA.64x16x16.F32.BF16 gdesc[UR4], RZ, !UPT") == 64 * 16 * 16 // 4
    assert sm._mma_macs("HMMA.16816.F32.BF16 R4, R8, R12, R4") == 16 * 8 * 16
    assert sm._mma_macs("FFMA R1, R2, R3, R4") == 0


def test_issue_time_counts_whole_schedulers():
    """One warp per scheduler: 4 warps of one program issue in the time of 1 warp, 1 or 2 warps
    no faster than that (no fractional scheduler), 8 warps twice that; 133 programs put 2 on
    the busiest of the 132 SMs."""
    n = int(sm.CLOCK_GHZ * 1e3) * 100  # 100 us of one scheduler's issue

    def stats(warps):
        return sm.KernelStats(regs=32, spills=0, smem_bytes=0, num_warps=warps, mma="none", sass_instructions=n,
                              loops=[], mma_ops=[], depth_of=[0] * n, instr_addrs=list(range(0, 16 * n, 16)))

    t = {w: sm.predict(stats(w), (1,), [], 0)["issue_us"] for w in (1, 2, 4, 8)}
    assert t == {1: 100.0, 2: 100.0, 4: 100.0, 8: 200.0}
    assert sm.predict(stats(4), (133,), [], 0)["issue_us"] == 200.0


def test_occupancy():
    assert sm.occupancy(64, 0, 4) == (8, 0.5)      # registers: 65536 / (64 * 128) = 8 blocks
    blocks, _ = sm.occupancy(32, 100 * 1024, 4)    # shared memory: two 100 KiB blocks per SM
    assert blocks == 2


def test_wide_weight_gradient_from_stored_activations():
    """WRN-28-10's 160-channel 3x3 weight gradient (a split backward) runs from the activations
    the input gradient stores beside ``grad_z`` (``SAVE_A``), ``grad_out`` and ``a`` by TMA
    descriptors (``bn_relu_conv_bwd_weight_tma_kernel``): no normalisation, masks or addresses
    per step, so every config fits the registers (58-108) and the model takes a spill-free
    wgmma one, at most 0.5x the masked kernels' 539.0 us (PREDICTED, triton 3.8: 196.4 us).
    Every config compiled, as the autotuner launches them."""
    pytest.importorskip("triton")
    run = _run_model("--shapes", "wrn28_10_s1", "--json")
    if run.returncode != 0 and ("not found" in run.stderr or "FileNotFoundError" in run.stderr):
        pytest.skip(f"triton's NVIDIA tools are not available here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    (wgrad,) = [k for k in report["kernels"] if k["kernel"] == "conv_bwd_weight"]
    assert wgrad["mma"] == "wgmma" and wgrad["spills"] == 0, wgrad
    assert all(c["error"] is None and c["spills"] == 0 for c in wgrad["configs"]), wgrad["configs"]
    assert "A_TMA=1" in wgrad["config"] and wgrad["predicted_us"] <= 0.5 * 539.0, wgrad
    # the forward from stored activations (FWD_FROM_A, 2026-12-01): a BN-ReLU pass at its byte
    # floor, then the TMA-descriptor conv, spill-free on wgmma, every config compiled, at most 0.5x
    # the masked forward's 350.8 us (PREDICTED, triton 3.8: 153.2 us)
    (a_pass,) = [k for k in report["kernels"] if k["kernel"] == "bn_relu_a" and k["phase"] == "fwd"]
    (fwd,) = [k for k in report["kernels"] if k["kernel"] == "conv_fwd" and k["phase"] == "fwd"]
    assert a_pass["spills"] == 0 and a_pass["predicted_us"] <= 1.05 * a_pass["floor_us"], a_pass
    assert fwd["mma"] == "wgmma" and fwd["spills"] == 0, fwd
    assert all(c["error"] is None and c["mma"] == "wgmma" for c in fwd["configs"]), fwd["configs"]
    assert fwd["predicted_us"] <= 0.5 * 350.8, fwd
    (op,) = report["ops"]
    assert op["launches_fwd"] == 4, op


_CONV_BWD_SCRIPT = r'''
import json, os, sys
from resfast.ops import triton_ops
from resfast.profiling import static_model as sm
triton_ops.PACKED_INPUT_S2 = os.environ.get("RESFAST_TEST_PACKED_S2", "1") == "1"
name = sys.argv[1]
for shape in sys.argv[2:]:
    (launch,) = [lp for lp in sm.training_plan(sm.SHAPES[shape])["bwd"] if lp.name == name]
    bound = launch.bind(launch.configs[0])
    stats = sm.analyze(sm.compile_for_sm90(bound.fn or launch.fn, bound.args, bound.constexprs))
    row = sm.predict(stats, bound.grid, list(bound.loops.values()), bound.hbm_bytes, sm.H100,
                     [bound.depths.get(name, 1) for name in bound.loops])
    row.update(shape=shape, loops=bound.loops, SH=bound.constexprs.get("SH"), SW=bound.constexprs.get("SW"),
               MAGIC=bound.constexprs.get("MAGIC"), GP=bound.derived.get("GP"),
               kernel=(bound.fn or launch.fn).__name__)
    print(json.dumps(row))
'''


def _packed_backward_rows(*shapes: str, launch: str = "conv_bwd", packed_s2: bool = True):
    """The static model's record of the backward launch ``launch`` (default: the merged packed
    backward ``conv_bwd``) of each shape, first config (the static choice), compiled for sm_90
    in a process without the interpreter; skips where triton's NVIDIA tools are missing.
    ``packed_s2=False``: the plan without the strided packed input gradient
    (``triton_ops.PACKED_INPUT_S2``)."""
    return _script_rows(_CONV_BWD_SCRIPT, [launch, *shapes], len(shapes),
                        RESFAST_TEST_PACKED_S2="1" if packed_s2 else "0")


def test_stride2_packed_backward_within_its_floor():
    """ResNeXt-50's stride-2 first block of stage 2 (8-channel groups packed 2 per MMA tile):
    the merged backward takes the residue-class path (stride 2 compile-time, one tile loop per
    class, only the taps that reach a class loaded and multiplied), and its issue-bound time
    (predicted, first config: the static choice) is within 1.25x of its HBM floor, on wgmma,
    without spills, every SASS loop matched to the plan's. Before the class path: 2.4x. (Since
    the strided packed input gradient, the plan without it: the merged launch still runs where
    that kernel does not, e.g. even dilations.)"""
    (row,) = _packed_backward_rows("resnext50_s2_down", packed_s2=False)
    assert (row["SH"], row["SW"]) == (2, 2), row
    assert [k for k in row["loops"] if k.startswith("tiles_class")] == [f"tiles_class{q}" for q in range(4)], row
    assert row["loops_matched"], row
    assert row["mma"] == "wgmma" and row["spills"] == 0, row
    assert row["issue_us"] <= 1.25 * row["floor_us"], row


def test_stride2_packed_input_gradient_within_its_floor():
    """ResNeXt-50's stride-2 blocks of stages 2 and 3 (8-channel groups packed 2 per MMA tile, one
    16-channel group): the input gradient runs as its own launch by parity decomposition,
    ``bn_relu_conv_bwd_input_packed_s2_kernel`` (one tile loop per residue class, only the taps
    that reach it), on wgmma, without spills, every SASS loop matched to the plan's (four class
    loops, the cold fix-up's six), first config (the static choice) at 9 programs per SM, bound
    by the dependent path, issue within 1.1x of the HBM floor (PREDICTED: 0.85x and 1.03x)."""
    rows = _packed_backward_rows("resnext50_s2_down", "resnext50_s3_down", launch="conv_bwd_input")
    assert [(r["shape"], r["GP"]) for r in rows] == [("resnext50_s2_down", 2), ("resnext50_s3_down", 1)]
    for row in rows:
        assert row["kernel"] == "bn_relu_conv_bwd_input_packed_s2_kernel", row
        assert [k for k in row["loops"] if k.startswith("tiles_class")] == [f"tiles_class{q}" for q in range(4)], row
        assert row["loops_matched"], row
        assert row["mma"] == "wgmma" and row["spills"] == 0, row
        assert row["issue_us"] <= 1.1 * row["floor_us"], row
        assert row["blocks_per_sm"] >= 9 and row["latency_us"] >= row["issue_us"], row


def test_stride1_packed_input_gradient_within_its_floor():
    """ResNeXt-50's grouped 3x3 convs at stride 1 (stages 1-3: 4-, 8- and 16-channel groups,
    packed 4, 2 and 1 per MMA tile): the input gradient runs as its own launch,
    ``bn_relu_conv_bwd_input_packed_kernel`` (one ``[positions, 16] x [16, 16]`` MMA per tap),
    on wgmma, without spills, every SASS loop matched to the plan's (first config: the static
    choice), at least 6 programs per SM resident (what its dependent path needs; the merged
    kernel it replaced held 3; the first config, ``MMA_EPI`` + ``PAIRS`` at 56 registers, holds
    9), bound by that path rather than by issue (PREDICTED), and with an issue-bound time within
    1.4x of its HBM floor (1.36x at stage 3's 14 x 14 images, whose 7 tiles per program carry the
    prologue of 9 programs per SM; 1.29x at 6 per SM)."""
    rows = _packed_backward_rows("resnext50_s1", "resnext50_s2", "resnext50_s3", launch="conv_bwd_input")
    assert [(r["shape"], r["GP"]) for r in rows] == [("resnext50_s1", 4), ("resnext50_s2", 2), ("resnext50_s3", 1)]
    for row in rows:
        assert row["kernel"] == "bn_relu_conv_bwd_input_packed_kernel", row
        assert row["loops_matched"], row
        assert row["mma"] == "wgmma" and row["spills"] == 0, row
        assert row["issue_us"] <= 1.4 * row["floor_us"], row
        assert row["blocks_per_sm"] >= 6 and row["latency_us"] >= row["issue_us"], row


def test_measured_reads_the_newest_run_and_prefers_its_gpu_check_file(tmp_path):
    """``benchmarks/results`` holds both gpu_check.sh files and gpu_kernels_check.sh ones
    (``<date>-<gpu>-kernels.json``); the newest date's gpu_check.sh file is the one read, a
    kernels file alone is read too, and other JSON is skipped."""
    check_row = {"kind": "op", "row": "triton", "median_s": 4.5e-4,
                 "params": {"mode": "fwd", "shape": [64, 128, 56, 56], "out_channels": 128, "kernel": 3, "groups": 32}}
    check = {"schema": "resfast-gpu-check/1", "environment": {"gpu": "NVIDIA H200", "git_commit": "c1"},
             "benchmarks": [check_row]}
    kernels = {"schema": "resfast-gpu-kernels/1", "environment": {"gpu": "NVIDIA H200", "commit": "c2"},
               "timing": [{"shape": "resnext50_s1", "mode": "fwd", "impl": "compile", "median_s": 3.2e-4}]}
    old = {**check, "environment": {"gpu": "NVIDIA H200", "git_commit": "c0"}}
    (tmp_path / "2026-11-28-nvidia-h200.json").write_text(json.dumps(old))
    (tmp_path / "2026-11-29-nvidia-h200.json").write_text(json.dumps(check))
    (tmp_path / "2026-11-29-nvidia-h200-kernels.json").write_text(json.dumps(kernels))
    (tmp_path / "2026-12-01-notes.json").write_text(json.dumps({"not": "a run"}))
    (tmp_path / "2026-12-02-broken.json").write_text("{")
    got = sm.measured(str(tmp_path))
    assert got["source"]["file"] == "2026-11-29-nvidia-h200.json" and got["source"]["commit"] == "c1"
    assert got["shapes"] == {"resnext50_s1": {"fwd": {"triton": 4.5e-4}}}
    (tmp_path / "2026-11-29-nvidia-h200.json").unlink()
    got = sm.measured(str(tmp_path))
    assert got["source"]["file"] == "2026-11-29-nvidia-h200-kernels.json" and got["source"]["commit"] == "c2"
    assert got["shapes"] == {"resnext50_s1": {"fwd": {"compile": 3.2e-4}}}


def test_load_rounds_and_the_dependent_path():
    """Loads issued back to back share one round; a barrier, a wait on the tensor cores or a
    loop boundary closes it. The dependent-issue bound is one warp's path (the fitted cycles
    per instruction, per barrier and per load round) times the waves of programs."""
    sass = """
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   LDG.E.128 R12, desc[UR4][R2.64+0x20] ;
.L_x_1:
        /*0040*/                   LDG.E.128 R16, desc[UR4][R2.64+0x30] ;
        /*0050*/               @P0 LDG.E.128 R20, desc[UR4][R2.64+0x40] ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0070*/                   LDGSTS.E.128 [R1], desc[UR4][R2.64] ;
        /*0080*/                   LDG.E.U16 R24, desc[UR4][R2.64+0x50] ;
        /*0090*/               @P1 BRA `(.L_x_1) ;
        /*00a0*/                   EXIT ;
"""
    instrs, loops, _ = sm.sass_loops(sass)
    assert sm.load_rounds(instrs, loops) == [0x00, 0x30, 0x40, 0x80]
    n = 1000
    stats = sm.KernelStats(regs=32, spills=0, smem_bytes=0, num_warps=4, mma="none", sass_instructions=n, loops=[],
                           mma_ops=[], depth_of=[0] * n, instr_addrs=list(range(0, 16 * n, 16)),
                           sync_addrs=[0, 16], round_addrs=[32])
    row = sm.predict(stats, (132,), [], 0)
    path = (sm.DEP_CPI * n + 2 * sm.SYNC_CYCLES + sm.LOAD_ROUND_CYCLES) / (sm.CLOCK_GHZ * 1e3) + sm.LAUNCH_US
    assert (row["syncs"], row["load_rounds"]) == (2, 1)
    assert row["latency_us"] == pytest.approx(path, abs=0.01)
    assert row["predicted_us"] == pytest.approx(max(row["throughput_us"], row["latency_us"]), abs=0.01)
    # 16 blocks of 4 warps fit an SM at 32 registers: 2 x 132 programs are one wave; 17 x 132 two
    assert sm.occupancy(32, 0, 4)[0] == 16
    assert sm.predict(stats, (2 * 132,), [], 0)["latency_us"] == pytest.approx(path, abs=0.01)
    assert sm.predict(stats, (17 * 132,), [], 0)["latency_us"] == pytest.approx(
        2 * (path - sm.LAUNCH_US) + sm.LAUNCH_US, abs=0.01)


def test_planner_uses_the_models_cycles_per_instruction():
    """The persistent launches of packed small groups (``fill``) weigh one warp's path with the
    model's fitted constant, so they fill an SM's resident slots: ResNeXt-50 stage 1's forward (1792 tiles per
    channel block, 8 blocks, 4-warp config with 4 programs per SM) gets 4 programs per SM
    walking 28 tiles each, not 2 walking 55 (which the issue bound alone prefers: 110 tiles on
    the busiest SM against 112)."""
    from resfast.ops import triton_ops
    from resfast.profiling import sm90

    assert triton_ops.DEP_CPI == sm90.DEP_CPI
    s = triton_ops._balanced_splits_memo(1792, 8, 132, 4, 4, 1792, False, True)
    assert s == 66 and -(-8 * s // 132) == 4
    assert triton_ops._split_cost(1792, 8, 132, 4, 4, 66) < triton_ops._split_cost(1792, 8, 132, 4, 4, 33)
    # without fill (kernels whose configs' residency the registers may not allow): the busiest
    # SM's tiles, 110 at 33 programs per block against 112 at 66
    assert triton_ops._balanced_splits_memo(1792, 8, 132, 4, 4, 1792, False, False) == 33


def test_calibration_fit_recovers_known_constants():
    """benchmarks/static_calibrate.py's fit (the four latency constants from measured kernel
    times): on rows made from known constants it finds them again, and it leaves a kernel
    whose throughput bound is longer at that bound."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "static_calibrate.py")
    spec = importlib.util.spec_from_file_location("static_calibrate", path)
    cal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cal)
    true = {"DEP_CPI": 9.0, "SYNC_CYCLES": 60.0, "LOAD_ROUND_CYCLES": 300.0, "LAUNCH_US": 2.0}
    rows = [{"per_sm": w, "blocks_per_sm": 1, "warp_instructions": i, "syncs": b, "load_rounds": r,
             "throughput_us": 0.1}
            for w, i, b, r in [(1, 3000, 12, 12), (1, 700, 14, 5), (1, 16000, 1000, 550), (1, 50000, 550, 280),
                               (1, 680, 0, 10), (12, 450, 0, 1), (2, 9000, 300, 40)]]
    for r in rows:
        r["measured_us"] = cal.latency_us(r, true)
    got = cal.fit(rows)
    for k, v in true.items():
        assert got[k] == pytest.approx(v, rel=0.05, abs=0.05), (k, got)
    bound = dict(rows[0], throughput_us=1e3, measured_us=1e3)
    assert cal.predicted_us(bound, got) == 1e3
    # a profile's recorded config label binds the config that ran, even once the list changed
    from resfast.ops import triton_ops

    for cfg in (*triton_ops._FWD_CONFIGS, *triton_ops._BWD_CONFIGS):
        assert cal.config_from_label(cfg.label) == cfg, cfg.label
    old = cal.config_from_label("TILE_H=8,TILE_W=16,BLOCK_N=64,BLOCK_K=32,w4,s1,p4")
    assert (old.get("TILE_W"), old.num_warps, old.programs_per_sm) == (16, 4, 4)


def test_calibration_reads_every_kernels_profile_by_default(tmp_path):
    """static_calibrate's default data: every ``*-kernels.json`` of a results folder that has
    a per-kernel profile (one ``profile`` or several ``profiles``), fitted jointly."""
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "static_calibrate.py")
    spec = importlib.util.spec_from_file_location("static_calibrate", path)
    cal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cal)
    kern = {"kernels": {"k": {"count": 5, "mean_us": 1.0}}}
    files = {"a-kernels.json": {"profile": dict(kern, shape="s")},
             "b-kernels.json": {"profiles": [{"shape": "s", "skipped": "budget"}, dict(kern, shape="t")]},
             "c-kernels.json": {"profile": {"skipped": "budget"}},
             "d.json": {"profile": dict(kern, shape="s")}}
    for name, doc in files.items():
        (tmp_path / name).write_text(json.dumps(doc))
    got = [os.path.basename(p) for p in cal.default_results(str(tmp_path))]
    assert got == ["a-kernels.json", "b-kernels.json"]
    real = [os.path.basename(p) for p in cal.default_results(os.path.join(os.path.dirname(path), "results"))]
    assert "2026-11-29-nvidia-h200-kernels.json" in real and "2026-11-29b-nvidia-h200-kernels.json" in real


def test_tma_waits_and_out_of_line_spin_waits():
    """A TMA kernel (the thirteenth session's prototype, docs/notes/triton_kernels.md): ptxas
    places each copy's retry loop (``SYNCS.PHASECHK`` and a branch to itself) after the
    kernel's end, with an unconditional branch back into the tile loop. That branch back is no
    loop of the source (read as one, it made nine extra loops and a 54 us path); a run of
    mbarrier waits with no barrier, tensor-core wait or loop boundary between them is one load
    round, as back-to-back ``LDG`` are."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   UTMALDG.4D [UR8], [UR4] ;
        /*0020*/                   UTMALDG.4D [UR12], [UR4] ;
        /*0030*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x10], R3 ;
.L_x_5:
        /*0040*/              @!P0 BRA `(.L_x_3) ;
        /*0050*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x18], R3 ;
.L_x_6:
        /*0060*/              @!P0 BRA `(.L_x_4) ;
        /*0070*/                   HGMMA.64x16x16.F32.BF16 gdesc[UR4], RZ, !UPT ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0090*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x20], R3 ;
        /*00a0*/               @P1 BRA `(.L_x_1) ;
        /*00b0*/                   EXIT ;
.L_x_3:
        /*00c0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x10], R3 ;
        /*00d0*/              @!P0 BRA `(.L_x_3) ;
        /*00e0*/                   BRA `(.L_x_5) ;
.L_x_4:
        /*00f0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x18], R3 ;
        /*0100*/              @!P0 BRA `(.L_x_4) ;
        /*0110*/                   BRA `(.L_x_6) ;
"""
    instrs, loops, _ = sm.sass_loops(sass)
    assert [(lp["head"], lp["tail"]) for lp in loops] == [(0x10, 0xA0)]
    # the two waits before the MMA are one round, the one after the tensor-core wait another;
    # the out-of-line retries sit past the loop, on no path the model walks
    assert sm.load_rounds(instrs, loops)[:2] == [0x30, 0x90]


# argv: shape, phase, launch, config labels: one JSON row per config (the first row: the launch's
# first config, the static choice)
_CONFIGS_SCRIPT = r'''
import json, sys
from resfast.profiling import static_model as sm
shape, phase, name = sys.argv[1:4]
(launch,) = [lp for lp in sm.training_plan(sm.SHAPES[shape])[phase] if lp.name == name]
print(json.dumps({"first": launch.configs[0].label}))
for label in sys.argv[4:]:
    (cfg,) = [c for c in launch.configs if c.label == label]
    bound = launch.bind(cfg)
    row = sm.predict_bound(launch, bound)
    row.update(config=label, TMA=bound.constexprs.get("TMA"), kernel=(bound.fn or launch.fn).__name__)
    print(json.dumps(row))
'''


def _script_rows(script: str, args, rows: int, **env_extra: str):
    """The last ``rows`` JSON lines ``script`` prints, run with ``args`` in a process of its own
    (the CPU tests' interpreter off, ``env_extra`` set). Skips where triton's NVIDIA tools are
    missing."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=900)
    if run.returncode != 0 and ("not found" in run.stderr or "FileNotFoundError" in run.stderr):
        pytest.skip(f"triton's NVIDIA tools are not available here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.strip().splitlines()[-rows:]]


def _config_rows(shape: str, phase: str, launch: str, *labels: str):
    """:data:`_CONFIGS_SCRIPT`'s rows: the launch's first config, then one per label."""
    return _script_rows(_CONFIGS_SCRIPT, [shape, phase, launch, *labels], len(labels) + 1)


def test_wide_input_gradient_by_tma_descriptors():
    """WRN-28-10's stage-3 input gradient (640 -> 640 channels, 8 x 8 images): the wide kernel
    with its operands by TMA tensor descriptors (``TMA``: no address or mask arithmetic per step)
    against the same tile by masked loads: on wgmma, spill-free, every SASS loop matched, a warp's
    path at most 0.6x as long and the prediction at most 0.6x (PREDICTED, triton 3.8: 36.8 k
    against 65.8 k warp instructions, 211.0 against 401.6 us)."""
    masked = "TILE_H=8,TILE_W=8,BLOCK_N=64,BLOCK_K=128,w8,s3,p1"
    tma = "TILE_H=8,TILE_W=8,BLOCK_N=128,BLOCK_K=128,TMA=1,w8,s3,p1"
    _, before, after = _config_rows("wrn28_10_s3", "bwd", "conv_bwd_input", masked, tma)
    assert (before["TMA"], after["TMA"]) == (False, True)
    for row in (before, after):
        assert row["kernel"] == "bn_relu_conv_bwd_input_kernel", row
        assert row["mma"] == "wgmma" and row["spills"] == 0 and row["loops_matched"], row
    assert after["warp_instructions"] <= 0.6 * before["warp_instructions"], (before, after)
    assert after["predicted_us"] <= 0.6 * before["predicted_us"], (before, after)


def test_wide_1x1_forward_on_an_8x8_tile():
    """DenseNet-121's block-3 1x1 conv (992 -> 128 channels, 14 x 14): the forward on an 8 x 8
    tile with all 128 output channels and 8 warps (each x element BN-ReLU'd once, twice the
    programs of the 8 x 16 tile, each a shorter path) is the static choice, on wgmma, spill-free,
    every SASS loop matched, and at most 0.8x the 8 x 16 tile's prediction (PREDICTED, triton
    3.8: 25.1 against 34.4 us)."""
    old = "TILE_H=8,TILE_W=16,BLOCK_N=128,BLOCK_K=64,STACK=1,w8,s1,p2"
    new = "TILE_H=8,TILE_W=8,BLOCK_N=128,BLOCK_K=64,STACK=1,w8,s1,p2"
    first, before, after = _config_rows("densenet121_1x1_b3", "fwd", "conv_fwd", old, new)
    assert first["first"] == new, first
    for row in (before, after):
        assert row["mma"] == "wgmma" and row["loops_matched"], row
    assert after["spills"] == 0 and after["blocks_per_sm"] >= 2, after
    assert after["predicted_us"] <= 0.8 * before["predicted_us"], (before, after)
