"""The ``fxqp`` command line (argparse).

* ``fxqp demo`` — the seed paper's experiment on bundled data (see :mod:`fxqp.demo`);
* ``fxqp train`` — transform, train, lower and save a model with a spec file;
* ``fxqp inspect FILE.fxqp`` — what an artifact holds, without the model code;
* ``fxqp export FILE.fxqp --onnx|--pt2 OUT`` — an artifact as ONNX or a ``torch.export`` program;
* ``fxqp explain`` — which rule and ops each site of a model would get from a spec;
* ``fxqp search ratios|schedules|show`` — automatic search on Optuna (:mod:`fxqp.search.cli`).

Errors (bad arguments, a missing file, an invalid spec) print one line, ``fxqp <command>:
error: ...``, to stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Sequence

from fxqp.errors import FxqpError

__all__ = ["main", "build_parser", "load_spec", "CliError"]


class _Parser(argparse.ArgumentParser):
    """One-line errors: ``fxqp train: error: ... (see fxqp train --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CliError(FxqpError):
    """A command-line argument that cannot be used."""


def load_spec(path: str):
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
        accepted = f"{'a positive' if low_open and low == 0 else 'an'} {'integer' if kind is int else 'number'}" + (
            "" if low_open and low == 0 else f" >= {low}"
        )
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


#: ``fxqp train`` flags recorded in a run's config (a resumed run must repeat them).
_RUN_FLAGS = (
    "data",
    "model",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "schedule",
    "step_every",
    "grad_accum",
    "seed",
    "device",
    "amp",
    "image_size",
    "val_split",
    "workers",
    "checkpoint_every",
    "allow_late_ops",
)


def _launch_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc-per-node N`` (or ``=N``, or an abbreviation argparse took)."""
    flag = "--nproc-per-node"
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name, eq, _ = token.partition("=")
        if len(name) >= len("--np") and flag.startswith(name):
            skip = not eq
            continue
        out.append(token)
    return out


def _launch(args: argparse.Namespace) -> int:
    """``fxqp train --nproc-per-node N ...``: ``torchrun --standalone --nproc_per_node N -m
    fxqp train ...`` (the same arguments but this one) in a child process; its exit status."""
    import subprocess

    from fxqp.trainer import TORCHRUN_VARIABLES

    inherited = [f"{k}={os.environ[k]}" for k in TORCHRUN_VARIABLES if k in os.environ]
    if inherited:
        raise CliError(
            f"--nproc-per-node {args.nproc_per_node}: this process was started by torchrun already ({', '.join(inherited)}); "
            "leave out --nproc-per-node under torchrun"
        )
    if not args.resume:
        _check_run_flags(args)
        load_spec(args.spec)  # one error here rather than one per process
    elif not os.path.isdir(args.resume):
        raise CliError(f"--resume {args.resume}: no such directory")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one machine, a free port of its own
        "--nproc_per_node",
        str(args.nproc_per_node),
        "-m",
        "fxqp",
        *_launch_argv(args.argv),
    ]
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except KeyboardInterrupt:  # the launcher stops its processes, and returns
        child.terminate()
        child.wait()
        raise


def _check_run_flags(args: argparse.Namespace) -> None:
    missing = [flag for flag, value in (("--data", args.data), ("--spec", args.spec), ("--out", args.out)) if value is None]
    if missing:
        raise CliError(f"{', '.join(missing)} required (or --resume DIR to continue a run)")


def _train(args: argparse.Namespace) -> int | None:
    from fxqp import trainer

    if args.nproc_per_node is not None:
        return _launch(args)
    given = {name: getattr(args, name) for name in _RUN_FLAGS if getattr(args, name) not in (None, False)}
    if args.resume:
        if args.spec is not None:
            given["spec"] = load_spec(args.spec).to_dict()
        trainer.resume(args.resume, progress=not args.no_progress, **given)
        return None
    _check_run_flags(args)
    config = trainer.TrainConfig(spec=load_spec(args.spec).to_dict(), **given)
    trainer.run(config, args.out, progress=not args.no_progress)
    return None


def _inspect(args: argparse.Namespace) -> None:
    from fxqp.lower.inspect import inspect_artifact

    print(inspect_artifact(args.file))


#: The forms of ``--model``, for help texts and errors.
_MODEL_FORMS = "digits-cnn | digits-vgg | espcn | torchvision:NAME[:WEIGHTS] | path/to/file.py:factory | module.path:factory"


def _recorded_run(artifact: str):
    """The :class:`~fxqp.trainer.TrainConfig` in ``result.json`` beside ``artifact`` (a
    ``fxqp train`` output folder), or None when there is no such file."""
    import json

    from fxqp.trainer import TrainConfig

    path = os.path.join(os.path.dirname(os.path.abspath(artifact)), "result.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (ValueError, OSError) as err:
        raise CliError(f"{path}: cannot read the run's result ({err})") from None
    if not isinstance(result, dict) or "config" not in result:
        raise CliError(f"{path}: no 'config' of a fxqp train run in it; give --model")
    return TrainConfig.from_dict(result["config"], path)


def _build_as_run(artifact: str, run):
    """``fxqp.trainer.build_run_model(run)``, its errors saying they come from the recorded run."""
    from fxqp.trainer import build_run_model

    try:
        return build_run_model(run)
    except FxqpError as err:
        raise CliError(
            f"rebuilding the model of the run beside {artifact} (its result.json: --data {run.data}, --model {run.model or 'built-in'}): {err}; "
            "give --model, and --num-classes or --data"
        ) from None


def _export_model(args: argparse.Namespace):
    """The fresh model to load ``args.artifact`` into, and how it was built (for the output)."""
    import dataclasses

    from fxqp.models import build_model
    from fxqp.trainer import TrainConfig, build_run_model

    if args.data is not None and args.num_classes is not None:
        raise CliError("--data and --num-classes: give one (--data sets the classes, channels and scale)")
    if args.model is None:
        run = _recorded_run(args.artifact)
        if run is None:
            raise CliError(
                f"--model is needed: {args.artifact} is not in a fxqp train output folder (no result.json beside it) "
                f"to rebuild the model from; give its architecture: --model {_MODEL_FORMS}"
            )
        if args.data is not None or args.num_classes is not None:
            raise CliError("--data and --num-classes go with --model; without it the model is rebuilt as the run recorded it")
        return _build_as_run(args.artifact, run), f"{run.model or 'built-in'} for {run.data}, as in the run's result.json"
    if args.data is not None:
        # batch size 1: the data is read for its classes only; a small folder is never refused
        return build_run_model(TrainConfig(data=args.data, spec={}, model=args.model, batch_size=1)), f"{args.model} for {args.data}"
    run = _recorded_run(args.artifact) if args.num_classes is None else None
    if run is not None:
        return _build_as_run(args.artifact, dataclasses.replace(run, model=args.model)), f"{args.model} for {run.data}, the run's data"
    classes = f", {args.num_classes} classes" if args.num_classes is not None else ""
    return build_model(args.model, num_classes=args.num_classes), f"{args.model}{classes}"


def _zeros_of_record(artifact: str, low, model, dynamic_batch: bool) -> tuple:
    """Positional example inputs: zeros of the shapes and dtypes the artifact records (a
    batch of 1 traced as 2 with a dynamic batch: torch.export specializes sizes 0 and 1),
    plain values as recorded."""
    import torch

    from fxqp.lower.artifact import MAX_EXAMPLE_ELEMENTS, recorded_elements, recorded_zeros
    from fxqp.lower.lower import LOWERED_KEY
    from passes.errors import PassError
    from passes.trace import input_names

    record = low.meta[LOWERED_KEY].get("example_inputs")
    if not record:
        raise CliError(
            f"{artifact}: the artifact records no example inputs (the model was transformed without example_inputs, "
            "or with inputs that are not tensors or plain values); export it in Python with fxqp.export_onnx or fxqp.export"
        )
    elements = recorded_elements(record)
    if elements > MAX_EXAMPLE_ELEMENTS:
        raise CliError(
            f"{artifact}: the recorded example inputs hold {elements:,} elements, more than the {MAX_EXAMPLE_ELEMENTS:,} "
            "fxqp export runs the model on; export it in Python with fxqp.export_onnx or fxqp.export"
        )
    values = [
        x.new_zeros((2, *x.shape[1:])) if dynamic_batch and isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 else x
        for x in recorded_zeros(record).values()
    ]
    try:
        positional = input_names(model, tuple(values))
    except PassError:
        positional = None
    if positional != tuple(record):
        raise CliError(
            f"{artifact}: the recorded example inputs ({', '.join(record)}) are not the first parameters of "
            f"{type(model).__name__}.forward; export it in Python with fxqp.export_onnx or fxqp.export"
        )
    return tuple(values)


def _export(args: argparse.Namespace) -> None:
    import fxqp

    if not os.path.isfile(args.artifact):
        raise CliError(f"{args.artifact}: no such file")
    if args.pt2 is not None:
        onnx_only = [
            flag
            for flag, value in (
                ("--opset", args.opset),
                ("--linear-kernel", args.linear_kernel),
                ("--min-weight-bits", args.min_weight_bits),
            )
            if value is not None
        ]
        if onnx_only:
            raise CliError(f"{', '.join(onnx_only)}: ONNX options; they do not apply to --pt2")
    model, built = _export_model(args)
    low = fxqp.load(args.artifact, model, sha256=args.sha256)
    print(f"{args.artifact}: loaded into {type(model).__name__} ({built})")
    dynamic = not args.static_batch
    inputs = _zeros_of_record(args.artifact, low, model, dynamic)
    if args.onnx is not None:
        options: dict = {"dynamic_batch": dynamic}
        if args.opset is not None:
            options["opset"] = args.opset
        if args.linear_kernel is not None:
            options["linear_kernel"] = args.linear_kernel
        if args.min_weight_bits is not None:
            options["min_weight_bits"] = args.min_weight_bits
        print(fxqp.export_onnx(low, inputs, args.onnx, **options))
        return
    import torch

    batch = torch.export.Dim("batch", min=1)
    shapes = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() else None for x in inputs) if dynamic else None
    fxqp.export(low, inputs, args.pt2, dynamic_shapes=shapes)
    print(f"{args.pt2}: {os.path.getsize(args.pt2):,} bytes; torch.export program, {'dynamic' if dynamic else 'static'} batch")


def _explain(args: argparse.Namespace) -> None:
    import fxqp
    from fxqp.data import load_data

    spec = load_spec(args.spec)
    if args.data:
        from fxqp.models import build_for_data

        model = build_for_data(args.model, load_data(args.data))
    else:
        from fxqp.models import build_model

        model = build_model(args.model, num_classes=args.num_classes)
    report = fxqp.explain(model, spec)
    print(report)
    if report.errors:  # a lint for CI: the spec would not transform this model
        raise CliError(
            f"--spec {args.spec}: fxqp.transform would fail on {type(model).__name__}: {len(report.errors)} error(s), listed above"
        )


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fxqp", description="Train networks with joint quantization and pruning of weights and activations (torch.fx passes)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser(
        "demo",
        help="the seed paper's experiment: six quantize/prune orders on digits and super-resolution",
        description="Train the same network under six schedules (float, Q, P(w)->Q, Q->P(w), P(w,a)->Q, "
        "Q->P(w,a)) on scikit-learn's digits and on x3 super-resolution of scikit-image's sample "
        "photographs; print accuracy / PSNR (mean ± std over seeds) and the packed artifact size of each, "
        "and the order of each pair that won, if one won in every seed. Defaults (3 seeds) take a few "
        "minutes on 2 CPU cores; --full runs longer, with 5 seeds.",
    )
    demo.add_argument("--full", action="store_true", help="longer runs and 5 seeds")
    demo.add_argument("--tasks", default="digits,sr", help="comma-separated: digits, sr (default: digits,sr)")
    demo.add_argument(
        "--bits", type=_positive(int), default=None, help="bits of weights and activations (default: each task's, see docs/demo.md)"
    )
    demo.add_argument("--sparsity", type=_fraction, default=None, help="pruned fraction (default: each task's, see docs/demo.md)")
    demo.add_argument("--epochs", type=_positive(int), default=None, help="override the epochs of every task")
    demo.add_argument("--seeds", type=_positive(int), default=None, help="number of seeds (default: 3, 5 with --full)")
    demo.add_argument("--out", default="fxqp-demo", help="folder for plots, results.json and artifacts (default: fxqp-demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar (on a terminal) or line per run (in a log)")
    demo.set_defaults(func=_demo)

    train = commands.add_parser(
        "train",
        help="transform, train, lower and save a model with a spec",
        description="Transform --model with --spec, train it on --data, lower it and write model.fxqp, "
        "summary.txt, result.json, metrics.jsonl (a JSON line of numbers per epoch) and checkpoint.safetensors "
        "to --out. fxqp steps count optimizer steps. --resume OUT continues an interrupted run bit-exactly "
        "(model, optimizer, scheduler, fxqp step, random generators and data order). Data-parallel: "
        "torchrun --nproc_per_node N -m fxqp train ..., or --nproc-per-node N, trains in N processes; "
        "--batch-size is per process, so an optimizer step sees batch size x N x --grad-accum samples.",
    )
    train.add_argument("--data", help="digits | sr | sr2 | sr3 | folder:PATH (PATH/<class>/<image>, or PATH/train/… and PATH/val/…)")
    train.add_argument(
        "--model",
        help="digits-cnn | digits-vgg | espcn | torchvision:NAME[:WEIGHTS] (weights from the local torch cache, never downloaded) | path/to/file.py:factory | module.path:factory (default: by data)",
    )
    train.add_argument("--spec", help="spec file (.yaml, .yml or .json)")
    train.add_argument("--out", help="output folder")
    train.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoint is in DIR (with its recorded arguments)")
    train.add_argument("--epochs", type=_positive(int), help="epochs (default: 10)")
    train.add_argument(
        "--batch-size",
        type=_positive(int),
        help="samples per forward of each process (default: 64); an optimizer step sees batch size x processes x --grad-accum",
    )
    train.add_argument("--grad-accum", type=_positive(int), help="forwards per optimizer step (default: 1)")
    train.add_argument("--optimizer", choices=("sgd", "adamw"), help="sgd (momentum 0.9) or adamw (default: sgd)")
    train.add_argument("--lr", type=_positive(float), help="learning rate (default: 0.1 for sgd, 0.001 for adamw)")
    train.add_argument("--weight-decay", type=number(float, 0.0), help="weight decay (default: 1e-4 for sgd, 0.05 for adamw)")
    train.add_argument("--schedule", choices=("cosine", "step"), help="cosine to 0, or x0.1 every --step-every epochs (default: cosine)")
    train.add_argument(
        "--step-every", type=_positive(int), help="epochs between learning-rate drops of --schedule step (default: a third of the run)"
    )
    train.add_argument("--seed", type=int, help="seed of the initialisation, split, data order and augmentation (default: 0)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto (cuda when available)")
    train.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (fp16: CUDA only)")
    train.add_argument("--image-size", type=_positive(int), help="image side for folder data (default: 224)")
    train.add_argument(
        "--val-split",
        type=number(float, 0.0, 1.0, low_open=True, high_open=True),
        help="fraction of folder data held out for validation when it has no train/ and val/ (default: 0.1)",
    )
    train.add_argument("--workers", type=number(int, 0), help="DataLoader worker processes (default: 0)")
    train.add_argument(
        "--checkpoint-every", type=_positive(int), help="epochs between checkpoints; one is always written at the end (default: 1)"
    )
    train.add_argument("--allow-late-ops", action="store_true", help="train even if some ops start at or after the run's last step")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument(
        "--nproc-per-node",
        type=_positive(int),
        metavar="N",
        help="train data-parallel in N processes on this machine: runs torchrun --standalone --nproc_per_node N -m fxqp train "
        "with the other arguments (gloo on the CPU, one GPU per process with CUDA)",
    )
    train.set_defaults(func=_train)

    inspect = commands.add_parser(
        "inspect",
        help="sites, bits, sparsity and bytes of a saved artifact (no model code needed)",
        description="Print what a saved .fxqp artifact holds: per weight site its scheme, bits, shape, non-zeros, "
        "mask encoding and bytes; the activation stages; the totals. The file's digests are checked.",
    )
    inspect.add_argument("file", help="a file written by fxqp.save or fxqp train")
    inspect.set_defaults(func=_inspect)

    export = commands.add_parser(
        "export",
        help="a saved artifact as ONNX (integer weights) or a torch.export program",
        description="Load ARTIFACT into a fresh instance of its model and write it with fxqp.export_onnx "
        "(--onnx: quantized weights as INT4/INT8/UINT4/UINT8 codes feeding DequantizeLinear, activation quantizers as "
        "QuantizeLinear/DequantizeLinear pairs, batch norms folded; needs "
        "pip install 'fxqp[onnx]') or fxqp.export (--pt2: a torch.export program that runs without fxqp). "
        "The model is traced on zeros of the example inputs' shapes and dtypes that the artifact records, "
        "with a dynamic batch dimension unless --static-batch. Without --model, ARTIFACT must lie in a "
        "fxqp train output folder: its result.json says how the run built the model.",
    )
    export.add_argument("artifact", metavar="ARTIFACT", help="a file written by fxqp.save or fxqp train (model.fxqp)")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", metavar="OUT.onnx", help="write ONNX and print what is stored as integers and as float")
    target.add_argument("--pt2", metavar="OUT.pt2", help="write a torch.export program (torch.export.load(OUT.pt2).module())")
    export.add_argument(
        "--model",
        metavar="NAME",
        help=f"{_MODEL_FORMS}: the architecture ARTIFACT was saved from (default: as recorded in the result.json beside ARTIFACT)",
    )
    export.add_argument(
        "--data",
        metavar="D",
        default=None,
        help="digits | sr | sr2 | sr3 | folder:PATH: build --model for this data set's classes, channels and scale, as fxqp train does",
    )
    export.add_argument(
        "--num-classes",
        type=_positive(int),
        metavar="N",
        default=None,
        help="classes of --model when no --data (default: the data of the run beside ARTIFACT, else the factory's default)",
    )
    export.add_argument(
        "--opset", type=_positive(int), metavar="K", default=None, help="ONNX opset, at least 21 (4-bit integer weights) (default: 21)"
    )
    export.add_argument("--static-batch", action="store_true", help="the batch size of the recorded example inputs only")
    export.add_argument(
        "--linear-kernel",
        choices=("dequantize", "matmul_nbits"),
        default=None,
        help="ONNX form of quantized linear layers: DequantizeLinear feeding the float op, or ONNX Runtime's MatMulNBits (default: dequantize)",
    )
    export.add_argument(
        "--min-weight-bits",
        type=int,
        choices=(4, 8),
        default=None,
        help="4: codes of up to 4 bits as INT4/UINT4 (the smallest file); 8: every weight as 8-bit codes, "
        "which ONNX Runtime's integer kernels run (default: 4)",
    )
    export.add_argument("--sha256", metavar="HEX", default=None, help="load ARTIFACT only if its SHA-256 is HEX (fxqp inspect prints it)")
    export.set_defaults(func=_export)

    explain = commands.add_parser(
        "explain",
        help="which rule and ops each site of a model gets from a spec",
        description="Trace --model and show, per site, the rule of --spec that selects it and its ops; "
        "selectors that match nothing are reported. Exits with status 2 when fxqp.transform would reject "
        "the spec for this model (a lint for CI).",
    )
    explain.add_argument(
        "--model", required=True, help="digits-cnn | digits-vgg | espcn | torchvision:NAME | path/to/file.py:factory | module.path:factory"
    )
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
        status = args.func(args)
    except FxqpError as err:
        print(f"fxqp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unwritable --out, disk full: one line, no traceback
        print(f"fxqp {args.command}: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fxqp {args.command}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
