"""Eager fused ops on the native kernels (:mod:`fxqp.native`): weight quantization, optionally
of a masked weight, and a weight's mask.

``Q(w·m)`` of a pruned and quantized weight (and ``Q(w)`` of a quantized one): per output
channel, the range of ``w·m`` and then the channel again from the cache onto its grid (one
pass over memory; a per-tensor grid takes two); the backward pass is one pass, ``g·m``
(the straight-through gradient of a grid fitted to the weight's own range is the
identity). The results are those of the torch op chain that :class:`fxqp.ops.WeightQuantizer`
otherwise runs, element for element (see ``fxqp/native/kernels.c``). Used eagerly only, by
the ``native-weight`` accelerator (:mod:`fxqp.ops.accelerate`); under torch.compile the
ops stay torch ops, which Inductor fuses itself.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fxqp import native
from fxqp.ops.numerics import MIN_SCALE

__all__ = ["usable", "row_range", "round_to_grid", "quantize_rows", "mask_weight", "masked_grad", "mask_multiply", "BLOCK"]

BLOCK = 32768
"""Elements per block of work: rows longer than this are split, so that one row (a
per-tensor grid) is shared between threads."""


def usable(x: Tensor) -> bool:
    """Whether ``x`` can go through the kernels: a plain (no subclass: a DTensor's memory is
    a shard) non-empty contiguous float32 CPU tensor, with the kernels available."""
    return (
        type(x) in _PLAIN
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.numel() > 0
        and x.is_contiguous()
        and native.kernels() is not None
    )


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _parts(columns: int) -> int:
    return max(1, -(-columns // BLOCK))


def _mask_stride(x: Tensor, mask: Tensor | None, rows: int) -> int:
    """How far apart the rows' masks are: the row length for a mask of ``x``'s shape, 0 for
    one row's mask that all rows share."""
    return 0 if mask is None or mask.numel() != x.numel() else x.numel() // rows


def row_range(x: Tensor, mask: Tensor | None, rows: int) -> tuple[Tensor, Tensor]:
    """Minimum and maximum of ``x·m`` (``x`` when ``mask`` is None) in each of ``rows`` equal
    rows of the flat tensor: shape ``(rows,)`` each, NaN where a row holds a NaN. ``mask``:
    uint8 (0/1), contiguous, of ``x``'s size or of one row's (shared by all rows)."""
    columns = x.numel() // rows
    parts = _parts(columns)
    lo, hi = torch.empty(rows * parts), torch.empty(rows * parts)
    native.kernels().fxqp_block_range(
        x.data_ptr(), _ptr(mask), _mask_stride(x, mask, rows), rows, columns, parts, lo.data_ptr(), hi.data_ptr(), torch.get_num_threads()
    )
    if parts > 1:
        lo, hi = lo.view(rows, parts).amin(dim=1), hi.view(rows, parts).amax(dim=1)
    return lo, hi


class _RoundMasked(torch.autograd.Function):
    """``write(out)`` puts ``grid(x·m)`` into a new tensor ``out``; gradient ``g·m`` (``g``
    without a mask)."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor | None, write: Callable[[Tensor], None]) -> Tensor:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        write(out)
        ctx.set_materialize_grads(False)
        if mask is not None:
            ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor | None):
        if grad is None or not ctx.saved_tensors:
            return grad, None, None
        (mask,) = ctx.saved_tensors
        return masked_grad(grad, mask), None, None


def round_to_grid(x: Tensor, mask: Tensor | None, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(v/s) + z, qmin, qmax) - z) · s`` with ``v = x·m`` (``x`` without a
    mask), ``s`` and ``z`` per row (``scale.numel()`` rows; ``z = None``: the symmetric grid
    ``round(v/s)·s``, whose scale covers the row's range, so no clamp). Straight-through
    gradient ``g·m``. ``mask``: uint8 (0/1) of ``x``'s shape."""
    scale = scale.detach().reshape(-1).contiguous()
    if zero_point is not None:
        zero_point = zero_point.detach().reshape(-1).contiguous()
    rows = scale.numel()
    columns = x.numel() // rows

    def write(out: Tensor) -> None:
        native.kernels().fxqp_round_to_grid(
            x.data_ptr(),
            _ptr(mask),
            _mask_stride(x, mask, rows),
            rows,
            columns,
            _parts(columns),
            scale.data_ptr(),
            _ptr(zero_point),
            qmin,
            qmax,
            out.data_ptr(),
            torch.get_num_threads(),
        )

    return _RoundMasked.apply(x, mask, write)


def mask_weight(x: Tensor, mask: Tensor) -> Tensor:
    """``x·m`` with gradient ``g·m``: the values of ``x * mask.float()``, element for element.
    ``mask`` as in :func:`round_to_grid`."""

    def write(out: Tensor) -> None:
        native.kernels().fxqp_mask_multiply(x.data_ptr(), mask.data_ptr(), x.numel(), BLOCK, out.data_ptr(), torch.get_num_threads())

    return _RoundMasked.apply(x, mask, write)


def quantize_rows(x: Tensor, mask: Tensor | None, bits: int, symmetric: bool) -> Tensor:
    """Per-channel (axis 0) quantization of ``v = x·m`` onto each row's own grid, in one pass
    over memory (each row's range, then the row again from the cache). The grid is that of
    :class:`fxqp.ops.WeightQuantizer`: symmetric ``s = max(max|v| / (2^(b-1)-1), eps)``,
    ``Q = round(v/s)·s``; affine :func:`fxqp.ops.numerics.affine_qparams` of the row's min and
    max, ``Q = (clamp(round(v/s) + z, 0, 2^b-1) - z)·s``. Gradient ``g·m``; ``mask`` as in
    :func:`round_to_grid`."""
    rows = x.shape[0]
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1

    def write(out: Tensor) -> None:
        native.kernels().fxqp_quantize_rows(
            x.data_ptr(), _ptr(mask), rows, x.numel() // rows, int(symmetric), qmax, MIN_SCALE, out.data_ptr(), torch.get_num_threads()
        )

    return _RoundMasked.apply(x, mask, write)


def masked_grad(g: Tensor, mask: Tensor) -> Tensor:
    """``g·m`` in a backward pass, into a new tensor: a gradient is never modified in place,
    since other nodes of the graph (or hooks) may hold it. Under ``create_graph`` it stays a
    torch op, so that the gradient is differentiable."""
    if torch.is_grad_enabled() or g.requires_grad:
        return g * mask.to(g.dtype)
    return mask_multiply(g, mask)


def mask_multiply(g: Tensor, mask: Tensor) -> Tensor:
    """``g·m`` for a uint8 (0/1) ``mask`` of ``g``'s shape; a new tensor."""
    if not (usable(g) and mask.is_contiguous()):
        return g * mask.to(g.dtype)
    out = torch.empty_like(g)
    native.kernels().fxqp_mask_multiply(g.data_ptr(), mask.data_ptr(), g.numel(), BLOCK, out.data_ptr(), torch.get_num_threads())
    return out
