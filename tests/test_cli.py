"""The fxqp command line: demo, train, inspect, export, explain, and its one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import fxqp
from fxqp.cli import main
from fxqp.models import build_model

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


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["inspect"], ["export"], ["explain"]])
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


TINY_MODEL = """\
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def tiny(num_classes=5):
    return Tiny(num_classes)
"""


def assert_matches(got, ref):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An artifact of a model defined in a file (no result.json beside it), transformed with
    an example batch of one, and the ``--model`` that builds it."""
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tiny_model.py").write_text(TINY_MODEL)
    model = f"{folder / 'tiny_model.py'}:tiny"
    spec = fxqp.Spec(
        rules=[
            fxqp.Rule(modules=["Conv2d", "Linear"], weight=[fxqp.Prune(sparsity=0.5), fxqp.Quantize(bits=4)]),
            fxqp.Rule(functions=["relu"], activation=[fxqp.Quantize(bits=8)]),
        ]
    )
    torch.manual_seed(0)
    gm = fxqp.transform(build_model(model), spec, example_inputs=(torch.randn(1, 3, 6, 6),))
    for _ in range(3):
        gm(torch.randn(4, 3, 6, 6)).sum().backward()
        fxqp.step(gm)
    fxqp.save(fxqp.lower(gm), folder / "model.fxqp")
    return folder / "model.fxqp", model


def _onnx_outputs(path, xs):
    import onnxruntime as ort

    options = ort.SessionOptions()  # each op as exported: the integer kernels' requantization rounds otherwise
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] for x in xs]


def test_export_onnx_of_a_model_from_a_file_matches_the_loaded_model(tiny, tmp_path, capsys):
    artifact, model = tiny
    assert main(["export", str(artifact), "--onnx", str(tmp_path / "m.onnx"), "--model", model]) == 0
    out = capsys.readouterr().out
    assert "loaded into Tiny" in out and "2 weights as integers, 1 activations as QuantizeLinear/DequantizeLinear" in out
    low = fxqp.load(artifact, build_model(model))
    xs = [torch.randn(b, 3, 6, 6) for b in (1, 3)]  # recorded with a batch of 1, exported with a dynamic batch
    for x, got in zip(xs, _onnx_outputs(tmp_path / "m.onnx", xs)):
        assert_matches(got, low(x).numpy())


def test_export_pt2_loads_and_runs_without_fxqp(tiny, tmp_path, capsys):
    artifact, model = tiny
    assert main(["export", str(artifact), "--pt2", str(tmp_path / "m.pt2"), "--model", model]) == 0
    assert "torch.export program, dynamic batch" in capsys.readouterr().out
    program = torch.export.load(tmp_path / "m.pt2").module()
    low = fxqp.load(artifact, build_model(model))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 6, 6)
        assert_matches(program(x).numpy(), low(x).numpy())


def test_export_from_a_train_folder_rebuilds_the_run_model(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_YAML)
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--spec", str(spec), "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["export", str(run / "model.fxqp"), "--onnx", str(tmp_path / "m.onnx")]) == 0  # no --model
    out = capsys.readouterr().out
    assert "loaded into DigitsNet (built-in for digits, as in the run's result.json)" in out and "4 weights as integers" in out
    low = fxqp.load(run / "model.fxqp", build_model("digits-cnn", num_classes=10, in_channels=1))
    x = torch.randn(3, 1, 8, 8)
    assert_matches(_onnx_outputs(tmp_path / "m.onnx", [x])[0], low(x).numpy())


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--model is needed: "),  # no result.json beside the artifact
        (["--model", "digits-cnn"], "the artifact was made for another model: site 'conv.weight'"),
        (["--model", "MODEL", "--opset", "20"], "opset 20 is below 21"),
        (["--model", "MODEL", "--sha256", "0" * 64], "not the expected 0000"),
        (["--model", "MODEL", "--data", "digits", "--num-classes", "3"], "--data and --num-classes: give one"),
    ],
)
def test_export_errors_are_one_line(tiny, tmp_path, capsys, extra, message):
    artifact, model = tiny
    extra = [model if a == "MODEL" else a for a in extra]
    assert main(["export", str(artifact), "--onnx", str(tmp_path / "m.onnx"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxqp export: error: ") and err.count("\n") == 1 and message in err
    if message.startswith("--model"):
        assert "path/to/file.py:factory" in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_without_the_onnx_extra_says_what_to_install(tiny, tmp_path, capsys, monkeypatch):
    artifact, model = tiny
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails as if it were not installed
    assert main(["export", str(artifact), "--onnx", str(tmp_path / "m.onnx"), "--model", model]) == 2
    err = capsys.readouterr().err
    assert err == "fxqp export: error: fxqp.export_onnx needs onnx: pip install 'fxqp[onnx]'\n"


def test_export_linear_kernel_and_static_batch(tiny, tmp_path, capsys):
    import onnx

    artifact, model = tiny
    low = fxqp.load(artifact, build_model(model))
    out = tmp_path / "m.onnx"
    assert main(["export", str(artifact), "--onnx", str(out), "--model", model, "--linear-kernel", "matmul_nbits"]) == 0
    assert "MatMulNBits" in [n.op_type for n in onnx.load(str(out)).graph.node]
    xs = [torch.randn(b, 3, 6, 6) for b in (1, 3)]
    for x, got in zip(xs, _onnx_outputs(out, xs)):
        assert_matches(got, low(x).numpy())
    assert main(["export", str(artifact), "--onnx", str(out), "--model", model, "--static-batch"]) == 0
    batch = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_value == 1 and not batch.dim_param  # the recorded batch of one, not "batch"
    assert main(["export", str(artifact), "--pt2", str(out), "--model", model, "--linear-kernel", "dequantize"]) == 2
    assert "--linear-kernel: ONNX options; they do not apply to --pt2" in capsys.readouterr().err
