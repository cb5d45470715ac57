"""Human-readable reports: :func:`summary` of a transformed model, :func:`explain` of a spec."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from tabulate import tabulate
from torch import nn
from torch.nn.utils import parametrize

from fxqp.lower.artifact import serialize
from fxqp.lower.lower import is_lowered
from fxqp.lower.size import MB, seed_size_bytes, site_sizes, stage_size, state_bytes, total_bound_bytes
from fxqp.ops import ScheduledOp
from fxqp.ops.chain import is_tied
from fxqp.schedule import find_schedule
from fxqp.sites import ACTIVATION_CLASSES, is_activation_module, plan_sites, selector_problems
from fxqp.stages import ActivationStage
from fxqp.transform import as_spec, part_modules, trace_model_parts

__all__ = ["Report", "summary", "lowered_summary", "explain", "hidden_activations", "ACTIVATION_CLASSES"]


@dataclass
class Report:
    """A table with a title and notes; ``str()`` renders it with tabulate.

    Attributes:
        title: first line.
        headers: column names.
        rows: one list of cells per row.
        notes: lines printed under the table.
    """

    title: str
    headers: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def to_dicts(self) -> list[dict[str, Any]]:
        """The rows as dicts keyed by header."""
        return [dict(zip(self.headers, row)) for row in self.rows]

    def __str__(self) -> str:
        table = tabulate(self.rows, headers=self.headers, tablefmt="simple", missingval="—", disable_numparse=True)
        return "\n".join([self.title, table, *self.notes])

    def __repr__(self) -> str:
        return str(self)


@contextmanager
def _eval_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    modules = list(modules)
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.train(False)
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _class_name(module: nn.Module) -> str:
    """The module's class name, without the ``Parametrized`` subclass parametrize creates."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls.__name__


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}%"


def _row(site: str, kind: str, target: str, ops: list[ScheduledOp], actual: float | None) -> list[Any]:
    facts = [op.describe() for op in ops]
    bits = next((f["bits"] for f in reversed(facts) if "bits" in f), None)
    sparsity = next((f["sparsity"] for f in reversed(facts) if "sparsity" in f), None)
    return [
        site,
        kind,
        target,
        " → ".join(f["op"] for f in facts),
        bits,
        _pct(sparsity),
        _pct(actual),
        ", ".join(str(f["start"]) for f in facts),
    ]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "—"


def lowered_summary(model: nn.Module) -> Report:
    """Size table of a lowered model: per weight site its packed bytes (codes, mask,
    scales), bits per parameter, ratio to float32 and to the information bound; then the
    activation stages, the other tensors, the total, and the size of the saved file."""
    sizes = site_sizes(model)
    rows = []
    for s in sizes:
        rows.append([s.site, s.target, s.scheme, s.bits, s.encoding, s.n, s.nnz, s.packed_bytes, f"{s.bits_per_param:.3f}", f"{s.float32_ratio:.1f}", f"{s.bound_bits / 8:.0f}", _ratio(8 * s.packed_bytes, s.bound_bits)])
    stage_bytes, stage_bound_bits = stage_size(model)
    other_bytes = state_bytes(model)
    weight_bytes = sum(s.packed_bytes for s in sizes)
    weight_bound_bits = sum(s.bound_bits for s in sizes)
    weight_n = sum(s.n for s in sizes)
    bound = total_bound_bytes(model)
    total = weight_bytes + stage_bytes + other_bytes
    float32 = 4 * weight_n + stage_bytes + other_bytes
    file_bytes = len(serialize(model))
    rows.append(["(weights)", "", "", "", "", weight_n, sum(s.nnz for s in sizes), weight_bytes, f"{8 * weight_bytes / max(weight_n, 1):.3f}", f"{4 * weight_n / max(weight_bytes, 1):.1f}", f"{weight_bound_bits / 8:.0f}", _ratio(8 * weight_bytes, weight_bound_bits)])
    rows.append(["(activation stages)", "", "", "", "", "", "", stage_bytes, "", "", f"{stage_bound_bits / 8:.0f}", _ratio(8 * stage_bytes, stage_bound_bits)])
    rows.append(["(other tensors)", "", "", "", "", "", "", other_bytes, "", "", other_bytes, ""])
    rows.append(["(total)", "", "", "", "", "", "", total, "", f"{float32 / max(total, 1):.1f}", f"{bound:.0f}", _ratio(total, bound)])
    rows.append(["(saved file)", "", "", "", "", "", "", file_bytes, "", f"{float32 / max(file_bytes, 1):.1f}", f"{bound:.0f}", _ratio(file_bytes, bound)])
    headers = ["site", "target", "scheme", "bits", "mask", "params", "nnz", "bytes", "bits/param", "x fp32", "bound bytes", "/ bound"]
    record = model.meta.get("fxqp", {})
    title = f"fxqp summary (lowered at step {record.get('step', '?')}): {len(sizes)} packed weight sites"
    removed = model.meta.get("fxqp", {}).get("removed", [])
    seed = seed_size_bytes(model)
    notes = [
        "bound = nnz·bits + min(n, n·H(nnz/n)) + scales, other tensors at their size; "
        "x fp32 = float32 bytes / packed bytes (weights; total and file: whole model)",
        f"size by the seed paper's convention (each weight at its bit width, zeros included; scales, biases and other "
        f"tensors at 32 bits): {seed / MB:.3f} MB ({seed:,.0f} bytes); saved file: {file_bytes / MB:.3f} MB; float32: {float32 / MB:.3f} MB",
    ]
    if removed:
        gone = sum(r["size"] - len(r["kept"]) for r in removed)
        total = sum(r["size"] for r in removed)
        macs = model.meta.get("fxqp", {}).get("macs")
        extra = f"; multiply-accumulates of the example input {macs[1]:,} (before removal {macs[0]:,})" if macs else ""
        notes.append(f"pruned channels removed from the layers: {gone} of {total} in {len(removed)} channel groups; weight parameters now {weight_n:,}{extra}")
    return Report(title, headers, rows, notes)


def _tracing_notes(model: nn.Module, fallback_leaves: Iterable[str], mode_leaves: Iterable[str], mode_switches: Iterable[str], leaf_functions: Iterable[str] = (), parts: Iterable[str] = ("",), untraced: dict[str, str] | None = None) -> list[str]:
    """What tracing left opaque, and the activation calls hidden there."""
    notes = []
    parts, untraced = tuple(parts), dict(untraced or {})
    if "" in untraced:
        notes.append(f"the root's forward cannot be traced ({_short(untraced[''])}): traced in {len(parts)} parts, each run in place of its module: {', '.join(parts)}")
    elif len(parts) > 1:
        notes.append(f"modules traced on their own (each run in place of its module): {', '.join(p for p in parts if p)}")
    others = [f"{path} ({_short(why)})" for path, why in untraced.items() if path]
    if others:
        notes.append(f"modules left untraced, their own forward runs (their weights still get ops): {'; '.join(others)}")
    functions = tuple(leaf_functions)
    if functions:
        notes.append(f"functions called as one opaque node because tracing failed inside them: {', '.join(functions)}")
    opaque = dict.fromkeys(untraced)
    for leaves, why in ((tuple(fallback_leaves), "tracing failed inside them"), (tuple(mode_leaves), "they compute differently in training and evaluation in a way that cannot be switched")):
        if leaves:
            notes.append(f"modules kept as leaves because {why}: {', '.join(leaves)}")
            opaque.update((leaf, None) for leaf in leaves if leaf not in parts)
    for path, inside in hidden_activations(model, opaque, parts).items():
        notes.append(f"activation calls inside {path or '(root)'} are no sites: {', '.join(inside)}")
    switches = tuple(mode_switches)
    if switches:
        sources = sorted({path.rpartition(".")[0] or "(root)" for path in switches})
        notes.append(f"parts that differ between training and evaluation, switched at run time: {len(switches)}, in {', '.join(sources)}")
    return notes


def _short(reason: str, limit: int = 100) -> str:
    line = reason.strip().splitlines()[0] if reason.strip() else reason
    return line if len(line) <= limit else line[: limit - 1] + "…"


def hidden_activations(model: nn.Module, opaque: Iterable[str], parts: Iterable[str] = ("",)) -> dict[str, list[str]]:
    """For each opaque module path — a leaf (one call in a graph), a module left untraced —
    ``"path (Class)"`` of the activation modules whose nearest enclosing traced part
    (``parts``) or opaque module is that one: their calls are no activation sites."""
    opaque, parts = set(opaque), set(parts)
    hidden: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if not path or not is_activation_module(module):
            continue
        atoms = path.split(".")
        for depth in range(len(atoms) - 1, -1, -1):
            ancestor = ".".join(atoms[:depth])
            if ancestor in parts:
                break
            if ancestor in opaque:
                hidden.setdefault(ancestor, []).append(f"{path} ({type(module).__name__})")
                break
    return hidden


def summary(model: nn.Module) -> Report:
    """Per-site table of a model from :func:`fxqp.transform` or :func:`fxqp.lower`.

    Transformed model: ops in order, bits, target and actual sparsity, start (and end)
    steps, with the current step and the modules tracing kept as leaves. Reading a weight
    for the table does not advance any schedule: ops run in eval mode.

    Lowered model: see :func:`lowered_summary` (bytes, bits per parameter, ratios to float32
    and to the information bound, size of the saved file).
    """
    if is_lowered(model):
        return lowered_summary(model)
    schedule = find_schedule(model)
    root = model
    rows, tied = [], []
    for path, module in root.named_modules():
        container = getattr(module, "parametrizations", None)
        if container is not None and "weight" in container:
            if is_tied(module):
                tied.append(f"{path}.weight reads {container['weight'][0].site}")
                continue
            ops = [op for op in container["weight"] if isinstance(op, ScheduledOp)]
            if ops:
                with _eval_mode(ops), torch.no_grad():
                    weight = module.weight
                    actual = float((weight == 0).sum()) / max(weight.numel(), 1)
                rows.append(_row(f"{path}.weight", "weight", _class_name(module), ops, actual))
        elif isinstance(module, ActivationStage):
            pruners = [op for op in module.ops if hasattr(op, "actual_sparsity")]
            actual = pruners[-1].actual_sparsity() if pruners else None
            rows.append(_row(module.site, "activation", module.target, list(module.ops), actual))
    n_weight = sum(r[1] == "weight" for r in rows)
    title = (
        f"fxqp summary: step {int(schedule.step)} ({'auto' if schedule.auto_step else 'manual'} step), "
        f"{n_weight} weight sites, {len(rows) - n_weight} activation sites"
    )
    notes = _tracing_notes(root, schedule.fallback_leaves, schedule.mode_leaves, schedule.mode_switches, schedule.leaf_functions, schedule.parts, schedule.untraced)
    if tied:
        notes.append(f"tied weights (one site, one op chain): {', '.join(tied)}")
    groups = getattr(model, "fxqp_groups", None)
    if groups is not None:
        notes.append(f"coupled filter groups: {len(list(groups.children()))} ({'; '.join(g.site for g in groups.children())})")
    notes.extend(getattr(schedule, "group_notes", ()))
    headers = ["site", "kind", "target", "ops (in order)", "bits", "sparsity", "actual", "start"]
    return Report(title, headers, rows, notes)


def explain(
    model: nn.Module,
    spec: Any,
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple[Any, ...] | dict[str, Any] | None = None,
) -> Report:
    """Before transforming: which rule each site gets, which sites no rule matched, and
    which selectors match nothing. The model is traced (with ``example_inputs`` as
    :func:`fxqp.transform` would) but not modified or run."""
    spec = as_spec(spec)
    traced = trace_model_parts(model, leaf_modules, concrete_args, example_inputs=example_inputs, generate_code=False)  # only the graphs are read
    parts = part_modules(traced)
    plan = plan_sites(parts.get("", model), spec, check=False, parts=parts)
    chosen = {a.site: a for a in plan.weights + plan.activations}
    rows = []
    for site in plan.weight_sites + plan.activation_sites:
        a = chosen.get(site)
        ops = "—" if a is None else (" → ".join(op.kind for op in a.ops) or "(none)")
        rule = "—" if a is None else f"rules[{a.rule_index}]"
        rows.append([site.name, site.kind, site.target, rule, ops])
    unmatched = plan.unmatched()
    title = (
        f"fxqp explain: {type(model).__name__}: {len(plan.weight_sites)} weight sites, "
        f"{len(plan.activation_sites)} activation sites, {len(unmatched)} matched by no rule"
    )
    errors, partial = selector_problems(spec, plan.weight_sites, plan.activation_sites)
    notes = [f"error at transform: {e}" for e in errors] + [f"note: {n}" for n in partial]
    notes += _tracing_notes(parts.get("", model), traced.qualified("fallback_leaves"), traced.qualified("mode_leaves"), traced.qualified("mode_switches"), traced.leaf_functions(), tuple(parts), traced.untraced)
    return Report(title, ["site", "kind", "target", "rule", "ops"], rows, notes)
