"""``resfast study``: interleaved timing, the "did not learn" rule, and every section at a
micro scale (the markdown holds the measured tables and figures)."""
import contextlib
import copy
import io
import json
import re

import pytest
import torch
from torch import nn

from resfast.train.data import load_digits
from resfast.train.loop import TrainConfig, train
from resfast.train.study import SCALES, SECTIONS, compare_times, render_markdown, train_interleaved

TINY = SCALES["tiny"]


# ----------------------------------------------------------------------------- interleaving


class Recorder(nn.Module):
    """A small convnet that writes its name into ``log`` on every training forward."""

    def __init__(self, name: str, log: list, width: int) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x):
        if self.training:
            self.log.append(self.name)
        return self.net(x)


def _tiny_config(**kw):
    base = dict(model="recorder", epochs=2, batch_size=16, subset=64, device="cpu", progress=False,
                measure_memory=False, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def test_models_train_in_turns_and_each_learns_what_it_would_alone():
    data = load_digits(size=8)
    log: list = []
    torch.manual_seed(1)
    a, b = Recorder("A", log, 4), Recorder("B", log, 6)
    alone = [copy.deepcopy(a), copy.deepcopy(b)]
    runs = train_interleaved([a, b], _tiny_config(), data)
    steps = 2 * (64 // 16)  # two epochs of 4 batches
    assert log == ["A", "B"] * steps  # A, B, A, B ...: one round per batch
    for run in runs:
        assert len(run["step_times_s"]) == steps and all(t > 0 for t in run["step_times_s"])
        assert [h["epoch"] for h in run["history"]] == [1, 2]
    # Interleaving changes nothing in what each model learns: the same batches, augmentation
    # and schedule as resfast train gives it alone.
    for model, run in zip(alone, runs):
        model.log = []
        result = train(_tiny_config(), model=model, datasets=data)
        assert result["train_loss"] == [h["train_loss"] for h in run["history"]]
        assert result["test_acc_per_epoch"] == [h["test_acc"] for h in run["history"]]


def test_compare_times_ranks_only_when_the_spread_allows():
    fast = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0]
    slow = [2 * t for t in fast]
    t = compare_times(slow, fast, warmup=0)
    assert t["verdict"] == "b" and t["ratio_median"] == pytest.approx(2.0) and t["rounds"] == 8
    assert compare_times(fast, slow, warmup=0)["verdict"] == "a"
    # The load doubles every other round: the medians differ by 10%, but half the rounds say
    # the opposite, so the interquartile range of the per-round ratio contains 1.
    noisy_a = [1.0, 2.2, 1.0, 2.2, 1.0, 2.2, 1.0, 2.2]
    noisy_b = [2.0, 1.1, 2.0, 1.1, 2.0, 1.1, 2.0, 1.1]
    t = compare_times(noisy_a, noisy_b, warmup=0)
    assert t["verdict"] is None and t["ratio_p25"] < 1 < t["ratio_p75"]
    assert t["spread_a"] > 0.5
    # The first round (one-time costs) is left out by default.
    assert compare_times([100.0, *slow], [1.0, *fast])["rounds"] == 8
    with pytest.raises(ValueError, match="in pairs"):
        compare_times([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- the "did not learn" rule


def _comparison(base_acc: float, other_acc: float, learned_acc: float = 0.9):
    def run(label, acc, loss):
        return {"label": label, "params": 1e5, "macs": 1e6, "input_size": [3, 8, 8], "step_time_median_s": 0.01,
                "step_time_spread": 0.1, "images_per_s": 3200.0, "final_train_loss": loss, "final_test_loss": loss,
                "test_acc": acc, "learned": acc >= learned_acc,
                "history": [{"epoch": 1, "train_loss": loss, "test_acc": acc}]}

    timing = {"rounds": 10, "ratio_median": 1.0, "ratio_p25": 0.9, "ratio_p75": 1.1, "verdict": None,
              "median_a_s": 0.01, "median_b_s": 0.01, "spread_a": 0.1, "spread_b": 0.1}
    return {"available": True, "runs": [run("WRN-16-2, dropout 0", base_acc, 0.2), run("WRN-16-2, dropout 0.3",
                                                                                     other_acc, 0.7)],
            "timing": timing, "epochs": 3, "lr": 0.1, "batch_size": 32, "learned_acc": learned_acc,
            "baseline_learned": base_acc >= learned_acc, "p": 0.3, "figure": "figures/study_dropout.png",
            "time_s": 1.0}


def _setup():
    return {"scale": "small", "data": "digits", "image_size": 16, "subset": None, "batch_size": 32,
            "learned_acc": 0.9, "device": "cpu", "device_name": "x", "cpu_count": 2, "threads": 2,
            "backend": "auto", "resolved_backend": "eager", "torch": "t", "resfast": "r", "python": "p",
            "commit": None, "date": "d"}


def test_a_baseline_that_did_not_learn_draws_no_conclusion():
    md = render_markdown({"setup": _setup(), "sections": {"dropout": _comparison(0.25, 0.17)}, "total_time_s": 1.0})
    assert "**The baseline WRN-16-2, dropout 0 did not learn at this budget** (final test accuracy 25.0%, " \
           "below 90.0%): no conclusion is drawn" in md
    assert "With dropout the final train loss is" not in md  # the conclusion is left out
    assert "the spread is too large to rank them" in md

    md = render_markdown({"setup": _setup(), "sections": {"dropout": _comparison(0.97, 0.85)}, "total_time_s": 1.0})
    assert "did not learn at this budget**" not in md
    assert "The baseline WRN-16-2, dropout 0 learned at this budget (final test accuracy 97.0%" in md
    assert "WRN-16-2, dropout 0.3 did not learn at this budget (final test accuracy 85.0%)" in md
    assert "With dropout the final train loss is +0.500 and the test accuracy -12.0 points" in md


# ----------------------------------------------------------------------------- the whole study, micro scale


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from resfast.cli import main

    out = tmp_path_factory.mktemp("study")
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


def test_tiny_runs_do_not_learn_and_the_study_says_so(study):
    """Nothing learns in one epoch of 64 images: every comparison says its baseline did not
    learn and draws no conclusion from accuracies; its timing is interleaved."""
    _, doc, md = study
    for name, comparison in (("wide_vs_deep", TINY.wide_vs_deep), ("dropout", TINY.dropout)):
        sec = doc["sections"][name]
        base, other = sec["runs"]
        assert (base["label"], other["label"]) == (comparison.baseline.label, comparison.other.label)
        assert not sec["baseline_learned"] and base["test_acc"] < TINY.learned_acc
        assert f"**The baseline {base['label']} did not learn at this budget**" in md
        assert len(base["step_times_s"]) == len(other["step_times_s"]) == TINY.subset // TINY.batch_size
        assert sec["timing"]["rounds"] == len(base["step_times_s"]) - 1
    assert not doc["sections"]["resnext"]["baseline_learned"]
    assert md.count("did not learn at this budget**") == 3
    assert "With dropout the final train loss is" not in md and "reached the higher test accuracy" not in md


def test_study_numbers_come_from_the_runs(study):
    _, doc, md = study
    for r in doc["sections"]["wide_vs_deep"]["runs"]:
        assert r["params"] > 0 and r["macs"] > 0 and len(r["history"]) == TINY.wide_vs_deep.epochs
        row = next(line for line in md.splitlines() if line.startswith(f"| {r['label']}"))
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
    timing = dense["memory"]["timing"]
    assert set(timing["against_naive"]) == {"checkpoint", "shared"}
    assert all(len(t) == TINY.memory_time_rounds + 1 for t in timing["times_s"].values())
    counts = {c["name"]: c for c in dense["counts"]}
    assert f"| densenet_bc100_k12 | {counts['densenet_bc100_k12']['params'] / 1e6:.2f} |" in md


def test_missing_sections_render_as_not_available():
    results = {"setup": _setup(),
               "sections": {"densenet": {"available": False, "reason": "resfast.nn.dense is missing (x)"}},
               "total_time_s": 1.0}
    md = render_markdown(results)
    assert "Not available: resfast.nn.dense is missing (x)." in md
    assert md.count("Not run (left out with `--sections`).") == len(SECTIONS) - 1


def test_bad_sections_argument_is_a_value_error(capsys):
    from resfast.cli import main

    assert main(["study", "--scale", "tiny", "--sections", "target,bogus"]) == 2
    assert "--sections must be a comma-separated subset" in capsys.readouterr().err
