"""One set of input rules on every backend and memory mode, matching torchvision; a rejected
call changes nothing (issue: no silent wrong results, items 3, 6, 7 and 9)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resfast
from resfast.backends import BackendUnavailableError, backend_status
from resfast.functional import bn_relu_conv2d

BACKENDS = ("eager", "triton", "native")
MODES = ("shared", "checkpoint", "naive")


def _require(backend: str) -> None:
    why = backend_status("cpu")[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on cpu: {why}")


def _state(m: torch.nn.Module):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _block(memory: str, backend: str) -> resfast.DenseBlock:
    torch.manual_seed(0)
    return resfast.DenseBlock(2, 4, 2, 3, memory=memory, backend=backend)


# ------------------------------------------------------------------ item 3: the dense block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", MODES)
def test_dense_block_rejects_what_torchvision_rejects(memory, backend):
    _require(backend)
    block = _block(memory, backend)
    before = _state(block)
    bad = [
        (torch.randint(0, 5, (2, 4, 5, 5)), TypeError, "floating-point input"),  # int64
        (torch.randn(1, 4, 1, 1), ValueError, "more than 1 value per channel"),
        (torch.randn(2, 4, 5, 5, dtype=torch.float64), TypeError, "float64 but the block's parameters are"),
    ]
    for x, exc, match in bad:
        with pytest.raises(exc, match=match):
            block(x)
        assert _same_state(block.state_dict(), before), f"a rejected {x.dtype} {tuple(x.shape)} input changed state"


def test_torchvision_rejects_the_same_inputs():
    """The reference behaviour the test above holds every mode to."""
    tv = pytest.importorskip("torchvision.models.densenet")
    block = tv._DenseBlock(2, 4, 2, 3, drop_rate=0.0)
    for x in (torch.randint(0, 5, (2, 4, 5, 5)), torch.randn(1, 4, 1, 1), torch.randn(2, 4, 5, 5).double()):
        with pytest.raises((TypeError, ValueError, RuntimeError, NotImplementedError)):
            block(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", MODES)
def test_empty_batch_matches_torchvision(memory, backend):
    """An empty batch in training: an empty output; the running statistics untouched and
    num_batches_tracked incremented, as torchvision's block (nn.BatchNorm2d) does."""
    _require(backend)
    tv = pytest.importorskip("torchvision.models.densenet")
    block = _block(memory, backend)
    ref = tv._DenseBlock(2, 4, 2, 3, drop_rate=0.0)
    ref.load_state_dict(block.state_dict())
    x = torch.randn(0, 4, 5, 5)
    y, y_ref = block(x), ref(x)
    assert y.shape == y_ref.shape == (0, 10, 5, 5)
    got, exp = block.state_dict(), ref.state_dict()
    for k in exp:
        assert torch.equal(got[k], exp[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_fused_module_and_resnet18(backend):
    _require(backend)
    m = resfast.BNReLUConv2d(4, 6, 3, padding=1, backend=backend)
    assert m(torch.randn(0, 4, 5, 5)).shape == (0, 6, 5, 5)
    assert int(m.norm.num_batches_tracked) == 1
    model = resfast.create_model("resnet18", num_classes=7, backend=backend)
    assert model(torch.randn(0, 3, 32, 32)).shape == (0, 7)


# ------------------------------------------------------------------ item 6: one validator


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_argument_rules_are_the_same_on_every_backend(backend):
    _require(backend)
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 4, 1, 1)
    rm, rv = torch.zeros(4), torch.ones(4)
    rm0 = rm.clone()

    def call(**over):
        kw = dict(bn_weight=None, bn_bias=None, running_mean=rm, running_var=rv, training=True, backend=backend)
        kw.update(over)
        return bn_relu_conv2d(x, w, **kw)

    with pytest.raises(TypeError, match=r"momentum=None .* num_batches_tracked: use resfast.BNReLUConv2d"):
        call(momentum=None)
    with pytest.raises(TypeError, match=r"running_mean has dtype torch.float64 but x is torch.float32"):
        call(running_mean=rm.double(), running_var=rv.double())
    with pytest.raises(TypeError, match=r"bn_weight has dtype torch.float64 but x is torch.float32"):
        call(bn_weight=torch.ones(4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"training must be a bool, got None"):
        call(training=None)
    with pytest.raises(TypeError, match=r"momentum must be a float in \[0, 1\], got 2"):
        call(momentum=2)
    assert torch.equal(rm, rm0)


def test_bf16_input_with_float32_bn_parameters_is_accepted():
    """The mixed dtypes F.batch_norm takes (autocast produces them) stay accepted."""
    x = torch.randn(2, 4, 5, 5, dtype=torch.bfloat16)
    w = torch.randn(6, 4, 1, 1, dtype=torch.bfloat16)
    y = bn_relu_conv2d(x, w, bn_weight=torch.ones(4), bn_bias=torch.zeros(4), running_mean=torch.zeros(4),
                       running_var=torch.ones(4), training=True, backend="eager")
    assert y.dtype == torch.bfloat16


# ------------------------------------------------------------------ item 7: track_running_stats=False


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", MODES)
def test_track_running_stats_false_with_buffers_kept(memory, backend):
    """A BatchNorm told not to track after construction (buffers kept) normalises with batch
    statistics and leaves its buffers alone in training, in every mode, as torchvision's."""
    _require(backend)
    tv = pytest.importorskip("torchvision.models.densenet")
    dtype = torch.float32 if backend == "triton" else torch.float64  # triton has no float64 kernels
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    block = _block(memory, backend).to(dtype)
    ref = tv._DenseBlock(2, 4, 2, 3, drop_rate=0.0).to(dtype)
    ref.load_state_dict(block.state_dict())
    for m in (block, ref):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.track_running_stats = False
    x = torch.randn(2, 4, 5, 5, dtype=dtype)
    torch.testing.assert_close(block(x), ref(x), rtol=tol, atol=tol)
    got, exp = block.state_dict(), ref.state_dict()
    for k in exp:
        assert torch.equal(got[k], exp[k]), k


# ------------------------------------------------------------------ item 9: API


def test_blocks_import_from_resfast_nn():
    from resfast.nn import Bottleneck, DenseBlock, Transition  # noqa: F401

    assert DenseBlock is resfast.DenseBlock and Bottleneck is resfast.Bottleneck


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_block_under_autocast_returns_the_dtype_naive_returns(backend):
    _require(backend)
    x = torch.randn(2, 4, 5, 5)
    dtypes = {}
    for memory in MODES:
        block = _block(memory, backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dtypes[memory] = block(x).dtype
    assert dtypes["shared"] == dtypes["naive"] == dtypes["checkpoint"] == torch.float32, dtypes


def test_unavailable_backend_changes_nothing(monkeypatch):
    import resfast.backends

    monkeypatch.setattr(resfast.backends, "triton_interpret", lambda: False)
    m = resfast.BNReLUConv2d(4, 4, 3, padding=1, backend="triton")
    before = _state(m)
    with pytest.raises(BackendUnavailableError):
        m(torch.randn(2, 4, 5, 5))
    assert _same_state(m.state_dict(), before)
    block = _block("shared", "triton")
    before = _state(block)
    with pytest.raises(BackendUnavailableError):
        block(torch.randn(2, 4, 5, 5))
    assert _same_state(block.state_dict(), before)


def test_naive_mode_float64_input_error_names_the_dtypes():
    block = _block("naive", "eager")
    with pytest.raises(TypeError, match="float64"):
        block(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert F is not None
