"""Data-parallel training runs for tests/test_distributed.py: one function runs a rank
(started by ``torch.multiprocessing``), another the same training in one process on the
concatenated batches; both write what the test compares to a folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec

STEPS = 10
BATCH = 4  # per rank and step
WORLD = 2


@dataclass(frozen=True)
class Case:
    """One training set-up: DDP's buffer broadcast before each forward (``sync_buffers``:
    ``forward_sync_buffers``, which torch 2.14 names what was ``broadcast_buffers``);
    ``compile`` the DDP model; ``accumulate`` micro-batches per optimizer step
    (``auto_step=False``, ``no_sync`` on all but the last)."""

    sync_buffers: bool = True
    compile: bool = False
    accumulate: int = 1


class Net(nn.Module):
    """A small CNN without batch norm (its batch statistics are the user's, not fxqp's)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def spec() -> Spec:
    """Weight pruning ramps and quantization, activation quantization (min/max observers and
    LSQ) and a static activation-pruning ramp: every statistic fxqp keeps."""
    return Spec(
        rules=[
            Rule(modules=["Conv2d", "Linear"], weight=[Prune(0.5, start=2, end=7, every=2), Quantize(bits=4, start=1)]),
            Rule(names=["relu1"], activation=[Quantize(bits=8, start=1), Prune(0.4, start=3, end=8, every=2)]),
            Rule(names=["relu2"], activation=[Prune(0.3, granularity="channel", start=2, end=6, every=2), Quantize(bits=6, start=2)]),
            Rule(names=["pool"], activation=[Quantize(bits=8, learned=True, start=4)]),
        ]
    )


def batches(accumulate: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, per micro-batch: the global batch (``WORLD × BATCH / accumulate`` samples;
    rank ``r`` takes the ``r``-th slice)."""
    g = torch.Generator().manual_seed(123)
    n = WORLD * BATCH // accumulate
    return [
        [(torch.randn(n, 3, 8, 8, generator=g) * 2, torch.randint(0, 5, (n,), generator=g)) for _ in range(accumulate)]
        for _ in range(STEPS)
    ]


def build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    example = torch.zeros(2, 3, 8, 8)
    return fxqp.transform(Net(), spec(), example_inputs=(example,), auto_step=case.accumulate == 1)


def state_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor of the model's state (parameters and buffers), by name."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def probe() -> torch.Tensor:
    return torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(9)) * 2


def finish(model: nn.Module, out: str, name: str, extra: dict) -> None:
    """Write the model's state, its lowered outputs on :func:`probe` and its artifact."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if v.numel()}
    model.eval()
    lowered = fxqp.lower(model)
    with torch.no_grad():
        state["__lowered_output"] = lowered(probe()).contiguous()
    save_file(state, os.path.join(out, f"{name}.safetensors"))
    fxqp.save(lowered, os.path.join(out, f"{name}.fxqp"))
    with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(extra, f)


def train_single(case: Case, out: str) -> None:
    """The reference: one process, the concatenated batches."""
    model = build(case)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    digests = []
    for step in batches(case.accumulate):
        for x, y in step:
            (F.cross_entropy(model(x), y) / case.accumulate).backward()
        optimizer.step()
        optimizer.zero_grad()
        if case.accumulate > 1:
            fxqp.step(model)
        digests.append(state_digest(model))
    finish(model, out, "single", {"digests": digests})


def train_rank(rank: int, case_dict: dict, out: str, init_file: str) -> None:
    """One rank of :data:`WORLD`: DDP over gloo; counts the collectives fxqp issues (eager)."""
    torch.set_num_threads(1)
    case = Case(**case_dict)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        calls: list[str] = []
        all_reduce = torch.distributed.all_reduce

        def counted(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
            calls.append(str(op))
            return all_reduce(tensor, op=op, group=group, async_op=async_op)

        torch.distributed.all_reduce = counted
        model = build(case)
        ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=case.sync_buffers)
        runner = torch.compile(ddp) if case.compile else ddp
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        ddp.train()
        digests, per_step = [], []
        for step in batches(case.accumulate):
            before = len(calls)
            for i, (x, y) in enumerate(step):
                n = x.shape[0] // WORLD
                xr, yr = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
                last = i == len(step) - 1
                with ddp.no_sync() if not last else contextlib.nullcontext():
                    (F.cross_entropy(runner(xr), yr) / case.accumulate).backward()
            optimizer.step()
            optimizer.zero_grad()
            if case.accumulate > 1:
                fxqp.step(model)
            digests.append(state_digest(model))
            per_step.append(len(calls) - before)
        torch.distributed.all_reduce = all_reduce
        finish(model, out, f"rank{rank}", {"digests": digests, "collectives": per_step, "ops": sorted(set(calls))})
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(case: Case, out: str) -> None:
    """Run :data:`WORLD` ranks of :func:`train_rank` and wait for them."""
    import torch.multiprocessing as mp

    init_file = os.path.join(out, "rendezvous")
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(train_rank, args=(asdict(case), out, init_file), nprocs=WORLD, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
