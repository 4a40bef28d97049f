"""The static sm_90 performance model of the fused BN-ReLU-conv kernels (no GPU needed).

``resfast profile --static [--shapes NAMES] [--all-configs] [--json]``

Each kernel of a fused training step (forward statistics and their finalize, the conv
forward, the conv backward, the gradient finalize, the BN input gradient) is taken from the
op's *launch plan* (:func:`resfast.ops.triton_ops.launch_plan`, the code the real launch
runs) on ``meta`` tensors, bound to every tile config, and compiled for sm_90 with triton's
own compiler and the runtime's argument specialisation (the runtime's binder: divisibility
by 16, ``== 1`` integers as constants). From the cubin it reads registers and shared memory
(``cuobjdump -res-usage``), spills (``ptxas -v``), the MMA instruction used (``HGMMA`` =
wgmma, ``HMMA`` = mma.sync) and the SASS loops (``nvdisasm``), and predicts

* ``issue_us``: SASS instructions x loop trips (from the launch plan) x warps, on the
  busiest SM, over 4 warp-instructions per clock at 1.755 GHz (one per scheduler: a warp
  keeps to its scheduler, so fewer than 4 warps on an SM issue at most one per warp);
* ``mma_us``: the MACs the MMA instructions issue (block-diagonal waste included) over the
  tensor-core rate (wgmma 2048, mma.sync 1024 MACs per clock per SM);
* ``floor_us``: the fewest HBM bytes of the launch over 3.35 TB/s (H100 SXM; H200 4.8 TB/s
  is reported beside it);
* ``latency_us``: one warp's dependent path (:func:`latency_bound_us`: cycles per
  instruction, per barrier and per load round, fitted to a GPU profile by
  ``benchmarks/static_calibrate.py``) times the waves of programs;
* ``predicted_us`` = the largest of the four (``throughput_us``: of the first three), for
  the best config.

Per shape (an op): the predicted sum over the kernels of one training forward + backward,
eager PyTorch's byte floor for the same work (BN statistics, BN, ReLU, conv and their
backward as eager runs them, each kernel reading its inputs and writing its outputs once),
the predicted ratio, and the launch counts. All figures are predictions; where a recorded
GPU run (``benchmarks/results/*.json``) timed the same shape, its measured times are printed
beside them, labelled with the GPU and the commit they were measured on. The assumptions are
in ``benchmarks/README.md`` ("Static sm_90 performance model").

Native kernels join the table when :mod:`resfast.profiling.static_native` exists (its
``native_kernels(shapes)`` returns records with the same keys).
"""
from __future__ import annotations

import argparse
import bisect
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "ConvShape", "SHAPES", "CI_SHAPES", "H100", "H200", "add_arguments", "run", "analyze", "predict_bound",
    "predict_kernels", "latency_bound_us", "load_rounds",
    "predict_ops", "eager_floor_bytes", "fused_floor_bytes", "compile_for_sm90", "sass_loops", "KernelStats",
]

# The machine and the shapes (shared with the native model).
from resfast.profiling.sm90 import (  # noqa: F401  (re-exported)
    CLOCK_GHZ, DEP_CPI, H100, H200, ISSUE_PER_CLK, LAUNCH_US, LOAD_ROUND_CYCLES, MAX_BLOCKS_PER_SM, SYNC_CYCLES, MAX_WARPS_PER_SM, MMA_SYNC_MACS_PER_CLK, REGS_PER_SM,
    SHAPES, SMEM_PER_BLOCK, SMEM_PER_SM, SMS, WGMMA_MACS_PER_CLK, ConvShape,
)

#: The subset the test suite compiles (one config each).
CI_SHAPES = ("resnext50_s1", "densenet121_1x1")

#: The conv kernels that must run on tensor cores (the fix-up and finalize launches do no GEMM).
CONV_MMA_KERNELS = ("conv_fwd", "conv_bwd", "conv_bwd_input", "conv_bwd_weight")

#: Shapes the issue's targets cover (predicted fused fwd+bwd >= 1.6x eager's byte floor).
TARGET_SHAPES = ("resnext50_s1", "resnext50_s2", "resnext50_s3", "densenet121_1x1", "densenet121_1x1_b2",
                 "densenet121_1x1_b3", "densenet121_1x1_b4", "densenet121_3x3", "densenet121_3x3_b2",
                 "densenet121_3x3_b3", "densenet121_3x3_b4")

# ----------------------------------------------------------------------------- byte floors


def eager_floor_bytes(s: ConvShape, elt: int = 2) -> Dict[str, int]:
    """HBM bytes of eager PyTorch's training step, each kernel reading its inputs and writing
    its outputs once: forward BN statistics (x), BN (x -> z), in-place ReLU (z -> z), conv
    (a -> y); backward conv data (gy -> ga), conv weight (gy, a), ReLU backward (ga, a -> gz),
    BN backward reduce (gz, x), BN backward elementwise (gz, x -> gx)."""
    ho, wo = s.out_hw
    x = s.n * s.c * s.h * s.w * elt
    y = s.n * s.co * ho * wo * elt
    wb = s.co * (s.c // s.groups) * s.k * s.k * elt
    fwd = x + (x + x) + (x + x) + (x + y + wb)
    bwd = (y + x + wb) + (y + x + wb) + 3 * x + 2 * x + 3 * x
    return {"fwd": fwd, "bwd": bwd, "total": fwd + bwd}


def fused_floor_bytes(s: ConvShape, elt: int = 2) -> Dict[str, int]:
    """The fused step's fewest bytes: statistics (x), conv (x -> y); conv backward
    (gy, x -> gz), BN input gradient (gz, x -> gx)."""
    ho, wo = s.out_hw
    x = s.n * s.c * s.h * s.w * elt
    y = s.n * s.co * ho * wo * elt
    fwd = x + x + y
    bwd = (y + x + x) + 3 * x
    return {"fwd": fwd, "bwd": bwd, "total": fwd + bwd}


def useful_macs(s: ConvShape) -> int:
    """Multiply-adds of the conv itself (forward; each backward GEMM has as many)."""
    ho, wo = s.out_hw
    return s.n * ho * wo * s.co * (s.c // s.groups) * s.k * s.k

# ----------------------------------------------------------------------------- compiling


def _tools() -> Dict[str, str]:
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tools = {}
    for name in ("cuobjdump", "nvdisasm", "ptxas"):
        path = os.path.join(bin_dir, name)
        tools[name] = path if os.path.exists(path) else (shutil.which(name) or "")
    missing = [k for k, v in tools.items() if not v]
    if missing:
        raise FileNotFoundError(f"triton's NVIDIA tools {missing} are not in {bin_dir} or on PATH")
    return tools


def compile_for_sm90(fn, args: Sequence[Any], constexprs: Dict[str, Any]):
    """Compile ``fn[grid](*args, **constexprs)`` for sm_90 as the runtime would: its own
    binder computes the specialisation (pointer and integer divisibility by 16, integers
    equal to 1 as constants), then ``triton.compile``. Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = dict(constexprs)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, consts, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, consts, attrs), target=target, options=options.__dict__)


@dataclass
class KernelStats:
    """What the compiled cubin says."""

    regs: int
    spills: int          # bytes of spill stores per thread (ptxas -v)
    smem_bytes: int      # static + dynamic shared memory per block
    num_warps: int
    mma: str             # "wgmma", "mma.sync" or "none"
    sass_instructions: int
    loops: List[Dict[str, Any]]   # {"head", "tail", "depth", "instructions"} in address order
    mma_ops: List[Tuple[int, int, int]]  # (address, loop depth, MACs per warp-instruction)
    depth_of: List[int]           # per instruction: its loop depth
    instr_addrs: List[int]
    sync_addrs: List[int] = field(default_factory=list)   # CTA barriers (BAR.SYNC / BAR.RED)
    round_addrs: List[int] = field(default_factory=list)  # first global load of each load round (:func:`load_rounds`)


_CACHE_DIR = os.environ.get("RESFAST_STATIC_CACHE", os.path.join(tempfile.gettempdir(), "resfast-static-model"))


def analyze(kernel) -> KernelStats:
    """Registers, spills, shared memory, MMA kind and the SASS loop structure of a compiled kernel."""
    tools = _tools()
    cubin, ptx = kernel.asm["cubin"], kernel.asm["ptx"]
    digest = hashlib.sha256(cubin).hexdigest()[:24]
    cached = os.path.join(_CACHE_DIR, digest + "-v3.json")
    if os.path.exists(cached):
        with open(cached) as f:
            d = json.load(f)
        d["mma_ops"] = [tuple(t) for t in d["mma_ops"]]
        return KernelStats(**d)
    with tempfile.TemporaryDirectory() as tmp:
        cub = os.path.join(tmp, "k.cubin")
        with open(cub, "wb") as f:
            f.write(cubin)
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        res = subprocess.run([tools["cuobjdump"], "-res-usage", cub], capture_output=True, text=True, check=True).stdout
        arch = re.search(r"\.target\s+(sm_\w+)", ptx)
        pv = subprocess.run([tools["ptxas"], "-lineinfo", "-v", "--regAllocOptLevel=2",
                             f"--gpu-name={arch.group(1) if arch else 'sm_90a'}", ptx_path, "-o",
                             os.path.join(tmp, "k.o")], capture_output=True, text=True)
        sass = subprocess.run([tools["nvdisasm"], "-c", cub],
                              capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    static_smem = int(re.search(r"SHARED:(\d+)", res).group(1))
    spill = re.search(r"(\d+) bytes spill stores", pv.stdout + pv.stderr)
    meta = kernel.metadata
    dyn = int(getattr(meta, "shared", 0) or 0)
    num_warps = int(getattr(meta, "num_warps", 4))
    instrs, loops, depth_of = sass_loops(sass)
    mma_ops = []
    kinds = set()
    for (addr, text), depth in zip(instrs, depth_of):
        macs = _mma_macs(text)
        if macs:
            kinds.add("wgmma" if "HGMMA" in text else "mma.sync")
            mma_ops.append((addr, depth, macs))
    mma = "wgmma" if "wgmma" in kinds else ("mma.sync" if kinds else "none")
    stats = KernelStats(regs, int(spill.group(1)) if spill else 0, static_smem + dyn, num_warps, mma, len(instrs),
                        loops, mma_ops, depth_of, [a for a, _ in instrs],
                        [a for a, t in instrs if _SYNC.match(t)], load_rounds(instrs, loops))
    os.makedirs(_CACHE_DIR, exist_ok=True)
    with open(cached, "w") as f:
        json.dump(asdict(stats), f)
    return stats


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = r"(?:@!?U?P\w+\s+)?"
_SYNC = re.compile(_PRED + r"BAR\.(?:SYNC|RED)\b")
_LDG = re.compile(_PRED + r"LDG\b")  # LDG.E..., not LDGSTS (cp.async) or LDGDEPBAR
_WAIT = re.compile(_PRED + r"(?:WARPGROUP\.DEPBAR|DEPBAR)\b")
_SPIN_PART = re.compile(_PRED + r"(?:SYNCS|NANOSLEEP|BRA)\b")  # what an out-of-line spin-wait holds
_BARE_BRA = re.compile(r"BRA\b")  # an unconditional branch (no predicate)
_TMA_WAIT = re.compile(_PRED + r"SYNCS\.PHASECHK\b")  # a wait on an mbarrier (a TMA copy's completion)
_LABEL = re.compile(r"^\s*(\.L_\w+):")
_BRANCH = re.compile(r"\bBRA\b.*?`\((\.L_\w+)\)")


def sass_loops(sass: str):
    """Parse ``nvdisasm -c`` output: ``(instructions [(address, text)], loops, depth per
    instruction)``. A loop is a backward branch (to a label at or before it); self-branches
    (the trailing trap) and spin-waits on an mbarrier (``SYNCS``... with a branch back over
    at most a few instructions) do not count as loops, nor does the jump back from such a
    spin-wait placed out of line (ptxas puts a TMA load's retry loop, ``SYNCS.PHASECHK``
    and a branch to itself, after the kernel's end, with an unconditional branch back to
    the instruction after the first try: an unconditional backward branch out of a block of at
    most a few instructions, all of them ``SYNCS`` / ``NANOSLEEP`` / branches)."""
    instrs: List[Tuple[int, str]] = []
    labels: Dict[str, int] = {}
    pending: List[str] = []
    for line in sass.splitlines():
        lm = _LABEL.match(line)
        if lm:
            pending.append(lm.group(1))
            continue
        im = _INSTR.search(line)
        if im:
            addr = int(im.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append((addr, im.group(2)))
    for lab in pending:
        labels[lab] = instrs[-1][0] + 16 if instrs else 0
    spans: Dict[int, int] = {}
    index = {a: i for i, (a, _) in enumerate(instrs)}
    starts = sorted(set(labels.values()))
    for addr, text in instrs:
        bm = _BRANCH.search(text)
        if not bm or bm.group(1) not in labels:
            continue
        head = labels[bm.group(1)]
        if head >= addr:
            continue
        body = instrs[index.get(head, 0): index[addr] + 1]
        if len(body) <= 6 and any("SYNCS" in t or "NANOSLEEP" in t for _, t in body):
            continue  # a spin-wait, not a loop of the source
        k = bisect.bisect_right(starts, addr) - 1  # the block this branch ends
        block = instrs[index.get(starts[k], 0): index[addr] + 1] if k >= 0 else []
        if (0 < len(block) <= 6 and any("SYNCS" in t for _, t in block)
                and all(_SPIN_PART.match(t) for _, t in block) and _BARE_BRA.match(text)):
            continue  # the way back from an out-of-line spin-wait
        spans[head] = max(spans.get(head, 0), addr)
    loops = [{"head": h, "tail": t} for h, t in sorted(spans.items())]
    for lp in loops:
        lp["depth"] = 1 + sum(1 for o in loops if o is not lp and o["head"] <= lp["head"] and lp["tail"] <= o["tail"]
                              and (o["head"], o["tail"]) != (lp["head"], lp["tail"]))
        lp["instructions"] = sum(1 for a, _ in instrs if lp["head"] <= a <= lp["tail"])
    depth_of = [max([lp["depth"] for lp in loops if lp["head"] <= a <= lp["tail"]], default=0) for a, _ in instrs]
    return instrs, loops, depth_of


def load_rounds(instrs: Sequence[Tuple[int, str]], loops: Sequence[Dict[str, Any]]) -> List[int]:
    """Addresses of the global loads (``LDG``) that open a *load round*: loads issued back to
    back share one memory latency, and a round closes at a CTA barrier, a wait on the tensor
    cores (``WARPGROUP.DEPBAR``), or a loop's head or back branch (a loop that is not
    software-pipelined waits for one trip's loads before the next trip's are issued). In
    address order, the first ``LDG`` after such a point opens the next round.

    TMA copies (``UTMALDG``) are asynchronous: the warp stalls where it waits on the copy's
    mbarrier (``SYNCS.PHASECHK``), so a run of such waits with no barrier, tensor-core wait
    or loop boundary between them counts as one round, at its first wait (the copies it
    waits on were issued together). Whether software pipelining issued them a trip earlier,
    so that the wait finds the data there, is not modelled: a TMA load costs a round as an
    ``LDG`` does (cp.async, ``LDGSTS``, is not counted, as before)."""
    bounds = {lp["head"] for lp in loops} | {lp["tail"] for lp in loops}
    rounds, open_, waiting = [], False, False
    for addr, text in instrs:
        if addr in bounds or _SYNC.match(text) or _WAIT.match(text):
            open_ = False
            waiting = False
        if _LDG.match(text):
            if not open_:
                rounds.append(addr)
            open_ = True
        if _TMA_WAIT.match(text):
            if not waiting:
                rounds.append(addr)
            waiting = True
    return rounds


def _mma_macs(text: str) -> int:
    """MACs per warp-instruction of a tensor-core instruction (0 for anything else):
    ``HGMMA.64xNx16`` is a warpgroup's (four warps') instruction, ``HMMA.16816`` one warp's
    m16n8k16."""
    m = re.match(r"(?:@!?U?P\w+\s+)?HGMMA\.(\d+)x(\d+)x(\d+)", text)
    if m:
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3)) // 4
    m = re.match(r"(?:@!?U?P\w+\s+)?HMMA\.(16816|1688|884)", text)
    if m:
        return {"16816": 16 * 8 * 16, "1688": 16 * 8 * 8, "884": 8 * 8 * 4}[m.group(1)]
    return 0


# ----------------------------------------------------------------------------- the model


def occupancy(regs: int, smem: int, num_warps: int) -> Tuple[int, float]:
    """``(blocks per SM, fraction of the 64 warp slots)``."""
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_smem = SMEM_PER_SM // max(smem + 1024, 1) if smem else MAX_BLOCKS_PER_SM  # 1 KiB reserved per block
    by_warps = MAX_WARPS_PER_SM // num_warps
    blocks = max(0, min(by_regs, by_smem, by_warps, MAX_BLOCKS_PER_SM))
    return blocks, blocks * num_warps / MAX_WARPS_PER_SM


def _weights(stats: KernelStats, loops: Sequence[int], depths: Optional[Sequence[int]] = None
             ) -> Tuple[List[int], bool]:
    """Per instruction: how many times one warp executes it, the product of the trips of the
    loops around it. The launch plan lists its loops' trips in the order of their heads in
    the code, which is the order of the SASS loops' heads. When the counts differ (the
    compiler unrolled a loop, or specialised a bound to a constant) the SASS loops of each
    nesting depth take, in order, the plan's loops of that depth (``depths``, default 1 for
    the first and one deeper for each next), extra SASS loops 1 trip, and the second value is
    False."""
    trips = list(loops)
    matched = len(trips) == len(stats.loops)
    if matched:
        per_loop = trips
    else:
        depths = list(depths) if depths else list(range(1, len(trips) + 1))
        queues: Dict[int, List[int]] = {}
        for t, d in zip(trips, depths):
            queues.setdefault(d, []).append(t)
        per_loop = [queues[lp["depth"]].pop(0) if queues.get(lp["depth"]) else 1 for lp in stats.loops]
    w = []
    for addr in stats.instr_addrs:
        prod = 1
        for lp, t in zip(stats.loops, per_loop):
            if lp["head"] <= addr <= lp["tail"]:
                prod *= t
        w.append(prod)
    return w, matched


#: The dependent-issue bound's constants (:mod:`resfast.profiling.sm90`), by name.
LATENCY_CONSTANTS = {"DEP_CPI": DEP_CPI, "SYNC_CYCLES": SYNC_CYCLES, "LOAD_ROUND_CYCLES": LOAD_ROUND_CYCLES,
                     "LAUNCH_US": LAUNCH_US}


def latency_bound_us(per_warp: float, syncs: float, rounds: float, per_sm: int, blocks_per_sm: int,
                     constants: Optional[Dict[str, float]] = None) -> float:
    """The dependent-issue bound: one warp's own path through the kernel, which no other warp
    can shorten. Each of its ``per_warp`` instructions takes :data:`DEP_CPI` cycles on average
    (a warp issues its next instruction only when the operands are ready, and these kernels'
    inner loops are chains), each CTA barrier :data:`SYNC_CYCLES`, each load round
    (:func:`load_rounds`) :data:`LOAD_ROUND_CYCLES` of memory latency. Programs beyond the
    ``blocks_per_sm`` resident ones run in later waves, one path after the other; plus
    :data:`LAUNCH_US` per launch. The four constants are fitted to a GPU profile
    (``benchmarks/static_calibrate.py``, which passes trial values as ``constants``), so this
    bound is a calibrated prediction."""
    c = LATENCY_CONSTANTS if constants is None else constants
    waves = math.ceil(per_sm / max(1, blocks_per_sm))
    cycles = c["DEP_CPI"] * per_warp + c["SYNC_CYCLES"] * syncs + c["LOAD_ROUND_CYCLES"] * rounds
    return waves * cycles / (CLOCK_GHZ * 1e3) + c["LAUNCH_US"]


def predict(stats: KernelStats, grid: Sequence[int], loop_trips: Sequence[int], hbm_bytes: int,
            bandwidth: float = H100, loop_depths: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """The model's figures for one bound launch."""
    programs = 1
    for g in grid:
        programs *= g
    weights, matched = _weights(stats, loop_trips, loop_depths)
    per_warp = sum(weights)
    per_sm = math.ceil(programs / SMS)
    # each of the SM's 4 schedulers issues one warp-instruction per clock, and one warp sits on one
    # scheduler: fewer than 4 warps on the SM leave schedulers idle (ceil, not a fraction)
    issue_us = math.ceil(per_sm * stats.num_warps / ISSUE_PER_CLK) * per_warp / (CLOCK_GHZ * 1e3)
    w_by_addr = dict(zip(stats.instr_addrs, weights))
    macs = sum(m * w_by_addr.get(a, 1) for a, _, m in stats.mma_ops) * stats.num_warps
    rate = WGMMA_MACS_PER_CLK if stats.mma == "wgmma" else MMA_SYNC_MACS_PER_CLK
    mma_us = per_sm * macs / rate / (CLOCK_GHZ * 1e3)
    floor_us = hbm_bytes / bandwidth * 1e6
    blocks, occ = occupancy(stats.regs, stats.smem_bytes, stats.num_warps)
    syncs = sum(w_by_addr.get(a, 1) for a in stats.sync_addrs)
    rounds = sum(w_by_addr.get(a, 1) for a in stats.round_addrs)
    latency_us = latency_bound_us(per_warp, syncs, rounds, per_sm, blocks)
    throughput_us = max(issue_us, mma_us, floor_us)
    return {
        "regs": stats.regs, "spills": stats.spills, "smem_bytes": stats.smem_bytes, "occupancy": round(occ, 3),
        "blocks_per_sm": blocks, "mma": stats.mma, "programs": programs, "warp_instructions": per_warp,
        "syncs": syncs, "load_rounds": rounds,
        "issue_us": round(issue_us, 2), "mma_us": round(mma_us, 2), "floor_us": round(floor_us, 2),
        "floor_h200_us": round(hbm_bytes / H200 * 1e6, 2),
        "latency_us": round(latency_us, 2), "throughput_us": round(throughput_us, 2),
        "predicted_us": round(max(throughput_us, latency_us), 2),
        "hbm_bytes": hbm_bytes, "loops_planned": len(loop_trips), "loops_sass": len(stats.loops),
        "loops_matched": matched,
    }


def _meta_inputs(s: ConvShape, dtype, device: str = "meta"):
    """``s``'s tensors: ``empty`` on ``meta``; elsewhere (a GPU timing a plan's launches)
    random activations and gradients, per-channel vectors in ``[0.5, 1.5)`` (a valid
    inverse std), so every kernel reads finite data."""
    import torch

    cl = torch.channels_last
    make = torch.empty if device == "meta" else torch.randn
    x = make(s.n, s.c, s.h, s.w, dtype=dtype, device=device).contiguous(memory_format=cl)
    w = (make(s.co, s.c // s.groups, s.k, s.k, dtype=dtype, device=device) * (1.0 if device == "meta" else 0.1)
         ).contiguous(memory_format=cl)
    ho, wo = s.out_hw
    gy = make(s.n, s.co, ho, wo, dtype=dtype, device=device).contiguous(memory_format=cl)
    if device == "meta":
        vec = lambda: torch.empty(s.c, dtype=torch.float32, device=device)  # noqa: E731
    else:
        vec = lambda: torch.rand(s.c, dtype=torch.float32, device=device) + 0.5  # noqa: E731
    return x, w, gy, vec


def training_plan(s: ConvShape, dtype=None, device: str = "meta") -> Dict[str, list]:
    """The launches of one training forward and backward of the fused op on ``s`` (meta
    tensors; on ``device`` with random data to time them there)."""
    import torch

    from resfast.ops import triton_ops

    dtype = dtype or torch.bfloat16
    x, w, gy, vec = _meta_inputs(s, dtype, device)
    bw, bb, mean, invstd, rm, rv = (vec() for _ in range(6))
    conv = ([s.stride] * 2, [s.pad] * 2, [1, 1], s.groups)
    fwd = (triton_ops.launch_plan("bn_stats_update", x, rm, rv, 0.1, 1e-5)
           + triton_ops.launch_plan("bn_relu_conv2d", x, w, None, bw, bb, mean, invstd, *conv, True))
    bwd = (triton_ops.launch_plan("bn_relu_conv2d_backward", gy, x, w, bw, bb, mean, invstd, *conv, False)
           + triton_ops.launch_plan("bn_backward_elemt", x, x, bw, mean, invstd, vec(), vec(),
                                    1.0 / (s.n * s.h * s.w)))
    # Statistics in the epilogue. As a consumer, x's statistics come from the epilogue of the op
    # that wrote x: one finalize, no pass over x. As a producer, the conv also takes its
    # output's statistics (what that costs the conv is the op's "epilogue_us").
    # The chained consumer only where the blocks chain (the planner's rule for the producer,
    # taken as a conv like this one: ResNeXt's grouped convs); elsewhere (DenseNet's shared
    # block and WRN's blocks, ungrouped) the consumer is what the block runs, the plain forward.
    partials = torch.zeros([3, triton_ops.STATS_ROWS, s.c], dtype=torch.float32, device=device)
    if triton_ops.stats_epilogue_pays(s.groups):
        consumer = (triton_ops.launch_plan("bn_stats_merge_update", partials, s.n * s.h * s.w, rm, rv, 0.1, 1e-5)
                    + triton_ops.launch_plan("bn_relu_conv2d", x, w, None, bw, bb, mean, invstd, *conv, True))
    else:
        consumer = (triton_ops.launch_plan("bn_stats_update", x, rm, rv, 0.1, 1e-5)
                    + triton_ops.launch_plan("bn_relu_conv2d", x, w, None, bw, bb, mean, invstd, *conv, True))
    producer = [launch for launch in triton_ops.launch_plan("bn_relu_conv2d_stats", x, w, None, bw, bb, mean,
                                                            invstd, *conv, True)]
    return {"fwd": fwd, "bwd": bwd, "fwd_consumer": consumer, "fwd_producer": producer}


def predict_bound(launch, bound, bandwidth: float = H100) -> Dict[str, Any]:
    """:func:`predict`'s figures for ``launch`` bound to one config (``launch.bind(cfg)``):
    compiled for sm_90 as the runtime would, its cubin analysed, its loops' trips from the
    plan. Raises if the config does not compile."""
    stats = analyze(compile_for_sm90(getattr(bound, "fn", None) or launch.fn, bound.args, bound.constexprs))
    hbm = launch.hbm_bytes if bound.hbm_bytes is None else bound.hbm_bytes
    depths = [bound.depths.get(name, 1) for name in bound.loops]
    return predict(stats, bound.grid, list(bound.loops.values()), hbm, bandwidth, depths)


def predict_kernels(shapes: Iterable[ConvShape], all_configs: bool = True, bandwidth: float = H100,
                    progress=None) -> List[Dict[str, Any]]:
    """One record per (shape, kernel): the best config's figures, every config's in ``configs``."""
    records = []
    for s in shapes:
        plan = training_plan(s)
        for phase, launches in plan.items():
            for launch in launches:
                configs = list(launch.configs) if all_configs else list(launch.configs[:1])
                rows = []
                for cfg in configs:
                    bound = launch.bind(cfg)
                    if min(bound.grid) <= 0:
                        continue  # not launched with this config
                    if progress:
                        progress(f"{s.name}: {launch.name} [{cfg.label}]")
                    try:
                        row = predict_bound(launch, bound, bandwidth)
                    except Exception as exc:  # a config that does not compile is reported, never chosen
                        rows.append({"config": cfg.label, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                     "predicted_us": float("inf")})
                        continue
                    row.update(config=cfg.label, loops=bound.loops, derived=bound.derived)
                    rows.append(row)
                if not rows:
                    continue
                # the fastest config without spills, if any (zero spills is a target)
                clean = [r for r in rows if r.get("spills") == 0] or rows
                best = min(clean, key=lambda r: r["predicted_us"])
                # bind the chosen config last, as the tuner's last launch is the chosen one: a
                # later launch of the plan (the gradient finalize) reads the buffers it allocates
                chosen = [cfg for cfg in configs if cfg.label == best["config"]]
                if chosen:
                    launch.bind(chosen[0])
                rec = {"shape": s.name, "kernel": launch.name, "backend": "triton", "phase": phase}
                rec.update({k: v for k, v in best.items()})
                rec["configs"] = [{k: r.get(k) for k in ("config", "regs", "spills", "smem_bytes", "mma", "issue_us",
                                                         "mma_us", "floor_us", "latency_us", "predicted_us", "error")}
                                  for r in rows]
                records.append(rec)
    return records


def predict_ops(shapes: Iterable[ConvShape], kernels: List[Dict[str, Any]], bandwidth: float = H100
                ) -> List[Dict[str, Any]]:
    """Per shape: fused predicted sum (forward, backward, total), eager's floor, the ratio."""
    ops = []
    for s in shapes:
        ks = [k for k in kernels if k["shape"] == s.name and k.get("backend") == "triton"]
        fwd = sum(k["predicted_us"] for k in ks if k["phase"] == "fwd")
        bwd = sum(k["predicted_us"] for k in ks if k["phase"] == "bwd")
        consumer = sum(k["predicted_us"] for k in ks if k["phase"] == "fwd_consumer")
        # the plain forward's conv (with the BN-ReLU pass of a wide group's forward from stored
        # activations, whose producer keeps the masked kernel)
        conv_fwd = sum(k["predicted_us"] for k in ks
                       if k["phase"] == "fwd" and k["kernel"] in ("conv_fwd", "bn_relu_a"))
        producer = sum(k["predicted_us"] for k in ks if k["phase"] == "fwd_producer")
        eager = eager_floor_bytes(s)
        fused = fused_floor_bytes(s)
        eager_us = eager["total"] / bandwidth * 1e6
        eager_mma_us = 3 * useful_macs(s) / (WGMMA_MACS_PER_CLK * SMS) / (CLOCK_GHZ * 1e3)
        total = fwd + bwd
        ops.append({
            "shape": s.name, "fused_us": round(total, 2), "fused_fwd_us": round(fwd, 2),
            "fused_bwd_us": round(bwd, 2), "fused_floor_us": round(fused["total"] / bandwidth * 1e6, 2),
            "eager_floor_us": round(eager_us, 2), "eager_fwd_floor_us": round(eager["fwd"] / bandwidth * 1e6, 2),
            "eager_mma_floor_us": round(eager_mma_us, 2),
            "ratio": round(eager_us / total, 3) if total else None,
            "launches_fwd": sum(1 for k in ks if k["phase"] == "fwd"),
            "launches_bwd": sum(1 for k in ks if k["phase"] == "bwd"),
            # in a block whose previous op took x's statistics in its epilogue: fwd+bwd and ratio
            "fused_chained_us": round(consumer + bwd, 2) if consumer else None,
            "ratio_chained": round(eager_us / (consumer + bwd), 3) if consumer else None,
            "launches_fwd_chained": sum(1 for k in ks if k["phase"] == "fwd_consumer"),
            # what taking the output's statistics in the epilogue adds to the conv (a producer)
            "epilogue_us": round(producer - conv_fwd, 2) if producer else None,
            "all_mma": all(k["mma"] != "none" for k in ks if k["kernel"] in CONV_MMA_KERNELS),
            "zero_spills": all(k["spills"] == 0 for k in ks),
        })
    return ops

# ----------------------------------------------------------------------------- measured results


def measured(results_dir: str) -> Dict[str, Any]:
    """Measured op times of the newest recorded GPU run in ``results_dir`` (a
    ``gpu_check.sh`` results file, schema ``resfast-gpu-check/1``, or a
    ``gpu_kernels_check.py`` one, ``resfast-gpu-kernels/1``), keyed by our shape name:
    ``{"source": {...}, "shapes": {name: {mode: {row: seconds}}}}``. Files are named
    ``<date>-<gpu>[-kernels].json``: the newest date wins, and of one date's files the
    ``gpu_check.sh`` one (its eager, triton and native rows share one timing method)."""
    docs = []
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        schema = doc.get("schema", "") if isinstance(doc, dict) else ""
        if schema.startswith(("resfast-gpu-check", "resfast-gpu-kernels")):
            docs.append(((os.path.basename(path)[:10], schema.startswith("resfast-gpu-check"),
                          os.path.basename(path)), path, doc))
    for _, path, doc in sorted(docs, key=lambda d: d[0], reverse=True):
        env = doc.get("environment", {})
        by_shape: Dict[str, Dict[str, Dict[str, float]]] = {}
        for row in doc.get("benchmarks", []):  # gpu_check.sh
            if row.get("kind") != "op" or "params" not in row:
                continue
            p = row["params"]
            n, c, h, w = p.get("shape", [0, 0, 0, 0])
            for s in SHAPES.values():
                if (s.n, s.c, s.h, s.w, s.co, s.k, s.stride) == (n, c, h, w, p.get("out_channels"), p.get("kernel"),
                                                                   1) and s.groups == p.get("groups"):
                    by_shape.setdefault(s.name, {}).setdefault(p.get("mode"), {})[row.get("row")] = row.get("median_s")
        for row in doc.get("timing", []):  # gpu_kernels_check.py
            if row.get("median_s") and row.get("shape") in SHAPES:
                by_shape.setdefault(row["shape"], {}).setdefault(row["mode"], {})[row["impl"]] = row["median_s"]
        return {"source": {"file": os.path.basename(path), "gpu": env.get("gpu_name") or env.get("gpu"),
                           "commit": env.get("commit") or env.get("git_commit"), "date": env.get("date")},
                "shapes": by_shape}
    return {}

# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--static", action="store_true", help="the static sm_90 model (the only mode; no GPU needed)")
    p.add_argument("--shapes", default="all",
                   help=f"comma-separated shape names, 'ci' ({', '.join(CI_SHAPES)}) or 'all' (default): "
                        f"{', '.join(SHAPES)}")
    p.add_argument("--first-config", action="store_true",
                   help="compile only each kernel's first tile config (quicker; default: every config)")
    p.add_argument("--bandwidth", choices=("h100", "h200"), default="h100",
                   help="HBM bandwidth of the floor (h100 3.35 TB/s, default; h200 4.8 TB/s)")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="recorded GPU results to print beside the predictions (default: benchmarks/results)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def run(args: argparse.Namespace) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    if "triton" in sys.modules and _interpreting():
        raise ValueError("the static model compiles for sm_90: run it without TRITON_INTERPRET=1")
    names = CI_SHAPES if args.shapes == "ci" else (list(SHAPES) if args.shapes == "all" else
                                                    [n.strip() for n in args.shapes.split(",") if n.strip()])
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        raise ValueError(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}" if unknown else
                         f"--shapes {args.shapes!r} names no shape; known: 'ci', 'all', {', '.join(SHAPES)}")
    if args.results is not None and not os.path.isdir(args.results):
        raise ValueError(f"--results {args.results!r} is not a folder (of recorded GPU results, *.json)")
    shapes = [SHAPES[n] for n in names]
    bw = H200 if args.bandwidth == "h200" else H100
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    kernels = predict_kernels(shapes, all_configs=not args.first_config, bandwidth=bw, progress=log)
    try:
        from resfast.profiling import static_native  # type: ignore[attr-defined]
    except ImportError:
        static_native = None
    if static_native is not None:
        kernels += list(static_native.native_kernels(shapes))
    ops = predict_ops(shapes, kernels, bw)
    results_dir = args.results or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "benchmarks", "results")
    meas = measured(results_dir) if os.path.isdir(results_dir) else {}
    for op in ops:
        m = meas.get("shapes", {}).get(op["shape"])
        if m:
            op["measured"] = {"source": meas["source"], "times_s": m}
    doc = {"model": {"gpu": "H100/H200 SXM (sm_90)", "sms": SMS, "clock_ghz": CLOCK_GHZ,
                     "issue_per_clk": ISSUE_PER_CLK, "bandwidth_tbs": bw / 1e12, "dtype": "bfloat16",
                     "layout": "channels_last", "all_figures": "predicted unless under 'measured'",
                     "triton": _triton_version()},
           "kernels": kernels, "ops": ops}
    if args.json:
        from resfast.cli import emit_json

        emit_json(doc)
    else:
        print(format_table(doc))
    return 0


def _interpreting() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _chained_cell(op: Dict[str, Any]) -> str:
    if not op.get("fused_chained_us"):
        return f"{'-':>10} {'-':>7} {'-':>9}"
    return (f"{op['fused_chained_us']:>7.1f} us {op['ratio_chained']:>6.2f}x "
            f"{op.get('epilogue_us') or 0:>+6.1f} us")


def format_table(doc: Dict[str, Any]) -> str:
    """The human-readable report (all figures predicted, except the labelled measured column)."""
    lines = ["Static sm_90 model (PREDICTED; H100 SXM floor at %.2f TB/s unless --bandwidth h200)"
             % doc["model"]["bandwidth_tbs"], ""]
    hdr = f"{'shape':<22} {'kernel':<20} {'config':<44} {'regs':>4} {'spill':>5} {'smem':>6} {'occ':>5} " \
          f"{'mma':>8} {'issue':>8} {'mma_us':>8} {'floor':>8} {'latency':>8} {'pred':>8}"
    lines.append(hdr)
    for k in doc["kernels"]:
        lines.append(f"{k['shape']:<22} {k['kernel']:<20} {str(k.get('config', ''))[:44]:<44} {k.get('regs', 0):>4} "
                     f"{k.get('spills', 0):>5} {k.get('smem_bytes', 0):>6} {k.get('occupancy', 0):>5.2f} "
                     f"{k.get('mma', ''):>8} {k.get('issue_us', 0):>8.1f} {k.get('mma_us', 0):>8.1f} "
                     f"{k.get('floor_us', 0):>8.1f} {k.get('latency_us', 0):>8.1f} {k.get('predicted_us', 0):>8.1f}")
    lines += ["", f"{'shape':<22} {'fused fwd+bwd':>14} {'fused floor':>12} {'eager floor':>12} {'ratio':>7} "
                  f"{'launches':>9} {'chained':>10} {'ratio':>7} {'epilogue':>9}   measured (GPU run, other commit)"]
    for op in doc["ops"]:
        meas = ""
        if "measured" in op:
            src, t = op["measured"]["source"], op["measured"]["times_s"].get("fwd+bwd", {})
            parts = [f"{row} {v * 1e6:.0f} us" for row, v in sorted(t.items()) if v]
            meas = f"{', '.join(parts)} [{src.get('gpu')}, commit {src.get('commit')}]"
        lines.append(f"{op['shape']:<22} {op['fused_us']:>11.1f} us {op['fused_floor_us']:>9.1f} us "
                     f"{op['eager_floor_us']:>9.1f} us {op['ratio']:>6.2f}x {op['launches_fwd']}+{op['launches_bwd']:<7}"
                     f" {_chained_cell(op)}   {meas}")
    return "\n".join(lines)



def _triton_version() -> Optional[str]:
    """The version of the triton that compiled the kernels (None without triton)."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__

def main(argv: Optional[List[str]] = None) -> int:
    """``python -m resfast.profiling.static_model`` (same options as ``resfast profile --static``)."""
    p = argparse.ArgumentParser(prog="resfast profile", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
