"""Static performance model of the native CUDA kernels (``resfast._C``) on sm_90, without a GPU.

:func:`native_kernels` compiles the tiled conv kernels of ``csrc/`` for sm_90 with nvcc
(``csrc/tools/static_probe.cu``: the bfloat16 tensor-core kernels, plus a host program that
prints the plans the CUDA host code launches for a conv, from the same ``tiles.h`` functions),
reads their SASS, registers, spills and shared memory (``cuobjdump``, ``ptxas -v``) and predicts
each kernel's time on an H100 / H200 SXM:

* ``issue_us``: the warp-instructions the busiest SM issues (``ceil(blocks / 132)`` blocks: a
  grid of fewer blocks than SMs leaves SMs idle), over 4 warp-instructions per clock x 1.755 GHz. A block's instructions are counted from the SASS loop by loop: an innermost
  loop's own instructions per unit of work it does (an ``HMMA``, a staged 16-byte row vector, a
  staged weight, a 16-byte output vector) times the units the plan gives the block; the own
  code of the loops that hold loops as often as they run (the loop over a block's spatial tiles,
  the loop over K chunks inside it); code outside every loop once. Out-of-line paths the shapes
  do not take (per-element loads of non-channels_last tensors, the fallback for non-finite
  values, which cuobjdump lists after the kernel) and loops of paths they do not take count zero.
* ``mma_us``: the MACs the busiest SM's HMMA instructions issue (the zeros of block-diagonal
  packing included) over the mma.sync rate, 1024 MACs per clock per SM.
* ``floor_us``: the bytes the kernel must move at least (its inputs read once, its outputs
  written once) over 3.35 TB/s.
* ``predicted_us = max(issue_us, mma_us, floor_us)``, as ``resfast.profiling.static_model``
  predicts the triton kernels. All four are predictions, never measurements.

Compiled probes are cached by the hash of their sources under ``$RESFAST_STATIC_CACHE`` (default
``~/.cache/resfast/static_native``). Needs nvcc (12 or later, for sm_90) and cuobjdump (the CUDA
toolkit's, or the copy triton ships in ``triton/backends/nvidia/bin``).
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["SHAPES", "native_kernels", "NativeModelUnavailable", "ConvShape"]

# The machine and the shapes are the triton model's (one source for both models).
from resfast.profiling.sm90 import (  # noqa: E402
    CLOCK_GHZ, H100 as HBM_BYTES_PER_S, ISSUE_PER_CLK as ISSUE_PER_CLOCK, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM,
    MMA_SYNC_MACS_PER_CLK as MMA_SYNC_MACS_PER_CLOCK, REGS_PER_SM, SMEM_PER_SM, SMS as SM_COUNT, ConvShape,
    SHAPES as _ALL_SHAPES,
)

MACS_PER_HMMA = 16 * 8 * 16
SMEM_RESERVED_PER_BLOCK = 1024
ELEM_BYTES = 2  # bfloat16

# bfloat16, channels_last, batch 64, a subset of resfast.profiling.sm90.SHAPES:
# ResNeXt-50 32x4d's grouped 3x3 convs, DenseNet-121's bottleneck 1x1 (the last layer of block 1,
# 224 -> 128 at 56x56, and of block 2, 480 -> 128 at 28x28) and growth 3x3 (128 -> 32 at 56x56
# and 28x28).
SHAPES: Dict[str, ConvShape] = {name: _ALL_SHAPES[name] for name in (
    "resnext50_s1", "resnext50_s2", "resnext50_s3", "resnext50_s4", "densenet121_1x1", "densenet121_1x1_b2",
    "densenet121_3x3", "densenet121_3x3_b2")}

KERNELS = ("forward", "input_grad", "weight_grad")


class NativeModelUnavailable(RuntimeError):
    """nvcc, cuobjdump or the csrc/ sources are missing: the model cannot compile the kernels."""


def native_kernels(shapes: Union[None, Iterable[object], Mapping[str, ConvShape]] = None) -> List[dict]:
    """Predicted figures of the native kernels (forward, input gradient, weight gradient) for
    each shape: a list of records with the keys ``backend`` ("native"), ``shape``, ``kernel``,
    ``phase`` ("fwd" / "bwd"), ``config`` (the plan: tiles, channel blocking, grid), ``regs``,
    ``spills`` (bytes of spill stores), ``smem_bytes`` (dynamic shared memory per block),
    ``occupancy`` (resident warps per SM over 64), ``mma`` ("wgmma", "mma.sync" or "none"),
    ``issue_us``, ``mma_us``, ``floor_us`` and ``predicted_us`` (all predicted, see the module
    docstring).

    ``shapes``: names of :data:`SHAPES` (default: all of them), a mapping of names to
    :class:`ConvShape`, or shape objects with ``name, n, c, h, w, co, k, stride, groups`` and
    ``padding`` (None: k // 2) such as ``resfast.profiling.static_model.ConvShape``. Raises
    :class:`NativeModelUnavailable` without nvcc / cuobjdump.
    """
    selected: Dict[str, ConvShape] = {}
    if shapes is None:
        selected = dict(SHAPES)
    elif isinstance(shapes, Mapping):
        selected = dict(shapes)
    else:
        for item in shapes:
            if isinstance(item, str):
                if item not in SHAPES:
                    raise KeyError(f"unknown shape {item!r}; known: {sorted(SHAPES)}")
                selected[item] = SHAPES[item]
            else:  # any object with the fields of static_model.ConvShape
                selected[item.name] = item if isinstance(item, ConvShape) else ConvShape(
                    item.name, item.n, item.c, item.h, item.w, item.co, item.k, item.stride, item.groups,
                    getattr(item, "padding", None))
    probe = _probe()
    records = []
    for name, shape in selected.items():
        plans = probe.plans(shape)
        for kernel in KERNELS:
            records.append(_record(probe, name, shape, kernel, plans))
    return records


# ----------------------------------------------------------------------------- the probe


@dataclass
class _Function:
    name: str
    instrs: List[Tuple[int, str]]  # (address, instruction text without the trailing ';')
    regs: int = 0
    spills: int = 0


@dataclass
class _Probe:
    exe: Path
    functions: Dict[str, _Function] = field(default_factory=dict)

    def plans(self, s: ConvShape) -> dict:
        args = [s.n, s.c, s.h, s.w, s.co, s.k, s.k, s.stride, s.stride, s.pad, s.pad, 1, 1, s.groups]
        out = subprocess.run([str(self.exe), *map(str, args)], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise NativeModelUnavailable(f"the static probe failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def kernel(self, kernel: str, plan: dict) -> _Function:
        if kernel == "weight_grad":
            upw = plan["upw"]
            # the UPW the host dispatches (host.h dispatch_upw): kWgradUpwFullB for share 4,
            # else the smaller of the small and large kernels that holds upw
            pattern = r"wgrad_tile_kernelIN3c108BFloat16ELi(\d+)ELi[0-3]E"
            found = [f for f in self.functions.values() if re.search(pattern, f.name)]
            sizes = sorted({int(re.search(pattern, f.name).group(1)) for f in found})
            want = upw if plan["share"] == 4 else next(u for u in sizes if u >= upw)
            pattern = rf"wgrad_tile_kernelIN3c108BFloat16ELi{want}ELi{int(plan['share'])}E"
        else:
            ig = 1 if kernel == "input_grad" else 0
            whole = 1 if plan["tile"].get("S", 0) > 0 else 0  # whole-sample tiles: their own kernel
            res = 1 if plan["tile"].get("R", 0) else 0  # so are residue-class tiles
            pattern = rf"conv_tile_kernelIN3c108BFloat16ELb{ig}ELi{plan['nt']}ELb{whole}ELb{res}E"
        for f in self.functions.values():
            if re.search(pattern, f.name):
                return f
        raise NativeModelUnavailable(f"no kernel matching {pattern} in the probe's SASS")


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _tool(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent / name)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / name)
    try:
        import triton  # type: ignore

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for c in candidates:
        if c.exists():
            return str(c)
    return None


def _probe_sources(root: Path) -> List[Path]:
    files = [root / "csrc" / "tools" / "static_probe.cu", root / "csrc" / "cuda" / "conv_kernels.cuh"]
    files += sorted(Path(p) for p in glob.glob(str(root / "csrc" / "include" / "resfast" / "*.h")))
    return files


def _nvcc_command(nvcc: str, root: Path, out: Path) -> List[str]:
    from torch.utils.cpp_extension import include_paths

    torch_include = include_paths()[0]
    # The flags torch.utils.cpp_extension gives the extension's CUDA sources (setup.py), so the
    # probe's kernels are the extension's code.
    return [
        nvcc, "-std=c++20", "-O3", "-arch=sm_90", "--expt-relaxed-constexpr", "-Xptxas", "-v",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__", "-I", str(root / "csrc" / "include"), "-I", torch_include,
        "-o", str(out), str(root / "csrc" / "tools" / "static_probe.cu"),
    ]


_PROBE_CACHE: Dict[str, _Probe] = {}


def _probe() -> _Probe:
    root = _repo_root()
    sources = _probe_sources(root)
    if not sources[0].exists():
        raise NativeModelUnavailable(f"{sources[0]} is missing: the model needs the csrc/ sources of a checkout")
    nvcc, cuobjdump = _tool("nvcc"), _tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise NativeModelUnavailable(f"the native static model needs nvcc and cuobjdump (nvcc: {nvcc}, "
                                     f"cuobjdump: {cuobjdump})")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(version.encode())
    for f in sources:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    key = digest.hexdigest()[:16]
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    cache = Path(os.environ.get("RESFAST_STATIC_CACHE", Path.home() / ".cache" / "resfast" / "static_native")) / key
    exe, ptxas_log, sass_txt = cache / "static_probe", cache / "ptxas.txt", cache / "sass.txt"
    if not (exe.exists() and ptxas_log.exists() and sass_txt.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        cmd = _nvcc_command(nvcc, root, exe)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise NativeModelUnavailable(f"nvcc failed to compile the static probe:\n{proc.stderr[-4000:]}")
        ptxas_log.write_text(proc.stdout + proc.stderr)
        sass = subprocess.run([cuobjdump, "-sass", str(exe)], capture_output=True, text=True, timeout=600)
        if sass.returncode != 0:
            raise NativeModelUnavailable(f"cuobjdump failed: {sass.stderr.strip()}")
        sass_txt.write_text(sass.stdout)
    probe = _Probe(exe=exe, functions=_parse_sass(sass_txt.read_text()))
    _apply_ptxas(probe.functions, ptxas_log.read_text())
    _PROBE_CACHE[key] = probe
    return probe


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


def _parse_sass(text: str) -> Dict[str, _Function]:
    """Kernels' SASS by name. cuobjdump lists a kernel's out-of-line callees (the rare fallback,
    64-bit division helpers) after its own code, in the same listing: code from the first call
    target on is dropped, so each function holds the kernel's own instructions."""
    functions: Dict[str, _Function] = {}
    for chunk in re.split(r"\n\s*Function : ", text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        instrs = [(int(m.group(1), 16), m.group(2).strip()) for m in _INSTR.finditer(chunk)]
        targets = [int(m.group(1), 16) for _, t in instrs if _opcode(t).startswith("CALL")
                   for m in [re.search(r"\b0x([0-9a-f]+)\b", t)] if m]
        if targets:
            instrs = [(a, t) for a, t in instrs if a < min(targets)]
        functions[name] = _Function(name, instrs)
    return functions


def _apply_ptxas(functions: Dict[str, _Function], log: str) -> None:
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            continue
        if current is None or current not in functions:
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            functions[current].spills = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            functions[current].regs = int(m.group(1))


# ----------------------------------------------------------------------------- SASS loops


def _opcode(text: str) -> str:
    parts = text.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


@dataclass
class _Loop:
    start: int
    end: int
    children: List["_Loop"] = field(default_factory=list)
    own: List[str] = field(default_factory=list)  # opcodes not inside a child loop

    def count(self, prefix: str) -> int:
        return sum(1 for op in self.own if op.startswith(prefix))

    def has(self, *prefixes: str) -> bool:
        return any(self.count(p) for p in prefixes)


def _loops(f: _Function) -> List[_Loop]:
    """Natural loops from backward branches (a branch to an earlier address), nested by range."""
    spans: Dict[int, int] = {}
    for addr, text in f.instrs:
        if _opcode(text).startswith("BRA"):
            m = re.search(r"\b0x([0-9a-f]+)\b", text)
            if m and int(m.group(1), 16) <= addr:
                target = int(m.group(1), 16)
                spans[target] = max(spans.get(target, addr), addr)
    loops = [_Loop(s, e) for s, e in sorted(spans.items(), key=lambda se: (se[0], -se[1]))]
    roots: List[_Loop] = []
    stack: List[_Loop] = []
    for lp in loops:
        while stack and not (stack[-1].start <= lp.start and lp.end <= stack[-1].end):
            stack.pop()
        (stack[-1].children if stack else roots).append(lp)
        stack.append(lp)
    for lp in loops:
        inner = [(c.start, c.end) for c in lp.children]
        lp.own = [_opcode(t) for a, t in f.instrs
                  if lp.start <= a <= lp.end and not any(s <= a <= e for s, e in inner)]
    return loops


# ----------------------------------------------------------------------------- the model


def _record(probe: _Probe, name: str, s: ConvShape, kernel: str, plans: dict) -> dict:
    plan = plans[kernel]
    phase = "fwd" if kernel == "forward" else "bwd"
    if not plan["ok"]:
        return {"backend": "native", "shape": name, "kernel": kernel, "phase": phase,
                "config": "no tile plan fits: generic kernel", "regs": None, "spills": None, "smem_bytes": None,
                "occupancy": None, "mma": "none", "issue_us": None, "mma_us": None, "floor_us": _floor_us(s, kernel),
                "predicted_us": None}
    f = probe.kernel(kernel, plan)
    parts = _block_instructions(f, s, kernel, plan, plans)
    # The busiest SM's share: ceil(blocks / SMs) blocks (a grid of fewer blocks than SMs leaves
    # SMs idle; the triton model counts the same way).
    per_sm = math.ceil(plan["blocks"] / SM_COUNT)
    issue_us = parts["total"] * per_sm / (ISSUE_PER_CLOCK * CLOCK_GHZ * 1e3)
    mma_us = parts["hmma_count"] * per_sm * MACS_PER_HMMA / (MMA_SYNC_MACS_PER_CLOCK * CLOCK_GHZ * 1e3)
    floor_us = _floor_us(s, kernel)
    ops = {_opcode(t) for _, t in f.instrs}
    mma = "wgmma" if any(o.startswith("HGMMA") for o in ops) else (
        "mma.sync" if any(o.startswith("HMMA") for o in ops) else "none")
    return {
        "backend": "native",
        "shape": name,
        "kernel": kernel,
        "phase": phase,
        "config": _config(kernel, plan, f),
        "regs": f.regs,
        "spills": f.spills,
        "smem_bytes": plan["smem_bytes"],
        "occupancy": round(_occupancy(f.regs, plan["smem_bytes"], plans["threads"]), 4),
        "mma": mma,
        "issue_us": round(issue_us, 2),
        "mma_us": round(mma_us, 2),
        "floor_us": round(floor_us, 2),
        "predicted_us": round(max(issue_us, mma_us, floor_us), 2),
    }


def _config(kernel: str, p: dict, f: _Function) -> str:
    t = p["tile"]
    tile = f"tile {t['TH']}x{t['TW']} (halo {t['IH']}x{t['IW']})"
    if t.get("S", 0) > 0:
        tile = f"tile of {t['S']} whole sample(s) of {t['TH']}x{t['TW']} (halo {t['IH']}x{t['IW']} each)"
    if t.get("R", 0):
        tile = f"residue-class tile {t['TH']}x{t['TW']} (4 classes of {t['cmt']} m16 tiles, halo {t['IH']}x{t['IW']})"
    template = re.sub(r"^_ZN7resfast\d+", "", f.name).split("IN3c10")[0]
    if kernel == "weight_grad":
        return (f"{template} upw={p['upw']}: {tile}, {p['P']} group(s) per block, {p['bm']}x{p['bn']} channels, "
                f"{p['cblocks']} channel blocks x {p['splits']} splits over {p['items']} tiles, grid {p['blocks']}")
    return (f"{template} nt={p['nt']}: {tile}, {p['P']} group(s) per block, bn={p['bn']}, BK={p['BK']}, "
            f"{p['tpb']} tile(s) per block, grid {p['blocks']}")


def _occupancy(regs: int, smem: int, threads: int) -> float:
    warps = threads // 32
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK)
    blocks = min(by_regs, by_smem, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // warps)
    return blocks * warps / MAX_WARPS_PER_SM


def _floor_us(s: ConvShape, kernel: str) -> float:
    x = s.n * s.c * s.h * s.w
    ho, wo = s.out_hw
    y = s.n * s.co * ho * wo
    wts = s.co * (s.c // s.groups) * s.k * s.k
    elems = {"forward": x + y + wts, "input_grad": y + 2 * x + wts, "weight_grad": x + y + wts}[kernel]
    return elems * ELEM_BYTES / HBM_BYTES_PER_S * 1e6


def _block_instructions(f: _Function, s: ConvShape, kernel: str, p: dict, plans: dict) -> Dict[str, float]:
    """Warp-instructions one (average) block issues, from the SASS loops and the plan: per kind
    of loop and for the glue code, and their ``total``."""
    threads = plans["threads"]
    t = p["tile"]
    taps = s.k * s.k

    def warp_iters(thread_units: float) -> float:  # a thread-strided loop, in warp iterations
        return thread_units / 32.0

    if kernel == "weight_grad":
        items = p["items"] / p["splits"]
        units = {
            "hmma": items * (t["MP"] // 16) * p["units"] * 2,
            "stage_plain": warp_iters(items * t["MP"] * (p["bm"] // 8)),
            "stage_act": warp_iters(items * t["IH"] * t["IW"] * (p["bn"] // 8)),
        }
        outer_trips = [items]  # the loop over tiles
    else:
        input_grad = kernel == "input_grad"
        cg_k = (s.co if input_grad else s.c) // s.groups
        k_range = p["P"] * cg_k if p["P"] > 1 else cg_k
        chunks = math.ceil(k_range / p["BK"])
        tiles = p["spatial"] / (p["blocks"] / p["cblocks"])
        staged = t.get("staged", t["IH"] * t["IW"]) * (p["BK"] // 8)  # all of a tile's halos
        weight_fills = 1 if chunks == 1 else tiles * chunks
        # residue-class tiles: each tap reaches one class, whose warp runs cmt m16 tiles
        mtiles = t["cmt"] if t.get("R", 0) else t["MP"] // 16
        units = {
            "hmma": tiles * chunks * taps * (p["BK"] // 16) * p["nt"] * mtiles,
            "stage_plain" if input_grad else "stage_act": warp_iters(tiles * chunks * staged),
            "weights": warp_iters(weight_fills * taps * p["bn"] * p["BK"] / 8),  # 16-byte copies
            "store_vec": warp_iters(tiles * t["M"] * (p["bn"] // 8)),
        }
        outer_trips = [tiles, tiles * chunks]  # the loops over tiles and over K chunks
    # Per kind of loop: instructions per unit over all its loops (an unrolled loop and its
    # remainder loops do the same work), times the units the block does.
    own: Dict[str, int] = {}
    per: Dict[str, int] = {}
    in_loops = 0
    glue = 0.0
    loops = _loops(f)
    depth = {id(lp): 0 for lp in loops}
    for lp in loops:
        for c in lp.children:
            depth[id(c)] = depth[id(lp)] + 1
    for lp in loops:
        in_loops += len(lp.own)
        kind, unit_count = _classify(lp)
        if kind is None:
            # a loop holding loops: the tile loop, the K-chunk loop inside it (deeper ones: as
            # often as the K-chunk loop)
            d = min(depth[id(lp)], len(outer_trips) - 1)
            glue += len(lp.own) * outer_trips[d] * plans["warps"]
        elif kind != "skip":
            own[kind] = own.get(kind, 0) + len(lp.own)
            per[kind] = per.get(kind, 0) + unit_count
    # The input gradient holds two MMA loops (tiles.h, conv_mma_chunk): the zero-row select loop
    # for strided convs and the unit-stride loop; only the one the shape takes runs. Other
    # kernels (and residue-class tiles) have one MMA loop: count it whatever it reads.
    if kernel == "input_grad" and s.stride > 1 and "hmma_select" in own:
        units["hmma_select"], units["hmma"] = units["hmma"], 0.0
    elif kernel != "input_grad" and "hmma_select" in own:
        own["hmma"] = own.get("hmma", 0) + own.pop("hmma_select")
        per["hmma"] = per.get("hmma", 0) + per.pop("hmma_select")
    parts = {k: own[k] / per[k] * units.get(k, 0.0) for k in own if per[k]}
    # code outside every loop: once per block in each warp
    parts["glue"] = glue + (len(f.instrs) - in_loops) * plans["warps"]
    parts["total"] = sum(parts.values())
    parts["hmma_count"] = units["hmma"] + units.get("hmma_select", 0.0)  # HMMA instructions (all warps)
    return parts


def _classify(lp: _Loop) -> Tuple[Optional[str], int]:
    """What an inner loop does, by its own instructions, and how many units one iteration does.

    Loops that hold other loops (tiles, K chunks, taps; their own code may hold a peeled first
    iteration of an inner loop) are glue: (None, 0)."""
    if lp.has("HMMA") and not lp.children:
        # The input gradient of a strided conv runs the zero-row select loop, which reads the
        # per-tap row tables from constant memory (LDC); the unit-stride loop does not.
        return ("hmma_select" if lp.has("LDC") else "hmma"), lp.count("HMMA")
    if lp.children:
        return None, 0
    if lp.has("LDGSTS"):
        return "weights", lp.count("LDGSTS")  # the prepared weights' 16-byte copies
    if lp.has("LDG.E.128") and lp.has("STS"):
        # a staging loop's 16-byte path: one 16-byte global load per staged row vector
        bn_math = lp.has("FMNMX") or lp.has("FFMA") or lp.has("FMUL")
        return ("stage_act" if bn_math else "stage_plain"), lp.count("LDG.E.128")
    if lp.has("STS.128") and lp.has("LDG"):
        return "skip", 0  # the per-element load path (strided / unaligned tensors)
    if lp.has("STG.E.128"):
        return "store_vec", lp.count("STG.E.128")
    if lp.has("STG"):
        return "skip", 0  # the per-element store path
    return "skip", 0
