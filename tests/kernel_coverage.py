"""Compare two kernel recordings of the test suite (tests/conftest.py, RESFAST_RECORD_KERNELS).

    RESFAST_RECORD_KERNELS=/tmp/before pytest tests              # the whole suite, before
    RESFAST_RECORD_KERNELS=/tmp/after pytest tests/test_x.py     # the trimmed file, after
    python tests/kernel_coverage.py /tmp/before /tmp/after --files tests/test_x.py

Prints every Triton kernel specialization (kernel, constexpr values, tensor dtypes) the first
recording launched and the second did not, and exits 1 if there is one: trimming a test's sizes
or cases must not lose a kernel path. With ``--files`` the second recording covers only those
files: their tests in the first are replaced by it, every other test's keys stand (a key another
file still launches is not lost). Also prints each file's cost before and after: CPU seconds
and interpreted kernel programs (load-independent measures of the interpreter's work).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys


def _merge(folder: str, prefix: str, merge) -> dict:
    files = glob.glob(os.path.join(folder, f"{prefix}-*.json"))
    if not files:
        raise SystemExit(f"no {prefix}-*.json in {folder}")
    out: dict = {}
    for path in files:
        with open(path) as f:
            for test, value in json.load(f).items():
                out[test] = merge(out.get(test), value)
    return out


def load(folder: str) -> dict[str, set[str]]:
    """{test node id: set of kernel keys} merged over every process's file in ``folder``."""
    return _merge(folder, "kernels", lambda old, new: (old or set()) | set(new))


def load_cost(folder: str) -> dict[str, list]:
    """{test node id: [CPU seconds, interpreted programs]}."""
    return _merge(folder, "cost", lambda old, new: [a + b for a, b in zip(old or [0.0, 0], new)])


def _file_of(test: str) -> str:
    return test.split("::")[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--files", nargs="*", default=None,
                    help="the test files the second recording ran (it replaces their tests in the first)")
    ap.add_argument("--by-test", action="store_true", help="name the tests that launched each lost key")
    args = ap.parse_args(argv)
    before, after = load(args.before), load(args.after)
    if args.files is not None:
        files = {os.path.normpath(f) for f in args.files}
        kept = {t: k for t, k in before.items() if os.path.normpath(_file_of(t)) not in files}
        after = {**kept, **after}
    else:
        files = None
    keys_before = set().union(*before.values()) if before else set()
    keys_after = set().union(*after.values()) if after else set()
    lost = sorted(keys_before - keys_after)
    print(f"{len(keys_before)} kernel specializations before, {len(keys_after)} after, "
          f"{len(lost)} lost, {len(keys_after - keys_before)} new")
    for key in lost:
        print("LOST", key)
        if args.by_test:
            for test, keys in sorted(before.items()):
                if key in keys:
                    print("    ", test)
    try:
        cost_b, cost_a = load_cost(args.before), load_cost(args.after)
    except SystemExit:
        cost_b = cost_a = None
    if cost_b is not None:
        names = sorted(files) if files is not None else sorted({_file_of(t) for t in cost_a})
        print(f"{'file':55s} {'CPU s before':>12s} {'after':>8s} {'programs before':>16s} {'after':>10s}")
        tot = [0.0, 0.0, 0, 0]
        for name in names:
            b = [v for t, v in cost_b.items() if os.path.normpath(_file_of(t)) == os.path.normpath(name)]
            a = [v for t, v in cost_a.items() if os.path.normpath(_file_of(t)) == os.path.normpath(name)]
            row = [sum(x[0] for x in b), sum(x[0] for x in a), sum(x[1] for x in b), sum(x[1] for x in a)]
            tot = [p + q for p, q in zip(tot, row)]
            print(f"{name:55s} {row[0]:12.1f} {row[1]:8.1f} {row[2]:16d} {row[3]:10d}")
        print(f"{'total':55s} {tot[0]:12.1f} {tot[1]:8.1f} {tot[2]:16d} {tot[3]:10d}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
