"""``torch.compile``: zero graph breaks for every model family of the zoo on every backend,
and every registered model is one of the families checked here.

Graph breaks are counted with ``torch._dynamo.explain`` (Dynamo only, no code generation), on
the smallest member of each family (the families share their code paths across depths), in
training mode with gradients, as a training step traces them. Dynamo's time is the Python it
traces: the DenseNets here have two one-layer blocks and one transition (every DenseNet code
path: block, transition between blocks, the last block, norm5), and the ImageNet stem is the
shared DenseNet's (under tracing it runs as its modules in every memory mode; the CIFAR stem,
one conv, is the checkpoint and naive DenseNets').
"""
from __future__ import annotations

import pytest
import torch

import resfast
from resfast.backends import backend_status
from resfast.models.densenet import DenseNet
from resfast.models.preact_resnet import PreActResNet
from resfast.models.resnet import ResNet
from resfast.models.resnext import CifarResNeXt
from resfast.models.wide_resnet import WideResNet, wide_resnet
from resfast.nn.blocks import BasicBlock, Bottleneck

BACKENDS = ("eager", "native", "triton")

def _cifar_densenet(backend, memory):
    """densenet_bc's layout (2k-channel 3x3 stem, 4k bottleneck, compression 0.5) with two
    one-layer blocks."""
    return DenseNet(4, (1, 1), 8, 4, num_classes=4, backend=backend, memory=memory, stem="cifar")


# family -> (builder of a small member, input size)
FAMILIES = {
    "resnet_basic": (lambda be: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4, backend=be), 32),
    "resnext_se_bottleneck": (lambda be: ResNet(Bottleneck, [1, 1, 1, 1], num_classes=4, groups=32,
                                                width_per_group=2, se=True, backend=be), 32),
    "wide_resnet": (lambda be: wide_resnet(10, 1, num_classes=4, dropout=0.1, backend=be), 16),
    "cifar_resnext": (lambda be: CifarResNeXt(11, 4, 4, num_classes=4, backend=be), 16),
    "preact_resnet": (lambda be: PreActResNet(11, num_classes=4, backend=be), 16),
    "densenet_shared_imagenet_stem": (lambda be: DenseNet(4, (1, 1), 8, num_classes=4, backend=be, memory="shared"),
                                      32),
    "densenet_checkpoint": (lambda be: _cifar_densenet(be, "checkpoint"), 16),
    "densenet_naive": (lambda be: _cifar_densenet(be, "naive"), 16),
}

# Every registered model belongs to one of the families above.
MODEL_FAMILY = {
    ResNet: ("resnet_basic", "resnext_se_bottleneck"),
    WideResNet: ("wide_resnet",),
    CifarResNeXt: ("cifar_resnext",),
    PreActResNet: ("preact_resnet",),
    DenseNet: ("densenet_shared_imagenet_stem", "densenet_checkpoint", "densenet_naive"),
}


def test_every_registered_model_is_covered():
    from resfast.models import list_models, model_info

    for name in list_models():
        cls = model_info(name).builder.__annotations__.get("return")
        model_cls = {c.__name__: c for c in MODEL_FAMILY}.get(cls if isinstance(cls, str) else cls.__name__)
        assert model_cls is not None, f"{name} builds a {cls}, which no family here covers"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_graph_breaks(family, backend, monkeypatch):
    why = backend_status("cpu")[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on cpu: {why}")
    if backend == "triton":
        # explain() runs the traced graph once. Dynamo sees each triton op as one opaque
        # torch.library op (graph breaks depend on the Python around the calls, never on what
        # a kernel computes), and under TRITON_INTERPRET=1 the kernels of a 512-channel ResNet
        # take minutes on a 2-core CPU; so the launches are skipped here (the outputs are
        # unwritten buffers of the right shape). The kernels' numbers are checked in
        # test_triton_ops.py, test_bn_relu_conv2d.py, test_dense.py and test_blocks.py.
        from resfast.ops import triton_ops

        monkeypatch.setattr(triton_ops, "_run", lambda launches, x: None)
    build, size = FAMILIES[family]
    torch.manual_seed(0)
    model = build(backend).train()
    x = torch.randn(2, 3, size, size)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    reasons = [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, f"{family} on {backend}: {reasons}"
    assert explained.graph_count == 1


def test_compiled_shared_densenet_training_step_matches_eager():
    """A fullgraph-compiled training step of a shared-block DenseNet gives eager's gradients."""
    torch.manual_seed(0)
    ref = _cifar_densenet("eager", "shared")
    net = _cifar_densenet("eager", "shared")
    net.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    compiled(x).logsumexp(1).sum().backward()
    ref(x).logsumexp(1).sum().backward()
    for (n, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert resfast is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_reduce_overhead_compile_of_the_fused_op_matches_the_uncompiled_op(backend):
    """``torch.compile(mode="reduce-overhead")`` (what captures a training step in CUDA graphs
    on a GPU, where the triton backend's host time goes away) lowers the fused op through
    inductor: same output, input and parameter gradients and running statistics as the
    uncompiled op (on the CPU inductor runs without graphs, so the lowering is what is checked)."""
    why = backend_status("cpu")[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on cpu: {why}")
    from torch import nn

    from resfast.functional import bn_relu_conv2d

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)

        def forward(self, x):
            return bn_relu_conv2d(x, self.conv.weight, bn_weight=self.bn.weight, bn_bias=self.bn.bias,
                                  running_mean=self.bn.running_mean, running_var=self.bn.running_var, training=True,
                                  padding=1, groups=2, backend=backend)

    torch.manual_seed(0)
    ref, mod = Fused(), Fused()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 2, 5)  # the same kernels as larger inputs (two images, a masked edge)
    gy = torch.randn(2, 8, 2, 5)
    torch._dynamo.reset()
    compiled = torch.compile(mod, mode="reduce-overhead", fullgraph=True)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y_c = compiled(xs[0])
    y_c.backward(gy)
    y_r = ref(xs[1])
    y_r.backward(gy)
    torch.testing.assert_close(y_c, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(mod.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=n)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(mod.bn, name), getattr(ref.bn, name), msg=name)
