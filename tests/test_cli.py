"""The fxqp command line: demo, train, inspect, explain, and its one-line errors."""

import json
import subprocess
import sys

import pytest

from fxqp.cli import main

SPEC_YAML = """\
rules:
  - modules: [Conv2d, Linear]
    weight:
      - {op: prune, sparsity: 0.5, start: 5, end: 15, every: 5}
      - {op: quantize, bits: 4, start: 10}
  - modules: [ReLU]
    functions: [relu]
    activation:
      - {op: quantize, bits: 8, start: 10}
"""


def test_demo_runs_the_experiment_and_writes_plots(tmp_path, capsys):
    assert main(["demo", "--tasks", "digits", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for order in ("baseline", "P(w)->Q", "Q->P(w)", "P(w,a)->Q", "Q->P(w,a)"):
        assert f"| {order} " in out
    assert "winners: weights:" in out and "seed paper" in out and "92.23" in out
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["tasks"]["digits"]["rows"]
    assert [r["order"] for r in rows] == ["baseline", "Q", "P(w)->Q", "Q->P(w)", "P(w,a)->Q", "Q->P(w,a)"]
    baseline = rows[0]["packed_bytes"]
    assert all(r["packed_bytes"] < baseline / 3 for r in rows[1:])  # 8-bit (and pruned) vs float
    files = {p.name for p in (tmp_path / "digits").iterdir()}
    assert {"sites.png", "curves.png", "size_tradeoff.png", "schedule_Pwa-then-Q.png", "digits_Pw-then-Q_seed0.fxqp"} <= files


def test_train_inspect_explain(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_YAML)
    out_dir = tmp_path / "run"
    assert main(["train", "--data", "digits", "--spec", str(spec), "--epochs", "1", "--out", str(out_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "21 optimizer steps" in out and "artifact" in out
    assert {p.name for p in out_dir.iterdir()} == {"model.fxqp", "summary.txt", "result.json", "metrics.jsonl", "checkpoint.safetensors"}
    result = json.loads((out_dir / "result.json").read_text())
    assert result["steps"] == 21 and result["config"]["spec"]["rules"][0]["weight"][1]["bits"] == 4
    assert result["artifact_bytes"] == (out_dir / "model.fxqp").stat().st_size and 0 <= result["val_accuracy"] <= 100

    assert main(["inspect", str(out_dir / "model.fxqp")]) == 0
    report = capsys.readouterr().out
    assert "lowered at step 21" in report and "conv1.weight" in report and "50.0%" in report
    assert f"file: {(out_dir / 'model.fxqp').stat().st_size:,} bytes" in report

    assert main(["explain", "--model", "digits-cnn", "--spec", str(spec), "--data", "digits"]) == 0
    explained = capsys.readouterr().out
    assert "conv1.weight" in explained and "rules[1]" in explained


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "digits", "--spec", "missing.yaml", "--out", "x"], "--spec missing.yaml: no such file"),
        (["train", "--data", "mnist", "--spec", "SPEC", "--out", "x"], "--data 'mnist': expected one of digits"),
        (["inspect", "nothing.fxqp"], "nothing.fxqp: no such file"),
        (["explain", "--model", "torchvision:nope", "--spec", "SPEC"], "torchvision has no model 'nope'"),
        (["explain", "--model", "digits-cnn", "--spec", "BAD"], "rules[0].weight[0]"),
        (["demo", "--tasks", "cifar"], "--tasks: unknown task 'cifar'"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, capsys, argv, message):
    (tmp_path / "spec.yaml").write_text(SPEC_YAML)
    (tmp_path / "bad.yaml").write_text("rules:\n  - modules: [Conv2d]\n    weight: [{op: quantize, bits: 99}]\n")
    argv = [str(tmp_path / "spec.yaml") if a == "SPEC" else str(tmp_path / "bad.yaml") if a == "BAD" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_bad_arguments_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--epochs", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected a positive integer, got 'many'" in err and "fxqp demo --help" in err


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["inspect"], ["explain"]])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "fxqp.cli", *command, "--help"], capture_output=True, text=True, check=True)
    assert "usage: fxqp" in result.stdout


def test_train_with_filter_pruning_removes_channels(tmp_path, capsys):
    spec = tmp_path / "filters.yaml"
    spec.write_text(
        "rules:\n  - modules: [Conv2d]\n    weight:\n"
        "      - {op: prune, sparsity: 0.5, structure: filter, criterion: angle, start: 5}\n"
        "      - {op: quantize, bits: 1, method: binary}\n"
    )
    assert main(["train", "--data", "digits", "--spec", str(spec), "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert "coupled filter groups: 3" in summary and "pruned channels removed from the layers: 64 of 128" in summary
    assert main(["inspect", str(tmp_path / "run" / "model.fxqp")]) == 0
    assert "16×1×3×3" in capsys.readouterr().out  # conv1 keeps 16 of its 32 filters
