"""Helpers to select and describe graph nodes.

These are pure functions: they read a graph and never change it.

* :func:`canonical_target_name` gives one name per operation, whatever the
  spelling (``F.relu``, ``torch.relu``, ``x.relu()``, ``x.relu_()`` are all
  ``"relu"``; ``x + y`` and ``x += y`` are both ``"add"``).
* :func:`non_tensor_nodes` finds the nodes whose value is certainly not a tensor
  (sizes, shapes, dtypes and arithmetic on them), so that a caller can skip them
  when looking for activations.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = [
    "propagate_shapes",
    "called_module",
    "canonical_name",
    "canonical_target_name",
    "node_module_path",
    "non_tensor_nodes",
    "produces_tensor",
]

# In-place operator names (after stripping underscores) -> their base operation.
_INPLACE_OPERATORS = {
    "iadd": "add",
    "isub": "sub",
    "imul": "mul",
    "itruediv": "truediv",
    "ifloordiv": "floordiv",
    "imod": "mod",
    "ipow": "pow",
    "imatmul": "matmul",
    "iand": "and",
    "ior": "or",
    "ixor": "xor",
    "ilshift": "lshift",
    "irshift": "rshift",
}

# Tensor methods whose result is never a tensor.
_NON_TENSOR_METHODS = frozenset(
    {
        "size",
        "dim",
        "numel",
        "nelement",
        "item",
        "tolist",
        "stride",
        "data_ptr",
        "element_size",
        "is_contiguous",
        "__len__",
    }
)

# Tensor attributes (read with getattr) whose value is never a tensor.
_NON_TENSOR_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"})

# Functions whose result is never a tensor (assertions return None).
_NON_TENSOR_FUNCTIONS = frozenset(
    f for f in (builtins.len, builtins.isinstance, torch._assert, getattr(torch, "_assert_async", None)) if f is not None
)

# Python modules whose functions, applied to non-tensors only, give non-tensors
# (``x.size(0) + 1``, ``math.prod(x.shape)``).  Functions of ``torch`` are not
# among them: ``torch.zeros(x.size(0))`` is a tensor.
_SCALAR_FUNCTION_MODULES = frozenset({operator.__name__, builtins.__name__, math.__name__, "_operator"})


def canonical_name(raw: str) -> str:
    """One name per operation: underscores stripped, in-place operators mapped to their base.

    ``"relu_"`` -> ``"relu"``, ``"__iadd__"`` -> ``"add"``, ``"imatmul"`` -> ``"matmul"``.
    """
    name = raw.strip("_")
    return _INPLACE_OPERATORS.get(name, name)


def canonical_target_name(node: fx.Node) -> str | None:
    """The base name of the operation a ``call_function`` or ``call_method`` runs.

    Leading and trailing underscores are dropped (``relu_`` -> ``relu``,
    ``__add__`` -> ``add``) and in-place operators map to their base operation
    (``iadd`` -> ``add``, ``imatmul`` -> ``matmul``).  For ATen overloads such as
    ``torch.ops.aten.add.Tensor`` the overload suffix is dropped (``add``).

    Returns None for the other node kinds (placeholders, ``call_module``, ...).
    """
    if node.op == "call_function":
        name = getattr(node.target, "__name__", None) or type(node.target).__name__
        name = name.split(".")[0]
    elif node.op == "call_method":
        name = str(node.target)
    else:
        return None
    return canonical_name(name)


def called_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls; None for other nodes."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def node_module_path(node: fx.Node) -> str | None:
    """The dotted module path of a ``call_module`` node; None for other nodes."""
    if node.op != "call_module":
        return None
    return str(node.target)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Run ``gm`` once in eval mode without gradients on ``example_inputs`` and record each
    node's ``meta["tensor_meta"]`` (shape, dtype; a tuple for tuples of tensors; absent for
    other values) with :class:`torch.fx.passes.shape_prop.ShapeProp`."""
    mode = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        gm.train(mode)


def non_tensor_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes of ``graph`` whose value is certainly not a tensor.

    A static, conservative inference in one pass over the nodes (which are in
    topological order), so linear in the size of the graph.  A node is put in
    the set when it is:

    * the ``output`` node;
    * a ``call_method`` of a method that never returns a tensor (``size``,
      ``dim``, ``numel``, ``item``, ``tolist``, ``stride``, ...), or any method
      called on a value that is itself not a tensor;
    * ``getattr(x, name)`` for ``name`` in ``shape``, ``dtype``, ``device``,
      ``ndim``, ``is_cuda``, ``requires_grad``;
    * ``len(x)``, ``isinstance(...)``, ``torch._assert(...)``, a ``dict`` subclass built
      (the model's output object);
    * ``operator.getitem`` of a value that is not a tensor (``x.shape[0]``);
    * a function from ``operator``, ``builtins`` or ``math`` whose node inputs
      are all non-tensors (``x.size(0) + 1``, ``h * w``);
    * a function from outside ``torch`` (a wrapped user function) whose node inputs
      are all non-tensors: a function of shapes and numbers.  It may build a
      tensor (a constant mask from a shape), but no activation flows through it,
      so it is not a site.

    Everything else (placeholders, ``get_attr``, ``call_module``, torch
    functions, ...) is assumed to produce a tensor.
    """
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if _is_certainly_not_tensor(node, found):
            found.add(node)
    return found


def produces_tensor(node: fx.Node, non_tensor: set[fx.Node] | None = None) -> bool:
    """Whether ``node`` may produce a tensor (see :func:`non_tensor_nodes`).

    Pass the set computed once by :func:`non_tensor_nodes` when asking about
    many nodes; without it the whole graph is analysed for this one call.
    """
    if non_tensor is None:
        non_tensor = non_tensor_nodes(node.graph)
    return node not in non_tensor


def _is_certainly_not_tensor(node: fx.Node, non_tensor: set[fx.Node]) -> bool:
    """One step of :func:`non_tensor_nodes`; ``non_tensor`` covers all inputs."""
    if node.op == "output":
        return True
    if node.op == "call_method":
        receiver = node.args[0] if node.args else None
        return node.target in _NON_TENSOR_METHODS or _is_in(receiver, non_tensor)
    if node.op != "call_function":
        return False

    target = node.target
    inputs = node.all_input_nodes
    if target is builtins.getattr:
        return len(node.args) >= 2 and (
            (isinstance(node.args[1], str) and node.args[1] in _NON_TENSOR_ATTRIBUTES) or _is_in(node.args[0], non_tensor)
        )
    if target in _NON_TENSOR_FUNCTIONS:
        return True
    if isinstance(target, type) and issubclass(target, dict):  # a model's output object, rebuilt (passes.trace)
        return True
    if target is operator.getitem:
        return bool(node.args) and _is_in(node.args[0], non_tensor)
    module = getattr(target, "__module__", None) or ""
    if module in _SCALAR_FUNCTION_MODULES or not (module == "torch" or module.startswith("torch.")):
        # operator/math on scalars, or a wrapped user function fed only shapes and numbers
        # (e.g. a padding-size helper): no activation flows through it
        return bool(inputs) and all(n in non_tensor for n in inputs)
    return False


def _is_in(arg: object, nodes: set[fx.Node]) -> bool:
    """Whether a node argument is one of ``nodes`` (False for non-node arguments)."""
    return isinstance(arg, fx.Node) and arg in nodes
