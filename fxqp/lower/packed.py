"""``PackedWeight``: a weight stored as bit-packed integer codes plus a sparsity encoding.

It is registered as the (only) ``torch.nn.utils.parametrize`` parametrization of the
module's ``weight``, so every module type — Conv, Linear, Embedding, norms — reads its
weight as before. The parametrized "original" is an empty placeholder: the float weight is
not kept. Reading the weight decodes it:

* ``decode="cache"``: decoded once (at construction / load) into a non-persistent buffer;
  fastest forward, float-sized memory.
* ``decode="on_the_fly"``: decoded at every read from the packed buffers with ordinary torch
  ops; packed-sized memory, and what :func:`fxqp.export` puts into the exported graph.

Decoding, for the ``nnz`` kept (non-zero) elements in flat order, with ``c`` the stored
unsigned code and ``code = c + qmin``:

* ``symmetric`` / ``lsq``: ``value = code · scale``
* ``affine``: ``value = (code - zero_point) · scale``
* ``sign``: ``value = scale · (2·c - 1)`` (1 bit per kept weight)
* ``float``: the values themselves (no active quantizer)

then scattered to the kept positions (the mask), zeros elsewhere, computed in the dtype
the training-time quantizer used so that values are bit-identical to the trained model's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fxqp.lower.packing import MaskCode, decode_mask, scatter_nonzeros, unpack_bits

__all__ = ["WeightLayout", "PackedWeight", "DECODE_MODES", "dtype_from_name", "dtype_name"]

DECODE_MODES = ("cache", "on_the_fly")

_FLOAT_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32`` (floating dtypes only); ``KeyError`` otherwise."""
    return _FLOAT_DTYPES[name]


@dataclass(frozen=True)
class WeightLayout:
    """How one weight site is stored (JSON-able metadata; the tensors live in buffers).

    Attributes:
        shape: the weight's shape.
        dtype: the weight's dtype name (``float32``, ``bfloat16``, ...).
        compute_dtype: dtype the values are decoded in before the cast to ``dtype``.
        scheme: ``symmetric``, ``affine``, ``lsq``, ``sign`` or ``float``.
        bits: code width (1..16); the value width for ``float``.
        qmin: smallest code; stored codes are ``code - qmin`` (unsigned).
        channel_axis: axis of the per-channel scale, or ``None`` for one scale.
        mask: the sparsity encoding of the kept (non-zero) elements.
    """

    shape: tuple[int, ...]
    dtype: str
    compute_dtype: str
    scheme: str
    bits: int
    qmin: int
    channel_axis: int | None
    mask: MaskCode

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def scale_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts the stored 1-D scale against the weight."""
        if self.channel_axis is None:
            return ()
        shape = [1] * len(self.shape)
        shape[self.channel_axis] = self.shape[self.channel_axis]
        return tuple(shape)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["mask"] = self.mask.to_dict()
        return d


class PackedWeight(nn.Module):
    """A weight as packed codes; see the module doc for the decoding formulas.

    Buffers: ``codes`` (uint8, ``ceil(nnz·bits/8)`` bytes; for ``float`` the values' raw
    bytes), ``mask`` (uint8, the mask encoding's payload), ``scale`` and, for ``affine``,
    ``zero_point`` (1-D, one per channel, or a scalar).
    """

    def __init__(self, site: str, layout: WeightLayout, tensors: dict[str, Tensor], decode: str = "cache"):
        super().__init__()
        if decode not in DECODE_MODES:
            raise ValueError(f"decode: {decode!r} is not one of {', '.join(DECODE_MODES)}")
        self.site = site
        self.layout = layout
        for name in self.tensor_names(layout):
            self.register_buffer(name, tensors[name])
        self.decode_mode = decode
        self.register_buffer("cached", None, persistent=False)
        if decode == "cache":
            self.cached = self.decode()

    @staticmethod
    def tensor_names(layout: WeightLayout) -> tuple[str, ...]:
        """Names of the buffers a layout needs."""
        if layout.scheme == "float":
            return ("codes", "mask")
        if layout.scheme == "affine":
            return ("codes", "mask", "scale", "zero_point")
        return ("codes", "mask", "scale")

    def set_decode(self, mode: str) -> None:
        """Switch between ``"cache"`` and ``"on_the_fly"`` decoding."""
        if mode not in DECODE_MODES:
            raise ValueError(f"decode: {mode!r} is not one of {', '.join(DECODE_MODES)}")
        self.decode_mode = mode
        self.cached = self.decode() if mode == "cache" else None

    def right_inverse(self, weight: Tensor) -> Tensor:
        # The float weight is not kept: the parametrization's "original" is empty.
        return weight.new_empty(0)

    def forward(self, placeholder: Tensor) -> Tensor:
        if self.decode_mode == "cache":
            return self.cached
        return self.decode()

    def decode(self) -> Tensor:
        """The dense weight, bit-identical to the trained model's frozen weight."""
        layout = self.layout
        nnz = layout.mask.nnz
        keep = decode_mask(layout.mask, self.mask)
        dtype = dtype_from_name(layout.dtype)
        if layout.scheme == "float":
            values = self.codes.view(dtype)
            return scatter_nonzeros(values, keep).view(layout.shape)
        cdtype = dtype_from_name(layout.compute_dtype)
        stored = unpack_bits(self.codes, layout.bits, nnz)
        codes = scatter_nonzeros(stored.to(cdtype), keep).view(layout.shape)
        scale = self.scale.view(layout.scale_shape())
        if layout.scheme == "sign":
            values = torch.where(codes > 0, scale, -scale)
        elif layout.scheme == "affine":
            values = (codes + layout.qmin - self.zero_point.view(layout.scale_shape())) * scale
        else:
            values = (codes + layout.qmin) * scale
        return torch.where(keep.view(layout.shape), values, 0).to(dtype)

    def nbytes(self) -> int:
        """Bytes of the packed representation (codes, mask, scales, zero points)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.tensor_names(self.layout))

    def extra_repr(self) -> str:
        lay = self.layout
        return f"site={self.site!r}, {lay.scheme} {lay.bits}b, shape={list(lay.shape)}, nnz={lay.mask.nnz}, mask={lay.mask.kind}, decode={self.decode_mode}"
