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
import socket  # noqa: E402

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def empty_rank_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("empty_rank"))
    mp.spawn(_empty_rank_worker, args=(_free_port(), outdir), nprocs=2, join=True)
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
