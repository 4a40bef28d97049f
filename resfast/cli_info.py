"""Show torch, triton and CUDA versions, the GPU, which backends can run, and what resfast._C holds."""
from __future__ import annotations

import argparse
import platform
from typing import Any, Dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def collect() -> Dict[str, Any]:
    import torch

    import resfast
    from resfast.backends import _triton_import, backend_status, native_info, triton_interpret
    from resfast.ops.autotune import cache_summary

    triton, _ = _triton_import()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": prop.name, "capability": f"{prop.major}.{prop.minor}",
                         "memory_bytes": prop.total_memory})
    devices = ["cpu"] + (["cuda"] if gpus else [])
    return {
        "resfast": resfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": getattr(triton, "__version__", None),
        "triton_interpret": triton_interpret(),
        "gpus": gpus,
        "native": native_info(),
        "backends": {d: {k: (v or "ok") for k, v in backend_status(d).items()} for d in devices},
        "auto": {d: resfast.resolve_backend("auto", d) for d in devices},
        "autotune": cache_summary(),
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        from resfast.cli import emit_json

        emit_json(info)
        return 0
    print(f"resfast {info['resfast']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})  "
          f"triton {info['triton']}{' [interpreter]' if info['triton_interpret'] else ''}")
    if info["gpus"]:
        for g in info["gpus"]:
            print(f"GPU {g['index']}: {g['name']} (sm {g['capability']}, {g['memory_bytes'] / 2**30:.1f} GiB)")
    else:
        print("GPU: none")
    nat = info["native"]
    if nat["built"]:
        archs = ",".join(nat["cuda_archs"]) or "-"
        print(f"resfast._C: built; CPU kernels yes; CUDA kernels {'yes (archs ' + archs + ')' if nat['cuda'] else 'no'}")
    else:
        print(f"resfast._C: not built ({nat['error']})")
    for dev, status in info["backends"].items():
        for name, why in status.items():
            print(f"  {dev:4s} {name:6s} {'unavailable: ' + why if why != 'ok' else backend_note(name, dev)}")
        print(f"  {dev:4s} auto  -> {info['auto'][dev]}")
    tune = info["autotune"]
    print(f"auto's measured choices: {tune['file']} ({tune['choices']} choices, {tune['choices_here']} for this "
          f"machine and these versions){'' if tune['measuring'] else '; measuring is off (RESFAST_BACKEND / RESFAST_AUTOTUNE=0)'}")
    return 0


def backend_note(name: str, device_type: str) -> str:
    """What running backend ``name`` on ``device_type`` is for, from the backend table: its
    description, and, where ``auto`` never picks it on that device (native, and triton under
    the interpreter, on the CPU), that it is the test twin of the GPU kernels, not a speed path."""
    from resfast.backends import backend, static_order

    row, order = backend(name), static_order(device_type)
    if name in order:
        return f"runs: {row.description}"
    fast = f"; use {order[0]} for speed" if order else ""
    return (f"runs, as the test twin of the GPU kernels, not a speed path (auto never picks it on {device_type}"
            f"{fast}): {row.description}")
