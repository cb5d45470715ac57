"""``fxqp.transform``: trace a model and attach the spec's ops to its sites."""

from __future__ import annotations

import contextlib
import copy
import gc
from typing import Any, Iterable, Mapping

import torch
from torch import fx, nn

from fxqp.errors import InputError, SpecError, TraceError
from fxqp.ops import ActivationPruner, WeightPruner, WeightQuantizer, build_op
from fxqp.ops import fused
from fxqp.ops.chain import WeightChain
from fxqp.schedule import SCHEDULE_NAME, Schedule
from fxqp.sites import FLOATING_KEY, Assignment, Plan, activation_leaf_classes, plan_sites, record_value_types
from fxqp.spec import Prune, Spec
from fxqp.stages import ActivationStage
from fxqp.groups import couple_filter_groups
from passes import GuardError, PassError, UntraceableError, channel_groups, insert_after_many, parametrize, trace
from passes.examples import check_traced
from passes.trace import input_names

__all__ = ["transform", "transform_as_recorded", "trace_model", "as_spec", "STAGES_NAME"]

_CALLS = ("call_module", "call_function", "call_method")

STAGES_NAME = "fxqp_stages"
"""Parent module of every activation stage: ``fxqp_stages.<node name>`` (:func:`stage_name`)."""


def as_spec(spec: Spec | Mapping[str, Any]) -> Spec:
    """Accept a :class:`Spec` or its dict form."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Mapping):
        return Spec.from_dict(dict(spec))
    raise SpecError(f"spec: expected fxqp.Spec or a dict with 'rules', got {type(spec).__name__}")


def trace_model(
    model: nn.Module,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    *,
    example_inputs: tuple[Any, ...] | dict[str, Any] | None = None,
    generate_code: bool = True,
):
    """Trace ``model`` (with the automatic leaf fallback); :class:`TraceError` on failure.

    Activation modules from outside ``torch.nn`` (:func:`fxqp.sites.activation_leaf_classes`)
    are leaves besides ``leaf_modules``, so that each call is one activation site.

    ``generate_code=False``: the GraphModule gets no ``forward`` until its ``recompile()``
    (see :func:`passes.trace`), for callers that edit the graph first or only read it.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module to trace, got {type(model).__name__}")
    try:
        leaves = [*_as_list(leaf_modules), *activation_leaf_classes(model)]
        return trace(model, leaf_modules=leaves, concrete_args=concrete_args, example_inputs=example_inputs, guard=check_input, generate_code=generate_code)
    except PassError as err:
        if not isinstance(err, UntraceableError):
            raise TraceError(f"cannot trace {type(model).__name__}: {err}") from err
        raise _trace_error(model, err) from err


def check_input(value: Any, kind: str, expected: Any, what: str) -> None:
    """The guard of a transformed model's graph (:func:`passes.examples.check_traced`),
    raising :class:`fxqp.errors.InputError`."""
    try:
        check_traced(value, kind, expected, what)
    except GuardError as err:
        raise InputError(str(err)) from None


def _trace_error(model: nn.Module, err: UntraceableError) -> TraceError:
    where = repr(err.module_path) if err.module_path else "the root module's forward"
    leaves = f"; modules made leaves before giving up: {list(err.leaves)}" if err.leaves else ""
    return TraceError(
        f"cannot trace {type(model).__name__}: failure in {where}: {err.reason}{leaves}. "
        "Pass leaf_modules=[...] for submodules fx cannot trace, or concrete_args for flags "
        "that steer control flow",
        module_path=err.module_path,
        reason=err.reason,
    )


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _build_ops(assignment: Assignment, schedule: Schedule, weight: torch.Tensor | None, device: torch.device) -> list:
    kind = assignment.site.kind
    modules = []
    for position, config in enumerate(assignment.ops):
        try:
            op = build_op(config, assignment.site, weight)
        except SpecError as err:
            raise SpecError(f"rules[{assignment.rule_index}].{kind}[{position}] (site {assignment.site.name!r}): {err}") from None
        if device.type != "cpu":  # ops are built on the CPU (a weight pruner's mask: on the weight's device)
            op.to(device)
        op.bind(schedule)
        modules.append(op)
    return modules


def _attach_weight_ops(gm: fx.GraphModule, plan: Plan, schedule: Schedule) -> None:
    modules = dict(gm.named_modules())  # one walk of the tree, not a get_submodule per site
    for assignment in plan.weights:
        if not assignment.ops:
            continue
        module = modules[assignment.site.module_path]
        weight = module.weight
        ops = _build_ops(assignment, schedule, weight, weight.device)
        parametrize(module, "weight", ops, check=False)  # ops keep shape and dtype
        module.parametrizations["weight"].__class__ = WeightChain  # fuses prune + quantize eagerly
        quantizers = [op for op in ops if not isinstance(op, WeightPruner)]
        for position, op in enumerate(ops):
            if position > 0 and type(op) is WeightQuantizer and isinstance(ops[position - 1], WeightPruner):
                op.rounds_input_in_place = True  # the pruner's output w·m is a fresh tensor
            if isinstance(op, WeightPruner):
                op.attach_owner(module, "weight")
            if position > 0 and isinstance(op, WeightPruner):
                op.use_latent_tiebreak(module, "weight")
            if isinstance(op, WeightPruner) and op.config.criterion == "angle":
                if not quantizers:
                    raise SpecError(
                        f"rules[{assignment.rule_index}].weight[{position}] (site {assignment.site.name!r}): criterion 'angle' "
                        "compares the weight with its quantized version; expected a Quantize op at the same site"
                    )
                op.use_quantizer(quantizers[0])


def _attach_activation_stages(gm: fx.GraphModule, plan: Plan, schedule: Schedule, device: torch.device) -> None:
    nodes = {node.name: node for node in gm.graph.nodes}
    items = []
    for assignment in plan.activations:
        if not assignment.ops:
            continue
        site = assignment.site
        ops = _build_ops(assignment, schedule, None, device)
        for position, op in enumerate(ops):
            if position > 0 and isinstance(op, ActivationPruner):
                op.use_latent_tiebreak()
        stage = ActivationStage(site.name, site.target, ops)
        items.append((nodes[site.name], f"{STAGES_NAME}.{stage_name(site.name)}", stage, f"{site.name}_fxqp"))
    insert_after_many(gm, items, recompile=False)  # _call_schedule_last recompiles


def stage_name(site: str) -> str:
    """The stage's name under ``fxqp_stages``: the node's name, with ``_`` appended where that
    would shadow an ``nn.Module`` attribute (a ``.to(...)`` call's node is named ``to``)."""
    return f"{site}_" if hasattr(nn.Module, site) else site


def _prunes_filters(plan: Plan) -> bool:
    """Whether the plan prunes whole filters or input channels (which are coupled)."""
    return any(isinstance(op, Prune) and op.structure in ("filter", "channel") for a in plan.weights for op in a.ops)


def _call_schedule_last(gm: fx.GraphModule) -> None:
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    with gm.graph.inserting_before(output):
        gm.graph.call_module(SCHEDULE_NAME)
    gm.recompile()  # no graph.lint(): it would read (and so run) every parametrized weight


def transform(
    model: nn.Module,
    spec: Spec | Mapping[str, Any],
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    auto_step: bool = True,
    inplace: bool = False,
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
    total_steps: int | None = None,
) -> fx.GraphModule:
    """Trace ``model`` and attach the ops of ``spec`` to every site its rules select.

    * Weight ops become ``torch.nn.utils.parametrize`` parametrizations of ``<module>.weight``,
      one per op, registered in spec order (``[Prune, Quantize]`` gives ``Q(P(w))``); the
      optimizer keeps training ``<module>.parametrizations.weight.original``.
    * Activation ops go into an :class:`fxqp.stages.ActivationStage` per site, inserted as the
      node ``<node>_fxqp`` calling the module ``fxqp_stages.<node>`` right after the producer.
    * A :class:`fxqp.schedule.Schedule` (``fxqp_schedule``) holds the step counter; it is
      called as the graph's last node and advances the step at each training-mode forward
      (``auto_step=False``: only :func:`fxqp.step` advances it).

    Args:
        model: any ``nn.Module``; it is left untouched unless ``inplace=True``, in which case
            its submodules are shared with (and parametrized in) the result.
        spec: a :class:`fxqp.Spec` or its dict form.
        leaf_modules: module paths or classes to keep as opaque calls while tracing.
            Submodules fx cannot trace become leaves automatically; the schedule module's
            ``fallback_leaves`` lists them.
        concrete_args: passed to the tracer to specialise arguments (flags, ``None`` inputs).
        auto_step: advance the step counter at each training-mode forward.
        inplace: reuse the model's submodules instead of working on a deep copy.
        example_inputs: how the model is called — a tuple of positional inputs or a dict of
            keyword inputs (``{"input_ids": ..., "attention_mask": ...}``). They decide the
            transformed model's inputs: the ``forward`` parameters they give, in signature
            order; every other parameter is traced at its default value. They are also run
            through the model in eval mode: before the ops are attached, to leave out nodes
            whose value is not a floating-point tensor (integers or flags that static
            inference cannot see, e.g. inside wrapped functions) and, when the spec prunes
            filters or input channels (``Prune(structure="filter")`` or ``"channel"``), to
            find the channel groups that are pruned together (:mod:`fxqp.groups`); and right
            after the transform, which gives shape-dependent state (static activation masks)
            its shape — needed before ``torch.compile`` when the spec prunes activations with
            static masks (otherwise the first eager forward does it).
        total_steps: the training steps of the run, against which ``start``/``end``/``every``
            written as fractions (``"40%"``) are resolved (:meth:`fxqp.Spec.resolve`); the
            schedule module keeps the resolved spec and ``total_steps``.

    Returns:
        The transformed ``GraphModule``, on the model's device, with the model's dtypes.

    Raises:
        SpecError: invalid spec, a selector that matches nothing (with the closest names), or
            a fraction of the run without ``total_steps``.
        TraceError: the model cannot be traced even with the leaf fallback.
    """
    spec = as_spec(spec).resolve(total_steps)
    with _collector_paused():
        return _transform(model, spec, leaf_modules, concrete_args, auto_step, inplace, example_inputs, total_steps)


def transform_as_recorded(
    model: nn.Module,
    spec: Spec | Mapping[str, Any],
    non_float_nodes: Iterable[str],
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
) -> fx.GraphModule:
    """:func:`transform` without example inputs, but leaving out of the sites the nodes that
    an example run found not to be floating-point tensors when the model was first
    transformed (``gm.fxqp_schedule.non_float_nodes``, recorded in artifacts): so that
    :func:`fxqp.load` finds the same sites as the transform that made the file.
    ``example_inputs`` serve the tracing only (they may be ``meta`` tensors): the model is
    not run."""
    spec = as_spec(spec).resolve(None)  # a recorded spec has its fractions resolved
    with _collector_paused():
        return _transform(model, spec, leaf_modules, concrete_args, True, False, None, None, frozenset(non_float_nodes), example_inputs)


@contextlib.contextmanager
def _collector_paused():
    """Pause Python's cyclic garbage collector while the transform builds its objects, and
    put those objects straight into the collector's oldest generation when it succeeds.

    The transform creates tens of thousands of small container objects (graph nodes, op
    modules with their eleven hook dicts each, buffers) next to the model's:

    * with the collector running, the full collections they trigger rescan every object
      alive (about a fifth of the transform time of a 1,000-node model);
    * paused, the first allocation after it is re-enabled triggers one young-generation
      collection that scans all of them (up to 10% of the transform time), only to find that
      the model they make up is alive.

    So on success every tracked object (the process's other young objects too) moves to
    the oldest generation (``gc.freeze()`` then ``gc.unfreeze()``: two list splices, no
    scan), where the next full collection looks at it as at any long-lived model; the few
    reference cycles the trace leaves behind are freed there. Skipped when the process
    has frozen objects of its own (``gc.get_freeze_count()``), which unfreezing would
    release; after an error the young objects are left to the young-generation collection.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        if enabled and gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
    finally:
        if enabled:
            gc.enable()


def _transform(model, spec, leaf_modules, concrete_args, auto_step, inplace, example_inputs, total_steps, non_float_nodes=frozenset(), trace_inputs=None) -> fx.GraphModule:
    source = model if inplace else copy.deepcopy(model)
    if trace_inputs is None:
        trace_inputs = example_inputs
    traced = trace_model(source, leaf_modules, concrete_args, example_inputs=trace_inputs, generate_code=False)  # _call_schedule_last generates it
    gm = traced.graph_module
    if example_inputs is not None:
        example_inputs = traced.example_args if traced.example_args is not None else tuple(example_inputs)
        record_value_types(gm, tuple(example_inputs))
    for node in gm.graph.nodes:
        if node.name in non_float_nodes:
            node.meta[FLOATING_KEY] = False
    non_float = tuple(n.name for n in gm.graph.nodes if n.meta.get(FLOATING_KEY) is False and n.op in _CALLS)
    plan = plan_sites(gm, spec)
    groups = None
    if example_inputs is not None and _prunes_filters(plan):
        groups = channel_groups(gm, None)  # on the graph before any op is attached, shapes from record_value_types
    device = _model_device(gm)
    schedule = Schedule(spec=spec, auto_step=auto_step, fallback_leaves=traced.fallback_leaves, mode_leaves=traced.mode_leaves, total_steps=total_steps, mode_switches=traced.mode_switches).to(device)
    schedule.non_float_nodes = non_float
    schedule.leaf_functions = traced.leaf_functions
    schedule.example_signature = example_signature(source, trace_inputs)
    gm.add_submodule(SCHEDULE_NAME, schedule)
    _attach_weight_ops(gm, plan, schedule)
    if groups is not None:
        schedule.group_notes = tuple(couple_filter_groups(gm, groups, schedule))
        if all(isinstance(t, torch.Tensor) for t in example_inputs):  # for the summary's MAC count
            schedule.example_specs = [(tuple(t.shape), t.dtype) for t in example_inputs]
    _attach_activation_stages(gm, plan, schedule, device)
    _call_schedule_last(gm)
    if example_inputs is not None:
        _shape_state(gm, tuple(example_inputs))
    fused.measure_owned_refs()  # when eager weight gradients may be masked in place
    return gm


def _as_list(leaf_modules: Iterable[str | type] | str | type) -> list[str | type]:
    return [leaf_modules] if isinstance(leaf_modules, (str, type)) else list(leaf_modules)


_SCALARS = (bool, int, float, str, type(None))


def example_signature(model: nn.Module, example_inputs: tuple[Any, ...] | Mapping[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """What tracing needs of the example inputs, as JSON: per ``forward`` parameter, a
    tensor's ``shape`` and ``dtype``, or a plain value (``use_cache=False``). None when there
    are none, or one is neither (a list of images): then loading needs the inputs again."""
    if example_inputs is None:
        return None
    names = input_names(model, example_inputs)
    if names is None:
        return None
    named = example_inputs if isinstance(example_inputs, Mapping) else dict(zip(names, example_inputs))
    signature = {}
    for name, value in named.items():
        if isinstance(value, torch.Tensor):
            signature[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        elif isinstance(value, _SCALARS):
            signature[name] = {"value": value}
        else:
            return None
    return signature


def _shape_state(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """One eval-mode forward: nothing is observed or stepped, shapes are fixed."""
    mode = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            gm(*example_inputs)
    finally:
        gm.train(mode)
