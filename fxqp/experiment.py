"""Training loops and the seed paper's non-commutativity experiment at small scale.

The experiment trains the same network with the same seed and step budget under six
schedules (:data:`ORDERS`), with ``bits``-bit weights and activations and ``sparsity``
pruning, and reports the quality metric and the size of the saved, lowered artifact:

================  ==========================================================================
``baseline``      float, no compression
``Q``             quantize weights at 40% of the steps, activations at 44%
``P(w)->Q``       prune weights from 40% (AGP, 4 refreshes over 24%); then quantize weights at
                  92% and activations at 94%; weight ops compose as ``Q(P(w))``
``Q->P(w)``       quantize weights at 40%, activations at 44%; prune weights from 52% (over
                  24%); weight ops compose as ``P(Q(w))``
``P(w,a)->Q``     as ``P(w)->Q``, and the ReLU outputs are pruned with the weights
``Q->P(w,a)``     as ``Q->P(w)``, and the ReLU outputs are pruned with the weights
================  ==========================================================================

These fractions are the seed paper's MobileNetV2 schedules (250 epochs: prune-first prunes
from epoch 100 in 4 steps every 15 epochs, quantizes weights at 230 and activations at 235;
quantize-first quantizes at 100 and 110 and prunes from 130) scaled to the run's length.
Activation masks are static (moving average of ``|x|``) for fixed-size classification
inputs, and per-sample top-k (``dynamic``) for super-resolution, whose test images differ in
size from the training patches.

Every order trains with the same seeds, and the two orders of a pair are compared seed by
seed (:func:`compare`, :func:`winners`): an order wins only when it is better in every seed
and by at least twice the standard error of the mean difference (:class:`PairedComparison`).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fxqp._extras import require
from fxqp.data import TaskData, psnr
from fxqp.errors import FxqpError, SpecError
from fxqp.spec import Prune, Quantize, Rule, Spec

__all__ = [
    "ORDERS",
    "PAPER_RESULTS",
    "TrainConfig",
    "EpochRecord",
    "RunResult",
    "PAIRS",
    "PairedComparison",
    "ExperimentError",
    "order_spec",
    "evaluate",
    "measure",
    "fit",
    "train",
    "example_inputs",
    "run_experiment",
    "results_table",
    "compare",
    "winners",
    "relu_selectors",
    "file_safe",
    "paper_table",
]

#: The six schedules of the experiment, in table order.
ORDERS = ("baseline", "Q", "P(w)->Q", "Q->P(w)", "P(w,a)->Q", "Q->P(w,a)")

#: The seed paper's numbers for the same orders (its code, 8-bit, 50% pruning).
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "MobileNetV2, CIFAR-10 (acc %)": {
        "baseline": 92.6,
        "Q": 92.52,
        "P(w)->Q": 92.23,
        "Q->P(w)": 85.94,
        "P(w,a)->Q": 91.44,
        "Q->P(w,a)": 86.84,
    },
    "ESPCN, Set5 x3 (PSNR dB)": {"baseline": 32.84, "Q": 32.68, "P(w)->Q": 32.51, "Q->P(w)": 32.54, "P(w,a)->Q": 31.03, "Q->P(w,a)": 31.66},
}

# Fractions of the run (seed paper's MobileNetV2 schedule over 250 epochs: 100/250 = 40%, ...).
_PRUNE_FIRST = {"prune": 40, "weight_q": 92, "act_q": 94}
_QUANT_FIRST = {"weight_q": 40, "act_q": 44, "prune": 52}
_RAMP = 24  # 60 of 250 epochs: 4 refreshes every 15 epochs
_REFRESHES = 4


_WEIGHT_MODULES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")


def relu_selectors(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The selectors :func:`order_spec` needs for ``model``: the weight module types it has
    (``modules``), and whether its ReLUs are modules (``activations=("ReLU",)``) and/or
    functions (``functions=("relu",)``); a selector field that matched nothing would be an
    error in :func:`fxqp.transform`."""
    from fxqp.sites import discover_sites
    from fxqp.transform import trace_model

    weight_sites, activation_sites = discover_sites(trace_model(model, generate_code=False).graph_module)
    present = {c for site in weight_sites for c in site.module_classes}
    return {
        "modules": tuple(m for m in _WEIGHT_MODULES if m in present),
        "activations": ("ReLU",) if any("ReLU" in s.module_classes for s in activation_sites) else (),
        "functions": ("relu",) if any(s.function == "relu" for s in activation_sites) else (),
    }


def order_spec(
    order: str,
    *,
    bits: int = 8,
    sparsity: float = 0.5,
    dynamic_activations: bool = False,
    modules: Sequence[str] = ("Conv2d", "Linear"),
    activations: Sequence[str] = ("ReLU",),
    functions: Sequence[str] = (),
) -> Spec:
    """The spec of one of :data:`ORDERS`, timed in fractions of the run (``"40%"``): pass the
    run's ``total_steps`` to :func:`fxqp.transform`.

    Weights of ``modules`` and outputs of ``activations`` (module types) and ``functions``
    are compressed; see the module doc for the timing of each order.
    """
    if order not in ORDERS:
        raise SpecError(f"order {order!r}: expected one of {', '.join(ORDERS)}")
    if order == "baseline":
        return Spec()

    def at(percent: int) -> str:
        return f"{percent}%"

    prune_first = order.startswith("P")
    times = _PRUNE_FIRST if prune_first else _QUANT_FIRST
    w_quant = Quantize(bits=bits, start=at(times["weight_q"]))
    a_quant = Quantize(bits=bits, start=at(times["act_q"]))
    weight: list[Any] = [w_quant]
    activation: list[Any] = [a_quant]
    if order != "Q":
        ramp = {"start": at(times["prune"]), "end": at(times["prune"] + _RAMP), "every": at(_RAMP // _REFRESHES)}
        prune = Prune(sparsity=sparsity, **ramp)
        weight = [prune, w_quant] if prune_first else [w_quant, prune]
        if "(w,a)" in order:
            a_prune = Prune(sparsity=sparsity, dynamic=dynamic_activations, **ramp)
            activation = [a_prune, a_quant] if prune_first else [a_quant, a_prune]
    rules = [Rule(modules=list(modules), weight=weight)]
    if activations or functions:
        rules.append(Rule(modules=list(activations), functions=list(functions), activation=activation))
    return Spec(rules=rules)


@dataclass(frozen=True)
class TrainConfig:
    """How to train one run.

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per step.
        lr: Adam learning rate, cosine-annealed to 0 over the run.
        seed: seeds the model initialisation and the batch order.
        progress: show a progress bar while training, on standard error, when it is a
            terminal (a redirected log gets no bar).
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    progress: bool = True

    def steps(self, n_train: int) -> int:
        """Training steps of a run over ``n_train`` samples (the last partial batch is dropped)."""
        return self.epochs * max(1, n_train // self.batch_size)


@dataclass(frozen=True)
class EpochRecord:
    """One point of a training curve: after ``epoch`` epochs (``step`` steps)."""

    epoch: int
    step: int
    train_loss: float
    metric: float


@dataclass
class RunResult:
    """The outcome of :func:`train`.

    Attributes:
        order: the schedule name (or ``"spec"`` for a user spec).
        seed: the run's seed.
        metric: quality of the *lowered* model on the test set (accuracy % or PSNR dB).
        eval_metric: quality of the transformed model in eval mode (equal up to float
            rounding: the lowered model computes the same outputs).
        packed_bytes: size of the saved artifact (:func:`fxqp.save`) in bytes.
        float_bytes: float32 bytes of the model's parameters and buffers.
        history: the training curve.
        model: the transformed model after training; ``lowered``: its lowered form.
    """

    order: str
    seed: int
    metric: float
    eval_metric: float
    packed_bytes: int
    float_bytes: int
    history: list[EpochRecord] = field(default_factory=list)
    model: Any = None
    lowered: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "seed": self.seed,
            "metric": self.metric,
            "eval_metric": self.eval_metric,
            "packed_bytes": self.packed_bytes,
            "float_bytes": self.float_bytes,
            "history": [vars(h) for h in self.history],
        }


def _first_conv_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return module.in_channels
    return None


def _adapt(x: Tensor, channels: int | None) -> Tensor:
    """Repeat a one-channel batch to the model's input channels (grey data, RGB model)."""
    if channels is not None and x.shape[1] == 1 and channels != 1:
        return x.expand(-1, channels, *x.shape[2:])
    return x


def evaluate(model: nn.Module, data: TaskData, batch_size: int = 256) -> float:
    """Test-set quality of ``model`` (put in eval mode): accuracy % or PSNR dB (see :func:`measure`)."""
    return measure(model, data, batch_size)["metric"]


@torch.no_grad()
def measure(model: nn.Module, data: TaskData, batch_size: int = 256) -> dict[str, float]:
    """Test-set quality and loss of ``model`` (put in eval mode): ``{"metric": accuracy % or
    PSNR dB, "loss": mean cross-entropy or MSE}``.

    PSNR is computed per held-out image (ignoring ``scale`` border pixels) and averaged, the
    MSE over whole images likewise. An eager model's parametrized (pruned, quantized)
    weights are computed once for the whole test set (``torch.nn.utils.parametrize.cached``):
    in evaluation mode they do not change from batch to batch. A compiled model computes
    them in its graph.
    """
    model.eval()
    channels = _first_conv_channels(model)
    compiled = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    with contextlib.nullcontext() if compiled else parametrize.cached():
        if data.kind == "classification":
            correct, loss = 0, 0.0
            for i in range(0, len(data.test_y), batch_size):
                logits = model(_adapt(data.test_x[i : i + batch_size], channels))
                target = data.test_y[i : i + batch_size]
                correct += int((logits.argmax(1) == target).sum())
                loss += float(F.cross_entropy(logits, target, reduction="sum"))
            return {"metric": 100.0 * correct / len(data.test_y), "loss": loss / len(data.test_y)}
        outputs = [(model(lr), hr) for lr, hr in zip(data.test_x, data.test_y)]
        return {
            "metric": statistics.fmean(psnr(out, hr, border=data.scale) for out, hr in outputs),
            "loss": statistics.fmean(float(F.mse_loss(out, hr)) for out, hr in outputs),
        }


def _loss(data: TaskData) -> Callable[[Tensor, Tensor], Tensor]:
    return F.cross_entropy if data.kind == "classification" else F.mse_loss


def float32_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and floating-point buffers at 4 bytes per element."""
    return 4 * (sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers() if b.is_floating_point()))


def fit(
    model: nn.Module,
    data: TaskData,
    steps: int,
    config: TrainConfig = TrainConfig(),
    *,
    desc: str | None = None,
    curve: bool = False,
) -> list[EpochRecord]:
    """Train a transformed ``model`` in place for exactly ``steps`` steps on ``data``.

    Adam (learning rate ``config.lr``, cosine-annealed to 0 over the ``steps``),
    cross-entropy for classification and MSE for super-resolution; batches of
    ``config.batch_size`` in a random order seeded by ``config.seed``, a new order every
    epoch of ``n // batch_size`` steps (the last epoch may be cut short). With ``curve``, the
    test metric after every epoch (the returned records; otherwise only the training loss).
    """
    tqdm = require("tqdm", "fxqp.experiment's progress bars").tqdm

    n = len(data.train_y)
    per_epoch = max(1, n // config.batch_size)
    channels = _first_conv_channels(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    loss_fn = _loss(data)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[EpochRecord] = []
    # disable=None: tqdm shows the bar only when its stream (standard error) is a terminal
    bar = tqdm(total=steps, desc=desc or "training", unit="step", disable=None if config.progress else True, leave=False)
    step, epoch = 0, 0
    while step < steps:
        epoch += 1
        model.train()
        order_idx = torch.randperm(n, generator=generator)
        batches = min(per_epoch, steps - step)
        losses = torch.zeros(batches)
        for b in range(batches):
            idx = order_idx[b * config.batch_size : (b + 1) * config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(_adapt(data.train_x[idx], channels)), data.train_y[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses[b] = loss.detach()
            step += 1
            bar.update()
        metric = evaluate(model, data) if curve else float("nan")
        history.append(EpochRecord(epoch, step, float(losses.mean()), metric))
        bar.set_postfix(loss=f"{history[-1].train_loss:.4f}", **({"metric": f"{metric:.2f}"} if curve else {}))
    bar.close()
    return history


def train(
    model: nn.Module,
    data: TaskData,
    spec: Spec,
    config: TrainConfig = TrainConfig(),
    *,
    order: str = "spec",
    desc: str | None = None,
) -> RunResult:
    """Transform ``model`` with ``spec`` (with two training samples as example inputs, so
    that filter pruning is coupled across channel groups and removed when lowering, and the
    run's step count as ``total_steps``, against which fractions of the run resolve), train
    it (:func:`fit`, one test evaluation per epoch for the curve), lower it and measure it.
    The lowered model is serialized in memory to measure the artifact size.
    """
    import fxqp  # the public API; imported here to keep module import order simple
    from fxqp.lower.artifact import serialize

    torch.manual_seed(config.seed)
    float_bytes = float32_bytes(model)
    total = config.steps(len(data.train_y))
    gm = fxqp.transform(model, spec, example_inputs=example_inputs(model, data), total_steps=total)
    history = fit(gm, data, total, config, desc=desc or order, curve=True)
    gm.eval()
    eval_metric = evaluate(gm, data)
    lowered = fxqp.lower(gm)
    metric = evaluate(lowered, data)
    packed = len(serialize(lowered))
    return RunResult(order, config.seed, metric, eval_metric, packed, float_bytes, history, gm, lowered)


def example_inputs(model: nn.Module, data: TaskData) -> tuple[Tensor]:
    """Two training samples, in the model's input channels: the example inputs that give
    static activation masks their shape and filter pruning its channel groups."""
    return (_adapt(data.train_x[:2], _first_conv_channels(model)),)


def run_experiment(
    data: TaskData,
    make_model: Callable[[], nn.Module],
    *,
    orders: Sequence[str] = ORDERS,
    seeds: Sequence[int] = (0,),
    config: TrainConfig = TrainConfig(),
    bits: int = 8,
    sparsity: float = 0.5,
    out_dir: str | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Train ``make_model()`` under every order and seed (same budget and data order).

    With ``out_dir``, each run's lowered artifact is saved as ``<task>_<order>_seed<k>.fxqp``;
    ``on_result`` is called with each run's result as soon as it is measured.
    """
    import fxqp

    results = []
    for seed in seeds:
        for order in orders:
            torch.manual_seed(seed)
            model = make_model()
            selectors = relu_selectors(model)
            spec = order_spec(order, bits=bits, sparsity=sparsity, dynamic_activations=data.kind == "super_resolution", **selectors)
            run_config = TrainConfig(config.epochs, config.batch_size, config.lr, seed, config.progress)
            result = train(model, data, spec, run_config, order=order, desc=f"{data.name} {order} seed {seed}")
            if out_dir is not None:
                os.makedirs(out_dir, exist_ok=True)
                fxqp.save(result.lowered, os.path.join(out_dir, f"{data.name}_{file_safe(order)}_seed{seed}.fxqp"))
            if on_result is not None:
                on_result(result)
            results.append(result)
    return results


def file_safe(order: str) -> str:
    """``P(w,a)->Q`` → ``Pwa-then-Q``: an order name usable in file names."""
    return order.replace("->", "-then-").replace("(", "").replace(")", "").replace(",", "")


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


class ExperimentError(FxqpError, ValueError):
    """Results that cannot be compared as asked (e.g. two runs of one order with one seed)."""


#: The paired comparisons :func:`winners` reports: (first order, second order, what they prune).
PAIRS = (("P(w)->Q", "Q->P(w)", "weights"), ("P(w,a)->Q", "Q->P(w,a)", "weights and activations"))


@dataclass(frozen=True)
class PairedComparison:
    """Two orders compared seed by seed: ``differences`` holds ``first − second`` (metric,
    higher is better) for every seed both ran, in seed order.

    The runs of one seed share the initial weights and the batch order, so the difference
    leaves out the part of the seed-to-seed variation the two runs share; what varies in it
    from seed to seed is the noise the comparison has to beat. An order wins
    (:attr:`winner`) only when

    * at least two seeds ran both orders,
    * it is better in *every* seed (the differences are non-zero and of one sign), and
    * the mean difference is at least twice its standard error (``stdev / √n``).

    With three seeds, noise alone gives one sign in every seed a quarter of the time (either
    direction); the second condition rejects a consistent sign carried by a single large
    difference. It is a screen against seed noise, not a significance test.
    """

    first: str
    second: str
    differences: tuple[float, ...]

    @property
    def mean(self) -> float:
        """Mean of the paired differences (NaN without seeds)."""
        return statistics.fmean(self.differences) if self.differences else math.nan

    @property
    def standard_error(self) -> float:
        """Standard error of :attr:`mean` (NaN with fewer than two seeds)."""
        n = len(self.differences)
        return statistics.stdev(self.differences) / math.sqrt(n) if n > 1 else math.nan

    @property
    def winner(self) -> str | None:
        """The order that wins by the rule in the class doc, or None."""
        d = self.differences
        if len(d) < 2 or not (all(x > 0 for x in d) or all(x < 0 for x in d)):
            return None
        if abs(self.mean) < 2 * self.standard_error:
            return None
        return self.first if self.mean > 0 else self.second

    def __str__(self) -> str:
        """``"<winner or 'no winner beyond seed noise'> (<first> − <second> per seed: ...; mean ...)"``."""
        d = self.differences
        if not d:
            return f"no seed ran both {self.first} and {self.second}"
        per_seed = ", ".join(f"{x:+.2f}" for x in d)
        spread = f"mean {self.mean:+.2f} ± {self.standard_error:.2f} s.e." if len(d) > 1 else "one seed"
        return f"{self.winner or 'no winner beyond seed noise'} ({self.first} − {self.second} per seed: {per_seed}; {spread})"


def compare(results: Sequence[RunResult], first: str, second: str) -> PairedComparison:
    """``first`` against ``second``, paired by seed (seeds that ran only one are left out)."""
    by_seed: dict[str, dict[int, float]] = {first: {}, second: {}}
    for r in results:
        if r.order in by_seed:
            if r.seed in by_seed[r.order]:
                raise ExperimentError(f"compare: two runs of {r.order} with seed {r.seed}; expected one per order and seed")
            by_seed[r.order][r.seed] = r.metric
    seeds = sorted(by_seed[first].keys() & by_seed[second].keys())
    return PairedComparison(first, second, tuple(by_seed[first][s] - by_seed[second][s] for s in seeds))


def winners(results: Sequence[RunResult]) -> dict[str, str]:
    """Which order of each pair of :data:`PAIRS` won, paired by seed (:class:`PairedComparison`):
    ``{"weights": ..., "weights and activations": ...}``, each the winning order or ``"no
    winner beyond seed noise"``, followed by the paired difference. Pairs with an order
    missing from ``results`` are left out."""
    present = {r.order for r in results}
    return {key: str(compare(results, a, b)) for a, b, key in PAIRS if a in present and b in present}


def results_table(data: TaskData, results: Sequence[RunResult], tablefmt: str = "github") -> str:
    """A table per order: the metric (mean ± standard deviation over seeds, and each seed's),
    artifact bytes (mean over seeds) and its ratio to float32."""
    rows = []
    seeds = sorted({r.seed for r in results})
    for order in ORDERS:
        runs = sorted((r for r in results if r.order == order), key=lambda r: r.seed)
        if not runs:
            continue
        packed = statistics.fmean(r.packed_bytes for r in runs)
        per_seed = " / ".join(f"{r.metric:.2f}" for r in runs)
        rows.append([order, _mean_std([r.metric for r in runs]), per_seed, f"{packed:,.0f}", f"{runs[0].float_bytes / packed:.2f}"])
    headers = [
        "order",
        f"{data.metric} (lowered)" + (", mean ± std" if len(seeds) > 1 else ""),
        "seed " + ", ".join(map(str, seeds)),
        "artifact bytes",
        "x smaller than float32",
    ]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def paper_table(tablefmt: str = "github") -> str:
    """:data:`PAPER_RESULTS` as a table."""
    rows = [[task] + [values[o] for o in ORDERS] for task, values in PAPER_RESULTS.items()]
    return tabulate(rows, headers=["seed paper"] + list(ORDERS), tablefmt=tablefmt)
