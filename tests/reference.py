"""The pass rule of docs/design.md ("The correctness rule"): a kernel result against a float64 reference.

``max|out - ref64| <= 2 * max|ref_same - ref64| + atol(dtype) * max(1, max|ref64|)``
where ``ref_same`` is eager PyTorch in the kernel's own dtype. NaN never passes.
"""
from __future__ import annotations

from typing import Optional

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def rule_error(out: torch.Tensor, ref64: torch.Tensor, ref_same: torch.Tensor, dtype: Optional[torch.dtype] = None):
    """``(err, allowed)`` of the rule; ``err`` is ``inf`` if ``out`` has a NaN where ``ref64`` has none."""
    dtype = dtype or ref_same.dtype
    out64 = out.detach().to(torch.float64).cpu()
    r64 = ref64.detach().to(torch.float64).cpu()
    same64 = ref_same.detach().to(torch.float64).cpu()
    assert out64.shape == r64.shape, f"shape {tuple(out64.shape)} != reference {tuple(r64.shape)}"
    ref_nan = torch.isnan(r64)
    if not torch.equal(torch.isnan(out64), ref_nan):
        return float("inf"), 0.0
    mask = ~ref_nan
    if not mask.any():
        return 0.0, 0.0
    err = (out64 - r64)[mask].abs().max().item()
    base = (same64 - r64)[mask].abs().max().item()
    if base != base:  # ref_same itself NaN where ref64 is not: judge by atol alone
        base = 0.0
    scale = max(1.0, r64[mask].abs().max().item())
    return err, 2.0 * base + ATOL[dtype] * scale


def assert_rule(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_same: torch.Tensor, context: str = "",
                dtype: Optional[torch.dtype] = None) -> None:
    err, allowed = rule_error(out, ref64, ref_same, dtype)
    assert err <= allowed, f"{name}: max|out - ref64| = {err:.3e} > allowed {allowed:.3e} ({context})"


def assert_finite_rule(name, out, ref64, same, dtype, context="", superset=False):
    """The finiteness pattern of ``out`` is eager's (``ref64`` / ``same``: eager PyTorch in float64
    and in ``dtype``), and its finite values pass the float64 rule. ``superset``: ``out`` may be
    non-finite where eager is finite too (a known, pinned deviation), never finite where eager
    is not."""
    o, r, s = (t.detach().to(torch.float64).cpu() for t in (out, ref64, same))
    assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)} ({context})"
    fo, fr, fs = torch.isfinite(o), torch.isfinite(r), torch.isfinite(s)
    lost = fo & ~fr & ~fs  # finite where eager is not: a step a GradScaler would take
    assert not lost.any(), (f"{name}: {int(lost.sum())} finite entries where eager's are not, e.g. "
                            f"{lost.nonzero()[0].tolist()} = {o[lost][0].item():.4g} ({context})")
    extra = ~fo & fr & fs
    assert superset or not extra.any(), (f"{name}: {int(extra.sum())} non-finite entries where eager's are "
                                         f"finite, e.g. {extra.nonzero()[0].tolist()} ({context})")
    both = fo & fr
    if both.any():
        err = (o - r)[both].abs().max().item()
        ok = both & fs
        base = (s - r)[ok].abs().max().item() if ok.any() else 0.0
        allowed = 2 * base + ATOL[dtype] * max(1.0, r[both].abs().max().item())
        assert err <= allowed, f"{name}: max|out - ref64| = {err:.3e} > allowed {allowed:.3e} ({context})"


def require_backend(backend: str) -> None:
    """Skip the calling test, saying why, when ``backend`` cannot run on the CPU here."""
    import pytest

    from resfast.backends import backend_status

    why = backend_status("cpu")[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on cpu: {why}")


def judged_dtype(backend: str) -> torch.dtype:
    """The dtype a backend is judged in on the CPU: float64 where it runs it, else float32
    (triton has no float64 kernels)."""
    return torch.float32 if backend == "triton" else torch.float64
