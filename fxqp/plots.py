"""PNG plots of a transformed model, its schedule and the experiment's runs (matplotlib).

Every function writes one PNG file atomically and returns its path; figures are closed, and
the non-interactive ``Agg`` backend is used, so nothing needs a display.

* :func:`plot_sites` — per-site bits and sparsity (bar chart);
* :func:`plot_schedule` — when each op of a spec switches on, and the sparsity ramps;
* :func:`plot_curves` — training loss and test metric per epoch, one line per order (mean
  over seeds), with the epochs at which its ops switch on marked;
* :func:`plot_size_tradeoff` — test metric against saved artifact size, per run and per
  order (mean ± std over seeds);
* :func:`plot_history`, :func:`plot_pareto`, :func:`plot_ratios` — a search's trials, its
  Pareto front with reference points, and the per-layer ratios it found.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any, Mapping, Sequence

from fxqp._extras import require
from fxqp.atomic import write_atomically
from fxqp.spec import Prune, Spec

__all__ = [
    "plot_sites",
    "plot_schedule",
    "plot_curves",
    "plot_size_tradeoff",
    "plot_history",
    "plot_pareto",
    "plot_ratios",
    "ramp",
    "op_starts",
    "format_bytes",
    "byte_ticks",
]


def _pyplot():
    matplotlib = require("matplotlib", "fxqp's plots")
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


def format_bytes(n: float) -> str:
    """A byte count in decimal units, three significant digits at most: ``512`` → ``"512 B"``,
    ``12_000`` → ``"12 KB"``, ``1_500`` → ``"1.5 KB"``, ``154_128`` → ``"154 KB"``,
    ``2_300_000`` → ``"2.3 MB"``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g} B"


def byte_ticks(low: float, high: float) -> list[float]:
    """Tick positions for a log-scaled byte axis from ``low`` to ``high``: the round values
    1, 2, 5 × 10^k inside the range, denser (1, 1.5, 2, 3, 5, 7 × 10^k, then every integer
    mantissa) when that gives fewer than three, and ``low`` and ``high`` themselves when
    even that gives fewer than two."""
    if not 0 < low < high:
        return []
    powers = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), tuple(range(1, 10))):
        ticks = [t for k in powers for m in mantissas if low <= (t := m * 10.0**k) <= high]
        if len(ticks) >= 3:
            return ticks
    return ticks if len(ticks) >= 2 else [low, high]


def _round_down(value: float) -> float:
    """The largest 1, 2 or 5 × 10^k not above ``value`` (> 0)."""
    k = math.floor(math.log10(value))
    return max(m * 10.0**k for m in (1, 2, 5) if m * 10.0**k <= value * (1 + 1e-12))


def _round_up(value: float) -> float:
    """The smallest 1, 2 or 5 × 10^k not below ``value`` (> 0)."""
    k = math.floor(math.log10(value))
    return min(m * 10.0**k for m in (1, 2, 5, 10) if m * 10.0**k >= value * (1 - 1e-12))


def _plain_log_yaxis(ax: Any) -> None:
    """Log-scale the y axis of ``ax`` with plain numbers (``0.2``, ``0.5``, ``1``) at the
    powers of ten and at the 2 and 5 minor ticks, instead of ``2×10⁻¹``."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _: Any, mantissas: tuple[int, ...]) -> str:
        if value <= 0:
            return ""
        mantissa = round(value / 10.0 ** math.floor(math.log10(value)), 6)
        return f"{value:g}" if mantissa in mantissas else ""

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, pos: label(v, pos, (1,))))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, pos: label(v, pos, (2, 5))))


def _bytes_xaxis(ax: Any) -> None:
    """Make the x axis of ``ax`` (data: bytes, already plotted) log-scaled, with
    :func:`byte_ticks` labeled by :func:`format_bytes` and no minor tick labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log")
    low, high = ax.get_xlim()
    low, high = _round_down(low), _round_up(high)  # the axis ends on round values
    ax.set_xlim(low, high)
    ax.xaxis.set_major_locator(FixedLocator(byte_ticks(low, high)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_bytes(value)))
    ax.xaxis.set_minor_locator(NullLocator())


# A colour and marker per order of fxqp.experiment.ORDERS: prune-first filled circles,
# quantize-first hollow squares (a pair's two orders have the same artifact size: the circle
# shows through the square), one colour family per pair.
_ORDER_STYLE = {
    "baseline": ("black", "*"),
    "Q": ("0.5", "D"),
    "P(w)->Q": ("tab:blue", "o"),
    "Q->P(w)": ("deepskyblue", "s"),
    "P(w,a)->Q": ("tab:red", "o"),
    "Q->P(w,a)": ("darkorange", "s"),
}
_OTHER_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")


def _styles(orders: Sequence[str]) -> dict[str, tuple[str, str]]:
    others = iter(_OTHER_COLORS * (1 + len(orders) // len(_OTHER_COLORS)))
    return {order: _ORDER_STYLE.get(order) or (next(others), "o") for order in orders}


def _as_dicts(runs: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        run = run.to_dict() if hasattr(run, "to_dict") else dict(run)
        run["history"] = [h if isinstance(h, dict) else vars(h) for h in run.get("history", ())]
        out.append(run)
    return out


def _by_order(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["order"], []).append(run)
    return groups


def plot_sites(model: Any, path: str | os.PathLike, title: str | None = None) -> str:
    """Bars of the bits (left axis) and the actual sparsity (right panel) of every site of a
    transformed model (from :func:`fxqp.summary`), one row per site in network order; 32
    bits stands for "not quantized". The figure grows with the number of sites."""
    from fxqp.report import summary

    rows = summary(model).to_dicts()
    names = [f"{r['site']} ({r['kind'][0]})" for r in rows]
    bits = [_number(r["bits"]) or 32.0 for r in rows]
    sparsity = [100 * _number(r["actual"]) for r in rows]
    plt = _pyplot()
    height = max(2.5, 0.22 * len(rows) + 1.0)
    fig, (ax_bits, ax_sparse) = plt.subplots(1, 2, figsize=(10, height), sharey=True, layout="constrained")
    y = range(len(rows))
    colors = ["tab:blue" if r["kind"] == "weight" else "tab:orange" for r in rows]
    ax_bits.barh(y, bits, color=colors)
    ax_bits.set_yticks(list(y), names, fontsize=8)
    ax_bits.set_ylim(len(rows) - 0.5, -0.5)  # first site on top, no empty margin rows
    ax_bits.set_xlabel("bits (32 = float)")
    ax_sparse.barh(y, sparsity, color=colors)
    ax_sparse.set_xlim(0, 100)
    ax_sparse.set_xlabel("actual sparsity %")
    for ax in (ax_bits, ax_sparse):
        ax.xaxis.set_tick_params(labeltop=len(rows) > 30, top=len(rows) > 30)  # long figures: scales on top too
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


def op_starts(spec: Spec, steps: int) -> list[tuple[int, str]]:
    """When each op of ``spec`` switches on, as ``(step, "<op> <kind>")`` pairs (e.g.
    ``(400, "prune weights")``) sorted by step, one per distinct pair; fractions of the run
    are resolved against ``steps``."""
    starts = set()
    for rule in spec.resolve(steps).rules:
        for kind, ops in (("weights", rule.weight), ("activations", rule.activation)):
            for op in ops or ():
                starts.add((int(op.start), f"{op.kind} {kind}"))
    return sorted(starts)


def plot_schedule(spec: Spec, steps: int, path: str | os.PathLike, title: str | None = None) -> str:
    """The schedule as a timeline: one row per (rule, kind, op) with a bar from the op's
    start to the end of training, and each pruning op's sparsity ramp drawn inside its row;
    fractions of the run (``"40%"``) are resolved against ``steps``. Each row's label sits
    inside the axes: after the op's start, or before it when the op starts late."""
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
            label += f" {op.sparsity:g} from step {op.start}" + (f", ramp to step {op.end}" if op.end is not None else "")
        else:
            label += f" {op.bits}b from step {op.start}"
        late = op.start > steps / 2
        ax.text(op.start, lane, f"{label} " if late else f" {label}", va="center", ha="right" if late else "left", fontsize=8, clip_on=True)
    ax.set_yticks([])
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, steps)
    ax.set_xlabel("training step")
    ax.set_title(title or "schedule: ops switch on at their start (bars); pruning ramps (lines, down = sparser)")
    return _save(fig, path)


# Markers for op starts on the training curves.
_START_MARKERS = {"prune weights": "v", "prune activations": "^", "quantize weights": "s", "quantize activations": "D"}


def plot_curves(
    runs: Sequence[Any],
    path: str | os.PathLike,
    metric: str = "metric",
    title: str | None = None,
    schedules: Mapping[str, Spec] | None = None,
) -> str:
    """Training loss and test metric per epoch, one line per order (``RunResult`` objects or
    dicts with ``order``, ``seed`` and ``history``): the mean over the order's seeds, with
    the range over seeds shaded when there are several.

    ``schedules`` maps orders to their specs: a strip under the metric panel, on the same
    epoch axis, then marks when each op of each order switches on (one row per order,
    weight ops above activation ops, a marker shape per op), and dotted lines carry those
    epochs up through the metric panel. Starts are resolved against the run's step count.
    """
    import numpy as np

    plt = _pyplot()
    groups = {order: group for order, group in _by_order(_as_dicts(runs)).items() if group[0]["history"]}
    styles = _styles(list(groups))
    marked = [order for order in groups if schedules and order in schedules and schedules[order].rules]
    fig = plt.figure(figsize=(12, 4.5 + 0.2 * len(marked)), layout="constrained")
    grid = fig.add_gridspec(2 if marked else 1, 2, height_ratios=[4, 0.4 + 0.25 * len(marked)] if marked else [1])
    ax_loss = fig.add_subplot(grid[:, 0])
    ax_metric = fig.add_subplot(grid[0, 1])
    for order, group in groups.items():
        color, _ = styles[order]
        history = group[0]["history"]
        epochs = np.array([h["epoch"] for h in history], dtype=float)
        for ax, key in ((ax_loss, "train_loss"), (ax_metric, "metric")):
            # runs of another length (another epoch count) cannot be averaged with these
            values = np.array([[h[key] for h in run["history"]] for run in group if len(run["history"]) == len(history)], dtype=float)
            n_seeds = len(values)
            ax.plot(epochs, values.mean(axis=0), color=color, label=f"{order} ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
            if len(values) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=color, alpha=0.15, linewidth=0)
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(_integer_locator())
    _plain_log_yaxis(ax_loss)
    ax_loss.set_ylabel("training loss")
    ax_metric.set_ylabel(f"test {metric}")
    handles, labels = ax_metric.get_legend_handles_labels()
    if marked:
        ax_starts = fig.add_subplot(grid[1, 1], sharex=ax_metric)
        ax_metric.set_xlabel("")
        ax_metric.tick_params(labelbottom=False)
        used = set()
        for row, order in enumerate(marked):
            history = groups[order][0]["history"]
            per_epoch = history[0]["step"] / history[0]["epoch"]
            for step, what in op_starts(schedules[order], history[-1]["step"]):
                x = step / per_epoch
                lane = row - 0.2 if what.endswith("weights") else row + 0.2
                ax_starts.plot(
                    [x],
                    [lane],
                    linestyle="none",
                    marker=_START_MARKERS.get(what, "o"),
                    markersize=7,
                    markerfacecolor=styles[order][0],
                    markeredgecolor="black",
                )
                ax_metric.axvline(x, color="0.6", linestyle=":", linewidth=0.8, zorder=0)
                used.add(what)
        ax_starts.set_yticks(range(len(marked)), marked, fontsize=8)
        ax_starts.set_ylim(len(marked) - 0.5, -0.5)
        ax_starts.set_xlabel("epoch (markers: when each order's ops switch on)")
        ax_starts.xaxis.set_major_locator(_integer_locator())
        ax_starts.grid(axis="y", color="0.9")
        for what in sorted(used, key=list(_START_MARKERS).index):
            handles.append(
                plt.Line2D([], [], linestyle="none", marker=_START_MARKERS[what], markerfacecolor="white", markeredgecolor="black")
            )
            labels.append(f"{what} starts")
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(title or "training curves")
    return _save(fig, path)


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def plot_size_tradeoff(runs: Sequence[Any], path: str | os.PathLike, metric: str = "metric", title: str | None = None) -> str:
    """Test metric of the lowered model against the size of its saved artifact: one small
    point per run, and per order a large marker at the mean over seeds with a bar of ± one
    standard deviation; the orders are named in a legend beside the axes, never on them."""
    plt = _pyplot()
    groups = _by_order(_as_dicts(runs))
    styles = _styles(list(groups))
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for order, group in groups.items():
        color, marker = styles[order]
        sizes = [r["packed_bytes"] for r in group]
        values = [r["metric"] for r in group]
        ax.scatter(sizes, values, s=12, color=color, alpha=0.5, linewidths=0)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        hollow = marker == "s"
        ax.errorbar(
            [statistics.fmean(sizes)],
            [statistics.fmean(values)],
            yerr=[spread],
            color=color,
            marker=marker,
            markersize=11 if hollow else 8,
            markerfacecolor="none" if hollow else color,
            markeredgecolor=color if hollow else "black",
            markeredgewidth=2 if hollow else 1,
            capsize=3,
            linestyle="none",
            label=order,
        )
    _bytes_xaxis(ax)
    ax.set_xlabel("saved artifact (log scale)")
    ax.set_ylabel(f"test {metric}")
    fig.legend(loc="outside right upper", fontsize=8, title="mean ± std\nover seeds", title_fontsize=8)
    ax.set_title(title or f"{metric} against artifact size")
    return _save(fig, path)


def plot_history(
    values: Sequence[float], path: str | os.PathLike, ylabel: str = "objective (lower is better)", title: str | None = None
) -> str:
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


def plot_pareto(
    points: Sequence[tuple[float, float]],
    front: Sequence[tuple[float, float]],
    references: dict[str, tuple[float, float]],
    path: str | os.PathLike,
    metric: str = "metric",
    title: str | None = None,
) -> str:
    """Metric against artifact bytes: every trial (grey), the Pareto front (a red line
    through its points) and labeled reference points (e.g. the six hand-written orders).
    Points are ``(bytes, metric)``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=12, color="0.6", label="trials")
    if front:
        ordered = sorted(front)
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], "o-", color="tab:red", markersize=5, label="Pareto front")
    for name, (size, value) in references.items():
        ax.scatter([size], [value], marker="s", s=40, color="tab:blue")
        ax.annotate(name, (size, value), fontsize=7, xytext=(4, 3), textcoords="offset points")
    _bytes_xaxis(ax)
    ax.set_xlabel("saved artifact (log scale)")
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
