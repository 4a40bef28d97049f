"""Residual blocks: shapes, backend equivalence against an unfused float64 reference, BN
bookkeeping, dropout, and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import assert_rule
from resfast.backends import BackendUnavailableError, backend_status
from resfast.ops.opsets import get_ops
from resfast.nn.blocks import (BasicBlock, Bottleneck, PreActBottleneck, ResNeXtBottleneck, SEModule, WideBasic,
                               conv1x1)

BACKENDS = ("eager", "triton", "native")


def _ds(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


# name -> (factory, input shape, expected output shape)
CASES = {
    "basic": (lambda b: BasicBlock(4, 4, backend=b), (2, 4, 5, 5), (2, 4, 5, 5)),
    "basic_stride2_downsample": (lambda b: BasicBlock(4, 6, 2, _ds(4, 6, 2), backend=b), (2, 4, 5, 5), (2, 6, 3, 3)),
    "bottleneck_stride2": (lambda b: Bottleneck(8, 2, 2, _ds(8, 8, 2), backend=b), (1, 8, 5, 7), (1, 8, 3, 4)),
    "resnext_c2": (lambda b: ResNeXtBottleneck(8, 4, 1, _ds(8, 16, 1), cardinality=2, base_width=32, backend=b),
                   (2, 8, 5, 5), (2, 16, 5, 5)),
    "resnext_depthwise_se": (lambda b: Bottleneck(8, 2, 1, None, groups=4, base_width=32, se=True, backend=b),
                             (2, 8, 3, 5), (2, 8, 3, 5)),
    "wide_identity": (lambda b: WideBasic(4, 4, backend=b), (2, 4, 5, 5), (2, 4, 5, 5)),
    "wide_stride2_shortcut": (lambda b: WideBasic(3, 6, 2, backend=b), (2, 3, 5, 5), (2, 6, 3, 3)),
    "preact_shortcut": (lambda b: PreActBottleneck(4, 2, 2, backend=b), (2, 4, 5, 5), (2, 8, 3, 3)),
    "preact_identity": (lambda b: PreActBottleneck(8, 2, backend=b), (1, 8, 3, 3), (1, 8, 3, 3)),
}


def _randomize(block: nn.Module) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (never ones / zeros only)."""
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return block


def _se_ref(se: SEModule, y):
    s = y.mean((2, 3), keepdim=True)
    return y * torch.sigmoid(se.fc2(F.relu(se.fc1(s))))


def reference_forward(block: nn.Module, x, dropout_rng: bool = False):
    """The block written out unfused with plain modules, each BN called exactly once."""
    if isinstance(block, BasicBlock):
        out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        ident = x if block.downsample is None else block.downsample(x)
        return F.relu(out + ident)
    if isinstance(block, Bottleneck):
        out = F.relu(block.bn1(block.conv1(x)))
        out = F.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
        if block.se is not None:
            out = _se_ref(block.se, out)
        ident = x if block.downsample is None else block.downsample(x)
        return F.relu(out + ident)
    if isinstance(block, WideBasic):
        a = F.relu(block.bn1(x))
        h = F.relu(block.bn2(block.conv1(a)))
        h = F.dropout(h, block.dropout, training=block.training and block.dropout > 0)
        return block.conv2(h) + (x if block.shortcut is None else block.shortcut(a))
    if isinstance(block, PreActBottleneck):
        a = F.relu(block.bn1(x))
        out = block.conv1(a)
        out = block.conv2(F.relu(block.bn2(out)))
        out = block.conv3(F.relu(block.bn3(out)))
        return out + (x if block.shortcut is None else block.shortcut(a))
    raise AssertionError(type(block))


def _backend_skip_reason(name: str, device: str = "cpu") -> str:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device here"
    why = backend_status(device)[name]
    if why:
        return why
    try:
        get_ops(name)
    except (ImportError, BackendUnavailableError) as exc:  # op set not landed / not loadable
        return f"backend {name!r} op set is not loadable here: {exc}"
    return ""


def _run(block, x, grad_out, fn):
    x = x.detach().clone().requires_grad_(True)
    out = fn(block, x)
    out.backward(grad_out)
    grads = {n: p.grad for n, p in block.named_parameters()}
    return out, x.grad, grads, {n: b.clone() for n, b in block.named_buffers()}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_block_matches_unfused_reference(case, backend, device):
    """Train-mode forward + backward and eval-mode forward of every block on every backend
    that runs here, against the unfused block in float64 on the CPU (the float64 rule of docs/design.md): output,
    input and parameter gradients, updated running statistics and num_batches_tracked."""
    why = _backend_skip_reason(backend, device)
    if why:
        pytest.skip(why)
    factory, in_shape, out_shape = CASES[case]
    torch.manual_seed(sum(map(ord, case)))
    base = _randomize(factory("eager"))
    x = torch.randn(in_shape)
    if case == "bottleneck_stride2":
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(out_shape)
    ctx = f"case={case} backend={backend} device={device} x={tuple(in_shape)}"

    ref64 = _run(copy.deepcopy(base).double(), x.double(), grad_out.double(), reference_forward)
    x, grad_out = x.to(device), grad_out.to(device)
    ref32 = _run(copy.deepcopy(base).to(device), x, grad_out, reference_forward)
    blk = copy.deepcopy(base).to(device)
    blk.backend = backend
    got = _run(blk, x, grad_out, lambda m, t: m(t))

    assert got[0].shape == out_shape
    assert_rule("output", got[0], ref64[0], ref32[0], ctx)
    assert_rule("grad x", got[1], ref64[1], ref32[1], ctx)
    assert set(got[2]) == set(ref64[2])
    for name in ref64[2]:
        assert got[2][name] is not None, f"{name} got no gradient ({ctx})"
        assert_rule(f"grad {name}", got[2][name], ref64[2][name], ref32[2][name], ctx)
    for name, buf in ref64[3].items():
        if name.endswith("num_batches_tracked"):
            assert int(got[3][name]) == int(buf) == 1, f"{name} ({ctx})"
        else:
            assert_rule(name, got[3][name], buf, ref32[3][name], ctx)

    # eval: running statistics normalise, nothing is updated
    blk.eval()
    ref_blk64, ref_blk32 = copy.deepcopy(blk).double(), copy.deepcopy(blk)
    with torch.no_grad():
        before = {n: b.clone() for n, b in blk.named_buffers()}
        y = blk(x)
        ref_eval64 = reference_forward(ref_blk64.cpu(), x.double().cpu())
        assert_rule("eval output", y, ref_eval64, reference_forward(ref_blk32, x), ctx)
        for n, b in blk.named_buffers():
            assert torch.equal(b, before[n]), f"eval forward changed {n} ({ctx})"


@pytest.mark.parametrize("cls", [WideBasic, PreActBottleneck])
def test_preact_shortcut_updates_running_stats_once(cls):
    """bn1 feeds both conv1 and the 1x1 shortcut; its statistics move once per forward."""
    blk = cls(3, 4, 2) if cls is WideBasic else cls(3, 2, 2)
    assert blk.shortcut is not None
    x = torch.randn(2, 3, 5, 5) * 2 + 0.7
    blk(x)
    blk(x)
    assert int(blk.bn1.num_batches_tracked) == 2
    mean = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=True)
    expect_mean = 0.1 * mean + 0.9 * 0.1 * mean  # two updates from zero
    expect_var = 0.9 * (0.9 * 1 + 0.1 * var) + 0.1 * var
    torch.testing.assert_close(blk.bn1.running_mean, expect_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blk.bn1.running_var, expect_var, rtol=1e-5, atol=1e-6)

    blk.bn1.momentum = None  # cumulative average: after 3 equal batches it is the batch mean
    blk.bn1.reset_running_stats()
    for _ in range(3):
        blk(x)
    assert int(blk.bn1.num_batches_tracked) == 3
    torch.testing.assert_close(blk.bn1.running_mean, mean, rtol=1e-5, atol=1e-6)


def test_widebasic_dropout_only_in_training():
    torch.manual_seed(3)
    blk = _randomize(WideBasic(4, 4, dropout=0.5))
    no_drop = copy.deepcopy(blk)
    no_drop.dropout = 0.0
    x = torch.randn(2, 4, 5, 5)

    blk.eval(), no_drop.eval()
    with torch.no_grad():
        torch.testing.assert_close(blk(x), no_drop(x), rtol=0, atol=0)  # identity in eval

    blk.train(), no_drop.train()
    ref = copy.deepcopy(blk)
    torch.manual_seed(11)
    y1 = blk(x)
    torch.manual_seed(11)
    y_ref = reference_forward(ref, x)  # same RNG stream -> the same dropout mask
    torch.testing.assert_close(y1, y_ref, rtol=1e-5, atol=1e-5)
    y_nodrop = no_drop(x)
    assert (y1 - y_nodrop).abs().max() > 1e-3, "dropout had no effect in training"
    torch.manual_seed(12)
    assert not torch.equal(blk(x), y1), "two training passes with different seeds gave the same dropout"


def test_se_module_layout_and_gate():
    se = SEModule(256)
    assert se.fc1.out_channels == 16 and se.fc2.out_channels == 256  # 256 / 16, multiple of 8
    assert SEModule(64).fc1.out_channels == 8  # rounded up to rd_divisor
    assert se.fc1.bias is not None and se.fc2.bias is not None
    x = torch.randn(2, 256, 3, 3)
    y = se(x)
    gate = (y / x).detach()
    # one gate in (0, 1) per (image, channel), constant over space
    assert torch.allclose(gate, gate[:, :, :1, :1].expand_as(gate), atol=1e-5)
    assert float(gate.min()) > 0 and float(gate.max()) < 1


@pytest.mark.parametrize("cls,kwargs,channels", [
    (BasicBlock, dict(inplanes=10, planes=10), (10, 10)),
    (Bottleneck, dict(inplanes=32, planes=8), (8, 32)),
    (Bottleneck, dict(inplanes=32, planes=8, groups=4, base_width=8), (4, 32)),
    (ResNeXtBottleneck, dict(inplanes=256, planes=64, cardinality=32, base_width=4), (128, 256)),
    (ResNeXtBottleneck, dict(inplanes=256, planes=64, cardinality=8, base_width=14), (112, 256)),
    (WideBasic, dict(in_planes=16, planes=160), (160, 160)),
    (PreActBottleneck, dict(in_planes=64, planes=16), (16, 64)),
])
def test_block_channel_counts(cls, kwargs, channels):
    """Grouped widths follow int(planes * base_width / 64) * groups; outputs planes * expansion."""
    with torch.device("meta"):
        blk = cls(**kwargs)
    width, out = channels
    assert blk.conv2.in_channels == width or isinstance(blk, WideBasic)
    assert blk.conv2.out_channels == width
    last = blk.conv3 if hasattr(blk, "conv3") else blk.conv2
    assert last.out_channels == out
    y = blk(torch.empty(2, next(iter(kwargs.values())), 7, 7, device="meta"))
    assert tuple(y.shape) == (2, out, 7, 7)


# ---------------------------------------------------------------------------- bad input


def test_wrong_channel_count_is_rejected_without_side_effects():
    blk = Bottleneck(8, 2)
    with pytest.raises(ValueError, match=r"x has 6 channels.*in_channels=8"):
        blk(torch.randn(2, 6, 5, 5))
    assert int(blk.bn1.num_batches_tracked) == 0
    for cls, args in ((WideBasic, (4, 4)), (PreActBottleneck, (4, 1)), (BasicBlock, (4, 4))):
        with pytest.raises(ValueError, match="in_channels=4"):
            cls(*args)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        BasicBlock(4, 4)(torch.randn(4, 5, 5))


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match=r"groups=3 does not divide .*width=64"):
        Bottleneck(64, 16, groups=3, width=64)
    with pytest.raises(ValueError, match=r"cardinality=3 does not divide width=64"):
        ResNeXtBottleneck(64, 16, cardinality=3, width=64)
    with pytest.raises(ValueError, match=r"groups must be a positive int, got 0"):
        Bottleneck(64, 16, groups=0)
    with pytest.raises(ValueError, match=r"BasicBlock only supports groups=1.*groups=2"):
        BasicBlock(64, 64, groups=2)
    with pytest.raises(ValueError, match=r"planes=2 with base_width=4"):
        ResNeXtBottleneck(8, 2, cardinality=4, base_width=4)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got 1.5"):
        WideBasic(4, 4, dropout=1.5)
    with pytest.raises(ValueError, match=r"in_planes must be a positive int, got 0"):
        PreActBottleneck(0, 4)
    with pytest.raises(ValueError, match=r"inplanes=6, planes \* expansion=10, stride=1.*downsample"):
        BasicBlock(6, 10)
    with pytest.raises(ValueError, match=r"inplanes=64, planes \* expansion=64, stride=2.*downsample"):
        Bottleneck(64, 16, stride=2)
    with pytest.raises(ValueError, match=r"stride must be a positive int"):
        BasicBlock(4, 4, stride=0)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        WideBasic(4, 4, backend="cuda")
    with pytest.raises(ValueError, match=r"backend='triton' fuses BatchNorm .* GroupNorm"):
        BasicBlock(4, 4, norm_layer=lambda c: nn.GroupNorm(2, c), backend="triton")


def test_non_batchnorm_norm_layer_runs_unfused():
    gn = lambda c: nn.GroupNorm(2, c)  # noqa: E731
    blk = Bottleneck(8, 2, norm_layer=gn)
    x = torch.randn(2, 8, 4, 4)
    out = F.relu(blk.bn1(blk.conv1(x)))
    out = F.relu(blk.bn2(blk.conv2(out)))
    torch.testing.assert_close(blk(x), F.relu(blk.bn3(blk.conv3(out)) + x))


@pytest.mark.parametrize("cls,args", [(BasicBlock, (4, 4)), (Bottleneck, (4, 1)), (WideBasic, (4, 4)),
                                      (PreActBottleneck, (4, 1)), (ResNeXtBottleneck, (4, 1, 1, None, 2, 128))])
def test_unavailable_backend_raises_with_reason(cls, args, monkeypatch):
    """A named backend that cannot run raises BackendUnavailableError saying why, before any
    running statistic moves."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton cannot run CPU tensors without the interpreter
    why = backend_status("cpu")["triton"]
    assert why, "expected triton to be unavailable on CPU tensors without TRITON_INTERPRET"
    blk = cls(*args, backend="triton")
    with pytest.raises(BackendUnavailableError, match="backend='triton' cannot run on cpu tensors") as info:
        blk(torch.randn(2, 4, 4, 4))
    assert why in str(info.value)
    assert all(int(m.num_batches_tracked) == 0 for m in blk.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(float(m.running_mean.abs().sum()) == 0 for m in blk.modules() if isinstance(m, nn.BatchNorm2d))
