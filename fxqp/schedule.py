"""The training schedule: one step counter per transformed model.

The counter is the int64 buffer ``step`` of the :class:`Schedule` module that
:func:`fxqp.transform` registers as ``fxqp_schedule`` and calls as the last node of the
graph. In training mode and with ``auto_step=True`` (the default) every forward advances it
by one *after* all ops have run, so the forward number ``k`` (counting from 0) sees
``step == k``: an op with ``start = 100`` is the identity for the first 100 training
forwards. Evaluation-mode forwards never advance it. With ``auto_step=False`` the counter
moves only through :func:`step` (for gradient accumulation, say: one step per optimizer step).

Before that, a training-mode forward of the schedule commits the batch statistics its ops
recorded (:func:`fxqp.ops.statistics.commit`): reduced across the ranks of
:attr:`Schedule.process_group` when training is distributed, then folded into the ops' state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fxqp.errors import FxqpError
from fxqp.ops import clock, statistics
from fxqp.ops.base import ScheduledOp

__all__ = [
    "Schedule",
    "step",
    "find_schedule",
    "advance_after_forward",
    "pending_ops",
    "set_process_group",
    "check_process_group",
    "SCHEDULE_NAME",
]

SCHEDULE_NAME = "fxqp_schedule"


class _GroupChoice:
    """Which process group a schedule reduces statistics over (``None``: the default group
    when ``torch.distributed`` is initialised; ``False``: none; else a ``ProcessGroup``).
    Deep copies share it (a process group is not copied); pickling keeps only the default
    (a process group cannot be saved)."""

    __slots__ = ("group",)

    def __init__(self, group: Any = None):
        self.group = group

    def __deepcopy__(self, memo: dict[int, Any]) -> "_GroupChoice":
        return self

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return type(self), (self.group if self.group is False else None,)


def check_process_group(group: Any, where: str) -> Any:
    """``group`` if it is a ``ProcessGroup``, ``None`` or ``False``; else an
    :class:`FxqpError` naming ``where``."""
    if group is None or group is False:
        return group
    distributed = torch.distributed
    if distributed.is_available() and isinstance(group, distributed.ProcessGroup):
        return group
    raise FxqpError(
        f"{where}: process_group must be a torch.distributed ProcessGroup, None (the default group when torch.distributed "
        f"is initialised) or False (statistics stay local to each process), got {type(group).__name__}"
    )


class Schedule(nn.Module):
    """Holds the step counter and what the transform recorded (spec, fallback leaves).

    Attributes:
        auto_step: advance ``step`` at every training-mode forward.
        spec: the :class:`fxqp.Spec` the model was transformed with, its fractions of the run
            resolved.
        total_steps: the run length the transform resolved them against (or ``None``).
        fallback_leaves: module paths that tracing had to keep as leaves.
        mode_leaves: module paths kept as leaves because they compute differently in training
            and in evaluation in a way that cannot be switched at run time.
        mode_switches: paths of the :class:`passes.modes.ModeSwitch` modules that compute the
            parts of the graph that differ between training and evaluation.
    """

    _is_impure = True  # keep the node through dead-code elimination: it mutates state

    def __init__(
        self,
        spec: Any = None,
        auto_step: bool = True,
        fallback_leaves: tuple[str, ...] = (),
        mode_leaves: tuple[str, ...] = (),
        total_steps: int | None = None,
        mode_switches: tuple[str, ...] = (),
    ):
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.auto_step = auto_step
        self.spec = spec
        self.total_steps = total_steps
        self.group_notes: tuple[str, ...] = ()
        self.example_specs: list[tuple[tuple[int, ...], torch.dtype]] | None = None  # (shape, dtype) per example input
        self.fallback_leaves = tuple(fallback_leaves)
        self.mode_leaves = tuple(mode_leaves)
        self.mode_switches = tuple(mode_switches)
        self.non_float_nodes: tuple[str, ...] = ()
        """Call nodes an example run found not to be floating-point tensors (no sites)."""
        self.leaf_functions: tuple[str, ...] = ()
        """Plain functions called as one node because tracing failed inside them."""
        self.example_signature: dict[str, dict[str, Any]] | None = None
        """Shapes, dtypes and plain values of the example inputs (see
        :func:`fxqp.transform.example_signature`), for tracing the model again on load."""
        self.parts: tuple[str, ...] = ("",)
        """Paths of the traced parts: ``("",)`` when the whole model is one graph; else the
        largest traceable submodules, each running its graph in place (:mod:`passes.descend`)."""
        self.untraced: dict[str, str] = {}
        """Module path → why it could not be traced, for the modules of a model traced in parts
        that run their own code (``""``: the root)."""
        self.__dict__["_observers"] = []
        self.__dict__["_group"] = _GroupChoice()

    def track(self, op: ScheduledOp) -> None:
        """Commit the batch statistics of ``op`` (an op that ``observes``) at every training
        forward; ops are committed in the order they were tracked, the same on every rank."""
        self.__dict__["_observers"].append(op)

    @property
    def observers(self) -> tuple[ScheduledOp, ...]:
        """The ops whose batch statistics this schedule commits, in order."""
        return tuple(self.__dict__["_observers"])

    @property
    def process_group(self) -> Any:
        """The process group batch statistics are reduced over, as given to
        :func:`fxqp.transform` or :func:`set_process_group`: a ``ProcessGroup``, ``None``
        (the default group whenever ``torch.distributed`` is initialised) or ``False``
        (never reduced: each process keeps its own statistics)."""
        return self.__dict__["_group"].group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        self.__dict__["_group"] = _GroupChoice(check_process_group(group, "Schedule.process_group"))

    def opaque_modules(self) -> tuple[str, ...]:
        """Module paths whose inside is no graph: the modules left untraced, and the leaves
        that were not traced on their own."""
        leaves = (p for p in (*self.fallback_leaves, *self.mode_leaves) if p not in self.parts)
        return tuple(dict.fromkeys((*self.untraced, *leaves)))

    def forward(self, batch: Any = None) -> None:
        """End of a training forward: commit the ops' batch statistics, then advance
        ``step`` (with ``auto_step``). ``batch`` is the model's first input: an empty tensor
        (no samples) does not advance the step in one process; under ``torch.distributed``
        every rank advances, so that ranks stay in step whatever their batches."""
        if self.training:
            statistics.commit(self.__dict__["_observers"], statistics.resolve_group(self.__dict__["_group"].group))
            if self.auto_step and not (isinstance(batch, Tensor) and batch.numel() == 0 and not _distributed()):
                clock.write(self, "step", clock.read(self, "step") + 1)

    def extra_repr(self) -> str:
        return f"step={int(self.step)}, auto_step={self.auto_step}"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def advance_after_forward(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of the root of a model traced in parts (whose root has no graph to call
    the schedule from): calls its :class:`Schedule` after each forward, as the last node of a
    graph would. Does nothing once the schedule is gone (a lowered model)."""
    schedule = getattr(module, SCHEDULE_NAME, None)
    if isinstance(schedule, Schedule):
        schedule(args[0] if args else None)


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps in an OptimizedModule (_orig_mod); DDP/DataParallel in .module
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module) and not isinstance(model, Schedule):
            model = model.module
        else:
            return model


def find_schedule(model: nn.Module) -> Schedule:
    """The :class:`Schedule` of a transformed model (also through torch.compile / DDP wrappers)."""
    inner = _unwrap(model)
    schedule = getattr(inner, SCHEDULE_NAME, None)
    if isinstance(schedule, Schedule):
        return schedule
    for module in inner.modules():
        if isinstance(module, Schedule):
            return module
    raise FxqpError(f"{type(model).__name__} has no fxqp schedule: pass a model returned by fxqp.transform")


def set_process_group(model: nn.Module, group: Any) -> None:
    """Set the process group over which a transformed model reduces its ops' batch
    statistics (see :attr:`Schedule.process_group`): a ``ProcessGroup``, ``None`` (the
    default group whenever ``torch.distributed`` is initialised, the default) or ``False``
    (each process keeps its own statistics). A group is not saved with the model: a loaded
    or unpickled model uses the default."""
    find_schedule(model).process_group = group


def step(model: nn.Module, n: int = 1) -> int:
    """Advance the step counter of a transformed model by ``n`` and return the new step.

    Use with ``fxqp.transform(..., auto_step=False)`` to count optimizer steps yourself.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise FxqpError(f"fxqp.step: n must be a non-negative int, got {n!r}")
    schedule = find_schedule(model)
    with torch.no_grad():
        schedule.step.add_(n)
    return int(schedule.step)


def pending_ops(model: nn.Module, before: int | None = None) -> list[tuple[str, str, int]]:
    """``(site, op, start)`` of the ops of a transformed model that have not started at step
    ``before`` (default: the model's current step), i.e. whose ``start >= before``, in
    module order. With ``before`` the last step of a run, these are the ops that run never
    trains with."""
    if before is None:
        before = int(find_schedule(model).step)
    return [
        (op.site, op.config.kind, int(op.config.start))
        for op in model.modules()
        if isinstance(op, ScheduledOp) and int(op.config.start) >= before
    ]
