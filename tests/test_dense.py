"""DenseLayer / DenseBlock / Transition: the memory modes agree with each other and with a
float64 reference (the float64 rule of docs/design.md), on every backend that runs here."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reference import assert_rule
from resfast.backends import backend_status
from resfast.nn.dense import DenseBlock, DenseLayer, Transition

RECOMPUTE = ("bn_relu", "bottleneck")
MODES = [("naive", "bn_relu"), ("checkpoint", "bn_relu"), ("shared", "bn_relu"), ("shared", "bottleneck")]


def _backends():
    """(backend, skip reason) for every backend; triton only under its interpreter with tiny shapes."""
    status = backend_status("cpu")
    out = []
    for name in ("eager", "triton", "native"):
        reason = status[name]
        if not reason:
            try:
                from resfast.ops.opsets import get_ops

                get_ops(name)
            except Exception as exc:  # the backend's op set is not importable yet
                reason = f"the {name} op set cannot be loaded: {type(exc).__name__}: {exc}"
        out.append(pytest.param(name, marks=pytest.mark.skipif(bool(reason), reason=reason or "runs")))
    return out


def _randomise(block: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _make(num_layers, c0, bn_size, k, memory, recompute, backend, drop=0.0, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    block = DenseBlock(num_layers, c0, bn_size, k, drop, memory=memory, recompute=recompute, backend=backend)
    _randomise(block, seed)
    return block.to(dtype)


def _step(block, x, grad, train=True, drop_seed=123):
    """Output, input grad, parameter grads and buffers after one forward/backward."""
    block.train(train)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(drop_seed)
    y = block(x)
    y.backward(grad.to(y.dtype))
    grads = {n: p.grad.detach().clone() for n, p in block.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in block.named_buffers()}
    return y.detach(), x.grad.detach(), grads, bufs


def _inputs(shape, seed, dtype, channels_last=False, prefix_view=False):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if prefix_view:  # a channel-prefix view of a larger tensor
        x = (torch.randn(n, c + 3, h, w, generator=gen) * 1.5 + 0.3).to(dtype)[:, :c]
    else:
        x = (torch.randn(n, c, h, w, generator=gen) * 1.5 + 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _compare(out, ref64, ref_same, context, dtype):
    names = ["output", "grad_x"]
    for i, name in enumerate(names):
        assert_rule(name, out[i], ref64[i], ref_same[i], context, dtype=dtype)
    for key in ref64[2]:
        assert_rule(f"grad {key}", out[2][key], ref64[2][key], ref_same[2][key], context, dtype=dtype)
    for key in ref64[3]:
        if key.endswith("num_batches_tracked"):
            assert torch.equal(out[3][key], ref64[3][key]), f"{key}: {out[3][key]} != {ref64[3][key]} ({context})"
        else:
            assert_rule(key, out[3][key], ref64[3][key], ref_same[3][key], context, dtype=dtype)


# Tiny shapes: odd H/W, N=1 and N=2, channel counts that match no block size.
EAGER_CASES = [
    dict(num_layers=3, c0=5, bn_size=2, k=3, shape=(2, 5, 5, 7)),
    dict(num_layers=4, c0=7, bn_size=4, k=4, shape=(1, 7, 6, 5)),
    dict(num_layers=2, c0=3, bn_size=3, k=5, shape=(3, 3, 4, 4)),
]

TINY_CASE = dict(num_layers=2, c0=3, bn_size=2, k=2, shape=(2, 3, 3, 5))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("memory,recompute", MODES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "prefix_view"])
def test_block_modes_match_float64_reference(backend, memory, recompute, layout):
    if backend != "eager" and (memory != "shared" or layout == "channels_last"):
        pytest.skip("on non-eager backends only the shared modes, NCHW and prefix views run here (naive and "
                    "checkpoint use the fused op, tested in its own file; channels_last runs on eager), which "
                    "keeps the Triton interpreter's time down")
    cases = EAGER_CASES if backend == "eager" else [TINY_CASE]
    dtype = torch.float32
    for ci, case in enumerate(cases):
        shape = case["shape"]
        args = (case["num_layers"], case["c0"], case["bn_size"], case["k"])
        x = _inputs(shape, 10 + ci, dtype, layout == "channels_last", layout == "prefix_view")
        n_out = case["c0"] + case["num_layers"] * case["k"]
        grad = torch.randn(shape[0], n_out, shape[2], shape[3], generator=torch.Generator().manual_seed(ci))
        ref64 = _step(_make(*args, "naive", "bn_relu", "eager", dtype=torch.float64), x.double(), grad.double())
        ref_same = _step(_make(*args, "naive", "bn_relu", "eager", dtype=dtype), x, grad)
        out = _step(_make(*args, memory, recompute, backend, dtype=dtype), x, grad)
        _compare(out, ref64, ref_same, f"case {case}, {memory}/{recompute}, {backend}, {layout}", dtype)


@pytest.mark.parametrize("memory,recompute", MODES)
def test_block_modes_float64_exact_and_eval(memory, recompute):
    """float64 on eager: every mode equals naive to rounding, in training and in eval."""
    args = (3, 6, 2, 4)
    x = _inputs((2, 6, 5, 5), 3, torch.float64)
    grad = torch.randn(2, 18, 5, 5, dtype=torch.float64)
    for train in (True, False):
        ref = _step(_make(*args, "naive", "bn_relu", "eager"), x, grad, train=train)
        out = _step(_make(*args, memory, recompute, "eager"), x, grad, train=train)
        _compare(out, ref, ref, f"{memory}/{recompute} train={train}", torch.float64)


@pytest.mark.parametrize("memory,recompute", MODES)
def test_dropout_same_mask_in_forward_and_backward(memory, recompute):
    """With drop_rate > 0 every mode draws the same mask as torchvision's F.dropout (CPU) and
    the backward uses that same mask: outputs and gradients equal naive's."""
    args = (3, 4, 2, 3)
    x = _inputs((2, 4, 5, 6), 5, torch.float64)
    grad = torch.randn(2, 13, 5, 6, dtype=torch.float64)
    ref = _step(_make(*args, "naive", "bn_relu", "eager", drop=0.4), x, grad)
    out = _step(_make(*args, memory, recompute, "eager", drop=0.4), x, grad)
    new = ref[0][:, 4:]
    assert (new == 0).float().mean() > 0.2, "dropout did not drop anything: the test would prove nothing"
    _compare(out, ref, ref, f"dropout {memory}/{recompute}", torch.float64)


def test_dropout_only_in_training():
    block = _make(2, 4, 2, 3, "shared", "bn_relu", "eager", drop=0.5, dtype=torch.float32).eval()
    x = _inputs((2, 4, 5, 5), 1, torch.float32)
    with torch.no_grad():
        a, b = block(x), block(x)
    assert torch.equal(a, b)
    assert (a[:, 4:] != 0).float().mean() > 0.9


@pytest.mark.parametrize("memory,recompute", MODES)
def test_no_grad_and_eval_match_naive(memory, recompute):
    args = (3, 5, 2, 3)
    x = _inputs((2, 5, 4, 5), 2, torch.float64)
    for train in (True, False):
        ref, out = _make(*args, "naive", "bn_relu", "eager"), _make(*args, memory, recompute, "eager")
        ref.train(train)
        out.train(train)
        with torch.no_grad():
            y_ref, y = ref(x), out(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        for (name, b_ref), (_, b) in zip(ref.named_buffers(), out.named_buffers()):
            torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12, msg=f"{name} train={train}")


def test_running_stats_updated_once_unlike_torchvision_checkpoint():
    """resfast updates each BN's running statistics once per forward in every mode;
    torchvision's memory_efficient=True updates norm1's twice (the checkpoint recompute)."""
    tv_dense = pytest.importorskip("torchvision.models.densenet")
    args = (3, 4, 2, 3)
    x = _inputs((2, 4, 5, 5), 7, torch.float64)
    grad = torch.randn(2, 13, 5, 5, dtype=torch.float64)
    naive = _make(*args, "naive", "bn_relu", "eager")
    expected = _step(naive, x, grad)[3]
    for memory, recompute in MODES[1:]:
        got = _step(_make(*args, memory, recompute, "eager"), x, grad)[3]
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12, msg=f"{key} ({memory})")
    tv = tv_dense._DenseBlock(*args, drop_rate=0.0, memory_efficient=True).double()
    ours = _make(*args, "shared", "bn_relu", "eager")
    tv.load_state_dict(ours.state_dict())
    mean0 = ours.denselayer1.norm1.running_mean.clone()
    tv_bufs, our_bufs = _step(tv, x, grad)[3], _step(ours, x, grad)[3]
    key = "denselayer1.norm1"
    batch_mean = x.mean(dim=(0, 2, 3))
    once = mean0 * 0.9 + 0.1 * batch_mean
    twice = once * 0.9 + 0.1 * batch_mean
    torch.testing.assert_close(our_bufs[key + ".running_mean"], once)
    torch.testing.assert_close(tv_bufs[key + ".running_mean"], twice)
    assert not torch.allclose(once, twice)
    assert our_bufs[key + ".num_batches_tracked"].item() == 1
    assert tv_bufs[key + ".num_batches_tracked"].item() == 2


def test_state_dict_matches_torchvision_dense_block_and_transition():
    tv_dense = pytest.importorskip("torchvision.models.densenet")
    tv = tv_dense._DenseBlock(4, 8, 4, 6, drop_rate=0.0)
    ours = DenseBlock(4, 8, 4, 6)
    assert list(tv.state_dict().keys()) == list(ours.state_dict().keys())
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert [n for n, _ in tv.named_modules()] == [n for n, _ in ours.named_modules()]
    tvt, ot = tv_dense._Transition(32, 16), Transition(32, 16)
    assert list(tvt.state_dict().keys()) == list(ot.state_dict().keys())


@pytest.mark.parametrize("memory,recompute", MODES[1:])
def test_torchvision_densenet_with_resfast_blocks(memory, recompute):
    """torchvision's densenet121 with its four blocks replaced by resfast's (weights loaded)
    gives the same outputs, input grads, parameter grads and running stats after a step.

    Compared in float64: a whole randomised network in training mode amplifies rounding
    differences by orders of magnitude (BN over few values per channel in block 4), so the
    float32 rule is applied per block above; here any real difference would be O(1).
    """
    tvm = pytest.importorskip("torchvision.models")
    state, x, grad, a = _torchvision_densenet121_step()
    ours = tvm.densenet121(num_classes=7).double()
    for i, (n, c) in enumerate(zip((6, 12, 24, 16), (64, 128, 256, 512))):
        setattr(ours.features, f"denseblock{i + 1}",
                DenseBlock(n, c, 4, 32, memory=memory, recompute=recompute, backend="eager").double())
    ours.load_state_dict(state, strict=True)
    b = _step(ours, x, grad)
    _assert_close_rel(b, a, f"torchvision densenet121 with {memory}/{recompute} blocks")


_TV_STEP: list = []


def _torchvision_densenet121_step():
    """torchvision's randomised densenet121 (float64): its state before the step, the step's
    input and output gradient, and the step's results. The same for every memory mode, so
    computed once per process."""
    if not _TV_STEP:
        from torchvision.models import densenet121

        torch.manual_seed(0)
        ref = densenet121(num_classes=7).double()
        _randomise(ref, 1)
        state = copy.deepcopy(ref.state_dict())
        x = _inputs((2, 3, 64, 64), 4, torch.float64)  # block 4 sees 2x2: 8 values per BN channel
        grad = torch.randn(2, 7, dtype=torch.float64)
        _TV_STEP.extend([state, x, grad, _step(ref, x, grad)])
    return _TV_STEP


def _assert_close_rel(out, ref, context, rtol=1e-6):
    """Every tensor within ``rtol`` of the reference's largest magnitude (float64 runs)."""
    pairs = [("output", out[0], ref[0]), ("grad_x", out[1], ref[1])]
    pairs += [(f"grad {k}", out[2][k], ref[2][k]) for k in ref[2]]
    pairs += [(k, out[3][k], ref[3][k]) for k in ref[3]]
    for name, o, r in pairs:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(o, r), f"{name} ({context})"
            continue
        scale = max(1.0, r.abs().max().item())
        err = (o - r).abs().max().item()
        assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol * scale:.3e} ({context})"


def test_autocast_bfloat16_cpu_matches_naive():
    args = (2, 6, 2, 4)
    x = _inputs((2, 6, 5, 5), 9, torch.float32).to(torch.bfloat16)
    grad = torch.randn(2, 14, 5, 5)
    ref64 = _step(_make(*args, "naive", "bn_relu", "eager"), x.double(), grad.double())

    def run(memory):
        block = _make(*args, memory, "bn_relu", "eager", dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _step(block, x, grad)

    ref_same, out = run("naive"), run("shared")
    assert out[0].dtype == torch.bfloat16
    for i, name in enumerate(["output", "grad_x"]):
        assert_rule(name, out[i], ref64[i], ref_same[i], "autocast bf16", dtype=torch.bfloat16)
    for key in ref64[2]:
        assert_rule(key, out[2][key], ref64[2][key], ref_same[2][key], "autocast bf16", dtype=torch.bfloat16)


def test_gradcheck_shared_block_float64():
    """gradcheck of the shared block's input gradient (float64, eager; runs the backward
    several times on one graph, so retain_graph works too)."""
    for recompute in RECOMPUTE:
        block = _make(2, 3, 2, 2, "shared", recompute, "eager")
        x = _inputs((2, 3, 3, 3), 0, torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(lambda inp: block(inp), (x,), eps=1e-6, atol=1e-6)


def test_shared_block_is_not_quadratic_in_depth():
    """The linear-growth check: a training step's activation bytes (exact, MemTracker)
    against the number of layers L. The bytes each extra layer adds (the slope) grow with
    L for naive (every layer stores a concatenation of all previous channels) and stay
    about constant for shared (a kink where the peak moves from one phase to another is
    allowed: slope ratio < 1.6); naive's slope triples between L = 2..4 and L = 16..32."""
    from resfast.profiling.memory import block_memory_sweep

    layers = (2, 4, 16, 32)
    sweep = block_memory_sweep(["naive", "shared", "shared_bottleneck"], layers=layers, backend="eager",
                               batch_size=2, image_size=24, num_input_features=8, growth_rate=8, progress=False)

    def slope_ratio(mode):
        y = sweep["modes"][mode]["activation_bytes"]
        return ((y[3] - y[2]) / 16) / ((y[1] - y[0]) / 2)

    naive, shared, bottleneck = slope_ratio("naive"), slope_ratio("shared"), slope_ratio("shared_bottleneck")
    assert naive > 2.5, f"naive's slope ratio {naive:.2f}: expected quadratic growth"
    assert shared < 1.6, f"shared's slope ratio {shared:.2f}: expected linear growth"
    assert bottleneck < 1.6, f"shared_bottleneck's slope ratio {bottleneck:.2f}: expected linear growth"
    assert sweep["modes"]["shared"]["activation_bytes"][-1] < sweep["modes"]["naive"]["activation_bytes"][-1] / 4


def test_transition_matches_torchvision():
    tv_dense = pytest.importorskip("torchvision.models.densenet")
    tv, ours = tv_dense._Transition(12, 6).double(), Transition(12, 6, backend="eager").double()
    _randomise(tv, 3)
    ours.load_state_dict(tv.state_dict())
    x = _inputs((2, 12, 7, 9), 1, torch.float64)
    grad = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    a, b = _step(tv, x, grad), _step(ours, x, grad)
    _compare(b, a, a, "transition", torch.float64)


def test_dense_layer_list_input_matches_torchvision():
    tv_dense = pytest.importorskip("torchvision.models.densenet")
    tv = tv_dense._DenseLayer(10, 4, 2, 0.0).double()
    _randomise(tv, 2)
    for memory in ("naive", "checkpoint"):
        ours = DenseLayer(10, 4, 2, 0.0, memory=memory, backend="eager").double()
        ours.load_state_dict(tv.state_dict())
        feats = [_inputs((2, 6, 5, 5), 1, torch.float64).requires_grad_(),
                 _inputs((2, 4, 5, 5), 2, torch.float64).requires_grad_()]
        torch.testing.assert_close(ours(feats), tv(feats))


@pytest.mark.parametrize("memory", ["naive", "checkpoint", "shared"])
def test_bad_input_raises_clear_errors(memory):
    block = DenseBlock(2, 6, 2, 3, memory=memory, backend="eager")
    before = {n: b.clone() for n, b in block.named_buffers()}
    with pytest.raises(ValueError, match=r"channel mismatch: init_features has 5 channels.*num_input_features=6"):
        block(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"init_features must be 4-D \(N, C, H, W\), got shape \(2, 6, 4\)"):
        block(torch.randn(2, 6, 4))
    with pytest.raises(TypeError, match="init_features must be a torch.Tensor, got list"):
        block([torch.randn(2, 6, 4, 4)])
    for n, b in block.named_buffers():
        assert torch.equal(b, before[n]), f"{n} changed by a rejected call"


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="memory must be one of .* got 'fast'"):
        DenseBlock(2, 6, 2, 3, memory="fast")
    with pytest.raises(ValueError, match="recompute must be one of .* got 'all'"):
        DenseBlock(2, 6, 2, 3, recompute="all")
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        DenseBlock(0, 6, 2, 3)
    with pytest.raises(ValueError, match=r"drop_rate must be a float in \[0, 1\), got 1.5"):
        DenseBlock(2, 6, 2, 3, drop_rate=1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        DenseBlock(2, 6, 2, 3, backend="cuda")
    with pytest.raises(ValueError, match=r"channel mismatch: the inputs have 5 channels in all.*=6"):
        DenseLayer(6, 3, 2)(torch.randn(2, 5, 4, 4))
