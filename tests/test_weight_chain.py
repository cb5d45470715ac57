"""A weight's op chain runs through torch's own ParametrizationList, whose ``forward`` is a
:class:`fxqp.ops.chain.WeightChain`: the same values as the list's own forward, carried by
copies and pickles, torch's class untouched."""

from __future__ import annotations

import copy
import pickle

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.ops.chain import WeightChain


def _transformed():
    spec = Spec(rules=[Rule(modules=["Linear"], weight=[Prune(sparsity=0.5), Quantize(bits=4)])])
    torch.manual_seed(0)
    gm = fxqp.transform(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), spec)
    gm(torch.randn(3, 8))  # the masks are computed
    return gm.eval()


def _chains(gm: nn.Module) -> list[ParametrizationList]:
    return [gm.get_submodule(path).parametrizations["weight"] for path in ("0", "2")]


def test_a_module_call_runs_the_forward_set_on_the_instance():
    """What WeightChain relies on: torch calls a module's ``forward`` attribute."""
    module = nn.Identity()
    module.forward = lambda x: x + 1
    assert module(1) == 2


def test_the_list_keeps_torchs_class_and_reads_as_its_own_forward():
    for chain in _chains(_transformed()):
        assert type(chain) is ParametrizationList
        assert isinstance(chain.forward, WeightChain) and chain.forward.chain is chain
        assert torch.equal(chain(), ParametrizationList.forward(chain))
        assert "forward" not in chain.state_dict() and not any(m is chain.forward for m in chain.modules())


def test_copies_and_pickles_carry_the_fused_forward():
    gm = _transformed()
    x = torch.randn(4, 8)
    for again in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        for chain, original in zip(_chains(again), _chains(gm)):
            assert type(chain) is ParametrizationList and chain.forward.chain is chain
            assert torch.equal(chain(), original())
        assert torch.equal(again(x), gm(x))
