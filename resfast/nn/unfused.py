"""When a block runs its BN-ReLU-convs unfused, through its own submodules.

A fused op (or the shared dense block) replaces calls of the ``BatchNorm2d``, ``ReLU`` and
``Conv2d`` submodules by one kernel, so nothing hooked on those submodules would run. Two
situations need the submodules called one by one, as torchvision's blocks call them:

* **FX symbolic tracing** (``torch.fx.symbolic_trace``, torchvision's
  ``create_feature_extractor``): the traced graph calls the submodules (leaf modules for FX),
  so it computes torchvision's features and keeps BatchNorm's train/eval switch dynamic;
* **hooks** registered on those submodules (forward, forward-pre, backward): the block then
  runs unfused, the hooks fire, and a warning says so once per block;
* **a replaced submodule** whose own ``forward`` the fused op would skip: a conv whose class
  overrides ``nn.Conv2d``'s ``forward`` / ``_conv_forward`` (a QAT conv from
  ``torch.ao.nn.qat.Conv2d.from_float`` / ``swap_module``, weight standardisation), an
  activation that is not ``nn.ReLU``, a BatchNorm subclass with a forward of its own, a pool
  of another kind. The fused op reads only such a module's
  parameters, so it silently computed ``conv(relu(bn(x)))`` with plain ``F.conv2d`` (trial 12);
  the block now calls the modules, as for hooks, and warns once. The same for a module whose
  ``forward`` (or a conv's ``_conv_forward``) is set on the instance (``conv.forward = ...``, as
  accelerate's hooks and monkey patches do; trial 27: skipped silently, outputs 1e-6 to 80 off).

Global module hooks (``torch.nn.modules.module.register_module_forward_hook`` and its pre /
backward kin) installed by PyTorch's own tools (``torch.utils.module_tracker.ModuleTracker``
under ``FlopCounterMode``, ``torch.distributed._tools``' ``ModTracker`` under ``MemTracker``) do
not switch a block to the unfused path: they only observe, they see the blocks and every module
the fused path still calls, so measuring a model measures the fused path. Any other global hook
(a user's, e.g. one that scales every ReLU's output or shifts every conv's input) may change a
module's output, and the fused path would skip it on the modules it replaces (a converted
resnet's output 0.42 off, silently, trial 24): while one is registered the blocks run their
modules one by one, as for hooks on the modules themselves, and warn once.
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

__all__ = ["is_tracing", "global_hooks", "hooked_submodules", "replaced_submodules", "any_replaced", "run_unfused",
           "submodules", "any_hooks", "converted_changed", "original_forward", "refuse_script", "overridden"]


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


_GLOBAL_HOOK_DICTS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                      "_global_backward_hooks")


def global_hooks() -> List[str]:
    """The global module hooks (``register_module_forward_hook``, ``..._forward_pre_hook``,
    ``..._full_backward_hook``, ``..._full_backward_pre_hook``) registered now by anything but
    PyTorch's own tools (a hook whose function lives in a ``torch.`` module: the observing
    ``ModuleTracker`` / ``ModTracker``), by name; ``[]`` when there is none. Such a hook runs on
    every module and may change its output, so a block must call the modules it fuses."""
    from torch.nn.modules import module as _m

    dicts = [getattr(_m, name, None) for name in _GLOBAL_HOOK_DICTS]
    if not any(dicts):
        return []
    names = []
    for hooks in dicts:
        for hook in (hooks or {}).values():
            fn = getattr(hook, "func", hook)  # a functools.partial: its function
            if not (getattr(fn, "__module__", None) or "").startswith("torch."):
                names.append(getattr(fn, "__qualname__", None) or repr(fn))
    return names


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
    """Whether ``root`` or a module under it carries hooks of its own, or a user's global module
    hook is registered (:func:`global_hooks`; the quick test before the names ``run_unfused``
    reports are built)."""
    if global_hooks():
        return True
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
    """Names of the modules in ``named`` that carry hooks of their own; every one of them while a
    user's global module hook is registered (:func:`global_hooks`: it runs on each)."""
    named = [(n, m) for n, m in named if m is not None]
    hooked = [n for n, m in named if _has_hooks(m)]
    return hooked or ([n for n, _ in named] if global_hooks() else [])


def _role(name: str) -> str:
    """``"denselayer1.conv2"`` -> ``"conv2"``; the role of a block's submodule is its own name."""
    return name.rsplit(".", 1)[-1]


def _torch_wrapper(cls: type) -> bool:
    """A wrapper module of ``torch.distributed`` (FSDP's ``FullyShardedDataParallel``, which its
    ``MixedPrecision`` puts around every BatchNorm to keep it in float32; ``checkpoint_wrapper``'s
    ``CheckpointWrapper``): its forward gathers the parameters, casts, checkpoints, registers the
    gradient reduction, so it must run (the fused op reading the module inside through it
    raised a TypeError where the modules run, trial 21)."""
    return cls.__module__.startswith("torch.distributed.")


def _std_norm(cls: type) -> bool:
    """False for a BatchNorm subclass with a forward of its own, and for a ``torch.distributed``
    wrapper in the norm slot (:func:`_torch_wrapper`). A norm that is no BatchNorm at all (a
    ``norm_layer=GroupNorm`` block) is the blocks' own business: they run it unfused by design
    (``blocks._bn_relu_conv``), so it is not reported here."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if not issubclass(cls, _BatchNorm):
        return not _torch_wrapper(cls)
    if cls.forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
        return True
    # timm's BatchNormAct2d (a BatchNorm2d with its ReLU inside), as resfast.convert accepts it
    return cls.__module__.startswith("timm.") and cls.__name__ in ("BatchNormAct2d", "SyncBatchNormAct")


_REPLACED_CLASS: Dict[Tuple[str, bool, type], bool] = {}


def _replaced_class(role: str, max_pool: bool, cls: type, compiling: bool = False) -> bool:
    """Whether a module of class ``cls`` in a block's ``role`` has a forward the fused path would
    skip: a class property, memoised, since the blocks ask on every forward (worked out afresh
    while ``torch.compile`` traces, ``compiling``: it folds the answer to a constant)."""
    if compiling:
        return _replaced_class_uncached(role, max_pool, cls)
    key = (role, max_pool, cls)
    hit = _REPLACED_CLASS.get(key)
    if hit is None:
        hit = _REPLACED_CLASS[key] = _replaced_class_uncached(role, max_pool, cls)
    return hit


def _replaced_class_uncached(role: str, max_pool: bool, cls: type) -> bool:
    if role in ("conv", "shortcut"):
        return not issubclass(cls, nn.Conv2d) or cls.forward is not nn.Conv2d.forward \
            or cls._conv_forward is not nn.Conv2d._conv_forward
    if role == "relu":
        return not issubclass(cls, nn.ReLU) or cls.forward is not nn.ReLU.forward
    if role == "bn":
        return not _std_norm(cls)
    if role == "norm":
        # a dense layer's / transition's / DenseNet stem's / BNReLUConv2d's norm: one that is no
        # BatchNorm at all has no fused form (timm's ``freeze()`` swaps in FrozenBatchNorm2d; a
        # GroupNorm): the modules run, as in torchvision's DenseNet (it raised TypeError, trial
        # 24). The ResNet blocks (role "bn") run such a norm unfused by design themselves.
        from torch.nn.modules.batchnorm import _BatchNorm

        return not _std_norm(cls) or not issubclass(cls, _BatchNorm)
    if role == "pool":  # the DenseNet stem's max pool (pool0), a transition's 2x2 average pool
        want = nn.MaxPool2d if max_pool else nn.AvgPool2d
        return not issubclass(cls, want) or cls.forward is not want.forward
    return False


#: methods whose instance-level override (``conv.forward = ...``, ``conv._conv_forward = ...``:
#: accelerate-style hooks, a patched module) changes what calling the module computes
_OVERRIDABLE = ("forward", "_conv_forward")


def overridden(m: nn.Module) -> bool:
    """Whether ``m``'s own ``__dict__`` overrides its class's ``forward`` (or a conv's
    ``_conv_forward``): calling ``m`` then runs that, which a fused path that only reads ``m``'s
    parameters (or calls a resfast module's method directly) would skip (trial 27)."""
    d = m.__dict__
    return any(k in d for k in _OVERRIDABLE)


def _is_replaced(name: str, m: nn.Module, compiling: bool = False) -> bool:
    """Whether ``m``, a block's submodule named ``name``, has a forward the fused path would skip:
    of its class, or set on the instance (:func:`overridden`)."""
    own = _role(name)
    return _replaced_class(own.rstrip("0123456789"), own == "pool0", type(m), compiling) or overridden(m)


def replaced_submodules(named: Iterable[Tuple[str, nn.Module]]) -> List[str]:
    """Names of the modules in ``named`` whose own forward the fused path would skip: a conv
    whose class overrides ``nn.Conv2d``'s forward, an activation other than ``nn.ReLU``, a
    BatchNorm subclass with a forward of its own, a pool of another kind (see the module docstring)."""
    compiling = torch.compiler.is_compiling()
    return [f"{n} ({type(m).__name__}{', its forward set on the instance' if overridden(m) else ''})"
            for n, m in named if m is not None and _is_replaced(n, m, compiling)]


def any_replaced(root: nn.Module) -> bool:
    """Whether a submodule of ``root`` (a dense layer) is replaced (see :func:`replaced_submodules`):
    one walk of the tree, a memoised class check per module."""
    compiling = torch.compiler.is_compiling()
    stack = [root]
    while stack:
        for name, m in stack.pop()._modules.items():
            if m is None:
                continue
            if _replaced_class(name.rstrip("0123456789"), name == "pool0", type(m), compiling) or overridden(m):
                return True
            if m._modules:
                stack.append(m)
    return False


def converted_changed(owner: nn.Module) -> bool:
    """Whether a module ``resfast.convert`` turned into a resfast class from a class whose forward
    runs more modules than the resfast forward does (timm's: ``act1`` / ``act2`` / ``act3``,
    ``aa``, ``drop_block``, ``drop_path``, a basic block's ``se``, the ``act`` / ``drop`` inside a
    ``BatchNormAct2d``) has one of those changed since: replaced by a module of another class (or
    set where it was ``None``) or hooked. The conversion checked that they do nothing but a ReLU
    (or nothing at all) and recorded their classes as ``_resfast_skipped``; while one differs
    the module must run its original forward (:func:`original_forward`), which calls them."""
    skipped = owner.__dict__.get("_resfast_skipped")
    if not skipped:
        return False
    for path, cls in skipped:
        m = owner
        for part in path.split("."):
            m = m._modules.get(part) if isinstance(m, nn.Module) else None
        if type(m) is not cls or (m is not None and _has_hooks(m)):
            return True
    return False


def original_forward(owner: nn.Module):
    """The forward of the class ``resfast.convert`` turned ``owner`` from, where the resfast class's
    module-by-module forward would not reproduce it (see :func:`converted_changed`), else ``None``.

    It is bound to a view of ``owner`` as an instance of that class, sharing ``owner``'s
    ``__dict__`` (its submodules, parameters, ``training``), so the methods it calls that the
    resfast class lacks (timm's ``DenseLayer.bottleneck_fn``) are found."""
    cls = owner.__dict__.get("_resfast_from")
    if cls is None:
        return None
    view = object.__new__(cls)
    view.__dict__ = owner.__dict__
    return cls.forward.__get__(view)


def run_unfused(owner: nn.Module, named: Iterable[Tuple[str, nn.Module]], fused_what: str) -> bool:
    """Whether ``owner`` must call the submodules ``named`` one by one this forward (FX tracing,
    hooks on them or a user's global module hook (:func:`global_hooks`), one of them replaced by
    a module whose forward the fused op would skip, or a module the conversion found doing
    nothing but a ReLU changed since, :func:`converted_changed`); warns once per ``owner`` about
    hooks or replaced modules."""
    if is_tracing():
        return True
    if converted_changed(owner):
        _warn_once(owner, "_resfast_warned_converted",
                   f"{type(owner).__name__}: a module that resfast.convert found applying only a ReLU (or nothing) "
                   f"and that the fused forward skips (e.g. timm's act1/act2, a BatchNormAct2d's act) was replaced "
                   f"or hooked since; while it differs this block runs its original forward "
                   f"({owner.__dict__['_resfast_from'].__qualname__}, unfused, eager PyTorch)")
        return True
    named = list(named)
    hooked = hooked_submodules(named)
    if not hooked:
        replaced = replaced_submodules(named)
        if not replaced:
            return False
        _warn_once(owner, "_resfast_warned_replaced",
                   f"{type(owner).__name__}: {', '.join(replaced)} replaced the module resfast fuses into "
                   f"{fused_what} (its forward is not nn.BatchNorm2d's / nn.ReLU's / nn.Conv2d's, which the fused op "
                   f"reproduces); while it is there this block runs its BatchNorm, ReLU and conv modules one by one "
                   f"(unfused, eager PyTorch), so its forward runs")
        return True
    glob = global_hooks()
    if glob:
        _warn_once(owner, "_resfast_warned_global_hooks",
                   f"{type(owner).__name__}: global module hooks ({', '.join(glob)}; register_module_forward_hook "
                   f"and its kin) are registered: they run on every module and may change its output, and "
                   f"{fused_what} would skip them on {', '.join(hooked)}; while they are registered this block "
                   f"runs its BatchNorm, ReLU and conv modules one by one (unfused, eager PyTorch), so they fire")
        return True
    _warn_once(owner, "_resfast_warned_hooks",
               f"{type(owner).__name__}: hooks are registered on {', '.join(hooked)}, which resfast replaces by "
               f"{fused_what}; while they are registered this block runs its BatchNorm, ReLU and conv modules one by "
               f"one (unfused, eager PyTorch), so the hooks fire")
    return True


def _warn_once(owner: nn.Module, flag: str, message: str) -> None:
    """``message`` as a UserWarning at the block's caller, the first time ``owner`` raises ``flag``."""
    if not getattr(owner, flag, False):
        setattr(owner, flag, True)
        warnings.warn(message, UserWarning, stacklevel=4)


def refuse_script(self: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of every resfast module: ``torch.jit.script`` calls it on each
    submodule before compiling, and it refuses with what to do instead. TorchScript cannot compile
    a fused forward (it picks the backend, the fused or unfused path and the BatchNorm's
    bookkeeping in Python at run time); without this the user got a TorchScript frontend error
    from deep inside resfast (``Unknown type name 'nn.Module'``, ``attribute lookup is not
    defined on python value of type 'module'``) that named no way out."""
    raise RuntimeError(
        f"torch.jit.script cannot compile {type(self).__qualname__} (a resfast module: its forward chooses the "
        f"fused kernel and the BatchNorm bookkeeping in Python at run time). Use torch.jit.trace (it records the "
        f"fused ops; eval or training), torch.export.export or torch.compile instead, or script the model before "
        f"resfast.convert (the unconverted torchvision / timm modules are scriptable).")
