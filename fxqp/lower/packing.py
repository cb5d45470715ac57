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
``"rice_keep"``  the positions ``p_0 < p_1 < ...`` of the ``count = nnz`` kept elements,
                 Rice-coded (below).
``"rice_zero"``  the same for the ``count = n - nnz`` pruned elements (True where kept
                 is then False).

Rice coding with parameter ``k`` (0..:data:`RICE_MAX_K`): gaps ``g_r = p_r - p_{r-1} - 1``
with ``p_{-1} = -1``; quotient ``q_r = g_r >> k`` written in unary (``q_r`` zero bits then
one 1 bit) into a first stream of ``unary_bits = count + sum(q_r)`` bits; remainder
``g_r & (2^k - 1)`` written with ``pack_bits`` at width ``k`` into a second stream. The
payload is ``ceil(unary_bits / 8)`` unary bytes (same LSB-first order, zero padded)
followed by ``ceil(count * k / 8)`` remainder bytes. ``k`` is chosen to minimize that total.

Note that the unary stream for ``k = 0`` is the bitmask truncated after its last one, so a
Rice encoding is never larger than the bitmask; the bitmask wins ties and is what dense
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
    "RICE_MAX_K",
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
MASK_KINDS = ("full", "empty", "bitmask", "rice_keep", "rice_zero")
#: Widest code :func:`pack_bits` accepts.
MAX_PACK_BITS = 16
#: Largest Rice parameter :func:`encode_mask` tries (remainders are packed at width k).
RICE_MAX_K = 24

_RICE_KINDS = ("rice_keep", "rice_zero")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------
# Bit packing. The private versions accept widths 0..RICE_MAX_K (the Rice remainders need
# up to 24 bits; width 0 is an empty stream); the public ones validate 1..16.
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
    # 7 + bits <= 24 fits an int32 word; wider Rice remainders use int64.
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
            raise ValueError(
                f"pack_bits: codes must lie in [0, {(1 << bits) - 1}] for bits={bits}, "
                f"got values in [{lo}, {hi}]"
            )
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
        raise ValueError(
            f"{fn}: payload must be a 1-D uint8 tensor, got dtype {payload.dtype} "
            f"shape {tuple(payload.shape)}"
        )
    if payload.shape[0] != nbytes:
        raise ValueError(f"{fn}: payload must have exactly {nbytes} bytes, got {payload.shape[0]}")


# ---------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------


def _rice_count(kind: str, n: int, nnz: int) -> int:
    """Number of positions a Rice encoding codes: kept ones, or pruned ones."""
    return nnz if kind == "rice_keep" else n - nnz


def _rice_nbytes(count: int, k: int, unary_bits: int) -> int:
    return _ceil_div(unary_bits, 8) + _ceil_div(count * k, 8)


def _implied_nbytes(kind: str, n: int, nnz: int, k: int, unary_bits: int) -> int:
    if kind in ("full", "empty"):
        return 0
    if kind == "bitmask":
        return _ceil_div(n, 8)
    return _rice_nbytes(_rice_count(kind, n, nnz), k, unary_bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskCode:
    """Metadata of one encoded mask; the payload (``uint8``, ``nbytes`` long) lives beside it.

    All fields are keyword-only plain Python values, validated when built (ValueError whose
    message starts with ``MaskCode.<field>``).

    Attributes:
        kind: one of :data:`MASK_KINDS`.
        n: mask length (number of elements of the weight).
        nnz: number of kept (True) elements.
        k: Rice parameter (0..24); 0 for the non-Rice kinds.
        unary_bits: length in bits of the Rice unary stream
            (``count + sum(q)``); 0 for the non-Rice kinds.
        nbytes: payload size in bytes; must equal the size the other fields imply.
    """

    kind: str
    n: int
    nnz: int
    k: int = 0
    unary_bits: int = 0
    nbytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in MASK_KINDS:
            raise ValueError(
                f"MaskCode.kind: expected one of {list(MASK_KINDS)}, got {self.kind!r}"
            )
        for name in ("n", "nnz", "k", "unary_bits", "nbytes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"MaskCode.{name}: expected an int >= 0, got {value!r}")
        n, nnz, kind = self.n, self.nnz, self.kind
        if nnz > n:
            raise ValueError(f"MaskCode.nnz: expected an int in [0, n={n}], got {nnz}")
        if kind == "full" and nnz != n:
            raise ValueError(f"MaskCode.nnz: kind 'full' needs nnz == n == {n}, got {nnz}")
        if kind == "empty" and nnz != 0:
            raise ValueError(f"MaskCode.nnz: kind 'empty' needs nnz == 0, got {nnz}")
        if kind in _RICE_KINDS:
            if self.k > RICE_MAX_K:
                raise ValueError(f"MaskCode.k: expected an int in 0..{RICE_MAX_K}, got {self.k}")
            count = _rice_count(kind, n, nnz)
            # one terminating 1 bit per position; sum(q) <= sum(gaps) >> k <= (n - count) >> k
            hi = count + ((n - count) >> self.k)
            if not count <= self.unary_bits <= hi:
                raise ValueError(
                    f"MaskCode.unary_bits: expected an int in [{count}, {hi}] for kind "
                    f"{kind!r} with n={n}, nnz={nnz}, k={self.k}, got {self.unary_bits}"
                )
        else:
            if self.k != 0:
                raise ValueError(f"MaskCode.k: must be 0 for kind {kind!r}, got {self.k}")
            if self.unary_bits != 0:
                raise ValueError(
                    f"MaskCode.unary_bits: must be 0 for kind {kind!r}, got {self.unary_bits}"
                )
        expected = _implied_nbytes(kind, n, nnz, self.k, self.unary_bits)
        if self.nbytes != expected:
            raise ValueError(
                f"MaskCode.nbytes: the other fields imply {expected} payload bytes, "
                f"got {self.nbytes}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MaskCode":
        """Inverse of :meth:`to_dict`; ``k`` and ``unary_bits`` may be omitted (then 0).

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

    ``full``/``empty``: 0; ``bitmask``: ``ceil(n/8)``; Rice:
    ``ceil(unary_bits/8) + ceil(count*k/8)``.
    """
    return _implied_nbytes(code.kind, code.n, code.nnz, code.k, code.unary_bits)


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
        raise ValueError(
            f"{fn}: mask must be a 1-D bool tensor, got dtype {mask.dtype} "
            f"shape {tuple(mask.shape)}"
        )


def _gaps(positions: Tensor) -> Tensor:
    """``g_r = p_r - p_{r-1} - 1`` with ``p_{-1} = -1`` (int64)."""
    prev = torch.cat([positions.new_full((1,), -1), positions])[: positions.numel()]
    return positions - prev - 1


def _best_rice(gaps: Tensor) -> tuple[int, int, int]:
    """``(nbytes, k, unary_bits)`` of the smallest Rice coding of ``gaps`` over k in 0..24.

    Size for k: ``ceil((count + sum(g >> k)) / 8) + ceil(count * k / 8)``; the smallest k
    wins ties. One vectorized reduction per k.
    """
    count = gaps.numel()
    best: tuple[int, int, int] | None = None
    for k in range(RICE_MAX_K + 1):  # 25 reductions over the gaps, not a loop over elements
        unary_bits = count + int((gaps >> k).sum()) if count else 0
        size = _rice_nbytes(count, k, unary_bits)
        if best is None or size < best[0]:
            best = (size, k, unary_bits)
    assert best is not None
    return best


def _candidates(mask: Tensor) -> list[tuple[str, int, int, int, Tensor | None]]:
    """Applicable encodings as ``(kind, nbytes, k, unary_bits, gaps)``, in MASK_KINDS order."""
    n = mask.numel()
    nnz = int(mask.sum())
    out: list[tuple[str, int, int, int, Tensor | None]] = []
    if nnz == n:
        out.append(("full", 0, 0, 0, None))
    if nnz == 0:
        out.append(("empty", 0, 0, 0, None))
    out.append(("bitmask", _ceil_div(n, 8), 0, 0, None))
    for kind, coded in (("rice_keep", mask), ("rice_zero", ~mask)):
        gaps = _gaps(torch.nonzero(coded).flatten())
        size, k, unary_bits = _best_rice(gaps)
        out.append((kind, size, k, unary_bits, gaps))
    return out


def mask_encoding_sizes(mask: Tensor) -> dict[str, int]:
    """Payload bytes of every applicable encoding of ``mask`` (Rice kinds at their best k).

    ``full``/``empty`` appear only when they apply. Useful for reports.
    """
    _check_mask("mask_encoding_sizes", mask)
    return {kind: size for kind, size, _, _, _ in _candidates(mask)}


def _rice_encode(gaps: Tensor, k: int, unary_bits: int) -> Tensor:
    """Unary stream of ``q = g >> k`` (its 1 bits at ``cumsum(q + 1) - 1``), zero padded to a
    byte, followed by ``pack(g & (2^k - 1), k)``."""
    q = gaps >> k
    stream = torch.zeros(unary_bits, dtype=torch.bool, device=gaps.device)
    stream[torch.cumsum(q + 1, 0) - 1] = True
    remainders = gaps & ((1 << k) - 1)
    return torch.cat([_pack_bits_any(stream, 1), _pack_bits_any(remainders, k)])


def encode_mask(mask: Tensor) -> tuple[MaskCode, Tensor]:
    """Encode a 1-D bool mask with the smallest applicable encoding (see the module doc).

    Ties go to the earlier kind in :data:`MASK_KINDS` (so ``n == 0`` is ``"full"``, and the
    bitmask beats a Rice coding of equal size); within a Rice kind the smallest k wins.

    Returns:
        ``(code, payload)``: the metadata and a 1-D ``uint8`` payload of ``code.nbytes``
        bytes on the device of ``mask``.
    """
    _check_mask("encode_mask", mask)
    n = mask.numel()
    nnz = int(mask.sum())
    candidates = _candidates(mask)
    kind, nbytes, k, unary_bits, gaps = min(candidates, key=lambda c: c[1])  # first minimum
    code = MaskCode(kind=kind, n=n, nnz=nnz, k=k, unary_bits=unary_bits, nbytes=nbytes)
    if kind in ("full", "empty"):
        payload = torch.zeros(0, dtype=torch.uint8, device=mask.device)
    elif kind == "bitmask":
        payload = _pack_bits_any(mask, 1)
    else:
        assert gaps is not None
        payload = _rice_encode(gaps, k, unary_bits)
    assert payload.numel() == code.nbytes
    return code, payload


def _rice_decode_positions(payload: Tensor, count: int, k: int, unary_bits: int, n: int) -> Tensor:
    """Positions (int64, ``(count,)``) of a Rice-coded set; export friendly.

    ``u`` = unary bits; ``ranks = cumsum(u) - 1``; scatter each bit index ``t`` into slot
    ``ranks[t]`` when ``u[t] == 1`` (else into the dump slot ``count``) to get ``t_r``, the
    position of the r-th one bit; ``q_r = t_r - t_{r-1} - 1`` (``t_{-1} = -1``);
    ``g_r = q_r * 2^k + remainder_r``; ``p = cumsum(g + 1) - 1``.
    """
    device = payload.device
    unary_bytes = _ceil_div(unary_bits, 8)
    u = _unpack_bits_any(payload[:unary_bytes], 1, unary_bits)
    ranks = torch.cumsum(u, 0, dtype=torch.int64) - 1
    # A corrupt payload with too many one bits must not index out of bounds.
    slot = torch.where((u == 1) & (ranks < count), ranks, count)
    bit_index = torch.arange(unary_bits, dtype=torch.int64, device=device)
    ones_at = torch.zeros(count + 1, dtype=torch.int64, device=device).scatter(0, slot, bit_index)
    ones_at = ones_at[:count]
    prev = torch.cat([torch.full((1,), -1, dtype=torch.int64, device=device), ones_at])[:count]
    quotients = ones_at - prev - 1
    remainders = _unpack_bits_any(payload[unary_bytes:], k, count).to(torch.int64)
    gaps = (quotients << k) | remainders
    return torch.cumsum(gaps + 1, 0) - 1


def decode_mask(code: MaskCode, payload: Tensor) -> Tensor:
    """Inverse of :func:`encode_mask`: the bool mask of shape ``(code.n,)``.

    Export friendly: every shape comes from the fields of ``code``. Rice positions outside
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
    count = _rice_count(code.kind, n, code.nnz)
    positions = _rice_decode_positions(payload, count, code.k, code.unary_bits, n)
    positions = torch.where((positions >= 0) & (positions < n), positions, n)  # dump slot n
    keep = code.kind == "rice_keep"
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
