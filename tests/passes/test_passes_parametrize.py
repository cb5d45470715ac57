"""Tests for passes.parametrize."""

import copy
import importlib

import pytest
import torch
from torch import nn

from passes import PassError, original_of, parametrizations_of, parametrize, trace

pp = importlib.import_module("passes.parametrize")  # the package exports a function of that name


class Double(nn.Module):
    def forward(self, w):
        return w * 2


class PlusOne(nn.Module):
    def forward(self, w):
        return w + 1


class Truncate(nn.Module):
    """Changes the shape: refused with unsafe=False."""

    def forward(self, w):
        return w[:1]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.block(x))


def test_order_is_first_applied_first():
    model = Net()
    w = model.block[0].weight
    w_before = w.detach().clone()
    double, plus_one = Double(), PlusOne()

    parametrize(model, "block.0.weight", [double, plus_one])

    assert torch.equal(model.block[0].weight, 2 * w_before + 1)
    assert parametrizations_of(model.block[0], "weight") == [double, plus_one]
    assert parametrizations_of(model, "block.0.weight") == [double, plus_one]
    assert original_of(model.block[0], "weight") is w
    assert original_of(model, "block.0.weight") is w


def test_optimizer_trains_the_original():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1))
    parametrize(model, "0.weight", [Double(), PlusOne()])
    names = dict(model.named_parameters())
    assert "0.parametrizations.weight.original" in names
    assert "0.weight" not in names
    assert "0.parametrizations.weight.original" in model.state_dict()

    original = names["0.parametrizations.weight.original"]
    before = original.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    model(x).sum().backward()
    # d(sum)/d(original) = 2 * sum_rows(x)
    assert torch.allclose(original.grad, 2 * x.sum(0, keepdim=True))
    optimizer.step()
    assert torch.allclose(original, before - 0.1 * 2 * x.sum(0, keepdim=True))
    assert torch.allclose(model[0].weight, 2 * original + 1)


def test_works_on_a_graph_module_and_changes_its_output():
    torch.manual_seed(0)
    model = Net().eval()
    gm = trace(model).graph_module
    x = torch.randn(4, 3)
    expected = nn.functional.linear(model.block(x), 2 * model.fc.weight + 1, model.fc.bias)
    code = gm.code

    parametrize(gm, "fc.weight", [Double(), PlusOne()])

    assert gm.code == code
    assert torch.allclose(gm(x), expected)


def test_appends_to_existing_parametrizations():
    model = Net()
    w = model.fc.weight.detach().clone()
    parametrize(model, "fc.weight", [Double()])
    parametrize(model, "fc.weight", [PlusOne(), Double()])
    assert len(parametrizations_of(model, "fc.weight")) == 3
    assert torch.equal(model.fc.weight, (2 * w + 1) * 2)


def test_empty_list_is_a_no_op():
    model = Net()
    parametrize(model, "fc.weight", [])
    assert parametrizations_of(model, "fc.weight") == []


def test_unparametrized_queries():
    model = Net()
    assert parametrizations_of(model.fc, "weight") == []
    assert original_of(model.fc, "weight") is model.fc.weight
    assert original_of(model, "block.1.running_mean") is model.block[1].running_mean


@pytest.mark.parametrize(
    "path, message",
    [
        ("nope.weight", "'nope' is not a submodule"),
        ("block.5.weight", "'block.5' is not a submodule"),
        ("fc.nope", "has no attribute 'nope'"),
        ("block.1.running_mean", "not an nn.Parameter"),
        ("block.1.training", "not an nn.Parameter"),
        ("fc", "'fc' is a Linear, not an nn.Parameter"),
        ("", "invalid"),
    ],
)
def test_bad_paths_raise_and_name_the_path(path, message):
    model = Net()
    with pytest.raises(PassError, match=message) as info:
        parametrize(model, path, [Double()])
    assert repr(path) in str(info.value)


def test_bias_none_is_not_a_parameter():
    model = nn.Sequential(nn.Linear(3, 3, bias=False))
    with pytest.raises(PassError, match="'0.bias'.*NoneType"):
        parametrize(model, "0.bias", [Double()])


def test_refused_parametrization_is_rolled_back():
    model = Net()
    w = model.fc.weight
    with pytest.raises(PassError, match="'fc.weight' with Truncate"):
        parametrize(model, "fc.weight", [Double(), Truncate()])
    assert parametrizations_of(model, "fc.weight") == []
    assert type(model.fc) is nn.Linear
    assert model.fc.weight is w

    parametrize(model, "fc.weight", [Double()])
    with pytest.raises(PassError):
        parametrize(model, "fc.weight", [PlusOne(), Truncate()])
    assert [type(p) for p in parametrizations_of(model, "fc.weight")] == [Double]


def test_non_module_parametrization_is_rejected():
    model = Net()
    with pytest.raises(PassError, match="nn.Module"):
        parametrize(model, "fc.weight", [lambda w: w])
    assert parametrizations_of(model, "fc.weight") == []


def test_original_of_missing_tensor_raises():
    with pytest.raises(PassError):
        original_of(Net(), "fc.nope")
    with pytest.raises(PassError):
        original_of(Net(), "nope.weight")


# -- check=False on a module without parametrizations: the whole chain registered at once --


def _parametrized_twice(fast: bool):
    """A Linear whose weight is parametrized by [Double, PlusOne], by the one-call path
    (``fast``) or by torch's one registration per entry."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    if fast:
        parametrize(model, "0.weight", [Double(), PlusOne()], check=False)
    else:
        for p in (Double(), PlusOne()):
            torch.nn.utils.parametrize.register_parametrization(model[0], "weight", p, unsafe=True)
    return model


def _structure(module: nn.Module) -> tuple:
    chain = module.parametrizations.weight
    return (
        type(module).__name__,
        type(module).__bases__,
        sorted(vars(type(module))),
        sorted(vars(module)),
        sorted(module.parametrizations._modules),
        {k: v for k, v in vars(chain).items() if not isinstance(v, dict)},
        {k: sorted(v) for k, v in vars(chain).items() if isinstance(v, dict)},
        [p.training for p in chain],
    )


def test_check_false_registers_what_torch_registers():
    assert pp._register_at_once_matches_torch()
    ours, theirs = _parametrized_twice(True), _parametrized_twice(False)
    assert _structure(ours[0]) == _structure(theirs[0])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    x = torch.randn(4, 3)
    assert torch.equal(ours(x), theirs(x))
    assert [p.training for p in ours[0].parametrizations.weight] == [False, False]  # the module's mode


def test_check_false_keeps_the_parameter_object_and_trains_it():
    model = nn.Sequential(nn.Linear(3, 1))
    w = model[0].weight
    parametrize(model, "0.weight", [Double(), PlusOne()], check=False)
    assert model[0].parametrizations.weight.original is w
    assert any(p is w for p in model.parameters())  # what an optimizer built from it trains
    x = torch.randn(4, 3)
    model(x).sum().backward()
    assert torch.allclose(w.grad, 2 * x.sum(0, keepdim=True))


def test_check_false_registration_supports_torch_utilities():
    from torch.nn.utils import parametrize as P

    model = _parametrized_twice(True)
    w = model[0].parametrizations.weight.original.detach().clone()
    twin = copy.deepcopy(model)
    assert torch.equal(twin[0].weight, 2 * w + 1)
    assert twin[0].parametrizations.weight.original is not model[0].parametrizations.weight.original
    with P.cached():
        assert model[0].weight is model[0].weight
    assert P.type_before_parametrizations(model[0]) is nn.Linear
    P.remove_parametrizations(model[0], "weight", leave_parametrized=True)
    assert type(model[0]) is nn.Linear
    assert torch.equal(model[0].weight, 2 * w + 1)


def test_check_false_falls_back_to_torch_where_it_would_differ(monkeypatch):
    calls = []
    real = torch.nn.utils.parametrize.register_parametrization

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils.parametrize, "register_parametrization", counting)

    class WithInverse(Double):
        def right_inverse(self, w):
            return w / 2

    model = Net()
    parametrize(model, "fc.weight", [Double(), PlusOne()], check=False)
    assert calls == []  # registered at once
    parametrize(model, "fc.bias", [PlusOne()], check=False)  # the module is parametrized already
    parametrize(model, "block.0.weight", [WithInverse()], check=False)  # torch would call right_inverse
    assert calls == ["bias", "weight"]
    handle = nn.modules.module.register_module_parameter_registration_hook(lambda *a: None)
    try:
        parametrize(model, "block.0.bias", [PlusOne()], check=False)  # torch would call the hook
    finally:
        handle.remove()
    assert calls == ["bias", "weight", "bias"]


@pytest.mark.parametrize("missing", ["ntensors", "training"])
def test_a_torch_that_builds_parametrizations_differently_gets_its_own(monkeypatch, missing):
    real = pp._register_at_once

    def incomplete(module, name, original, parametrizations):
        real(module, name, original, parametrizations)
        chain = module.parametrizations[name]
        if missing == "training":
            for p in chain:
                p.training = not module.training
        else:
            del chain.__dict__[missing]

    monkeypatch.setattr(pp, "_register_at_once", incomplete)
    assert not pp._register_at_once_matches_torch.__wrapped__()
