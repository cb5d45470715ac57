"""``fxqp demo``: three seeds by default, paired winners, one line per run in a log."""

import json

import pytest

from fxqp.cli import main
from fxqp.experiment import ORDERS


@pytest.mark.slow  # 18 short runs and the plots
def test_demo_runs_three_seeds_by_default_and_logs_one_line_per_run(tmp_path, capsys):
    out_dir = tmp_path / "out"
    # standard error is captured by pytest, not a terminal: no progress bar, a line per run
    assert main(["demo", "--tasks", "digits", "--epochs", "1", "--out", str(out_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    results = json.loads((out_dir / "results.json").read_text())
    digits = results["tasks"]["digits"]
    assert results["seeds"] == 3
    assert [(r["order"], r["seed"]) for r in digits["rows"]] == [(o, s) for s in (0, 1, 2) for o in ORDERS]
    run_lines = [line for line in captured.out.splitlines() if line.startswith("  digits ") and " seed " in line]
    assert len(run_lines) == 18 and run_lines[0].startswith("  digits baseline seed 0: ")
    assert "3 seeds, 4-bit, 80% pruning" in captured.out  # the task's own settings
    assert "| seed 0, 1, 2 " in captured.out
    for pair in ("weights", "weights and activations"):
        verdict = digits["winners"][pair]
        assert verdict.startswith(("P(", "Q->", "no winner beyond seed noise")) and "per seed: " in verdict
    assert f"winners: weights: {digits['winners']['weights']}" in captured.out
    files = {p.name for p in (out_dir / "digits").iterdir()}
    assert {
        "sites.png",
        "curves.png",
        "size_tradeoff.png",
        "schedule_Pwa-then-Q.png",
        "schedule_Q-then-Pwa.png",
        "digits_Pwa-then-Q_seed2.fxqp",
    } <= files


def test_demo_without_progress_prints_no_run_lines(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--tasks",
                "digits",
                "--epochs",
                "1",
                "--seeds",
                "2",
                "--bits",
                "8",
                "--sparsity",
                "0.5",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.err == "" and " seed 0: " not in captured.out
    assert "2 seeds, 8-bit, 50% pruning" in captured.out
    assert json.loads((tmp_path / "results.json").read_text())["tasks"]["digits"]["bits"] == 8
