"""``fxqp demo``: the seed paper's non-commutativity experiment at small scale.

Two tasks on data that ships with scikit-learn and scikit-image (no downloads):

* ``digits`` — :class:`fxqp.models.DigitsNet` on 8×8 digits, test accuracy;
* ``sr`` — :class:`fxqp.models.ESPCN` ×3 super-resolution of sample photographs, PSNR on
  held-out photographs.

Each task trains the same network under the six orders of :mod:`fxqp.experiment` with the
same seeds and budget, and prints accuracy / PSNR (mean ± std over seeds), the size of the
lowered, saved artifact, and which order won; plots, ``results.json`` and the artifacts go
to the output folder.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from fxqp.atomic import write_atomically
from fxqp.data import TaskData, digits, super_resolution
from fxqp.errors import FxqpError
from fxqp.experiment import ORDERS, TrainConfig, paper_table, file_safe, order_spec, relu_selectors, results_table, run_experiment, winners
from fxqp.models import ESPCN, DigitsNet

__all__ = ["DemoTask", "DEMO_TASKS", "run_demo"]


@dataclass(frozen=True)
class DemoTask:
    """One task of the demo: its data, network, and budget (default and ``--full``)."""

    name: str
    load: Callable[[], TaskData]
    make_model: Callable[[], nn.Module]
    epochs: int
    full_epochs: int
    lr: float = 3e-3
    batch_size: int = 64


DEMO_TASKS: dict[str, DemoTask] = {
    "digits": DemoTask("digits", digits, DigitsNet, epochs=15, full_epochs=40),
    "sr": DemoTask("sr", lambda: super_resolution(scale=3), lambda: ESPCN(scale=3), epochs=20, full_epochs=60),
}


def run_demo(
    *,
    full: bool = False,
    tasks: Sequence[str] = ("digits", "sr"),
    out: str | None = "fxqp-demo",
    bits: int = 8,
    sparsity: float = 0.5,
    epochs: int | None = None,
    seeds: int | None = None,
    orders: Sequence[str] = ORDERS,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the experiment, print the tables, write plots/results/artifacts to ``out``.

    Returns ``{task: {"rows": [run dicts], "winners": {...}}}`` (also in ``results.json``).
    """
    from fxqp import plots

    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown:
        raise FxqpError(f"--tasks: unknown task {unknown[0]!r}; expected a comma-separated subset of {', '.join(DEMO_TASKS)}")
    n_seeds = seeds if seeds is not None else (3 if full else 1)
    summary: dict[str, Any] = {"bits": bits, "sparsity": sparsity, "seeds": n_seeds, "tasks": {}}
    tables = []
    for name in tasks:
        task = DEMO_TASKS[name]
        data = task.load()
        config = TrainConfig(epochs=epochs or (task.full_epochs if full else task.epochs), batch_size=task.batch_size, lr=task.lr, progress=progress)
        steps = config.steps(len(data.train_y))
        print(f"\n== {name}: {task.make_model().__class__.__name__}, {len(data.train_y)} training samples, "
              f"{config.epochs} epochs = {steps} steps, {n_seeds} seed(s), {bits}-bit, {sparsity:.0%} pruning")
        t0 = time.perf_counter()
        task_out = None if out is None else os.path.join(out, name)
        results = run_experiment(data, task.make_model, orders=orders, seeds=range(n_seeds), config=config, bits=bits, sparsity=sparsity, out_dir=task_out)
        wall = time.perf_counter() - t0
        table = results_table(data, results)
        won = winners(results)
        print(table)
        print("winners: " + "; ".join(f"{k}: {v}" for k, v in won.items()) + f"  ({wall:.0f} s)")
        tables.append((name, table, won))
        summary["tasks"][name] = {"metric": data.metric, "epochs": config.epochs, "steps": steps, "wall_s": wall, "winners": won, "rows": [r.to_dict() for r in results]}
        if task_out is not None:
            selectors = relu_selectors(task.make_model())
            dynamic = data.kind == "super_resolution"
            shown = next((r for r in results if r.order == "P(w,a)->Q"), results[-1])
            plots.plot_sites(shown.model, os.path.join(task_out, "sites.png"), title=f"{name}, {shown.order}: bits and sparsity per site")
            for order in ("P(w,a)->Q", "Q->P(w,a)"):
                if order in orders:
                    spec = order_spec(order, bits=bits, sparsity=sparsity, dynamic_activations=dynamic, **selectors)
                    plots.plot_schedule(spec, steps, os.path.join(task_out, f"schedule_{file_safe(order)}.png"), title=f"{name}: {order} schedule")
            plots.plot_curves(results, os.path.join(task_out, "curves.png"), metric=data.metric, title=f"{name}: training curves per order")
            plots.plot_size_tradeoff(results, os.path.join(task_out, "size_tradeoff.png"), metric=data.metric, title=f"{name}: {data.metric} against artifact size")
    print("\nseed paper, for reference (full-size models and data):")
    print(paper_table())
    if out is not None:
        os.makedirs(out, exist_ok=True)
        write_atomically(os.path.join(out, "results.json"), json.dumps(summary, indent=2))
        print(f"\nwrote plots, artifacts and results.json to {out}/")
    return summary["tasks"]
