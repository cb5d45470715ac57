"""Coupled filter pruning: one channel decision per group, exact zeros everywhere it is read."""

import pytest
import torch
import torchvision
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.groups import FilterGroup
from fxqp.lower.size import site_sizes

SPEC = Spec(rules=[Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.25, structure="filter", start=1, end=3), Quantize(bits=4)])])


def _train(gm, x, steps=4):
    optimizer = torch.optim.SGD(gm.parameters(), lr=1e-3)
    gm.train()
    for _ in range(steps):
        optimizer.zero_grad()
        gm(x).pow(2).mean().backward()
        optimizer.step()
    gm.eval()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    gm = fxqp.transform(torchvision.models.resnet18(num_classes=10), SPEC, example_inputs=(x,))
    _train(gm, x)
    return gm, x


def test_groups_share_one_channel_mask_and_zero_whole_channels(resnet):
    gm, x = resnet
    groups = list(gm.fxqp_groups.children())
    assert len(groups) == 12 and all(isinstance(g, FilterGroup) for g in groups)
    stem = next(g for g in groups if "conv1.weight," in g.site)
    pruned = ~stem.keep
    assert int(pruned.sum()) == 16  # round(0.25 * 64)
    outputs = {}
    hooks = [
        gm.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: outputs.__setitem__(p, o))
        for p in ("conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2", "layer1.1.bn2")
    ]
    with torch.no_grad():
        gm(x)
    for hook in hooks:
        hook.remove()
    for path, out in outputs.items():
        assert torch.all(out[:, pruned] == 0), path  # conv outputs (bias masked) and BN outputs (scale, shift masked)
        assert torch.all(out[:, ~pruned].abs().sum((0, 2, 3)) > 0), path
    for path in ("conv1", "layer1.0.conv2", "layer1.1.conv2"):
        w = gm.get_submodule(path).weight
        assert torch.equal(w.flatten(1).abs().sum(1) == 0, pruned)


def test_lowering_removes_the_pruned_channels(resnet, tmp_path):
    gm, x = resnet
    low = fxqp.lower(gm)
    assert not hasattr(low, "fxqp_groups")
    assert len(low.meta["fxqp"]["removed"]) == 12
    conv1, bn1, consumer = low.get_submodule("conv1"), low.get_submodule("bn1"), low.get_submodule("layer1.0.conv1")
    assert conv1.out_channels == 48 and conv1.weight.shape == (48, 3, 7, 7)  # 64 - 16 filters
    assert bn1.num_features == 48 and bn1.running_mean.shape == (48,) and bn1.weight.shape == (48,)
    assert consumer.in_channels == 48 and consumer.out_channels == 48 and consumer.weight.shape == (48, 48, 3, 3)
    assert low.get_submodule("fc").in_features == 384  # 512 - 128
    with torch.no_grad():
        expected, got = gm(x), low(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)  # only the order of sums differs
    note = next(n for n in fxqp.summary(low).notes if n.startswith("pruned channels removed"))
    assert "in 12 channel groups" in note and "multiply-accumulates of the example input" in note
    before, after = low.meta["fxqp"]["macs"]
    assert after < 0.7 * before
    fxqp.save(low, tmp_path / "r.fxqp")
    loaded = fxqp.load(tmp_path / "r.fxqp", torchvision.models.resnet18(num_classes=10))
    assert loaded.get_submodule("conv1").weight.shape == (48, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x), got)


def test_no_removal_when_activations_are_pruned():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    spec = Spec(rules=[*SPEC.rules, Rule(modules=["ReLU"], activation=[Prune(sparsity=0.5, dynamic=True)])])
    gm = fxqp.transform(torchvision.models.resnet18(num_classes=10), spec, example_inputs=(x,))
    _train(gm, x)
    low = fxqp.lower(gm)
    assert low.meta["fxqp"]["removed"] == [] and low.get_submodule("conv1").weight.shape == (64, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(low(x), gm(x))


def test_summary_names_coupled_and_per_layer_groups(resnet):
    gm, _ = resnet
    notes = fxqp.summary(gm).notes
    assert any(n.startswith("coupled filter groups: 12") for n in notes)
    assert "fc.weight: filters pruned per layer, not removable (model output)" in notes
    plain = fxqp.transform(torchvision.models.resnet18(num_classes=10), SPEC)  # no example_inputs: per layer
    assert not hasattr(plain, "fxqp_groups")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        y = y + self.b(y)
        return self.head(self.dw(y)).mean((2, 3))


def test_coupled_groups_compile_and_match_eager():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(0)
    eager = fxqp.transform(Residual(), SPEC, example_inputs=(x,))
    compiled_model = fxqp.transform(Residual(), SPEC, example_inputs=(x,))
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(4):
        assert torch.allclose(eager(x), compiled(x), atol=1e-5)
    group = next(iter(eager.fxqp_groups.children()))
    assert "a.weight, b.weight" in group.site
    assert torch.equal(group.keep, next(iter(compiled_model.fxqp_groups.children())).keep)
    assert int((~group.keep).sum()) == 2
    dw = eager.dw.weight  # the depthwise follower's own filter pruner follows the group
    assert torch.equal(dw.flatten(1).abs().sum(1) == 0, ~group.keep)


def test_coupled_input_channels_compile_and_match_eager():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 6, 6)
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.25, structure="channel", start=1, end=3), Quantize(bits=4)])])
    torch.manual_seed(0)
    eager = fxqp.transform(Residual(), spec, example_inputs=(x,))
    compiled_model = fxqp.transform(Residual(), spec, example_inputs=(x,))
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(4):
        assert torch.allclose(eager(x), compiled(x), atol=1e-5)
    group = next(iter(eager.fxqp_groups.children()))
    assert {m.module for m in group.consumers} == {"b", "head"}
    assert int((~group.keep).sum()) == 2
    for model in (eager, compiled_model):
        for name in ("b", "head"):  # both readers zero the same input channels
            assert torch.equal(model.get_submodule(name).weight.abs().sum((0, 2, 3)) == 0, ~group.keep)


def test_filters_scored_by_the_layers_that_read_them():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).mean((2, 3))

    torch.manual_seed(0)
    model = Chain()
    with torch.no_grad():
        model.a.weight[[1, 6]] *= 100  # big own filters ...
        model.b.weight[:, [1, 6]] *= 0.001  # ... that the next layer hardly reads
    x = torch.randn(2, 3, 5, 5)
    for score_from, expected in (("own", {1, 6}), ("next", {1, 6})):
        spec = Spec(rules=[Rule(names=["a"], weight=[Prune(sparsity=0.25, structure="filter", score_from=score_from), Quantize(bits=4)])])
        gm = fxqp.transform(model, spec, example_inputs=(x,))
        gm.train()
        gm(x)
        pruned = set(torch.nonzero(~next(iter(gm.fxqp_groups.children())).keep).flatten().tolist())
        if score_from == "own":
            assert not pruned & expected  # own L1: the big filters are kept
        else:
            assert pruned == expected  # the next layer's L1 of input channels 1 and 6 is tiny
    with pytest.raises(fxqp.SpecError, match="score_from: 'next' scores filters"):
        Prune(sparsity=0.5, score_from="next")


def test_readers_are_read_as_they_are_now_after_their_parameter_is_replaced():
    """A group scored by the next layer reads that layer's weight at each refresh, wherever it
    is now: ``load_state_dict(assign=True)`` (and FSDP2's ``fully_shard``, tests/test_fsdp.py)
    put another ``Parameter`` in its place."""

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    spec = Spec(rules=[Rule(names=["a"], weight=[Prune(sparsity=0.25, structure="filter", score_from="next", start=1), Quantize(bits=4)])])
    gm = fxqp.transform(Chain(), spec, example_inputs=(x,))
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    state["b.weight"][:, [1, 6]] *= 0.001  # input channels 1 and 6 hardly read: filters 1 and 6 of a go
    before = gm.b.weight
    gm.load_state_dict(state, assign=True)
    assert gm.b.weight is not before
    gm.train()
    gm(x)
    gm(x)  # step 1: the refresh
    assert torch.nonzero(~gm.fxqp_groups.a.keep).flatten().tolist() == [1, 6]


@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet_v2_x0_5", "regnet_x_400mf", "densenet121"])
def test_families_lower_smaller_and_match(name, tmp_path):
    """Depthwise followers (mobilenet), channel shuffles (shufflenet: blocked where channels
    are permuted), grouped convolutions (regnet) and dense concatenations (densenet: batch
    norms that read many groups side by side); the artifact replays the removal.

    In float64: the untrained networks amplify activations (and float32 rounding differences
    of the reordered sums) layer after layer, so float32 would measure the arithmetic rather
    than the removal."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    spec = Spec(
        rules=[Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5, structure="filter"), Quantize(bits=2, method="dorefa")])]
    )
    gm = fxqp.transform(torchvision.models.get_model(name, num_classes=10).double(), spec, example_inputs=(x,))
    gm.train()
    with torch.no_grad():
        gm(x)  # masks computed at step 0
    gm.eval()
    low = fxqp.lower(gm)
    before = sum(p.numel() for p in torchvision.models.get_model(name, num_classes=10).parameters())
    after = sum(s.n for s in site_sizes(low))
    after += sum(p.numel() for n, p in low.named_parameters() if "parametrizations" not in n)
    assert after < 0.8 * before
    fxqp.save(low, tmp_path / "m.fxqp")
    loaded = fxqp.load(tmp_path / "m.fxqp", torchvision.models.get_model(name, num_classes=10).double())
    with torch.no_grad():
        expected = gm(x)
        assert torch.equal(loaded(x), low(x))
        assert torch.allclose(low(x), expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


class _GroupedBlock(nn.Module):
    """RegNet's X block: 1x1 conv, a 3x3 convolution of 4 groups, 1x1 conv, residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 24, 1)
        self.bn_a = nn.BatchNorm2d(24)
        self.b = nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.bn_b = nn.BatchNorm2d(24)
        self.c = nn.Conv2d(24, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = self.c(torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(s)))))))
        return self.head(torch.relu(s + y).mean((2, 3)))


@pytest.mark.parametrize("criterion, score_from", [("l1", "own"), ("angle", "next")])
def test_grouped_convolutions_lose_as_many_channels_in_every_group(criterion, score_from, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    prune = Prune(sparsity=0.5, structure="filter", criterion=criterion, score_from=score_from)
    spec = Spec(rules=[Rule(modules=["Conv2d", "Linear"], weight=[prune, Quantize(bits=4)])])
    gm = fxqp.transform(_GroupedBlock(), spec, example_inputs=(x,))
    _train(gm, x, steps=2)
    groups = {g.site: g for g in gm.fxqp_groups.children()}
    for name in ("group of a.weight", "group of b.weight"):
        keep = groups[name].keep.view(4, 6)  # b has 4 groups of 6 channels on each side
        assert groups[name].blocks == 4 and keep.sum(1).tolist() == [3, 3, 3, 3]
    low = fxqp.lower(gm)
    assert (low.b.in_channels, low.b.out_channels, low.b.groups) == (12, 12, 4)
    assert (low.a.out_channels, low.c.in_channels) == (12, 12)
    with torch.no_grad():
        expected = gm(x)
        torch.testing.assert_close(low(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    fxqp.save(low, tmp_path / "g.fxqp")
    loaded = fxqp.load(tmp_path / "g.fxqp", _GroupedBlock())
    with torch.no_grad():
        assert torch.equal(loaded(x), low(x))


def test_input_channel_pruning_is_coupled_and_removed(tmp_path):
    """``structure="channel"``: the layers reading a group prune the same input channels,
    chosen from their summed scores; lowering removes them along with the producers'
    filters, which nothing reads any more. The first conv reads the model's input: its
    channels stay pruned per layer."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    spec = Spec(rules=[Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5, structure="channel"), Quantize(bits=4)])])
    gm = fxqp.transform(torchvision.models.resnet18(num_classes=10), spec, example_inputs=(x,))
    _train(gm, x, steps=2)
    stem = next(g for g in gm.fxqp_groups.children() if "layer1.0.conv1.weight" in g.site)
    assert {m.module for m in stem.consumers} == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"}
    assert int(stem.keep.sum()) == 32
    for member in stem.consumers:
        pruner = gm.get_submodule(member.module).parametrizations.weight[0]
        assert torch.equal(pruner.mask.all(dim=(0, 2, 3)), stem.keep)
    # the group's score is the sum of its readers' L1 input-channel norms: the kept are the largest
    score = sum(gm.get_submodule(m.module).parametrizations.weight.original.detach().abs().sum((0, 2, 3)) for m in stem.consumers)
    assert score[stem.keep].min() > score[~stem.keep].max()
    notes = "\n".join(fxqp.summary(gm).notes)
    assert "conv1.weight: input channels pruned per layer, not removable (model input" in notes
    low = fxqp.lower(gm)
    assert (low.conv1.out_channels, low.get_submodule("layer1.0.conv1").in_channels, low.fc.in_features) == (32, 32, 256)
    with torch.no_grad():
        expected = gm(x)
        torch.testing.assert_close(low(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    fxqp.save(low, tmp_path / "c.fxqp")
    loaded = fxqp.load(tmp_path / "c.fxqp", torchvision.models.resnet18(num_classes=10))
    with torch.no_grad():
        assert torch.equal(loaded(x), low(x))


def test_groups_are_named_after_their_first_producer_whatever_else_is_pruned():
    """A group keeps its state-dict keys when a spec prunes more groups: the state of a
    model that prunes the last layer loads into one that also prunes an earlier one."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))

    def spec(layers):
        return Spec(
            rules=[
                Rule(modules=["Conv2d"], weight=[Quantize(bits=4)]),
                Rule(names=layers, weight=[Quantize(bits=4), Prune(sparsity=0.25, structure="filter")]),
            ]
        )

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    late = fxqp.transform(Net(), spec(["b"]), example_inputs=(x,))
    _train(late, x, steps=1)  # computes b's filter mask
    both = fxqp.transform(Net(), spec(["a", "b"]), example_inputs=(x,))
    assert [name for name, _ in late.fxqp_groups.named_children()] == ["b"]
    assert [name for name, _ in both.fxqp_groups.named_children()] == ["a", "b"]
    result = both.load_state_dict(late.state_dict(), strict=False)
    assert result.unexpected_keys == ["a.bias"]  # pruning a's filters masks its bias: a.parametrizations.bias.original
    assert all(
        key.startswith(("fxqp_groups.a.", "a.parametrizations.weight.1.", "a.parametrizations.bias.")) for key in result.missing_keys
    )
    assert torch.equal(both.fxqp_groups.b.keep, late.fxqp_groups.b.keep) and not bool(late.fxqp_groups.b.keep.all())
