"""DenseNet blocks: ``DenseLayer``, ``DenseBlock`` (a drop-in for torchvision's ``_DenseBlock``)
and ``Transition``, with torchvision's submodule names so ``state_dict`` keys match.

``DenseBlock(memory=...)`` picks how the block's concatenated features are kept for the
backward:

* ``"naive"``: torchvision's ``memory_efficient=False``: every layer concatenates all
  previous features (``torch.cat``) and autograd keeps each concatenation: memory grows
  quadratically with depth.
* ``"checkpoint"``: torchvision's ``memory_efficient=True``: the concatenation and the
  BN-ReLU-conv1x1 are recomputed in the backward (``torch.utils.checkpoint``). Unlike
  torchvision, the recomputation normalises with the batch statistics without touching
  the running statistics, so they are updated once per forward here too.
* ``"shared"``: one feature buffer per block, no concatenation, batch statistics computed
  once per channel, BN-ReLU recomputed in the backward (:mod:`resfast.ops.dense_block`);
  ``recompute="bottleneck"`` also recomputes each layer's conv1x1 output.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as cp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resfast.backends import BackendOwner, check_backend_name, resolve_backend
from resfast.nn.batchnorm import bn_call, bn_calls, require_batchnorm
from resfast.nn.fused import (_autocast_view, bn_relu_conv, bn_relu_conv_weight, conv_pair, conv_padding,
                              parameters_once)
from resfast.nn.unfused import (any_hooks, any_replaced, converted_changed, hooked_submodules, is_tracing,
                                original_forward, overridden, refuse_script, run_unfused, submodules)
from resfast.ops.autograd import forward_ad_or_transform
from resfast.ops.bn_relu_conv2d import bn_relu_conv2d, sync_batch_stats, update_running_stats
from resfast.ops.dense_block import RECOMPUTE_MODES, DenseLayerArgs, shared_dense_block
from resfast.ops.opsets import get_ops
from resfast.ops.validation import (FLOAT_DTYPES, check_bn_relu_conv2d_args, check_eps, check_param_dtype,
                                    check_running_stats_no_grad)

__all__ = ["DenseLayer", "DenseBlock", "Transition", "MEMORY_MODES", "bn_relu_conv_recomputable"]

MEMORY_MODES = ("shared", "checkpoint", "naive")


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 to ``bn_size * growth_rate`` channels, BN-ReLU-conv3x3 to
    ``growth_rate`` channels, dropout: torchvision's ``_DenseLayer`` (same arguments and
    submodule names ``norm1, relu1, conv1, norm2, relu2, conv2``), with both BN-ReLU-conv
    pairs fused on ``backend``.

    ``forward`` takes one tensor or a list of tensors (the previous features) and returns
    the ``growth_rate`` new channels. ``memory="checkpoint"`` recomputes the concatenation
    and the first BN-ReLU-conv in the backward; ``"naive"`` and ``"shared"`` keep them (a
    single layer has no buffer to share; :class:`DenseBlock` shares it across layers).
    """

    __prepare_scriptable__ = refuse_script  # torch.jit.script: a clear refusal

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0,
                 memory_efficient: bool = False, *, memory: Optional[str] = None, backend: str = "auto") -> None:
        super().__init__()
        _positive(num_input_features=num_input_features, growth_rate=growth_rate, bn_size=bn_size)
        _check_drop(drop_rate)
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory = _check_memory(memory if memory is not None else ("checkpoint" if memory_efficient else "naive"))
        self.backend = check_backend_name(backend)

    def forward(self, input: Union[Tensor, Sequence[Tensor]]) -> Tensor:  # noqa: A002 (torchvision's name)
        """``input``: a tensor or a list of tensors (concatenated along channels, as torchvision's
        ``_DenseLayer`` takes them) -> the layer's ``growth_rate`` new channels."""
        fused = [(n, getattr(self, n)) for n in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")]
        if run_unfused(self, fused, "fused ops"):
            return self._forward_unfused(input)
        prev = [input] if isinstance(input, Tensor) else list(input)
        if not prev or not all(isinstance(t, Tensor) for t in prev):
            raise TypeError("input must be a tensor or a non-empty list of tensors")
        for t in prev:
            if t.dim() != 4:
                raise ValueError(f"every input must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
        channels = sum(t.shape[1] for t in prev)
        require_batchnorm(self.norm1)  # (before its num_features; norm2 is checked by its bn_relu_conv)
        if channels != self.norm1.num_features:
            raise ValueError(f"channel mismatch: the inputs have {channels} channels in all, the layer expects "
                             f"num_input_features={self.norm1.num_features}")
        if self.memory == "checkpoint" and torch.is_grad_enabled() and any(t.requires_grad for t in prev):
            bottleneck = bn_relu_conv_recomputable(self.norm1, self.conv1, prev, self.backend)
        else:
            x = prev[0] if len(prev) == 1 else torch.cat(prev, 1)
            bottleneck = bn_relu_conv(self.norm1, self.conv1, x, self.backend)
        new = bn_relu_conv(self.norm2, self.conv2, bottleneck, self.backend)
        if self.drop_rate > 0:
            new = nn.functional.dropout(new, p=self.drop_rate, training=self.training)
        return new

    def _forward_unfused(self, input) -> Tensor:  # noqa: A002
        original = original_forward(self)
        if original is not None:  # converted from timm's layer: its norms apply the ReLU themselves
            return original(input)
        # torchvision's _DenseLayer.forward (without its checkpointing), module by module. Its
        # bn_function concatenates even a single input: an FX graph (prepare_fx's observers,
        # create_feature_extractor's node names) has that cat node, as torchvision's has.
        prev = [input] if isinstance(input, (Tensor, torch.fx.Proxy)) else list(input)
        x = torch.cat(prev, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(x)))
        new = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new = nn.functional.dropout(new, p=self.drop_rate, training=self.training)
        return new


class DenseMemoryOwner:
    """Mixin of a module that owns dense blocks (``DenseBlock``, the DenseNet models): ``memory``
    and ``recompute`` are properties, checked when set and passed down (``_pass_down``; by
    default to every owned ``DenseMemoryOwner``), so that a mode set after construction
    (``model.memory = "checkpoint"``) takes effect. As plain attributes they were read only when
    the submodules were built: assigning them later left e.g. ``"checkpoint"`` without its
    checkpointing, silently."""

    @property
    def memory(self) -> str:
        """``"shared"``, ``"checkpoint"`` or ``"naive"``."""
        d = self.__dict__  # (a module pickled before the property kept it as "memory")
        return d["_memory"] if "_memory" in d else d["memory"]

    @memory.setter
    def memory(self, mode: str) -> None:
        self.__dict__["_memory"] = _check_memory(mode)
        self._pass_down("memory", mode)

    @property
    def recompute(self) -> str:
        """With ``memory="shared"``: ``"bn_relu"`` or ``"bottleneck"``."""
        d = self.__dict__
        return d["_recompute"] if "_recompute" in d else d["recompute"]

    @recompute.setter
    def recompute(self, mode: str) -> None:
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {mode!r}")
        self.__dict__["_recompute"] = mode
        self._pass_down("recompute", mode)

    def _pass_down(self, name: str, mode: str) -> None:
        for sub in self.modules():  # type: ignore[attr-defined]
            if sub is not self and isinstance(sub, DenseMemoryOwner):
                setattr(sub, name, mode)


class DenseBlock(DenseMemoryOwner, BackendOwner, nn.ModuleDict):
    """A dense block of ``num_layers`` :class:`DenseLayer` s: a drop-in for torchvision's
    ``_DenseBlock`` (same argument order, same ``state_dict`` keys ``denselayer1.norm1.weight``
    ...; ``forward(x)`` returns all features concatenated, ``num_input_features +
    num_layers * growth_rate`` channels).

    Args:
        memory: ``"shared"`` (default; one buffer, BN-ReLU recomputed, see
            :mod:`resfast.ops.dense_block`), ``"checkpoint"`` or ``"naive"``.
        recompute: with ``memory="shared"``: ``"bn_relu"`` keeps each layer's conv1x1
            output, ``"bottleneck"`` recomputes it too.
        backend: ``"auto" | "eager" | "triton" | "native"``; ``block.backend = name`` later
            sets every layer's backend too (each memory mode runs on it).
        memory_efficient: torchvision's flag, as a keyword or in ``memory``'s place:
            ``True`` is ``memory="checkpoint"``, ``False`` ``memory="naive"``.
    """

    _version = 2

    __prepare_scriptable__ = refuse_script  # torch.jit.script: a clear refusal

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0, memory: str = "shared", recompute: str = "bn_relu",
                 backend: str = "auto", *, memory_efficient: Optional[bool] = None) -> None:
        super().__init__()
        _positive(num_layers=num_layers, num_input_features=num_input_features, bn_size=bn_size,
                  growth_rate=growth_rate)
        if memory_efficient is not None:  # torchvision's keyword (trial 29: a TypeError before)
            if not isinstance(memory, str) or memory != "shared":
                raise ValueError(f"give memory= or memory_efficient=, not both (got memory={memory!r}, "
                                 f"memory_efficient={memory_efficient!r})")
            memory = bool(memory_efficient)
        if isinstance(memory, bool):  # torchvision's memory_efficient flag, positional or keyword
            memory = "checkpoint" if memory else "naive"
        self.memory = memory
        self.recompute = recompute
        self.backend = check_backend_name(backend)
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate,
                               memory="checkpoint" if memory == "checkpoint" else "naive", backend=backend)
            self.add_module("denselayer%d" % (i + 1), layer)

    def _pass_down(self, name: str, mode: str) -> None:
        if name == "memory":  # (a layer checkpoints or not; the shared buffer is the block's)
            for layer in self.values():
                if isinstance(layer, DenseLayer):
                    layer.memory = "checkpoint" if mode == "checkpoint" else "naive"

    @property
    def num_output_features(self) -> int:
        return self.num_input_features + len(self) * self.growth_rate

    def forward(self, init_features: Tensor) -> Tensor:
        """``init_features`` (N, num_input_features, H, W) -> every feature concatenated,
        (N, num_input_features + num_layers * growth_rate, H, W), as torchvision's ``_DenseBlock``.
        With ``memory="shared"`` the features live in one preallocated buffer and BN-ReLU is
        recomputed in the backward."""
        if is_tracing():
            return self._forward_layers(init_features)
        self._check_input(init_features)
        if self.memory == "shared" and init_features.shape[0] == 0:
            _refuse_empty_sync(self)
        if self.memory == "shared" and init_features.shape[0] > 0 and not self._hooked() \
                and not self._transformed(init_features):
            with parameters_once(*self._fused_modules()):
                return shared_dense_block(init_features, self._layer_args(), backend=self.backend,
                                          recompute=self.recompute)
        return self._forward_layers(init_features)

    def _fused_modules(self, *tail: nn.Module) -> List[nn.Module]:
        """The modules whose parameters the shared block reads, in the order the layers run them."""
        return [getattr(layer, n) for layer in self.values() for n in ("norm1", "conv1", "norm2", "conv2")] \
            + list(tail)

    def _forward_layers(self, init_features: Tensor) -> Tensor:
        # torchvision's _DenseBlock.forward: each layer reads the list of all previous features.
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)

    def _hooked(self) -> bool:
        """Whether hooks on the layers (or their modules) need them called one by one: the shared
        block runs no layer module. Warns once."""
        if not is_tracing() and not any(any_hooks(layer) or any_replaced(layer) or overridden(layer)
                                        for layer in self.values()):
            if any(converted_changed(layer) for layer in self.values()):
                return True  # each layer runs its original forward (and warns)
            return False
        named = [(f"{n}.{c}" if c else n, m) for n, layer in self.items() for c, m in layer.named_modules()]
        return run_unfused(self, named, "the shared-buffer dense block (memory='shared')")

    def _transformed(self, x: Tensor, *others: nn.Module) -> bool:
        """Whether forward AD, a ``torch.func`` transform or ``torch.jit.trace`` is at work (the
        shared block's Function has neither a forward-AD formula nor functorch support, and the
        tracer cannot record it): the layers then run one by one, which every transform
        differentiates and the tracer records (the same values and running statistics)."""
        return torch.jit.is_tracing() or forward_ad_or_transform(x, modules=(self, *others))

    def forward_with_transition(self, init_features: Tensor, transition: "Transition") -> Tensor:
        """``transition(self(init_features))``; with ``memory="shared"`` the transition's
        BN-ReLU-conv1x1 runs inside the block's function on the shared buffer (with the
        block's per-channel batch statistics), so the block's features need no gradient
        buffer of their own."""
        if is_tracing() or not isinstance(transition, Transition):
            # a wrapped transition (FSDP's FullyShardedDataParallel, checkpoint_wrapper) is called
            # as a module, so that its wrapper runs (the fused tail read its parameters through
            # it: under FSDP's NO_SHARD their gradients were never all-reduced, trial 21)
            return transition(self(init_features))
        self._check_input(init_features, transition)
        if self.memory == "shared" and init_features.shape[0] == 0:
            _refuse_empty_sync(self, transition)
        # hooks on the block itself (a forward hook returning a changed output, a full backward
        # hook, retain_grad of its output) or a forward set on it: it is called as a module, so
        # that they run
        if self.memory != "shared" or init_features.shape[0] == 0 or self._hooked() \
                or hooked_submodules([("", self)]) or overridden(self) \
                or self._transformed(init_features, transition) \
                or run_unfused(transition, [("transition", transition), ("norm", transition.norm),
                                            ("relu", transition.relu), ("conv", transition.conv)],
                               "the shared block's fused tail") \
                or transition.norm.num_features != self.num_output_features or not transition.plain_conv1x1():
            # The fused tail computes a plain 1x1 conv over the block's channels. A transition conv
            # changed after construction (a bias, padding, groups, ...) or a norm over other channels
            # runs as the transition's own modules on the block's output, as eager PyTorch does
            # (or raises where it raises); the tail ignored a padding set later (wrong numbers).
            return transition(self(init_features))
        with parameters_once(*self._fused_modules(transition.norm, transition.conv)):
            layers, tail_norm = self._layer_args(transition.norm)
            pool_first = transition.pool_first()
            out = shared_dense_block(init_features, layers, backend=self.backend, recompute=self.recompute,
                                     tail=(tail_norm, transition.conv.weight,
                                           transition.pool_weight if pool_first else None))
        return out if pool_first else transition.pool(out)

    def _layer_args(self, tail_norm: Optional[nn.Module] = None):
        """Each layer's tensors and its BatchNorms' decisions for this forward (num_batches_tracked
        moves here, once per forward, after the input was checked, for every BatchNorm of the
        block in one launch); with ``tail_norm`` (a transition's norm) also that norm's
        decisions: ``(layers, tail BNArgs)``."""
        args = []
        for i, layer in enumerate(self.values()):
            for name in ("conv1", "conv2"):
                conv = getattr(layer, name)
                if conv.bias is not None or conv.groups != 1 or conv.padding_mode != "zeros" \
                        or conv_padding(conv) is None or conv_pair(conv.stride) != (1, 1):
                    raise ValueError(f"denselayer{i + 1}.{name} must be a bias-free, ungrouped, stride-1 conv with "
                                     f"numeric zero padding for memory='shared'; use memory='naive' for other convs")
        norms = [bn for layer in self.values() for bn in (layer.norm1, layer.norm2)]
        calls = bn_calls(norms + ([tail_norm] if tail_norm is not None else []))
        for i, layer in enumerate(self.values()):
            args.append(DenseLayerArgs(
                norm1=calls[2 * i], conv1_weight=layer.conv1.weight, norm2=calls[2 * i + 1],
                conv2_weight=layer.conv2.weight, conv2_padding=list(conv_padding(layer.conv2)),
                conv2_dilation=list(conv_pair(layer.conv2.dilation)),
                drop_rate=float(layer.drop_rate) if layer.training else 0.0))
        return (args, calls[-1]) if tail_norm is not None else args

    def _check_input(self, x: Tensor, *others: nn.Module) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"init_features must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"init_features must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_input_features:
            raise ValueError(f"channel mismatch: init_features has {x.shape[1]} channels (shape {tuple(x.shape)}) "
                             f"but the block expects num_input_features={self.num_input_features}")
        check_dense_input(x, self, *others)
        resolve_backend(self.backend, x.device)


_POOL_WEIGHTS: Dict[Tuple[int, torch.device, torch.dtype], Tensor] = {}


def _pool_weight(channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:attr:`Transition.pool_weight`'s constant, made once per size, device and dtype (outside
    inference mode and autograd, so a first call under ``torch.inference_mode()`` gives a tensor
    later training can use; while ``torch.compile`` traces, made in the graph)."""
    if torch.compiler.is_compiling():
        return torch.full((channels, 1, 2, 2), 0.25, device=device, dtype=dtype)
    key = (channels, torch.device(device), dtype)
    w = _POOL_WEIGHTS.get(key)
    if w is None:
        with torch.inference_mode(False), torch.no_grad():
            w = torch.full((channels, 1, 2, 2), 0.25, device=device, dtype=dtype)
        w = _POOL_WEIGHTS.setdefault(key, w)
    return w

class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (compression) then 2x2 average pooling: torchvision's ``_Transition``
    (submodules ``norm, relu, conv, pool``; the same ``state_dict``), computed pool first.

    A 2x2 average pool commutes with a bias-free 1x1 convolution (both are linear), so the
    forward is ``conv(pool(relu(norm(x))))``: the BN-ReLU-pool is one fused op (a depthwise 2x2
    stride-2 convolution with weights 1/4, :attr:`pool_weight`) that writes only the pooled
    activation, and the 1x1 conv runs on a quarter of the positions -- a quarter of its
    multiply-adds and output bytes. ``pool_weight`` is a constant, not a buffer: the module's
    ``named_buffers()`` and ``state_dict()`` are torchvision's.
    """

    __prepare_scriptable__ = refuse_script  # torch.jit.script: a clear refusal

    def __init__(self, num_input_features: int, num_output_features: int, *, backend: str = "auto") -> None:
        super().__init__()
        _positive(num_input_features=num_input_features, num_output_features=num_output_features)
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.backend = check_backend_name(backend)

    @property
    def pool_weight(self) -> Tensor:
        """The 2x2 averaging weight of the fused BN-ReLU-pool, ``(C, 1, 2, 2)`` of 1/4 on the conv
        weight's device and in its dtype: a constant shared by every transition of that size, not a
        buffer, so ``named_buffers()`` lists torchvision's names only (an EMA helper that looks each
        buffer up in ``state_dict()`` raised KeyError on a non-persistent one) and no ``to`` /
        ``to_empty`` / dtype change can leave it uninitialised."""
        w = self.conv.weight
        return _pool_weight(self.norm.num_features, w.device, w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, C, H, W) -> (N, out_channels, H // 2, W // 2): BN-ReLU, 2x2 average pool, then
        the 1x1 conv (pool first: the same value as torchvision's conv-then-pool)."""
        if run_unfused(self, [("norm", self.norm), ("relu", self.relu), ("conv", self.conv), ("pool", self.pool)],
                       "a fused BN-ReLU-pool and a 1x1 conv"):
            original = original_forward(self)  # converted from timm's: its norm applies the ReLU itself
            return original(x) if original is not None else self.pool(self.conv(self.relu(self.norm(x))))
        if not self.pool_first():
            return self.pool(bn_relu_conv(self.norm, self.conv, x, self.backend))
        pooled = bn_relu_conv_weight(self.norm, self.pool_weight, x, self.backend, stride=2,
                                     groups=self.norm.num_features)
        return self.conv(pooled)

    def plain_conv1x1(self) -> bool:
        """Whether ``conv`` still is a bias-free, ungrouped, unpadded, stride-1 1x1 ``nn.Conv2d`` (as
        built; its attributes are read now, so one changed later counts), the conv that pool-first
        and a shared dense block's fused tail (``DenseBlock.forward_with_transition``) compute."""
        c = self.conv
        return (isinstance(c, nn.Conv2d) and c.bias is None and conv_pair(c.kernel_size) == (1, 1)
                and conv_pair(c.stride) == (1, 1) and c.groups == 1 and conv_padding(c) == (0, 0))

    def pool_first(self) -> bool:
        """Whether the modules still are what pool-first assumes (a plain 1x1 conv, see
        :meth:`plain_conv1x1`, and a 2x2/2 average pool without padding): otherwise the transition
        runs conv first, as built."""
        p = self.pool
        return (self.plain_conv1x1() and isinstance(p, nn.AvgPool2d)
                and _pair(p.kernel_size) == (2, 2) and _pair(p.stride) == (2, 2) and _pair(p.padding) == (0, 0)
                and not p.ceil_mode and p.divisor_override is None)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def bn_relu_conv_recomputable(bn: nn.BatchNorm2d, conv: nn.Conv2d, inputs: List[Tensor], backend: str = "auto"
                              ) -> Tensor:
    """``conv(relu(bn(cat(inputs))))`` under ``torch.utils.checkpoint``: the concatenation and
    the result are recomputed in the backward instead of stored.

    The BatchNorm's bookkeeping happens outside the checkpointed function, once: the counter
    moves and the running statistics are updated from the per-input channel statistics (the
    channels of a concatenation are those of its parts, so nothing is concatenated for it).
    The checkpointed function is pure, so its recomputation repeats nothing and
    ``torch.compile`` traces it without a graph break (torchvision's and timm's checkpointed
    layers update the running statistics twice).
    """
    with parameters_once(bn, conv):  # (read for the checks and for the call: computed once)
        return _recomputable(bn, conv, inputs, backend)


def _recomputable(bn: nn.BatchNorm2d, conv: nn.Conv2d, inputs: List[Tensor], backend: str) -> Tensor:
    _check_recomputable_call(bn, conv, inputs, backend)
    call = bn_call(bn)
    if call.batch_stats and call.running_mean is not None and call.momentum != 0.0 \
            and (inputs[0].shape[0] > 0 or call.process_group is not None):  # an empty rank joins the others
        _update_running_from_parts(call, inputs, resolve_backend(backend, inputs[0].device))
    # Eval: the recomputation in the backward normalises with a snapshot of the running
    # statistics, not with whatever a training forward in between left in them.
    running = None if call.batch_stats else (call.running_mean.clone(), call.running_var.clone())
    # The conv's tensors and geometry as they are now: the recomputation runs in the backward,
    # when conv.weight may be another tensor (torch.func.functional_call's substituted weights,
    # MAML's fast weights, are gone by then: the original weight recomputed a wrong bottleneck).
    # The four parameters are the checkpoint's arguments, not the closure's: the checkpoint saves
    # its arguments for the backward, so an in-place change of one between the forward and the
    # backward (optimizer.step(), a clamp_) raises autograd's "modified by an inplace operation",
    # as the unfused modules do, instead of recomputing the bottleneck with the new values.
    params = (conv.weight, conv.bias, call.weight, call.bias)
    geometry = dict(stride=conv.stride, padding=conv_padding(conv) or conv.padding, dilation=conv.dilation,
                    groups=conv.groups)
    n = len(inputs)

    def closure(*args: Optional[Tensor]) -> Tensor:
        feats, (weight, bias, bn_weight, bn_bias) = args[:n], args[n:]
        x = feats[0] if len(feats) == 1 else torch.cat(feats, 1)
        return bn_relu_conv2d(
            x, weight, bias, bn_weight=bn_weight, bn_bias=bn_bias,
            running_mean=running[0] if running else None, running_var=running[1] if running else None,
            training=call.batch_stats, momentum=0.0, eps=call.eps, backend=backend,
            process_group=call.process_group, **geometry)

    return cp.checkpoint(closure, *inputs, *params, use_reentrant=False)


def _check_recomputable_call(bn: nn.BatchNorm2d, conv: nn.Conv2d, inputs: List[Tensor], backend: str) -> None:
    """Every check the checkpointed op will make, made before the bookkeeping moves anything
    (a rejected call changes nothing): the parts must concatenate, and the op's arguments are
    checked on a one-element stand-in of their concatenation (same shape, dtype and device)."""
    first = inputs[0]
    resolve_backend(backend, first.device)
    for t in inputs[1:]:
        if t.device != first.device:
            raise ValueError(f"every input must be on one device: {first.device} and {t.device}")
        if (t.shape[0], *t.shape[2:]) != (first.shape[0], *first.shape[2:]):
            raise ValueError(f"the inputs must share batch and spatial sizes to be concatenated along channels, "
                             f"got shapes {tuple(first.shape)} and {tuple(t.shape)}")
    dtype = first.dtype
    for t in inputs[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    shape = (first.shape[0], sum(t.shape[1] for t in inputs), *first.shape[2:])
    stand_in = torch.empty((), dtype=dtype, device=first.device).expand(shape)
    preview = bn_call(bn, update=False)
    check_bn_relu_conv2d_args(
        *_autocast_view(stand_in, conv.weight, conv.bias), preview.weight, preview.bias, preview.running_mean,
        preview.running_var, preview.batch_stats, 0.0, preview.eps, conv.stride, conv_padding(conv) or conv.padding,
        conv.dilation, conv.groups, None)


def _update_running_from_parts(call, parts: List[Tensor], backend: str) -> None:
    # (detached, not under no_grad: torch.export.load refuses an exported no_grad region)
    ops = get_ops(backend)
    means, variances, count = [], [], 1
    for t in parts:
        t = t.detach()
        if call.process_group is not None:
            m, v, count = sync_batch_stats(ops, t, call.process_group)
        else:
            m, v = ops.bn_stats(t.detach())
            count = t.numel() // t.shape[1]
        means.append(m)
        variances.append(v)
    update_running_stats(call.running_mean, call.running_var, torch.cat(means), torch.cat(variances), count,
                         call.momentum)


def _refuse_empty_sync(block: nn.Module, transition: Optional[nn.Module] = None) -> None:
    """An empty batch on a rank whose BatchNorms synchronise (SyncBN, training): the other ranks'
    shared blocks run collectives this rank's layer-by-layer path cannot match (they would wait
    for it forever or pair up the wrong tensors), so it is refused before anything changes."""
    from resfast.nn.batchnorm import sync_group, uses_batch_stats

    norms = [m for m in block.modules() if isinstance(m, _BatchNorm)]
    norms += [m for m in (transition.modules() if transition is not None else ()) if isinstance(m, _BatchNorm)]
    if any(uses_batch_stats(bn) and sync_group(bn) is not None for bn in norms):
        raise ValueError("this rank has no images (batch 0) but the dense block's BatchNorms synchronise over a "
                         "process group: memory='shared' cannot join the other ranks' collectives with no images; "
                         "use memory='checkpoint' or 'naive' (they take part with a count of 0), or give every "
                         "rank at least one image")


def check_dense_input(x: Tensor, block: nn.Module, *others: nn.Module) -> None:
    """The inputs torchvision's ``_DenseBlock`` rejects, rejected by every memory mode and
    backend before anything (running statistics, ``num_batches_tracked``) changes. ``others``
    (a transition fused into the block) have their BatchNorms checked too."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"init_features has dtype {x.dtype}; a dense block needs a floating-point input "
                        f"(float32, float16, bfloat16 or float64)")
    autocast = _autocast_on(x.device.type)
    walked = [(owner, submodules(owner)) for owner in (block, *others)]  # once per forward, no names
    if not autocast:
        # The convs take x's dtype, as nn.Conv2d does; the BatchNorms may keep float32 parameters
        # and statistics beside a float16 / bfloat16 x (checked below), as nn.BatchNorm2d does.
        # (Once per forward: read the weight from the parameter dict, name the conv only on a miss.)
        for owner, modules in walked:
            for conv in modules:
                w = conv._parameters.get("weight") if isinstance(conv, nn.Conv2d) else None
                if w is not None and w.dtype != x.dtype:
                    path = next(n for n, m in owner.named_modules() if m is conv)
                    raise TypeError(f"init_features has dtype {x.dtype} but the block's parameters are "
                                    f"{w.dtype} ({path}.weight); convert one of them (e.g. "
                                    f"block.to({x.dtype}) or x.to({w.dtype})), or run under torch.autocast")
        # As nn.BatchNorm2d and the fused op: e.g. float64 running statistics beside a float32
        # input are refused (the shared block would otherwise run them on some backends only).
        # A quick pass first (once per forward: densenet121's 120 BatchNorms); names only on a miss.
        allowed = {x.dtype, torch.float32} if x.dtype in (torch.float16, torch.bfloat16) else {x.dtype}
        for owner, modules in walked:
            for bn in modules:
                if not isinstance(bn, _BatchNorm):
                    continue
                p, b = bn._parameters, bn._buffers  # (nn.Module.__getattr__ is the slow part)
                dtypes = {t.dtype for t in (p.get("weight"), p.get("bias"), b.get("running_mean"),
                                            b.get("running_var")) if t is not None}
                if len(dtypes) > 1 or not dtypes <= allowed:
                    path = next(n for n, m in owner.named_modules() if m is bn)
                    check_param_dtype(x.dtype, [(f"{path}.{k}" if path else k, getattr(bn, k)) for k in
                                                ("weight", "bias", "running_mean", "running_var")])
    if torch.is_grad_enabled():
        # As the fused op and eager PyTorch's batch_norm: running statistics that require grad are
        # refused (the shared block gives them no gradient: it would come back as None).
        for owner, modules in walked:
            for bn in modules:
                if not isinstance(bn, _BatchNorm):
                    continue
                try:
                    check_running_stats_no_grad(bn._buffers.get("running_mean"), bn._buffers.get("running_var"))
                except RuntimeError as exc:
                    path = next(n for n, m in owner.named_modules() if m is bn)
                    raise RuntimeError(f"{path or 'the BatchNorm'}: {exc}") from None
    # As the fused op (and eager PyTorch's batch norm in training): eps > 0. The shared block
    # never reaches the op's check, so eps=0 ran there (train and eval) where the other modes raise.
    for owner, modules in walked:
        for bn in modules:
            if isinstance(bn, _BatchNorm) and not (isinstance(bn.eps, float) and bn.eps > 0):
                path = next(n for n, m in owner.named_modules() if m is bn)
                check_eps(bn.eps, f"{path}.eps" if path else "eps")
    # (batch statistics: a BatchNorm in training, or one without running statistics in eval,
    # which eager PyTorch's batch_norm refuses alike; the shared block normalised the lone value
    # to its bias, trial 30)
    from resfast.nn.batchnorm import uses_batch_stats

    training = any(uses_batch_stats(m) for owner, modules in walked for m in modules if isinstance(m, _BatchNorm))
    if training and x.shape[0] > 0 and x.numel() // max(x.shape[1], 1) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):
        return False


def _check_memory(memory: str) -> str:
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    return memory


def _check_drop(p: float) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"drop_rate must be a float in [0, 1), got {p!r}")


def _positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
