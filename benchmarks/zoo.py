"""Model-zoo sweep: fxqp's full pipeline over torchvision's model zoo.

Every classification model (``torchvision.models.list_models(module=torchvision.models)``)
is built untrained (``weights=None``, 10 classes, batch 2, small inputs: see
``fxqp.testing.zoo.build``), transformed with ``fxqp.testing.zoo.ZOO_SPEC`` (all weights
and all activations quantized to 8 bits and pruned), trained one SGD step on
``mean(out**2)``, lowered, and the lowered eval output compared with the transformed eval
output (pass: max abs diff <= 1e-5 and no exception).

Optional extra sweeps:

* ``--segmentation``: ``torchvision.models.segmentation`` at 2x3x64x64, output ``["out"]``
  (``aux_loss=False``);
* ``--video``: ``torchvision.models.video`` at 2x3x4x32x32 (mvit/s3d at the smallest sizes
  that run);
* ``--timm``: the timm architectures of ``fxqp.testing.zoo.TIMM_MODELS`` (one or two per
  family, untrained, 64x64 inputs where the model accepts them), with the activation
  coverage: activation sites found over the activation calls one eval forward makes
  (``fxqp.testing.zoo.count_activation_calls``), the activation modules hidden in leaves, and
  whether two eval forwards agree;
* ``--hf``: the Hugging Face models of ``fxqp.testing.zoo.HF_MODELS`` (BERT, DistilBERT,
  GPT-2, Llama, T5, ViT, Whisper, Wav2Vec2; small configurations, keyword example inputs,
  ``fxqp.testing.zoo.HF_SPEC``), with the same coverage columns;
* ``--detection``: every whole detector of ``torchvision.models.detection``
  (``fxqp.testing.zoo.sweep_detector``): their root iterates the list of images, so they are
  traced in parts; each is transformed with ``ZOO_SPEC``, trains one step with targets,
  evaluates twice, is lowered (lowered = eval, exactly), saved and loaded into a fresh
  instance (loaded = lowered); the table gives the parts traced, the modules left
  untraced and the activation calls covered (stages run over activation calls made, one
  eval forward). Then each detector's backbone alone is transformed in place, the detector
  trains one step, and the lowered backbone is compared with the eval backbone.

Each model is swept in a fresh worker process (``fxqp.testing.zoo.sweep_isolated``);
``--in-process`` sweeps them all in this one.

    python benchmarks/zoo.py [--only resnet18,vgg11] [--segmentation] [--detection]
                             [--video] [--timm] [--hf] [--no-classification] [--repeats 3] [--in-process]
                             [--out benchmarks/results/zoo.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torchvision
from tabulate import tabulate
from tqdm import tqdm

from fxqp.atomic import write_json
from fxqp.testing.zoo import (
    BATCH,
    HF_MODELS,
    NUM_CLASSES,
    TIMM_MODELS,
    _empty_row,
    _error,
    classification_models,
    detector_train_step,
    sweep_detector,
    sweep_hf,
    sweep_isolated,
    sweep_model,
    sweep_one,
    sweep_timm,
    time_transform,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "zoo.json")


def _segmentation(name: str) -> tuple[torch.nn.Module, Any, bool]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False)
    return model, torch.randn(BATCH, 3, 64, 64), True


def _video(name: str) -> tuple[torch.nn.Module, Any, bool]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    if name.startswith("mvit"):
        x = torch.randn(BATCH, 3, 16, 224, 224)  # mvit's positional embeddings fix T x H x W
    elif name == "s3d":
        x = torch.randn(BATCH, 3, 16, 224, 224)  # its final 2x7x7 average pool fixes 16x224x224
    else:
        x = torch.randn(BATCH, 3, 4, 32, 32)
    return model, x, True


DETECTION_SIZE = 128


def _detection_backbone(name: str, repeats: int = 1) -> dict[str, Any]:
    """The backbone alone (the bulk of the weights), transformed in place:
    ``model.backbone = fxqp.transform(model.backbone, spec)``. Then one
    training step of the whole detector on a random box target, and lowered vs eval
    backbone outputs on the backbone's input batch."""
    import fxqp
    from fxqp.testing.zoo import TOLERANCE, ZOO_SPEC, _first_tensor, count_sites

    row = _empty_row(f"{name}.backbone")
    try:
        torch.manual_seed(0)
        kwargs: dict[str, Any] = {"min_size": DETECTION_SIZE, "max_size": DETECTION_SIZE}
        try:
            model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **kwargs)
        except TypeError:  # SSD models fix their input size
            model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
        images = [torch.rand(3, DETECTION_SIZE, DETECTION_SIZE) for _ in range(BATCH)]
        model.eval()
        batch = model.transform(images)[0].tensors  # what the backbone sees
        copied = copy.deepcopy(model.backbone)
        time_transform(row, copied, repeats=repeats)  # as in sweep_model
        del copied
        backbone = fxqp.transform(model.backbone, ZOO_SPEC, example_inputs=(batch,))
        row["params"] = sum(p.numel() for p in backbone.parameters())
        row["nodes"] = len(backbone.graph.nodes)
        row["transform_s_per_1000_nodes"] = row["transform_s"] / row["nodes"] * 1000
        row["weight_sites"], row["activation_sites"] = count_sites(backbone)
        row["fallback_leaves"] = list(backbone.fxqp_schedule.fallback_leaves)
        model.backbone = backbone
        targets = [{"boxes": torch.tensor([[8.0, 8.0, 72.0, 80.0]]), "labels": torch.tensor([1])} for _ in images]
        if name.startswith("keypointrcnn"):
            for t in targets:
                t["keypoints"] = torch.tensor([[[20.0, 20.0, 1.0]] * 17])
        if name.startswith("maskrcnn"):
            for t in targets:
                mask = torch.zeros(1, DETECTION_SIZE, DETECTION_SIZE, dtype=torch.uint8)
                mask[:, 8:80, 8:72] = 1
                t["masks"] = mask
        row["step_s"] = detector_train_step(model, images, targets)
        model.eval()
        with torch.no_grad():
            model(images)  # the whole detector runs with the transformed backbone
            t0 = time.perf_counter()
            low = fxqp.lower(backbone)
            row["lower_s"] = time.perf_counter() - t0
            low.eval()
            batch = model.transform(images)[0].tensors
            row["max_abs_diff"] = float((_first_tensor(low(batch)) - _first_tensor(backbone(batch))).abs().max())
        row["passed"] = row["max_abs_diff"] <= TOLERANCE
        if not row["passed"]:
            row["error"] = f"max_abs_diff {row['max_abs_diff']:.3g} > {TOLERANCE:g}"
    except Exception as e:  # noqa: BLE001 - the sweep records every failure
        row["error"] = _error(e)
    return row


def _sweep_task(name: str, make: Callable[[str], tuple[torch.nn.Module, Any, bool]], repeats: int = 1) -> dict[str, Any]:
    try:
        model, x, train = make(name)
    except Exception as e:  # noqa: BLE001 - the sweep records every failure
        row = _empty_row(name)
        row["error"] = _error(e)
        return row
    return sweep_model(name, model, x, train=train, timing_repeats=repeats)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def report(title: str, rows: list[dict[str, Any]]) -> None:
    """Print the table and the summary of one sweep."""
    table = [
        [
            r["model"],
            _fmt(r["nodes"]),
            _fmt(None if r.get("params") is None else r["params"] / 1e6, 1),
            _fmt(r.get("copy_s")),
            f"{_fmt(r['weight_sites'])}/{_fmt(r['activation_sites'])}",
            ", ".join(r["fallback_leaves"] or []) or "-",
            _fmt(r["transform_s"]),
            _fmt(r["transform_s_per_1000_nodes"]),
            _fmt(r.get("fx_trace_s")),
            _fmt(r.get("transform_x_fx_trace"), 1),
            "-" if r.get("activation_coverage") is None else f"{r['activation_coverage']:.0%} of {r['activation_calls']}",
            _fmt(r.get("hidden_activations")),
            _fmt(r.get("eval_repeatable")),
            "pass" if r["passed"] else "FAIL",
            (r["error"] or "")[:120],
        ]
        for r in rows
    ]
    print(f"\n## {title}\n")
    headers = [
        "model",
        "nodes",
        "M params",
        "copy s",
        "sites (w/a)",
        "fallback leaves",
        "transform s",
        "s / 1000 nodes",
        "fx trace s",
        "x fx trace",
        "activation calls covered",
        "hidden in leaves",
        "eval repeatable",
        "result",
        "error",
    ]
    print(tabulate(table, headers=headers, tablefmt="github"))
    passed = sum(r["passed"] for r in rows)
    print(f"\npassed {passed}/{len(rows)}")
    covered = [r["activation_coverage"] for r in rows if r.get("activation_coverage") is not None]
    if covered:
        full = sum(c >= 1.0 for c in covered)
        print(f"activation calls covered: all in {full}/{len(covered)} models, mean {statistics.mean(covered):.1%}, min {min(covered):.1%}")
    per_k = [r["transform_s_per_1000_nodes"] for r in rows if r["transform_s_per_1000_nodes"] is not None]
    if per_k:
        print(f"transform s per 1000 nodes: mean {statistics.mean(per_k):.3f}, max {max(per_k):.3f}, median {statistics.median(per_k):.3f}")
    ratios = [r["transform_x_fx_trace"] for r in rows if r.get("transform_x_fx_trace") is not None]
    if ratios:
        print(
            f"transform time / plain torch.fx.symbolic_trace time (same model, measured just before): "
            f"median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f} over {len(ratios)} models"
        )
    pairs = sorted((r["nodes"], r["transform_s"], r["model"]) for r in rows if r["nodes"] is not None)
    if len(pairs) >= 2:
        print("(nodes, transform s) sorted by nodes:")
        print("  " + ", ".join(f"({n}, {s:.3f})" for n, s, _ in pairs))
        n = [p[0] for p in pairs]
        s = [p[1] for p in pairs]
        if len(set(n)) > 1:
            slope, intercept = statistics.linear_regression(n, s)
            r = statistics.correlation(n, s)
            print(
                f"least squares: s = {slope * 1000:.3f} * nodes/1000 + {intercept:.3f}; Pearson r = {r:.3f} "
                f"({'roughly linear' if r >= 0.8 else 'not clearly linear'} in graph size)"
            )
    both = [(r["nodes"], r["params"], r["transform_s"]) for r in rows if r["nodes"] is not None and r.get("params") is not None]
    if len(both) >= 4:
        a = torch.tensor([[n / 1000, p / 1e6, 1.0] for n, p, _ in both], dtype=torch.float64)
        y = torch.tensor([[t] for _, _, t in both], dtype=torch.float64)
        coef = torch.linalg.lstsq(a, y).solution.flatten().tolist()
        fit = a @ torch.tensor(coef, dtype=torch.float64)
        r2 = 1 - float(((y.flatten() - fit) ** 2).sum() / ((y - y.mean()) ** 2).sum())
        print(f"two-term fit: s = {coef[0]:.3f} * nodes/1000 + {coef[1]:.4f} * Mparams + {coef[2]:.3f}; R^2 = {r2:.3f}")


def report_detectors(title: str, rows: list[dict[str, Any]]) -> None:
    """Print the table of the whole-detector sweep (:func:`fxqp.testing.zoo.sweep_detector`)."""
    table = [
        [
            r["model"],
            _fmt(None if r.get("params") is None else r["params"] / 1e6, 1),
            len(r.get("parts") or []),
            ", ".join(p or "(root)" for p in r.get("untraced") or []) or "-",
            f"{_fmt(r['weight_sites'])}/{_fmt(r['activation_sites'])}",
            "-" if r.get("activation_coverage") is None else f"{r['activation_coverage']:.0%} of {r['activation_calls']}",
            _fmt(r.get("hidden_activations")),
            _fmt(r.get("eval_repeatable")),
            _fmt(r.get("max_abs_diff")),
            _fmt(r.get("round_trip")),
            _fmt(r.get("transform_s"), 2),
            _fmt(r.get("step_s"), 2),
            "pass" if r["passed"] else "FAIL",
            (r["error"] or "")[:120],
        ]
        for r in rows
    ]
    print(f"\n## {title}\n")
    headers = [
        "model",
        "M params",
        "parts",
        "left untraced",
        "sites (w/a)",
        "activation calls covered",
        "hidden",
        "eval repeatable",
        "lowered - eval",
        "loaded = lowered",
        "transform s",
        "train step s",
        "result",
        "error",
    ]
    print(tabulate(table, headers=headers, tablefmt="github"))
    print(f"\npassed {sum(r['passed'] for r in rows)}/{len(rows)}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model names (any task)")
    parser.add_argument("--segmentation", action="store_true")
    parser.add_argument("--detection", action="store_true")
    parser.add_argument("--video", action="store_true")
    parser.add_argument("--timm", action="store_true", help="sweep fxqp.testing.zoo.TIMM_MODELS")
    parser.add_argument("--hf", action="store_true", help="sweep fxqp.testing.zoo.HF_MODELS")
    parser.add_argument("--no-classification", action="store_true", help="skip the classification sweep")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument(
        "--repeats", type=int, default=3, help="time each transform (and fx trace) this many times, on fresh copies, and keep the best"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="sweep every model in this process (default: each in a fresh worker process, so memory is returned "
        "between models and a worker killed for memory is a failed row, not the end of the sweep)",
    )
    args = parser.parse_args(argv)
    only = {n for n in args.only.split(",") if n}

    tasks: list[tuple[str, list[str], Callable[[str], dict[str, Any]]]] = []
    if not args.no_classification:
        tasks.append(("classification", classification_models(), functools.partial(sweep_one, timing_repeats=args.repeats)))
    M = torchvision.models
    for flag, title, module, make in (
        (args.segmentation, "segmentation", M.segmentation, _segmentation),
        (args.video, "video", M.video, _video),
    ):
        if flag:
            tasks.append((title, M.list_models(module=module), functools.partial(_sweep_task, make=make, repeats=args.repeats)))
    if args.timm:
        tasks.append(("timm", list(TIMM_MODELS), functools.partial(sweep_timm, timing_repeats=args.repeats)))
    if args.hf:
        tasks.append(("Hugging Face", list(HF_MODELS), functools.partial(sweep_hf, timing_repeats=args.repeats)))
    if args.detection:
        tasks.append(("whole detectors", M.list_models(module=M.detection), sweep_detector))
        tasks.append(
            ("detection backbones", M.list_models(module=M.detection), functools.partial(_detection_backbone, repeats=args.repeats))
        )

    def write() -> None:
        write_json(args.out, results)

    results: dict[str, Any] = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "threads": torch.get_num_threads(),
        "timing_repeats": args.repeats,
    }
    exit_code = 0
    for title, names, fn in tasks:
        if only:
            names = [n for n in names if n in only]
        if not names:
            continue
        t0 = time.perf_counter()
        rows: list[dict[str, Any]] = []
        results[title] = {"wall_s": None, "rows": rows}
        for name in tqdm(names, desc=title, file=sys.stderr):
            rows.append(fn(name) if args.in_process else sweep_isolated(name, fn))
            write()  # partial results survive an interrupted sweep
        wall = time.perf_counter() - t0
        (report_detectors if title == "whole detectors" else report)(title, rows)
        print(f"wall time: {wall:.1f} s")
        results[title] = {"wall_s": wall, "rows": rows}
        exit_code |= not all(r["passed"] for r in rows)

    write()
    print(f"\nwrote {args.out}")
    return int(exit_code)


if __name__ == "__main__":
    sys.exit(main())
