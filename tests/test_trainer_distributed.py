"""``fxqp train`` data-parallel under torchrun: two processes on the CPU (gloo) on digits."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import SPEC

import fxqp
from fxqp import trainer
from fxqp.cli import _launch_argv, main
from fxqp.data import load_data
from fxqp.models import build_model
from fxqp.trainer import CHECKPOINT, METRICS, CheckpointError

pytestmark = pytest.mark.slow

# SPEC's fractions of the run: 2 epochs of 1347 // (32 × 2 processes × 2 accumulated) = 10
# optimizer steps each
FILES = {CHECKPOINT, METRICS, "model.fxqp", "result.json", "summary.txt"}

# Dropout draws from each process's generator, batch norm's statistics differ by process:
# a resume must restore both processes' generators and the statistics the checkpoint holds.
NET = """
import torch
from torch import nn

class DropNet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(16 * 16, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.relu(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(torch.flatten(x, 1)))

def drop_net(num_classes=10):
    return DropNet(num_classes)
"""

# Stops every process right after the first checkpoint, as an interruption would.
STOP_AFTER_FIRST_CHECKPOINT = """
import sys
from fxqp import trainer
from fxqp.cli import main
real_write = trainer._write_checkpoint
def write_then_stop(*args):
    real_write(*args)  # returns on every process once the checkpoint is written
    raise KeyboardInterrupt
trainer._write_checkpoint = write_then_stop
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(target: list[str], args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target, "train", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def _records(out) -> list[dict]:
    with open(os.path.join(out, METRICS)) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def test_two_processes_train_write_once_and_resume_bit_exactly(tmp_path):
    """Two processes train 2 epochs; process 0 alone writes (one set of files, one log);
    metrics.jsonl has one record per epoch; the validation figures are those of the whole
    validation set; a run stopped after epoch 1 and resumed with torchrun ends bit-exactly
    as the uninterrupted one; resuming with another world size is refused."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    net = tmp_path / "net.py"
    net.write_text(NET)
    model = f"{net}:drop_net"
    args = [
        "--data",
        "digits",
        "--model",
        model,
        "--spec",
        str(spec),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--grad-accum",
        "2",
        "--no-progress",
    ]
    whole, cut = tmp_path / "whole", tmp_path / "cut"

    done = _torchrun(["-m", "fxqp"], [*args, "--out", str(whole)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(whole)) == sorted(FILES)
    assert done.stdout.count("epoch 1/2:") == 1 and done.stdout.count("lowered:") == 1, done.stdout
    assert "20 optimizer steps (10 per epoch) on cpu, 2 processes of 32 samples per forward (128 per optimizer step)" in done.stdout
    records = _records(whole)
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [10, 20]

    # the run's figures are those of the whole validation set, evaluated here in one process
    data = load_data("digits")
    task = trainer._Task("classification", None, torch.utils.data.TensorDataset(data.test_x, data.test_y), data.classes, 1)
    expected = trainer._evaluate(fxqp.load(whole / "model.fxqp", build_model(model, num_classes=10)), task, torch.device("cpu"), None, 0)
    with open(whole / "result.json") as f:
        result = json.load(f)
    assert result["val_accuracy"] == pytest.approx(expected["val_accuracy"], abs=1e-9)
    assert result["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    assert records[-1]["val_accuracy"] == pytest.approx(expected["val_accuracy"], abs=1e-9)  # lowering keeps the predictions

    stopped = tmp_path / "stop.py"
    stopped.write_text(STOP_AFTER_FIRST_CHECKPOINT)
    assert _torchrun([str(stopped)], [*args, "--out", str(cut)]).returncode != 0
    assert [r["epoch"] for r in _records(cut)] == [1] and not os.path.exists(cut / "model.fxqp")
    resumed = _torchrun(["-m", "fxqp"], ["--resume", str(cut), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming") == 1

    a, b = load_file(str(whole / CHECKPOINT)), load_file(str(cut / CHECKPOINT))
    assert a.keys() == b.keys() and {"rng/torch", "rng/rank1/torch"} <= a.keys()
    for key in a:  # model, fxqp state, optimizer, both processes' generators: bit for bit
        assert torch.equal(a[key], b[key]), key
    assert _records(whole) == _records(cut)
    assert (whole / "model.fxqp").read_bytes() == (cut / "model.fxqp").read_bytes()

    with pytest.raises(CheckpointError, match=r"made with world size 2 and this one has world size 1.*--nproc_per_node 2"):
        trainer.resume(str(cut), progress=False, log=lambda _: None)


def test_nproc_per_node_launches_torchrun(tmp_path, monkeypatch, capsys):
    """``--nproc-per-node N`` runs torchrun with the other arguments and returns its exit
    status; 0 processes, a missing flag and a launch under torchrun are one-line errors."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    launched = []

    class Child:
        def __init__(self, command):
            launched.append(command)

        def wait(self):
            return 3

    monkeypatch.setattr(subprocess, "Popen", Child)
    args = ["train", "--data", "digits", "--spec", str(spec), "--out", str(tmp_path / "o"), "--epochs", "2"]
    assert main([*args, "--nproc-per-node", "2"]) == 3
    assert main(["train", "--nproc-per-node=3", "--resume", str(tmp_path)]) == 3
    assert launched == [
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fxqp", *args],
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "3",
            "-m",
            "fxqp",
            "train",
            "--resume",
            str(tmp_path),
        ],
    ]
    assert _launch_argv(["train", "--nproc", "4", "--no-progress", "--np=2"]) == ["train", "--no-progress"]

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--nproc-per-node", "0"])
    assert exit_.value.code == 2
    assert "argument --nproc-per-node: expected a positive integer, got '0'" in capsys.readouterr().err
    assert main(["train", "--data", "digits", "--nproc-per-node", "2"]) == 2
    assert "--spec, --out required" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*args, "--nproc-per-node", "2"]) == 2
    assert "started by torchrun already (WORLD_SIZE=2)" in capsys.readouterr().err
    assert len(launched) == 2


def test_partial_torchrun_environment_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    config = trainer.TrainConfig(data="digits", spec=SPEC, epochs=1)
    with pytest.raises(fxqp.FxqpError, match="WORLD_SIZE=2 is set but not RANK, LOCAL_RANK"):
        trainer.run(config, str(tmp_path / "o"), progress=False, log=lambda _: None)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(fxqp.FxqpError, match="expected WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE"):
        trainer.run(config, str(tmp_path / "o"), progress=False, log=lambda _: None)
    assert not os.path.exists(tmp_path / "o")


def test_torchrun_world_of_one_is_a_plain_run(tmp_path, monkeypatch):
    """Under torchrun with one process the run joins a process group of one, trains as a
    plain run does (the same checkpoint and artifact, bit for bit) and leaves the group, on
    an error too."""
    import socket

    import torch.distributed as dist

    config = trainer.TrainConfig(data="digits", spec=SPEC, epochs=1, batch_size=128, seed=2, allow_late_ops=True)
    trainer.run(config, str(tmp_path / "plain"), progress=False, log=lambda _: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        monkeypatch.setenv(name, value)
    seen = []
    trainer.run(
        config, str(tmp_path / "one"), progress=False, log=lambda _: None, on_epoch_end=lambda *_: seen.append(dist.get_world_size())
    )
    assert seen == [1] and not dist.is_initialized()
    a, b = load_file(str(tmp_path / "plain" / CHECKPOINT)), load_file(str(tmp_path / "one" / CHECKPOINT))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "plain" / "model.fxqp").read_bytes() == (tmp_path / "one" / "model.fxqp").read_bytes()
    with pytest.raises(trainer.LateOpsError):
        trainer.run(dataclasses.replace(config, allow_late_ops=False, epochs=1, batch_size=1024), str(tmp_path / "late"), progress=False)
    assert not dist.is_initialized()
