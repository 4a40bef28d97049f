"""Backend resolution: auto, RESFAST_BACKEND, and the errors for a backend that cannot run."""
import pytest
import torch

import resfast
from resfast import backends
from resfast.backends import BackendUnavailableError, backend_status, resolve_backend


def test_eager_always_runs():
    assert resolve_backend("eager", "cpu") == "eager"
    assert backend_status("cpu")["eager"] == ""


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cuda'"):
        resolve_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        resfast.BNReLUConv2d(4, 4, backend="fast")


def test_auto_on_cpu_is_eager(monkeypatch):
    monkeypatch.delenv("RESFAST_BACKEND", raising=False)
    assert resolve_backend("auto", "cpu") == "eager"


def test_env_override(monkeypatch):
    monkeypatch.setenv("RESFAST_BACKEND", "eager")
    assert resolve_backend("auto", "cpu") == "eager"
    monkeypatch.setenv("RESFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RESFAST_BACKEND must be one of"):
        resolve_backend("auto", "cpu")


def test_env_override_to_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("RESFAST_BACKEND", "triton")
    monkeypatch.setattr(backends, "triton_interpret", lambda: False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve_backend("auto", "cpu")


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(backends, "triton_interpret", lambda: False)
    why = backend_status("cpu")["triton"]
    assert why, "triton must not claim to run on CPU tensors without the interpreter"
    with pytest.raises(BackendUnavailableError, match=r"backend='triton' cannot run on cpu tensors"):
        resolve_backend("triton", "cpu")


def test_missing_triton_says_what_to_install(monkeypatch):
    monkeypatch.setattr(backends, "_triton_import", lambda: (None, "triton is not importable (x); install it with `pip install triton`"))
    with pytest.raises(BackendUnavailableError, match="pip install triton"):
        resolve_backend("triton", "cpu")


def test_missing_native_says_how_to_build(monkeypatch):
    monkeypatch.setattr(backends, "_native_import", lambda: (None, "the compiled extension resfast._C is not available (x); reinstall"))
    with pytest.raises(BackendUnavailableError, match="resfast._C is not available"):
        resolve_backend("native", "cpu")
    assert backends.native_info()["built"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; this machine has a GPU")
def test_cuda_device_without_gpu():
    status = backend_status("cuda")
    assert status["eager"] == ""
    assert status["triton"] and status["native"]
    assert resolve_backend("auto", "cuda") == "eager"


def test_functional_rejects_unavailable_backend_without_touching_stats(monkeypatch):
    monkeypatch.setattr(backends, "triton_interpret", lambda: False)
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(4, 4, 1, 1)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(BackendUnavailableError):
        resfast.functional.bn_relu_conv2d(x, w, bn_weight=None, bn_bias=None, running_mean=rm, running_var=rv,
                                          training=True, backend="triton")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
