"""passes.modes: what a model computes differently in training and evaluation mode is
switched at run time, and everything around it stays traced."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import fx, nn
from torch.nn import functional as F

from passes import UntraceableError, trace
from passes.modes import ModeSwitch, compare_modes


class BatchNormAct(nn.BatchNorm2d):
    """Batch norm written out in Python with its activation inside (as timm's BatchNormAct2d)."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        use_batch = True if self.training else (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch, factor, self.eps)
        return self.act(x)


class Net(nn.Module):
    """Convolutions with Python batch norms, and dropout in the root's own forward (as ghostnet's head)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = BatchNormAct(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = BatchNormAct(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        x = x.mean((2, 3))
        x = F.dropout(x, 0.5, training=self.training)
        return self.fc(x)


def modules_called(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_training_dependent_code_becomes_switches_and_activations_stay_in_the_graph():
    torch.manual_seed(0)
    model = Net()
    result = trace(model)
    gm = result.graph_module
    assert result.mode_leaves == () and result.leaves == ()
    assert result.mode_switches == ("bn1.fxqp_mode_0", "bn1.fxqp_mode_1", "bn2.fxqp_mode_0", "bn2.fxqp_mode_1", "fxqp_mode_0")
    # the activations inside the batch norms are calls of their own
    assert [t for t in modules_called(gm) if not isinstance(gm.get_submodule(t), ModeSwitch)] == [
        "conv1",
        "bn1.act",
        "conv2",
        "bn2.act",
        "fc",
    ]
    for path in result.mode_switches:
        assert isinstance(gm.get_submodule(path), ModeSwitch)
    assert gm.get_submodule("fxqp_mode_0").source == ""
    assert gm.get_submodule("bn1.fxqp_mode_1").source == "bn1"
    gm.graph.lint()
    assert [m.training for m in model.modules()] == [True] * 8  # the model's flags are as they were

    x = torch.randn(6, 3, 8, 8)
    reference = copy.deepcopy(model)
    # training: batch statistics, running averages updated, dropout drawn
    torch.manual_seed(1)
    out = gm(x)
    torch.manual_seed(1)
    expected = reference(x)
    assert torch.allclose(out, expected, atol=1e-6)
    for name in ("bn1", "bn2"):
        ours, theirs = model.get_submodule(name), reference.get_submodule(name)
        assert torch.allclose(ours.running_mean, theirs.running_mean, atol=1e-6)
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 1
    # evaluation: running averages, no dropout, no counting
    gm.eval()
    reference.eval()
    with torch.no_grad():
        first, second = gm(x), gm(x)
        assert torch.equal(first, second)
        assert torch.allclose(first, reference(x), atol=1e-6)
    assert model.bn1.num_batches_tracked.item() == 1


def test_a_switch_follows_the_flag_of_the_module_it_came_from():
    torch.manual_seed(0)
    model = Net()
    gm = trace(model).graph_module
    gm.train()
    gm.bn1.eval()  # frozen statistics in one block, as users do for a pretrained backbone
    assert not gm.get_submodule("bn1.fxqp_mode_1").training
    assert gm.get_submodule("bn2.fxqp_mode_1").training
    before = model.bn1.running_mean.clone()
    gm(torch.randn(4, 3, 8, 8))
    assert torch.equal(model.bn1.running_mean, before) and model.bn1.num_batches_tracked.item() == 0
    assert model.bn2.num_batches_tracked.item() == 1


def test_drop_path_is_the_identity_in_evaluation():
    """torchvision's StochasticDepth returns its input unchanged in evaluation: the
    evaluation branch passes the value through."""
    model = nn.Sequential(nn.Linear(4, 4), torchvision.ops.StochasticDepth(0.5, "row"), nn.ReLU())
    result = trace(model)
    gm = result.graph_module
    assert result.mode_leaves == () and result.mode_switches == ("1.fxqp_mode_0",)
    assert modules_called(gm) == ["0", "1.fxqp_mode_0", "2"]
    x = torch.randn(64, 4)
    gm.eval()
    model.eval()
    assert torch.equal(gm(x), model(x))
    gm.train()
    out = gm(x)
    rows_dropped = (out == 0).all(dim=1) & (torch.relu(model[0](x)) != 0).any(dim=1)
    assert rows_dropped.any()  # p = 0.5 over 64 rows: some are dropped


class CallsOtherModules(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) if self.training else self.b(x)


def test_a_module_calling_other_modules_by_mode_becomes_a_leaf():
    model = nn.Sequential(nn.Linear(4, 4), CallsOtherModules(), nn.ReLU())
    result = trace(model)
    assert result.mode_leaves == ("1",) and result.mode_switches == ()
    assert modules_called(result.graph_module) == ["0", "1", "2"]
    x = torch.randn(3, 4)
    for mode in (True, False):
        result.graph_module.train(mode)
        model.train(mode)
        assert torch.equal(result.graph_module(x), model(x))


class ReturnsByMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if self.training:
            return {"loss": y.sum()}
        return y


def test_a_root_that_returns_other_things_by_mode_is_an_error_naming_it():
    with pytest.raises(UntraceableError) as info:
        trace(ReturnsByMode())
    assert info.value.module_path == ""
    message = str(info.value)
    assert "the root module (ReturnsByMode)" in message
    assert "training and in evaluation mode" in message and "returned values" in message


def test_graphs_that_agree_give_no_region():
    model = torchvision.models.resnet18(num_classes=10)
    a = fx.symbolic_trace(model)
    b = fx.symbolic_trace(model.eval())
    diff = compare_modes(a.graph, b.graph)
    assert diff.regions == [] and len(diff.pairs) == len(a.graph.nodes)


def test_switched_models_deepcopy_and_compile():
    torch.manual_seed(0)
    gm = trace(Net()).graph_module.eval()
    x = torch.randn(2, 3, 8, 8)
    clone = copy.deepcopy(gm)
    assert torch.equal(clone(x), gm(x))
    clone.train()
    clone(x)
    assert gm.bn1.fxqp_mode_0.training is False  # the copy's flags are its own
    compiled = torch.compile(gm, backend="eager")
    assert torch.allclose(compiled(x), gm(x))
