"""The ``resfast info`` and ``resfast models`` subcommands, through ``resfast.cli.main``."""
from __future__ import annotations

import json

import pytest
import torch

from resfast.cli import main
from resfast.models import create_model, list_models
from resfast.profiling import count_macs, count_params


def _json(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out)  # exactly one JSON document on stdout


def test_info_json(capsys):
    from resfast.backends import backend_status

    info = _json(capsys, ["info", "--json"])
    assert info["torch"] == torch.__version__
    assert len(info["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    cpu = info["backends"]["cpu"]
    assert set(cpu) == {"eager", "triton", "native"} and cpu["eager"] == "ok"
    for name, why in backend_status("cpu").items():
        assert cpu[name] == (why or "ok")
    assert isinstance(info["native"]["built"], bool)


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "eager" in out


def test_models_json_matches_direct_counts(capsys):
    rows = _json(capsys, ["models", "--name", "wrn16_[24]", "--json"])
    assert [r["name"] for r in rows] == ["wrn16_2", "wrn16_4"]
    for r in rows:
        assert set(r) == {"name", "params", "macs", "input_size"}
        assert r["input_size"] == [3, 32, 32]
        m = create_model(r["name"])
        assert r["params"] == count_params(m)
        assert r["macs"] == count_macs(m, (3, 32, 32))  # real CPU run agrees with the meta-device count


@pytest.mark.slow  # about 38 CPU s: count_macs's FlopCounterMode over every registered model on the meta device
def test_models_lists_every_registered_model(capsys):
    """The whole table (every family, DenseNet included once registered) counts on the meta device.
    Slow: the MAC count of the deepest models (preact_resnet1001, densenet264, densenet_bc250_k24)
    goes through torch's FlopCounterMode, which decomposes every batch norm on the meta device;
    nothing smaller is the whole table. Between slow runs, test_models.py counts every registered
    model's parameters and runs it on the meta device, and the tests here count MACs through the
    CLI (--name, the text table) and against a real CPU run."""
    rows = _json(capsys, ["models", "--json"])
    assert [r["name"] for r in rows] == list_models()
    for r in rows:
        assert r["params"] > 0 and r["macs"] > 0, r
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnet50"]["params"] == 25_557_032  # torchvision's documented count
    assert by_name["resnext50_32x4d"]["macs"] < by_name["seresnext50_32x4d"]["macs"]


def test_models_text_table(capsys):
    assert main(["models", "--name", "act_resnet16"]) == 0  # a plain word matches as a substring
    out = capsys.readouterr().out
    assert "preact_resnet164" in out and "preact_resnet1001" not in out and "1,703,258" in out
    assert "3x32x32" in out


def test_models_cardinality_table(capsys):
    rows = _json(capsys, ["models", "--cardinality", "--json"])
    assert [(r["cardinality"], r["bottleneck_width"]) for r in rows] == [(1, 64), (1, 64), (2, 40), (4, 24), (8, 14),
                                                                         (32, 4)]
    assert rows[0]["block"] == "resnet bottleneck"
    base = rows[0]
    for r in rows:
        # measured conv weights equal the paper's closed form C * (256 d + 9 d^2 + d 256)
        d, c = r["bottleneck_width"], r["cardinality"]
        assert r["conv_params"] == r["paper_formula_params"] == c * (256 * d + 9 * d * d + d * 256)
        # stride 1 at 56x56: every conv weight is used once per output pixel
        assert r["macs"] == r["conv_params"] * 56 * 56
        # BN adds 2 per channel of the three norms
        assert r["params"] - r["conv_params"] == 2 * (2 * c * d + 256)
        # complexity preserved: within 3% of the ResNet bottleneck
        assert abs(r["macs"] - base["macs"]) / base["macs"] < 0.03
    assert main(["models", "--cardinality"]) == 0
    assert "32x4" in capsys.readouterr().out


def test_models_dense_channels(capsys):
    t = _json(capsys, ["models", "--dense-channels", "--in", "24", "--growth", "12", "--layers", "4", "--json"])
    assert [r["in_channels"] for r in t["layers"]] == [24, 36, 48, 60]
    assert t["block_out"] == 72 and t["transition_out"] == 36
    t = _json(capsys, ["models", "--dense-channels", "--in", "64", "--growth", "32", "--layers", "6",
                       "--compression", "0.5", "--json"])
    assert t["block_out"] == 256 and t["transition_out"] == 128  # DenseNet-121's first block
    try:
        from resfast.nn.dense import DenseBlock, Transition
    except ImportError as exc:
        pytest.skip(f"resfast.nn.dense is not importable: {exc}")
    # the formula agrees with a real dense block and transition
    blk = DenseBlock(4, 24, 4, 12, memory="naive", backend="eager")
    y = blk(torch.randn(2, 24, 5, 5))
    assert y.shape[1] == 72
    assert Transition(72, 36)(y).shape[1] == 36


def test_models_bad_arguments(capsys):
    assert main(["models", "--name", "no_such_model"]) == 2
    assert "--name 'no_such_model' matches no registered model" in capsys.readouterr().err
    assert main(["models", "--dense-channels", "--growth", "12", "--layers", "4"]) == 2
    assert "--dense-channels needs --in" in capsys.readouterr().err
    assert main(["models", "--dense-channels", "--in", "24", "--growth", "0", "--layers", "4"]) == 2
    assert "--growth must be a positive int, got 0" in capsys.readouterr().err
    assert main(["models", "--dense-channels", "--in", "24", "--growth", "2", "--layers", "4",
                 "--compression", "1.5"]) == 2
    assert "--compression must be in (0, 1], got 1.5" in capsys.readouterr().err


# ----------------------------------------------------------------------------- user errors and --help
# (issue: a CPU user got tracebacks, a late failure after training, RST markup in --help)


def _help(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_help_is_plain_text_and_says_nothing_is_saved_without_out(capsys):
    from resfast.cli import SUBCOMMANDS, build_parser

    present = [name for name in SUBCOMMANDS if name in build_parser()._subparsers._group_actions[0].choices]
    for argv in ([], *([name] for name in present)):
        text = _help(capsys, argv)
        for markup in ("``", ":func:", ":class:", ":mod:", ":data:", "`"):
            assert markup not in text, (argv, markup, text)
    train_help = " ".join(_help(capsys, ["train"]).split())
    assert "Without --out nothing is saved" in train_help and "(default: none, nothing is saved)" in train_help


def test_backend_choices_come_from_the_backend_table():
    from resfast.backends import BACKENDS
    from resfast.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    for name in ("train", "memory", "study"):
        backend = next(a for a in sub[name]._actions if a.dest == "backend")
        assert tuple(backend.choices) == BACKENDS, name


@pytest.mark.parametrize("argv", [
    ["train", "--backend", "triton", "--device", "cpu", "--subset", "8", "--no-progress"],
    ["memory", "--backend", "triton", "--model", "densenet_bc100_k12", "--image-size", "16", "--batch-size", "2"],
])
def test_a_backend_that_cannot_run_is_one_line_and_exit_2(argv, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton cannot run on CPU tensors now
    from resfast.train import loop

    monkeypatch.setattr(loop, "train_step", lambda *a, **k: pytest.fail("trained before checking the backend"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    assert lines == [lines[0]] and lines[0].startswith(f"resfast {argv[0]}: error: backend='triton' cannot run")
    assert "Traceback" not in err


def test_train_checks_the_output_folder_before_training(tmp_path, capsys, monkeypatch):
    from resfast.train import loop

    monkeypatch.setattr(loop, "train_step", lambda *a, **k: pytest.fail("trained before checking --out"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", "--out", str(blocker / "run"), "--subset", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out '{blocker / 'run'}' is not a writable folder" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="is not a writable folder"):
        loop.train(loop.TrainConfig(out=str(blocker / "run"), subset=8, progress=False))


@pytest.mark.parametrize("command", ["train", "memory"])
def test_unknown_model_names_suggest_close_names(command, capsys):
    assert main([command, "--model", "wrn16_3" if command == "train" else "densenet12"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and ("wrn16_2" in err if command == "train" else "densenet121" in err)
    assert "`resfast models` lists them all" in err and "Traceback" not in err


def test_memory_checks_the_image_size_against_the_model_before_running(capsys, monkeypatch):
    from resfast.profiling import memory

    monkeypatch.setattr(memory, "measure_modes", lambda *a, **k: pytest.fail("ran before checking the size"))
    assert main(["memory", "--image-size", "8"]) == 2  # densenet121: the stem and 3 transitions need 29
    err = capsys.readouterr().err
    assert "--image-size 8 is too small for densenet121" in err and "the smallest size it takes is 29" in err
    assert memory.min_image_size("densenet_bc100_k12") == 4  # CIFAR stem, two transitions


def test_info_says_native_on_the_cpu_is_the_test_twin_not_a_speed_path(capsys):
    from resfast.backends import backend_status
    from resfast.cli_info import backend_note

    note = backend_note("native", "cpu")
    assert "test twin" in note and "not a speed path" in note and "auto never picks it on cpu" in note
    assert "test twin" not in backend_note("eager", "cpu") and "test twin" not in backend_note("native", "cuda")
    assert main(["info"]) == 0
    native = [line for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["cpu", "native"]]
    if backend_status("cpu")["native"]:
        pytest.skip(f"resfast._C is not built here: {backend_status('cpu')['native']}")
    assert len(native) == 1 and "test twin of the GPU kernels, not a speed path" in native[0]
