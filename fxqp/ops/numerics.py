"""Pure tensor functions behind every quantizer and pruner.

Everything here is plain composite torch code — no Python branches on tensor values, no
host syncs — so that autograd, torch.compile and every device handle it alike. Gradients use
the straight-through estimator (STE): the forward value is the quantized one, the backward
pass treats the quantizer as the identity inside its clipping range and as zero outside.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "ste",
    "reduce_dims",
    "symmetric_scale",
    "symmetric_scale_of",
    "fake_quantize_symmetric",
    "affine_qparams",
    "fake_quantize_affine",
    "quantize_in_range",
    "MIN_SCALE",
    "sign_scale",
    "fake_quantize_sign",
    "round_ste",
    "grad_scale",
    "fake_quantize_lsq",
    "agp_sparsity",
    "prune_count",
    "magnitude_keep_mask",
]


MIN_SCALE = torch.finfo(torch.float32).eps
"""Smallest quantization scale (float32 eps): an all-zero channel or a collapsed range gets
this scale, and ``1/scale`` stays finite."""


def ste(x: Tensor, q: Tensor, inside: Tensor | None = None) -> Tensor:
    """Return ``q`` in the forward pass with gradient ``∂/∂x = inside`` (1 where no mask given).

    Computed as ``q.detach() + (x - x.detach()) · inside``: the second term is exactly zero
    for finite ``x``, so the forward value is bit-identical to ``q``.
    """
    delta = x - x.detach()
    if inside is not None:
        delta = delta * inside
    return q.detach() + delta


def reduce_dims(ndim: int, channel_axis: int | None) -> Sequence[int]:
    """Dimensions to reduce over for per-channel statistics (all dims when per-tensor)."""
    if channel_axis is None:
        return tuple(range(ndim))
    axis = channel_axis % ndim
    return tuple(d for d in range(ndim) if d != axis)


def _amax_abs(x: Tensor, channel_axis: int | None) -> Tensor:
    dims = reduce_dims(x.dim(), channel_axis)
    if not dims:
        return x.abs()
    # max(max x, -min x): two reductions, no |x| temporary
    return torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg())


def symmetric_scale(x: Tensor, bits: int, channel_axis: int | None) -> Tensor:
    """Scale of the narrow-range symmetric grid: ``s = max|x| / (2^(b-1) - 1)``.

    ``max`` runs over each channel along ``channel_axis`` (or the whole tensor when ``None``).
    The scale is floored at :data:`MIN_SCALE` (an all-zero channel gets it instead of 0).
    """
    return symmetric_scale_of(_amax_abs(x.detach(), channel_axis), bits)


def symmetric_scale_of(amax: Tensor, bits: int) -> Tensor:
    """``s = max(amax / (2^(b-1) - 1), MIN_SCALE)`` for a given ``amax = max|x|``."""
    return (amax / (2 ** (bits - 1) - 1)).clamp_min(MIN_SCALE)


class _FakeQuantize(torch.autograd.Function):
    """``(clamp(round(x·(1/s)) + z, qmin, qmax) - z) · s`` with the STE gradient masked to the
    clamp range, as a few in-place passes of plain float32 kernels.

    Same arithmetic, element for element, as torch's ``fake_quantize_per_*_affine`` kernels,
    which run several times slower on the CPU (they are not vectorized, and their bool mask
    costs more than the arithmetic). The backward mask is kept in the input's dtype: a
    float multiply is vectorized, a bool one is not.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
        r = x * torch.reciprocal(scale)
        r.round_()
        if zero_point is not None:
            r.add_(zero_point)
        q = r.clamp(qmin, qmax)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(torch.eq(r, q, out=r))  # r is not needed after this
        if zero_point is not None:
            q.sub_(zero_point)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def _fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x/s) + z, qmin, qmax) - z) · s``, STE gradient masked to the clamp
    range; ``z = None`` is 0.

    ``scale`` / ``zero_point`` are one value or broadcast along one channel axis. float32
    divides as torch's fake-quantize kernels do, ``x · (1/s)`` with a float32 ``1/s``; other
    dtypes divide exactly, in their own precision.
    """
    scale = scale.detach()
    if zero_point is not None:
        zero_point = torch.round(zero_point.detach())
    if x.dtype == torch.float32:
        scale = scale.float()
        if zero_point is not None:
            zero_point = zero_point.float()
    if torch.compiler.is_compiling() or x.dtype != torch.float32:
        # Plain ops: Inductor fuses them with the neighbouring pointwise ops (mask, ReLU)
        # into one loop; eagerly, non-float32 dtypes take this path too.
        xd = x.detach()
        r = torch.round(xd * torch.reciprocal(scale) if x.dtype == torch.float32 else xd / scale)
        if zero_point is not None:
            r = r + zero_point
        q = torch.clamp(r, qmin, qmax)
        inside = r == q
        if zero_point is not None:
            q = q - zero_point
        return ste(x, q * scale, inside)
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax)


def fake_quantize_symmetric(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Narrow-range symmetric fake quantization, ``bits >= 2``.

    ``Q(x) = clamp(round(x / s), -(2^(b-1)-1), 2^(b-1)-1) · s``; STE gradient, zero where
    ``round(x/s)`` falls outside the clamp range. The grid has ``2^b - 1`` levels. Bit-identical
    to torch's ``fake_quantize_per_*_affine`` (which multiplies by ``1/s``).
    """
    qmax = 2 ** (bits - 1) - 1
    return _fake_quantize(x, scale, None, -qmax, qmax)


def affine_qparams(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the affine grid ``0 .. 2^b - 1`` covering ``[lo, hi] ∪ {0}``.

    The range is widened to contain 0 (so 0 — a pruned or ReLU'd value — is exact):
    ``lo' = min(lo, 0)``, ``hi' = max(hi, 0)``, ``s = (hi' - lo') / (2^b - 1)``,
    ``z = clamp(round(-lo' / s), 0, 2^b - 1)``. When ``lo >= 0`` this is the unsigned grid
    with ``z = 0``.
    """
    qmax = 2**bits - 1
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = ((hi - lo) / qmax).clamp_min(MIN_SCALE)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero_point


def fake_quantize_affine(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Affine fake quantization ``Q(x) = (clamp(round(x/s) + z, 0, 2^b-1) - z) · s``.

    STE gradient, zero where ``round(x/s) + z`` falls outside ``[0, 2^b - 1]``. Bit-identical
    to torch's ``fake_quantize_per_*_affine``.
    """
    return _fake_quantize(x, scale, zero_point, 0, 2**bits - 1)


def _round_to_grid_(t: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """``t ← (clamp(round(t) + z, qmin, qmax) - z) · s`` in place, for ``t = x / s``."""
    t.round_()
    if zero_point is None:
        # symmetric: the scale is max|x| / qmax, so |round(x/s)| <= qmax already
        return t.mul_(scale)
    return t.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


class _RoundToGrid(torch.autograd.Function):
    """:func:`_round_to_grid_` on a new buffer, or with ``inplace`` on the input itself (a
    temporary no one else reads); identity gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            return _round_to_grid_(x.div_(scale), scale, zero_point, qmin, qmax)
        return _round_to_grid_(x.detach() / scale, scale, zero_point, qmin, qmax)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None, None, None, None


def quantize_in_range(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, inplace: bool = False) -> Tensor:
    """Fake-quantize a tensor whose grid was fitted to its own range (a weight).

    ``Q(x) = (clamp(round(x/s) + z, qmin, qmax) - z) · s``; with ``z = None`` (symmetric,
    ``s = max|x| / qmax``) ``Q(x) = round(x/s) · s``, the clamp being a no-op. The scale comes
    from ``x``'s own range, so no element is clipped and the STE gradient is the identity:
    the backward pass costs nothing, and the forward is a few in-place passes. With
    ``inplace`` (eager mode, ``x`` a temporary that nothing else reads, e.g. a pruner's
    output ``w·m``) ``x`` itself becomes the result, which saves a weight-sized buffer.
    """
    return _RoundToGrid.apply(x, scale.detach(), None if zero_point is None else zero_point.detach(), qmin, qmax, inplace)


def sign_scale(x: Tensor, channel_axis: int | None) -> Tensor:
    """``α`` of 1-bit quantization: mean ``|x|`` over the non-zero elements of each channel
    (or of the whole tensor when ``channel_axis`` is ``None``); 0 for an all-zero channel."""
    xd = x.detach()
    dims = reduce_dims(x.dim(), channel_axis)
    if not dims:
        return xd.abs()
    total = xd.abs().sum(dim=dims, keepdim=True)
    count = (xd != 0).sum(dim=dims, keepdim=True).clamp_min(1)
    return total / count


def fake_quantize_sign(x: Tensor, channel_axis: int | None) -> Tensor:
    """1-bit quantization: ``Q(x) = α · sign(x)``; exact zeros stay zero.

    ``α`` (:func:`sign_scale`) is the mean of ``|x|`` over the non-zero elements of each
    channel: without pruning this is XNOR-Net's ``mean|x|``; after pruning it is the
    least-squares scale of the kept weights, and pruned weights (exact zeros) are not turned
    into ``±α``. STE gradient masked to ``|x| <= 1``.
    """
    xd = x.detach()
    q = torch.sign(xd) * sign_scale(xd, channel_axis)
    return ste(x, q, xd.abs() <= 1)


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` with identity gradient."""
    return ste(x, torch.round(x.detach()))


def grad_scale(x: Tensor, g: Tensor | float) -> Tensor:
    """Value ``x``, gradient scaled by ``g`` (LSQ's step-size gradient scaling)."""
    scaled = x * g
    return (x - scaled).detach() + scaled


def fake_quantize_lsq(x: Tensor, step: Tensor, qn: Tensor | float, qp: Tensor | float, g: Tensor | float) -> Tensor:
    """LSQ (Esser et al.): ``x_q = round(clamp(x / s, Q_n, Q_p)) · s``.

    ``s`` is learned; its gradient is scaled by ``g = 1 / sqrt(n · Q_p)`` with ``n`` the
    number of weights sharing one step size (for activations: the features of one sample).
    The gradient w.r.t. ``x`` is 1 inside
    ``[Q_n·s, Q_p·s]`` and 0 outside.
    """
    s = grad_scale(step, g)
    v = x / s
    qn = torch.as_tensor(qn, dtype=v.dtype, device=v.device)
    qp = torch.as_tensor(qp, dtype=v.dtype, device=v.device)
    # torch.where, not maximum/minimum (or clamp): those halve the gradient at v == Q_n or Q_p
    v = torch.where(v < qn, qn, torch.where(v > qp, qp, v))
    return round_ste(v) * s


def agp_sparsity(step: Tensor, sparsity: float, start: Tensor, end: Tensor | None) -> Tensor:
    """Target sparsity at ``step`` (float64 scalar tensor).

    0 before ``start``; with ``end`` the cubic AGP ramp (Zhu & Gupta)
    ``s_t = s · (1 - (1 - (t - start) / (end - start))^3)`` for ``start <= t < end`` and ``s``
    from ``end`` on; without ``end``, ``s`` from ``start`` on.
    """
    t = step.to(torch.float64)
    s = torch.full_like(t, float(sparsity))
    if end is None:
        ramp = s
    else:
        frac = ((t - start) / (end - start).to(torch.float64)).clamp(0.0, 1.0)
        ramp = s * (1.0 - (1.0 - frac) ** 3)
    return torch.where(step >= start, ramp, torch.zeros_like(t))


def prune_count(target: Tensor, n: int) -> Tensor:
    """Number of elements to zero: ``round(s_t · n)`` (round half to even), as int64."""
    return torch.round(target * n).to(torch.int64)


def magnitude_keep_mask(score: Tensor, k: Tensor, tiebreak: Tensor | None = None, batch_dims: int = 0) -> Tensor:
    """Boolean keep-mask that is False at exactly the ``k`` smallest ``score`` values.

    Ties are broken by ``tiebreak`` (smaller pruned first) and then by flat index (lower
    index pruned first), using stable sorts, so the result is deterministic. With
    ``batch_dims = 1`` the first dimension is a batch: each sample gets its own ``k``
    smallest zeroed.
    """
    shape = score.shape
    flat = score.reshape(shape[0], -1) if batch_dims else score.reshape(1, -1)
    n = flat.shape[1]
    if tiebreak is None:
        order = torch.argsort(flat, dim=1, stable=True)
    else:
        tb = tiebreak.reshape(flat.shape)
        first = torch.argsort(tb, dim=1, stable=True)
        order = first.gather(1, torch.argsort(flat.gather(1, first), dim=1, stable=True))
    positions = torch.arange(n, device=score.device).expand_as(order).contiguous()
    ranks = torch.zeros_like(order).scatter(1, order, positions)
    return (ranks >= k).reshape(shape)


def n_of_m_keep_mask(score: Tensor, n: int, m: int, axis: int) -> Tensor:
    """Keep-mask with, in every group of ``m`` consecutive elements along ``axis``, the ``n``
    largest ``score`` kept (ties: the lower index is pruned first). ``score.shape[axis]``
    must be a multiple of ``m``."""
    moved = score.movedim(axis, -1)
    groups = moved.reshape(-1, m)
    keep = magnitude_keep_mask(groups, torch.tensor(m - n), batch_dims=1)
    return keep.reshape(moved.shape).movedim(-1, axis).contiguous()


def quantization_angles(w: Tensor, q: Tensor, out_axis: int | None, in_axis: int | None, axis: int) -> Tensor:
    """Mean angle between the latent weight and its quantized version per slice along
    ``axis`` (Guerra et al. 2020): ``θ = arccos(⟨w, q⟩ / (‖w‖·‖q‖))`` per kernel — the
    spatial slice ``w[o, i]`` of a convolution, averaged over the other channel axis — or
    per whole filter/channel for weights without spatial extent (Linear, 1×1 convolution).
    An all-zero kernel has angle π/2."""
    w, q = w.double(), q.double()
    spatial = tuple([d for d in range(w.dim()) if d not in (out_axis, in_axis)])
    if spatial and math.prod([w.shape[d] for d in spatial]) > 1:
        dot, nw, nq = (w * q).sum(spatial), torch.linalg.vector_norm(w, dim=spatial), torch.linalg.vector_norm(q, dim=spatial)
        cos = dot / (nw * nq).clamp_min(torch.finfo(torch.float64).tiny)
        theta = torch.arccos(cos.clamp(-1.0, 1.0))  # (out, in) after the spatial reduction
        other = in_axis if axis == out_axis else out_axis
        kept_axes = sorted((out_axis, in_axis))
        return theta.mean(dim=kept_axes.index(other))
    dims = tuple([d for d in range(w.dim()) if d != axis])
    dot, nw, nq = (w * q).sum(dims), torch.linalg.vector_norm(w, dim=dims), torch.linalg.vector_norm(q, dim=dims)
    cos = dot / (nw * nq).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.arccos(cos.clamp(-1.0, 1.0))
