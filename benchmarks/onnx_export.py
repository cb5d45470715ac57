"""fxqp's ONNX export on ONNX Runtime's CPU provider: file bytes, latency and fused ops.

torchvision resnet18 and mobilenet_v2 (1000 classes, untrained, seed 0: sizes and speed do
not depend on the weights' values), exported to ONNX (opset 21, dynamic batch) as

* float32 ONNX: ``torch.onnx.export(..., dynamo=True)`` of the float model (optimized by the
  exporter, as by default);
* fxqp W8A8: 8-bit symmetric per-channel weights on every Conv2d and Linear, 8-bit affine
  activations (:func:`w_a_spec`), calibrated by a few training-mode forwards without gradients
  on random images, lowered, saved (the artifact's bytes) and written by ``fxqp.export_onnx``;
* fxqp W4A8: the same with 4-bit weights;
* fxqp W4A8 + 50% filters pruned: 50% of the filters of every Conv2d but the first pruned by
  the quantization-angle criterion, with coupled channel groups; lowering removes them;
* ORT quantize_static: ONNX Runtime's own static quantization of the float32 file (QDQ,
  per-channel int8 weights, uint8 activations, calibrated on the same images), for reference.

For each file: its bytes, and for fxqp's the ratio to the fxqp artifact's bytes; the op types
of the graph ONNX Runtime runs after its optimizations (``fxqp.lower.onnx.onnxruntime_op_counts``,
``ORT_ENABLE_ALL`` as the timed sessions), e.g. ``QLinearConv`` where a quantized convolution
became one integer kernel; and, for each intra-op thread count and batch size, the median latency
of one ``InferenceSession.run`` (``ORT_ENABLE_ALL``, ``inter_op_num_threads=1``, worker
threads not spinning between runs, since the sessions take turns on the same cores). The
variants run interleaved in one process, one run each per round, in an order that rotates
every round; the ratio to float32 is the median of the per-round ratios (each against the
float run of the same round), with their minimum and maximum in the JSON.

Goals: fxqp W8A8 latency <= 0.67 x float32; fxqp W4A8 file <= 1.15 x its artifact; fxqp
W4A8 + 50% filters pruned latency <= 0.5 x float32.

Before the latency rounds, each file is run at one thread for every batch size, and the time
of the rounds is estimated from these runs and printed (``--estimate`` stops there).

    python benchmarks/onnx_export.py [--models resnet18,mobilenet_v2] [--size 224] [--threads 1,2]
        [--batches 1,32] [--rounds 20,10] [--quick] [--estimate] [--onnx-dir DIR]
        [--out benchmarks/results/onnx.json]

(The file is not named ``onnx.py``: the benchmark tests put ``benchmarks/`` on ``sys.path``,
where a module of that name would be imported in place of the onnx package.)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from tabulate import tabulate
from tqdm import tqdm

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.atomic import write_json
from fxqp.lower.onnx import onnxruntime_op_counts

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "onnx.json")
OPSET = 21
#: model → its first convolution (its filters are not pruned: they see the image)
MODELS = {"resnet18": "conv1", "mobilenet_v2": "features.0.0"}
FLOAT, W8A8, W4A8, PRUNED, PRUNED_INT8, ORT_STATIC = (
    "float32 ONNX",
    "fxqp W8A8",
    "fxqp W4A8",
    "fxqp W4A8 + 50% filters pruned",
    "fxqp W4A8 + 50% filters pruned, INT8 codes",
    "ORT quantize_static",
)
VARIANTS = (FLOAT, W8A8, W4A8, PRUNED, PRUNED_INT8, ORT_STATIC)
FXQP_VARIANTS = (W8A8, W4A8, PRUNED, PRUNED_INT8)
#: variant → (measure, largest ratio): "latency" to float32, "bytes" to the fxqp artifact
GOALS = {W8A8: ("latency", 0.67), W4A8: ("bytes", 1.15), PRUNED: ("latency", 0.5), PRUNED_INT8: ("latency", 0.5)}
#: variant → export_onnx's min_weight_bits: 4-bit codes as INT8, which ONNX Runtime's integer kernels read
MIN_WEIGHT_BITS = {PRUNED_INT8: 8}
#: how the classifier is exported (MatMulNBits measured slower than a dequantized Gemm on this CPU)
LINEAR_KERNEL = "dequantize"
#: activation sites: the outputs of these modules and functions
ACTIVATION_MODULES = ("BatchNorm2d", "ReLU", "ReLU6", "MaxPool2d", "AdaptiveAvgPool2d")
ACTIVATION_FUNCTIONS = ("relu", "add", "max_pool2d", "adaptive_avg_pool2d", "cat", "flatten")
CALIBRATION_BATCHES = 4  # training-mode forwards of 2 images each (and the same images for ORT)
WARMUP = 2  # runs of each session before its rounds (also the runs of the estimate: the last is timed)
DEFAULT_ROUNDS = {1: 20}  # batch → rounds; other batch sizes: LARGE_BATCH_ROUNDS
LARGE_BATCH_ROUNDS = 10


def norms_before_activations(model: torch.nn.Module) -> list[str]:
    """Batch norms whose output only a ReLU / ReLU6 reads: quantizing them too would put a
    quantizer between the (folded) convolution and its activation, which the runtime then
    cannot fuse; the activation's quantizer covers them."""
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    activation = (torch.nn.ReLU, torch.nn.ReLU6)
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], torch.nn.BatchNorm2d) and len(node.users) == 1:
            (user,) = node.users
            if (user.op == "call_module" and isinstance(modules[user.target], activation)) or user.target in (F.relu, torch.relu):
                names.append(node.target)
    return names


def w_a_spec(
    model: torch.nn.Module, weight_ops: Sequence, act_bits: int = 8, *, pruning: Prune | None = None, first_conv: str = ""
) -> Spec:
    """The spec of the fxqp variants: ``weight_ops`` on the weight of every Conv2d and Linear
    (with ``pruning`` first on every Conv2d but ``first_conv``), and an ``act_bits``-bit affine
    quantizer (``uint8`` at 8 bits) on the outputs of batch norms that no activation follows,
    ReLUs, pools, additions and flatten, so that the input and output of every convolution
    and linear layer but the image input and the logits are quantized, with nothing between
    a convolution and its quantizers that the runtime does not fuse."""
    rules = [Rule(modules=["Conv2d", "Linear"], weight=list(weight_ops))]
    if pruning is not None:
        rules.append(Rule(modules=["Conv2d"], exclude=[first_conv] if first_conv else [], weight=[pruning, *weight_ops]))
    rules.append(
        Rule(
            modules=list(ACTIVATION_MODULES),
            functions=list(ACTIVATION_FUNCTIONS),
            exclude=norms_before_activations(model),
            activation=[Quantize(bits=act_bits, symmetric=False)],
        )
    )
    return Spec(rules=rules)


def fxqp_spec(model: torch.nn.Module, variant: str, first_conv: str) -> Spec:
    if variant == W8A8:
        return w_a_spec(model, [Quantize(bits=8)])
    if variant == W4A8:
        return w_a_spec(model, [Quantize(bits=4)])
    if variant in (PRUNED, PRUNED_INT8):
        pruning = Prune(sparsity=0.5, structure="filter", criterion="angle")
        return w_a_spec(model, [Quantize(bits=4)], pruning=pruning, first_conv=first_conv)
    raise ValueError(variant)


def float_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=1000).eval()


def file_bytes(path: str) -> int:
    """Bytes of an ONNX file and of the external data files its initializers name."""
    model = onnx.load(path, load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(os.path.dirname(path), loc)) for loc in locations)


def export_float(name: str, example: torch.Tensor, path: str) -> dict:
    with torch.no_grad():
        torch.onnx.export(
            float_model(name),
            (example,),
            path,
            dynamo=True,
            dynamic_shapes=({0: "batch"},),
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    return {"onnx_bytes": file_bytes(path)}


def export_fxqp(name: str, variant: str, calibration: torch.Tensor, example: torch.Tensor, path: str) -> dict:
    """Transform, calibrate (training-mode forwards without gradients: the activation
    observers set their ranges, the masks are computed), lower, save and export."""
    model = float_model(name)
    gm = fxqp.transform(model, fxqp_spec(model, variant, MODELS[name]), example_inputs=(example,))
    gm.train()
    with torch.no_grad():
        for images in calibration:
            gm(images)
    gm.eval()
    low = fxqp.lower(gm)
    artifact = os.path.splitext(path)[0] + ".fxqp"
    fxqp.save(low, artifact)
    report = fxqp.export_onnx(
        low, (example,), path, opset=OPSET, min_weight_bits=MIN_WEIGHT_BITS.get(variant, 4), linear_kernel=LINEAR_KERNEL
    )
    artifact_bytes, onnx_bytes = os.path.getsize(artifact), file_bytes(path)
    return {
        "onnx_bytes": onnx_bytes,
        "artifact_bytes": artifact_bytes,
        "onnx_over_artifact": onnx_bytes / artifact_bytes,
        "integer_weights": dict(Counter(report.integer_weights.values())),
        "float_weights": report.float_weights,
        "float_activation_stages": len(report.float_activations),
        "float_activation_ops": sorted(set(report.float_activations.values())),
    }


class _Images(CalibrationDataReader):
    def __init__(self, input_name: str, calibration: torch.Tensor):
        self.batches = iter([{input_name: images.numpy()} for images in calibration])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def export_ort_static(float_path: str, calibration: torch.Tensor, path: str) -> dict:
    """ONNX Runtime's static quantization of the float32 file, after its recommended
    pre-processing (shape inference and graph optimization)."""
    prepared = os.path.splitext(path)[0] + ".pre.onnx"
    quant_pre_process(float_path, prepared)
    input_name = onnx.load(prepared, load_external_data=False).graph.input[0].name
    quantize_static(
        prepared,
        path,
        _Images(input_name, calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return {"onnx_bytes": file_bytes(path)}


def fused_ops(path: str) -> dict[str, int]:
    """Op types (and how many of each, most first, without their domains) of the graph ONNX
    Runtime's CPU provider runs for the file at ``path`` (:func:`onnxruntime_op_counts`)."""
    counts: Counter = Counter()
    for op, n in onnxruntime_op_counts(path).items():
        counts[op.rpartition(".")[2]] += n
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def ops_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in counts.items())


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class Runner:
    """One session and its input: ``run()`` times one ``session.run`` in seconds."""

    def __init__(self, path: str, threads: int, images: np.ndarray):
        self.session = session(path, threads)
        self.feed = {self.session.get_inputs()[0].name: images}

    def run(self) -> float:
        start = time.perf_counter()
        self.session.run(None, self.feed)
        return time.perf_counter() - start

    def warm_up(self) -> float:
        """``WARMUP`` runs; the time of the last."""
        return [self.run() for _ in range(WARMUP)][-1]


def interleaved(runners: dict[str, Runner], rounds: int, progress: tqdm | None = None) -> dict[str, list[float]]:
    """Seconds of each runner's run in each round: every runner once per round, the order
    rotated by one place every round."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(runners[name].run())
        if progress is not None:
            progress.update()
    return times


def per_round_ratios(times: list[float], baseline: list[float]) -> dict[str, float]:
    """Median, minimum and maximum of ``times[i] / baseline[i]`` (the same round's runs)."""
    ratios = [t / b for t, b in zip(times, baseline, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def images(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)


def rounds_for(batches: list[int], rounds: list[int] | None) -> dict[int, int]:
    if rounds is None:
        return {b: DEFAULT_ROUNDS.get(b, LARGE_BATCH_ROUNDS) for b in batches}
    if len(rounds) == 1:
        return dict.fromkeys(batches, rounds[0])
    if len(rounds) != len(batches):
        raise SystemExit(f"--rounds: give one number, or one per batch size ({len(batches)}), not {len(rounds)}")
    return dict(zip(batches, rounds))


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "fxqp": getattr(fxqp, "__version__", "?"),
    }


def build(name: str, size: int, directory: str, progress: tqdm) -> dict[str, dict]:
    """Every variant's ONNX file (and fxqp artifact) in ``directory``; the facts of each."""
    g = torch.Generator().manual_seed(1)
    calibration = torch.randn(CALIBRATION_BATCHES, 2, 3, size, size, generator=g)
    example = calibration[0, :1]
    rows: dict[str, dict] = {}
    for variant in VARIANTS:
        progress.set_postfix_str(f"{name}: {variant}")
        path = os.path.join(directory, f"{name}.{variant.replace(' ', '_').replace('%', '')}.onnx")
        start = time.perf_counter()
        if variant == FLOAT:
            row = export_float(name, example, path)
        elif variant == ORT_STATIC:
            row = export_ort_static(rows[FLOAT]["path"], calibration, path)
        else:
            row = export_fxqp(name, variant, calibration, example, path)
        row["path"] = path
        row["build_seconds"] = time.perf_counter() - start
        row["fused_ops"] = fused_ops(path)
        rows[variant] = row
        progress.update()
    return rows


def estimate(files: dict[str, dict[str, dict]], size: int, threads: list[int], rounds: dict[int, int]) -> tuple[float, dict]:
    """Seconds of the latency rounds (sessions and warm-ups included) and the seconds of each
    file's run at one thread for every batch size (after a warm-up run), from which they are
    estimated; a run at more threads is counted as one at one thread."""
    seconds: dict = {}
    total = 0.0
    for name, rows in tqdm(files.items(), desc="estimate", file=sys.stderr):
        seconds[name] = {}
        for batch in rounds:
            x = images(batch, size, seed=0)
            start = time.perf_counter()
            runners = {variant: Runner(row["path"], 1, x) for variant, row in rows.items()}
            created = time.perf_counter() - start
            each = {variant: runner.warm_up() for variant, runner in runners.items()}
            seconds[name][batch] = each
            total += len(threads) * (created + (rounds[batch] + WARMUP) * sum(each.values()))
    return total, seconds


def measure(files: dict[str, dict[str, dict]], size: int, threads: list[int], rounds: dict[int, int]) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    configs = [(name, t, b) for name in files for t in threads for b in rounds]
    progress = tqdm(total=sum(rounds[b] for _, _, b in configs), desc="latency rounds", file=sys.stderr)
    for name, t, batch in configs:
        progress.set_postfix_str(f"{name}, {t} thread(s), batch {batch}")
        x = images(batch, size, seed=0)
        runners = {variant: Runner(row["path"], t, x) for variant, row in files[name].items()}
        for runner in runners.values():
            runner.warm_up()
        times = interleaved(runners, rounds[batch], progress)
        variants = {}
        for variant in VARIANTS:
            variants[variant] = {
                "median_ms": 1000 * statistics.median(times[variant]),
                "vs_float": per_round_ratios(times[variant], times[FLOAT]),
                "ms": [1000 * s for s in times[variant]],
            }
        results.setdefault(name, []).append({"threads": t, "batch": batch, "rounds": rounds[batch], "variants": variants})
        del runners
    progress.close()
    return results


def goal_text(variant: str, measure_: str, value: float) -> str:
    """`` (goal ≤ limit: pass)`` (or ``miss``) where the variant has a goal on this measure, else ``""``."""
    kind, limit = GOALS.get(variant, ("", 0.0))
    return f" (goal ≤ {limit:.2f}: {'pass' if value <= limit else 'miss'})" if kind == measure_ else ""


def check_goals(name: str, rows: dict[str, dict], latency: list[dict]) -> list[str]:
    """Marks each goal's row ``"goal": True/False`` and returns the misses, described."""
    misses = []
    for variant, (kind, limit) in GOALS.items():
        if kind == "bytes":
            value = rows[variant]["onnx_over_artifact"]
            rows[variant]["goal"] = value <= limit
            if value > limit:
                misses.append(f"{name} {variant}: file {value:.2f} × its artifact")
            continue
        for config in latency:
            value = config["variants"][variant]["vs_float"]["median"]
            config["variants"][variant]["goal"] = value <= limit
            if value > limit:
                misses.append(f"{name} {variant}: {value:.2f} × float latency at {config['threads']} thread(s), batch {config['batch']}")
    return misses


def table(name: str, rows: dict[str, dict], config: dict) -> str:
    lines = []
    for variant in VARIANTS:
        row, latency = rows[variant], config["variants"][variant]
        ratio = latency["vs_float"]["median"]
        over = row.get("onnx_over_artifact")
        lines.append(
            [
                variant,
                f"{row['onnx_bytes']:,}",
                "-" if over is None else f"{over:.2f}{goal_text(variant, 'bytes', over)}",
                f"{latency['median_ms']:.2f}",
                "1.00"
                if variant == FLOAT
                else f"{ratio:.2f}" + (" (reference)" if variant == ORT_STATIC else goal_text(variant, "latency", ratio)),
            ]
        )
    return tabulate(
        lines,
        headers=[f"{name}: variant", "ONNX file bytes", "× fxqp artifact", "latency ms", "× float ONNX"],
        tablefmt="github",
        disable_numparse=True,
        colalign=("left", "right", "left", "right", "left"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    parser.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
    parser.add_argument(
        "--rounds",
        default=None,
        help=f"latency rounds: one number, or one per batch size (default {DEFAULT_ROUNDS[1]} at batch 1, {LARGE_BATCH_ROUNDS} at others)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: --size 64 --threads 1 --batches 1,2 --rounds 3")
    parser.add_argument("--estimate", action="store_true", help="build the files, print the estimate of the latency rounds, stop")
    parser.add_argument("--onnx-dir", default=None, help="keep the ONNX files and artifacts here (default: a temporary folder)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.threads, args.batches, args.rounds = 64, "1", "1,2", "3"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rounds = rounds_for(batches, None if args.rounds is None else [int(r) for r in args.rounds.split(",")])
    env = environment()
    print(
        f"{env['date']}; {env['cpu']} ({env['cpu_count']} CPUs); torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
        f"onnx {env['onnx']}; {args.size}×{args.size} px, threads {threads}, batches {batches}, rounds {rounds}"
    )

    with tempfile.TemporaryDirectory() as scratch:
        directory = args.onnx_dir or scratch
        os.makedirs(directory, exist_ok=True)
        start = time.perf_counter()
        with tqdm(total=len(models) * len(VARIANTS), desc="build", file=sys.stderr) as progress:
            files = {name: build(name, args.size, directory, progress) for name in models}
        built = time.perf_counter() - start
        start = time.perf_counter()
        remaining, probe = estimate(files, args.size, threads, rounds)
        probed = time.perf_counter() - start
        print(
            f"files built in {built / 60:.1f} min, probe runs {probed / 60:.1f} min; latency rounds estimated at "
            f"{remaining / 60:.1f} min (more threads counted as one); whole run ≈ {(built + probed + remaining) / 60:.1f} min"
        )
        if args.estimate:
            for name in probe:
                for batch, each in probe[name].items():
                    line = ", ".join(f"{v} {1000 * s:.1f}" for v, s in each.items())
                    print(f"{name}, batch {batch}, 1 thread, ms: {line}")
            return 0
        start = time.perf_counter()
        latency = measure(files, args.size, threads, rounds)
        measured = time.perf_counter() - start

    results: dict = {
        "environment": env,
        "size": args.size,
        "opset": OPSET,
        "threads": threads,
        "batches": batches,
        "rounds": {str(b): r for b, r in rounds.items()},
        "goals": {v: {"measure": kind, "at_most": limit} for v, (kind, limit) in GOALS.items()},
        "build_seconds": built,
        "latency_seconds": {
            "estimated": remaining,
            "measured": measured,
            "one_thread_ms": {
                name: {str(b): {v: 1000 * t for v, t in each.items()} for b, each in per.items()} for name, per in probe.items()
            },
        },
        "models": {},
    }
    misses = []
    for name in models:
        rows = {variant: {k: v for k, v in row.items() if k != "path"} for variant, row in files[name].items()}
        misses += check_goals(name, rows, latency[name])
        for config in latency[name]:
            print(f"\n{name}, {args.size}×{args.size}, {config['threads']} thread(s), batch {config['batch']}, {config['rounds']} rounds")
            print(table(name, rows, config))
        print(f"\n{name}: ops of ONNX Runtime's optimized graphs")
        for variant in VARIANTS:
            print(f"  {variant}: {ops_line(rows[variant]['fused_ops'])}")
        for variant in FXQP_VARIANTS:
            row = rows[variant]
            print(
                f"  {variant} export: {sum(row['integer_weights'].values())} integer weights "
                f"({', '.join(f'{k} {n}' for k, n in row['integer_weights'].items())}), {len(row['float_weights'])} float weights, "
                f"{row['float_activation_stages']} activation stages as float ops"
            )
        results["models"][name] = {"first_conv": MODELS[name], "variants": rows, "latency": latency[name]}
    print("\ngoals missed: " + ("; ".join(misses) if misses else "none"))
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
