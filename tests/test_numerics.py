"""Tests of fxqp.ops.numerics: every function against its formula, computed independently.

Expected values are either worked out by hand (small tensors whose scales are powers of two
or otherwise exact) or computed with plain Python arithmetic from the documented formulas —
never by calling the function under test.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxqp.ops.numerics import (
    affine_qparams,
    agp_sparsity,
    fake_quantize_affine,
    fake_quantize_lsq,
    fake_quantize_sign,
    fake_quantize_symmetric,
    grad_scale,
    magnitude_keep_mask,
    prune_count,
    reduce_dims,
    round_ste,
    ste,
    symmetric_scale,
)

F64 = torch.float64


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------

# float32-representable values, stored in float64 tensors so that the checks below can use
# tight tolerances; ties and zeros are deliberately frequent.
_values = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.5, 2.0]),
)


@st.composite
def matrices(draw, max_rows: int = 4, max_cols: int = 8) -> torch.Tensor:
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    flat = draw(st.lists(_values, min_size=rows * cols, max_size=rows * cols))
    return t64(flat).reshape(rows, cols)


# ---------------------------------------------------------------------------------------
# ste / helpers
# ---------------------------------------------------------------------------------------


def test_ste_forward_is_bit_identical_to_q():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, requires_grad=True)
    q = torch.randn(5, 7, generator=gen) * 3.7
    inside = torch.rand(5, 7, generator=gen) > 0.5
    assert torch.equal(ste(x, q), q)
    assert torch.equal(ste(x, q, inside), q)


def test_ste_gradient_is_identity_or_mask():
    x = torch.tensor([0.3, -2.0, 5.0], requires_grad=True)
    q = torch.tensor([1.0, 2.0, 3.0])
    ste(x, q).backward(torch.tensor([2.0, 3.0, 4.0]))
    assert torch.equal(x.grad, torch.tensor([2.0, 3.0, 4.0]))
    x.grad = None
    ste(x, q, torch.tensor([True, False, True])).backward(torch.tensor([2.0, 3.0, 4.0]))
    assert torch.equal(x.grad, torch.tensor([2.0, 0.0, 4.0]))


def test_round_ste_and_grad_scale():
    x = torch.tensor([0.4, 1.6, -2.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 2.0, -3.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))

    s = torch.tensor(1.5, requires_grad=True)
    v = grad_scale(s, 0.25)
    assert v.item() == 1.5
    (v * 2.0).backward()
    assert s.grad.item() == pytest.approx(0.5)


def test_reduce_dims():
    assert tuple(reduce_dims(4, 0)) == (1, 2, 3)
    assert tuple(reduce_dims(4, 1)) == (0, 2, 3)
    assert tuple(reduce_dims(4, -1)) == (0, 1, 2)
    assert tuple(reduce_dims(3, None)) == (0, 1, 2)


# ---------------------------------------------------------------------------------------
# Symmetric
# ---------------------------------------------------------------------------------------

X23 = [[0.4, -3.0, 1.7], [1.5, -0.2, 0.7]]


def test_symmetric_scale_hand_computed():
    x = t64(X23)
    # bits=3: qmax = 3; row maxima 3.0 and 1.5
    assert torch.allclose(symmetric_scale(x, 3, 0), t64([[1.0], [0.5]]))
    # bits=2: qmax = 1
    assert torch.allclose(symmetric_scale(x, 2, 0), t64([[3.0], [1.5]]))
    # per tensor: one scale, keepdim shape
    s = symmetric_scale(x, 3, None)
    assert s.shape == (1, 1) and s.item() == pytest.approx(1.0)
    # column-wise channels (axis 1): maxima 1.5, 3.0, 1.7
    assert torch.allclose(symmetric_scale(x, 3, 1), t64([[0.5, 1.0, 1.7 / 3]]))


def test_symmetric_scale_zero_channel_is_positive():
    s = symmetric_scale(torch.zeros(2, 3), 4, 0)
    assert torch.all(s > 0)
    q = fake_quantize_symmetric(torch.zeros(2, 3), s, 4)
    assert torch.equal(q, torch.zeros(2, 3))


def test_fake_quantize_symmetric_bits3_hand_computed():
    x = t64(X23)
    # row 0: s = 1   -> round(0.4, -3, 1.7) = (0, -3, 2)
    # row 1: s = 0.5 -> round(3, -0.4, 1.4) = (3, 0, 1) -> (1.5, 0, 0.5)
    q = fake_quantize_symmetric(x, t64([[1.0], [0.5]]), 3)
    assert torch.allclose(q, t64([[0.0, -3.0, 2.0], [1.5, 0.0, 0.5]]), atol=1e-12)


def test_fake_quantize_symmetric_bits2_hand_computed():
    x = t64(X23)
    # bits=2, grid {-1, 0, 1}; row 0: s = 3 -> x/s = (.133, -1, .567) -> (0, -1, 1)
    # row 1: s = 1.5 -> x/s = (1, -.133, .467) -> (1, 0, 0)
    q = fake_quantize_symmetric(x, t64([[3.0], [1.5]]), 2)
    assert torch.allclose(q, t64([[0.0, -3.0, 3.0], [1.5, 0.0, 0.0]]), atol=1e-12)


def test_fake_quantize_symmetric_per_tensor_hand_computed():
    x = t64(X23)
    # bits=3, per tensor: s = 3/3 = 1 -> round(x), 1.5 -> 2 (half to even), clamp to ±3
    q = fake_quantize_symmetric(x, symmetric_scale(x, 3, None), 3)
    assert torch.allclose(q, t64([[0.0, -3.0, 2.0], [2.0, 0.0, 1.0]]), atol=1e-12)


def test_fake_quantize_symmetric_gradient_is_clipped():
    # bits=3, s=0.5, grid ±3 steps = ±1.5. "inside" is round(x/s) in [-3, 3].
    x = torch.tensor([0.2, 1.4, 1.7, 1.8, -2.0, 5.0, -1.6], requires_grad=True)
    q = fake_quantize_symmetric(x, torch.tensor(0.5), 3)
    # x/s = 0.4, 2.8, 3.4, 3.6, -4, 10, -3.2 -> round 0, 3, 3, 4, -4, 10, -3
    assert torch.allclose(q, torch.tensor([0.0, 1.5, 1.5, 1.5, -1.5, 1.5, -1.5]))
    q.backward(torch.full((7,), 2.0))
    assert torch.equal(x.grad, torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 2.0]))


@given(x=matrices(), bits=st.integers(2, 16), per_channel=st.booleans())
def test_fake_quantize_symmetric_properties(x, bits, per_channel):
    qmax = 2 ** (bits - 1) - 1
    axis = 0 if per_channel else None
    # the scale, computed here from the formula
    if per_channel:
        amax = t64([max(abs(v) for v in row) for row in x.tolist()]).reshape(-1, 1)
    else:
        amax = x.abs().max().reshape(1, 1)
    s = (amax / qmax).clamp_min(torch.finfo(torch.float32).eps)
    assert torch.allclose(symmetric_scale(x, bits, axis), s, rtol=1e-12, atol=0)

    q = fake_quantize_symmetric(x, s, bits)
    assert q.shape == x.shape and q.dtype == x.dtype
    codes = q / s
    assert torch.allclose(codes, codes.round(), atol=1e-6)
    codes = codes.round()
    assert codes.abs().max().item() <= qmax
    for row in codes.tolist() if per_channel else [codes.flatten().tolist()]:
        assert len(set(row)) <= 2**bits - 1
    # no clipping: every value is within half a step of its code
    err = (q - x).abs()
    assert torch.all(err <= s / 2 * (1 + 1e-9) + 1e-300)


# ---------------------------------------------------------------------------------------
# Affine
# ---------------------------------------------------------------------------------------


def test_affine_qparams_signed_range():
    # lo=-1, hi=2.5, bits=3: s = 3.5/7 = 0.5, z = round(1/0.5) = 2
    s, z = affine_qparams(t64(-1.0), t64(2.5), 3)
    assert s.item() == pytest.approx(0.5) and z.item() == 2.0


def test_affine_qparams_unsigned_range_has_zero_point_0():
    # lo=0.5 >= 0: range widened to [0, 3], bits=2: s = 1, z = 0
    s, z = affine_qparams(t64(0.5), t64(3.0), 2)
    assert s.item() == pytest.approx(1.0) and z.item() == 0.0
    # lo=hi=0 still gives a positive scale
    s0, z0 = affine_qparams(t64(0.0), t64(0.0), 4)
    assert s0.item() > 0 and z0.item() == 0.0


def test_affine_qparams_nonpositive_range():
    # lo=-3, hi=-1: widened to [-3, 0], bits=2: s = 1, z = 3
    s, z = affine_qparams(t64(-3.0), t64(-1.0), 2)
    assert s.item() == pytest.approx(1.0) and z.item() == 3.0


def test_fake_quantize_affine_signed_hand_computed():
    x = t64([-1.2, -0.3, 0.0, 0.8, 2.5, 3.1, -1.6])
    # s=0.5, z=2, grid codes 0..7: x/s = -2.4, -0.6, 0, 1.6, 5, 6.2, -3.2
    # round + z = 0, 1, 2, 4, 7, 8, -1 -> clamp 0, 1, 2, 4, 7, 7, 0 -> (c - z)·s
    q = fake_quantize_affine(x, t64(0.5), t64(2.0), 3)
    assert torch.allclose(q, t64([-1.0, -0.5, 0.0, 1.0, 2.5, 2.5, -1.0]), atol=1e-12)


def test_fake_quantize_affine_unsigned_hand_computed():
    x = t64([0.2, 1.4, 2.6, 3.7, -0.3, -0.7])
    # s=1, z=0, codes 0..3: round = 0, 1, 3, 4, -0, -1 -> clamp 0, 1, 3, 3, 0, 0
    q = fake_quantize_affine(x, t64(1.0), t64(0.0), 2)
    assert torch.allclose(q, t64([0.0, 1.0, 3.0, 3.0, 0.0, 0.0]), atol=1e-12)


def test_fake_quantize_affine_gradient_zero_outside_range():
    x = torch.tensor([-1.2, -0.3, 0.0, 0.8, 2.5, 3.1, -1.6, 10.0], requires_grad=True)
    q = fake_quantize_affine(x, torch.tensor(0.5), torch.tensor(2.0), 3)
    q.backward(torch.full((8,), 3.0))
    # codes before clamping: 0, 1, 2, 4, 7, 8, -1, 22 -> outside for the last three but one
    assert torch.equal(x.grad, torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0]))


@given(x=matrices(), bits=st.integers(2, 16), margin=st.floats(0.0, 3.0))
def test_fake_quantize_affine_properties(x, bits, margin):
    qmax = 2**bits - 1
    lo, hi = x.min(), x.max()
    s, z = affine_qparams(lo, hi, bits)
    # scale and zero point against the formula
    lo_w, hi_w = min(lo.item(), 0.0), max(hi.item(), 0.0)
    s_ref = max((hi_w - lo_w) / qmax, torch.finfo(torch.float32).eps)
    assert s.item() == pytest.approx(s_ref, rel=1e-12)
    assert 0 <= z.item() <= qmax and z.item() == round(z.item())
    if lo.item() >= 0:
        assert z.item() == 0.0

    # 0 is exact
    assert fake_quantize_affine(torch.zeros(3, dtype=F64), s, z, bits).abs().max().item() == 0.0

    # values outside [lo, hi] too: still on the grid
    xs = torch.cat([x.flatten(), t64([lo.item() - margin, hi.item() + margin])])
    q = fake_quantize_affine(xs, s, z, bits)
    codes = q / s + z
    assert torch.allclose(codes, codes.round(), atol=1e-6)
    codes = codes.round()
    assert codes.min().item() >= 0 and codes.max().item() <= qmax
    assert len(set(q.tolist())) <= 2**bits
    # inside the (zero-widened) observed range the error is at most half a step
    qx = fake_quantize_affine(x, s, z, bits)
    assert torch.all((qx - x).abs() <= s / 2 * (1 + 1e-9) + 1e-300)


@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.integers(2, 8),
    per_channel=st.booleans(),
    affine=st.booleans(),
)
def test_float32_fake_quantize_is_bit_identical_to_torch_kernels(seed, bits, per_channel, affine):
    """The float32 path (plain in-place kernels) against torch's fake_quantize_per_*_affine:
    same values and same masked STE gradient, element for element, ties included."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, 5, generator=gen) * 4
    # exact ties: x/s lands on k + 0.5 for some elements
    scale = torch.rand(4, 1, generator=gen) * 0.5 + 0.05 if per_channel else torch.rand((), generator=gen) * 0.5 + 0.05
    x[0] = (
        (torch.arange(20, dtype=torch.float32).view(4, 5) - 10.5) * scale.reshape(-1, 1)
        if per_channel
        else (torch.arange(20.0).view(4, 5) - 10.5) * scale
    )
    x[1] = torch.linspace(-3.0, 3.0, 20).view(4, 5) * 2**bits * scale.reshape(-1, 1)  # past the clamp range
    x.requires_grad_()
    if affine:
        qmin, qmax = 0, 2**bits - 1
        zero_point = torch.randint(0, 2**bits, scale.shape, generator=gen).float()
        q = fake_quantize_affine(x, scale, zero_point, bits)
    else:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        zero_point = torch.zeros_like(scale)
        q = fake_quantize_symmetric(x, scale, bits)
    if per_channel:
        ref = torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zero_point.reshape(-1).int(), 1, qmin, qmax)
    else:
        ref = torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zero_point.reshape(1).int(), qmin, qmax)
    assert torch.equal(q, ref)
    grad = torch.randn(x.shape, generator=gen)
    (g,) = torch.autograd.grad(q, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    assert torch.equal(g, g_ref)
    assert (g[1] == 0).any() and (g[1] != 0).any()  # both sides of the clamp range are exercised


# ---------------------------------------------------------------------------------------
# Sign
# ---------------------------------------------------------------------------------------


def test_fake_quantize_sign_per_channel_hand_computed():
    x = torch.tensor([[0.5, -1.5, 0.0, 2.0], [-0.2, -0.6, 0.4, 0.2]], requires_grad=True)
    q = fake_quantize_sign(x, 0)
    # row 0: mean|x| over the 3 non-zeros = 4/3, the exact zero stays 0; row 1: 1.4/4 = 0.35
    expected = torch.tensor([[4 / 3, -4 / 3, 0.0, 4 / 3], [-0.35, -0.35, 0.35, 0.35]])
    assert torch.allclose(q, expected)
    q.backward(torch.full((2, 4), 5.0))
    # STE masked to |x| <= 1
    assert torch.equal(x.grad, torch.tensor([[5.0, 0.0, 5.0, 0.0], [5.0, 5.0, 5.0, 5.0]]))


def test_fake_quantize_sign_per_tensor_and_other_axis():
    x = torch.tensor([[0.5, -1.5, 0.0, 2.0], [-0.2, -0.6, 0.4, 0.2]])
    alpha = (0.5 + 1.5 + 2.0 + 0.2 + 0.6 + 0.4 + 0.2) / 7  # 7 non-zeros
    q = fake_quantize_sign(x, None)
    signs = torch.tensor([[1.0, -1.0, 0.0, 1.0], [-1.0, -1.0, 1.0, 1.0]])
    assert torch.allclose(q, alpha * signs)
    # channels along axis 1: column means of |x| over the non-zeros
    col = [(0.5 + 0.2) / 2, (1.5 + 0.6) / 2, 0.4, (2.0 + 0.2) / 2]
    q1 = fake_quantize_sign(x, 1)
    assert torch.allclose(q1, signs * torch.tensor(col))


def test_fake_quantize_sign_of_an_all_zero_channel_is_zero():
    x = torch.tensor([[0.0, 0.0], [1.0, -3.0]])
    assert torch.equal(fake_quantize_sign(x, 0), torch.tensor([[0.0, 0.0], [2.0, -2.0]]))


# ---------------------------------------------------------------------------------------
# LSQ
# ---------------------------------------------------------------------------------------


def _lsq_reference(xs, s, qn, qp):
    """Forward value, d/dx and d/ds (before the g scaling) of LSQ, element by element."""
    out, dx, ds = [], [], []
    for x in xs:
        v = x / s
        if v < qn:
            out.append(qn * s), dx.append(0.0), ds.append(qn)
        elif v > qp:
            out.append(qp * s), dx.append(0.0), ds.append(qp)
        else:
            r = round(v)  # Python round is half to even, like torch.round
            out.append(r * s), dx.append(1.0), ds.append(r - v)
    return out, dx, ds


def test_fake_quantize_lsq_value_and_gradients():
    # bits=3 signed: Q_n = -4, Q_p = 3; x/s = 0.6, -1.4, 2.9, -6 (below), 4.4 (above), -3.7
    xs = [0.3, -0.7, 1.45, -3.0, 2.2, -1.85]
    s_val, qn, qp, g = 0.5, -4.0, 3.0, 0.25
    up = [1.0, 2.0, -1.0, 0.5, 3.0, -2.0]
    x = t64(xs).requires_grad_()
    s = t64(s_val).requires_grad_()
    q = fake_quantize_lsq(x, s, qn, qp, g)
    out, dx, ds = _lsq_reference(xs, s_val, qn, qp)
    assert torch.allclose(q, t64(out), atol=1e-12)
    assert out == pytest.approx([0.5, -0.5, 1.5, -2.0, 1.5, -2.0])
    q.backward(t64(up))
    assert torch.allclose(x.grad, t64([u * d for u, d in zip(up, dx)]))
    expected_grad_s = g * sum(u * d for u, d in zip(up, ds))
    assert s.grad.item() == pytest.approx(expected_grad_s, rel=1e-9)
    # per element: the step's gradient of each element on its own
    for i in range(len(xs)):
        xi = t64([xs[i]])
        si = t64(s_val).requires_grad_()
        fake_quantize_lsq(xi, si, qn, qp, g).sum().backward()
        assert si.grad.item() == pytest.approx(g * ds[i], rel=1e-9, abs=1e-12)


def test_fake_quantize_lsq_gradient_on_the_range_boundary():
    # documented: the gradient w.r.t. x is 1 inside the closed range [Q_n·s, Q_p·s]; on the
    # boundary v = x/s is exactly Q_n or Q_p, so the step's "inside" term round(v) - v is 0
    x = t64([1.5, -2.0, 0.0, 0.7]).requires_grad_()
    s = t64(0.5).requires_grad_()
    q = fake_quantize_lsq(x, s, -4.0, 3.0, 1.0)
    assert torch.allclose(q, t64([1.5, -2.0, 0.0, 0.5]))
    q.sum().backward()
    assert torch.equal(x.grad, t64([1.0, 1.0, 1.0, 1.0]))
    assert s.grad.item() == pytest.approx(1 - 1.4)
    # unsigned grid: Q_n = 0, and an exact 0 (a ReLU'd value) is on the lower boundary
    x0 = t64([0.0, 0.2]).requires_grad_()
    fake_quantize_lsq(x0, t64(0.5), torch.tensor(0.0), torch.tensor(15.0), 1.0).sum().backward()
    assert torch.equal(x0.grad, t64([1.0, 1.0]))


def test_fake_quantize_lsq_per_channel_step_and_tensor_bounds():
    # per-channel steps broadcast; Q_n/Q_p given as tensors (as LsqQuantizer does)
    x = t64([[0.3, -2.0, 0.9], [0.3, -2.0, 0.9]]).requires_grad_()
    s = t64([[0.25], [1.0]]).requires_grad_()
    q = fake_quantize_lsq(x, s, torch.tensor(0.0), torch.tensor(3.0), 0.5)
    # unsigned 0..3 grid: row 0: x/s = 1.2, -8, 3.6 -> 1, 0, 3; row 1: 0.3, -2, 0.9 -> 0, 0, 1
    assert torch.allclose(q, t64([[0.25, 0.0, 0.75], [0.0, 0.0, 1.0]]))
    q.sum().backward()
    assert torch.equal(x.grad, t64([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]))
    row0 = 0.5 * ((1 - 1.2) + 0.0 + 3.0)
    row1 = 0.5 * ((0 - 0.3) + 0.0 + (1 - 0.9))
    assert torch.allclose(s.grad, t64([[row0], [row1]]))


# ---------------------------------------------------------------------------------------
# AGP schedule and prune count
# ---------------------------------------------------------------------------------------


def _agp(step, s, start, end):
    step, start = torch.tensor(step), torch.tensor(start)
    return agp_sparsity(step, s, start, None if end is None else torch.tensor(end)).item()


def test_agp_sparsity_ramp_values():
    s, start, end = 0.8, 10, 20
    assert _agp(0, s, start, end) == 0.0
    assert _agp(9, s, start, end) == 0.0
    assert _agp(10, s, start, end) == 0.0  # the ramp begins at 0
    # t=12: frac=0.2 -> 0.8·(1 - 0.8^3) = 0.8·0.488 = 0.3904
    assert _agp(12, s, start, end) == pytest.approx(0.3904, abs=1e-12)
    # t=15: frac=0.5 -> 0.8·0.875 = 0.7
    assert _agp(15, s, start, end) == pytest.approx(0.7, abs=1e-12)
    # t=18: frac=0.8 -> 0.8·(1 - 0.008) = 0.7936
    assert _agp(18, s, start, end) == pytest.approx(0.7936, abs=1e-12)
    assert _agp(20, s, start, end) == pytest.approx(0.8, abs=1e-15)
    assert _agp(1000, s, start, end) == pytest.approx(0.8, abs=1e-15)


def test_agp_sparsity_dtype_and_no_end():
    out = agp_sparsity(torch.tensor(3), 0.5, torch.tensor(3), None)
    assert out.dtype == torch.float64 and out.item() == 0.5
    assert _agp(2, 0.5, 3, None) == 0.0
    assert _agp(3, 0.5, 3, None) == 0.5
    assert _agp(10**6, 0.5, 3, None) == 0.5


@given(
    start=st.integers(0, 1000),
    length=st.integers(1, 1000),
    offset=st.integers(-50, 1100),
    s=st.floats(0.0, 0.99),
)
def test_agp_sparsity_matches_formula(start, length, offset, s):
    end, t = start + length, start + offset
    if t < start:
        expected = 0.0
    elif t >= end:
        expected = s
    else:
        expected = s * (1 - (1 - (t - start) / (end - start)) ** 3)
    assert _agp(t, s, start, end) == pytest.approx(expected, abs=1e-12)


def test_prune_count_rounds_half_to_even():
    assert prune_count(torch.tensor(0.3, dtype=F64), 20).item() == 6
    assert prune_count(torch.tensor(0.25, dtype=F64), 10).item() == 2  # 2.5 -> 2
    assert prune_count(torch.tensor(0.75, dtype=F64), 10).item() == 8  # 7.5 -> 8
    assert prune_count(torch.tensor(0.0, dtype=F64), 10).item() == 0
    assert prune_count(torch.tensor(0.5, dtype=F64), 7).dtype == torch.int64


# ---------------------------------------------------------------------------------------
# magnitude_keep_mask
# ---------------------------------------------------------------------------------------


def _pruned(mask: torch.Tensor) -> list[int]:
    return sorted((~mask).flatten().nonzero().flatten().tolist())


def test_magnitude_keep_mask_ties_by_index():
    score = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0, 1.0])
    assert _pruned(magnitude_keep_mask(score, torch.tensor(2))) == [1, 3]
    assert _pruned(magnitude_keep_mask(score, torch.tensor(4))) == [1, 2, 3, 5]
    assert _pruned(magnitude_keep_mask(score, torch.tensor(0))) == []
    assert _pruned(magnitude_keep_mask(score, torch.tensor(6))) == [0, 1, 2, 3, 4, 5]


def test_magnitude_keep_mask_ties_by_tiebreak_then_index():
    score = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0, 1.0])
    tb = torch.tensor([0.0, 9.0, 0.0, 5.0, 0.0, 1.0])
    assert _pruned(magnitude_keep_mask(score, torch.tensor(2), tiebreak=tb)) == [3, 5]
    assert _pruned(magnitude_keep_mask(score, torch.tensor(1), tiebreak=tb)) == [5]
    # the tiebreak never overrides the score itself
    tb2 = torch.tensor([-100.0, 9.0, -100.0, 5.0, -100.0, 1.0])
    assert _pruned(magnitude_keep_mask(score, torch.tensor(3), tiebreak=tb2)) == [1, 3, 5]
    # ties in the tiebreak too: lower index first
    tb3 = torch.tensor([0.0, 2.0, 0.0, 2.0, 0.0, 2.0])
    assert _pruned(magnitude_keep_mask(score, torch.tensor(2), tiebreak=tb3)) == [1, 3]


def test_magnitude_keep_mask_shape_and_2d():
    score = torch.tensor([[4.0, 0.5, 3.0], [0.1, 2.0, 0.5]])
    mask = magnitude_keep_mask(score, torch.tensor(3))
    assert mask.shape == score.shape and mask.dtype == torch.bool
    # flat order: 0.1 (idx 3), 0.5 (idx 1), 0.5 (idx 5) -> lower index first among the 0.5s
    assert torch.equal(mask, torch.tensor([[True, False, True], [False, True, False]]))


def test_magnitude_keep_mask_batch_dims():
    gen = torch.Generator().manual_seed(1)
    score = torch.rand(4, 3, 5, generator=gen)
    mask = magnitude_keep_mask(score, torch.tensor(6), batch_dims=1)
    assert mask.shape == score.shape
    for b in range(4):
        row = score[b].flatten().tolist()
        expected = sorted(sorted(range(15), key=lambda i: (row[i], i))[:6])
        assert _pruned(mask[b]) == expected


@given(
    data=st.data(),
    n=st.integers(1, 40),
    batch=st.integers(1, 4),
    use_tiebreak=st.booleans(),
    batch_dims=st.sampled_from([0, 1]),
)
def test_magnitude_keep_mask_property(data, n, batch, use_tiebreak, batch_dims):
    # small integer scores force many ties
    total = batch * n
    score = torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=total, max_size=total)), dtype=torch.float32)
    score = score.reshape(batch, n)
    tb = None
    if use_tiebreak:
        tb = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=total, max_size=total)), dtype=torch.float32)
        tb = tb.reshape(batch, n)
    per_row = n if batch_dims else total
    k = data.draw(st.integers(0, per_row))
    mask = magnitude_keep_mask(score, torch.tensor(k), tiebreak=tb, batch_dims=batch_dims)
    assert mask.shape == score.shape

    rows = (
        [(score[b].tolist(), tb[b].tolist() if tb is not None else None) for b in range(batch)]
        if batch_dims
        else [(score.flatten().tolist(), tb.flatten().tolist() if tb is not None else None)]
    )
    masks = [mask[b] for b in range(batch)] if batch_dims else [mask.flatten()]
    for (sc, tbr), m in zip(rows, masks):
        assert int((~m).sum()) == k
        key = (lambda i: (sc[i], tbr[i], i)) if tbr is not None else (lambda i: (sc[i], i))
        expected = sorted(sorted(range(len(sc)), key=key)[:k])
        assert _pruned(m) == expected
