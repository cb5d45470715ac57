"""Channel rules (passes.layers): a layer type of one's own becomes prunable across layers and
removable at lowering by registering one rule; grouped convolutions are pruned group-wise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxqp
from fxqp import ChannelRule, Prune, Quantize, Rule, Spec
from fxqp.sites import discover_sites
from passes import channel_groups, rule_for, trace
from passes.layers import CHANNEL_RULES


@pytest.fixture
def rules():
    """Registrations made by a test are undone after it."""
    saved = dict(CHANNEL_RULES)
    yield
    CHANNEL_RULES.clear()
    CHANNEL_RULES.update(saved)


class MyConv(nn.Module):
    """A 3x3 convolution written with its own weight ``(out, in, 3, 3)`` and bias."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, 3, 3) / (3 * n_in**0.5))
        self.bias = nn.Parameter(torch.randn(n_out) / 10)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=1)


class MyGroupedConv(nn.Module):
    """A grouped 1x1 convolution of its own: weight ``(out, in/groups, 1, 1)``, no bias."""

    def __init__(self, n_in: int, n_out: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.randn(n_out, n_in // groups, 1, 1) / n_in**0.5)

    def forward(self, x):
        return F.conv2d(x, self.weight, groups=self.groups)


class MyTransposedLinear(nn.Module):
    """A linear layer whose weight is stored ``(in, out)``; its output count is ``width``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.width = n_out
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class CustomNet(nn.Module):
    """Two custom convolutions joined by a residual add, a batch norm, a custom grouped
    convolution and a custom transposed linear head."""

    def __init__(self):
        super().__init__()
        self.a = MyConv(3, 8)
        self.bn = nn.BatchNorm2d(8)
        self.b = MyConv(8, 8)
        self.g = MyGroupedConv(8, 8, groups=2)
        self.head = MyTransposedLinear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        y = torch.relu(self.b(y)) + y
        y = torch.relu(self.g(y))
        return self.head(y.mean((2, 3)))


SPEC = Spec(
    rules=[
        Rule(
            modules=["MyConv", "MyGroupedConv", "MyTransposedLinear"],
            weight=[Prune(sparsity=0.5, structure="filter"), Quantize(bits=4)],
        )
    ]
)


def _register_custom_layers():
    fxqp.register_channel_rule(MyConv, ChannelRule())
    fxqp.register_channel_rule(MyGroupedConv, ChannelRule(groups="groups", per_channel=()))
    fxqp.register_channel_rule(MyTransposedLinear, ChannelRule(out_channels="width", out_axis=1, in_axis=0, input_rank=2))


def _train_one_step(gm, x):
    optimizer = torch.optim.SGD(gm.parameters(), lr=1e-2)
    gm.train()
    optimizer.zero_grad()
    gm(x).pow(2).mean().backward()  # the masks are computed in this first training forward
    optimizer.step()
    gm.eval()


def test_a_registered_custom_layer_is_coupled_pruned_and_shrunk(rules, tmp_path):
    _register_custom_layers()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    gm = fxqp.transform(CustomNet(), SPEC, example_inputs=(x,))
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} >= {"a", "b", "g", "head"}  # kept as leaves
    groups = {g.site: g for g in gm.fxqp_groups.children()}
    assert set(groups) == {"group of a.weight, b.weight", "group of g.weight"}
    residual, grouped = groups["group of a.weight, b.weight"], groups["group of g.weight"]
    assert [m.module for m in residual.followers] == ["bn"] and {m.module for m in residual.consumers} == {"b", "g"}
    assert residual.blocks == 2 and grouped.blocks == 2  # g reads and writes 2 groups of 4 channels
    _train_one_step(gm, x)
    for group in (residual, grouped):
        assert group.keep.view(2, 4).sum(1).tolist() == [2, 2]
    pruned = ~residual.keep
    assert torch.all(gm.a.weight[pruned] == 0) and torch.all(gm.a.bias[pruned] == 0)  # the rule's per-channel bias is masked
    assert torch.all(gm.bn.weight[pruned] == 0) and torch.all(gm.bn.bias[pruned] == 0)

    low = fxqp.lower(gm)
    assert low.a.weight.shape == (4, 3, 3, 3) and low.a.bias.shape == (4,)
    assert low.b.weight.shape == (4, 4, 3, 3) and low.bn.num_features == 4 and low.bn.running_mean.shape == (4,)
    assert low.g.weight.shape == (4, 2, 1, 1) and low.g.groups == 2  # 4 of 8 filters, 2 of 4 inputs per group
    assert low.head.weight.shape == (4, 4) and low.head.width == 4  # its input axis (0) lost the pruned channels
    with torch.no_grad():
        expected = gm(x)
        torch.testing.assert_close(low(x), expected, rtol=1e-5, atol=1e-6)
    fxqp.save(low, tmp_path / "custom.fxqp")
    loaded = fxqp.load(tmp_path / "custom.fxqp", CustomNet())
    with torch.no_grad():
        assert torch.equal(loaded(x), low(x))


def test_without_a_rule_a_custom_layer_is_pruned_on_its_own_and_kept_whole(rules):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    assert rule_for(MyConv(3, 8)) is None
    gm = fxqp.transform(CustomNet(), SPEC, example_inputs=(x,))
    assert "a" not in {n.target for n in gm.graph.nodes if n.op == "call_module"}  # traced through: conv2d calls
    assert not hasattr(gm, "fxqp_groups")
    _train_one_step(gm, x)
    assert int((gm.a.weight.flatten(1).abs().sum(1) == 0).sum()) == 4  # its own filter mask
    low = fxqp.lower(gm)
    assert low.meta["fxqp"]["removed"] == [] and low.a.weight.shape == (8, 3, 3, 3)
    with torch.no_grad():
        assert torch.equal(low(x), gm(x))


class TransposedMiddle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = MyTransposedLinear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_filters_on_weight_axis_1_are_removed_with_their_per_channel_scales(rules):
    fxqp.register_channel_rule(MyTransposedLinear, ChannelRule(out_channels="width", out_axis=1, in_axis=0, input_rank=2))
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    spec = Spec(rules=[Rule(modules=["MyTransposedLinear"], weight=[Prune(sparsity=0.5, structure="filter"), Quantize(bits=4)])])
    gm = fxqp.transform(TransposedMiddle(), spec, example_inputs=(x,))
    _train_one_step(gm, x)
    kept = gm.fxqp_groups.a.keep
    assert int(kept.sum()) == 4 and torch.all(gm.a.weight[:, ~kept] == 0) and torch.all(gm.a.bias[~kept] == 0)
    low = fxqp.lower(gm)
    assert low.a.weight.shape == (6, 4) and low.a.width == 4 and low.b.weight.shape == (3, 4) and low.b.in_features == 4
    with torch.no_grad():
        torch.testing.assert_close(low(x), gm(x), rtol=1e-5, atol=1e-6)


class GroupedNet(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 16, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.g(torch.relu(self.stem(x)))))
        return self.head(torch.relu(self.c(y)).mean((2, 3)))


@pytest.mark.parametrize("groups", [2, 4])
def test_a_grouped_convolution_keeps_the_best_filters_of_every_group(groups):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    spec = Spec(rules=[Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5, structure="filter", criterion="l1")])])
    gm = fxqp.transform(GroupedNet(groups), spec, example_inputs=(x,))
    latent = gm.g.parametrizations["weight"].original.detach().clone()
    _train_one_step(gm, x)
    group = next(g for g in gm.fxqp_groups.children() if g.site == "group of g.weight")
    keep = group.keep.view(groups, -1)
    per_group = 16 // groups
    assert keep.sum(1).tolist() == [per_group // 2] * groups
    scores = latent.abs().sum((1, 2, 3)).view(groups, per_group)  # the filters' L1 norms when the mask was computed
    for j in range(groups):
        assert scores[j][keep[j]].min() > scores[j][~keep[j]].max()  # chosen within each group
    stem = next(g for g in gm.fxqp_groups.children() if g.site == "group of stem.weight")
    assert stem.keep.view(groups, -1).sum(1).tolist() == [8 // groups // 2] * groups  # g's inputs: as many per group
    low = fxqp.lower(gm)
    assert (low.g.in_channels, low.g.out_channels, low.g.groups) == (4, 8, groups)
    assert low.g.weight.shape == (8, 4 // groups, 3, 3) and (low.bn.num_features, low.c.in_channels, low.stem.out_channels) == (8, 8, 4)
    with torch.no_grad():
        expected = gm(x)
        torch.testing.assert_close(low(x), expected, rtol=1e-5, atol=1e-6)


def test_site_channel_axis_comes_from_the_rule(rules):
    model = nn.Sequential(MyTransposedLinear(4, 6))
    weights, _ = discover_sites(trace(model).graph_module)
    assert weights[0].channel_axis == 0  # unknown class: axis 0
    fxqp.register_channel_rule(MyTransposedLinear, ChannelRule(out_channels="width", out_axis=1, in_axis=0, input_rank=2))

    class Sub(MyTransposedLinear):
        pass

    weights, _ = discover_sites(trace(nn.Sequential(Sub(4, 6))).graph_module)
    assert weights[0].channel_axis == 1  # a subclass inherits its base's rule


def test_channel_groups_read_a_rule_of_ones_own(rules):
    fxqp.register_channel_rule(MyConv, ChannelRule())
    model = nn.Sequential(MyConv(3, 5), nn.ReLU(), MyConv(5, 2))
    gm = trace(model, leaf_modules=[MyConv]).graph_module
    groups = channel_groups(gm, (torch.randn(1, 3, 4, 4),))
    inner = next(g for g in groups if any(m.module == "0" for m in g.producers))
    assert inner.prunable and inner.size == 5 and [m.module for m in inner.consumers] == ["2"]


@pytest.mark.parametrize(
    "cls, rule, message",
    [
        (int, ChannelRule(), "expected an nn.Module subclass, got <class 'int'>"),
        (MyConv(3, 4), ChannelRule(), "expected an nn.Module subclass"),
        (MyConv, {"out_axis": 0}, "expected a ChannelRule, got dict"),
        (MyConv, ChannelRule(out_axis=-1), "out_axis: expected a non-negative int, got -1"),
        (MyConv, ChannelRule(in_axis=0), r"in_axis: must differ from out_axis \(0\)"),
        (MyConv, ChannelRule(in_axis=None), "in_axis: None is for element-wise layers"),
        (MyConv, ChannelRule(in_channels=3), "in_channels: expected an attribute name or None, got 3"),
        (MyConv, ChannelRule(per_channel="bias"), "per_channel: expected a tuple of attribute names, got 'bias'"),
        (MyConv, ChannelRule(input_rank=1), "input_rank: expected an int ≥ 2 or None, got 1"),
    ],
)
def test_bad_registrations_are_errors(rules, cls, rule, message):
    with pytest.raises(fxqp.ChannelRuleError, match=message) as info:
        fxqp.register_channel_rule(cls, rule)
    assert isinstance(info.value, fxqp.FxqpError)
    assert rule_for(MyConv) is None


def test_a_rule_that_does_not_fit_its_module_is_an_error_at_transform(rules):
    fxqp.register_channel_rule(MyConv, ChannelRule(out_channels="filters"))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(fxqp.ChannelRuleError, match="MyConv: its channel rule names attribute 'filters', which is None, not an int"):
        fxqp.transform(CustomNet(), SPEC, example_inputs=(x,))
