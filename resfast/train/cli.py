"""Train a model (digits, CIFAR-10/100) and record metrics: ``resfast train``.

Also ``python -m resfast.train ...`` and, for DDP, ``torchrun --nproc_per_node=N -m resfast.train ...``.
"""
from __future__ import annotations

import argparse
import os
import sys

from resfast.backends import BACKENDS
from resfast.train.data import DATASETS
from resfast.train.loop import AMP_MODES, COMPILE_MODES, SCHEDULES, TrainConfig, train

__all__ = ["add_arguments", "run", "config_from_args", "main", "EPILOG"]

#: Shown after the options in ``--help``.
EPILOG = ("Without --out nothing is saved: the final metrics are printed (one JSON document with --json) and "
          "the model is discarded. With --out the run folder is created and checked for writing before "
          "training starts; a folder that already holds a run (checkpoint.pt) is refused unless --resume, which "
          "continues that run with its settings (model, data, batch size, epochs, schedule, learning rate, "
          "momentum, weight decay, dropout, seed).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``resfast train`` options."""
    from resfast.nn.dense import MEMORY_MODES

    d = TrainConfig()
    p.add_argument("--model", default=d.model, help=f"registered model name (default {d.model}; see `resfast models`)")
    p.add_argument("--data", default=d.data, choices=DATASETS, help="dataset (default digits: bundled, no download)")
    p.add_argument("--data-dir", default=None, help="folder with the CIFAR python-version files")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step per process (default 32 on digits, 128 on CIFAR)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                   help="step: x0.2 at 30/60/80%% of the epochs (WRN paper); cosine (default); onecycle")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout inside the block (Wide ResNet and DenseNet models)")
    p.add_argument("--amp", default=d.amp, choices=AMP_MODES, help="mixed precision")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the model and inputs")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS,
                   help="kernel backend of the resfast blocks (`resfast info` says which run here)")
    p.add_argument("--compile", default=d.compile, choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the training step: off (default), default, reduce-overhead (CUDA graphs "
                        "on a GPU: no per-launch host time), max-autotune, max-autotune-no-cudagraphs; the first "
                        "epoch's time includes the compilation")
    p.add_argument("--memory", default=None, choices=MEMORY_MODES,
                   help="dense-block memory mode (DenseNet models)")
    p.add_argument("--sync-bn", action="store_true", help="synchronise BN statistics across DDP ranks")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers, help="data worker processes (0: in this process)")
    p.add_argument("--out", default=None, metavar="RUN_DIR",
                   help="run folder for metrics.csv, metrics.json, curves.png and checkpoint.pt "
                        "(default: none, nothing is saved)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from its checkpoint.pt (same settings)")
    p.add_argument("--subset", type=int, default=None, help=argparse.SUPPRESS)  # first N images: smoke tests
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON document on stdout")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` an argument namespace describes."""
    return TrainConfig(
        model=args.model, data=args.data, data_dir=args.data_dir, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        dropout=args.dropout, amp=args.amp, channels_last=args.channels_last, backend=args.backend,
        memory=args.memory, sync_bn=args.sync_bn, device=args.device, seed=args.seed, workers=args.workers,
        compile=args.compile,
        out=args.out, resume=args.resume, progress=not args.no_progress, subset=args.subset,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``resfast train``; with ``--json`` print the final metrics on stdout (rank 0 only)."""
    from resfast.cli import check_model_name
    from resfast.profiling.runtime import ensure_writable_dir

    check_model_name(args.model)
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        ensure_writable_dir(args.out, "--out")
    result = train(config_from_args(args))
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        if args.json:
            from resfast.cli import emit_json

            emit_json(result)
        else:
            saved = f"; saved in {args.out}" if args.out else "; nothing saved (no --out)"
            print(f"{result['model']} on {result['data']}: test accuracy {result['test_acc']:.4f} after "
                  f"{result['epochs']} epochs, {result['images_per_s']:.0f} images/s, {result['params']:,} parameters"
                  f"{saved}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m resfast.train`` (same options as ``resfast train``)."""
    from resfast.cli import plain_help, run_command

    parser = argparse.ArgumentParser(prog="python -m resfast.train", description=__doc__.splitlines()[0],
                                     epilog=EPILOG)
    add_arguments(parser)
    plain_help(parser)
    return run_command("train", run, parser.parse_args(argv))
