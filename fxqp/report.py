"""Human-readable reports: :func:`summary` of a transformed model, :func:`explain` of a spec."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
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
from fxqp.tables import Report
from fxqp.transform import as_spec, op_problems, part_modules, trace_model_parts

__all__ = [
    "Report",
    "SiteFacts",
    "site_facts",
    "metrics",
    "summary",
    "lowered_summary",
    "explain",
    "hidden_activations",
    "ACTIVATION_CLASSES",
]


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


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _fixed(digits: int) -> Callable[[Any], str]:
    return lambda value: f"{value:.{digits}f}"


def _thousands(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


@dataclass(frozen=True)
class SiteFacts:
    """What one site of a transformed model carries now, as values.

    Attributes:
        site: the site's name (``<module>.weight`` or the activation node).
        kind: ``"weight"`` or ``"activation"``.
        target: the module class (weights) or the called target (activations).
        ops: the op descriptions, in order.
        bits: bits of the last quantizer, or ``None`` when no op quantizes.
        sparsity: target sparsity of the last pruner, or ``None`` when no op prunes.
        actual: measured fraction of zeros (weights: of the weight; activations: of the
            last pruner's mask), or ``None`` where nothing is measured.
        starts: each op's start step.
        ends: each op's end step (``None`` for ops without a ramp).
        active: whether each op has started (``step >= start``).
        numel: elements of the weight (``None`` for activations).
    """

    site: str
    kind: str
    target: str
    ops: tuple[str, ...]
    bits: int | None
    sparsity: float | None
    actual: float | None
    starts: tuple[int, ...]
    ends: tuple[int | None, ...]
    active: tuple[bool, ...]
    numel: int | None = None


def _facts(site: str, kind: str, target: str, ops: list[ScheduledOp], actual: float | None, numel: int | None = None) -> SiteFacts:
    described = [op.describe() for op in ops]
    return SiteFacts(
        site=site,
        kind=kind,
        target=target,
        ops=tuple(f["op"] for f in described),
        bits=next((f["bits"] for f in reversed(described) if "bits" in f), None),
        sparsity=next((f["sparsity"] for f in reversed(described) if "sparsity" in f), None),
        actual=actual,
        starts=tuple(int(op.config.start) for op in ops),
        ends=tuple(getattr(op.config, "end", None) for op in ops),
        active=tuple(op.started() for op in ops),
        numel=numel,
    )


def site_facts(model: nn.Module) -> list[SiteFacts]:
    """:class:`SiteFacts` of every weight site (in module order), then of every activation
    site, of a model returned by :func:`fxqp.transform`. Reading a weight does not advance
    any schedule: ops run in eval mode. Tied weights are one site (their first module)."""
    weights, activations = [], []
    for path, module in model.named_modules():
        container = getattr(module, "parametrizations", None)
        if container is not None and "weight" in container:
            if is_tied(module):
                continue
            ops = [op for op in container["weight"] if isinstance(op, ScheduledOp)]
            if ops:
                with _eval_mode(ops), torch.no_grad():
                    weight = module.weight
                    actual = float((weight == 0).sum()) / max(weight.numel(), 1)
                weights.append(_facts(f"{path}.weight", "weight", _class_name(module), ops, actual, weight.numel()))
        elif isinstance(module, ActivationStage):
            pruners = [op for op in module.ops if hasattr(op, "actual_sparsity")]
            actual = pruners[-1].actual_sparsity() if pruners else None
            activations.append(_facts(module.site, "activation", module.target, list(module.ops), actual))
    return weights + activations


def metrics(model: nn.Module) -> dict[str, float]:
    """The compression state of a transformed model as numbers, for any logger.

    Per site ``<site>``: ``<site>/bits`` (of the last quantizer; 32 where none quantizes),
    ``<site>/sparsity`` (target of the last pruner; 0 where none prunes),
    ``<site>/actual_sparsity`` (measured; weights and pruned activations), ``<site>/active``
    (fraction of the site's ops that have started: 1.0 when all have). Totals under
    ``fxqp/``: ``step``, ``sites``, ``sites_active`` (sites whose ops have all started),
    ``ops``, ``ops_active``, ``weight_params``, ``weight_sparsity`` (measured zeros over all
    weight elements), ``weight_bits`` (mean bits per weight element, 32 where not quantized,
    quantizers counted from the step they start).
    """
    facts = site_facts(model)
    out: dict[str, float] = {"fxqp/step": float(find_schedule(model).step)}
    for f in facts:
        out[f"{f.site}/bits"] = float(f.bits if f.bits is not None else 32)
        out[f"{f.site}/sparsity"] = float(f.sparsity or 0.0)
        if f.actual is not None:
            out[f"{f.site}/actual_sparsity"] = float(f.actual)
        out[f"{f.site}/active"] = sum(f.active) / max(len(f.active), 1)
    weights = [f for f in facts if f.kind == "weight"]
    params = sum(f.numel or 0 for f in weights)

    def bits_now(f: SiteFacts) -> int:
        started = [op for op, on in zip(f.ops, f.active) if on and op.startswith("quantize")]
        return f.bits if started and f.bits is not None else 32

    out.update(
        {
            "fxqp/sites": float(len(facts)),
            "fxqp/sites_active": float(sum(all(f.active) for f in facts)),
            "fxqp/ops": float(sum(len(f.active) for f in facts)),
            "fxqp/ops_active": float(sum(sum(f.active) for f in facts)),
            "fxqp/weight_params": float(params),
            "fxqp/weight_sparsity": sum((f.actual or 0.0) * (f.numel or 0) for f in weights) / params if params else 0.0,
            "fxqp/weight_bits": sum(bits_now(f) * (f.numel or 0) for f in weights) / params if params else 32.0,
        }
    )
    return out


def _one_or_list(values: Iterable[int]) -> int | list[int]:
    values = list(values)
    return values[0] if len(values) == 1 else values


def _start_text(value: Any) -> str:
    return ", ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _size_row(site: str, *, nbytes: int, bound_bytes: float, per_bound: bool = True, **cells: Any) -> list[Any]:
    """A row of :func:`lowered_summary`: ``cells`` by column (``target``, ``scheme``, ``bits``,
    ``mask``, ``params``, ``nnz``, ``bits_per_param``, ``x_fp32``; absent ones empty), and the
    ratio of the bytes to the bound unless ``per_bound`` is False."""
    get = cells.get
    ratio = _ratio(nbytes, bound_bytes) if per_bound else None
    return [
        site,
        get("target"),
        get("scheme"),
        get("bits"),
        get("mask"),
        get("params"),
        get("nnz"),
        nbytes,
        get("bits_per_param"),
        get("x_fp32"),
        bound_bytes,
        ratio,
    ]


def lowered_summary(model: nn.Module) -> Report:
    """Size table of a lowered model: per weight site its packed bytes (codes, mask,
    scales), bits per parameter, ratio to float32 and to the information bound; then the
    activation stages, the other tensors, the total, and the size of the saved file."""
    sizes = site_sizes(model)
    rows = [
        _size_row(
            s.site,
            target=s.target,
            scheme=s.scheme,
            bits=s.bits,
            mask=s.encoding,
            params=s.n,
            nnz=s.nnz,
            nbytes=s.packed_bytes,
            bits_per_param=s.bits_per_param,
            x_fp32=s.float32_ratio,
            bound_bytes=s.bound_bits / 8,
        )
        for s in sizes
    ]
    stage_bytes, stage_bound_bits = stage_size(model)
    other_bytes = state_bytes(model)
    weight_bytes = sum(s.packed_bytes for s in sizes)
    weight_n = sum(s.n for s in sizes)
    bound = total_bound_bytes(model)
    total = weight_bytes + stage_bytes + other_bytes
    float32 = 4 * weight_n + stage_bytes + other_bytes
    file_bytes = len(serialize(model))
    rows += [
        _size_row(
            "(weights)",
            params=weight_n,
            nnz=sum(s.nnz for s in sizes),
            nbytes=weight_bytes,
            bits_per_param=8 * weight_bytes / max(weight_n, 1),
            x_fp32=4 * weight_n / max(weight_bytes, 1),
            bound_bytes=sum(s.bound_bits for s in sizes) / 8,
        ),
        _size_row("(activation stages)", nbytes=stage_bytes, bound_bytes=stage_bound_bits / 8),
        _size_row("(other tensors)", nbytes=other_bytes, bound_bytes=float(other_bytes), per_bound=False),
        _size_row("(total)", nbytes=total, x_fp32=float32 / max(total, 1), bound_bytes=bound),
        _size_row("(saved file)", nbytes=file_bytes, x_fp32=float32 / max(file_bytes, 1), bound_bytes=bound),
    ]
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
        notes.append(
            f"pruned channels removed from the layers: {gone} of {total} in {len(removed)} channel groups; weight parameters now {weight_n:,}{extra}"
        )
    formats = {"bits/param": _fixed(3), "x fp32": _fixed(1), "bound bytes": _fixed(0), "/ bound": _fixed(3)}
    return Report(title, headers, rows, notes, formats)


def _tracing_notes(
    model: nn.Module,
    fallback_leaves: Iterable[str],
    mode_leaves: Iterable[str],
    mode_switches: Iterable[str],
    leaf_functions: Iterable[str] = (),
    parts: Iterable[str] = ("",),
    untraced: dict[str, str] | None = None,
) -> list[str]:
    """What tracing left opaque, and the activation calls hidden there."""
    notes = []
    parts, untraced = tuple(parts), dict(untraced or {})
    if "" in untraced:
        notes.append(
            f"the root's forward cannot be traced ({_short(untraced[''])}): traced in {len(parts)} parts, each run in place of its module: {', '.join(parts)}"
        )
    elif len(parts) > 1:
        notes.append(f"modules traced on their own (each run in place of its module): {', '.join(p for p in parts if p)}")
    others = [f"{path} ({_short(why)})" for path, why in untraced.items() if path]
    if others:
        notes.append(f"modules left untraced, their own forward runs (their weights still get ops): {'; '.join(others)}")
    functions = tuple(leaf_functions)
    if functions:
        notes.append(f"functions called as one opaque node because tracing failed inside them: {', '.join(functions)}")
    opaque = dict.fromkeys(untraced)
    for leaves, why in (
        (tuple(fallback_leaves), "tracing failed inside them"),
        (tuple(mode_leaves), "they compute differently in training and evaluation in a way that cannot be switched"),
    ):
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

    Transformed model (values from :func:`site_facts`): ops in order, bits, target and
    actual sparsity (fractions), the ops' start steps (one per op) and the pruning ramps'
    end steps, with the current step and the modules tracing kept as leaves. Reading a weight
    for the table does not advance any schedule: ops run in eval mode.

    Lowered model: see :func:`lowered_summary` (bytes, bits per parameter, ratios to float32
    and to the information bound, size of the saved file).
    """
    if is_lowered(model):
        return lowered_summary(model)
    schedule = find_schedule(model)
    root = model
    rows = []
    for f in site_facts(model):
        ends = [end for end in f.ends if end is not None]
        rows.append(
            [
                f.site,
                f.kind,
                f.target,
                " → ".join(f.ops),
                f.bits,
                f.sparsity,
                f.actual,
                _one_or_list(f.starts),
                _one_or_list(ends) if ends else None,
            ]
        )
    tied = [
        f"{path}.weight reads {module.parametrizations['weight'][0].site}"
        for path, module in root.named_modules()
        if getattr(module, "parametrizations", None) is not None and "weight" in module.parametrizations and is_tied(module)
    ]
    n_weight = sum(r[1] == "weight" for r in rows)
    title = (
        f"fxqp summary: step {int(schedule.step)} ({'auto' if schedule.auto_step else 'manual'} step), "
        f"{n_weight} weight sites, {len(rows) - n_weight} activation sites"
    )
    notes = _tracing_notes(
        root,
        schedule.fallback_leaves,
        schedule.mode_leaves,
        schedule.mode_switches,
        schedule.leaf_functions,
        schedule.parts,
        schedule.untraced,
    )
    if tied:
        notes.append(f"tied weights (one site, one op chain): {', '.join(tied)}")
    groups = getattr(model, "fxqp_groups", None)
    if groups is not None:
        notes.append(f"coupled filter groups: {len(list(groups.children()))} ({'; '.join(g.site for g in groups.children())})")
    notes.extend(getattr(schedule, "group_notes", ()))
    headers = ["site", "kind", "target", "ops (in order)", "bits", "sparsity", "actual", "start", "end"]
    return Report(title, headers, rows, notes, {"sparsity": _pct, "actual": _pct, "start": _start_text, "end": _start_text})


def explain(
    model: nn.Module,
    spec: Any,
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple[Any, ...] | dict[str, Any] | None = None,
) -> Report:
    """Before transforming: which rule each site gets, which sites no rule matched, which
    selectors match nothing, and what would make :func:`fxqp.transform` fail (the report's
    ``errors``: a selector that names nothing, a rule that selects no site, an op a site
    cannot take). The model is traced (with ``example_inputs`` as :func:`fxqp.transform`
    would) but not modified or run."""
    spec = as_spec(spec)
    traced = trace_model_parts(
        model, leaf_modules, concrete_args, example_inputs=example_inputs, generate_code=False
    )  # only the graphs are read
    parts = part_modules(traced)
    plan = plan_sites(parts.get("", model), spec, check=False, parts=parts)
    chosen = {a.site: a for a in plan.weights + plan.activations}
    rows = []
    for site in plan.weight_sites + plan.activation_sites:
        a = chosen.get(site)
        ops = None if a is None else (" → ".join(op.kind for op in a.ops) or "(none)")
        rule = None if a is None else f"rules[{a.rule_index}]"  # None: no rule matched (printed "—")
        rows.append([site.name, site.kind, site.target, rule, ops])
    unmatched = plan.unmatched()
    title = (
        f"fxqp explain: {type(model).__name__}: {len(plan.weight_sites)} weight sites, "
        f"{len(plan.activation_sites)} activation sites, {len(unmatched)} matched by no rule"
    )
    errors, partial = selector_problems(spec, plan.weight_sites, plan.activation_sites)
    errors += op_problems(parts.get("", model), plan)
    notes = [f"error at transform: {e}" for e in errors] + [f"note: {n}" for n in partial]
    notes += _tracing_notes(
        parts.get("", model),
        traced.qualified("fallback_leaves"),
        traced.qualified("mode_leaves"),
        traced.qualified("mode_switches"),
        traced.leaf_functions(),
        tuple(parts),
        traced.untraced,
    )
    return Report(title, ["site", "kind", "target", "rule", "ops"], rows, notes, errors=errors)
