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
