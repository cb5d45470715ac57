"""Dense bit-packing of integer codes and compact encodings of sparsity masks.

Lowering stores every quantized weight as integer codes packed at their exact width and
every pruned weight's sparsity as the smallest of a few mask encodings. This module holds
the pure tensor functions that do it; it knows nothing of models or files.

Encode functions (:func:`pack_bits`, :func:`encode_mask`) run once at save time and may
use anything, but are vectorized (no Python loop over elements). Decode functions
(:func:`unpack_bits`, :func:`decode_mask`, :func:`scatter_nonzeros`) are *export
friendly*: they use only ordinary torch ops (arange, integer arithmetic, bitwise ops,
index_select, scatter, cumsum, cat, where, reshape), never ``.item()``/``.tolist()`` or
data-dependent shapes, and take every size as a plain Python int (metadata stored beside
the payload), so they trace under ``torch.export.export``.

Bit order
---------
A payload is an LSB-first bit stream over ``uint8`` bytes:

* bit ``j`` of code ``i`` (``j = 0`` is the least significant) is stream bit
  ``t = i * bits + j``;
* stream bit ``t`` is bit ``t % 8`` (``0`` = least significant) of byte ``t // 8``;
* the payload has exactly ``ceil(n * bits / 8)`` bytes and the unused high bits of the
  last byte are 0.

Example: ``bits = 3``, codes ``[5, 1, 7]`` = ``0b101, 0b001, 0b111`` give the stream
``1 0 1 | 1 0 0 | 1 1 1`` (stream bits 0..8), i.e. bytes ``[0b11001101, 0b00000001]`` =
``[0xCD, 0x01]``.

Mask encodings
--------------
A mask is the flattened sparsity of one weight: a bool vector of length ``n``, True = kept
(non-zero), with ``nnz`` True entries. :func:`encode_mask` computes the payload size of
every applicable encoding and keeps the smallest (ties go to the earlier kind in
:data:`MASK_KINDS`):

``"full"``       nnz == n; 0 bytes.
``"empty"``      nnz == 0; 0 bytes.
``"bitmask"``    ``pack_bits(mask, 1)``; ``ceil(n / 8)`` bytes.
``"golomb_keep"``  the positions ``p_0 < p_1 < ...`` of the ``count = nnz`` kept
                   elements, Golomb-coded (below).
``"golomb_zero"``  the same for the ``count = n - nnz`` pruned elements (True where kept
                   is then False).

Golomb coding with parameter ``m`` (1..:data:`GOLOMB_MAX_M`): gaps
``g_r = p_r - p_{r-1} - 1`` with ``p_{-1} = -1``; quotient ``q_r = g_r // m``, remainder
``r_r = g_r - q_r m``. With ``b = ceil(log2 m)`` and ``u = 2^b - m``, a remainder ``r < u``
takes ``b - 1`` bits (value ``r``) and any other ``b`` bits (value ``r + u``): the
truncated binary code, so a gap costs ``q + 1 + (b - 1) + [r >= u]`` bits. To decode
without a loop the code is split into three streams, each an LSB-first bit stream (the
order above) zero padded to a whole byte; the payload is their concatenation:

1. unary: per gap ``q_r`` zero bits then one 1 bit; ``unary_bits = count + sum(q_r)`` bits,
   ``ceil(unary_bits / 8)`` bytes;
2. A: per gap ``v_r = r_r if r_r < u else (r_r + u) >> 1`` (the first ``b - 1`` bits of its
   truncated binary code), packed like ``pack_bits`` at width ``max(b - 1, 0)``;
   ``ceil(count * max(b - 1, 0) / 8)`` bytes;
3. B: per gap with ``r_r >= u`` (equivalently ``v_r >= u``), in order, the bit
   ``(r_r + u) & 1``; ``extra_bits`` bits, ``ceil(extra_bits / 8)`` bytes.

Decoding: ``need = v >= u``; ``e = B[cumsum(need) - 1]``; ``r = where(need, 2 v + e - u, v)``.
``m = 1`` (``b = 0``) has no remainders: A and B are empty. ``m = 2^k`` with ``k >= 1``
(``u = 0``) is the Rice code: every gap has ``k - 1`` bits in A and one in B. :func:`encode_mask` tries the
``m`` near the optimum ``M* = ceil(log(2 - p) / -log(1 - p))`` for geometric gaps
(``p = 1 / (mean gap + 1)``), every power of two and ``max gap + 1``, computes each exact
payload size and keeps the smallest (the smallest ``m`` on a tie).

Note that the unary stream for ``m = 1`` is the bitmask truncated after its last one, so a
Golomb encoding is never larger than the bitmask; the bitmask wins ties and is what dense
random masks get.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MASK_KINDS",
    "MAX_PACK_BITS",
    "GOLOMB_MAX_M",
    "MaskCode",
    "pack_bits",
    "unpack_bits",
    "encode_mask",
    "decode_mask",
    "mask_payload_size",
    "mask_encoding_sizes",
    "mask_bound_bits",
    "scatter_nonzeros",
]

#: Mask encodings, in tie-break order (the earlier kind wins a tie in size).
MASK_KINDS = ("full", "empty", "bitmask", "golomb_keep", "golomb_zero")
#: Widest code :func:`pack_bits` accepts.
MAX_PACK_BITS = 16
#: Largest Golomb parameter (stream A is packed at width ceil(log2 m) - 1 <= 23).
GOLOMB_MAX_M = 1 << 24

_GOLOMB_KINDS = ("golomb_keep", "golomb_zero")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------
# Bit packing. The private versions accept widths 0..24 (Golomb stream A needs up to 23
# bits; width 0 is an empty stream); the public ones validate 1..16.
# ---------------------------------------------------------------------------------------


def _pack_bits_any(codes: Tensor, bits: int) -> Tensor:
    """Pack 1-D non-negative ``codes`` (< 2**bits, 0 <= bits <= 24); no validation.

    Code ``i`` starts at stream bit ``s = i * bits``; ``code << (s % 8)`` spans at most
    ``ceil((7 + bits) / 8)`` bytes starting at byte ``s // 8``. Codes never share a bit, so
    adding each of those byte slices into the output (``index_add``) is the same as OR-ing.
    """
    device = codes.device
    n = codes.numel()
    nbytes = _ceil_div(n * bits, 8)
    if nbytes == 0:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    start = torch.arange(n, dtype=torch.int64, device=device) * bits
    byte = start >> 3
    word = codes.to(torch.int64) << (start & 7)
    span = (bits + 14) // 8  # bytes touched by a code at bit offset <= 7
    acc = torch.zeros(nbytes + span, dtype=torch.int64, device=device)
    for j in range(span):  # at most 4 iterations, not a loop over elements
        acc.index_add_(0, byte + j, (word >> (8 * j)) & 0xFF)
    return acc[:nbytes].to(torch.uint8)


def _unpack_bits_any(payload: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`_pack_bits_any` (export friendly; no validation); int32 ``(n,)``.

    For code ``i`` with start bit ``s = i * bits``: gather the ``span`` bytes from
    ``s // 8`` on (the payload padded with ``span`` zero bytes), combine them little-endian
    into one word ``b0 | b1 << 8 | b2 << 16 | ...``, then ``(word >> (s % 8)) & (2^bits - 1)``.
    """
    device = payload.device
    if bits == 0:
        return torch.zeros(n, dtype=torch.int32, device=device)
    span = (bits + 14) // 8
    # 7 + bits <= 24 fits an int32 word; wider Golomb remainders use int64.
    word_dtype = torch.int32 if span <= 3 else torch.int64
    padded = torch.cat([payload, torch.zeros(span, dtype=torch.uint8, device=device)])
    padded = padded.to(word_dtype)
    start = torch.arange(n, dtype=torch.int64, device=device) * bits
    byte = start >> 3
    word = padded.index_select(0, byte)
    for j in range(1, span):  # at most 3 iterations, not a loop over elements
        word = word | (padded.index_select(0, byte + j) << (8 * j))
    shift = (start & 7).to(word_dtype)
    return ((word >> shift) & ((1 << bits) - 1)).to(torch.int32)


def _check_bits(fn: str, bits: Any) -> None:
    if not _is_int(bits) or not 1 <= bits <= MAX_PACK_BITS:
        raise ValueError(f"{fn}: bits must be an int in 1..{MAX_PACK_BITS}, got {bits!r}")


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes densely at ``bits`` bits each (LSB-first, see the module doc).

    Args:
        codes: 1-D integer (or bool) tensor with values in ``[0, 2**bits)``.
        bits: code width, 1..16.

    Returns:
        1-D ``uint8`` tensor of exactly ``ceil(len(codes) * bits / 8)`` bytes, on the
        device of ``codes``; bit ``j`` of code ``i`` is bit ``(i*bits + j) % 8`` of byte
        ``(i*bits + j) // 8``; unused high bits of the last byte are 0.

    Raises:
        ValueError: ``bits`` is not an int in 1..16, ``codes`` is not a 1-D integer
            tensor, or a code is out of range.
    """
    _check_bits("pack_bits", bits)
    if not isinstance(codes, Tensor):
        raise ValueError(f"pack_bits: codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 1:
        raise ValueError(f"pack_bits: codes must be 1-D, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise ValueError(f"pack_bits: codes must have an integer or bool dtype, got {codes.dtype}")
    if codes.numel() > 0 and codes.dtype != torch.bool:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(f"pack_bits: codes must lie in [0, {(1 << bits) - 1}] for bits={bits}, got values in [{lo}, {hi}]")
    return _pack_bits_any(codes, bits)


def unpack_bits(payload: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the ``n`` codes of width ``bits`` in ``payload``.

    Export friendly: every shape comes from the Python ints ``bits`` and ``n``.

    Args:
        payload: 1-D ``uint8`` tensor of exactly ``ceil(n * bits / 8)`` bytes.
        bits: code width, 1..16.
        n: number of codes.

    Returns:
        ``int32`` tensor of shape ``(n,)`` on the device of ``payload``.

    Raises:
        ValueError: bad ``bits``/``n``, or ``payload`` is not 1-D uint8 of that length.
    """
    _check_bits("unpack_bits", bits)
    if not _is_int(n) or n < 0:
        raise ValueError(f"unpack_bits: n must be an int >= 0, got {n!r}")
    _check_payload("unpack_bits", payload, _ceil_div(n * bits, 8))
    return _unpack_bits_any(payload, bits, n)


def _check_payload(fn: str, payload: Any, nbytes: int) -> None:
    if not isinstance(payload, Tensor):
        raise ValueError(f"{fn}: payload must be a torch.Tensor, got {type(payload).__name__}")
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError(f"{fn}: payload must be a 1-D uint8 tensor, got dtype {payload.dtype} shape {tuple(payload.shape)}")
    if payload.shape[0] != nbytes:
        raise ValueError(f"{fn}: payload must have exactly {nbytes} bytes, got {payload.shape[0]}")


# ---------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------


def _golomb_count(kind: str, n: int, nnz: int) -> int:
    """Number of positions a Golomb encoding codes: kept ones, or pruned ones."""
    return nnz if kind == "golomb_keep" else n - nnz


def _golomb_widths(m: int) -> tuple[int, int, int]:
    """``(b, u, width_a)`` of Golomb parameter ``m >= 1``.

    ``b = ceil(log2 m)``, ``u = 2^b - m`` (remainders ``r < u`` take ``b - 1`` bits, the others
    ``b``), ``width_a = max(b - 1, 0)`` (the width of stream A).
    """
    b = (m - 1).bit_length()
    return b, (1 << b) - m, max(b - 1, 0)


def _golomb_nbytes(count: int, m: int, unary_bits: int, extra_bits: int) -> int:
    width_a = _golomb_widths(m)[2]
    return _ceil_div(unary_bits, 8) + _ceil_div(count * width_a, 8) + _ceil_div(extra_bits, 8)


def _implied_nbytes(kind: str, n: int, nnz: int, m: int, unary_bits: int, extra_bits: int) -> int:
    if kind in ("full", "empty"):
        return 0
    if kind == "bitmask":
        return _ceil_div(n, 8)
    return _golomb_nbytes(_golomb_count(kind, n, nnz), m, unary_bits, extra_bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskCode:
    """Metadata of one encoded mask; the payload (``uint8``, ``nbytes`` long) lives beside it.

    All fields are keyword-only plain Python values, validated when built (ValueError whose
    message starts with ``MaskCode.<field>``).

    Attributes:
        kind: one of :data:`MASK_KINDS`.
        n: mask length (number of elements of the weight).
        nnz: number of kept (True) elements.
        m: Golomb parameter (1..:data:`GOLOMB_MAX_M`) for the Golomb kinds; 0 for the others.
        unary_bits: length in bits of the Golomb unary stream (``count + sum(q)``); 0 for
            the non-Golomb kinds.
        extra_bits: length in bits of the Golomb stream B (the number of gaps whose
            remainder takes ``b`` bits: 0 when ``m == 1``, ``count`` when ``m`` is a power of
            two >= 2); 0 for the non-Golomb kinds.
        nbytes: payload size in bytes; must equal the size the other fields imply.
    """

    kind: str
    n: int
    nnz: int
    m: int = 0
    unary_bits: int = 0
    extra_bits: int = 0
    nbytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in MASK_KINDS:
            raise ValueError(f"MaskCode.kind: expected one of {list(MASK_KINDS)}, got {self.kind!r}")
        for name in ("n", "nnz", "m", "unary_bits", "extra_bits", "nbytes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"MaskCode.{name}: expected an int >= 0, got {value!r}")
        n, nnz, kind, m = self.n, self.nnz, self.kind, self.m
        if nnz > n:
            raise ValueError(f"MaskCode.nnz: expected an int in [0, n={n}], got {nnz}")
        if kind == "full" and nnz != n:
            raise ValueError(f"MaskCode.nnz: kind 'full' needs nnz == n == {n}, got {nnz}")
        if kind == "empty" and nnz != 0:
            raise ValueError(f"MaskCode.nnz: kind 'empty' needs nnz == 0, got {nnz}")
        if kind in _GOLOMB_KINDS:
            if not 1 <= m <= GOLOMB_MAX_M:
                raise ValueError(f"MaskCode.m: expected an int in 1..{GOLOMB_MAX_M} for kind {kind!r}, got {m}")
            count = _golomb_count(kind, n, nnz)
            # one terminating 1 bit per position; sum(q) <= sum(gaps) // m <= (n - count) // m
            hi = count + (n - count) // m
            if not count <= self.unary_bits <= hi:
                raise ValueError(
                    f"MaskCode.unary_bits: expected an int in [{count}, {hi}] for kind "
                    f"{kind!r} with n={n}, nnz={nnz}, m={m}, got {self.unary_bits}"
                )
            b, u, _ = _golomb_widths(m)
            # m == 1: no remainder at all; m == 2^b: every remainder takes b bits
            lo, hi = (0, 0) if b == 0 else (count, count) if u == 0 else (0, count)
            if not lo <= self.extra_bits <= hi:
                raise ValueError(
                    f"MaskCode.extra_bits: expected an int in [{lo}, {hi}] for kind {kind!r} "
                    f"with count={count}, m={m}, got {self.extra_bits}"
                )
        else:
            for name in ("m", "unary_bits", "extra_bits"):
                if getattr(self, name) != 0:
                    raise ValueError(f"MaskCode.{name}: must be 0 for kind {kind!r}, got {getattr(self, name)}")
        expected = _implied_nbytes(kind, n, nnz, m, self.unary_bits, self.extra_bits)
        if self.nbytes != expected:
            raise ValueError(f"MaskCode.nbytes: the other fields imply {expected} payload bytes, got {self.nbytes}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MaskCode":
        """Inverse of :meth:`to_dict`; ``m``, ``unary_bits`` and ``extra_bits`` may be omitted
        (then 0, which is only valid for the non-Golomb kinds).

        Raises:
            ValueError: ``d`` is not a mapping, has unknown or missing keys, or a field has
                the wrong type or value; the message names the field (``MaskCode.<field>``).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"MaskCode: expected a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(key) for key in d if key not in names)
        if unknown:
            raise ValueError(f"MaskCode.{unknown[0]}: unknown field; accepted fields are {names}")
        for name in ("kind", "n", "nnz", "nbytes"):
            if name not in d:
                raise ValueError(f"MaskCode.{name}: missing required field")
        return cls(**{name: d[name] for name in names if name in d})


def mask_payload_size(code: MaskCode) -> int:
    """Payload bytes of an encoded mask (equals ``code.nbytes``).

    ``full``/``empty``: 0; ``bitmask``: ``ceil(n/8)``; Golomb:
    ``ceil(unary_bits/8) + ceil(count*max(b-1, 0)/8) + ceil(extra_bits/8)`` with
    ``b = ceil(log2 m)``.
    """
    return _implied_nbytes(code.kind, code.n, code.nnz, code.m, code.unary_bits, code.extra_bits)


def mask_bound_bits(n: int, nnz: int) -> float:
    """Information bound of a mask of length ``n`` with ``nnz`` kept: ``min(n, n*H(nnz/n))``.

    ``H(p) = -p log2 p - (1-p) log2 (1-p)`` is the binary entropy in bits (``H(0) = H(1) = 0``).
    """
    if not _is_int(n) or not _is_int(nnz) or not 0 <= nnz <= n:
        raise ValueError(f"mask_bound_bits: need ints 0 <= nnz <= n, got n={n!r}, nnz={nnz!r}")
    if nnz in (0, n):
        return 0.0
    p = nnz / n
    entropy = -p * math.log2(p) - (1 - p) * math.log2(1 - p)
    return min(float(n), n * entropy)


def _check_mask(fn: str, mask: Any) -> None:
    if not isinstance(mask, Tensor):
        raise ValueError(f"{fn}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError(f"{fn}: mask must be a 1-D bool tensor, got dtype {mask.dtype} shape {tuple(mask.shape)}")


def _gaps(positions: Tensor) -> Tensor:
    """``g_r = p_r - p_{r-1} - 1`` with ``p_{-1} = -1`` (int64)."""
    prev = torch.cat([positions.new_full((1,), -1), positions])[: positions.numel()]
    return positions - prev - 1


#: Half-width cap of the window of Golomb parameters searched around ``M*``.
_WINDOW_HALF_MAX = 4096
#: The candidate sizes are evaluated in blocks of at most this many (m, gap value) pairs.
_SIZE_BLOCK = 1 << 22


def _gap_histogram(gaps: Tensor, max_gap: int) -> tuple[Tensor, Tensor]:
    """Distinct gap values (ascending) and their multiplicities, both int64.

    ``bincount`` when the largest gap is not much larger than the number of gaps, else
    ``unique`` (a sort), so memory stays ``O(count)``. There are at most about
    ``sqrt(2 n)`` distinct gaps, since distinct gaps sum to at most ``n``.
    """
    if max_gap < 4 * gaps.numel() + 1024:
        hist = torch.bincount(gaps)
        values = torch.nonzero(hist).flatten()
        return values, hist.index_select(0, values)
    values, weights = torch.unique(gaps, sorted=True, return_counts=True)
    return values, weights.to(torch.int64)


def _golomb_candidates(mean_gap: float, max_gap: int) -> list[int]:
    """Golomb parameters to try, ascending.

    The integers from ``M*/2`` to ``2 M* + 2`` (at most :data:`_WINDOW_HALF_MAX` either side
    of ``M*``), where ``M* = ceil(log(2 - p) / -log(1 - p))`` with ``p = 1 / (mean_gap + 1)``
    is the optimum for geometric gaps of that mean; every power of two up to
    :data:`GOLOMB_MAX_M` (the Rice codes); and ``max_gap + 1`` (all quotients 0; no larger
    ``m`` codes in fewer bits).
    """
    p = 1.0 / (mean_gap + 1.0)
    if p >= 1.0:
        m_star = 1
    else:
        m_star = math.ceil(math.log(2.0 - p) / -math.log1p(-p))
        m_star = min(max(m_star, 1), GOLOMB_MAX_M)
    lo = max(1, m_star // 2, m_star - _WINDOW_HALF_MAX)
    hi = min(2 * m_star + 2, m_star + _WINDOW_HALF_MAX, GOLOMB_MAX_M)
    ms = set(range(lo, hi + 1))
    ms.update(1 << j for j in range(GOLOMB_MAX_M.bit_length()))
    if max_gap + 1 <= GOLOMB_MAX_M:
        ms.add(max_gap + 1)
    return sorted(ms)


def _golomb_sizes(values: Tensor, weights: Tensor, count: int, ms: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Exact ``(nbytes, unary_bits, extra_bits)`` (int64, one per ``m`` in ``ms``) of the
    Golomb codings of the gaps given as distinct ``values`` with multiplicities ``weights``.

    For each ``m``: ``q = g // m``, ``r = g - q m``; ``unary_bits = count + sum(q)``;
    ``extra_bits = #{r >= u}`` (0 for ``m = 1``). Vectorized as ``(block of m) x values``
    tables, so the cost is ``len(ms) * len(values)``, not a pass over the gaps per ``m``.
    """
    device = values.device
    d = values.view(1, -1)
    w = weights.view(1, -1)
    rows = max(1, _SIZE_BLOCK // max(values.numel(), 1))
    unary_parts, extra_parts = [], []
    for i in range(0, len(ms), rows):  # blocks of candidates, not a loop over elements
        block = ms[i : i + rows]
        m = torch.tensor(block, dtype=torch.int64, device=device).view(-1, 1)
        u = torch.tensor([_golomb_widths(x)[1] for x in block], dtype=torch.int64, device=device)
        q = torch.div(d, m, rounding_mode="floor")
        r = d - q * m
        unary_parts.append(count + (q * w).sum(1))
        extra = ((r >= u.view(-1, 1)) * w).sum(1)
        extra_parts.append(torch.where(m.view(-1) == 1, 0, extra))  # m = 1: no remainder
    unary_bits = torch.cat(unary_parts)
    extra_bits = torch.cat(extra_parts)
    width_a = torch.tensor([_golomb_widths(x)[2] for x in ms], dtype=torch.int64, device=device)
    nbytes = (unary_bits + 7) // 8 + (count * width_a + 7) // 8 + (extra_bits + 7) // 8
    return nbytes, unary_bits, extra_bits


def _best_golomb(gaps: Tensor) -> tuple[int, int, int, int]:
    """``(nbytes, m, unary_bits, extra_bits)`` of the smallest Golomb coding of ``gaps`` over
    the parameters of :func:`_golomb_candidates`; the smallest ``m`` wins ties."""
    count = gaps.numel()
    if count == 0:
        return 0, 1, 0, 0
    max_gap = int(gaps.max())
    values, weights = _gap_histogram(gaps, max_gap)
    mean_gap = int((values * weights).sum()) / count
    ms = _golomb_candidates(mean_gap, max_gap)
    nbytes, unary_bits, extra_bits = _golomb_sizes(values, weights, count, ms)
    i = int(torch.argmin(nbytes))  # the first minimum, i.e. the smallest m
    return int(nbytes[i]), ms[i], int(unary_bits[i]), int(extra_bits[i])


def _candidates(mask: Tensor) -> list[tuple[str, int, int, int, int, Tensor | None]]:
    """Applicable encodings as ``(kind, nbytes, m, unary_bits, extra_bits, gaps)``, in
    MASK_KINDS order."""
    n = mask.numel()
    nnz = int(mask.sum())
    out: list[tuple[str, int, int, int, int, Tensor | None]] = []
    if nnz == n:
        out.append(("full", 0, 0, 0, 0, None))
    if nnz == 0:
        out.append(("empty", 0, 0, 0, 0, None))
    out.append(("bitmask", _ceil_div(n, 8), 0, 0, 0, None))
    for kind, coded in (("golomb_keep", mask), ("golomb_zero", ~mask)):
        gaps = _gaps(torch.nonzero(coded).flatten())
        size, m, unary_bits, extra_bits = _best_golomb(gaps)
        out.append((kind, size, m, unary_bits, extra_bits, gaps))
    return out


def mask_encoding_sizes(mask: Tensor) -> dict[str, int]:
    """Payload bytes of every applicable encoding of ``mask`` (Golomb kinds at the best ``m``
    :func:`encode_mask` finds).

    ``full``/``empty`` appear only when they apply. Useful for reports.
    """
    _check_mask("mask_encoding_sizes", mask)
    return {kind: size for kind, size, *_ in _candidates(mask)}


def _golomb_encode(gaps: Tensor, m: int) -> tuple[Tensor, int, int]:
    """Golomb-code ``gaps`` (int64) with parameter ``m``: ``(payload, unary_bits, extra_bits)``.

    ``q = g // m``, ``r = g - q m``. Unary stream: ``q`` zeros then a one per gap (the ones at
    ``cumsum(q + 1) - 1``). For ``b = ceil(log2 m) >= 1``, ``u = 2^b - m``: stream A packs
    ``v = r if r < u else (r + u) >> 1`` at width ``b - 1``; stream B packs ``(r + u) & 1``
    of the gaps with ``r >= u``, in order. Each stream is zero padded to a byte.
    """
    b, u, width_a = _golomb_widths(m)
    q = torch.div(gaps, m, rounding_mode="floor")
    r = gaps - q * m
    unary_bits = gaps.numel() + int(q.sum())
    stream = torch.zeros(unary_bits, dtype=torch.bool, device=gaps.device)
    stream[torch.cumsum(q + 1, 0) - 1] = True
    parts = [_pack_bits_any(stream, 1)]
    extra_bits = 0
    if b > 0:
        need = r >= u
        v = torch.where(need, (r + u) >> 1, r)
        extra = ((r + u) & 1)[need]
        extra_bits = extra.numel()
        parts += [_pack_bits_any(v, width_a), _pack_bits_any(extra, 1)]
    return torch.cat(parts), unary_bits, extra_bits


def encode_mask(mask: Tensor) -> tuple[MaskCode, Tensor]:
    """Encode a 1-D bool mask with the smallest applicable encoding (see the module doc).

    Ties go to the earlier kind in :data:`MASK_KINDS` (so ``n == 0`` is ``"full"``, and the
    bitmask beats a Golomb coding of equal size); within a Golomb kind the smallest ``m``
    among those tried wins.

    Returns:
        ``(code, payload)``: the metadata and a 1-D ``uint8`` payload of ``code.nbytes``
        bytes on the device of ``mask``.
    """
    _check_mask("encode_mask", mask)
    n = mask.numel()
    nnz = int(mask.sum())
    candidates = _candidates(mask)
    kind, nbytes, m, unary_bits, extra_bits, gaps = min(candidates, key=lambda c: c[1])
    code = MaskCode(kind=kind, n=n, nnz=nnz, m=m, unary_bits=unary_bits, extra_bits=extra_bits, nbytes=nbytes)
    if kind in ("full", "empty"):
        payload = torch.zeros(0, dtype=torch.uint8, device=mask.device)
    elif kind == "bitmask":
        payload = _pack_bits_any(mask, 1)
    else:
        assert gaps is not None
        payload, unary_check, extra_check = _golomb_encode(gaps, m)
        assert (unary_check, extra_check) == (unary_bits, extra_bits)
    assert payload.numel() == code.nbytes
    return code, payload


def _golomb_decode_positions(payload: Tensor, count: int, m: int, unary_bits: int, extra_bits: int) -> Tensor:
    """Positions (int64, ``(count,)``) of a Golomb-coded set; export friendly.

    Quotients: ``t`` = unary bits; ``ranks = cumsum(t) - 1``; scatter each bit index into
    slot ``ranks[i]`` when ``t[i] == 1`` (else into the dump slot ``count``) to get ``o_r``,
    the index of the r-th one bit; ``q_r = o_r - o_{r-1} - 1`` (``o_{-1} = -1``).
    Remainders (``b >= 1``): ``v`` from stream A; ``need = v >= u``;
    ``e = B[cumsum(need) - 1]`` (clamped; B padded with one 0 bit);
    ``r = where(need, 2 v + e - u, v)``. Then ``g = q m + r`` and ``p = cumsum(g + 1) - 1``.
    """
    device = payload.device
    b, u, width_a = _golomb_widths(m)
    unary_bytes = _ceil_div(unary_bits, 8)
    a_end = unary_bytes + _ceil_div(count * width_a, 8)
    t = _unpack_bits_any(payload[:unary_bytes], 1, unary_bits)
    ranks = torch.cumsum(t, 0, dtype=torch.int64) - 1
    # A corrupt payload with too many one bits must not index out of bounds.
    slot = torch.where((t == 1) & (ranks < count), ranks, count)
    bit_index = torch.arange(unary_bits, dtype=torch.int64, device=device)
    ones_at = torch.zeros(count + 1, dtype=torch.int64, device=device).scatter(0, slot, bit_index)
    ones_at = ones_at[:count]
    prev = torch.cat([torch.full((1,), -1, dtype=torch.int64, device=device), ones_at])[:count]
    gaps = (ones_at - prev - 1) * m
    if b > 0:
        v = _unpack_bits_any(payload[unary_bytes:a_end], width_a, count).to(torch.int64)
        extra = _unpack_bits_any(payload[a_end:], 1, extra_bits).to(torch.int64)
        extra = torch.cat([extra, torch.zeros(1, dtype=torch.int64, device=device)])
        need = v >= u
        # Clamping keeps a corrupt payload (more long remainders than B bits) in bounds.
        index = (torch.cumsum(need, 0, dtype=torch.int64) - 1).clamp(0, extra_bits)
        e = extra.index_select(0, index)
        gaps = gaps + torch.where(need, 2 * v + e - u, v)
    return torch.cumsum(gaps + 1, 0) - 1


def decode_mask(code: MaskCode, payload: Tensor) -> Tensor:
    """Inverse of :func:`encode_mask`: the bool mask of shape ``(code.n,)``.

    Export friendly: every shape comes from the fields of ``code``. Golomb positions outside
    ``[0, n)`` (only possible with a corrupt payload) are dropped instead of indexing out of
    bounds.

    Raises:
        ValueError: ``code`` is not a MaskCode, or ``payload`` is not 1-D uint8 of
            ``code.nbytes`` bytes.
    """
    if not isinstance(code, MaskCode):
        raise ValueError(f"decode_mask: code must be a MaskCode, got {type(code).__name__}")
    _check_payload("decode_mask", payload, code.nbytes)
    n, device = code.n, payload.device
    if code.kind == "full":
        return torch.ones(n, dtype=torch.bool, device=device)
    if code.kind == "empty":
        return torch.zeros(n, dtype=torch.bool, device=device)
    if code.kind == "bitmask":
        return _unpack_bits_any(payload, 1, n) != 0
    count = _golomb_count(code.kind, n, code.nnz)
    positions = _golomb_decode_positions(payload, count, code.m, code.unary_bits, code.extra_bits)
    positions = torch.where((positions >= 0) & (positions < n), positions, n)  # dump slot n
    keep = code.kind == "golomb_keep"
    base = torch.full((n + 1,), not keep, dtype=torch.bool, device=device)
    return base.scatter(0, positions, keep)[:n]


# ---------------------------------------------------------------------------------------
# Sparse values
# ---------------------------------------------------------------------------------------


def scatter_nonzeros(values: Tensor, mask: Tensor) -> Tensor:
    """Inverse of ``values = dense[mask]`` for 1-D ``dense``; export friendly.

    ``idx = (cumsum(mask) - 1).clamp_min(0)``; ``dense = where(mask, values[idx], 0)``.
    ``values`` is padded with one zero first so the gather is valid when it is empty.

    Args:
        values: 1-D tensor of the ``mask.sum()`` kept values, in flat order (not checked:
            that would need the data).
        mask: 1-D bool tensor of length ``n``.

    Returns:
        Tensor of shape ``(n,)`` and dtype of ``values``; 0 where ``mask`` is False.
    """
    _check_mask("scatter_nonzeros", mask)
    if not isinstance(values, Tensor) or values.dim() != 1:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"scatter_nonzeros: values must be a 1-D tensor, got {shape}")
    idx = (torch.cumsum(mask, 0, dtype=torch.int64) - 1).clamp_min(0)
    padded = torch.cat([values, values.new_zeros(1)])
    gathered = padded.index_select(0, idx)
    return torch.where(mask, gathered, torch.zeros((), dtype=values.dtype, device=values.device))
