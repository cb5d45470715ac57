"""Tutorial 6 — let fxqp find the configuration: per-layer pruning ratios and schedules.

Two searches, both on Optuna (``pip install 'fxqp[search]'``), both calling two functions
of yours — ``train_fn(model, steps)`` and ``evaluate_fn(lowered_model)`` — so that you keep
your training loop and fxqp keeps track of what was transformed, trained and lowered:

1. ``fxqp.search.layer_ratios``: a VGG-style network with binary weights is trained, then
   one filter-pruning ratio per layer is searched, minimizing
   ``val_loss + α·params%/100 + (α/4)·bits%/100`` (the seed paper on pruning quantized
   networks), and the best is fine-tuned;
2. ``fxqp.search.schedules``: when to quantize and prune, in which order, to how many bits:
   the Pareto front of accuracy against the saved artifact's bytes.

Both choose on a validation split of the training set; the test set is looked at once, at
the end. The studies are kept in a SQLite file, read back at the end without running
anything (the same as ``fxqp search show``).

Run::

    python tutorials/06_searching.py [--tiny] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from fxqp import Quantize, Rule, Spec
from fxqp.data import digits, validation_split
from fxqp.experiment import TrainConfig, example_inputs, fit, measure
from fxqp.models import DigitsVGG
from fxqp.search import layer_ratios, read_study, schedules


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a narrow network, few epochs and trials (smoke test)")
    parser.add_argument("--out", default=None, help="folder for the study and the specs found (default: a new temporary folder)")
    return parser.parse_args()


def banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def main() -> None:
    args = parse_args()
    out = args.out or tempfile.mkdtemp(prefix="fxqp_tutorial06_")
    os.makedirs(out, exist_ok=True)
    storage = f"sqlite:///{os.path.join(out, 'studies.db')}"
    width, epochs, trials = (8, 3, 6) if args.tiny else (32, 20, 40)

    # --- Data and your two functions ---------------------------------------------------
    # 20% of the training set is held out: the searches choose on it, never on the test set.
    data = digits()
    validation = validation_split(data, 0.2, seed=0)
    config = TrainConfig(batch_size=64, lr=3e-3, seed=0, progress=False)
    per_epoch = len(validation.train_y) // config.batch_size

    def make_model() -> torch.nn.Module:
        return DigitsVGG(width=width)

    def train_fn(model: torch.nn.Module, steps: int) -> None:
        fit(model, validation, steps, config)  # exactly `steps` optimizer steps

    def evaluate_fn(lowered: torch.nn.Module) -> dict[str, float]:
        return measure(lowered, validation)  # {"metric": accuracy %, "loss": cross-entropy}

    # --- 1. Per-layer filter-pruning ratios -------------------------------------------
    banner("per-layer pruning ratios of a binary network")
    # The base spec: binary weights (XNOR-Net scales) for every convolution but the first;
    # the first convolution and the classifier stay float, as in the paper.
    base = Spec(rules=[Rule(modules=["Conv2d"], exclude=["features.0"], weight=[Quantize(bits=1, method="binary")])])
    torch.manual_seed(0)
    result = layer_ratios(
        make_model,
        base,
        train_fn,
        evaluate_fn,
        example_inputs=example_inputs(make_model(), data),
        strategy="joint",
        n_trials=trials,
        max_ratio=0.4,
        pretrain_steps=epochs * per_epoch,
        final_steps=max(1, epochs // 2) * per_epoch,
        storage=storage,
        study_name="ratios",
        progress=False,
    )
    print(result.table())
    test = measure(result.lowered, data)["metric"]
    print(f"test accuracy of the pruned, fine-tuned, lowered network: {test:.2f}%")
    result.best_spec.to_yaml(os.path.join(out, "ratios.yaml"))
    print("the spec found (base rules, then one rule per pruned layer) is in ratios.yaml")

    # --- 2. Schedules -----------------------------------------------------------------
    banner("quantize/prune schedules: accuracy against bytes")
    # Per rule group: the order of the ops, when each starts (a fraction of the run), how
    # long the pruning ramp lasts, and how many bits / how sparse.
    space = {
        "groups": [
            {
                "name": "weights",
                "modules": ["Conv2d", "Linear"],
                "weight": {
                    "order": ["prune_first", "quantize_first"],
                    "quantize": {"bits": [4, 8], "start": ["20%", "90%"]},
                    "prune": {"sparsity": [0.3, 0.8], "start": ["10%", "70%"], "length": ["10%", "30%"]},
                },
            }
        ]
    }
    front = schedules(
        make_model,
        train_fn,
        evaluate_fn,
        space=space,
        total_steps=epochs * per_epoch,
        example_inputs=example_inputs(make_model(), data),
        n_trials=trials,
        storage=storage,
        study_name="schedules",
        progress=False,
    )
    print(front.table())
    for point in front.pareto:
        point.spec.to_yaml(os.path.join(out, f"schedule-{point.number}.yaml"))
    print(f"{len(front.pareto)} specs on the front, written as schedule-<trial>.yaml")

    # --- 3. A study is data ------------------------------------------------------------
    banner("reading the studies back")
    for name in ("ratios", "schedules"):
        record = read_study(storage, name)
        print(f"read back: study {name!r}, {len(record.complete())} complete trials, each with its spec, evaluation and artifact bytes")
    print(f"(the same as: fxqp search show --storage {storage} --study ratios)")


if __name__ == "__main__":
    main()
