"""Filter pruning of low-precision resnet18: parameters, MACs, bytes and latency.

torchvision resnet18 (1000 classes, untrained: sizes and speed do not depend on the
weights), every Conv2d but the first quantized to binary (XNOR-Net scales) or 2-bit
DoReFa, the first conv and the classifier kept in float as in the seed paper; filters of
the quantized convolutions pruned at 0 / 25 / 50% with the quantization-angle criterion and
coupled channel groups (``fxqp.transform(..., example_inputs=...)``), then lowered, which
removes the pruned channels. For each variant: parameters and multiply-accumulates of the
lowered model (one 224×224 image), bytes of the saved artifact, size by the seed paper's
convention, and the median CPU latency of the lowered model (decode="cache") at batch 1,
interleaved with the float model in one run.

    python benchmarks/structured.py [--rounds 15] [--size 224] [--out benchmarks/results/structured.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchvision
from tabulate import tabulate
from torch import nn
from tqdm import tqdm

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.atomic import write_json
from fxqp.lower.artifact import serialize
from fxqp.lower.shrink import count_macs
from fxqp.lower.size import MB, parameter_count, seed_size_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "structured.json")
QUANTIZERS = {"binary": Quantize(bits=1, method="binary"), "2-bit dorefa": Quantize(bits=2, method="dorefa")}
SPARSITIES = (0.0, 0.25, 0.5)


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward (convolutions and linear layers), per image."""
    return count_macs(model, [x[:1]])


def build(quantizer: Quantize, sparsity: float, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    ops = [quantizer] if sparsity == 0 else [Prune(sparsity=sparsity, structure="filter", criterion="angle"), quantizer]
    spec = Spec(rules=[Rule(modules=["Conv2d"], exclude=["conv1"], weight=ops)])
    gm = fxqp.transform(torchvision.models.resnet18(), spec, example_inputs=(x[:1],))
    gm.train()
    with torch.no_grad():
        gm(x[:2])  # one training forward: the masks are computed (start 0)
    gm.eval()
    return fxqp.lower(gm)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds (median)")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    x = torch.randn(2, 3, args.size, args.size)

    torch.manual_seed(0)
    float_model = torchvision.models.resnet18().eval()
    variants: dict[str, nn.Module] = {}
    rows: dict[str, dict] = {
        "float": {
            "params": sum(p.numel() for p in float_model.parameters()),
            "macs": macs(float_model, x),
            "file_bytes": None,
            "seed_mb": 4 * sum(p.numel() for p in float_model.parameters()) / MB,
        }
    }
    for qname, quantizer in tqdm(QUANTIZERS.items(), desc="variants", file=sys.stderr):
        for sparsity in SPARSITIES:
            name = f"{qname}, {sparsity:.0%} filters"
            low = build(quantizer, sparsity, x)
            variants[name] = low
            rows[name] = {
                "params": parameter_count(low),
                "macs": macs(low, x),
                "file_bytes": len(serialize(low)),
                "seed_mb": seed_size_bytes(low) / MB,
            }
    models = {"float": float_model, **variants}
    times: dict[str, list[float]] = {k: [] for k in models}
    one = x[:1]
    with torch.no_grad():
        for model in models.values():
            model(one)  # warm-up
        for _ in tqdm(range(args.rounds), desc="latency", file=sys.stderr):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(one)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["float"])
    table = []
    for name, row in rows.items():
        row["latency_ms"] = 1000 * statistics.median(times[name])
        row["latency_vs_float"] = statistics.median(times[name]) / base
        table.append(
            [
                name,
                f"{row['params']:,}",
                f"{row['macs'] / 1e6:,.0f}",
                "-" if row["file_bytes"] is None else f"{row['file_bytes']:,}",
                f"{row['seed_mb']:.2f}",
                f"{row['latency_ms']:.1f}",
                f"{row['latency_vs_float']:.2f}",
            ]
        )
    print(
        tabulate(
            table,
            headers=[
                "resnet18 variant",
                "params",
                "MMACs",
                "artifact bytes",
                "seed-convention MB",
                f"batch-1 ms ({args.size}px)",
                "x float",
            ],
            tablefmt="github",
        )
    )
    write_json(args.out, {"torch": torch.__version__, "threads": torch.get_num_threads(), "size": args.size, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
