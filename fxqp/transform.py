"""``fxqp.transform``: trace a model and attach the spec's ops to its sites."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from typing import Any, Iterable, Mapping

import torch
from torch import fx, nn
from torch.nn.utils import parametrize as torch_parametrize

from fxqp.errors import ChannelRuleError, InputError, SiteError, SpecError, TraceError
from fxqp.groups import couple_filter_groups
from fxqp.ops import build_op
from fxqp.ops.chain import TiedWeight, fuse_weight_chain
from fxqp.pickling import make_picklable, picklable_graph_module
from fxqp.schedule import SCHEDULE_NAME, Schedule, advance_after_forward, check_process_group, find_schedule
from fxqp.sites import FLOATING_KEY, Assignment, Plan, activation_leaf_classes, plan_sites, record_value_types
from fxqp.spec import Prune, Spec, is_fraction, resolve_step
from fxqp.stages import ActivationStage
from passes import (
    GuardError,
    Parts,
    PassError,
    UntraceableError,
    channel_groups,
    insert_after_many,
    install_part,
    parametrize,
    qualify,
    ruled_classes,
    trace,
    trace_parts,
)
from passes.errors import ChannelRuleError as PassChannelRuleError
from passes.examples import check_traced
from passes.trace import input_names

__all__ = ["transform", "transform_as_recorded", "trace_model", "trace_model_parts", "as_spec", "op_problems", "STAGES_NAME"]

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


def _leaves(model: nn.Module, leaf_modules: Iterable[str | type]) -> list[str | type]:
    """What tracing keeps as leaves: ``leaf_modules``, the model's activation module classes
    and the classes with a channel rule registered outside ``torch.nn``."""
    return [*_as_list(leaf_modules), *activation_leaf_classes(model), *ruled_classes(model)]


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
    are leaves besides ``leaf_modules``, so that each call is one activation site, and so
    are the classes with a channel rule (:func:`fxqp.register_channel_rule`), so that each
    call is one layer to the channel analysis.

    ``generate_code=False``: the GraphModule gets no ``forward`` until its ``recompile()``
    (see :func:`passes.trace`), for callers that edit the graph first or only read it.
    """
    with _trace_errors(model):
        return trace(
            model,
            leaf_modules=_leaves(model, leaf_modules),
            concrete_args=concrete_args,
            example_inputs=example_inputs,
            guard=check_input,
            generate_code=generate_code,
        )


def trace_model_parts(
    model: nn.Module,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    *,
    example_inputs: tuple[Any, ...] | dict[str, Any] | None = None,
    generate_code: bool = True,
    only: Iterable[str] | None = None,
) -> Parts:
    """:func:`trace_model`, descending into the largest traceable submodules when the root's
    own ``forward`` cannot be traced, and tracing on their own the modules kept as leaves
    (:func:`passes.trace_parts`; ``only`` as there)."""
    with _trace_errors(model):
        return trace_parts(
            model,
            leaf_modules=_leaves(model, leaf_modules),
            concrete_args=concrete_args,
            example_inputs=example_inputs,
            guard=check_input,
            generate_code=generate_code,
            only=only,
        )


@contextlib.contextmanager
def _trace_errors(model: nn.Module):
    """A model that is no module, and the errors of :mod:`passes` tracing, as :class:`TraceError`."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module to trace, got {type(model).__name__}")
    try:
        yield
    except PassError as err:
        if not isinstance(err, UntraceableError):
            raise TraceError(f"cannot trace {type(model).__name__}: {err}") from err
        raise _trace_error(model, err) from err


def part_modules(parts: Parts) -> dict[str, fx.GraphModule]:
    """Module path → ``GraphModule`` of each traced part."""
    return {path: result.graph_module for path, result in parts.parts.items()}


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


def _angle_problem(assignment: Assignment) -> str | None:
    """Why the ops of a weight site cannot be chained, or None: ``criterion="angle"`` on a
    site without a Quantize op, whose quantized weight the angle is measured against."""
    if any(not isinstance(config, Prune) for config in assignment.ops):
        return None
    for position, config in enumerate(assignment.ops):
        if config.criterion == "angle":
            return (
                f"rules[{assignment.rule_index}].weight[{position}] (site {assignment.site.name!r}): criterion 'angle' "
                "compares the weight with its quantized version; expected a Quantize op at the same site"
            )
    return None


def op_problems(model: nn.Module, plan: Plan) -> list[str]:
    """What :func:`fxqp.transform` would reject when it builds the ops of the sites of
    ``plan`` (an op a site cannot take: filter pruning of an activation, per-channel
    activation quantization, a weight shape a structure does not fit; ``criterion="angle"``
    without a Quantize op): one message per rule and op, naming its first site, as
    transform words it. Weight ops are built on ``meta`` tensors: nothing is allocated."""
    modules = dict(model.named_modules())
    found: dict[tuple[int, str, int], list] = {}  # (rule, kind, op position) -> [message, further sites]

    def note(key: tuple[int, str, int], message: str) -> None:
        if key in found:
            found[key][1] += 1
        else:
            found[key] = [message, 0]

    for assignment in (*plan.weights, *plan.activations):
        site = assignment.site
        weight = None
        if site.kind == "weight" and assignment.ops:
            real = modules[site.module_path].weight
            weight = torch.empty(real.shape, dtype=real.dtype, device="meta")
        for position, config in enumerate(assignment.ops):
            # fractions of the run as steps of some run: what a site takes does not depend on them
            steps = {
                name: resolve_step(value, 1000) for name in ("start", "end", "every") if is_fraction(value := getattr(config, name, None))
            }
            try:
                build_op(dataclasses.replace(config, **steps), site, weight)
            except (SpecError, SiteError) as err:
                note(
                    (assignment.rule_index, site.kind, position),
                    f"rules[{assignment.rule_index}].{site.kind}[{position}] (site {site.name!r}): {err}",
                )
        if site.kind == "weight":
            angle = _angle_problem(assignment)
            if angle is not None:
                note((assignment.rule_index, site.kind, -1), angle)
    return [message + (f" (and {more} more site(s))" if more else "") for message, more in found.values()]


def _attach_weight_ops(gm: fx.GraphModule, plan: Plan, schedule: Schedule) -> None:
    modules = dict(gm.named_modules())  # one walk of the tree, not a get_submodule per site
    for assignment in plan.weights:
        if not assignment.ops:
            continue
        angle = _angle_problem(assignment)
        if angle is not None:
            raise SpecError(angle)
        module = modules[assignment.site.module_path]
        weight = module.weight
        ops = _build_ops(assignment, schedule, weight, weight.device)
        parametrize(module, "weight", ops, check=False)  # ops keep shape and dtype
        for position, op in enumerate(ops):
            op.link(ops, position, module, "weight")  # the angle criterion has a quantizer (_angle_problem)
        fuse_weight_chain(module, "weight")  # plans the accelerated runs of the linked ops
        for path in assignment.site.tied:  # the same Parameter: read through this chain
            torch_parametrize.register_parametrization(modules[path], "weight", TiedWeight(module, assignment.site.name), unsafe=True)


def _attach_activation_stages(parts: Mapping[str, fx.GraphModule], plan: Plan, schedule: Schedule, device: torch.device) -> None:
    """Insert each activation site's stage after its node, in its part's graph, as
    ``<part>.fxqp_stages.<node>``. The parts are not recompiled."""
    for path, gm in parts.items():
        nodes = {node.name: node for node in gm.graph.nodes}
        items = []
        for assignment in plan.activations:
            site = assignment.site
            if not assignment.ops or site.part != path:
                continue
            ops = _build_ops(assignment, schedule, None, device)
            for position, op in enumerate(ops):
                op.link(ops, position)
            stage = ActivationStage(site.name, site.target, ops)
            items.append((nodes[site.node], f"{STAGES_NAME}.{stage_name(site.node)}", stage, f"{site.node}_fxqp"))
        if items:
            insert_after_many(gm, items, recompile=False)


def stage_name(site: str) -> str:
    """The stage's name under ``fxqp_stages``: the node's name, with ``_`` appended where that
    would shadow an ``nn.Module`` attribute (a ``.to(...)`` call's node is named ``to``)."""
    return f"{site}_" if hasattr(nn.Module, site) else site


def _prunes_filters(plan: Plan) -> bool:
    """Whether the plan prunes whole filters or input channels (which are coupled)."""
    return any(isinstance(op, Prune) and op.structure in ("filter", "channel") for a in plan.weights for op in a.ops)


def _call_schedule_last(gm: fx.GraphModule) -> None:
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    first = next((node for node in gm.graph.nodes if node.op == "placeholder"), None)
    with gm.graph.inserting_before(output):
        gm.graph.call_module(SCHEDULE_NAME, (first,) if first is not None else ())
    gm.recompile()  # no graph.lint(): it would read (and so run) every parametrized weight


def _install_parts(root: nn.Module, parts: Mapping[str, fx.GraphModule]) -> None:
    """A model traced in parts: each part runs in place of its module, and the schedule
    advances after every forward of the root (a forward hook, as the last graph node would)."""
    for path, gm in parts.items():
        install_part(root.get_submodule(path), gm)
    root.register_forward_hook(advance_after_forward)


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
    process_group: Any = None,
) -> nn.Module:
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
        process_group: where activation statistics (observers' min/max, LSQ's initial step
            sizes, static activation pruning's averages) are reduced when training runs on
            several processes: ``None`` (default) — across the default group whenever
            ``torch.distributed`` is initialised; a ``ProcessGroup`` — across its ranks;
            ``False`` — never (each process keeps its own). Each training forward then runs
            at most two collectives for the whole model (:mod:`fxqp.ops.statistics`);
            :func:`fxqp.set_process_group` changes it later.

    A model whose root ``forward`` cannot be traced is traced in parts (its largest
    traceable submodules, :func:`passes.trace_parts`; so are the modules a trace keeps as
    leaves): each part runs its graph in place of its module, weights in untraced modules
    get their ops all the same, and ``fxqp_schedule.parts`` / ``.untraced`` say which
    modules were traced and which were not, and why.

    A ``Parameter`` shared by several modules (tied weights) is one site: one op chain on
    the first module, read by the others (:class:`fxqp.ops.chain.TiedWeight`).

    Returns:
        The transformed ``GraphModule``, on the model's device, with the model's dtypes; for
        a model traced in parts, the model itself (a copy unless ``inplace``) with its
        parts traced in place.

    Raises:
        SpecError: invalid spec, a selector that matches nothing (with the closest names), or
            a fraction of the run without ``total_steps``.
        TraceError: no part of the model can be traced, or tracing gave up inside a
            submodule even with the leaf fallback.
    """
    spec = as_spec(spec).resolve(total_steps)
    group = check_process_group(process_group, "fxqp.transform")
    gm = _transform(model, spec, leaf_modules, concrete_args, auto_step, inplace, example_inputs, total_steps)
    find_schedule(gm).process_group = group
    return gm


def transform_as_recorded(
    model: nn.Module,
    spec: Spec | Mapping[str, Any],
    non_float_nodes: Iterable[str],
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
    parts: Iterable[str] | None = None,
) -> nn.Module:
    """:func:`transform` without example inputs, but leaving out of the sites the nodes that
    an example run found not to be floating-point tensors when the model was first
    transformed (``gm.fxqp_schedule.non_float_nodes``, recorded in artifacts): so that
    :func:`fxqp.load` finds the same sites as the transform that made the file.
    ``example_inputs`` serve the tracing only (they may be ``meta`` tensors): the model is
    not run. ``parts``: the traced parts to rebuild (``gm.fxqp_schedule.parts``, recorded in
    artifacts), traced exactly (:func:`passes.trace_parts`'s ``only``)."""
    spec = as_spec(spec).resolve(None)  # a recorded spec has its fractions resolved
    return _transform(model, spec, leaf_modules, concrete_args, True, False, None, None, frozenset(non_float_nodes), example_inputs, parts)


def _transform(
    model,
    spec,
    leaf_modules,
    concrete_args,
    auto_step,
    inplace,
    example_inputs,
    total_steps,
    non_float_nodes=frozenset(),
    trace_inputs=None,
    only=None,
) -> nn.Module:
    source = model if inplace else copy.deepcopy(model)
    if trace_inputs is None:
        trace_inputs = example_inputs
    traced = trace_model_parts(
        source, leaf_modules, concrete_args, example_inputs=trace_inputs, generate_code=False, only=only
    )  # recompiled after the edits
    parts = part_modules(traced)
    for gm in parts.values():  # before they have code: cheapest then
        picklable_graph_module(gm)
    root = parts[""] if traced.whole else source
    if traced.whole and example_inputs is not None:
        whole = traced.parts[""]
        example_inputs = whole.example_args if whole.example_args is not None else tuple(example_inputs)
        record_value_types(root, tuple(example_inputs))
    elif example_inputs is not None:
        for path, inputs in _part_inputs(source, parts, example_inputs).items():
            record_value_types(parts[path], inputs)
    for path, gm in parts.items():
        for node in gm.graph.nodes:
            if qualify(path, node.name) in non_float_nodes:
                node.meta[FLOATING_KEY] = False
    non_float = tuple(
        qualify(path, n.name) for path, gm in parts.items() for n in gm.graph.nodes if n.meta.get(FLOATING_KEY) is False and n.op in _CALLS
    )
    plan = plan_sites(root, spec, parts=parts)
    groups = notes = None
    if example_inputs is not None and _prunes_filters(plan):
        if traced.whole:
            try:
                groups = channel_groups(root, None)  # on the graph before any op is attached, shapes from record_value_types
            except PassChannelRuleError as err:
                raise ChannelRuleError(str(err)) from None
        else:
            notes = (
                "filters and input channels are pruned layer by layer: coupling them across layers needs the whole model traced as one graph",
            )
    device = _model_device(root)
    schedule = Schedule(
        spec=spec,
        auto_step=auto_step,
        fallback_leaves=traced.qualified("fallback_leaves"),
        mode_leaves=traced.qualified("mode_leaves"),
        total_steps=total_steps,
        mode_switches=traced.qualified("mode_switches"),
    ).to(device)
    schedule.non_float_nodes = non_float
    schedule.leaf_functions = traced.leaf_functions()
    schedule.example_signature = example_signature(source, trace_inputs)
    schedule.parts = tuple(parts)
    schedule.untraced = dict(traced.untraced)
    root.add_module(SCHEDULE_NAME, schedule)
    _attach_weight_ops(root, plan, schedule)
    if groups is not None:
        schedule.group_notes = tuple(couple_filter_groups(root, groups, schedule))
        if all(isinstance(t, torch.Tensor) for t in example_inputs):  # for the summary's MAC count
            schedule.example_specs = [(tuple(t.shape), t.dtype) for t in example_inputs]
    elif notes:
        schedule.group_notes = notes
    _attach_activation_stages(parts, plan, schedule, device)
    if traced.whole:
        _call_schedule_last(root)
    else:
        _install_parts(root, parts)
    if example_inputs is not None:
        _shape_state(root, example_inputs)
    make_picklable(root)  # torch.save(model) and pickle work as for any module (parts: above)
    return root


def _part_inputs(
    model: nn.Module, parts: Mapping[str, fx.GraphModule], example_inputs: tuple[Any, ...] | Mapping[str, Any]
) -> dict[str, tuple[Any, ...]]:
    """The inputs each part of a model traced in parts gets, in its graph's input order, on
    the first call of one eval-mode forward of ``model`` (not yet transformed) on the example
    inputs; a part not called, or called with arguments its graph does not take, is left out.
    Parts are traced without the root's examples: this run tells which of their nodes are no
    floating-point tensors (a list of feature maps, a flag)."""
    seen: dict[str, tuple[Any, ...]] = {}

    def recorder(path: str, gm: fx.GraphModule):
        names = [node.target for node in gm.graph.nodes if node.op == "placeholder"]

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if path in seen:
                return
            try:
                bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
            except TypeError:
                return
            bound.apply_defaults()
            if all(name in bound.arguments for name in names):
                seen[path] = tuple(bound.arguments[name] for name in names)

        return record

    handles = [model.get_submodule(path).register_forward_pre_hook(recorder(path, gm), with_kwargs=True) for path, gm in parts.items()]
    try:
        _shape_state(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


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


def _shape_state(gm: nn.Module, example_inputs: tuple[Any, ...] | Mapping[str, Any]) -> None:
    """One eval-mode forward: nothing is observed or stepped, shapes are fixed."""
    mode = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            if isinstance(example_inputs, Mapping):
                gm(**example_inputs)
            else:
                gm(*example_inputs)
    finally:
        gm.train(mode)
