"""The architecture study: run the comparisons and write docs/study.md.

``resfast study --scale small`` (digits, small models, a few epochs: minutes on a 2-core
CPU) or ``resfast study --scale full --data cifar10 --data-dir DIR --device cuda`` (the
papers' models on CIFAR-10, on a GPU) measures

1. the digits target: ``wrn16_2`` for 3 epochs (small scale);
2. wide versus deep: a WRN against a deeper, thinner pre-activation ResNet of similar
   parameter count, and WRN-28-10's parameters against ResNet-50 / ResNet-101;
3. dropout inside the WRN block, on versus off;
4. ResNeXt versus ResNet: ResNeXt-50 32x4d against ResNet-50 (parameters, MACs), the
   cardinality table at equal complexity, and a short training run of CIFAR-size analogues;
5. DenseNet: a figure of the connections of a 4-layer dense block beside a residual
   block's, each layer's input channels and the transition's, and naive versus shared
   (and checkpointed) memory from ``resfast memory`` with its plot;

and writes the markdown with tables and figures made from those measurements only. Each
section that cannot run (a missing model family or tool) is written as "not available"
with the reason, and the rest still runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from resfast.backends import BACKENDS

__all__ = ["add_arguments", "run", "run_study", "SCALES", "SECTIONS", "Scale"]

SECTIONS = ("target", "wide_vs_deep", "dropout", "resnext", "densenet")
ModelFn = Callable[[int, str], nn.Module]  # (num_classes, backend) -> model


@dataclass(frozen=True)
class Scale:
    """What one scale of the study trains and measures."""

    name: str
    data: str
    image_size: int  # digits are upsampled to this (their originals are 8x8); CIFAR stays 32
    subset: Optional[int]  # first N train / test images, None for all
    epochs: int
    batch_size: int
    lr: float
    target: Optional[Tuple[str, int]]  # (model, epochs) of the digits target at 32x32
    wide: Tuple[str, str]  # (label, model spec) -- see _model_fn
    deep: Tuple[str, str]
    paper_pair: Tuple[str, ...]  # the papers' pair, parameters only, when it is not trained here
    dropout_model: Tuple[str, str]
    dropout_p: float
    resnext: Tuple[int, int, int]  # CIFAR ResNeXt depth, cardinality, base width
    memory_model: str
    memory_batch: int
    memory_image: int
    sweep_layers: Tuple[int, ...]


SCALES: Dict[str, Scale] = {
    # Micro scale for the test suite: every section runs, on a handful of images.
    "tiny": Scale("tiny", "digits", 8, 64, 1, 32, 0.1, None,
                  ("WRN-10-2", "wrn:10:2"), ("pre-act ResNet-11", "preact:11"), (),
                  ("WRN-10-1", "wrn:10:1"), 0.3, (11, 2, 2), "densenet_bc:10:4", 2, 8, (1, 2, 3)),
    "small": Scale("small", "digits", 16, None, 3, 32, 0.1, ("wrn16_2", 3),
                   ("WRN-16-4", "wrn16_4"), ("pre-act ResNet-164", "preact_resnet164"),
                   ("wrn40_4", "preact_resnet1001"), ("WRN-16-2", "wrn16_2"), 0.3, (11, 8, 4),
                   "densenet_bc100_k12", 16, 32, (4, 8, 16, 24, 32)),
    "full": Scale("full", "cifar10", 32, None, 30, 128, 0.1, None,
                  ("WRN-40-4", "wrn40_4"), ("pre-act ResNet-1001", "preact_resnet1001"),
                  ("wrn16_4", "preact_resnet164"), ("WRN-16-8", "wrn16_8"), 0.3, (29, 8, 64),
                  "densenet_bc100_k12", 64, 32, (4, 8, 16, 24, 32, 48, 64)),
}

# The ResNeXt paper's Table 2: (cardinality C, bottleneck width d) at the complexity of ResNet-50.
CARDINALITY_TABLE = ((1, 64), (2, 40), (4, 24), (8, 14), (32, 4))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``resfast study`` options."""
    p.add_argument("--scale", default="small", choices=tuple(SCALES),
                   help="small: digits, small models, minutes on a CPU; full: the papers' models (GPU)")
    p.add_argument("--data", default=None, choices=("digits", "cifar10"),
                   help="dataset (default: digits at small scale, cifar10 at full scale)")
    p.add_argument("--data-dir", default=None, help="folder with the CIFAR-10 python-version files")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each comparison run (default: the scale's)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--out", default="docs", help="folder for study.md and figures/ (default docs)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the measurements as one JSON document on stdout")


def run(args: argparse.Namespace) -> int:
    """Run ``resfast study`` and write ``OUT/study.md``."""
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise ValueError(f"--sections must be a comma-separated subset of {','.join(SECTIONS)}, got {args.sections!r}")
    scale = SCALES[args.scale]
    if args.data is not None and args.data != scale.data:
        image = 32 if args.data == "cifar10" else 16
        scale = dataclasses.replace(scale, data=args.data, image_size=image,
                                    subset=scale.subset or (5000 if args.data == "cifar10" and scale.name != "full"
                                                            else None))
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        scale = dataclasses.replace(scale, epochs=args.epochs)
    doc = run_study(scale, out=args.out, device=args.device, backend=args.backend, data_dir=args.data_dir,
                    sections=sections, seed=args.seed)
    if args.json:
        from resfast.cli import emit_json

        emit_json(doc)
    else:
        print(f"wrote {os.path.join(args.out, 'study.md')} ({doc['total_time_s']:.0f} s)", file=sys.stderr)
    return 0


def run_study(scale: Scale, *, out: str = "docs", device: str = "auto", backend: str = "auto",
              data_dir: Optional[str] = None, sections: Sequence[str] = SECTIONS, seed: int = 0) -> Dict[str, Any]:
    """Run the chosen ``sections`` at ``scale``; write ``out/study.md``, ``out/figures/study_*.png``
    and ``out/figures/study_results.json``; return the measurements."""
    from resfast.profiling.runtime import resolve_device

    dev = resolve_device(device)
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    ctx = _Context(scale, dev, backend, data_dir, fig_dir, seed)
    t0 = time.perf_counter()
    results: Dict[str, Any] = {"setup": _setup(scale, dev, backend), "sections": {}}
    runners = {"target": _target, "wide_vs_deep": _wide_vs_deep, "dropout": _dropout, "resnext": _resnext,
               "densenet": _densenet}
    for name in SECTIONS:
        if name not in sections:
            continue
        _log(f"study [{scale.name}]: {name}")
        s0 = time.perf_counter()
        try:
            section = runners[name](ctx)
        except _NotAvailable as exc:
            section = {"available": False, "reason": str(exc)}
        except Exception as exc:  # a broken dependency must not lose the other sections
            traceback.print_exc(file=sys.stderr)
            section = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
        section["time_s"] = time.perf_counter() - s0
        results["sections"][name] = section
    if any(name in sections for name in ("wide_vs_deep", "dropout", "resnext")):
        train_set, test_set = ctx.datasets()
        results["setup"]["train_images"], results["setup"]["test_images"] = len(train_set), len(test_set)
    results["total_time_s"] = time.perf_counter() - t0
    results["setup"]["total_time_s"] = results["total_time_s"]
    with open(os.path.join(fig_dir, "study_results.json"), "w") as fh:
        json.dump(results, fh, indent=2, default=str)
    _write_atomic(os.path.join(out, "study.md"), render_markdown(results))
    return results


class _NotAvailable(RuntimeError):
    """A section's dependency is missing at run time."""


@dataclass
class _Context:
    scale: Scale
    device: torch.device
    backend: str
    data_dir: Optional[str]
    fig_dir: str
    seed: int
    _data: Optional[Tuple[Any, Any]] = None

    def datasets(self):
        if self._data is None:
            from resfast.train.data import load_dataset, load_digits

            if self.scale.data == "digits":
                self._data = load_digits(size=self.scale.image_size)
            else:
                self._data = load_dataset(self.scale.data, self.data_dir)
        return self._data

    def fig(self, name: str) -> str:
        return os.path.join(self.fig_dir, name)


# ----------------------------------------------------------------------------------------- sections


def _target(ctx: _Context) -> Dict[str, Any]:
    if ctx.scale.target is None or ctx.scale.data != "digits":
        raise _NotAvailable("the digits target is run at small scale on digits only")
    from resfast.train.data import load_digits
    from resfast.train.loop import TrainConfig, plot_curves, train

    name, epochs = ctx.scale.target
    _require_models(name)
    cfg = TrainConfig(model=name, data="digits", epochs=epochs, device=str(ctx.device), backend=ctx.backend,
                      seed=ctx.seed, progress=False)
    history: List[Dict[str, float]] = []
    result = _train_logged(cfg, None, load_digits(size=32), history)
    plot_curves(history, ctx.fig("study_target_curves.png"), title=f"{name} on digits (32x32), {epochs} epochs")
    return {"available": True, "model": name, "epochs": epochs, "batch_size": 32, "schedule": cfg.schedule,
            "result": result, "history": history, "figure": "figures/study_target_curves.png",
            "threads": torch.get_num_threads()}


def _wide_vs_deep(ctx: _Context) -> Dict[str, Any]:
    from resfast.profiling.counting import count_params

    runs = [_train_compare(ctx, label, spec) for label, spec in (ctx.scale.wide, ctx.scale.deep)]
    _plot_runs(runs, ctx.fig("study_wide_vs_deep.png"), "wide versus deep")
    reference = []
    for name in ("wrn28_10", "resnet50", "resnet101", *ctx.scale.paper_pair):
        reference.append(_counts(name))
    depth_width = []
    for label, spec in (ctx.scale.wide, ctx.scale.deep):
        model = _model_fn(spec)(10, "eager")
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        depth_width.append({"label": label, "conv_layers": len(convs),
                            "widest_conv_channels": max(m.out_channels for m in convs),
                            "params": count_params(model)})
    return {"available": True, "runs": runs, "reference": reference, "shape": depth_width,
            "figure": "figures/study_wide_vs_deep.png"}


def _dropout(ctx: _Context) -> Dict[str, Any]:
    label, spec = ctx.scale.dropout_model
    runs = [_train_compare(ctx, f"{label}, dropout {p:g}", spec, dropout=p) for p in (0.0, ctx.scale.dropout_p)]
    _plot_runs(runs, ctx.fig("study_dropout.png"), f"{label}: dropout in the block")
    return {"available": True, "runs": runs, "p": ctx.scale.dropout_p, "figure": "figures/study_dropout.png"}


def _resnext(ctx: _Context) -> Dict[str, Any]:
    from resfast.profiling.counting import count_macs, count_params

    try:
        from resfast.models.resnet import ResNet
        from resfast.models.resnext import CifarResNeXt
        from resfast.nn.blocks import Bottleneck
    except ImportError as exc:
        raise _NotAvailable(f"the ResNet / ResNeXt families are missing ({exc})") from exc
    imagenet = [_counts("resnet50"), _counts("resnext50_32x4d")]
    try:  # the successor with squeeze-and-excitation, when the zoo has it
        imagenet.append(_counts("seresnext50_32x4d"))
    except _NotAvailable:
        pass
    cardinality = []
    for c, d in CARDINALITY_TABLE:
        with torch.device("meta"):
            model = ResNet(Bottleneck, [3, 4, 6, 3], groups=c, width_per_group=d, backend="eager")
        cardinality.append({"cardinality": c, "width": d, "group_width": c * d, "params": count_params(model),
                            "macs": count_macs(model, (3, 224, 224))})
    depth, card, width = ctx.scale.resnext
    # The ResNet analogue: the same network with one group, its width chosen for equal parameters.
    def params_of(c: int, d: int) -> int:
        with torch.device("meta"):  # no memory, no initialisation: only the shapes count
            return count_params(CifarResNeXt(depth, c, d, backend="eager"))

    target = params_of(card, width)
    best, d = 1, 1
    while d <= 4 * card * width:  # parameters grow with the width: stop once past the target
        p = params_of(1, d)
        if abs(p - target) < abs(params_of(1, best) - target):
            best = d
        if p > target:
            break
        d += 1
    specs = [(f"ResNeXt-{depth} ({card}x{width}d)", f"resnext:{depth}:{card}:{width}"),
             (f"ResNet-{depth} (1x{best}d)", f"resnext:{depth}:1:{best}")]
    runs = [_train_compare(ctx, label, spec) for label, spec in specs]
    _plot_runs(runs, ctx.fig("study_resnext.png"), "ResNeXt versus ResNet (equal parameters)")
    return {"available": True, "imagenet": imagenet, "cardinality": cardinality, "runs": runs,
            "figure": "figures/study_resnext.png"}


def _densenet(ctx: _Context) -> Dict[str, Any]:
    try:
        from resfast.nn.dense import DenseBlock, Transition
    except ImportError as exc:
        raise _NotAvailable(f"resfast.nn.dense is missing ({exc})") from exc
    out: Dict[str, Any] = {"available": True}
    _plot_connections(ctx.fig("study_dense_connections.png"))
    out["connections_figure"] = "figures/study_dense_connections.png"

    model = _model_fn(ctx.scale.memory_model)(10, "eager")
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    transitions = [m for m in model.modules() if isinstance(m, Transition)]
    if not blocks:
        raise _NotAvailable(f"{ctx.scale.memory_model} has no resfast DenseBlock")
    first = blocks[0]
    c0, k = first.num_input_features, first.growth_rate
    layers = list(first.values())
    out["channels"] = {
        "model": _spec_label(ctx.scale.memory_model), "c0": c0, "k": k, "num_layers": len(layers),
        "layers": [{"layer": i + 1, "formula": c0 + i * k, "measured": layer.norm1.num_features,
                    "bottleneck": layer.conv1.out_channels, "new": layer.conv2.out_channels}
                   for i, layer in enumerate(layers)],
        "block_out": c0 + len(layers) * k,
        "transitions": [{"in": t.norm.num_features, "out": t.conv.out_channels} for t in transitions],
        "blocks": [{"c0": b.num_input_features, "layers": len(b), "k": b.growth_rate} for b in blocks],
    }
    out["counts"] = []
    names = ("densenet_bc100_k12", "densenet_bc190_k40", "densenet121")
    for name in names[:1] if ctx.scale.name == "tiny" else names:
        try:
            out["counts"].append(_counts(name))
        except _NotAvailable:
            pass
    try:
        from resfast.profiling import memory as mem
    except ImportError as exc:
        out["memory"] = {"available": False, "reason": f"resfast.profiling.memory is missing ({exc})"}
        return out
    modes = [m for m in ("naive", "checkpoint", "shared") if m in mem.MODES]
    if ctx.scale.memory_model.startswith("densenet_bc:"):
        model_rows = _measure_custom_modes(mem, ctx, modes)
    else:
        model_rows = mem.measure_modes(ctx.scale.memory_model, modes, batch_size=ctx.scale.memory_batch,
                                       image_size=ctx.scale.memory_image, device=ctx.device, backend=ctx.backend,
                                       seed=ctx.seed, progress=False)
    sweep = mem.block_memory_sweep(modes, layers=ctx.scale.sweep_layers, device=ctx.device, backend=ctx.backend,
                                   progress=False, **({"num_input_features": 8, "growth_rate": 4, "image_size": 8}
                                                      if ctx.scale.name == "tiny" else {}))
    mem.plot_sweep(sweep, ctx.fig("study_dense_memory.png"))
    out["memory"] = {"available": True, "model": _spec_label(ctx.scale.memory_model),
                     "batch_size": ctx.scale.memory_batch, "image_size": ctx.scale.memory_image,
                     "device": str(ctx.device), "modes": model_rows, "sweep": sweep,
                     "figure": "figures/study_dense_memory.png"}
    return out


def _measure_custom_modes(mem, ctx: _Context, modes: Sequence[str]) -> List[Dict[str, Any]]:
    rows, state = [], None
    x = torch.randn(ctx.scale.memory_batch, 3, ctx.scale.memory_image, ctx.scale.memory_image,
                    generator=torch.Generator().manual_seed(ctx.seed))
    for mode in modes:
        memory, recompute = mem.MODES[mode]
        torch.manual_seed(ctx.seed)
        model = _model_fn(ctx.scale.memory_model)(10, ctx.backend, memory=memory, recompute=recompute)
        state = state or {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        rows.append({"mode": mode, **mem.measure_training_step(model, x, ctx.device)})
    naive = next((r["peak_bytes"] for r in rows if r["mode"] == "naive"), None)
    for r in rows:
        r["ratio_to_naive"] = r["peak_bytes"] / naive if naive else None
    return rows


# ----------------------------------------------------------------------------------------- helpers


def _model_fn(spec: str) -> Callable[..., nn.Module]:
    """A model from a spec: a registered name, or ``wrn:D:K``, ``preact:D``, ``resnext:D:C:W``,
    ``densenet_bc:D:K`` for sizes the registry does not hold (the small analogues)."""
    kind, *nums = spec.split(":")
    n = [int(v) for v in nums]
    if not nums:
        def build(num_classes, backend, **kw):
            from resfast.models import create_model

            _require_models(spec)
            return create_model(spec, num_classes=num_classes, backend=backend, **kw)
        return build
    if kind == "wrn":
        from resfast.models.wide_resnet import WideResNet

        return lambda num_classes, backend, dropout=0.0: WideResNet(n[0], n[1], num_classes, dropout, backend=backend)
    if kind == "preact":
        from resfast.models.preact_resnet import PreActResNet

        return lambda num_classes, backend: PreActResNet(n[0], num_classes, backend=backend)
    if kind == "resnext":
        from resfast.models.resnext import CifarResNeXt

        return lambda num_classes, backend: CifarResNeXt(n[0], n[1], n[2], num_classes, backend=backend)
    if kind == "densenet_bc":
        from resfast.models.densenet import densenet_bc

        return lambda num_classes, backend, **kw: densenet_bc(n[0], n[1], num_classes, backend=backend, **kw)
    raise ValueError(f"unknown model spec {spec!r}")


def _spec_label(spec: str) -> str:
    kind, *nums = spec.split(":")
    return {"wrn": "WRN-{}-{}", "preact": "pre-act ResNet-{}", "resnext": "ResNeXt-{} ({}x{}d)",
            "densenet_bc": "DenseNet-BC-{} (k={})"}.get(kind, spec).format(*nums) if nums else spec


def _require_models(*names: str) -> None:
    try:
        from resfast.models import list_models
    except ImportError as exc:
        raise _NotAvailable(f"resfast.models is missing ({exc})") from exc
    missing = [n for n in names if n not in list_models()]
    if missing:
        raise _NotAvailable(f"model(s) {', '.join(missing)} not registered")


def _counts(name: str) -> Dict[str, Any]:
    try:
        from resfast.profiling.counting import model_counts
    except ImportError as exc:
        raise _NotAvailable(f"resfast.profiling.counting is missing ({exc})") from exc
    _require_models(name)
    return model_counts(name)


def _train_compare(ctx: _Context, label: str, spec: str, dropout: Optional[float] = None) -> Dict[str, Any]:
    """Train one comparison model at the scale's settings; the same seed, data and schedule for all."""
    from resfast.profiling.counting import count_macs, count_params
    from resfast.train.loop import TrainConfig

    train_set, test_set = ctx.datasets()
    torch.manual_seed(ctx.seed)
    kwargs = {"dropout": dropout} if dropout is not None else {}
    model = _model_fn(spec)(train_set.num_classes, ctx.backend, **kwargs)
    size = (3, ctx.scale.image_size, ctx.scale.image_size)
    macs = count_macs(model, size)
    _warm_up(model, train_set, ctx)
    cfg = TrainConfig(model=label, data=ctx.scale.data, epochs=ctx.scale.epochs, batch_size=ctx.scale.batch_size,
                      lr=ctx.scale.lr, device=str(ctx.device), backend=ctx.backend, seed=ctx.seed, progress=False,
                      subset=ctx.scale.subset, measure_memory=False, dropout=dropout)
    history: List[Dict[str, float]] = []
    result = _train_logged(cfg, model, (train_set, test_set), history)
    times = sorted(result["epoch_time_s"])
    # The median epoch: on a shared machine one slow epoch (another job's burst) should not decide.
    median = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
    images = sum(h["images_per_s"] * h["epoch_time_s"] for h in history) / len(history)
    return {"label": label, "spec": spec, "params": count_params(model), "macs": macs, "input_size": list(size),
            "epochs": len(times), "time_per_epoch_s": median, "images_per_s": images / median,
            "test_acc": result["test_acc"], "best_test_acc": max(result["test_acc_per_epoch"]),
            "final_train_loss": result["train_loss"][-1], "final_test_loss": history[-1]["test_loss"],
            "history": history, "peak_memory_bytes": result["peak_memory_bytes"]}


def _warm_up(model: nn.Module, train_set, ctx: _Context) -> None:
    """One forward and backward of a copy on one batch, so one-time costs (allocator, kernel
    selection, lazy initialisation) stay out of the first epoch's time."""
    import copy

    from resfast.train.data import BatchLoader

    clone = copy.deepcopy(model).to(ctx.device).train()
    x, y = next(iter(BatchLoader(train_set, min(ctx.scale.batch_size, len(train_set)))))
    torch.nn.functional.cross_entropy(clone(x.to(ctx.device)), y.to(ctx.device)).backward()


def _train_logged(cfg, model, datasets, history: List[Dict[str, float]]) -> Dict[str, Any]:
    from resfast.train.loop import train

    return train(cfg, model=model, datasets=datasets, history=history)


def _plot_runs(runs: List[Dict[str, Any]], path: str, title: str) -> None:
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for r in runs:
        ep = [h["epoch"] for h in r["history"]]
        a.plot(ep, [h["train_loss"] for h in r["history"]], "o-", label=r["label"])
        b.plot(ep, [h["test_acc"] for h in r["history"]], "o-", label=r["label"])
    a.set_xlabel("epoch"), a.set_ylabel("train loss"), a.legend(fontsize=8)
    b.set_xlabel("epoch"), b.set_ylabel("test accuracy"), b.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_connections(path: str, layers: int = 4) -> None:
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _setup(scale: Scale, device: torch.device, backend: str) -> Dict[str, Any]:
    from resfast import __version__
    from resfast.backends import resolve_backend

    try:
        resolved = resolve_backend(backend, device)
    except Exception as exc:  # reported, not fatal: the runs will raise with the full reason
        resolved = f"unavailable ({exc})"
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"scale": scale.name, "data": scale.data, "image_size": scale.image_size, "subset": scale.subset,
            "epochs": scale.epochs, "batch_size": scale.batch_size, "lr": scale.lr, "device": str(device),
            "device_name": dev_name, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "backend": backend, "resolved_backend": resolved, "torch": torch.__version__, "resfast": __version__,
            "python": platform.python_version(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- markdown


def render_markdown(results: Dict[str, Any]) -> str:
    """The study as markdown: every number comes from ``results``."""
    s = results["setup"]
    sec = results["sections"]
    md: List[str] = []
    w = md.append
    w("# Architecture study: measured comparisons\n")
    w("Generated by `resfast study"
      + (f" --scale {s['scale']}" if s["scale"] != "small" else "")
      + (f" --data {s['data']}" if s["data"] != ("cifar10" if s["scale"] == "full" else "digits") else "")
      + "`; do not edit by hand (rerun the command instead). Every number below was measured by that run.\n")
    w("| setting | value |\n|---|---|")
    data_desc = (f"scikit-learn digits (8x8 originals) upsampled to {s['image_size']}x{s['image_size']}"
                 if s["data"] == "digits" else f"{s['data']} at 32x32")
    if s.get("train_images"):
        data_desc += f", {s['train_images']} train / {s['test_images']} test images"
    if s.get("subset"):
        data_desc += f", first {s['subset']} train and test images only"
    for k, v in (("scale", s["scale"]), ("data", data_desc), ("epochs per comparison run", s["epochs"]),
                 ("batch size / peak lr", f"{s['batch_size']} / {s['lr']} (SGD, Nesterov 0.9, wd 5e-4, cosine)"),
                 ("device", f"{s['device']} ({s['device_name']}, {s['cpu_count']} cores, {s['threads']} threads)"),
                 ("backend", f"{s['backend']} -> {s['resolved_backend']}"),
                 ("versions", f"torch {s['torch']}, resfast {s['resfast']}, Python {s['python']}"),
                 ("commit / date", f"{s['commit']} / {s['date']}"),
                 ("total study time", f"{results['total_time_s']:.0f} s")):
        w(f"| {k} | {v} |")
    w("")
    w("Times are wall-clock on this machine; on a shared CPU they vary from run to run, so compare "
      "the models within one table rather than across runs. Accuracies after a few epochs rank "
      "how fast each model learns at this budget, not the converged accuracies of the papers.\n")

    titles = {"target": "1. Digits target: wrn16_2 in 3 epochs", "wide_vs_deep": "2. Wide versus deep",
              "dropout": "3. Dropout inside the WRN block", "resnext": "4. ResNeXt versus ResNet",
              "densenet": "5. DenseNet: connections, channels and memory"}
    renderers = {"target": _md_target, "wide_vs_deep": _md_wide, "dropout": _md_dropout, "resnext": _md_resnext,
                 "densenet": _md_dense}
    for name in SECTIONS:
        w(f"## {titles[name]}\n")
        r = sec.get(name)
        if r is None:
            w("Not run (left out with `--sections`).\n")
            continue
        if not r.get("available", False):
            w(f"Not available: {r.get('reason', 'unknown')}.\n")
            continue
        renderers[name](r, w)
        w(f"*Section time: {r['time_s']:.0f} s.*\n")
    return "\n".join(md)


def _m(v: Optional[float], unit: float = 1e6, digits: int = 2) -> str:
    return "-" if v is None else f"{v / unit:.{digits}f}"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _runs_table(runs: List[Dict[str, Any]], w) -> None:
    w("| model | params (M) | MACs/image (M) | time/epoch (s) | images/s | final train loss | test acc "
      "| best test acc |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        w(f"| {r['label']} | {_m(r['params'])} | {_m(r['macs'], 1e6, 1)} | {r['time_per_epoch_s']:.1f} | "
          f"{r['images_per_s']:.0f} | {r['final_train_loss']:.3f} | {_pct(r['test_acc'])} | "
          f"{_pct(r['best_test_acc'])} |")
    w(f"\nMACs at the trained input size ({r['input_size'][1]}x{r['input_size'][2]}); {r['epochs']} "
      f"epoch{'s' if r['epochs'] != 1 else ''} each; time/epoch is the median epoch.\n")


def _md_target(r, w) -> None:
    res = r["result"]
    w(f"`resfast train --model {r['model']} --epochs {r['epochs']}` (digits at 32x32, batch {r['batch_size']}, "
      f"{r['schedule']} schedule, {r['threads']} threads). Target: at least 95% test accuracy within 3 epochs.\n")
    w("| epoch | train loss | test loss | test acc | epoch time (s) | images/s |\n|---:|---:|---:|---:|---:|---:|")
    for h in r["history"]:
        w(f"| {h['epoch']} | {h['train_loss']:.3f} | {h['test_loss']:.3f} | {_pct(h['test_acc'])} | "
          f"{h['epoch_time_s']:.1f} | {h['images_per_s']:.0f} |")
    met = "met" if res["test_acc"] >= 0.95 else "NOT met"
    w(f"\nFinal test accuracy {_pct(res['test_acc'])}: target {met}. Parameters {res['params']:,}; "
      f"peak memory of a training step {_m(res['peak_memory_bytes'], 2**20, 1)} MiB "
      f"({res['peak_memory_source']}).\n")
    w(f"![training curves]({r['figure']})\n")


def _md_wide(r, w) -> None:
    runs = r["runs"]
    w("A wide, shallow WRN against a deep, thin pre-activation bottleneck ResNet of similar size, "
      "same data, seed and schedule:\n")
    _runs_table(runs, w)
    w("| model | conv layers | widest conv (channels) | params (M) |\n|---|---:|---:|---:|")
    for d in r["shape"]:
        w(f"| {d['label']} | {d['conv_layers']} | {d['widest_conv_channels']} | {_m(d['params'])} |")
    a, b = runs
    rate_a, rate_b = (r["macs"] * r["images_per_s"] * 3 / 1e9 for r in (a, b))
    busier = a["label"] if rate_a > rate_b else b["label"]
    w(f"\nPer epoch the {a['label']} took {a['time_per_epoch_s'] / b['time_per_epoch_s']:.2f}x the time of the "
      f"{b['label']} with {a['macs'] / b['macs']:.2f}x its MACs and {a['params'] / b['params']:.2f}x its parameters. "
      f"Counting a training step as 3x the forward MACs, the {a['label']} ran {rate_a:.1f} GMAC/s and the "
      f"{b['label']} {rate_b:.1f} GMAC/s: the {busier} keeps this device busier per MAC.\n")
    w(f"![wide versus deep]({r['figure']})\n")
    w("Parameter counts of the papers' networks (from `resfast.profiling.counting`, at each model's input size):\n")
    w("| model | params (M) | MACs/image (G) | input |\n|---|---:|---:|---|")
    for c in r["reference"]:
        w(f"| {c['name']} | {_m(c['params'])} | {_m(c['macs'], 1e9)} | {'x'.join(map(str, c['input_size']))} |")
    ref = {c["name"]: c for c in r["reference"]}
    if {"wrn28_10", "resnet50", "resnet101"} <= set(ref):
        w(f"\nWRN-28-10 has {ref['wrn28_10']['params'] / ref['resnet50']['params']:.2f}x the parameters of "
          f"ResNet-50 and {ref['wrn28_10']['params'] / ref['resnet101']['params']:.2f}x those of ResNet-101, "
          f"with 28 layers instead of 50 / 101.\n")


def _md_dropout(r, w) -> None:
    w(f"Dropout (p = {r['p']:g}) between the two 3x3 convs of every WRN block, against none:\n")
    _runs_table(r["runs"], w)
    w("| run | final train loss | final test loss |\n|---|---:|---:|")
    for x in r["runs"]:
        w(f"| {x['label']} | {x['final_train_loss']:.3f} | {x['final_test_loss']:.3f} |")
    a, b = r["runs"]
    w(f"\nWith dropout the final train loss is {b['final_train_loss'] - a['final_train_loss']:+.3f} and the "
      f"test accuracy {100 * (b['test_acc'] - a['test_acc']):+.1f} points against no dropout.\n")
    w(f"![dropout]({r['figure']})\n")


def _md_resnext(r, w) -> None:
    w("ImageNet-size networks (224x224), counted by `resfast.profiling.counting`:\n")
    w("| model | params (M) | MACs/image (G) |\n|---|---:|---:|")
    for c in r["imagenet"]:
        w(f"| {c['name']} | {_m(c['params'])} | {_m(c['macs'], 1e9)} |")
    a, b = r["imagenet"][:2]
    w(f"\nResNeXt-50 32x4d: {b['params'] / a['params']:.3f}x the parameters and {b['macs'] / a['macs']:.3f}x the "
      f"MACs of ResNet-50.")
    if len(r["imagenet"]) > 2:
        c = r["imagenet"][2]
        w(f" Its successor SE-ResNeXt-50 32x4d adds squeeze-and-excitation: {c['params'] / b['params']:.3f}x "
          f"the parameters and {c['macs'] / b['macs']:.3f}x the MACs of ResNeXt-50 32x4d.")
    w("")
    w("Cardinality at equal complexity (the ResNeXt paper's Table 2 template: ResNet-50 layout, "
      "conv2 of the first stage has C groups of width d):\n")
    w("| cardinality C | width d | C x d | params (M) | MACs/image (G) |\n|---:|---:|---:|---:|---:|")
    for c in r["cardinality"]:
        w(f"| {c['cardinality']} | {c['width']} | {c['group_width']} | {_m(c['params'])} | {_m(c['macs'], 1e9)} |")
    ps = [c["params"] for c in r["cardinality"]]
    w(f"\nParameters stay within {100 * (max(ps) - min(ps)) / min(ps):.1f}% of each other from C=1 to C=32 while "
      f"the grouped conv grows from {r['cardinality'][0]['group_width']} to {r['cardinality'][-1]['group_width']} "
      f"channels.\n")
    w("A short training run of CIFAR-size analogues with equal parameters (the ResNet is the same network "
      "with one group, its width chosen to match):\n")
    _runs_table(r["runs"], w)
    w(f"![resnext versus resnet]({r['figure']})\n")


def _md_dense(r, w) -> None:
    w("Inside a dense block every layer reads the concatenation of the block input and all earlier "
      "layers' outputs; in a residual chain each layer reads only its predecessor and adds to it:\n")
    w(f"![connections]({r['connections_figure']})\n")
    c = r["channels"]
    w(f"Input channels of each layer of the first dense block of {c['model']} (C0 = {c['c0']}, k = {c['k']}, "
      f"{c['num_layers']} layers), read from the built model beside the formula C0 + (l-1)k:\n")
    w("| layer l | C0 + (l-1)k | model's input channels | bottleneck (1x1 out) | new channels |")
    w("|---:|---:|---:|---:|---:|")
    for row in c["layers"]:
        w(f"| {row['layer']} | {row['formula']} | {row['measured']} | {row['bottleneck']} | {row['new']} |")
    w(f"\nThe block outputs C0 + Lk = {c['block_out']} channels.\n")
    if c["transitions"]:
        w("| transition | in channels | out channels |\n|---:|---:|---:|")
        for i, t in enumerate(c["transitions"]):
            w(f"| {i + 1} | {t['in']} | {t['out']} |")
        w("")
    if r.get("counts"):
        w("Parameter and MAC counts of the zoo's DenseNets (`resfast.profiling.counting`):\n")
        w("| model | params (M) | MACs/image (G) | input |\n|---|---:|---:|---|")
        for c in r["counts"]:
            w(f"| {c['name']} | {_m(c['params'])} | {_m(c['macs'], 1e9)} | {'x'.join(map(str, c['input_size']))} |")
        w("")
    m = r.get("memory", {})
    if not m.get("available"):
        w(f"Memory: not available: {m.get('reason', 'unknown')}.\n")
        return
    w(f"Peak memory of one training step of {m['model']} (batch {m['batch_size']}, {m['image_size']}x"
      f"{m['image_size']}, {m['device']}), from `resfast.profiling.memory` (`resfast memory`):\n")
    w("| mode | peak (MiB) | activations (MiB) | step time (s) | vs naive |\n|---|---:|---:|---:|---:|")
    for row in m["modes"]:
        ratio = row.get("ratio_to_naive")
        w(f"| {row['mode']} | {_m(row['peak_bytes'], 2**20, 1)} | {_m(row['activation_bytes'], 2**20, 1)} | "
          f"{row['step_time_s']:.3f} | {'-' if ratio is None else f'{ratio:.3f}'} |")
    sweep = m["sweep"]
    w(f"\nOne dense block against its number of layers (C0 = {sweep['num_input_features']}, k = "
      f"{sweep['growth_rate']}, batch {sweep['batch_size']}, {sweep['image_size']}x{sweep['image_size']}):\n")
    layers = sweep["layers"]
    w("| layers | " + " | ".join(f"{mode} peak (MiB)" for mode in sweep["modes"]) + " |")
    w("|---:|" + "---:|" * len(sweep["modes"]))
    for i, n in enumerate(layers):
        w(f"| {n} | " + " | ".join(_m(row["peak_bytes"][i], 2**20, 2) for row in sweep["modes"].values()) + " |")
    w("")
    for mode, row in sweep["modes"].items():
        kind = "quadratic" if row["fit_degree"] == 2 else "linear"
        coeffs = ", ".join(f"{v / 2**20:.4g}" for v in row["fit"])
        w(f"- {mode}: {kind} fit, coefficients (MiB, highest power first) {coeffs}")
    w(f"\n![dense memory]({m['figure']})\n")
