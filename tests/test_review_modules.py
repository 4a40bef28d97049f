"""Second review sweep, module level: inputs and reports that gave a plausible wrong number.

Each test here failed before its fix (the figure it got is in its docstring) and checks the
right answer, or a clear error, now.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import resfast
from resfast.profiling.counting import count_macs, model_counts

tvm = pytest.importorskip("torchvision.models", reason="torchvision is needed for the reference counts")


def _meta_torchvision(name: str) -> nn.Module:
    with torch.device("meta"):
        return getattr(tvm, name)()


# ----------------------------------------------------------------------------- reports


@pytest.mark.parametrize("name", ["densenet121", "densenet169"])
def test_densenet_macs_are_the_architectures_not_the_pool_first_executions(name):
    """``resfast models`` printed densenet121 at 2.604 GMACs against torchvision's (and the
    paper's) 2.834 G: the pool-first transition runs its 1x1 conv on a quarter of the positions
    and its averaging as a depthwise conv, so the counter saw -230 M of the architecture's
    MACs and counted pooling, which the table says it leaves out. The count is the
    architecture's: the registered model, torchvision's model and a converted torchvision
    model agree to the MAC."""
    ref = count_macs(_meta_torchvision(name), (3, 224, 224))
    assert model_counts(name)["macs"] == ref
    with torch.device("meta"):
        converted = getattr(tvm, name)()
    resfast.convert(converted, backend="eager")
    assert count_macs(converted, (3, 224, 224)) == ref


def test_transition_macs_count_the_conv_over_every_position_and_no_pooling():
    """One transition alone: torchvision's conv-first count (the 2x2 average pool not counted),
    and the transition afterwards still runs pool first (the counting changed nothing)."""
    t = resfast.Transition(16, 8, backend="eager")
    assert count_macs(t, (16, 6, 6)) == 16 * 8 * 6 * 6
    assert t.pool_first() and "pool_first" not in t.__dict__


# ----------------------------------------------------------------------------- SyncBN, a rank with no images

import datetime  # noqa: E402
import os  # noqa: E402

import torch.distributed as dist  # noqa: E402

from ports import free_port, leave_rank, spawn_ranks  # noqa: E402
from resfast.backends import backend_status  # noqa: E402

SYNC_BACKENDS = [b for b in ("eager", "native") if not backend_status("cpu")[b]]
_needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available in this build")


class _SyncNet(nn.Module):
    """A fused BN-ReLU-conv, then a dense block (``memory``) and a transition."""

    def __init__(self, backend: str, memory: str) -> None:
        super().__init__()
        self.fused = resfast.BNReLUConv2d(4, 6, 3, padding=1, groups=2, backend=backend)
        self.block = resfast.DenseBlock(2, 6, 2, 3, memory=memory, backend=backend)
        self.transition = resfast.Transition(12, 5, backend=backend)

    def forward(self, x):
        return self.transition(self.block(self.fused(x)))


def _sync_model(backend: str, memory: str) -> nn.Module:
    torch.manual_seed(3)
    m = _SyncNet(backend, memory).double()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.2)
                bn.running_mean.normal_(0, 0.1)
    return m


def _sync_data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    go = torch.randn(3, 5, 3, 3, generator=g, dtype=torch.float64)
    return x, go


def _sync_step(model, x, go):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(go)
    return y.detach(), x.grad, {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                                for n, p in model.named_parameters()}, \
        {k: v.clone() for k, v in model.state_dict().items()}


def _empty_rank_worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A collective that one rank never joins fails after the timeout instead of hanging the suite.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        x, go = _sync_data()
        mine = slice(0, 3) if rank == 0 else slice(3, 3)  # rank 1 has no images this step
        results = {}
        for backend in SYNC_BACKENDS:
            for memory in ("checkpoint", "naive"):
                model = nn.SyncBatchNorm.convert_sync_batchnorm(_sync_model(backend, memory))
                y, gx, grads, state = _sync_step(model, x[mine], go[mine])
                for g in grads.values():
                    dist.all_reduce(g)
                results[backend, memory] = (y, gx, grads, state)
            if rank == 1:  # the shared block cannot join the others' collectives with no images: refused
                model = nn.SyncBatchNorm.convert_sync_batchnorm(_sync_model(backend, "shared"))
                try:  # the block alone: the fused op before it would join an all-gather rank 0 never starts
                    model.block(torch.zeros(0, 6, 6, 6, dtype=torch.float64))
                    results[backend, "shared"] = "ran"
                except ValueError as e:
                    results[backend, "shared"] = str(e)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_rank()


@pytest.fixture(scope="module")
def empty_rank_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("empty_rank"))
    spawn_ranks(_empty_rank_worker, (free_port(), outdir), 2)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=True) for r in range(2)]


@_needs_gloo
@pytest.mark.parametrize("memory", ["checkpoint", "naive"])
@pytest.mark.parametrize("backend", SYNC_BACKENDS)
def test_sync_bn_rank_with_an_empty_batch_joins_the_statistics(empty_rank_results, backend, memory):
    """Rank 0 has 3 images, rank 1 none. Before: rank 1 skipped the all-gather (its running
    statistics stayed as they were while num_batches_tracked moved) and rank 0 waited in it
    forever. Now rank 1 joins every all-gather and all-reduce with a count of 0: rank 0's
    output, the summed gradients and both ranks' running statistics equal one process on the
    3 images (as nn.SyncBatchNorm, which accepts an empty rank)."""
    x, go = _sync_data()
    ref_y, ref_gx, ref_grads, ref_state = _sync_step(_sync_model(backend, memory), x, go)
    (y0, gx0, grads, state0), (y1, gx1, grads1, state1) = (r[backend, memory] for r in empty_rank_results)
    torch.testing.assert_close(y0, ref_y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx0, ref_gx, rtol=1e-10, atol=1e-12)
    assert y1.shape == (0, 5, 3, 3) and gx1.shape == (0, 4, 6, 6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-9, atol=1e-11, msg=n)
        torch.testing.assert_close(grads1[n], g, rtol=1e-9, atol=1e-11, msg=n)
    for k, v in ref_state.items():
        torch.testing.assert_close(state0[k], v, rtol=1e-10, atol=1e-12, msg=k)
        torch.testing.assert_close(state1[k], v, rtol=1e-10, atol=1e-12, msg=f"rank 1 (no images): {k}")


@_needs_gloo
@pytest.mark.parametrize("backend", SYNC_BACKENDS)
def test_sync_bn_shared_dense_block_with_an_empty_batch_is_refused(empty_rank_results, backend):
    msg = empty_rank_results[1][backend, "shared"]
    assert "no images" in msg and "memory='checkpoint'" in msg, msg


# ----------------------------------------------------------------------------- changes made after convert

import copy  # noqa: E402

from reference import assert_rule  # noqa: E402


def _frozen_bn(m):  # fine-tuning: every other BN in eval inside a training model
    m.train()
    for i, bn in enumerate(b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
        if i % 2 == 0:
            bn.eval()


def _set_bn(**attrs):
    def change(m):
        for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
            for k, v in attrs.items():
                setattr(bn, k, v)
    return change


def _new_parameters(m):  # conv.weight = nn.Parameter(...) and bn.weight likewise, after convert
    g = torch.Generator().manual_seed(5)
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)):
            new = torch.rand(mod.weight.shape, generator=g, dtype=torch.float64) * 0.4 + 0.3
            mod.weight = nn.Parameter(new.to(mod.weight.dtype))


def _freeze_some(m):
    for i, p in enumerate(m.parameters()):
        if i % 3 == 0:
            p.requires_grad_(False)


CHANGES = {"frozen_bn": _frozen_bn, "momentum_0.01": _set_bn(momentum=0.01), "momentum_None": _set_bn(momentum=None),
           "eps_0.3": _set_bn(eps=0.3), "no_tracking": _set_bn(track_running_stats=False),
           "new_parameters": _new_parameters, "some_frozen": _freeze_some}


def _all_of(*names):
    def change(m):
        for name in names:
            CHANGES[name](m)
    return change


# The Triton interpreter is slow: there, the changes that reach the op's arguments differently
# (a BN in eval inside a training model, a new momentum, new Parameter objects), made together
# in one model: every other BN is in eval (its running statistics normalise and stay put), the
# training BNs update theirs with momentum 0.01, and every conv and BN weight is a new
# Parameter. A change the converted model missed still shows in what it touches (the eval BNs'
# outputs, the training BNs' running statistics, every output and gradient); eager and native
# check each change alone.
_TRITON_CHANGE = "frozen_bn+momentum_0.01+new_parameters"
CHANGES[_TRITON_CHANGE] = _all_of(*_TRITON_CHANGE.split("+"))


def _tiny_models():
    return {
        "resnext_bottleneck": (lambda: nn.Sequential(tvm.resnet.Bottleneck(8, 2, groups=2, base_width=64),
                                                     tvm.resnet.BasicBlock(8, 8)), (2, 8, 5, 5)),
        # 17 x 17: the stem leaves 5 x 5, an odd size the transition floors to 2 x 2
        "densenet": (lambda: tvm.DenseNet(growth_rate=2, block_config=(2, 2), num_init_features=4, bn_size=2,
                                          num_classes=3), (2, 3, 17, 17)),
    }


def _randomised(build):
    torch.manual_seed(0)
    m = build()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.2)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return m


def _two_steps(m, x):
    """Two SGD steps; per step the output, the input gradient, every parameter gradient and
    every state_dict tensor afterwards."""
    results = []
    for step in range(2):
        m.zero_grad(set_to_none=True)
        xx = x.detach().clone().to(next(m.parameters()).dtype).requires_grad_(True)
        y = m(xx)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64).to(y.dtype))
        results.append([("out", y.detach()), ("grad x", xx.grad)]
                       + [(f"grad {n}", p.grad) for n, p in m.named_parameters() if p.requires_grad])
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    p.sub_(0.05 * p.grad)
        results[-1] += [(f"state {k}", v.clone()) for k, v in m.state_dict().items()]
    return results


_CASES = [(b, m, c) for b in ("eager", "native", "triton") for m in ("resnext_bottleneck", "densenet")
          for c in CHANGES if (b == "triton") == (c == _TRITON_CHANGE)]


@pytest.mark.parametrize("backend,model,change", _CASES)
def test_changes_made_after_convert_are_followed(backend, model, change):
    """A converted torchvision model whose BatchNorms or parameters are changed after the
    conversion (fine-tuning's frozen BN, a new momentum or eps, tracking switched off, conv and
    BN weights replaced, some parameters frozen; on triton three of them at once) against the
    unconverted model changed the same way: two training steps, outputs, every gradient and
    running statistics by the float64 rule (triton in float32 against the same float64
    reference; no float64 kernels there)."""
    why = backend_status("cpu")[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on cpu: {why}")
    build, shape = _tiny_models()[model]
    base = _randomised(build)
    dtype = torch.float32 if backend == "triton" else torch.float64
    converted = copy.deepcopy(base).to(dtype)
    resfast.convert(converted, backend=backend)
    ref64, same = copy.deepcopy(base).double(), copy.deepcopy(base).to(dtype)
    for m in (converted, ref64, same):
        CHANGES[change](m)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got, r64, rs = _two_steps(converted, x), _two_steps(ref64, x), _two_steps(same, x)
    for step, (a, r, s) in enumerate(zip(got, r64, rs)):
        assert [n for n, _ in a] == [n for n, _ in r]
        for (name, t), (_, t64), (_, ts) in zip(a, r, s):
            if t.is_floating_point():
                assert_rule(name, t, t64, ts, f"{backend} {model} {change} step {step}")
            else:
                assert torch.equal(t, t64), f"{name}: {t} != {t64} ({backend} {model} {change} step {step})"


def test_empty_rank_double_backward_is_refused_as_on_the_other_ranks():
    """The other ranks' fused ops refuse create_graph=True through SyncBN; the empty rank's
    stand-in refuses it too (before its all-reduce), never giving second-order zeros."""
    from resfast.ops.bn_relu_conv2d import _EmptySyncBN

    x = torch.zeros(0, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    y = _EmptySyncBN.apply(None, torch.zeros(4, dtype=torch.float64), x, w, None, None, None, [1, 1], [1, 1],
                           [1, 1], 1)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), [w], create_graph=True)
