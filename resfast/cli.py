"""The resfast command: info, models, memory, train, study, profile, tune.

Every subcommand takes --json and then prints exactly one JSON document on stdout;
progress and logs go to stderr. A bad argument, or a backend that cannot run here, is one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import math
import re
import sys
from typing import Callable, List, Optional

from resfast.backends import BackendUnavailableError

__all__ = ["build_parser", "first_paragraph", "main", "run_command", "emit_json", "json_safe", "check_model_name",
           "plain_text", "plain_help"]

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

# What a user's mistake raises; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, BackendUnavailableError)

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")  # :func:`x`, :py:class:`~a.b`
_LITERAL = re.compile(r"``([^`]+)``")
_INTERPRETED = re.compile(r"`([^`]+)`")


def plain_text(text: str) -> str:
    """``text`` (a docstring line) without reStructuredText markup, for ``--help``:
    ````x````, ```x``` and ``:role:`x``` become ``x``; a ``~`` role target keeps its last part."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).count("~") else m.group(1), text)
    return _INTERPRETED.sub(r"\1", _LITERAL.sub(r"\1", text))


def plain_help(parser: argparse.ArgumentParser) -> None:
    """Strip reStructuredText markup from the description, epilog and option help of ``parser``."""
    for text_attr in ("description", "epilog"):
        if getattr(parser, text_attr):
            setattr(parser, text_attr, plain_text(getattr(parser, text_attr)))
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            action.help = plain_text(action.help)


def first_paragraph(doc: str) -> str:
    """The first paragraph of a module docstring as one line (a first sentence may wrap: its
    first line alone cut ``resfast memory --help``'s description off at "(or of a")."""
    lines = []
    for line in doc.strip().splitlines():
        if not line.strip():
            break
        lines.append(line.strip())
    return " ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``resfast`` parser with every subcommand whose module is installed."""
    parser = argparse.ArgumentParser(prog="resfast", description=plain_text(__doc__.splitlines()[0]))
    from resfast._version import __version__

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
        p = sub.add_parser(name, help=help_text, description=first_paragraph(mod.__doc__ or help_text),
                           epilog=getattr(mod, "EPILOG", None))
        mod.add_arguments(p)
        plain_help(p)
        p.set_defaults(_run=mod.run)
    return parser


def run_command(name: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``; a user error (bad argument, unknown model, backend that cannot run here)
    becomes one line on stderr and exit status 2."""
    try:
        return int(run(args) or 0)
    except USER_ERRORS as exc:
        print(f"resfast {name}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``resfast`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_command(args.command, args._run, args)


def check_model_name(name: str, option: str = "--model") -> str:
    """``name`` if it names a model; else ``ValueError`` with the closest registered names
    and a pointer to ``resfast models``. Library names (``torchvision:NAME``) are checked by
    the registry."""
    from resfast.models import list_models, model_info

    if isinstance(name, str) and ":" in name:
        model_info(name)
        return name
    names = list_models()
    if name in names:
        return name
    close = difflib.get_close_matches(str(name), names, n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"{option}: unknown model {name!r}{hint} (`resfast models` lists them all)")


def json_safe(obj):
    """``obj`` with every NaN or infinite float (a diverged loss, an untimed step) as ``None``:
    JSON has no such numbers, and ``json.dump`` wrote them as ``NaN`` / ``Infinity``, which strict
    parsers (``jq``, JavaScript, ``json.loads(..., parse_constant=...)``) refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def emit_json(obj) -> None:
    """Print one JSON document on stdout (the --json contract): standard JSON, a non-finite
    float written as ``null``."""
    json.dump(json_safe(obj), sys.stdout, indent=2, default=str, allow_nan=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
