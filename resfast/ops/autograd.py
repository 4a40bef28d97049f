"""Autograd of the fused op, written once for every op set.

* :func:`bn_relu_conv2d_backward`: THE backward of ``conv2d(relu(bn(x)))`` from an op set:
  the conv and ReLU backward (``ops.bn_relu_conv2d_backward``), the SyncBN all-reduce of the
  two per-channel sums when a process group is given, and the BN input gradient
  (``ops.bn_backward_elemt``, or ``ops.bn_backward_elemt_out`` into a caller's buffer); an op
  set with the optional ``bn_relu_conv2d_backward_full`` (the eager, triton and native ones) does the
  whole of it in that op when the statistics are ``x``'s own (training, no process group). The
  registered ops, the SyncBN path and the shared dense block (per chunk of channels) all
  call it.
* :func:`register_autograd`: the autograd formula of the registered ops
  ``torch.ops.<namespace>.bn_relu_conv2d`` (triton and native).
* :class:`BNReLUConv2dFunction`: autograd over any op set for the calls that do not use the
  registered op's own autograd (SyncBN; the eager op set with a process group; the triton
  and native ops called eagerly with gradients, as their host cost is lower; under
  ``torch.compile`` and ``torch.jit.trace`` the registered autograd is what is traced).

Double backward (``create_graph=True``, e.g. a gradient penalty): the kernels' backward is
not itself differentiable, so when autograd records the backward (grad mode is on inside it
exactly when ``create_graph=True``) the gradients are computed instead from the eager
reference expression with ``torch.autograd.grad(..., create_graph=True)``, the batch
statistics recomputed as differentiable functions of ``x`` (same values as the saved ones).
The result is correct to every order. Over a SyncBN process group this is refused with an
error saying so (the statistics' cross-rank dependence is not differentiable here).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from resfast.ops.reference import acc_dtype

__all__ = [
    "bn_relu_conv2d_backward",
    "register_autograd",
    "BNReLUConv2dFunction",
    "BNReLUConv2dStatsFunction",
    "BNTrainReLUConv2dFunction",
    "differentiable_bn_relu_conv2d",
    "bn_param_grad",
    "DOUBLE_BACKWARD_SYNC_BN",
    "FORWARD_AD_SYNC_BN",
    "forward_ad_or_transform",
    "clone_on_mutate_suspended",
]

DOUBLE_BACKWARD_SYNC_BN = (
    "double backward (create_graph=True) through a fused BN-ReLU-conv that synchronises its batch statistics over a "
    "process group (SyncBatchNorm) is not supported; for a gradient penalty use plain nn.SyncBatchNorm -> ReLU -> "
    "Conv2d modules, or train without SyncBN"
)

FORWARD_AD_SYNC_BN = (
    "forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) and torch.func transforms through a fused "
    "BN-ReLU-conv that synchronises its batch statistics over a process group (SyncBatchNorm) are not supported; "
    "use plain nn.SyncBatchNorm -> ReLU -> Conv2d modules there"
)


def forward_ad_or_transform(*tensors: Optional[Tensor], modules: Sequence = ()) -> bool:
    """Whether this call runs under a ``torch.func`` transform (grad, vjp, jvp, jacrev, jacfwd,
    hessian, vmap, functionalize) or inside a forward-AD dual level with a tangent on one of
    ``tensors`` or of the parameters of ``modules`` (read only inside a dual level).

    The registered ops' autograd (``torch.library.register_autograd``) and resfast's
    ``autograd.Function`` s have no forward-AD formula and no ``setup_context``: forward AD
    through a registered op drops the tangent (a zero derivative, silently) and the other
    transforms raise PyTorch's generic error. Callers compute such a call with the eager
    expression instead, which every transform differentiates exactly. False while
    ``torch.compile`` traces (the transforms are its own business there)."""
    if torch.compiler.is_compiling():
        return False
    try:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return True
    except AttributeError:  # pragma: no cover - older torch
        pass
    import torch.autograd.forward_ad as fwAD

    if fwAD._current_level < 0:
        return False
    params = (p for m in modules for p in m.parameters())
    return any(isinstance(t, Tensor) and fwAD.unpack_dual(t).tangent is not None
               for ts in (tensors, params) for t in ts)


def clone_on_mutate_suspended(enabled: bool = True):
    """A context in which ``torch.autograd.graph.allow_mutation_on_saved_tensors()``'s dispatch
    mode, when it is the innermost one, is set aside (else a no-op context).

    That mode clones a saved tensor before an op writes to it in place, reading the written
    arguments off the op's schema, and crashes on two argument kinds resfast's ops use:
    an optional in-place argument given ``None`` (the native and triton ops' ``Tensor(a!)?``
    running statistics, ``grad_x_out``: "'NoneType' object has no attribute 'data_ptr'") and
    an out argument not named ``out`` (the eager op set's ``threshold_backward.grad_input``:
    ``KeyError: 'out'``). The unfused modules train under it. resfast's backward writes in place
    only into tensors it made in that backward, and its forward only into the running
    statistics (which no graph saves: an eval forward normalises with a copy of them) and into
    the buffers it allocates, so nothing a graph saved is written while the mode is set aside;
    the caller keeps it (``enabled=False``) around a write into a caller's ``out=`` tensor."""
    if not (enabled and getattr(torch.autograd.graph, "_allow_mutation_on_saved_tensors_enabled", False)):
        return contextlib.nullcontext()
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

    mode_cls = getattr(torch.autograd.graph, "_CloneArgBeforeMutateMode", None)
    if mode_cls is None or not isinstance(_get_current_dispatch_mode(), mode_cls):
        return contextlib.nullcontext()
    return _pop_mode_temporarily()


def bn_relu_conv2d_backward(
    ops,
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    conv_args: Sequence,
    batch_stats: bool,
    count: int,
    process_group=None,
    bias_grad: bool = False,
    grad_x_out: Optional[Tensor] = None,
    accumulate: bool = False,
    weight_grad: bool = True,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(x, weight, bias, bn_weight, bn_bias)`` of ``conv2d(relu(bn(x)))``.

    Args:
        ops: the op set (:class:`resfast.ops.opset.OpSet`).
        conv_args: ``(stride, padding, dilation, groups)``.
        batch_stats: ``mean``/``invstd`` are the batch statistics of ``x`` (training), so the
            input gradient has the coupling terms; else they are constants (running statistics).
        count: positions the batch statistics were taken over (N*H*W, summed over the ranks of
            ``process_group``).
        process_group: SyncBN group: the two per-channel sums of the input gradient are
            all-reduced over it; the BN parameter gradients stay local, as
            ``nn.SyncBatchNorm``'s do (DDP averages them).
        bias_grad: compute the conv bias gradient (else ``None`` is returned for it).
        grad_x_out: write dL/dx into this tensor (a channel slice of a shared gradient buffer),
            or add it there with ``accumulate``; ``None`` is then returned for it.
        weight_grad: ``False`` when the caller does not want the weight gradient (a constant
            weight, such as the pool-first transition's averaging weight): ``None`` is returned
            for it, and an op set that can skip it (the eager one) does.
    """
    stride, padding, dilation, groups = conv_args
    full = getattr(ops, "bn_relu_conv2d_backward_full", None)
    got = None
    if full is not None and batch_stats and process_group is None and count * x.shape[1] == x.numel():
        # The op set forms dL/dx with the sums in one go (mean/invstd are x's own statistics);
        # None where it cannot, and the two ops below compose it.
        got = full(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, list(stride), list(padding),
                   list(dilation), groups, bias_grad, grad_x_out, accumulate, weight_grad)
    if got is not None:
        gx, gw, gb, sum_dz_xhat, sum_dz = got
        if grad_x_out is not None:
            gx = None  # (a registered op returns an empty tensor for it)
    else:
        gx, gw, gb, sum_dz, sum_dz_xhat = _composed_backward(ops, grad_out, x, weight, bn_weight, bn_bias, mean,
                                                             invstd, conv_args, batch_stats, count, process_group,
                                                             bias_grad, grad_x_out, accumulate)
    return gx, (gw if weight_grad else None), (gb if bias_grad else None), bn_param_grad(sum_dz_xhat, bn_weight), \
        bn_param_grad(sum_dz, bn_bias)


def bn_param_grad(total: Tensor, param: Optional[Tensor]) -> Optional[Tensor]:
    """A BatchNorm parameter's gradient from its per-channel sum (``sum_dz_xhat`` for the
    weight, ``sum_dz`` for the bias) in the parameter's dtype; ``None`` without the parameter."""
    return total.to(param.dtype) if param is not None else None


def _composed_backward(ops, grad_out, x, weight, bn_weight, bn_bias, mean, invstd, conv_args, batch_stats, count,
                       process_group, bias_grad, grad_x_out, accumulate):
    """``(grad_x or None, grad_weight, grad_bias, sum_dz, sum_dz_xhat)`` from the op set's conv
    backward and BN input gradient, the two sums all-reduced over ``process_group``."""
    stride, padding, dilation, groups = conv_args
    grad_z, gw, gb, sum_dz, sum_dz_xhat = ops.bn_relu_conv2d_backward(
        grad_out, x, weight, bn_weight, bn_bias, mean, invstd, list(stride), list(padding), list(dilation), groups,
        bias_grad)
    g_sum_dz, g_sum_dz_xhat = sum_dz, sum_dz_xhat
    if batch_stats and process_group is not None:
        import torch.distributed as dist

        packed = torch.stack([sum_dz, sum_dz_xhat])
        dist.all_reduce(packed, group=process_group)
        g_sum_dz, g_sum_dz_xhat = packed[0], packed[1]
    inv_count = 1.0 / count if batch_stats else 0.0
    if grad_x_out is None:
        gx = ops.bn_backward_elemt(grad_z, x, bn_weight, mean, invstd, g_sum_dz, g_sum_dz_xhat, inv_count)
    else:
        ops.bn_backward_elemt_out(grad_z, x, bn_weight, mean, invstd, g_sum_dz, g_sum_dz_xhat, inv_count, accumulate,
                                  grad_x_out)
        gx = None
    return gx, gw, gb, sum_dz, sum_dz_xhat


def differentiable_bn_relu_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    mean: Tensor, invstd: Tensor, conv_args: Sequence, batch_stats: bool,
) -> Tensor:
    """The fused op's value in eager ops that autograd differentiates to any order.

    With ``batch_stats`` the statistics are rebuilt as functions of ``x`` whose values are
    the saved ``mean``/``invstd`` and whose derivatives (of every order) are those of the
    batch mean and ``1 / sqrt(var + eps)``: ``invstd * rsqrt(1 + (var - var0) * invstd^2)``
    equals ``rsqrt(var + eps)`` for ``var0 + eps = invstd^-2``, without needing ``eps``.
    """
    stride, padding, dilation, groups = conv_args
    acc = acc_dtype(x)
    xf = x.to(acc)
    mean_c, invstd_c = mean.to(acc), invstd.to(acc)
    if batch_stats:
        var_b, mean_b = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        mean_c = mean_c + (mean_b - mean_b.detach())
        invstd_c = invstd_c * torch.rsqrt(1.0 + (var_b - var_b.detach()) * invstd_c.detach() ** 2)
    z = (xf - mean_c.view(1, -1, 1, 1)) * invstd_c.view(1, -1, 1, 1)
    if bn_weight is not None:
        z = z * bn_weight.to(acc).view(1, -1, 1, 1)
    if bn_bias is not None:
        z = z + bn_bias.to(acc).view(1, -1, 1, 1)
    a = torch.relu(z).to(x.dtype)
    return F.conv2d(a, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def _double_backward_grads(grad_out: Tensor, inputs: List[Optional[Tensor]], needs: Sequence[bool], conv_args,
                           batch_stats: bool) -> List[Optional[Tensor]]:
    """Gradients of ``(x, weight, bias, bn_weight, bn_bias)`` recorded for a further backward."""
    x, weight, bias, bn_weight, bn_bias, mean, invstd = inputs
    with torch.enable_grad():
        y = differentiable_bn_relu_conv2d(x, weight, bias, bn_weight, bn_bias, mean, invstd, conv_args, batch_stats)
        wanted = [t for t, need in zip((x, weight, bias, bn_weight, bn_bias), needs) if need and t is not None]
        got = iter(torch.autograd.grad(y, wanted, grad_out, create_graph=True, allow_unused=True))
    out: List[Optional[Tensor]] = []
    for t, need in zip((x, weight, bias, bn_weight, bn_bias), needs):
        g = next(got) if need and t is not None else None
        if g is None and need and t is not None:
            g = torch.zeros_like(t)
        out.append(g)
    return out


def register_autograd(namespace: str, ops) -> None:
    """The autograd formula of ``torch.ops.<namespace>.bn_relu_conv2d``."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, groups, batch_stats = inputs
        ctx.save_for_backward(x.clone() if x.is_inference() else x, weight, bias, bn_weight, bn_bias, mean, invstd)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        ctx.batch_stats = batch_stats

    def backward(ctx, grad_out):
        x, weight, bias, bn_weight, bn_bias, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: record a differentiable backward
            gx, gw, gb, gbw, gbb = _double_backward_grads(
                grad_out, [x, weight, bias, bn_weight, bn_bias, mean, invstd], needs, ctx.conv_args, ctx.batch_stats)
        else:
            with clone_on_mutate_suspended():
                gx, gw, gb, gbw, gbb = bn_relu_conv2d_backward(
                    ops, grad_out, x, weight, bn_weight, bn_bias, mean, invstd, ctx.conv_args, ctx.batch_stats,
                    x.numel() // x.shape[1], bias_grad=bias is not None and needs[2])
        return gx, gw, gb, gbw, gbb, None, None, None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::bn_relu_conv2d", backward, setup_context=setup_context)
    if not hasattr(ops, "bn_relu_conv2d_stats"):
        return

    # The op that also returns its output's batch statistics (partials): the same backward; the
    # statistics are not differentiable (a BatchNorm that normalises with them has batch_stats,
    # so its own backward carries their dependence on the output).
    def setup_context_stats(ctx, inputs, output):
        setup_context(ctx, inputs, output[0])
        ctx.mark_non_differentiable(output[1])

    def backward_stats(ctx, grad_out, _grad_partials):
        return backward(ctx, grad_out)

    torch.library.register_autograd(f"{namespace}::bn_relu_conv2d_stats", backward_stats,
                                    setup_context=setup_context_stats)


class BNReLUConv2dFunction(torch.autograd.Function):
    """Autograd over any op set, for the calls that do not go through a registered op's own
    autograd: SyncBN (the backward all-reduces), the eager op set with a process group, and
    the triton and native ops called eagerly with gradients (cheaper on the host than
    ``torch.library``'s Python autograd wrapper; the same backward)."""

    @staticmethod
    def _setup(ctx, ops, process_group, count, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding,
               dilation, groups, batch_stats):
        """Saves what the backward needs on ``ctx``; returns the op's arguments (``x`` ...
        ``batch_stats``, the conv arguments as lists)."""
        ctx.ops, ctx.process_group, ctx.count = ops, process_group, count
        # an x made under torch.inference_mode cannot be saved: a normal copy is (eager PyTorch
        # saves the ReLU output instead, so it trains such an x when only the conv needs grads)
        ctx.save_for_backward(x.clone() if x.is_inference() else x, weight, bias, bn_weight, bn_bias, mean, invstd)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        ctx.batch_stats = batch_stats
        return (x, weight, bias, bn_weight, bn_bias, mean, invstd, *ctx.conv_args, batch_stats)

    @staticmethod
    def forward(ctx, ops, *args):
        return ops.bn_relu_conv2d(*BNReLUConv2dFunction._setup(ctx, ops, *args))

    @staticmethod
    def backward(ctx, grad_out):
        grads = BNReLUConv2dFunction._grads(ctx, grad_out, ctx.needs_input_grad[3:8])
        return (None, None, None, *grads, None, None, None, None, None, None, None)

    @staticmethod
    def _grads(ctx, grad_out, needs):
        """Gradients of ``(x, weight, bias, bn_weight, bn_bias)`` from what :meth:`_setup` saved;
        ``needs``: which of them autograd wants."""
        x, weight, bias, bn_weight, bn_bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            if ctx.process_group is not None and ctx.batch_stats:
                raise RuntimeError(DOUBLE_BACKWARD_SYNC_BN)
            grads = _double_backward_grads(grad_out, [x, weight, bias, bn_weight, bn_bias, mean, invstd], needs,
                                           ctx.conv_args, ctx.batch_stats)
        else:
            with clone_on_mutate_suspended():
                grads = bn_relu_conv2d_backward(
                    ctx.ops, grad_out, x, weight, bn_weight, bn_bias, mean, invstd, ctx.conv_args, ctx.batch_stats,
                    ctx.count, ctx.process_group, bias_grad=bias is not None and needs[2])
        return grads


class BNTrainReLUConv2dFunction(torch.autograd.Function):
    """:class:`BNReLUConv2dFunction` over the op set's optional ``bn_relu_conv2d_train`` (triton, native):
    the training forward with ``x``'s own batch statistics, taken (and the running statistics
    updated) in the same op as the conv: one call and one plan replay instead of two. The same
    backward (the statistics are saved as the op returned them)."""

    @staticmethod
    def forward(ctx, ops, count, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                stride, padding, dilation, groups):
        y, mean, invstd = ops.bn_relu_conv2d_train(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                                   momentum, eps, list(stride), list(padding), list(dilation), groups)
        BNReLUConv2dFunction._setup(ctx, ops, None, count, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride,
                                    padding, dilation, groups, True)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        grads = BNReLUConv2dFunction._grads(ctx, grad_out, ctx.needs_input_grad[2:7])
        return (None, None, *grads, None, None, None, None, None, None, None, None)


class BNReLUConv2dStatsFunction(BNReLUConv2dFunction):
    """:class:`BNReLUConv2dFunction` over the op that also returns its output's batch
    statistics (``ops.bn_relu_conv2d_stats``): ``(y, partials)``, the partials not
    differentiable (a BatchNorm that normalises with them has batch statistics, so its own
    backward carries their dependence on ``y``); the same backward."""

    @staticmethod
    def forward(ctx, ops, *args):
        y, partials = ops.bn_relu_conv2d_stats(*BNReLUConv2dFunction._setup(ctx, ops, *args))
        ctx.mark_non_differentiable(partials)
        return y, partials

    @staticmethod
    def backward(ctx, grad_out, _grad_partials):
        return BNReLUConv2dFunction.backward(ctx, grad_out)
