"""Pickling of transformed and lowered models: ``torch.save(model)``, ``pickle.dumps(model)``
and multiprocessing work on them as on any module, and load back equal.

Two things in such a model keep plain torch from pickling it:

* a parametrized module (every weight with ops) has a class of torch's making, created at
  run time (``Parametrized<Class>``), which pickle cannot name, and a ``__getstate__`` that
  refuses. ``torch.save(model, path)`` opens the file before it pickles, so the refusal left a
  truncated file behind.
* torch unpickles a ``GraphModule`` by tracing its generated code again with the tracer class
  that traced it, built without arguments (the tracer of :mod:`passes` takes arguments), and
  gives it an empty ``meta`` (where a lowered model keeps its record).

:func:`make_picklable` handles both; :func:`fxqp.transform` calls it on what it returns, and
deep copies (a lowered model is one) keep what it did. ``GraphModule._tracer_cls`` and
``_tracer_extras`` (and the graph's), which torch's unpickling reads, have no public setter.
Model files written this way are pickles, which can run code when loaded: for files to
share, use :func:`fxqp.save`.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from passes.trace import TRACE_LOCK

__all__ = ["make_picklable", "picklable_graph_module", "GraphRetracer", "PicklableGraphModule"]


def make_picklable(model: nn.Module) -> None:
    """Let ``model`` and every module in it be pickled and unpickled.

    Each parametrized module's class gets a ``__reduce_ex__``: the module is stored as an
    instance of its class before parametrization
    (:func:`torch.nn.utils.parametrize.type_before_parametrizations`) with its parametrization
    lists, and unpickling registers the parametrizations again through
    :func:`torch.nn.utils.parametrize.register_parametrization`. Each ``GraphModule``
    becomes a :class:`PicklableGraphModule`, retraced on unpickling by
    :class:`GraphRetracer`. Deep copies are unaffected (torch's ``__deepcopy__`` of a
    parametrized class comes first, and copies the graph and ``meta``)."""
    for module in model.modules():
        cls = type(module)
        if parametrize.is_parametrized(module) and cls.__dict__.get("__reduce_ex__") is not _reduce_parametrized:
            cls.__reduce_ex__ = _reduce_parametrized
        if isinstance(module, fx.GraphModule):
            picklable_graph_module(module)


class PicklableGraphModule(fx.GraphModule):
    """A ``GraphModule`` that keeps its ``meta`` through pickling: torch's ``__reduce__``
    (the generated code, and the module's attributes but the graph), then ``meta`` put back.

    Made by :func:`picklable_graph_module` (which swaps the class of a ``GraphModule`` for
    one derived from this); torch's deep copy of a ``GraphModule`` keeps this base."""

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, args = super().__reduce__()
        return _rebuild_graph_module, (rebuild, args, self.meta)


def picklable_graph_module(gm: fx.GraphModule) -> None:
    """Make ``gm`` a :class:`PicklableGraphModule` retraced by :class:`GraphRetracer` on
    unpickling. Cheapest before ``gm`` has code (``passes.trace(generate_code=False)``):
    torch keeps a GraphModule's generated ``forward`` on a class of its own, which is swapped
    here, so a module with code is recompiled. A GraphModule of a subclass of torch's keeps
    its class (and loses ``meta`` when unpickled)."""
    # what torch's unpickling retraces the code with; copies (deep copies, the result of
    # unpickling) take it from the graph
    gm._tracer_cls = gm.graph._tracer_cls = GraphRetracer
    gm._tracer_extras = gm.graph._tracer_extras = {}
    cls = type(gm)
    if isinstance(gm, PicklableGraphModule) or cls.__bases__ != (fx.GraphModule,):
        return
    # torch's per-instance class (GraphModuleImpl), derived from the first class of the MRO
    # not named so: this one, for copies too
    swapped = type("GraphModuleImpl", (PicklableGraphModule,), {"__qualname__": "GraphModuleImpl", "__module__": cls.__module__})
    swapped.__name__ = cls.__name__
    gm.__class__ = swapped
    if "forward" in vars(cls):  # the generated code lived on the old class
        gm.recompile()


def _rebuild_graph_module(rebuild: Any, args: tuple[Any, ...], meta: dict[str, Any]) -> fx.GraphModule:
    gm = rebuild(*args)
    gm.meta.update(meta)
    picklable_graph_module(gm)
    return gm


def _reduce_parametrized(module: nn.Module, protocol: int) -> tuple[Any, ...]:
    base = parametrize.type_before_parametrizations(module)
    return _new_module, (base,), base.__getstate__(module), None, None, _restore_parametrized


def _new_module(cls: type) -> nn.Module:
    return cls.__new__(cls)


def _restore_parametrized(module: nn.Module, state: dict[str, Any]) -> None:
    """The state setter of :func:`_reduce_parametrized`: the module's state but its
    parametrization lists; then each parametrized tensor registered again, with a placeholder
    parametrization (which gives the module torch's class and the attribute the tensor is
    read through); then the unpickled lists in place of the placeholders."""
    modules = dict(state["_modules"])
    chains = modules.pop("parametrizations")
    module.__setstate__({**state, "_modules": modules})
    for name in chains.keys():
        module.register_parameter(name, nn.Parameter(torch.empty(0), requires_grad=False))
        parametrize.register_parametrization(module, name, nn.Identity(), unsafe=True)
    module.parametrizations = chains
    type(module).__reduce_ex__ = _reduce_parametrized


class GraphRetracer(fx.Tracer):
    """The tracer with which a pickled ``GraphModule`` of fxqp is traced again from its code.

    Every submodule call is one node (torch's unpickling makes every module a leaf), and so is
    every call of a Python function that the code calls by a global name: each such call is a
    ``call_function`` node of the graph the code was generated from (an input guard, a function
    tracing had to keep whole, ``F.relu``), so it is not traced into again. Built without
    arguments, as torch builds it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._functions: dict[Any, Any] = {}  # stand-in -> the function it calls

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with TRACE_LOCK:  # see its doc: the code's globals and torch.fx's patches, one trace at a time
            forward = type(root).forward if isinstance(root, nn.Module) else root
            code_globals = forward.__globals__
            functions = {
                name: value for name, value in code_globals.items() if isinstance(value, types.FunctionType) and value is not forward
            }
            stand_ins = {name: self._as_node(function) for name, function in functions.items()}
            # the node of a call is that of the function itself, also when fx wraps the stand-in
            # (the code names the functions ``torch.fx.wrap`` registered)
            self._functions = {stand_in: functions[name] for name, stand_in in stand_ins.items()}
            code_globals.update(stand_ins)
            try:
                return super().trace(root, concrete_args)
            finally:
                code_globals.update(functions)

    def create_proxy(self, kind: str, target: Any, *args: Any, **kwargs: Any) -> fx.Proxy:
        if kind == "call_function":
            target = self._functions.get(target, target)
        return super().create_proxy(kind, target, *args, **kwargs)

    def _as_node(self, function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            proxies: list[fx.Proxy] = []
            fx.node.map_aggregate((args, kwargs), lambda v: proxies.append(v) if isinstance(v, fx.Proxy) else None)
            if proxies:
                return self.create_proxy("call_function", function, args, kwargs)
            return function(*args, **kwargs)

        return call
