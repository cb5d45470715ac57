"""Data-parallel training step: the cost of synchronising fxqp's activation statistics.

Setting: 2 processes (``torch.multiprocessing``, gloo, one thread each), DDP, torchvision
resnet18 (10 classes), 32x32 inputs, batch ``--batch`` per process, SGD (momentum 0.9), one
fixed batch per process. The spec: 8-bit weights with a 50% pruning ramp, and after every
ReLU 8-bit activations (min/max observers) and a static per-channel pruning ramp whose
averages stay live the whole run — so both buckets of :mod:`fxqp.ops.statistics` (maxima
and sums) are reduced at every step. Variants, timed in interleaved rounds of ``--steps``
steps each (a barrier before and after each round; the slower rank's time counts):

* float DDP — the model without fxqp;
* fxqp, local statistics — ``fxqp.transform(..., process_group=False)``: each rank keeps its
  own observers (what DDP gives without fxqp's synchronisation);
* fxqp, synchronised — the default: two collectives per training forward.

The table gives each variant's median time per step and, per variant, the median and
quartiles of its per-round ratio to fxqp with local statistics.

    python benchmarks/distributed.py [--rounds 15] [--steps 3] [--batch 16] [--out ...json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tabulate import tabulate
from train_step import paired_ratio  # the benchmarks' folder is on the path of a script run

import fxqp
from fxqp import Prune, Quantize, Rule, Spec

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "distributed.json")
WORLD = 2
VARIANTS = ("float DDP", "fxqp, local statistics", "fxqp, synchronised")


def spec() -> Spec:
    return Spec(
        rules=[
            Rule(modules=["Conv2d", "Linear"], weight=[Prune(0.5, start=0, end=100000, every=1000), Quantize(bits=8)]),
            Rule(modules=["ReLU"], activation=[Quantize(bits=8), Prune(0.3, granularity="channel", start=0, end=100000, every=1000)]),
        ]
    )


def build(variant: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    if variant == "float DDP":
        return model
    group = False if variant == "fxqp, local statistics" else None
    return fxqp.transform(model, spec(), example_inputs=(torch.zeros(2, 3, 32, 32),), process_group=group)


def _rank(rank: int, args: dict, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args["batch"], 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args["batch"],), generator=g)
        runners = {}
        for variant in VARIANTS:
            model = torch.nn.parallel.DistributedDataParallel(build(variant))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model=model, optimizer=optimizer) -> None:
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for _ in range(2):  # warm-up: first batches shape and fill the state
                step()
            runners[variant] = step
        times = {variant: [] for variant in VARIANTS}
        for round_ in range(args["rounds"]):
            order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                dist.barrier()
                began = time.perf_counter()
                for _ in range(args["steps"]):
                    runners[variant]()
                elapsed = torch.tensor([(time.perf_counter() - began) / args["steps"]])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slower rank's
                times[variant].append(float(elapsed))
        if rank == 0:
            with open(out, "w", encoding="utf-8") as f:
                json.dump(times, f)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=3, help="training steps per variant and round")
    parser.add_argument("--batch", type=int, default=16, help="samples per process and step")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "times.json")
        os.environ["OMP_NUM_THREADS"] = "1"
        mp.spawn(_rank, args=(vars(args), os.path.join(tmp, "rendezvous"), raw), nprocs=WORLD, join=True)
        with open(raw, encoding="utf-8") as f:
            times = json.load(f)
    base = times["fxqp, local statistics"]
    rows = []
    for variant in VARIANTS:
        q1, median, q3 = paired_ratio(times[variant], base)
        rows.append([variant, f"{statistics.median(times[variant]) * 1e3:.1f}", f"{median:.3f} [{q1:.3f}, {q3:.3f}]"])
    print(tabulate(rows, headers=["variant", "ms / step (median)", "× fxqp, local statistics [IQR]"], tablefmt="github"))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "seconds_per_step": times, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
