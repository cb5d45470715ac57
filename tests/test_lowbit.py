"""The low-precision quantizers of ``Quantize(method=...)``: formulas, level counts, STE
gradients, composition with pruning in both orders, and lowering to their true width."""

import math

import pytest
import torch
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.lower.size import site_sizes
from fxqp.ops.lowbit import (
    BinaryWeightQuantizer,
    DorefaActivationQuantizer,
    DorefaWeightQuantizer,
    Pow2ActivationQuantizer,
    Pow2WeightQuantizer,
    TernaryWeightQuantizer,
)
from fxqp.schedule import Schedule


def _weight_op(cls, method, bits, per_channel=True, **extra):
    op = cls(Quantize(bits=bits, method=method, **extra), "w", 0 if per_channel else None)
    op.train()
    return op


# --------------------------------------------------------------------------- formulas


def test_pow2_picks_the_least_squares_power_of_two_scale():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    w[2, 0, 0, 0] = 9.0  # an outlier: a finer, clipping shift is better for this channel
    op = _weight_op(Pow2WeightQuantizer, "pow2", 4)
    q = op.quantize(w)
    qmax = 7
    for c in range(6):
        row = w[c]
        errors = {}
        for d in range(-8, 12):  # every integer shift, not only the candidates
            s = 2.0**-d
            errors[d] = float(((torch.clamp(torch.round(row / s), -qmax, qmax) * s - row) ** 2).sum())
        best = min(errors.values())
        assert float(((q[c] - row) ** 2).sum()) == pytest.approx(best, rel=1e-6)
        scale = op.grid(w).scale[c].item()
        assert math.log2(scale) == int(math.log2(scale))  # a power of two
        assert torch.unique(q[c]).numel() <= 2 * qmax + 1


def test_pow2_gradient_is_zero_for_clipped_values_only():
    w = torch.tensor([[0.1, -0.2, 0.3, 5.0, 0.25, -0.15, 0.05, 0.12]], requires_grad=True)
    op = _weight_op(Pow2WeightQuantizer, "pow2", 3)
    q = op.quantize(w)
    q.sum().backward()
    scale = op.grid(w).scale.item()
    clipped = (w.detach() / scale).abs() > 3.5
    assert torch.equal(w.grad, (~clipped).float())


def test_dorefa_weights_match_the_paper_formula():
    torch.manual_seed(1)
    w = torch.randn(4, 16)
    for bits in (1, 2, 3, 4):
        op = _weight_op(DorefaWeightQuantizer, "dorefa", bits, per_channel=False)
        levels = 2**bits - 1
        t = torch.tanh(w)
        expected = 2 * torch.round((t / (2 * t.abs().max()) + 0.5) * levels) / levels - 1
        q = op.quantize(w)
        assert torch.allclose(q, expected, atol=1e-6)
        assert torch.unique(q).numel() <= 2**bits
        assert float(q.abs().max()) == pytest.approx(1.0)


def test_dorefa_keeps_exact_zeros_and_passes_gradient_through_tanh():
    w = torch.tensor([[0.0, 0.5, -1.0, 2.0]], requires_grad=True)
    op = _weight_op(DorefaWeightQuantizer, "dorefa", 2, per_channel=False)
    q = op.quantize(w)
    assert q[0, 0] == 0
    q.sum().backward()
    # d/dw of tanh(w)/max|tanh| through the round: nonzero for the non-max entries
    assert w.grad[0, 1] != 0 and w.grad[0, 2] != 0


def test_binary_scaled_and_unscaled():
    w = torch.tensor([[0.5, -1.5, 0.0, 2.0], [0.1, 0.2, -0.3, 0.4]], requires_grad=True)
    scaled = _weight_op(BinaryWeightQuantizer, "binary", 1).quantize(w)
    alpha = torch.tensor([[4.0 / 3.0], [0.25]])  # mean |w| of the non-zeros per channel
    assert torch.allclose(scaled, torch.sign(w.detach()) * alpha)
    plain = _weight_op(BinaryWeightQuantizer, "binary", 1, scaled=False).quantize(w)
    assert torch.equal(plain, torch.sign(w.detach()))
    plain.sum().backward()
    assert torch.equal(w.grad, (w.detach().abs() <= 1).float())  # STE masked to |w| <= 1


def test_ternary_is_twn():
    torch.manual_seed(2)
    w = torch.randn(3, 50, requires_grad=True)
    q = _weight_op(TernaryWeightQuantizer, "ternary", 2).quantize(w)
    for c in range(3):
        a = w.detach()[c].abs()
        delta = 0.7 * a.mean()
        keep = a > delta
        alpha = a[keep].mean()
        expected = torch.where(keep, torch.sign(w.detach()[c]) * alpha, torch.zeros(()))
        assert torch.allclose(q[c], expected)
        assert torch.unique(q[c]).numel() == 3  # exactly {-α, 0, +α}
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # identity STE


def test_activation_methods():
    x = torch.tensor([-0.5, 0.0, 0.26, 0.5, 0.9, 1.7], requires_grad=True)
    dorefa = DorefaActivationQuantizer(Quantize(bits=2, method="dorefa"), "a")
    dorefa.bind(Schedule())
    dorefa.train()
    y = dorefa(x)
    assert torch.allclose(y, torch.round(torch.clamp(x.detach(), 0, 1) * 3) / 3)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))

    pow2 = Pow2ActivationQuantizer(Quantize(bits=4, method="pow2"), "a")
    schedule = Schedule()
    pow2.bind(schedule)
    pow2.train()
    pow2(torch.tensor([-3.0, 2.9]))  # range amax 3 -> d = floor(log2(7/3)) = 1
    schedule()  # the end of a transformed model's forward: the batch's range is folded in
    assert pow2.pow2_scale().item() == 0.5
    assert torch.equal(pow2(torch.tensor([0.3, 1.2, -3.0])), torch.tensor([0.5, 1.0, -3.0]))


# --------------------------------------------------------------------------- spec


def test_spec_rules_for_methods():
    assert Quantize(bits=2, method="ternary").to_dict() == {"op": "quantize", "bits": 2, "method": "ternary"}
    assert Quantize.from_dict({"op": "quantize", "bits": 1, "method": "binary", "scaled": False}).scaled is False
    with pytest.raises(fxqp.SpecError, match="method 'binary' does not take bits=2; expected bits=1"):
        Quantize(bits=2, method="binary")
    with pytest.raises(fxqp.SpecError, match="method 'ternary' does not take bits=3; expected bits=2"):
        Quantize(bits=3, method="ternary")
    with pytest.raises(fxqp.SpecError, match="'xnor' is not accepted; expected one of 'uniform', 'lsq', 'pow2'"):
        Quantize(bits=1, method="xnor")
    with pytest.raises(fxqp.SpecError, match="learned: True is the 'lsq' method"):
        Quantize(bits=4, method="dorefa", learned=True)
    with pytest.raises(fxqp.SpecError, match="scaled: only the 'binary' method"):
        Quantize(bits=4, scaled=True)
    with pytest.raises(fxqp.SpecError, match="fixed grid"):
        Quantize(bits=4, method="pow2", symmetric=False)
    spec = Spec(rules=[Rule(modules=["ReLU"], activation=[Quantize(bits=1, method="binary")])])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(x)

    with pytest.raises(
        fxqp.SpecError, match="'binary' quantizes weights only; accepted for activations: 'uniform', 'pow2', 'dorefa', 'lsq'"
    ):
        fxqp.transform(Net(), spec)


# --------------------------------------------------------------------------- with pruning, lowered


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


METHODS = [("pow2", 4, "pow2"), ("dorefa", 2, "dorefa"), ("binary", 1, "uniform"), ("ternary", 2, "uniform"), ("lsq", 3, "lsq")]


@pytest.mark.parametrize("method, bits, act_method", METHODS)
@pytest.mark.parametrize("prune_first", [True, False])
def test_methods_compose_with_pruning_and_lower_to_their_width(method, bits, act_method, prune_first):
    torch.manual_seed(0)
    quantize, prune = Quantize(bits=bits, method=method), Prune(sparsity=0.5)
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d", "Linear"], weight=[prune, quantize] if prune_first else [quantize, prune]),
            Rule(functions=["relu"], activation=[Quantize(bits=4, method=act_method)]),
        ]
    )
    gm = fxqp.transform(SmallNet(), spec)
    x = torch.randn(4, 3, 8, 8)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        gm(x).pow(2).mean().backward()
        optimizer.step()
    gm.eval()
    for module in (gm.conv, gm.fc):
        w = module.weight
        assert float((w == 0).float().mean()) >= 0.5  # the pruned half stays zero in both orders
        for channel in w:
            assert torch.unique(channel[channel != 0]).numel() <= 2**bits
    low = fxqp.lower(gm)
    assert torch.equal(low(x), gm(x))
    sizes = {s.site: s for s in site_sizes(low)}
    expected_bits = 1 if method in ("binary", "ternary") else bits  # ternary: a sign bit per non-zero
    for site in ("conv.weight", "fc.weight"):
        assert sizes[site].bits == expected_bits
        assert sizes[site].nnz <= sizes[site].n // 2


def test_seed_size_convention():
    from fxqp.lower.size import MB, seed_size_bytes

    torch.manual_seed(0)
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d"], weight=[Quantize(bits=1, method="binary")]),
            Rule(modules=["Linear"], weight=[Quantize(bits=2, method="dorefa")]),
        ]
    )
    gm = fxqp.transform(SmallNet(), spec)
    gm.eval()
    low = fxqp.lower(gm)
    conv_bits = 8 * 3 * 3 * 3 * 1 + 32 * 8  # 1 bit per weight + one 32-bit alpha per output channel
    fc_bits = 4 * 288 * 2 + 32 * 2  # 2 bits per weight + a per-tensor scale and zero point
    other_bits = 32 * (8 + 4)  # the biases
    assert seed_size_bytes(low) == (conv_bits + fc_bits + other_bits) / 8
    assert f"{seed_size_bytes(low) / MB:.3f} MB" in str(fxqp.summary(low))
