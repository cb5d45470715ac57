"""Tests of the op modules in fxqp.ops, driven directly with a Schedule (no model transform).

Expected values come from the documented formulas (Quantize / Prune docstrings), computed
in the tests with plain torch or Python arithmetic — never by calling the op itself.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from fxqp.errors import SiteError, SpecError
from fxqp.ops import (
    ActivationPruner,
    ActivationQuantizer,
    LsqQuantizer,
    WeightPruner,
    WeightQuantizer,
    build_op,
    statistics,
)
from fxqp.schedule import Schedule
from fxqp.spec import Prune, Quantize


def bound(op, step: int = 0):
    """Bind ``op`` to a fresh Schedule at ``step``; return (op, schedule). Each forward of
    the op ends with a commit of its batch statistics, as a transformed model's forward
    does (in the schedule's forward)."""
    sched = Schedule()
    op.bind(sched)
    sched.step.fill_(step)
    op.register_forward_hook(_Commit(sched))
    return op, sched


class _Commit:
    """Forward hook: commit the batch statistics (a class: models pickle)."""

    def __init__(self, sched):
        self.sched = sched

    def __call__(self, module, args, output):
        statistics.commit(self.sched.observers, None)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def n_zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def smallest(values: torch.Tensor, k: int) -> set[int]:
    """Flat indices of the ``k`` smallest entries (ties: lower index first)."""
    flat = values.flatten().tolist()
    return set(sorted(range(len(flat)), key=lambda i: (flat[i], i))[:k])


def zero_set(t: torch.Tensor) -> set[int]:
    return set((t.flatten() == 0).nonzero().flatten().tolist())


# ---------------------------------------------------------------------------------------
# Reference formulas (independent of fxqp.ops.numerics)
# ---------------------------------------------------------------------------------------


def ref_symmetric(w: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        s = w.abs().max() / qmax
    else:
        moved = w.movedim(axis, 0)
        amax = moved.reshape(moved.shape[0], -1).abs().max(dim=1).values
        shape = [1] * w.dim()
        shape[axis] = -1
        s = (amax / qmax).reshape(shape)
    return torch.clamp(torch.round(w / s), -qmax, qmax) * s


def ref_affine_per_channel(w: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    qmax = 2**bits - 1
    moved = w.movedim(axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    out = torch.empty_like(rows)
    for c in range(rows.shape[0]):
        lo = min(rows[c].min().item(), 0.0)
        hi = max(rows[c].max().item(), 0.0)
        s = torch.tensor((hi - lo) / qmax, dtype=w.dtype)
        z = torch.round(torch.tensor(-lo, dtype=w.dtype) / s)
        out[c] = (torch.clamp(torch.round(rows[c] / s) + z, 0, qmax) - z) * s
    return out.reshape(moved.shape).movedim(0, axis)


def agp(t: int, s: float, start: int, end: int | None) -> float:
    if t < start:
        return 0.0
    if end is None or t >= end:
        return s
    return s * (1 - (1 - (t - start) / (end - start)) ** 3)


# ---------------------------------------------------------------------------------------
# WeightQuantizer
# ---------------------------------------------------------------------------------------


def test_weight_quantizer_identity_before_start_then_quantized():
    w = randn(4, 6)
    op, sched = bound(WeightQuantizer(Quantize(bits=4, start=5), site="w", channel_axis=0), step=4)
    assert torch.equal(op(w), w)
    sched.step.fill_(5)
    q = op(w)
    assert not torch.equal(q, w)
    assert torch.allclose(q, ref_symmetric(w, 4, 0), atol=1e-6)
    # every channel keeps its max|w| exactly and has at most 2^b - 1 levels
    for c in range(4):
        assert len(set(q[c].tolist())) <= 15
    assert torch.allclose(q.abs().amax(dim=1), w.abs().amax(dim=1))


def test_weight_quantizer_per_channel_vs_per_tensor():
    w = randn(3, 5) * torch.tensor([[0.1], [1.0], [10.0]])
    per_ch, _ = bound(WeightQuantizer(Quantize(bits=3), site="w", channel_axis=0))
    per_t, _ = bound(WeightQuantizer(Quantize(bits=3, per_channel=False), site="w", channel_axis=None))
    q_ch, q_t = per_ch(w), per_t(w)
    assert torch.allclose(q_ch, ref_symmetric(w, 3, 0), atol=1e-6)
    assert torch.allclose(q_t, ref_symmetric(w, 3, None), atol=1e-6)
    # per tensor: one scale, so the small channel collapses to 0; per channel it does not
    assert torch.all(q_t[0] == 0)
    assert n_zeros(q_ch[0]) < 5
    assert len(set(q_t.flatten().tolist())) <= 7


def test_weight_quantizer_conv_transpose_channel_axis_1():
    # ConvTranspose2d weight: (in, out, kh, kw); output channels on axis 1
    w = randn(3, 4, 2, 2) * torch.tensor([1.0, 0.01, 5.0, 0.3]).reshape(1, 4, 1, 1)
    op, _ = bound(WeightQuantizer(Quantize(bits=4), site="w", channel_axis=1))
    q = op(w)
    assert torch.allclose(q, ref_symmetric(w, 4, 1), atol=1e-6)
    assert torch.allclose(q.abs().amax(dim=(0, 2, 3)), w.abs().amax(dim=(0, 2, 3)))
    # axis 0 would give a different answer
    assert not torch.allclose(q, ref_symmetric(w, 4, 0), atol=1e-6)


def test_weight_quantizer_bits1_sign_times_channel_mean():
    w = torch.tensor([[0.5, -1.5, 0.0, 2.0], [-0.2, -0.6, 0.4, 0.2]], requires_grad=True)
    op, _ = bound(WeightQuantizer(Quantize(bits=1), site="w", channel_axis=0))
    q = op(w)
    assert torch.allclose(q, torch.tensor([[4 / 3, -4 / 3, 0.0, 4 / 3], [-0.35, -0.35, 0.35, 0.35]]))
    q.sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))


def test_weight_quantizer_affine_per_channel():
    w = randn(3, 8, seed=3)
    w[2] = w[2].abs() + 0.1  # an all-positive channel: unsigned grid
    op, _ = bound(WeightQuantizer(Quantize(bits=3, symmetric=False), site="w", channel_axis=0))
    q = op(w)
    assert torch.allclose(q, ref_affine_per_channel(w, 3, 0), atol=1e-6)
    for c in range(3):
        assert len(set(q[c].tolist())) <= 8
    # the unsigned channel: codes k·s, k in 0..7, s = max/7
    s = w[2].max() / 7
    k = q[2] / s
    assert torch.allclose(k, k.round(), atol=1e-5)
    assert k.round().min() >= 0 and k.round().max() <= 7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_quantizer_keeps_half_dtype(dtype):
    w = randn(4, 6).to(dtype)
    op, sched = bound(WeightQuantizer(Quantize(bits=4, start=1), site="w", channel_axis=0))
    out = op(w)
    assert out.dtype == dtype and torch.equal(out, w)
    sched.step.fill_(1)
    q = op(w)
    assert q.dtype == dtype
    assert torch.equal(q, ref_symmetric(w.float(), 4, 0).to(dtype))


# ---------------------------------------------------------------------------------------
# ActivationQuantizer
# ---------------------------------------------------------------------------------------


def _batch_with_range(lo: float, hi: float, seed: int) -> torch.Tensor:
    x = rand(2, 3, 4, seed=seed) * (hi - lo) + lo
    x[0, 0, 0], x[1, 2, 3] = lo, hi
    return x


def test_activation_quantizer_ema_observer():
    op, _ = bound(ActivationQuantizer(Quantize(bits=8, start=0), site="a"))
    op(_batch_with_range(-1.0, 2.0, 0))
    assert op.lo.item() == pytest.approx(-1.0) and op.hi.item() == pytest.approx(2.0)  # first batch initialises
    assert bool(op.observed)
    op(_batch_with_range(-3.0, 4.0, 1))
    lo, hi = -1.0 + 0.1 * (-3.0 - -1.0), 2.0 + 0.1 * (4.0 - 2.0)
    assert op.lo.item() == pytest.approx(lo, abs=1e-6) and op.hi.item() == pytest.approx(hi, abs=1e-6)
    op(_batch_with_range(0.5, 1.0, 2))
    lo, hi = lo + 0.1 * (0.5 - lo), hi + 0.1 * (1.0 - hi)
    assert op.lo.item() == pytest.approx(lo, abs=1e-6) and op.hi.item() == pytest.approx(hi, abs=1e-6)
    assert (lo, hi) == pytest.approx((-1.03, 2.08))


def test_activation_quantizer_observes_before_start_and_is_identity():
    op, _ = bound(ActivationQuantizer(Quantize(bits=4, start=100), site="a"), step=3)
    x = _batch_with_range(-1.0, 2.0, 0)
    out = op(x)
    assert torch.equal(out, x)
    assert op.lo.item() == pytest.approx(-1.0) and op.hi.item() == pytest.approx(2.0)
    x2 = _batch_with_range(-2.0, 3.0, 1)
    assert torch.equal(op(x2), x2)
    assert op.lo.item() == pytest.approx(-1.1) and op.hi.item() == pytest.approx(2.1)


def test_activation_quantizer_eval_does_not_update_and_quantizes_from_buffers():
    op, sched = bound(ActivationQuantizer(Quantize(bits=3, start=5), site="a"))
    x = _batch_with_range(-1.0, 2.5, 0)
    op(x)
    op.eval()
    before = (op.lo.clone(), op.hi.clone(), op.observed.clone())
    y = _batch_with_range(-10.0, 10.0, 1)
    assert torch.equal(op(y), y)  # before start: identity
    sched.step.fill_(5)
    q = op(y)
    assert torch.equal(op.lo, before[0]) and torch.equal(op.hi, before[1]) and torch.equal(op.observed, before[2])
    # affine grid from lo=-1, hi=2.5, 3 bits: s = 0.5, z = 2; values clipped to [-1, 2.5]
    s, z = 0.5, 2.0
    expected = (torch.clamp(torch.round(y / s) + z, 0, 7) - z) * s
    assert torch.allclose(q, expected, atol=1e-6)
    assert q.min().item() == pytest.approx(-1.0) and q.max().item() == pytest.approx(2.5)


def test_activation_quantizer_eval_before_any_observation_is_identity():
    op, _ = bound(ActivationQuantizer(Quantize(bits=4), site="a"), step=10)
    op.eval()
    x = randn(2, 5)
    assert torch.equal(op(x), x)


def test_activation_quantizer_unsigned_grid_for_nonnegative_inputs():
    bits = 4
    op, _ = bound(ActivationQuantizer(Quantize(bits=bits, start=0), site="a"))
    x = rand(3, 7, seed=5) * 3.0
    assert torch.equal(op(x), x)  # nothing observed before this batch: identity
    q = op(x)  # on the range of the first batch
    s = x.max().item() / (2**bits - 1)  # lo = min(x) >= 0 is widened to 0
    k = q / s
    assert torch.allclose(k, k.round(), atol=1e-4)
    k = k.round()
    assert k.min().item() >= 0 and k.max().item() <= 2**bits - 1
    assert torch.all((q - x).abs() <= s / 2 + 1e-6)
    assert q.max().item() == pytest.approx(x.max().item())


def test_activation_quantizer_symmetric():
    op, _ = bound(ActivationQuantizer(Quantize(bits=3, symmetric=True), site="a"))
    x = _batch_with_range(-1.5, 0.75, 0)
    op(x)
    q = op(x)
    s = 1.5 / 3  # max(|lo|, |hi|) / (2^(b-1) - 1)
    expected = torch.clamp(torch.round(x / s), -3, 3) * s
    assert torch.allclose(q, expected, atol=1e-6)


def test_activation_quantizer_half_dtype():
    op, _ = bound(ActivationQuantizer(Quantize(bits=8), site="a"))
    x = randn(4, 4).to(torch.bfloat16)
    q = op(x)
    assert q.dtype == torch.bfloat16
    assert op.lo.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# LsqQuantizer
# ---------------------------------------------------------------------------------------


def test_lsq_weight_init_per_channel():
    w = randn(4, 6, seed=2)
    op = LsqQuantizer(Quantize(bits=4, learned=True), site="w", weight=w, channel_axis=0)
    expected = 2 * w.abs().mean(dim=1, keepdim=True) / math.sqrt(7)
    assert op.scale.shape == (4, 1)
    assert torch.allclose(op.scale.detach(), expected)
    per_t = LsqQuantizer(Quantize(bits=4, learned=True), site="w", weight=w, channel_axis=None)
    assert per_t.scale.numel() == 1
    assert per_t.scale.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(7), rel=1e-6)


def test_lsq_weight_forward_and_scale_gradient():
    bits = 3
    qn, qp = -4.0, 3.0
    w = randn(2, 5, seed=7, dtype=torch.float32)
    op, _ = bound(LsqQuantizer(Quantize(bits=bits, learned=True), site="w", weight=w, channel_axis=0))
    wr = w.clone().requires_grad_()
    up = randn(2, 5, seed=8)
    q = op(wr)
    q.backward(up)
    g = 1 / math.sqrt(5 * qp)  # n = 5 weights share each step size
    for c in range(2):
        s = op.scale[c, 0].item()
        grad_s = 0.0
        for j in range(5):
            v = w[c, j].item() / s
            if v < qn:
                val, dx, ds = qn * s, 0.0, qn
            elif v > qp:
                val, dx, ds = qp * s, 0.0, qp
            else:
                val, dx, ds = round(v) * s, 1.0, round(v) - v
            assert q[c, j].item() == pytest.approx(val, abs=1e-6)
            assert wr.grad[c, j].item() == dx * up[c, j].item()
            grad_s += up[c, j].item() * ds
        assert op.scale.grad[c, 0].item() == pytest.approx(g * grad_s, rel=1e-4, abs=1e-6)


def test_lsq_activation_init_at_first_training_forward_after_start():
    bits = 4
    op, sched = bound(LsqQuantizer(Quantize(bits=bits, start=3, learned=True), site="a"))
    x = rand(2, 8, seed=1) + 0.05  # no negative value: unsigned grid 0..15
    assert torch.equal(op(x), x)  # before start
    assert not bool(op.initialized) and op.scale.item() == 1.0
    sched.step.fill_(3)
    op.eval()
    assert torch.equal(op(x), x)  # eval mode: no init, identity
    assert not bool(op.initialized)
    op.train()
    assert torch.equal(op(x), x)  # the batch that initialises s is not yet quantized
    s = 2 * x.abs().mean().item() / math.sqrt(2**bits - 1)
    # committed at the end of the forward, set by the next training forward
    assert bool(op.primed) and not bool(op.initialized) and op.scale.item() == 1.0
    assert op.initial_scale.item() == pytest.approx(s, rel=1e-6) and not bool(op.initial_signed)
    q = op(x)
    assert bool(op.initialized) and not bool(op.signed)
    assert op.scale.item() == pytest.approx(s, rel=1e-6)
    k = q / s
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert k.round().min() >= 0 and k.round().max() <= 15
    expected = torch.clamp(x / s, 0, 15).round() * s
    assert torch.allclose(q, expected, atol=1e-6)
    # a later batch does not re-initialise
    op(randn(2, 8, seed=4) * 5)
    assert op.scale.item() == pytest.approx(s, rel=1e-6) and not bool(op.signed)


def test_lsq_activation_signed_init_from_negative_batch():
    bits = 4
    op, _ = bound(LsqQuantizer(Quantize(bits=bits, learned=True), site="a"))
    x = randn(3, 6, seed=2)
    assert x.min() < 0
    op(x)
    q = op(x)
    assert bool(op.signed)
    s = 2 * x.abs().mean().item() / math.sqrt(2 ** (bits - 1) - 1)
    assert op.scale.item() == pytest.approx(s, rel=1e-6)
    expected = torch.clamp(x / s, -8, 7).round() * s
    assert torch.allclose(q, expected, atol=1e-6)


def test_lsq_activation_symmetric_true_is_signed_even_for_positive_batch():
    op, _ = bound(LsqQuantizer(Quantize(bits=4, symmetric=True, learned=True), site="a"))
    x = rand(2, 6) + 0.1
    op(x)
    op(x)
    assert bool(op.signed)
    assert op.scale.item() == pytest.approx(2 * x.mean().item() / math.sqrt(7), rel=1e-6)


def test_lsq_activation_scale_receives_gradient():
    op, _ = bound(LsqQuantizer(Quantize(bits=3, learned=True), site="a"))
    x = (randn(2, 5, seed=11) * 2).requires_grad_()
    op(x)  # the batch s is initialised from (set by the next forward)
    q = op(x)
    q.sum().backward()
    assert op.scale.grad is not None and op.scale.grad.abs().item() > 0
    s = op.scale.item()
    qn, qp = -4.0, 3.0
    g = 1 / math.sqrt(5 * qp)  # n = features of one sample
    expected = 0.0
    for v in (x.detach() / s).flatten().tolist():
        expected += qn if v < qn else qp if v > qp else round(v) - v
    assert op.scale.grad.item() == pytest.approx(g * expected, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------
# WeightPruner
# ---------------------------------------------------------------------------------------


def test_weight_pruner_one_shot_then_frozen():
    w = randn(4, 5, seed=1)
    op, sched = bound(WeightPruner(Prune(0.3, start=5), site="w", shape=w.shape), step=0)
    for t in range(5):
        sched.step.fill_(t)
        assert torch.equal(op(w), w)
        assert bool(op.mask.all())
    sched.step.fill_(5)
    out = op(w)
    k = round(0.3 * 20)
    assert n_zeros(out) == k == 6
    assert zero_set(out) == smallest(w.abs(), k)
    mask = op.mask.clone()
    # new weights and later steps: mask unchanged
    for t in range(6, 12):
        sched.step.fill_(t)
        w2 = randn(4, 5, seed=100 + t)
        out2 = op(w2)
        assert torch.equal(op.mask, mask)
        assert torch.equal(out2, w2 * mask)


def test_weight_pruner_agp_ramp_refresh_schedule():
    shape, s, start, end, every = (10, 10), 0.8, 2, 10, 3
    n = 100
    op, sched = bound(WeightPruner(Prune(s, start=start, end=end, every=every), site="w", shape=torch.Size(shape)))
    sched.train()
    refresh = {2, 5, 8, 10}
    last_k = 0
    counts = []
    for t in range(14):
        assert int(sched.step) == t
        w = randn(*shape, seed=t)
        prev = op.mask.clone()
        out = op(w)
        if t in refresh:
            last_k = round(agp(t, s, start, end) * n)
            assert zero_set(out) == smallest(w.abs(), last_k)
        else:
            assert torch.equal(op.mask, prev)
        assert n_zeros(out) == last_k
        assert int((~op.mask).sum()) == last_k
        counts.append(last_k)
        sched()  # training mode: step += 1
    # 0.8·(1 - 0.625^3) = 0.6047 -> 60; 0.8·(1 - 0.25^3) = 0.7875 -> 79; then 80
    assert counts == [0, 0, 0, 0, 0, 60, 60, 60, 79, 79, 80, 80, 80, 80]


def test_weight_pruner_eval_never_refreshes():
    w = randn(4, 5)
    op, sched = bound(WeightPruner(Prune(0.5, start=0), site="w", shape=w.shape))
    op.eval()
    for t in range(3):
        sched.step.fill_(t)
        assert torch.equal(op(w), w)
    assert bool(op.mask.all())
    op.train()
    assert n_zeros(op(w)) == 10


def test_weight_pruner_gradient():
    w = randn(3, 4).requires_grad_()
    op, _ = bound(WeightPruner(Prune(0.5), site="w", shape=w.shape))
    up = randn(3, 4, seed=9)
    op(w).backward(up)
    mask = op.mask
    assert int((~mask).sum()) == 6
    assert torch.equal(w.grad, up * mask)


def test_prune_then_quantize_gives_the_formula_and_leaves_the_latent_weight():
    """``[Prune, Quantize]``: the value is ``Q(w·m)`` from the formula, the latent weight is
    left as it was, and the gradient is the pruner's mask (the rounding is straight-through)."""
    import fxqp
    from fxqp import Rule, Spec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    spec = Spec(rules=[Rule(modules=["Linear"], weight=[Prune(0.5), Quantize(bits=4)])])
    gm = fxqp.transform(model, spec)
    gm.train()
    gm(randn(2, 16))
    layer = gm.get_submodule("0")
    chain = layer.parametrizations.weight
    latent = chain.original.detach().clone()
    w = layer.weight
    assert torch.equal(chain.original.detach(), latent)
    masked = latent * chain[0].mask
    scale = masked.abs().amax(1, keepdim=True) / 7
    assert torch.equal(w.detach(), torch.round(masked / scale) * scale)
    up = randn(8, 16, seed=3)
    w.backward(up)
    assert torch.equal(chain.original.grad, up * chain[0].mask)


class _Round(nn.Module):
    def forward(self, x):
        return torch.round(x)


def test_weight_pruner_latent_tiebreak():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.9, 0.6, 1.1, 0.7], [-1.4, 0.55, -0.8, 1.3]]))
    parametrize.register_parametrization(lin, "weight", _Round())
    wq = lin.weight
    assert torch.equal(wq.abs(), torch.ones(2, 4))  # all tied after rounding

    plain, _ = bound(WeightPruner(Prune(0.25), site="lin.weight", shape=wq.shape))
    out = plain(wq)
    assert zero_set(out) == {0, 1}  # no tiebreak: lower flat index first

    op, _ = bound(WeightPruner(Prune(0.25), site="lin.weight", shape=wq.shape))
    op.use_latent_tiebreak(lin, "weight")
    out = op(lin.weight)
    # smallest latent |w|: 0.55 (flat 5) and 0.6 (flat 1)
    assert zero_set(out) == {1, 5}
    assert torch.equal(op.mask, torch.tensor([[True, False, True, True], [True, False, True, True]]))


# ---------------------------------------------------------------------------------------
# ActivationPruner
# ---------------------------------------------------------------------------------------


def test_activation_pruner_static_element_running_average_and_mask():
    s = 0.3
    op, sched = bound(ActivationPruner(Prune(s, start=1), site="act"))
    x1 = randn(4, 2, 3, 3, seed=1)
    x2 = randn(4, 2, 3, 3, seed=2)
    out1 = op(x1)  # step 0: observe only
    assert torch.equal(out1, x1)
    m1 = x1.abs().mean(dim=0)
    assert op.running.shape == (2, 3, 3)
    assert torch.allclose(op.running, m1)
    assert bool(op.mask.all())
    sched.step.fill_(1)
    out2 = op(x2)
    # the mask (one-shot, no end) is computed from the batches before; once it is frozen,
    # later batches are not folded in
    running = m1
    assert torch.allclose(op.running, running)
    k = round(s * 18)
    assert k == 5 and int((~op.mask).sum()) == k
    assert set((~op.mask).flatten().nonzero().flatten().tolist()) == smallest(running, k)
    assert torch.equal(out2, x2 * op.mask)
    # every sample is zeroed at the same positions
    for b in range(4):
        assert zero_set(out2[b]) == smallest(running, k)


def test_activation_pruner_static_eval_neither_observes_nor_refreshes():
    op, sched = bound(ActivationPruner(Prune(0.5, start=1), site="act"))
    x = randn(2, 6, seed=1)
    op(x)  # training, step 0: observe only
    running = op.running.clone()
    op.eval()
    sched.step.fill_(1)
    out = op(randn(2, 6, seed=2) * 10)
    assert torch.equal(op.running, running) and bool(op.mask.all())
    assert n_zeros(out) == 0
    op.train()
    op(x)
    assert int((~op.mask).sum()) == 3


def test_activation_pruner_static_channel_zeroes_whole_channels():
    op, _ = bound(ActivationPruner(Prune(0.5, granularity="channel"), site="act"))
    gains = torch.tensor([1.0, 0.1, 2.0, 0.2]).reshape(1, 4, 1, 1)
    x = (rand(3, 4, 5, 5) + 0.1) * gains
    assert torch.equal(op(x), x)  # start 0: the mask waits for a first batch's statistics
    assert op.running.shape == (4, 1, 1) and op.mask.shape == (4, 1, 1)
    assert torch.allclose(op.running.flatten(), x.abs().mean(dim=(0, 2, 3)))
    assert bool(op.mask.all())
    out = op(x)
    assert op.mask.flatten().tolist() == [True, False, True, False]
    assert torch.all(out[:, [1, 3]] == 0)
    assert torch.equal(out[:, [0, 2]], x[:, [0, 2]])


def test_activation_pruner_shape_change_raises_site_error():
    op, _ = bound(ActivationPruner(Prune(0.5), site="features.relu3"))
    op(randn(2, 3, 4, 4))
    with pytest.raises(SiteError, match="features.relu3"):
        op(randn(2, 3, 5, 5))
    # a different batch size is fine
    op(randn(5, 3, 4, 4))


def test_activation_pruner_state_dict_roundtrip_into_fresh():
    cfg = Prune(0.4, start=0)
    op, _ = bound(ActivationPruner(cfg, site="act"))
    op(randn(4, 3, 4, 4, seed=1))
    op(randn(4, 3, 4, 4, seed=2))
    sd = op.state_dict()
    fresh, _ = bound(ActivationPruner(cfg, site="act"))
    assert fresh.mask.numel() == 0
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.mask, op.mask) and torch.equal(fresh.running, op.running)
    op.eval(), fresh.eval()
    x = randn(2, 3, 4, 4, seed=3)
    assert torch.equal(fresh(x), op(x))
    assert n_zeros(fresh(x)) == 2 * round(0.4 * 48)


def test_activation_pruner_dynamic_per_sample_topk():
    s = 0.3
    op, sched = bound(ActivationPruner(Prune(s, dynamic=True, start=2), site="act"))
    x = (rand(5, 3, 4, 4) + 0.1) * torch.where(randn(5, 3, 4, 4) > 0, 1.0, -1.0)
    assert torch.equal(op(x), x)  # before start
    sched.step.fill_(2)
    k = round(s * 48)
    for mode in ("train", "eval"):
        getattr(op, mode)()
        out = op(x)
        for b in range(5):
            assert n_zeros(out[b]) == k
            assert zero_set(out[b]) == smallest(x[b].abs(), k)
        assert torch.equal(out[out != 0], x[out != 0])


def test_activation_pruner_dynamic_ramp():
    op, sched = bound(ActivationPruner(Prune(0.5, dynamic=True, start=0, end=4), site="act"))
    x = rand(2, 20) + 0.1
    for t in range(6):
        sched.step.fill_(t)
        k = round(agp(t, 0.5, 0, 4) * 20)
        out = op(x)
        assert [n_zeros(out[b]) for b in range(2)] == [k, k]


@pytest.mark.parametrize("dynamic", [False, True])
def test_activation_pruner_gradient(dynamic):
    op, _ = bound(ActivationPruner(Prune(0.5, dynamic=dynamic), site="act"))
    x = (rand(3, 10) + 0.1).requires_grad_()
    up = randn(3, 10, seed=4)
    op(x)  # a static mask is computed from the batches before
    out = op(x)
    out.backward(up)
    keep = out.detach() != 0
    assert int((~keep).sum()) == 15
    assert torch.equal(x.grad, up * keep)


@pytest.mark.parametrize(
    "op",
    [
        ActivationPruner(Prune(0.5), site="bad.site"),
        ActivationPruner(Prune(0.5, dynamic=True), site="bad.site"),
        ActivationQuantizer(Quantize(bits=8), site="bad.site"),
        LsqQuantizer(Quantize(bits=8, learned=True), site="bad.site"),
    ],
)
def test_non_floating_input_raises_site_error(op):
    bound(op)
    with pytest.raises(SiteError, match="bad.site"):
        op(torch.ones(2, 3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------
# build_op
# ---------------------------------------------------------------------------------------


def _site(kind, name="s", channel_axis=None):
    return types.SimpleNamespace(kind=kind, name=name, channel_axis=channel_axis)


def test_build_op_picks_class_per_op_and_site_kind():
    w = randn(4, 3)
    wsite = _site("weight", "lin.weight", 0)
    asite = _site("activation", "relu")

    op = build_op(Quantize(bits=4), wsite, w)
    assert type(op) is WeightQuantizer and op.channel_axis == 0 and op.site == "lin.weight"
    op = build_op(Quantize(bits=4, per_channel=False), wsite, w)
    assert type(op) is WeightQuantizer and op.channel_axis is None
    op = build_op(Quantize(bits=4, learned=True), wsite, w)
    assert type(op) is LsqQuantizer and op.is_weight and op.scale.shape == (4, 1)
    op = build_op(Prune(0.5), wsite, w)
    assert type(op) is WeightPruner and op.mask.shape == w.shape

    op = build_op(Quantize(bits=8), asite)
    assert type(op) is ActivationQuantizer and op.site == "relu"
    op = build_op(Quantize(bits=8, learned=True), asite)
    assert type(op) is LsqQuantizer and not op.is_weight
    op = build_op(Quantize(bits=1, symmetric=False), asite)
    assert type(op) is ActivationQuantizer
    op = build_op(Prune(0.5), asite)
    assert type(op) is ActivationPruner and not op.dynamic
    op = build_op(Prune(0.5, dynamic=True), asite)
    assert type(op) is ActivationPruner and op.dynamic


def test_build_op_rejects_invalid_combinations():
    asite = _site("activation", "a")
    with pytest.raises(SpecError, match="per_channel"):
        build_op(Quantize(bits=8, per_channel=True), asite)
    with pytest.raises(SpecError, match="bits"):
        build_op(Quantize(bits=1, symmetric=True), asite)
    with pytest.raises(SpecError, match="activation|weight"):
        build_op(Quantize(bits=8), _site("buffer", "b"))


def test_op_buffers_are_registered_and_go_through_global_buffer_hooks():
    from fxqp.ops import ActivationQuantizer

    op = ActivationQuantizer(Quantize(bits=8), "s")
    assert list(op.state_dict()) == ["start", "lo", "hi", "observed"]  # the batch statistics' buffers are not saved
    seen = []
    handle = torch.nn.modules.module.register_module_buffer_registration_hook(lambda module, name, tensor: seen.append(name))
    try:
        ActivationQuantizer(Quantize(bits=8), "s")
    finally:
        handle.remove()
    assert seen == ["start", "lo", "hi", "observed", "pending", "pending_max", "pending_sum", "skipped"]


# ---------------------------------------------------------------------------------------
# The masks' uint8 aliases (what compiled graphs read and write)
# ---------------------------------------------------------------------------------------


def assert_aliased(op):
    """``op.mask_bytes`` is the uint8 view of ``op.mask``'s memory: a write through one is
    seen through the other, and counts as a write of both (the eager ops cache conversions of
    ``mask`` by its version)."""
    alias = op.mask_bytes
    assert alias.dtype == torch.uint8 and alias.shape == op.mask.shape
    assert alias.untyped_storage().data_ptr() == op.mask.untyped_storage().data_ptr()
    assert torch.equal(alias, op.mask.to(torch.uint8))
    if op.mask.numel():
        flat = op.mask.view(-1)
        before, version = bool(flat[0]), op.mask._version
        flat[0] = not before
        assert int(alias.view(-1)[0]) == int(not before)
        alias.view(-1)[0] = int(before)
        assert bool(flat[0]) == before and op.mask._version == version + 2


def trained_pruners():
    w = randn(6, 4, seed=1)
    weight, _ = bound(WeightPruner(Prune(0.5), site="w", shape=w.shape))
    weight(w)
    activation, _ = bound(ActivationPruner(Prune(0.5), site="act"))
    activation(randn(4, 3, 4, 4, seed=2))
    activation(randn(4, 3, 4, 4, seed=3))
    return weight, activation


def test_mask_bytes_follows_the_mask_through_copies_moves_loads_and_assignment():
    import copy
    import io

    fresh = ActivationPruner(Prune(0.5), site="act")
    assert_aliased(fresh)  # the empty mask before the first batch
    for op in trained_pruners():
        assert 0 < int(op.mask.sum()) < op.mask.numel()
        assert_aliased(op)
        assert "mask_bytes" not in op.state_dict() and "mask" in op.state_dict()
        assert_aliased(copy.deepcopy(op))
        buffer = io.BytesIO()
        torch.save(op, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded.mask, op.mask)
        assert_aliased(loaded)
        moved = copy.deepcopy(op)._apply(lambda t: t.clone())  # what .to(device) does: a copy of each buffer
        assert_aliased(moved)
        state = {k: v.clone() for k, v in op.state_dict().items()}
        state["mask"] = ~state["mask"]
        assigned = copy.deepcopy(op)
        assigned.load_state_dict(state, assign=True)
        assert assigned.mask is not op.mask and torch.equal(assigned.mask, ~op.mask)
        assert_aliased(assigned)
        assigned.mask = torch.zeros_like(op.mask)
        assert_aliased(assigned)
        assert int(assigned.mask_bytes.sum()) == 0


def test_folded_statistics_are_tensors_of_their_own(tmp_path):
    """The fold replaces state buffers by new tensors; none may share memory with another
    buffer (safetensors refuses shared memory; an in-place write would reach both)."""
    from safetensors.torch import save_file

    quantizer, _ = bound(ActivationQuantizer(Quantize(bits=8), site="q"))
    pruner, _ = bound(ActivationPruner(Prune(0.5, start=2), site="p"))
    pruner.use_latent_tiebreak()
    x = randn(4, 6, seed=3)
    quantizer(x)
    pruner(x, latent=x * 2)
    for op in (quantizer, pruner):
        pointers = [t.untyped_storage().data_ptr() for t in op.state_dict().values() if t.numel()]
        assert len(pointers) == len(set(pointers))
        save_file(op.state_dict(), str(tmp_path / f"{op.site}.safetensors"))
    torch.testing.assert_close(pruner.running_latent, 2 * pruner.running)
