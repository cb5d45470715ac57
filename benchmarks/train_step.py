"""Training-step time: fxqp against float training and the reference tools, interleaved.

Setting: torchvision resnet18 (10 classes), batch 32, 32x32 inputs, SGD (momentum 0.9), one
fixed batch. fxqp runs 8-bit weights (per-channel symmetric) and 8-bit activations after
every ReLU, with 50% weight pruning and 50% activation pruning after every ReLU, all ops
active from step 0. Variants, each timed one step at a time in an interleaved round-robin
so machine noise hits all alike; the median step time is reported with its ratio to float
eager, and each fxqp or reference variant also with the quartiles of its per-round ratio to
float in the same mode (a round's variants run back to back, so this pairs like with like):

* float eager / float compiled (``torch.compile``, default Inductor backend)
* fxqp eager / fxqp compiled
* fxqp eager (torch ops): fxqp eager with the native CPU kernels off
  (``fxqp.native.disabled()``), the same values from torch ops
* torch.ao ``prepare_qat_fx`` eager (default QAT qconfig: 8-bit weights and activations)
* qsparse eager, when the ``qsparse`` package is installed (8-bit weights and activations,
  ``channelwise=-1`` for the activation quantizer, 50% weight and activation pruning)

With ``--breakdown``, also fxqp eager with only part of the spec (weights, weight
quantization, weight pruning, activations), to see where the added time goes.

With ``--inference``, also evaluation-mode forwards without gradients (``torch.no_grad``) of
float and fxqp, eager and compiled, after one eager training step (which computes fxqp's
masks), each compared with float run the same way (the "x float eager" column of these
rows is to float eager inference). fxqp's evaluation mode still
fake-quantizes every forward; :func:`fxqp.lower` gives the deployed model.

With ``--accelerators``, also fxqp eager without each eager speed-up that stands beside the
ops (:mod:`fxqp.ops.accelerate`: each accelerator and toggle switched off alone by
``fxqp.ops.accelerate.disabled(name)``) and without all of them; a second table gives, per
speed-up, the share of the eager step it saves, ``1 − fxqp eager / without it``, as the median
(and quartiles) of the per-round ratios. An accelerator stays in fxqp only if it saves at
least 5%.

With ``--no-layout-optimization``, also float and fxqp compiled with Inductor's
``layout_optimization`` off (``torch.compile(..., options=...)``; by default Inductor gives
the convolutions channels-last weights, which on the CPU costs a layout copy of every weight
and weight gradient each step). Each of these is compared with the float variant compiled the
same way.

Goals: fxqp eager <= 1.25x float eager; fxqp compiled <= 1.25x float compiled.

    python benchmarks/train_step.py [--steps 20] [--warmup 5] [--only a,b] [--breakdown]
        [--inference] [--accelerators] [--no-layout-optimization] [--out ...json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torchvision
from tabulate import tabulate
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.atomic import write_json

BATCH, SIZE, CLASSES = 32, 32, 10

WEIGHT_RULE = Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5), Quantize(bits=8)])
ACTIVATION_RULE = Rule(modules=["ReLU"], activation=[Prune(sparsity=0.5), Quantize(bits=8)])
FXQP_SPEC = Spec(rules=[WEIGHT_RULE, ACTIVATION_RULE])

BREAKDOWN_SPECS = {
    "fxqp eager: weights": Spec(rules=[WEIGHT_RULE]),
    "fxqp eager: weight quantize": Spec(rules=[Rule(modules=["Conv2d", "Linear"], weight=[Quantize(bits=8)])]),
    "fxqp eager: weight prune": Spec(rules=[Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5)])]),
    "fxqp eager: activations": Spec(rules=[ACTIVATION_RULE]),
}
"""``--breakdown``: fxqp eager with part of :data:`FXQP_SPEC`, to see which part of the spec
the added milliseconds come from."""

NO_LAYOUT = " (no layout optimization)"
NO_LAYOUT_VARIANTS = ["float compiled" + NO_LAYOUT, "fxqp compiled" + NO_LAYOUT]
"""``--no-layout-optimization``: the compiled variants with Inductor's ``layout_optimization``
off."""


INFERENCE = " inference"
INFERENCE_VARIANTS = [f"{tool} {mode}{INFERENCE}" for tool in ("float", "fxqp") for mode in ("eager", "compiled")]
"""``--inference``: evaluation-mode forwards without gradients."""


def baseline_of(name: str) -> str:
    """The float variant that ``name`` is compared with: float run the same way (eager, compiled,
    or compiled without layout optimization; training steps or inference)."""
    if name.endswith(INFERENCE):
        return "float compiled" + INFERENCE if "compiled" in name else "float eager" + INFERENCE
    if name.endswith(NO_LAYOUT):
        return "float compiled" + NO_LAYOUT
    if name.endswith("compiled"):
        return "float compiled"
    return "float eager"


WITHOUT = "fxqp eager without "
NO_ACCELERATORS = WITHOUT + "any accelerator"


def accelerator_variants() -> list[str]:
    """``--accelerators``: fxqp eager without each speed-up, and without all of them."""
    from fxqp.ops import accelerate

    return [WITHOUT + name for name in (*accelerate.accelerators(), *accelerate.TOGGLES)] + [NO_ACCELERATORS]


def accelerator_context(name: str) -> Callable[[], Any]:
    """The context a ``--accelerators`` variant's steps run in."""
    from fxqp.ops import accelerate

    if name == NO_ACCELERATORS:
        return accelerate.disabled
    return lambda: accelerate.disabled(name.removeprefix(WITHOUT))


TORCH_OPS_SUFFIX = " (torch ops)"
TORCH_OPS = "fxqp eager" + TORCH_OPS_SUFFIX
"""fxqp eager with the native kernels off (:func:`fxqp.native.disabled`): the same values
from torch ops, to show what the fused kernels gain."""


def make_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: Callable[[], Any] = contextlib.nullcontext
) -> Callable[[], None]:
    """One SGD training step of ``model`` on the fixed batch, run inside ``context()``."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()

    def step() -> None:
        with context():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    return step


def inference_model(name: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """The model of ``name`` (an :data:`INFERENCE_VARIANTS` entry) after one eager training
    step on the batch (fxqp's masks are computed there), in evaluation mode; compiled
    variants are compiled after that step."""
    tool, mode = name.removesuffix(INFERENCE).split(" ")
    model = build(f"{tool} eager", base, x)
    make_step(model, x, y)()
    model.eval()
    return torch.compile(model) if mode == "compiled" else model


def make_forward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward of ``model`` on the batch without gradients."""

    def forward() -> None:
        with torch.no_grad():
            model(x)

    return forward


def build(name: str, base: nn.Module, x: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(base)
    if name.startswith(WITHOUT):
        name = "fxqp eager"
    tool, _, mode = name.removesuffix(NO_LAYOUT).removesuffix(TORCH_OPS_SUFFIX).partition(" ")
    if tool in ("float", "fxqp") and mode in ("eager", "compiled"):
        if tool == "fxqp":
            model = fxqp.transform(model, FXQP_SPEC, example_inputs=(x,))
        if mode == "eager":
            return model
        # a compile option, not a global config: Dynamo keeps these graphs apart from the
        # default-compiled ones of the same model class
        return torch.compile(model, options={"layout_optimization": False} if name.endswith(NO_LAYOUT) else None)
    if name in BREAKDOWN_SPECS:
        return fxqp.transform(model, BREAKDOWN_SPECS[name], example_inputs=(x,))
    if name == "torch.ao prepare_qat_fx":
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (x,))
    if name == "qsparse":
        from qsparse import convert, prune, quantize

        model = convert(model, prune(sparsity=0.5, start=0, interval=1, repetition=1), weight_layers=[nn.Conv2d, nn.Linear], log=False)
        model = convert(model, quantize(bits=8, timeout=1), weight_layers=[nn.Conv2d, nn.Linear], log=False)
        model = convert(model, prune(sparsity=0.5, start=0, interval=1, repetition=1), activation_layers=[nn.ReLU], log=False)
        return convert(model, quantize(bits=8, timeout=1, channelwise=-1), activation_layers=[nn.ReLU], log=False)
    raise ValueError(name)


def paired_ratio(times: list[float], baseline: list[float]) -> list[float]:
    """Quartiles (25%, median, 75%) of the per-round ratios ``times[i] / baseline[i]``.

    The variants run in the same round one right after the other, so a slow spell of the
    machine slows both sides of a round's ratio; the ratio of the two medians mixes rounds
    and moves more from run to run.
    """
    ratios = [t / b for t, b in zip(times, baseline, strict=True)]
    if len(ratios) < 2:
        return [ratios[0]] * 3
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q1, median, q3]


def available() -> list[str]:
    names = ["float eager", "float compiled", "fxqp eager", TORCH_OPS, "fxqp compiled", "torch.ao prepare_qat_fx"]
    try:
        import qsparse  # noqa: F401

        names.append("qsparse")
    except ImportError:
        pass
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (compilation happens here)")
    parser.add_argument("--only", default="", help="comma-separated subset of variants")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time fxqp eager with only the weight ops, only weight quantization, only weight pruning, and only the activation ops",
    )
    parser.add_argument(
        "--inference",
        action="store_true",
        help="also time evaluation-mode forwards without gradients of float and fxqp, eager and compiled",
    )
    parser.add_argument(
        "--accelerators", action="store_true", help="also time fxqp eager without each eager accelerator, and without all of them"
    )
    parser.add_argument(
        "--no-layout-optimization", action="store_true", help="also time float and fxqp compiled with Inductor's layout_optimization off"
    )
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=CLASSES)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    y = torch.randint(0, CLASSES, (BATCH,))
    candidates = available() + (list(BREAKDOWN_SPECS) if args.breakdown else [])
    candidates += INFERENCE_VARIANTS if args.inference else []
    candidates += NO_LAYOUT_VARIANTS if args.no_layout_optimization else []
    candidates += accelerator_variants() if args.accelerators else []
    names = [n for n in candidates if not args.only or n in args.only.split(",")]
    steps = {}
    for name in names:
        start = time.perf_counter()
        if name in INFERENCE_VARIANTS:
            steps[name] = make_forward(inference_model(name, base, x, y), x)
        else:
            context = fxqp.native.disabled if name == TORCH_OPS else contextlib.nullcontext
            if name.startswith(WITHOUT):
                context = accelerator_context(name)
            steps[name] = make_step(build(name, base, x), x, y, context)
        for _ in range(args.warmup):
            steps[name]()
        print(f"{name}: ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.steps):
        for name in names:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    medians = {n: 1000 * statistics.median(t) for n, t in times.items()}
    rows, results = [], []
    for name in names:
        reference = medians.get("float eager" + (INFERENCE if name.endswith(INFERENCE) else ""))
        ratio = medians[name] / reference if reference else None
        same_mode = baseline_of(name)
        compiled_ratio = medians[name] / medians[same_mode] if "compiled" in same_mode and same_mode in medians else None
        compared = same_mode in times and not name.startswith("float")
        added = medians[name] - medians[same_mode] if compared else None
        paired = paired_ratio(times[name], times[same_mode]) if compared else None
        rows.append(
            [
                name,
                f"{medians[name]:.1f}",
                "" if ratio is None else f"{ratio:.2f}",
                "" if compiled_ratio is None else f"{compiled_ratio:.2f}",
                "" if added is None else f"{added:+.1f}",
                "" if paired is None else f"{paired[1]:.2f} [{paired[0]:.2f}, {paired[2]:.2f}]",
            ]
        )
        results.append(
            {
                "variant": name,
                "median_ms": medians[name],
                "x_float_eager": ratio,
                "x_float_compiled": compiled_ratio,
                "ms_over_float_same_mode": added,
                "paired_ratio_same_mode_quartiles": paired,
                "times_ms": [1000 * t for t in times[name]],
            }
        )
    # The added milliseconds matter beside the ratios: the ratio of a memory-bound overhead
    # to a compute-bound baseline depends on the machine (on a CPU with slow convolutions
    # the same overhead gives a smaller ratio).
    print(
        tabulate(
            rows,
            headers=[
                "variant",
                "median ms",
                "x float eager",
                "x float compiled",
                "ms over float (same mode)",
                "paired x float (same mode) [IQR]",
            ],
            tablefmt="github",
        )
    )
    savings = []
    for name in names:
        if name.startswith(WITHOUT) and "fxqp eager" in times:
            q1, median, q3 = paired_ratio(times["fxqp eager"], times[name])
            savings.append([name.removeprefix(WITHOUT), f"{1 - median:.1%}", f"[{1 - q3:.1%}, {1 - q1:.1%}]"])
            results.append({"variant": f"saved by {name.removeprefix(WITHOUT)}", "share_of_step_paired": [1 - q3, 1 - median, 1 - q1]})
    if savings:
        print()
        print(tabulate(savings, headers=["speed-up", "share of the eager step it saves", "IQR"], tablefmt="github"))
    write_json(
        args.out,
        {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "batch": BATCH,
            "size": SIZE,
            "steps": args.steps,
            "results": results,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
