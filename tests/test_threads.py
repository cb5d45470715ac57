"""Concurrent fxqp.transform, fxqp.load and fxqp.lower in threads: torch.fx patches
process-wide state while it traces (passes.trace.TRACE_LOCK makes it one trace at a time)."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torchvision
from fxqp_test_nets import FlagReturningHelperNet, NetWithUntraceableBlock, ReusedReluNet
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec

SPEC = Spec(
    rules=[
        Rule(modules=["Conv2d", "Linear"], weight=[Prune(0.5), Quantize(bits=4)]),
        Rule(names=["*relu*"], activation=[Quantize(bits=8)]),
    ]
)

# a model that traces plainly, one whose helper functions become leaves (patched into its
# module's globals while it traces), one traced with a leaf fallback
MODELS = {
    "resnet": (lambda: torchvision.models.resnet18(num_classes=4), (torch.randn(2, 3, 16, 16),)),
    "helper functions": (FlagReturningHelperNet, (torch.randn(2, 3, 4),)),
    "untraceable block": (NetWithUntraceableBlock, None),
    "reused relu": (ReusedReluNet, None),
}


def _transform(name: str) -> nn.Module:
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    return fxqp.transform(build(), SPEC, example_inputs=inputs)


def _pristine() -> None:
    """torch.fx's patches are gone: modules call and look up attributes as torch defines."""
    assert nn.Module.__call__ is ORIGINAL_CALL and nn.Module.__getattr__ is ORIGINAL_GETATTR
    assert nn.Linear(2, 2)(torch.randn(1, 2)).shape == (1, 2)


ORIGINAL_CALL, ORIGINAL_GETATTR = nn.Module.__call__, nn.Module.__getattr__


@pytest.fixture(autouse=True)
def switch_often():
    """Threads take turns every 10 µs (Python's default is 5 ms): traces interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def test_transforms_in_threads_succeed_and_leave_torch_as_it_was():
    names = list(MODELS) * 3
    with ThreadPoolExecutor(max_workers=4) as pool:
        models = list(pool.map(_transform, names))
    _pristine()
    for name, gm in zip(names, models):
        reference = _transform(name)  # the same transform, alone
        # (threads draw the initial weights from one generator: compare the structure)
        assert {k: (v.shape, v.dtype) for k, v in gm.state_dict().items()} == {
            k: (v.shape, v.dtype) for k, v in reference.state_dict().items()
        }, name
        assert [row[:5] for row in fxqp.summary(gm).rows] == [row[:5] for row in fxqp.summary(reference).rows], name


def test_loads_and_lowers_in_threads(tmp_path):
    gm = _transform("helper functions")
    gm(*MODELS["helper functions"][1])
    path = str(tmp_path / "model.fxqp")
    fxqp.save(fxqp.lower(gm.eval()), path)
    x = MODELS["helper functions"][1][0]
    expected = fxqp.load(path, FlagReturningHelperNet())(x)

    def load_and_lower(i: int) -> torch.Tensor:
        if i % 2:
            return fxqp.lower(gm)(x)
        return fxqp.load(path, FlagReturningHelperNet())(x)

    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = list(pool.map(load_and_lower, range(12)))
    _pristine()
    for out in outputs:
        torch.testing.assert_close(out, expected)
