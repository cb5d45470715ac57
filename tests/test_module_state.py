"""init_module_state gives a module the same empty state as nn.Module.__init__."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec, module_state
from fxqp.module_state import empty_module_list, init_module_state
from fxqp.stages import ActivationStage


class _Plain(nn.Module):
    def __init__(self):
        init_module_state(self)
        self.register_buffer("b", torch.zeros(2))
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x) + self.b


def _state_types(module: nn.Module) -> dict[str, type]:
    return {name: type(value) for name, value in vars(module).items()}


def test_same_attributes_and_types_as_module_init():
    fast = nn.Module.__new__(nn.Module)
    init_module_state(fast)
    assert _state_types(fast) == _state_types(nn.Module())
    assert fast.training is True


def test_containers_are_fresh_per_module():
    a, b = _Plain(), _Plain()
    for name, value in vars(a).items():
        if isinstance(value, (dict, set)):
            assert value is not getattr(b, name), name
    calls = []
    a.register_forward_hook(lambda *args: calls.append("a"))
    b(torch.ones(1, 2))
    assert calls == []
    a(torch.ones(1, 2))
    assert calls == ["a"]
    assert list(a.state_dict()) == ["b", "lin.weight", "lin.bias"]


def test_module_behaves_as_usual_after_fast_init():
    m = _Plain()
    m.eval()
    assert not m.training and not m.lin.training
    clone = copy.deepcopy(m)
    clone.b.fill_(1.0)
    assert torch.equal(m.b, torch.zeros(2))
    m.load_state_dict(clone.state_dict())
    assert torch.equal(m.b, torch.ones(2))
    assert m.to(torch.float64).b.dtype == torch.float64


def test_empty_module_list_equals_a_new_module_list():
    modules = empty_module_list()
    assert type(modules) is nn.ModuleList and len(modules) == 0
    assert _state_types(modules) == _state_types(nn.ModuleList())
    modules.append(nn.ReLU())
    assert len(modules) == 1 and len(nn.ModuleList()) == 0


def test_unknown_mutable_state_falls_back_to_module_init(monkeypatch):
    monkeypatch.setattr(module_state, "_UNDERSTOOD", False)
    calls = []
    original = nn.Module.__init__

    def counting_init(self, *args, **kwargs):
        calls.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", counting_init)
    stage = ActivationStage("relu", "relu", [])
    assert "ActivationStage" in calls
    assert _state_types(stage)["_modules"] is dict


def test_transformed_ops_have_independent_state():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = Spec(
        rules=[
            Rule(modules=["Linear"], weight=[Prune(sparsity=0.5), Quantize(bits=4)]),
            Rule(modules=["ReLU"], activation=[Quantize(bits=8)]),
        ]
    )
    gm = fxqp.transform(model, spec)
    ops = [m for m in gm.modules() if isinstance(m, fxqp.ops.base.ScheduledOp)]
    assert len(ops) == 5
    buffer_dicts = {id(op._buffers) for op in ops}
    hook_dicts = {id(op._forward_hooks) for op in ops}
    assert len(buffer_dicts) == len(ops) and len(hook_dicts) == len(ops)
    out = gm(torch.randn(3, 4))
    assert out.shape == (3, 2)
    loaded = fxqp.transform(model, spec)
    loaded.load_state_dict(gm.state_dict())
    for key, value in gm.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
