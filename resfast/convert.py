"""``resfast.convert(model)``: put resfast into a model that already exists, in place.

A user has ``torchvision.models.densenet121()``, ``timm.create_model("resnext50_32x4d")``
or a network of their own, an optimizer built over its parameters and a checkpoint.
:func:`convert` walks the module tree and turns what it recognises into resfast modules
**in place**: each recognised module object becomes an instance of the resfast class (its
class is swapped; its ``id()``, hooks and attributes stay), keeping the very same
``Parameter`` and buffer objects under the same names. So an optimizer built before the
call keeps training the same tensors, its state stays valid, and ``state_dict`` keys and
tensors are unchanged (checkpoints load both ways).

What it recognises, by exact class (subclasses that override ``forward`` are treated as
unknown modules):

* torchvision: ``BasicBlock``, ``Bottleneck`` (ResNet, ResNeXt, Wide ResNet) become
  :class:`resfast.BasicBlock`, :class:`resfast.Bottleneck` /
  :class:`resfast.ResNeXtBottleneck`; ``_DenseLayer``, ``_DenseBlock``, ``_Transition``
  become :class:`resfast.DenseLayer`, :class:`resfast.DenseBlock`,
  :class:`resfast.Transition`;
* timm: ``resnet.BasicBlock`` and ``resnet.Bottleneck`` (with or without an attention
  module such as SE, when there is no drop-path / drop-block / anti-aliasing and every
  activation is ReLU) and ``densenet.DenseLayer`` / ``DenseBlock`` / ``DenseTransition``
  with ``BatchNormAct2d(act=ReLU)``.

Any other module whose ``forward`` runs ``BatchNorm2d -> ReLU -> Conv2d`` (an
``nn.Sequential``, a pre-activation block, a post-activation block of one's own) is
traced one level deep with ``torch.fx`` (in training and in eval mode: the two may differ)
and each such sequence becomes one fused call of
:func:`resfast.nn.fused.bn_relu_conv`; the module keeps its class (a subclass of it
with the traced forward) and its children. A module whose children are all dense layers
(``norm1, conv1, norm2, conv2``; called as ``layer(*features)`` or ``layer(features)``)
and whose forward concatenates the block input with every layer's output, as in the
common CIFAR DenseNet implementations, becomes a :class:`resfast.DenseBlock`.

Anything that cannot be converted exactly is left as it was and the report says why:
another activation, a BatchNorm class whose forward is not ``nn.BatchNorm2d``'s, a
BatchNorm called twice or registered at two places, a ReLU output that is also read by
something other than a conv, hooks on a module the fused call would bypass, a forward
``torch.fx`` cannot trace.

Differences from the original that are on purpose: a torchvision or timm dense layer
with ``memory_efficient=True`` / ``grad_checkpointing=True`` updates ``norm1``'s running
statistics twice per step (the checkpoint's recomputation runs the BatchNorm again);
converted, they are updated once, as in the non-checkpointed model.
"""
from __future__ import annotations

import copy
import inspect
import sys
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resfast.backends import check_backend_name
from resfast.nn.blocks import (BasicBlock, Bottleneck, PreActBottleneck, ResNeXtBottleneck, SEModule,
                               WideBasic)
from resfast.nn.dense import MEMORY_MODES, DenseBlock, DenseLayer, Transition
from resfast.nn.fused import BNReLUConv2d, bn_relu_conv, conv_pair, conv_padding
from resfast.nn.unfused import global_hooks, overridden, refuse_script
from resfast.ops.dense_block import RECOMPUTE_MODES

__all__ = ["convert", "ConversionReport", "ConversionEntry"]


def convert(model: nn.Module, *, backend: str = "auto", dense_memory: str = "shared", recompute: str = "bn_relu",
            inplace: bool = True) -> "ConversionReport":
    """Replace, in place, the parts of ``model`` resfast recognises with resfast modules.

    Args:
        model: any ``nn.Module``; a ``DistributedDataParallel`` / ``DataParallel`` wrapper
            is converted through its ``.module``. A ``torch.compile``'d model
            (``OptimizedModule``) is refused: convert first, then compile.
        backend: the converted modules' backend, ``"auto" | "eager" | "triton" | "native"``.
        dense_memory: ``memory=`` of the converted dense blocks: ``"shared"`` (one feature
            buffer per block), ``"checkpoint"`` or ``"naive"``.
        recompute: ``recompute=`` of the converted dense blocks (with ``"shared"``):
            ``"bn_relu"`` or ``"bottleneck"``.
        inplace: ``True`` (default) converts ``model`` itself, keeping every Parameter and
            buffer object. ``False`` converts a deep copy (new tensors), returned as
            ``report.model``.

    Returns:
        A :class:`ConversionReport`: every converted module path with its new class, every
        module left alone with the reason. ``print(report)`` shows it as a table.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is a ``torch.compile``'d module.
        ValueError: an argument has a value outside those listed above.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backend = check_backend_name(backend)
    if dense_memory not in MEMORY_MODES:
        raise ValueError(f"dense_memory must be one of {MEMORY_MODES}, got {dense_memory!r}")
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    if _is_compiled(model):
        raise TypeError("model was compiled with torch.compile (an OptimizedModule): call resfast.convert on the "
                        "model before compiling it, e.g. resfast.convert(model); model = torch.compile(model)")
    root, prefix = model, ""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        if not inplace:
            raise ValueError(f"inplace=False cannot copy a {type(model).__name__}: pass the wrapped module "
                             "(model.module), or convert before wrapping")
        root, prefix = model.module, "module"
    if not inplace:
        root = copy.deepcopy(root)
        model = root
    ctx = _Context(backend, dense_memory, recompute, root)
    _visit(root, prefix, ctx)
    return ConversionReport(converted=ctx.converted, left_alone=ctx.left_alone,
                            options={"backend": backend, "dense_memory": dense_memory, "recompute": recompute},
                            model=model)


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class ConversionEntry:
    """One line of a :class:`ConversionReport`.

    ``path`` is the module's name in ``model.named_modules()`` (``""`` for the model
    itself); ``original`` its class before the call; ``new`` its class after (``None``
    when left alone); ``fused`` the number of BN-ReLU-conv pairs it now runs as one op;
    ``detail`` what was done, or why it was left alone.
    """

    path: str
    original: str
    new: Optional[str]
    fused: int
    detail: str


@dataclass
class ConversionReport:
    """What :func:`convert` did: the converted modules and those left alone, with reasons."""

    converted: List[ConversionEntry]
    left_alone: List[ConversionEntry]
    options: Dict[str, str]
    model: nn.Module = field(repr=False, compare=False)

    @property
    def fused(self) -> int:
        """BN-ReLU-conv pairs that now run as one fused op."""
        return sum(e.fused for e in self.converted)

    def as_dict(self) -> Dict[str, Any]:
        """The report as plain data (JSON-serialisable)."""
        return {
            "options": dict(self.options),
            "fused": self.fused,
            "converted": [{"path": e.path, "original": e.original, "new": e.new, "fused": e.fused,
                           "detail": e.detail} for e in self.converted],
            "left_alone": [{"path": e.path, "module": e.original, "reason": e.detail} for e in self.left_alone],
        }

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        head = (f"resfast.convert: {len(self.converted)} modules converted ({self.fused} BN-ReLU-conv pairs fused), "
                f"{len(self.left_alone)} left alone; {opts}")
        rows = [(e.path or "(model)", _short(e.original), _short(e.new or ""), e.detail) for e in self.converted]
        rows += [(e.path or "(model)", _short(e.original), "left alone", e.detail) for e in self.left_alone]
        if not rows:
            return head + "\n  (nothing recognised)"
        titles = ("path", "was", "now", "detail")
        widths = [max(len(titles[i]), *(len(r[i]) for r in rows)) for i in range(3)]
        fmt = "  {:<%d}  {:<%d}  {:<%d}  {}" % tuple(widths)
        lines = [head, fmt.format(*titles), fmt.format(*("-" * w for w in widths), "-" * 6)]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _short(name: str) -> str:
    # "torchvision.models.resnet.Bottleneck" -> "torchvision.Bottleneck"; user classes by name.
    if not name:
        return name
    mod, _, cls = name.rpartition(".")
    top = mod.split(".")[0]
    if top == "torch":
        return f"nn.{cls}"
    return f"{top}.{cls}" if top in ("torchvision", "timm", "resfast") else cls


# ----------------------------------------------------------------------------- the walk


class _Context:
    def __init__(self, backend: str, dense_memory: str, recompute: str, root: nn.Module) -> None:
        self.backend = backend
        self.dense_memory = dense_memory
        self.recompute = recompute
        # How often each module object is registered in the tree: a module registered at two
        # places is shared by two paths and is left alone.
        self.counts = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        self.visited: set = set()
        self.converted: List[ConversionEntry] = []
        self.left_alone: List[ConversionEntry] = []

    def done(self, path: str, original: type, module: nn.Module, fused: int, detail: str) -> None:
        self.converted.append(ConversionEntry(path, _qualname(original), _qualname(type(module)), fused, detail))

    def leave(self, path: str, module: nn.Module, reason: str) -> None:
        self.left_alone.append(ConversionEntry(path, _qualname(type(module)), None, 0, reason))


def _visit(module: nn.Module, path: str, ctx: _Context) -> None:
    if id(module) in ctx.visited:
        return
    ctx.visited.add(id(module))
    if _is_resfast(module):
        _reconvert(module, path, ctx)
        return
    if _is_compiled(module):
        ctx.leave(path, module, "compiled with torch.compile: convert the model before compiling it")
        return
    if ctx.counts[id(module)] > 1 and len(module._modules) and _has_batchnorm(module):
        ctx.leave(path, module, f"registered at {ctx.counts[id(module)]} places in the model (shared by several "
                                "paths); resfast converts modules that are used at one place")
        return
    handler = _HANDLERS.get((type(module).__module__, type(module).__qualname__))
    declined = None
    if handler is not None:
        declined = handler(module, path, ctx)
        if declined is None:
            return
    elif _looks_like_transition(module):
        declined = _transition(module, path, ctx)
        if declined is None:
            return
    elif _looks_like_dense_block(module):
        declined = _convert_dense_block_traced(module, path, ctx)
        if declined is None:
            return
    for name, child in list(module.named_children()):
        _visit(child, _join(path, name), ctx)
    if not _convert_traced(module, path, ctx) and declined is not None:
        ctx.leave(path, module, declined)


def _reconvert(module: nn.Module, path: str, ctx: _Context) -> None:
    """A module that already runs resfast (converted before, or built by resfast): the same
    module, on the backend this conversion asks for. (It used to be skipped: a second
    ``convert(model, backend="native")`` of a model converted with ``"eager"`` left it on
    eager, with nothing in the report.) A dense block's memory mode is kept, and the report
    says so where it differs from ``dense_memory`` / ``recompute``."""
    changed: Dict[str, int] = {}
    for sub in module.modules():
        ctx.visited.add(id(sub))
        if isinstance(sub, _TracedFusion):
            old = sub.__dict__.get("_resfast_backend")
            if old is not None and old != ctx.backend and sub.__dict__.get("_resfast_plan") is not None:
                _retrace(sub, ctx.backend)
                changed[old] = changed.get(old, 0) + 1
        elif type(sub).__module__.startswith("resfast.") and isinstance(getattr(sub, "backend", None), str):
            old = sub.backend
            if old != ctx.backend:
                sub.backend = ctx.backend
                changed[old] = changed.get(old, 0) + 1
    if changed:
        was = ", ".join(f"{n} on {b!r}" for b, n in sorted(changed.items()))
        ctx.done(path, type(module), module, 0, f"already resfast: backend set to {ctx.backend!r} (was: {was})")
    for name, sub in module.named_modules(prefix=path):
        if isinstance(sub, DenseBlock) and (sub.memory != ctx.dense_memory or (
                sub.memory == "shared" and sub.recompute != ctx.recompute)):
            ctx.leave(name, sub, f"already a resfast DenseBlock with memory={sub.memory!r}, recompute="
                                 f"{sub.recompute!r}: kept (dense_memory / recompute apply to the blocks a conversion "
                                 "creates; set block.memory / block.recompute to change them)")


def _retrace(module: nn.Module, backend: str) -> None:
    """A traced fusion (:class:`_TracedFusion`) traced and fused again, its calls on ``backend``."""
    base = type(module).__mro__[2]
    module.__dict__.pop("_resfast_plan", None)
    module.__class__ = base
    ctx = _Context(backend, "shared", "bn_relu", module)
    graphs, bypassed = {}, set()
    for training in (True, False):
        graphs[training] = _trace(module, training)
        bypassed |= _fuse_graph(graphs[training], module, ctx)[3]
    _make_traced(module, graphs[True], graphs[False], backend, bypassed)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_resfast(module: nn.Module) -> bool:
    # resfast's own blocks and models (create_model) already run the fused ops.
    return isinstance(module, (BasicBlock, Bottleneck, WideBasic, PreActBottleneck, SEModule, DenseLayer, DenseBlock,
                               Transition, BNReLUConv2d, _TracedFusion)) \
        or type(module).__module__.startswith("resfast.models.")


def _is_compiled(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def _swap(module: nn.Module, cls: type, **attrs: Any) -> Optional[str]:
    """Make ``module`` an instance of the resfast class ``cls`` in place: same object, same
    children (so the same Parameters, buffers and ``state_dict`` keys); ``attrs`` are the
    plain attributes the conversion chooses (backend, memory mode, ...).

    What ``cls.__init__`` would have created and the original lacks is added without
    touching the ``state_dict``: parameter-free modules (a ``relu`` that timm calls ``act1``
    or folds into ``BatchNormAct2d``; a second ReLU changes nothing) and plain attributes
    as unregistered attributes, non-persistent buffers as buffers. Returns why not (and
    changes nothing) if ``cls`` would need a parameter or persistent buffer the original
    does not have.
    """
    plan = _completion(module, cls, attrs)
    if isinstance(plan, str):
        return plan
    _apply_completion(module, cls, plan, attrs)
    return None


_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _fresh(module: nn.Module, cls: type, attrs: Dict[str, Any], device: str) -> nn.Module:
    """A new ``cls`` with ``module``'s sizes (on ``device``), to see what its ``__init__`` sets."""
    backend = attrs.get("backend", "auto")
    with torch.device(device):
        if cls is Transition:
            return Transition(module.norm.num_features, module.conv.out_channels, backend=backend)
        if cls is DenseLayer:
            k = module.conv2.out_channels
            return DenseLayer(module.norm1.num_features, k, max(1, module.conv1.out_channels // k), backend=backend)
        if cls is DenseBlock:
            return DenseBlock(1, attrs["num_input_features"], 1, attrs["growth_rate"], memory=attrs["memory"],
                              recompute=attrs["recompute"], backend=backend)
        inplanes = module.conv1.in_channels
        if cls is BasicBlock:
            planes = module.conv2.out_channels
            return BasicBlock(inplanes, planes, downsample=None if inplanes == planes else nn.Identity(),
                              backend=backend)
        planes = max(1, module.conv3.out_channels // cls.expansion)
        down = None if inplanes == planes * cls.expansion else nn.Identity()
        width, groups = module.conv2.out_channels, module.conv2.groups
        if cls is ResNeXtBottleneck:
            return ResNeXtBottleneck(inplanes, planes, downsample=down, cardinality=groups, width=width,
                                     backend=backend)
        return Bottleneck(inplanes, planes, downsample=down, groups=groups, width=width, backend=backend)


def _completion(module: nn.Module, cls: type, attrs: Dict[str, Any]):
    """``(plain attributes, non-persistent buffers)`` to add to ``module`` for ``cls``, or why not."""
    fresh = _fresh(module, cls, attrs, "meta")
    name = cls.__name__
    for key, p in fresh._parameters.items():
        if p is not None and key not in module._parameters:
            return f"resfast.{name} has a parameter {key!r} the original does not have"
    buffers = []
    for key, b in fresh._buffers.items():
        if b is None or key in module._buffers or key in module.__dict__:
            continue
        if key not in fresh._non_persistent_buffers_set:
            return f"resfast.{name} has a buffer {key!r} the original does not have"
        buffers.append(key)
    plain: Dict[str, Any] = {}
    for key, sub in fresh._modules.items():
        if key in module._modules or key in module.__dict__ or (cls is DenseBlock and key.startswith("denselayer")):
            continue
        if sub is not None and (any(True for _ in sub.parameters()) or any(True for _ in sub.buffers())):
            return f"resfast.{name} has a submodule {key!r} with tensors the original does not have"
        plain[key] = sub
    registered = set(module._modules) | set(module._parameters) | set(module._buffers)
    for key, value in fresh.__dict__.items():
        if key not in _MODULE_INTERNALS and key not in module.__dict__ and key not in attrs and key not in registered:
            if isinstance(value, torch.Tensor):
                return f"resfast.{name} has a tensor attribute {key!r} the original does not have"
            plain[key] = value
    values = {}
    if buffers:
        real = _fresh(module, cls, attrs, "cpu")
        ref = next(iter(module.parameters()), None)
        for key in buffers:
            b = real._buffers[key]
            if ref is not None:
                b = b.to(device=ref.device, dtype=ref.dtype if b.is_floating_point() else b.dtype)
            values[key] = b
    return plain, values, _skipped(module, fresh, cls)


def _skipped(module: nn.Module, fresh: nn.Module, cls: type) -> Tuple[Tuple[str, type], ...]:
    """The submodules of ``module`` that the resfast class ``cls`` never calls, with their classes:
    the children ``cls`` does not have (timm's ``act1`` .. ``act3``, ``aa``, ``drop_block``,
    ``drop_path``, a basic block's ``se``; ``None`` ones too) and the children of a norm that
    applies its activation itself (a ``BatchNormAct2d``'s ``act`` and ``drop``). The conversion
    checked that they apply only a ReLU (or nothing); :func:`resfast.nn.unfused.converted_changed`
    compares them at each call, and the original forward runs while one differs."""
    if cls is DenseBlock:
        return ()  # its layers are checked one by one
    out = [(name, type(child)) for name, child in module._modules.items() if name not in fresh._modules]
    # (a module attribute that was None is a plain attribute: timm's se / drop_path when unused)
    out += [(name, type(None)) for name, v in module.__dict__.items()
            if v is None and not name.startswith("_") and name not in fresh._modules and name not in fresh.__dict__]
    for name, child in module._modules.items():
        if child is not None and _norm_with_activation(child):
            out += [(f"{name}.{sub}", type(m)) for sub, m in child._modules.items()]
    return tuple(out)


def _apply_completion(module: nn.Module, cls: type, plan, attrs: Dict[str, Any]) -> None:
    plain, buffers, skipped = plan
    original = type(module)
    module.__dict__.update(plain)  # unregistered: the module tree and state_dict stay as they were
    for key, value in buffers.items():
        module.register_buffer(key, value, persistent=False)
    module.__class__ = cls
    for key, value in attrs.items():
        setattr(module, key, value)
    if skipped:
        # the modules the fused forward skips, and the forward that runs them if one changes later
        module.__dict__["_resfast_skipped"] = skipped
        module.__dict__["_resfast_from"] = original


# ----------------------------------------------------------------------------- what can be fused


def _has_hooks(m: nn.Module) -> bool:
    return any(bool(getattr(m, name, None)) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _norm_with_activation(bn: nn.Module) -> bool:
    """timm's norm modules that apply their activation themselves."""
    cls = type(bn)
    return cls.__module__.startswith("timm.") and cls.__name__ in ("BatchNormAct2d", "SyncBatchNormAct")


def _bn_kind(bn: nn.Module) -> Tuple[Optional[str], str]:
    """``("bn", "")`` for a BatchNorm the fused op reproduces exactly, ``("bn_relu", "")``
    for timm's ``BatchNormAct2d`` with a plain ReLU, else ``(None, why)``."""
    cls = type(bn)
    if cls in (nn.BatchNorm2d, nn.SyncBatchNorm):
        kind = "bn"
    elif _norm_with_activation(bn):
        act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
        if type(act) is not nn.ReLU:
            return None, f"its activation is {type(act).__name__}, not ReLU (the fused op applies ReLU)"
        if type(drop) is not nn.Identity:
            return None, f"it applies {type(drop).__name__} between the norm and the ReLU"
        if _has_hooks(act) or _has_hooks(drop):
            return None, "hooks on its act/drop module"
        kind = "bn_relu"
    elif isinstance(bn, _BatchNorm):
        return None, (f"{cls.__name__} is not nn.BatchNorm2d (its forward is its own; the fused op reproduces "
                      "nn.BatchNorm2d's)")
    else:
        return None, f"{cls.__name__} is not a BatchNorm2d"
    if _has_hooks(bn):
        return None, "it has hooks, which a fused call would not run"
    if getattr(bn, "num_features", None) is None or isinstance(getattr(bn, "weight", None),
                                                               nn.parameter.UninitializedParameter):
        return None, "it is not initialised"
    return kind, ""


def _conv_problem(conv: nn.Module, channels: Optional[int] = None) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (the fused op pads with zeros)"
    if conv_padding(conv) is None:
        return (f"padding={conv.padding!r} with kernel {conv_pair(conv.kernel_size)} pads one side more than the other "
                "(the fused op pads both sides the same)")
    if _has_hooks(conv):
        return "it has hooks, which a fused call would not run"
    if channels is not None and conv.in_channels != channels:
        return f"it takes {conv.in_channels} channels, the BatchNorm has {channels}"
    return None


def _pair_problem(block: nn.Module, bn: str, relu: Optional[str], conv: str, ctx: _Context) -> Optional[str]:
    """Why ``block.<bn> -> block.<relu> -> block.<conv>`` cannot be one fused call (``None``: it can).
    ``relu=None``: the norm applies the ReLU itself (timm's ``BatchNormAct2d``)."""
    norm = getattr(block, bn, None)
    kind, why = _bn_kind(norm)
    if kind is None:
        return f"{bn}: {why}"
    if relu is None and kind != "bn_relu":
        return f"{bn}: expected a BatchNormAct2d with ReLU, got {type(norm).__name__}"
    if relu is not None:
        act = getattr(block, relu, None)
        if kind != "bn":
            return f"{bn}: {type(norm).__name__} already applies an activation before {relu}"
        if type(act) is not nn.ReLU:
            return f"{relu} is {type(act).__name__}, not ReLU (the fused op applies ReLU)"
        if _has_hooks(act):
            return f"{relu}: it has hooks, which a fused call would not run"
    if ctx.counts[id(norm)] > 1:
        return f"{bn} is registered at {ctx.counts[id(norm)]} places (shared by several paths)"
    problem = _conv_problem(getattr(block, conv, None), norm.num_features)
    return f"{conv}: {problem}" if problem else None


def _first_problem(*problems: Optional[str]) -> Optional[str]:
    return next((p for p in problems if p), None)


def _identity_problem(block: nn.Module, *names: str) -> Optional[str]:
    for name in names:
        m = getattr(block, name, None)
        if m is not None and (type(m) is not nn.Identity or _has_hooks(m)):
            return f"{name} is {type(m).__name__} (only an identity there can be fused across)"
    return None


def _relu_problem(block: nn.Module, name: str) -> Optional[str]:
    m = getattr(block, name, None)
    if type(m) is not nn.ReLU:
        return f"{name} is {type(m).__name__}, not ReLU"
    return "hooks on " + name if _has_hooks(m) else None


# ----------------------------------------------------------------------------- known classes


def _tv_basic(m: nn.Module, path: str, ctx: _Context) -> Optional[str]:
    problem = _first_problem(_pair_problem(m, "bn1", "relu", "conv2", ctx))
    if problem:
        return problem
    original = type(m)
    problem = _swap(m, BasicBlock, backend=ctx.backend, inplanes=m.conv1.in_channels)
    if problem:
        return problem
    ctx.done(path, original, m, 1, "bn1-relu-conv2 fused")
    return None


def _tv_bottleneck(m: nn.Module, path: str, ctx: _Context) -> Optional[str]:
    problem = _first_problem(_pair_problem(m, "bn1", "relu", "conv2", ctx), _pair_problem(m, "bn2", "relu", "conv3", ctx))
    if problem:
        return problem
    return _swap_bottleneck(m, path, ctx, se=None)


def _swap_bottleneck(m: nn.Module, path: str, ctx: _Context, **attrs: Any) -> Optional[str]:
    original = type(m)
    groups = m.conv2.groups
    if groups > 1:
        problem = _swap(m, ResNeXtBottleneck, backend=ctx.backend, inplanes=m.conv1.in_channels, cardinality=groups,
                        **attrs)
    else:
        problem = _swap(m, Bottleneck, backend=ctx.backend, inplanes=m.conv1.in_channels, **attrs)
    if problem:
        return problem
    ctx.done(path, original, m, 2, "bn1-relu-conv2 and bn2-relu-conv3 fused")
    return None


def _timm_basic(m: nn.Module, path: str, ctx: _Context) -> Optional[str]:
    problem = _first_problem(
        None if m.se is None else "it has an attention module (se), which resfast.BasicBlock does not run",
        None if m.drop_path is None else "it has drop_path (stochastic depth)",
        _identity_problem(m, "drop_block", "aa"), _relu_problem(m, "act2"),
        _pair_problem(m, "bn1", "act1", "conv2", ctx))
    if problem:
        return problem
    original = type(m)
    problem = _swap(m, BasicBlock, backend=ctx.backend, inplanes=m.conv1.in_channels)
    if problem:
        return problem
    ctx.done(path, original, m, 1, "bn1-act1-conv2 fused")
    return None


def _timm_bottleneck(m: nn.Module, path: str, ctx: _Context) -> Optional[str]:
    problem = _first_problem(
        None if m.drop_path is None else "it has drop_path (stochastic depth)",
        _identity_problem(m, "drop_block", "aa"), _relu_problem(m, "act3"),
        _pair_problem(m, "bn1", "act1", "conv2", ctx), _pair_problem(m, "bn2", "act2", "conv3", ctx))
    if problem:
        return problem
    # timm's attention module (SE, ...) sits where resfast.Bottleneck runs `se`: after bn3.
    return _swap_bottleneck(m, path, ctx)


def _dense_layer_problem(layer: nn.Module, ctx: _Context) -> Optional[str]:
    relus = ("relu1", "relu2") if _is_torchvision(layer) or hasattr(layer, "relu1") else (None, None)
    return _first_problem(_pair_problem(layer, "norm1", relus[0], "conv1", ctx),
                          _pair_problem(layer, "norm2", relus[1], "conv2", ctx))


def _is_torchvision(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torchvision.")


def _checkpointed(layer: nn.Module) -> bool:
    return bool(getattr(layer, "memory_efficient", False) or getattr(layer, "grad_checkpointing", False))


def _layer_memory(layer: nn.Module, ctx: _Context) -> str:
    if ctx.dense_memory == "shared":
        return "checkpoint" if _checkpointed(layer) else "naive"
    return ctx.dense_memory


def _dense_layer(m: nn.Module, path: str, ctx: _Context) -> Optional[str]:
    problem = _dense_layer_problem(m, ctx)
    if problem:
        return problem
    original = type(m)
    note = _checkpoint_note([m])
    problem = _swap(m, DenseLayer, memory=_layer_memory(m, ctx), backend=ctx.backend, drop_rate=float(m.drop_rate))
    if problem:
        return problem
    ctx.done(path, original, m, 2, f"norm1-relu-conv1 and norm2-relu-conv2 fused, memory={m.memory!r}{note}")
    return None


def _checkpoint_note(layers: Sequence[nn.Module]) -> str:
    if any(_checkpointed(layer) for layer in layers):
        return ("; the original's checkpoint updated norm1's running statistics twice per step, the converted "
                "layers once")
    return ""


def _dense_block(m: nn.Module, path: str, ctx: _Context) -> Optional[str]:
    layers = list(m.values())
    layer_cls = {("torchvision.models.densenet", "_DenseBlock"): "_DenseLayer",
                 ("timm.models.densenet", "DenseBlock"): "DenseLayer"}[(type(m).__module__, type(m).__qualname__)]
    for name, layer in m.items():
        if type(layer).__qualname__ != layer_cls or type(layer).__module__ != type(m).__module__:
            return f"{name} is {type(layer).__name__}, not the library's {layer_cls}"
        problem = _dense_layer_problem(layer, ctx) or ("hooks on " + name if _has_hooks(layer) else None)
        if problem:
            return f"{name}.{problem}"
    return _swap_dense_block(m, path, ctx, [float(layer.drop_rate) for layer in layers])


def _swap_dense_block(m: nn.Module, path: str, ctx: _Context, drop_rates: Sequence[float]) -> Optional[str]:
    """Make ``m`` (whose children are its dense layers, in order) a :class:`resfast.DenseBlock`."""
    layers = list(m.children())
    if not layers:
        return "no layers"
    c0 = layers[0].norm1.num_features
    k = layers[0].conv2.out_channels
    for i, layer in enumerate(layers):
        if layer.norm1.num_features != c0 + i * k or layer.conv2.out_channels != k:
            return (f"layer {i + 1} takes {layer.norm1.num_features} channels and adds {layer.conv2.out_channels}; "
                    f"a dense block's layer {i + 1} takes {c0 + i * k} and all add the same growth rate {k}")
        if layer.norm2.num_features != layer.conv1.out_channels or layer.conv2.in_channels != layer.conv1.out_channels:
            return f"layer {i + 1}: conv1 gives {layer.conv1.out_channels} channels, norm2/conv2 take another count"
    memory, note = ctx.dense_memory, ""
    if memory == "shared":
        why = _first_problem(*(_shared_problem(layer, i) for i, layer in enumerate(layers)))
        if why:
            memory, note = "naive", f"; memory='naive' because {why}"
    note = _checkpoint_note(layers) + note
    original = type(m)
    # Everything is checked before anything is swapped: a block is converted whole or not at all.
    swaps = [(layer, DenseLayer, dict(memory="checkpoint" if memory == "checkpoint" else "naive", backend=ctx.backend,
                                      drop_rate=float(p))) for layer, p in zip(layers, drop_rates)]
    swaps.append((m, DenseBlock, dict(memory=memory, recompute=ctx.recompute, backend=ctx.backend,
                                      num_input_features=c0, growth_rate=k)))
    plans = [_completion(mod, cls, attrs) for mod, cls, attrs in swaps]
    problem = next((p for p in plans if isinstance(p, str)), None)
    if problem:
        return problem
    for (mod, cls, attrs), plan in zip(swaps, plans):
        _apply_completion(mod, cls, plan, attrs)
    ctx.done(path, original, m, 2 * len(layers),
             f"{len(layers)} layers, {2 * len(layers)} BN-ReLU-conv fused, memory={memory!r}" + note)
    return None


def _shared_problem(layer: nn.Module, i: int) -> Optional[str]:
    # The shared-buffer block reads conv1 as a 1x1 over the channel prefix and writes conv2's
    # output into its slice of the buffer: both must keep the spatial size.
    c1, c2 = layer.conv1, layer.conv2
    if conv_pair(c1.kernel_size) != (1, 1) or conv_pair(c1.stride) != (1, 1) or conv_padding(c1) != (0, 0) \
            or conv_pair(c1.dilation) != (1, 1) or c1.groups != 1 or c1.bias is not None:
        return f"layer {i + 1}'s conv1 is not a bias-free, ungrouped, stride-1 1x1 conv"
    same = conv_padding(c2) is not None and all(
        (k - 1) * d == 2 * p for k, d, p in zip(conv_pair(c2.kernel_size), conv_pair(c2.dilation), conv_padding(c2)))
    if not same or conv_pair(c2.stride) != (1, 1) or c2.groups != 1 or c2.bias is not None:
        return f"layer {i + 1}'s conv2 is not a bias-free, ungrouped, stride-1 conv that keeps the size"
    return None


def _looks_like_transition(m: nn.Module) -> bool:
    """An ``nn.Sequential`` (of any class that keeps its forward) laid out as torchvision's
    ``_Transition``: ``norm, relu, conv, pool``."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward \
        and list(m._modules) == ["norm", "relu", "conv", "pool"] and not _has_hooks(m)


def _transition(m: nn.Module, path: str, ctx: _Context) -> Optional[str]:
    names = list(m._modules)
    if _is_torchvision(m) or not type(m).__module__.startswith("timm."):
        expected, problem = ["norm", "relu", "conv", "pool"], _pair_problem(m, "norm", "relu", "conv", ctx)
    else:
        expected, problem = ["norm", "conv", "pool"], _pair_problem(m, "norm", None, "conv", ctx)
    if names != expected:
        return f"its children are {names}, expected {expected}"
    if problem:
        return problem
    original = type(m)
    problem = _swap(m, Transition, backend=ctx.backend)
    if problem:
        return problem
    ctx.done(path, original, m, 1, "norm-relu-conv fused")
    return None


_HANDLERS: Dict[Tuple[str, str], Callable[[nn.Module, str, _Context], Optional[str]]] = {
    ("torchvision.models.resnet", "BasicBlock"): _tv_basic,
    ("torchvision.models.resnet", "Bottleneck"): _tv_bottleneck,
    ("torchvision.models.densenet", "_DenseLayer"): _dense_layer,
    ("torchvision.models.densenet", "_DenseBlock"): _dense_block,
    ("torchvision.models.densenet", "_Transition"): _transition,
    ("timm.models.resnet", "BasicBlock"): _timm_basic,
    ("timm.models.resnet", "Bottleneck"): _timm_bottleneck,
    ("timm.models.densenet", "DenseLayer"): _dense_layer,
    ("timm.models.densenet", "DenseBlock"): _dense_block,
    ("timm.models.densenet", "DenseTransition"): _transition,
}


# ----------------------------------------------------------------------------- tracing


class _Untraceable(Exception):
    pass


class _Tracer(fx.Tracer):
    """Traces a module's own forward: submodules at ``leaf_depth`` (1: the children) and
    below are called, not traced into."""

    def __init__(self, leaf_depth: int) -> None:
        super().__init__()
        self._leaf_depth = leaf_depth

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname.count(".") + 1 >= self._leaf_depth


def _concrete_defaults(module: nn.Module) -> Dict[str, Any]:
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    concrete = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise _Untraceable("its forward takes *args or **kwargs")
        if p.kind is p.KEYWORD_ONLY:
            raise _Untraceable("its forward takes keyword-only arguments")
        if p.default is not p.empty:
            concrete[p.name] = p.default
    return concrete


def _trace(module: nn.Module, training: bool, leaf_depth: int = 1) -> fx.Graph:
    """The graph of ``module.forward`` in training or eval mode (modes restored after).

    Arguments with a default are traced at their default; :class:`_TracedFusion` runs the
    original forward when a call passes another value.
    """
    concrete = _concrete_defaults(module)
    modes = [(m, m.training) for m in module.modules()]
    before = set(module.__dict__)
    try:
        for m, _ in modes:
            m.training = training
        graph = _Tracer(leaf_depth).trace(module, concrete_args=concrete or None)
    except _Untraceable:
        raise
    except Exception as exc:  # noqa: BLE001 (any failure of tracing means: not converted)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _Untraceable(f"its forward cannot be traced by torch.fx ({type(exc).__name__}: {msg[:160]})") from None
    finally:
        for m, mode in modes:
            m.training = mode
        added = set(module.__dict__) - before
        for k in added:  # tensor constants torch.fx attaches to the root while tracing
            del module.__dict__[k]
    if added:
        raise _Untraceable("its forward uses tensor constants that are not parameters or buffers")
    return graph


def _module_map(module: nn.Module) -> Dict[str, nn.Module]:
    return dict(module.named_modules(remove_duplicate=False))


def _call_target(node: fx.Node, mods: Dict[str, nn.Module]) -> Optional[nn.Module]:
    return mods.get(node.target) if node.op == "call_module" else None


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}


def _is_relu(node: fx.Node, mods: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = mods.get(node.target)
        return type(m) is nn.ReLU and not _has_hooks(m) and len(node.args) == 1 and not node.kwargs
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        extra = dict(node.kwargs)
        return len(node.args) == 1 and set(extra) <= {"inplace"} or (len(node.args) == 2 and not extra
                                                                       and isinstance(node.args[1], bool))
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return len(node.args) == 1 and not node.kwargs
    return False


def _describe(node: fx.Node, mods: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(mods.get(node.target)).__name__} {node.target!r}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


def _conv_reader(node: fx.Node, src: fx.Node, mods: Dict[str, nn.Module], channels: int
                 ) -> Tuple[Optional[str], Optional[str]]:
    """``(conv_target, None)`` when ``node`` only applies a fusable conv to ``src`` (a
    ``Conv2d``, or an ``nn.Sequential`` whose first module is one), else ``(None, why)``."""
    m = _call_target(node, mods)
    if m is None or node.args != (src,) or node.kwargs:
        return None, f"{_describe(node, mods)} is not a Conv2d"
    if type(m) is nn.Sequential and len(m) and type(m[0]) is nn.Conv2d:
        if _has_hooks(m):
            return None, f"{node.target}: it has hooks"
        target = f"{node.target}.{next(iter(m._modules))}"
        conv = m[0]
    elif isinstance(m, nn.Conv2d):
        target, conv = node.target, m
    else:
        return None, f"{_describe(node, mods)} is not a Conv2d"
    problem = _conv_problem(conv, channels)
    return (None, f"{target}: {problem}") if problem else (target, None)


@dataclass
class _Fusion:
    bn: fx.Node
    act: fx.Node
    readers: List[Tuple[fx.Node, str]]  # (node, conv target)


_ACTIVATION_FUNCTIONS = {F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.leaky_relu, F.relu6, F.hardswish,
                         F.hardtanh, F.softplus, torch.sigmoid, torch.tanh, F.prelu}


def _activation(node: fx.Node, mods: Dict[str, nn.Module]) -> Optional[str]:
    """The name of a non-ReLU activation applied by ``node``, else ``None``."""
    m = _call_target(node, mods)
    if m is not None:
        mod = type(m).__module__
        return type(m).__name__ if mod == "torch.nn.modules.activation" or "activation" in mod else None
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        return node.target.__name__
    if node.op == "call_method" and node.target in ("sigmoid", "tanh", "sigmoid_", "tanh_"):
        return node.target
    return None


def _find_fusions(graph: fx.Graph, mods: Dict[str, nn.Module], ctx: _Context
                  ) -> Tuple[List[_Fusion], List[Tuple[str, nn.Module, str]]]:
    """Every ``BatchNorm2d -> ReLU -> Conv2d`` of ``graph`` that can be one fused call, and
    ``(bn target, bn, reason)`` for each near miss (a BN -> activation -> conv that cannot)."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    fusions, misses = [], []
    for node in graph.nodes:
        bn = _call_target(node, mods)
        if bn is None or not (isinstance(bn, _BatchNorm) or "BatchNorm" in type(bn).__name__):
            continue
        kind, why = _bn_kind(bn)
        act = node if kind == "bn_relu" else None
        if act is None:
            users = list(node.users)
            if len(users) != 1:
                continue
            if kind is None and why and _norm_with_activation(bn) and (
                    isinstance(_call_target(users[0], mods), nn.Conv2d) or _conv_reader(users[0], node, mods, None)[0]):
                # a norm that applies its own activation (timm's BatchNormAct2d) straight into a conv
                misses.append((node.target, bn, f"-> Conv2d: {why}"))
                continue
            if _is_relu(users[0], mods):
                act = users[0]
            else:
                name = _activation(users[0], mods)
                if name and any(isinstance(_call_target(u, mods), nn.Conv2d) or _conv_reader(u, users[0], mods, None)[0]
                                for u in users[0].users):
                    misses.append((node.target, bn, f"-> {name} -> Conv2d: the activation is {name}; the fused op "
                                                    "applies ReLU"))
                continue
        channels = getattr(bn, "num_features", None)
        readers, others = [], []
        for user in act.users:
            target, _ = _conv_reader(user, act, mods, channels)
            (readers.append((user, target)) if target else others.append(user))
        if not readers:
            # a conv reads the activation but cannot take the fused call: say why (a near miss)
            problems = [_conv_reader(u, act, mods, channels)[1] for u in act.users
                        if isinstance(_call_target(u, mods), (nn.Conv2d, nn.Sequential))]
            problems = [p for p in problems if p and "is not a Conv2d" not in p]
            if problems and kind is not None:
                misses.append((node.target, bn, problems[0]))
            continue
        if kind is None:
            misses.append((node.target, bn, why))
            continue
        reason = None
        if others:
            reason = ("its ReLU output is also read by " + ", ".join(_describe(u, mods) for u in others)
                      + ", which is not a Conv2d")
        elif calls[node.target] > 1:
            reason = f"it is called {calls[node.target]} times in the forward (shared by several paths)"
        elif ctx.counts[id(bn)] > 1:
            reason = f"it is registered at {ctx.counts[id(bn)]} places in the model (shared by several paths)"
        elif len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            reason = "it is called with more than one argument"
        if reason is None:
            for user in act.users:
                _, problem = _conv_reader(user, act, mods, channels)
                reason = reason or problem
        if reason:
            misses.append((node.target, bn, reason))
            continue
        fusions.append(_Fusion(node, act, readers))
    return fusions, misses


def _apply_fusions(graph: fx.Graph, fusions: Sequence[_Fusion], mods: Dict[str, nn.Module], backend: str) -> None:
    """Rewrite each fusion as ``bn_relu_conv(bn, conv, x)`` calls at the BatchNorm's place.

    The first reader updates the running statistics; a second reader of the same BN output
    (a pre-activation shortcut) normalises with the same statistics and updates nothing.
    """
    for f in fusions:
        x = f.bn.args[0]
        with graph.inserting_before(f.bn):
            bn_attr = graph.get_attr(f.bn.target)
            for i, (reader, conv_target) in enumerate(f.readers):
                out = graph.call_function(bn_relu_conv, (bn_attr, graph.get_attr(conv_target), x),
                                          {"backend": backend, "update": i == 0})
                if conv_target != reader.target:  # an nn.Sequential starting with the conv: run the rest
                    for name in list(mods[reader.target]._modules)[1:]:
                        out = graph.call_module(f"{reader.target}.{name}", (out,))
                reader.replace_all_uses_with(out)
                graph.erase_node(reader)
        if f.act is not f.bn:
            graph.erase_node(f.act)
        graph.erase_node(f.bn)
    graph.lint()


def _dense_transition_pairs(graph: fx.Graph, mods: Dict[str, nn.Module]) -> int:
    """Rewrite ``transition(block(x))`` of a shared-memory :class:`resfast.DenseBlock` and a
    :class:`resfast.Transition` as ``block.forward_with_transition(x, transition)`` (the
    transition reads the block's buffer directly). Returns how many were rewritten."""
    n = 0
    for node in list(graph.nodes):
        block = _call_target(node, mods)
        if not isinstance(block, DenseBlock) or block.memory != "shared" or _has_hooks(block) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        trans = _call_target(user, mods)
        if not isinstance(trans, Transition) or _has_hooks(trans) or user.args != (node,) or user.kwargs:
            continue
        conv = trans.conv
        if trans.norm.num_features != block.num_output_features or type(conv) is not nn.Conv2d \
                or conv_pair(conv.kernel_size) != (1, 1) or conv_pair(conv.stride) != (1, 1) or conv.bias is not None \
                or conv_padding(conv) != (0, 0) or conv_pair(conv.dilation) != (1, 1) or conv.groups != 1:
            continue
        with graph.inserting_before(node):
            out = graph.call_function(_block_then_transition,
                                      (graph.get_attr(node.target), graph.get_attr(user.target), node.args[0]))
        user.replace_all_uses_with(out)
        graph.erase_node(user)
        graph.erase_node(node)
        n += 1
    graph.lint()
    return n


def _fuse_graph(graph: fx.Graph, module: nn.Module, ctx: _Context
                ) -> Tuple[List[_Fusion], List[Tuple[str, nn.Module, str]], int, set]:
    """Rewrite ``graph`` (of ``module``'s forward) with every fusion it allows; returns the
    fusions, the near misses, the dense block + transition pairs joined, and the
    submodules no longer called (their hooks would not run)."""
    mods = _module_map(module)
    before = {n.target for n in graph.nodes if n.op == "call_module"}
    fusions, misses = _find_fusions(graph, mods, ctx)
    _apply_fusions(graph, fusions, mods, ctx.backend)
    pairs = _dense_transition_pairs(graph, mods)
    after = {n.target for n in graph.nodes if n.op == "call_module"}
    read = {n.target for n in graph.nodes if n.op == "get_attr" and isinstance(mods.get(n.target), nn.Module)}
    return fusions, misses, pairs, (before - after) | read


def _block_then_transition(block: DenseBlock, transition: Transition, x: torch.Tensor) -> torch.Tensor:
    return block.forward_with_transition(x, transition)


def _direct_batchnorms(module: nn.Module) -> List[nn.Module]:
    """BatchNorms ``module``'s own forward may call: children, and those held in
    ``ModuleList`` / ``ModuleDict`` children (containers without a forward of their own)."""
    found, stack = [], list(module.children())
    while stack:
        m = stack.pop()
        if isinstance(m, _BatchNorm) or "BatchNorm" in type(m).__name__:
            found.append(m)
        elif type(m).forward is nn.Module.forward:
            stack.extend(m.children())
    return found


def _convert_traced(module: nn.Module, path: str, ctx: _Context) -> bool:
    """Fuse the BN-ReLU-conv sequences of ``module``'s own forward (traced). True if any."""
    if type(module).forward is nn.Module.forward or isinstance(module, _TracedFusion):
        return False
    has_bn = bool(_direct_batchnorms(module))
    if isinstance(module, fx.GraphModule):
        # Its class is generated per instance and its forward regenerated from its graph (on
        # train() / eval() for torchvision's feature extractors, on copies): a converted
        # subclass would recurse forever there. Its submodules are converted as usual.
        if has_bn:
            ctx.leave(path, module, "an fx.GraphModule (torch.fx.symbolic_trace, torchvision's "
                                    "create_feature_extractor): its generated forward is left as it is, unfused")
        return False
    if has_bn and callable(getattr(module, "fuse_model", None)):
        # torchvision's quantizable blocks (torchvision.models.quantization): QuantizableResNet.
        # fuse_model() finds them by exact class (type(m) is QuantizableBasicBlock), which a
        # converted subclass fails, so eager-mode quantization silently skipped the conv-BN(-ReLU)
        # folding and quantized another model (its output 0.43 off the unconverted one's).
        ctx.leave(path, module, "it has a fuse_model() method (a quantizable model, e.g. torchvision.models."
                                "quantization): eager-mode quantization fuses and swaps its modules and finds them "
                                "by exact class, which a converted class would fail; left unfused")
        return False
    has_block = isinstance(module, nn.Sequential) and any(isinstance(c, DenseBlock) for c in module.children())
    if not (has_bn or has_block):
        return False
    plans, fused, pairs, misses, bypassed = {}, 0, 0, [], set()
    try:
        for training in (True, False):
            graph = _trace(module, training)
            fusions, found_misses, n_pairs, skipped = _fuse_graph(graph, module, ctx)
            if training:
                fused, pairs = sum(len(f.readers) for f in fusions), n_pairs
                misses = found_misses
            plans[training] = graph if (fusions or n_pairs) else None
            bypassed |= skipped
    except _Untraceable as exc:
        if has_bn:
            ctx.leave(path, module, str(exc))
        return False
    for target, bn, reason in misses:
        ctx.leave(_join(path, target), bn, reason)
    if plans[True] is None and plans[False] is None:
        return False
    original = type(module)
    _make_traced(module, plans[True], plans[False], ctx.backend, bypassed)
    detail = []
    if fused:
        detail.append(f"{fused} BN-ReLU-conv fused in its traced forward")
    if pairs:
        detail.append(f"{pairs} dense block + transition pairs joined (the transition reads the block's buffer)")
    ctx.done(path, original, module, fused, "; ".join(detail) or "fused in eval mode only")
    return True


# ----------------------------------------------------------------------------- traced modules


class _TracedFusion:
    """Mixin of a converted module whose forward is its own, traced and rewritten with
    fused BN-ReLU-conv calls (one graph per training mode). The module keeps its class
    (this is a subclass of it), children and attributes."""

    __prepare_scriptable__ = refuse_script  # torch.jit.script: a clear refusal

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        plan = self.__dict__.get("_resfast_plan")
        if plan is None or _fx_tracing() or _bypassed_hooks(self, plan.bypassed):
            # No plan: e.g. a slice of a converted nn.Sequential, built by its own __init__.
            # FX tracing (feature extractors) and hooks on a module the fused calls bypass
            # need the original forward, which calls every submodule.
            return super().forward(*args, **kwargs)
        if not torch.compiler.is_compiling() and _fingerprint(self) != plan.fingerprint:
            # An attribute or submodule the trace froze has changed: the traced graph no longer
            # computes this forward; the original one does (unfused).
            _warn_stale(self, plan)
            return super().forward(*args, **kwargs)
        fn, params = plan.fns[self.training], plan.params
        if not kwargs and len(args) == plan.required:
            return fn(self, *args)
        bound = plan.signature.bind(self, *args, **kwargs)
        for name, default in plan.defaults.items():
            if name in bound.arguments and not _same(bound.arguments[name], default):
                return super().forward(*args, **kwargs)  # traced at the default only
        return fn(self, *(bound.arguments[p] for p in params))

    def __reduce_ex__(self, protocol: int):
        state = {k: v for k, v in self.__dict__.items() if k != "_resfast_plan"}
        return _new_traced, (type(self).__mro__[2],), state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        nn.Module.__setstate__(self, state)
        if state.get("_resfast_fused"):
            # Rebuilt by tracing again: the plan holds generated code, which is not pickled.
            self.__class__ = type(self).__mro__[2]
            ctx = _Context(self._resfast_backend, "shared", "bn_relu", self)
            graphs, bypassed = {}, set()
            for training in (True, False):
                graphs[training] = _trace(self, training)
                bypassed |= _fuse_graph(graphs[training], self, ctx)[3]
            _make_traced(self, graphs[True], graphs[False], self._resfast_backend, bypassed)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and not isinstance(a, torch.Tensor) and bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _fx_tracing() -> bool:
    st = torch.fx._symbolic_trace
    check = getattr(st, "is_fx_symbolic_tracing", None)
    if check is not None:
        return check()
    return st.is_fx_tracing() and not torch.compiler.is_compiling()


def _bypassed_hooks(module: nn.Module, names: Sequence[str]) -> bool:
    """Whether hooks would be bypassed by the fused calls: on the modules ``names`` (or a forward
    set on one of them, :func:`resfast.nn.unfused.overridden`), or a global module hook that may
    change outputs (any but PyTorch's own observing tools', as the blocks decide:
    :func:`resfast.nn.unfused.global_hooks`)."""
    if global_hooks():
        return True
    return any(_has_hooks(m) or overridden(m) for m in map(module.get_submodule, names))


@dataclass
class _Plan:
    fns: Dict[bool, Callable[..., Any]]
    signature: inspect.Signature
    params: List[str]
    defaults: Dict[str, Any]
    required: int
    bypassed: List[str]  # submodules the fused calls replace (their hooks would not run)
    fingerprint: Tuple[Any, ...] = ()  # what the trace froze (:func:`_fingerprint`)
    warned: bool = False


_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def _frozen_value(v: Any) -> Any:
    """A comparable stand-in for an attribute value the trace may have frozen: plain values
    (and tuples / lists of them) by value, anything else by identity."""
    if isinstance(v, _PLAIN):
        return (type(v), repr(v))  # repr: exact for floats, and NaN equals itself
    if isinstance(v, (tuple, list)) and all(isinstance(i, _PLAIN) for i in v):
        return (type(v), tuple((type(i), repr(i)) for i in v))
    return ("id", id(v))


#: attributes no traced forward reads: resfast's own, and the state that FSDP (``fully_shard``,
#: ``FullyShardedDataParallel``) and the other composable APIs keep on the module they wrap (counted
#: as changes, they made every FSDP-wrapped converted module run unfused, trial 21)
_NOT_FROZEN = ("_resfast", "__composable_api_state_key", "_fsdp_", "_is_fsdp_")


def _fingerprint(module: nn.Module) -> Tuple[Any, ...]:
    """What ``torch.fx`` froze into the traced forward of ``module``: the values of its own
    plain attributes (a scale, a flag read by an ``if``) and the identity of its children
    (and of the modules held in its containers, which the trace unrolled; a fused ReLU module
    is gone from the graph). Taken at conversion and compared at each call."""
    attrs = tuple((k, _frozen_value(v)) for k, v in module.__dict__.items()
                  if k not in _MODULE_INTERNALS and k != "training" and not k.startswith(_NOT_FROZEN))
    mods: List[Tuple[str, int, type]] = []
    stack = [("", module)]
    while stack:
        prefix, m = stack.pop()
        for name, child in m._modules.items():
            # (the class too: a replaced module's id() may be reused by its replacement)
            mods.append((prefix + name, id(child), type(child)))
            if child is not None and (type(child).forward is nn.Module.forward  # a container: unrolled
                                      or _norm_with_activation(child)):  # its act / drop: fused away
                stack.append((prefix + name + ".", child))
    return attrs, tuple(mods)


def _warn_stale(module: nn.Module, plan: "_Plan") -> None:
    if plan.warned:
        return
    plan.warned = True
    old_attrs, old_mods = plan.fingerprint
    new_attrs, new_mods = _fingerprint(module)
    changed = sorted({k for k, v in set(old_attrs) ^ set(new_attrs)} | {k for k, *_ in set(old_mods) ^ set(new_mods)})
    warnings.warn(
        f"{type(module).__qualname__}: {', '.join(changed) or 'its attributes'} changed since resfast.convert traced "
        "its forward; the traced (fused) forward would compute the old one, so the original forward runs (unfused) "
        "while they differ", UserWarning, stacklevel=3)


_TRACED_CLASSES: Dict[type, type] = {}


def _traced_class(base: type) -> type:
    cls = _TRACED_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (_TracedFusion, base), {"__module__": base.__module__,
                                                          "__qualname__": base.__qualname__ + "[resfast]"})
        _TRACED_CLASSES[base] = cls
    return cls


def _new_traced(base: type) -> nn.Module:
    return _traced_class(base).__new__(_traced_class(base))


def _make_traced(module: nn.Module, train_graph: Optional[fx.Graph], eval_graph: Optional[fx.Graph],
                 backend: str, bypassed: set) -> None:
    base = type(module)
    signature = inspect.signature(base.forward)
    defaults = _concrete_defaults(module)
    params = [p for p in list(signature.parameters)[1:] if p not in defaults]
    fns = {}
    for training, graph in ((True, train_graph), (False, eval_graph)):
        if graph is None:
            graph = _trace(module, training)
        gm = fx.GraphModule(module, graph)
        fns[training] = type(gm).forward
    # the act / drop inside a fused BatchNormAct2d are bypassed too (hooks on them must run)
    bypassed = set(bypassed) | {f"{n}.{c}" for n in bypassed if _norm_with_activation(module.get_submodule(n))
                                for c in module.get_submodule(n)._modules}
    module.__class__ = _traced_class(base)
    module.__dict__["_resfast_plan"] = _Plan(fns, signature, params, defaults, len(params), sorted(bypassed),
                                             _fingerprint(module))
    module._resfast_backend = backend
    module._resfast_fused = True


# ----------------------------------------------------------------------------- dense blocks of one's own


_DENSE_LAYER_CHILDREN = ("norm1", "conv1", "norm2", "conv2")


def _looks_like_dense_block(module: nn.Module) -> bool:
    children = list(module.children())
    return (type(module).forward is not nn.Module.forward and len(children) > 0
            and all(all(isinstance(getattr(c, n, None), nn.Module) for n in _DENSE_LAYER_CHILDREN)
                    for c in children))


def _convert_dense_block_traced(block: nn.Module, path: str, ctx: _Context) -> Optional[str]:
    """A block of one's own whose forward is a dense block's (traced through its layers)."""
    names = list(block._modules)
    for name, layer in block.named_children():
        if _has_hooks(layer):
            return f"{name} has hooks, which the converted block would not run"
    drop_rates = None
    try:
        for training in (True, False):
            graph = _trace(block, training, leaf_depth=2)
            rates = _match_dense_graph(graph, _module_map(block), names, training, ctx)
            if training:
                drop_rates = rates
    except _Untraceable as exc:
        return str(exc)
    except _NoMatch as exc:
        return f"not a dense block: {exc}"
    return _swap_dense_block(block, path, ctx, drop_rates)


class _NoMatch(Exception):
    pass


def _match_dense_graph(graph: fx.Graph, mods: Dict[str, nn.Module], names: Sequence[str], training: bool,
                       ctx: _Context) -> List[float]:
    """Check that ``graph`` is ``cat([x, l1, l2, ...])`` where layer ``i`` computes
    ``conv2(relu(norm2(conv1(relu(norm1(cat([x, l1, ..., l_{i-1}])))))))`` (then dropout);
    return each layer's dropout probability. Raises :class:`_NoMatch` with the first
    difference."""
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise _NoMatch(f"its forward takes {len(placeholders)} inputs, a dense block takes one")
    x = placeholders[0]
    features, used, drops = [x], {x}, []

    def only_call(target: str) -> fx.Node:
        found = [n for n in nodes if n.op == "call_module" and n.target == target]
        if len(found) != 1:
            raise _NoMatch(f"{target} is called {len(found)} times")
        return found[0]

    def single_user(node: fx.Node) -> fx.Node:
        if len(node.users) != 1:
            raise _NoMatch(f"{node.name} is read {len(node.users)} times")
        return next(iter(node.users))

    def is_cat_of(node: fx.Node, feats: List[fx.Node]) -> bool:
        if node.op != "call_function" or node.target is not torch.cat:
            return False
        args = list(node.args) + [node.kwargs[k] for k in ("dim",) if k in node.kwargs]
        return len(args) == 2 and list(args[0]) == feats and args[1] in (1, -3)

    def fused_pair(layer: str, bn: str, conv: str, src: fx.Node) -> fx.Node:
        n_bn = only_call(f"{layer}.{bn}")
        if n_bn.args != (src,) or n_bn.kwargs:
            raise _NoMatch(f"{layer}.{bn} does not read the expected input")
        kind, why = _bn_kind(mods[n_bn.target])
        if kind is None:
            raise _NoMatch(f"{layer}.{bn}: {why}")
        if ctx.counts[id(mods[n_bn.target])] > 1:
            raise _NoMatch(f"{layer}.{bn} is registered at several places")
        act = n_bn
        if kind == "bn":
            act = single_user(n_bn)
            if not _is_relu(act, mods):
                name = _activation(act, mods) or _describe(act, mods)
                raise _NoMatch(f"{layer}.{bn} is followed by {name}, not ReLU")
        n_conv = single_user(act)
        if n_conv.op != "call_module" or n_conv.target != f"{layer}.{conv}" or n_conv.args != (act,):
            raise _NoMatch(f"{layer}.{bn}'s ReLU output goes to {_describe(n_conv, mods)}, not {layer}.{conv}")
        problem = _conv_problem(mods[n_conv.target], mods[n_bn.target].num_features)
        if problem:
            raise _NoMatch(f"{layer}.{conv}: {problem}")
        used.update({n_bn, act, n_conv})
        return n_conv

    for name in names:
        n_norm1 = only_call(f"{name}.norm1")
        src = n_norm1.args[0] if n_norm1.args else None
        if not (len(features) == 1 and src is x):
            if not isinstance(src, fx.Node) or not is_cat_of(src, features) or len(src.users) != 1:
                raise _NoMatch(f"{name} does not read the concatenation of the block input and the earlier layers")
            used.add(src)
        bottleneck = fused_pair(name, "norm1", "conv1", src)
        out = fused_pair(name, "norm2", "conv2", bottleneck)
        p = 0.0
        if len(out.users) == 1:
            nxt = next(iter(out.users))
            drop = _dropout(nxt, mods, training)
            if drop is not None:
                used.add(nxt)
                p, out = drop, nxt
        drops.append(p)
        features.append(out)
    output = [n for n in nodes if n.op == "output"][0]
    result = output.args[0]
    if not isinstance(result, fx.Node) or not is_cat_of(result, features) or len(result.users) != 1:
        raise _NoMatch("its output is not the concatenation of the block input and every layer's output")
    used.update({result, output})
    extra = [n for n in nodes if n not in used and n.op != "get_attr"]
    if extra:
        raise _NoMatch("its forward also computes " + ", ".join(_describe(n, mods) for n in extra[:3]))
    return drops


def _dropout(node: fx.Node, mods: Dict[str, nn.Module], training: bool) -> Optional[float]:
    """The probability of a dropout ``node`` applied in ``training`` mode (0 in eval), or ``None``."""
    m = _call_target(node, mods)
    if type(m) is nn.Dropout and not _has_hooks(m) and not m.inplace:
        return float(m.p)
    if node.op == "call_function" and node.target is F.dropout:
        try:
            b = inspect.signature(F.dropout).bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        b.apply_defaults()
        if b.arguments["inplace"] or not isinstance(b.arguments["p"], (int, float)):
            return None
        if bool(b.arguments["training"]) != training:
            return None if b.arguments["training"] else 0.0
        return float(b.arguments["p"]) if training else 0.0
    return None


class _CallableModule(types.ModuleType):
    """``import resfast.convert`` binds the package attribute ``resfast.convert`` to this
    module, shadowing the function of the same name; calling the module calls the function,
    so ``resfast.convert(model)`` works however the module was first imported."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> ConversionReport:
        return convert(model, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
