"""Quantizer modules: the ``Quantize`` op of the spec, for weight and activation sites.

Formulas (``b`` = bits, STE = straight-through gradient, zero outside the clipping range):

* weights, default — symmetric narrow range, per output channel:
  ``s_c = max|w_c| / (2^(b-1) - 1)``, ``Q(w) = clamp(round(w / s_c), -(2^(b-1)-1), 2^(b-1)-1) · s_c``,
  recomputed from the op's input at every forward;
* ``symmetric=False`` — affine per channel from the channel's own min/max (see
  :func:`fxqp.ops.numerics.affine_qparams`);
* ``bits=1`` (weights, symmetric) — ``Q(w) = α_c · sign(w)``, ``α_c`` = mean ``|w_c|`` over the
  channel's non-zero weights (XNOR-Net's mean|w| when nothing is pruned); zeros stay zero; with ``symmetric=False`` and on activations, 1 bit is the 2-level affine grid;
* activations, default — per-tensor affine on ``[min(lo, 0), max(hi, 0)]`` where ``lo``/``hi``
  are exponential moving averages (momentum 0.1) of the batch min/max, updated in training
  mode (before ``start`` too); the grid is unsigned ``0..2^b-1`` when ``lo >= 0``;
* ``learned=True`` — LSQ: ``x_q = round(clamp(x / s, Q_n, Q_p)) · s`` with learned ``s``,
  gradient of ``s`` scaled by ``1 / sqrt(n · Q_p)``; ``s`` starts at ``2·mean|x| / sqrt(Q_p)``.

Activation statistics (the min/max of a batch, LSQ's ``mean|x|``) are folded into the state
at the end of the training forward that saw them, reduced across ranks when training is
distributed (:mod:`fxqp.ops.statistics`): a forward quantizes on the state of the batches
before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fxqp.errors import SiteError
from fxqp.ops import clock, statistics
from fxqp.ops.base import ScheduledOp, compute_dtype
from fxqp.ops.numerics import (
    affine_qparams,
    fake_quantize_affine,
    fake_quantize_lsq,
    fake_quantize_sign,
    fake_quantize_symmetric,
    grad_scale,
    quantize_in_range,
    reduce_dims,
    sign_scale,
    symmetric_scale,
    symmetric_scale_of,
)

__all__ = ["Grid", "WeightQuantizer", "ActivationQuantizer", "LsqQuantizer", "EMA_MOMENTUM", "quant_describe"]

EMA_MOMENTUM = 0.1
"""Momentum of the activation observers' moving averages: ``r ← r + 0.1·(batch - r)``."""


def quant_describe(op: ScheduledOp, scheme: str) -> dict[str, Any]:
    cfg = op.config
    return {"op": f"quantize({cfg.bits}b {scheme})", "bits": cfg.bits, "start": int(cfg.start)}


def check_floating(x: Any, site: str) -> None:
    """Raise :class:`SiteError` unless ``x`` is a floating-point tensor."""
    if not (isinstance(x, Tensor) and x.is_floating_point()):
        kind = type(x).__name__ if not isinstance(x, Tensor) else f"{x.dtype} tensor"
        raise SiteError(
            f"site {site!r}: quantize/prune ops need a floating-point tensor, got {kind}; "
            "leave this node out of the rule (e.g. exclude=[...]), select another node, or pass "
            "example_inputs to fxqp.transform so that it leaves out nodes with non-float values"
        )


@dataclass(frozen=True)
class Grid:
    """The integer grid a weight quantizer maps its input onto, for lowering.

    ``value = (code - zero_point) · scale`` for integer ``code`` in ``[qmin, qmax]``
    (``zero_point`` is 0 unless ``scheme == "affine"``); for ``scheme == "sign"`` the code is
    one bit and ``value = scale · (2·code - 1)``, zeros being kept apart (by the mask).
    ``scale`` (and ``zero_point``) broadcast against the weight, in the compute dtype.
    """

    scheme: str
    bits: int
    qmin: int
    qmax: int
    scale: Tensor
    zero_point: Tensor | None = None


class WeightQuantizer(ScheduledOp):
    """Fake-quantizes a weight: symmetric (default), affine or 1-bit sign; see module doc."""

    quantizes = True

    def __init__(self, config: Any, site: str, channel_axis: int | None):
        super().__init__(config, site)
        self.set_plain(channel_axis=channel_axis, symmetric=True if config.symmetric is None else bool(config.symmetric))

    def grid(self, x: Tensor) -> Grid:
        """The grid this op quantizes ``x`` (in the compute dtype) onto."""
        bits, axis = self.config.bits, self.channel_axis
        if bits == 1 and self.symmetric:
            return Grid("sign", 1, 0, 1, sign_scale(x, axis))
        if self.symmetric:
            qmax = 2 ** (bits - 1) - 1
            return Grid("symmetric", bits, -qmax, qmax, symmetric_scale(x, bits, axis))
        dims = reduce_dims(x.dim(), axis)
        xd = x.detach()
        lo, hi = xd.amin(dim=dims, keepdim=True), xd.amax(dim=dims, keepdim=True)
        scale, zero_point = affine_qparams(lo, hi, bits)
        return Grid("affine", bits, 0, 2**bits - 1, scale, zero_point)

    def quantize(self, x: Tensor) -> Tensor:
        """``Q(x)``."""
        grid = self.grid(x)
        if grid.scheme == "sign":
            return fake_quantize_sign(x, self.channel_axis)
        return quantize_in_range(x, grid.scale, grid.zero_point, grid.qmin, grid.qmax)

    def forward(self, w: Tensor) -> Tensor:
        return clock.select(clock.active(self), lambda: self.quantize(w.to(compute_dtype(w))).to(w.dtype), w)

    @torch.no_grad()
    def encode(self, w: Tensor) -> tuple[Grid, Tensor]:
        """The grid and the integer code of every element of ``w`` (this op's input), computed
        exactly as the forward pass rounds and clamps; for ``sign`` the code is ``w > 0``."""
        x = w.detach().to(compute_dtype(w))
        grid = self.grid(x)
        if grid.scheme == "sign":
            codes = x > 0
        elif grid.scheme == "symmetric":
            codes = torch.clamp(torch.round(x / grid.scale), grid.qmin, grid.qmax)
        else:
            codes = torch.clamp(torch.round(x / grid.scale) + grid.zero_point, grid.qmin, grid.qmax)
        return grid, codes.to(torch.int64)

    def describe(self) -> dict[str, Any]:
        if self.config.bits == 1 and self.symmetric:
            scheme = "sign"
        else:
            scheme = "sym" if self.symmetric else "affine"
        scheme += "/ch" if self.channel_axis is not None else "/tensor"
        return quant_describe(self, scheme)


class ActivationQuantizer(ScheduledOp):
    """Fake-quantizes an activation with a moving-average min/max observer; see module doc.

    Buffers: ``lo``, ``hi`` (the running min and max) and ``observed`` (whether any training
    batch has been folded in; until then the op is the identity, also after ``start``). A
    training batch's min and max are folded at the end of its forward
    (:mod:`fxqp.ops.statistics`): the forward quantizes on the range of the batches before.
    """

    quantizes = True
    observes = True

    def __init__(self, config: Any, site: str):
        super().__init__(config, site)
        self.set_plain(symmetric=bool(config.symmetric))
        self.add_buffers(
            lo=torch.full((), 0.0, dtype=torch.float32), hi=torch.full((), 0.0, dtype=torch.float32), observed=torch.full((), False)
        )
        statistics.add_statistics(self, maxima=2)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Record the batch max and min (training mode; folded at the end of the forward).
        An empty batch records nothing."""
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.detach())
        statistics.record(self, maxima=torch.stack([hi.float(), -lo.float()]))

    @torch.no_grad()
    def fold(self, on: clock.Predicate) -> None:
        """Move the averages towards the recorded batch ``lo`` and ``hi``; the first batch
        sets them."""
        observed = clock.read(self, "observed")
        hi, lo = self.pending_max[0], -self.pending_max[1]
        if isinstance(on, Tensor):  # compiled: both, selected
            statistics.store(self, "lo", torch.where(on, torch.where(observed, torch.lerp(self.lo, lo, EMA_MOMENTUM), lo), self.lo))
            statistics.store(self, "hi", torch.where(on, torch.where(observed, torch.lerp(self.hi, hi, EMA_MOMENTUM), hi), self.hi))
            statistics.store(self, "observed", torch.where(on, True, self.observed))
        elif on:
            statistics.store(self, "lo", torch.lerp(self.lo, lo, EMA_MOMENTUM) if observed else lo)
            statistics.store(self, "hi", torch.lerp(self.hi, hi, EMA_MOMENTUM) if observed else hi.clone())
            if not observed:
                statistics.store(self, "observed", True)

    def quantizing(self) -> clock.Predicate:
        """Whether the forward quantizes: started, and a training batch has been observed."""
        return clock.both(clock.active(self), clock.read(self, "observed"))

    def grid(self) -> tuple[Tensor, Tensor | None, int, int]:
        """Scale, zero point (``None`` when symmetric), ``qmin`` and ``qmax`` of the grid on the
        observed range."""
        bits = self.config.bits
        if self.symmetric:
            qmax = 2 ** (bits - 1) - 1
            return symmetric_scale_of(torch.maximum(self.lo.abs(), self.hi.abs()), bits), None, -qmax, qmax
        scale, zero_point = affine_qparams(self.lo, self.hi, bits)
        return scale, zero_point, 0, 2**bits - 1

    def quantize(self, x: Tensor) -> Tensor:
        scale, zero_point, _, _ = self.grid()
        if zero_point is None:
            return fake_quantize_symmetric(x, scale.to(x.dtype), self.config.bits)
        return fake_quantize_affine(x, scale.to(x.dtype), zero_point.to(x.dtype), self.config.bits)

    def forward(self, x: Tensor) -> Tensor:
        check_floating(x, self.site)
        if self.training:
            self.observe(x)
        return clock.select(self.quantizing(), lambda: self.quantize(x.to(compute_dtype(x))).to(x.dtype), x)

    def describe(self) -> dict[str, Any]:
        return quant_describe(self, "sym/tensor" if self.symmetric else "affine/tensor")


class LsqQuantizer(ScheduledOp):
    """LSQ quantizer with a learned step size ``s`` (a parameter); see module doc.

    Weights: signed grid ``Q_n = -2^(b-1)``, ``Q_p = 2^(b-1) - 1``, one ``s`` per output
    channel (or per tensor), initialised from the weight when the transform runs.
    Activations: one ``s`` per tensor, initialised from the first training batch after
    ``start``: its statistics are committed at the end of its forward
    (:mod:`fxqp.ops.statistics`) into ``initial_scale`` and ``initial_signed`` (``primed``
    is set), and the next training forward sets ``s`` from them before it quantizes (the
    step size is a parameter: changing it after the forward that used it would invalidate
    what autograd saved of it, in compiled graphs); the grid is unsigned (``0..2^b-1``) when that batch has no negative value and
    ``symmetric`` is not ``True``, signed otherwise (stored in the buffer ``signed``).
    """

    quantizes = True

    def __init__(self, config: Any, site: str, weight: Tensor | None = None, channel_axis: int | None = None):
        super().__init__(config, site)
        bits = config.bits
        self.channel_axis = channel_axis
        self.register_buffer("qn_signed", torch.tensor(-(2 ** (bits - 1)), dtype=torch.float32))
        self.register_buffer("qp_signed", torch.tensor(2 ** (bits - 1) - 1, dtype=torch.float32))
        self.register_buffer("qp_unsigned", torch.tensor(2**bits - 1, dtype=torch.float32))
        if weight is not None:
            w = weight.detach().float()
            dims = reduce_dims(w.dim(), channel_axis)
            mean_abs = w.abs().mean(dim=dims, keepdim=True) if dims else w.abs()
            init = (2 * mean_abs / math.sqrt(2 ** (bits - 1) - 1)).clamp_min(1e-8)
            self.scale = nn.Parameter(init.to(weight.device))
            self.register_buffer("initialized", torch.ones((), dtype=torch.bool, device=weight.device))
            self.register_buffer("signed", torch.ones((), dtype=torch.bool, device=weight.device))
            self.is_weight = True
        else:
            self.scale = nn.Parameter(torch.ones(()))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
            self.register_buffer("signed", torch.tensor(bool(config.symmetric), dtype=torch.bool))
            self.register_buffer("primed", torch.zeros((), dtype=torch.bool))
            self.register_buffer("initial_scale", torch.ones(()))
            self.register_buffer("initial_signed", torch.tensor(bool(config.symmetric), dtype=torch.bool))
            self.is_weight = False
            self.observes = True
            statistics.add_statistics(self, maxima=1, sums=2)

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        """Before the forward quantizes: set ``s`` (and the grid's sign) from the values a
        previous forward's commit primed; then, while ``s`` is not set and the op has
        started, record what it starts from: ``-min(x)`` and ``Σ|x|`` with the count of
        ``x`` (:meth:`fold` primes it)."""
        primed = clock.both(clock.read(self, "primed"), clock.negate(clock.read(self, "initialized")))
        if clock.maybe(primed):
            clock.assign(primed, self.scale, lambda: self.initial_scale)
            clock.assign(primed, self.signed, lambda: self.initial_signed)
            clock.assign(primed, self.initialized, lambda: torch.ones_like(self.initialized))
        due = clock.both(clock.active(self), clock.negate(clock.read(self, "initialized")))
        if not clock.maybe(due):
            return
        xd = x.detach().float()
        count = torch.full((), xd.numel(), dtype=torch.float32, device=xd.device)
        statistics.record(self, maxima=-xd.amin().reshape(1), sums=torch.stack([xd.abs().sum(), count]), when=due)

    @torch.no_grad()
    def fold(self, on: clock.Predicate) -> None:
        """Prime ``s = 2·mean|x| / sqrt(Q_p)`` of the recorded batch, signed when it had a
        negative value (or ``symmetric``), for the next training forward to set."""
        signed = self.signed | (self.pending_max[0] > 0)
        qp = torch.where(signed, self.qp_signed, self.qp_unsigned)
        init = (2 * (self.pending_sum[0] / self.pending_sum[1]) / qp.sqrt()).clamp_min(1e-8)
        statistics.store(self, "initial_scale", clock.where(on, init, self.initial_scale))
        statistics.store(self, "initial_signed", clock.where(on, signed, self.initial_signed))
        statistics.store(self, "primed", clock.where(on, True, self.primed) if isinstance(on, Tensor) else bool(on) or bool(self.primed))

    def _bounds(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``Q_n``, ``Q_p`` and LSQ's gradient scale ``g = 1/sqrt(n·Q_p)`` for input ``x``."""
        qn = torch.where(self.signed, self.qn_signed, torch.zeros_like(self.qn_signed))
        qp = torch.where(self.signed, self.qp_signed, self.qp_unsigned)
        # n in LSQ's 1/sqrt(n·Q_p): weights sharing one step size, or features of one sample.
        n = x.numel() // self.scale.numel() if self.is_weight else math.prod(x.shape[1:])
        return qn, qp, torch.rsqrt(qp * n)

    def grid(self, x: Tensor) -> Grid:
        """The grid for input ``x`` (compute dtype): the effective step ``s`` — as the forward
        computes it, with LSQ's gradient scaling — and ``[Q_n, Q_p]``."""
        qn, qp, g = self._bounds(x)
        return Grid("lsq", self.config.bits, int(qn), int(qp), grad_scale(self.scale.to(x.dtype), g))

    def forward(self, x: Tensor) -> Tensor:
        if not self.is_weight:
            check_floating(x, self.site)
            if self.training and x.numel():  # an empty batch changes nothing
                self._initialize(x)
        # Computed in every mode and joined by torch.where (not clock.select): the step size
        # then has a gradient (zero) before the op starts too, eagerly as compiled, which an
        # optimizer with weight decay treats otherwise than no gradient.
        xf = x.to(compute_dtype(x))
        q = fake_quantize_lsq(xf, self.scale.to(xf.dtype), *self._bounds(xf)).to(x.dtype)
        return torch.where(self.active() & self.initialized, q, x)

    @torch.no_grad()
    def encode(self, w: Tensor) -> tuple[Grid, Tensor]:
        """The grid and the integer codes ``round(clamp(w / s, Q_n, Q_p))`` of ``w``."""
        x = w.detach().to(compute_dtype(w))
        grid = self.grid(x)
        v = x / grid.scale
        v = torch.where(v < grid.qmin, float(grid.qmin), torch.where(v > grid.qmax, float(grid.qmax), v))
        return grid, torch.round(v).to(torch.int64)

    def describe(self) -> dict[str, Any]:
        return quant_describe(self, "lsq/ch" if self.channel_axis is not None else "lsq/tensor")
