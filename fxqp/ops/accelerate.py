"""Eager accelerations, beside the ops: handlers that compute a run of a chain's ops faster.

Every op is one function of its input, its state and the step (:mod:`fxqp.ops.clock`), and
a chain of ops (a weight's parametrization chain, an activation stage) runs them one after
the other. An *accelerator* computes a run of consecutive ops of a chain in fewer passes
over memory, eagerly, with the same values and gradients as the ops themselves (each has
tests against the plain form: ``tests/test_accelerate.py``). Under ``torch.compile`` the
plain ops always run, and Inductor fuses them itself.

Accelerators are registered for a tuple of op classes (the exact classes, not subclasses:
a subclass computes something else) with :func:`register_accelerator`. When the transform
builds a chain it plans it once (:func:`plan`): from the left, the longest run of ops that
an accelerator is registered for and accepts, else one op alone. At each eager forward the
accelerator runs first and may decline (return ``None``) — the input is not a contiguous
float32 CPU tensor, a forward hook is installed, … — before it changes any state; then the
plain ops run.

An accelerator stays in fxqp only while it saves at least 5% of the eager training step it
targets (``benchmarks/train_step.py --accelerators``). The one that does:

* ``native-weight``: a weight's ``Prune`` and/or ``Quantize(method="uniform")`` (not the
  1-bit sign grid), per tensor or per channel along axis 0, on the C kernels of
  :mod:`fxqp.ops.fused`: ``Q(w·m)`` in one pass over memory for a per-channel grid, the
  backward ``g·m`` in one.

:func:`disabled` switches accelerators off by name (all of them without names), for A/B
comparisons and debugging.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from fxqp.errors import FxqpError
from fxqp.ops import clock, fused
from fxqp.ops.base import ScheduledOp
from fxqp.ops.numerics import affine_qparams, symmetric_scale_of
from fxqp.ops.prune import WeightPruner
from fxqp.ops.quantize import WeightQuantizer

__all__ = [
    "Accelerator",
    "register_accelerator",
    "unregister_accelerator",
    "accelerators",
    "plan",
    "planned",
    "run_chain",
    "disabled",
    "Segment",
    "TOGGLES",
    "quantize_weight",
]

Segment = tuple[str | None, int, int]
"""``(accelerator name or None, first op, stop)``: a run ``ops[first:stop]`` of a chain."""


@dataclass(frozen=True)
class Accelerator:
    """An eager handler for a run of ops of the classes ``ops``.

    Attributes:
        name: the name :func:`disabled` and the plans use.
        patterns: the runs of op classes it computes (exact classes, in chain order).
        accepts: ``accepts(ops)``, at plan time: whether the handler computes these ops (their
            configurations), else the plan runs them plainly.
        run: ``run(ops, x)``, eagerly: the run's output, or ``None`` to decline before any
            state is changed (the plain ops then run).
    """

    name: str
    patterns: tuple[tuple[type, ...], ...]
    accepts: Callable[[Sequence[ScheduledOp]], bool]
    run: Callable[[Sequence[ScheduledOp], Tensor], Tensor | None]


TOGGLES = ("host-copies",)
"""Names of speed-ups inside the clock, which :func:`disabled` takes too."""

_REGISTRY: dict[str, Accelerator] = {}
_off: set[str] = set()
_off_lock = threading.Lock()


def register_accelerator(accelerator: Accelerator) -> Accelerator:
    """Register ``accelerator`` (replacing one of the same name); chains planned from then
    on can use it."""
    patterns = accelerator.patterns
    if not patterns or not all(p and all(isinstance(t, type) and issubclass(t, ScheduledOp) for t in p) for p in patterns):
        raise FxqpError(f"accelerator {accelerator.name!r}: patterns must be non-empty tuples of ScheduledOp classes, got {patterns!r}")
    if accelerator.name in TOGGLES:
        raise FxqpError(f"accelerator name {accelerator.name!r} is taken; the names {TOGGLES} switch other speed-ups")
    _REGISTRY[accelerator.name] = accelerator
    return accelerator


def unregister_accelerator(name: str) -> None:
    """Remove the accelerator ``name``; chains planned before keep running it until their
    ops change, then run plainly."""
    if _REGISTRY.pop(name, None) is None:
        raise FxqpError(f"no accelerator named {name!r}; registered: {list(_REGISTRY)}")


def accelerators() -> tuple[str, ...]:
    """The names of the registered accelerators."""
    return tuple(_REGISTRY)


def plan(ops: Sequence[nn.Module]) -> tuple[Segment, ...]:
    """The runs of ``ops`` (a chain, in order): from the left, the longest run that a
    registered accelerator is for and accepts, else one op alone (``None``)."""
    ops = list(ops)
    segments: list[Segment] = []
    i = 0
    while i < len(ops):
        best, n = None, 1
        for accelerator in _REGISTRY.values():
            for pattern in accelerator.patterns:
                run = ops[i : i + len(pattern)]
                if (best is None or len(pattern) > n) and tuple(type(op) for op in run) == pattern and accelerator.accepts(run):
                    best, n = accelerator.name, len(pattern)
        segments.append((best, i, i + n))
        i += n
    return tuple(segments)


def planned(owner: nn.Module, ops: Sequence[nn.Module]) -> tuple[Segment, ...]:
    """The plan of ``owner``'s chain ``ops``: made once (when the transform builds the chain)
    and kept in ``owner.plan`` with the identities of the ops it was made for; made again
    only when the chain's ops change (lowering replaces them, a copy has others)."""
    key = tuple(map(id, ops))
    entry = owner.__dict__.get("plan")
    if entry is None or entry[0] != key:
        entry = owner.__dict__["plan"] = (key, plan(ops))
    return entry[1]


def run_chain(owner: nn.Module, ops: Sequence[nn.Module], x: Tensor, latent: Tensor | None = None) -> Tensor:
    """``op_n(...op_1(x))`` of ``owner``'s chain ``ops``, by its plan (:func:`planned`):
    eagerly each accelerated run through its accelerator unless it declines; ops that want
    it also get ``latent``."""
    ops = list(ops)
    segments = ((None, 0, len(ops)),) if clock.tracing() else planned(owner, ops)
    for name, first, stop in segments:
        if name is not None and name not in _off:
            accelerator = _REGISTRY.get(name)
            out = None if accelerator is None else accelerator.run(ops[first:stop], x)
            if out is not None:
                x = out
                continue
        for op in ops[first:stop]:
            x = op(x, latent) if getattr(op, "wants_latent", False) else op(x)
    return x


@contextlib.contextmanager
def disabled(*names: str) -> Iterator[None]:
    """Switch the named accelerators off inside the block (all of them and the
    :data:`TOGGLES` without names). The toggle ``host-copies`` switches off the clock's host
    copies of the schedule buffers (:func:`fxqp.ops.clock.read` then reads the device at
    each decision)."""
    unknown = [n for n in names if n not in _REGISTRY and n not in TOGGLES]
    if unknown:
        raise FxqpError(f"fxqp.ops.accelerate.disabled: unknown name(s) {unknown}; accepted: {[*_REGISTRY, *TOGGLES]}")
    chosen = set(names or (*_REGISTRY, *TOGGLES))
    with _off_lock:
        added = chosen - _off
        _off.update(added)
        clock.host_copies = "host-copies" not in _off
    try:
        yield
    finally:
        with _off_lock:
            _off.difference_update(added)
            clock.host_copies = "host-copies" not in _off


def _hooked(ops: Sequence[nn.Module]) -> bool:
    """Whether calling ``ops`` runs forward hooks (their own or global ones): then they run
    one by one, not fused into one call that would skip the hooks."""
    globals_ = nn.modules.module
    return bool(globals_._global_forward_hooks or globals_._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in ops
    )


# -- native-weight ------------------------------------------------------------------------


def _native_grid(quantizer: WeightQuantizer) -> bool:
    """The symmetric or affine grid (not the 1-bit sign grid)."""
    return not (quantizer.config.bits == 1 and quantizer.symmetric)


def _weight_accepts(ops: Sequence[ScheduledOp]) -> bool:
    return all(_native_grid(op) for op in ops if isinstance(op, WeightQuantizer))


def quantize_weight(quantizer: WeightQuantizer, w: Tensor, mask: Tensor | None = None) -> Tensor:
    """``quantizer.quantize(w·m)`` (``Q(w)`` without a mask) on the kernels, element for
    element, with gradient ``g·m``: per channel along axis 0 in one pass over memory, per
    tensor in two. ``w``: contiguous float32 on the CPU (:func:`fxqp.ops.fused.usable`);
    ``mask``: uint8 (0/1) of ``w``'s shape; the grid symmetric or affine (not sign), per
    tensor or along axis 0."""
    bits = quantizer.config.bits
    if quantizer.channel_axis is not None:
        return fused.quantize_rows(w, mask, bits, quantizer.symmetric)
    lo, hi = fused.row_range(w, mask, 1)
    if quantizer.symmetric:
        qmax = 2 ** (bits - 1) - 1
        return fused.round_to_grid(w, mask, symmetric_scale_of(torch.maximum(hi, lo.neg()), bits), None, -qmax, qmax)
    scale, zero_point = affine_qparams(lo, hi, bits)
    return fused.round_to_grid(w, mask, scale, zero_point, 0, 2**bits - 1)


def _native_weight(ops: Sequence[ScheduledOp], w: Tensor) -> Tensor | None:
    """``Q(w·m)``, ``w·m`` or ``Q(w)`` on the kernels, gradient ``g·m`` (``g``)."""
    quantizer = ops[-1] if isinstance(ops[-1], WeightQuantizer) else None
    if not fused.usable(w) or _hooked(ops):
        return None
    if quantizer is not None and quantizer.channel_axis is not None and (w.dim() < 2 or quantizer.channel_axis % w.dim() != 0):
        return None
    pruner = ops[0] if isinstance(ops[0], WeightPruner) else None
    mask = None if pruner is None else pruner.update(w).view(w.shape)
    if quantizer is None or not clock.active(quantizer):
        return w if mask is None else fused.mask_weight(w, mask)
    return quantize_weight(quantizer, w, mask)


register_accelerator(
    Accelerator("native-weight", ((WeightPruner, WeightQuantizer), (WeightPruner,), (WeightQuantizer,)), _weight_accepts, _native_weight)
)
