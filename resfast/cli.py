"""The ``resfast`` command: ``info``, ``models``, ``memory``, ``train``, ``study``, ``profile``, ``tune``.

Every subcommand takes ``--json`` and then prints exactly one JSON document on stdout;
progress and logs go to stderr.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import List, Optional

# subcommand -> module providing add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "info": ("resfast.cli_info", "versions, devices and which backends can run here"),
    "models": ("resfast.profiling.models_table", "registered models with parameter and MAC counts"),
    "memory": ("resfast.profiling.memory", "peak training memory of naive / checkpoint / shared dense blocks"),
    "train": ("resfast.train.cli", "train a model (digits, CIFAR-10/100) and record metrics"),
    "study": ("resfast.train.study", "the architecture study: run the comparisons and write docs/study.md"),
    "profile": ("resfast.profiling.static_model", "the static sm_90 performance model of the fused kernels"),
    "tune": ("resfast.tuning", "fill the backend='auto' cache for a model: measure each call signature once"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resfast", description=__doc__.splitlines()[0])
    from resfast import __version__

    parser.add_argument("--version", action="version", version=f"resfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"resfast {args.command}: error: {exc}", file=sys.stderr)
        return 2


def emit_json(obj) -> None:
    """Print one JSON document on stdout (the --json contract)."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
