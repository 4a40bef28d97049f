"""``resfast memory``: the JSON document, and the CPU memory targets at a reduced size.

At the issue's size (densenet121, batch 8, 224x224) activations are ~95% of the naive peak;
at a size that runs in a minute the fixed parameters and gradients (64 MB) dominate the
peak, so the reduced-size check applies the issue's ratios to the activation bytes (the
peak minus parameters, buffers and gradients, which scale with batch x pixels). These
still hold a fixed part (a block's weight gradients are temporaries until its backward
returns), so the size must not be too small: batch 4 at 96x96.
"""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
import torch

import resfast

from resfast.profiling.memory import MODES, measure_modes, measure_training_step


def test_cli_json_document(tmp_path):
    """The JSON document, and the --plot sweep at the shape the --plot-* options give (one
    CLI call for both: the model step is most of this file's time)."""
    from resfast.cli import main

    png = tmp_path / "not-yet" / "memory.png"  # the plot's folder is created
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["memory", "--model", "densenet_bc100_k12", "--batch-size", "2", "--image-size", "16",
                   "--modes", "naive,shared", "--repeat", "3", "--json", "--plot", str(png), "--plot-batch", "2",
                   "--plot-image-size", "12", "--plot-layers", "2,3,5"])
    assert rc == 0
    doc = json.loads(buf.getvalue())
    sweep = doc["plot"]["sweep"]
    assert doc["plot"]["file"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (sweep["batch_size"], sweep["image_size"], sweep["layers"]) == (2, 12, [2, 3, 5])
    assert list(sweep["modes"]) == ["naive", "shared"]
    assert [sweep["modes"][m]["fit_degree"] for m in ("naive", "shared")] == [2, 1]
    for row in sweep["modes"].values():
        act = row["activation_bytes"]
        assert len(act) == 3 and act == sorted(act) and act[0] > 0
    # Shared below naive at every depth (at 3x6x6 it is not: the weight-gradient temporaries dominate).
    assert all(s < n for s, n in zip(sweep["modes"]["shared"]["activation_bytes"],
                                     sweep["modes"]["naive"]["activation_bytes"]))
    assert {k: doc[k] for k in ("model", "batch_size", "image_size", "device")} == {
        "model": "densenet_bc100_k12", "batch_size": 2, "image_size": 16, "device": "cpu"}
    assert [r["mode"] for r in doc["results"]] == ["naive", "shared"]
    for r in doc["results"]:
        assert {"mode", "peak_bytes", "activation_bytes", "step_time_s", "launches"} <= set(r)
        assert 0 < r["activation_bytes"] < r["peak_bytes"]
        assert r["step_time_s"] > 0
        # the median of the 3 timed steps, taken in rounds alternating the two modes
        assert len(r["step_times_s"]) == 3 and all(t > 0 for t in r["step_times_s"])
        assert r["step_time_s"] == sorted(r["step_times_s"])[1]
        assert isinstance(r["launches"], int) and r["launches"] > 100  # ~ten per layer at least
    naive, shared = doc["results"]
    assert shared["peak_bytes"] < naive["peak_bytes"]
    assert naive["ratio_to_naive"] == 1.0
    assert naive["time_ratio_to_naive"] == 1.0
    assert shared["time_ratio_to_naive"] == shared["step_time_s"] / naive["step_time_s"]


def test_cli_errors():
    from resfast.cli import main

    assert main(["memory", "--modes", "naive,fast"]) == 2
    assert main(["memory", "--max-batch", "--device", "cpu", "--image-size", "16"]) == 2
    assert main(["memory", "--repeat", "0", "--image-size", "16"]) == 2
    # The --plot options are checked before any model runs.
    for bad in (["--plot-layers", "4,8"], ["--plot-layers", "8,4,16"], ["--plot-layers", "0,4,8"],
                ["--plot-layers", "a,b,c"], ["--plot-batch", "0"], ["--plot-image-size", "0"]):
        args = ["memory", "--image-size", "8", "--batch-size", "1", "--plot", "unused.png", *bad]
        assert main(args) == 2, bad
    with pytest.raises(ValueError, match="--max-batch needs --device cuda"):
        from resfast.profiling import memory

        import argparse

        p = argparse.ArgumentParser()
        memory.add_arguments(p)
        memory.run(p.parse_args(["--max-batch", "--image-size", "16"]))
    with pytest.raises(ValueError, match=r"--plot-layers must be .*got '4,8'"):
        memory.run(p.parse_args(["--plot", "unused.png", "--plot-layers", "4,8"]))
    with pytest.raises(ValueError, match=r"--plot-batch must be a positive int, got 0"):
        memory.run(p.parse_args(["--plot", "unused.png", "--plot-batch", "0"]))
    with pytest.raises(ValueError, match=r"--repeat must be a positive int, got -1"):
        memory.run(p.parse_args(["--repeat", "-1"]))
    # batch 1 at a size whose last BatchNorm gets one value per channel: refused before anything
    # runs, naming the way out (probe 32: PyTorch's BatchNorm message after the model had run)
    with pytest.raises(ValueError, match=r"--batch-size 1 at --image-size 32 .* --image-size 61 or more"):
        memory.run(p.parse_args(["--batch-size", "1", "--image-size", "32", "--modes", "naive"]))


def test_measure_training_step_counts_exact_bytes():
    """A model whose activation bytes are known exactly: a bias-free linear layer saves its
    input (already counted as the input) and its output's gradient path stores nothing else."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    x = torch.randn(16, 64)
    r = measure_training_step(model, x, "cpu", loss_fn=lambda y: y.square().sum())
    param = 64 * 32 * 4
    # params + grads + the input + output + the loss path's temporaries, all exact multiples of 4 bytes
    assert r["peak_bytes"] % 4 == 0
    assert r["peak_bytes"] >= 2 * param + x.numel() * 4 + 16 * 32 * 4


def test_cpu_targets_at_reduced_size():
    """densenet121 on the CPU, exact accounting: shared <= 1/3 of naive and <= 2/3 of
    checkpoint, shared_bottleneck <= 1/5 of naive (activation bytes; see the module doc)."""
    res = {r["mode"]: r for r in measure_modes("densenet121", list(MODES), batch_size=4, image_size=96,
                                               backend="eager", progress=False, timed=False)}
    act = {m: r["activation_bytes"] for m, r in res.items()}
    assert act["shared"] <= act["naive"] / 3, act
    assert act["shared"] <= act["checkpoint"] * 2 / 3, act
    assert act["shared_bottleneck"] <= act["naive"] / 5, act
    assert res["shared"]["peak_bytes"] < res["checkpoint"]["peak_bytes"] < res["naive"]["peak_bytes"]


def test_library_model_without_dense_blocks_original_against_resfast():
    """``resfast memory --model torchvision:NAME`` for a model without dense blocks: the
    library's own modules (original) against the same weights converted (resfast)."""
    pytest.importorskip("torchvision")
    from resfast.backends import backend_status
    from resfast.cli import main
    from resfast.profiling import memory

    if backend_status("cpu")["native"]:
        pytest.skip(f"the native backend does not run here: {backend_status('cpu')['native']}")

    assert memory._parse_modes(None, dense=False) == ["original", "resfast"]
    assert isinstance(memory.build_for_mode("torchvision:resnet18", "resfast", "eager").layer1[0], resfast.BasicBlock)
    assert not isinstance(memory.build_for_mode("torchvision:resnet18", "original").layer1[0], resfast.BasicBlock)
    buf = io.StringIO()
    with redirect_stdout(buf):
        # native: the fused op saves only its input and recomputes BN-ReLU in backward (eager,
        # the reference, is PyTorch's own autograd and stores what torchvision stores).
        # one timed round (the step times are not what this test checks; the default is 5)
        rc = main(["memory", "--model", "torchvision:resnet18", "--batch-size", "2", "--image-size", "64",
                   "--backend", "native", "--json", "--repeat", "1"])
    assert rc == 0
    doc = json.loads(buf.getvalue())
    assert [r["mode"] for r in doc["results"]] == ["original", "resfast"]
    original, converted = doc["results"]
    assert original["ratio_to_original"] == 1.0
    assert converted["ratio_to_original"] == converted["peak_bytes"] / original["peak_bytes"]
    for r in doc["results"]:
        assert 0 < r["activation_bytes"] < r["peak_bytes"] and isinstance(r["launches"], int)
    assert converted["activation_bytes"] < original["activation_bytes"]
    text = memory.format_table({**doc, "results": doc["results"]})
    assert "vs original" in text and "resfast" in text


def test_library_and_registered_model_mode_errors(capsys):
    from resfast.cli import main

    assert main(["memory", "--model", "resnet18"]) == 2
    assert "without dense blocks has one memory mode" in capsys.readouterr().err
    assert main(["memory", "--model", "torchvision:resnet18", "--modes", "shared"]) == 2
    assert "original,resfast" in capsys.readouterr().err
    assert main(["memory", "--model", "torchvision:resnet18", "--plot", "x.png"]) == 2
    assert "needs a DenseNet" in capsys.readouterr().err
