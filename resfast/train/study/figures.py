"""The study's figures: each comparison's curves and step times, and the dense-block connections."""
from __future__ import annotations

import os
from typing import Any, Dict, List

__all__ = ["plot_comparison", "plot_connections"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(runs: List[Dict[str, Any]], learned_acc: float, path: str, title: str) -> None:
    """Train loss and test accuracy per epoch (with the accuracy at which a model counts as
    having learned), and the distribution of the interleaved step times, one box per model."""
    plt = _pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.6))
    for r in runs:
        ep = [h["epoch"] for h in r["history"]]
        a.plot(ep, [h["train_loss"] for h in r["history"]], "o-", label=r["label"])
        b.plot(ep, [h["test_acc"] for h in r["history"]], "o-", label=r["label"])
    b.axhline(learned_acc, color="0.5", ls="--", lw=1, label=f"learned ({learned_acc:.0%})")
    from matplotlib.ticker import MaxNLocator

    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.set_xlabel("epoch"), a.set_ylabel("train loss"), a.legend(fontsize=8)
    b.set_xlabel("epoch"), b.set_ylabel("test accuracy"), b.set_ylim(0, 1.02), b.legend(fontsize=8)
    c.boxplot([[1e3 * t for t in r["step_times_s"][1:]] for r in runs], whis=(10, 90), showfliers=False)
    c.set_xticks(range(1, len(runs) + 1), [r["label"] for r in runs], fontsize=8)
    c.set_ylabel("training step (ms)")
    c.set_title("interleaved step times\n(box: p25-p75, whiskers: p10-p90)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, plt, path, dpi=100)


def plot_connections(path: str, layers: int = 4) -> None:
    """A residual block chain beside a dense block: every arrow is one input of a layer."""
    plt = _pyplot()
    from matplotlib.patches import FancyArrowPatch

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, dense in zip(axes, (False, True)):
        xs = list(range(layers + 1))
        for i in xs:
            ax.add_patch(plt.Circle((i, 0), 0.18, color="#4c72b0" if i else "#55a868", zorder=3))
            ax.text(i, 0, f"x{i}", ha="center", va="center", color="white", fontsize=9, zorder=4)
            label = ("C0" if i == 0 else f"C0+{i}k") if dense else "C"
            ax.text(i, -0.38, label, ha="center", va="top", fontsize=8)
        n_edges = 0
        for j in range(1, layers + 1):
            sources = range(j) if dense else [j - 1]
            for i in sources:
                rad = 0.0 if j - i == 1 else -0.25 - 0.08 * (j - i)
                ax.add_patch(FancyArrowPatch((i + 0.18, 0.05 if j - i > 1 else 0), (j - 0.18, 0.05 if j - i > 1 else 0),
                                             connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>", mutation_scale=10,
                                             color="#333333" if j - i == 1 else "#c44e52", lw=1.0))
                n_edges += 1
            if not dense and j >= 1:
                ax.text(j - 0.5, 0.12, f"F{j}, +", ha="center", fontsize=7, color="#555555")
        ax.set_xlim(-0.5, layers + 0.5)
        ax.set_ylim(-0.8, 1.5)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"dense block, {layers} layers: {n_edges} connections (L(L+1)/2), inputs concatenated"
                     if dense else f"residual blocks, {layers} layers: {n_edges} connections, x(l+1) = x(l) + F(x(l))",
                     fontsize=9)
    fig.tight_layout()
    _save(fig, plt, path, dpi=110)



def _save(fig, plt, path: str, dpi: int) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
