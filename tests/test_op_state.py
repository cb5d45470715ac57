"""fxqp.ops.state.set_state against torch's own calls: it sets what ``register_buffer`` and
``nn.Module.__setattr__`` set, so these tests fail when torch keeps a module's state otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxqp.ops.state import set_state


def _state(module: nn.Module) -> dict:
    return {
        name: (dict(value) if isinstance(value, dict) else set(value) if isinstance(value, set) else value)
        for name, value in vars(module).items()
    }


def _pair() -> tuple[nn.Module, nn.Module, dict]:
    tensors = {"start": torch.zeros((), dtype=torch.int64), "mask": torch.ones(3, dtype=torch.bool)}
    return nn.Module(), nn.Module(), tensors


@pytest.mark.parametrize("persistent", [True, False])
def test_buffers_as_register_buffer_sets_them(persistent):
    ours, theirs, tensors = _pair()
    set_state(ours, tensors, persistent=persistent)
    for name, tensor in tensors.items():
        theirs.register_buffer(name, tensor, persistent=persistent)
    assert _state(ours) == _state(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # a buffer replaced, persistent again
    set_state(ours, {"mask": torch.zeros(3, dtype=torch.bool)})
    theirs.register_buffer("mask", torch.zeros(3, dtype=torch.bool))
    assert _state(ours).keys() == _state(theirs).keys()
    assert ours._non_persistent_buffers_set == theirs._non_persistent_buffers_set
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_plain_values_as_setattr_sets_them():
    ours, theirs, _ = _pair()
    values = {"site": "conv1.weight", "symmetric": True, "bits": 8}
    set_state(ours, plain=values)
    for name, value in values.items():
        setattr(theirs, name, value)
    assert _state(ours) == _state(theirs)


def test_the_module_behaves_as_one_built_by_torchs_calls():
    ours, theirs, tensors = _pair()
    set_state(ours, tensors, plain={"bits": 8})
    clone = copy.deepcopy(ours)
    assert clone.bits == 8 and torch.equal(clone.mask, tensors["mask"]) and clone.mask is not tensors["mask"]
    assert ours.to(torch.float64).mask.dtype == torch.bool
    ours.load_state_dict({"start": torch.ones((), dtype=torch.int64), "mask": torch.zeros(3, dtype=torch.bool)})
    assert int(ours.start) == 1 and not ours.mask.any()


def test_global_buffer_registration_hooks_see_every_buffer():
    seen = []
    handle = nn.modules.module.register_module_buffer_registration_hook(lambda module, name, tensor: seen.append(name))
    try:
        set_state(nn.Module(), {"a": torch.zeros(1), "b": torch.zeros(1)}, persistent=False)
    finally:
        handle.remove()
    assert seen == ["a", "b"]
