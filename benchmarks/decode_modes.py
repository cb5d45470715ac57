"""Decode once and cache, or decode on the fly? Inference latency and resident bytes.

resnet18 (10 classes), 4-bit weights at 50% sparsity and 8-bit activations after every
ReLU, lowered with ``decode="cache"`` (each weight decoded once into a float buffer) and
``decode="on_the_fly"`` (decoded from the packed buffers at every forward). Eval forward
latency is the median over interleaved runs, at batch 1 and batch 32 (32x32 inputs).

    python benchmarks/decode_modes.py [--repeats 30] [--out benchmarks/results/decode_modes.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torchvision
from tabulate import tabulate

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.atomic import write_json


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, persistent or not (the cached weights too)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/decode_modes.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5), Quantize(bits=4)]),
            Rule(modules=["ReLU"], activation=[Quantize(bits=8)]),
        ]
    )
    gm = fxqp.transform(model, spec)
    gm.train()
    with torch.no_grad():
        gm(torch.randn(8, 3, 32, 32))
    gm.eval()
    lowered = {mode: fxqp.lower(gm, decode=mode) for mode in ("cache", "on_the_fly")}
    model.eval()
    candidates = {"float model": model, **{f"lowered, {m}": low for m, low in lowered.items()}}
    timings: dict[tuple[str, int], list[float]] = {(name, b): [] for name in candidates for b in (1, 32)}
    inputs = {b: torch.randn(b, 3, 32, 32) for b in (1, 32)}
    with torch.inference_mode():
        for m in candidates.values():  # warm-up
            for x in inputs.values():
                m(x)
        for _ in range(args.repeats):
            for b, x in inputs.items():
                for name, m in candidates.items():
                    start = time.perf_counter()
                    m(x)
                    timings[(name, b)].append(time.perf_counter() - start)
    rows, results = [], []
    for name, m in candidates.items():
        r = {
            "model": name,
            "resident_bytes": resident_bytes(m),
            "batch1_ms": 1000 * statistics.median(timings[(name, 1)]),
            "batch32_ms": 1000 * statistics.median(timings[(name, 32)]),
        }
        results.append(r)
        rows.append([name, r["resident_bytes"], f"{r['batch1_ms']:.2f}", f"{r['batch32_ms']:.2f}"])
    print(tabulate(rows, headers=["model", "resident bytes", "batch 1 ms", "batch 32 ms"], tablefmt="github"))
    write_json(args.out, {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats, "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
