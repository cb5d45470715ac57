"""Automatic search on the embedded data: what fxqp.search finds, how fast, on how many workers.

Parts (``--parts``, all by default); every number is measured here, over ``--seeds`` seeds:

* ``ratios`` — :class:`fxqp.models.DigitsVGG` (six 3×3 convolutions) on scikit-learn's
  digits, the weights of every convolution but the first binary (XNOR-Net scales, α = 5) or
  2-bit DoReFa (α = 7); the first convolution and the classifier stay float, as in the seed
  paper. Per seed the quantized network is trained (``--pretrain-epochs``), then the
  per-layer ratios are searched in ``[0, --max-ratio]`` by ``joint`` (GP, ``--joint-trials``
  trials, each evaluated as pruned), by ``joint`` with every trial fine-tuned
  ``--joint-trial-epochs`` first, and by ``layerwise`` (the paper's: 13 evaluations per
  layer, 5 epochs of fine-tuning after a layer pruned ≥ 5%), choosing on a validation split
  of the training set; the best of each is fine-tuned (``--final-epochs``), and its ratios
  are also applied to the trained network and fine-tuned exactly like the uniform ratios
  ("same fine-tuning"), which compares the ratios alone. Every *uniform* ratio 0, 0.05, ..., max is applied to
  the same trained network and fine-tuned the same way; the best uniform ratio at the same or
  smaller artifact size (best on validation) is the comparison. Reported: test accuracy
  (the digits test set, never seen by the search) mean ± std, artifact bytes, and the
  evaluations ``joint`` needed to reach ``layerwise``'s best objective.
* ``samplers`` — the joint study with GP, TPE and random sampling at the same budget (the
  same three probes first): the best objective after 10, 20 and 40 trials, mean ± std.
* ``schedules`` — :class:`fxqp.models.ESPCN` ×3 super-resolution; the schedule search over
  :data:`SR_SPACE` (orders, start fractions, ramp lengths, bits and sparsity of weights and
  ReLU outputs) for ``--schedule-trials`` trials of ``--schedule-epochs`` epochs, and the six
  hand-written orders of ``fxqp demo`` trained the same way: how many of the six the Pareto
  front dominates, on the validation PSNR the search optimizes and on the test PSNR.
* ``workers`` — trials per hour of ``fxqp search schedules`` (DigitsVGG on digits) with 1
  and 2 worker processes of one torch thread each, in interleaved pairs: complete trials over
  the time from the first trial's start to the last one's end.

Goals: searched ratios at least as accurate as the best uniform ratio at the same or smaller
size (mean over seeds); ``joint`` reaches ``layerwise``'s best objective in at most a quarter
of its evaluations; 2 workers ≥ 1.7× the trials per hour of 1; the Pareto front dominates at
least 4 of the 6 hand-written orders.

    python benchmarks/search.py [--parts ratios,samplers,schedules,workers] [--seeds 3]
        [--device cpu|cuda] [--out benchmarks/results/search.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from tabulate import tabulate

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.atomic import write_json
from fxqp.data import TaskData, digits, super_resolution, validation_split
from fxqp.experiment import ORDERS, TrainConfig, fit, measure, order_spec, relu_selectors
from fxqp.lower.artifact import serialize
from fxqp.models import ESPCN, DigitsVGG
from fxqp.search import layer_ratios, read_study, schedules
from fxqp.search.ratios import compute_weight_masks, load_state

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "search.json")
PARTS = ("ratios", "samplers", "schedules", "workers")
QUANTIZERS = {"binary (XNOR-Net)": Quantize(bits=1, method="binary"), "2-bit DoReFa": Quantize(bits=2, method="dorefa")}
FIRST_CONV = "features.0"
SR_SPACE = {
    "groups": [
        {
            "name": "weights",
            "modules": ["Conv2d"],
            "weight": {
                "order": ["prune_first", "quantize_first"],
                "quantize": {"bits": [4, 8], "start": ["30%", "95%"]},
                "prune": {"sparsity": [0.0, 0.7], "start": ["20%", "80%"], "length": ["5%", "40%"]},
            },
        },
        {
            "name": "relus",
            "modules": ["ReLU"],
            "activation": {
                "order": ["prune_first", "quantize_first"],
                "quantize": {"bits": [4, 8], "start": ["30%", "95%"]},
                "prune": {"sparsity": [0.0, 0.6], "start": ["20%", "80%"], "length": ["5%", "40%"], "dynamic": True},
            },
        },
    ]
}
"""The schedule search's space on super-resolution: pruning from none to 70% of the weights
and 60% of the ReLU outputs (masks per sample: the test images differ in size from the
training patches), 4 to 8 bits, either order, any start."""


# --------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def best_after(values: Sequence[float], budgets: Sequence[int]) -> list[float]:
    """The smallest of the first ``b`` values, for each budget ``b`` (trials in order)."""
    return [min(values[:b]) for b in budgets]


def evaluations_to_reach(values: Sequence[float], target: float) -> int | None:
    """How many values (in order) until one is at most ``target``; ``None`` if none is."""
    for i, value in enumerate(values, 1):
        if value <= target:
            return i
    return None


def best_uniform_at_size(uniform: Sequence[dict[str, Any]], size: int) -> dict[str, Any] | None:
    """Among the uniform runs whose artifact is at most ``size`` bytes, the one with the best
    validation accuracy (the earliest ratio among equals); ``None`` if none is that small."""
    fitting = [u for u in uniform if u["bytes"] <= size]
    return max(fitting, key=lambda u: (u["validation"], -u["ratio"])) if fitting else None


def trial_values(storage: str, study: str) -> list[float]:
    """The objective of each complete trial of a single-objective study, by trial number."""
    return [t.values[0] for t in sorted(read_study(storage, study).complete(), key=lambda t: t.number)]


# --------------------------------------------------------------------------- tasks


def on(data: TaskData, device: torch.device) -> TaskData:
    """The task's tensors on ``device``."""

    def move(x: Any) -> Any:
        return [t.to(device) for t in x] if isinstance(x, list) else x.to(device)

    return replace(data, train_x=move(data.train_x), train_y=move(data.train_y), test_x=move(data.test_x), test_y=move(data.test_y))


class Task:
    """A data set with its validation split, a model factory and the train/evaluate
    functions the searches call (training on the split's training part)."""

    def __init__(
        self, data: TaskData, make: Callable[[], torch.nn.Module], seed: int, device: torch.device, batch_size: int = 64, lr: float = 3e-3
    ):
        self.data = on(data, device)
        self.validation = on(validation_split(data, 0.2, seed), device)
        self.make, self.device, self.seed = make, device, seed
        self.config = TrainConfig(batch_size=batch_size, lr=lr, seed=seed, progress=False)
        self.per_epoch = max(1, len(self.validation.train_y) // batch_size)
        self.example_inputs = (self.validation.train_x[:2],)

    def make_model(self) -> torch.nn.Module:
        return self.make().to(self.device)

    def train(self, model: torch.nn.Module, steps: int) -> None:
        fit(model, self.validation, steps, self.config)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return measure(model, self.validation)

    def evaluate_with_test(self, model: torch.nn.Module) -> dict[str, float]:
        test = measure(model, self.data)
        return {**measure(model, self.validation), "test_metric": test["metric"]}


# --------------------------------------------------------------------------- ratios and samplers


def ratios_part(args: argparse.Namespace, workdir: str, parts: Sequence[str]) -> dict[str, Any]:
    """Per quantizer and seed: joint and layerwise searches, uniform ratios, and the
    sampler comparison (see the module doc)."""
    import safetensors.torch

    storage = f"sqlite:///{os.path.join(workdir, 'ratios.db')}"
    out: dict[str, Any] = {}
    for qname, quantizer in QUANTIZERS.items():
        base = Spec(rules=[Rule(modules=["Conv2d"], exclude=[FIRST_CONV], weight=[quantizer])])
        runs = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            task = Task(digits(), lambda: DigitsVGG(width=args.width), seed, args.device)
            checkpoint = os.path.join(workdir, f"base-{qname.split()[0]}-{seed}.safetensors")
            common = dict(
                example_inputs=task.example_inputs,
                max_ratio=args.max_ratio,
                pretrain_steps=args.pretrain_epochs * task.per_epoch,
                final_steps=args.final_epochs * task.per_epoch,
                base_checkpoint=checkpoint,
                storage=storage,
                seed=seed,
                progress=args.progress,
            )
            tag = f"{qname.split()[0]}-s{seed}"
            run: dict[str, Any] = {"seed": seed}
            if "ratios" in parts:
                state = safetensors.torch.load_file(checkpoint, device=str(task.device)) if os.path.isfile(checkpoint) else None
                results = {}
                for strategy, (prefix, kwargs) in strategies(args, task.per_epoch).items():
                    started = time.perf_counter()
                    results[strategy] = layer_ratios(
                        task.make_model, base, task.train, task.evaluate, study_name=f"{prefix}-{tag}", **kwargs, **common
                    )
                    run[strategy] = _searched(task, results[strategy], time.perf_counter() - started)
                    run[strategy]["history"] = [v for study in results[strategy].studies for v in trial_values(storage, study)]
                state = state or safetensors.torch.load_file(checkpoint, device=str(task.device))
                run["uniform"] = _uniform(task, base, list(results["layerwise"].ratios), state, args)
                for strategy, result in results.items():  # the found ratios, fine-tuned like the uniform ones
                    run[strategy]["same_budget"] = _apply(task, base, result.ratios, state, args)
                target = results["layerwise"].objective.value
                for strategy in results:
                    if strategy != "layerwise":
                        run[strategy]["evaluations_to_layerwise_best"] = evaluations_to_reach(run[strategy]["history"], target)
            if "samplers" in parts:  # the GP study of the ratios part, when it ran, holds the GP trials already
                run["samplers"] = {}
                for sampler in ("gp", "tpe", "random"):
                    name = f"joint-{sampler}-{tag}"
                    layer_ratios(
                        task.make_model,
                        base,
                        task.train,
                        task.evaluate,
                        strategy="joint",
                        sampler=sampler,
                        n_trials=max(args.budgets),
                        study_name=name,
                        finalize=False,
                        **common,
                    )
                    run["samplers"][sampler] = best_after(trial_values(storage, name), args.budgets)
            runs.append(run)
        out[qname] = runs
    return out


def strategies(args: argparse.Namespace, per_epoch: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """The searches compared, by label: (study name prefix, arguments) of joint (GP, trials
    evaluated as pruned), joint with every trial fine-tuned ``--joint-trial-epochs`` first,
    and the paper's layerwise procedure."""
    out = {"joint (GP)": ("joint-gp", {"strategy": "joint", "n_trials": args.joint_trials})}
    if args.joint_trial_epochs:
        out[f"joint (GP), trials fine-tuned {args.joint_trial_epochs} epoch(s)"] = (
            "joint-gp-ft",
            {"strategy": "joint", "n_trials": args.joint_trials, "trial_steps": args.joint_trial_epochs * per_epoch},
        )
    out["layerwise"] = ("layerwise", {"strategy": "layerwise", "finetune_steps": 5 * per_epoch})
    return out


def _searched(task: Task, result: Any, seconds: float) -> dict[str, Any]:
    test = measure(result.lowered, task.data)
    return {
        "ratios": result.ratios,
        "objective": result.objective.to_dict(),
        "final": result.final.to_dict(),
        "validation": result.evaluation["metric"],
        "test": test["metric"],
        "bytes": len(serialize(result.lowered)),
        "evaluations": result.evaluations,
        "seconds": seconds,
    }


def _apply(task: Task, base: Spec, ratios: dict[str, float], state: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """The trained base network pruned at ``ratios`` (by layer; the base spec's one rule,
    then the search's filter pruning), fine-tuned for ``--final-epochs``, lowered, measured."""
    template = Prune(sparsity=0.0, structure="filter", criterion="angle", score_from="next")
    rules = list(base.rules) + [
        Rule(names=[layer], weight=[*base.rules[0].weight, replace(template, sparsity=ratio)])
        for layer, ratio in ratios.items()
        if ratio > 0
    ]
    gm = fxqp.transform(task.make_model(), Spec(rules=rules), example_inputs=task.example_inputs)
    load_state(gm, state)
    compute_weight_masks(gm)
    torch.manual_seed(task.seed + 2)
    task.train(gm, args.final_epochs * task.per_epoch)
    gm.eval()
    lowered = fxqp.lower(gm)
    return {
        "validation": measure(lowered, task.validation)["metric"],
        "test": measure(lowered, task.data)["metric"],
        "bytes": len(serialize(lowered)),
    }


def _uniform(
    task: Task, base: Spec, layers: Sequence[str], state: dict[str, torch.Tensor], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every uniform ratio 0, 0.05, ..., max on the searched layers of the trained network."""
    out = []
    for k in range(int(round(args.max_ratio / 0.05)) + 1):
        ratio = round(0.05 * k, 2)
        out.append({"ratio": ratio, **_apply(task, base, {layer: ratio for layer in layers}, state, args)})
    return out


def ratio_tables(results: dict[str, Any], budgets: Sequence[int]) -> list[str]:
    tables = []
    rows, reach = [], []
    for qname, runs in results.items():
        if "uniform" not in runs[0]:
            continue
        names = [k for k in runs[0] if isinstance(runs[0][k], dict) and "same_budget" in runs[0][k]]
        for strategy in names:
            searched = [r[strategy] for r in runs]
            mean_ratios = {layer: statistics.fmean(s["ratios"][layer] for s in searched) for layer in searched[0]["ratios"]}
            for how, results_of in (("as searched", lambda s: s), ("same fine-tuning as uniform", lambda s: s["same_budget"])):
                measured = [results_of(s) for s in searched]
                uniform = [best_uniform_at_size(r["uniform"], m["bytes"]) for r, m in zip(runs, measured)]
                found = [u for u in uniform if u is not None]
                rows.append(
                    [
                        qname,
                        f"{strategy}, {how}",
                        " ".join(f"{v:.2f}" for v in mean_ratios.values()),
                        f"{statistics.fmean(m['bytes'] for m in measured):,.0f}",
                        mean_std([m["test"] for m in measured]),
                        mean_std([u["ratio"] for u in found])
                        + ("" if len(found) == len(runs) else f" ({len(runs) - len(found)} seed(s): none that small)")
                        if found
                        else "none that small",
                        f"{statistics.fmean(u['bytes'] for u in found):,.0f}" if found else "—",
                        mean_std([u["test"] for u in found]) if found else "—",
                        f"{statistics.fmean(s['evaluations'] for s in searched):.0f}",
                        f"{statistics.fmean(s['seconds'] for s in searched):.0f}",
                    ]
                )
            if strategy != "layerwise":
                reach.append(
                    [
                        qname,
                        strategy,
                        ", ".join(
                            "never" if s["evaluations_to_layerwise_best"] is None else str(s["evaluations_to_layerwise_best"])
                            for s in searched
                        ),
                        f"{statistics.fmean(r['layerwise']['evaluations'] for r in runs):.0f}",
                        ", ".join(
                            f"{s['objective']['value']:.3f} / {r['layerwise']['objective']['value']:.3f}" for s, r in zip(searched, runs)
                        ),
                        ", ".join(f"{s['final']['value']:.3f} / {r['layerwise']['final']['value']:.3f}" for s, r in zip(searched, runs)),
                    ]
                )
    if rows:
        tables.append(
            tabulate(
                rows,
                headers=[
                    "weights",
                    "strategy",
                    "ratios per layer (mean)",
                    "artifact bytes",
                    "test acc %",
                    "best uniform ratio at <= size",
                    "its bytes",
                    "its test acc %",
                    "evaluations",
                    "search s",
                ],
                tablefmt="github",
            )
        )
        tables.append(
            tabulate(
                reach,
                headers=[
                    "weights",
                    "joint search",
                    "evaluations to reach layerwise's best objective (per seed)",
                    "layerwise evaluations",
                    "best objective joint / layerwise (per seed)",
                    "after the final fine-tuning",
                ],
                tablefmt="github",
            )
        )
        uniform_rows = []
        for qname, runs in results.items():
            if "uniform" not in runs[0]:
                continue
            for k, point in enumerate(runs[0]["uniform"]):
                uniform_rows.append(
                    [
                        qname,
                        f"{point['ratio']:.2f}",
                        f"{statistics.fmean(r['uniform'][k]['bytes'] for r in runs):,.0f}",
                        mean_std([r["uniform"][k]["validation"] for r in runs]),
                        mean_std([r["uniform"][k]["test"] for r in runs]),
                    ]
                )
        tables.append(
            tabulate(
                uniform_rows, headers=["weights", "uniform ratio", "artifact bytes", "validation acc %", "test acc %"], tablefmt="github"
            )
        )
    sampler_rows = []
    for qname, runs in results.items():
        if "samplers" not in runs[0]:
            continue
        for sampler in ("gp", "tpe", "random"):
            sampler_rows.append([qname, sampler] + [mean_std([r["samplers"][sampler][i] for r in runs], 3) for i in range(len(budgets))])
    if sampler_rows:
        tables.append(
            tabulate(
                sampler_rows, headers=["weights", "sampler"] + [f"best objective after {b} trials" for b in budgets], tablefmt="github"
            )
        )
    return [t for t in tables if t]


# --------------------------------------------------------------------------- schedules


def schedules_part(args: argparse.Namespace, workdir: str) -> list[dict[str, Any]]:
    storage = f"sqlite:///{os.path.join(workdir, 'schedules.db')}"
    runs = []
    for seed in range(args.seeds):
        task = Task(super_resolution(scale=3), lambda: ESPCN(scale=3), seed, args.device)
        references = {
            order: order_spec(order, bits=8, sparsity=0.5, dynamic_activations=True, **relu_selectors(ESPCN(scale=3))) for order in ORDERS
        }
        started = time.perf_counter()
        front = schedules(
            task.make_model,
            task.train,
            task.evaluate_with_test,
            space=SR_SPACE,
            total_steps=args.schedule_epochs * task.per_epoch,
            example_inputs=task.example_inputs,
            n_trials=args.schedule_trials,
            references=references,
            storage=storage,
            study_name=f"sr-s{seed}",
            seed=seed,
            progress=args.progress,
        )
        seconds = time.perf_counter() - started

        def point(p: Any) -> dict[str, Any]:
            return {
                "trial": p.number,
                "validation": p.metric,
                "test": p.evaluation["test_metric"],
                "bytes": p.artifact_bytes,
                "spec": p.spec.to_dict(),
            }

        runs.append(
            {
                "seed": seed,
                "pareto": [point(p) for p in front.pareto],
                "references": {n: point(r) for n, r in front.references.items()},
                "dominated_validation": front.dominated(),
                "dominated_test": [n for n, r in front.references.items() if any(dominates_on(p, r, "test_metric") for p in front.pareto)],
                "trials": len(front.trials),
                "seconds": seconds,
            }
        )
    return runs


def dominates_on(a: Any, b: Any, key: str) -> bool:
    """``a`` dominates ``b`` on the evaluation's ``key`` (higher is better) and bytes."""
    ma, mb = a.evaluation[key], b.evaluation[key]
    return ma >= mb and a.artifact_bytes <= b.artifact_bytes and (ma > mb or a.artifact_bytes < b.artifact_bytes)


def schedule_tables(runs: list[dict[str, Any]]) -> list[str]:
    rows = []
    for order in ORDERS:
        refs = [r["references"][order] for r in runs]
        rows.append(
            [
                order,
                mean_std([x["validation"] for x in refs]),
                mean_std([x["test"] for x in refs]),
                f"{statistics.fmean(x['bytes'] for x in refs):,.0f}",
                f"{sum(order in r['dominated_validation'] for r in runs)}/{len(runs)}",
                f"{sum(order in r['dominated_test'] for r in runs)}/{len(runs)}",
            ]
        )
    summary = [
        [
            r["seed"],
            r["trials"],
            len(r["pareto"]),
            f"{len(r['dominated_validation'])}/6",
            f"{len(r['dominated_test'])}/6",
            f"{r['seconds'] / 60:.1f}",
        ]
        for r in runs
    ]
    front_rows = []
    for r in runs:
        for p in r["pareto"]:
            front_rows.append(
                [r["seed"], p["trial"], f"{p['validation']:.2f}", f"{p['test']:.2f}", f"{p['bytes']:,}", _schedule_text(p["spec"])]
            )
    return [
        tabulate(
            rows,
            headers=[
                "hand-written order",
                "validation PSNR dB",
                "test PSNR dB",
                "artifact bytes",
                "dominated by the front (validation)",
                "(test)",
            ],
            tablefmt="github",
        ),
        tabulate(
            summary, headers=["seed", "trials", "front size", "orders dominated (validation)", "(test)", "minutes"], tablefmt="github"
        ),
        tabulate(front_rows, headers=["seed", "trial", "validation PSNR", "test PSNR", "artifact bytes", "schedule"], tablefmt="github"),
    ]


def _schedule_text(spec: dict[str, Any]) -> str:
    from fxqp.search.schedules import _describe

    return _describe(Spec.from_dict(spec))


# --------------------------------------------------------------------------- workers


def workers_part(args: argparse.Namespace, workdir: str) -> list[dict[str, Any]]:
    """``fxqp search schedules`` with 1 and 2 workers, alternately, ``--worker-pairs`` times."""
    import yaml

    space = os.path.join(workdir, "digits-space.yaml")
    with open(space, "w") as f:
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "weights",
                        "modules": ["Conv2d", "Linear"],
                        "weight": {
                            "quantize": {"bits": [4, 8], "start": ["20%", "90%"]},
                            "prune": {"sparsity": [0.3, 0.7], "start": ["10%", "70%"], "length": ["10%", "30%"]},
                        },
                    }
                ]
            },
            f,
        )
    pairs = []
    for pair in range(args.worker_pairs):
        rates = {}
        for workers in (1, 2):
            out = os.path.join(workdir, f"workers-{pair}-{workers}")
            storage = f"sqlite:///{os.path.join(out, 'study.db')}"
            os.makedirs(out, exist_ok=True)
            command = [
                sys.executable,
                "-m",
                "fxqp",
                "search",
                "schedules",
                "--model",
                "digits-vgg",
                "--data",
                "digits",
                "--space",
                space,
                "--trials",
                str(args.worker_trials),
                "--epochs",
                str(args.worker_epochs),
                "--no-references",
                "--workers",
                str(workers),
                "--threads",
                "1",
                "--out",
                out,
                "--storage",
                storage,
                "--no-progress",
            ]
            subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rates[workers] = trials_per_hour(storage, "schedules")
        pairs.append({"pair": pair, "one": rates[1], "two": rates[2], "ratio": rates[2] / rates[1]})
    return pairs


def trials_per_hour(storage: str, study: str) -> float:
    """Complete trials over the time from the first trial's start to the last one's end."""
    import optuna

    trials = [t for t in optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    return 3600.0 * len(trials) / (end - start).total_seconds()


def worker_table(pairs: list[dict[str, Any]]) -> str:
    rows = [[p["pair"], f"{p['one']:.0f}", f"{p['two']:.0f}", f"{p['ratio']:.2f}"] for p in pairs]
    rows.append(
        [
            "median",
            f"{statistics.median(p['one'] for p in pairs):.0f}",
            f"{statistics.median(p['two'] for p in pairs):.0f}",
            f"{statistics.median(p['ratio'] for p in pairs):.2f}",
        ]
    )
    return tabulate(rows, headers=["pair", "trials/hour, 1 worker", "trials/hour, 2 workers", "2 workers / 1"], tablefmt="github")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--width", type=int, default=32, help="DigitsVGG width")
    parser.add_argument("--max-ratio", type=float, default=0.4)
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--final-epochs", type=int, default=10)
    parser.add_argument("--joint-trials", type=int, default=60)
    parser.add_argument(
        "--joint-trial-epochs", type=int, default=1, help="also a joint search whose trials are fine-tuned this long (0: not)"
    )
    parser.add_argument("--budgets", default="10,20,40", help="sampler comparison: best objective after these many trials")
    parser.add_argument("--schedule-trials", type=int, default=40)
    parser.add_argument("--schedule-epochs", type=int, default=8)
    parser.add_argument("--worker-pairs", type=int, default=2)
    parser.add_argument("--worker-trials", type=int, default=30)
    parser.add_argument("--worker-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's)")
    parser.add_argument("--progress", action="store_true", help="the searches' progress bars")
    parser.add_argument("--workdir", default=None, help="studies and checkpoints (default: a new temporary folder)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; expected {', '.join(PARTS)}")
    args.device = torch.device(args.device)
    args.budgets = [int(b) for b in args.budgets.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="fxqp-search-bench-")
    os.makedirs(workdir, exist_ok=True)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(args.device),
        "args": {k: v if not isinstance(v, torch.device) else str(v) for k, v in vars(args).items()},
    }
    tables: list[str] = []
    if {"ratios", "samplers"} & set(parts):
        results["ratios"] = ratios_part(args, workdir, parts)
        tables += ratio_tables(results["ratios"], args.budgets)
    if "schedules" in parts:
        results["schedules"] = schedules_part(args, workdir)
        tables += schedule_tables(results["schedules"])
    if "workers" in parts:
        results["workers"] = workers_part(args, workdir)
        tables.append(worker_table(results["workers"]))
    print("\n\n".join(tables))
    write_json(args.out, results)
    print(f"\nwrote {args.out} (studies in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
