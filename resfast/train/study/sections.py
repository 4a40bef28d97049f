"""The study's sections: each measures one comparison and returns its numbers (no markdown)."""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from resfast.profiling.counting import count_macs, count_params, model_counts
from resfast.train.study.config import CARDINALITY_TABLE, Comparison, ModelSpec, Scale
from resfast.train.study.figures import plot_comparison, plot_connections

__all__ = ["Context", "RUNNERS", "learned", "run_comparison"]


@dataclass
class Context:
    """What every section shares: the scale, device, backend, data and figure folder."""

    scale: Scale
    device: torch.device
    backend: str
    data_dir: Optional[str]
    fig_dir: str
    seed: int
    _data: Optional[Tuple[Any, Any]] = None

    def datasets(self):
        """``(train, test)`` of the scale's dataset, loaded once."""
        if self._data is None:
            from resfast.train.data import load_dataset, load_digits

            if self.scale.data == "digits":
                self._data = load_digits(size=self.scale.image_size)
            else:
                self._data = load_dataset(self.scale.data, self.data_dir)
        return self._data

    def fig(self, name: str) -> str:
        """Path of the figure ``name`` in the figure folder."""
        return os.path.join(self.fig_dir, name)


def learned(test_acc: Optional[float], threshold: float) -> bool:
    """Whether a run learned the task: its final test accuracy reached ``threshold``."""
    return test_acc is not None and test_acc >= threshold


def run_comparison(ctx: Context, comparison: Comparison, figure: str, title: str) -> Dict[str, Any]:
    """Train ``comparison``'s two models interleaved at its budget; their runs (baseline
    first), the timing verdict and whether each learned."""
    from resfast.train.loop import TrainConfig
    from resfast.train.study.interleave import compare_times, train_interleaved

    train_set, test_set = ctx.datasets()
    specs = (comparison.baseline, comparison.other)
    models = []
    for spec in specs:
        torch.manual_seed(ctx.seed)  # each model starts from the initialisation train() would give it
        models.append(spec.build(train_set.num_classes, ctx.backend))
    size = (3, ctx.scale.image_size, ctx.scale.image_size)
    macs = [count_macs(m, size) for m in models]
    cfg = TrainConfig(model="study", data=ctx.scale.data, epochs=comparison.epochs, batch_size=ctx.scale.batch_size,
                      lr=comparison.lr, device=str(ctx.device), backend=ctx.backend, seed=ctx.seed, progress=False,
                      subset=ctx.scale.subset, measure_memory=False)
    runs = train_interleaved(models, cfg, (train_set, test_set))
    threshold = ctx.scale.learned_acc
    for spec, run, mac in zip(specs, runs, macs):
        run.update(label=spec.label, model=spec.describe(), macs=mac, input_size=list(size),
                   learned=learned(run["test_acc"], threshold))
    timing = compare_times(runs[0]["step_times_s"], runs[1]["step_times_s"])
    for run, key in zip(runs, ("a", "b")):
        run["step_time_median_s"] = timing[f"median_{key}_s"]
        run["step_time_spread"] = timing[f"spread_{key}"]
        run["images_per_s"] = ctx.scale.batch_size / timing[f"median_{key}_s"]
    plot_comparison(runs, threshold, ctx.fig(figure), title)
    return {"available": True, "runs": runs, "timing": timing, "epochs": comparison.epochs, "lr": comparison.lr,
            "batch_size": ctx.scale.batch_size, "learned_acc": threshold, "baseline_learned": runs[0]["learned"],
            "figure": f"figures/{figure}"}


def _target(ctx: Context) -> Dict[str, Any]:
    if ctx.scale.target is None or ctx.scale.data != "digits":
        raise NotAvailable("the digits target is run at small scale on digits only")
    from resfast.train.data import load_digits
    from resfast.train.loop import TrainConfig, plot_curves
    from resfast.train.study.interleave import spread, train_interleaved

    name, epochs = ctx.scale.target
    cfg = TrainConfig(model=name, data="digits", epochs=epochs, device=str(ctx.device), backend=ctx.backend,
                      seed=ctx.seed, progress=False, measure_memory=False)
    torch.manual_seed(ctx.seed)
    model = ModelSpec(name, name).build(10, ctx.backend)
    (run,) = train_interleaved([model], cfg, load_digits(size=32))
    plot_curves(run["history"], ctx.fig("study_target_curves.png"),
                title=f"{name} on digits (32x32), {epochs} epochs")
    times = run["step_times_s"][1:]
    return {"available": True, "model": name, "epochs": epochs, "batch_size": cfg.resolved().batch_size,
            "schedule": cfg.schedule, "history": run["history"], "test_acc": run["test_acc"], "params": run["params"],
            "step_time_median_s": statistics.median(times), "step_time_spread": spread(times),
            "learned_acc": ctx.scale.learned_acc, "figure": "figures/study_target_curves.png",
            "threads": torch.get_num_threads()}


def _wide_vs_deep(ctx: Context) -> Dict[str, Any]:
    comp = ctx.scale.wide_vs_deep
    out = run_comparison(ctx, comp, "study_wide_vs_deep.png", "wide versus deep (interleaved)")
    out["reference"] = [model_counts(name) for name in ("wrn28_10", "resnet50", "resnet101", *ctx.scale.paper_pair)]
    out["shape"] = []
    for spec in (comp.baseline, comp.other):
        model = spec.build(10, "eager")
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        out["shape"].append({"label": spec.label, "conv_layers": len(convs),
                             "widest_conv_channels": max(m.out_channels for m in convs),
                             "params": count_params(model)})
    return out


def _dropout(ctx: Context) -> Dict[str, Any]:
    comp = ctx.scale.dropout
    out = run_comparison(ctx, comp, "study_dropout.png", f"{comp.other.label} against none (interleaved)")
    out["p"] = comp.other.dropout
    return out


def _resnext(ctx: Context) -> Dict[str, Any]:
    from resfast.models import CifarResNeXt, ResNet
    from resfast.nn.blocks import Bottleneck

    imagenet = [model_counts(name) for name in ("resnet50", "resnext50_32x4d", "seresnext50_32x4d")]
    cardinality = []
    for c, d in CARDINALITY_TABLE:
        with torch.device("meta"):
            model = ResNet(Bottleneck, [3, 4, 6, 3], groups=c, width_per_group=d, backend="eager")
        cardinality.append({"cardinality": c, "width": d, "group_width": c * d, "params": count_params(model),
                            "macs": count_macs(model, (3, 224, 224))})
    depth, card, width = ctx.scale.resnext

    def params_of(c: int, d: int) -> int:
        with torch.device("meta"):  # no memory, no initialisation: only the shapes count
            return count_params(CifarResNeXt(depth, c, d, backend="eager"))

    # The ResNet analogue: the same network with one group, its width chosen for equal parameters.
    target = params_of(card, width)
    best, d = 1, 1
    while d <= 4 * card * width:  # parameters grow with the width: stop once past the target
        p = params_of(1, d)
        if abs(p - target) < abs(params_of(1, best) - target):
            best = d
        if p > target:
            break
        d += 1
    epochs, lr = ctx.scale.resnext_budget
    comp = Comparison(
        baseline=ModelSpec(f"ResNet-{depth} (1x{best}d)", CifarResNeXt,
                           {"depth": depth, "cardinality": 1, "base_width": best}),
        other=ModelSpec(f"ResNeXt-{depth} ({card}x{width}d)", CifarResNeXt,
                        {"depth": depth, "cardinality": card, "base_width": width}),
        epochs=epochs, lr=lr)
    out = run_comparison(ctx, comp, "study_resnext.png", "ResNeXt versus ResNet, equal parameters (interleaved)")
    out.update(imagenet=imagenet, cardinality=cardinality)
    return out


def _densenet(ctx: Context) -> Dict[str, Any]:
    from resfast.nn.dense import DenseBlock, Transition
    from resfast.profiling import memory as mem

    out: Dict[str, Any] = {"available": True}
    plot_connections(ctx.fig("study_dense_connections.png"))
    out["connections_figure"] = "figures/study_dense_connections.png"
    spec = ctx.scale.memory_model
    model = spec.build(10, "eager")
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    transitions = [m for m in model.modules() if isinstance(m, Transition)]
    first = blocks[0]
    c0, k = first.num_input_features, first.growth_rate
    layers = list(first.values())
    out["channels"] = {
        "model": spec.label, "c0": c0, "k": k, "num_layers": len(layers),
        "layers": [{"layer": i + 1, "formula": c0 + i * k, "measured": layer.norm1.num_features,
                    "bottleneck": layer.conv1.out_channels, "new": layer.conv2.out_channels}
                   for i, layer in enumerate(layers)],
        "block_out": c0 + len(layers) * k,
        "transitions": [{"in": t.norm.num_features, "out": t.conv.out_channels} for t in transitions],
        "blocks": [{"c0": b.num_input_features, "layers": len(b), "k": b.growth_rate} for b in blocks],
    }
    names = ("densenet_bc100_k12", "densenet_bc190_k40", "densenet121")
    out["counts"] = [model_counts(name) for name in (names[:1] if ctx.scale.name == "tiny" else names)]
    modes = ("naive", "checkpoint", "shared")
    rows, models = _measure_modes(ctx, spec, modes)
    out["memory"] = {"available": True, "model": spec.label, "batch_size": ctx.scale.memory_batch,
                     "image_size": ctx.scale.memory_image, "device": str(ctx.device), "modes": rows,
                     "figure": "figures/study_dense_memory.png"}
    if ctx.scale.memory_time_rounds:
        out["memory"]["timing"] = _time_modes(ctx, models, modes)
    sweep = mem.block_memory_sweep(modes, layers=ctx.scale.sweep_layers, device=ctx.device, backend=ctx.backend,
                                   progress=False, **ctx.scale.sweep_shape)
    mem.plot_sweep(sweep, ctx.fig("study_dense_memory.png"))
    out["memory"]["sweep"] = sweep
    return out


def _memory_input(ctx: Context) -> torch.Tensor:
    size = ctx.scale.memory_image
    return torch.randn(ctx.scale.memory_batch, 3, size, size, generator=torch.Generator().manual_seed(ctx.seed))


def _measure_modes(ctx: Context, spec: ModelSpec, modes: Sequence[str]) -> Tuple[List[Dict[str, Any]], List[nn.Module]]:
    """Peak memory of one training step per dense-block memory mode, same weights and input
    (``resfast.profiling.memory``); the models, for timing."""
    from resfast.profiling import memory as mem

    x = _memory_input(ctx)
    rows, models, state = [], [], None
    for mode in modes:
        memory, recompute = mem.MODES[mode]
        torch.manual_seed(ctx.seed)
        model = spec.build(10, ctx.backend, memory=memory, recompute=recompute)
        state = state or {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        r = mem.measure_training_step(model, x, ctx.device, timed=False)
        rows.append({"mode": mode, "peak_bytes": r["peak_bytes"], "activation_bytes": r["activation_bytes"]})
        models.append(model)
    naive = next((r["peak_bytes"] for r in rows if r["mode"] == "naive"), None)
    for r in rows:
        r["ratio_to_naive"] = r["peak_bytes"] / naive if naive else None
    return rows, models


def _time_modes(ctx: Context, models: Sequence[nn.Module], modes: Sequence[str]) -> Dict[str, Any]:
    """Step times of the memory modes, interleaved round by round; each mode against naive."""
    from resfast.profiling.memory import _default_loss
    from resfast.train.study.interleave import compare_times, timed_round

    x = _memory_input(ctx).to(ctx.device)

    def step(model: nn.Module):
        def run() -> None:
            model.zero_grad(set_to_none=True)
            _default_loss(model(x)).backward()
        return run

    steps = [step(m.to(ctx.device).train()) for m in models]
    times: List[List[float]] = [[] for _ in models]
    for _ in range(ctx.scale.memory_time_rounds + 1):  # + the warm-up round compare_times leaves out
        for k, t in enumerate(timed_round(steps, ctx.device)):
            times[k].append(t)
    base = list(modes).index("naive")
    return {"rounds": ctx.scale.memory_time_rounds, "times_s": dict(zip(modes, times)),
            "against_naive": {mode: compare_times(times[k], times[base]) for k, mode in enumerate(modes)
                              if k != base}}


class NotAvailable(RuntimeError):
    """A section cannot run at this scale or on this data."""


RUNNERS = {"target": _target, "wide_vs_deep": _wide_vs_deep, "dropout": _dropout, "resnext": _resnext,
           "densenet": _densenet}
