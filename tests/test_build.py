"""What setup.py built: ``resfast info --json`` reports the compiled extension, and CI's
required CUDA build (RESFAST_REQUIRE_CUDA_BUILD=1) really contains the CUDA kernels."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from resfast.backends import native_info

OPS = ("bn_stats", "bn_relu_conv2d", "bn_relu_conv2d_out", "bn_relu_conv2d_backward", "bn_backward_elemt")


def _info_json():
    proc = subprocess.run([sys.executable, "-m", "resfast", "info", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(os.environ.get("RESFAST_BUILD_EXT") == "0", reason="RESFAST_BUILD_EXT=0: no extension was built")
def test_info_reports_native_built():
    info = _info_json()
    native = info["native"]
    assert native["built"] is True, f"resfast._C was not built: {native['error']}"
    assert native == native_info()
    assert info["backends"]["cpu"]["native"] == "ok"
    # The extension registers a CPU kernel for every op of the op set.
    import resfast._C  # noqa: F401

    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resfast::{op}", "CPU"), op


@pytest.mark.skipif(os.environ.get("RESFAST_REQUIRE_CUDA_BUILD") != "1",
                    reason="RESFAST_REQUIRE_CUDA_BUILD is not 1: the CUDA build is optional here")
def test_required_cuda_build_has_cuda_kernels():
    native = native_info()
    assert native["built"], native["error"]
    assert native["cuda"] is True, "RESFAST_REQUIRE_CUDA_BUILD=1 but resfast._C has no CUDA kernels"
    assert native["cuda_archs"], "the CUDA build did not record its architectures"
    info = _info_json()
    assert info["native"]["cuda"] is True and info["native"]["cuda_archs"] == native["cuda_archs"]
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resfast::{op}", "CUDA"), op
