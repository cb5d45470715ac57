"""What torch does that fxqp's remaining class swaps work around (docs/developers.md,
"Torch objects changed in place"): each test fails when torch changes underneath, so that
the workaround is looked at again (removed where torch no longer needs it)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from fxqp.lower.lower import own_parametrized_class
from fxqp.pickling import PicklableGraphModule, picklable_graph_module


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def _parametrized() -> nn.Linear:
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    parametrize.register_parametrization(module, "weight", _Double(), unsafe=True)
    parametrize.register_parametrization(module, "bias", _Double(), unsafe=True)
    return module


def test_a_deep_copy_of_a_parametrized_module_shares_torchs_class():
    """Why lowering gives a module its own class before removing parametrizations."""
    original = _parametrized()
    twin = copy.deepcopy(original)
    assert type(twin) is type(original)
    parametrize.remove_parametrizations(twin, "bias", leave_parametrized=True)
    assert "bias" not in vars(type(original))  # the original lost the property it reads bias by
    with pytest.raises(AttributeError):
        _ = original.bias


def test_an_own_class_keeps_the_original_whole():
    original = _parametrized()
    expected = original.weight.detach().clone(), original.bias.detach().clone()
    twin = copy.deepcopy(original)
    own_parametrized_class(twin)
    assert type(twin) is not type(original) and type(twin).__bases__ == type(original).__bases__
    assert type(twin).__name__ == type(original).__name__
    for name in ("weight", "bias"):
        parametrize.remove_parametrizations(twin, name, leave_parametrized=True)
    assert type(twin) is nn.Linear
    assert torch.equal(original.weight, expected[0]) and torch.equal(original.bias, expected[1])
    assert torch.equal(twin.weight, expected[0]) and torch.equal(twin.bias, expected[1])


class _Net(nn.Module):
    def forward(self, x):
        return x + 1


def test_torchs_unpickling_of_a_graph_module_drops_its_meta():
    """Why fxqp's GraphModules are made PicklableGraphModules."""
    gm = fx.symbolic_trace(_Net())
    gm.meta["record"] = 1
    assert "record" not in pickle.loads(pickle.dumps(gm)).meta


def test_each_graph_module_has_a_class_of_torchs_own_whose_base_copies_keep():
    gm = fx.symbolic_trace(_Net())
    assert type(gm) is not fx.GraphModule and type(gm).__bases__ == (fx.GraphModule,)
    assert "forward" in vars(type(gm))  # the generated code lives on that class
    picklable_graph_module(gm)
    assert isinstance(gm, PicklableGraphModule) and type(gm).__bases__ == (PicklableGraphModule,)
    gm.meta["record"] = 1
    for again in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert isinstance(again, PicklableGraphModule) and again.meta["record"] == 1
        assert torch.equal(again(torch.zeros(2)), torch.ones(2))
