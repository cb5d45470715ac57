"""Tutorial 3 — order and timing: quantization and pruning do not commute.

Two things decide what a compressed weight looks like, and both are in the spec:

* **composition order** — the order of a rule's op list is application order:
  ``weight=[Prune, Quantize]`` computes ``Q(w·m)`` with the mask ``m`` taken from ``|w|``;
  ``weight=[Quantize, Prune]`` computes ``Q(w)·m'`` with ``m'`` taken from ``|Q(w)|``.
  With per-channel scales (the weight default) the rounding reorders magnitudes *across*
  channels, so the two masks, and hence the two weights, differ;
* **timing** — every op is the identity before its ``start`` step; a pruner with ``end``
  ramps its sparsity up on the cubic AGP curve and refreshes its mask every ``every``
  steps, then freezes it. Which op switches on first changes what training adapts to.
  ``start``, ``end`` and ``every`` are step counts or fractions of the run written
  ``"40%"``, resolved against ``fxqp.transform(..., total_steps=N)``: a spec in fractions
  fits any data set size and batch size.

The step counter advances by one at every training-mode forward, or — with
``fxqp.transform(..., auto_step=False)`` — only when you call ``fxqp.step(gm, n)``.

Finally the script trains the same DigitsNet under the seed paper's prune-first
(``P(w)->Q``) and quantize-first (``Q->P(w)``) schedules (:func:`fxqp.experiment.order_spec`,
:func:`fxqp.experiment.train`) and prints both accuracies, and draws the schedule with
:func:`fxqp.plots.plot_schedule`.

Run::

    python tutorials/03_ordering_and_schedules.py [--tiny] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.data import digits
from fxqp.experiment import TrainConfig, file_safe, order_spec, relu_selectors, results_table, train
from fxqp.models import DigitsNet
from fxqp.plots import plot_schedule, ramp


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="one short epoch per run (smoke test)")
    parser.add_argument("--out", default=None, help="folder for the schedule plots (default: a new temporary folder)")
    return parser.parse_args()


def banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def effective_weight(model: nn.Module, ops: list) -> torch.Tensor:
    """The weight of a one-layer model as its forward sees it, with ``ops`` active."""
    gm = fxqp.transform(model, Spec(rules=[Rule(modules=["Linear"], weight=ops)]), auto_step=False)
    layer = gm.get_submodule("0")
    with torch.no_grad():
        gm.train()
        _ = layer.weight  # reading it in training mode lets the pruner compute its mask
        gm.eval()
        return layer.weight.clone()  # eval mode: the ops apply, nothing is updated


def composition_order() -> None:
    banner("composition order: [Prune, Quantize] vs [Quantize, Prune]")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, bias=False))  # 256 weights, 16 output channels
    for bits in (2, 3, 4):
        pq = effective_weight(model, [Prune(sparsity=0.5), Quantize(bits=bits)])
        qp = effective_weight(model, [Quantize(bits=bits), Prune(sparsity=0.5)])
        print(
            f"{bits}-bit, 50% pruned: zeros {int((pq == 0).sum())} vs {int((qp == 0).sum())}; "
            f"{int((pq != qp).sum())} of {pq.numel()} weights differ, by up to {float((pq - qp).abs().max()):.3f}"
        )
    # With a single per-tensor scale, rounding keeps the magnitude order (ties are broken
    # by |w|), so both orders pick the same mask and give the same tensor:
    pq = effective_weight(model, [Prune(sparsity=0.5), Quantize(bits=2, per_channel=False)])
    qp = effective_weight(model, [Quantize(bits=2, per_channel=False), Prune(sparsity=0.5)])
    print(f"2-bit per-tensor grid: {int((pq != qp).sum())} weights differ (the orders agree here)")


def timing() -> None:
    banner("timing: start, end, every — driven by fxqp.step (auto_step=False)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, bias=False))
    prune = Prune(sparsity=0.75, start=10, end=40, every=10)
    quant = Quantize(bits=3, start=25)
    gm = fxqp.transform(model, Spec(rules=[Rule(modules=["Linear"], weight=[prune, quant])]), auto_step=False)
    layer, x = gm.get_submodule("0"), torch.rand(4, 16)
    print(f"weight ops: {prune}\n       then {quant}")
    print(f"{'step':>4}  {'ramp target':>11}  {'actual zeros':>12}  {'distinct values':>15}")
    for target in range(0, 51, 5):
        fxqp.step(gm, target - int(gm.fxqp_schedule.step))  # move the counter by hand
        gm.train()
        with torch.no_grad():
            gm(x)  # a training forward: the pruner refreshes its mask when one is due
        gm.eval()  # (with auto_step=False it does not advance the counter)
        with torch.no_grad():
            w = layer.weight
        print(f"{target:>4}  {ramp(prune, target):>11.3f}  {float((w == 0).float().mean()):>12.3f}  {w.unique().numel():>15}")
    # Between refreshes (steps 15, 25, 35) the mask keeps the sparsity of the last one; after
    # `end` it is frozen. From step 25 on, every row holds at most 2^3-1 = 7 levels.
    print("the mask is refreshed at steps 10, 20, 30, 40 only; quantization starts at 25")

    # The usual reason for auto_step=False: gradient accumulation, where one optimizer
    # step takes several forwards. Count optimizer steps yourself:
    gm = fxqp.transform(model, Spec(rules=[Rule(modules=["Linear"], weight=[prune, quant])]), auto_step=False)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01)
    gm.train()
    for _ in range(3):  # 3 optimizer steps of 4 micro-batches each
        for _ in range(4):
            gm(torch.rand(4, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        fxqp.step(gm)  # one schedule step per optimizer step
    print(f"gradient accumulation: 12 training forwards, 3 optimizer steps -> schedule step {int(gm.fxqp_schedule.step)}")


def orders_on_digits(tiny: bool, out: str) -> None:
    banner("training DigitsNet: P(w)->Q vs Q->P(w)")
    data = digits()
    config = TrainConfig(epochs=1 if tiny else 8, batch_size=64, lr=3e-3, seed=0, progress=False)
    width = 8 if tiny else 32
    steps = config.steps(len(data.train_y))
    # 4-bit weights and activations and 75% weight pruning make the orders' difference
    # easier to see than the paper's 8 bits / 50% at this small scale.
    results = []
    for order in ("P(w)->Q", "Q->P(w)"):
        torch.manual_seed(0)  # the same initial weights for both orders
        model = DigitsNet(width=width)
        spec = order_spec(order, bits=4, sparsity=0.75, **relu_selectors(model))
        print(f"\n{order}: its spec, in fractions of the run:")
        print(spec.to_yaml().rstrip())
        resolved = spec.resolve(steps).rules[0].weight
        print(f"over {steps} steps the weight ops start at steps {[op.start for op in resolved]}")
        png = plot_schedule(spec, steps, os.path.join(out, f"schedule_{file_safe(order)}.png"), title=f"{order} over {steps} steps")
        print(f"schedule plot: {png}")
        result = train(model, data, spec, config, order=order)
        print(f"{order}: test accuracy {result.metric:.1f}% (lowered model), artifact {result.packed_bytes:,} bytes")
        results.append(result)
    print()
    print(results_table(data, results))
    print("(one seed at a small scale: the gap is noisy; fxqp's benchmarks average several seeds)")


def main() -> None:
    args = parse_args()
    out = args.out or tempfile.mkdtemp(prefix="fxqp_tutorial03_")
    os.makedirs(out, exist_ok=True)
    composition_order()
    timing()
    orders_on_digits(args.tiny, out)


if __name__ == "__main__":
    main()
