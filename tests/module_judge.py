"""The harness of the new-user trials (tests/test_review_probe5.py, _probe6.py) that judge a
whole module on a backend: the module run on that backend against the same module run unfused
(nn.BatchNorm2d's own forward) in float64 and in the backend's dtype, over train / eval / train
steps, by the float64 rule of tests/reference.py; and BatchNorms with mixed options."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from reference import assert_rule, judged_dtype


class PlainNet(nn.Module):
    """A user's own BatchNorm2d -> ReLU -> Conv2d model (a grouped 3x3 and a 1x1 after a stem),
    for the trials that pass it through resfast.convert under a torch.distributed wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn, self.relu = nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(6), nn.ReLU()
        self.conv2 = nn.Conv2d(6, 5, 1, bias=False)

    def forward(self, x):
        x = self.stem(x)
        return self.conv2(self.relu2(self.bn2(self.conv(self.relu(self.bn(x))))))


def randomize_bn(bn: nn.BatchNorm2d, g: torch.Generator, bias_scale: float = 0.3, running: bool = True) -> None:
    """Random affine parameters (weight in [0.5, 1.5), bias ~ N(0, bias_scale)) and, with
    ``running``, running statistics, where ``bn`` has them."""
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * bias_scale)
        if running and bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)


def randomize_bns(m: nn.Module) -> None:
    """Every BatchNorm2d of ``m``, in module order, from the global RNG: weight in [0.5, 1.5),
    bias ~ N(0, 1), running mean ~ N(0, 1), running variance in [0.5, 1.5)."""
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 1.5)


def set_backend(m: nn.Module, backend: str) -> nn.Module:
    for sub in m.modules():
        if hasattr(sub, "backend"):
            sub.backend = backend
    return m


def state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_unchanged(m: nn.Module, before: dict, context: str) -> None:
    for k, v in m.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), f"{k} changed by a rejected call ({context})"


VARIANTS = ("momentum_none", "no_running_stats", "no_affine")


def with_bn_options(m: nn.Module, offset: int = 0, seed: int = 0) -> nn.Module:
    """The i-th BatchNorm2d of ``m`` replaced by one with option ``VARIANTS[(i + offset) % 3]``
    (so one module mixes all three), with random affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    i = 0
    for mod in list(m.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.BatchNorm2d:
                variant = VARIANTS[(i + offset) % 3]
                i += 1
                kw = {"momentum_none": dict(momentum=None), "no_running_stats": dict(track_running_stats=False),
                      "no_affine": dict(affine=False)}[variant]
                bn = nn.BatchNorm2d(child.num_features, **kw)
                randomize_bn(bn, g)
                setattr(mod, name, bn)
    return m


def unfused(m: nn.Module) -> nn.Module:
    """``m`` running its BatchNorm / ReLU / conv modules one by one (a no-op hook on every
    BatchNorm): nn.BatchNorm2d's own forward, the reference of every option."""
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.register_forward_hook(lambda *args: None)
    return m


def scenario(m: nn.Module, dtype, xshape, call):
    """train, eval, train: outputs and input gradients of each step, then every parameter's
    gradient and every state_dict entry, by name."""
    out = []
    for step, mode in enumerate(("train", "eval", "train")):
        m.train(mode == "train")
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(*xshape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
        y = call(m, x)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
        (y * gy).sum().backward()
        out += [(f"step {step} ({mode}) output", y.detach()), (f"step {step} input gradient", x.grad)]
    out += [(f"grad {k}", p.grad) for k, p in sorted(m.named_parameters())]
    return out + sorted(m.state_dict().items())


def judge_module(build, backend, xshape, call=lambda m, x: m(x)):
    """``build()`` on ``backend`` in its dtype, against the same module unfused in float64
    (ref64) and in that dtype (ref_same), through :func:`scenario`."""
    dtype = judged_dtype(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hooks' "runs unfused" warning
        base = build()
        ref64 = scenario(unfused(set_backend(copy.deepcopy(base), "eager")).double(), torch.float64, xshape, call)
        same = scenario(unfused(set_backend(copy.deepcopy(base), "eager")).to(dtype), dtype, xshape, call)
        got = scenario(set_backend(copy.deepcopy(base), backend).to(dtype), dtype, xshape, call)
    compare_runs(got, ref64, same, backend, dtype)


def compare_runs(got, ref64, same, context: str, dtype, same_dtype: bool = False) -> None:
    """Three runs of one scenario, ``[(name, tensor or None)]`` each: the module on a backend
    (``got``), unfused in float64 (``ref64``) and unfused in the backend's dtype (``same``).
    The same names; a gradient ``None`` exactly where eager PyTorch's is; floating-point
    entries by the float64 rule of ``dtype``, others equal; with ``same_dtype`` each entry in
    the dtype eager PyTorch gives it."""
    assert [k for k, _ in got] == [k for k, _ in ref64]
    for (k, a), (_, r), (_, s) in zip(got, ref64, same):
        assert (a is None) == (r is None), f"{k}: gradient {'missing' if a is None else 'unexpected'} ({context})"
        if r is None:
            continue
        if same_dtype:
            assert a.dtype == s.dtype, f"{k}: dtype {a.dtype}, eager PyTorch gives {s.dtype} ({context})"
        if r.is_floating_point():
            assert_rule(k, a, r, s, context, dtype=dtype)
        else:
            assert torch.equal(a, r), f"{k}: {a} != {r} ({context})"
