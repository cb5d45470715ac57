"""Packed size of resnet18 (torchvision, 10 classes) at 8/4/2/1-bit weights × 0/50/90% sparsity.

For each setting: transform with ``weight=[Prune(s), Quantize(b)]`` on every Conv2d and
Linear, run one training-mode forward (the masks are computed at step 0), lower, save, and
compare the file's bytes with the float32 state_dict saved the same way (safetensors) and
with the information bound (see ``fxqp.lower.size``). Prints a table, writes JSON.

Goals: file <= 1.03 x bound for every setting; >= 10x smaller than float32 at 4-bit/50%.

    python benchmarks/packed_size.py [--out benchmarks/results/packed_size.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import safetensors.torch
import torch
import torchvision
from tabulate import tabulate

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.atomic import write_json
from fxqp.lower.size import site_sizes, total_bound_bytes

BITS = (8, 4, 2, 1)
SPARSITIES = (0.0, 0.5, 0.9)


def spec_for(bits: int, sparsity: float) -> Spec:
    ops = ([Prune(sparsity=sparsity)] if sparsity else []) + [Quantize(bits=bits)]
    return Spec(rules=[Rule(modules=["Conv2d", "Linear"], weight=ops)])


def measure(bits: int, sparsity: float, directory: str) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    float32_bytes = len(safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()}))
    gm = fxqp.transform(model, spec_for(bits, sparsity))
    gm.train()
    with torch.no_grad():
        gm(torch.randn(2, 3, 32, 32))
    gm.eval()
    start = time.perf_counter()
    low = fxqp.lower(gm)
    lower_s = time.perf_counter() - start
    path = os.path.join(directory, f"resnet18_{bits}b_{int(sparsity * 100)}.fxqp")
    fxqp.save(low, path)
    file_bytes = os.path.getsize(path)
    sizes = site_sizes(low)
    bound_bytes = total_bound_bytes(low)
    n = sum(s.n for s in sizes)
    nnz = sum(s.nnz for s in sizes)
    return {
        "bits": bits,
        "sparsity": sparsity,
        "weight_density": nnz / n,
        "file_bytes": file_bytes,
        "float32_bytes": float32_bytes,
        "x_smaller_than_float32": float32_bytes / file_bytes,
        "bound_bytes": bound_bytes,
        "file_over_bound": file_bytes / bound_bytes,
        "mask_encodings": sorted({s.encoding for s in sizes}),
        "lower_seconds": lower_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/packed_size.json", help="JSON output path")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as directory:
        for bits in BITS:
            for sparsity in SPARSITIES:
                results.append(measure(bits, sparsity, directory))
                r = results[-1]
                print(
                    f"{bits}b {sparsity:.0%}: {r['file_bytes']} bytes, x{r['x_smaller_than_float32']:.1f} vs float32, {r['file_over_bound']:.4f} x bound",
                    file=sys.stderr,
                )
    table = [
        [
            r["bits"],
            f"{r['sparsity']:.0%}",
            f"{r['weight_density']:.3f}",
            r["file_bytes"],
            f"{r['x_smaller_than_float32']:.2f}",
            f"{r['bound_bytes']:.0f}",
            f"{r['file_over_bound']:.4f}",
            ",".join(r["mask_encodings"]),
        ]
        for r in results
    ]
    print(
        tabulate(
            table,
            headers=["bits", "sparsity", "density", "file bytes", "x smaller than fp32", "bound bytes", "file / bound", "mask encodings"],
            tablefmt="github",
        )
    )
    worst = max(r["file_over_bound"] for r in results)
    four_half = next(r for r in results if r["bits"] == 4 and r["sparsity"] == 0.5)
    print(
        f"\nworst file/bound: {worst:.4f} (goal <= 1.03); 4-bit/50%: x{four_half['x_smaller_than_float32']:.2f} smaller than float32 (goal >= 10)"
    )
    write_json(args.out, {"model": "resnet18", "num_classes": 10, "torch": torch.__version__, "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
