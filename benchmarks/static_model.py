"""The static sm_90 performance model of the fused kernels, as a script (no GPU needed).

    python benchmarks/static_model.py [--shapes resnext50_s1,densenet121_1x1 | ci | all]
                                      [--first-config] [--bandwidth h100|h200] [--json]

Same as ``resfast profile --static``: every kernel of a fused training step compiled for sm_90
with triton's compiler exactly as the host code launches it, its registers, spills, shared
memory, MMA instruction, issue-bound time, HBM floor and predicted time, and per shape the
predicted fused forward + backward against eager PyTorch's byte floor. All figures are
predictions; measured GPU results from ``benchmarks/results`` are printed beside them,
labelled. The model's assumptions: ``benchmarks/README.md``, "Static sm_90 performance model".
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the model compiles; the interpreter must be off
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from resfast.profiling.static_model import main

    raise SystemExit(main())
