"""The ``fxqp`` command line."""

from __future__ import annotations

import argparse
import sys

from fxqp.errors import FxqpError

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> None:
    from fxqp.demo import run_demo

    run_demo(steps=args.steps, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxqp", description="Train networks with joint quantization and pruning (torch.fx passes).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="transform a small CNN, train it on random data through a prune-then-quantize schedule, print the summary",
        description="Transform a small CNN (a reused ReLU, functional relu and a residual add), "
        "train it on random data through a prune-then-quantize schedule, print the summary.",
    )
    demo.add_argument("--steps", type=int, default=120, help="training steps (default: 120)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except FxqpError as err:
        print(f"fxqp: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
