"""The eager accelerators (fxqp.ops.accelerate) against the plain ops: the same values,
gradients and op state, step by step through mask refreshes, in training and evaluation."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.errors import FxqpError
from fxqp.ops import accelerate
from fxqp.ops.quantize import WeightQuantizer
from fxqp.stages import ActivationStage

HAVE_COMPILER = shutil.which(os.environ.get("CC") or "cc") is not None
needs_kernels = pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine: the native kernels cannot be built")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu(self.conv(x))))
        return self.fc(x.flatten(1))


def _pair(weight: list, activation: list) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    spec = Spec(rules=[Rule(modules=["Conv2d", "Linear"], weight=weight), Rule(modules=["ReLU"], activation=activation)])
    gm = fxqp.transform(Net(), spec, example_inputs=(torch.randn(2, 3, 6, 6),))
    return gm, copy.deepcopy(gm)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _train_both(fast: nn.Module, plain: nn.Module, steps: int = 6) -> None:
    """Train both on the same batches, ``plain`` with every accelerator off; every output,
    gradient and state tensor must be equal, element for element."""
    opt_fast = torch.optim.SGD(fast.parameters(), lr=0.05)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05)
    for step in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        out_fast = fast(x)
        with accelerate.disabled():
            out_plain = plain(x)
        torch.testing.assert_close(out_fast, out_plain, rtol=0, atol=0, msg=lambda m: f"step {step}: {m}")
        opt_fast.zero_grad()
        opt_plain.zero_grad()
        out_fast.square().sum().backward()
        out_plain.square().sum().backward()
        for (name, a), (_, b) in zip(fast.named_parameters(), plain.named_parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=lambda m: f"step {step}, grad of {name}: {m}")
        opt_fast.step()
        opt_plain.step()
        state_fast, state_plain = _state(fast), _state(plain)
        for key in state_fast:
            torch.testing.assert_close(state_fast[key], state_plain[key], rtol=0, atol=0, msg=lambda m: f"step {step}, {key}: {m}")
    fast.eval()
    plain.eval()
    x = torch.randn(3, 3, 6, 6)
    with accelerate.disabled():
        reference = plain(x)
    torch.testing.assert_close(fast(x), reference, rtol=0, atol=0)


RAMP = {"start": 1, "end": 4, "every": 1}


@needs_kernels
@pytest.mark.parametrize(
    "weight",
    [
        [Prune(0.5, **RAMP), Quantize(bits=4, start=2)],
        [Prune(0.6, **RAMP), Quantize(bits=3, symmetric=False, per_channel=False)],
        [Quantize(bits=5, start=1), Prune(0.5, **RAMP)],
        [Prune(0.5, structure="filter", **RAMP), Quantize(bits=8, symmetric=False)],
        [Quantize(bits=6)],
        [Prune(0.7, start=2)],
    ],
    ids=["prune-quantize", "affine-per-tensor", "quantize-prune", "filter-affine", "quantize", "prune"],
)
def test_native_weight_equals_the_plain_ops(weight):
    fast, plain = _pair(weight, [Quantize(bits=8)])
    conv = fast.get_submodule("conv").parametrizations["weight"]
    assert any(name == "native-weight" for name, _, _ in accelerate.planned(conv, conv))
    _train_both(fast, plain)


def test_activation_stages_run_their_plain_ops():
    """No accelerator computes activation ops (a fused prune + quantize stage saved less
    than 5% of the step): every stage's plan is plain."""
    gm, _ = _pair([Quantize(bits=8)], [Prune(0.5), Quantize(bits=8)])
    stages = [m for m in gm.modules() if isinstance(m, ActivationStage)]
    assert stages and all(accelerate.planned(s, s.ops) == ((None, 0, 1), (None, 1, 2)) for s in stages)


def test_plans_take_the_longest_accepted_run_and_leave_the_rest_plain():
    gm, _ = _pair(
        [Quantize(bits=1), Prune(0.5)],  # the 1-bit sign grid is not on the kernels
        [Prune(0.5, dynamic=True), Quantize(bits=8)],
    )
    conv = gm.get_submodule("conv").parametrizations["weight"]
    assert accelerate.planned(conv, conv) == ((None, 0, 1), ("native-weight", 1, 2))
    gm2, _ = _pair([Prune(0.5), Quantize(bits=4)], [Quantize(bits=8), Prune(0.5)])
    conv = gm2.get_submodule("conv").parametrizations["weight"]
    assert accelerate.planned(conv, conv) == (("native-weight", 0, 2),)
    fc = gm2.get_submodule("fc").parametrizations["weight"]
    assert accelerate.planned(fc, fc) == (("native-weight", 0, 2),)


@needs_kernels
def test_an_accelerator_declines_where_hooks_are_installed_and_the_hooks_run():
    fast, plain = _pair([Prune(0.5), Quantize(bits=4)], [Prune(0.5), Quantize(bits=8)])
    calls = []
    for model in (fast, plain):
        for module in model.modules():
            if isinstance(module, WeightQuantizer):
                module.register_forward_hook(lambda m, i, o: calls.append(m.site))
    _train_both(fast, plain, steps=2)
    assert len(calls) == 2 * 2 * 3 + 2 * 3  # both models, 2 training steps and one evaluation each: every weight


def test_a_registered_accelerator_is_planned_called_and_may_decline():
    seen = []

    def run(ops, x):
        seen.append(type(ops[0]).__name__)
        return None  # decline: the plain op runs

    accelerate.register_accelerator(accelerate.Accelerator("test-decline", ((WeightQuantizer, WeightQuantizer),), lambda ops: True, run))
    try:
        gm, twin = _pair([Quantize(bits=8), Quantize(bits=4)], [Quantize(bits=8)])
        conv = gm.get_submodule("conv").parametrizations["weight"]
        assert accelerate.planned(conv, conv) == (("test-decline", 0, 2),)
        x = torch.randn(2, 3, 6, 6)
        out = gm(x)
        with accelerate.disabled():
            reference = twin(x)
        assert seen and seen[0] == "WeightQuantizer"
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
    finally:
        accelerate.unregister_accelerator("test-decline")
    assert "test-decline" not in accelerate.accelerators()


def test_registry_errors_name_what_is_accepted():
    with pytest.raises(FxqpError, match="patterns must be non-empty tuples of ScheduledOp classes"):
        accelerate.register_accelerator(accelerate.Accelerator("bad", ((nn.ReLU,),), lambda ops: True, lambda ops, x: None))
    with pytest.raises(FxqpError, match="is taken"):
        accelerate.register_accelerator(accelerate.Accelerator("host-copies", ((WeightQuantizer,),), lambda ops: True, lambda ops, x: None))
    with pytest.raises(FxqpError, match="unknown name.*accepted: .*native-weight"):
        with accelerate.disabled("native-wieght"):
            pass
    with pytest.raises(FxqpError, match="no accelerator named"):
        accelerate.unregister_accelerator("nothing")


def test_the_clock_reads_the_same_with_and_without_host_copies():
    """Host copies of the schedule buffers follow every write, also writes from outside
    (fxqp.step, load_state_dict): decisions equal those read from the device."""
    fast, plain = _pair([Prune(0.5, **RAMP), Quantize(bits=4, start=2)], [Prune(0.5, **RAMP), Quantize(bits=8, start=3)])
    for model in (fast, plain):
        fxqp.step(model, 1)
        model.load_state_dict(model.state_dict())
    fast_disabled = fast
    opt = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (fast_disabled, plain)]
    for step in range(5):
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        with accelerate.disabled("native-weight"):
            a = fast_disabled(x)
        with accelerate.disabled():
            b = plain(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for o, out in zip(opt, (a, b), strict=True):
            o.zero_grad()
            out.sum().backward()
            o.step()
