"""Batch statistics of the ops whose state follows the data, and their reduction across ranks.

Some ops keep state computed from the activations they see: the activation quantizers'
min/max observers, LSQ's initial step size, static activation pruning's moving averages of
``|x|``. In a training-mode forward such an op does not change that state: it *records*
what it needs of the batch — values to be reduced by maximum (a batch max, a negated batch
min) and values to be reduced by sum (sums of ``|x|`` and the count of what was summed) —
in two small buffers of its own. The model's :class:`fxqp.schedule.Schedule`, the last node
of the graph, then *commits* them (:func:`commit`):

1. when the model trains on several processes (``torch.distributed`` initialised, or a
   process group given to :func:`fxqp.transform`), the recorded values of every op of the
   model are reduced across the ranks of the group in **two collectives**: one
   ``all_reduce(MAX)`` of all maxima and one ``all_reduce(SUM)`` of all sums, each over one
   flat bucket, whatever the number of sites (none when no op recorded anything);
2. each op folds the (reduced) batch statistics into its state.

Eagerly the fold replaces the state buffers it changes by new tensors (:func:`store`)
rather than writing them in place: a tensor the forward read may be saved for its backward,
which would fail on a changed version. When distributed, the commit also runs eagerly under
``torch.compile`` (outside the graph): Dynamo splits a DDP model's graph at DDP's buckets,
and a write at the end of the last piece would change what an earlier piece saved. In one
process a compiled commit stays in the graph and writes in place (one graph: its
functionalization orders the writes after the reads).

So the state after step ``t`` is what one process computes on the global batch of step
``t`` (the concatenation of the ranks' batches), on every rank alike, with or without DDP's
``broadcast_buffers``; and a batch's statistics take effect from the next forward on —
in one process as on many. An op that runs several times in one forward (a traced part
called in a loop) records the union of its calls: maxima of maxima, sums of sums.

Weight ops need none of this: their masks and scales are functions of the weights, which
data-parallel training keeps identical on every rank.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from fxqp.errors import NonFiniteWarning
from fxqp.ops import clock

if TYPE_CHECKING:
    from fxqp.ops.base import ScheduledOp

__all__ = ["add_statistics", "record", "store", "commit", "reduce_across", "resolve_group"]


def add_statistics(op: "ScheduledOp", maxima: int = 0, sums: int = 0, device: torch.device | None = None) -> None:
    """Give ``op`` its statistics buffers (not in ``state_dict``: a forward commits them before
    it returns): ``pending`` (bool: recorded since the last commit), ``pending_max`` and
    ``pending_sum`` (float32, ``maxima`` and ``sums`` values), ``skipped`` (int64: batches
    left out for non-finite values since the last report)."""
    op.add_buffers(
        persistent=False,
        pending=torch.zeros((), dtype=torch.bool, device=device),
        pending_max=torch.zeros(maxima, dtype=torch.float32, device=device),
        pending_sum=torch.zeros(sums, dtype=torch.float32, device=device),
        skipped=torch.zeros((), dtype=torch.int64, device=device),
    )


@torch.no_grad()
def record(op: "ScheduledOp", maxima: Tensor | None = None, sums: Tensor | None = None, when: clock.Predicate = True) -> None:
    """Record a batch's statistics in ``op``'s buffers where ``when`` holds: ``maxima`` and
    ``sums`` (1-D, the buffers' sizes, any float dtype; ``sums`` ends with the count of what
    was summed); combined with what was recorded since the last commit by maximum and by sum.

    A batch with a NaN or ±Inf among its values contributes nothing (−inf to the maxima, 0 to
    the sums and the count: the identities of the reductions) and is counted in the buffer
    ``skipped``: one bad batch never reaches the op's state."""
    if not clock.maybe(when):
        return
    checks = [torch.isfinite(v).all() for v in (maxima, sums) if v is not None]
    finite = checks[0] if len(checks) == 1 else checks[0] & checks[1]
    op.skipped.add_(clock.where(when, ~finite, False) if isinstance(when, Tensor) else ~finite)
    maxima = None if maxima is None else torch.where(finite, maxima.float(), -torch.inf)
    sums = None if sums is None else torch.where(finite, sums.float(), 0.0)
    pending = clock.read(op, "pending")
    for buffer, values, combine in ((op.pending_max, maxima, torch.maximum), (op.pending_sum, sums, torch.add)):
        if values is None:
            continue
        if isinstance(pending, Tensor):  # compiled: select, by the tensors of the decisions
            buffer.copy_(clock.where(when, torch.where(pending, combine(buffer, values), values), buffer))
        elif pending:
            buffer.copy_(combine(buffer, values))
        else:
            buffer.copy_(values)
    clock.write(op, "pending", clock.where(when, True, pending) if isinstance(when, Tensor) else True)


def resolve_group(choice: Any) -> Any:
    """The process group statistics are reduced over, or ``None`` (no reduction): ``choice``
    is a ``ProcessGroup``, ``False`` (never reduce) or ``None`` (the default group, when
    ``torch.distributed`` is initialised)."""
    if choice is False:
        return None
    if choice is not None:
        return choice
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.group.WORLD
    return None


@torch.no_grad()
def reduce_across(tensors: Sequence[Tensor], kind: str, group: Any) -> None:
    """Reduce ``tensors`` (float32, 1-D) in place across the ranks of ``group`` in one
    collective: ``kind`` is ``"max"`` or ``"sum"``."""
    parts = [t for t in tensors if t.numel()]
    if not parts:
        return
    distributed = torch.distributed
    op = distributed.ReduceOp.MAX if kind == "max" else distributed.ReduceOp.SUM
    flat = torch.cat(parts)
    distributed.all_reduce(flat, op=op, group=group)
    for t, chunk in zip(parts, flat.split([t.numel() for t in parts])):
        t.copy_(chunk)


@torch.no_grad()
def store(op: "ScheduledOp", name: str, value: Tensor | bool) -> None:
    """Set ``op``'s buffer ``name`` to ``value`` (a tensor of its shape, or a Python bool for a
    flag): under compilation in place; eagerly ``value`` itself (a tensor no other buffer or
    view holds: a result of the fold's arithmetic) or a new tensor of the flag, which replaces
    the buffer (see the module doc)."""
    old = op._buffers[name]
    if clock.tracing():
        old.copy_(value) if isinstance(value, Tensor) else old.fill_(value)
        return
    if isinstance(value, Tensor):
        new = value.detach().to(dtype=old.dtype, device=old.device).reshape(old.shape)
    else:
        new = torch.full(old.shape, value, dtype=old.dtype, device=old.device)
    op.add_buffers(persistent=name not in op._non_persistent_buffers_set, **{name: new})
    if not isinstance(value, Tensor):
        clock.transient_cache(op, "_host_copies")[name] = (new, new._version, int(value))


def _has_data(op: "ScheduledOp") -> Tensor:
    """Whether the (reduced) record holds a batch: finite maxima, a positive count."""
    has = torch.isfinite(op.pending_max).all()
    return has & (op.pending_sum[-1] > 0) if op.pending_sum.numel() else has


def _commit(ops: Sequence["ScheduledOp"], group: Any) -> None:
    pending = [op for op in ops if clock.maybe(clock.read(op, "pending"))]
    if not pending:
        return
    if group is not None:
        reduce_across([op.pending_max for op in pending], "max", group)
        reduce_across([op.pending_sum for op in pending], "sum", group)
    has = torch.stack([_has_data(op) & op.pending for op in pending])
    if not clock.tracing():  # one host read for the whole model: which ops fold, what was skipped
        skipped = torch.stack([op.skipped for op in pending])
        read = torch.cat([has.long(), skipped]).tolist()
        has = [bool(h) for h in read[: len(pending)]]
        skipped_at: dict[str, int] = {}
        for op, n in zip(pending, read[len(pending) :]):
            if n:
                skipped_at[op.site] = max(n, skipped_at.get(op.site, 0))
        _report_skipped(list(skipped_at.items()))
    for op, on in zip(pending, has):
        op.fold(on)
        clock.write(op, "pending", False)  # in place: no forward computation reads it
        if not clock.tracing():
            op.skipped.zero_()


def _report_skipped(sites: list[tuple[str, int]]) -> None:
    """Warn (once per process: Python's default filter) that batches were left out."""
    if sites:
        listed = ", ".join(f"{site} ({n})" for site, n in sites[:8]) + (f" and {len(sites) - 8} more" if len(sites) > 8 else "")
        warnings.warn(
            f"training batches with NaN or ±Inf values were left out of the activation statistics of {len(sites)} site(s): "
            f"{listed}; the observers, step sizes and averages keep the values of the finite batches",
            NonFiniteWarning,
            stacklevel=4,
        )


_commit_eagerly = torch.compiler.disable(_commit, recursive=True)


@torch.no_grad()
def commit(ops: Sequence["ScheduledOp"], group: Any) -> None:
    """Reduce what ``ops`` recorded across ``group`` (when not ``None``) and fold it into their
    state (see the module doc). Eagerly only the ops that recorded take part; in a compiled
    graph all of them, each folding only where it recorded."""
    if clock.tracing() and group is not None:
        _commit_eagerly(ops, group)
    else:
        _commit(ops, group)
