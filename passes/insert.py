"""Insert a module after a node.

``insert_after(gm, node, "path", module)`` turns::

    y = f(x)          ->      y = f(x)
    z = g(y)                  y2 = self.path(y)
                              z = g(y2)

The new ``call_module`` node takes ``node`` as its only argument, and every other
user of ``node`` (including the graph output) reads the new node instead.
:func:`insert_after_many` does any number of insertions with a single recompile at
the end, which is what to use for thousands of insertions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from passes.errors import PassError

__all__ = ["insert_after", "insert_after_many"]

InsertItem = tuple[fx.Node, str, nn.Module, "str | None"]


def insert_after(
    gm: fx.GraphModule,
    node: fx.Node,
    module_path: str,
    module: nn.Module,
    *,
    node_name: str | None = None,
) -> fx.Node:
    """Register ``module`` at ``module_path`` and call it on the output of ``node``.

    Args:
        gm: the GraphModule to change (in place).
        node: a node of ``gm.graph``; not the output node.
        module_path: where to register ``module``, a dotted path that must not
            exist yet.  Missing intermediate modules are created as plain
            ``nn.Module`` containers.
        module: the module to call.
        node_name: the name of the new node (FX makes it unique); by default
            FX derives one from ``module_path``.

    Returns:
        The new ``call_module`` node.

    Raises:
        PassError: ``node`` is the output node or belongs to another graph,
            ``module_path`` is empty, malformed or already taken.
    """
    (new_node,) = insert_after_many(gm, [(node, module_path, module, node_name)])
    return new_node


def insert_after_many(gm: fx.GraphModule, items: Iterable[InsertItem], *, recompile: bool = True) -> list[fx.Node]:
    """Do several :func:`insert_after`, then recompile once (``recompile=False`` leaves the
    recompile to a caller that edits the graph further).

    ``items`` holds ``(node, module_path, module, node_name)`` tuples, applied in
    order.  Every item is checked before the graph is touched, so on error
    nothing has changed.  Inserting twice after the same node chains the two
    modules, the later one closest to the node (as two calls of
    :func:`insert_after` would).  After a placeholder, the new node goes after
    the last placeholder so that the inputs stay together.

    Returns:
        The new nodes, in the order of ``items``.
    """
    items = [tuple(item) for item in items]
    _check_items(gm, items)
    if not items:
        return []

    graph = gm.graph
    new_nodes = []
    for node, module_path, module, node_name in items:
        if not gm.add_submodule(module_path, module):
            # _check_items has ruled this out; keep the guard for safety.
            raise PassError(f"cannot register a module at {module_path!r}")
        with graph.inserting_after(_insertion_point(node)):
            new_node = graph.create_node("call_module", module_path, (node,), {}, name=node_name)
        node.replace_all_uses_with(new_node, delete_user_cb=lambda user, new=new_node: user is not new)
        new_nodes.append(new_node)

    # No graph.lint() here: it reads every get_attr target, which runs the
    # parametrizations of a parametrized weight (a mask refresh, a quantizer
    # observation) as a side effect. The edit above keeps the graph well-formed.
    if recompile:
        gm.recompile()
    return new_nodes


def _insertion_point(node: fx.Node) -> fx.Node:
    """The node to insert after: ``node``, or the last placeholder after it."""
    if node.op != "placeholder":
        return node
    last = node
    while last.next.op == "placeholder":
        last = last.next
    return last


def _check_items(gm: fx.GraphModule, items: list[tuple]) -> None:
    """Raise PassError for the first item that cannot be inserted."""
    taken: set[str] = set()  # module paths of the earlier items
    taken_prefixes: set[str] = set()  # their proper prefixes ("a", "a.b" of "a.b.c")
    for item in items:
        if len(item) != 4:
            raise PassError(f"insert_after_many expects (node, module_path, module, node_name) tuples, got {item!r}")
        node, module_path, module, _ = item
        if not isinstance(node, fx.Node) or node.graph is not gm.graph:
            raise PassError(f"{node!r} is not a node of this GraphModule's graph")
        if node.op == "output":
            raise PassError("cannot insert a module after the output node")
        if not isinstance(module, nn.Module):
            raise PassError(f"expected an nn.Module to register at {module_path!r}, got {type(module).__name__}")
        if not isinstance(module_path, str) or not all(module_path.split(".")):
            raise PassError(f"invalid module path {module_path!r}")
        prefixes = _proper_prefixes(module_path)
        if module_path in taken or module_path in taken_prefixes:
            raise PassError(f"module path {module_path!r} is used twice")
        clash = next((p for p in prefixes if p in taken), None)
        if clash is not None:
            raise PassError(f"module path {module_path!r} would be registered inside the new module at {clash!r}")
        _check_free_path(gm, module_path)
        taken.add(module_path)
        taken_prefixes.update(prefixes)


def _proper_prefixes(module_path: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b"]``."""
    atoms = module_path.split(".")
    return [".".join(atoms[:i]) for i in range(1, len(atoms))]


def _check_free_path(gm: fx.GraphModule, module_path: str) -> None:
    """Raise PassError unless a new module can be registered at ``module_path``."""
    *prefix, field = module_path.split(".")
    owner: object = gm
    for depth, atom in enumerate(prefix):
        if not hasattr(owner, atom):
            return  # this and the rest of the path will be created
        owner = getattr(owner, atom)
        if not isinstance(owner, nn.Module):
            where = ".".join(prefix[: depth + 1])
            raise PassError(f"cannot register a module at {module_path!r}: {where!r} is a {type(owner).__name__}, not a module")
    if hasattr(owner, field):
        raise PassError(f"module path {module_path!r} already exists")
