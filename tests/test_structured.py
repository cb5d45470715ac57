"""Structured weight pruning: filters, input channels, N:M, and the quantization-angle score."""

import math

import pytest
import torch
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.ops.numerics import n_of_m_keep_mask, quantization_angles


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _trained(spec, steps=2, seed=0):
    torch.manual_seed(seed)
    gm = fxqp.transform(Net(), spec)
    x = torch.randn(3, 4, 6, 6)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        gm(x).pow(2).mean().backward()
        opt.step()
    gm.eval()
    return gm, x


@pytest.mark.parametrize("criterion, norm", [("l1", lambda w, d: w.abs().sum(d)), ("l2", lambda w, d: w.pow(2).sum(d).sqrt())])
def test_filter_and_channel_pruning_zero_the_lowest_scored(criterion, norm):
    for structure, axis in (("filter", 0), ("channel", 1)):
        spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.25, structure=structure, criterion=criterion)])])
        gm, x = _trained(spec, steps=1)
        w = gm.conv2.weight
        latent = gm.conv2.parametrizations["weight"].original.detach()
        dims = tuple(d for d in range(4) if d != axis)
        zero = w.abs().sum(dims) == 0
        count = w.shape[axis]
        assert int(zero.sum()) == round(0.25 * count)
        # the mask was computed at the first training forward, before the SGD step
        scores = norm(latent, dims)
        assert float(scores[zero].max()) <= float(scores[~zero].min()) + 0.05  # one SGD step moved them a little
        assert torch.equal(fxqp.lower(gm)(x), gm(x))


def test_filter_ramp_ends_at_the_target_count():
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5, structure="filter", start=1, end=4)])])
    gm, _ = _trained(spec, steps=6)
    zero_filters = (gm.conv1.weight.flatten(1).abs().sum(1) == 0).sum()
    assert int(zero_filters) == 8


def test_n_of_m_keeps_the_largest_in_every_group():
    torch.manual_seed(3)
    score = torch.rand(5, 8, 3, 3)
    keep = n_of_m_keep_mask(score, 2, 4, axis=1)
    groups = score.movedim(1, -1).reshape(-1, 4)
    kept = keep.movedim(1, -1).reshape(-1, 4)
    assert torch.equal(kept.sum(1), torch.full((groups.shape[0],), 2))
    assert torch.all(torch.where(kept, groups, torch.inf).amin(1) >= torch.where(kept, -torch.inf, groups).amax(1))

    spec = Spec(rules=[Rule(modules=["Linear"], weight=[Prune(sparsity=0.5, structure="2:4")])])
    gm, x = _trained(spec, steps=1)
    w = gm.fc.weight
    assert torch.equal((w.reshape(5, 2, 4) != 0).sum(-1), torch.full((5, 2), 2))


def test_angle_criterion_prunes_the_largest_quantization_angles():
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    q = torch.sign(w) * w.abs().mean((1, 2, 3), keepdim=True)
    theta = quantization_angles(w, q, 0, 1, 0)
    for o in range(6):
        per_kernel = [math.acos(float((w[o, i] * q[o, i]).sum() / (w[o, i].norm() * q[o, i].norm()))) for i in range(3)]
        assert float(theta[o]) == pytest.approx(sum(per_kernel) / 3)
    # for sign quantization the angle is arccos(‖w‖₁ / (‖w‖₂·√n)) per kernel
    k = w[0, 0].flatten()
    assert math.acos(float(k.abs().sum() / (k.norm() * 3))) == pytest.approx(math.acos(float((k * torch.sign(k)).sum() / (k.norm() * 3))))

    spec = Spec(
        rules=[
            Rule(
                modules=["Conv2d"], weight=[Prune(sparsity=0.25, structure="filter", criterion="angle"), Quantize(bits=1, method="binary")]
            )
        ]
    )
    gm, x = _trained(spec, steps=1)
    latent = gm.conv1.parametrizations["weight"].original.detach().double()
    binarized = torch.sign(latent) * latent.abs().mean((1, 2, 3), keepdim=True)
    angles = quantization_angles(latent, binarized, 0, 1, 0)
    pruned = gm.conv1.weight.flatten(1).abs().sum(1) == 0
    assert int(pruned.sum()) == 4
    assert float(angles[pruned].min()) >= float(angles[~pruned].max()) - 0.05
    assert torch.equal(fxqp.lower(gm)(x), gm(x))


def test_structured_errors():
    with pytest.raises(fxqp.SiteError, match="'conv1.weight': structure '2:8' needs the input dimension \\(4\\) to be a multiple of 8"):
        fxqp.transform(Net(), Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.75, structure="2:8")])]))
    with pytest.raises(fxqp.SpecError, match="criterion 'angle' compares the weight with its quantized version"):
        fxqp.transform(Net(), Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5, structure="filter", criterion="angle")])]))
    with pytest.raises(fxqp.SpecError, match="'filter' prunes weights; activations accept 'element'"):
        fxqp.transform(Net(), Spec(rules=[Rule(functions=["relu"], activation=[Prune(sparsity=0.5, structure="filter")])]))


def test_structured_pruning_compiles_and_matches_eager():
    torch._dynamo.reset()
    spec = Spec(
        rules=[
            Rule(
                modules=["Conv2d", "Linear"],
                weight=[Quantize(bits=2, method="ternary"), Prune(sparsity=0.5, structure="filter", criterion="angle", start=1, end=3)],
            )
        ]
    )
    torch.manual_seed(0)
    eager = fxqp.transform(Net(), spec)
    compiled_model = fxqp.transform(Net(), spec)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 4, 6, 6)
    for _ in range(4):
        a, b = eager(x), compiled(x)
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(eager.conv1.parametrizations["weight"][1].mask, compiled_model.conv1.parametrizations["weight"][1].mask)
