"""Tests of fxqp.lower.packing: bit packing, mask encodings, scatter of non-zeros, export."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxqp.lower.packing import (
    MASK_KINDS,
    MaskCode,
    decode_mask,
    encode_mask,
    mask_bound_bits,
    mask_encoding_sizes,
    mask_payload_size,
    pack_bits,
    scatter_nonzeros,
    unpack_bits,
)


def _random_codes(n: int, bits: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n,), generator=gen, dtype=torch.int64)


def _random_mask(n: int, keep: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen) < keep


# ---------------------------------------------------------------------------------------
# pack_bits / unpack_bits
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_round_trip_every_width(bits):
    top = (1 << bits) - 1
    codes = torch.cat([torch.tensor([0, top, top, 0, top]), _random_codes(997, bits, bits)])
    payload = pack_bits(codes, bits)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == math.ceil(codes.numel() * bits / 8)
    out = unpack_bits(payload, bits, codes.numel())
    assert out.dtype == torch.int32 and out.shape == (codes.numel(),)
    assert torch.equal(out, codes.to(torch.int32))


@given(bits=st.integers(1, 16), n=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip_property(bits, n, seed):
    codes = _random_codes(n, bits, seed)
    payload = pack_bits(codes, bits)
    assert payload.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(payload, bits, n), codes.to(torch.int32))
    used = n * bits % 8
    if used:  # unused high bits of the last byte are zero
        assert int(payload[-1]) >> used == 0


def test_pack_bit_order_by_hand():
    # codes 5, 1, 7 at 3 bits, LSB first: stream bits 0..8 = 1 0 1 | 1 0 0 | 1 1 1
    # byte 0 = bits 0..7 -> 0b1100_1101 = 0xCD; byte 1 = bit 8 -> 0b0000_0001
    payload = pack_bits(torch.tensor([5, 1, 7]), 3)
    assert payload.tolist() == [0xCD, 0x01]
    # 12-bit codes 0xABC, 0x123: stream = 0xABC | 0x123 << 12 = 0x123ABC, little endian
    assert pack_bits(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]
    # single bits: bit i of the stream is bit i % 8 of byte i // 8
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0x81, 0x01]


def test_pack_empty_and_dtypes():
    assert pack_bits(torch.zeros(0, dtype=torch.int64), 7).numel() == 0
    assert unpack_bits(torch.zeros(0, dtype=torch.uint8), 7, 0).shape == (0,)
    assert pack_bits(torch.tensor([True, False, True]), 1).tolist() == [0b101]
    assert pack_bits(torch.tensor([3, 2], dtype=torch.uint8), 2).tolist() == [0b1011]


@pytest.mark.parametrize(
    "codes, bits, match",
    [
        (torch.tensor([0, 8]), 3, r"\[0, 7\]"),
        (torch.tensor([-1, 2]), 3, r"\[0, 7\]"),
        (torch.tensor([0, 1]), 0, "bits"),
        (torch.tensor([0, 1]), 17, "bits"),
        (torch.tensor([0, 1]), True, "bits"),
        (torch.tensor([[0, 1]]), 2, "1-D"),
        (torch.tensor([0.0, 1.0]), 2, "dtype"),
    ],
)
def test_pack_bits_rejects_bad_input(codes, bits, match):
    with pytest.raises(ValueError, match=match):
        pack_bits(codes, bits)


def test_unpack_bits_rejects_bad_input():
    payload = pack_bits(torch.tensor([1, 2, 3]), 4)
    with pytest.raises(ValueError, match="exactly 2 bytes"):
        unpack_bits(payload[:1], 4, 3)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(payload.to(torch.int32), 4, 3)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(payload, 0, 3)
    with pytest.raises(ValueError, match="n must be"):
        unpack_bits(payload, 4, -1)


# ---------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------


def _gaps_independent(positions: list[int]) -> list[int]:
    gaps, prev = [], -1
    for p in positions:
        gaps.append(p - prev - 1)
        prev = p
    return gaps


def _golomb_size_independent(hist: dict[int, int], m: int) -> int:
    """Payload bytes of the Golomb coding with parameter m of the gaps in ``hist`` (gap value ->
    multiplicity), from the textbook definition, in plain Python: per gap q + 1 unary bits,
    b - 1 bits in stream A, and one bit in stream B when the remainder takes b bits."""
    count = sum(hist.values())
    b = 0
    while (1 << b) < m:
        b += 1
    u = (1 << b) - m
    unary = extra = 0
    for g, w in hist.items():
        q, r = divmod(g, m)
        unary += (q + 1) * w
        if b > 0 and r >= u:
            extra += w
    return -(-unary // 8) + -(-(count * max(b - 1, 0)) // 8) + -(-extra // 8)


def _golomb_sizes_independent(positions: list[int]) -> tuple[int, int]:
    """``(true minimum, minimum over the Rice parameters m = 2^k)`` of the Golomb size.

    The true minimum is taken over every m in 1..2 * max_gap + 6 and every power of two up to
    2^24: for m > max_gap + 1 all quotients are 0 and the size in bits no longer decreases,
    so this covers every m that can win (up to byte rounding), and it contains every m the
    encoder tries.
    """
    hist = Counter(_gaps_independent(positions))
    powers = [_golomb_size_independent(hist, 1 << k) for k in range(25)]
    max_gap = max(hist, default=0)
    window = [_golomb_size_independent(hist, m) for m in range(1, 2 * max_gap + 7)]
    return min(powers + window), min(powers)


def _candidate_sizes_independent(mask: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Every applicable kind's ``(true minimum, Rice minimum)`` size (equal for the others)."""
    bits = mask.tolist()
    n, nnz = len(bits), sum(bits)
    sizes = {
        "bitmask": (-(-n // 8),) * 2,
        "golomb_keep": _golomb_sizes_independent([i for i, b in enumerate(bits) if b]),
        "golomb_zero": _golomb_sizes_independent([i for i, b in enumerate(bits) if not b]),
    }
    if nnz == n:
        sizes["full"] = (0, 0)
    if nnz == 0:
        sizes["empty"] = (0, 0)
    return sizes


def _check_mask_round_trip(mask: torch.Tensor) -> MaskCode:
    code, payload = encode_mask(mask)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == code.nbytes == mask_payload_size(code)
    assert code.n == mask.numel() and code.nnz == int(mask.sum())
    out = decode_mask(code, payload)
    assert out.dtype == torch.bool and out.shape == mask.shape
    assert torch.equal(out, mask)
    return code


def _alternating(n: int) -> torch.Tensor:
    return torch.arange(n) % 2 == 0


def _few(n: int, where: list[int], value: bool) -> torch.Tensor:
    mask = torch.full((n,), not value)
    mask[where] = value
    return mask


@pytest.mark.parametrize(
    "mask, kind",
    [
        (torch.ones(100, dtype=torch.bool), "full"),
        (torch.zeros(100, dtype=torch.bool), "empty"),
        (torch.zeros(0, dtype=torch.bool), "full"),
        (torch.tensor([True]), "full"),
        (torch.tensor([False]), "empty"),
        (_alternating(1000), "bitmask"),
        (_alternating(13), "bitmask"),
        (_few(10_000, [0, 17, 5000, 9999], False), "golomb_zero"),
        (_few(10_000, [3, 4, 5, 8000], True), "golomb_keep"),
        (_few(10_000, [9999], True), "golomb_keep"),
        (_few(10_000, [0], False), "golomb_zero"),
        (_few(2**24 + 10, [2**24 + 9], True), "golomb_keep"),  # a gap > GOLOMB_MAX_M
    ],
)
def test_mask_round_trip_hand_made(mask, kind):
    code = _check_mask_round_trip(mask)
    assert code.kind == kind


def _encode_forced(mask: torch.Tensor, kind: str, m: int) -> tuple[MaskCode, torch.Tensor]:
    """Golomb-encode ``mask`` with a forced parameter m (via the private helpers)."""
    from fxqp.lower.packing import _gaps, _golomb_encode

    coded = mask if kind == "golomb_keep" else ~mask
    gaps = _gaps(torch.nonzero(coded).flatten())
    payload, unary_bits, extra_bits = _golomb_encode(gaps, m)
    code = MaskCode(
        kind=kind,
        n=mask.numel(),
        nnz=int(mask.sum()),
        m=m,
        unary_bits=unary_bits,
        extra_bits=extra_bits,
        nbytes=payload.numel(),
    )
    return code, payload


@pytest.mark.parametrize("kind", ["golomb_keep", "golomb_zero"])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 8, 100, 2**20, 2**24 - 3, 2**24])
def test_golomb_decode_with_forced_m(kind, m):
    """Decoding is right for any m, not just the chosen one, and the payload size is the
    independent formula's."""
    mask = _random_mask(3000, 0.03 if kind == "golomb_keep" else 0.97, seed=m % 1000)
    code, payload = _encode_forced(mask, kind, m)
    assert torch.equal(decode_mask(code, payload), mask)
    coded = mask if kind == "golomb_keep" else ~mask
    hist = Counter(_gaps_independent(torch.nonzero(coded).flatten().tolist()))
    assert code.nbytes == _golomb_size_independent(hist, m)
    count = int(coded.sum())
    if m == 1:
        assert code.extra_bits == 0
    elif m & (m - 1) == 0:  # power of two: the Rice code, every remainder has b bits
        assert code.extra_bits == count


@pytest.mark.parametrize(
    "m, gaps, n, payload, unary_bits, extra_bits",
    [
        # m = 3: b = 2, u = 1. q = [0, 0, 0, 1], r = [0, 1, 2, 1].
        # unary: 1 | 1 | 1 | 0 1 -> 0b10111 = 0x17.
        # A (width 1): v = [0, (1+1)>>1, (2+1)>>1, 1] = [0, 1, 1, 1] -> 0b1110 = 0x0E.
        # B: r >= 1 for gaps 1..3: (r + 1) & 1 = [0, 1, 0] -> 0b010 = 0x02.
        (3, [0, 1, 2, 4], 16, [0x17, 0x0E, 0x02], 5, 3),
        # m = 5: b = 3, u = 3. q = [0, 0, 0, 1, 2], r = [0, 3, 4, 2, 2].
        # unary: 1 | 1 | 1 | 0 1 | 0 0 1 -> bits 0..7 = 1 1 1 0 1 0 0 1 = 0x97.
        # A (width 2): v = [0, (3+3)>>1, (4+3)>>1, 2, 2] = [0, 3, 3, 2, 2]
        #   -> 00 11 11 01 | 01 (LSB first) = [0xBC, 0x02].
        # B: r >= 3 for gaps 1, 2: (r + 3) & 1 = [0, 1] -> 0x02.
        (5, [0, 3, 4, 7, 12], 32, [0x97, 0xBC, 0x02, 0x02], 8, 2),
        # m = 2: b = 1, u = 0, A is empty, B holds every remainder r = g & 1.
        # unary: q = [0, 1, 2] -> 1 | 0 1 | 0 0 1 = 0b100101 = 0x25; B = [0, 1, 0] -> 0x02.
        (2, [0, 3, 4], 16, [0x25, 0x02], 6, 3),
        # m = 1: only the unary stream: q = g = [1, 0, 2] -> 0 1 | 1 | 0 0 1 = 0b100110.
        (1, [1, 0, 2], 8, [0x26], 6, 0),
    ],
)
def test_golomb_bit_layout_by_hand(m, gaps, n, payload, unary_bits, extra_bits):
    positions, p = [], -1
    for g in gaps:
        p += g + 1
        positions.append(p)
    mask = _few(n, positions, True)
    code, got = _encode_forced(mask, "golomb_keep", m)
    assert got.tolist() == payload
    assert (code.unary_bits, code.extra_bits, code.nbytes) == (unary_bits, extra_bits, len(payload))
    assert torch.equal(decode_mask(code, got), mask)


def test_golomb_decode_corrupt_payload_stays_in_bounds():
    mask = _random_mask(2000, 0.05, seed=9)
    code, payload = encode_mask(mask)
    assert code.kind == "golomb_keep" and code.extra_bits > 0
    for seed in range(5):
        junk = torch.randint(0, 256, payload.shape, generator=torch.Generator().manual_seed(seed))
        out = decode_mask(code, junk.to(torch.uint8))
        assert out.dtype == torch.bool and out.shape == (2000,)


@given(
    n=st.integers(0, 5000),
    keep=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_mask_property_round_trip_and_smallest(n, keep, seed):
    mask = _random_mask(n, keep, seed)
    code = _check_mask_round_trip(mask)
    candidates = _candidate_sizes_independent(mask)
    sizes = mask_encoding_sizes(mask)
    assert set(sizes) == set(candidates)
    for kind, (true_min, rice_min) in candidates.items():
        # never worse than the best Rice code; close to the best Golomb code
        assert true_min <= sizes[kind] <= min(rice_min, 1.005 * true_min + 8), kind
    assert code.nbytes == min(sizes.values())
    assert code.kind == min(sizes, key=lambda kind: (sizes[kind], MASK_KINDS.index(kind)))
    if code.kind.startswith("golomb"):
        coded = mask if code.kind == "golomb_keep" else ~mask
        hist = Counter(_gaps_independent(torch.nonzero(coded).flatten().tolist()))
        assert code.nbytes == _golomb_size_independent(hist, code.m)


@pytest.mark.parametrize(
    "keep, kind, m_star",
    [
        (0.066, "golomb_keep", 10),
        (0.1, "golomb_keep", 7),
        (0.3, "golomb_keep", 2),
        (0.9, "golomb_zero", 7),
    ],
)
def test_mask_sparse_random_is_near_entropy(keep, kind, m_star):
    n = 200_000
    mask = _random_mask(n, keep, seed=1)
    code = _check_mask_round_trip(mask)
    bound_bytes = mask_bound_bits(n, code.nnz) / 8
    # near the optimum for geometric gaps, M* = ceil(log(2 - p) / -log(1 - p)), with
    # p = min(keep, 1 - keep) the density of the coded positions
    p = min(keep, 1 - keep)
    assert m_star == math.ceil(math.log(2 - p) / -math.log(1 - p))
    assert code.kind == kind and abs(code.m - m_star) <= 1
    assert code.nbytes <= 1.01 * bound_bytes


def test_mask_dense_random_is_bitmask():
    n = 200_000
    code = _check_mask_round_trip(_random_mask(n, 0.5, seed=2))
    assert code.kind == "bitmask" and code.nbytes == n // 8


def test_mask_bound_bits():
    assert mask_bound_bits(0, 0) == 0.0
    assert mask_bound_bits(10, 0) == 0.0 and mask_bound_bits(10, 10) == 0.0
    assert mask_bound_bits(100, 50) == pytest.approx(100.0)
    h = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert mask_bound_bits(1000, 100) == pytest.approx(1000 * h)
    with pytest.raises(ValueError):
        mask_bound_bits(10, 11)


def test_encode_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="bool"):
        encode_mask(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="1-D"):
        encode_mask(torch.ones(2, 2, dtype=torch.bool))


def test_decode_mask_rejects_wrong_payload():
    code, payload = encode_mask(_alternating(100))
    with pytest.raises(ValueError, match="exactly 13 bytes"):
        decode_mask(code, payload[:-1])
    with pytest.raises(ValueError, match="MaskCode"):
        decode_mask(code.to_dict(), payload)


# ---------------------------------------------------------------------------------------
# MaskCode
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask",
    [
        torch.ones(7, dtype=torch.bool),
        torch.zeros(7, dtype=torch.bool),
        _alternating(77),
        _few(5000, [1, 2, 3000], True),
        _few(5000, [1, 2, 3000], False),
    ],
)
def test_mask_code_dict_round_trip(mask):
    import json

    code, _ = encode_mask(mask)
    d = json.loads(json.dumps(code.to_dict()))
    assert set(d) == {"kind", "n", "nnz", "m", "unary_bits", "extra_bits", "nbytes"}
    assert MaskCode.from_dict(d) == code


# m = 1000: b = 10, u = 24; 1 unary byte + ceil(3 * 9 / 8) = 4 A bytes + 1 B byte
_GOOD = {
    "kind": "golomb_keep",
    "n": 5000,
    "nnz": 3,
    "m": 1000,
    "unary_bits": 5,
    "extra_bits": 2,
    "nbytes": 6,
}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"kind": "huffman"}, "kind"),
        ({"kind": "rice_keep"}, "kind"),
        ({"kind": 3}, "kind"),
        ({"n": "5000"}, "n"),
        ({"n": 5000.0}, "n"),
        ({"n": True}, "n"),
        ({"n": -1}, "n"),
        ({"nnz": 5001}, "nnz"),
        ({"m": 0}, "m"),
        ({"m": -1}, "m"),
        ({"m": 2**24 + 1}, "m"),
        ({"m": 1000.0}, "m"),
        ({"unary_bits": 2}, "unary_bits"),  # fewer bits than positions
        ({"unary_bits": 8}, "unary_bits"),  # more than n allows: 3 + 4997 // 1000 = 7
        ({"extra_bits": 4}, "extra_bits"),  # more than positions
        ({"extra_bits": -1}, "extra_bits"),
        ({"m": 1024, "extra_bits": 2}, "extra_bits"),  # a power of two needs count
        ({"m": 1, "extra_bits": 1}, "extra_bits"),  # m = 1 has no remainders
        ({"nbytes": 7}, "nbytes"),
        ({"extra_bits": 0}, "nbytes"),  # stream B is then empty: 5 bytes
        ({"kind": "full"}, "nnz"),
        ({"kind": "empty"}, "nnz"),
        ({"kind": "bitmask"}, "m"),
        ({"kind": "bitmask", "m": 0}, "unary_bits"),
        ({"kind": "bitmask", "m": 0, "unary_bits": 0}, "extra_bits"),
        ({"kind": "bitmask", "m": 0, "unary_bits": 0, "extra_bits": 0}, "nbytes"),
        ({"k": 3}, "k"),  # the old Rice field is unknown
        ({"extra": 1}, "extra"),
    ],
)
def test_mask_code_from_dict_errors(change, field):
    assert MaskCode.from_dict(_GOOD).kind == "golomb_keep"
    with pytest.raises(ValueError, match=rf"MaskCode\.{field}\b"):
        MaskCode.from_dict({**_GOOD, **change})


def test_mask_code_power_of_two_and_one():
    assert MaskCode.from_dict({**_GOOD, "m": 1024, "extra_bits": 3}).nbytes == 6
    # m = 1: 5 unary bits, no remainder streams
    assert MaskCode.from_dict({**_GOOD, "m": 1, "extra_bits": 0, "nbytes": 1}).m == 1
    # m = 2: stream A is empty, B has one bit per position
    assert MaskCode.from_dict({**_GOOD, "m": 2, "extra_bits": 3, "nbytes": 2}).m == 2


def test_mask_code_from_dict_missing_and_not_a_dict():
    for name in ("kind", "n", "nnz", "nbytes"):
        d = dict(_GOOD)
        del d[name]
        with pytest.raises(ValueError, match=rf"MaskCode\.{name}\b"):
            MaskCode.from_dict(d)
    code = MaskCode.from_dict({"kind": "bitmask", "n": 9, "nnz": 1, "nbytes": 2})
    assert (code.m, code.unary_bits, code.extra_bits) == (0, 0, 0)
    with pytest.raises(ValueError, match="dict"):
        MaskCode.from_dict([("kind", "full")])


def test_mask_kinds_cover_encodings():
    assert MASK_KINDS == ("full", "empty", "bitmask", "golomb_keep", "golomb_zero")


# ---------------------------------------------------------------------------------------
# scatter_nonzeros
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_scatter_nonzeros_round_trip(keep, dtype):
    n = 2000
    mask = _random_mask(n, keep, seed=int(keep * 100))
    dense = torch.randint(1, 100, (n,), generator=torch.Generator().manual_seed(0)).to(dtype)
    dense = torch.where(mask, dense, torch.zeros((), dtype=dtype))
    values = dense[mask]
    out = scatter_nonzeros(values, mask)
    assert out.dtype == dtype
    assert torch.equal(out, dense)


def test_scatter_nonzeros_edges():
    assert scatter_nonzeros(torch.zeros(0), torch.zeros(0, dtype=torch.bool)).shape == (0,)
    out = scatter_nonzeros(torch.zeros(0), torch.zeros(5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(5))
    with pytest.raises(ValueError, match="bool"):
        scatter_nonzeros(torch.ones(2), torch.ones(2))


# ---------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------


class _Decoder(torch.nn.Module):
    """Decodes 5-bit codes of the kept elements and a Golomb-coded mask from buffers."""

    def __init__(self, codes_payload, n_codes, mask_code, mask_payload, bitmask_code, bitmask_payload):
        super().__init__()
        self.n_codes = n_codes
        self.mask_code = mask_code
        self.bitmask_code = bitmask_code
        self.register_buffer("codes_payload", codes_payload)
        self.register_buffer("mask_payload", mask_payload)
        self.register_buffer("bitmask_payload", bitmask_payload)

    def forward(self):
        codes = unpack_bits(self.codes_payload, 5, self.n_codes)
        mask = decode_mask(self.mask_code, self.mask_payload)
        dense = scatter_nonzeros(codes, mask)
        return dense, mask, decode_mask(self.bitmask_code, self.bitmask_payload)


@pytest.mark.parametrize("golomb_kind, keep", [("golomb_keep", 0.05), ("golomb_zero", 0.95)])
def test_decode_under_torch_export(golomb_kind, keep):
    mask = _random_mask(3000, keep, seed=3)
    code, payload = encode_mask(mask)
    assert code.kind == golomb_kind
    codes = _random_codes(int(mask.sum()), 5, seed=4)
    dense_mask = _alternating(301)
    bitmask_code, bitmask_payload = encode_mask(dense_mask)
    assert bitmask_code.kind == "bitmask"
    module = _Decoder(pack_bits(codes, 5), codes.numel(), code, payload, bitmask_code, bitmask_payload)

    eager = module()
    ep = torch.export.export(module, ())
    exported = ep.module()()
    for a, b in zip(eager, exported):
        assert torch.equal(a, b)
    dense, got_mask, got_bitmask = exported
    assert torch.equal(got_mask, mask) and torch.equal(got_bitmask, dense_mask)
    assert torch.equal(dense[mask], codes.to(torch.int32))
    assert not dense[~mask].any()


class _MaskDecoder(torch.nn.Module):
    def __init__(self, code, payload):
        super().__init__()
        self.code = code
        self.register_buffer("payload", payload)

    def forward(self):
        return decode_mask(self.code, self.payload)


@pytest.mark.parametrize("m", [1, 2, 3, 8, 2**20])
def test_forced_m_decode_under_torch_export(m):
    """Every stream shape (no remainder, empty A, truncated binary, Rice, wide A) exports."""
    mask = _random_mask(2000, 0.1, seed=m % 1000)
    code, payload = _encode_forced(mask, "golomb_keep", m)
    exported = torch.export.export(_MaskDecoder(code, payload), ()).module()()
    assert torch.equal(exported, mask)


# ---------------------------------------------------------------------------------------
# Size sanity (no timing assertion)
# ---------------------------------------------------------------------------------------


def test_large_encode_decode_finishes():
    n = 2_400_000
    mask = _random_mask(n, 0.1, seed=5)
    code, payload = encode_mask(mask)
    assert torch.equal(decode_mask(code, payload), mask)
    codes = _random_codes(n, 4, seed=6)
    assert torch.equal(unpack_bits(pack_bits(codes, 4), 4, n), codes.to(torch.int32))
