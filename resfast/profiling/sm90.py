"""The machine and the conv shapes of the static sm_90 models (:mod:`resfast.profiling.static_model`
for the triton kernels, :mod:`resfast.profiling.static_native` for the native ones): one
source for both. Every figure derived from these is a prediction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["ConvShape", "SHAPES", "SMS", "CLOCK_GHZ", "ISSUE_PER_CLK", "WGMMA_MACS_PER_CLK", "MMA_SYNC_MACS_PER_CLK",
           "SMEM_PER_SM", "SMEM_PER_BLOCK", "REGS_PER_SM", "MAX_WARPS_PER_SM", "MAX_BLOCKS_PER_SM", "H100", "H200",
           "DEP_CPI", "SYNC_CYCLES", "LOAD_ROUND_CYCLES", "LAUNCH_US"]

# ----------------------------------------------------------------------------- the machine

#: H100 / H200 SXM: SMs, issue rate, clock, tensor-core MACs per clock per SM, shared memory,
#: registers, HBM bandwidth.
SMS = 132
CLOCK_GHZ = 1.755
ISSUE_PER_CLK = 4            # warp-instructions per clock per SM (4 schedulers)
WGMMA_MACS_PER_CLK = 2048    # dense bf16/fp16, per SM (989 TFLOP/s at 1.83 GHz)
MMA_SYNC_MACS_PER_CLK = 1024  # assumed half of wgmma's rate
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
H100 = 3.35e12
H200 = 4.8e12

#: The dependent-issue (latency) bound of the triton model
#: (:func:`resfast.profiling.static_model.latency_bound_us`): cycles per instruction on one
#: warp's own path, per CTA barrier, per load round, and a fixed time per launch. Fitted to the
#: per-kernel profile of the 2026-11-29 H200 run (resnext50_s1's six kernels, each with the
#: config its autotuner chose): ``python benchmarks/static_calibrate.py`` refits them and prints
#: the residuals. Fit of 2026-11-29 (triton 3.6, the GPU's): predicted / measured 0.62x (the
#: statistics pass) to 1.31x (the conv backward) over the six kernels; the barrier and launch
#: terms fitted to zero (the barriers' cost is inside the per-instruction and load-round terms).
#: Six kernels of one shape: a calibration, not yet a validation on other shapes.
DEP_CPI = 10.7
SYNC_CYCLES = 0.0
LOAD_ROUND_CYCLES = 147.0
LAUNCH_US = 0.0

# ----------------------------------------------------------------------------- the shapes


@dataclass(frozen=True)
class ConvShape:
    """One fused BN-ReLU-conv of a network (training, channels_last)."""

    name: str
    n: int
    c: int
    h: int
    w: int
    co: int
    k: int
    stride: int = 1
    groups: int = 1
    padding: Optional[int] = None

    @property
    def pad(self) -> int:
        return self.k // 2 if self.padding is None else self.padding

    @property
    def out_hw(self) -> Tuple[int, int]:
        return ((self.h + 2 * self.pad - self.k) // self.stride + 1, (self.w + 2 * self.pad - self.k) // self.stride + 1)


SHAPES: Dict[str, ConvShape] = {s.name: s for s in [
    # ResNeXt-50 32x4d conv2 (grouped 3x3, 32 groups), batch 64; *_down: a stage's first, stride-2 block
    ConvShape("resnext50_s1", 64, 128, 56, 56, 128, 3, 1, 32),
    ConvShape("resnext50_s2", 64, 256, 28, 28, 256, 3, 1, 32),
    ConvShape("resnext50_s3", 64, 512, 14, 14, 512, 3, 1, 32),
    ConvShape("resnext50_s4", 64, 1024, 7, 7, 1024, 3, 1, 32),
    ConvShape("resnext50_s2_down", 64, 256, 56, 56, 256, 3, 2, 32),
    ConvShape("resnext50_s3_down", 64, 512, 28, 28, 512, 3, 2, 32),
    ConvShape("resnext50_s4_down", 64, 1024, 14, 14, 1024, 3, 2, 32),
    # WRN-28-10 3x3 convs (CIFAR, batch 128 as the benchmarks)
    ConvShape("wrn28_10_s1", 128, 160, 32, 32, 160, 3),
    ConvShape("wrn28_10_s2", 128, 320, 16, 16, 320, 3),
    ConvShape("wrn28_10_s3", 128, 640, 8, 8, 640, 3),
    ConvShape("wrn28_10_s2_down", 128, 160, 32, 32, 320, 3, 2),
    ConvShape("wrn28_10_s3_down", 128, 320, 16, 16, 640, 3, 2),
    # DenseNet-121: BN-ReLU-conv1x1 of each block's last layer (4k = 128 outputs), BN-ReLU-conv3x3 128 -> 32
    ConvShape("densenet121_1x1", 64, 224, 56, 56, 128, 1),
    ConvShape("densenet121_1x1_b2", 64, 480, 28, 28, 128, 1),
    ConvShape("densenet121_1x1_b3", 64, 992, 14, 14, 128, 1),
    ConvShape("densenet121_1x1_b4", 64, 992, 7, 7, 128, 1),
    ConvShape("densenet121_3x3", 64, 128, 56, 56, 32, 3),
    ConvShape("densenet121_3x3_b2", 64, 128, 28, 28, 32, 3),
    ConvShape("densenet121_3x3_b3", 64, 128, 14, 14, 32, 3),
    ConvShape("densenet121_3x3_b4", 64, 128, 7, 7, 32, 3),
    # a depthwise 3x3 (MobileNet-style), batch 64
    ConvShape("depthwise_3x3", 64, 128, 56, 56, 128, 3, 1, 128),
]}
