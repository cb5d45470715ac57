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

A model whose code reads ``self.training`` (dropout written as ``F.dropout(...,
training=self.training)``, drop-path, batch norm written out in Python) is traced in both
modes, and what differs becomes a :class:`passes.modes.ModeSwitch` that ``.train()`` /
``.eval()`` switch at run time (:mod:`passes.modes`): the rest of such a module, its
activation calls included, stays in the graph. A module whose two versions cannot be
switched that way (they call different submodules, or return different things) is made a
leaf instead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import keyword
import os
import sys
import sysconfig
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from passes.errors import PassError, UntraceableError
from passes.examples import ExampleTracer, check_traced
from passes.modes import compare_modes, switch_modes, unswitchable

__all__ = [
    "SOURCE_CLASSES_KEY",
    "LEAF_FUNCTIONS_KEY",
    "TRACE_LOCK",
    "TraceResult",
    "trace",
    "reads_training_flag",
    "input_names",
    "resolve_leaf_modules",
]

TRACE_LOCK = threading.RLock()
"""Held around every symbolic trace in this process. While torch.fx traces it patches
process-wide state — ``nn.Module.__call__`` and ``__getattr__``, and the globals of the code
it traces (as do the stand-ins for plain functions made leaves here) — and restores what it
found when done; two traces interleaved in threads would each restore the other's patches,
leaving them in place for good. One trace at a time keeps concurrent ``fxqp.transform``,
``fxqp.load`` and ``fxqp.lower`` calls correct."""

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
        mode_leaves: module paths kept as leaves because they behave differently in training
            and evaluation in a way a :class:`~passes.modes.ModeSwitch` cannot express
            (another submodule called, another kind of value returned). Also listed in
            ``leaves``.
        mode_switches: paths of the :class:`~passes.modes.ModeSwitch` modules that compute,
            by their ``training`` flag, the parts of the graph that differ between training
            and evaluation (``<module>.fxqp_mode_<n>``, inside the module whose code made
            that part).
        example_args: the example inputs that became the graph's inputs, in its input
            order (those without a tensor are traced as constants); None without examples.
        leaf_functions: qualified names of the plain functions called as one opaque node
            because tracing failed inside them (their caller stays traced).
    """

    graph_module: fx.GraphModule
    fallback_leaves: tuple[str, ...]
    leaves: tuple[str, ...]
    mode_leaves: tuple[str, ...] = ()
    mode_switches: tuple[str, ...] = ()
    example_args: tuple[Any, ...] | None = None
    leaf_functions: tuple[str, ...] = ()


class _FallbackTracer(fx.Tracer):
    """A tracer with extra leaves that remembers where a failure happened.

    It keeps a stack of the module paths whose ``forward`` is running.  When an
    exception leaves a module call, the innermost running module is recorded for
    that exception (only the first time the exception object is seen, so the
    record is made by the innermost module and not overwritten by its parents).
    """

    # Buffers are read through get_attr nodes, like parameters: an in-place update written in
    # a forward (a batch-norm counter's ``add_``) is then part of the graph, not done once
    # while tracing.
    proxy_buffer_attributes = True

    def __init__(self, leaf_paths: Iterable[str], leaf_types: tuple[type, ...], inputs: tuple[str, ...] | None = None):
        super().__init__()
        self._leaf_paths = frozenset(leaf_paths)
        self._leaf_types = leaf_types
        self._inputs = inputs
        self._running: list[str] = []
        # id(exception) -> (exception, innermost module path); the exception is
        # kept alive so that its id cannot be reused by another object.
        self._failures: dict[int, tuple[BaseException, str]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self._leaf_paths or isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m, forward, args, kwargs):
        try:
            path = self.path_of_module(m)
        except NameError:
            # Not a registered submodule: a module made inside a forward (``nn.ReLU()(x)``).
            # It has no path to call it by, so its forward is traced inline; a failure
            # there is charged to the module that made the call.
            return forward(*args, **kwargs)
        self._running.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if id(exc) not in self._failures:
                innermost = self._running[-1] if self._running else ""
                self._failures[id(exc)] = (exc, innermost)
            raise
        finally:
            self._running.pop()

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """:meth:`_create_args_for_root`, with the root's result recorded in
        ``output_class``: its class when that is a ``dict`` subclass (a ``ModelOutput``, an
        ``OrderedDict``), which tracing turns into a plain dict."""
        fn, args = self._create_args_for_root(root_fn, is_module, concrete_args)

        def recording(*a):
            out = fn(*a)
            self.output_class = type(out) if isinstance(out, dict) and type(out) is not dict else None
            return out

        return recording, args

    output_class: type | None = None

    def _create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """Placeholders for the parameters of the function behind any ``functools.wraps``
        wrapper (a ``(self, *args, **kwargs)`` decorator), called by keyword.

        With ``inputs`` (the parameter names the example inputs give), only those become
        placeholders, without defaults; every other parameter takes its default, as in the
        call the examples stand for. ``*args`` and ``**kwargs`` get no placeholder. A plain ``forward`` without
        either is left to fx.
        """
        target = inspect.unwrap(root_fn)
        params = list(inspect.signature(target).parameters.values())[1 if is_module else 0 :]
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if self._inputs is None and target is root_fn and not any(p.kind in variadic for p in params):
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        concrete = dict(concrete_args or {})
        given = (
            self._inputs if self._inputs is not None else tuple(p.name for p in params if p.kind not in variadic and p.name not in concrete)
        )
        kwargs = {}
        for p in params:
            if p.kind in variadic:
                continue
            if p.name in concrete:
                kwargs[p.name] = concrete[p.name]
            elif p.name in given:  # given by an example: required, the graph is traced with a value there
                default = () if self._inputs is not None or p.default is inspect.Parameter.empty else (p.default,)
                kwargs[p.name] = self.create_proxy("placeholder", p.name, default, {})
            elif p.default is not inspect.Parameter.empty:
                kwargs[p.name] = p.default
            else:
                raise PassError(
                    f"forward parameter {p.name!r} has no default value and no example input; pass it in example_inputs or concrete_args"
                )

        def call(*root):
            return root_fn(*root, **kwargs)

        return call, [self.root] if is_module else []

    def failing_module_path(self, exc: BaseException) -> str:
        """The innermost module path running when ``exc`` was raised ("" = root)."""
        recorded = self._failures.get(id(exc))
        if recorded is not None and recorded[0] is exc:
            return recorded[1]
        return ""


class _ExampleFallbackTracer(ExampleTracer, _FallbackTracer):
    """:class:`_FallbackTracer` with example values (:mod:`passes.examples`)."""


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[str | type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple[Any, ...] | dict[str, Any] | None = None,
    guard: Callable[..., None] | None = None,
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
        example_inputs: how the model is called (positional tuple, or keyword dict): only
            the parameters they give become the GraphModule's inputs, the others keep their
            default values (``attention_mask=None`` is traced as ``None``, not as an input
            that might be anything). Where symbolic tracing leaves parts of the model
            untraced, it is traced again with their shapes and dtypes as example values
            (:mod:`passes.examples`): Python decisions on them are settled and guarded, and
            the result with fewer leaves is kept.
        guard: the function the guard nodes of such a trace call (default
            :func:`passes.examples.check_traced`, which raises
            :class:`~passes.errors.GuardError`).
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
            a module class; ``example_inputs`` give a parameter ``forward`` does not have,
            or leave out one without a default.
        UntraceableError: tracing failed in the root's own ``forward``, failed
            again in a module already made a leaf, or failed with ``autoleaf``
            off or with the retries used up.
    """
    if not isinstance(model, nn.Module):
        raise PassError(f"trace expects an nn.Module, got {type(model).__name__}")
    user_paths, leaf_types = resolve_leaf_modules(model, leaf_modules)
    if max_retries is None:
        max_retries = sum(1 for _ in model.modules())
    inputs, examples, concrete_args = _split_examples(model, example_inputs, concrete_args)
    trace_with = functools.partial(
        _trace_with_fallback,
        model,
        inputs=inputs,
        guard=guard,
        leaf_types=leaf_types,
        concrete_args=concrete_args,
        autoleaf=autoleaf,
        max_retries=max_retries,
    )
    reads_flag = reads_training_flag(model)

    def attempt(examples: dict[str, Any] | None):
        run = functools.partial(trace_with, examples=examples)
        if reads_flag:
            return _trace_both_modes(model, user_paths, run, generate_code)
        gm, fallback = run(user_paths, generate_code=generate_code)
        return gm, fallback, [], []

    # Symbolically first; where that leaves parts untraced, again with the example values
    # (passes.examples), which settle Python decisions on shapes and dtypes.
    error: UntraceableError | None = None
    try:
        result = attempt(None)
    except UntraceableError as err:
        result, error = None, err
    if examples is not None and (result is None or result[1] or result[2]):
        try:
            better = attempt(examples)
        except UntraceableError:
            better = None
        if better is not None and (result is None or len(better[1]) + len(better[2]) < len(result[1]) + len(result[2])):
            result = better
    if result is None:
        raise error
    graph_module, fallback, mode_paths, switches = result
    graph_module.meta[SOURCE_CLASSES_KEY] = _source_classes(model, graph_module)
    type_paths = [name for name, module in (model.named_modules() if leaf_types else ()) if name and isinstance(module, leaf_types)]
    leaves = tuple(dict.fromkeys([*user_paths, *mode_paths, *type_paths, *fallback]))
    example_args = None if examples is None else tuple(examples.values())
    return TraceResult(
        graph_module,
        tuple(fallback),
        leaves,
        tuple(mode_paths),
        tuple(switches),
        example_args,
        graph_module.meta.get(LEAF_FUNCTIONS_KEY, ()),
    )


def _trace_both_modes(model: nn.Module, user_paths: list[str], trace_with, generate_code: bool):
    """Trace ``model`` with every module in training mode and again in evaluation mode, and
    switch what differs at run time (:mod:`passes.modes`). A module whose difference cannot
    be switched becomes a leaf and both traces start again. Returns the GraphModule, the
    automatic leaves, the modules made leaves for their modes, and the switches' paths."""
    mode_paths: list[str] = []
    fallback: list[str] = []
    while True:
        leaves = [*user_paths, *mode_paths]
        with _all_modes(model, True):
            train, more = trace_with([*leaves, *fallback], generate_code=False)
        fallback += more
        with _all_modes(model, False):
            evals, more = trace_with([*leaves, *fallback], generate_code=False)
        if more:  # a module that traces in training mode only: a leaf in both
            fallback += more
            continue
        diff = compare_modes(train.graph, evals.graph)
        problems = [(region, why) for region in diff.regions if (why := unswitchable(region))]
        if not problems:
            switches = switch_modes(train, evals, diff)
            if generate_code:
                train.recompile()
            return train, fallback, mode_paths, switches
        for region, why in problems:
            if region.owner == "" or region.owner in mode_paths:
                first = (region.train or region.eval)[0]
                raise UntraceableError(
                    module_path=region.owner,
                    reason=f"it computes differently in training and in evaluation mode, and {why} "
                    f"(first differing node: {first.format_node()})",
                    leaves=fallback,
                    module_type=type(model.get_submodule(region.owner)).__name__,
                    hint="Make the code that reads self.training a submodule of its own, or trace the model in one mode",
                )
            mode_paths.append(region.owner)


@contextlib.contextmanager
def _all_modes(model: nn.Module, training: bool):
    """Every module of ``model`` in training (or evaluation) mode while the block runs; each
    module's own flag is restored after."""
    modules = list(model.modules())
    before = [module.training for module in modules]
    for module in modules:
        module.training = training
    try:
        yield
    finally:
        for module, flag in zip(modules, before):
            module.training = flag


def _trace_with_fallback(
    model: nn.Module,
    leaf_paths: list[str],
    *,
    leaf_types: tuple[type, ...],
    concrete_args: dict[str, Any] | None,
    autoleaf: bool,
    max_retries: int,
    inputs: tuple[str, ...] | None = None,
    examples: dict[str, Any] | None = None,
    guard: Callable[..., None] | None = None,
    generate_code: bool = True,
) -> tuple[fx.GraphModule, list[str]]:
    """Trace ``model`` with ``leaf_paths`` as leaves, adding a leaf per failure (see
    :func:`trace`). Returns the GraphModule and the automatic leaves."""
    fallback: list[str] = []
    functions: list[_LeafFunction] = []
    while True:
        if examples is None:
            tracer = _FallbackTracer([*leaf_paths, *fallback], leaf_types, inputs)
        else:
            tracer = _ExampleFallbackTracer([*leaf_paths, *fallback], leaf_types, inputs)
            tracer.init_examples(examples, guard or check_traced)
        attributes_before = set(vars(model))
        states = [(module, dict(vars(module))) for module in model.modules()]
        try:
            with TRACE_LOCK, contextlib.ExitStack() as patched:
                for function in functions:
                    patched.enter_context(function.patched())
                graph = tracer.trace(model, concrete_args=concrete_args)
            _keep_output_class(graph, tracer.output_class)
            gm = _graph_module(tracer.root, graph, type(model).__name__, generate_code)
            gm.meta[LEAF_FUNCTIONS_KEY] = tuple(f"{f.function.__module__}.{f.function.__qualname__}" for f in functions)
            return gm, fallback
        except Exception as exc:
            function = _failing_function(exc) if autoleaf else None
            if function is not None and function not in functions and len(fallback) + len(functions) < max_retries:
                functions.append(function)  # the plain function that failed, not the module calling it
                continue
            path = tracer.failing_module_path(exc)
            already_leaf = path != "" and (path in leaf_paths or path in fallback or isinstance(model.get_submodule(path), leaf_types))
            hint = _reason_to_give_up(path, autoleaf, already_leaf, len(fallback), max_retries)
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
            _restore_proxied_attributes(states)


def _keep_output_class(graph: fx.Graph, cls: type | None) -> None:
    """Where the root returned a ``dict`` subclass (``cls``: a Hugging Face ``ModelOutput``, an
    ``OrderedDict``), which tracing turned into a plain dict, end the graph with
    ``cls(**fields)`` (``cls(fields)`` where a key is no identifier): the traced model
    returns what the model did (``out.logits`` keeps working)."""
    if cls is None:
        return
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    fields = output.args[0]
    if not isinstance(fields, dict) or not all(isinstance(key, str) for key in fields):
        return
    with graph.inserting_before(output):
        if all(key.isidentifier() and not keyword.iskeyword(key) for key in fields):
            rebuilt = graph.call_function(cls, (), dict(fields))  # cls(logits=...): a ModelOutput's fields
        else:
            rebuilt = graph.call_function(cls, (dict(fields),))  # OrderedDict({"0": ...})
    output.args = (rebuilt,)


def _restore_proxied_attributes(states: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Undo what a forward did to its modules' attributes while it was traced: code that
    caches a value computed from its input on ``self`` (``if self.scales is None:
    self.scales = ...``) stores a proxy there, which would outlive the trace. Each attribute
    now holding a proxy gets its value from before the trace back (or is removed)."""
    for module, before in states:
        for name, value in list(vars(module).items()):
            if isinstance(value, fx.Proxy):
                if name in before:
                    object.__setattr__(module, name, before[name])
                else:
                    object.__delattr__(module, name)


LEAF_FUNCTIONS_KEY = "leaf_functions"
"""``GraphModule.meta`` key set by :func:`trace`: qualified names of the plain functions called
as one opaque node because tracing failed inside them."""

_OWN_FILES = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__name__.partition(".")[0]]))
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep


@dataclass(frozen=True)
class _LeafFunction:
    """A module-level function made a leaf: the name it is called by in its caller's module."""

    caller: dict = field(compare=False, hash=False)  # the calling module's globals
    caller_module: str
    name: str
    function: Any = field(compare=False, hash=False)

    def patched(self):
        """While the block runs, the caller's global calls the function as one node when an
        argument is a proxy, and runs it otherwise."""
        function = self.function

        @functools.wraps(function)
        def leaf(*args, **kwargs):
            proxies: list[fx.Proxy] = []
            fx.node.map_aggregate((args, kwargs), lambda v: proxies.append(v) if isinstance(v, fx.Proxy) else None)
            if proxies:
                return proxies[0].tracer.create_proxy("call_function", function, args, kwargs)
            return function(*args, **kwargs)

        @contextlib.contextmanager
        def swap():
            self.caller[self.name] = leaf
            try:
                yield
            finally:
                self.caller[self.name] = function

        return swap()


def _failing_function(exc: BaseException) -> _LeafFunction | None:
    """The innermost plain module-level function of the model's code (not torch's, not the
    standard library's) in which ``exc`` was raised, if its caller calls it by a global name."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for inner, outer in zip(reversed(frames[1:]), reversed(frames[:-1])):
        code = inner.f_code
        if code.co_filename.startswith(_OWN_FILES) or code.co_filename.startswith(_STDLIB):
            continue
        function = inner.f_globals.get(code.co_name)
        if getattr(function, "__code__", None) is not code:
            continue  # a method or a nested function: its module is made a leaf instead
        for name, value in list(outer.f_globals.items()):
            if value is function:
                return _LeafFunction(outer.f_globals, outer.f_globals.get("__name__", "?"), name, function)
    return None


def _graph_module(root: nn.Module, graph: fx.Graph, class_name: str, generate_code: bool) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)``; without ``generate_code``, skipping the
    code generation that its constructor runs (see :func:`trace`).

    Every GraphModule is the only instance of its own subclass (fx installs the generated
    ``forward`` on that class), so the constructor's ``recompile`` can be switched off on
    that class alone while it runs, and the class then behaves as any other. fx has no
    public way to build a GraphModule without code; what generating the code here and again
    after the transform's edits would cost is measured in docs/developers.md.
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


def input_names(model: nn.Module, example_inputs: tuple[Any, ...] | dict[str, Any] | None) -> tuple[str, ...] | None:
    """The ``forward`` parameters (of the function behind any wrapper) that
    ``example_inputs`` give, in signature order: the first ``len`` ones for a tuple, the keys
    of a dict. None without example inputs."""
    if example_inputs is None:
        return None
    params = list(inspect.signature(inspect.unwrap(type(model).forward)).parameters.values())[1:]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    named = [p.name for p in params if p.kind not in variadic and p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if isinstance(example_inputs, dict):
        known = {p.name for p in params if p.kind not in variadic}
        unknown = [k for k in example_inputs if k not in known]
        if unknown:
            raise PassError(
                f"example_inputs: {type(model).__name__}.forward has no parameter {', '.join(map(repr, unknown))}; its parameters: {', '.join(sorted(known))}"
            )
        return tuple(p.name for p in params if p.name in example_inputs)
    if len(example_inputs) > len(named):
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
            return None  # forward(*args): fx's own placeholders
        raise PassError(
            f"example_inputs: {len(example_inputs)} positional inputs, but {type(model).__name__}.forward takes {len(named)} ({', '.join(named)})"
        )
    return tuple(named[: len(example_inputs)])


def _examples_by_name(model: nn.Module, example_inputs: tuple[Any, ...] | dict[str, Any] | None) -> dict[str, Any] | None:
    names = input_names(model, example_inputs)
    if names is None:
        return None
    if isinstance(example_inputs, dict):
        return {name: example_inputs[name] for name in names}
    return dict(zip(names, example_inputs))


def _holds_tensor(value: Any) -> bool:
    found = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, torch.Tensor) else None)
    return bool(found)


def _split_examples(model: nn.Module, example_inputs, concrete_args):
    """``(input names, examples, concrete args)``: example inputs holding tensors become the
    graph's inputs; the others (``use_cache=False``, a mode string) are traced as constants,
    as ``concrete_args`` are (which take precedence)."""
    examples = _examples_by_name(model, example_inputs)
    if examples is None:
        return None, None, concrete_args
    concrete = {name: value for name, value in examples.items() if not _holds_tensor(value)}
    concrete.update(concrete_args or {})
    tensors = {name: value for name, value in examples.items() if name not in concrete}
    return tuple(tensors), tensors, concrete or None


def reads_training_flag(model: nn.Module) -> bool:
    """Whether any code of ``model`` may read a ``training`` flag: the source file of its
    class or of a submodule's class (outside ``torch.nn``, whose modules are leaves) mentions
    ``.training``, or its source cannot be read. Such a model is traced in both modes."""
    classes = {type(module) for module in model.modules()}
    return any(_file_mentions_training(cls.__module__) for cls in classes if not cls.__module__.startswith("torch.nn."))


@functools.lru_cache(maxsize=None)
def _file_mentions_training(module_name: str) -> bool:
    try:
        source = inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):
        return True
    return ".training" in source


def resolve_leaf_modules(model: nn.Module, leaf_modules: Iterable[str | type[nn.Module]]) -> tuple[list[str], tuple[type[nn.Module], ...]]:
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
                raise PassError(f"leaf_modules: {entry!r} is not a submodule path of {type(model).__name__}") from exc
            if not canonical:
                canonical = {id(m): name for name, m in model.named_modules()}
            paths.append(canonical[id(module)])
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            types.append(entry)
        else:
            raise PassError(f"leaf_modules: expected a module path (str) or an nn.Module subclass, got {entry!r}")
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
        return "The root module's own forward cannot be made a leaf; make it traceable or fix the offending inputs with concrete_args"
    if not autoleaf:
        return "Automatic leaves are off (autoleaf=False); pass it in leaf_modules"
    if already_leaf:
        return "It failed even as a leaf"
    if num_fallback >= max_retries:
        return f"Gave up after {max_retries} automatic leaves (max_retries)"
    return None
