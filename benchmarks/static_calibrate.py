"""Fit the static model's latency constants to a measured per-kernel GPU profile (no GPU needed).

    python benchmarks/static_calibrate.py [--results FILE [--results FILE ...]] [--json]

(default: every ``benchmarks/results/*-kernels.json`` with a per-kernel profile, fitted jointly)

The static sm_90 model (``resfast profile --static``) predicts each kernel as the largest of
its issue-bound, tensor-core and HBM-floor times (the *throughput* bounds) and a
*dependent-issue* bound: one warp's own path, ``DEP_CPI`` cycles per instruction it executes,
``SYNC_CYCLES`` per CTA barrier, ``LOAD_ROUND_CYCLES`` per round of global loads, times the
waves of programs, plus ``LAUNCH_US`` per launch
(:func:`resfast.profiling.static_model.latency_bound_us`). The throughput bounds need no
measurement; the four latency constants do. This script compiles the kernels of one profiled
training step for sm_90 with the configs the GPU's autotuner chose (run it with the GPU
machine's triton on ``PYTHONPATH`` for its SASS: ``PYTHONPATH=.venv/device-triton-3.6.0``),
counts per kernel the instructions, barriers and load rounds on a warp's path, and fits the
four constants to the profile's measured times (least squares on the log of predicted over
measured, constants >= 0). It prints the fit and, per kernel, measured beside predicted.
The fitted values live in :mod:`resfast.profiling.sm90`; this is how they were obtained.

The profile: ``gpu_kernels_check.py``'s ``profiles`` (``torch.profiler`` mean device time per
call, per shape, with the configs the autotuner chose), or in files before 2026-11-30 its one
``profile`` (ResNeXt-50 stage 1), whose chosen configs ``benchmarks/README.md`` lists for that
run (its ``triton-tune.json``): :data:`CHOSEN`. Kernels are bound with the grids the profiled
code launched: for :data:`BEFORE_FILL`'s files, the planner without its occupancy changes
(``resfast.ops.triton_ops.PLANNER_FILL``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List

#: The configs the H200's autotuner chose on 2026-11-29 (benchmarks/README.md, "Measured beside
#: predicted, per kernel"), for files whose profile does not record them (kernels with one
#: config need none). Files since 2026-11-30 carry them in each profile's ``configs``.
CHOSEN = {
    "2026-11-29-nvidia-h200-kernels.json": {
        "conv_fwd": "TILE_H=8,TILE_W=16,BLOCK_N=64,BLOCK_K=32,STACK=1,w8,s1,p2",
        "conv_bwd": "TILE_H=8,TILE_W=16,BLOCK_N=64,BLOCK_K=32,w4,s1,p4",
    },
}

#: Profiles of code before the planner's occupancy changes (the fill, 5 statistics programs per
#: SM; commit 9ceaaa0 and later): bound with the grids that ran.
BEFORE_FILL = {"2026-11-29-nvidia-h200-kernels.json"}

#: Profiles of code before the packed stride-1 input gradient had its own kernel (the merged
#: ``conv_bwd`` launch ran it; ``resfast.ops.triton_ops.PACKED_INPUT``): bound with that plan.
BEFORE_PACKED_INPUT = {"2026-11-29-nvidia-h200-kernels.json", "2026-11-29b-nvidia-h200-kernels.json"}

#: Profiles of code before the stride-1 input gradient of ungrouped convs had its own kernel
#: (``resfast.ops.triton_ops.S1_INPUT``; DenseNet-121's 3x3): bound with that plan.
BEFORE_S1_INPUT = {"2026-11-29-nvidia-h200-kernels.json", "2026-11-29b-nvidia-h200-kernels.json"}

PARAMS = ("DEP_CPI", "SYNC_CYCLES", "LOAD_ROUND_CYCLES", "LAUNCH_US")


def config_from_label(label: str):
    """The tile config a label names (``"TILE_H=8,...,w4,s1,p4"``, :attr:`TileConfig.label`)."""
    from resfast.ops.triton_ops import TileConfig

    *meta, warps, stages, progs = label.split(",")
    pairs = tuple((k, int(v)) for k, v in (m.split("=") for m in meta))
    return TileConfig(pairs, int(warps[1:]), int(stages[1:]), int(progs[1:]))


def default_results(folder: str) -> List[str]:
    """Every kernels-check results file in ``folder`` that has a per-kernel profile."""
    import glob

    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*-kernels.json"))):
        with open(path) as f:
            doc = json.load(f)
        if any(p.get("kernels") for p in (doc.get("profiles") or [doc.get("profile") or {}])):
            out.append(path)
    return out


def _fn_name(fn) -> str:
    return getattr(fn, "__name__", None) or fn.fn.__name__


def features(results: str) -> List[Dict[str, Any]]:
    """Per profiled kernel (every shape of the file's ``profiles``, or its one ``profile``):
    the measured time and the model's counts for the config the autotuner chose. A kernel
    function that two launches of one step share (a split backward) is left out: its
    profiled mean mixes them."""
    from resfast.profiling import static_model as sm

    from resfast.ops import triton_ops

    with open(results) as f:
        doc = json.load(f)
    records = doc.get("profiles") or [doc["profile"]]
    triton_ops.PLANNER_FILL = os.path.basename(results) not in BEFORE_FILL
    triton_ops.PACKED_INPUT = os.path.basename(results) not in BEFORE_PACKED_INPUT
    triton_ops.S1_INPUT = os.path.basename(results) not in BEFORE_S1_INPUT
    rows = []
    for i, prof in enumerate(records):
        if not prof.get("kernels") or prof.get("shape") not in sm.SHAPES:
            continue
        chosen = prof.get("configs") or (CHOSEN.get(os.path.basename(results), {}) if i == 0 else {})
        plan = sm.training_plan(sm.SHAPES[prof["shape"]])
        launches = plan["fwd"] + plan["bwd"]
        fns = [_fn_name(getattr(ln.bind(ln.configs[0]), "fn", None) or ln.fn) for ln in launches]
        for launch, fn in zip(launches, fns):
            if fn not in prof["kernels"] or fns.count(fn) > 1:
                continue
            configs = list(launch.configs)
            if len(configs) == 1:
                cfg = configs[0]
            elif chosen.get(launch.name):  # the config as it ran, even if the list has changed since
                cfg = config_from_label(chosen[launch.name])
            else:  # the choice is not known: not calibration data
                continue
            rec = sm.predict_bound(launch, launch.bind(cfg), sm.H200)
            rows.append({"shape": prof["shape"], "kernel": launch.name, "config": cfg.label,
                         "measured_us": prof["kernels"][fn]["mean_us"], "throughput_us": rec["throughput_us"],
                         "per_sm": math.ceil(rec["programs"] / sm.SMS), "blocks_per_sm": rec["blocks_per_sm"],
                         "warp_instructions": rec["warp_instructions"], "syncs": rec["syncs"],
                         "load_rounds": rec["load_rounds"], "regs": rec["regs"], "spills": rec["spills"]})
    return rows


def latency_us(row: Dict[str, Any], p: Dict[str, float]) -> float:
    """The model's dependent-issue bound of a profiled kernel with trial constants ``p``."""
    from resfast.profiling.static_model import latency_bound_us

    return latency_bound_us(row["warp_instructions"], row["syncs"], row["load_rounds"], row["per_sm"],
                            row["blocks_per_sm"], p)


def predicted_us(row: Dict[str, Any], p: Dict[str, float]) -> float:
    return max(row["throughput_us"], latency_us(row, p))


def fit(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    """Least squares on log(predicted / measured) over the four constants (each >= 0)."""
    import numpy as np
    from scipy.optimize import minimize

    def loss(v):
        p = dict(zip(PARAMS, np.abs(v)))
        return sum(math.log(predicted_us(r, p) / r["measured_us"]) ** 2 for r in rows)

    best = None
    for start in ([4, 100, 500, 2], [8, 200, 1000, 3], [2, 50, 1500, 1], [6, 0, 800, 3]):
        res = minimize(loss, np.array(start, dtype=float), method="Nelder-Mead",
                       options={"xatol": 1e-4, "fatol": 1e-10, "maxiter": 20000})
        if best is None or res.fun < best.fun:
            best = res
    return {k: float(abs(v)) for k, v in zip(PARAMS, best.x)}


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", action="append", default=None, metavar="FILE",
                    help="a gpu_kernels_check results JSON; repeat to fit several runs jointly (default: every "
                         "benchmarks/results/*-kernels.json)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.dirname(here))
    import triton

    from resfast.profiling import sm90

    files = args.results or default_results(os.path.join(here, "results"))
    rows = [dict(r, run=os.path.basename(f)) for f in files for r in features(f)]
    p = fit(rows)
    current = {k: getattr(sm90, k) for k in PARAMS}
    for i, r in enumerate(rows):
        # leave-one-out: the constants fitted to the other kernels, this one predicted
        r["predicted_loo_us"] = round(predicted_us(r, fit(rows[:i] + rows[i + 1:])), 2)
        r["latency_fit_us"] = round(latency_us(r, p), 2)
        r["predicted_fit_us"] = round(predicted_us(r, p), 2)
        r["predicted_current_us"] = round(predicted_us(r, current), 2)
    doc = {"triton": triton.__version__, "results": [os.path.basename(f) for f in files], "fit": p,
           "current": current, "kernels": rows}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"triton {triton.__version__}; profiles {', '.join(doc['results'])} ({len(rows)} kernels)")
    print("fit:     " + ", ".join(f"{k}={v:.3g}" for k, v in p.items()))
    print("current: " + ", ".join(f"{k}={v:.3g}" for k, v in current.items()) + "  (resfast/profiling/sm90.py)")
    print(f"{'shape':<16} {'kernel':<20} {'waves':>5} {'instr/warp':>10} {'syncs':>6} {'rounds':>6} {'throughput':>10} "
          f"{'measured':>9} {'fit':>8} {'fit/meas':>8} {'current':>8} {'left out':>9}")
    for r in rows:
        print(f"{r['shape']:<16} {r['kernel']:<20} {math.ceil(r['per_sm'] / max(1, r['blocks_per_sm'])):>5} {r['warp_instructions']:>10} {r['syncs']:>6} {r['load_rounds']:>6} "
              f"{r['throughput_us']:>8.1f}us {r['measured_us']:>7.1f}us {r['predicted_fit_us']:>6.1f}us "
              f"{r['predicted_fit_us'] / r['measured_us']:>7.2f}x {r['predicted_current_us']:>6.1f}us "
              f"{r['predicted_loo_us'] / r['measured_us']:>8.2f}x")
    print("left out: predicted / measured with the constants fitted to the other kernels")
    for name, key in (("fit", "predicted_fit_us"), ("current", "predicted_current_us"), ("left out", "predicted_loo_us")):
        ratios = [r[key] / r["measured_us"] for r in rows]
        within = sum(1 / 1.5 <= x <= 1.5 for x in ratios)
        print(f"{name:>8}: {min(ratios):.2f}-{max(ratios):.2f}x measured, {within} of {len(rows)} within 1.5x, "
              f"rms log error {math.sqrt(sum(math.log(x) ** 2 for x in ratios) / len(ratios)):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
