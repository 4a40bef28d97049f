"""``resfast.profiling.launches``: what a launch count counts (it depends on the program only)."""
from __future__ import annotations

import torch

from resfast.profiling.launches import LaunchCounter, count_launches


def test_views_and_allocations_are_free_compute_ops_count():
    x = torch.randn(4, 5)

    def fn():
        y = x.view(20).unsqueeze(0).t()  # views
        z = torch.empty(3)  # allocation
        return (y * 2).sum(), z

    assert count_launches(fn) == {"total": 2, "aten": 2, "native": 0, "triton": 0}


def test_counts_accumulate_per_op():
    counter = LaunchCounter()
    with counter.triton_hook(), counter:
        a = torch.ones(3)
        for _ in range(3):
            a = a + 1
    assert counter.aten["add"] == 3 and counter.aten["ones"] == 1 and counter.total == 4
