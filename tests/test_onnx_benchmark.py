"""benchmarks/onnx_export.py: its interleaving and ratios, and one quick run (64 px, resnet18)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "onnx_export.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

from onnx_export import DEFAULT_ROUNDS, LARGE_BATCH_ROUNDS, interleaved, per_round_ratios, rounds_for  # noqa: E402


def test_each_round_runs_every_variant_once_in_an_order_rotated_by_one():
    order = []

    class Runner:
        def __init__(self, name):
            self.name = name

        def run(self):
            order.append(self.name)
            return float(len(order))

    times = interleaved({name: Runner(name) for name in "abc"}, 4)
    assert order == [*"abc", *"bca", *"cab", *"abc"]
    assert times == {"a": [1.0, 6.0, 8.0, 10.0], "b": [2.0, 4.0, 9.0, 11.0], "c": [3.0, 5.0, 7.0, 12.0]}


def test_ratios_pair_the_runs_of_the_same_round():
    # the third round is ten times slower for both: its ratio is still 0.5
    assert per_round_ratios([1.0, 1.2, 10.0], [2.0, 2.0, 20.0]) == pytest.approx({"median": 0.5, "min": 0.5, "max": 0.6})
    with pytest.raises(ValueError):
        per_round_ratios([1.0], [1.0, 2.0])


def test_the_rounds_of_each_batch_size():
    assert rounds_for([1, 32], None) == {1: DEFAULT_ROUNDS[1], 32: LARGE_BATCH_ROUNDS}
    assert rounds_for([1, 32], [7]) == {1: 7, 32: 7}
    assert rounds_for([1, 32], [7, 3]) == {1: 7, 32: 3}
    with pytest.raises(SystemExit):
        rounds_for([1, 32], [7, 3, 2])


@pytest.mark.slow
def test_a_quick_run_measures_every_variant(tmp_path):
    out = tmp_path / "onnx.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, str(SCRIPT), "--quick", "--models", "resnet18", "--out", str(out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    assert "× fxqp artifact" in run.stdout and "goals missed:" in run.stdout and "QLinearConv" in run.stdout

    results = json.loads(out.read_text())
    assert results["size"] == 64 and results["environment"]["onnxruntime"]
    model = results["models"]["resnet18"]
    variants = model["variants"]
    pruned, pruned_int8 = "fxqp W4A8 + 50% filters pruned", "fxqp W4A8 + 50% filters pruned, INT8 codes"
    assert list(variants) == ["float32 ONNX", "fxqp W8A8", "fxqp W4A8", pruned, pruned_int8, "ORT quantize_static"]
    for name, row in variants.items():
        assert row["onnx_bytes"] > 0, name
        assert row["fused_ops"] and all(n > 0 for n in row["fused_ops"].values()), name
        if name.startswith("fxqp"):
            assert row["artifact_bytes"] > 0 and row["onnx_over_artifact"] == pytest.approx(row["onnx_bytes"] / row["artifact_bytes"])
    assert variants["fxqp W8A8"]["integer_weights"] == {"INT8": 21} and variants["fxqp W4A8"]["integer_weights"] == {"INT4": 21}
    assert variants["fxqp W4A8 + 50% filters pruned"]["onnx_bytes"] < variants["fxqp W4A8"]["onnx_bytes"]
    assert variants[pruned_int8]["integer_weights"] == {"INT8": 21}
    for name in ("fxqp W8A8", pruned_int8, "ORT quantize_static"):  # every convolution but the first (fxqp) as an integer kernel
        assert variants[name]["fused_ops"]["QLinearConv"] >= 19, name
    assert isinstance(variants["fxqp W4A8"]["goal"], bool)

    assert [(c["threads"], c["batch"], c["rounds"]) for c in model["latency"]] == [(1, 1, 3), (1, 2, 3)]
    for config in model["latency"]:
        assert set(config["variants"]) == set(variants)
        for name, latency in config["variants"].items():
            assert latency["median_ms"] > 0 and len(latency["ms"]) == 3 and all(ms > 0 for ms in latency["ms"]), name
            ratio = latency["vs_float"]
            assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"], name
        assert config["variants"]["float32 ONNX"]["vs_float"] == {"median": 1.0, "min": 1.0, "max": 1.0}
        assert isinstance(config["variants"]["fxqp W8A8"]["goal"], bool)
