"""The training loop behind ``resfast train`` and ``resfast study``.

SGD with Nesterov momentum and weight decay; the WRN paper's step schedule (x0.2 at 30%,
60% and 80% of the epochs), cosine or one-cycle; optional AMP (fp16 with a grad scaler, or
bf16), channels_last, DDP with a distributed sampler and SyncBN, and ``torch.compile`` of the
training forward (``compile="reduce-overhead"`` captures each step in CUDA graphs on a GPU,
which takes the launches' host time away). Each epoch records its
time, images/s, train loss / accuracy and test loss / accuracy; the run directory gets
``metrics.csv``, ``metrics.json``, ``curves.png`` and ``checkpoint.pt`` (written atomically,
resumed with ``resume=True`` and loaded with ``weights_only=True``).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resfast.ops.autotune import record_choices
from resfast.profiling.counting import count_params
from resfast.profiling.memory import tracked_peak
from resfast.profiling.runtime import AMP_DTYPES, autocast, ensure_writable_dir, resolve_device, sync
from resfast.train.data import DATASETS, BatchLoader, ImageDataset, load_dataset
from resfast.train.distributed import (
    DistInfo, all_reduce_sum, cleanup, init_distributed, prepare_model, shard_indices, unwrap,
)

__all__ = ["TrainConfig", "train", "train_step", "evaluate", "build_model", "model_kwargs", "lr_at", "SCHEDULES",
           "AMP_MODES", "COMPILE_MODES", "save_checkpoint", "load_checkpoint", "measure_step_memory", "make_optimizer", "set_lr"]

SCHEDULES = ("step", "cosine", "onecycle")
#: ``compile`` values: ``"off"`` or a ``torch.compile`` mode.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AMP_MODES = tuple(AMP_DTYPES)
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in the checkpoint and in ``metrics.json``)."""

    model: str = "wrn16_2"
    data: str = "digits"
    data_dir: Optional[str] = None
    epochs: int = 3
    batch_size: Optional[int] = None  # None: 32 on digits (more steps in a short run), 128 on CIFAR
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    dropout: Optional[float] = None
    amp: str = "off"
    channels_last: bool = False
    backend: str = "auto"
    memory: Optional[str] = None
    sync_bn: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    compile: str = "off"  # COMPILE_MODES: "off", or the torch.compile mode of the training forward
    out: Optional[str] = None
    resume: bool = False
    progress: bool = True
    subset: Optional[int] = None  # use only the first N train / test images (smoke tests)
    measure_memory: bool = True
    model_kwargs: Dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """A copy with the per-dataset defaults filled in (``batch_size``)."""
        batch = self.batch_size if self.batch_size is not None else (32 if self.data == "digits" else 128)
        return dataclasses.replace(self, batch_size=batch)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        checks = [
            ("data", self.data in DATASETS, f"one of {DATASETS}"),
            ("epochs", isinstance(self.epochs, int) and self.epochs >= 1, "an int >= 1"),
            ("batch_size", self.batch_size is None or (isinstance(self.batch_size, int) and self.batch_size >= 1),
             "None or an int >= 1"),
            ("lr", isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf, "a finite positive number"),
            ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
            ("weight_decay", 0.0 <= self.weight_decay < math.inf, "finite and >= 0"),
            ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            ("dropout", self.dropout is None or 0.0 <= self.dropout < 1.0, "None or in [0, 1)"),
            ("amp", self.amp in AMP_MODES, f"one of {AMP_MODES}"),
            ("compile", self.compile in COMPILE_MODES, f"one of {COMPILE_MODES}"),
            ("workers", isinstance(self.workers, int) and self.workers >= 0, "an int >= 0"),
            ("subset", self.subset is None or (isinstance(self.subset, int) and self.subset >= 1),
             "None or an int >= 1"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"{name} must be {need}, got {getattr(self, name)!r}")
        if self.resume and not self.out:
            raise ValueError("resume=True needs out (the run directory holding checkpoint.pt)")


def lr_at(config: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at ``step`` (0-based) of ``epoch`` (0-based).

    ``step``: the WRN paper's schedule, ``lr * 0.2**k`` after 30%, 60%, 80% of the epochs
    (epochs 60, 120, 160 of 200). ``cosine``: per iteration from ``lr`` to 0.
    ``onecycle``: per iteration, cosine warm-up from ``lr/25`` to ``lr`` over the first 30%,
    then cosine annealing to ``lr/(25*1e4)`` (``torch.optim.lr_scheduler.OneCycleLR``'s
    defaults, learning rate only).
    """
    total = max(config.epochs * steps_per_epoch, 1)
    t = epoch * steps_per_epoch + step
    if config.schedule == "step":
        milestones = [math.ceil(config.epochs * f) for f in (0.3, 0.6, 0.8)]
        return config.lr * 0.2 ** sum(epoch >= m for m in milestones)
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * t / total))
    if config.schedule == "onecycle":
        # OneCycleLR's phases (pct_start 0.3, three_phase False): the warm-up ends at step
        # 0.3 * total - 1 and the annealing at step total - 1, both reached exactly
        start, end = config.lr / 25.0, config.lr / 25.0 / 1e4
        warm_end, last = 0.3 * total - 1.0, total - 1.0
        if t <= warm_end:
            return _cos_anneal(start, config.lr, t / warm_end)
        return _cos_anneal(config.lr, end, (t - warm_end) / (last - warm_end))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every parameter group's learning rate to ``lr``; returns ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _cos_anneal(a: float, b: float, frac: float) -> float:
    return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """``resfast.models.create_model(config.model, num_classes=..., ...)`` with the run's
    ``backend``, ``dropout`` and ``memory`` given to the families that declare them
    (:data:`resfast.models.FAMILY_OPTIONS`: dropout for Wide ResNets and DenseNets, memory for
    DenseNets); asking for ``dropout`` or ``memory`` on a model without it is a ``ValueError``."""
    from resfast.models import create_model

    return create_model(config.model, **model_kwargs(config.model, num_classes, backend=config.backend,
                                                     dropout=config.dropout, memory=config.memory),
                        **config.model_kwargs)


def model_kwargs(model, num_classes: int, *, backend: str = "auto", dropout: Optional[float] = None,
                 memory: Optional[str] = None) -> Dict[str, Any]:
    """The builder keywords of ``model`` (a registered name or a family's builder) for these
    options: ``backend`` where the family takes one, ``dropout`` and ``memory`` (``None``: the
    model's default) only where it does, else ``ValueError``."""
    from resfast.models import model_options

    options = model_options(model)
    kwargs: Dict[str, Any] = {"num_classes": num_classes}
    if "backend" in options:
        kwargs[options["backend"]] = backend
    name = model if isinstance(model, str) else getattr(model, "__name__", repr(model))
    for option, value, applies_to in (("dropout", dropout, "the Wide ResNet and DenseNet models"),
                                      ("memory", memory, "the DenseNet models")):
        if value is None:
            continue
        if option not in options:
            what = "dropout" if option == "dropout" else "memory mode"
            raise ValueError(f"{option}={value!r} given but model {name!r} takes no {what} (it applies to "
                             f"{applies_to})")
        kwargs[options[option]] = value
    return kwargs


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; weight decay on every parameter, as in the WRN paper."""
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.momentum > 0)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
               amp: str = "off", scaler: Optional["torch.amp.GradScaler"] = None) -> Tuple[float, int]:
    """One SGD step on ``(x, y)``; returns ``(sum of the per-image losses, number correct)``.

    The loss is the batch mean of the cross entropy, so under DDP (gradients averaged over
    ranks) a step on each rank's equal share of a batch is the step on the whole batch.
    """
    model.train()
    if _uses_cuda_graphs(model):
        # A new iteration for inductor's CUDA-graph trees: the previous step's outputs may be overwritten.
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(x.device, AMP_DTYPES[amp]):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        correct = int((logits.argmax(1) == y).sum())
    return float(loss.detach()) * y.shape[0], correct


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, device: torch.device, *, amp: str = "off",
             channels_last: bool = False, batch_size: int = 256, info: DistInfo = DistInfo()) -> Tuple[float, float]:
    """``(mean loss, accuracy)`` on ``dataset`` with the running BN statistics; under DDP each
    rank scores its strided share and the sums are all-reduced."""
    model.eval()
    loader = BatchLoader(dataset, batch_size, sampler=shard_indices(len(dataset), info))
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = _to_device(x, y, device, channels_last)
        with autocast(device, AMP_DTYPES[amp]):
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.shape[0]
    all_reduce_sum(sums, info)
    n = max(float(sums[2]), 1.0)
    return float(sums[0]) / n, float(sums[1]) / n


def train(config: TrainConfig, *, model: Optional[nn.Module] = None,
          datasets: Optional[Tuple[ImageDataset, ImageDataset]] = None, log=None,
          history: Optional[List[Dict[str, float]]] = None) -> Dict[str, Any]:
    """Run ``config`` and return the final metrics (see :func:`summary_of`).

    Args:
        config: the run.
        model: use this module instead of ``build_model(config, ...)`` (tests, the study).
        datasets: ``(train, test)`` already loaded (the study loads digits once).
        log: a text stream for progress lines (default stderr).
        history: if given, the per-epoch rows (those of ``metrics.csv``) are appended to it.
    """
    config.validate()
    config = config.resolved()
    log = log or sys.stderr
    device = resolve_device(config.device)
    # What would fail late fails now: the model name, the backend, the run directory.
    if model is None:
        from resfast.backends import resolve_backend
        from resfast.models import model_info

        model_info(config.model)
        resolve_backend(config.backend, device)
    if config.out and int(os.environ.get("RANK", "0")) == 0:
        if config.resume:
            _require_checkpoint(os.path.join(config.out, CHECKPOINT))  # before any folder is made
        ensure_writable_dir(config.out, "out")
        if not config.resume and os.path.isfile(os.path.join(config.out, CHECKPOINT)):
            # (a new run would overwrite it, and the old run's metrics, after its first epoch)
            raise ValueError(f"out {config.out!r} already holds a run ({CHECKPOINT}): resume it (--resume), or "
                             "give another --out (or delete that folder) to start a new one")
    info = init_distributed(device)
    try:
        return _train(config, model, datasets, device, info, log, history)
    finally:
        cleanup(info)


def _train(config, model, datasets, device, info: DistInfo, log, history_out) -> Dict[str, Any]:
    if info.distributed and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(config.seed)
    train_set, test_set = datasets if datasets is not None else load_dataset(config.data, config.data_dir)
    if config.subset:
        train_set, test_set = _subset(train_set, config.subset), _subset(test_set, config.subset)
    if model is None:
        model = build_model(config, train_set.num_classes)
    params = count_params(model)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    scaler = _grad_scaler(device, config.amp)

    history: List[Dict[str, float]] = []
    start_epoch = 0
    ckpt_path = os.path.join(config.out, CHECKPOINT) if config.out else None
    if config.resume:
        state = load_checkpoint(ckpt_path, device)
        _check_resumable(state["config"], config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = [dict(h) for h in state["history"]]
        start_epoch = int(state["epoch"]) + 1
        _log(info, log, f"resumed from {ckpt_path} after epoch {start_epoch}")
    ddp_model = prepare_model(model, info, device, config.sync_bn)
    model = unwrap(ddp_model)  # the SyncBN-converted module, whose state_dict is saved
    if config.compile != "off":
        # Only the training step is compiled; evaluation and the checkpoint use the plain module.
        ddp_model = torch.compile(ddp_model, mode=None if config.compile == "default" else config.compile)
        ddp_model._resfast_compile_mode = config.compile
        _log(info, log, f"torch.compile(mode={config.compile!r}) of the training step: it compiles on the first "
             "step, so the first epoch's time includes the compilation")

    sampler = None
    if info.distributed:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(len(train_set)), num_replicas=info.world_size, rank=info.rank,
                                     shuffle=True, seed=config.seed, drop_last=True)
    loader = BatchLoader(train_set, config.batch_size, shuffle=True, augment=True, sampler=sampler,
                         drop_last=len(train_set) > config.batch_size, seed=config.seed, workers=config.workers)
    steps = len(loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # backend="auto" picks a backend per call signature: record what it picked, for the summary
    choices_cm = record_choices() if config.backend == "auto" else contextlib.nullcontext([])
    with choices_cm as choices:
        _run_epochs(config, start_epoch, sampler, loader, ddp_model, optimizer, scaler, model, test_set, device,
                    info, log, history, steps, ckpt_path)
    backend_choices = dict(collections.Counter(row["backend"] for row in choices)) or None
    if backend_choices:
        backend_ran = sorted(backend_choices)
    else:  # an explicit backend, or auto on its static order (not measuring: RESFAST_AUTOTUNE=0, ...)
        from resfast.backends import resolve_backend

        backend_ran = [resolve_backend(config.backend, device)]

    peak, peak_source = _peak_memory(config, model, optimizer, train_set, device, info)
    result = summary_of(config, history, params, peak, peak_source, device, info,
                        backend_ran=backend_ran, backend_choices=backend_choices, memory=_dense_memory(model))
    if info.is_main and config.out:
        write_run_files(config.out, config, history, result)
    if history_out is not None:
        history_out.extend(dict(h) for h in history)
    return result


def _dense_memory(model: nn.Module) -> Optional[str]:
    """The memory mode of the model's dense blocks (``"naive"``, ``"checkpoint"``, ``"shared"``;
    several joined by ``"+"`` if they differ), ``None`` for a model without dense blocks."""
    from resfast.nn.dense import DenseBlock

    modes = sorted({m.memory for m in model.modules() if isinstance(m, DenseBlock)})
    return "+".join(modes) if modes else None


def _run_epochs(config, start_epoch, sampler, loader, ddp_model, optimizer, scaler, model, test_set, device, info,
                log, history, steps, ckpt_path) -> None:
    """The epochs of :func:`train` from ``start_epoch`` on: appends one row per epoch to ``history``
    and saves the checkpoint after each."""
    for epoch in range(start_epoch, config.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        # Seeded per epoch, so a resumed run sees the batches the uninterrupted run would have.
        loader.generator.manual_seed(config.seed * 100_003 + epoch)
        ddp_model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = _progress(info, config, steps, f"epoch {epoch + 1}/{config.epochs}")
        sync(device)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            lr = set_lr(optimizer, lr_at(config, epoch, i, steps))
            x, y = _to_device(x, y, device, config.channels_last)
            l_sum, c = train_step(ddp_model, optimizer, x, y, amp=config.amp, scaler=scaler)
            loss_sum, correct, seen = loss_sum + l_sum, correct + c, seen + y.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{l_sum / y.shape[0]:.3f}", lr=f"{lr:.3g}")
        sync(device)
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        totals = all_reduce_sum(torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device), info)
        # The unwrapped module: DDP's forward may broadcast buffers, a collective that would hang
        # when the ranks' evaluation shards differ in their number of batches.
        test_loss, test_acc = evaluate(model, test_set, device, amp=config.amp,
                                       channels_last=config.channels_last, info=info)
        row = {
            "epoch": epoch + 1, "lr": lr_at(config, epoch, 0, steps), "train_loss": float(totals[0] / totals[2]),
            "train_acc": float(totals[1] / totals[2]), "test_loss": test_loss, "test_acc": test_acc,
            "epoch_time_s": elapsed, "images_per_s": float(totals[2]) / elapsed,
        }
        history.append(row)
        _log(info, log, "epoch {epoch}/{n}: train loss {train_loss:.4f} acc {train_acc:.4f}, test loss "
             "{test_loss:.4f} acc {test_acc:.4f}, {epoch_time_s:.1f} s, {images_per_s:.0f} img/s".format(
                 n=config.epochs, **row))
        if info.is_main and config.out:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "epoch": epoch, "history": history, "config": _config_dict(config),
            })


def summary_of(config: TrainConfig, history: List[Dict[str, float]], params: int, peak: Optional[int],
               peak_source: str, device: torch.device, info: DistInfo, *,
               backend_ran: Optional[List[str]] = None, backend_choices: Optional[Dict[str, int]] = None,
               memory: Optional[str] = None) -> Dict[str, Any]:
    """The ``--json`` document: ``test_acc``, ``epoch_time_s`` (list), ``images_per_s``,
    ``params``, ``peak_memory_bytes`` and how the peak was measured, plus the run's settings:
    ``backend`` as asked, ``backend_ran`` (the backends that ran the fused ops: with ``auto``,
    those it picked), ``backend_choices`` (with a measuring ``auto``: how many distinct call
    signatures each backend ran; ``None`` otherwise) and ``memory``, the dense blocks' memory mode (``None``
    without dense blocks)."""
    times = [h["epoch_time_s"] for h in history]
    images = sum(h["images_per_s"] * h["epoch_time_s"] for h in history)
    return {
        "model": config.model, "data": config.data, "epochs": len(history), "batch_size": config.batch_size,
        "world_size": info.world_size, "device": str(device), "backend": config.backend,
        "backend_ran": backend_ran, "backend_choices": backend_choices, "memory": memory, "amp": config.amp,
        "channels_last": config.channels_last, "compile": config.compile, "schedule": config.schedule,
        "dropout": config.dropout,
        "test_acc": history[-1]["test_acc"] if history else None,
        "test_acc_per_epoch": [h["test_acc"] for h in history],
        "train_loss": [h["train_loss"] for h in history],
        "epoch_time_s": times,
        "images_per_s": images / sum(times) if times and sum(times) > 0 else None,
        "params": params,
        "peak_memory_bytes": peak,
        "peak_memory_source": peak_source,
    }


def write_run_files(out: str, config: TrainConfig, history: List[Dict[str, float]], result: Dict[str, Any]) -> None:
    """``metrics.csv`` (one row per epoch), ``metrics.json`` (config, history, summary) and
    ``curves.png`` in ``out``, each written atomically."""
    os.makedirs(out, exist_ok=True)
    cols = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "images_per_s"]
    tmp = os.path.join(out, "metrics.csv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for row in history:
            w.writerow({k: row[k] for k in cols})
    os.replace(tmp, os.path.join(out, "metrics.csv"))
    tmp = os.path.join(out, "metrics.json.tmp")
    with open(tmp, "w") as fh:
        from resfast.cli import json_safe  # a diverged run's NaN losses as null: the file stays standard JSON

        json.dump(json_safe({"config": _config_dict(config), "history": history, "summary": result}), fh, indent=2,
                  default=str, allow_nan=False)
    os.replace(tmp, os.path.join(out, "metrics.json"))
    plot_curves(history, os.path.join(out, "curves.png"), title=f"{config.model} on {config.data}")


def plot_curves(history: List[Dict[str, float]], path: str, title: str = "") -> None:
    """Train / test loss and accuracy against the epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    a.set_xlabel("epoch"), a.set_ylabel("cross-entropy loss"), a.legend()
    b.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    b.plot(epochs, [h["test_acc"] for h in history], "s-", label="test")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: a crash
    mid-write never leaves a truncated checkpoint behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Optional[str], device: torch.device) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``."""
    _require_checkpoint(path)
    return torch.load(path, map_location=device, weights_only=True)


def _require_checkpoint(path: Optional[str]) -> None:
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"resume: no checkpoint at {path!r} (train once with the same --out first)")


def measure_step_memory(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                        amp: str = "off") -> int:
    """Peak bytes of live tensors (parameters, gradients, optimizer state, activations,
    temporaries) during one training step, by ``torch.distributed._tools.mem_tracker.MemTracker``.

    Runs on copies of ``model`` and ``optimizer`` so the caller's state is not touched.
    """
    model = copy.deepcopy(model)
    opt = type(optimizer)(model.parameters(), **optimizer.defaults)
    opt.load_state_dict(optimizer.state_dict())
    return tracked_peak(lambda: train_step(model, opt, x, y, amp=amp), model, opt, x, y)["Total"]


def _peak_memory(config, model, optimizer, train_set, device, info) -> Tuple[Optional[int], str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated over the run"
    if not config.measure_memory:
        return None, "not measured"
    if info.distributed:
        return None, "not measured under DDP on the CPU"
    n = min(config.batch_size, len(train_set))
    x, y = next(iter(BatchLoader(train_set, n, augment=True, seed=config.seed)))
    x, y = _to_device(x, y, device, config.channels_last)
    try:
        return measure_step_memory(model, optimizer, x, y, config.amp), \
            "MemTracker (torch.distributed._tools.mem_tracker), one training step on the CPU"
    except Exception as exc:  # the tracker is a private tool: a failure must not lose the run
        return None, f"MemTracker failed: {type(exc).__name__}: {exc}"


#: What a resumed run must share with the checkpoint's run so that it continues that run: the
#: optimizer's hyperparameters (``optimizer.load_state_dict`` restores the saved momentum and
#: weight decay, so a new value would be recorded in ``metrics.json`` but not used), the
#: learning-rate schedule (it spans ``epochs``), the batches (``seed``, ``subset``).
RESUME_KEYS = ("model", "data", "batch_size", "schedule", "epochs", "lr", "momentum", "weight_decay", "dropout",
               "seed", "subset", "model_kwargs")


def _check_resumable(saved: Dict[str, Any], config: TrainConfig) -> None:
    for key in RESUME_KEYS:
        if saved.get(key) != _config_dict(config).get(key):
            why = (" (the learning-rate schedule spans the epochs: a resumed run continues the checkpoint's "
                   "schedule; train a longer run in a new --out)" if key == "epochs" else "")
            raise ValueError(f"resume: the checkpoint was trained with {key}={saved.get(key)!r}, "
                             f"this run asks for {key}={getattr(config, key)!r}{why}")


def _config_dict(config: TrainConfig) -> Dict[str, Any]:
    # Primitives only, so the checkpoint loads with weights_only=True.
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _subset(ds: ImageDataset, n: int) -> ImageDataset:
    return dataclasses.replace(ds, images=ds.images[:n], labels=ds.labels[:n])


def _to_device(x: Tensor, y: Tensor, device: torch.device, channels_last: bool) -> Tuple[Tensor, Tensor]:
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _uses_cuda_graphs(model: nn.Module) -> bool:
    """Whether ``model`` is a module :func:`train` compiled in a mode that captures CUDA graphs
    (on a GPU; on the CPU inductor runs the same code without graphs)."""
    return getattr(model, "_resfast_compile_mode", "off") in ("reduce-overhead", "max-autotune")


def _grad_scaler(device: torch.device, amp: str):
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def _progress(info: DistInfo, config: TrainConfig, total: int, desc: str):
    if not (config.progress and info.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def _log(info: DistInfo, log, msg: str) -> None:
    if info.is_main:
        print(msg, file=log, flush=True)
