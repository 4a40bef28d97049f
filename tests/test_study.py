"""``resfast study`` at a micro scale: every section runs and the markdown holds its tables and figures."""
import json
import os
import re

import pytest

from resfast.train.study import SCALES, SECTIONS, render_markdown


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from resfast.cli import main

    out = tmp_path_factory.mktemp("study")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["study", "--scale", "tiny", "--device", "cpu", "--backend", "eager", "--out", str(out), "--json"])
    assert rc == 0
    return out, json.loads(buf.getvalue()), (out / "study.md").read_text()


def test_study_writes_every_section_with_measured_tables(study):
    out, doc, md = study
    for title in ("## 1. Digits target", "## 2. Wide versus deep", "## 3. Dropout inside the WRN block",
                  "## 4. ResNeXt versus ResNet", "## 5. DenseNet: connections, channels and memory"):
        assert title in md
    # The digits target belongs to the small scale; every comparison ran at the micro scale.
    assert not doc["sections"]["target"]["available"]
    for name in SECTIONS[1:]:
        assert doc["sections"][name]["available"], doc["sections"][name].get("reason")
    assert md.count("Not available") == 1
    for fig in ("study_wide_vs_deep.png", "study_dropout.png", "study_resnext.png", "study_dense_connections.png",
                "study_dense_memory.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
        assert f"(figures/{fig})" in md
    assert json.loads((out / "figures" / "study_results.json").read_text())["setup"]["scale"] == "tiny"


def test_study_numbers_come_from_the_runs(study):
    _, doc, md = study
    wide = doc["sections"]["wide_vs_deep"]["runs"]
    assert [r["label"] for r in wide] == [SCALES["tiny"].wide[0], SCALES["tiny"].deep[0]]
    for r in wide:
        assert r["params"] > 0 and r["macs"] > 0 and len(r["history"]) == SCALES["tiny"].epochs
        row = next(line for line in md.splitlines() if line.startswith(f"| {r['label']} |"))
        assert f"{100 * r['test_acc']:.1f}%" in row and f"{r['params'] / 1e6:.2f}" in row
    ref = {c["name"]: c["params"] for c in doc["sections"]["wide_vs_deep"]["reference"]}
    assert ref["wrn28_10"] > ref["resnet50"] and ref["resnet101"] > ref["resnet50"]
    card = doc["sections"]["resnext"]["cardinality"]
    assert [c["cardinality"] for c in card] == [1, 2, 4, 8, 32]
    assert max(c["params"] for c in card) / min(c["params"] for c in card) < 1.05  # equal complexity
    rx = doc["sections"]["resnext"]["runs"]
    assert abs(rx[0]["params"] - rx[1]["params"]) / rx[0]["params"] < 0.15


def test_dense_channels_follow_c0_plus_l_minus_1_k_and_memory_modes_are_measured(study):
    _, doc, md = study
    dense = doc["sections"]["densenet"]
    ch = dense["channels"]
    assert all(row["measured"] == row["formula"] == ch["c0"] + (row["layer"] - 1) * ch["k"] for row in ch["layers"])
    assert ch["transitions"][0]["in"] == ch["block_out"]
    modes = {r["mode"]: r for r in dense["memory"]["modes"]}
    assert set(modes) == {"naive", "checkpoint", "shared"} and modes["naive"]["ratio_to_naive"] == 1.0
    assert all(r["peak_bytes"] > 0 for r in modes.values())
    assert re.search(r"\| shared \| [0-9.]+ \|", md)
    counts = {c["name"]: c for c in dense["counts"]}
    assert f"| densenet_bc100_k12 | {counts['densenet_bc100_k12']['params'] / 1e6:.2f} |" in md


def test_missing_sections_render_as_not_available():
    results = {"setup": {"scale": "small", "data": "digits", "image_size": 16, "subset": None, "epochs": 3,
                         "batch_size": 32, "lr": 0.1, "device": "cpu", "device_name": "x", "cpu_count": 2,
                         "threads": 2, "backend": "auto", "resolved_backend": "eager", "torch": "t", "resfast": "r",
                         "python": "p", "commit": None, "date": "d"},
               "sections": {"densenet": {"available": False, "reason": "resfast.nn.dense is missing (x)"}},
               "total_time_s": 1.0}
    md = render_markdown(results)
    assert "Not available: resfast.nn.dense is missing (x)." in md
    assert md.count("Not run (left out with `--sections`).") == len(SECTIONS) - 1


def test_bad_sections_argument_is_a_value_error(capsys):
    from resfast.cli import main

    assert main(["study", "--scale", "tiny", "--sections", "target,bogus"]) == 2
    assert "--sections must be a comma-separated subset" in capsys.readouterr().err
