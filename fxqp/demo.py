"""``fxqp demo``: the seed paper's non-commutativity experiment at small scale.

Two tasks on data that ships with scikit-learn and scikit-image (no downloads):

* ``digits`` — :class:`fxqp.models.DigitsNet` on 8×8 digits, test accuracy;
* ``sr`` — :class:`fxqp.models.ESPCN` ×3 super-resolution of sample photographs, PSNR on
  held-out photographs.

Each task trains the same network under the six orders of :mod:`fxqp.experiment` with the
same seeds and budget, and prints accuracy / PSNR (mean ± std over seeds and each seed's),
the size of the lowered, saved artifact, and, per pair of orders, the winner by the paired
rule of :class:`fxqp.experiment.PairedComparison` — or that there is none beyond seed
noise. Plots, ``results.json`` and the artifacts go to the output folder.

Settings (:data:`DEMO_TASKS`). Each task runs at the bits and pruned fraction where its
order effect was clearest in a sweep over bits (2 to 8) and pruned fractions (50% to 90%)
with three seeds (docs/demo.md has the sweep): digits at 4 bits and 80%, where pruning
weights and activations first wins in every seed, as in the seed paper's classification
results; super-resolution at 4 bits and 50%, the only setting tried where quantizing first
wins, as in the paper's ESPCN results (with activations pruned). At the paper's own 8 bits
and 50%, neither task's orders differ beyond seed noise at this scale. The schedules' timing
is the paper's, as fractions of the run (:mod:`fxqp.experiment`). ESPCN is 32 channels wide
instead of 64, and the epochs are few, so that the default run (three seeds of six orders on
two tasks) takes a few minutes on two CPU cores; ``--full`` doubles the epochs and runs five
seeds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from fxqp.atomic import write_atomically
from fxqp.data import TaskData, digits, super_resolution
from fxqp.errors import FxqpError
from fxqp.experiment import (
    ORDERS,
    RunResult,
    TrainConfig,
    file_safe,
    order_spec,
    paper_table,
    relu_selectors,
    results_table,
    run_experiment,
    winners,
)
from fxqp.models import ESPCN, DigitsNet

__all__ = ["DemoTask", "DEMO_TASKS", "DEFAULT_SEEDS", "FULL_SEEDS", "run_demo", "bicubic_psnr"]

#: Seeds of a default run, and of ``--full``.
DEFAULT_SEEDS = 3
FULL_SEEDS = 5


@dataclass(frozen=True)
class DemoTask:
    """One task of the demo: its data, network, budget (default and ``--full``) and the bits
    and pruned fraction of its weights and activations."""

    name: str
    load: Callable[[], TaskData]
    make_model: Callable[[], nn.Module]
    epochs: int
    full_epochs: int
    bits: int
    sparsity: float
    lr: float = 3e-3
    batch_size: int = 64


DEMO_TASKS: dict[str, DemoTask] = {
    "digits": DemoTask("digits", digits, DigitsNet, epochs=10, full_epochs=20, bits=4, sparsity=0.8),
    "sr": DemoTask(
        "sr", lambda: super_resolution(scale=3), lambda: ESPCN(scale=3, width=32), epochs=10, full_epochs=20, bits=4, sparsity=0.5
    ),
}


def bicubic_psnr(data: TaskData) -> float:
    """PSNR in dB of bicubic upscaling of a super-resolution task's test images (the same
    border convention as :func:`fxqp.experiment.measure`): what a network has to beat."""
    import statistics

    import torch.nn.functional as F

    from fxqp.data import psnr

    return statistics.fmean(
        psnr(F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False), hr, border=data.scale)
        for lr, hr in zip(data.test_x, data.test_y)
    )


def _run_printer(task: str, metric: str) -> Callable[[RunResult], None]:
    """One line per finished run, for a log where no progress bar is shown."""
    last = [time.perf_counter()]

    def show(result: RunResult) -> None:
        now = time.perf_counter()
        print(
            f"  {task} {result.order} seed {result.seed}: {result.metric:.2f} {metric}, {result.packed_bytes:,} bytes ({now - last[0]:.0f} s)",
            flush=True,
        )
        last[0] = now

    return show


def run_demo(
    *,
    full: bool = False,
    tasks: Sequence[str] = ("digits", "sr"),
    out: str | None = "fxqp-demo",
    bits: int | None = None,
    sparsity: float | None = None,
    epochs: int | None = None,
    seeds: int | None = None,
    orders: Sequence[str] = ORDERS,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the experiment, print the tables, write plots/results/artifacts to ``out``.

    ``bits``, ``sparsity`` and ``epochs`` override every task's own (:data:`DEMO_TASKS`);
    ``seeds`` defaults to :data:`DEFAULT_SEEDS` (:data:`FULL_SEEDS` with ``full``). With
    ``progress``, a progress bar while a run trains when standard error is a terminal, and
    otherwise one line per finished run.

    Returns ``{task: {"rows": [run dicts], "winners": {...}, ...}}`` (also in ``results.json``).
    """
    from fxqp import plots

    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown:
        raise FxqpError(f"--tasks: unknown task {unknown[0]!r}; expected a comma-separated subset of {', '.join(DEMO_TASKS)}")
    n_seeds = seeds if seeds is not None else (FULL_SEEDS if full else DEFAULT_SEEDS)
    summary: dict[str, Any] = {"seeds": n_seeds, "tasks": {}}
    for name in tasks:
        task = DEMO_TASKS[name]
        task_bits = bits if bits is not None else task.bits
        task_sparsity = sparsity if sparsity is not None else task.sparsity
        data = task.load()
        config = TrainConfig(
            epochs=epochs or (task.full_epochs if full else task.epochs), batch_size=task.batch_size, lr=task.lr, progress=progress
        )
        steps = config.steps(len(data.train_y))
        print(
            f"\n== {name}: {task.make_model().__class__.__name__}, {len(data.train_y)} training samples, "
            f"{config.epochs} epochs = {steps} steps, {n_seeds} seed{'s' if n_seeds > 1 else ''}, {task_bits}-bit, {task_sparsity:.0%} pruning",
            flush=True,
        )
        reference = bicubic_psnr(data) if data.kind == "super_resolution" else None
        if reference is not None:
            print(f"bicubic upscaling of the test images: {reference:.2f} dB", flush=True)
        t0 = time.perf_counter()
        task_out = None if out is None else os.path.join(out, name)
        log_runs = progress and not sys.stderr.isatty()
        results = run_experiment(
            data,
            task.make_model,
            orders=orders,
            seeds=range(n_seeds),
            config=config,
            bits=task_bits,
            sparsity=task_sparsity,
            out_dir=task_out,
            on_result=_run_printer(name, data.metric) if log_runs else None,
        )
        wall = time.perf_counter() - t0
        won = winners(results)
        print(results_table(data, results))
        print("\n".join(f"{'winners:' if i == 0 else ' ' * 8} {pair}: {verdict}" for i, (pair, verdict) in enumerate(won.items())))
        print(f"({wall:.0f} s)")
        summary["tasks"][name] = {
            "metric": data.metric,
            "bits": task_bits,
            "sparsity": task_sparsity,
            "epochs": config.epochs,
            "steps": steps,
            "wall_s": wall,
            "winners": won,
            "bicubic_psnr": reference,
            "rows": [r.to_dict() for r in results],
        }
        if task_out is not None:
            selectors = relu_selectors(task.make_model())
            dynamic = data.kind == "super_resolution"
            specs = {o: order_spec(o, bits=task_bits, sparsity=task_sparsity, dynamic_activations=dynamic, **selectors) for o in orders}
            shown = next((r for r in results if r.order == "P(w,a)->Q"), results[-1])
            plots.plot_sites(
                shown.model,
                os.path.join(task_out, "sites.png"),
                title=f"{name}, {shown.order} (seed {shown.seed}): bits and sparsity per site",
            )
            for order in ("P(w,a)->Q", "Q->P(w,a)"):
                if order in orders:
                    plots.plot_schedule(
                        specs[order], steps, os.path.join(task_out, f"schedule_{file_safe(order)}.png"), title=f"{name}: {order} schedule"
                    )
            plots.plot_curves(
                results,
                os.path.join(task_out, "curves.png"),
                metric=data.metric,
                title=f"{name}: training curves per order (mean over seeds, range shaded)",
                schedules=specs,
            )
            plots.plot_size_tradeoff(
                results,
                os.path.join(task_out, "size_tradeoff.png"),
                metric=data.metric,
                title=f"{name}: {data.metric} against artifact size",
            )
    print("\nseed paper, for reference (full-size models and data, 8-bit, 50% pruning):")
    print(paper_table())
    if out is not None:
        os.makedirs(out, exist_ok=True)
        write_atomically(os.path.join(out, "results.json"), json.dumps(summary, indent=2))
        print(f"\nwrote plots, artifacts and results.json to {out}/")
    return summary["tasks"]
