"""Compare two kernel recordings of the test suite (tests/conftest.py, RESFAST_RECORD_KERNELS).

    RESFAST_RECORD_KERNELS=/tmp/before pytest tests/test_x.py   # before a change to the tests
    RESFAST_RECORD_KERNELS=/tmp/after pytest tests/test_x.py    # after it
    python tests/kernel_coverage.py /tmp/before /tmp/after

Prints every Triton kernel specialization (kernel, constexpr values, tensor dtypes) the first
recording launched and the second did not, and exits 1 if there is one: trimming a test's sizes
or cases must not lose a kernel path. `--by-test` lists which tests of the first recording
launched each lost key.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys


def load(folder: str) -> dict[str, set[str]]:
    """{test node id: set of kernel keys} merged over every process's file in ``folder``."""
    out: dict[str, set[str]] = {}
    files = glob.glob(os.path.join(folder, "kernels-*.json"))
    if not files:
        raise SystemExit(f"no kernels-*.json in {folder}")
    for path in files:
        with open(path) as f:
            for test, keys in json.load(f).items():
                out.setdefault(test, set()).update(keys)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--by-test", action="store_true", help="name the tests that launched each lost key")
    args = ap.parse_args(argv)
    before, after = load(args.before), load(args.after)
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
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
