"""The architecture study: run the comparisons and write docs/study.md.

``resfast study --scale small`` (digits, small models, a few minutes on a 2-core CPU) or
``resfast study --scale full --data cifar10 --data-dir DIR --device cuda`` (the papers'
models on CIFAR-10, on a GPU) measures

1. the digits target: ``wrn16_2`` for 3 epochs (small scale);
2. wide versus deep: a WRN against a deeper, thinner pre-activation ResNet of similar
   parameter count, and WRN-28-10's parameters against ResNet-50 / ResNet-101;
3. dropout inside the WRN block, on versus off;
4. ResNeXt versus ResNet: ResNeXt-50 32x4d against ResNet-50 (parameters, MACs), the
   cardinality table at equal complexity, and a short training run of CIFAR-size analogues;
5. DenseNet: a figure of the connections of a 4-layer dense block beside a residual
   block's, each layer's input channels and the transition's, and naive versus shared
   (and checkpointed) memory from ``resfast memory`` with its plot;

and writes the markdown with tables and figures made from those measurements only. The
models of a comparison train interleaved, step by step (:mod:`.interleave`), so that a
shared machine's load falls on both alike; each comparison's budget is one at which its
baseline learns, and where it does not the document says so and concludes nothing.

Layout: :mod:`.config` (models, budgets, scales), :mod:`.interleave` (interleaved training
and timing), :mod:`.sections` (what each section measures), :mod:`.figures`, :mod:`.report`
(the markdown), :mod:`.runner` (``run_study``); this module is the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from resfast.backends import BACKENDS
from resfast.train.study.config import SCALES, SECTIONS, Comparison, ModelSpec, Scale, with_epochs
from resfast.train.study.interleave import compare_times, train_interleaved
from resfast.train.study.report import render_markdown
from resfast.train.study.runner import run_study

__all__ = ["add_arguments", "run", "run_study", "render_markdown", "SCALES", "SECTIONS", "Scale", "Comparison",
           "ModelSpec", "compare_times", "train_interleaved"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``resfast study`` options."""
    p.add_argument("--scale", default="small", choices=tuple(SCALES),
                   help="small: digits, small models, minutes on a CPU; full: the papers' models (GPU); "
                        "tiny: seconds, for tests (nothing learns)")
    p.add_argument("--data", default=None, choices=("digits", "cifar10"),
                   help="dataset (default: digits at small scale, cifar10 at full scale)")
    p.add_argument("--data-dir", default=None, help="folder with the CIFAR-10 python-version files")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every comparison (default: each comparison's budget, at which its baseline "
                        "learns)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend (default auto)")
    p.add_argument("--out", default="docs", help="folder for study.md and figures/ (default docs)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's); on a machine shared with other jobs one "
                        "thread per process can be several times faster than two")
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
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        scale = with_epochs(scale, args.epochs)
    doc = run_study(scale, out=args.out, device=args.device, backend=args.backend, data_dir=args.data_dir,
                    sections=sections, seed=args.seed, threads=args.threads)
    if args.json:
        from resfast.cli import emit_json

        emit_json(doc)
    else:
        print(f"wrote {os.path.join(args.out, 'study.md')} ({doc['total_time_s']:.0f} s)", file=sys.stderr)
    return 0
