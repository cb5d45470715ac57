"""Tutorial 4 — after training: lower, save, load, inspect and export.

A transformed model still trains: it keeps float weights and recomputes masks, scales and
observers as the schedule says. For inference you freeze it:

* ``fxqp.lower(gm)`` — weights become integer codes of the last active quantizer,
  bit-packed at their width, plus the positions of the non-zeros (bitmask or Golomb-coded
  gaps, whichever is smaller); activation stages keep fixed scales and static masks. In
  eval mode the lowered model computes *exactly* the transformed model's outputs.
  ``decode="cache"`` (default) decodes each weight once and keeps the float copy (fast);
  ``decode="on_the_fly"`` keeps only the packed bytes and decodes at every forward (small);
* ``fxqp.save(low, path)`` — one safetensors file with a JSON header (spec, layouts,
  SHA-256 digests); nothing is pickled;
* ``fxqp.load(path, architecture)`` — rebuilds the lowered model into a fresh instance of
  the architecture (the file holds no code), checking every site, shape and digest;
* ``fxqp.lower.inspect.inspect_artifact(path)`` / ``fxqp inspect path`` — what a file holds,
  read from its header alone;
* ``fxqp.export(low, args, path)`` — a ``torch.export`` program that needs plain torch
  only (it decodes the packed weights inside the graph).

Run::

    python tutorials/04_lowering_saving_exporting.py [--tiny] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
import warnings
import zipfile

import torch
import torch.nn.functional as F

import fxqp
import fxqp.cli
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.data import digits
from fxqp.lower import read_header
from fxqp.lower.inspect import inspect_artifact
from fxqp.models import DigitsNet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a short training run (smoke test)")
    parser.add_argument("--out", default=None, help="folder for the .fxqp and .pt2 files (default: a new temporary folder)")
    return parser.parse_args()


def banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


@torch.no_grad()
def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x)


def ms_per_forward(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """The fastest of ``repeats`` eval forwards, in ms (the minimum is the least noisy)."""
    outputs(model, x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs(model, x)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    args = parse_args()
    out = args.out or tempfile.mkdtemp(prefix="fxqp_tutorial04_")
    os.makedirs(out, exist_ok=True)
    width = 8 if args.tiny else 32
    steps = 40 if args.tiny else 300

    # --- A trained, transformed model ---------------------------------------------------
    # 3-bit weights pruned to 60%, 8-bit ReLU outputs with 20% of them pruned, all active
    # from the middle of the run on (see tutorial 1 for the details of training).
    banner(f"training DigitsNet(width={width}) for {steps} steps")
    data = digits()
    torch.manual_seed(0)
    spec = Spec(
        rules=[
            Rule(
                modules=["Conv2d", "Linear"],
                weight=[Prune(sparsity=0.6, start=steps // 4, end=steps // 2), Quantize(bits=3, start=steps // 2)],
            ),
            Rule(
                modules=["ReLU"], functions=["relu"], activation=[Quantize(bits=8, start=steps // 4), Prune(sparsity=0.2, start=steps // 2)]
            ),
        ]
    )
    gm = fxqp.transform(DigitsNet(width=width), spec, example_inputs=(data.train_x[:2],))
    optimizer = torch.optim.Adam(gm.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    gm.train()
    for _ in range(steps):
        idx = torch.randint(len(data.train_y), (64,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(gm(data.train_x[idx]), data.train_y[idx]).backward()
        optimizer.step()
    x, y = data.test_x, data.test_y
    reference = outputs(gm, x)
    print(f"trained to step {int(gm.fxqp_schedule.step)}; test accuracy {100 * float((reference.argmax(1) == y).float().mean()):.1f}%")

    # --- Lower: the two decode modes ----------------------------------------------------
    banner("fxqp.lower: the frozen inference model")
    low = fxqp.lower(gm)  # decode="cache"
    low_otf = fxqp.lower(gm, decode="on_the_fly")
    repeats = 5 if args.tiny else 50
    for name, model in (("cache", low), ("on_the_fly", low_otf)):
        diff = float((outputs(model, x) - reference).abs().max())
        print(
            f"decode={name:<10}  max |lowered - transformed eval| = {diff:.3g}   "
            f"{ms_per_forward(model, x, repeats):6.2f} ms per forward of {len(x)} images"
        )
    # A weight of the lowered model is a PackedWeight parametrization; its repr tells the
    # scheme, bits, non-zeros and the mask encoding that was chosen.
    print("conv2's weight in the lowered model:", low.get_submodule("conv2").parametrizations["weight"][0])
    print()
    print(fxqp.summary(low))  # per-site bytes, bits/param, ratio to float32 and to the bound

    # --- Save, look inside, load back ---------------------------------------------------
    banner("fxqp.save / inspect / fxqp.load")
    path = os.path.join(out, "digits.fxqp")
    fxqp.save(low, path)
    float_bytes = 4 * sum(p.numel() for p in DigitsNet(width=width).parameters())
    print(f"saved {path}: {os.path.getsize(path):,} bytes (float32 parameters: {float_bytes:,} bytes)")
    header = read_header(path)  # the checked JSON header, as a dict
    print(
        f"header: format version {header['format_version']}, lowered at step {header['step']}, "
        f"{len(header['weights'])} weight sites, {len(header['stages'])} activation stages"
    )
    print()
    print(inspect_artifact(path))  # what `fxqp inspect PATH` prints
    # The command line does the same: `fxqp inspect PATH` in a shell. Here we call its
    # entry point in-process (fxqp.cli.main takes the argument list) and capture the output.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        status = fxqp.cli.main(["inspect", path])
    print(
        f"(`fxqp inspect {os.path.basename(path)}` exits with {status} and prints the same table: "
        f"{captured.getvalue().strip() == str(inspect_artifact(path))})"
    )

    # load needs the architecture: the file holds codes and layouts, no Python code. The
    # instance's own weights do not matter, it is only traced.
    loaded = fxqp.load(path, DigitsNet(width=width))
    print(f"\nloaded: max |loaded - lowered| = {float((outputs(loaded, x) - outputs(low, x)).abs().max()):.3g}")
    loaded_small = fxqp.load(path, DigitsNet(width=width), decode="on_the_fly")
    print(f"loaded with decode='on_the_fly': max diff = {float((outputs(loaded_small, x) - outputs(low, x)).abs().max()):.3g}")

    # Everything is checked; mistakes raise fxqp.ArtifactError naming the problem.
    try:
        fxqp.load(path, DigitsNet(width=width + 4))  # another architecture
    except fxqp.ArtifactError as err:
        print(f"\nload into DigitsNet(width={width + 4}) -> ArtifactError: {err}")
    corrupted = os.path.join(out, "corrupted.fxqp")
    raw = bytearray(open(path, "rb").read())
    raw[-10] ^= 0xFF  # flip one byte of the data
    with open(corrupted, "wb") as f:
        f.write(raw)
    try:
        fxqp.load(corrupted, DigitsNet(width=width))
    except fxqp.ArtifactError as err:
        print(f"load of a file with one flipped byte -> ArtifactError: {err}")

    # --- Export: a torch.export program -------------------------------------------------
    banner("fxqp.export: torch.export, plain torch only")
    pt2 = os.path.join(out, "digits.pt2")
    # The program is specialised to the example's shape (a batch of 50 here): run it on
    # batches of that size. (torch.export's dynamic_shapes can be passed through, but
    # torch's fake-quantize kernel, used by the frozen 8-bit activation stages, has no
    # symbolic-shape implementation, so a dynamic batch dimension fails to export here.)
    batch = 50
    with warnings.catch_warnings():
        # torch's pt2 packaging warns "No complete tensor found in the group!" for the small
        # packed buffers; the outputs below show that the program is nevertheless exact.
        warnings.filterwarnings("ignore", message="No complete tensor found")
        fxqp.export(low, (x[:batch],), pt2)
        program = torch.export.load(pt2)  # what a process without fxqp would do
    exported = program.module()
    with torch.no_grad():
        got = torch.cat([exported(x[i : i + batch]) for i in range(0, len(x) - len(x) % batch, batch)])
    diff = float((got - reference[: len(got)]).abs().max())
    with zipfile.ZipFile(pt2) as archive:
        sizes = {info.filename.split("/", 1)[1]: info.file_size for info in archive.infolist()}
    weights = sum(size for name, size in sizes.items() if name.startswith(("data/weights/weight_", "data/constants/tensor_")))
    print(
        f"exported {pt2}: {os.path.getsize(pt2):,} bytes; the packed weights and buffers are only "
        f"{weights:,} of them: the rest is the serialized graph ({sizes.get('models/model.json', 0):,} bytes) "
        f"and the example inputs ({sizes.get('data/sample_inputs/model.pt', 0):,} bytes)"
    )
    print(
        f"exported program on {len(got)} test images in batches of {batch}: max |exported - transformed| = {diff:.3g} "
        f"(equal up to float rounding: the graph decodes the weights with other ops)"
    )
    aten = sorted(
        {str(n.target).split(".")[1] for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith("aten.")}
    )
    print(f"its graph uses {len(aten)} kinds of aten ops, e.g. {', '.join(aten[:10])}, ...")


if __name__ == "__main__":
    main()
