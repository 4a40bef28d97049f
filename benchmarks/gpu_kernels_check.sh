#!/usr/bin/env bash
# The triton kernels on one CUDA GPU in about four minutes, no network needed:
#
#   bash benchmarks/gpu_kernels_check.sh OUTDIR [extra args for gpu_kernels_check.py]
#
# Runs benchmarks/gpu_kernels_check.py from this checkout (no install: the repository root
# goes on PYTHONPATH; the triton backend needs no compiled extension) under a hard 270 s
# timeout: parity of the triton ops against the float64 reference on realistic shapes, then
# eager / torch.compile(max-autotune-no-cudagraphs) / triton timings of ResNeXt-50's grouped
# convs (forward and forward + backward), then per-kernel profiles of ResNeXt-50 stages 1-4 and DenseNet-121's convs with the tuned configs.
# Writes OUTDIR/gpu_kernels.json and OUTDIR/gpu_kernels.log; exit status 0 when parity held.
# Environment: PYTHON (default python3), RESFAST_CHECK_BUDGET_S (default 230).
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_kernels_check.sh OUTDIR [--no-compile] [--skip-parity]" >&2
    exit 2
fi
OUTDIR=$1
shift
mkdir -p "$OUTDIR" || exit 2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET=${RESFAST_CHECK_BUDGET_S:-230}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
timeout -s INT $((BUDGET + 40)) "$PY" "$ROOT/benchmarks/gpu_kernels_check.py" "$OUTDIR" --budget-s "$BUDGET" "$@" \
    2>&1 | tee "$OUTDIR/gpu_kernels.log"
exit "${PIPESTATUS[0]}"
