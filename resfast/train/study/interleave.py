"""Interleaved timing: the compared models run in turns (A, B, A, B ...) in one process.

On a shared machine the load changes from second to second; timing model A for a minute and
then model B for a minute measures the load as much as the models. Run in turns, both see
the same load within each round, so the per-round time ratio A/B is what the models cost,
and its spread says how far the load blurred it. :func:`train_interleaved` trains several
models this way on the same batches (interleaving changes nothing in what each learns: the
batches, augmentation and schedule are those of :func:`resfast.train.loop.train`);
:func:`compare_times` turns the per-step times into a median, a spread and a verdict.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from resfast.profiling.counting import count_params
from resfast.profiling.runtime import resolve_device, sync
from resfast.train.data import BatchLoader, ImageDataset
from resfast.train.loop import TrainConfig, _subset, evaluate, lr_at, make_optimizer, set_lr, train_step

__all__ = ["timed_round", "train_interleaved", "compare_times", "quantile", "spread"]


def timed_round(steps: Sequence[Callable[[], Any]], device: torch.device) -> List[float]:
    """Run each of ``steps`` once, in order; the wall time of each in seconds (the device's
    queued work included)."""
    times = []
    for step in steps:
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def train_interleaved(models: Sequence[nn.Module], config: TrainConfig,
                      datasets: Tuple[ImageDataset, ImageDataset], *, log=None) -> List[Dict[str, Any]]:
    """Train ``models`` together for ``config.epochs``: each batch is one round in which every
    model takes its training step in turn (A, B, A, B ...), each step timed.

    Every model sees the batches, augmentation and learning-rate schedule that
    ``resfast.train.loop.train(config, model=...)`` would give it alone. Returns one dict per
    model: ``history`` (the per-epoch rows of ``metrics.csv``, with the epoch's median step
    time in place of the wall time of the epoch), ``step_times_s`` (every step, in order),
    ``params``, ``test_acc``, ``final_train_loss``, ``final_test_loss``.
    """
    config.validate()
    config = config.resolved()
    log = log or sys.stderr
    device = resolve_device(config.device)
    train_set, test_set = datasets
    if config.subset:
        train_set, test_set = _subset(train_set, config.subset), _subset(test_set, config.subset)
    models = [m.to(device) for m in models]
    optimizers = [make_optimizer(m, config) for m in models]
    loader = BatchLoader(train_set, config.batch_size, shuffle=True, augment=True,
                         drop_last=len(train_set) > config.batch_size, seed=config.seed, workers=config.workers)
    steps = len(loader)
    runs: List[Dict[str, Any]] = [{"params": count_params(m), "history": [], "step_times_s": []} for m in models]
    for epoch in range(config.epochs):
        loader.generator.manual_seed(config.seed * 100_003 + epoch)  # as train(): the same batches
        sums = [[0.0, 0, 0] for _ in models]  # loss sum, correct, seen
        first = len(runs[0]["step_times_s"])
        for i, (x, y) in enumerate(loader):
            lr = lr_at(config, epoch, i, steps)
            x, y = x.to(device), y.to(device)
            results: List[Tuple[float, int]] = []

            def step(k: int) -> Callable[[], None]:
                def run() -> None:
                    set_lr(optimizers[k], lr)
                    results.append(train_step(models[k], optimizers[k], x, y, amp=config.amp))
                return run

            for k, t in enumerate(timed_round([step(k) for k in range(len(models))], device)):
                runs[k]["step_times_s"].append(t)
                loss_sum, correct = results[k]
                sums[k] = [sums[k][0] + loss_sum, sums[k][1] + correct, sums[k][2] + y.shape[0]]
        for k, model in enumerate(models):
            test_loss, test_acc = evaluate(model, test_set, device, amp=config.amp)
            median = statistics.median(runs[k]["step_times_s"][first:])
            runs[k]["history"].append({
                "epoch": epoch + 1, "lr": lr_at(config, epoch, 0, steps), "train_loss": sums[k][0] / sums[k][2],
                "train_acc": sums[k][1] / sums[k][2], "test_loss": test_loss, "test_acc": test_acc,
                "step_time_median_s": median, "images_per_s": config.batch_size / median,
            })
        rows = [r["history"][-1] for r in runs]
        print(f"epoch {epoch + 1}/{config.epochs}: " + "; ".join(
            f"[{k}] test acc {h['test_acc']:.3f}, step {1e3 * h['step_time_median_s']:.0f} ms"
            for k, h in enumerate(rows)), file=log, flush=True)
    for r in runs:
        last = r["history"][-1]
        r.update(test_acc=last["test_acc"], final_train_loss=last["train_loss"], final_test_loss=last["test_loss"],
                 epochs=config.epochs)
    return runs


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation between order statistics)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of no values")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> float:
    """The interquartile range of ``values`` relative to their median."""
    return (quantile(values, 0.75) - quantile(values, 0.25)) / statistics.median(values)


def compare_times(times_a: Sequence[float], times_b: Sequence[float], *, warmup: int = 1,
                  threshold: float = 1.0) -> Dict[str, Any]:
    """Compare two models' step times taken in turns (``times_a[i]`` and ``times_b[i]`` in
    round ``i``), leaving out the first ``warmup`` rounds (one-time costs).

    Returns each model's median step time and spread (interquartile range / median), and the
    per-round ratio ``a_i / b_i``: its median and interquartile range ``[p25, p75]``. The
    verdict ranks the models only when the spread allows it: ``"a"`` (A's time is below
    ``threshold`` times B's) when ``p75 < threshold``, ``"b"`` when ``p25 > threshold``, and
    ``None`` (too noisy to rank) when the interquartile range of the ratio contains
    ``threshold``, i.e. when at least a quarter of the rounds disagree with the median.
    """
    if len(times_a) != len(times_b):
        raise ValueError(f"interleaved times come in pairs, got {len(times_a)} and {len(times_b)}")
    if len(times_a) - warmup < 1:
        raise ValueError(f"need more than warmup={warmup} rounds, got {len(times_a)}")
    a, b = list(times_a[warmup:]), list(times_b[warmup:])
    ratios = [x / y for x, y in zip(a, b)]
    lo, hi = quantile(ratios, 0.25), quantile(ratios, 0.75)
    verdict: Optional[str] = "a" if hi < threshold else "b" if lo > threshold else None
    return {"rounds": len(a), "median_a_s": statistics.median(a), "median_b_s": statistics.median(b),
            "spread_a": spread(a), "spread_b": spread(b), "ratio_median": statistics.median(ratios),
            "ratio_p25": lo, "ratio_p75": hi, "threshold": threshold, "verdict": verdict}
