"""The transform leaves the process's cyclic garbage collector as it found it (it neither
pauses nor freezes it), and a transformed model is freed once dropped."""

import gc
import weakref

import pytest
import torch
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.errors import SpecError

SPEC = Spec(rules=[Rule(modules=["Linear"], weight=[Prune(sparsity=0.5), Quantize(bits=4)], activation=[Quantize(bits=8)])])


def small_model():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture
def collector_state():
    was_enabled, thresholds = gc.isenabled(), gc.get_threshold()
    yield
    (gc.enable if was_enabled else gc.disable)()
    gc.set_threshold(*thresholds)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_left_as_it_was(collector_state, enabled, monkeypatch):
    (gc.enable if enabled else gc.disable)()
    frozen = gc.get_freeze_count()
    calls = []
    for name in ("disable", "enable", "freeze", "unfreeze"):
        monkeypatch.setattr(gc, name, lambda *a, _name=name, _f=getattr(gc, name): calls.append(_name) or _f(*a))
    gm = fxqp.transform(small_model(), SPEC)
    with pytest.raises(SpecError):  # after an error as well
        fxqp.transform(small_model(), Spec(rules=[Rule(modules=["Conv2d"], weight=[Quantize(bits=4)])]))
    assert calls == [] and gc.isenabled() is enabled and gc.get_freeze_count() == frozen
    assert len([m for m in gm.modules() if isinstance(m, fxqp.ops.ScheduledOp)]) == 6


def test_a_dropped_model_is_freed(collector_state):
    gc.enable()
    gm = fxqp.transform(small_model(), SPEC)
    gm(torch.randn(4, 8)).sum().backward()
    probe = weakref.ref(next(m for m in gm.modules() if isinstance(m, fxqp.ops.ScheduledOp)))
    del gm
    gc.collect()
    assert probe() is None
