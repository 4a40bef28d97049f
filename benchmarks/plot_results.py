"""Chart of the speedups over eager (and the memory ratios) recorded in a benchmark results JSON.

    python benchmarks/plot_results.py benchmarks/results/2026-11-27-nvidia-h100-80gb-hbm3.json
    python benchmarks/plot_results.py out/benchmarks.json -o out/ratios.png   # pytest-benchmark JSON

Reads a results JSON written by ``gpu_check.sh`` (``gpu_report.py summary``), one written by
``gpu_kernels_check.sh`` (schema ``resfast-gpu-kernels/1``: its timing rows), or a
pytest-benchmark ``--benchmark-json`` file (ratios are computed from its medians). Draws one
horizontal bar per (group, row) with the speedup over the group's baseline on a log axis
(1.0 = as fast as eager), and, when memory rows are present, a second panel with the peak
memory relative to ``naive``. Writes a PNG (matplotlib's Agg backend: no display needed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_report import BACKEND_COLUMNS, add_ratios  # noqa: E402

__all__ = ["load_rows", "plot", "main"]


def load_rows(path: str) -> Dict[str, Any]:
    """``{"title", "rows"}`` from a results JSON or a pytest-benchmark JSON; rows carry
    ``group``, ``row``, ``kind``, ``speedup_vs_eager``, ``peak_ratio_to_baseline``."""
    with open(path) as f:
        data = json.load(f)
    if data.get("schema", "").startswith("resfast-gpu-check"):
        env = data.get("environment", {})
        title = f"{env.get('gpu') or 'no GPU'}, torch {env.get('torch')}, {str(env.get('date', ''))[:10]}"
        return {"title": title, "rows": list(data.get("benchmarks", []))}
    if data.get("schema", "").startswith("resfast-gpu-kernels"):  # gpu_kernels_check.py: its timing rows
        env = data.get("environment", {})
        title = f"{env.get('gpu') or 'no GPU'}, torch {env.get('torch')}, {str(env.get('date', ''))[:10]} (kernels check)"
        rows = [{"group": f"{t.get('mode')} {t.get('shape')}", "row": t.get("impl"), "kind": "op",
                 "speedup_vs_eager": t.get("speedup_vs_eager"), "peak_ratio_to_baseline": None}
                for t in data.get("timing", [])]
        return {"title": title, "rows": rows}
    entries = list(data.get("benchmarks", []))
    add_ratios(entries)
    rows = []
    for e in entries:
        extra = e.get("extra_info") or {}
        rows.append({"group": e.get("group"), "row": extra.get("row", e.get("name")), "kind": extra.get("kind"),
                     "speedup_vs_eager": extra.get("speedup_vs_eager"),
                     "peak_ratio_to_baseline": extra.get("peak_ratio_to_baseline")})
    machine = data.get("machine_info", {})
    title = f"{machine.get('node', 'pytest-benchmark')}, {str(data.get('datetime', ''))[:10]}"
    return {"title": title, "rows": rows}


def _order(rows: Sequence[Dict[str, Any]]) -> List[str]:
    labels: List[str] = [c for c in BACKEND_COLUMNS if any(r["row"] == c for r in rows)]
    for r in rows:
        if r["row"] not in labels:
            labels.append(r["row"])
    return labels


def plot(data: Dict[str, Any], path: str) -> Optional[str]:
    """Draw the chart into ``path``; returns ``path``, or ``None`` when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in data["rows"] if r.get("speedup_vs_eager") is not None]
    memory = [r for r in data["rows"] if r.get("peak_ratio_to_baseline") is not None]
    if not speed:
        return None
    panels = [("speedup over the group's baseline (log scale; >1 is faster)", speed, "speedup_vs_eager")]
    if memory:
        panels.append(("peak memory / naive (<1 is less memory)", memory, "peak_ratio_to_baseline"))
    heights = [max(2.0, 0.22 * len(rows) + 1.0) for _, rows, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (label, rows, key) in zip(axes[:, 0], panels):
        order = _order(rows)
        groups: List[str] = []
        for r in rows:
            if r["group"] not in groups:
                groups.append(r["group"])
        ys, widths, cols, ticks = [], [], [], []
        y = 0.0
        for g in groups:
            for r in (r for r in rows if r["group"] == g):
                ys.append(y)
                widths.append(r[key])
                cols.append(colors[order.index(r["row"]) % len(colors)])
                ticks.append(f"{g}  [{r['row']}]")
                y += 1
            y += 0.6
        ax.barh(ys, widths, color=cols)
        ax.set_yticks(ys)
        ax.set_yticklabels(ticks, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        if key == "speedup_vs_eager":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_title(f"resfast benchmarks: {data['title']}")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="plot_results.py", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results JSON (benchmarks/results/*.json) or a pytest-benchmark JSON")
    parser.add_argument("-o", "--output", help="PNG to write (default: the input with .png)")
    args = parser.parse_args(argv)
    try:
        data = load_rows(args.results)
    except (OSError, ValueError) as exc:
        print(f"plot_results.py: error: cannot read {args.results!r}: {exc}", file=sys.stderr)
        return 2
    out = args.output or os.path.splitext(args.results)[0] + ".png"
    if plot(data, out) is None:
        print(f"plot_results.py: error: {args.results!r} has no row with a speedup to draw", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
