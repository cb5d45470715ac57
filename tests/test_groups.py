"""Coupled filter pruning: one channel decision per group, exact zeros everywhere it is read."""

import pytest
import torch
import torchvision
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.groups import FilterGroup

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
    hooks = [gm.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: outputs.__setitem__(p, o)) for p in ("conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2", "layer1.1.bn2")]
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


def test_lowered_and_loaded_models_equal_the_masked_model(resnet, tmp_path):
    gm, x = resnet
    low = fxqp.lower(gm)
    assert not hasattr(low, "fxqp_groups")
    with torch.no_grad():
        assert torch.equal(low(x), gm(x))
    fxqp.save(low, tmp_path / "r.fxqp")
    loaded = fxqp.load(tmp_path / "r.fxqp", torchvision.models.resnet18(num_classes=10))
    with torch.no_grad():
        assert torch.equal(loaded(x), low(x))


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
