"""Tutorial 1 — quick start: quantize and prune a small CNN while it trains.

What this teaches, in the order fxqp is used:

1. write a :class:`fxqp.Spec` in Python: which sites (module weights, call outputs) get which
   ops (:class:`fxqp.Prune`, :class:`fxqp.Quantize`), in which order, from which step;
2. ``fxqp.transform(model, spec)``: trace the model and attach the ops; the result is an
   ordinary ``nn.Module`` (a ``torch.fx.GraphModule``) that any optimizer trains;
3. train it with a plain PyTorch loop (Adam): the step counter that drives the schedule
   advances by itself at every training-mode forward;
4. ``fxqp.summary(gm)``: per site, the ops in order, bits, target and actual sparsity;
5. ``fxqp.lower(gm)`` + ``fxqp.save(low, path)``: freeze the model into bit-packed integer
   codes and write it to one file, and compare its size with the float32 weights.

The data are scikit-learn's bundled 8×8 digits (nothing is downloaded).

Run::

    python tutorials/01_quick_start.py            # about a minute on 2 CPU cores
    python tutorials/01_quick_start.py --tiny     # a few seconds, for a smoke test
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.data import digits
from fxqp.models import DigitsNet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--out", default=None, help="folder for the saved artifact (default: a new temporary folder)")
    return parser.parse_args()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in %, in eval mode (eval-mode forwards never advance the schedule)."""
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    args = parse_args()
    out = args.out or tempfile.mkdtemp(prefix="fxqp_tutorial01_")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)

    # --- Data and model -----------------------------------------------------------------
    # 1,347 training and 450 test images of 8x8 digits, as N x 1 x 8 x 8 floats in [0, 1].
    data = digits()
    epochs = 2 if args.tiny else 15
    batch_size = 64
    steps_per_epoch = len(data.train_y) // batch_size
    total_steps = epochs * steps_per_epoch
    print(
        f"digits: {len(data.train_y)} train / {len(data.test_y)} test images; "
        f"{epochs} epochs x {steps_per_epoch} steps = {total_steps} training steps"
    )

    model = DigitsNet(num_classes=10, width=8 if args.tiny else 32)

    # --- The spec -----------------------------------------------------------------------
    # Steps are training steps (forwards in training mode). We schedule everything as a
    # fraction of the run ("20%"), resolved against total_steps given to fxqp.transform, so
    # --tiny and the full run follow the same plan:
    #   * weights of every Conv2d and Linear: magnitude-prune to 50% zeros on a cubic ramp
    #     from 20% to 50% of the run, then quantize to 4 bits from 60% on.
    #     List order is application order: [Prune, Quantize] computes Q(w * mask).
    #   * outputs of the ReLUs (the ReLU module, called twice, and the functional
    #     torch.relu): quantize to 8 bits from 30% of the run on, then zero the 25% of
    #     activations with the smallest running mean of |x| from 50% on (a static mask).
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5, start="20%", end="50%"), Quantize(bits=4, start="60%")]),
            Rule(modules=["ReLU"], functions=["relu"], activation=[Quantize(bits=8, start="30%"), Prune(sparsity=0.25, start="50%")]),
        ]
    )
    print("\nThe spec, as YAML (tutorial 2 shows how to write it as a file):")
    print(spec.to_yaml())

    # --- Transform ----------------------------------------------------------------------
    # `model` itself is left untouched; `gm` is a traced copy with the ops attached:
    # weight ops as torch parametrizations, activation ops as stage modules after each
    # selected call. example_inputs runs one eval forward to fix shapes (optional here).
    gm = fxqp.transform(model, spec, example_inputs=(data.train_x[:2],), total_steps=total_steps)
    float_acc_untrained = accuracy(gm, data.test_x, data.test_y)
    print(
        f"transformed: a torch.fx.GraphModule? {isinstance(gm, torch.fx.GraphModule)}; accuracy before training: {float_acc_untrained:.1f}%"
    )

    # --- Train: an ordinary loop --------------------------------------------------------
    optimizer = torch.optim.Adam(gm.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        gm.train()
        order = torch.randperm(len(data.train_y), generator=generator)
        total_loss = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(gm(data.train_x[idx]), data.train_y[idx])
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
        step = int(gm.fxqp_schedule.step)  # the schedule's counter: one per training forward
        print(
            f"epoch {epoch:2d}  step {step:4d}  loss {total_loss / steps_per_epoch:.4f}  "
            f"test accuracy {accuracy(gm, data.test_x, data.test_y):.1f}%"
        )
    print(f"trained in {time.perf_counter() - started:.1f} s")

    # --- What the model looks like now --------------------------------------------------
    # Every op has started by now: weights are 50% zeros and on a 4-bit grid. "actual" can
    # exceed the target: rounding to 4 bits turns some small kept weights into zeros too.
    print()
    print(fxqp.summary(gm))
    eval_acc = accuracy(gm, data.test_x, data.test_y)

    # --- Lower and save -----------------------------------------------------------------
    # lower() freezes the model for inference: weights become bit-packed 4-bit codes of
    # the non-zero entries plus a compressed mask; activation stages keep a fixed scale.
    low = fxqp.lower(gm)
    low_acc = accuracy(low, data.test_x, data.test_y)
    path = os.path.join(out, "digits.fxqp")
    fxqp.save(low, path)
    file_bytes = os.path.getsize(path)
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    print(f"\naccuracy: transformed (eval) {eval_acc:.1f}%, lowered {low_acc:.1f}% (the same model)")
    print(f"saved {path}")
    print(
        f"float32 parameters: {float_bytes:,} bytes; saved file: {file_bytes:,} bytes "
        f"({float_bytes / file_bytes:.1f}x smaller, header and scales included)"
    )
    print("\nPer-site sizes of the lowered model:")
    print(fxqp.summary(low))


if __name__ == "__main__":
    main()
