"""Does an error raised in the compiled extension reach Python as a ``RuntimeError``?

    python benchmarks/native_error_probe.py [--json]

On the H200 run of 2026-11-29 the extension built there (with that machine's own g++) passed
487 tests and then crashed the process (SIGSEGV) at the first ``TORCH_CHECK`` it threw, on
CPU and CUDA tensors alike, while PyTorch's own errors raised normally; built here against
the same torch, the same source raises. A crash while an exception unwinds through the
extension's frames points at its toolchain (the unwinder or C++ runtime the process loads
against the one the compiler built for). This probe makes the extension throw (``bn_stats``
of a 2-D tensor: "x must be a 4-D tensor") in a child process, under a few variants, so one
run names the cause and a workaround:

* ``default``: as the tests run it;
* ``no_cpp_stacktraces``: ``TORCH_SHOW_CPP_STACKTRACES=0`` (PyTorch's C++ backtrace off);
* ``compiler_runtime``: the building compiler's ``libgcc_s`` and ``libstdc++`` preloaded
  (``LD_PRELOAD``), when that compiler reports them.

Prints one JSON document: the compiler (``$CXX`` or ``c++``, its first ``--version`` line),
the GCC versions recorded in the extension's ``.comment`` section, and per variant the
child's exit status (negative: killed by that signal) and the error it raised; beside them,
the GCC that built PyTorch's ``libc10.so``. Exit status
0 when the ``default`` variant raised, 1 when it did not, 3 when the extension does not
import with this torch (built against another version), 0 with ``"built": false`` when there
is no compiled extension.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import torch
try:
    import resfast._C  # noqa: F401
except ImportError as exc:
    print("does not load: " + str(exc).strip().splitlines()[0][:200])
    raise SystemExit(4)
try:
    torch.ops.resfast.bn_stats(torch.randn(3, 4))
except RuntimeError as exc:
    print("raised: " + str(exc).strip().splitlines()[0][:200])
    raise SystemExit(0)
print("did not raise")
raise SystemExit(3)
"""


def extension_path(root: str = ROOT) -> Optional[str]:
    """The compiled extension ``resfast/_C*.so`` of this checkout, if built."""
    found = sorted(glob.glob(os.path.join(root, "resfast", "_C*.so")))
    return found[0] if found else None


def gcc_comments(path: str) -> List[str]:
    """The ``GCC: (...) x.y.z`` strings the compilers left in a shared object's ``.comment``."""
    with open(path, "rb") as f:
        data = f.read()
    return sorted({m.decode("ascii", "replace") for m in re.findall(rb"GCC: \([^)\x00]*\) [0-9][^\x00]{0,40}", data)})


def compiler() -> Dict[str, Any]:
    """The C++ compiler a build here would use (``$CXX`` or ``c++``) and its runtime libraries."""
    cxx = os.environ.get("CXX") or "c++"
    info: Dict[str, Any] = {"cxx": os.path.basename(cxx), "found": shutil.which(cxx) is not None}
    if not info["found"]:
        return info
    try:
        info["version"] = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                         timeout=20).stdout.splitlines()[0]
        libs = {}
        for lib in ("libgcc_s.so.1", "libstdc++.so.6"):
            out = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True,
                                 timeout=20).stdout.strip()
            if os.path.isabs(out) and os.path.exists(out):
                libs[lib] = out
        info["runtime"] = libs
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def _start(env_extra: Dict[str, str]) -> subprocess.Popen:
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


def _finish(proc: subprocess.Popen, timeout: float) -> Dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"rc": None, "raised": False, "error": f"timed out after {timeout:.0f} s"}
    out = stdout.strip().splitlines()
    result: Dict[str, Any] = {"rc": proc.returncode,
                              "raised": proc.returncode == 0 and bool(out) and out[-1].startswith("raised: ")}
    if result["raised"]:
        result["message"] = out[-1][len("raised: "):]
    elif proc.returncode == 4 and out and out[-1].startswith("does not load: "):
        result["loads"] = False
        result["message"] = out[-1][len("does not load: "):]
    else:
        result["stderr_tail"] = stderr.strip().splitlines()[-3:]
    return result


def run_variants(variants: Dict[str, Dict[str, str]], timeout: float = 120.0) -> Dict[str, Dict[str, Any]]:
    """Each child under its extra environment, all at once: exit status and what it printed."""
    procs = {name: _start(extra) for name, extra in variants.items()}
    return {name: _finish(proc, timeout) for name, proc in procs.items()}


def probe() -> Dict[str, Any]:
    path = extension_path()
    if path is None:
        return {"built": False}
    import torch

    c10 = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so*")))
    doc: Dict[str, Any] = {"built": True, "extension": os.path.relpath(path, ROOT), "gcc_comments": gcc_comments(path),
                           "torch_gcc_comments": gcc_comments(c10[0]) if c10 else [], "compiler": compiler(),
                           "variants": {}}
    variants = {"default": {}, "no_cpp_stacktraces": {"TORCH_SHOW_CPP_STACKTRACES": "0"}}
    runtime = doc["compiler"].get("runtime") or {}
    if runtime:
        variants["compiler_runtime"] = {"LD_PRELOAD": " ".join(runtime[k] for k in sorted(runtime))}
        doc["compiler"]["runtime"] = {k: "(found)" for k in runtime}  # no machine paths in the record
    doc["variants"] = run_variants(variants)
    return doc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="indent nothing: one line of JSON")
    args = parser.parse_args(argv)
    doc = probe()
    print(json.dumps(doc, indent=None if args.json else 1))
    if not doc["built"]:
        return 0
    default = doc["variants"]["default"]
    if default.get("loads") is False:
        return 3  # built for another torch: nothing to probe with this one
    return 0 if default["raised"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
