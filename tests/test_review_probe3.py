"""A third new-user trial: standard PyTorch machinery (forward-mode AD, torch.func transforms,
gradient accumulation, serialisation, AMP, the CLI, ...) pointed at resfast's ops, blocks and
converted models. Every case here once gave a plausible wrong number (or a misleading error)
on some backend, or is a behaviour no other test file checked; each is judged against eager
PyTorch / torchvision by the float64 rule of tests/reference.py."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import resfast
from resfast.functional import bn_relu_conv2d
from module_judge import randomize_bns
from reference import assert_rule, judged_dtype as _dtype, require_backend as _require

BACKENDS = ("eager", "triton", "native")


def _fw_jvp(fn, primals, tangents):
    """``(out, tangent)`` of ``fn`` by torch.autograd.forward_ad (inputs that do not require grad)."""
    with fwAD.dual_level():
        o = fn(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        p, t = fwAD.unpack_dual(o)
        return p.detach().clone(), (torch.zeros_like(p) if t is None else t.detach().clone())


def _func_jvp(fn, primals, tangents):
    return torch.func.jvp(fn, tuple(primals), tuple(tangents))


JVPS = {"fwAD": _fw_jvp, "func.jvp": _func_jvp}


# ------------------------------------------------------------------ forward-mode AD, torch.func


def _op_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    gamma = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(3, generator=g, dtype=torch.float64)
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, gamma)]
    return [t.to(dtype) for t in (x, w, gamma)], [t.to(dtype) for t in tangents], beta.to(dtype)


def _op(backend, training, beta):
    def f(x, w, gamma):
        rm = torch.full((3,), 0.1, dtype=x.dtype)
        rv = torch.full((3,), 1.2, dtype=x.dtype)
        return bn_relu_conv2d(x, w, None, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv,
                              training=training, padding=1, backend=backend)
    return f


@pytest.mark.parametrize("how", sorted(JVPS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_through_the_fused_op_is_exact(backend, training, how):
    """jvp through the fused op: triton/native once returned a zero tangent (the registered
    ops have no forward-AD formula and dropped it) with the right primal."""
    _require(backend)
    dt = _dtype(backend)
    jvp = JVPS[how]
    primals, tangents, beta = _op_inputs(dt)
    out, tan = jvp(_op(backend, training, beta), primals, tangents)
    p64, t64, b64 = _op_inputs(torch.float64)
    ref64 = jvp(_op("eager", training, b64), p64, t64)
    ref_same = jvp(_op("eager", training, beta), primals, tangents)
    assert tan.abs().max() > 0.1
    assert_rule("primal", out, ref64[0], ref_same[0], f"{backend} {how}")
    assert_rule("tangent", tan, ref64[1], ref_same[1], f"{backend} {how}")


@pytest.mark.parametrize("backend", ("triton", "native"))
def test_torch_func_grad_and_jacrev_through_the_fused_op(backend):
    """torch.func.grad / jacrev / hessian through the fused op once raised PyTorch's generic
    'must override the setup_context staticmethod' error on triton and native."""
    _require(backend)
    dt = _dtype(backend)
    (x, w, gamma), _, beta = _op_inputs(dt)
    (x64, w64, g64), _, b64 = _op_inputs(torch.float64)

    def loss(backend, beta):
        return lambda x, w, gamma: _op(backend, True, beta)(x, w, gamma).square().sum()

    got = torch.func.grad(loss(backend, beta), argnums=(0, 1, 2))(x, w, gamma)
    ref64 = torch.func.grad(loss("eager", b64), argnums=(0, 1, 2))(x64, w64, g64)
    same = torch.func.grad(loss("eager", beta), argnums=(0, 1, 2))(x, w, gamma)
    for name, a, r, s in zip(("x", "weight", "bn_weight"), got, ref64, same):
        assert_rule(f"grad {name}", a, r, s, backend)
    xs = x[:, :, :2, :2].contiguous()
    jac = torch.func.jacrev(lambda x: _op(backend, True, beta)(x, w, gamma))(xs)
    jac_same = torch.func.jacrev(lambda x: _op("eager", True, beta)(x, w, gamma))(xs)
    jac64 = torch.func.jacrev(lambda x: _op("eager", True, b64)(x, w64, g64))(xs.double())
    assert_rule("jacrev", jac, jac64, jac_same, backend)


def _tv_blocks(dtype):
    from torchvision.models.densenet import _DenseBlock
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    blocks = {"basic": (BasicBlock(4, 4), (2, 4, 5, 5)), "dense": (_DenseBlock(2, 4, 2, 3, 0.0), (2, 4, 4, 4))}
    for m, _ in blocks.values():
        randomize_bns(m)
        m.to(dtype)  # after the draws: every dtype gets the same values
    return blocks


@pytest.mark.parametrize("how", sorted(JVPS))
@pytest.mark.parametrize("mode", ["eval", "train", "eval_frozen"])
@pytest.mark.parametrize("block", ["basic", "dense"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_through_converted_blocks(backend, block, mode, how):
    """jvp of converted torchvision blocks (the dense one in memory='shared'): eval, training
    (torch.func.replace_all_batch_norm_modules_, as functorch asks) and eval with frozen
    parameters. Before: a zero or partial tangent on triton/native, and the shared dense block
    raised 'You must implement the jvp function' on every backend."""
    _require(backend)
    dt = _dtype(backend)
    tv, shape = _tv_blocks(dt)[block]
    tv64 = _tv_blocks(torch.float64)[block][0]
    for m in (tv, tv64):
        m.train(mode == "train")
        if mode == "train":
            torch.func.replace_all_batch_norm_modules_(m)
        m.requires_grad_(mode != "eval_frozen")
    ours = copy.deepcopy(tv)
    resfast.convert(ours, backend=backend, dense_memory="shared")
    assert any(type(m).__module__.startswith("resfast") for m in ours.modules())
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    t64 = torch.randn(shape, generator=g, dtype=torch.float64)
    x, t = x64.to(dt), t64.to(dt)
    jvp = JVPS[how]
    out, tan = jvp(ours, [x], [t])
    ref64 = jvp(tv64, [x64], [t64])
    same = jvp(tv, [x], [t])
    assert ref64[1].abs().max() > 0.1
    assert_rule("primal", out, ref64[0], same[0], f"{backend} {block} {mode} {how}")
    assert_rule("tangent", tan, ref64[1], same[1], f"{backend} {block} {mode} {how}")


@pytest.mark.parametrize("backend", ("eager", "native"))
def test_forward_mode_ad_through_a_shared_densenet_in_training(backend):
    """A resfast DenseNet (shared blocks, the compact ImageNet stem, the fused transition tail)
    in training under forward AD: the tangent, output and running statistics are
    torchvision's (before: the stem's and the block's Functions raised)."""
    _require(backend)
    from torchvision.models.densenet import DenseNet as TVDenseNet

    from resfast.models.densenet import DenseNet

    torch.manual_seed(0)
    kw = dict(growth_rate=2, block_config=(2, 2), num_init_features=4, bn_size=2, num_classes=3)
    tv = TVDenseNet(**kw).double()
    ours = DenseNet(**kw, backend=backend).double()
    ours.load_state_dict(tv.state_dict())
    x, t = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out, tan = _fw_jvp(ours, [x], [t])
    ref = _fw_jvp(tv, [x], [t])
    assert ref[1].abs().max() > 0.01
    torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(tan, ref[1], rtol=0, atol=1e-10)
    for (k, a), b in zip(ours.state_dict().items(), tv.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=k)


def test_shared_dense_block_function_refuses_forward_ad():
    """The op-level shared block (its autograd works in place) says what to use instead."""
    from resfast.nn.dense import DenseBlock
    from resfast.ops.dense_block import shared_dense_block

    block = DenseBlock(2, 4, 2, 3, backend="eager").double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="memory='naive'"):
            shared_dense_block(xd, block._layer_args(), backend="eager")


# ------------------------------------------------------------------ grad modes


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_forward_under_inference_mode(backend):
    """A training-mode forward under torch.inference_mode (running statistics move, as in
    eager) through a converted grouped bottleneck: the triton ResNeXt chain (conv2 -> bn2
    statistics in the epilogue) once raised 'Inference tensors do not track version counter'
    tagging the statistics it returns; outputs and running statistics are torchvision's."""
    _require(backend)
    from torchvision.models.resnet import Bottleneck

    dt = _dtype(backend)
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    tv = Bottleneck(4, 2, stride=2, downsample=ds, groups=2, base_width=64).to(dt).train()
    ours = copy.deepcopy(tv)
    resfast.convert(ours, backend=backend)
    assert type(ours).__module__.startswith("resfast")
    x = torch.randn(2, 4, 5, 5, dtype=dt)
    with torch.inference_mode():
        got = [ours(x), ours(x * 0.5 + 0.1)]
        ref = [tv(x), tv(x * 0.5 + 0.1)]
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    for (k, a), r in zip(ours.state_dict().items(), tv.state_dict().values()):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------ behaviours verified correct


def _small_net(dtype):
    """A torchvision grouped bottleneck followed by a plain BN-ReLU-conv: both fuse."""
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(0)
    net = nn.Sequential(Bottleneck(4, 1, groups=2, base_width=128),
                        nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)))
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
    return net.to(dtype)


def _accumulation_scenario(net, x0, x1):
    """Gradient machinery a training loop uses: ``(judged, exact)``. ``judged``: each
    micro-batch's parameter gradients alone, a retained graph's first input gradient,
    ``autograd.grad`` for a subset of inputs (``allow_unused``), and an expanded (zero-stride)
    and a channels_last ``grad_outputs``, then the buffers. ``exact``: pairs that must be
    equal to the bit: the two micro-batches accumulated into zeroed ``.grad`` against the sum
    of their gradients, and the retained graph's second backward against twice its first.
    (Five forwards, where it took eight: the second micro-batch's gradients alone come from a
    ``.grad`` set to None, the first's from the zeroed ``.grad`` the accumulation starts from;
    the subset and the two odd ``grad_outputs`` share one retained forward.)"""
    params = list(net.parameters())
    judged, exact = [], []
    net.zero_grad(set_to_none=True)
    net(x1).square().sum().backward()
    single1 = [p.grad.clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    net(x0).square().sum().backward()
    single0 = [p.grad.clone() for p in params]  # 0 + g: the first micro-batch's gradients alone
    net(x1).square().sum().backward()
    judged += single0 + single1
    exact += [(p.grad.clone(), a + b) for p, a, b in zip(params, single0, single1)]
    x = x0.clone().requires_grad_(True)
    y = net(x)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    judged.append(first)
    exact.append((x.grad.clone(), 2 * first))
    unused = torch.zeros(3, dtype=x.dtype, requires_grad=True)
    x = x1.clone().requires_grad_(True)
    y = net(x)
    g_sub = torch.autograd.grad(y.sum(), [x, params[0], unused], allow_unused=True, retain_graph=True)
    assert g_sub[2] is None
    judged += list(g_sub[:2])
    for last, make in enumerate((lambda y: torch.tensor(0.7, dtype=y.dtype).expand(y.shape),
                                 lambda y: torch.linspace(-2, 2, y.numel(), dtype=y.dtype).view(y.shape).contiguous(
                                     memory_format=torch.channels_last))):
        judged += list(torch.autograd.grad(y, [x] + params, make(y), retain_graph=not last))
    judged += [b.clone() for b in net.buffers()]
    return judged, exact


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_retain_graph_subsets_and_odd_grad_outputs(backend):
    _require(backend)
    dt = _dtype(backend)
    tv, tv64 = _small_net(dt), _small_net(torch.float64)
    ours = copy.deepcopy(tv)
    resfast.convert(ours, backend=backend)
    g = torch.Generator().manual_seed(3)
    # 2 x 7 images (5 x 5 before): the same kernel specializations (the backward's 2 x 8 tile
    # with a masked last column), fewer programs
    x0, x1 = (torch.randn(2, 4, 2, 7, generator=g, dtype=torch.float64) for _ in range(2))
    got, exact = _accumulation_scenario(ours, x0.to(dt), x1.to(dt))
    same, _ = _accumulation_scenario(tv, x0.to(dt), x1.to(dt))
    ref64, _ = _accumulation_scenario(tv64, x0, x1)
    assert len(got) == len(ref64)
    for i, (a, r, s) in enumerate(zip(got, ref64, same)):
        if a.is_floating_point():
            assert_rule(f"tensor {i}", a, r, s, backend)
        else:  # num_batches_tracked
            assert torch.equal(a, r), f"tensor {i}"
    for i, (a, b) in enumerate(exact):
        assert torch.equal(a, b), f"accumulated gradient {i}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["nan_input", "inf_loss"])
def test_grad_scaler_skips_the_step_exactly_where_eager_does(backend, bad):
    """autocast(bfloat16) + GradScaler: a NaN in the input or an infinite loss must make some
    gradient non-finite, so the scaler skips the step and halves its scale, as in eager.
    The input is 2 x 7 (5 x 5 before: the same kernel specializations); the NaN is still in
    the second image, inside it."""
    _require(backend)
    results = []
    for convert in (False, True):
        net = _small_net(torch.float32)
        if convert:
            resfast.convert(net, backend=backend)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        before = [p.detach().clone() for p in net.parameters()]
        x = torch.randn(2, 4, 2, 7, generator=torch.Generator().manual_seed(1))
        if bad == "nan_input":
            x[1, 0, 1, 3] = float("nan")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(x).float().square().mean()
            if bad == "inf_loss":
                loss = loss * float("inf")
        scaler.scale(loss).backward()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in net.parameters())
        scaler.step(opt)
        scaler.update()
        unchanged = all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
        results.append((finite, unchanged, scaler.get_scale()))
    assert results[0] == (False, True, 128.0)
    assert results[1] == results[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_hooks_and_pruning_on_converted_modules(backend):
    """register_full_backward_hook on a converted block and on a conv inside it, and
    torch.nn.utils.prune on a conv after conversion (its forward pre-hook recomputes the
    weight): the hooks' gradients and three SGD steps are torchvision's."""
    import torch.nn.utils.prune as prune

    _require(backend)
    dt = _dtype(backend)
    runs = []
    for convert in (False, True):
        net = _small_net(dt)
        if convert:
            resfast.convert(net, backend=backend)
        prune.l1_unstructured(net[1][2], "weight", amount=0.5)
        seen = []
        for m in (net[0], net[0].conv2):
            m.register_full_backward_hook(lambda mod, gi, go: seen.extend(g.detach().clone() for g in gi + go
                                                                         if g is not None))
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        outs = []
        for step in range(3):
            x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(step), dtype=dt)
            opt.zero_grad()
            y = net(x)
            y.square().mean().backward()
            opt.step()
            outs.append(y.detach())
        runs.append(outs + seen + [p.detach().clone() for p in net.parameters()])
    assert len(runs[0]) == len(runs[1]) > 3 + 2 * 3
    tol = 1e-4 if dt == torch.float32 else 1e-10
    for i, (a, r) in enumerate(zip(runs[1], runs[0])):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol, msg=f"tensor {i}")


@pytest.mark.parametrize("backend", ("eager", "native"))
def test_whole_converted_densenet_saved_and_loaded_trains_on_identically(backend, tmp_path):
    """torch.save of the whole converted (shared-block) DenseNet and of its state_dict
    (loaded with weights_only=True into a fresh conversion): the next SGD step is the
    original's, to the bit."""
    _require(backend)
    from torchvision.models.densenet import DenseNet as TVDenseNet

    torch.manual_seed(0)
    net = TVDenseNet(growth_rate=2, block_config=(2, 2), num_init_features=4, bn_size=2, num_classes=3).double()
    fresh = copy.deepcopy(net)
    resfast.convert(net, backend=backend)
    resfast.convert(fresh, backend=backend)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.optim.SGD(net.parameters(), lr=0.1).zero_grad()
    net(x).square().mean().backward()
    torch.save(net, tmp_path / "model.pt")
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    copies = [torch.load(tmp_path / "model.pt", weights_only=False), fresh]

    def step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        opt.zero_grad()
        y = m(x * 0.5)
        y.square().mean().backward()
        opt.step()
        return [y.detach()] + [t.clone() for t in m.state_dict().values()]

    ref = step(net)
    for c in copies:
        for a, r in zip(step(c), ref):
            assert torch.equal(a, r)


# ------------------------------------------------------------------ statistics accuracy


#: A post-ReLU channel (2 x 5 x 5 positions, mostly zeros) whose first value is its largest:
#: the pattern a converted grouped bottleneck's output fed to the next BatchNorm in a review run.
_SPARSE = [4.188, 0, 0, 0, 0, 0.03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.497, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.999,
           0, 0.56, 0, 0.158, 0, 0, 0.402, 1.039, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.363]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_statistics_of_a_sparse_channel_whose_first_value_is_an_outlier(backend):
    """The triton statistics pass shifted its sums by the chunk's first value and so lost
    about n * (value - mean)^2 / M2 of float32's precision when that value was an outlier:
    the variance of this channel came out 2.2e-5 relative off (360 ulps; native 8e-8), enough
    to put a converted bottleneck's gradients outside the float64 rule. It now shifts by the
    mean of the chunk's first tile. Bound: 16 float32 ulps on the variance and inverse std."""
    _require(backend)
    from resfast.ops.opsets import get_ops

    ops = get_ops(backend)
    x64 = torch.tensor(_SPARSE, dtype=torch.float64).view(2, 1, 5, 5).repeat(1, 3, 1, 1)
    x64[:, 1] *= -1.0  # a negative outlier too
    x64[:, 2] += 1.0  # and a mean away from 0
    dt = _dtype(backend)
    var64, mean64 = torch.var_mean(x64.to(dt).double(), dim=(0, 2, 3), correction=0)  # of what the op reads
    mean, var = ops.bn_stats(x64.to(dt))
    rm, rv = torch.zeros(3, dtype=dt), torch.ones(3, dtype=dt)
    mean_u, invstd = ops.bn_stats_update(x64.to(dt), rm, rv, 0.1, 1e-5)
    ulp16 = 16 * 2.0 ** -24
    assert ((var.double() - var64) / var64).abs().max() <= ulp16, (var, var64)
    assert (mean.double() - mean64).abs().max() <= ulp16 * 2, (mean, mean64)
    invstd64 = torch.rsqrt(var64 + 1e-5)
    assert ((invstd.double() - invstd64) / invstd64).abs().max() <= ulp16, (invstd, invstd64)
    unbiased = var64 * 50 / 49
    assert ((rv.double() - (0.9 + 0.1 * unbiased)) / (0.9 + 0.1 * unbiased)).abs().max() <= ulp16


# ------------------------------------------------------------------ torch.func.functional_call


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True])
def test_functional_call_uses_and_updates_the_buffers_it_is_given(backend, training):
    """functional_call with replaced parameters and BatchNorm buffers on a converted
    bottleneck and shared dense block: the given tensors are what the fused ops read, the
    given running statistics are what a training forward updates (the module's own stay put),
    and per-sample gradients (vmap(grad(functional_call))) in eval are torchvision's."""
    _require(backend)
    from torch.func import functional_call, grad, vmap

    dt = _dtype(backend)
    tol = 1e-5 if dt == torch.float32 else 1e-12
    for name, (tv, shape) in _tv_blocks(dt).items():
        tv.train(training)
        ours = copy.deepcopy(tv)
        resfast.convert(ours, backend=backend, dense_memory="shared")
        params = {k: v.detach() * 1.1 + 0.01 for k, v in tv.named_parameters()}
        bufs = {k: (v * 0.5 + 0.2 if v.is_floating_point() else v.clone())
                for k, v in tv.state_dict().items() if k not in params}
        b_ref, b_ours = ({k: v.clone() for k, v in bufs.items()} for _ in range(2))
        own = [t.clone() for t in ours.state_dict().values()]
        x = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=dt)
        ref = functional_call(tv, (params, b_ref), (x,))
        got = functional_call(ours, (params, b_ours), (x,))
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol, msg=name)
        for k in bufs:
            torch.testing.assert_close(b_ours[k], b_ref[k], rtol=tol, atol=tol, msg=f"{name} {k}")
        assert training == any(not torch.equal(b_ref[k], bufs[k]) for k in bufs)
        assert all(torch.equal(a, b) for a, b in zip(own, ours.state_dict().values()))
        if not training:
            def loss(m):
                return lambda p, xi: functional_call(m, (p, bufs), (xi[None],)).square().sum()
            per_ref = vmap(grad(loss(tv)), in_dims=(None, 0))(params, x)
            per_got = vmap(grad(loss(ours)), in_dims=(None, 0))(params, x)
            for k in params:
                torch.testing.assert_close(per_got[k], per_ref[k], rtol=tol, atol=tol, msg=f"{name} {k}")


# ------------------------------------------------------------------ torch.jit.trace


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True])
def test_jit_trace_of_a_shared_densenet_replays_like_torchvision(backend, training):
    """torch.jit.trace of a resfast DenseNet (shared blocks, compact stem): it raised a bare
    'unordered_map::at' or 'Tracing a list of arbitrary type is currently not supported!' (the
    shared block's and the stem's autograd Functions cannot be traced); now they run their
    modules one by one while tracing, and the traced module run on a new input gives
    torchvision's output and running statistics."""
    _require(backend)
    import warnings

    from torchvision.models.densenet import DenseNet as TVDenseNet

    from resfast.models.densenet import DenseNet

    dt = _dtype(backend)
    tol = 1e-5 if dt == torch.float32 else 1e-12
    kw = dict(growth_rate=2, block_config=(2, 2), num_init_features=4, bn_size=2, num_classes=3)
    torch.manual_seed(0)
    tv = TVDenseNet(**kw).to(dt).train(training)
    ours = DenseNet(**kw, backend=backend).to(dt).train(training)
    ours.load_state_dict(tv.state_dict())
    x, x2 = torch.randn(2, 3, 16, 16, dtype=dt), torch.randn(2, 3, 16, 16, dtype=dt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings
        traced = torch.jit.trace(ours, (x,), check_trace=False)
    tv(x)  # the trace ran one forward
    torch.testing.assert_close(traced(x2), tv(x2), rtol=tol, atol=tol)
    for (k, a), b in zip(ours.state_dict().items(), tv.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=k)
