"""``fxqp train``: transform a model with a spec, train it, lower it and save it.

The loop is torch's own pieces — ``DataLoader``, ``torch.optim``, ``torch.optim.lr_scheduler``
and ``torch.amp`` — rather than a framework's (Lightning Fabric would add a dependency and a
layer between the loop and the state that a bit-exact resume must capture). One epoch is::

    for each of steps_per_epoch × grad_accum batches (a seeded order per epoch):
        loss = loss_fn(model(x), y) / grad_accum          # under autocast with --amp
        loss.backward()                                   # scaled with --amp fp16
        every grad_accum batches: optimizer.step(); scheduler.step(); fxqp.step(model)

fxqp counts *optimizer* steps: the model is transformed with ``auto_step=False`` and
``total_steps = epochs × steps_per_epoch``, against which a spec's fractions (``"40%"``)
resolve. Batches left over at the end of an epoch (fewer than ``grad_accum``) are skipped so
that every optimizer step sees the same number of samples.

Resuming is bit-exact: a checkpoint (one safetensors file, written atomically) holds the
model's state (with the fxqp step, masks and observers), the optimizer's, the scheduler's,
the gradient scaler's, the random generators' states and the run's arguments; the data order
of epoch ``e`` depends only on ``(seed, e)``. A resumed run computes the same floats as an
uninterrupted one on the same machine and device.

Before training, ops whose start is at or after the run's last step are an error
(:class:`LateOpsError`; ``allow_late_ops`` to go on), since they would never train.

Data-parallel runs: under ``torchrun --nproc_per_node N -m fxqp train ...`` (found by the
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` variables torchrun sets; ``fxqp train
--nproc-per-node N`` starts it) each process joins a process group (gloo on the CPU, NCCL on
``cuda:LOCAL_RANK``) and trains the transformed model wrapped in
``torch.nn.parallel.DistributedDataParallel``. ``batch_size`` stays the micro-batch of each
process: an optimizer step sees ``batch_size × N × grad_accum`` samples, and an epoch has
``len(train) // (batch_size × N) // grad_accum`` steps. Every process draws the same
permutation of epoch ``e`` (a function of ``(seed, e)`` only); process ``r`` takes the
``r``-th slice of ``batch_size`` samples of each global batch of ``batch_size × N``.
Gradient accumulation synchronises gradients on the last micro-batch of a step only
(``no_sync``). Validation is sharded (every ``N``-th sample) and its sums reduced, and the
training loss is averaged over the processes, so ``metrics.jsonl`` holds the figures of the
whole data. Process 0 alone writes files and logs; at the end of each epoch every process
takes its parameters and buffers from process 0 (what the checkpoint holds). A checkpoint
records the world size and every process's random generators; it resumes bit-exactly with
the same number of processes only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from fxqp.atomic import write_atomically, write_json
from fxqp.errors import FxqpError

__all__ = [
    "TrainConfig",
    "TrainOutcome",
    "LateOpsError",
    "CheckpointError",
    "run",
    "resume",
    "read_checkpoint",
    "build_run_model",
    "CHECKPOINT",
    "METRICS",
]

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
_FORMAT = 1
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics (torchvision's weights)


class LateOpsError(FxqpError):
    """Ops of the spec start at or after the run's last step: they would never train."""


class CheckpointError(FxqpError):
    """A checkpoint that cannot be resumed: missing, malformed, or made by another run."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run of ``fxqp train`` (a checkpoint records it; a resumed
    run must have the same).

    Attributes:
        data: ``digits``, ``sr``/``sr2``/``sr3`` or ``folder:PATH`` (an image folder read by
            ``torchvision.datasets.ImageFolder``: ``PATH/<class>/<image>``, or
            ``PATH/train/<class>/…`` and ``PATH/val/<class>/…``).
        spec: the spec's dict form.
        model: ``--model`` (see :func:`fxqp.models.build_model`); ``None``: the built-in model
            of the bundled data.
        epochs, batch_size: the run's length and the micro-batch size (of each process in a
            data-parallel run: an optimizer step sees ``batch_size`` × processes ×
            ``grad_accum`` samples).
        optimizer: ``sgd`` (momentum 0.9) or ``adamw``.
        lr, weight_decay: ``None``: 0.1 and 1e-4 for SGD, 1e-3 and 0.05 for AdamW.
        schedule: ``cosine`` (to 0 over the run) or ``step`` (×0.1 every ``step_every`` epochs,
            default a third of the run).
        grad_accum: micro-batches per optimizer step.
        seed: seeds the model's initialisation, the data split and order, the augmentation.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        amp: ``None``, ``bf16`` or ``fp16`` (CUDA only; with a gradient scaler).
        image_size: side of the (square) images of an image folder.
        val_split: fraction of an image folder held out for validation, when it has no
            ``train``/``val`` sub-folders.
        workers: ``DataLoader`` worker processes.
        checkpoint_every: epochs between checkpoints (one is always written at the end).
        allow_late_ops: train even when some ops start too late to train.
    """

    data: str
    spec: dict[str, Any]
    model: str | None = None
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float | None = None
    schedule: str = "cosine"
    step_every: int | None = None
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    amp: str | None = None
    image_size: int = 224
    val_split: float = 0.1
    workers: int = 0
    checkpoint_every: int = 1
    allow_late_ops: bool = False

    def __post_init__(self) -> None:
        choices = {
            "optimizer": ("sgd", "adamw"),
            "schedule": ("cosine", "step"),
            "device": ("auto", "cpu", "cuda"),
            "amp": (None, "bf16", "fp16"),
        }
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise FxqpError(f"{name}: {getattr(self, name)!r} is not accepted; expected one of {', '.join(str(a) for a in accepted)}")
        for name in ("epochs", "batch_size", "grad_accum", "image_size", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FxqpError(f"{name}: {value!r} is not accepted; expected a positive integer")
        if not 0.0 < self.val_split < 1.0:
            raise FxqpError(f"val_split: {self.val_split!r} is not accepted; expected a number in (0, 1)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else {"sgd": 0.1, "adamw": 1e-3}[self.optimizer]

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else {"sgd": 1e-4, "adamw": 0.05}[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "TrainConfig":
        """A config read from a file: every field checked (``where`` names the file)."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: config: expected an object")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        missing = sorted(n for n, f in names.items() if f.default is dataclasses.MISSING and n not in data)
        if unknown or missing:
            raise CheckpointError(f"{where}: config: unknown fields {unknown}, missing fields {missing}")
        for name, value in data.items():
            kinds = _FIELD_TYPES[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise CheckpointError(
                    f"{where}: config.{name}: {value!r} is not accepted; expected {' or '.join(k.__name__ for k in kinds)}"
                )
        try:
            return cls(**data)
        except FxqpError as err:
            raise CheckpointError(f"{where}: config: {err}") from None


_NONE = type(None)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "data": (str,),
    "spec": (dict,),
    "model": (str, _NONE),
    "epochs": (int,),
    "batch_size": (int,),
    "optimizer": (str,),
    "lr": (float, int, _NONE),
    "weight_decay": (float, int, _NONE),
    "schedule": (str,),
    "step_every": (int, _NONE),
    "grad_accum": (int,),
    "seed": (int,),
    "device": (str,),
    "amp": (str, _NONE),
    "image_size": (int,),
    "val_split": (float, int),
    "workers": (int,),
    "checkpoint_every": (int,),
    "allow_late_ops": (bool,),
}


@dataclass
class TrainOutcome:
    """What :func:`run` produced: the trained (transformed) model, its lowered form, the
    per-epoch records (as written to ``metrics.jsonl``) and the final figures."""

    model: nn.Module
    lowered: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- data


@dataclass
class _Task:
    kind: str  # classification | super_resolution
    train: Dataset
    val: Dataset
    classes: Sequence[str] = ()
    in_channels: int = 3
    scale: int | None = None
    val_batch: int | None = 256  # None: the items are batches already

    @property
    def metric(self) -> str:
        return "val_accuracy" if self.kind == "classification" else "val_psnr"


class _ListDataset(Dataset):
    def __init__(self, xs: Sequence[Tensor], ys: Sequence[Tensor]):
        self.xs, self.ys = list(xs), list(ys)

    def __len__(self) -> int:
        return len(self.xs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.xs[i], self.ys[i]


def _folder_task(path: str, config: TrainConfig) -> _Task:
    from fxqp.data import DataError

    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise DataError("--data folder:PATH needs torchvision: pip install torchvision") from None
    if not os.path.isdir(path):
        raise DataError(
            f"--data folder:{path}: no such directory (expected PATH/<class>/<images>, or PATH/train/<class>/… and PATH/val/<class>/…)"
        )
    size = config.image_size
    normalize = transforms.Normalize(_MEAN, _STD)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(size, antialias=True), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    val_tf = transforms.Compose(
        [transforms.Resize(round(size / 0.875), antialias=True), transforms.CenterCrop(size), transforms.ToTensor(), normalize]
    )

    def folder(root: str, tf: Any) -> Any:
        try:
            return datasets.ImageFolder(root, transform=tf)
        except (FileNotFoundError, RuntimeError) as err:
            raise DataError(f"--data folder:{path}: {err}") from None

    split = [os.path.join(path, part) for part in ("train", "val")]
    if all(os.path.isdir(p) for p in split):
        train, val = folder(split[0], train_tf), folder(split[1], val_tf)
        if train.classes != val.classes:
            raise DataError(f"--data folder:{path}: train/ and val/ have different class folders ({train.classes} vs {val.classes})")
        classes = train.classes
    else:
        train_all, val_all = folder(path, train_tf), folder(path, val_tf)
        n = len(train_all)
        n_val = max(1, round(config.val_split * n))
        if n - n_val < config.batch_size * config.grad_accum:
            raise DataError(
                f"--data folder:{path}: {n} images leave {n - n_val} to train after the {config.val_split:g} validation split, fewer than one optimizer step ({config.batch_size} × {config.grad_accum}); lower --batch-size"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
        train, val = Subset(train_all, sorted(order[n_val:])), Subset(val_all, sorted(order[:n_val]))
        classes = train_all.classes
    if len(classes) < 2:
        raise DataError(f"--data folder:{path}: found {len(classes)} class folder(s); expected at least 2")
    return _Task("classification", train, val, classes, 3, None, val_batch=max(config.batch_size, 64))


def _task(config: TrainConfig) -> _Task:
    if config.data.startswith("folder:"):
        return _folder_task(config.data.removeprefix("folder:"), config)
    from fxqp.data import load_data

    data = load_data(config.data)
    if data.kind == "classification":
        return _Task(
            data.kind, TensorDataset(data.train_x, data.train_y), TensorDataset(data.test_x, data.test_y), data.classes, data.in_channels
        )
    # super-resolution: the held-out images differ in size, each a batch of one
    return _Task(
        data.kind,
        TensorDataset(data.train_x, data.train_y),
        _ListDataset(data.test_x, data.test_y),
        (),
        data.in_channels,
        data.scale,
        val_batch=None,
    )


def build_run_model(config: TrainConfig) -> nn.Module:
    """The model :func:`run` builds for ``config``, untrained: ``config.model`` for the
    classes, channels and upscaling factor of ``config.data`` (which is read for them). The
    architecture :func:`fxqp.load` needs to read the run's ``model.fxqp``."""
    return _build_model(config, _task(config))


def _build_model(config: TrainConfig, task: _Task) -> nn.Module:
    from fxqp.models import build_for_data

    return build_for_data(config.model, task)


def _epoch_order(config: TrainConfig, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s batch order (and of its loader workers' seeds)."""
    return torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)


class _ShardBatches(Sampler[list[int]]):
    """Process ``rank``'s micro-batches of an epoch: one permutation of the ``n`` samples
    (the same on every process, drawn from ``generator``) cut into global batches of
    ``batch_size × size``, of which the process takes the ``rank``-th slice of
    ``batch_size``; the samples left after the last whole global batch are skipped."""

    def __init__(self, n: int, batch_size: int, rank: int, size: int, generator: torch.Generator):
        self.n, self.batch_size, self.rank, self.size, self.generator = n, batch_size, rank, size, generator

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        width = self.batch_size * self.size
        for start in range(0, len(self) * width, width):
            first = start + self.rank * self.batch_size
            yield order[first : first + self.batch_size]


def _train_loader(task: _Task, config: TrainConfig, epoch: int, world: "_World", device: torch.device) -> DataLoader:
    if world.size == 1:
        return DataLoader(
            task.train,
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=config.workers,
            generator=_epoch_order(config, epoch),
            pin_memory=device.type == "cuda",
        )
    # the order from (seed, epoch); the loader workers' seeds (augmentation) differ by process
    workers = torch.Generator().manual_seed((config.seed * 1_000_003 + epoch) * 4_099 + world.rank)
    return DataLoader(
        task.train,
        batch_sampler=_ShardBatches(len(task.train), config.batch_size, world.rank, world.size, _epoch_order(config, epoch)),
        num_workers=config.workers,
        generator=workers,
        pin_memory=device.type == "cuda",
    )


# --------------------------------------------------------------------------- data-parallel runs

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
"""The environment variables torchrun sets in each process it starts."""


@dataclass(frozen=True)
class _World:
    """This process's place in a run: rank 0 of 1 outside torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_SOLO = _World()


def _torchrun_world() -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` from the variables torchrun sets (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``), or ``None`` outside torchrun; an :class:`FxqpError`
    when only some are set or one is not a fitting integer."""
    present = {name: os.environ[name] for name in TORCHRUN_VARIABLES if name in os.environ}
    if not present:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in present]
    if missing:
        raise FxqpError(
            f"environment: {', '.join(f'{k}={v}' for k, v in present.items())} is set but not {', '.join(missing)}; "
            "a data-parallel fxqp train is started by torchrun (or fxqp train --nproc-per-node N), which sets all of "
            f"{', '.join(TORCHRUN_VARIABLES)}"
        )
    values = {}
    for name, text in present.items():
        try:
            values[name] = int(text)
        except ValueError:
            raise FxqpError(f"environment: {name}={text!r} is not accepted; expected an integer (as torchrun sets)") from None
    size, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if size < 1 or not 0 <= rank < size or local < 0:
        raise FxqpError(
            f"environment: WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local} are not accepted; "
            "expected WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
        )
    return rank, size, local


@contextlib.contextmanager
def _distributed(config: TrainConfig) -> Iterator[tuple[_World, torch.device]]:
    """This process's world and device. Under torchrun, a process group is initialised
    (gloo on the CPU, NCCL on ``cuda:LOCAL_RANK``) and destroyed on the way out, error or
    not; a process group the caller initialised is used as it is, and left to the caller."""
    import torch.distributed as dist

    env = _torchrun_world()
    if dist.is_available() and dist.is_initialized():
        world = _World(dist.get_rank(), dist.get_world_size(), env[2] if env else 0)
        yield world, _device(config, world)
        return
    if env is None:
        yield _SOLO, _device(config, _SOLO)
        return
    if not dist.is_available():
        raise FxqpError("torchrun: this build of torch has no torch.distributed; run fxqp train without torchrun")
    world = _World(*env)
    device = _device(config, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except (RuntimeError, ValueError) as err:
        raise FxqpError(
            f"torchrun: joining the process group of {world.size} processes failed (rank {world.rank}): {str(err).splitlines()[0]}"
        ) from None
    try:
        yield world, device
    finally:
        dist.destroy_process_group()


def _all_reduce(world: _World, values: Sequence[float], device: torch.device) -> list[float]:
    """The sums of ``values`` over the processes (float64)."""
    if world.size == 1:
        return [float(v) for v in values]
    import torch.distributed as dist

    summed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def _barrier(world: _World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


@torch.no_grad()
def _take_state_of_rank0(world: _World, model: nn.Module) -> None:
    """Every process takes process 0's parameters and buffers: what the checkpoint holds,
    whatever a process changed from its own data (batch-norm statistics, say)."""
    if world.size == 1:
        return
    import torch.distributed as dist

    for tensor in (*model.parameters(), *model.buffers()):
        data = tensor.data
        sent = data.contiguous()
        dist.broadcast(sent.view(torch.uint8) if sent.dtype == torch.bool else sent, src=0)
        if sent.data_ptr() != data.data_ptr():
            data.copy_(sent)


# --------------------------------------------------------------------------- device, optimizer


def _device(config: TrainConfig, world: _World = _SOLO) -> torch.device:
    if config.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    elif config.device == "cuda" and not torch.cuda.is_available():
        raise FxqpError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu or auto")
    else:
        kind = config.device
    if kind == "cpu" or (world.size == 1 and not _in_torchrun()):
        return torch.device(kind)
    if world.local_rank >= torch.cuda.device_count():
        raise FxqpError(
            f"--device {config.device}: process {world.rank} has LOCAL_RANK {world.local_rank}, but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes per machine (--nproc_per_node)"
        )
    return torch.device("cuda", world.local_rank)


def _in_torchrun() -> bool:
    return any(name in os.environ for name in TORCHRUN_VARIABLES)


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.amp is None:
        return None
    if config.amp == "fp16" and device.type != "cuda":
        raise FxqpError(f"--amp fp16: needs a CUDA device (this run is on {device.type}); use --amp bf16")
    if config.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FxqpError("--amp bf16: this CUDA device does not support bfloat16; use --amp fp16")
    return torch.bfloat16 if config.amp == "bf16" else torch.float16


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9, weight_decay=config.decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.decay)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    every = config.step_every or max(1, math.ceil(config.epochs / 3))
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every * steps_per_epoch, gamma=0.1)


def check_late_ops(model: nn.Module, total_steps: int) -> None:
    """Raise :class:`LateOpsError` naming the ops of a transformed ``model`` whose start is
    at or after the last of ``total_steps`` steps."""
    from fxqp.schedule import pending_ops

    late = pending_ops(model, before=total_steps - 1)
    if late:
        shown = "; ".join(f"{site}: {op} at step {start}" for site, op, start in late[:6])
        more = f"; and {len(late) - 6} more" if len(late) > 6 else ""
        raise LateOpsError(
            f"{len(late)} op(s) start at or after the run's last step {total_steps - 1} ({total_steps} optimizer steps), "
            f"so they would never train: {shown}{more}. Train longer (--epochs), start them earlier (a fraction such as "
            "'80%' follows the run's length), or pass --allow-late-ops"
        )


# --------------------------------------------------------------------------- checkpoints


def _rng_prefix(rank: int) -> str:
    """Where process ``rank``'s generator states are in a checkpoint: ``rng/…`` for
    process 0 (and a run of one process), ``rng/rank<r>/…`` for the others."""
    return "rng/" if rank == 0 else f"rng/rank{rank}/"


def _rng_state(prefix: str = "rng/") -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {f"{prefix}torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"{prefix}cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    plain: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy

        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        plain["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, plain


def _set_rng_state(tensors: dict[str, Tensor], plain: dict[str, Any], prefix: str = "rng/") -> None:
    torch.set_rng_state(tensors[f"{prefix}torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith(f"{prefix}cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in plain:
        import numpy

        name, keys, pos, has_gauss, cached = plain["numpy"]
        numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))


def _optimizer_split(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, plain_state = {}, {}
    for index, values in state["state"].items():
        plain_state[str(index)] = {}
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                plain_state[str(index)][name] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def _optimizer_join(tensors: dict[str, Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _write_checkpoint(
    out: str, config: TrainConfig, epoch: int, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, world: _World = _SOLO
) -> None:
    """Called by every process: process 0 gathers the others' generator states and writes
    the checkpoint; every process returns once it is written."""
    from safetensors.torch import save

    states = [_rng_state(_rng_prefix(world.rank))]
    if world.size > 1:
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * world.size if world.main else None
        dist.gather_object(states[0], gathered, dst=0)  # in memory between the processes only
        states = gathered or []
    if world.main:
        opt_tensors, opt_plain = _optimizer_split(optimizer.state_dict())
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        tensors.update(opt_tensors)
        for rng_tensors, _ in states:
            tensors.update(rng_tensors)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # no shared storage
        meta = {
            "format": _FORMAT,
            "config": config.to_dict(),
            "epoch": epoch,
            "world_size": world.size,
            "optimizer": opt_plain,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "rng": states[0][1],
        }
        if world.size > 1:
            meta["rng_ranks"] = {str(rank): plain for rank, (_, plain) in enumerate(states) if rank > 0}
        write_atomically(os.path.join(out, CHECKPOINT), save(tensors, metadata={"fxqp_train": json.dumps(meta)}))
    _barrier(world)


def read_checkpoint(out: str) -> tuple[TrainConfig, int, dict[str, Tensor], dict[str, Any]]:
    """``(config, epoch, tensors, meta)`` of ``out/checkpoint.safetensors``, every field
    checked (a checkpoint may come from elsewhere: it is read with safetensors, never
    unpickled)."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(out, CHECKPOINT)
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {out}: no {CHECKPOINT} there (written by fxqp train --checkpoint-every, and at the end of a run)")
    try:
        with safe_open(path, framework="pt") as f:
            header = (f.metadata() or {}).get("fxqp_train")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if header is None:
        raise CheckpointError(f"{path}: not an fxqp train checkpoint (no 'fxqp_train' metadata)")
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata 'fxqp_train' is not JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: metadata 'fxqp_train'.format: expected {_FORMAT}")
    for name, kind in (("epoch", int), ("optimizer", dict), ("scheduler", dict), ("rng", dict)):
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise CheckpointError(f"{path}: metadata 'fxqp_train'.{name}: expected {kind.__name__}")
    config = TrainConfig.from_dict(meta["config"], path)
    if not 1 <= meta["epoch"] <= config.epochs:
        raise CheckpointError(f"{path}: epoch {meta['epoch']} is outside the run's 1..{config.epochs}")
    size = meta.setdefault("world_size", 1)  # written by fxqp train since data-parallel runs
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise CheckpointError(f"{path}: metadata 'fxqp_train'.world_size: {size!r} is not accepted; expected a positive integer")
    ranks = meta.get("rng_ranks", {})
    for rank in range(size):
        plain = meta["rng"] if rank == 0 else ranks.get(str(rank)) if isinstance(ranks, dict) else None
        if f"{_rng_prefix(rank)}torch" not in tensors or not isinstance(plain, dict) or "python" not in plain:
            raise CheckpointError(f"{path}: the random generators' states of process {rank} (of {size}) are missing")
    return config, meta["epoch"], tensors, meta


# --------------------------------------------------------------------------- the loop


def _loss_fn(task: _Task) -> Callable[[Tensor, Tensor], Tensor]:
    return F.cross_entropy if task.kind == "classification" else F.mse_loss


@torch.no_grad()
def _evaluate(
    model: nn.Module, task: _Task, device: torch.device, amp: torch.dtype | None, workers: int, world: _World = _SOLO
) -> dict[str, float]:
    """The validation loss and metric; in a data-parallel run each process evaluates every
    ``world.size``-th sample and the sums are reduced: every process gets the whole set's."""
    from fxqp.data import psnr

    model.eval()
    val = task.val if world.size == 1 else Subset(task.val, range(world.rank, len(task.val), world.size))
    # its own generator: evaluating draws nothing from the one training draws from
    loader = DataLoader(val, batch_size=task.val_batch, num_workers=workers, generator=torch.Generator().manual_seed(0))
    total, loss, score = 0, 0.0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x).float()
        if task.kind == "classification":  # summed over the batch
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            score += 100.0 * float((out.argmax(1) == y).sum())
        else:  # one image per batch
            loss += float(F.mse_loss(out, y))
            score += psnr(out, y, border=task.scale or 0)
        total += len(y)
    if world.size > 1:
        total, loss, score = _all_reduce(world, [total, loss, score], device)
    return {"val_loss": loss / max(total, 1), task.metric: score / max(total, 1)}


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from fxqp._extras import require

    tqdm = require("tqdm", "fxqp train").tqdm
    # disable=None: no bar when stderr is not a terminal (a redirected log gets the epoch lines only)
    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=None if enabled else True)


def run(
    config: TrainConfig,
    out: str,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainOutcome:
    """Run ``fxqp train`` with ``config``, writing to the folder ``out``: ``checkpoint.safetensors``
    (every ``checkpoint_every`` epochs and at the end), ``metrics.jsonl`` (one JSON object of
    numbers per epoch: losses, the validation metric, the learning rate, the step and
    :func:`fxqp.metrics`), then ``model.fxqp`` (the lowered model, :func:`fxqp.save`),
    ``summary.txt`` and ``result.json``.

    When ``out`` holds a checkpoint of this config, the run continues from it (see
    :func:`resume`); ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint.

    Under torchrun (see the module's documentation) every process calls this; process 0
    alone writes files, logs and shows progress; ``on_epoch_end`` is called in every
    process, and every process gets the same figures (those of the whole data).
    """
    with _distributed(config) as (world, device):
        return _run(config, out, None, world, device, progress=progress, on_epoch_end=on_epoch_end, log=log)


def resume(
    out: str,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> TrainOutcome:
    """Continue the run whose checkpoint is in ``out``, bit-exactly. ``overrides`` may only
    repeat the recorded values (a different value is a :class:`CheckpointError` naming it).
    A data-parallel run resumes with as many processes as it was made with."""
    config, epoch, tensors, meta = read_checkpoint(out)
    changed = [f"{k} (recorded {getattr(config, k)!r}, given {v!r})" for k, v in overrides.items() if getattr(config, k) != v]
    if changed:
        raise CheckpointError(
            f"--resume {out}: the run was made with other arguments; a resumed run must repeat them: {', '.join(changed)}"
        )
    with _distributed(config) as (world, device):
        if meta["world_size"] != world.size:

            def started(n: int) -> str:
                return "one process (no torchrun)" if n == 1 else f"{n} processes (torchrun --nproc_per_node {n})"

            raise CheckpointError(
                f"--resume {out}: the run was made with world size {meta['world_size']} and this one has world size "
                f"{world.size}; a run resumes bit-exactly with the world size it was made with: start it with {started(meta['world_size'])}"
            )
        return _run(config, out, (epoch, tensors, meta), world, device, progress=progress, on_epoch_end=on_epoch_end, log=log)


def _run(
    config: TrainConfig,
    out: str,
    start: tuple[int, dict[str, Tensor], dict[str, Any]] | None,
    world: _World,
    device: torch.device,
    *,
    progress: bool,
    on_epoch_end: Any,
    log: Callable[[str], None],
) -> TrainOutcome:
    import fxqp
    from fxqp.experiment import float32_bytes
    from fxqp.spec import Spec

    if not world.main:  # process 0 speaks for the run
        progress, log = False, _silent
    spec = Spec.from_dict(config.spec)
    amp = _amp_dtype(config, device)
    task = _task(config)
    per_step = config.batch_size * world.size * config.grad_accum  # samples per optimizer step
    steps_per_epoch = len(task.train) // (config.batch_size * world.size) // config.grad_accum
    shape = f"{config.batch_size} × {config.grad_accum}" + (f" × {world.size} processes" if world.size > 1 else "")
    if steps_per_epoch < 1:
        raise FxqpError(
            f"--data {config.data}: {len(task.train)} training samples make no optimizer step of {shape} samples; lower --batch-size or --grad-accum"
            + (" or the number of processes" if world.size > 1 else "")
        )
    total = config.epochs * steps_per_epoch
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = _build_model(config, task)
    float_bytes = float32_bytes(model)
    # two samples, without augmentation: what static activation masks and channel groups are shaped by
    example = torch.stack([(task.val if task.kind == "classification" else task.train)[i][0] for i in range(2)])
    gm = fxqp.transform(model, spec, example_inputs=(example,), total_steps=total, auto_step=False)
    if not config.allow_late_ops:
        check_late_ops(gm, total)
    gm.to(device)
    # the generators the training draws from (augmentation, dropout) start here, whatever
    # building and tracing the model drew; each process of a data-parallel run its own
    torch.manual_seed(config.seed + 1 + 1_000_003 * world.rank)
    random.seed(config.seed + 1 + 1_000_003 * world.rank)
    optimizer = _optimizer(config, gm)
    scheduler = _scheduler(config, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    history: list[dict[str, float]] = []
    first = 1
    if world.main:
        os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, METRICS)
    if start is not None:
        epoch, tensors, meta = start
        try:
            gm.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
            optimizer.load_state_dict(_optimizer_join(tensors, meta["optimizer"]))
            scheduler.load_state_dict(meta["scheduler"])
            if meta.get("scaler") is not None:
                scaler.load_state_dict(meta["scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise CheckpointError(
                f"{os.path.join(out, CHECKPOINT)}: does not fit the model of its own config ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from None
        _set_rng_state(tensors, meta["rng"] if world.main else meta["rng_ranks"][str(world.rank)], _rng_prefix(world.rank))
        history = _read_history(metrics_path, epoch)
        first = epoch + 1
        log(f"resuming {out} after epoch {epoch} of {config.epochs} (step {int(fxqp.schedule.find_schedule(gm).step)})")
    else:
        log(
            f"{type(model).__name__} ({config.model or 'built-in'}) on {config.data}: {len(task.train)} training and {len(task.val)} validation samples, "
            f"{total} optimizer steps ({steps_per_epoch} per epoch) on {device.type}"
            + (f" with {config.amp}" if config.amp else "")
            + (
                f", {world.size} processes of {config.batch_size} samples per forward ({per_step} per optimizer step)"
                if world.size > 1
                else ""
            )
        )
        unused = len(task.train) - steps_per_epoch * per_step
        if unused:  # drop_last, and whole optimizer steps only: each epoch sees a random subset
            log(
                f"note: {unused} training samples per epoch make no whole optimizer step of {shape}; each epoch leaves out a different {unused}"
            )
    _barrier(world)  # every process has read metrics.jsonl before process 0 rewrites it
    if world.main:
        write_atomically(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
    net: nn.Module = gm
    if world.size > 1:
        # the parameters of scheduled ops (learned step sizes) are in every step's graph, before
        # their start too: DDP need not look for unused parameters
        net = nn.parallel.DistributedDataParallel(gm, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = _loss_fn(task)
    for epoch in range(first, config.epochs + 1):
        began = time.perf_counter()
        net.train()
        loader = _train_loader(task, config, epoch, world, device)
        batches = steps_per_epoch * config.grad_accum
        losses = torch.zeros(batches)
        bar = _progress(steps_per_epoch, f"epoch {epoch}/{config.epochs}", progress)
        for i, (x, y) in zip(range(batches), loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = (i + 1) % config.grad_accum == 0
            # gradients are averaged over the processes on the last micro-batch of a step only
            with net.no_sync() if world.size > 1 and not last else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = loss_fn(net(x).float(), y) / config.grad_accum
                scaler.scale(loss).backward()
            losses[i] = loss.detach().float() * config.grad_accum
            if last:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                fxqp.step(gm)
                bar.update()
        bar.close()
        _take_state_of_rank0(world, gm)
        record = {
            "epoch": epoch,
            "step": int(fxqp.schedule.find_schedule(gm).step),
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": float(losses.mean())
            if world.size == 1
            else _all_reduce(world, [losses.double().sum()], device)[0] / (batches * world.size),
        }
        record.update(_evaluate(gm, task, device, amp, config.workers, world))
        record["seconds"] = time.perf_counter() - began
        record.update(fxqp.metrics(gm))
        history.append(record)
        if world.main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        log(
            f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
            f"{task.metric.removeprefix('val_')} {record[task.metric]:.2f}, lr {record['lr']:.3g}, "
            f"{int(record['fxqp/ops_active'])}/{int(record['fxqp/ops'])} ops active, {record['seconds']:.1f} s"
        )
        if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
            _write_checkpoint(out, config, epoch, gm, optimizer, scheduler, scaler, world)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    return _finish(config, out, gm, task, device, amp, history, float_bytes, log, world)


def _silent(_: str) -> None:
    pass


def _read_history(path: str, epochs: int) -> list[dict[str, float]]:
    """The records of the first ``epochs`` epochs of ``metrics.jsonl`` (later ones, written
    after the checkpoint, are dropped: the resumed run writes them again)."""
    history = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by an interruption
                if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= epochs:
                    history.append(record)
    return history


def _finish(
    config: TrainConfig,
    out: str,
    gm: nn.Module,
    task: _Task,
    device: torch.device,
    amp: torch.dtype | None,
    history: list[dict[str, float]],
    float_bytes: int,
    log: Callable[[str], None],
    world: _World = _SOLO,
) -> TrainOutcome:
    import fxqp

    gm.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowered = fxqp.lower(gm)
    for w in caught:
        log(f"warning: {w.message}")
    evaluated = _evaluate(lowered, task, device, amp, config.workers, world)
    artifact = os.path.join(out, "model.fxqp")
    packed = 0
    if world.main:
        fxqp.save(lowered, artifact)
        packed = os.path.getsize(artifact)
    packed = int(_all_reduce(world, [packed], device)[0])  # every process returns the same result
    result = {
        "epochs": config.epochs,
        "steps": int(fxqp.schedule.find_schedule(gm).step),
        task.metric: evaluated[task.metric],
        "val_loss": evaluated["val_loss"],
        "artifact_bytes": packed,
        "float32_bytes": float_bytes,
        "config": config.to_dict(),
    }
    if world.main:
        write_atomically(os.path.join(out, "summary.txt"), f"{fxqp.summary(gm)}\n\n{fxqp.summary(lowered)}\n")
        write_json(os.path.join(out, "result.json"), result)
    _barrier(world)  # the files are there when any process returns
    log(
        f"lowered: {task.metric.removeprefix('val_')} {evaluated[task.metric]:.2f}, artifact {packed:,} bytes "
        f"({float_bytes / max(packed, 1):.2f}x smaller than float32); wrote model.fxqp, summary.txt, result.json, {METRICS}, {CHECKPOINT} to {out}"
    )
    return TrainOutcome(gm, lowered, history, result)
