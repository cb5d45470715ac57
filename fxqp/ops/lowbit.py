"""Low-precision quantizers selected by ``Quantize(method=...)``: pow2, DoReFa, binary, ternary.

Weights (``L = 2^b − 1``, ``q_max = 2^(b−1) − 1``; "per channel" is per output channel, or
the whole tensor with ``per_channel=False``):

* ``pow2`` — qsparse's "decimal bits" (seed paper 1): ``Q(w) = clamp(round(w·2^d), −q_max,
  q_max) / 2^d`` with the integer ``d`` per channel minimising ``‖Q(w) − w‖²`` among
  ``d0 .. d0 + 4``, ``d0 = floor(log2(q_max / max|w|))`` the largest shift that clips
  nothing (coarser shifts only add rounding error). Rescaling is a bit shift. STE gradient,
  zero for clipped values. Lowered as the ``symmetric`` scheme with ``scale = 2^−d``.
* ``dorefa`` — DoReFa-Net (Zhou et al., 2016): ``w' = tanh(w)/(2·max|tanh(w)|) + 1/2``,
  ``w_q = 2·round(L·w')/L − 1``, computed as ``(round(L·w') − L/2)·(2/L)`` so that lowering
  decodes it bit-identically (``affine`` scheme, zero point ``L/2``). Gradient through
  ``round`` is the identity (the tanh normalisation is differentiated). The grid has no
  zero level, so exact zeros (pruned weights) are kept zero, as for sign quantization.
* ``binary`` — ``sign(w)·α`` with XNOR-Net's ``α = mean|w|`` over the non-zero weights of
  the channel (``scaled=False``: ``α = 1``, BinaryConnect); zeros stay zero; STE gradient
  masked to ``|w| <= 1``. Lowered as 1 bit per non-zero weight.
* ``ternary`` — TWN (Li et al., 2016): ``Δ = 0.7·mean|w|``, ``w_q = α·sign(w)·[|w| > Δ]``,
  ``α = mean_{|w| > Δ} |w|`` (means over the non-zero weights); identity STE gradient.
  Lowered as one sign bit per non-zero weight: the zeros are in the sparsity encoding,
  so a ternary weight costs ``nnz`` bits plus its mask (≤ 2 bits per weight).

Activations:

* ``pow2`` — the moving-average range's largest unclipped shift:
  ``d = floor(log2(q_max / max(|lo|, |hi|)))``, ``Q(x) = clamp(round(x·2^d), −q_max,
  q_max)/2^d`` (torch's fused fake quantization, STE inside the range).
* ``dorefa`` — ``Q(x) = round(L·clip(x, 0, 1))/L``: the affine grid of the fixed range
  [0, 1] (no observer), STE gradient inside [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fxqp.ops.base import compute_dtype
from fxqp.ops.numerics import MIN_SCALE, fake_quantize_sign, fake_quantize_symmetric, reduce_dims, round_ste, sign_scale, ste
from fxqp.ops.quantize import ActivationQuantizer, Grid, WeightQuantizer, quant_describe

__all__ = [
    "Pow2WeightQuantizer",
    "DorefaWeightQuantizer",
    "BinaryWeightQuantizer",
    "TernaryWeightQuantizer",
    "Pow2ActivationQuantizer",
    "DorefaActivationQuantizer",
    "POW2_EXTRA_SHIFTS",
    "TERNARY_THRESHOLD",
]

#: ``pow2`` weights try the largest unclipped shift and this many finer ones.
POW2_EXTRA_SHIFTS = 4

#: TWN's threshold factor: ``Δ = 0.7·mean|w|``.
TERNARY_THRESHOLD = 0.7


class _FixedGridWeightQuantizer(WeightQuantizer):
    """A weight quantizer whose method fixes its grid (``symmetric`` is implied)."""

    method: str = ""

    def __init__(self, config: Any, site: str, channel_axis: int | None):
        super().__init__(config, site, channel_axis)
        self.set_plain(symmetric=True)

    def _dims(self, x: Tensor) -> Any:
        return reduce_dims(x.dim(), self.channel_axis)

    def describe(self) -> dict[str, Any]:
        return quant_describe(self, f"{self.method}/{'ch' if self.channel_axis is not None else 'tensor'}")


class Pow2WeightQuantizer(_FixedGridWeightQuantizer):
    """``pow2`` weights: power-of-two scale chosen by least squares; see module doc."""

    method = "pow2"

    def grid(self, x: Tensor) -> Grid:
        bits = self.config.bits
        qmax = 2 ** (bits - 1) - 1
        xd = x.detach()
        dims = self._dims(xd)
        amax = xd.abs().amax(dim=dims, keepdim=True) if dims else xd.abs()
        d0 = torch.floor(torch.log2(qmax / amax.clamp_min(MIN_SCALE)))
        candidates = d0.unsqueeze(0) + torch.arange(POW2_EXTRA_SHIFTS + 1, dtype=xd.dtype, device=xd.device).view(-1, *([1] * xd.dim()))
        scales = torch.exp2(-candidates)
        q = torch.clamp(torch.round(xd.unsqueeze(0) / scales), -qmax, qmax) * scales
        errors = (q - xd.unsqueeze(0)).pow(2)
        errors = errors.sum(dim=tuple(d + 1 for d in dims), keepdim=True) if dims else errors
        best = errors.argmin(dim=0, keepdim=True)
        scale = torch.gather(scales.expand_as(errors), 0, best).squeeze(0)
        return Grid("symmetric", bits, -qmax, qmax, scale)

    def _values(self, x: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
        t = x / grid.scale
        return torch.clamp(torch.round(t), grid.qmin, grid.qmax), t

    def quantize(self, x: Tensor) -> Tensor:
        grid = self.grid(x)
        codes, t = self._values(x.detach(), grid)
        inside = (t >= grid.qmin - 0.5) & (t <= grid.qmax + 0.5)
        return ste(x, codes * grid.scale, inside)

    @torch.no_grad()
    def encode(self, w: Tensor) -> tuple[Grid, Tensor]:
        x = w.detach().to(compute_dtype(w))
        grid = self.grid(x)
        return grid, self._values(x, grid)[0].to(torch.int64)


class DorefaWeightQuantizer(_FixedGridWeightQuantizer):
    """``dorefa`` weights: tanh-normalised to [0, 1], then ``b`` bits; see module doc."""

    method = "dorefa"

    def _levels(self) -> int:
        return 2**self.config.bits - 1

    def grid(self, x: Tensor) -> Grid:
        levels = self._levels()
        scale = torch.tensor(2.0 / levels, dtype=x.dtype, device=x.device)
        zero_point = torch.tensor(levels / 2.0, dtype=x.dtype, device=x.device)
        return Grid("affine", self.config.bits, 0, levels, scale, zero_point)

    def _normalised(self, x: Tensor) -> Tensor:
        """``L·(tanh(x)/(2·max|tanh(x)|) + 1/2)`` (differentiable)."""
        t = torch.tanh(x)
        dims = self._dims(x)
        peak = t.abs().amax(dim=dims, keepdim=True) if dims else t.abs()
        return (t / (2 * peak.clamp_min(MIN_SCALE)) + 0.5) * self._levels()

    def quantize(self, x: Tensor) -> Tensor:
        grid = self.grid(x)
        q = (round_ste(self._normalised(x)) - grid.zero_point) * grid.scale
        return torch.where(x == 0, torch.zeros_like(q), q)

    @torch.no_grad()
    def encode(self, w: Tensor) -> tuple[Grid, Tensor]:
        x = w.detach().to(compute_dtype(w))
        return self.grid(x), torch.round(self._normalised(x)).to(torch.int64)


class BinaryWeightQuantizer(_FixedGridWeightQuantizer):
    """``binary`` weights: ``sign(w)``, XNOR-Net scaled unless ``scaled=False``; see module doc."""

    method = "binary"

    def __init__(self, config: Any, site: str, channel_axis: int | None):
        super().__init__(config, site, channel_axis)
        self.set_plain(scaled=config.scaled is not False)

    def grid(self, x: Tensor) -> Grid:
        if self.scaled:
            return super().grid(x)  # the uniform 1-bit grid: sign with α = mean|w| of the non-zeros
        return Grid("sign", 1, 0, 1, torch.ones((), dtype=x.dtype, device=x.device))

    def quantize(self, x: Tensor) -> Tensor:
        if self.scaled:
            return fake_quantize_sign(x, self.channel_axis)
        xd = x.detach()
        return ste(x, torch.sign(xd), xd.abs() <= 1)

    def describe(self) -> dict[str, Any]:
        scope = "ch" if self.channel_axis is not None else "tensor"
        return quant_describe(self, f"binary/{scope}" if self.scaled else "binary/unscaled")


class TernaryWeightQuantizer(_FixedGridWeightQuantizer):
    """``ternary`` weights (TWN): ``{−α, 0, +α}`` with ``Δ = 0.7·mean|w|``; see module doc."""

    method = "ternary"

    def _keep_and_scale(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``|x| > Δ`` and ``α``: both means over non-zeros are :func:`sign_scale`."""
        keep = x.abs() > TERNARY_THRESHOLD * sign_scale(x, self.channel_axis)
        return keep, sign_scale(x * keep, self.channel_axis)

    def grid(self, x: Tensor) -> Grid:
        return Grid("sign", 1, 0, 1, self._keep_and_scale(x.detach())[1])

    def quantize(self, x: Tensor) -> Tensor:
        xd = x.detach()
        keep, alpha = self._keep_and_scale(xd)
        q = torch.where(keep, torch.sign(xd) * alpha, torch.zeros_like(xd))
        return ste(x, q)

    @torch.no_grad()
    def encode(self, w: Tensor) -> tuple[Grid, Tensor]:
        x = w.detach().to(compute_dtype(w))
        return self.grid(x), (x > 0).to(torch.int64)


class Pow2ActivationQuantizer(ActivationQuantizer):
    """``pow2`` activations: the largest unclipped power-of-two scale of the moving-average
    range, on the narrow signed grid; see module doc."""

    def __init__(self, config: Any, site: str):
        super().__init__(config, site)
        self.set_plain(symmetric=True)

    def pow2_scale(self) -> Tensor:
        """``2^−d`` with ``d = floor(log2(q_max / max(|lo|, |hi|)))``."""
        qmax = 2 ** (self.config.bits - 1) - 1
        amax = torch.maximum(self.lo.abs(), self.hi.abs()).clamp_min(MIN_SCALE)
        return torch.exp2(-torch.floor(torch.log2(qmax / amax)))

    def quantize(self, x: Tensor) -> Tensor:
        return fake_quantize_symmetric(x, self.pow2_scale().to(x.dtype), self.config.bits)

    def describe(self) -> dict[str, Any]:
        return quant_describe(self, "pow2/tensor")


class DorefaActivationQuantizer(ActivationQuantizer):
    """``dorefa`` activations: ``round(L·clip(x, 0, 1))/L``; the range is fixed, nothing is
    observed (``lo = 0``, ``hi = 1``, ``observed`` is set from the start)."""

    def __init__(self, config: Any, site: str):
        super().__init__(config, site)
        self.set_plain(symmetric=False)
        self.hi.fill_(1.0)
        self.observed.fill_(True)

    def observe(self, x: Tensor) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return quant_describe(self, "dorefa/tensor")
