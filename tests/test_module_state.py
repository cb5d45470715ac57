"""Ops and activation stages are built through ``nn.Module``'s own ``__init__``,
``register_buffer`` and ``__setattr__``: each has the state of any module, its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.ops.base import ScheduledOp
from fxqp.stages import ActivationStage


def _state_types(module: nn.Module) -> dict[str, type]:
    return {name: type(value) for name, value in vars(module).items()}


def _transformed():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = Spec(
        rules=[
            Rule(modules=["Linear"], weight=[Prune(sparsity=0.5), Quantize(bits=4)]),
            Rule(modules=["ReLU"], activation=[Quantize(bits=8)]),
        ]
    )
    return model, spec, fxqp.transform(model, spec)


def test_ops_and_stages_have_a_modules_state():
    _, _, gm = _transformed()
    stages = [m for m in gm.modules() if isinstance(m, ActivationStage)]
    ops = [m for m in gm.modules() if isinstance(m, ScheduledOp)]
    assert stages and ops
    expected = _state_types(nn.Module())
    for module in (*ops, *stages, *(stage.ops for stage in stages)):
        assert {k: v for k, v in _state_types(module).items() if k in expected} == expected, type(module).__name__
    assert all(type(stage.ops) is nn.ModuleList for stage in stages)


def test_stage_refuses_an_op_that_is_no_module():
    with pytest.raises(TypeError, match="ActivationStage ops must be nn.Module instances, got int"):
        ActivationStage("relu", "relu", [1])


def test_op_buffers_go_through_register_buffer():
    """Global buffer registration hooks see every buffer of an op, and non-persistent
    buffers stay out of its state dict."""
    _, _, gm = _transformed()
    op = next(m for m in gm.modules() if isinstance(m, ScheduledOp))
    seen = []
    handle = nn.modules.module.register_module_buffer_registration_hook(lambda module, name, tensor: seen.append(name))
    try:
        op.add_buffers(extra=torch.zeros(1))
        op.add_buffers(persistent=False, scratch=torch.zeros(1))
    finally:
        handle.remove()
    assert seen == ["extra", "scratch"]
    assert "extra" in op.state_dict() and "scratch" not in op.state_dict()
    op.set_plain(flag=True)
    assert op.flag is True and "flag" not in op._buffers


def test_transformed_ops_have_independent_state():
    model, spec, gm = _transformed()
    ops = [m for m in gm.modules() if isinstance(m, ScheduledOp)]
    assert len(ops) == 5
    buffer_dicts = {id(op._buffers) for op in ops}
    hook_dicts = {id(op._forward_hooks) for op in ops}
    assert len(buffer_dicts) == len(ops) and len(hook_dicts) == len(ops)
    calls = []
    ops[0].register_forward_hook(lambda *args: calls.append("hooked"))
    ops[1](torch.ones(4, 4))
    assert calls == []
    out = gm(torch.randn(3, 4))
    assert out.shape == (3, 2)
    loaded = fxqp.transform(model, spec)
    loaded.load_state_dict(gm.state_dict())
    for key, value in gm.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
