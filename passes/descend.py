"""Tracing a model whose root cannot be traced: the largest traceable submodules.

:func:`trace_parts` traces the model as :func:`passes.trace.trace` does. When that fails in
the root's own ``forward`` (a detector iterating its list of images, code that branches on
data), it descends instead: each child module is traced on its own, and a child that cannot
be traced either is descended into in turn. What comes back is a set of *parts* — module
paths and their ``GraphModule`` — and the paths left as modules with the reason.

A part is installed *in place* (:func:`install_part`): the module keeps its identity — its
class, methods and attributes, which its parent's untraced code may use
(``self.head.compute_loss(...)``) — and its ``forward`` becomes the part's generated code,
run with the module itself as ``self``. The modules the graph calls are the module's own
(fx keeps their paths); what passes add to the graph (inserted modules, constants) is
registered in the module at the same path, so that its ``state_dict``, ``.to()`` and
``.train()`` see it. The ``GraphModule`` is kept, unregistered, as the holder of the graph
and its code.

Modules that tracing keeps as leaves anyway (``torch.nn``'s ``Conv2d``, ``Linear``, ...;
the ``leaf_modules`` given) are not descended into or traced on their own: they hold
nothing a graph would add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from passes.errors import PassError, UntraceableError
from passes.trace import TraceResult, resolve_leaf_modules, trace

__all__ = ["Parts", "trace_parts", "qualify", "install_part", "GraphForward", "graph_of"]


def qualify(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` when ``prefix`` is the root (``""``)."""
    return f"{prefix}.{name}" if prefix else name


@dataclass(frozen=True)
class Parts:
    """What :func:`trace_parts` produced.

    Attributes:
        parts: module path → trace of that module, in module order; ``{"": ...}`` alone when
            the root itself was traced.
        untraced: module path → why it could not be traced (the root's path is ``""``); these
            modules keep their own ``forward``. Empty when the root was traced.
    """

    parts: dict[str, TraceResult]
    untraced: dict[str, str]

    @property
    def whole(self) -> bool:
        """Whether the root itself was traced (one graph for the whole model)."""
        return "" in self.parts

    def qualified(self, attribute: str) -> tuple[str, ...]:
        """The module paths a :class:`TraceResult` attribute lists (``fallback_leaves``,
        ``mode_leaves``, ``mode_switches``), over all parts, as paths in the whole model."""
        return tuple(qualify(path, name) for path, result in self.parts.items() for name in getattr(result, attribute))

    def leaf_functions(self) -> tuple[str, ...]:
        """The plain functions called as one node in some part."""
        return tuple(dict.fromkeys(name for result in self.parts.values() for name in result.leaf_functions))


def trace_parts(
    model: nn.Module,
    *,
    leaf_modules: Iterable[str | type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple[Any, ...] | dict[str, Any] | None = None,
    guard: Callable[..., None] | None = None,
    generate_code: bool = True,
    only: Iterable[str] | None = None,
) -> Parts:
    """Trace ``model`` whole, or else its largest traceable submodules; and trace on their
    own the modules a trace had to keep as leaves.

    The root is traced with :func:`passes.trace.trace` (all arguments as there). If that
    fails in the root's own ``forward`` — the error :func:`~passes.trace.trace` would raise —
    every child module is traced on its own (symbolically: ``concrete_args`` and
    ``example_inputs`` describe the root's call, not the children's), and a child whose own
    ``forward`` fails too is descended into the same way, recursively. A module that a trace
    made a leaf automatically (its ``fallback_leaves`` and ``mode_leaves``) is called as one
    node of that graph; it is treated the same way: traced on its own, or descended into, so
    that its inside is a graph too. ``leaf_modules`` keep their meaning in every part (paths
    are paths in ``model``). Nothing is modified: see :func:`install_part`.

    ``only``: trace exactly these parts (``""`` for the root; the ``parts`` of an earlier
    result), which must all be traceable, and leave every other module untraced — to
    rebuild the structure of an earlier trace of the same architecture even where what can
    be traced depends on the model's state (a module that caches a value on its first
    forward).

    Raises:
        PassError: as :func:`~passes.trace.trace` (a bad ``leaf_modules`` entry or example).
        UntraceableError: the root's, when no submodule can be traced either; or tracing
            gave up inside a submodule of the root (a module that failed even as a leaf),
            which is no reason to descend; or a part of ``only`` cannot be traced.
    """
    user_paths, leaf_types = resolve_leaf_modules(model, leaf_modules)
    default_leaf = fx.Tracer().is_leaf_module
    parts: dict[str, TraceResult] = {}
    untraced: dict[str, str] = {}
    seen: set[int] = {id(model)}

    def traced(path: str, result: TraceResult) -> None:
        parts[path] = result
        for leaf in (*result.fallback_leaves, *result.mode_leaves):
            take(qualify(path, leaf), result.graph_module.get_submodule(leaf))

    forced = None if only is None else frozenset(only)

    def take(path: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if forced is not None and path not in forced:
            untraced[path] = "not a traced part of the structure asked for"
            if any(p.startswith(path + ".") for p in forced):
                visit(path, module)
            return
        inner = [p[len(path) + 1 :] for p in user_paths if p.startswith(path + ".")]
        if forced is not None:  # must be traceable
            traced(path, trace(module, leaf_modules=[*inner, *leaf_types], guard=guard, generate_code=generate_code))
            return
        try:
            traced(path, trace(module, leaf_modules=[*inner, *leaf_types], guard=guard, generate_code=generate_code))
        except UntraceableError as err:
            where = f" (in {qualify(path, err.module_path)!r})" if err.module_path else ""
            untraced[path] = f"{err.reason}{where}"
            visit(path, module)
        except PassError as err:  # a forward parameter without a default: it needs its caller's values
            untraced[path] = str(err)
            visit(path, module)

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = qualify(prefix, name)
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(path, child)  # a container: no forward of its own
            elif path not in user_paths and not isinstance(child, leaf_types) and not default_leaf(child, path):
                take(path, child)

    if forced is not None and "" not in forced:
        untraced[""] = "not a traced part of the structure asked for"
        visit("", model)
        missing = sorted(forced - set(parts))
        if missing:
            raise PassError(f"only: {missing[0]!r} is not a module of {type(model).__name__} that could be traced as a part")
    else:
        try:
            whole = trace(
                model,
                leaf_modules=leaf_modules,
                concrete_args=concrete_args,
                example_inputs=example_inputs,
                guard=guard,
                generate_code=generate_code,
            )
        except UntraceableError as err:
            if err.module_path or forced is not None:
                raise
            untraced[""] = err.reason
            visit("", model)
            if not parts:
                raise  # nothing of the model is traceable: the root's failure is the reason
        else:
            traced("", whole)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return Parts(dict(sorted(parts.items(), key=lambda item: order.get(item[0], len(order)))), untraced)


class GraphForward:
    """The ``forward`` of a module traced in place (:func:`install_part`): the generated code
    of ``graph_module``, called with ``owner`` as ``self``. Not a module: the ``GraphModule``
    is no submodule of ``owner`` (its modules are ``owner``'s own)."""

    def __init__(self, owner: nn.Module, graph_module: fx.GraphModule) -> None:
        self.owner = owner
        self.graph_module = graph_module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.graph_module).forward(self.owner, *args, **kwargs)


def graph_of(module: nn.Module) -> fx.GraphModule | None:
    """The ``GraphModule`` whose code a module installed by :func:`install_part` runs."""
    forward = module.__dict__.get("forward")
    return forward.graph_module if isinstance(forward, GraphForward) else None


def install_part(module: nn.Module, graph_module: fx.GraphModule) -> None:
    """Make ``graph_module`` (traced from ``module``, then edited) the code ``module`` runs.

    Every module, parameter and buffer the graph reads that ``module`` does not have at the
    same path (modules a pass inserted, tensor constants of the trace) is registered in
    ``module`` at that path, with plain ``nn.Module`` containers where the path needs them.
    ``graph_module`` is recompiled, and ``module.forward`` becomes a :class:`GraphForward`.
    """
    graph_module.recompile()
    for node in graph_module.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        *prefix, field = str(node.target).split(".")
        source, target = graph_module, module
        for atom in prefix:
            source = getattr(source, atom)
            inner = getattr(target, atom, None)
            if inner is None:
                inner = nn.Module()
                target.add_module(atom, inner)
            target = inner
        if _has(target, field):  # the module's own: a parametrized weight reads through its ops
            continue
        value = getattr(source, field)
        if isinstance(value, nn.Module):
            target.add_module(field, value)
        elif isinstance(value, nn.Parameter):
            target.register_parameter(field, value)
        elif isinstance(value, torch.Tensor):
            target.register_buffer(field, value)
        else:
            setattr(target, field, value)
    module.forward = GraphForward(module, graph_module)


def _has(module: nn.Module, name: str) -> bool:
    """Whether ``module`` has attribute ``name``, without reading it (reading a parametrized
    weight would run its parametrizations)."""
    return (
        hasattr(type(module), name)  # a method, a property (parametrize's)
        or name in vars(module)
        or any(n == name for n, _ in module.named_children())
        or any(n == name for n, _ in module.named_parameters(recurse=False))
        or any(n == name for n, _ in module.named_buffers(recurse=False))
    )
