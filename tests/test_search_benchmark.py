"""benchmarks/search.py: its statistics, and one run of every part at tiny settings."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from search import best_after, best_uniform_at_size, evaluations_to_reach, main, mean_std  # noqa: E402


def test_best_after_each_budget():
    assert best_after([5.0, 3.0, 4.0, 1.0, 2.0], [1, 2, 4]) == [5.0, 3.0, 1.0]


def test_evaluations_to_reach_a_target():
    assert evaluations_to_reach([5.0, 3.0, 2.5, 1.0], 2.5) == 3
    assert evaluations_to_reach([5.0, 3.0], 2.0) is None


def test_the_best_uniform_ratio_at_the_same_or_smaller_size():
    uniform = [
        {"ratio": 0.0, "validation": 99.0, "bytes": 100},
        {"ratio": 0.1, "validation": 97.0, "bytes": 90},
        {"ratio": 0.2, "validation": 97.0, "bytes": 80},
        {"ratio": 0.3, "validation": 90.0, "bytes": 70},
    ]
    assert best_uniform_at_size(uniform, 90)["ratio"] == 0.1  # 0.0 is too large; 0.1 and 0.2 tie, the smaller ratio wins
    assert best_uniform_at_size(uniform, 75)["ratio"] == 0.3
    assert best_uniform_at_size(uniform, 60) is None
    assert mean_std([1.0, 3.0]) == "2.00 ± 1.41" and mean_std([2.0]) == "2.00"


@pytest.mark.slow
def test_every_part_runs_at_tiny_settings(tmp_path, capsys):
    out = tmp_path / "search.json"
    assert (
        main(
            [
                "--seeds",
                "1",
                "--width",
                "4",
                "--max-ratio",
                "0.1",
                "--pretrain-epochs",
                "2",
                "--final-epochs",
                "1",
                "--joint-trials",
                "4",
                "--budgets",
                "2,4",
                "--schedule-trials",
                "2",
                "--schedule-epochs",
                "1",
                "--worker-pairs",
                "1",
                "--worker-trials",
                "2",
                "--worker-epochs",
                "1",
                "--workdir",
                str(tmp_path / "work"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "best uniform ratio at <= size" in printed
        and "evaluations to reach layerwise's best objective" in printed
        and "best objective after 4 trials" in printed
        and "dominated by the front" in printed
        and "2 workers / 1" in printed
    )
    results = json.loads(out.read_text())
    run = results["ratios"]["2-bit DoReFa"][0]
    assert [u["ratio"] for u in run["uniform"]] == [0.0, 0.05, 0.1] and len(run["joint (GP)"]["history"]) == 4
    assert len(run["layerwise"]["history"]) == 5 * 13 and "same_budget" in run["joint (GP), trials fine-tuned 1 epoch(s)"]
    assert set(run["samplers"]) == {"gp", "tpe", "random"} and len(run["samplers"]["random"]) == 2
    assert len(results["schedules"][0]["references"]) == 6 and results["schedules"][0]["trials"] == 2
    assert results["workers"][0]["one"] > 0 and results["workers"][0]["two"] > 0
