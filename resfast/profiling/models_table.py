"""List registered models with parameters and MACs; the ResNeXt cardinality table; dense-block channels.

``resfast models [--name PATTERN] [--json]``: every registered model with its parameters and
multiply-accumulates per image at its default input size (FlopCounterMode, MACs = FLOPs/2).
``resfast models --cardinality``: ResNeXt's complexity-preserving trade-off for one
conv2-stage block (256-d in and out, 56x56), beside the plain ResNet bottleneck.
``resfast models --dense-channels --in C --growth K --layers L [--compression 0.5]``: the
input channels of each layer of a dense block, its output and the transition's output.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Dict, List

__all__ = ["add_arguments", "run", "models_rows", "cardinality_rows", "dense_channel_rows"]

# ResNeXt paper, Table 2: cardinality C and bottleneck width d that keep a conv2-stage block
# at ~70k parameters / ~0.22 GMACs.
CARDINALITY_SETTINGS = ((1, 64), (2, 40), (4, 24), (8, 14), (32, 4))
_STAGE_IN, _STAGE_PLANES, _STAGE_HW = 256, 64, 56


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="*", metavar="PATTERN",
                   help="shell-style pattern of model names (a plain word matches as a substring)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cardinality", action="store_true",
                      help="ResNeXt complexity-preserving table for one conv2-stage block (256-d, 56x56)")
    mode.add_argument("--dense-channels", action="store_true",
                      help="channels of each layer of a dense block (needs --in, --growth, --layers)")
    p.add_argument("--in", dest="in_channels", type=int, metavar="C", help="dense block input channels")
    p.add_argument("--growth", type=int, metavar="K", help="dense block growth rate k")
    p.add_argument("--layers", type=int, metavar="L", help="layers in the dense block")
    p.add_argument("--compression", type=float, default=0.5, help="transition compression (default 0.5)")


def run(args: argparse.Namespace) -> int:
    from resfast.cli import emit_json

    # An option the chosen table does not read is refused, not ignored.
    unused = [flag for flag, given in (("--name", args.name != "*" and (args.cardinality or args.dense_channels)),
                                       ("--in", args.in_channels is not None and not args.dense_channels),
                                       ("--growth", args.growth is not None and not args.dense_channels),
                                       ("--layers", args.layers is not None and not args.dense_channels),
                                       ("--compression", args.compression != 0.5 and not args.dense_channels))
              if given]
    if unused:
        table = "--cardinality" if args.cardinality else "--dense-channels" if args.dense_channels else "the model list"
        raise ValueError(f"{', '.join(unused)}: not an option of {table} (--name selects models of the list; --in, "
                         "--growth, --layers and --compression shape --dense-channels)")
    if args.cardinality:
        rows: Any = cardinality_rows()
        if args.json:
            emit_json(rows)
        else:
            _print_cardinality(rows)
        return 0
    if args.dense_channels:
        table = dense_channel_rows(args.in_channels, args.growth, args.layers, args.compression)
        if args.json:
            emit_json(table)
        else:
            _print_dense(table)
        return 0
    rows = models_rows(args.name)
    if args.json:
        emit_json(rows)
    else:
        _print_models(rows)
    return 0


def models_rows(pattern: str = "*") -> List[Dict[str, Any]]:
    """``[{"name", "params", "macs", "input_size"}]`` for every registered model matching ``pattern``."""
    from resfast.models import list_models
    from resfast.profiling.counting import model_counts

    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"--name must be a non-empty pattern, got {pattern!r}")
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    names = list_models(glob)
    if not names:
        raise ValueError(f"--name {pattern!r} matches no registered model; registered: {', '.join(list_models())}")
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] counting {name}", file=sys.stderr, flush=True)
        rows.append(model_counts(name))
    return rows


def cardinality_rows() -> List[Dict[str, Any]]:
    """One conv2-stage block (256-d in and out, 64 planes, 56x56) as the plain ResNet
    bottleneck and as ResNeXt blocks ``C x d``: measured parameters (with and without BN)
    and MACs, and the paper's closed form ``C * (256 d + 9 d^2 + d 256)`` for the convs."""
    import torch

    from resfast.nn.blocks import Bottleneck, ResNeXtBottleneck
    from resfast.profiling.counting import count_macs, count_params

    size = (_STAGE_IN, _STAGE_HW, _STAGE_HW)
    blocks = [("resnet bottleneck", 1, _STAGE_PLANES, Bottleneck)]
    blocks += [("resnext", c, d, ResNeXtBottleneck) for c, d in CARDINALITY_SETTINGS]
    rows = []
    for kind, c, d, cls in blocks:
        with torch.device("meta"):
            if cls is Bottleneck:
                block = Bottleneck(_STAGE_IN, _STAGE_PLANES, backend="eager")
            else:
                block = ResNeXtBottleneck(_STAGE_IN, _STAGE_PLANES, cardinality=c, base_width=d, backend="eager")
        rows.append({
            "block": kind, "cardinality": c, "bottleneck_width": d, "group_conv_width": c * d,
            "params": count_params(block), "conv_params": count_params(block, include_norm=False),
            "paper_formula_params": c * (_STAGE_IN * d + 9 * d * d + d * _STAGE_IN),
            "macs": count_macs(block, size),
        })
    return rows


def dense_channel_rows(in_channels: int, growth: int, layers: int, compression: float = 0.5) -> Dict[str, Any]:
    """Channels through a dense block: layer ``l`` (1-based) reads ``C + (l - 1) K`` channels
    and adds ``K``; the block outputs ``C + L K``; the transition compresses that to
    ``floor(compression * (C + L K))``."""
    for flag, v in (("--in", in_channels), ("--growth", growth), ("--layers", layers)):
        if v is None:
            raise ValueError(f"--dense-channels needs {flag}")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{flag} must be a positive int, got {v!r}")
    if not isinstance(compression, (int, float)) or not 0.0 < compression <= 1.0:
        raise ValueError(f"--compression must be in (0, 1], got {compression!r}")
    rows = [{"layer": l, "in_channels": in_channels + (l - 1) * growth, "new_channels": growth}
            for l in range(1, layers + 1)]
    out = in_channels + layers * growth
    return {"in_channels": in_channels, "growth": growth, "num_layers": layers, "compression": compression,
            "layers": rows, "block_out": out, "transition_out": int(math.floor(compression * out))}


def _print_models(rows: List[Dict[str, Any]]) -> None:
    print(f"{'model':<22} {'params':>13} {'MACs/image':>16} {'input':>11}")
    for r in rows:
        c, h, w = r["input_size"]
        print(f"{r['name']:<22} {r['params']:>13,} {r['macs'] / 1e9:>14.3f} G {f'{c}x{h}x{w}':>11}")


def _print_cardinality(rows: List[Dict[str, Any]]) -> None:
    print(f"one conv2-stage block: {_STAGE_IN}-d in and out, {_STAGE_HW}x{_STAGE_HW}")
    print(f"{'block':<18} {'C x d':>7} {'width':>6} {'params':>9} {'conv params':>12} {'C(256d+9d^2+256d)':>18} "
          f"{'MACs':>12}")
    for r in rows:
        cd = f"{r['cardinality']}x{r['bottleneck_width']}"
        print(f"{r['block']:<18} {cd:>7} {r['group_conv_width']:>6} {r['params']:>9,} {r['conv_params']:>12,} "
              f"{r['paper_formula_params']:>18,} {r['macs'] / 1e9:>10.4f} G")


def _print_dense(t: Dict[str, Any]) -> None:
    print(f"dense block: C={t['in_channels']}, k={t['growth']}, L={t['num_layers']}")
    print(f"{'layer':>5} {'in channels':>12} {'new':>5}")
    for r in t["layers"]:
        print(f"{r['layer']:>5} {r['in_channels']:>12} {r['new_channels']:>5}")
    print(f"block output: {t['block_out']} channels (C + L k)")
    print(f"transition (compression {t['compression']}): {t['transition_out']} channels")
