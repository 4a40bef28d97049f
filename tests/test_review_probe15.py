"""A fifteenth new-user trial: the command line and the figures it prints and saves
(``resfast memory``, ``resfast train`` and its run folder, ``resfast profile --static``,
``benchmarks/gpu_report.py`` / ``plot_results.py`` on the recorded results).

What was tried and matched (no test here unless pinned below): ``resfast memory --json`` on
densenet_bc100_k12 (batch 2, 32x32, ``--repeat 3``): every ``ratio_to_naive`` is its
``peak_bytes`` over naive's (shared 20,835,328 / 72,687,808 = 0.287), every ``step_time_s``
the median of its ``step_times_s`` and ``time_ratio_to_naive`` their quotient; the table
prints the same figures; the peaks come from PyTorch's memory tracker (CPU), bf16 autocast
halves naive's peak (72.7 -> 39.5 MB); ``--device cuda`` without a GPU, ``--batch-size 0`` /
``-3``, ``--repeat 0``, ``--image-size -1``, an unknown model or mode, ``--modes ,``, a
registered non-DenseNet, ``--plot`` with a library model, an unwritable plot folder,
``--backend triton`` on the CPU, ``--max-batch`` on the CPU and ``--dtype float64`` are each
one line on stderr and exit 2; ``torchvision:resnet18`` / ``torchvision:densenet121`` compare
as built and converted. ``resfast train``: ``--backend native`` reaches every block of
wrn16_2, resnet18, resnext29_8x64d, densenet_bc100_k12 and preact_resnet164;
``torchvision:resnet18`` trains (11,181,642 parameters with 10 classes, torchvision's count
less the 990 fewer classes' head); evaluation runs in eval mode over every test image once
(the last partial batch included: 15 of 100 -> 0.15), ``images_per_s`` is the images seen
over the epochs' time, ``metrics.csv`` / ``metrics.json`` hold the rows the log printed; a
resumed run continues the uninterrupted one; twenty bad arguments (``--epochs 0``,
``--lr -1`` / ``nan``, ``--momentum 1.5``, ``--dropout 2``, ``--workers -1``, CIFAR without
its files, ``--device tpu``, ``--memory`` on a WRN, ...) are one line and exit 2.
``resfast profile --static --shapes ci --json``: every kernel has the promised keys, every
op's ``ratio`` is ``eager_floor_us / fused_us`` (291.42 / 365.77 = 0.797), the printed table
shows the same numbers, its "measured" column is the newest gpu_check file's rows
(2026-11-29b: eager 1400, triton 1453, native 1190, compile 1557 us at stage 1), an unknown
shape is refused. ``gpu_report.py markdown`` on all five recorded results and
``plot_results.py`` on both schemas: ratios are the medians' quotients, units as labelled.

What failed, each a test here that failed before its fix:

* ``resfast memory --image-size 0`` ran at the model's own size (``--image-size or
  default``): the JSON said ``"image_size": 32`` for a run asked at 0, with no error;
* the ``resfast memory`` JSON and table did not say the dtype, layout or backend: a
  ``--dtype bfloat16`` document (naive peak 39,501,760 bytes) read exactly as a float32 one
  (72,687,808) of the same model, batch and size;
* ``--plot`` with ``--dtype bfloat16`` / ``--channels-last`` drew the dense-block sweep in
  float32 NCHW, silently (at 1-3 layers, batch 2, 8x8: naive 378,376-1,103,112 activation
  bytes where bf16 gives 435,720-1,053,960); ``--plot-layers 4,8`` (or any ``--plot-*``)
  without ``--plot`` was neither checked nor used;
* ``resfast train --resume`` with another ``--momentum`` or ``--weight-decay`` recorded the
  new value in ``metrics.json`` while ``optimizer.load_state_dict`` restored and used the
  checkpoint's (0.9 and 5e-4); another ``--lr``, ``--seed``, ``--subset`` or a larger
  ``--epochs`` (which re-spreads the schedule over the earlier epochs' rows) was taken
  silently, the history mixing two runs under one config;
* ``resfast train --out DIR`` on a folder that already held a run, without ``--resume``,
  overwrote its checkpoint and metrics after the first epoch;
* ``--lr inf`` and ``--weight-decay inf`` passed validation (and trained to NaN);
* a diverged run (``--lr 1e12``: test loss nan) printed its NaN losses with ``--json`` and
  saved them in ``metrics.json`` as the bare word ``NaN``, which is not JSON (``jq`` and
  strict parsers refuse the whole document); every ``--json`` document and ``metrics.json``
  now write a non-finite float as ``null``;
* ``resfast memory --modes naive,naive`` printed two naive rows with one timing (the
  timing is keyed by mode); ``resfast models --cardinality --name wrn``, ``--in 5`` without
  ``--dense-channels`` and ``--dense-channels ... --name x`` ignored the options the table
  does not read;
* ``resfast profile --static --shapes ,`` printed an empty report with exit 0, and
  ``--results DIR`` naming no folder was ignored.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

from resfast import BNReLUConv2d
from resfast.cli import main
from resfast.profiling import memory
from resfast.train import loop
from resfast.train.loop import TrainConfig, train


# --------------------------------------------------------------------------- resfast memory

def _no_model_run(monkeypatch):
    monkeypatch.setattr(memory, "measure_modes", lambda *a, **k: pytest.fail("a model ran before the arguments "
                                                                            "were checked"))


def test_memory_image_size_zero_is_refused_not_replaced_by_the_default(monkeypatch, capsys):
    _no_model_run(monkeypatch)
    assert main(["memory", "--model", "densenet_bc100_k12", "--image-size", "0", "--modes", "naive"]) == 2
    assert "--image-size must be a positive int, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--plot-layers", "4,8"], ["--plot-layers", "4,8,16"], ["--plot-batch", "2"],
                                    ["--plot-image-size", "12"]])
def test_memory_plot_options_without_plot_are_refused(option, monkeypatch, capsys):
    _no_model_run(monkeypatch)
    assert main(["memory", "--model", "densenet_bc100_k12", "--image-size", "8", *option]) == 2
    err = capsys.readouterr().err
    assert f"{option[0]}" in err and "no --plot FILE was given" in err


def test_memory_repeated_mode_is_refused(monkeypatch, capsys):
    """``--modes naive,naive`` listed two naive rows timed as one (the timing keyed by mode)."""
    _no_model_run(monkeypatch)
    assert main(["memory", "--model", "densenet_bc100_k12", "--image-size", "8", "--modes", "naive,naive"]) == 2
    assert "got 'naive,naive'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--cardinality", "--name", "wrn"], ["--in", "5"], ["--compression", "0.3"],
                                  ["--dense-channels", "--in", "4", "--growth", "2", "--layers", "2", "--name", "x"]])
def test_models_options_the_table_does_not_read_are_refused(argv, monkeypatch, capsys):
    from resfast.profiling import counting

    monkeypatch.setattr(counting, "model_counts", lambda *a, **k: pytest.fail("counted before the options were "
                                                                             "checked"))
    assert main(["models", *argv]) == 2
    assert "not an option of" in capsys.readouterr().err


def test_memory_document_and_plot_sweep_follow_dtype_and_layout(tmp_path):
    """One CLI call at bf16 + channels_last with --plot: the document, the table's first line
    and the sweep say so, and the sweep's bytes are a bf16 channels_last sweep's, not float32's."""
    png = tmp_path / "m.png"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["memory", "--model", "densenet_bc100_k12", "--batch-size", "2", "--modes", "shared",
                   "--repeat", "1", "--dtype", "bfloat16", "--channels-last", "--backend", "eager", "--json",
                   "--plot", str(png), "--plot-batch", "2", "--plot-image-size", "8", "--plot-layers", "1,2,3"])
    assert rc == 0
    doc = json.loads(buf.getvalue())
    assert (doc["dtype"], doc["channels_last"], doc["backend"]) == ("bfloat16", True, "eager")
    header = memory.format_table(doc).splitlines()[0]
    assert "bfloat16" in header and "channels_last" in header and "backend eager" in header
    sweep = doc["plot"]["sweep"]
    assert (sweep["dtype"], sweep["channels_last"]) == ("bfloat16", True)
    shape = dict(layers=(1, 2, 3), batch_size=2, image_size=8, backend="eager", progress=False)
    bf16 = memory.block_memory_sweep(["shared"], autocast_dtype=torch.bfloat16, channels_last=True, **shape)
    fp32 = memory.block_memory_sweep(["shared"], **shape)
    got = sweep["modes"]["shared"]["activation_bytes"]
    assert got == bf16["modes"]["shared"]["activation_bytes"]
    assert got != fp32["modes"]["shared"]["activation_bytes"]


def test_memory_float32_table_names_its_dtype():
    doc = {"model": "m", "batch_size": 1, "image_size": 8, "device": "cpu", "dtype": "float32",
           "channels_last": False, "backend": "auto",
           "results": [{"mode": "naive", "peak_bytes": 2 ** 20, "activation_bytes": 2 ** 19, "ratio_to_naive": 1.0}]}
    assert memory.format_table(doc).splitlines()[0] == "m, batch 1, 8x8, cpu, float32, backend auto"


# --------------------------------------------------------------------------- resfast train

class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.a = BNReLUConv2d(8, 8, 3, stride=2, padding=1, backend="eager")
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.a(self.stem(x)).mean((2, 3)))


def _model():
    torch.manual_seed(1)
    return _Tiny()


def _cfg(out, **kw):
    base = dict(model="tiny", epochs=2, batch_size=16, subset=48, progress=False, device="cpu", out=str(out),
                measure_memory=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory):
    """A 2-epoch run interrupted after its first epoch (only epoch 1's checkpoint exists)."""
    out = tmp_path_factory.mktemp("run")
    real = loop.evaluate
    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated preemption")
        return real(*a, **k)

    loop.evaluate = crashing
    try:
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(out), model=_model())
    finally:
        loop.evaluate = real
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
    return out


@pytest.mark.parametrize("change", [dict(momentum=0.0), dict(weight_decay=0.1), dict(lr=0.5), dict(seed=7),
                                    dict(subset=32), dict(epochs=3)])
def test_resume_refuses_settings_that_change_the_run(change, first_epoch, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(first_epoch, run)
    before = (run / "checkpoint.pt").read_bytes()
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"resume: the checkpoint was trained with {key}="):
        train(_cfg(run, resume=True, **change), model=_model())
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_with_the_same_settings_still_continues(first_epoch, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(first_epoch, run)
    result = train(_cfg(run, resume=True), model=_model())
    assert result["epochs"] == 2 and len(result["test_acc_per_epoch"]) == 2
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    group = saved["optimizer"]["param_groups"][0]
    assert saved["epoch"] == 1 and (group["momentum"], group["weight_decay"]) == (0.9, 5e-4)


def test_out_holding_a_run_is_refused_without_resume(first_epoch, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(first_epoch, run)
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        train(_cfg(run), model=_model())
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: pytest.fail("trained into a folder holding a run"))
    assert main(["train", "--out", str(run), "--subset", "8", "--no-progress", "--backend", "eager"]) == 2
    assert "already holds a run (checkpoint.pt)" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("field", ["lr", "weight_decay"])
def test_infinite_lr_and_weight_decay_are_refused(field):
    with pytest.raises(ValueError, match=f"{field} must be"):
        TrainConfig(**{field: math.inf}).validate()


def _strict(text):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_of_a_diverged_run_is_standard_json(tmp_path, capsys):
    """A diverged run's NaN losses were printed (``--json``) and saved (``metrics.json``) as the
    bare word ``NaN``, which JSON does not have; they are ``null`` now."""
    from resfast.cli import emit_json

    emit_json({"train_loss": [2.3, float("nan")], "test_acc": 0.1, "step": float("inf")})
    doc = _strict(capsys.readouterr().out)
    assert doc == {"train_loss": [2.3, None], "test_acc": 0.1, "step": None}
    row = {"epoch": 1, "lr": 0.1, "train_loss": float("nan"), "train_acc": 0.1, "test_loss": float("nan"),
           "test_acc": 0.1, "epoch_time_s": 1.0, "images_per_s": 32.0}
    loop.write_run_files(str(tmp_path), TrainConfig(model="tiny"), [row], {"train_loss": [float("nan")]})
    saved = _strict((tmp_path / "metrics.json").read_text())
    assert saved["history"][0]["train_loss"] is None and saved["summary"]["train_loss"] == [None]


# --------------------------------------------------------------------------- resfast profile --static

def _profile(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "resfast", "profile", "--static", *args], env=env,
                          capture_output=True, text=True, timeout=900)


def test_profile_refuses_an_empty_shape_list():
    run = _profile("--shapes", ",", "--json")
    assert run.returncode == 2 and run.stdout == ""
    assert "--shapes ',' names no shape" in run.stderr


def test_profile_refuses_a_results_folder_that_does_not_exist(tmp_path):
    run = _profile("--shapes", "ci", "--first-config", "--results", str(tmp_path / "nowhere"), "--json")
    assert run.returncode == 2 and run.stdout == ""
    assert "is not a folder" in run.stderr
