"""Tracing with example values: Python decisions on shapes and dtypes resolved, and guarded.

Symbolic tracing fails where ``forward`` decides something in Python from a tensor's shape
or dtype: ``if mask.ndim == 2``, ``(*x.shape[:-1], -1, d)``, ``for i in range(x.size(1))``.
:class:`ExampleTracer` traces with proxies that also carry the value each node has for the
example inputs, computed on the ``meta`` device (shapes and dtypes, no data, no change to
the model). A decision the example values settle — ``bool``, ``len``, iteration, ``int`` —
takes that outcome, and a *guard* node right after the value checks at run time that the
outcome is the same, raising :class:`~passes.errors.GuardError` otherwise: the graph is
specialised to inputs like the examples (a batch size read only through symbolic shape
arithmetic stays free). A decision on data (``if mask.all()``) has no value on ``meta`` and
fails as in plain symbolic tracing.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from passes.errors import GuardError

__all__ = ["ExampleTracer", "check_traced", "meta_values"]

_MISSING = object()


def check_traced(value: Any, kind: str, expected: Any, what: str) -> None:
    """A guard: ``kind`` (``"bool"``, ``"len"``, ``"int"``, or ``"value"`` itself) of ``value``
    must be ``expected``, as it was for the example inputs the graph was traced with."""
    actual = value if kind == "value" else {"bool": bool, "len": len, "int": int}[kind](value)
    if actual != expected:
        raise GuardError(
            f"the model was traced for inputs where {what} gave {kind}={expected!r}, and the graph is specialised to "
            f"that; these inputs give {actual!r}. Transform it again with example inputs of this kind"
        )


def meta_values(value: Any) -> Any:
    """``value`` with every tensor replaced by an empty one of its shape and dtype on ``meta``."""
    return fx.node.map_aggregate(value, lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v)


#: Tensor attributes read as constants (guarded) when the example value has them: dtype
#: decisions (``torch.finfo(x.dtype)``, ``x.dtype != weight.dtype``) are everywhere in model
#: code and cannot be traced otherwise.
STATIC_ATTRIBUTES = frozenset({"dtype"})


class _ValueProxy(fx.Proxy):
    """A proxy that answers ``len``, ``int``, ``index`` and its ``dtype`` from its example
    value (guarded)."""

    def __getattr__(self, name: str) -> Any:
        if name in STATIC_ATTRIBUTES:
            value = self.tracer.static_attribute(self, name)
            if value is not _MISSING:
                return value
        return super().__getattr__(name)

    def __len__(self) -> int:
        return self.tracer.decide(self, "len")

    def __index__(self) -> int:
        return self.tracer.decide(self, "int")

    def __int__(self) -> int:
        return self.tracer.decide(self, "int")


class ExampleTracer(fx.Tracer):
    """Mixin for a tracer (see the module doc): ``examples`` maps each input (placeholder)
    name to its example value; ``guard`` is the function guard nodes call (default
    :func:`check_traced`)."""

    def init_examples(self, examples: dict[str, Any], guard: Callable[..., None] = check_traced) -> None:
        self._examples = {name: meta_values(value) for name, value in examples.items()}
        self._values: dict[fx.Node, Any] = {}
        self._guard = guard

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if target is not self._guard:
            self._values[proxy.node] = self._example_value(kind, target, args, kwargs)
        return proxy

    def _value_of(self, arg: Any) -> Any:
        if isinstance(arg, fx.Proxy):
            return self._values.get(arg.node, _MISSING)
        return arg

    def _example_value(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self._examples.get(target, _MISSING)
        if kind == "get_attr":  # read past fx's patched Module.__getattr__, which makes proxies
            path, _, name = str(target).rpartition(".")
            try:
                module = self.root.get_submodule(path)
            except AttributeError:
                return _MISSING
            for table in (module._parameters, module._buffers, module._modules, vars(module)):
                if name in table:
                    return meta_values(table[name])
            return _MISSING
        missing = []

        def value_of(arg: Any) -> Any:
            value = self._value_of(arg)
            if value is _MISSING:
                missing.append(arg)
            return value

        args, kwargs = fx.node.map_aggregate((args, kwargs), value_of)
        if missing:
            return _MISSING
        try:
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":  # a leaf: its forward on a meta copy, past fx's patched __call__
                module = self._meta_model().get_submodule(target)
                return type(module).forward(module, *args, **kwargs)
        except Exception:  # an op without a meta form, or one that reads data: no value
            return _MISSING
        return _MISSING

    def _meta_model(self) -> nn.Module:
        """A copy of the root whose parameters and buffers are empty tensors on ``meta``
        (made once; the model's structure is copied, not its data)."""
        if getattr(self, "_meta_root", None) is None:
            memo: dict[int, Any] = {}
            for tensor in (*self.root.parameters(), *self.root.buffers()):
                meta = tensor.detach().to("meta")
                memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
            self._meta_root = copy.deepcopy(self.root, memo)
        return self._meta_root

    def decide(self, proxy: fx.Proxy, kind: str) -> Any:
        """``kind`` (bool, len, int) of the proxy's example value, guarded in the graph; the
        plain tracer's error when there is no such value."""
        value = self._values.get(proxy.node, _MISSING)
        if value is not _MISSING:
            try:
                outcome = {"bool": bool, "len": len, "int": int}[kind](value)
            except Exception:  # a decision on data (meta tensors have none)
                outcome = _MISSING
            if outcome is not _MISSING:
                what = f"{proxy.node.name} ({proxy.node.format_node().split(' = ', 1)[-1][:80]})"
                self.create_proxy("call_function", self._guard, (proxy, kind, outcome, what), {})
                return outcome
        if kind == "bool":
            return super().to_bool(proxy)
        raise fx.proxy.TraceError(f"symbolically traced variables cannot be used for {kind}() without an example value ({proxy.node.name})")

    def static_attribute(self, proxy: fx.Proxy, name: str) -> Any:
        """``proxy.<name>`` of the example value, with a guard that checks it at run time."""
        value = self._values.get(proxy.node, _MISSING)
        if isinstance(value, torch.Tensor):
            attribute = getattr(value, name)
            read = self.create_proxy("call_function", getattr, (proxy, name), {})
            self.create_proxy("call_function", self._guard, (read, "value", attribute, f"{proxy.node.name}.{name}"), {})
            return attribute
        return _MISSING

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.decide(obj, "bool")

    def iter(self, obj: fx.Proxy):
        n = self.decide(obj, "len")
        return iter([obj[i] for i in range(n)])

    def keys(self, obj: fx.Proxy):
        value = self._values.get(obj.node, _MISSING)
        if isinstance(value, dict):
            return list(value.keys())
        return super().keys(obj)
