"""When a block runs its BN-ReLU-convs unfused, through its own submodules.

A fused op (or the shared dense block) replaces calls of the ``BatchNorm2d``, ``ReLU`` and
``Conv2d`` submodules by one kernel, so nothing hooked on those submodules would run. Two
situations need the submodules called one by one, as torchvision's blocks call them:

* **FX symbolic tracing** (``torch.fx.symbolic_trace``, torchvision's
  ``create_feature_extractor``): the traced graph calls the submodules (leaf modules for FX),
  so it computes torchvision's features and keeps BatchNorm's train/eval switch dynamic;
* **hooks** registered on those submodules (forward, forward-pre, backward): the block then
  runs unfused, the hooks fire, and a warning says so once per block.

Global module hooks (``register_module_forward_hook``, which tools such as PyTorch's memory
tracker install) do not switch a block to the unfused path: they see the blocks and every
module the fused path still calls, so measuring a model measures the fused path.
"""
from __future__ import annotations

import warnings
from typing import Iterable, List, Tuple

import torch
from torch import nn

__all__ = ["is_tracing", "hooked_submodules", "run_unfused", "submodules", "any_hooks"]


def is_tracing() -> bool:
    """True inside ``torch.fx.symbolic_trace`` (and tracers built on it); not under
    ``torch.export`` / ``torch.compile``, which trace the fused ops themselves."""
    st = torch.fx._symbolic_trace
    check = getattr(st, "is_fx_symbolic_tracing", None)
    if check is not None:
        return check()
    return st.is_fx_tracing() and not torch.compiler.is_compiling()


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None))


def submodules(root: nn.Module) -> List[nn.Module]:
    """Every module under ``root`` (itself included) once, as ``root.modules()`` gives them but
    in no particular order and without building the names ``named_modules`` builds: the dense
    blocks walk their submodules on every forward."""
    out, seen, stack = [], set(), [root]
    while stack:
        m = stack.pop()
        if m is not None and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
            stack.extend(m._modules.values())
    return out


def any_hooks(root: nn.Module) -> bool:
    """Whether ``root`` or a module under it carries hooks of its own (the quick test before
    the names ``run_unfused`` reports are built)."""
    stack = [root]
    while stack:
        m = stack.pop()
        if m is None:
            continue
        if _has_hooks(m):
            return True
        stack.extend(m._modules.values())
    return False


def hooked_submodules(named: Iterable[Tuple[str, nn.Module]]) -> List[str]:
    """Names of the modules in ``named`` that carry hooks of their own."""
    return [n for n, m in named if m is not None and _has_hooks(m)]


def run_unfused(owner: nn.Module, named: Iterable[Tuple[str, nn.Module]], fused_what: str) -> bool:
    """Whether ``owner`` must call the submodules ``named`` one by one this forward (FX tracing,
    or hooks on them); warns once per ``owner`` about hooks."""
    if is_tracing():
        return True
    hooked = hooked_submodules(named)
    if not hooked:
        return False
    if not getattr(owner, "_resfast_warned_hooks", False):
        owner._resfast_warned_hooks = True
        warnings.warn(
            f"{type(owner).__name__}: hooks are registered on {', '.join(hooked)}, which resfast replaces by "
            f"{fused_what}; while they are registered this block runs its BatchNorm, ReLU and conv modules one by "
            f"one (unfused, eager PyTorch), so the hooks fire",
            UserWarning, stacklevel=3)
    return True
