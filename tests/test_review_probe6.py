"""A sixth new-user trial: the dense block's other memory modes (``"naive"``, ``"checkpoint"``,
``"shared"`` with ``recompute="bottleneck"``) and the post-activation ResNet blocks with the
BatchNorm options (``momentum=None``, ``track_running_stats=False``, ``affine=False``) on triton
and native, BatchNorms frozen in eval inside a training block, and float16 / bfloat16 inputs
beside float32 BatchNorms (the usual mixed-precision layout: convs in the input's dtype,
BatchNorm parameters and statistics in float32), and the dtype layouts eager PyTorch refuses.
Results are judged against the same modules run unfused (eager PyTorch, float64) by the rule of
tests/reference.py.

The first test failed on main: a dense block refused a float16 / bfloat16 input beside float32
BatchNorms (every memory mode, every backend), which torchvision's dense block and every other
fused resfast module accept."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from resfast.nn.blocks import BasicBlock, Bottleneck, ResNeXtBottleneck
from resfast.nn.dense import DenseBlock, Transition
from module_judge import assert_unchanged as _assert_unchanged, compare_runs, judge_module as _judge_module, \
    scenario as _scenario, set_backend as _set_backend, state as _state, unfused as _unfused, \
    with_bn_options as _with_bn_options
from reference import require_backend as _require


def _low_precision_convs(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every parameter and floating-point buffer of ``m`` in ``dtype`` except those of its
    BatchNorms, which stay float32."""
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            continue
        mod._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
    return m


def _judge_mixed(build, backend, dtype, xshape, call=lambda m, x: m(x)):
    """``build()`` with its convs in ``dtype`` and its BatchNorms in float32, fused on
    ``backend``, through train / eval / train against the module unfused in float64 (ref64)
    and unfused in the same mixed dtypes (ref_same): every output, gradient and buffer by the
    rule of ``dtype``, each in the dtype eager PyTorch gives it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hooks' "runs unfused" warning
        base = build()
        ref64 = _scenario(_unfused(_set_backend(copy.deepcopy(base), "eager")).double(), torch.float64, xshape, call)
        same = _scenario(_low_precision_convs(_unfused(_set_backend(copy.deepcopy(base), "eager")), dtype), dtype,
                         xshape, call)
        got = _scenario(_low_precision_convs(_set_backend(copy.deepcopy(base), backend), dtype), dtype, xshape, call)
    compare_runs(got, ref64, same, f"{backend} {dtype}", dtype, same_dtype=True)


def _dense(memory, recompute="bn_relu", offset=0, seed=5):
    def build():
        torch.manual_seed(seed)
        return _with_bn_options(DenseBlock(2, 4, 2, 2, memory=memory, recompute=recompute), offset, seed=seed)
    return build


# ------------------------------------------------------------------ finding: float32 BatchNorms beside a half input

_MIXED = [  # (backend, dtype, memory, recompute); triton judged in float16 only, see the test's docstring
    ("eager", torch.bfloat16, "shared", "bn_relu"),
    ("native", torch.float16, "shared", "bn_relu"),
    ("native", torch.float16, "shared", "bottleneck"),
    ("native", torch.float16, "naive", "bn_relu"),
    ("native", torch.bfloat16, "checkpoint", "bn_relu"),
    ("triton", torch.float16, "shared", "bn_relu"),
]


@pytest.mark.parametrize("backend,dtype,memory,recompute", _MIXED,
                         ids=[f"{b}-{str(d)[6:]}-{m}-{r}" for b, d, m, r in _MIXED])
def test_dense_block_takes_float32_batchnorms_beside_a_half_input(backend, dtype, memory, recompute):
    """torchvision's dense block runs a float16 / bfloat16 input through convs of that dtype and
    BatchNorms kept in float32 (as does nn.BatchNorm2d, and every other fused resfast module),
    but resfast's dense block compared the input with its first parameter (a BatchNorm weight)
    and refused it in every memory mode. It now checks the convs' dtype and the BatchNorms'
    as nn.BatchNorm2d does; the result (BatchNorm options mixed across the block) is judged by
    the rule. Triton is judged in float16: in bfloat16 a chain of two BN-ReLU-convs puts some
    pre-ReLU values within bfloat16 rounding of zero, where triton's rounding (not eager's)
    can flip the ReLU and the gradient by O(1) (probed: the single op passes in bfloat16)."""
    _require(backend)
    from torchvision.models.densenet import _DenseBlock

    tv = _low_precision_convs(_DenseBlock(2, 4, 2, 2, 0.0), dtype)
    assert tv(torch.randn(2, 4, 4, 4, dtype=dtype)).dtype == dtype  # what eager PyTorch accepts
    _judge_mixed(_dense(memory, recompute, offset=0), backend, dtype, (2, 4, 4, 4))


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_dense_block_still_refuses_a_conv_in_another_dtype_than_the_input(backend):
    """One conv left in float32 beside a float16 input: torchvision's block raises (the conv's
    dtype check), and so does every memory mode here, before anything changes; also a
    transition whose conv is float32 under forward_with_transition."""
    _require(backend)
    from torchvision.models.densenet import _DenseBlock

    tv = _low_precision_convs(_DenseBlock(2, 4, 2, 2, 0.0), torch.float16)
    tv.denselayer2.conv1.float()
    with pytest.raises(RuntimeError):
        tv(torch.randn(2, 4, 4, 4, dtype=torch.float16))
    for memory in ("shared", "naive", "checkpoint"):
        block = _low_precision_convs(_set_backend(DenseBlock(2, 4, 2, 2, memory=memory), backend), torch.float16)
        block.denselayer2.conv1.float()
        before = _state(block)
        with pytest.raises(TypeError, match=r"float16 but the block's parameters are torch.float32 "
                                            r"\(denselayer2.conv1.weight\)"):
            block(torch.randn(2, 4, 4, 4, dtype=torch.float16, requires_grad=True))
        _assert_unchanged(block, before, f"{backend} {memory}")
    pair = nn.ModuleDict(dict(block=DenseBlock(2, 4, 2, 2), trans=Transition(8, 3)))
    pair = _low_precision_convs(_set_backend(pair, backend), torch.float16)
    pair["trans"].conv.float()
    before = _state(pair)
    with pytest.raises(TypeError, match=r"\(conv.weight\)"):
        pair["block"].forward_with_transition(torch.randn(2, 4, 4, 4, dtype=torch.float16), pair["trans"])
    _assert_unchanged(pair, before, f"{backend} forward_with_transition")


def test_transition_fused_into_the_block_beside_a_half_input():
    """forward_with_transition (the transition's BN-ReLU-pool-conv inside the shared block) with
    float32 BatchNorms beside a float16 input on native, by the rule."""
    _require("native")

    def build():
        torch.manual_seed(2)
        return _with_bn_options(nn.ModuleDict(dict(block=DenseBlock(2, 4, 2, 2), trans=Transition(8, 3))), seed=2)

    def call(m, x):
        if any(bn._forward_hooks for bn in m.modules()):
            return m["trans"](m["block"](x))
        return m["block"].forward_with_transition(x, m["trans"])

    _judge_mixed(build, "native", torch.float16, (2, 4, 4, 4), call)


# ------------------------------------------------------------------ verified correct: BatchNorm options


_DENSE = {  # name: (memory, recompute, offset of the BatchNorm options)
    "naive": ("naive", "bn_relu", 1),
    "checkpoint": ("checkpoint", "bn_relu", 0),
    "shared_recompute_bottleneck": ("shared", "bottleneck", 2),
}


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("name", list(_DENSE))
def test_dense_block_memory_modes_with_batchnorm_options(name, backend):
    """momentum=None, track_running_stats=False and affine=False mixed across the block's
    BatchNorms, through train / eval / train, in each remaining memory mode: outputs, every
    gradient, the running statistics and num_batches_tracked as the block run unfused (native
    judged in float64, triton in float32; all three option offsets probed on both)."""
    _require(backend)
    memory, recompute, offset = _DENSE[name]
    _judge_module(_dense(memory, recompute, offset, seed=2), backend, (2, 4, 4, 4))


def _basic(offset):
    def build():
        torch.manual_seed(3)
        ds = nn.Sequential(nn.Conv2d(4, 3, 1, stride=2, bias=False), nn.BatchNorm2d(3))
        return _with_bn_options(BasicBlock(4, 3, stride=2, downsample=ds), offset)
    return build


def _bottleneck(offset):
    def build():
        torch.manual_seed(4)
        ds = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))
        return _with_bn_options(Bottleneck(4, 2, downsample=ds), offset)
    return build


@pytest.mark.parametrize("build", [_basic(0), _bottleneck(1)], ids=["BasicBlock_stride2", "Bottleneck"])
def test_post_activation_blocks_with_batchnorm_options_on_triton(build):
    """The post-activation blocks (bn1 fused into conv2, bn2 into conv3, bn3 and the
    downsample's BatchNorm eager) with the three options mixed: as the block run unfused
    (every offset probed on triton and native)."""
    _require("triton")
    _judge_module(build, "triton", (2, 4, 5, 5))


# ------------------------------------------------------------------ verified correct: a frozen BatchNorm


class _FrozenBatchNorm(nn.BatchNorm2d):
    """A BatchNorm that stays in eval when its model trains (a common fine-tuning setup)."""

    def train(self, mode: bool = True):
        return super().train(False)


def _frozen(build_module, names, seed=7):
    def build():
        torch.manual_seed(seed)
        m = _with_bn_options(build_module(), 1, seed=seed)
        for name in names:
            m.get_submodule(name).__class__ = _FrozenBatchNorm
        return m
    return build


@pytest.mark.parametrize("backend,case", [("triton", "ResNeXt_bn2"), ("native", "DenseBlock_shared")])
def test_batchnorms_frozen_in_eval_inside_a_training_block(backend, case):
    """A BatchNorm in eval inside a training block: a ResNeXt bottleneck whose bn2 (the one that
    takes its statistics from conv2's epilogue on triton) is frozen, and a shared dense block
    with two of its BatchNorms frozen: as the block run unfused (probed also with the dense
    block's other modes, post-activation and pre-activation blocks, on both backends)."""
    _require(backend)
    if case == "ResNeXt_bn2":
        ds = lambda: nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))  # noqa: E731
        build = _frozen(lambda: ResNeXtBottleneck(4, 2, downsample=ds(), cardinality=2, base_width=64), ["bn2"])
        xshape = (2, 4, 5, 5)
    else:
        build = _frozen(lambda: DenseBlock(2, 4, 2, 2), ["denselayer1.norm2", "denselayer2.norm1"])
        xshape = (2, 4, 4, 4)
    _judge_module(build, backend, xshape)


# ------------------------------------------------------------------ verified correct: dtype refusals


def _batchnorms_to(m: nn.Module, dtype: torch.dtype, stats_only: bool = False) -> nn.Module:
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            if not stats_only:
                bn._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
            elif bn.running_mean is not None:
                bn.running_mean, bn.running_var = bn.running_mean.to(dtype), bn.running_var.to(dtype)
    return m


_REFUSED = {  # what nn.BatchNorm2d / nn.Conv2d refuse: (input dtype, how the module is laid out)
    "float16_input_float32_module": (torch.float16, lambda m: m),
    "bfloat16_input_float16_batchnorms": (torch.bfloat16,
                                          lambda m: _batchnorms_to(_low_precision_convs(m, torch.bfloat16),
                                                                   torch.float16)),
    "float16_statistics_beside_float32_batchnorm_parameters": (
        torch.float16, lambda m: _batchnorms_to(_low_precision_convs(m, torch.float16), torch.float16, True)),
    "float32_input_float16_batchnorms": (torch.float32, lambda m: _batchnorms_to(m, torch.float16)),
}


@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
def test_dtype_layouts_eager_refuses_are_refused_before_anything_changes(backend):
    """Input / conv / BatchNorm dtype layouts that eager PyTorch refuses (a float16 input into a
    float32 module, float16 BatchNorms beside a bfloat16 input, float16 statistics beside float32
    BatchNorm parameters, float16 BatchNorms beside a float32 input), through the fused modules
    whose every BatchNorm is fused, in training (BatchNorm options mixed): refused, and nothing
    changed, as the unfused module refuses them (post-activation blocks probed too: there only
    the eager downsample BatchNorm moves first, as in torchvision's blocks)."""
    _require(backend)
    import resfast
    from resfast.nn.blocks import PreActBottleneck, WideBasic
    from resfast.nn.dense import DenseLayer

    modules = {
        "BNReLUConv2d": (lambda: resfast.BNReLUConv2d(4, 3, 3, padding=1, bias=True), (2, 4, 5, 5)),
        "WideBasic": (lambda: WideBasic(4, 3, stride=2), (2, 4, 5, 5)),
        "PreActBottleneck": (lambda: PreActBottleneck(4, 2), (2, 4, 5, 5)),
        "Transition": (lambda: Transition(4, 3), (2, 4, 6, 6)),
        "DenseLayer_checkpoint": (lambda: DenseLayer(4, 2, 2, memory="checkpoint"), (2, 4, 4, 4)),
        **{f"DenseBlock_{mem}": (lambda mem=mem: DenseBlock(2, 4, 2, 2, memory=mem), (2, 4, 4, 4))
           for mem in ("shared", "naive", "checkpoint")},
    }
    for name, (build, xshape) in modules.items():
        for case, (dtype, layout) in _REFUSED.items():
            torch.manual_seed(0)
            base = _with_bn_options(build(), 0)
            x = torch.randn(*xshape).to(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises((RuntimeError, TypeError)):  # the reference: the module run unfused
                    layout(_unfused(copy.deepcopy(base)))(x)
            m = layout(_set_backend(copy.deepcopy(base), backend)).train()
            before = _state(m)
            with pytest.raises((TypeError, ValueError, RuntimeError)):
                m(x.clone().requires_grad_(True))
            _assert_unchanged(m, before, f"{backend} {name} {case}")
