"""The one class swap of a torch object that fxqp makes, :func:`fxqp.ops.chain.fuse_weight_chain`,
checked against torch's own construction: these tests fail when torch's parametrization lists
change underneath it."""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.ops.chain import WeightChain, fuse_weight_chain


def _parametrized() -> nn.Linear:
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    for p in (nn.Identity(), nn.Identity()):
        parametrize.register_parametrization(module, "weight", p, unsafe=True)
    return module


def test_torch_builds_a_plain_parametrization_list_with_a_forward_of_no_arguments():
    module = _parametrized()
    assert type(module.parametrizations["weight"]) is ParametrizationList
    assert list(inspect.signature(ParametrizationList.forward).parameters) == ["self"]
    assert not hasattr(ParametrizationList, "__slots__") or ParametrizationList.__slots__ == ()


def test_weight_chain_adds_a_forward_and_nothing_else():
    assert WeightChain.__bases__ == (ParametrizationList,)
    own = {name for name in vars(WeightChain) if not (name.startswith("__") and name.endswith("__"))}
    assert own == {"forward"}
    assert "__init__" not in vars(WeightChain) and "__slots__" not in vars(WeightChain)


def test_the_swap_keeps_the_object_its_state_and_what_torch_does_with_it():
    module, theirs = _parametrized(), _parametrized()
    chain = module.parametrizations["weight"]
    before = {name: value for name, value in vars(chain).items()}
    assert fuse_weight_chain(module, "weight")
    assert module.parametrizations["weight"] is chain and type(chain) is WeightChain
    assert {name: value for name, value in vars(chain).items()} == before
    assert list(module.state_dict()) == list(theirs.state_dict())
    assert torch.equal(module.weight, theirs.weight)
    twin = copy.deepcopy(module)
    assert type(twin.parametrizations["weight"]) is WeightChain and torch.equal(twin.weight, theirs.weight)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    assert type(module) is nn.Linear and torch.equal(module.weight, theirs.weight)
    assert not fuse_weight_chain(twin, "weight")  # a list of another class is left as it is


def test_a_fused_chain_reads_as_torchs_list_reads():
    spec = Spec(rules=[Rule(modules=["Linear"], weight=[Prune(sparsity=0.5), Quantize(bits=4)])])
    torch.manual_seed(0)
    gm = fxqp.transform(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), spec)
    gm(torch.randn(3, 8))  # the masks are computed
    gm.eval()
    for module in (gm.get_submodule("0"), gm.get_submodule("2")):
        chain = module.parametrizations["weight"]
        assert type(chain) is WeightChain
        assert torch.equal(chain(), ParametrizationList.forward(chain))
