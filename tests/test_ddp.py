"""DDP on the CPU with gloo and 2 processes: a step on 2 ranks, each with half the batch and
sync-BN (through resfast's fused BN-ReLU-conv op), gives the parameters and running
statistics of one process stepping on the whole batch; the full training loop runs under DDP."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from resfast import BNReLUConv2d
from resfast.train.distributed import init_distributed, prepare_model, unwrap
from resfast.train.loop import TrainConfig, make_optimizer, train, train_step
from ports import free_port, leave_rank, spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

WORLD = 2


class TinyNet(nn.Module):
    """Stem conv, then BN-ReLU-conv pairs only: every BN runs through resfast's fused op, which
    synchronises on the CPU (a plain nn.SyncBatchNorm needs a GPU)."""

    def __init__(self, num_classes: int = 10, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.a = BNReLUConv2d(width, width, 3, padding=1, backend="eager")
        self.b = BNReLUConv2d(width, 2 * width, 3, stride=2, padding=1, groups=2, backend="eager")
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a(x)
        return self.fc(self.b(x).mean((2, 3)))


def _batch(n=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 3, 9, 9, generator=g, dtype=dtype) * 2.0 + 0.5
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _fresh_model(dtype=torch.float64):
    torch.manual_seed(7)
    return TinyNet().to(dtype)


def _state(model):
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        info = init_distributed(torch.device("cpu"))
        assert (info.rank, info.world_size) == (rank, WORLD)
        x, y = _batch()
        half = x.shape[0] // WORLD
        shard = slice(rank * half, (rank + 1) * half)
        states = {}
        for sync in (True, False):
            ddp = prepare_model(_fresh_model(), info, torch.device("cpu"), sync_bn=sync)
            assert any(isinstance(m, nn.SyncBatchNorm) for m in ddp.modules()) == sync
            opt = make_optimizer(ddp, TrainConfig(lr=0.5, weight_decay=1e-3))
            train_step(ddp, opt, x[shard], y[shard])
            states[sync] = _state(ddp)
        # The whole loop under DDP: DistributedSampler, sharded evaluation, rank 0 writes the files.
        result = train(TrainConfig(model="tinynet", epochs=1, batch_size=16, subset=96, progress=False,
                                   sync_bn=True, device="cpu", measure_memory=False,
                                   out=os.path.join(outdir, "run") if rank == 0 else None),
                       model=TinyNet())
        if rank == 0:
            torch.save({"states": states, "result": result}, os.path.join(outdir, "rank0.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_rank()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("ddp"))
    spawn_ranks(_worker, (free_port(), outdir), WORLD)
    return torch.load(os.path.join(outdir, "rank0.pt"), weights_only=True), outdir


def _single_process_reference():
    model = _fresh_model()
    opt = make_optimizer(model, TrainConfig(lr=0.5, weight_decay=1e-3))
    x, y = _batch()
    train_step(model, opt, x, y)
    return _state(model)


def test_two_ranks_with_sync_bn_equal_one_process_on_the_whole_batch(ddp_run):
    saved, _ = ddp_run
    ddp_state, ref = saved["states"][True], _single_process_reference()
    assert ddp_state.keys() == ref.keys()
    initial = _state(_fresh_model())
    for k, v in ref.items():
        if v.is_floating_point():
            torch.testing.assert_close(ddp_state[k], v, rtol=1e-10, atol=1e-12, msg=f"{k} differs")
    # The step moved the parameters and the running statistics, so the comparison has teeth.
    moved = [k for k, v in ref.items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert any("running_mean" in k for k in moved) and any(k.endswith("conv.weight") for k in moved)


def test_without_sync_bn_the_ranks_normalise_with_their_own_statistics(ddp_run):
    saved, _ = ddp_run
    unsynced, ref = saved["states"][False], _single_process_reference()
    # Per-rank statistics change the BN running stats and, through them, the conv gradients.
    assert not torch.allclose(unsynced["a.norm.running_var"], ref["a.norm.running_var"], rtol=1e-6)
    assert not torch.allclose(unsynced["a.conv.weight"], ref["a.conv.weight"], rtol=1e-9, atol=1e-12)


def test_training_loop_under_ddp_writes_rank0_files(ddp_run):
    saved, outdir = ddp_run
    result = saved["result"]
    assert result["world_size"] == WORLD
    assert len(result["epoch_time_s"]) == 1 and 0.0 <= result["test_acc"] <= 1.0
    assert sorted(os.listdir(os.path.join(outdir, "run"))) == ["checkpoint.pt", "curves.png", "metrics.csv",
                                                               "metrics.json"]


def _sleeper(rank: int) -> None:
    import time

    time.sleep(600)


def test_spawned_ranks_past_their_deadline_are_killed_and_fail_the_test():
    """tests/ports.spawn_ranks: ranks that hang (as a gloo teardown once did under torch 2.11)
    are killed at the deadline and the test fails saying so, rather than the suite waiting."""
    import time

    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="2 distributed ranks did not finish within 3 s"):
        spawn_ranks(_sleeper, (), 2, deadline_s=3)
    assert time.monotonic() - t0 < 60
