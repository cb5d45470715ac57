"""Symbolic tracing with leaf modules and an automatic fallback.

:func:`trace` turns an ``nn.Module`` into a ``torch.fx.GraphModule``.  It differs
from ``torch.fx.symbolic_trace`` in two ways:

* ``leaf_modules`` names extra modules (by dotted path or by class) that are kept
  as opaque ``call_module`` nodes instead of being traced through;
* when tracing fails inside a submodule (data-dependent control flow, an
  unsupported Python construct, ...), that submodule is made a leaf and tracing
  starts again from scratch.  The modules made leaves this way are reported in
  :attr:`TraceResult.fallback_leaves`, so nothing is hidden from the caller.

If the failure is in the root module's own ``forward`` there is nothing to make
a leaf of, and :class:`~passes.errors.UntraceableError` is raised.

Modules whose ``forward`` reads ``self.training`` (drop-path and the like) are traced
through like any other; each call of one that did read the flag is then folded back into a
single ``call_module`` node, so that ``.train()`` / ``.eval()`` keep switching it. That takes
one trace, not a second one with those modules as leaves.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from passes.errors import PassError, UntraceableError

__all__ = ["SOURCE_CLASSES_KEY", "TraceResult", "trace", "mode_dependent_modules"]

SOURCE_CLASSES_KEY = "source_module_classes"
"""``GraphModule.meta`` key set by :func:`trace`: ``{module path: class}`` of the traced model's
modules that the GraphModule holds only as plain ``nn.Module`` containers. A module that is
traced through (a ``Conv2d`` subclass defined outside ``torch.nn``, whose ``forward`` is
inlined) keeps just the attributes the graph reads; this records what it was."""


@dataclass(frozen=True)
class TraceResult:
    """What :func:`trace` produced.

    Attributes:
        graph_module: the traced model; its class is named after the model's.
        fallback_leaves: module paths that were made leaves automatically because
            tracing failed inside them, in the order they were added.
        leaves: every module path kept as a leaf on request: the paths given in
            ``leaf_modules``, then the paths of the instances of the classes given
            there, then ``fallback_leaves`` (without duplicates).  The built-in
            ``torch.nn`` leaves (``Conv2d``, ``ReLU``, ...) are not listed.
        mode_leaves: module paths kept as leaves because their ``forward`` reads
            ``self.training`` (drop-path, custom dropout, ...) and did read it while being
            traced: traced, that flag would be frozen at its value during tracing, so
            train/eval would stop switching their behaviour. Also listed in ``leaves``.
            Modules whose source reads the flag on a branch their configuration never
            takes are traced through.
    """

    graph_module: fx.GraphModule
    fallback_leaves: tuple[str, ...]
    leaves: tuple[str, ...]
    mode_leaves: tuple[str, ...] = ()


class _FallbackTracer(fx.Tracer):
    """A tracer with extra leaves that remembers where a failure happened.

    It keeps a stack of the module paths whose ``forward`` is running.  When an
    exception leaves a module call, the innermost running module is recorded for
    that exception (only the first time the exception object is seen, so the
    record is made by the innermost module and not overwritten by its parents).
    """

    def __init__(self, leaf_paths: Iterable[str], leaf_types: tuple[type, ...], watched: Iterable[str] = ()):
        super().__init__()
        self._leaf_paths = frozenset(leaf_paths)
        self._leaf_types = leaf_types
        self._watched = frozenset(watched)
        self.watched_calls: list[_TracedCall] = []
        """Every traced-through call of a module in ``watched``, in call order (an outer
        call before the calls inside it)."""
        self._watching: list[_TracedCall] = []
        self._running: list[str] = []
        # id(exception) -> (exception, innermost module path); the exception is
        # kept alive so that its id cannot be reused by another object.
        self._failures: dict[int, tuple[BaseException, str]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self._leaf_paths
            or isinstance(m, self._leaf_types)
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m, forward, args, kwargs):
        try:
            path = self.path_of_module(m)
        except NameError:
            # Not a registered submodule; the base class raises for it below and
            # the failure is charged to the module that made the call.
            path = None
        if path is not None:
            self._running.append(path)
        call = None
        if path in self._watched and not self.is_leaf_module(m, path):
            parent = self._watching[-1] if self._watching else None
            call = _TracedCall(path, args, kwargs, before=_last_node(self.graph), parent=parent)
            self.watched_calls.append(call)
            self._watching.append(call)
        try:
            result = super().call_module(m, forward, args, kwargs)
            if call is not None:
                call.result, call.last = result, _last_node(self.graph)
            return result
        except Exception as exc:
            if id(exc) not in self._failures:
                innermost = self._running[-1] if self._running else ""
                self._failures[id(exc)] = (exc, innermost)
            raise
        finally:
            if path is not None:
                self._running.pop()
            if call is not None:
                self._watching.pop()

    def failing_module_path(self, exc: BaseException) -> str:
        """The innermost module path running when ``exc`` was raised ("" = root)."""
        recorded = self._failures.get(id(exc))
        if recorded is not None and recorded[0] is exc:
            return recorded[1]
        return ""


@dataclass
class _TracedCall:
    """One traced-through call of a watched module: its arguments, the last graph node
    before the call, and (once it returned) its result and the last node it created."""

    path: str
    args: tuple
    kwargs: dict
    before: fx.Node | None
    parent: _TracedCall | None = None
    """The watched call this one ran inside, if any."""
    result: Any = None
    last: fx.Node | None = None


def _last_node(graph: fx.Graph) -> fx.Node | None:
    return next(iter(reversed(graph.nodes)), None)


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[str | type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    autoleaf: bool = True,
    max_retries: int | None = None,
    generate_code: bool = True,
) -> TraceResult:
    """Symbolically trace ``model`` into a ``GraphModule``.

    Args:
        model: the module to trace.  It is not modified (constants that tracing
            stores on the root are moved to the returned GraphModule), but the
            GraphModule shares its submodules and parameters, as with
            ``torch.fx.symbolic_trace``.
        leaf_modules: modules to keep as ``call_module`` nodes: exact dotted
            paths (``"layer1.0"``) or ``nn.Module`` subclasses (every instance is
            a leaf).  The default torch.fx rule (``torch.nn`` modules are
            leaves) still applies.
        concrete_args: passed to ``torch.fx.Tracer.trace``, e.g. to fix a flag
            that ``forward`` branches on.
        autoleaf: when tracing fails inside a submodule, make that submodule a
            leaf and try again.  When False the first failure is raised.
        max_retries: how many modules the fallback may make leaves; by default
            the number of modules in ``model``.
        generate_code: generate the GraphModule's Python code (its ``forward`` and
            ``.code``). Pass False when the caller edits the graph and then calls
            ``recompile()`` itself: fx's code generation costs about as much as the
            tracing, and would be done twice. Until then the GraphModule has the graph and
            the submodules but no ``forward``.

    Returns:
        A :class:`TraceResult`.

    Raises:
        PassError: ``leaf_modules`` names something that is not a submodule or
            a module class.
        UntraceableError: tracing failed in the root's own ``forward``, failed
            again in a module already made a leaf, or failed with ``autoleaf``
            off or with the retries used up.
    """
    if not isinstance(model, nn.Module):
        raise PassError(f"trace expects an nn.Module, got {type(model).__name__}")
    user_paths, leaf_types = _resolve_leaf_modules(model, leaf_modules)
    if max_retries is None:
        max_retries = sum(1 for _ in model.modules())
    trace_with = functools.partial(
        _trace_with_fallback,
        model,
        leaf_types=leaf_types,
        concrete_args=concrete_args,
        autoleaf=autoleaf,
        max_retries=max_retries,
        generate_code=generate_code,
    )
    candidates = [p for p in mode_dependent_modules(model) if p not in user_paths]
    with _training_reads(model, candidates) as read:
        graph_module, fallback, folded = trace_with(user_paths, watched=candidates, read=read)
    mode_paths = [p for p in candidates if p in read]
    if mode_paths and not folded:  # trace again with the modules that did read the flag as leaves
        graph_module, fallback, _ = trace_with([*user_paths, *mode_paths])
    fallback = [p for p in fallback if p not in mode_paths]
    graph_module.meta[SOURCE_CLASSES_KEY] = _source_classes(model, graph_module)
    type_paths = [
        name
        for name, module in (model.named_modules() if leaf_types else ())
        if name and isinstance(module, leaf_types)
    ]
    leaves = tuple(dict.fromkeys([*user_paths, *mode_paths, *type_paths, *fallback]))
    return TraceResult(graph_module, tuple(fallback), leaves, tuple(mode_paths))


def _trace_with_fallback(
    model: nn.Module,
    leaf_paths: list[str],
    *,
    leaf_types: tuple[type, ...],
    concrete_args: dict[str, Any] | None,
    autoleaf: bool,
    max_retries: int,
    watched: Iterable[str] = (),
    read: set[str] | frozenset[str] = frozenset(),
    generate_code: bool = True,
) -> tuple[fx.GraphModule, list[str], bool]:
    """Trace ``model`` with ``leaf_paths`` as leaves, adding a leaf per failure (see
    :func:`trace`). The calls of the ``watched`` modules whose path is in ``read`` once the
    trace is done are folded into ``call_module`` nodes (:func:`_fold_calls`). Returns the
    GraphModule, the automatic leaves and whether the folding succeeded (True when there
    was nothing to fold)."""
    fallback: list[str] = []
    while True:
        tracer = _FallbackTracer([*leaf_paths, *fallback], leaf_types, watched)
        attributes_before = set(vars(model))
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
            calls = [call for call in tracer.watched_calls if call.path in read]
            folded = _fold_calls(tracer, graph, calls) if calls else True
            return _graph_module(tracer.root, graph, type(model).__name__, generate_code), fallback, folded
        except Exception as exc:
            path = tracer.failing_module_path(exc)
            already_leaf = path != "" and (
                path in leaf_paths
                or path in fallback
                or isinstance(model.get_submodule(path), leaf_types)
            )
            hint = _reason_to_give_up(
                path, autoleaf, already_leaf, len(fallback), max_retries
            )
            if hint is None:
                fallback.append(path)
                continue
            raise UntraceableError(
                module_path=path,
                reason=f"{type(exc).__name__}: {exc}",
                leaves=fallback,
                module_type=type(model.get_submodule(path)).__name__,
                hint=hint,
            ) from exc
        finally:
            # Tracing stores constant tensors on the root; the GraphModule has
            # taken its own references, so leave the user's model as it was.
            for name in set(vars(model)) - attributes_before:
                delattr(model, name)


def _graph_module(root: nn.Module, graph: fx.Graph, class_name: str, generate_code: bool) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)``; without ``generate_code``, skipping the
    code generation that its constructor runs (see :func:`trace`).

    Every GraphModule is the only instance of its own subclass (fx installs the generated
    ``forward`` on that class), so the constructor's ``recompile`` can be switched off on
    that class alone while it runs, and the class then behaves as any other.
    """
    if generate_code:
        return fx.GraphModule(root, graph, class_name)
    gm = fx.GraphModule.__new__(fx.GraphModule)
    own_class = type(gm)
    if own_class is fx.GraphModule:  # not the per-instance class: patching it would touch every GraphModule
        return fx.GraphModule(root, graph, class_name)
    own_class.recompile = _no_code
    try:
        gm.__init__(root, graph, class_name)
    finally:
        del own_class.recompile
    return gm


def _no_code(self: fx.GraphModule) -> None:
    """Stands in for ``GraphModule.recompile`` while :func:`_graph_module` builds one."""


def _source_classes(model: nn.Module, graph_module: fx.GraphModule) -> dict[str, type]:
    """See :data:`SOURCE_CLASSES_KEY`."""
    classes = {}
    for path, module in graph_module.named_modules():
        if not path or type(module) is not nn.Module:
            continue
        try:
            source = model.get_submodule(path)
        except AttributeError:
            continue
        if type(source) is not nn.Module:
            classes[path] = type(source)
    return classes


def _fold_calls(tracer: fx.Tracer, graph: fx.Graph, calls: list[_TracedCall]) -> bool:
    """Replace the nodes that each call in ``calls`` traced with one ``call_module`` node of
    the same arguments, as if the module had been a leaf. Calls inside a call that is folded
    go with it. Returns False, with the graph unchanged, when a call cannot be folded: its
    result is not a proxy or a flat tuple/list of them, a proxy it returns was not created
    by the call (then the graph cannot tell the uses of its result from the uses of its
    input), or a node it created (other than a parameter read) is used otherwise after it
    returned; the caller then traces again with those modules as leaves.
    """
    plans = []
    folded: set[int] = set()
    for call in calls:  # outer calls first
        parent = call.parent
        while parent is not None and id(parent) not in folded:
            parent = parent.parent
        if parent is not None:
            continue  # inside a call that is folded
        region = _nodes_between(graph, call.before, call.last)
        members = set(region)
        outputs = _call_outputs(call.result)
        if outputs is None or any(out not in members for _, out in outputs):
            return False
        hoisted = []
        for node in region:
            outside = [user for user in node.users if user not in members]
            if outside and not any(node is out for _, out in outputs):
                if node.op != "get_attr":
                    return False
                hoisted.append(node)  # a parameter read reused later: keep it, before the call
        plans.append((call, region, outputs, hoisted))
        folded.add(id(call))
    replaced: dict[fx.Node, fx.Node] = {}  # outputs of folded calls -> their new nodes
    for call, region, outputs, hoisted in plans:
        body = [node for node in region if node not in hoisted]  # not empty: it holds the outputs
        for node in hoisted:  # parameter reads used later stay, just before the call
            body[0].prepend(node)
        with graph.inserting_before(body[0]):  # (constants among the arguments get their get_attr here)
            args, kwargs = fx.node.map_arg((tracer.create_arg(call.args), tracer.create_arg(call.kwargs)), lambda n: replaced.get(n, n))
            leaf = graph.call_module(call.path, args, kwargs)
        with graph.inserting_after(leaf):
            items = {index: graph.call_function(operator.getitem, (leaf, index)) for index, _ in outputs if index is not None}
        for index, out in outputs:
            replacement = leaf if index is None else items[index]
            out.replace_all_uses_with(replacement)
            replaced[out] = replacement
        for node in reversed(body):
            graph.erase_node(node)
        for item in items.values():
            if not item.users:  # an output nothing read
                graph.erase_node(item)
    return True


def _nodes_between(graph: fx.Graph, before: fx.Node | None, last: fx.Node | None) -> list[fx.Node]:
    """The nodes after ``before`` (None: from the start) up to and including ``last``."""
    if last is None or last is before:  # the call created no node
        return []
    nodes = []
    for node in graph.nodes if before is None else _nodes_after(before):
        nodes.append(node)
        if node is last:
            break
    return nodes


def _nodes_after(node: fx.Node):
    node = node.next
    while node.op != "root":  # the graph's sentinel closes the list
        yield node
        node = node.next


def _call_outputs(result: Any) -> list[tuple[int | None, fx.Node]] | None:
    """``[(None, node)]`` for a proxy result, ``[(i, node), ...]`` for a flat tuple or list
    of proxies, None for anything else."""
    if isinstance(result, fx.Proxy):
        return [(None, result.node)]
    if isinstance(result, (tuple, list)) and result and all(isinstance(item, fx.Proxy) for item in result):
        return [(i, item.node) for i, item in enumerate(result)]
    return None


@contextlib.contextmanager
def _training_reads(model: nn.Module, paths: list[str]):
    """Record which of the modules at ``paths`` read ``self.training`` while the block runs.

    A ``forward`` may read the flag on a branch its configuration never takes (torchvision's
    dense layers check it for dropout only when ``drop_rate > 0``): such a module traces the
    same in both modes and can be traced through. Each module's class is swapped for a
    subclass whose ``training`` property notes the read; the classes are restored after.
    Yields the set of the paths whose module read the flag.
    """
    read: set[str] = set()
    swapped = []
    for path in paths:
        module = model.get_submodule(path)
        swapped.append((module, type(module)))
        module.__class__ = _probe_class(type(module))
        module.__dict__["_fxqp_probe"] = (read, path)
    try:
        yield read
    finally:
        for module, cls in swapped:
            module.__class__ = cls
            module.__dict__.pop("_fxqp_probe", None)


@functools.lru_cache(maxsize=None)
def _probe_class(cls: type) -> type:
    """``cls`` with a ``training`` property that records reads (see :func:`_training_reads`)."""

    def get(self):
        probe = self.__dict__.get("_fxqp_probe")
        if probe is not None:
            probe[0].add(probe[1])
        return self.__dict__["training"]

    def set_(self, value):
        self.__dict__["training"] = value

    return type(cls)(cls.__name__, (cls,), {"training": property(get, set_), "__module__": cls.__module__})

@functools.lru_cache(maxsize=None)
def _reads_training_flag(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "self.training" in source


def mode_dependent_modules(model: nn.Module) -> list[str]:
    """Paths of the submodules whose ``forward`` reads ``self.training`` (outside
    ``torch.nn``, whose modules are leaves anyway).

    Symbolic tracing runs ``forward`` once and records ``self.training`` as the constant
    it was then; such a module must stay a leaf for ``.train()`` / ``.eval()`` to keep
    switching it (e.g. torchvision's ``StochasticDepth``).
    """
    return [
        name
        for name, module in model.named_modules()
        if name and not type(module).__module__.startswith("torch.nn.") and _reads_training_flag(type(module))
    ]


def _resolve_leaf_modules(
    model: nn.Module, leaf_modules: Iterable[str | type[nn.Module]]
) -> tuple[list[str], tuple[type[nn.Module], ...]]:
    """Split ``leaf_modules`` into canonical module paths and module classes."""
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    # A module registered under two names is traced under the first one.
    canonical: dict[int, str] = {}  # filled on the first path entry
    paths: list[str] = []
    types: list[type[nn.Module]] = []
    for entry in leaf_modules:
        if isinstance(entry, str):
            if entry == "":
                raise PassError("leaf_modules: the root module cannot be a leaf")
            try:
                module = model.get_submodule(entry)
            except AttributeError as exc:
                raise PassError(
                    f"leaf_modules: {entry!r} is not a submodule path of "
                    f"{type(model).__name__}"
                ) from exc
            if not canonical:
                canonical = {id(m): name for name, m in model.named_modules()}
            paths.append(canonical[id(module)])
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            types.append(entry)
        else:
            raise PassError(
                f"leaf_modules: expected a module path (str) or an nn.Module "
                f"subclass, got {entry!r}"
            )
    return paths, tuple(types)


def _reason_to_give_up(
    path: str,
    autoleaf: bool,
    already_leaf: bool,
    num_fallback: int,
    max_retries: int,
) -> str | None:
    """Why a failure at ``path`` cannot be fixed by a new leaf (None if it can)."""
    if path == "":
        return (
            "The root module's own forward cannot be made a leaf; make it "
            "traceable or fix the offending inputs with concrete_args"
        )
    if not autoleaf:
        return "Automatic leaves are off (autoleaf=False); pass it in leaf_modules"
    if already_leaf:
        return "It failed even as a leaf"
    if num_fallback >= max_retries:
        return f"Gave up after {max_retries} automatic leaves (max_retries)"
    return None
