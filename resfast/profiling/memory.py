"""``resfast memory``: peak training memory of naive / checkpoint / shared dense blocks (or of a
torchvision / timm model as built and as converted by :func:`resfast.convert`).

Runs one training step (forward and backward) per mode on the same input and reports the
peak memory, the activation memory (peak minus parameters, buffers and gradients), the
step time and the ratio to ``naive``. On the CPU the bytes come from PyTorch's memory
tracker (``torch.distributed._tools.mem_tracker.MemTracker``: exact live-tensor bytes); on
CUDA from ``torch.cuda.max_memory_allocated`` after a reset.

The measuring functions (:func:`measure_training_step`, :func:`measure_modes`,
:func:`block_memory_sweep`, :func:`max_batch`) are reusable from benchmarks.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from resfast.backends import BACKENDS
from resfast.profiling.runtime import autocast, ensure_writable_dir, resolve_device, sync

__all__ = [
    "MODES",
    "CONVERT_MODES",
    "add_arguments",
    "build_for_mode",
    "is_dense_model",
    "run",
    "measure_training_step",
    "measure_modes",
    "block_memory_sweep",
    "fit_growth",
    "max_batch",
    "min_image_size",
    "tracked_peak",
]

# mode name -> (DenseBlock memory, recompute)
MODES: Dict[str, tuple] = {
    "naive": ("naive", "bn_relu"),
    "checkpoint": ("checkpoint", "bn_relu"),
    "shared": ("shared", "bn_relu"),
    "shared_bottleneck": ("shared", "bottleneck"),
}
#: The modes of a torchvision / timm model without dense blocks (``--model timm:resnext50_32x4d``):
#: the library's own modules, and the same model converted by :func:`resfast.convert`.
CONVERT_MODES = ("original", "resfast")


# The --plot sweep's default shape. The activation bytes of a dense block scale with
# batch x pixels, while the 1x1-conv weight gradients (quadratic in depth, and held as
# temporaries until a shared block's backward returns, so part of its measured peak) do
# not. At batch 2, 16x16 those temporaries were a third of the shared mode's bytes and put
# it at or above checkpoint, unlike any real network; at batch 4, 32x32 they are a few
# percent, as in densenet121 at 224x224, and the sweep still runs in a few minutes on a
# 2-core CPU.
SWEEP_BATCH = 4
SWEEP_IMAGE_SIZE = 32
SWEEP_LAYERS = (4, 8, 16, 24, 32)
#: Timed steps per mode of ``resfast memory`` (one step varies by up to 25% on a loaded CPU).
DEFAULT_REPEAT = 5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="densenet121",
                   help="a DenseNet (registered, or torchvision:/timm: densenet...), whose dense-block modes are "
                        "compared; or a torchvision:/timm: model without dense blocks, compared as the library "
                        "built it (original) and converted by resfast.convert (resfast) (default densenet121)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input height and width (default: the model's; at least the smallest size its "
                        "downsampling leaves a pixel at, checked before anything runs)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated subset of {','.join(MODES)} for a DenseNet (default: all), of "
                        f"{','.join(CONVERT_MODES)} for a library model without dense blocks (default: both)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend (default auto)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="autocast dtype for the step (default float32: no autocast)")
    p.add_argument("--channels-last", action="store_true", help="run in channels_last memory format")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--plot", metavar="FILE", default=None,
                   help="also draw one dense block's activation memory at the peak against its number "
                        "of layers, per mode, with fitted curves (PNG)")
    p.add_argument("--plot-batch", type=int, default=SWEEP_BATCH,
                   help=f"batch of the --plot dense-block sweep (default {SWEEP_BATCH})")
    p.add_argument("--plot-image-size", type=int, default=SWEEP_IMAGE_SIZE,
                   help=f"height and width of the --plot sweep's block input (default {SWEEP_IMAGE_SIZE})")
    p.add_argument("--plot-layers", default=",".join(map(str, SWEEP_LAYERS)),
                   help="comma-separated layer counts of the --plot sweep, at least 3 "
                        f"(default {','.join(map(str, SWEEP_LAYERS))})")
    p.add_argument("--repeat", type=int, default=DEFAULT_REPEAT,
                   help="timed training steps per mode, taken in rounds that alternate the modes (so a change "
                        "of the machine's load reaches every mode alike); step_time_s is their median "
                        f"(default {DEFAULT_REPEAT})")
    p.add_argument("--max-batch", action="store_true", help="(CUDA) find the largest batch each mode fits")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Run ``resfast memory``: every argument is checked before any model runs."""
    from resfast.backends import resolve_backend
    from resfast.cli import check_model_name, emit_json
    from resfast.models import model_info

    check_model_name(args.model)
    dense = is_dense_model(args.model)
    if not dense and ":" not in args.model:
        raise ValueError(f"--model {args.model}: a registered resfast model without dense blocks has one memory "
                         "mode; give a DenseNet (densenet121, ...) to compare its dense-block modes, or a library "
                         "model to compare it with its resfast conversion (torchvision:resnet50, "
                         "timm:resnext50_32x4d)")
    modes = _parse_modes(args.modes, dense)
    if args.plot and not dense:
        raise ValueError("--plot draws one dense block's memory against its depth: it needs a DenseNet --model")
    sweep_options = {"--plot-batch": (args.plot_batch, SWEEP_BATCH),
                     "--plot-image-size": (args.plot_image_size, SWEEP_IMAGE_SIZE),
                     "--plot-layers": (args.plot_layers, ",".join(map(str, SWEEP_LAYERS)))}
    unused = [flag for flag, (value, default) in sweep_options.items() if value != default]
    if unused and not args.plot:
        raise ValueError(f"{', '.join(unused)} shape the --plot sweep, and no --plot FILE was given")
    if not isinstance(args.batch_size, int) or args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive int, got {args.batch_size!r}")
    if not isinstance(args.repeat, int) or args.repeat < 1:
        raise ValueError(f"--repeat must be a positive int, got {args.repeat!r}")
    device = resolve_device(args.device)
    if args.max_batch and device.type != "cuda":
        raise ValueError("--max-batch needs --device cuda (it searches for the batch at which CUDA runs out of "
                         "memory; the CPU has no such limit to find)")
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    if args.plot:
        plot_layers = _parse_layers(args.plot_layers)
        if not isinstance(args.plot_batch, int) or args.plot_batch < 1:
            raise ValueError(f"--plot-batch must be a positive int, got {args.plot_batch!r}")
        if not isinstance(args.plot_image_size, int) or args.plot_image_size < 1:
            raise ValueError(f"--plot-image-size must be a positive int, got {args.plot_image_size!r}")
        ensure_writable_dir(os.path.dirname(os.path.abspath(args.plot)), "--plot's folder")
    resolve_backend(args.backend, device)  # BackendUnavailableError says why, before anything runs
    # (``or`` took --image-size 0 for no --image-size: it ran at the model's size, refusing nothing)
    image_size = args.image_size if args.image_size is not None else model_info(args.model).input_size[1]
    _check_image_size(args.model, image_size, args.batch_size)

    results = measure_modes(args.model, modes, batch_size=args.batch_size, image_size=image_size, device=device,
                            backend=args.backend, autocast_dtype=dtype, channels_last=args.channels_last,
                            seed=args.seed, repeat=args.repeat)
    if args.max_batch:
        for r in results:
            r["max_batch"] = max_batch(args.model, r["mode"], image_size=image_size, device=device,
                                       backend=args.backend, autocast_dtype=dtype,
                                       channels_last=args.channels_last)
    doc = {"model": args.model, "batch_size": args.batch_size, "image_size": image_size, "device": str(device),
           "dtype": args.dtype, "channels_last": bool(args.channels_last), "backend": args.backend,
           "results": results}
    if args.plot:
        t0 = time.perf_counter()
        sweep = block_memory_sweep(modes, layers=plot_layers, device=device, backend=args.backend,
                                   batch_size=args.plot_batch, image_size=args.plot_image_size, seed=args.seed,
                                   autocast_dtype=dtype, channels_last=args.channels_last)
        sweep["wall_time_s"] = time.perf_counter() - t0
        plot_sweep(sweep, args.plot)
        doc["plot"] = {"file": args.plot, "sweep": sweep}
    if args.json:
        emit_json(doc)
    else:
        print(format_table(doc))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _check_image_size(model_name: str, image_size: int, batch_size: Optional[int] = None) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"--image-size must be a positive int, got {image_size!r}")
    if not _runs_at(model_name, image_size):
        raise ValueError(f"--image-size {image_size} is too small for {model_name}: its downsampling leaves no "
                         f"pixel; the smallest size it takes is {min_image_size(model_name)}")
    if isinstance(batch_size, int) and batch_size >= 1 and not _trains_at(model_name, image_size, batch_size):
        # (training-mode BatchNorm needs more than one value per channel: batch x pixels > 1)
        smallest = _smallest_size(lambda s: _trains_at(model_name, s, batch_size), image_size, 1 << 14)
        way_out = "--batch-size 2 or more"
        if smallest is not None:  # (a BatchNorm after the global pooling trains at batch 1 at no size)
            way_out += f", or --image-size {smallest} or more"
        raise ValueError(f"--batch-size {batch_size} at --image-size {image_size} leaves {model_name}'s last "
                         f"BatchNorm one value per channel, which training-mode BatchNorm refuses; use {way_out}")


def min_image_size(model_name: str) -> int:
    """The smallest input height and width at which the registered model ``model_name`` runs
    (its strided convs and poolings leave at least one pixel), found by forward passes on the
    ``meta`` device (no memory, no arithmetic): doubling, then bisection."""
    size = _smallest_size(lambda s: _runs_at(model_name, s), 0, 1 << 16)
    if size is None:
        raise ValueError(f"{model_name} does not run at any image size up to {1 << 16}")
    return size


def _smallest_size(ok: Callable[[int], bool], lo: int, cap: int) -> Optional[int]:
    """The smallest size above ``lo`` (which fails, or is 0) at most ``cap`` for which ``ok``
    (monotone) holds, by doubling then bisection; None where none does."""
    hi = max(1, 2 * lo)
    while not ok(hi):
        lo, hi = hi, 2 * hi
        if hi > cap:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


@functools.lru_cache(maxsize=None)
def _meta_model(model_name: str) -> nn.Module:
    from resfast.profiling.counting import build_for_counting

    with torch.device("meta"):
        return build_for_counting(model_name).eval()


def _runs_at(model_name: str, size: int) -> bool:
    """Whether a forward of ``model_name`` at ``size x size`` gets through its downsampling."""
    model = _meta_model(model_name)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device="meta"))
    except (RuntimeError, ValueError) as exc:
        text = str(exc).lower()
        if "too small" in text or "smaller than kernel" in text or "output would be empty" in text:
            return False
        raise
    return True


def _trains_at(model_name: str, size: int, batch_size: int) -> bool:
    """Whether a training-mode forward of ``model_name`` at ``batch_size x 3 x size x size``
    leaves every BatchNorm more than one value per channel (on the ``meta`` device)."""
    model = _meta_model(model_name)
    model.train()
    try:
        with torch.no_grad():
            model(torch.zeros(batch_size, 3, size, size, device="meta"))
    except ValueError as exc:
        if "more than 1 value per channel" in str(exc):
            return False
        raise
    finally:
        model.eval()
    return True


def is_dense_model(model_name: str) -> bool:
    """Whether ``model_name`` (registered, ``torchvision:NAME`` or ``timm:NAME``) is a DenseNet,
    whose dense-block memory modes :data:`MODES` apply."""
    return model_name.rpartition(":")[2].startswith("densenet")


def _parse_modes(text: Optional[str], dense: bool = True) -> List[str]:
    allowed = tuple(MODES) if dense else CONVERT_MODES
    if text is None:
        return list(allowed)
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    bad = [m for m in modes if m not in allowed]
    if bad or not modes or len(set(modes)) < len(modes):  # a repeated mode was timed once, listed twice
        kind = "a DenseNet" if dense else "a library model without dense blocks"
        raise ValueError(f"--modes for {kind} must be a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return modes


def build_for_mode(model_name: str, mode: str, backend: str = "auto") -> nn.Module:
    """The model ``model_name`` in ``mode``: a dense-block mode of :data:`MODES`, or ``"original"``
    (a ``torchvision:`` / ``timm:`` model as the library builds it) / ``"resfast"`` (the same,
    converted by :func:`resfast.convert` with ``backend``)."""
    from resfast.models import create_model, model_info

    if mode in MODES:
        memory, recompute = MODES[mode]
        return create_model(model_name, memory=memory, recompute=recompute, backend=backend)
    if mode not in CONVERT_MODES or ":" not in model_name:
        raise ValueError(f"mode {mode!r} needs one of {tuple(MODES)}, or {CONVERT_MODES} with a torchvision:/timm: "
                         f"model; got model {model_name!r}")
    return model_info(model_name).builder(backend=backend, convert=(mode == "resfast"))


def _parse_layers(text: str) -> List[int]:
    try:
        layers = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        layers = []
    # Three distinct counts at least: the naive fit is a quadratic.
    if len(set(layers)) < 3 or min(layers) < 1 or layers != sorted(layers):
        raise ValueError(f"--plot-layers must be at least 3 distinct increasing positive ints separated by "
                         f"commas, got {text!r}")
    return layers


def measure_training_step(model: nn.Module, x: Tensor, device=None, *, loss_fn: Optional[Callable] = None,
                          autocast_dtype: Optional[torch.dtype] = None, timed: bool = True,
                          launches: bool = False) -> Dict[str, float]:
    """Peak memory of one training step (forward, loss, backward) of ``model`` on ``x``.

    Returns ``{"peak_bytes", "activation_bytes", "step_time_s"}``: the peak of live tensor
    bytes during the step (parameters, buffers, the input and gradients included), the
    part of it that is neither parameters, buffers nor gradients (the input included, on
    both devices), and the wall time of a
    second, untracked step (``nan`` with ``timed=False``); with ``launches`` also
    ``"launches"``, the kernel launches of one more step (aten compute ops plus Triton
    launches, :mod:`resfast.profiling.launches`). Gradients are cleared before each step.
    CPU: exact bytes from ``MemTracker``; CUDA: ``torch.cuda.max_memory_allocated``.
    """
    device = torch.device(device) if device is not None else x.device
    model = model.to(device)
    x = x.to(device)
    model.train()
    step = _training_step(model, x, device, autocast_dtype, loss_fn)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        # base holds the parameters, buffers and the input; the input counts as an activation,
        # as the CPU's tracker counts it (everything live that is neither a parameter, a
        # buffer nor a gradient)
        activation = peak - base - grads + x.numel() * x.element_size()
    else:
        snap = tracked_peak(step, model, x)
        peak = snap["Total"]
        activation = peak - sum(snap.get(key, 0) for key in ("Parameter", "Buffer", "Gradient"))
    step_time = float("nan")
    if timed:
        model.zero_grad(set_to_none=True)
        step_time = _wall_time(step, device)
    result = {"peak_bytes": int(peak), "activation_bytes": int(activation), "step_time_s": step_time}
    if launches:
        from resfast.profiling.launches import count_launches

        model.zero_grad(set_to_none=True)
        result["launches"] = count_launches(step)["total"]
    model.zero_grad(set_to_none=True)
    return result


def tracked_peak(step: Callable[[], object], *tracked) -> Dict[str, int]:
    """Run ``step()`` once under PyTorch's memory tracker and return the bytes live at its
    peak by kind (``"Total"``, ``"Parameter"``, ``"Buffer"``, ``"Gradient"``,
    ``"Activation"``, ``"Optstate"``, ...), summed over devices. ``tracked``: the modules,
    optimizers and tensors that exist before the step (``MemTracker.track_external``), so
    their bytes are attributed to their kind."""
    tracker = _peak_tracker()
    tracker.track_external(*tracked)
    with tracker:
        step()
    totals: Dict[str, int] = {}
    for dev_snap in tracker.get_tracker_snapshot("peak").values():
        for kind, nbytes in dev_snap.items():
            key = getattr(kind, "value", kind)  # MemTracker's reference-type enum, or its name
            totals[str(key)] = totals.get(str(key), 0) + int(nbytes)
    return totals


def _peak_tracker():
    """A ``MemTracker`` that keeps only the global peak.

    ``MemTracker`` also records every active module's own peak after every op, which costs
    a pass over all tracked modules per op (most of the run time for a 121-layer model on
    a chunked eager backward); the global peak and its breakdown are computed exactly as
    ``MemTracker`` computes them.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakMemTracker(MemTracker):
        def _update_peak_stats(self, peak_state) -> None:  # noqa: ARG002 (same signature)
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)

    tracker = PeakMemTracker()
    # Private attributes: fall back to the stock tracker where a torch version lacks them.
    if all(hasattr(tracker, a) for a in ("_curr_mem_snap", "_peak_mem", "_peak_mem_snap")):
        return tracker
    return MemTracker()


def _default_loss(out: Tensor) -> Tensor:
    # A loss whose gradient reaches every output element with a different value.
    return out.float().square().mean()


def measure_modes(model_name: str, modes: Sequence[str], *, batch_size: int, image_size: int, device=None,
                  backend: str = "auto", autocast_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                  seed: int = 0, progress: bool = True, timed: bool = True,
                  repeat: int = DEFAULT_REPEAT) -> List[Dict[str, object]]:
    """Peak memory and launches of one training step of ``model_name`` per mode (same weights
    and input; one model alive at a time), then, when ``timed``, ``repeat`` rounds of one timed
    step per mode, the modes alternating within a round after one warm-up step each:
    ``step_time_s`` is a mode's median, ``step_times_s`` its steps. Adds ``ratio_to_naive``
    (dense-block modes) or ``ratio_to_original`` (:data:`CONVERT_MODES`): peak bytes against
    that mode's, and ``time_ratio_to_naive`` / ``time_ratio_to_original``: median step time
    against that mode's."""
    from tqdm import tqdm

    device = torch.device(device or "cpu")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    state: Dict[str, Tensor] = {}

    def build(mode: str) -> nn.Module:
        torch.manual_seed(seed)
        model = build_for_mode(model_name, mode, backend)
        if not state:
            state.update({k: v.clone() for k, v in model.state_dict().items()})
        model.load_state_dict(state)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    results = []
    bar = tqdm(list(modes), desc=f"resfast memory {model_name}", file=sys.stderr, disable=not progress)
    for mode in bar:
        bar.set_postfix_str(mode)
        model = build(mode)
        r = measure_training_step(model, x, device, autocast_dtype=autocast_dtype, timed=False, launches=True)
        results.append({"mode": mode, **r})
        bar.write(f"{mode:>18}: peak {r['peak_bytes'] / 2**20:9.1f} MiB, activations "
                  f"{r['activation_bytes'] / 2**20:9.1f} MiB, {r['launches']} launches", file=sys.stderr)
        del model
    if timed:
        times = time_modes({mode: build(mode) for mode in modes}, x, device, autocast_dtype=autocast_dtype,
                           repeat=repeat, progress=progress)
        for r in results:
            r["step_times_s"] = times[r["mode"]]
            r["step_time_s"] = statistics.median(times[r["mode"]])
    base_mode = "naive" if all(m in MODES for m in modes) else "original"
    base = next((r for r in results if r["mode"] == base_mode), None)
    for r in results:
        r[f"ratio_to_{base_mode}"] = (r["peak_bytes"] / base["peak_bytes"]) if base else None
        if base and timed:
            r[f"time_ratio_to_{base_mode}"] = r["step_time_s"] / base["step_time_s"]
    return results


def time_modes(models: Dict[str, nn.Module], x: Tensor, device=None, *, autocast_dtype: Optional[torch.dtype] = None,
               repeat: int = DEFAULT_REPEAT, progress: bool = True) -> Dict[str, List[float]]:
    """Training-step wall times of each model on ``x``: one warm-up step each, then ``repeat``
    rounds in which every model takes one timed step in turn (a change of the machine's load
    during the run reaches every model alike). Gradients are cleared before each step."""
    from tqdm import tqdm

    device = torch.device(device) if device is not None else x.device
    x = x.to(device)
    models = {name: model.to(device).train() for name, model in models.items()}
    steps = {name: _training_step(model, x, device, autocast_dtype) for name, model in models.items()}
    times: Dict[str, List[float]] = {name: [] for name in models}
    for name, step in steps.items():
        models[name].zero_grad(set_to_none=True)
        step()
    for _ in tqdm(range(repeat), desc="timed rounds", file=sys.stderr, disable=not progress):
        for name, step in steps.items():
            models[name].zero_grad(set_to_none=True)
            times[name].append(_wall_time(step, device))
    return times


def _training_step(model: nn.Module, x: Tensor, device: torch.device, autocast_dtype: Optional[torch.dtype],
                   loss_fn: Optional[Callable] = None) -> Callable[[], None]:
    """One training step of ``model`` on ``x``: forward and loss under autocast, backward."""
    loss_fn = loss_fn or _default_loss

    def step() -> None:
        with autocast(device, autocast_dtype):
            loss = loss_fn(model(x))
        loss.backward()

    return step


def _wall_time(step: Callable[[], None], device: torch.device) -> float:
    """Seconds ``step()`` takes, the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def block_memory_sweep(modes: Sequence[str], *, layers: Sequence[int] = SWEEP_LAYERS, device=None,
                       backend: str = "auto", batch_size: int = SWEEP_BATCH, image_size: int = SWEEP_IMAGE_SIZE,
                       num_input_features: int = 64, growth_rate: int = 32, bn_size: int = 4, seed: int = 0,
                       progress: bool = True, autocast_dtype: Optional[torch.dtype] = None,
                       channels_last: bool = False) -> Dict[str, object]:
    """Peak and activation bytes of one dense block's training step against its number of
    layers, per mode, with curves fitted to the activation bytes (quadratic for naive,
    linear otherwise).

    The activation bytes (the peak less parameters, buffers and the parameters' ``.grad``)
    are what the memory modes change. They include every temporary live at the peak, such
    as the 1x1-conv weight gradients that a shared block holds until its backward returns;
    those grow quadratically with depth but not with batch x pixels, so at a tiny input
    they dominate and misrepresent the modes. The default shape (batch 4, 32x32, see
    ``SWEEP_BATCH``) keeps them to a few percent, as in a real network. ``autocast_dtype`` and
    ``channels_last``: as the whole model's step (``resfast memory --dtype / --channels-last``)."""
    from tqdm import tqdm

    from resfast.nn.dense import DenseBlock

    device = torch.device(device or "cpu")
    out: Dict[str, object] = {"layers": list(layers), "batch_size": batch_size, "image_size": image_size,
                              "num_input_features": num_input_features, "growth_rate": growth_rate,
                              "bn_size": bn_size, "device": str(device),
                              "dtype": str(autocast_dtype or torch.float32).replace("torch.", ""),
                              "channels_last": bool(channels_last), "modes": {}}
    jobs = [(m, n) for m in modes for n in layers]
    rows: Dict[str, Dict[str, list]] = {m: {"peak_bytes": [], "activation_bytes": []} for m in modes}
    for mode, n in tqdm(jobs, desc="dense-block sweep", file=sys.stderr, disable=not progress):
        memory, recompute = MODES[mode]
        torch.manual_seed(seed)
        block = DenseBlock(n, num_input_features, bn_size, growth_rate, memory=memory, recompute=recompute,
                           backend=backend)
        x = torch.randn(batch_size, num_input_features, image_size, image_size)
        if autocast_dtype is not None:  # in a network under autocast a block's input comes from a conv
            x = x.to(autocast_dtype)
        if channels_last:
            block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        r = measure_training_step(block, x.to(device).requires_grad_(), device, autocast_dtype=autocast_dtype,
                                  timed=False)
        rows[mode]["peak_bytes"].append(r["peak_bytes"])
        rows[mode]["activation_bytes"].append(r["activation_bytes"])
    for mode in modes:
        degree = 2 if mode == "naive" else 1
        rows[mode]["fit_degree"] = degree
        rows[mode]["fit"] = fit_growth(layers, rows[mode]["activation_bytes"], degree)
    out["modes"] = rows
    return out


def fit_growth(xs: Sequence[float], ys: Sequence[float], degree: int) -> List[float]:
    """Least-squares polynomial coefficients (highest power first) of ``ys`` against ``xs``."""
    import numpy as np

    return [float(c) for c in np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), degree)]


def plot_sweep(sweep: Dict[str, object], path: str) -> None:
    """Activation memory at the peak against layers per mode, measured points and fitted
    curves, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = np.asarray(sweep["layers"], dtype=float)
    grid = np.linspace(layers.min(), layers.max(), 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, row in sweep["modes"].items():
        ys = np.asarray(row["activation_bytes"], dtype=float) / 2**20
        (line,) = ax.plot(layers, ys, "o", label=f"{mode} (measured)")
        fit = np.polyval(np.asarray(row["fit"]) / 2**20, grid)
        kind = "quadratic" if row["fit_degree"] == 2 else "linear"
        ax.plot(grid, fit, "-", color=line.get_color(), alpha=0.7, label=f"{mode} ({kind} fit)")
    ax.set_xlabel("layers in the dense block")
    ax.set_ylabel("activation bytes at the training step's peak (MiB)\n"
                  "= peak live tensors - parameters, buffers, .grad", fontsize=9)
    size = sweep["image_size"]
    setting = f", {sweep.get('dtype', 'float32')}" + (", channels_last" if sweep.get("channels_last") else "")
    ax.set_title(f"One dense block, one training step (forward+backward), {sweep.get('device', 'cpu')}{setting}\n"
                 f"batch {sweep['batch_size']}, input {sweep['num_input_features']}x{size}x{size} "
                 f"(C0={sweep['num_input_features']}), k={sweep['growth_rate']}, bn_size={sweep.get('bn_size', 4)}",
                 fontsize=9)
    ax.annotate("includes temporaries live at the peak (e.g. shared modes' 1x1-conv weight gradients);\n"
                "shape chosen so activations, which scale with batch x pixels, dominate as in a real network",
                xy=(0.01, 0.01), xycoords="figure fraction", fontsize=7, color="0.35")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def max_batch(model_name: str, mode: str, *, image_size: int, device, backend: str = "auto",
              autocast_dtype: Optional[torch.dtype] = None, channels_last: bool = False, limit: int = 4096) -> int:
    """The largest batch (up to ``limit``) whose training step fits in CUDA memory in ``mode``
    (doubling, then bisection; out-of-memory errors are caught)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"max_batch needs a CUDA device, got {device}")
    model = build_for_mode(model_name, mode, backend).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def fits(n: int) -> bool:
        try:
            x = torch.randn(n, 3, image_size, image_size, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            _training_step(model, x, device, autocast_dtype)()
            sync(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def format_table(doc: Dict[str, object]) -> str:
    """The human-readable table of :func:`run`."""
    base = "original" if any("ratio_to_original" in r for r in doc["results"]) else "naive"
    setting = "".join(f", {v}" for v in (doc.get("dtype"), "channels_last" if doc.get("channels_last") else None,
                                          f"backend {doc['backend']}" if doc.get("backend") else None) if v)
    lines = [f"{doc['model']}, batch {doc['batch_size']}, {doc['image_size']}x{doc['image_size']}, {doc['device']}"
             f"{setting}",
             f"{'mode':>18} {'peak MiB':>10} {'activ. MiB':>11} {'peak vs ' + base:>14} {'step s':>8} "
             f"{'time vs ' + base:>14} {'launches':>9}"]

    def fmt(v, width):
        return f"{v:{width}.3f}" if v is not None and not math.isnan(v) else f"{'-':>{width}}"

    for r in doc["results"]:
        extra = f"  max batch {r['max_batch']}" if "max_batch" in r else ""
        launch_s = f"{r['launches']:9d}" if "launches" in r else f"{'-':>9}"
        lines.append(f"{r['mode']:>18} {r['peak_bytes'] / 2**20:10.1f} {r['activation_bytes'] / 2**20:11.1f} "
                     f"{fmt(r.get(f'ratio_to_{base}'), 14)} {fmt(r.get('step_time_s'), 8)} "
                     f"{fmt(r.get(f'time_ratio_to_{base}'), 14)} {launch_s}{extra}")
    if any("step_times_s" in r for r in doc["results"]):
        n = max(len(r.get("step_times_s", [])) for r in doc["results"])
        lines.append(f"step s: median of {n} timed steps per mode, the modes alternating")
    return "\n".join(lines)
