"""``fxqp train`` (fxqp.trainer): image folders, grad accumulation, late ops, bit-exact resume."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fxqp
from fxqp import trainer
from fxqp.cli import main
from fxqp.trainer import CHECKPOINT, METRICS, CheckpointError, LateOpsError, TrainConfig

pytestmark = pytest.mark.slow

SPEC = {
    "rules": [
        {
            "modules": ["Conv2d", "Linear"],
            "weight": [
                {"op": "prune", "sparsity": 0.5, "start": "20%", "end": "60%", "every": "10%"},
                {"op": "quantize", "bits": 8, "start": "50%"},
            ],
        },
        {"modules": ["ReLU"], "functions": ["relu"], "activation": [{"op": "quantize", "bits": 8, "start": "40%"}]},
    ]
}


class TinyNet(nn.Module):
    """Small enough to train in a second on 16×16 images."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def tiny_net(num_classes: int = 3) -> nn.Module:
    return TinyNet(num_classes)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder of 3 classes × 12 PNG files (a colour per class, with noise)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for c, name in enumerate(["cat", "dog", "fox"]):
        os.makedirs(root / name)
        for i in range(12):
            pixels = (torch.rand(20, 24, 3, generator=gen) * 80).to(torch.uint8) + torch.tensor(
                [60 * c, 120, 200 - 60 * c], dtype=torch.uint8
            )
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")
    return str(root)


def _tensors(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, CHECKPOINT))


def _records(out) -> list[dict]:
    with open(os.path.join(out, METRICS)) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def _interrupt_after(epoch: int):
    def callback(done: int, record: dict) -> None:
        if done == epoch:
            raise KeyboardInterrupt

    return callback


def _assert_same_run(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:  # model, fxqp state, optimizer, random generators: bit for bit
        assert torch.equal(ta[key], tb[key]), key
    assert _records(a) == _records(b)
    with open(os.path.join(a, "model.fxqp"), "rb") as fa, open(os.path.join(b, "model.fxqp"), "rb") as fb:
        assert fa.read() == fb.read()


@pytest.mark.parametrize("workers", [0, 1])
def test_folder_run_resumes_bit_exactly(folder, tmp_path, workers):
    """Augmented image-folder data (random crops and flips, in the main process or a worker)
    with AdamW, gradient accumulation and a step schedule: interrupted after epoch 2 and
    resumed, the run ends exactly as the uninterrupted one."""
    config = TrainConfig(
        data=f"folder:{folder}",
        spec=SPEC,
        model=f"{__name__}:tiny_net",
        epochs=4,
        batch_size=4,
        grad_accum=2,
        optimizer="adamw",
        schedule="step",
        step_every=1,
        image_size=16,
        val_split=0.25,
        workers=workers,
        seed=3,
    )
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    trainer.run(config, whole, progress=False, log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(config, cut, progress=False, on_epoch_end=_interrupt_after(2), log=lambda _: None)
    assert [r["epoch"] for r in _records(cut)] == [1, 2] and not os.path.exists(os.path.join(cut, "model.fxqp"))
    logs = []
    outcome = trainer.resume(cut, progress=False, log=logs.append)
    assert logs[0].startswith(f"resuming {cut} after epoch 2 of 4")
    _assert_same_run(whole, cut)
    # 27 training images (9 held out), batches of 4, 2 per optimizer step: 3 steps per epoch
    assert [r["step"] for r in outcome.history] == [3, 6, 9, 12]
    assert outcome.result["steps"] == 12 and outcome.history[-1]["fxqp/ops_active"] == outcome.history[-1]["fxqp/ops"]


def test_cli_resume_continues_an_interrupted_run(tmp_path, capsys, monkeypatch):
    """The command line: a run cut after its first checkpoint, resumed with ``--resume``,
    equals the uninterrupted run; a resumed run with other arguments is refused."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    args = ["train", "--data", "digits", "--spec", str(spec), "--epochs", "2", "--batch-size", "64", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    real_write = trainer._write_checkpoint

    def write_then_stop(out, config, epoch, *rest):
        real_write(out, config, epoch, *rest)
        raise KeyboardInterrupt  # as if stopped right after the first checkpoint

    monkeypatch.setattr(trainer, "_write_checkpoint", write_then_stop)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(trainer, "_write_checkpoint", real_write)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "cut"), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "epochs (recorded 2, given 3)" in err and err.count("\n") == 1
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    _assert_same_run(str(tmp_path / "whole"), str(tmp_path / "cut"))


def test_grad_accum_counts_optimizer_steps(tmp_path):
    """With 2 forwards per optimizer step, fxqp's step (and the spec's fractions) follow the
    optimizer: half as many steps as without accumulation."""
    base = dict(data="digits", spec=SPEC, epochs=1, batch_size=32, seed=1)
    one = trainer.run(TrainConfig(**base), str(tmp_path / "one"), progress=False, log=lambda _: None)
    two = trainer.run(TrainConfig(**base, grad_accum=2), str(tmp_path / "two"), progress=False, log=lambda _: None)
    assert one.result["steps"] == 1347 // 32 == 42 and two.result["steps"] == 1347 // 64 == 21
    # prune starts at 20% of the run: step 8 of 42, step 4 of 21 (resolved against the optimizer steps)
    starts = {
        two.model.get_submodule("conv1").parametrizations.weight[0].config.start,
        one.model.get_submodule("conv1").parametrizations.weight[0].config.start,
    }
    assert starts == {4, 8}


def test_late_ops_are_an_error_unless_allowed(tmp_path):
    late = {
        "rules": [
            {"modules": ["Conv2d"], "weight": [{"op": "quantize", "bits": 4, "start": 10}, {"op": "prune", "sparsity": 0.5, "start": 41}]}
        ]
    }
    config = TrainConfig(data="digits", spec=late, epochs=1, batch_size=32)  # 42 steps: 0..41
    with pytest.raises(
        LateOpsError,
        match=r"3 op\(s\) start at or after the run's last step 41 \(42 optimizer steps\).*conv1.weight: prune at step 41.*--allow-late-ops",
    ):
        trainer.run(config, str(tmp_path / "late"), progress=False, log=lambda _: None)
    assert not os.path.exists(tmp_path / "late" / CHECKPOINT)
    logs = []
    trainer.run(
        TrainConfig(
            data="digits",
            spec={"rules": [{"modules": ["Conv2d"], "weight": [{"op": "prune", "sparsity": 0.5, "start": 100}]}]},
            epochs=1,
            batch_size=32,
            allow_late_ops=True,
        ),
        str(tmp_path / "allowed"),
        progress=False,
        log=logs.append,
    )
    assert any("never ran in a training step" in line and "conv1.weight: prune starts at step 100" in line for line in logs)


def test_lower_warns_of_ops_that_never_started():
    from fxqp.models import DigitsNet

    gm = fxqp.transform(
        DigitsNet(),
        {
            "rules": [
                {"modules": ["Conv2d"], "weight": [{"op": "quantize", "bits": 8, "start": 0}, {"op": "prune", "sparsity": 0.5, "start": 5}]}
            ]
        },
    )
    gm(torch.randn(2, 1, 8, 8))
    with pytest.warns(
        fxqp.ScheduleWarning, match=r"at step 1: 3 op\(s\) never ran in a training step.*conv1.weight: prune starts at step 5"
    ):
        fxqp.lower(gm)
    for _ in range(4):
        gm(torch.randn(2, 1, 8, 8))
    with pytest.warns(fxqp.ScheduleWarning, match=r"at step 5: 3 op\(s\)"):  # start 5 is the next step's
        fxqp.lower(gm)
    for _ in range(1):
        gm(torch.randn(2, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxqp.ScheduleWarning)
        fxqp.lower(gm)  # all started: no warning


def test_metrics_and_report_values_are_numbers():
    from fxqp.models import DigitsNet

    spec = {
        "rules": [
            {
                "modules": ["Conv2d", "Linear"],
                "weight": [{"op": "prune", "sparsity": 0.5, "start": 0}, {"op": "quantize", "bits": 4, "start": 3}],
            },
            {"functions": ["relu"], "modules": ["ReLU"], "activation": [{"op": "quantize", "bits": 8, "start": 1}]},
        ]
    }
    gm = fxqp.transform(DigitsNet(), spec)
    for _ in range(2):
        gm(torch.randn(4, 1, 8, 8))
    m = fxqp.metrics(gm)
    assert all(isinstance(v, float) for v in m.values())
    assert m["fxqp/step"] == 2.0 and m["conv1.weight/bits"] == 4.0 and m["conv1.weight/sparsity"] == 0.5
    assert m["conv1.weight/active"] == 0.5 and m["conv1.weight/actual_sparsity"] == pytest.approx(0.5, abs=0.02)
    n_weights, n_acts = 4, sum(1 for k in m if k.endswith("/active")) - 4
    assert m["fxqp/sites"] == n_weights + n_acts and m["fxqp/ops"] == 2 * n_weights + n_acts
    assert m["fxqp/ops_active"] == n_weights + n_acts and m["fxqp/sites_active"] == n_acts  # quantizers of weights start at 3
    assert m["fxqp/weight_bits"] == 32.0 and m["fxqp/weight_sparsity"] == pytest.approx(0.5, abs=0.02)
    gm(torch.randn(4, 1, 8, 8))
    assert fxqp.metrics(gm)["fxqp/weight_bits"] == 4.0
    rows = fxqp.summary(gm).to_dicts()
    conv = next(r for r in rows if r["site"] == "conv1.weight")
    assert conv["bits"] == 4 and conv["sparsity"] == 0.5 and isinstance(conv["actual"], float) and conv["start"] == [0, 3]
    assert "50.0%" in str(fxqp.summary(gm))  # printed as percentages
    lowered = fxqp.summary(fxqp.lower(gm)).to_dicts()
    assert all(isinstance(r["bytes"], int) for r in lowered) and isinstance(lowered[0]["bits/param"], float)


def test_torchvision_weights_come_from_the_local_cache_only(tmp_path, monkeypatch, capsys):
    import torchvision

    from fxqp.models import build_model, cached_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = cached_weights_path(weights)
    assert path.startswith(str(tmp_path / "torch"))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    assert (
        main(
            [
                "train",
                "--data",
                "digits",
                "--model",
                "torchvision:resnet18:IMAGENET1K_V1",
                "--spec",
                str(spec),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not in the local torch cache" in err and path in err
    assert not os.path.exists(path)  # nothing was downloaded
    # a file in the cache is used, and the classifier is replaced for the data's classes
    source = torchvision.models.resnet18()
    os.makedirs(os.path.dirname(path))
    torch.save(source.state_dict(), path)
    model = build_model("torchvision:resnet18:DEFAULT", num_classes=5)
    assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.out_features == 5
    with pytest.raises(fxqp.FxqpError, match="has no weights 'NOPE'; expected DEFAULT or one of IMAGENET1K_V1"):
        build_model("torchvision:resnet18:NOPE")


def test_checkpoint_from_elsewhere_is_checked(tmp_path):
    from safetensors.torch import save_file

    os.makedirs(tmp_path / "a")
    with pytest.raises(CheckpointError, match="no checkpoint.safetensors there"):
        trainer.resume(str(tmp_path / "a"))
    (tmp_path / "a" / CHECKPOINT).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        trainer.resume(str(tmp_path / "a"))
    save_file(
        {"x": torch.zeros(1)},
        str(tmp_path / "a" / CHECKPOINT),
        metadata={
            "fxqp_train": json.dumps(
                {
                    "format": 1,
                    "config": {"data": "digits", "spec": {}, "epochs": "ten"},
                    "epoch": 1,
                    "optimizer": {},
                    "scheduler": {},
                    "rng": {},
                }
            )
        },
    )
    with pytest.raises(CheckpointError, match=r"config.epochs: 'ten' is not accepted; expected int"):
        trainer.resume(str(tmp_path / "a"))


def test_mixed_precision_and_device_choices(tmp_path):
    """bf16 autocast trains on the CPU (the ops' state stays float32, the loss falls);
    fp16 and a missing CUDA device are refused before anything is built."""
    outcome = trainer.run(
        TrainConfig(data="digits", spec=SPEC, epochs=2, batch_size=32, amp="bf16"),
        str(tmp_path / "bf16"),
        progress=False,
        log=lambda _: None,
    )
    assert outcome.history[-1]["train_loss"] < outcome.history[0]["train_loss"] and outcome.result["val_accuracy"] > 50.0
    observer = next(
        m for m in outcome.model.modules() if isinstance(m, fxqp.ops.ScheduledOp) and any(b.is_floating_point() for b in m.buffers())
    )
    assert all(b.dtype == torch.float32 for b in observer.buffers() if b.is_floating_point())
    if not torch.cuda.is_available():
        with pytest.raises(fxqp.FxqpError, match="--amp fp16: needs a CUDA device"):
            trainer.run(TrainConfig(data="digits", spec=SPEC, amp="fp16"), str(tmp_path / "fp16"), progress=False, log=lambda _: None)
        with pytest.raises(fxqp.FxqpError, match="--device cuda: no CUDA device"):
            trainer.run(TrainConfig(data="digits", spec=SPEC, device="cuda"), str(tmp_path / "cuda"), progress=False, log=lambda _: None)
        assert not os.path.exists(tmp_path / "fp16") and not os.path.exists(tmp_path / "cuda")


def test_folder_with_train_and_val_subfolders(folder, tmp_path):
    """``PATH/train`` and ``PATH/val`` are used as given (no split); class folders must agree."""
    import shutil

    root = tmp_path / "split"
    for part, files in (("train", range(0, 9)), ("val", range(9, 12))):
        for cls in ("cat", "dog", "fox"):
            os.makedirs(root / part / cls)
            for i in files:
                shutil.copy(os.path.join(folder, cls, f"{i}.png"), root / part / cls)
    logs = []
    config = TrainConfig(data=f"folder:{root}", spec=SPEC, model=f"{__name__}:tiny_net", epochs=1, batch_size=3, image_size=16)
    trainer.run(config, str(tmp_path / "out"), progress=False, log=logs.append)
    assert "27 training and 9 validation samples" in logs[0]
    shutil.rmtree(root / "val" / "fox")
    with pytest.raises(fxqp.FxqpError, match="train/ and val/ have different class folders"):
        trainer.run(config, str(tmp_path / "out2"), progress=False, log=lambda _: None)
