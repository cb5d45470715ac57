"""The transform pauses the cyclic garbage collector and hands its objects to the oldest
generation (fxqp.transform._collector_paused)."""

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


def ops_of(gm):
    return [m for m in gm.modules() if isinstance(m, fxqp.ops.ScheduledOp)]


def ids_in_generation(generation):
    return {id(o) for o in gc.get_objects(generation=generation)}


@pytest.fixture
def collector_on():
    was_enabled = gc.isenabled()
    gc.enable()
    assert gc.get_freeze_count() == 0, "these tests need a process without frozen objects"
    yield
    (gc.enable if was_enabled else gc.disable)()


@pytest.fixture
def no_automatic_collections(collector_on):
    """Thresholds no test reaches, so that only the transform moves objects between
    generations (an automatic collection would promote young objects on its own)."""
    thresholds = gc.get_threshold()
    gc.set_threshold(10**9, 10**9, 10**9)
    yield
    gc.set_threshold(*thresholds)


def test_transform_objects_go_to_the_oldest_generation(collector_on):
    gm = fxqp.transform(small_model(), SPEC)
    assert gc.isenabled()
    ops = ops_of(gm)
    assert len(ops) == 6  # two weights x (prune, quantize) + two activation quantizers
    oldest = ids_in_generation(2)
    assert all(id(op) in oldest for op in ops)
    assert all(id(node) in oldest for node in gm.graph.nodes)
    assert gc.get_freeze_count() == 0
    # the transformed model works as usual, and a full collection frees it once dropped
    gm(torch.randn(4, 8)).sum().backward()
    probe = weakref.ref(ops[0])
    del gm, ops
    gc.collect()
    assert probe() is None


def test_objects_the_process_froze_stay_frozen(no_automatic_collections):
    keep = small_model()
    gc.freeze()
    try:
        gm = fxqp.transform(small_model(), SPEC)
        # unfreezing would empty the permanent generation (frozen objects that die still
        # leave it, so its exact count is not compared)
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()
        assert not any(id(keep) in ids_in_generation(g) for g in range(3))  # still frozen
        young = ids_in_generation(0)
        assert all(id(op) in young for op in ops_of(gm))  # left to the young collections
    finally:
        gc.unfreeze()


def test_a_paused_collector_stays_paused_and_nothing_moves(collector_on):
    gc.disable()
    gm = fxqp.transform(small_model(), SPEC)
    assert not gc.isenabled()
    young = ids_in_generation(0)
    assert all(id(op) in young for op in ops_of(gm))


def test_after_an_error_the_collector_runs_and_nothing_moved(no_automatic_collections):
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Quantize(bits=4)])])  # matches nothing
    model = small_model()
    assert id(model) in ids_in_generation(0)
    with pytest.raises(SpecError):
        fxqp.transform(model, spec)
    assert gc.isenabled()
    assert id(model) in ids_in_generation(0)
