"""The base class of every op module that the transform attaches to a site."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from fxqp.errors import FxqpError
from fxqp.ops import clock
from fxqp.ops.state import set_state

__all__ = ["ScheduledOp", "compute_dtype"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the numerics run in: float32 for half types, else the input's own dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class ScheduledOp(nn.Module):
    """An op (quantizer or pruner) of one site, switched on by the model's step counter.

    All schedule state is in buffers: ``start`` (and ``end`` where the op has one) here, the
    step counter in the model's :class:`fxqp.schedule.Schedule`, to which the op holds a plain
    (unregistered) reference set by :meth:`bind`. Before ``start`` the op is the identity.

    Attributes:
        config: the spec op (``Quantize`` / ``Prune``) this module implements.
        site: the site name (parameter path for weights, graph node name for activations).
    """

    wants_latent = False
    """Activation ops set this to receive the stage input as ``forward(x, latent)``."""

    quantizes = False
    """The op maps its input onto a grid whose codes :meth:`encode` gives (lowering stores
    the codes of a weight's last active quantizer)."""

    prunes = False
    """The op multiplies its input by a 0/1 mask."""

    observes = False
    """The op keeps state computed from the data it sees: it records batch statistics in a
    training forward and folds them in :meth:`fold` when the model's schedule commits them
    (:mod:`fxqp.ops.statistics`), reduced across ranks when training is distributed."""

    def link(self, chain: Sequence["ScheduledOp"], position: int, owner: nn.Module | None = None, name: str = "weight") -> None:
        """Wire this op into its site's chain of ops (``chain[position]`` is this op), once,
        when the transform attaches the chain: ``owner`` is the module whose tensor ``name``
        a weight chain parametrizes (``None`` for an activation stage). Nothing by default."""

    def __init__(self, config: Any, site: str):
        super().__init__()
        self.set_plain(config=config, site=site)
        self.add_buffers(start=torch.full((), int(config.start), dtype=torch.int64))
        self.__dict__["_schedule"] = None

    def add_buffers(self, *, persistent: bool = True, **tensors: Tensor) -> None:
        """Register ``tensors`` as buffers under the given names (in ``state_dict`` when
        ``persistent``), or replace the buffers of those names: ``register_buffer`` for
        each, without its per-name checks (:func:`fxqp.ops.state.set_state`). Only for the
        fixed buffer names of the op classes themselves."""
        set_state(self, tensors, persistent=persistent)

    def set_plain(self, **values: Any) -> None:
        """Set plain attributes (flags, ints, configs: never a tensor or a module):
        ``self.name = value`` for each, without ``nn.Module.__setattr__``'s search of the
        parameter, buffer and submodule dicts (:func:`fxqp.ops.state.set_state`)."""
        set_state(self, plain=values)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        """Moves (``.to(device)``, ``.cuda()``, ``.to(memory_format=...)``) apply to the op's
        state as to any module's; dtype casts (``.to(torch.bfloat16)``, ``.half()``,
        ``.double()``, ``.type(...)``) do not: the state keeps the dtypes the transform gave
        it, whatever the model's dtype. Observers and moving averages stay float32 (in
        bfloat16 a moving average with momentum 0.1 stops moving once the batch statistics
        are within about 2% of it), LSQ's grid bounds stay exact (2^15 - 1 is not a
        bfloat16 value) and its learned step sizes float32, masks stay bool and counters
        int64; the ops compute in
        :func:`compute_dtype` of their input either way. So a model cast after
        ``fxqp.transform`` holds the same op state as one transformed after the cast."""

        def keep_dtype(t: Tensor) -> Tensor:
            out = fn(t)  # a cast's result is only looked at: the state is moved, not rounded
            return out if out.dtype == t.dtype else t.to(device=out.device)

        return super()._apply(keep_dtype, recurse)

    def bind(self, schedule: nn.Module) -> None:
        """Attach the model's schedule, whose ``step`` buffer drives this op (and which
        commits the batch statistics of an op that :attr:`observes`)."""
        self.__dict__["_schedule"] = schedule
        if self.observes:
            schedule.track(self)

    def fold(self, on: "clock.Predicate") -> None:
        """Fold the batch statistics recorded since the last commit (``pending_max``,
        ``pending_sum``; reduced across ranks when distributed) into the op's state, where
        ``on`` holds: called by :func:`fxqp.ops.statistics.commit` at the end of a training
        forward (or by :func:`fxqp.ops.statistics.settle`). Only ops that :attr:`observes`
        record anything."""

    @property
    def schedule(self) -> nn.Module:
        """The model's :class:`fxqp.schedule.Schedule` (see :meth:`bind`)."""
        schedule = self.__dict__["_schedule"]
        if schedule is None:
            raise FxqpError(
                f"op {type(self).__name__} of site {self.site!r} is not bound to a schedule; ops are created and bound by fxqp.transform"
            )
        return schedule

    @property
    def step(self) -> Tensor:
        """The model's step counter (an int64 scalar tensor)."""
        return self.schedule.step

    def active(self) -> Tensor:
        """Boolean scalar tensor: ``step >= start`` (:func:`fxqp.ops.clock.active` gives the
        decision as the op code takes it)."""
        return self.step >= self.start

    def started(self) -> bool:
        """``step >= start``, as a Python bool."""
        return bool(clock.active(self))

    def describe(self) -> dict[str, Any]:
        """Facts for reports: op text, bits, target and actual sparsity, start and end."""
        return {"op": self.config.kind, "start": int(self.config.start)}

    def extra_repr(self) -> str:
        return f"site={self.site!r}, config={self.config!r}"
