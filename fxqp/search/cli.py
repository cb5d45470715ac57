"""``fxqp search ratios|schedules|show``: the searches on the command line.

``ratios`` and ``schedules`` train ``--model`` on ``--data`` (the built-in tasks or an image
folder), choosing on a validation split of the training set (``--val-fraction``) and
reporting the test set at the end. The study lives in ``--storage`` (default: SQLite in
``--out``, so that running the same command again resumes an interrupted search) under
``--study``. ``--workers N`` runs N worker processes on it, one torch thread each; the same
command on other machines, with the same RDB ``--storage`` URL and ``--study``, joins the
study. The command returns when the study holds its trials, and writes to ``--out``:

* ``ratios``: ``best.yaml`` (the best spec), ``model.fxqp`` (the network pruned at the best
  ratios and fine-tuned, lowered), ``result.json``, ``trials.csv``, ``history.png``,
  ``ratios.png``, and ``base.safetensors`` (the trained base network, shared by workers);
* ``schedules``: ``pareto/trial-<n>.yaml`` (one spec per Pareto point), ``result.json``,
  ``trials.csv``, ``history.png`` and ``pareto.png`` (with the six hand-written orders of
  ``fxqp demo``, trained once each in ``<study>.references``).

``show`` prints what a study holds (or the studies a storage holds), without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Callable, Sequence

from fxqp.cli import number

__all__ = ["add_search_commands"]

WORKER_FLAG = "--worker"


_positive_int = number(int, 0, low_open=True)
_count = number(int, 0)
_ratio = number(float, 0.0, 1.0, low_open=True, high_open=True)


def _common(parser: argparse.ArgumentParser, study: str) -> None:
    parser.add_argument(
        "--model", default=None, help="digits-cnn | digits-vgg | espcn | torchvision:NAME | module.path:factory (default: by data)"
    )
    parser.add_argument("--data", required=True, help="digits | sr | sr2 | sr3 | folder:PATH")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage: sqlite:///FILE, postgresql://USER@HOST/DB, journal:FILE (default: sqlite:///OUT/study.db)",
    )
    parser.add_argument("--study", default=study, help=f"study name (default: {study})")
    parser.add_argument(
        "--workers", type=_positive_int, default=1, help="worker processes on this machine, one torch thread each (default: 1)"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads per worker (default: torch's choice with one worker, 1 with several)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default: 64)")
    parser.add_argument(
        "--lr", type=float, default=3e-3, help="Adam learning rate, cosine-annealed over each training run (default: 0.003)"
    )
    parser.add_argument("--val-fraction", type=_ratio, default=0.2, help="training samples held out to choose on (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument(
        "--heartbeat",
        type=_positive_int,
        default=10,
        help="seconds between a running trial's heartbeats; a trial silent for 4 of them is failed (default: 10)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)


def add_search_commands(commands: Any, parser_class: type, run: Callable[[argparse.Namespace], None]) -> None:
    """Add ``search`` with its sub-commands to the ``fxqp`` parser's ``commands``."""
    search = commands.add_parser(
        "search",
        help="find per-layer pruning ratios or quantize/prune schedules (Optuna)",
        description="Search configurations with Optuna: per-layer filter-pruning ratios of a quantized network "
        "(ratios), quantize/prune schedules (schedules), or read a study back (show).",
    )
    kinds = search.add_subparsers(dest="search_command", required=True, metavar="SEARCH", parser_class=parser_class)

    ratios = kinds.add_parser(
        "ratios",
        help="per-layer filter-pruning ratios of a quantized network (Bayesian optimization)",
        description="Train --model quantized by --spec, then search one filter-pruning ratio per layer minimizing "
        "val_loss + alpha*params%%/100 + alpha/4*bits%%/100 (the seed paper on pruning quantized networks); "
        "fine-tune the best and write best.yaml, model.fxqp, trials.csv and plots to --out.",
    )
    _common(ratios, "ratios")
    ratios.add_argument(
        "--spec", required=True, help="base spec (.yaml/.json): the quantizers; a filter Prune op in it gives the criterion"
    )
    ratios.add_argument(
        "--strategy",
        choices=("joint", "layerwise"),
        default="joint",
        help="joint: one study over all ratios; layerwise: the paper's layer-by-layer procedure (default: joint)",
    )
    ratios.add_argument("--sampler", choices=("gp", "tpe", "random"), default="gp", help="joint: Optuna's sampler (default: gp)")
    ratios.add_argument("--trials", type=_positive_int, default=None, help="joint: trials in all (default: 60)")
    ratios.add_argument("--layer-random", type=_count, default=5, help="layerwise: random trials per layer after the 3 probes (default: 5)")
    ratios.add_argument("--layer-guided", type=_count, default=5, help="layerwise: guided trials per layer (default: 5)")
    ratios.add_argument(
        "--alpha", type=float, default=None, help="size weight alpha (default: by quantizer: 7 DoReFa, 5 XNOR-Net, 2 binary, 1 other)"
    )
    ratios.add_argument("--max-ratio", type=_ratio, default=0.4, help="largest ratio per layer (default: 0.4)")
    ratios.add_argument("--layers", default=None, help="comma-separated globs of the layers to prune (default: every quantized layer)")
    ratios.add_argument("--pretrain-epochs", type=_count, default=10, help="train the quantized network first (default: 10)")
    ratios.add_argument("--finetune-epochs", type=_count, default=5, help="layerwise: fine-tune after a layer pruned >= 5%% (default: 5)")
    ratios.add_argument("--final-epochs", type=_count, default=10, help="fine-tune the best (default: 10)")
    ratios.add_argument(
        "--trial-epochs",
        type=_count,
        default=0,
        help="fine-tune every trial before evaluating it (default: 0, the paper's: evaluate it as pruned)",
    )
    ratios.set_defaults(func=run, search_func=_ratios)

    schedules = kinds.add_parser(
        "schedules",
        help="quantize/prune orders and start fractions: the Pareto front of metric against bytes",
        description="Sample specs from --space (per rule group: order, start fractions, optionally bits and sparsity), "
        "train each for --epochs, and write the Pareto front of validation metric against artifact bytes "
        "(pareto/*.yaml), trials.csv and plots, with the six hand-written orders of fxqp demo on the same axes.",
    )
    _common(schedules, "schedules")
    schedules.add_argument("--space", required=True, help="search space (.yaml; see fxqp.search.space)")
    schedules.add_argument("--trials", type=_positive_int, default=80, help="trials in all (default: 80)")
    schedules.add_argument("--epochs", type=_positive_int, default=10, help="epochs of every training run (default: 10)")
    schedules.add_argument("--sampler", choices=("tpe", "gp", "random", "nsga2"), default="tpe", help="Optuna's sampler (default: tpe)")
    schedules.add_argument(
        "--max-bytes", type=_positive_int, default=None, help="constraint: the artifact at most this many bytes (overrides the space's)"
    )
    schedules.add_argument("--no-references", action="store_true", help="do not train the six hand-written orders")
    schedules.add_argument("--reference-bits", type=_positive_int, default=8, help="bits of the hand-written orders (default: 8)")
    schedules.add_argument("--reference-sparsity", type=_ratio, default=0.5, help="sparsity of the hand-written orders (default: 0.5)")
    schedules.set_defaults(func=run, search_func=_schedules)

    show = kinds.add_parser(
        "show",
        help="what a study holds (trials, best, Pareto front), without running anything",
        description="Read a study back from --storage: its trials, the best trial or the Pareto front. Without --study, list the studies.",
    )
    show.add_argument("--storage", required=True, help="sqlite:///FILE, postgresql://..., journal:FILE or FILE.log")
    show.add_argument("--study", default=None, help="study name (default: list the studies)")
    show.set_defaults(func=run, search_func=_show)


# --------------------------------------------------------------------------- shared set-up


class _Task:
    """The model factory, data and the train/evaluate functions of a CLI search: training
    on the training part of the validation split, choosing on its validation part."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from fxqp.data import load_data, validation_split
        from fxqp.experiment import TrainConfig, example_inputs
        from fxqp.models import default_model

        threads = args.threads or (1 if args.workers > 1 or args.worker else None)
        if threads:
            torch.set_num_threads(threads)
        self.data = load_data(args.data)
        self.validation = validation_split(self.data, args.val_fraction, args.seed)
        self.model_name = args.model or default_model(self.data.kind)
        self.config = TrainConfig(batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=False)
        self.per_epoch = max(1, len(self.validation.train_y) // args.batch_size)
        self.example_inputs = example_inputs(self.make_model(), self.data)

    def make_model(self) -> Any:
        from fxqp.models import build_for_data

        return build_for_data(self.model_name, self.data)

    def train(self, model: Any, steps: int) -> None:
        from fxqp.experiment import fit

        fit(model, self.validation, steps, self.config)

    def evaluate(self, model: Any) -> dict[str, float]:
        from fxqp.experiment import measure

        return measure(model, self.validation)

    def test(self, model: Any) -> dict[str, float]:
        from fxqp.experiment import measure

        return measure(model, self.data)


def _storage(args: argparse.Namespace) -> str:
    if args.storage:
        return args.storage
    return f"sqlite:///{os.path.abspath(os.path.join(args.out, 'study.db'))}"


class _Workers:
    """The other ``--workers - 1`` processes: the same command with ``--worker``, started when
    the study is ready; their exit statuses are reported at the end."""

    def __init__(self, args: argparse.Namespace):
        self.argv = _worker_argv(args.argv)
        self.count = 0 if args.worker else args.workers - 1
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        for _ in range(self.count):
            self.processes.append(subprocess.Popen([sys.executable, "-m", "fxqp", *self.argv], env=env, stdout=subprocess.DEVNULL))

    def finish(self) -> list[str]:
        """Wait for the workers; one line per worker that did not exit cleanly."""
        problems = []
        for i, process in enumerate(self.processes, 2):
            status = process.wait()
            if status:
                how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
                problems.append(f"worker {i} (pid {process.pid}) {how}; its running trial, if any, was failed and run again")
        return problems

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _worker_argv(argv: Sequence[str]) -> list[str]:
    """The command's own arguments for a worker: ``--workers`` dropped, ``--worker``
    and ``--no-progress`` added."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--workers":
            skip = True
            continue
        if item.startswith("--workers="):
            continue
        out.append(item)
    return out + [WORKER_FLAG, "--no-progress"]


def _heartbeat(args: argparse.Namespace) -> Any:
    from fxqp.search.study import Heartbeat

    return Heartbeat(interval=args.heartbeat)


def _run_with_workers(args: argparse.Namespace, search: Callable[[Callable[[], None]], Any]) -> tuple[Any, list[str]]:
    workers = _Workers(args)
    try:
        result = search(workers.start)
        problems = workers.finish()
    except BaseException:
        workers.stop()
        raise
    return result, problems


# --------------------------------------------------------------------------- ratios


def _ratios(args: argparse.Namespace) -> None:
    import fxqp
    from fxqp import plots
    from fxqp.atomic import write_atomically, write_json
    from fxqp.cli import CliError, load_spec
    from fxqp.search import layer_ratios
    from fxqp.search.study import read_study, trials_csv

    if args.strategy == "layerwise" and (args.workers > 1 or args.trials is not None):
        raise CliError(
            "--strategy layerwise: the paper's procedure is one layer after another, in one worker; use --layer-random/--layer-guided (not --trials) and --workers 1, or --strategy joint"
        )
    spec = load_spec(args.spec)
    os.makedirs(args.out, exist_ok=True)
    task = _Task(args)
    storage = _storage(args)
    steps = task.per_epoch
    kwargs = dict(
        example_inputs=task.example_inputs,
        alpha=args.alpha,
        max_ratio=args.max_ratio,
        strategy=args.strategy,
        n_trials=args.trials,
        sampler=args.sampler,
        n_random=args.layer_random,
        n_guided=args.layer_guided,
        pretrain_steps=args.pretrain_epochs * steps,
        finetune_steps=args.finetune_epochs * steps,
        final_steps=args.final_epochs * steps,
        trial_steps=args.trial_epochs * steps,
        layers=args.layers.split(",") if args.layers else None,
        base_checkpoint=os.path.join(args.out, "base.safetensors"),
        storage=storage,
        study_name=args.study,
        seed=args.seed,
        heartbeat=_heartbeat(args),
        progress=not (args.no_progress or args.worker),
    )
    if args.worker:
        layer_ratios(task.make_model, spec, task.train, task.evaluate, finalize=False, **kwargs)
        return
    if args.strategy == "joint":
        print(f"{task.model_name} on {task.data.name}: searching ratios in study {args.study!r} of {storage} with {args.workers} worker(s)")
    result, problems = _run_with_workers(
        args, lambda ready: layer_ratios(task.make_model, spec, task.train, task.evaluate, on_ready=ready, **kwargs)
    )
    for line in problems:
        print(f"note: {line}", file=sys.stderr)
    test = task.test(result.lowered)
    result.best_spec.to_yaml(os.path.join(args.out, "best.yaml"))
    fxqp.save(result.lowered, os.path.join(args.out, "model.fxqp"))
    records = [read_study(storage, name) for name in result.studies]
    write_atomically(os.path.join(args.out, "trials.csv"), trials_csv(*records))
    values = [t.values[0] for r in records for t in r.complete()]
    plots.plot_history(values, os.path.join(args.out, "history.png"), title=f"{args.strategy} ratio search: objective per trial")
    plots.plot_ratios(result.ratios, os.path.join(args.out, "ratios.png"), max_ratio=args.max_ratio)
    write_json(
        os.path.join(args.out, "result.json"),
        {
            "ratios": result.ratios,
            "objective": result.objective.to_dict(),
            "final": result.final.to_dict() if result.final else None,
            "validation": result.evaluation,
            "test": test,
            "studies": result.studies,
            "evaluations": result.evaluations,
            "spec": result.best_spec.to_dict(),
        },
    )
    print(result.table())
    print(f"test {task.data.metric}: {test['metric']:.2f} (lowered, after the final fine-tuning)")
    print(f"wrote best.yaml, model.fxqp, result.json, trials.csv, history.png, ratios.png to {args.out}")


# --------------------------------------------------------------------------- schedules


def _schedules(args: argparse.Namespace) -> None:
    from fxqp import plots
    from fxqp.atomic import write_atomically, write_json
    from fxqp.experiment import ORDERS, order_spec, relu_selectors
    from fxqp.search import SearchSpace, schedules
    from fxqp.search.study import read_study, trials_csv

    space = SearchSpace.from_yaml(args.space)
    os.makedirs(args.out, exist_ok=True)
    task = _Task(args)
    storage = _storage(args)
    total = args.epochs * task.per_epoch
    references = None
    if not args.no_references:
        selectors = relu_selectors(task.make_model())
        dynamic = task.data.kind == "super_resolution"
        references = {
            order: order_spec(order, bits=args.reference_bits, sparsity=args.reference_sparsity, dynamic_activations=dynamic, **selectors)
            for order in ORDERS
        }
    kwargs = dict(
        space=space,
        total_steps=total,
        example_inputs=task.example_inputs,
        n_trials=args.trials,
        sampler=args.sampler,
        constraints={"bytes": args.max_bytes} if args.max_bytes else None,
        references=references,
        storage=storage,
        study_name=args.study,
        seed=args.seed,
        heartbeat=_heartbeat(args),
        progress=not (args.no_progress or args.worker),
    )
    if args.worker:
        schedules(task.make_model, task.train, task.evaluate, **kwargs)
        return
    print(f"{task.model_name} on {task.data.name}: {total} steps per trial, study {args.study!r} of {storage}, {args.workers} worker(s)")
    front, problems = _run_with_workers(args, lambda ready: schedules(task.make_model, task.train, task.evaluate, on_ready=ready, **kwargs))
    for line in problems:
        print(f"note: {line}", file=sys.stderr)
    pareto_dir = os.path.join(args.out, "pareto")
    os.makedirs(pareto_dir, exist_ok=True)
    for point in front.pareto:
        point.spec.to_yaml(os.path.join(pareto_dir, f"trial-{point.number:04d}.yaml"))
    record = read_study(storage, args.study)
    write_atomically(os.path.join(args.out, "trials.csv"), trials_csv(record))
    points = [(p.artifact_bytes, p.metric) for p in front.trials]
    plots.plot_pareto(
        points,
        [(p.artifact_bytes, p.metric) for p in front.pareto],
        {n: (r.artifact_bytes, r.metric) for n, r in front.references.items()},
        os.path.join(args.out, "pareto.png"),
        metric=f"validation {task.data.metric}",
    )
    plots.plot_history(
        [-p.metric for p in sorted(front.trials, key=lambda p: p.number)],
        os.path.join(args.out, "history.png"),
        ylabel=f"- validation {task.data.metric} (lower is better)",
        title="schedule search: metric per trial",
    )
    write_json(
        os.path.join(args.out, "result.json"),
        {
            "pareto": [
                {"trial": p.number, "metric": p.metric, "artifact_bytes": p.artifact_bytes, "spec": p.spec.to_dict()} for p in front.pareto
            ],
            "references": {n: {"metric": r.metric, "artifact_bytes": r.artifact_bytes} for n, r in front.references.items()},
            "dominated_references": front.dominated(),
            "trials": len(front.trials),
        },
    )
    print(front.table())
    print(f"wrote pareto/ ({len(front.pareto)} specs), result.json, trials.csv, pareto.png, history.png to {args.out}")


# --------------------------------------------------------------------------- show


def _show(args: argparse.Namespace) -> None:
    from fxqp.report import Report
    from fxqp.search.schedules import REFERENCES_SUFFIX, front_of_study
    from fxqp.search.study import read_study, study_names

    if args.study is None:
        names = study_names(args.storage)
        print(f"{len(names)} studies in the storage" + (":" if names else ""))
        for name in names:
            print(f"  {name}")
        return
    record = read_study(args.storage, args.study)
    kind = record.meta.get("search", "not made by fxqp")
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(record.counts().items()))
    print(f"study {record.name!r} ({kind}; directions {', '.join(record.directions)}): {counts or 'no trials'}")
    complete = record.complete()
    if kind == "schedules":
        references = None
        if args.study + REFERENCES_SUFFIX in study_names(args.storage):
            references = read_study(args.storage, args.study + REFERENCES_SUFFIX)
        print(front_of_study(record, references).table())
        return
    if not complete:
        return
    best = min(complete, key=lambda t: t.values[0]) if record.directions[0] == "minimize" else max(complete, key=lambda t: t.values[0])
    rows = [[name, f"{value:.4g}"] for name, value in sorted(best.params.items())]
    notes = [f"{key}: {json.dumps(value)}" for key, value in best.attrs.items() if key in ("terms", "evaluation", "artifact_bytes")]
    print(Report(f"best trial {best.number}: value {best.values[0]:.4f}", ["parameter", "value"], rows, notes))
