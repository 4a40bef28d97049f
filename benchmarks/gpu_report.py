"""Ratios, bandwidth figures, environment and summaries of resfast benchmark runs.

Used three ways:

* by ``benchmarks/conftest.py``, which adds each row's ratios to ``extra_info`` and prints
  the side-by-side table at the end of ``pytest benchmarks``;
* by ``benchmarks/gpu_check.sh`` through its command line::

      python benchmarks/gpu_report.py env                    # environment JSON on stdout
      python benchmarks/gpu_report.py summary OUTDIR         # OUTDIR/summary.txt + OUTDIR/<date>-<gpu>.json
      python benchmarks/gpu_report.py markdown RESULTS.json  # the table for benchmarks/README.md

* by ``tests/test_gpu_check.py`` (CI), on synthetic inputs.

The rendering and ratio functions need neither torch nor a GPU; only ``environment()`` imports
torch. A benchmark row is an entry of pytest-benchmark's JSON (``group``, ``name``,
``extra_info``, ``stats``); the benchmarks put these keys into ``extra_info``:

``row``       the column it belongs to: ``eager``, ``compile``, ``triton``, ``native``, or
              ``<memory mode>/<backend>`` for the dense-block memory rows;
``kind``      ``op``, ``block``, ``model`` or ``memory``;
``baseline``  the ``row`` its group's ratios are taken against (``eager``, ``naive/eager``);
``bytes_moved`` (memory-bound rows) the fewest bytes the op must move: ``x`` read once and
              ``y`` written once;
``peak_bytes`` (memory rows) the peak memory of a training step.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "BACKEND_COLUMNS",
    "PEAK_HBM_BYTES_PER_S",
    "TARGETS",
    "achieved_bandwidth",
    "add_ratios",
    "bandwidth_fraction",
    "build_results",
    "environment",
    "evaluate_targets",
    "format_time",
    "load_benchmark_json",
    "markdown_table",
    "parse_junit",
    "peak_bandwidth",
    "read_phases",
    "read_skips",
    "render_bench_table",
    "render_summary",
    "results_filename",
]

# HBM bandwidth from the vendors' datasheets, matched on the lower-cased GPU name: every
# substring of a key must occur in it; the first matching key wins. ``None`` marks a part
# whose bound we do not know (an H100 NVL is neither the SXM nor the PCIe figure).
PEAK_HBM_BYTES_PER_S: Tuple[Tuple[Tuple[str, ...], Optional[float]], ...] = (
    (("h100", "nvl"), None),
    (("h100", "pcie"), 2.0e12),
    (("h100",), 3.35e12),  # SXM5; torch reports it as "NVIDIA H100 80GB HBM3"
    (("h200",), 4.8e12),
    (("a100", "80gb"), 2.0e12),
)

# Column order of the side-by-side table; rows with other labels follow in order of appearance.
BACKEND_COLUMNS = ("eager", "compile", "triton", "native")

# The GPU figures the issues ask for. Thresholds only: the measured values come from the run.
TARGETS = (
    {"id": "resnext-fwdbwd-vs-eager", "kind": "op", "family": "resnext", "mode": "fwd+bwd", "row": "triton",
     "metric": "speedup_vs_eager", "min": 2.5,
     "text": "ResNeXt-50 grouped 3x3, bf16, fwd+bwd: triton >= 2.5x eager"},
    {"id": "resnext-fwdbwd-vs-compile", "kind": "op", "family": "resnext", "mode": "fwd+bwd", "row": "triton",
     "metric": "speedup_vs_compile", "min": 1.5,
     "text": "ResNeXt-50 grouped 3x3, bf16, fwd+bwd: triton >= 1.5x torch.compile max-autotune"},
    {"id": "resnext-fwd-bandwidth", "kind": "op", "family": "resnext", "mode": "fwd", "row": "triton",
     "metric": "bw_fraction", "min": 0.70,
     "text": "ResNeXt-50 grouped 3x3, bf16, fwd: triton >= 70% of the HBM bound"},
    {"id": "densenet-shared-vs-naive", "kind": "memory", "family": "densenet121", "mode": "train-step",
     "row": "shared/triton", "metric": "speedup_vs_eager", "min": 1.3,
     "text": "densenet121 train step, bf16, batch 64: shared >= 1.3x naive eager"},
    {"id": "densenet-shared-vs-checkpoint", "kind": "memory", "family": "densenet121", "mode": "train-step",
     "row": "shared/triton", "metric": "speedup_vs_row:checkpoint/eager", "min": 1.5,
     "text": "densenet121 train step, bf16, batch 64: shared >= 1.5x checkpoint"},
)


# --------------------------------------------------------------------------- figures

def peak_bandwidth(gpu_name: Optional[str]) -> Optional[float]:
    """The HBM bandwidth bound in bytes/s of the GPU called ``gpu_name``, or ``None`` if unknown."""
    if not gpu_name:
        return None
    name = gpu_name.lower()
    for keys, value in PEAK_HBM_BYTES_PER_S:
        if all(k in name for k in keys):
            return value
    return None


def achieved_bandwidth(bytes_moved: float, seconds: float) -> Optional[float]:
    """Bytes per second; ``None`` when either figure is missing or not positive."""
    if not bytes_moved or not seconds or bytes_moved <= 0 or seconds <= 0:
        return None
    return float(bytes_moved) / float(seconds)


def bandwidth_fraction(bytes_moved: float, seconds: float, peak: Optional[float]) -> Optional[float]:
    """Achieved bandwidth over the bound ``peak`` (bytes/s); ``None`` when the bound is unknown."""
    achieved = achieved_bandwidth(bytes_moved, seconds)
    if achieved is None or not peak:
        return None
    return achieved / peak


def _median(entry: Dict[str, Any]) -> Optional[float]:
    stats = entry.get("stats") or {}
    value = stats.get("median", entry.get("median"))
    return float(value) if value else None


def _extra(entry: Dict[str, Any]) -> Dict[str, Any]:
    extra = entry.get("extra_info")
    if extra is None:
        extra = entry["extra_info"] = {}
    return extra


def _row(entry: Dict[str, Any]) -> str:
    return str(_extra(entry).get("row") or entry.get("name", "?"))


def _group(entry: Dict[str, Any]) -> str:
    return str(entry.get("group") or "(no group)")


def _groups(entries: Iterable[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {}
    for e in entries:
        out.setdefault(_group(e), []).append(e)
    return out


def add_ratios(entries: Sequence[Dict[str, Any]], peak_bytes_per_s: Optional[float] = None) -> None:
    """Put each row's ratios into its ``extra_info``, per benchmark group (in place).

    * ``speedup_vs_eager``: the baseline row's median time over this row's (> 1: faster than
      the baseline, which is ``extra_info["baseline"]``, ``eager`` by default);
    * ``speedup_vs_compile``: the ``compile`` row's median over this row's, where the group has one;
    * ``achieved_gbps`` and, when ``peak_bytes_per_s`` is known, ``bw_fraction``: for rows with
      ``bytes_moved``;
    * ``peak_ratio_to_baseline`` (``activation_ratio_to_baseline``): this row's ``peak_bytes``
      (``activation_bytes``) over the baseline's (< 1: less memory).
    """
    for rows in _groups(entries).values():
        by_row = {_row(e): e for e in rows}
        for e in rows:
            extra = _extra(e)
            t = _median(e)
            base = by_row.get(str(extra.get("baseline") or "eager"))
            comp = by_row.get("compile")
            for key in ("speedup_vs_eager", "speedup_vs_compile", "achieved_gbps", "bw_fraction",
                        "peak_ratio_to_baseline", "activation_ratio_to_baseline"):
                extra.pop(key, None)
            if t:
                if base is not None and _median(base):
                    extra["speedup_vs_eager"] = _median(base) / t
                if comp is not None and _median(comp):
                    extra["speedup_vs_compile"] = _median(comp) / t
                achieved = achieved_bandwidth(extra.get("bytes_moved") or 0, t)
                if achieved is not None:
                    extra["achieved_gbps"] = achieved / 1e9
                    frac = bandwidth_fraction(extra["bytes_moved"], t, peak_bytes_per_s)
                    if frac is not None:
                        extra["bw_fraction"] = frac
            for key in ("peak_bytes", "activation_bytes"):
                if base is not None and extra.get(key) and _extra(base).get(key):
                    ratio_key = "peak_ratio_to_baseline" if key == "peak_bytes" else "activation_ratio_to_baseline"
                    extra[ratio_key] = float(extra[key]) / float(_extra(base)[key])


# --------------------------------------------------------------------------- rendering

def format_time(seconds: Optional[float]) -> str:
    """``1.23ms``-style text for a duration in seconds; ``-`` when missing."""
    if seconds is None or seconds != seconds:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g}{unit}"
    return f"{seconds / 1e-9:.3g}ns"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fraction(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mb(value: Optional[float]) -> str:
    return "-" if not value else f"{value / 1e6:.1f}MB"


def _columns(entries: Sequence[Dict[str, Any]]) -> List[str]:
    seen = {_row(e) for e in entries}
    cols = [c for c in BACKEND_COLUMNS if c in seen]
    for e in entries:
        r = _row(e)
        if r not in cols:
            cols.append(r)
    return cols


def _cell(entry: Optional[Dict[str, Any]], baseline: bool, has_compile: bool) -> str:
    if entry is None:
        return "-"
    extra = _extra(entry)
    if baseline or extra.get("speedup_vs_eager") is None:  # no baseline row in the group: its time
        return format_time(_median(entry))
    text = _ratio(extra.get("speedup_vs_eager"))
    if has_compile and _row(entry) != "compile" and extra.get("speedup_vs_compile") is not None:
        text += "/" + _ratio(extra.get("speedup_vs_compile"))
    return text


def _bandwidth_cell(rows: Sequence[Dict[str, Any]]) -> str:
    """The fastest row's achieved GB/s (and % of the bound) among the resfast rows, else any row."""
    measured = [e for e in rows if _extra(e).get("achieved_gbps") is not None]
    if not measured:
        return ""
    fused = [e for e in measured if _row(e) not in ("eager", "compile")] or measured
    best = max(fused, key=lambda e: _extra(e)["achieved_gbps"])
    extra = _extra(best)
    gbps = extra["achieved_gbps"]
    text = f"{gbps:.0f}GB/s" if gbps >= 100 else f"{gbps:.3g}GB/s"
    if extra.get("bw_fraction") is not None:
        text += f" {100 * extra['bw_fraction']:.0f}%"
    return f"{text} ({_row(best)})"


def render_bench_table(entries: Sequence[Dict[str, Any]], width: int = 44) -> str:
    """The side-by-side table: one line per benchmark group, one column per row label.

    The baseline column shows the median time; the others show the speedup over the baseline
    and, after a slash, over ``torch.compile`` where the group has a compile row. Memory groups
    (``kind == "memory"``) get their own table with peak bytes and ratios to ``naive``.
    """
    entries = [e for e in entries if _median(e)]
    if not entries:
        return "(no benchmark was timed)"
    speed = [e for e in entries if _extra(e).get("kind") != "memory"]
    memory = [e for e in entries if _extra(e).get("kind") == "memory"]
    lines: List[str] = []
    if speed:
        cols = _columns(speed)
        base_col = str(_extra(speed[0]).get("baseline") or "eager")
        header = f"{'group':<{width}}" + "".join(f" {c:>13}" for c in cols) + "  bandwidth"
        lines += [
            f"speed: '{base_col}' = median time; others = speedup over {base_col}"
            f"[/over compile]; >1.00x is faster",
            header, "-" * len(header),
        ]
        for group, rows in _groups(speed).items():
            by_row = {_row(e): e for e in rows}
            has_compile = "compile" in by_row
            base = str(_extra(rows[0]).get("baseline") or "eager")
            cells = "".join(f" {_cell(by_row.get(c), c == base, has_compile):>13}" for c in cols)
            lines.append(f"{group[:width]:<{width}}{cells}  {_bandwidth_cell(rows)}".rstrip())
    if memory:
        if lines:
            lines.append("")
        header = (f"{'group':<{width}} {'row':<24} {'time':>8} {'speedup':>8} {'peak':>10} {'peak':>6} "
                  f"{'activ.':>10} {'activ.':>6} {'launches':>9}")
        lines += ["memory: speedup and memory ratios against each group's baseline (naive/eager); "
                  "activ. = peak minus parameters, buffers and gradients; launches = kernel launches of one "
                  "step (aten compute ops + Triton launches)", header, "-" * len(header)]
        for group, rows in _groups(memory).items():
            for e in rows:
                extra = _extra(e)
                lines.append(
                    f"{group[:width]:<{width}} {_row(e)[:24]:<24} {format_time(_median(e)):>8} "
                    f"{_ratio(extra.get('speedup_vs_eager')):>8} {_mb(extra.get('peak_bytes')):>10} "
                    f"{_fraction(extra.get('peak_ratio_to_baseline')):>6} {_mb(extra.get('activation_bytes')):>10} "
                    f"{_fraction(extra.get('activation_ratio_to_baseline')):>6} "
                    f"{extra.get('launches', '-'):>9}"
                )
    return "\n".join(lines)


# --------------------------------------------------------------------------- inputs

def load_benchmark_json(path: str) -> List[Dict[str, Any]]:
    """The benchmark entries of a pytest-benchmark JSON file; ``[]`` if it is missing or broken."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    return list(data.get("benchmarks", [])) if isinstance(data, dict) else []


def parse_junit(path: str) -> Dict[str, Any]:
    """Counts of a junit XML file: ``{"found", "tests", "passed", "failed", "errors", "skipped", "failures"}``.

    ``failures`` lists up to 20 ``file::test`` names that failed or errored. ``interrupted``
    counts the nameless test case pytest writes for the test it was running when stopped
    (SIGINT at a phase's time limit); it is not counted in ``tests``. ``found`` is False
    (and the counts 0) when the file is missing or unreadable, e.g. the test phase was killed.
    """
    empty = {"found": False, "tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
             "interrupted": 0, "failures": []}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return empty
    counts = dict(empty, found=True, failures=[])
    for case in root.iter("testcase"):
        if not case.get("name"):
            # pytest stopped by SIGINT writes one nameless <testcase/> for the test it was in:
            # that test neither passed nor failed.
            counts["interrupted"] += 1
            continue
        counts["tests"] += 1
        tags = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        if "error" in tags:
            counts["errors"] += 1
        elif "failure" in tags:
            counts["failed"] += 1
        elif "skipped" in tags:
            counts["skipped"] += 1
            continue
        else:
            counts["passed"] += 1
            continue
        if len(counts["failures"]) < 20:
            counts["failures"].append(name)
    return counts


def read_skips(log_path: str) -> List[Tuple[int, str]]:
    """``(count, reason)`` of the benchmark skips pytest listed (``-rs``) in a check log, most first."""
    counts: Dict[str, int] = {}
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        match = re.match(r"SKIPPED \[(\d+)\] benchmarks/[^:]+:\d+: (.*)", line)
        if match:
            counts[match.group(2)] = counts.get(match.group(2), 0) + int(match.group(1))
    return sorted(((n, reason) for reason, n in counts.items()), key=lambda p: -p[0])


def read_phases(path: str) -> List[Dict[str, Any]]:
    """The phases ``gpu_check.sh`` recorded: TSV lines ``name status rc seconds limit``."""
    phases: List[Dict[str, Any]] = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return phases
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 5 or not parts[0]:
            continue
        try:
            phases.append({"name": parts[0], "status": parts[1], "rc": int(parts[2]),
                           "seconds": int(parts[3]), "limit_s": int(parts[4])})
        except ValueError:
            continue
    return phases


# --------------------------------------------------------------------------- environment

def _run(cmd: Sequence[str], timeout: float = 20.0) -> Optional[str]:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _git_commit(root: str) -> Optional[str]:
    # The device machine gets a copy of the tree without .git: the caller passes the commit in.
    return os.environ.get("RESFAST_GIT_COMMIT") or _run(["git", "-C", root, "rev-parse", "HEAD"])


def _same_commit(given: str, head: Optional[str]) -> bool:
    """Whether ``head`` (a full hash from ``git rev-parse HEAD``) is the commit ``given`` names
    (a full hash or an abbreviation of at least 7 digits)."""
    given, head = given.strip().lower(), (head or "").strip().lower()
    return bool(head) and (head == given or (len(given) >= 7 and head.startswith(given)))


def _git_dirty(root: str) -> Optional[bool]:
    """Whether the checkout at ``root`` has uncommitted changes to tracked files; ``None`` when
    unknown: no git, or ``RESFAST_GIT_COMMIT`` names a commit other than the checkout's HEAD
    (a copy of the tree carrying a stale ``.git``, whose status describes that stale commit,
    not the tree that ran)."""
    given = os.environ.get("RESFAST_GIT_COMMIT")
    if given and not _same_commit(given, _run(["git", "-C", root, "rev-parse", "HEAD"])):
        return None
    status = _run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"])
    return None if status is None else bool(status)


def environment(root: Optional[str] = None) -> Dict[str, Any]:
    """GPU name, driver, torch / triton / CUDA / nvcc versions, date and git commit of this machine."""
    import platform

    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(root),
        "git_dirty": _git_dirty(root),
        "python": platform.python_version(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if torch.cuda.is_available():
            prop = torch.cuda.get_device_properties(0)
            env["gpu"] = prop.name
            env["gpu_capability"] = f"{prop.major}.{prop.minor}"
            env["gpu_memory_bytes"] = int(prop.total_memory)
            env["gpu_count"] = torch.cuda.device_count()
            env["l2_cache_bytes"] = getattr(prop, "L2_cache_size", None)
        else:
            env["gpu"] = None
    except Exception as exc:  # a broken torch still gets its environment recorded
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
        env.setdefault("gpu", None)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    env["driver"] = smi.splitlines()[0].split(",")[-1].strip() if smi else None
    if not env.get("gpu") and smi:
        env["gpu"] = smi.splitlines()[0].split(",")[0].strip()
    nvcc = _run(["nvcc", "--version"])
    match = re.search(r"release ([0-9.]+)", nvcc or "")
    env["nvcc"] = match.group(1) if match else None
    env["peak_hbm_bytes_per_s"] = peak_bandwidth(env.get("gpu"))
    return env


# --------------------------------------------------------------------------- summary

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def results_filename(env: Dict[str, Any]) -> str:
    """``<date>-<gpu>.json``, e.g. ``2026-11-27-nvidia-h100-80gb-hbm3.json`` (letters, digits, . and - only)."""
    date = str(env.get("date") or _dt.date.today().isoformat())[:10]
    return f"{_slug(date)}-{_slug(str(env.get('gpu') or 'no-gpu'))}.json"


def _params(entry: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in _extra(entry).items()
            if k not in ("row", "kind", "baseline", "speedup_vs_eager", "speedup_vs_compile", "achieved_gbps",
                         "bw_fraction", "peak_ratio_to_baseline", "peak_bytes", "bytes_moved", "activation_bytes",
                         "activation_ratio_to_baseline")}


def evaluate_targets(entries: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each issue target with the measured values of its groups: ``met``, ``missed`` or ``not measured``.

    A target covers every group whose ``kind``, ``family`` and ``mode`` match; it is met when
    every such group's value reaches the threshold.
    """
    out = []
    for target in TARGETS:
        values: List[Tuple[str, float]] = []
        for group, rows in _groups(entries).items():
            by_row = {_row(e): e for e in rows}
            row = by_row.get(target["row"])
            extra = _extra(row) if row else {}
            if not row or extra.get("kind") != target["kind"] or extra.get("family") != target["family"] \
                    or extra.get("mode") != target["mode"]:
                continue
            metric = target["metric"]
            if metric.startswith("speedup_vs_row:"):
                other = by_row.get(metric.split(":", 1)[1])
                value = _median(other) / _median(row) if other and _median(other) and _median(row) else None
            else:
                value = extra.get(metric)
            if value is not None:
                values.append((group, float(value)))
        status = "not measured" if not values else ("met" if all(v >= target["min"] for _, v in values) else "missed")
        out.append({"id": target["id"], "text": target["text"], "min": target["min"], "status": status,
                    "values": [{"group": g, "value": v} for g, v in values]})
    return out


def build_results(env: Dict[str, Any], entries: Sequence[Dict[str, Any]], junit: Dict[str, Any],
                  phases: Sequence[Dict[str, Any]], info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The JSON recorded in ``benchmarks/results/<date>-<gpu>.json``: environment, phases, tests, rows, targets."""
    add_ratios(entries, env.get("peak_hbm_bytes_per_s"))
    rows = []
    for e in entries:
        extra = _extra(e)
        stats = e.get("stats") or {}
        rows.append({
            "group": _group(e), "row": _row(e), "kind": extra.get("kind"), "name": e.get("name"),
            "median_s": _median(e), "mean_s": stats.get("mean"), "stddev_s": stats.get("stddev"),
            "min_s": stats.get("min"), "rounds": stats.get("rounds"), "iterations": stats.get("iterations"),
            **{k: extra.get(k) for k in ("speedup_vs_eager", "speedup_vs_compile", "achieved_gbps", "bw_fraction",
                                         "bytes_moved", "peak_bytes", "peak_ratio_to_baseline", "activation_bytes",
                                         "activation_ratio_to_baseline")
               if extra.get(k) is not None},
            "params": _params(e),
        })
    return {
        "schema": "resfast-gpu-check/1",
        "environment": env,
        "phases": list(phases),
        "tests": junit,
        "resfast_info": info,
        "benchmarks": rows,
        "targets": evaluate_targets(entries),
    }


def _env_line(env: Dict[str, Any]) -> str:
    commit = (env.get("git_commit") or "unknown")[:10]
    if env.get("git_dirty"):
        commit += "+dirty"
    peak = env.get("peak_hbm_bytes_per_s")
    return (f"{env.get('gpu') or 'no GPU'} (sm {env.get('gpu_capability', '?')}, driver {env.get('driver') or '?'}, "
            f"HBM bound {f'{peak / 1e12:.2f} TB/s' if peak else 'unknown'}) | torch {env.get('torch')} "
            f"CUDA {env.get('cuda')} nvcc {env.get('nvcc')} triton {env.get('triton')} | "
            f"{str(env.get('date', ''))[:16]} | commit {commit}")


def _phase_text(phase: Dict[str, Any]) -> str:
    rc = "" if phase["status"] == "ok" else f" (rc {phase['rc']})"
    return f"{phase['name']} {phase['status']}{rc} {phase['seconds']}/{phase['limit_s']}s"


def render_summary(env: Dict[str, Any], entries: Sequence[Dict[str, Any]], junit: Dict[str, Any],
                   phases: Sequence[Dict[str, Any]], skips: Sequence[Tuple[int, str]] = ()) -> str:
    """The one-screen summary of a GPU check: environment, phases, tests, benchmarks (and why
    rows were skipped, from :func:`read_skips`), targets."""
    add_ratios(entries, env.get("peak_hbm_bytes_per_s"))
    lines = ["resfast GPU check", _env_line(env)]
    if phases:
        lines.append("phases: " + " | ".join(_phase_text(p) for p in phases))
    else:
        lines.append("phases: none recorded")
    if junit.get("found"):
        lines.append(f"tests: {junit['passed']} passed, {junit['failed']} failed, {junit['errors']} errors, "
                     f"{junit['skipped']} skipped (of {junit['tests']})"
                     + (", stopped at the phase's time limit" if junit.get("interrupted") else ""))
        for name in junit.get("failures", [])[:5]:
            lines.append(f"  FAILED {name}")
        if len(junit.get("failures", [])) > 5:
            lines.append(f"  ... and {len(junit['failures']) - 5} more (see tests-junit.xml)")
    else:
        lines.append("tests: no junit XML (the test phase did not finish; see check.log)")
    timed = [e for e in entries if _median(e)]
    skipped = sum(n for n, _ in skips)
    lines.append(f"benchmarks: {len(timed)} rows timed in {len(_groups(timed))} groups (medians)"
                 + (f"; {skipped} skipped" if skipped else ""))
    for n, reason in list(skips)[:4]:
        lines.append(f"  {n:3d} skipped: {reason[:110]}")
    lines.append(render_bench_table(timed))
    lines.append("targets (issues 3 and 4):")
    for t in evaluate_targets(timed):
        vals = ", ".join(f"{v['value']:.2f}" for v in t["values"])
        lines.append(f"  [{t['status']}] {t['text']}" + (f": {vals}" if vals else ""))
    return "\n".join(lines)


KERNELS_SCHEMA = "resfast-gpu-kernels"


def _host_markdown(host: Dict[str, Any]) -> List[str]:
    # gpu_kernels_check's "host" phase (added after the third GPU run): host time per call
    rows = [r for r in host.get("rows", []) if r.get("threads")]
    if not rows:
        return []
    out = ["", f"host time of one training call at {rows[0].get('shape')} (medians; the GPU idle at each call's "
           "start; last column: the backward on the calling thread instead of autograd's device thread):", "",
           "| row | forward | backward | backward, one thread | syncs | most self time |", "|---|---|---|---|---|---|"]
    for r in rows:
        t, o = r["threads"], r.get("one_thread") or {}
        top = "; ".join(f"{f['function'].rsplit('/', 1)[-1]} {f['self_us']:.0f} us" for f in (r.get("top") or [])[:3])
        out.append(f"| {r.get('impl')} | {format_time(t['fwd_us'] * 1e-6)} | {format_time(t['bwd_us'] * 1e-6)} | "
                   f"{format_time(o['bwd_us'] * 1e-6) if o else ''} | {len(r.get('syncs') or [])} | {top} |")
    plan = host.get("plan_cache") or {}
    if plan and all(isinstance(v, dict) for v in plan.values()):  # per op
        out += ["", "triton plan cache over the phase: " + "; ".join(
            f"{op} " + ", ".join(f"{k} {v}" for k, v in counts.items()) for op, counts in sorted(plan.items()))]
    elif plan:
        out += ["", "triton plan cache over the phase: " + ", ".join(f"{k} {v}" for k, v in plan.items())]
    for r in rows:
        for sync in r.get("syncs") or []:
            out.append(f"- sync in {r.get('impl')}: {sync}")
        if r.get("top_device_thread"):
            out.append(f"- {r.get('impl')}, most self time with the backward on autograd's device thread: " + "; ".join(
                f"{f['function'].rsplit('/', 1)[-1]} {f['self_us']:.0f} us" for f in r["top_device_thread"][:5]))
    return out


def _kernels_markdown(results: Dict[str, Any]) -> str:
    # A gpu_kernels_check.py results JSON: its timing rows, parity verdicts and kernel profile.
    env = results.get("environment", {})
    out = [f"{env.get('gpu') or 'no GPU'} (sm {env.get('sm', '?')}) | torch {env.get('torch')} CUDA {env.get('cuda')} "
           f"triton {env.get('triton')} | {str(env.get('date', ''))[:16]} | "
           f"commit {(env.get('commit') or 'unknown')[:10]}", "",
           "| shape | mode | row | median | vs eager | vs compile | GB/s | % of bound |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results.get("timing", []):
        def num(key: str, fmt: str) -> str:
            v = r.get(key)
            return "" if v is None else fmt.format(v)

        out.append(f"| {r.get('shape')} | {r.get('mode')} | {r.get('impl')} | {format_time(r.get('median_s'))} | "
                   f"{num('speedup_vs_eager', '{:.2f}x')} | {num('speedup_vs_compile', '{:.2f}x')} | "
                   f"{num('achieved_gbps_x_plus_y', '{:.0f}')} | {num('fraction_of_hbm_bound', '{:.0%}')} |")
    parity = results.get("parity", [])
    if parity:
        failed = [p.get("shape") for p in parity if not p.get("pass")]
        out += ["", f"parity against float64: {len(parity) - len(failed)} of {len(parity)} checks pass"
                + (f"; failed: {', '.join(map(str, failed))}" if failed else "")]
    out += _host_markdown(results.get("host") or {})
    # "profiles": one record per shape (since 2026-11-30); older files have one "profile"
    profiles = results.get("profiles") or [results.get("profile") or {}]
    for profile in profiles:
        if not profile.get("kernels"):
            continue
        out += ["", f"kernels of {profile.get('shape')} training steps (torch.profiler device time per call; "
                "calls over all profiled steps):", "", "| kernel | calls | mean |", "|---|---|---|"]
        for name, k in sorted(profile["kernels"].items(), key=lambda kv: -float(kv[1].get("mean_us") or 0)):
            out.append(f"| {name[:60]} | {k.get('count')} | {format_time((k.get('mean_us') or 0) * 1e-6)} |")
        if profile.get("configs"):
            out += ["", "configs the autotuner chose: " + "; ".join(
                f"{name} `{label}`" for name, label in sorted(profile["configs"].items()))]
    candidates = [c for c in results.get("candidates") or [] if c.get("us")]
    if candidates:
        out += ["", "configs outside the lists, timed beside the lists' own (one kernel, the same inputs):", "",
                "| shape | launch | candidate | time | the list's best | its time | best / candidate |",
                "|---|---|---|---|---|---|---|"]
        for c in candidates:
            us = c["us"]
            out.append(f"| {c['shape']} | {c['launch']} | `{c['candidate']}` | {format_time(us[c['candidate']] * 1e-6)} | "
                       f"`{c['best_listed']}` | {format_time(us[c['best_listed']] * 1e-6)} | "
                       f"{c['candidate_vs_best']:.2f}x |")
    return "\n".join(out)


def markdown_table(results: Dict[str, Any]) -> str:
    """A Markdown table of a recorded results JSON, for benchmarks/README.md: a ``gpu_check.sh``
    one (schema ``resfast-gpu-check/1``) or a ``gpu_kernels_check.sh`` one (``resfast-gpu-kernels/1``)."""
    if str(results.get("schema", "")).startswith(KERNELS_SCHEMA):
        return _kernels_markdown(results)
    rows = results.get("benchmarks", [])
    env = results.get("environment", {})
    out = [f"{_env_line(env)}", "",
           "| group | row | median | vs eager | vs compile | GB/s | % of bound | peak | peak ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def num(key: str, fmt: str) -> str:
            v = r.get(key)
            return "" if v is None else fmt.format(v)

        out.append(f"| {r['group']} | {r['row']} | {format_time(r.get('median_s'))} | "
                   f"{num('speedup_vs_eager', '{:.2f}x')} | {num('speedup_vs_compile', '{:.2f}x')} | "
                   f"{num('achieved_gbps', '{:.0f}')} | {num('bw_fraction', '{:.0%}')} | "
                   f"{_mb(r.get('peak_bytes')) if r.get('peak_bytes') else ''} | "
                   f"{num('peak_ratio_to_baseline', '{:.2f}')} |")
    return "\n".join(out)


# --------------------------------------------------------------------------- command line

def _load_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_report.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print the environment JSON on stdout")
    p = sub.add_parser("summary", help="write OUTDIR/summary.txt and OUTDIR/<date>-<gpu>.json from a check's files")
    p.add_argument("outdir")
    p = sub.add_parser("markdown", help="print a results JSON as a Markdown table")
    p.add_argument("results")
    args = parser.parse_args(argv)

    if args.command == "env":
        json.dump(environment(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if args.command == "markdown":
        results = _load_json(args.results)
        if results is None:
            print(f"gpu_report.py: error: cannot read results JSON {args.results!r}", file=sys.stderr)
            return 2
        print(markdown_table(results))
        return 0

    outdir = args.outdir
    if not os.path.isdir(outdir):
        print(f"gpu_report.py: error: OUTDIR {outdir!r} is not a directory", file=sys.stderr)
        return 2
    env = _load_json(os.path.join(outdir, "environment.json")) or {"gpu": None, "error": "environment.json missing"}
    entries = load_benchmark_json(os.path.join(outdir, "benchmarks.json"))
    junit = parse_junit(os.path.join(outdir, "tests-junit.xml"))
    phases = read_phases(os.path.join(outdir, "phases.tsv"))
    info = _load_json(os.path.join(outdir, "info.json"))
    results = build_results(env, entries, junit, phases, info)
    with open(os.path.join(outdir, results_filename(env)), "w") as f:
        json.dump(results, f, indent=2, default=str)
        f.write("\n")
    summary = render_summary(env, entries, junit, phases, read_skips(os.path.join(outdir, "check.log")))
    with open(os.path.join(outdir, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
