"""PNG plots of a transformed model, its schedule and the experiment's runs (matplotlib).

Every function writes one PNG file atomically and returns its path; figures are closed, and
the non-interactive ``Agg`` backend is used, so nothing needs a display.

* :func:`plot_sites` — per-site bits and sparsity (bar chart);
* :func:`plot_schedule` — when each op of a spec switches on, and the sparsity ramps;
* :func:`plot_curves` — training loss and test metric per epoch, one line per run;
* :func:`plot_size_tradeoff` — test metric against packed artifact size, all runs;
* :func:`plot_history`, :func:`plot_pareto`, :func:`plot_ratios` — a search's trials, its
  Pareto front with reference points, and the per-layer ratios it found.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from fxqp.atomic import write_atomically
from fxqp.spec import Prune, Spec

__all__ = ["plot_sites", "plot_schedule", "plot_curves", "plot_size_tradeoff", "plot_history", "plot_pareto", "plot_ratios", "ramp"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> str:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    write_atomically(path, buffer.getvalue())
    return os.fspath(path)


def _number(value: Any) -> float:
    """``8`` → 8.0, ``"50.0%"`` → 0.5, ``"—"``/None → 0.0 (a summary cell)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.endswith("%"):
        return float(value[:-1]) / 100.0
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def plot_sites(model: Any, path: str | os.PathLike, title: str | None = None) -> str:
    """Bars of the bits (left axis) and the actual sparsity (right panel) of every site of a
    transformed model (from :func:`fxqp.summary`); 32 bits stands for "not quantized"."""
    from fxqp.report import summary

    rows = summary(model).to_dicts()
    names = [f"{r['site']} ({r['kind'][0]})" for r in rows]
    bits = [_number(r["bits"]) or 32.0 for r in rows]
    sparsity = [100 * _number(r["actual"]) for r in rows]
    plt = _pyplot()
    height = max(2.5, 0.28 * len(rows) + 1.2)
    fig, (ax_bits, ax_sparse) = plt.subplots(1, 2, figsize=(10, height), sharey=True)
    y = range(len(rows))
    colors = ["tab:blue" if r["kind"] == "weight" else "tab:orange" for r in rows]
    ax_bits.barh(y, bits, color=colors)
    ax_bits.set_yticks(list(y), names, fontsize=8)
    ax_bits.invert_yaxis()
    ax_bits.set_xlabel("bits (32 = float)")
    ax_sparse.barh(y, sparsity, color=colors)
    ax_sparse.set_xlim(0, 100)
    ax_sparse.set_xlabel("actual sparsity %")
    fig.suptitle(title or "per-site bits and sparsity (blue: weights, orange: activations)")
    return _save(fig, path)


def ramp(op: Prune, step: int) -> float:
    """Target sparsity of ``op`` at ``step``: 0 before ``start``, the cubic AGP ramp
    ``s·(1 − (1 − (t − start)/(end − start))³)`` up to ``end``, then ``s``."""
    if step < op.start:
        return 0.0
    if op.end is None or step >= op.end:
        return float(op.sparsity)
    frac = (step - op.start) / (op.end - op.start)
    return float(op.sparsity) * (1.0 - (1.0 - frac) ** 3)


def plot_schedule(spec: Spec, steps: int, path: str | os.PathLike, title: str | None = None) -> str:
    """The schedule as a timeline: one row per (rule, kind, op) with a bar from the op's
    start to the end of training, and each pruning op's sparsity ramp drawn inside its row;
    fractions of the run (``"40%"``) are resolved against ``steps``."""
    spec = spec.resolve(steps)
    plt = _pyplot()
    lanes = []
    for index, rule in enumerate(spec.rules):
        for kind, ops in (("weight", rule.weight), ("activation", rule.activation)):
            for position, op in enumerate(ops or ()):
                lanes.append((f"rules[{index}].{kind}[{position}]: {op.kind}", op))
    fig, ax = plt.subplots(figsize=(10, max(2.0, 0.45 * len(lanes) + 1.2)))
    for lane, (label, op) in enumerate(lanes):
        color = "tab:green" if op.kind == "prune" else "tab:purple"
        ax.broken_barh([(op.start, max(steps - op.start, 0))], (lane - 0.4, 0.8), facecolors=color, alpha=0.25)
        if isinstance(op, Prune):
            xs = list(range(0, steps + 1, max(1, steps // 200)))
            ax.plot(xs, [lane + 0.4 - 0.8 * ramp(op, x) / max(op.sparsity, 1e-9) for x in xs], color=color)
            label += f" {op.sparsity:g}"
        else:
            label += f" {op.bits}b"
        ax.text(op.start, lane, f" {label}", va="center", fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, steps)
    ax.set_xlabel("training step")
    ax.set_title(title or "schedule: ops switch on at their start (bars); pruning ramps (lines, down = sparser)")
    return _save(fig, path)


def plot_curves(runs: Sequence[Any], path: str | os.PathLike, metric: str = "metric", title: str | None = None) -> str:
    """Training loss and test metric per epoch, one line per run (``RunResult`` objects or
    dicts with ``order``, ``seed`` and ``history``)."""
    plt = _pyplot()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        run = run.to_dict() if hasattr(run, "to_dict") else run
        history = [h if isinstance(h, dict) else vars(h) for h in run["history"]]
        label = f"{run['order']} (seed {run['seed']})"
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["train_loss"] for h in history], label=label)
        ax_metric.plot(epochs, [h["metric"] for h in history], label=label)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(f"test {metric}")
    ax_metric.legend(fontsize=7)
    fig.suptitle(title or "training curves")
    return _save(fig, path)


def plot_size_tradeoff(runs: Sequence[Any], path: str | os.PathLike, metric: str = "metric", title: str | None = None) -> str:
    """Test metric of the lowered model against the packed artifact size, one point per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        run = run.to_dict() if hasattr(run, "to_dict") else run
        ax.scatter(run["packed_bytes"] / 1024, run["metric"])
        ax.annotate(run["order"], (run["packed_bytes"] / 1024, run["metric"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("saved artifact (KiB, log scale)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title or f"{metric} against packed size")
    return _save(fig, path)


def plot_history(values: Sequence[float], path: str | os.PathLike, ylabel: str = "objective (lower is better)", title: str | None = None) -> str:
    """An optimization history: each trial's objective (points, in trial order) and the best
    so far (a step line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = list(range(len(values)))
    ax.scatter(xs, values, s=14, color="tab:blue", label="trial")
    best, running = [], float("inf")
    for v in values:
        running = min(running, v)
        best.append(running)
    ax.step(xs, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial (in the order it started)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title or "optimization history")
    return _save(fig, path)


def plot_pareto(points: Sequence[tuple[float, float]], front: Sequence[tuple[float, float]], references: dict[str, tuple[float, float]], path: str | os.PathLike, metric: str = "metric", title: str | None = None) -> str:
    """Metric against artifact bytes: every trial (grey), the Pareto front (a red line
    through its points) and labeled reference points (e.g. the six hand-written orders).
    Points are ``(bytes, metric)``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    if points:
        ax.scatter([p[0] / 1024 for p in points], [p[1] for p in points], s=12, color="0.6", label="trials")
    if front:
        ordered = sorted(front)
        ax.plot([p[0] / 1024 for p in ordered], [p[1] for p in ordered], "o-", color="tab:red", markersize=5, label="Pareto front")
    for name, (size, value) in references.items():
        ax.scatter([size / 1024], [value], marker="s", s=40, color="tab:blue")
        ax.annotate(name, (size / 1024, value), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("saved artifact (KiB, log scale)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} against artifact size: searched schedules and references (squares)")
    return _save(fig, path)


def plot_ratios(ratios: dict[str, float], path: str | os.PathLike, max_ratio: float | None = None, title: str | None = None) -> str:
    """Bars of the filter-pruning ratio of each layer (in network order)."""
    plt = _pyplot()
    names = list(ratios)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(names) + 2), 4))
    ax.bar(range(len(names)), [ratios[n] for n in names], color="tab:green")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    if max_ratio is not None:
        ax.axhline(max_ratio, color="0.5", linestyle="--", linewidth=1)
        ax.set_ylim(0, max_ratio * 1.1)
    ax.set_ylabel("filters pruned (fraction)")
    ax.set_title(title or "per-layer filter-pruning ratios of the best trial")
    return _save(fig, path)
