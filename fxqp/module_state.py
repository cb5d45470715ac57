"""The empty state of an ``nn.Module``, set without ``nn.Module.__init__``'s per-attribute calls.

The transform builds several modules per site (each op, each activation stage and its op
list): thousands for a large model. ``nn.Module.__init__`` sets its bookkeeping attributes
one ``object.__setattr__`` call at a time; :func:`init_module_state` sets the same
attributes with one dict update, which is cheaper per module and adds up over a transform
(``benchmarks/zoo.py`` measures transform times; docs/performance.md has the latest).

What to set is read from an ``nn.Module()`` built once at import, so it follows whatever the
installed torch version's ``__init__`` sets: each dict or set attribute gets a fresh empty one
of the same type, the other values (``training``, ``_is_full_backward_hook``) are copied.
Should that ``__init__`` ever set a value of another mutable type, which could not be shared
between modules, every module is initialised by ``nn.Module.__init__`` itself instead.
"""

from __future__ import annotations

from torch import nn

__all__ = ["init_module_state", "empty_module_list"]

_TEMPLATE = vars(nn.Module())
_FRESH = tuple((name, type(value)) for name, value in _TEMPLATE.items() if isinstance(value, (dict, set)))
_SHARED = {name: value for name, value in _TEMPLATE.items() if not isinstance(value, (dict, set))}
_UNDERSTOOD = all(value is None or isinstance(value, (bool, int, float, str)) for value in _SHARED.values())


def init_module_state(module: nn.Module) -> None:
    """Give ``module`` the state ``nn.Module.__init__`` gives it (no parameters, buffers,
    submodules or hooks; training mode). Call it in place of ``super().__init__()`` in the
    ``__init__`` of an ``nn.Module`` subclass whose bases add no state of their own."""
    if not _UNDERSTOOD:
        nn.Module.__init__(module)
        return
    state = module.__dict__
    state.update(_SHARED)
    for name, factory in _FRESH:
        state[name] = factory()


def empty_module_list() -> nn.ModuleList:
    """``nn.ModuleList()``, through :func:`init_module_state`."""
    modules = nn.ModuleList.__new__(nn.ModuleList)
    init_module_state(modules)
    return modules
