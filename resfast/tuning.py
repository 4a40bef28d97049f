"""Fill the backend='auto' cache for a model: one training step, each call signature measured once.

``resfast tune --model NAME --batch-size N`` builds the model with ``backend="auto"``, runs one
training step (forward, loss, backward) on random input, and prints, for each distinct call
signature of that step, the backend ``auto`` chose and each candidate's time (measured now, or
read from the cache file when an earlier run measured it). The choices land in the cache file
(``resfast info`` shows where), so later runs, ``torch.compile`` and CUDA graphs use them
without measuring.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List

__all__ = ["add_arguments", "run", "tune_model", "format_table", "EPILOG"]

EPILOG = ("Measuring is skipped, and this command refuses to run, when RESFAST_BACKEND names a backend or "
          "RESFAST_AUTOTUNE=0. The cache file is $RESFAST_CACHE_DIR/autotune.json, else "
          "$XDG_CACHE_HOME/resfast/autotune.json (default ~/.cache/resfast/).")

DTYPES = {"float32": None, "bf16": "bfloat16", "fp16": "float16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``resfast tune`` options."""
    p.add_argument("--model", required=True, help="registered model name (see `resfast models`)")
    p.add_argument("--batch-size", type=int, required=True, help="images per step (the batch you train with)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input height and width (default: the model's input size)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="autocast dtype of the step (default float32: no autocast)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the model and input")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON document: a list of {"op", "signature", "backend", "times_ms", '
                        '"probe_ms", "skipped"}')


def tune_model(model_name: str, *, batch_size: int, image_size: int, device, dtype=None,
               channels_last: bool = False) -> List[Dict[str, object]]:
    """One training step of ``model_name`` with ``backend="auto"``; returns one row per
    distinct call signature ``auto`` resolved: ``{"op", "signature", "backend", "times_ms",
    "probe_ms", "skipped"}`` (``times_ms``: each candidate timed at full size, its fastest
    call in milliseconds; ``probe_ms``: on the CPU, each candidate's small probe call, which
    alone decides when one candidate is left after it; ``skipped``: why the others were
    abandoned or could not run)."""
    import torch

    from resfast.models import create_model, model_info
    from resfast.ops.autotune import record_choices
    from resfast.profiling.runtime import autocast, sync

    info = model_info(model_name)
    model = create_model(model_name, backend="auto").to(device)
    model.train()
    x = torch.randn(batch_size, info.input_size[0], image_size, image_size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with record_choices() as rows:
        with autocast(device, dtype):
            out = model(x)
        out.float().square().mean().backward()
        sync(device)
    return rows


def _signature_text(sig: Dict[str, object]) -> str:
    def v(x):
        return "x".join(map(str, x)) if isinstance(x, list) else str(x)

    shape = f"{sig.get('N')}x{sig.get('C')}x{sig.get('H')}x{sig.get('W')}"
    rest = [f"{k}={v(x)}" for k, x in sig.items() if k not in ("N", "C", "H", "W")]
    return " ".join([shape, *rest])


def format_table(rows: List[Dict[str, object]]) -> str:
    """The rows of :func:`tune_model` as a text table: one line per call signature."""
    backends: List[str] = []
    for r in rows:
        for b in list(r["times_ms"]) + list(r.get("probe_ms", {})) + list(r.get("skipped", {})):
            if b not in backends:
                backends.append(b)
    lines = []
    head = f"{'op':<20} {'chosen':<7} " + " ".join(f"{b + ' ms':>11}" for b in backends) + "  signature"
    lines.append(head)
    lines.append("-" * len(head))
    for r in rows:
        cells = []
        for b in backends:
            if b in r["times_ms"]:
                cells.append(f"{r['times_ms'][b]:>11.3f}")
            elif b in r.get("probe_ms", {}) and b not in r.get("skipped", {}):
                cells.append(f"{r['probe_ms'][b]:>10.3f}*")
            elif b in r.get("skipped", {}):
                cells.append(f"{'raised' if str(r['skipped'][b]).startswith('raised') else 'abandoned':>11}")
            else:
                cells.append(f"{'-':>11}")
        lines.append(f"{r['op']:<20} {r['backend']:<7} " + " ".join(cells) + "  " + _signature_text(r["signature"]))
    if any(b in r.get("probe_ms", {}) and b not in r["times_ms"] and b not in r.get("skipped", {})
           for r in rows for b in backends):
        lines.append("")
        lines.append("* the small probe call (batch 1, a few output positions): on the CPU every candidate runs it "
                     "first, and when one is left it wins without full-size timing")
    notes = {(b, why) for r in rows for b, why in r.get("skipped", {}).items()}
    if notes:
        lines.append("")
        lines.append("abandoned or failed candidates: a candidate clearly slower than the best so far is not timed "
                     "further; one that raises is skipped (see --json for each reason)")
    if rows and not backends:
        lines.append("")
        lines.append("nothing was measured: auto has one candidate here (on the CPU always eager; the native C++ "
                     "twin of the CUDA kernels is never a speed path there)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``resfast tune``: every argument is checked before the model runs."""
    import torch

    from resfast.cli import check_model_name, emit_json
    from resfast.models import model_info
    from resfast.ops.autotune import autotune_enabled, cache_path
    from resfast.profiling.runtime import resolve_device

    check_model_name(args.model)
    if not isinstance(args.batch_size, int) or args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive int, got {args.batch_size!r}")
    if not autotune_enabled():
        raise ValueError("backend='auto' does not measure here (RESFAST_BACKEND names a backend, or "
                         "RESFAST_AUTOTUNE=0); unset it to tune")
    device = resolve_device(args.device)
    image_size = args.image_size or model_info(args.model).input_size[1]
    if args.image_size is not None:
        from resfast.profiling.memory import min_image_size

        if args.image_size < 1 or args.image_size < min_image_size(args.model):
            raise ValueError(f"--image-size {args.image_size} is too small for {args.model}; the smallest size it "
                             f"takes is {min_image_size(args.model)}")
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    print(f"resfast tune: one training step of {args.model} at batch {args.batch_size}, {image_size}x{image_size}, "
          f"{args.dtype}{', channels_last' if args.channels_last else ''} on {device}; cache {cache_path()}",
          file=sys.stderr)
    rows = tune_model(args.model, batch_size=args.batch_size, image_size=image_size, device=device, dtype=dtype,
                      channels_last=args.channels_last)
    print(f"resfast tune: {len(rows)} call signatures", file=sys.stderr)
    if args.json:
        emit_json(rows)
    else:
        print(format_table(rows))
    return 0
