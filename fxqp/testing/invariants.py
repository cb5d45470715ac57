"""The invariants fxqp guarantees, as functions a user can run on any model and spec.

Each invariant takes a :class:`Case` (a model, a spec, example inputs) and returns the list
of :class:`Failure` it found (empty when it holds). :func:`check` runs them all and raises
:class:`InvariantError` naming every failed invariant, site and step.

Training steps use plain SGD on ``mean(output²)`` with the example inputs; the horizon is
long enough for every op of the spec to have started and every ramp to have ended.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

import fxqp
from fxqp.errors import FxqpError
from fxqp.groups import FilterGroup
from fxqp.lower.lower import weight_sites
from fxqp.ops import ActivationPruner, ActivationQuantizer, LsqQuantizer, ScheduledOp, WeightPruner, WeightQuantizer
from fxqp.sites import plan_sites
from fxqp.spec import Prune, Quantize, Spec
from fxqp.stages import ActivationStage
from fxqp.transform import as_spec, trace_model

__all__ = ["Case", "Failure", "InvariantError", "INVARIANTS", "check", "train_steps", "horizon"]

MAX_HORIZON = 64


@dataclass(frozen=True)
class Failure:
    """One broken invariant: which (its name in :data:`INVARIANTS`), where (site), when
    (step) and what was seen."""

    invariant: str
    detail: str
    site: str | None = None
    step: int | None = None

    def __str__(self) -> str:
        where = "".join([f" at site {self.site!r}" if self.site else "", f" at step {self.step}" if self.step is not None else ""])
        return f"{self.invariant}{where}: {self.detail}"


class InvariantError(FxqpError, AssertionError):
    """Raised by :func:`check`; ``failures`` lists every :class:`Failure`."""

    def __init__(self, failures: list[Failure]):
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(f"{len(self.failures)} fxqp invariant(s) failed:\n{lines}")


@dataclass
class Case:
    """A model (left untouched: every invariant works on copies), a spec and example inputs."""

    model: nn.Module
    spec: Spec
    inputs: tuple[Any, ...]
    transform_kwargs: dict[str, Any] = field(default_factory=dict)
    compile_backend: str = "aot_eager"
    """The ``torch.compile`` backend of :func:`compiled_equals_eager`."""
    reset_compiler: bool = False
    """Call ``torch.compiler.reset()`` after :func:`compiled_equals_eager` (it discards every
    compiled graph of the process, the caller's too)."""

    @property
    def resolved_spec(self) -> Spec:
        """The spec in steps: fractions of the run (``"40%"``) resolved against
        ``transform_kwargs["total_steps"]``, as :func:`fxqp.transform` resolves them."""
        return self.spec.resolve(self.transform_kwargs.get("total_steps"))

    def transform(self, **kwargs: Any) -> torch.fx.GraphModule:
        return fxqp.transform(copy.deepcopy(self.model), self.spec, example_inputs=self.inputs, **self.transform_kwargs, **kwargs)


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise FxqpError(f"fxqp.testing: the model's output has no tensor ({type(out).__name__})")


def horizon(spec: Spec) -> int:
    """Steps after which every op of ``spec`` has started and every ramp has ended."""
    last = 0
    for rule in spec.rules:
        for op in (rule.weight or ()) + (rule.activation or ()):
            last = max(last, op.start, getattr(op, "end", None) or 0)
    return min(last + 2, MAX_HORIZON)


def train_steps(
    gm: nn.Module, inputs: tuple[Any, ...], steps: int, optimizer: torch.optim.Optimizer | None = None
) -> torch.optim.Optimizer:
    """``steps`` SGD steps on ``mean(output²)`` (float) with the example inputs."""
    params = [p for p in gm.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.SGD(params, lr=0.01)
    gm.train()
    for _ in range(steps):
        optimizer.zero_grad()
        _first_tensor(gm(*inputs)).float().pow(2).mean().backward()
        optimizer.step()
    return optimizer


def _eval_output(model: nn.Module, inputs: tuple[Any, ...]) -> Tensor:
    model.eval()
    with torch.no_grad():
        return _first_tensor(model(*inputs))


def _compare(
    invariant: str, got: Tensor, expected: Tensor, step: int | None = None, atol: float = 0.0, site: str | None = None
) -> list[Failure]:
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return [Failure(invariant, f"got {got.dtype} {list(got.shape)}, expected {expected.dtype} {list(expected.shape)}", site, step)]
    if torch.equal(got, expected):
        return []
    diff = (got.double() - expected.double()).abs().max().item()
    if diff <= atol:
        return []
    return [Failure(invariant, f"outputs differ (max abs difference {diff:g})", site, step)]


def _stage_io(gm: nn.Module, inputs: tuple[Any, ...]) -> dict[str, tuple[Tensor, Tensor]]:
    """Input and output of every activation stage in one eval forward."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod.site, (args[0].detach(), out.detach())))
        for m in gm.modules()
        if isinstance(m, ActivationStage)
    ]
    try:
        _eval_output(gm, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _trained(case: Case) -> tuple[torch.fx.GraphModule, int]:
    """A fresh transform trained to the spec's horizon, and that step."""
    gm = case.transform()
    steps = horizon(case.resolved_spec)
    train_steps(gm, case.inputs, steps)
    return gm, steps


def _stages(gm: nn.Module) -> dict[str, ActivationStage]:
    return {m.site: m for m in gm.modules() if isinstance(m, ActivationStage)}


def _weight_ops(gm: nn.Module) -> Iterable[tuple[str, nn.Module, list[ScheduledOp]]]:
    for path, module, ops in weight_sites(gm):
        yield f"{path}.weight", module, [op for op in ops if isinstance(op, ScheduledOp)]


# --------------------------------------------------------------------------- invariants


def empty_spec_is_identity(case: Case) -> list[Failure]:
    """With an empty spec the transformed model computes exactly what the model computes."""
    name = "empty_spec_is_identity"
    reference = copy.deepcopy(case.model)
    gm = fxqp.transform(copy.deepcopy(case.model), Spec(), **case.transform_kwargs)
    failures = _compare(name, _eval_output(gm, case.inputs), _eval_output(reference, case.inputs))
    reference.train()
    gm.train()
    with torch.no_grad():
        failures += _compare(name, _first_tensor(gm(*case.inputs)), _first_tensor(reference(*case.inputs)), step=0)
    return failures


def ops_in_spec_order(case: Case) -> list[Failure]:
    """Every site carries the ops of the last rule that selects it, in list order."""
    name = "ops_in_spec_order"
    gm = case.transform()
    plan = plan_sites(trace_model(copy.deepcopy(case.model), **_trace_kwargs(case), generate_code=False).graph_module, case.resolved_spec)
    failures = []
    for a in plan.weights:
        module = gm.get_submodule(a.site.module_path)
        got = [op.config for op in module.parametrizations["weight"]] if a.ops else []
        if tuple(got) != a.ops:
            failures.append(Failure(name, f"weight ops {got} differ from rules[{a.rule_index}] {list(a.ops)}", a.site.name))
    stages = _stages(gm)
    for a in plan.activations:
        got = [op.config for op in stages[a.site.name].ops] if a.ops else []
        if tuple(got) != a.ops:
            failures.append(Failure(name, f"activation ops {got} differ from rules[{a.rule_index}] {list(a.ops)}", a.site.name))
    return failures


def _trace_kwargs(case: Case) -> dict[str, Any]:
    return {k: v for k, v in case.transform_kwargs.items() if k in ("leaf_modules", "concrete_args")}


def identity_before_start(case: Case) -> list[Failure]:
    """At step 0, every op whose start is later leaves its input unchanged."""
    name = "identity_before_start"
    gm = case.transform()
    failures = []
    for site, module, ops in _weight_ops(gm):
        if ops and min(op.config.start for op in ops) > 0:
            with torch.no_grad():
                if not torch.equal(module.weight, module.parametrizations["weight"].original):
                    failures.append(Failure(name, "the weight changed before any of its ops started", site, 0))
    stages = _stages(gm)
    for site, (x, y) in _stage_io(gm, case.inputs).items():
        stage = stages[site]
        if len(stage.ops) and min(op.config.start for op in stage.ops) > 0 and not torch.equal(x, y):
            failures.append(Failure(name, "the activation changed before any of its ops started", site, 0))
    return failures


def _last_quantizer(ops: list[ScheduledOp]) -> ScheduledOp | None:
    quantizers = [op for op in ops if isinstance(op, (WeightQuantizer, ActivationQuantizer, LsqQuantizer))]
    return quantizers[-1] if quantizers else None


def _levels_per_group(values: Tensor, channel_axis: int | None) -> int:
    """Largest number of distinct non-zero values in one channel (or the whole tensor)."""
    if channel_axis is None or values.dim() < 2:
        groups = [values.reshape(-1)]
    else:
        groups = list(values.movedim(channel_axis, 0).reshape(values.shape[channel_axis], -1))
    return max(int(torch.unique(g[g != 0]).numel()) for g in groups)


def quantized_values_on_grid(case: Case) -> list[Failure]:
    """Once started, a quantized site has at most ``2^bits`` non-zero levels per channel
    (weights) or per tensor (activations)."""
    name = "quantized_values_on_grid"
    gm, steps = _trained(case)
    failures = []
    for site, module, ops in _weight_ops(gm):
        q = _last_quantizer(ops)
        if q is None:
            continue
        with torch.no_grad():
            weight = module.weight
        axis = q.channel_axis if isinstance(q, (WeightQuantizer, LsqQuantizer)) else None
        levels = _levels_per_group(weight, axis)
        if levels > 2**q.config.bits:
            failures.append(Failure(name, f"{levels} distinct non-zero values in a channel for {q.config.bits} bits", site, steps))
    stages = _stages(gm)
    for site, (_, y) in _stage_io(gm, case.inputs).items():
        q = _last_quantizer(list(stages[site].ops))
        if q is None:
            continue
        levels = _levels_per_group(y, None)
        if levels > 2**q.config.bits:
            failures.append(Failure(name, f"{levels} distinct non-zero values for {q.config.bits} bits", site, steps))
    return failures


def _structured_zeros(name: str, site: str, op: WeightPruner, groups: list[FilterGroup], step: int) -> list[Failure]:
    """A filter (channel) pruner's mask keeps or zeroes whole filters (input channels): its
    own ``round(s·C)`` of them, or exactly what the coupled groups of its layer decided."""
    structure = op.config.structure
    axis = op.out_axis if structure == "filter" else op.in_axis
    slices = op.mask.movedim(axis, 0).reshape(op.mask.shape[axis], -1)
    if not bool((slices.all(1) | (~slices).all(1)).all()):
        return [Failure(name, f"the {structure} mask zeroes part of a {structure}", site, step)]
    keep, path = slices[:, 0], site.rsplit(".", 1)[0]
    coupled = torch.ones_like(keep)
    for group in groups:
        if group.config.structure != structure:
            continue
        if structure == "filter" and path in [m.module for m in group.producers + group.followers] and group.keep.numel() == keep.numel():
            coupled = group.keep
        for member in group.consumers if structure == "channel" else ():
            if member.module == path:
                size = group.keep.numel()
                coupled[member.offset * member.repeat : (member.offset + size) * member.repeat] = group.keep.repeat_interleave(
                    member.repeat
                )
    expected = round(op.config.sparsity * keep.numel())
    pruned = int((~keep).sum())
    if pruned == expected or torch.equal(keep, coupled):
        return []
    return [Failure(name, f"mask zeroes {pruned} of {keep.numel()} {structure}s, expected {expected} or its coupled group's", site, step)]


def pruned_sites_have_target_zeros(case: Case) -> list[Failure]:
    """After its ramp, a pruner zeroes exactly ``round(s·n)`` elements (per sample for
    dynamic activation pruning); a filter or channel pruner ``round(s·C)`` whole filters or
    input channels, or those of its coupled group, which zeroes ``round(s·C)`` channels
    (``g·round(s·C/g)`` when ``g`` convolution groups read or produce them)."""
    name = "pruned_sites_have_target_zeros"
    gm, steps = _trained(case)
    failures = []
    groups = [m for m in gm.modules() if isinstance(m, FilterGroup)]
    for group in groups:
        size, blocks = group.keep.numel(), group.blocks
        expected = blocks * round(group.config.sparsity * (size // blocks))
        zeros = int((~group.keep).sum())
        if zeros != expected:
            failures.append(Failure(name, f"group zeroes {zeros} of {size} channels, expected {expected}", group.site, steps))
    for site, _, ops in _weight_ops(gm):
        for op in ops:
            if isinstance(op, WeightPruner) and op.config.structure in ("filter", "channel"):
                failures += _structured_zeros(name, site, op, groups, steps)
            elif isinstance(op, WeightPruner):
                expected = round(op.config.sparsity * op.mask.numel())
                zeros = int((~op.mask).sum())
                if zeros != expected:
                    failures.append(Failure(name, f"mask zeroes {zeros} of {op.mask.numel()}, expected {expected}", site, steps))
    stages = _stages(gm)
    for site, (_, y) in _stage_io(gm, case.inputs).items():
        for op in stages[site].ops:
            if not isinstance(op, ActivationPruner):
                continue
            if op.dynamic:
                k = round(op.config.sparsity * y[0].numel())
                fewest = int((y.reshape(y.shape[0], -1) == 0).sum(dim=1).min())
                if fewest < k:
                    failures.append(Failure(name, f"a sample has {fewest} zeros, expected at least {k}", site, steps))
            elif op.mask.numel():
                expected = round(op.config.sparsity * op.mask.numel())
                zeros = int((~op.mask).sum())
                if zeros != expected:
                    failures.append(Failure(name, f"mask zeroes {zeros} of {op.mask.numel()}, expected {expected}", site, steps))
    return failures


def _reference_symmetric(x: Tensor, bits: int, axis: int | None) -> Tensor:
    """Narrow-range symmetric per-channel quantization written out independently."""
    qmax = 2 ** (bits - 1) - 1
    dims = tuple(d for d in range(x.dim()) if d != axis) if axis is not None else tuple(range(x.dim()))
    scale = (x.abs().amax(dim=dims, keepdim=True) / qmax).clamp_min(torch.finfo(torch.float32).eps)
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def _reference_keep(score: Tensor, k: int, tiebreak: Tensor | None) -> Tensor:
    """Keep-mask dropping the k smallest ``score`` (ties by ``tiebreak``, then by index)."""
    flat = score.reshape(-1).tolist()
    tb = tiebreak.reshape(-1).tolist() if tiebreak is not None else [0.0] * len(flat)
    order = sorted(range(len(flat)), key=lambda i: (flat[i], tb[i], i))
    keep = torch.ones(len(flat), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.reshape(score.shape)


def prune_quantize_orders_match_reference(case: Case) -> list[Failure]:
    """A weight with ops ``[Prune, Quantize]`` is ``Q(w·m)`` with ``m`` from ``|w|``; with
    ``[Quantize, Prune]`` it is ``Q(w)·m'`` with ``m'`` from ``|Q(w)|``, ties by ``|w|`` —
    checked right after the mask is computed, for default (uniform symmetric per-channel,
    2..16-bit, one-shot, unstructured) ops."""
    name = "prune_quantize_orders_match_reference"
    failures = []
    gm = case.transform(auto_step=False)
    for site, module, ops in _weight_ops(gm):
        configs = [op.config for op in ops]
        if len(configs) != 2 or {type(c) for c in configs} != {Prune, Quantize}:
            continue
        p = next(c for c in configs if isinstance(c, Prune))
        q = next(c for c in configs if isinstance(c, Quantize))
        if (
            q.bits < 2
            or q.learned
            or q.method != "uniform"
            or q.symmetric is False
            or q.per_channel is False
            or p.end is not None
            or p.structure != "element"
        ):
            continue
        quantizer = next(op for op in ops if isinstance(op, WeightQuantizer))
        step = max(p.start, q.start, int(gm.fxqp_schedule.step))
        fxqp.step(gm, step - int(gm.fxqp_schedule.step))
        gm.train()
        with torch.no_grad():
            _ = module.weight  # reading it in training mode computes the pruner's mask
            gm.eval()
            got = module.weight.detach().float()
            w = module.parametrizations["weight"].original.detach().float()
        k = round(p.sparsity * w.numel())
        if isinstance(configs[0], Prune):
            expected = _reference_symmetric(w * _reference_keep(w.abs(), k, None), q.bits, quantizer.channel_axis)
        else:
            qw = _reference_symmetric(w, q.bits, quantizer.channel_axis)
            expected = qw * _reference_keep(qw.abs(), k, w.abs())
        if not torch.allclose(got, expected, rtol=1e-6, atol=1e-7):
            diff = (got - expected).abs().max().item()
            failures.append(
                Failure(name, f"{[type(c).__name__ for c in configs]} differs from the reference by up to {diff:g}", site, step)
            )
    return failures


def lowered_equals_eval(case: Case) -> list[Failure]:
    """The lowered model computes the transformed model's eval outputs."""
    gm, steps = _trained(case)
    expected = _eval_output(gm, case.inputs)
    failures = []
    for decode in ("cache", "on_the_fly"):
        failures += [
            Failure(f.invariant, f"decode={decode!r}: {f.detail}", f.site, f.step)
            for f in _compare("lowered_equals_eval", _eval_output(fxqp.lower(gm, decode=decode), case.inputs), expected, steps, atol=1e-6)
        ]
    return failures


def save_load_round_trips(case: Case) -> list[Failure]:
    """A saved artifact loads into a fresh copy of the architecture with the same outputs."""
    gm, steps = _trained(case)
    low = fxqp.lower(gm)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.fxqp")
        fxqp.save(low, path)
        loaded = fxqp.load(path, copy.deepcopy(case.model), **_trace_kwargs(case))
    return _compare("save_load_round_trips", _eval_output(loaded, case.inputs), _eval_output(low, case.inputs), steps)


def compiled_equals_eager(case: Case) -> list[Failure]:
    """Under ``torch.compile(fullgraph=True)`` outputs and gradients match eager through the
    schedule.

    The backend is ``case.compile_backend``: ``aot_eager`` (default) compiles the very graphs
    Inductor would get and runs them with eager kernels, so values must agree to float
    rounding (rtol 1e-5, atol 1e-6 for outputs); ``inductor`` runs the fused kernels a
    user's ``torch.compile`` runs, which reassociate sums, and is checked to rtol and atol
    1e-4 (it takes far longer: every kernel is compiled). An error of the compiler or of
    the compiled model is this invariant's failure at that step, reported with the chain of
    exceptions behind it.
    """
    name = "compiled_equals_eager"
    eager, inner = case.transform(), case.transform()
    compiled = torch.compile(inner, backend=case.compile_backend, fullgraph=True)
    # aot_eager runs eager kernels on the compiled graphs (float rounding only); other
    # backends fuse kernels and reassociate sums
    out_tol = {"rtol": 1e-5, "atol": 1e-6} if case.compile_backend == "aot_eager" else {"rtol": 1e-4, "atol": 1e-4}
    grad_tol = {**out_tol, "rtol": 1e-4}
    opt_e = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=0.01)
    opt_c = torch.optim.SGD([p for p in inner.parameters() if p.requires_grad], lr=0.01)
    eager.train()
    compiled.train()
    failures = []
    for step in range(horizon(case.resolved_spec)):
        outs = []
        for model, opt in ((eager, opt_e), (compiled, opt_c)):
            opt.zero_grad()
            try:
                out = _first_tensor(model(*case.inputs))
                out.float().pow(2).mean().backward()
            except Exception as exc:  # noqa: BLE001 - a compiler or compiled-kernel error is this invariant's failure
                if model is eager:
                    raise
                failures.append(Failure(name, f"the compiled model raised {_error_chain(exc)}", step=step))
                break
            outs.append(out.detach())
        if failures:
            break
        if not torch.allclose(outs[1], outs[0], **out_tol):
            failures.append(Failure(name, f"outputs differ by up to {(outs[1] - outs[0]).abs().max().item():g}", step=step))
            break
        for (pname, p_e), p_c in zip(eager.named_parameters(), inner.parameters()):
            if p_e.grad is not None and not torch.allclose(p_c.grad, p_e.grad, **grad_tol):
                failures.append(Failure(name, f"gradient of {pname} differs", step=step))
        if failures:
            break
        opt_e.step()
        opt_c.step()
    if case.reset_compiler:
        torch.compiler.reset()
    return failures


def _error_chain(exc: BaseException | None, limit: int = 160) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters) of ``exc`` and of
    the exceptions it was raised from or while handling, innermost last: a compiled
    GraphModule re-raises a kernel's error as another one, and a backend's error is the
    cause of Dynamo's."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = lines[0][:limit] if lines else ""
        parts.append(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)


def resume_is_bit_exact(case: Case) -> list[Failure]:
    """A state_dict taken mid-schedule, loaded into a fresh transform, continues bit-exactly."""
    name = "resume_is_bit_exact"
    total = max(horizon(case.resolved_spec), 4)
    half = total // 2
    gm = case.transform()
    opt = train_steps(gm, case.inputs, half)
    checkpoint = copy.deepcopy({"model": gm.state_dict(), "opt": opt.state_dict()})
    train_steps(gm, case.inputs, total - half, opt)
    fresh = case.transform()
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.01)
    fresh_opt.load_state_dict(checkpoint["opt"])
    train_steps(fresh, case.inputs, total - half, fresh_opt)
    expected, got = gm.state_dict(), fresh.state_dict()
    return [
        Failure(name, f"state {key!r} differs after resuming at step {half}", step=total)
        for key in expected
        if not torch.equal(got[key], expected[key])
    ]


INVARIANTS: dict[str, Callable[[Case], list[Failure]]] = {
    "empty_spec_is_identity": empty_spec_is_identity,
    "ops_in_spec_order": ops_in_spec_order,
    "identity_before_start": identity_before_start,
    "quantized_values_on_grid": quantized_values_on_grid,
    "pruned_sites_have_target_zeros": pruned_sites_have_target_zeros,
    "prune_quantize_orders_match_reference": prune_quantize_orders_match_reference,
    "lowered_equals_eval": lowered_equals_eval,
    "save_load_round_trips": save_load_round_trips,
    "compiled_equals_eager": compiled_equals_eager,
    "resume_is_bit_exact": resume_is_bit_exact,
}
"""Every invariant, by name, in the order :func:`check` runs them."""


def check(
    model: nn.Module,
    spec: Spec | dict,
    example_inputs: tuple[Any, ...] | Tensor,
    *,
    invariants: Iterable[str] | None = None,
    compile_backend: str = "aot_eager",
    reset_compiler: bool = False,
    **transform_kwargs: Any,
) -> None:
    """Run fxqp's invariants on ``model`` with ``spec``; raise :class:`InvariantError`
    listing each failed invariant with its site and step.

    Args:
        model: the user's model (not modified).
        spec: a :class:`fxqp.Spec` or its dict form.
        example_inputs: positional inputs (a tensor or a tuple) used for every forward.
        invariants: names from :data:`INVARIANTS` to run (default: all).
        compile_backend: the ``torch.compile`` backend of ``compiled_equals_eager``:
            ``"aot_eager"`` (default, quick) or ``"inductor"`` (the fused kernels that
            ``torch.compile`` runs by default; slow to check), or any other name in
            ``torch.compiler.list_backends(exclude_tags=())``.
        reset_compiler: call ``torch.compiler.reset()`` once the compiled copy is checked,
            to free its compiled code at once; this discards every compiled graph of the
            process, the caller's too, so it is off by default.
        transform_kwargs: passed to :func:`fxqp.transform` (``leaf_modules``, ...).
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    backends = torch.compiler.list_backends(exclude_tags=())
    if compile_backend not in backends:
        raise FxqpError(
            f"fxqp.testing.check: compile_backend={compile_backend!r} is not a torch.compile backend; accepted: {', '.join(backends)}"
        )
    case = Case(model, as_spec(spec), inputs, transform_kwargs, compile_backend, reset_compiler)
    names = list(INVARIANTS) if invariants is None else list(invariants)
    unknown = [n for n in names if n not in INVARIANTS]
    if unknown:
        raise FxqpError(f"fxqp.testing.check: unknown invariant(s) {unknown}; accepted: {', '.join(INVARIANTS)}")
    failures = []
    for name in names:
        failures += INVARIANTS[name](case)
    if failures:
        raise InvariantError(failures)
