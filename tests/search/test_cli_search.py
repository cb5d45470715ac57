"""``fxqp search ratios|schedules|show``: the files, several workers, resuming, one-line errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from fxqp.search import read_study
from fxqp.search.cli import _worker_argv

BASE = """\
rules:
  - modules: [Conv2d]
    exclude: [conv1]
    weight: [{op: quantize, bits: 2, method: dorefa}]
"""
SPACE = """\
groups:
  - name: weights
    modules: [Conv2d, Linear]
    weight:
      quantize: {bits: [4, 8], start: ["20%", "90%"]}
      prune: {sparsity: [0.3, 0.7], start: ["10%", "70%"], length: ["10%", "30%"]}
  - name: relus
    modules: [ReLU]
    functions: [relu]
    activation:
      quantize: {bits: 8, start: ["20%", "90%"]}
"""


def fxqp(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The command in a process of its own (it sets torch's thread count)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fxqp", *args], capture_output=True, text=True, timeout=timeout, env=env)


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ratios_with_two_workers_writes_its_files_and_resumes(tmp_path):
    spec = tmp_path / "base.yaml"
    spec.write_text(BASE)
    out = tmp_path / "out"
    args = [
        "search",
        "ratios",
        "--data",
        "digits",
        "--spec",
        str(spec),
        "--trials",
        "12",
        "--trial-epochs",
        "4",
        "--pretrain-epochs",
        "2",
        "--final-epochs",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    done = fxqp(*args, "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"best.yaml", "model.fxqp", "result.json", "trials.csv", "history.png", "ratios.png", "base.safetensors", "study.db"} <= {
        p.name for p in out.iterdir()
    }
    rows = _rows(out / "trials.csv")
    assert sum(r["state"] == "COMPLETE" for r in rows) >= 12 and not any(r["state"] == "RUNNING" for r in rows)
    assert len({r["worker"] for r in rows}) == 2  # both workers ran trials
    assert {"param.conv2", "param.conv3", "terms.loss", "terms.params_pct", "evaluation.metric", "artifact_bytes"} <= set(rows[0])
    result = json.loads((out / "result.json").read_text())
    assert set(result["ratios"]) == {"conv2", "conv3"} and result["test"]["metric"] > 50
    assert "filters kept" in done.stdout and "test accuracy %" in done.stdout
    # the same command again: the study is complete, nothing more is run
    again = fxqp(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_rows(out / "trials.csv")) == len(rows)
    shown = fxqp("search", "show", "--storage", f"sqlite:///{out / 'study.db'}", "--study", "ratios")
    assert shown.returncode == 0 and "study 'ratios' (layer_ratios; directions minimize)" in shown.stdout and "best trial" in shown.stdout
    listed = fxqp("search", "show", "--storage", f"sqlite:///{out / 'study.db'}")
    assert "1 studies in the storage" in listed.stdout and "ratios" in listed.stdout


def test_layerwise_ratios_write_every_layer_study_in_one_csv(tmp_path):
    spec = tmp_path / "base.yaml"
    spec.write_text(BASE)
    out = tmp_path / "out"
    done = fxqp(
        "search",
        "ratios",
        "--data",
        "digits",
        "--spec",
        str(spec),
        "--strategy",
        "layerwise",
        "--layer-random",
        "1",
        "--layer-guided",
        "1",
        "--pretrain-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--final-epochs",
        "1",
        "--out",
        str(out),
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(out / "trials.csv")
    assert [(r["study"], r["number"]) for r in rows] == [("ratios.layer00.conv3", str(n)) for n in range(5)] + [
        ("ratios.layer01.conv2", str(n)) for n in range(5)
    ]
    assert json.loads((out / "result.json").read_text())["studies"] == ["ratios.layer00.conv3", "ratios.layer01.conv2"]


@pytest.mark.slow
def test_schedules_writes_the_front_and_compares_it_with_the_six_orders(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "out"
    storage = f"journal:{tmp_path / 'study.log'}"
    done = fxqp(
        "search",
        "schedules",
        "--data",
        "digits",
        "--space",
        str(space),
        "--trials",
        "4",
        "--epochs",
        "2",
        "--storage",
        storage,
        "--out",
        str(out),
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"result.json", "trials.csv", "pareto.png", "history.png", "pareto"} <= {p.name for p in out.iterdir()}
    result = json.loads((out / "result.json").read_text())
    assert result["trials"] == 4 and set(result["references"]) == {"baseline", "Q", "P(w)->Q", "Q->P(w)", "P(w,a)->Q", "Q->P(w,a)"}
    pareto = sorted(p.name for p in (out / "pareto").iterdir())
    assert pareto == [f"trial-{p['trial']:04d}.yaml" for p in sorted(result["pareto"], key=lambda p: p["trial"])]
    assert "Pareto front of study 'schedules'" in done.stdout and "reference" in done.stdout
    references = read_study(storage, "schedules.references")
    assert len(references.complete()) == 6 and all(t.spec is not None for t in references.trials)
    shown = fxqp("search", "show", "--storage", storage, "--study", "schedules")
    assert shown.returncode == 0 and "Pareto front" in shown.stdout and "P(w,a)->Q" in shown.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["search", "schedules", "--data", "digits", "--space", "missing.yaml", "--out", "o"],
            "fxqp search: error: missing.yaml: no such file",
        ),
        (
            ["search", "ratios", "--data", "digits", "--spec", "missing.yaml", "--out", "o"],
            "fxqp search: error: --spec missing.yaml: no such file",
        ),
        (
            ["search", "ratios", "--data", "digits", "--spec", "base.yaml", "--out", "o", "--strategy", "layerwise", "--workers", "2"],
            "fxqp search: error: --strategy layerwise: the paper's procedure is one layer after another, in one worker",
        ),
        (["search", "show", "--storage", "study.db"], "fxqp search: error: storage 'study.db': expected an RDB URL"),
        (
            ["search", "ratios", "--data", "digits", "--spec", "base.yaml", "--out", "o", "--max-ratio", "2"],
            "fxqp search ratios: error: argument --max-ratio: expected a number in (0, 1), got '2'",
        ),
    ],
)
def test_bad_input_is_one_line_and_status_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(BASE)
    done = fxqp(*args)
    assert done.returncode == 2
    assert done.stderr.startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_worker_command_line():
    assert _worker_argv(["search", "ratios", "--workers", "3", "--out", "o", "--workers=2"]) == [
        "search",
        "ratios",
        "--out",
        "o",
        "--worker",
        "--no-progress",
    ]
