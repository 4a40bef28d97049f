"""Module form of the fused op: :class:`BNReLUConv2d`, and :func:`bn_relu_conv`, the one
place a block turns a ``(BatchNorm2d, Conv2d)`` pair into a call of the functional op."""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from resfast.backends import check_backend_name, resolve_backend
from resfast.nn.batchnorm import bn_call, require_batchnorm
from resfast.nn.unfused import refuse_script, run_unfused
from resfast.ops.bn_relu_conv2d import _check_input_stats, autocast_enabled, autocast_inputs, bn_relu_conv2d
from resfast.ops.validation import check_bn_relu_conv2d_args

__all__ = ["BNReLUConv2d", "bn_relu_conv", "bn_relu_conv_weight", "conv_padding", "conv_pair", "fusable_conv",
           "parameters_once"]


def bn_relu_conv(
    bn: nn.BatchNorm2d, conv: nn.Conv2d, x: Tensor, backend: str = "auto", out: Optional[Tensor] = None,
    update: bool = True, *, input_stats: Optional[Tensor] = None, return_stats: bool = False,
):
    """``conv(relu(bn(x)))`` through :func:`resfast.functional.bn_relu_conv2d`, with ``bn``'s
    running statistics and ``num_batches_tracked`` updated exactly as ``nn.BatchNorm2d`` does.

    ``update=False``: a second reader of ``bn``'s output in the same forward (the same
    statistics; nothing updated). Bad input is rejected before anything changes.

    Chaining (statistics in the epilogue): ``return_stats=True`` returns ``(y, stats)``, the
    batch statistics of ``y`` taken by the conv (``None`` where the backend does not), and
    the next call ``bn_relu_conv(bn_next, conv_next, y, ..., input_stats=stats)`` normalises
    with them instead of a statistics pass over ``y``.
    """
    if conv.padding_mode != "zeros":
        raise ValueError(f"only padding_mode='zeros' is supported, got {conv.padding_mode!r}")
    padding = conv_padding(conv)
    if padding is None:
        raise ValueError(f"conv padding={conv.padding!r} with kernel {conv_pair(conv.kernel_size)} and dilation "
                         f"{conv_pair(conv.dilation)} pads asymmetrically; the fused op pads the same on both sides")
    with parameters_once(bn, conv):
        return bn_relu_conv_weight(bn, conv.weight, x, backend, bias=conv.bias, stride=conv.stride,
                                   padding=padding, dilation=conv.dilation, groups=conv.groups, out=out,
                                   update=update, input_stats=input_stats, return_stats=return_stats)


def conv_pair(value) -> Tuple[int, int]:
    """A conv's ``stride`` / ``padding`` / ``dilation`` / ``kernel_size`` as two ints. ``nn.Conv2d``
    stores tuples, but one set after construction may be a plain int or a list (``conv.padding =
    2``, ``conv.stride = 1``), which ``nn.Conv2d.forward`` (``F.conv2d``) takes as well."""
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[1])) if len(value) == 2 else (int(value[0]), int(value[0]))
    return (int(value), int(value))


def conv_padding(conv: nn.Conv2d) -> Optional[Tuple[int, int]]:
    """``conv``'s zero padding as two numbers: numeric padding as it is (an int set after
    construction, ``conv.padding = 2``, as ``(2, 2)``), ``"valid"`` as ``(0, 0)``, ``"same"`` as
    ``dilation * (kernel - 1) // 2`` per side; ``None`` where ``"same"`` pads one side more than
    the other (``dilation * (kernel - 1)`` odd)."""
    if not isinstance(conv.padding, str):
        return conv_pair(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for k, d in zip(conv_pair(conv.kernel_size), conv_pair(conv.dilation))]
    if any(t % 2 for t in total):
        return None
    return (total[0] // 2, total[1] // 2)


def fusable_conv(conv: nn.Module) -> bool:
    """Whether the fused op can compute ``conv``: zero padding, the same on both sides. A conv
    with ``padding="same"`` and an even ``dilation * (kernel - 1)`` pads one side more (its module
    runs it), as does ``padding_mode="reflect"`` etc.; ``BNReLUConv2d`` then runs its modules, as
    eager PyTorch (it raised ValueError, trial 30)."""
    return getattr(conv, "padding_mode", "zeros") == "zeros" and conv_padding(conv) is not None


_NO_CONTEXT = contextlib.nullcontext()


def parameters_once(*modules: Optional[nn.Module]):
    """A context in which each parametrized tensor of ``modules`` (``torch.nn.utils.parametrize``:
    a weight-noise or DropConnect parametrization, ``orthogonal``, ``weight_norm``) is computed
    once, on entry, in the order of ``modules`` (weight before bias), however often the fused path
    reads it: ``parametrize.cached()``; a no-op when none is parametrized. The unfused modules
    compute each once per forward, in the order they run (a pre-activation block's shortcut
    shares ``relu(bn1(x))``), while the fused paths read a BatchNorm's weight and bias for the
    argument checks and again for the call, a second reader again, and a conv's weight before its
    BatchNorm's: a parametrization drawing random numbers drew them twice and in another order
    (trial 27: outputs 0.13-4.5 off eager's with the same seed). Not while ``torch.compile``
    traces (it would break the graph there)."""
    if not any(m is not None and "parametrizations" in m._modules for m in modules) \
            or torch.compiler.is_compiling():
        return _NO_CONTEXT
    return _computed_once(modules)


@contextlib.contextmanager
def _computed_once(modules):
    with parametrize.cached():
        for m in modules:
            if m is not None and "parametrizations" in m._modules:
                for name in ("weight", "bias"):
                    if name in m.parametrizations:
                        getattr(m, name)  # computed (and cached) now, in the unfused modules' order
        yield


def bn_relu_conv_weight(
    bn: nn.BatchNorm2d, weight: Tensor, x: Tensor, backend: str = "auto", *, bias: Optional[Tensor] = None,
    stride=1, padding=0, dilation=1, groups: int = 1, out: Optional[Tensor] = None, update: bool = True,
    input_stats: Optional[Tensor] = None, return_stats: bool = False,
):
    """:func:`bn_relu_conv` with the conv given as a weight tensor and its arguments (e.g. the
    depthwise 2x2 averaging weight of a pool-first transition)."""
    with parameters_once(bn):
        return _bn_relu_conv_weight(bn, weight, x, backend, bias=bias, stride=stride, padding=padding,
                                    dilation=dilation, groups=groups, out=out, update=update,
                                    input_stats=input_stats, return_stats=return_stats)


def _bn_relu_conv_weight(bn, weight, x, backend, *, bias, stride, padding, dilation, groups, out, update,
                         input_stats, return_stats):
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    require_batchnorm(bn)
    if x.shape[1] != bn.num_features:
        raise ValueError(f"channel mismatch: the input has {x.shape[1]} channels, the block expects {bn.num_features}")
    resolve_backend(backend, x.device)  # an unavailable backend is reported before num_batches_tracked moves
    # Every argument is checked before num_batches_tracked moves: a rejected call changes nothing.
    preview = bn_call(bn, update=False)
    view = _autocast_view(x, weight, bias, out)
    check_bn_relu_conv2d_args(
        *view, preview.weight, preview.bias, preview.running_mean, preview.running_var,
        preview.batch_stats, 0.0, preview.eps, stride, padding, dilation, groups, out)
    if input_stats is not None:  # checked as the op will check it, before num_batches_tracked moves
        _check_input_stats(input_stats, view[0])
    call = bn_call(bn, update=update)
    return bn_relu_conv2d(
        x, weight, bias,
        bn_weight=call.weight, bn_bias=call.bias, running_mean=call.running_mean, running_var=call.running_var,
        training=call.batch_stats, momentum=call.momentum, eps=call.eps,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
        backend=backend, out=out, process_group=call.process_group,
        input_stats=input_stats, return_stats=return_stats,
    )


def _autocast_view(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None):
    """The dtypes the functional op will see under autocast (see ``autocast_inputs``)."""
    if autocast_enabled(x.device.type):
        return autocast_inputs(x, weight, bias, out)
    return x, weight, bias


class BNReLUConv2d(nn.Module):
    """``Conv2d(ReLU(BatchNorm2d(x)))`` as one fused op on the chosen backend.

    Parameters and buffers are those of an ``nn.BatchNorm2d`` named ``norm`` and an
    ``nn.Conv2d`` named ``conv``, so the ``state_dict`` is the same on every backend.
    """

    __prepare_scriptable__ = refuse_script  # torch.jit.script: a clear refusal

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int]] = 1,
        stride: Union[int, Tuple[int, int]] = 1,
        padding: Union[int, Tuple[int, int]] = 0,
        dilation: Union[int, Tuple[int, int]] = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_channels(in_channels, out_channels, groups)
        self.backend = check_backend_name(backend)
        self.norm = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum, affine=affine,
                                   track_running_stats=track_running_stats)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)

    def forward(self, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``conv(relu(norm(x)))`` as one fused op on ``self.backend``; ``out``, if given, receives
        the result (it must not overlap ``x``; see :func:`resfast.functional.bn_relu_conv2d`)."""
        if out is None and (run_unfused(self, [("norm", self.norm), ("conv", self.conv)], "one fused op")
                            or not fusable_conv(self.conv)):
            return self.conv(F.relu(self.norm(x)))
        return bn_relu_conv(self.norm, self.conv, x, self.backend, out=out)


def _check_channels(in_channels: int, out_channels: int, groups: int) -> None:
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
