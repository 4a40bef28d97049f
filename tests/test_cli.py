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


def test_models_lists_every_registered_model(capsys):
    """The whole table (every family, DenseNet included once registered) counts on the meta device."""
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
