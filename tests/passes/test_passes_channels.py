"""Channel coupling groups: what must be pruned together, and that it is enough.

The key property, checked on torchvision models: zeroing channel ``c`` of a prunable
group (its producers' filter and bias, its followers' channel) makes that channel zero
everywhere it is read, so the consumers' input channel ``c`` no longer matters and can be
removed without changing the model's outputs.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn

from passes import trace
from passes.channels import ChannelGroup, Member, channel_groups


def _kill(gm, group: ChannelGroup, c: int) -> None:
    with torch.no_grad():
        for member in group.producers + group.followers:
            module = gm.get_submodule(member.module)
            module.weight.select(member.axis, member.offset + c).zero_()
            if getattr(module, "bias", None) is not None:
                module.bias[member.offset + c] = 0


def _scramble_consumers(gm, group: ChannelGroup, c: int) -> None:
    with torch.no_grad():
        for member in group.consumers:
            module = gm.get_submodule(member.module)
            groups, channel = getattr(module, "groups", 1), member.offset + c
            if groups > 1:  # a grouped conv: group j's filters read its channels as local inputs
                per_group, rows = module.in_channels // groups, module.out_channels // groups
                j = channel // per_group
                module.weight[j * rows : (j + 1) * rows, channel - j * per_group].normal_()
                continue
            module.weight.narrow(member.axis, channel * member.repeat, member.repeat).normal_()


def _groups(model, x):
    gm = trace(model.eval()).graph_module
    return gm, channel_groups(gm, (x,))


@pytest.mark.parametrize(
    "name, min_prunable",
    [("resnet18", 12), ("mobilenet_v2", 25), ("densenet121", 60), ("shufflenet_v2_x0_5", 10), ("regnet_x_400mf", 5), ("vgg11", 10)],
)
def test_zeroed_group_channels_are_dead_for_their_consumers(name, min_prunable):
    torch.manual_seed(0)
    gm, groups = _groups(torchvision.models.get_model(name, num_classes=10), torch.randn(2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) >= min_prunable
    for group in prunable:
        c = group.size // 2
        killed = copy.deepcopy(gm)
        _kill(killed, group, c)
        scrambled = copy.deepcopy(killed)
        _scramble_consumers(scrambled, group, c)
        with torch.no_grad():
            assert torch.allclose(killed(x), scrambled(x), atol=1e-5), [m.module for m in group.producers]
    assert any(g.blocked == "model output" for g in groups)


def test_resnet_residual_stage_is_one_group():
    _, groups = _groups(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32))
    stem = next(g for g in groups if Member("conv1", 0) in g.producers)
    assert {m.module for m in stem.producers} == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert {m.module for m in stem.followers} == {"bn1", "layer1.0.bn2", "layer1.1.bn2"}
    assert {m.module for m in stem.consumers} == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"}
    assert stem.prunable and stem.size == 64
    inner = next(g for g in groups if Member("layer1.0.conv1", 0) in g.producers)
    assert inner.producers == [Member("layer1.0.conv1", 0)] and inner.consumers == [Member("layer1.0.conv2", 1, 0)]
    fc = next(g for g in groups if Member("fc", 0) in g.producers)
    assert fc.blocked == "model output"


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.shared = nn.Conv2d(10, 10, 1)
        self.gate = nn.Conv2d(10, 10, 1)
        self.head = nn.Conv2d(10, 5, 1)
        self.mixer = nn.Conv2d(10, 10, 1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        y = self.shared(y)
        y = y * torch.sigmoid(self.gate(y))  # a product with the gate: coupled, and zero when y is
        z = self.mixer(torch.sigmoid(y))  # sigmoid(0) = 0.5 reaches a conv: blocked
        return self.head(y) + z.sum(1, keepdim=True)


def test_concat_offsets_gates_and_nonzero_maps():
    _, groups = _groups(Branches(), torch.randn(1, 3, 4, 4))
    a = next(g for g in groups if Member("a", 0) in g.producers)
    b = next(g for g in groups if Member("b", 0) in g.producers)
    assert a.prunable and b.prunable
    assert Member("shared", 1, 0) in a.consumers and Member("shared", 1, 4) in b.consumers
    shared = next(g for g in groups if Member("shared", 0) in g.producers)
    assert Member("gate", 0) in shared.producers  # coupled through the product
    assert shared.blocked is not None and "not zero when pruned" in shared.blocked


def test_grouped_convolution_balances_its_runs_and_depthwise_follows():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(3, 8, 1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2)
            self.grouped2 = nn.Conv2d(12, 12, 1, groups=3)
            self.side = nn.Conv2d(3, 4, 1)
            self.on_cat = nn.Conv2d(16, 4, 1, groups=2)
            self.out = nn.Conv2d(12, 2, 1)

        def forward(self, x):
            y = self.grouped(self.dw(self.pw(x)))
            return self.out(self.grouped2(y)) + self.on_cat(torch.cat([self.side(x), y], 1)).mean()

    _, groups = _groups(Net(), torch.randn(1, 3, 5, 5))
    pw = next(g for g in groups if Member("pw", 0) in g.producers)
    assert Member("dw", 0) in pw.followers and Member("grouped", 1) in pw.consumers
    assert pw.prunable and pw.blocks == 2
    # read by convolutions of 2 and 3 groups: 6 runs of 2 channels
    y = next(g for g in groups if Member("grouped", 0) in g.producers)
    assert y.blocks == 6 and Member("grouped2", 1) in y.consumers
    # a grouped convolution over concatenated channels is not understood: blocked
    assert "over concatenated channels" in y.blocked
    side = next(g for g in groups if Member("side", 0) in g.producers)
    assert "over concatenated channels" in side.blocked


def test_a_module_called_twice_couples_its_inputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Conv2d(3, 6, 1)
            self.q = nn.Conv2d(3, 6, 1)
            self.shared = nn.Conv2d(6, 6, 1)
            self.out = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.out(self.shared(self.p(x)) * self.shared(self.q(x)))

    gm, groups = _groups(Net(), torch.randn(1, 3, 4, 4))
    inputs = next(g for g in groups if Member("p", 0) in g.producers)
    assert Member("q", 0) in inputs.producers and inputs.consumers == [Member("shared", 1, 0)] and inputs.prunable
    outputs = next(g for g in groups if Member("shared", 0) in g.producers)
    assert outputs.producers == [Member("shared", 0)] and outputs.prunable


def test_flatten_to_linear_reads_each_channel_as_a_block_of_features():
    gm, groups = _groups(torchvision.models.vgg11(num_classes=10), torch.randn(1, 3, 32, 32))
    last = next(g for g in groups if Member("features.18", 0) in g.producers)
    assert last.prunable and last.consumers == [Member("classifier.0", 1, 0, 49)]  # 512 channels x 7x7 positions
