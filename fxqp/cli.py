"""The ``fxqp`` command line (argparse).

* ``fxqp demo`` — the seed paper's experiment on bundled data (see :mod:`fxqp.demo`);
* ``fxqp train`` — transform, train, lower and save a model with a spec file;
* ``fxqp inspect FILE.fxqp`` — what an artifact holds, without the model code;
* ``fxqp explain`` — which rule and ops each site of a model would get from a spec;
* ``fxqp search ratios|schedules|show`` — automatic search on Optuna (:mod:`fxqp.search.cli`).

Errors (bad arguments, a missing file, an invalid spec) print one line, ``fxqp <command>:
error: ...``, to stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn, Sequence

from fxqp.errors import FxqpError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """One-line errors: ``fxqp train: error: ... (see fxqp train --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CliError(FxqpError):
    """A command-line argument that cannot be used."""


def _load_spec(path: str):
    from fxqp.spec import Spec

    if not os.path.isfile(path):
        raise CliError(f"--spec {path}: no such file")
    if path.endswith(".json"):
        return Spec.from_json(path)
    if path.endswith((".yaml", ".yml")):
        return Spec.from_yaml(path)
    raise CliError(f"--spec {path}: expected a .yaml, .yml or .json file")


def number(kind: type, low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """An argparse ``type``: a ``kind`` (int or float) in the range given, else a one-line
    error saying what is accepted."""
    if high is None:
        accepted = f"{'a positive' if low_open and low == 0 else 'an'} {'integer' if kind is int else 'number'}" + ("" if low_open and low == 0 else f" >= {low}")
    else:
        accepted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        return value

    return parse


def _positive(kind: type):
    return number(kind, 0, low_open=True)


_fraction = number(float, 0.0, 1.0, high_open=True)


# --------------------------------------------------------------------------- commands


def _demo(args: argparse.Namespace) -> None:
    from fxqp.demo import run_demo

    run_demo(
        full=args.full,
        tasks=args.tasks.split(","),
        out=args.out,
        bits=args.bits,
        sparsity=args.sparsity,
        epochs=args.epochs,
        seeds=args.seeds,
        progress=not args.no_progress,
    )


def _build_for_task(model_name: str, data: Any):
    from fxqp.models import build_model

    if data.kind == "classification":
        return build_model(model_name, num_classes=len(data.classes), in_channels=data.in_channels)
    return build_model(model_name, in_channels=data.in_channels, scale=data.scale)


def _train(args: argparse.Namespace) -> None:
    import fxqp
    from fxqp import plots
    from fxqp.atomic import write_atomically
    from fxqp.data import load_data
    from fxqp.experiment import TrainConfig, train
    from fxqp.models import default_model

    spec = _load_spec(args.spec)
    data = load_data(args.data)
    model_name = args.model or default_model(data.kind)
    model = _build_for_task(model_name, data)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=not args.no_progress)
    steps = config.steps(len(data.train_y))
    print(f"{model_name} on {data.name}: {len(data.train_y)} training samples, {steps} steps ({steps // args.epochs} per epoch)")
    result = train(model, data, spec, config, desc="training")
    os.makedirs(args.out, exist_ok=True)
    artifact = os.path.join(args.out, "model.fxqp")
    fxqp.save(result.lowered, artifact)
    report = f"{fxqp.summary(result.model)}\n\n{fxqp.summary(result.lowered)}\n"
    write_atomically(os.path.join(args.out, "summary.txt"), report)
    record = dict(result.to_dict(), model=model_name, data=data.name, metric_name=data.metric, spec=spec.to_dict(), steps=steps)
    write_atomically(os.path.join(args.out, "result.json"), json.dumps(record, indent=2))
    plots.plot_sites(result.model, os.path.join(args.out, "sites.png"))
    plots.plot_schedule(spec, steps, os.path.join(args.out, "schedule.png"))
    plots.plot_curves([result], os.path.join(args.out, "curves.png"), metric=data.metric)
    print(report)
    print(f"test {data.metric}: {result.metric:.2f} (lowered), artifact {result.packed_bytes:,} bytes "
          f"({result.float_bytes / result.packed_bytes:.2f}x smaller than float32 {result.float_bytes:,})")
    print(f"wrote {artifact}, summary.txt, result.json, sites.png, schedule.png, curves.png to {args.out}")


def _inspect(args: argparse.Namespace) -> None:
    from fxqp.lower.inspect import inspect_artifact

    print(inspect_artifact(args.file))


def _explain(args: argparse.Namespace) -> None:
    import fxqp
    from fxqp.data import load_data

    spec = _load_spec(args.spec)
    if args.data:
        model = _build_for_task(args.model, load_data(args.data))
    else:
        from fxqp.models import build_model

        model = build_model(args.model, num_classes=args.num_classes)
    print(fxqp.explain(model, spec))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxqp", description="Train networks with joint quantization and pruning of weights and activations (torch.fx passes).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser(
        "demo",
        help="the seed paper's experiment: six quantize/prune orders on digits and super-resolution",
        description="Train the same network under six schedules (float, Q, P(w)->Q, Q->P(w), P(w,a)->Q, "
        "Q->P(w,a)) on scikit-learn's digits and on x3 super-resolution of scikit-image's sample "
        "photographs; print accuracy / PSNR and the packed artifact size of each, and which order won. "
        "Defaults take a few minutes on 2 CPU cores; --full runs longer, with 3 seeds.",
    )
    demo.add_argument("--full", action="store_true", help="longer runs and 3 seeds (mean ± std)")
    demo.add_argument("--tasks", default="digits,sr", help="comma-separated: digits, sr (default: digits,sr)")
    demo.add_argument("--bits", type=_positive(int), default=8, help="bits of weights and activations (default: 8)")
    demo.add_argument("--sparsity", type=_fraction, default=0.5, help="pruned fraction (default: 0.5)")
    demo.add_argument("--epochs", type=_positive(int), default=None, help="override the epochs of every task")
    demo.add_argument("--seeds", type=_positive(int), default=None, help="override the number of seeds")
    demo.add_argument("--out", default="fxqp-demo", help="folder for plots, results.json and artifacts (default: fxqp-demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    train = commands.add_parser(
        "train",
        help="transform, train, lower and save a model with a spec",
        description="Transform --model with --spec, train it on --data, lower it and write model.fxqp, "
        "summary.txt, result.json and plots to --out.",
    )
    train.add_argument("--model", default=None, help="digits-cnn | digits-vgg | espcn | torchvision:NAME | module.path:factory (default: by data)")
    train.add_argument("--data", required=True, help="digits | sr | sr2 | sr3 | folder:PATH (PATH/<class>/<images>)")
    train.add_argument("--spec", required=True, help="spec file (.yaml, .yml or .json)")
    train.add_argument("--epochs", type=_positive(int), default=10, help="epochs (default: 10)")
    train.add_argument("--batch-size", type=_positive(int), default=64, help="batch size (default: 64)")
    train.add_argument("--lr", type=_positive(float), default=3e-3, help="Adam learning rate, cosine-annealed (default: 0.003)")
    train.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)

    inspect = commands.add_parser(
        "inspect",
        help="sites, bits, sparsity and bytes of a saved artifact (no model code needed)",
        description="Print what a saved .fxqp artifact holds: per weight site its scheme, bits, shape, non-zeros, "
        "mask encoding and bytes; the activation stages; the totals. The file's digests are checked.",
    )
    inspect.add_argument("file", help="a file written by fxqp.save or fxqp train")
    inspect.set_defaults(func=_inspect)

    explain = commands.add_parser(
        "explain",
        help="which rule and ops each site of a model gets from a spec",
        description="Trace --model and show, per site, the rule of --spec that selects it and its ops; "
        "selectors that match nothing are reported.",
    )
    explain.add_argument("--model", required=True, help="digits-cnn | digits-vgg | espcn | torchvision:NAME | module.path:factory")
    explain.add_argument("--spec", required=True, help="spec file (.yaml, .yml or .json)")
    explain.add_argument("--data", default=None, help="build the model for this data set (classes, channels, scale)")
    explain.add_argument("--num-classes", type=_positive(int), default=10, help="classes when no --data (default: 10)")
    explain.set_defaults(func=_explain)

    from fxqp.search.cli import add_search_commands

    add_search_commands(commands, _Parser, lambda args: args.search_func(args))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 on an error)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except FxqpError as err:
        print(f"fxqp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unwritable --out, disk full: one line, no traceback
        print(f"fxqp {args.command}: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fxqp {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
