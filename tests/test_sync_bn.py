"""The SyncBN path of the functional op and of the shared dense block over 2 gloo ranks (each
with half the batch) against one process on the whole batch: outputs, every gradient (summed
over the ranks, as DDP's all-reduce would) and the running statistics, on the eager and the
native op sets. Both paths run the one backward, ``resfast.ops.autograd.bn_relu_conv2d_backward``."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import resfast
from resfast.backends import backend_status
from ports import free_port, leave_rank, spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

WORLD = 2
BACKENDS = [b for b in ("eager", "native") if not backend_status("cpu")[b]]


class Net(nn.Module):
    """A fused BN-ReLU-conv, then a shared dense block with its transition fused into its tail."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.fused = resfast.BNReLUConv2d(4, 6, 3, padding=1, groups=2, backend=backend)
        self.block = resfast.DenseBlock(2, 6, 2, 3, memory="shared", backend=backend)
        self.transition = resfast.Transition(12, 5, backend=backend)

    def forward(self, x):
        return self.block.forward_with_transition(self.fused(x), self.transition)


def _model(backend: str) -> nn.Module:
    torch.manual_seed(3)
    m = Net(backend).double()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.2)
    return m


def _data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, 4, 6, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    go = torch.randn(8, 5, 3, 3, generator=g, dtype=torch.float64)
    return x, go


def _step(model, x, go):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(go)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}, \
        {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, go = _data()
        half = x.shape[0] // WORLD
        shard = slice(rank * half, (rank + 1) * half)
        results = {}
        for backend in BACKENDS:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(_model(backend))
            y, gx, grads, state = _step(model, x[shard], go[shard])
            for g in grads.values():
                dist.all_reduce(g)
            results[backend] = (y, gx, grads, state)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_rank()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("syncbn"))
    spawn_ranks(_worker, (free_port(), outdir), WORLD)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_equal_one_process_on_the_whole_batch(ranks, backend):
    x, go = _data()
    ref_y, ref_gx, ref_grads, ref_state = _step(_model(backend), x, go)
    (y0, gx0, grads, state0), (y1, gx1, _, state1) = ranks[0][backend], ranks[1][backend]
    torch.testing.assert_close(torch.cat([y0, y1]), ref_y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([gx0, gx1]), ref_gx, rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-9, atol=1e-11, msg=n)
    for k, v in ref_state.items():
        torch.testing.assert_close(state0[k], v, rtol=1e-10, atol=1e-12, msg=k)
        torch.testing.assert_close(state1[k], v, rtol=1e-10, atol=1e-12, msg=k)
    # The comparison has teeth: per-rank statistics would differ from the whole batch's.
    assert not torch.allclose(x[:4].var((0, 2, 3)), x.var((0, 2, 3)))
