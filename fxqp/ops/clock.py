"""The schedule clock: whether an op is on, whether a mask refresh is due, the ramp target.

Every op is one function of its input, its state buffers and the model's step, the form
that ``torch.compile`` runs. The decisions it takes on the schedule go through this module,
which gives

* **eagerly**, Python values: the schedule buffers are read through host copies
  (:func:`read`), so a decision costs no device sync, and :func:`select`, :func:`cond` and
  :func:`assign` skip the work whose result would be discarded;
* **under compilation** (``torch.compile``, ``torch.export``), the buffers themselves:
  decisions are boolean scalar tensors, :func:`select` is ``torch.where``, :func:`cond` is
  ``torch.cond``, so one graph serves the whole schedule.

The op code reads the same either way:

```python
on = clock.active(self)                                  # step >= start
return clock.select(on, lambda: self.quantize(x), x)     # Q(x) when on, else x
```

Schedule state: ``start`` (every op), ``end``, ``every`` and ``next_refresh`` (ops with mask
refreshes), in the op's buffers; the step counter in the model's
:class:`fxqp.schedule.Schedule`, bound to the op by :meth:`fxqp.ops.ScheduledOp.bind`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from fxqp.ops.numerics import agp_sparsity

__all__ = [
    "FROZEN",
    "TransientCache",
    "transient_cache",
    "Predicate",
    "tracing",
    "read",
    "write",
    "now",
    "active",
    "due",
    "live",
    "target",
    "advance_refresh",
    "both",
    "negate",
    "maybe",
    "where",
    "select",
    "cond",
    "assign",
]

FROZEN = 2**62
"""``next_refresh`` of a mask that will not be refreshed again."""

Predicate = Union[bool, Tensor]
"""A schedule decision: a Python bool eagerly, a boolean scalar tensor under compilation."""


def tracing() -> bool:
    """Whether this code is being compiled (``torch.compile``, ``torch.export``, TorchScript)."""
    return torch.compiler.is_compiling() or torch.jit.is_scripting()


host_copies = True
"""Whether :func:`read` keeps host copies (``fxqp.ops.accelerate.disabled("host-copies")``
turns them off, for comparisons)."""


class TransientCache(dict):
    """A module's cache of values derived from its tensors (host copies of scalar buffers,
    reusable result memory): a copy of the module (``copy.deepcopy``, pickling,
    ``torch.save``) starts with an empty one. Entries keyed by a tensor's ``_version`` must
    not be carried over: a copied tensor starts at another version, which later writes
    could bring back to the cached one."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "TransientCache":
        return type(self)()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return type(self), ()


def transient_cache(owner: nn.Module, name: str) -> TransientCache:
    """The :class:`TransientCache` ``owner.<name>``, made empty on first use."""
    cache = owner.__dict__.get(name)
    if cache is None:
        cache = owner.__dict__[name] = TransientCache()
    return cache


def read(owner: nn.Module, name: str) -> int | Tensor:
    """The scalar buffer ``owner.<name>``: eagerly as a Python int (``bool`` buffers give 0
    or 1), under compilation the tensor.

    The int is kept with the buffer object and its ``_version`` (bumped by every in-place
    write), so it is read from the device again only after someone else wrote the buffer
    (``load_state_dict``, ``fill_``, ``.to()``); :func:`write` keeps it current for free.
    """
    tensor = owner._buffers[name]
    if tracing():
        return tensor
    if not host_copies:
        return int(tensor)
    copies = transient_cache(owner, "_host_copies")
    entry = copies.get(name)
    if entry is None or entry[0] is not tensor or entry[1] != tensor._version:
        entry = copies[name] = (tensor, tensor._version, int(tensor))
    return entry[2]


@torch.no_grad()
def write(owner: nn.Module, name: str, value: int | bool | Tensor) -> None:
    """Set the scalar buffer ``owner.<name>`` to ``value`` (a Python number eagerly; a tensor
    or a number under compilation), keeping its host copy current."""
    tensor = owner._buffers[name]
    if isinstance(value, Tensor):
        tensor.copy_(value)
        return
    tensor.fill_(value)
    if not tracing():
        transient_cache(owner, "_host_copies")[name] = (tensor, tensor._version, int(value))


def now(op: nn.Module) -> int | Tensor:
    """The model's step (see :attr:`fxqp.ops.ScheduledOp.step`)."""
    return read(op.schedule, "step")


def active(op: nn.Module) -> Predicate:
    """``step >= start``: whether the op is on."""
    return now(op) >= read(op, "start")


def due(op: nn.Module) -> Predicate:
    """``step >= next_refresh``: whether a training forward refreshes the op's mask."""
    return now(op) >= read(op, "next_refresh")


def live(op: nn.Module) -> Predicate:
    """``next_refresh < FROZEN``: whether the op's mask will be refreshed again."""
    return read(op, "next_refresh") < FROZEN


def target(op: nn.Module) -> Tensor:
    """The ramp's target sparsity at the current step (float64 scalar tensor):
    :func:`fxqp.ops.numerics.agp_sparsity` of ``op.config.sparsity``, ``start`` and ``end``."""
    end = None if op.config.end is None else op.end
    return agp_sparsity(op.step, op.config.sparsity, op.start, end)


def advance_refresh(op: nn.Module, refreshed: Predicate) -> None:
    """After a forward that refreshed the mask (``refreshed``), the step of the next
    refresh: ``min(step + every, end)`` before ``end``; :data:`FROZEN` from ``end`` on, and
    always without an ``end`` (the mask is computed once, at ``start``)."""
    if op.config.end is None:
        following: int | Tensor = FROZEN
    else:
        step, end = now(op), read(op, "end")
        following = where(step < end, _minimum(step + read(op, "every"), end), FROZEN)
    if isinstance(refreshed, Tensor):
        write(op, "next_refresh", torch.where(refreshed, following, op.next_refresh))
    elif refreshed:
        write(op, "next_refresh", following)


def both(a: Predicate, b: Predicate) -> Predicate:
    """``a and b``, for Python bools and boolean tensors alike."""
    if not isinstance(a, Tensor):
        return b if a else False
    if not isinstance(b, Tensor):
        return a if b else False
    return a & b


def negate(a: Predicate) -> Predicate:
    """``not a``, for Python values and boolean tensors alike."""
    return ~a if isinstance(a, Tensor) else not a


def maybe(a: Predicate) -> bool:
    """``False`` only where ``a`` is known to be false (eagerly): the work that depends on
    ``a`` can be skipped. Under compilation ``True``: the work is traced, and what it
    computes is selected by ``a``."""
    return isinstance(a, Tensor) or bool(a)


def _minimum(a: int | Tensor, b: int | Tensor) -> int | Tensor:
    return torch.minimum(a, b) if isinstance(a, Tensor) else min(a, b)


def where(c: Predicate, a: Any, b: Any) -> Any:
    """``a if c else b``; ``torch.where(c, a, b)`` for a tensor ``c``."""
    if isinstance(c, Tensor):
        return torch.where(c, a, b)
    return a if c else b


def select(c: Predicate, compute: Callable[[], Tensor], otherwise: Tensor) -> Tensor:
    """``compute()`` where ``c`` holds, else ``otherwise``. Eagerly ``compute`` runs only
    when ``c`` holds; under compilation both run, joined by ``torch.where``."""
    if isinstance(c, Tensor):
        return torch.where(c, compute(), otherwise)
    return compute() if c else otherwise


def cond(c: Predicate, then: Callable[..., Any], otherwise: Callable[..., Any], operands: Sequence[Tensor]) -> Any:
    """``then(*operands)`` if ``c`` else ``otherwise(*operands)``: eagerly a Python branch,
    under compilation ``torch.cond``, whose branches must return alike tensors and may write
    their operands in place only with gradients off."""
    if isinstance(c, Tensor):
        return torch.cond(c, then, otherwise, tuple(operands))
    return then(*operands) if c else otherwise(*operands)


@torch.no_grad()
def assign(c: Predicate, tensor: Tensor, value: Callable[[], Tensor]) -> None:
    """``tensor ← value()`` where ``c`` holds (in place; eagerly ``value`` runs only then)."""
    if isinstance(c, Tensor):
        tensor.copy_(torch.where(c, value(), tensor))
    elif c:
        tensor.copy_(value())
